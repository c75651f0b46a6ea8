"""`ShardSet`: a local folder and the same set over HTTP answer alike; the one wording of a bad shard."""
import functools
import http.server
import shutil
import threading

import numpy as np
import pyarrow as pa
import pytest

import pipeline.shardset
from pipeline.errors import ShardError
from pipeline.shardset import ShardSet, open_shard_set


@pytest.fixture()
def http_url(shards):
    """The synthetic shard set served by a local HTTP server."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_local_and_http_answer_the_same(shards, http_url):
    local, remote = ShardSet(shards), ShardSet(http_url)
    assert remote.manifest == local.manifest and remote.index.equals(local.index)
    assert local.counts == {"train": 240, "val": 30, "test": 30, "unlabeled": 30}
    assert [e["file"] for e in local.entries("train")] == [f"train-{i:06d}.tar" for i in range(4)]
    assert remote.where(remote.entries("val")[0]) == f"{http_url}/val-000000.tar"
    assert local.where(local.entries("val")[0]) == str(shards / "val-000000.tar")
    assert local.split_index("val")["key"].to_pylist() == remote.split_index("val")["key"].to_pylist()
    assert len(local.split_index("train")) == 240 and len(local.classes) == 6
    assert open_shard_set(local) is local


def test_the_index_is_parsed_from_a_buffer_arrow_owns(shards, monkeypatch):
    # A reader over Python memory (io.BytesIO, pa.py_buffer) could free it on an Arrow thread at
    # interpreter exit and abort the process (exit -6, seen in CI); see `arrow_owned`.
    data = (shards / "index.parquet").read_bytes()
    monkeypatch.setattr(ShardSet, "_read_bytes", lambda self, name: data if name == "index.parquet"
                        else (shards / name).read_bytes())
    sources, read_table = [], pipeline.shardset.pq.read_table
    monkeypatch.setattr(pipeline.shardset.pq, "read_table", lambda source: sources.append(source) or read_table(source))
    assert len(ShardSet(shards).index) == 330
    [source] = sources
    assert isinstance(source, pa.Buffer) and source.to_pybytes() == data
    assert source.address != np.frombuffer(data, np.uint8).ctypes.data  # a copy, not a view of `data`

def test_not_a_shard_set(tmp_path, http_url):
    with pytest.raises(ShardError) as e:
        ShardSet(tmp_path)
    assert str(e.value) == f"{tmp_path}: not a tinyin shard set (no manifest.json); run `tinyin shard build` first"
    with pytest.raises(ShardError) as e:
        ShardSet(http_url + "/nowhere")
    assert str(e.value) == (f"{http_url}/nowhere: not a tinyin shard set (no manifest.json); "
                            "run `tinyin shard build` first")


def test_a_split_without_samples(shards):
    with pytest.raises(ShardError) as e:
        ShardSet(shards).entries("nope")
    assert str(e.value) == f"{shards}: no samples for split 'nope' (splits: train, val, test, unlabeled)"


def test_the_one_wording_of_a_bad_shard(shards, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(shards, copy)
    s = ShardSet(copy)
    entry = s.entries("val")[0]
    path = copy / entry["file"]
    s.check_local_file(entry)  # intact
    data = bytearray(path.read_bytes())
    data[1000] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError) as e:
        s.check_local_file(entry)
    assert str(e.value) == f"{path}: checksum differs from the manifest (corrupt or modified)"
    s.check_local_file(entry, checksum=False)  # same size: only the checksum can tell
    with pytest.raises(ShardError) as e:
        s.check_bytes(entry, bytes(data[:-512]), where="http://x/val-000000.tar")
    assert str(e.value) == (f"http://x/val-000000.tar: {len(data) - 512:,} bytes, the manifest says "
                            f"{entry['bytes']:,} (truncated or replaced)")
    path.unlink()
    with pytest.raises(ShardError) as e:
        s.check_local_file(entry)
    assert str(e.value) == f"{path}: missing (listed in the manifest)"


def test_s3_through_the_real_client(shards):
    from servers import S3Server

    s3 = S3Server()
    try:
        url = s3.upload(shards, "tiny", "sets/synth")
        remote, local = ShardSet(url), ShardSet(shards)
        assert remote.manifest == local.manifest and remote.index.equals(local.index)
        entry = remote.entries("val")[0]
        assert remote.where(entry) == f"{url}/val-000000.tar"
        remote.check_bytes(entry, remote.fs.cat_file(remote.where(entry)))
    finally:
        s3.close()


def test_faulty_http_server_faults(shards):
    import urllib.request

    from servers import FaultyHTTPServer

    server = FaultyHTTPServer(shards, {"val-000000.tar": "corrupt", "test-000000.tar": "cut-once"})
    try:
        good = (shards / "val-000000.tar").read_bytes()
        got = urllib.request.urlopen(f"{server.url}/val-000000.tar").read()
        assert len(got) == len(good) and got != good
        with pytest.raises(Exception):
            urllib.request.urlopen(f"{server.url}/test-000000.tar").read()
        assert urllib.request.urlopen(f"{server.url}/test-000000.tar").read() == (shards / "test-000000.tar").read_bytes()
        request = urllib.request.Request(f"{server.url}/val-000000.tar", headers={"Range": "bytes=10-19"})
        assert len(urllib.request.urlopen(request).read()) == 10
        assert server.requests["test-000000.tar"] == 2
    finally:
        server.close()
