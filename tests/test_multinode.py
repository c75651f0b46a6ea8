"""Two `torchrun` agents on this machine stand in for two nodes training from shards served over HTTP:
every train sample is seen exactly once per epoch across the nodes, every rank takes the same steps,
and each node downloads the set once into its own cache."""
import os
import socket
import subprocess
import sys
from pathlib import Path

from pipeline.cache import cache_folder
from pipeline.index import read_index
from tests.servers import FaultyHTTPServer

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_from_an_http_set_exactly_once(shards, tmp_path):
    server = FaultyHTTPServer(shards)
    port, out = free_port(), tmp_path / "run"
    try:
        nodes = []
        for node in range(2):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "multinode",
                   str(ROOT / "train.py"), "--shards", server.url, "--arch", "lenet5", "--size", "28",
                   "--epochs", "1", "-b", "40", "--device", "cpu", "--output-dir", str(out), "--dump-keys"]
            env = dict(os.environ, PYTHONPATH=str(ROOT), TINYIN_CACHE=str(tmp_path / f"cache-node{node}"))
            nodes.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        logs = [node.communicate(timeout=180)[0] for node in nodes]
        assert [node.returncode for node in nodes] == [0, 0], logs
    finally:
        server.close()
    keys = read_index(shards, "train").to_pydict()["key"]
    seen = [[k for e, k in (line.split() for line in (out / f"keys-rank{r}.txt").read_text().splitlines()) if e == "0"]
            for r in (0, 1)]
    # 240 train samples, 2 ranks x 3 steps x 40: the same steps on both, and each sample once.
    assert len(seen[0]) == len(seen[1]) == 120 and sorted(seen[0] + seen[1]) == sorted(keys)
    train = [f"train-{i:06d}.tar" for i in range(4)]
    assert {name: server.requests[name] for name in train} == dict.fromkeys(train, 2)  # once per node
    for node in range(2):
        copy = cache_folder(server.url, tmp_path / f"cache-node{node}")
        assert all((copy / name).read_bytes() == (shards / name).read_bytes() for name in train)
