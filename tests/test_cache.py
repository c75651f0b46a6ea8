"""`cached_copy` and `make_loader(URL)`: a remote set (HTTP, S3) reads like the same folder; faults give
a retry or a one-line error naming the URL; the cache is reused, resumed, and shared between processes."""
import concurrent.futures
import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import pipeline.cache
import pipeline.shardset
import pipeline.stream_read
from pipeline.checksum import sum64
from pipeline.cache import cache_folder, cached_copy, is_set_url
from pipeline.cli import main
from pipeline.errors import ShardError, UsageError, hide_password
from pipeline.loader import make_loader
from pipeline.locks import LockError
from pipeline.order import MoreRanksThanSamples, NoFullBatch
from pipeline.schema import CACHE_MARK_FILE
from pipeline.shardset import RETRIES, ShardSet, open_shard_set, worth_retrying
from tests.servers import FaultyHTTPServer, S3Server

ROOT = Path(__file__).resolve().parents[1]
SHARD = "train-000001.tar"


@pytest.fixture()
def serve(shards):
    """serve(faults=None, root=shards) -> a FaultyHTTPServer on loopback, closed after the test."""
    servers = []

    def start(faults=None, root=shards):
        servers.append(FaultyHTTPServer(root, faults))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def batches(shards, path, split="train"):
    """Every batch of one rank of two (seed 5, epoch 1), pixels after the device stage, labels and keys."""
    loader = make_loader(shards, split, batch_size=32, seed=5, epoch=1, rank=1, world_size=2, drop_last=True,
                         with_keys=True, path=path, augment=True)
    return [(images.clone(), labels, keys) for images, labels, keys in loader]


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for (xa, ya, ka), (xb, yb, kb) in zip(a, b):
        assert ka == kb and torch.equal(ya, yb) and torch.equal(xa, xb)


def shard_gets(server):
    return {name: n for name, n in server.requests.items() if name.endswith(".tar")}


@pytest.mark.parametrize("path", ["resident", "fast"])
def test_http_set_yields_the_local_batches_and_a_second_open_fetches_nothing(shards, serve, cache, path):
    server = serve()
    assert_same(batches(server.url, path), batches(shards, path))
    assert shard_gets(server) == {f"train-{i:06d}.tar": 1 for i in range(4)}  # the train split only, once each
    copy = cache_folder(server.url)
    assert sorted(p.name for p in copy.iterdir()) == [".lock", ".tinyin-cache.json", "index.parquet", "manifest.json"] + \
        [f"train-{i:06d}.tar" for i in range(4)]
    assert all((copy / f).read_bytes() == (shards / f).read_bytes() for f in ("train-000000.tar", "train-000003.tar"))
    assert ShardSet(copy).manifest == ShardSet(shards).manifest
    batches(server.url, path)
    assert shard_gets(server) == {f"train-{i:06d}.tar": 1 for i in range(4)}


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(workers=2), UsageError, "workers=2: the resident path (chosen by path='auto') reads in the calling process; "
                                  "only path='stream' uses workers"),
    (dict(path="resident", prefetch=2), UsageError,
     "prefetch=2: the resident path does not prefetch; only path='fast' does"),
    (dict(sample_counts=[64, 64, 64, 48]), UsageError,
     "sample_counts: a shard set's counts come from its manifest; sample_counts is for a list of shard URLs"),
    (dict(batch_size=241, drop_last=True), NoFullBatch,
     "batch_size=241, drop_last=True: the train split's 240 samples fill no batch, so every epoch would be empty; "
     "use a smaller batch_size, or drop_last=False"),
    (dict(world_size=241), MoreRanksThanSamples, "world_size=241: 1 of the ranks would have no batch of the 240 "
                                                 "samples to read, and DDP would wait on them for good; use at most 240 ranks"),
])
def test_an_option_the_path_does_not_use_is_refused_before_the_split_is_fetched(serve, cache, kwargs, error, message):
    """A set URL's split was fetched whole into the cache (the real train split: 1.7 GB), then the option refused
    (or the batch_size or world_size that the split cannot serve)."""
    server = serve()
    with pytest.raises(error) as e:
        make_loader(server.url, "train", **kwargs)
    assert (str(e.value), shard_gets(server), cache.exists()) == (message, {}, False)


def flip_a_bit(path, at=5000):
    """Damage file `path` by one bit, its size kept (what the cache's size check cannot see)."""
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 1]))


def test_a_damaged_shard_in_the_cache_is_removed_and_fetched_again(shards, serve, cache):
    """The cache takes a shard of the right size for complete, so a copy damaged on disk failed every
    run ('checksum differs') until deleted by hand. The check that finds it now removes it."""
    server = serve()
    copy = cached_copy(server.url, "train")
    flip_a_bit(copy / SHARD)
    with pytest.raises(ShardError) as error:
        batches(server.url, "fast")
    assert str(error.value) == (f"{copy / SHARD}: checksum differs from the manifest "
                                "(a damaged cached copy; removed: the next run fetches it again)")
    assert not (copy / SHARD).exists()
    assert_same(batches(server.url, "fast"), batches(shards, "fast"))
    assert shard_gets(server) == {f"train-{i:06d}.tar": 1 + (f"train-{i:06d}.tar" == SHARD) for i in range(4)}
    with pytest.raises(ShardError, match=r"checksum differs from the manifest \(corrupt or modified\)$"):
        ShardSet(shards).check_sha256(ShardSet(shards).entries("train")[1], "0" * 64)  # a set of one's own: kept
    assert (shards / SHARD).is_file()


def test_a_copy_of_the_cache_made_elsewhere_is_ones_own_set_and_keeps_its_files(serve, cache, tmp_path):
    """The cache's `.lock` marked a folder as its copy: a cache folder copied out as one's own set (or a
    folder with another tool's `.lock`) had a damaged shard deleted, 'removed: the next run fetches it again',
    which no run would. The mark now names the cache's folder itself."""
    server = serve()
    copy = cached_copy(server.url, "train")
    mine = tmp_path / "mine"
    shutil.copytree(copy, mine)
    flip_a_bit(mine / SHARD)
    with pytest.raises(ShardError) as error:
        batches(mine, "fast")
    assert str(error.value) == f"{mine / SHARD}: checksum differs from the manifest (corrupt or modified)"
    assert (mine / SHARD).is_file() and ShardSet(copy).is_cached_copy and not ShardSet(mine).is_cached_copy


@pytest.mark.parametrize("damage", ["changed", "removed"])
def test_a_damaged_or_removed_index_in_the_copy_is_written_again(shards, serve, cache, damage):
    """The copy's manifest alone was compared with the set's: an index changed or removed in the copy (a disk's
    error, a clean-up by hand) failed every later run, 'index.parquet: checksum differs from the manifest'
    or 'missing index.parquet', until the folder was deleted by hand. It is written again, no shard fetched."""
    server = serve()
    copy = cached_copy(server.url, "train")
    server.requests.clear()
    if damage == "changed":
        (copy / "index.parquet").write_bytes(b"PAR1 not an index")
    else:
        (copy / "index.parquet").unlink()
    assert_same(batches(server.url, "fast"), batches(shards, "fast"))
    assert (copy / "index.parquet").read_bytes() == (shards / "index.parquet").read_bytes()
    assert shard_gets(server) == {}


@pytest.mark.parametrize("old", [[1], {"shards": [{"file": SHARD}]}, {"shards": 5}, "outside"])
def test_a_damaged_manifest_in_the_copy_is_replaced_and_names_no_file_outside_it(shards, serve, cache, old):
    """The copy's own manifest names the files it may remove: one that is no object, or an entry without sha256
    (a disk's error, a hand edit), was a traceback (AttributeError, KeyError, TypeError) on every later open; one
    written by a tinyin before ShardSet refused '../x' names (a hostile server's) removed that file outside the
    copy. The copy is made whole again from the set's manifest; nothing outside it is touched."""
    server = serve()
    copy = cached_copy(server.url, "train")
    victim = copy.parent / "victim.tar"
    victim.write_bytes(b"the user's")
    if old == "outside":
        old = json.loads((copy / "manifest.json").read_text())
        old["shards"].append(dict(old["shards"][0], file="../victim.tar"))
        old["note"] = "an older tinyin's copy"  # another manifest than the set's, so its shards are compared
    (copy / "manifest.json").write_text(json.dumps(old))
    server.requests.clear()
    assert_same(batches(server.url, "fast"), batches(shards, "fast"))
    assert (copy / "manifest.json").read_bytes() == (shards / "manifest.json").read_bytes()
    assert victim.read_bytes() == b"the user's"


def test_s3_set_yields_the_local_batches(shards, cache):
    s3 = S3Server()
    try:
        url = s3.upload(shards, "tiny-cache", "sets/synth")  # moto keeps buckets per process: a name of its own
        assert_same(batches(url, "resident"), batches(shards, "resident"))
        assert cache_folder(url).joinpath(SHARD).read_bytes() == (shards / SHARD).read_bytes()
    finally:
        s3.close()


def test_a_missing_manifest_names_the_url(serve, cache):
    server = serve({"manifest.json": "missing"})
    with pytest.raises(ShardError) as e:
        make_loader(server.url, "train")
    assert str(e.value) == f"{server.url}: not a tinyin shard set (no manifest.json); run `tinyin shard build` first"


def _truncated(size):
    """(the first byte asked by each of the RETRIES resumed GETs, the bytes there at the end) for a shard
    whose every GET sends half the asked range."""
    starts, have = [], 0
    for _ in range(RETRIES):
        starts.append(have)
        have += (size - have) // 2
    return starts, have


@pytest.mark.parametrize("fault", ["missing", "truncate", "corrupt"])
def test_a_bad_shard_is_one_line_naming_its_url_and_never_left_as_complete(shards, serve, cache, fault,
                                                                             quick_retries):
    server = serve({SHARD: fault})
    size = (shards / SHARD).stat().st_size
    with pytest.raises(ShardError) as e:
        make_loader(server.url, "train")
    url = f"{server.url}/{SHARD}"
    # A connection cut at every attempt was named as the file's fault, as if the server's were short: 'URL:
    # 492,032 bytes, the manifest says 507,904 (truncated or replaced)'.
    assert str(e.value) == {
        "missing": f"{url}: missing (listed in the manifest)",
        "truncate": f"{url}: cannot fetch (the connection closed at byte {_truncated(size)[1]:,} of {size:,}, "
                    f"after {RETRIES} attempts)",
        "corrupt": f"{url}: checksum differs from the manifest (corrupt or modified)",
    }[fault]
    copy = cache_folder(server.url)
    assert not (copy / SHARD).exists()
    if fault == "truncate":  # each attempt resumed where the last broke off
        assert [s for name, s in server.starts if name == SHARD] == _truncated(size)[0]
        assert (copy / f"{SHARD}.part").stat().st_size == _truncated(size)[1]
    else:
        assert not (copy / f"{SHARD}.part").exists()
    assert server.requests[SHARD] == {"missing": 0, "truncate": RETRIES, "corrupt": RETRIES}[fault]


def test_a_shard_shorter_on_the_server_than_the_manifest_says_is_named_so(shards, serve, cache, tmp_path,
                                                                          quick_retries):
    """The whole body arrived (its Content-Length), short of the manifest's size: the file's fault, not the link's."""
    www = shutil.copytree(shards, tmp_path / "www")
    size = (www / SHARD).stat().st_size
    os.truncate(www / SHARD, size - 4096)
    server = serve(root=www)
    with pytest.raises(ShardError) as e:
        make_loader(server.url, "train")
    assert str(e.value) == f"{server.url}/{SHARD}: {size - 4096:,} bytes, the manifest says {size:,} (truncated or replaced)"


def test_a_server_down_for_a_second_is_waited_for(shards, serve, cache):
    """A server's restart, a load balancer's blip: the fetch tried each shard 3 times with no wait between,
    and the run ended 'cannot fetch (Connection refused, after 3 attempts)' at once. Fetches are now
    tried over 7.5 s of waits, doubling from 0.5 s (`shardset.retry_waits`), as the stream path's reads."""
    server = serve()
    remote = ShardSet(server.url)  # the manifest and index read
    server.down_for(1.0)
    copy = cached_copy(remote, "train")
    for entry in remote.entries("train"):
        assert (copy / entry["file"]).read_bytes() == (shards / entry["file"]).read_bytes()


def test_a_server_down_a_moment_as_the_set_is_opened_is_waited_for(shards, serve):
    """A server's blip at the very start of a run (`--shards http://...`): the manifest's read failed at
    once, 'manifest.json: unreadable (URLError: ... Connection refused)', where a shard's read or fetch
    rode it out. The set's two files are now read as a shard is (`shardset.retry_waits`)."""
    server = serve()
    server.down_for(0.4)  # back before the second attempt, 0.5 s on
    remote = ShardSet(server.url)
    assert remote.manifest == ShardSet(shards).manifest and remote.index_bytes == (shards / "index.parquet").read_bytes()


def test_a_manifest_and_index_answered_503_once_are_asked_for_again(shards, serve, quick_retries):
    server = serve({"manifest.json": "busy-once", "index.parquet": "busy-once"})
    assert ShardSet(server.url).manifest == ShardSet(shards).manifest
    assert dict(server.requests) == {"manifest.json": 2, "index.parquet": 2}


def test_a_set_whose_server_stays_down_is_named_after_every_attempt_and_a_404_after_one(serve, quick_retries,
                                                                                       monkeypatch):
    server = serve({"manifest.json": "missing"})
    url, gets, get = server.url, [], pipeline.shardset._http_get
    monkeypatch.setattr(pipeline.shardset, "_http_get", lambda where: gets.append(where) or get(where))
    with pytest.raises(ShardError, match=r": not a tinyin shard set \(no manifest.json\)"):
        ShardSet(url)
    assert gets == [f"{url}/manifest.json"]  # a missing file is final at once
    server.close()
    with pytest.raises(ShardError) as e:
        ShardSet(url)
    assert str(e.value) == (f"{url}/manifest.json: unreadable (URLError: <urlopen error [Errno 111] "
                            "Connection refused>, after 5 attempts)")
    assert gets == [f"{url}/manifest.json"] * 6


def test_a_server_that_stays_down_is_named_after_every_attempt(serve, cache, quick_retries):
    server = serve()
    remote = ShardSet(server.url)
    server.close()
    with pytest.raises(ShardError) as e:
        cached_copy(remote, "train", workers=1)
    assert str(e.value) == f"{server.url}/train-000000.tar: cannot fetch ([Errno 111] Connection refused, after 5 attempts)"


def test_a_full_disk_names_the_cache_folders_file_at_once(serve, cache, monkeypatch):
    """A cache on a full disk: the fetch tried again for 8 s, then named the server's URL, 'cannot fetch
    ([Errno 28] No space left on device, after 5 attempts)', not the disk to clean."""
    server, tries = serve(), []

    def full(fd, offset, size):
        tries.append(os.readlink(f"/proc/self/fd/{fd}"))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr("pipeline.cache.os.posix_fallocate", full)
    wait = concurrent.futures.wait

    def loaded(futures, **kw):  # a loaded machine's: the shards' thread fails them all before this one looks
        wait(futures)
        return wait(futures, **kw)
    monkeypatch.setattr("pipeline.cache.concurrent.futures.wait", loaded)
    with pytest.raises(OSError) as e:
        cached_copy(server.url, "train", workers=1)
    part = cache_folder(server.url) / "train-000000.tar.part"
    assert str(e.value) == f"[Errno 28] No space left on device: '{part}'"
    assert tries.count(str(part)) == 1


def test_a_cache_on_a_file_system_that_takes_no_locks_says_to_move_it(serve, cache, monkeypatch):
    """$TINYIN_CACHE on Lustre mounted without -o flock: flock's ENOSYS was an OSError traceback ('Function not
    implemented') before any shard was fetched."""
    import fcntl

    def no_locks(f, how):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    server = serve()
    with pytest.raises(LockError) as e:  # a TinyinError: one line in the CLI and train.py
        cached_copy(server.url, "train")
    assert str(e.value) == (f"{cache_folder(server.url) / '.lock'}: cannot lock it ({os.strerror(errno.ENOSYS)}): its "
                            "file system takes no file locks, which keep two processes from filling one folder at "
                            "once; set $TINYIN_CACHE to a folder on another file system")
    assert not list(cache_folder(server.url).glob("*.tar*"))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_or_quota_as_the_part_is_made_names_that_file_at_once(serve, cache, monkeypatch, code):
    """Out of inodes (ENOSPC from the open that creates the .part) or over quota: the disk's error naming the
    file, not the cache folder called another user's, nor the URL after 5 attempts."""
    server, opens = serve(), []

    def full(path, mode="r", *args, **kwargs):
        if str(path).endswith(".part"):
            opens.append(path)
            raise OSError(code, os.strerror(code), str(path))
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr("pipeline.cache.open", full, raising=False)
    with pytest.raises(OSError) as e:
        cached_copy(server.url, "val", workers=1)
    part = cache_folder(server.url) / "val-000000.tar.part"
    assert (type(e.value), str(e.value), opens) == (OSError, f"[Errno {code}] {os.strerror(code)}: '{part}'", [part])


# `tinyin ARGS` whose every shard transfer marks file argv[1] and waits for the fetch's stop (a transfer under
# way), its Ctrl-C taken as a terminal delivers it. SIGUSR1 reaches a transfer's thread, never the main one: the
# kernel gives a process's signal to any thread that does not block it (the main one blocks it here before any
# thread starts, and the transfers unblock it), and Python runs the handler only once the main thread runs code.
MID_TRANSFER = """
import signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # first: threads started later inherit the mask
import pathlib, sys
import pipeline.cache
from pipeline.cli import main

def receive(url, part, start, size, progress, stop):
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    pathlib.Path(sys.argv[1]).touch()
    stop.wait(60)
pipeline.cache._http_receive = receive
signal.signal(signal.SIGINT, signal.default_int_handler)
main(sys.argv[2:], prog_name="tinyin")
"""


def test_sigusr1_stops_the_fetch_of_shard_verify_url_in_one_line(serve, cache, tmp_path):
    """SIGUSR1, which train.py's fetch of a set URL takes as SIGTERM, killed `shard verify URL`'s fetch where it
    stood, without a line (as `data fetch`: `errors.STOPS`). It stops as on SIGTERM now, also where the kernel
    gives the signal to a transfer's thread: the main thread waited for the transfers without a timeout, and
    slept through it until a shard came (here: for good)."""
    marker = tmp_path / "receiving"
    proc = subprocess.Popen([sys.executable, "-c", MID_TRANSFER, str(marker), "shard", "verify", "--quiet",
                             serve().url], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, stdout, stderr) == (128 + signal.SIGUSR1, "", "stopped by SIGUSR1\n")


def test_a_ctrl_c_while_a_fetch_waits_to_try_again_stops_it(serve, cache, monkeypatch):
    """Fetches wait seconds to try a shard again: a Ctrl-C (or SIGTERM) must not wait for their every try."""
    monkeypatch.setattr("pipeline.shardset.BACKOFF_S", 2.0)  # a fetch that kept trying: 5 tries over 30 s
    remote, tries = ShardSet(serve().url), []
    ctrl_c = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))

    def refused(url, *args):
        tries.append(url)
        if len(tries) == 1:  # the Ctrl-C, soon after the server is found down (the main thread waiting)
            ctrl_c.start()
        raise ConnectionRefusedError(111, "Connection refused")
    monkeypatch.setattr("pipeline.cache._http_receive", refused)
    try:
        with pytest.raises(KeyboardInterrupt):
            cached_copy(remote, "train", workers=1)
    finally:
        ctrl_c.cancel()  # a read that failed without it must not interrupt the next test
    assert len(tries) == 1


def test_a_server_gone_quiet_mid_shard_is_tried_again_from_what_arrived(shards, serve, cache, monkeypatch,
                                                                        quick_retries):
    """A read that timed out (or a connection reset) raised inside the read into the memory map, whose close then
    found the slice read into still held by the error's frames: 'cannot fetch (BufferError: cannot close exported
    pointers exist)', at once, the timeout never tried again nor named. It is a cut connection: resumed."""
    monkeypatch.setattr("pipeline.cache.TIMEOUT_S", 0.3)
    monkeypatch.setattr("pipeline.cache.BLOCK", 1 << 16)  # a read fills its block: the one the stall cut is lost
    server, data = serve({SHARD: "stall"}), (shards / SHARD).read_bytes()
    url = f"{server.url}/{SHARD}"
    with pytest.raises(ShardError) as e:
        cached_copy(server.url, "train", workers=1)
    assert str(e.value) == f"{url}: cannot fetch (timed out, after {RETRIES} attempts)"
    starts = [0]
    for _ in range(RETRIES):  # each answer sends half of what is asked, of which the whole blocks are kept
        starts.append(starts[-1] + (len(data) - starts[-1]) // 2 // (1 << 16) * (1 << 16))
    assert [at for name, at in server.starts if name == SHARD] == starts[:-1] and starts[-1] > 0
    assert (cache_folder(server.url) / f"{SHARD}.part").read_bytes() == data[:starts[-1]]


def test_a_ctrl_c_while_a_server_has_gone_quiet_mid_shard_stops_the_fetch_at_once(shards, serve, cache, monkeypatch):
    """A transfer blocked reading a server gone quiet saw the stop only at its socket's timeout (60 s), and the
    Ctrl-C (or SIGTERM: a scheduler's, whose grace may be shorter) waited for it. The stop shuts the connections
    being read; what arrived stays in the .part, cut back to it."""
    monkeypatch.setattr("pipeline.cache.TIMEOUT_S", 20)  # the code before: the Ctrl-C took these 20 s
    monkeypatch.setattr("pipeline.cache.BLOCK", 1 << 16)  # a read fills its block: the one the stall cut is lost
    data, http_open, blocked, sent = (shards / SHARD).read_bytes(), pipeline.cache.http_open, threading.Event(), {}
    kept = len(data) // 2 // (1 << 16) * (1 << 16)  # the whole blocks of the half the server sends

    def opened(url, *args, **kwargs):  # the shard's reads counted: the one after those blocks waits for good
        response, got = http_open(url, *args, **kwargs), [0]
        readinto = response.readinto

        def counted(view):
            if got[0] == kept:
                blocked.set()
            n = readinto(view)
            got[0] += n
            return n
        if url.endswith(SHARD):
            response.readinto = counted
        return response
    monkeypatch.setattr(pipeline.cache, "http_open", opened)

    def ctrl_c():
        if blocked.wait(20):
            time.sleep(0.1)  # into the read
            sent["at"] = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)
    server, thread = serve({SHARD: "stall"}), threading.Thread(target=ctrl_c)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            cached_copy(server.url, "train", workers=1)
        stopped = time.monotonic() - sent["at"]
    finally:
        thread.join()
    # the read cut short returns the bytes it had: the whole half the server sent
    assert stopped < 5 and (cache_folder(server.url) / f"{SHARD}.part").read_bytes() == data[: len(data) // 2]


def test_a_connection_cut_mid_shard_resumes_and_the_epoch_is_whole(shards, serve, cache):
    server = serve({SHARD: "cut-once"})
    assert_same(batches(server.url, "fast"), batches(shards, "fast"))
    size = (shards / SHARD).stat().st_size
    assert [s for name, s in server.starts if name == SHARD] == [0, size // 2]  # the retry asked for the rest only
    assert (cache_folder(server.url) / SHARD).read_bytes() == (shards / SHARD).read_bytes()


def test_a_shard_behind_a_redirect_is_fetched_as_the_stream_path_reads_it(shards, serve, cache):
    server = serve({SHARD: "redirect"})
    copy = cached_copy(server.url, "train")
    assert (copy / SHARD).read_bytes() == (shards / SHARD).read_bytes() and server.requests[SHARD] == 1


@pytest.mark.parametrize("path", ["fast", "stream"])
def test_a_url_with_user_and_password_logs_in(shards, cache, path):
    """`http://user:password@host/set` (as curl takes it): urllib read the user and password as part of the
    host name, and the set failed to open with 'Name or service not known'."""
    server = FaultyHTTPServer(shards, auth="ann:p@ss")
    try:
        url = server.url.replace("://", "://ann:p%40ss@")
        assert_same(batches(url, path), batches(shards, path))
    finally:
        server.close()


def test_a_urls_password_is_hidden_in_the_error_line(shards, cache, quick_retries):
    """The error line names the URL, and job logs are read by others: its password shows as ***. A wrong
    password is named at once, not 'after 5 attempts' (`worth_retrying`)."""
    server = FaultyHTTPServer(shards, auth="ann:p@ss")
    try:
        result = CliRunner().invoke(main, ["shard", "verify", server.url.replace("://", "://ann:wrong%21pw@")])
        hidden = server.url.replace("://", "://ann:***@")
        assert (result.exit_code, result.output) == (
            1, f"error: {hidden}/manifest.json: unreadable (OSError: HTTP 401 Unauthorized)\n")
    finally:
        server.close()


def test_a_redirect_loop_is_one_line_and_final_at_once(shards, serve, cache, monkeypatch):
    """A server that redirects a file to itself: urllib gives up after 5 redirects with a reason of three lines
    ('... would lead to an infinite loop.\nThe last 30x error message was:\nFound'), and the read was tried
    again 5 times over 7.5 s of waits, as if the server might answer next time. One line now, at once."""
    monkeypatch.setattr(pipeline.shardset.time, "sleep", lambda s: pytest.fail("waited to try again"))
    server = serve({"manifest.json": "redirect-loop"})
    result = CliRunner().invoke(main, ["shard", "verify", server.url])
    assert (result.exit_code, result.output) == (
        1, f"error: {server.url}/manifest.json: unreadable (OSError: HTTP 302 The HTTP server returned a redirect "
           "error that would lead to an infinite loop.)\n")


def test_a_certificate_no_one_trusts_is_final_at_once(shards, monkeypatch, tmp_path):
    """An https server whose certificate fails verification (self-signed, expired, another host's): asking again
    changes nothing, and the read was tried 5 times over 7.5 s, then named '..., after 5 attempts'. Now at once,
    for the set's manifest and the stream path's shard alike."""
    server = FaultyHTTPServer(shards, tls=True)
    try:
        monkeypatch.setattr(pipeline.shardset.time, "sleep", lambda s: pytest.fail("waited to try again"))
        result = CliRunner().invoke(main, ["shard", "verify", server.url])
        assert result.exit_code == 1 and result.output.startswith(
            f"error: {server.url}/manifest.json: unreadable (URLError: <urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] "
            "certificate verify failed: self-signed certificate (")
        assert result.output.endswith(")>)\n") and result.output.count("\n") == 1
        reads, read_whole = [], pipeline.stream_read.read_whole
        monkeypatch.setattr(pipeline.stream_read, "read_whole", lambda url, *a: reads.append(url) or read_whole(url, *a))
        url = f"{server.url}/val-000000.tar"
        with pytest.raises(ShardError, match="^" + re.escape(f"{url}: unreadable shard (URLError: ")):
            next(iter(make_loader([url], "val", path="stream", sample_counts=[60], workers=0)))
        assert reads == [url]
        with pytest.raises(ssl.SSLCertVerificationError) as e:  # the cache's fetch, as it sees the failure
            pipeline.cache._http_receive(url, tmp_path / "part", 0, 10, lambda n: None, threading.Event())
        assert not worth_retrying(e.value)
    finally:
        server.close()


def test_a_signed_urls_token_is_hidden_in_the_error_line(shards, cache, quick_retries):
    """A signed URL's token is as much a secret as a password (whoever reads the job log could use it
    until it expires): the error line showed it in full."""
    server = FaultyHTTPServer(shards, query="sv=1&sig=a%2Fb")
    try:
        result = CliRunner().invoke(main, ["shard", "verify", f"{server.url}/?sv=1&sig=wrong"])
        assert (result.exit_code, result.output) == (
            1, f"error: {server.url}/manifest.json?sv=1&sig=***: unreadable (OSError: HTTP 403 Forbidden)\n")
    finally:
        server.close()


def test_a_urls_password_and_token_are_hidden_in_clicks_own_errors(tmp_path):
    """A URL given to a flag that takes a folder: click's 'Invalid value' line showed it whole (report's own
    'no such folder' hides them too)."""
    result = CliRunner().invoke(main, ["report", "https://ann:pw@h/run?sig=S"])
    assert (result.exit_code, result.output) == (1, "error: https://ann:***@h/run?sig=***: no such folder\n")
    result = CliRunner().invoke(main, ["shard", "build", "--src", "x", "--out", "y", "--on-error", "https://ann:pw@h/x?sig=S"])
    assert (result.exit_code, result.output) == (
        2, "error: Invalid value for '--on-error': 'https://ann:***@h/x?sig=***' is not one of 'fail', 'skip'.\n")
    result = CliRunner().invoke(main, ["bench", "loader", "--shards", "https://ann:pw@h/tiny?sig=S", "--remote-only"])
    assert (result.exit_code, result.output) == (1, "error: --shards https://ann:***@h/tiny?sig=***: no such folder\n")


def test_hide_password_hides_only_passwords_and_tokens():
    text = "s3://b/x https://ann:p%40ss@host:8/set?sig=a@b, ftp://bob@h/f and http://h/a:b@c"
    assert hide_password(text) == "s3://b/x https://ann:***@host:8/set?sig=***, ftp://bob@h/f and http://h/a:b@c"


@pytest.mark.parametrize("url, hidden", [
    ("https://b.s3.amazonaws.com/t.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20240101"
     "&X-Amz-Date=20240101T000000Z&X-Amz-SignedHeaders=host&X-Amz-Security-Token=IQo%2Bx&X-Amz-Signature=0a1b",
     "https://b.s3.amazonaws.com/t.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
     "&X-Amz-Date=20240101T000000Z&X-Amz-SignedHeaders=host&X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("https://a.blob.core.windows.net/c/tiny?sv=2021-06-08&se=2024-01-01T00:00:00Z&sp=rl&sig=ab%2Bc%3D",
     "https://a.blob.core.windows.net/c/tiny?sv=2021-06-08&se=2024-01-01T00:00:00Z&sp=rl&sig=***"),
    ("https://storage.googleapis.com/b/t?X-Goog-Credential=sa%40p&X-Goog-Signature=0a1b#top",
     "https://storage.googleapis.com/b/t?X-Goog-Credential=***&X-Goog-Signature=***#top"),
    ("https://d1.cloudfront.net/t.zip?Expires=1&Signature=a~b&Key-Pair-Id=K2",
     "https://d1.cloudfront.net/t.zip?Expires=1&Signature=***&Key-Pair-Id=K2"),
    ("--shards=https://h/x?access_token=Zz==&page=2&api_key=k;", "--shards=https://h/x?access_token=***&page=2&api_key=***;"),
    ("cannot download https://h/t.zip?token=abc: HTTP 403 Forbidden", "cannot download https://h/t.zip?token=***: HTTP 403 Forbidden"),
    ("--shards 'https://u:p@h/x?sig=abc' --lr 0.1", "--shards 'https://u:***@h/x?sig=***' --lr 0.1"),
    ("not a URL: ?sig=abc token=abc", "not a URL: ?sig=abc token=abc"),
], ids=["s3", "azure", "gcs", "cloudfront", "generic", "error-line", "shell", "no-url"])
def test_hide_password_hides_a_signed_urls_token(url, hidden):
    assert hide_password(url) == hidden


@pytest.mark.parametrize("path", ["fast", "stream"])
def test_a_url_with_a_token_in_its_query_string_asks_with_it_for_every_file(shards, cache, path):
    """A signed URL (`https://host/set/?sig=...`, as object stores hand out for a folder): each file's
    name went after the token (`?sig=.../manifest.json`), and the set did not open."""
    server = FaultyHTTPServer(shards, query="sv=1&sig=a%2Fb")
    try:
        assert_same(batches(f"{server.url}/?sv=1&sig=a%2Fb", path), batches(shards, path))
        if path == "fast":  # the copy is found again under a new token
            server.query = "sv=2&sig=c"
            cached_copy(f"{server.url}?sv=2&sig=c", "train")
            assert shard_gets(server) == {f"train-{i:06d}.tar": 1 for i in range(4)}
    finally:
        server.close()


def test_a_complete_copy_in_a_folder_this_process_cannot_write_is_read(serve, cache, monkeypatch):
    """A cache filled beforehand on a read-only mount, or by another user: opening its lock file to write
    failed ('error: Read-only file system: .../.lock') though nothing was left to fetch. (The folder is
    made unwritable by refusing the write-open of its lock: root, running the tests, may write anywhere.)"""
    server = serve()
    copy = cached_copy(server.url, "train")
    server.requests.clear()

    def read_only(path, mode="r", *args, **kwargs):
        if Path(path).parent == copy and set(mode) & set("wa+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr("pipeline.cache.open", read_only, raising=False)
    assert cached_copy(server.url, "train") == copy and shard_gets(server) == {}
    (copy / CACHE_MARK_FILE).unlink()  # one filled by a tinyin before the mark, then mounted read-only
    monkeypatch.setattr("pipeline.atomic.open", read_only, raising=False)
    assert cached_copy(server.url, "train") == copy and shard_gets(server) == {}
    assert not (copy / CACHE_MARK_FILE).exists()


def test_a_shard_the_cache_folder_cannot_take_fails_at_once_naming_the_file(serve, cache, monkeypatch,
                                                                          quick_retries):
    """A split not yet in a copy another user filled (their folder, mode 755): writing its .part was
    refused, and was retried as a cut connection is (6 attempts, about 10 s on the real set), then
    reported as 'URL: cannot fetch' though the URL was fine. (As root the refusal is the open's.)"""
    server = serve()
    opens = []

    def refused(path, mode="r", *args, **kwargs):
        if str(path).endswith(".part"):
            opens.append(path)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr("pipeline.cache.open", refused, raising=False)
    with pytest.raises(ShardError) as e:
        cached_copy(server.url, "val", workers=1)
    part = cache_folder(server.url) / "val-000000.tar.part"
    assert opens == [part]
    assert str(e.value) == (f"{part}: cannot write (Permission denied); the cache folder is another user's or "
                            "read-only: set $TINYIN_CACHE to a folder of your own")


def val_failures(url, monkeypatch):
    """{path: (the error line, the shard URLs asked, in order)} of the val split of the set at `url` (an s3://
    one) fetched by the cache ("fetch") and read by the stream path ("stream")."""
    asked = {"fetch": [], "stream": []}
    receive, read_whole = pipeline.cache._Fetch._fsspec_receive, pipeline.stream_read.read_whole
    monkeypatch.setattr(pipeline.cache._Fetch, "_fsspec_receive",
                        lambda self, url, *args: asked["fetch"].append(url) or receive(self, url, *args))
    monkeypatch.setattr(pipeline.stream_read, "read_whole",
                        lambda url, *args: asked["stream"].append(url) or read_whole(url, *args))
    failures = {}
    for path, run in (("fetch", lambda: cached_copy(url, "val", workers=1)),
                      ("stream", lambda: next(iter(make_loader(url, "val", path="stream", workers=0))))):
        with pytest.raises(ShardError) as e:
            run()
        failures[path] = (str(e.value), asked[path])
    return failures


def test_an_s3_access_denied_is_final_at_once_and_not_blamed_on_the_cache_folder(shards, cache, monkeypatch,
                                                                               quick_retries):
    """s3fs raises a bucket's 403 AccessDenied as PermissionError, and it was tried again as a cut connection
    is: 5 attempts over 7.5 s of waits, then '..., after 5 attempts', where an HTTP 403 is final at once
    (`worth_retrying`). One attempt now, named as the 403 is: the URL's fault, not the cache folder's (which
    took the .part), on the manifest, the cache's fetch and the stream path's read alike."""
    s3 = S3Server()
    try:
        url = s3.upload(shards, "tiny-denied", "set")
        s3.deny_reads("tiny-denied", allowed=("set/manifest.json", "set/index.parquet"))
        result = CliRunner().invoke(main, ["shard", "verify", "s3://tiny-denied/other"])
        assert (result.exit_code, result.output) == (
            1, "error: s3://tiny-denied/other/manifest.json: unreadable (PermissionError: Forbidden)\n")
        shard = f"{url}/val-000000.tar"
        assert val_failures(url, monkeypatch) == {
            "fetch": (f"{shard}: cannot fetch (PermissionError: Forbidden)", [shard]),
            "stream": (f"{shard}: unreadable shard (PermissionError: Forbidden)", [shard])}
    finally:
        s3.close()


def test_an_s3_missing_key_or_bucket_is_final_at_once(shards, cache, monkeypatch):
    """NoSuchKey and NoSuchBucket (s3fs's FileNotFoundError) are named at the first answer, as an HTTP 404 is.
    A bucket that is not there (a name mistyped) was 'not a tinyin shard set (no manifest.json); run `tinyin
    shard build` first', as a folder without a set is: the store's own word is named instead."""
    s3 = S3Server()
    try:
        url = s3.upload(shards, "tiny-gone", "set")
        boto3 = pytest.importorskip("boto3")
        boto3.client("s3", endpoint_url=s3.endpoint).delete_object(Bucket="tiny-gone", Key="set/val-000000.tar")
        errors = []
        for missing in ("s3://tiny-no-such-bucket/set", "s3://tiny-gone/other"):
            with pytest.raises(ShardError) as e:
                ShardSet(missing)
            errors.append(str(e.value))
        assert errors == [
            "s3://tiny-no-such-bucket/set: cannot open (FileNotFoundError: The specified bucket does not exist)",
            "s3://tiny-gone/other: not a tinyin shard set (no manifest.json); run `tinyin shard build` first"]
        shard = f"{url}/val-000000.tar"
        assert val_failures(url, monkeypatch) == {
            "fetch": (f"{shard}: missing (listed in the manifest)", [shard]),
            "stream": (f"{shard}: missing (listed in the manifest)", [shard])}
    finally:
        s3.close()


def test_a_fetch_retries_an_http_exception_and_not_a_clients_own_error(shards, serve, cache, monkeypatch,
                                                                       quick_retries):
    """An IncompleteRead (no errno) is a cut transfer, tried again; a client's own error (a bad argument, no
    credentials) is final at once, not 'after 5 attempts'."""
    server, calls, receive = serve(), [], pipeline.cache._http_receive

    def cut_once(url, part, *args):
        calls.append(url)
        if len(calls) == 1:
            raise http.client.IncompleteRead(b"")
        return receive(url, part, *args)
    monkeypatch.setattr("pipeline.cache._http_receive", cut_once)
    copy = cached_copy(server.url, "val", workers=1)
    assert len(calls) == 2 and (copy / "val-000000.tar").read_bytes() == (shards / "val-000000.tar").read_bytes()
    calls.clear()
    monkeypatch.setattr("pipeline.cache._http_receive", lambda url, *args: calls.append(url) or 1 / 0)
    with pytest.raises(ShardError) as e:
        cached_copy(server.url, "test", workers=1)
    url = f"{server.url}/test-000000.tar"
    assert (str(e.value), calls) == (f"{url}: cannot fetch (ZeroDivisionError: division by zero)", [url])


def test_a_complete_copy_is_read_while_its_url_cannot_be_reached(shards, serve, cache, capsys, quick_retries):
    """A run resumed (a preempted job requeued) while the server or object store was down, or on a node
    without the network, failed 'manifest.json: unreadable (Connection refused)' though every file it
    needed was in the cache. A copy missing a shard is still an error: nothing could fill it."""
    server = serve()
    copy = cached_copy(server.url, "train")
    url = server.url
    server.close()
    capsys.readouterr()
    assert cached_copy(url, "train") == copy
    err = capsys.readouterr().err
    assert err.startswith(f"note: {url}/manifest.json: unreadable (URLError: ") and err.endswith(
        f"; reading its copy fetched before, {copy}\n")
    with pytest.raises(ShardError, match=r"/manifest.json: unreadable \(URLError: "):
        cached_copy(url, ("train", "val"))  # val was never fetched
    (copy / SHARD).write_bytes(b"cut short")
    with pytest.raises(ShardError, match=r"/manifest.json: unreadable \(URLError: "):
        cached_copy(url, "train")


def test_shards_are_fetched_through_the_proxy_the_manifest_is_read_through(shards, serve, cache, monkeypatch):
    """Nodes that reach the data only through a proxy (http_proxy): the manifest and the stream path
    (urllib) used it, the cache's own HTTP client did not, and every shard failed 'cannot fetch'."""
    proxy = serve()
    monkeypatch.setenv("http_proxy", proxy.url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's opener reads the proxies once, when made
    copy = cached_copy("http://tinyin.invalid", "train")  # a host only the proxy knows
    assert (copy / SHARD).read_bytes() == (shards / SHARD).read_bytes() and proxy.requests[SHARD] == 1


@pytest.mark.parametrize("workers", [1, 4])
def test_a_partial_file_from_an_earlier_run_is_resumed(shards, serve, cache, workers, quick_retries):
    server = serve({SHARD: "truncate"})
    with pytest.raises(ShardError):
        cached_copy(server.url, "train", workers=workers)
    # The other transfers give up at the failure: with 4 workers, which of them had finished is timing.
    folder, sizes = cache_folder(server.url), {e["file"]: e["bytes"] for e in ShardSet(shards).entries("train")}
    part = lambda name: folder / f"{name}.part"  # noqa: E731
    kept = {name: part(name).stat().st_size if part(name).exists() else 0
            for name in sizes if not (folder / name).exists()}
    assert 0 < kept[SHARD] < sizes[SHARD]
    server.faults.clear()
    server.starts.clear()
    copy = cached_copy(server.url, "train", workers=workers)
    # Each unfinished shard is asked for from where it stopped (a full .part only needs its check); no other.
    assert sorted(s for s in server.starts if s[0].endswith(".tar")) == sorted(
        (name, n) for name, n in kept.items() if n < sizes[name])
    assert all((copy / name).read_bytes() == (shards / name).read_bytes() for name in sizes)
    assert not list(copy.glob("*.part"))


def test_a_copy_cut_short_in_the_cache_is_fetched_again(shards, serve, cache):
    """A shard under its own name is taken for complete by its size alone (no checksum on a second open):
    one cut short there (a disk that filled, a copy by hand) is fetched again, not served short."""
    server = serve()
    copy = cached_copy(server.url, "train")
    data = (copy / SHARD).read_bytes()
    (copy / SHARD).write_bytes(data[:len(data) // 2])
    server.requests.clear()
    assert cached_copy(server.url, "train") == copy
    assert shard_gets(server) == {SHARD: 1} and (copy / SHARD).read_bytes() == (shards / SHARD).read_bytes()


def rebuild_served_shard(served, data):
    """The served set's SHARD replaced by `data` and its manifest entry to match: the set rebuilt under its URL."""
    (served / SHARD).write_bytes(data)
    manifest = json.loads((served / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["file"] == SHARD)
    entry.update(sha256=hashlib.sha256(data).hexdigest(), sum64=sum64(data))
    (served / "manifest.json").write_text(json.dumps(manifest))


def test_a_rebuilt_set_under_the_same_url_replaces_the_changed_copy(shards, serve, cache, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(shards, served)
    server = serve(root=served)
    copy = cached_copy(server.url, "train")
    data = bytearray((served / SHARD).read_bytes())
    data[5000] ^= 1
    rebuild_served_shard(served, data)
    server.requests.clear()
    cached_copy(server.url, "train")
    assert shard_gets(server) == {SHARD: 1} and (copy / SHARD).read_bytes() == data


def test_two_processes_opening_one_url_download_each_shard_once(serve, tmp_path):
    server = serve()
    code = ("import sys; from pipeline.cache import cached_copy; "
            "print(cached_copy(sys.argv[1], ['train', 'val'], cache_dir=sys.argv[2], workers=2))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code, server.url, str(tmp_path / "c")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0] == f"{cache_folder(server.url, tmp_path / 'c')}\n"
    assert shard_gets(server) == {**{f"train-{i:06d}.tar": 1 for i in range(4)}, "val-000000.tar": 1}


def test_shard_verify_of_a_url(serve, cache):
    from click.testing import CliRunner

    from pipeline.cli import main

    server = serve()
    result = CliRunner().invoke(main, ["shard", "verify", "--quiet", server.url])
    assert result.exit_code == 0, result.output
    assert result.output == "ok: 7 shards, 330 samples verified\n"


def test_a_sets_cache_folder_does_not_change_with_its_credentials_query_or_final_slash(tmp_path):
    """Passwords and signed tokens change between runs; the copy they name is the same one."""
    folder = cache_folder("https://h:8/sets/tiny", tmp_path)
    assert folder.parent == tmp_path and len(folder.name) == 16
    for same in ("https://ann:pw@h:8/sets/tiny", "https://h:8/sets/tiny?sv=1&sig=abc", "https://h:8/sets/tiny/"):
        assert cache_folder(same, tmp_path) == folder
    assert cache_folder("https://h:8/sets/other", tmp_path) != folder


def test_a_tilde_in_tinyin_cache_is_the_home_folder(tmp_path, monkeypatch):
    """TINYIN_CACHE='~/cache' (quoted in a job script, a Dockerfile's ENV, a .env file: no shell expands it)
    was a folder named `~` in the current folder: each job's folder fetched the whole set again."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TINYIN_CACHE", "~/cache")
    assert cache_folder("https://h:8/sets/tiny").parent == tmp_path / "home" / "cache"


def test_a_part_of_a_copy_a_rebuilt_set_disowns_is_not_resumed(shards, serve, cache, tmp_path):
    """A fetch broken off (its .part kept) before the set was rebuilt under its URL: the .part holds the old
    shard's bytes, and resuming it cost a transfer that failed its checksum; it goes with its manifest."""
    served = tmp_path / "served"
    shutil.copytree(shards, served)
    server = serve(root=served)
    copy = cached_copy(server.url, "train")
    old = (copy / SHARD).read_bytes()
    (copy / SHARD).unlink()
    (copy / f"{SHARD}.part").write_bytes(old[:len(old) // 2])
    data = bytearray(old)
    data[-5000] ^= 1
    rebuild_served_shard(served, data)
    server.requests.clear()
    server.starts.clear()
    cached_copy(server.url, "train")
    assert [s for s in server.starts if s[0] == SHARD] == [(SHARD, 0)] and (copy / SHARD).read_bytes() == data


def test_a_part_a_server_will_not_resume_is_fetched_again_from_the_start(shards, serve, cache):
    """A server that ignores Range answers a resume with the whole file: the .part is dropped and the next
    attempt starts over; kept, every attempt asked to resume it again, and the shard failed."""
    server = serve()
    copy = cached_copy(server.url, "train")
    data = (copy / SHARD).read_bytes()
    (copy / SHARD).unlink()
    (copy / f"{SHARD}.part").write_bytes(data[:len(data) // 2])
    server.faults[SHARD] = "no-range"
    server.requests.clear()
    assert cached_copy(server.url, "train") == copy
    assert shard_gets(server) == {SHARD: 2}  # the resume answered whole, then the shard from its start
    assert (copy / SHARD).read_bytes() == data and not list(copy.glob("*.part"))


def test_a_shard_set_object_is_a_set_url_when_it_is_remote(shards, serve):
    """make_loader takes an open ShardSet too: a remote one is fetched into the cache, a local one read in place."""
    server = serve()
    assert not is_set_url(ShardSet(shards)) and is_set_url(open_shard_set(server.url))


def test_a_shard_answered_503_once_is_asked_for_again(shards, serve, cache):
    """An HTTP error status is the server's passing trouble (a 503 under load): retried as a cut connection is."""
    server = serve({SHARD: "busy-once"})
    copy = cached_copy(server.url, "train")
    assert shard_gets(server)[SHARD] == 2 and (copy / SHARD).read_bytes() == (shards / SHARD).read_bytes()


def test_a_brace_pattern_of_shard_urls_is_no_set_url():
    """The stream path's pattern ends in its brace group, not in '.tar': it names shards, not a set's folder."""
    assert is_set_url("https://host/set/{train-000000.tar,train-000001.tar}") is False
    assert is_set_url("https://host/set") is True


def test_a_fetch_error_without_a_message_is_named_by_its_class(shards, serve, cache, monkeypatch, quick_retries):
    """A cut connection raised with no words (ConnectionResetError()) every attempt: its class names it."""
    server = serve()

    def cut(*args):
        raise ConnectionResetError()
    monkeypatch.setattr("pipeline.cache._http_receive", cut)
    with pytest.raises(ShardError) as e:
        cached_copy(server.url, "test", workers=1)
    assert str(e.value) == f"{server.url}/test-000000.tar: cannot fetch (ConnectionResetError, after {RETRIES} attempts)"


def test_a_url_with_a_space_is_refused_at_once(monkeypatch):
    """A set's URL pasted with a space (`.../dir with space/`, not %20): urllib refuses to send it, and it
    was tried 5 times over 10 s, 'after 5 attempts', as if the server might answer next time."""
    monkeypatch.setattr(pipeline.shardset.time, "sleep", lambda s: pytest.fail("waited to try again"))
    with pytest.raises(ShardError) as e:
        ShardSet("http://127.0.0.1:9/dir with space/")
    assert str(e.value) == ("http://127.0.0.1:9/dir with space/manifest.json: unreadable (InvalidURL: URL can't "
                            "contain control characters. '/dir with space/manifest.json' (found at least ' '))")


def test_an_fsspec_backends_timeout_or_cut_connection_is_retried_and_other_errors_are_not():
    """Backends raise their own families: by name, connection trouble and timeouts are worth another attempt."""
    class ReadTimeoutError(Exception):
        pass
    retried = [TimeoutError(), ConnectionResetError(), ReadTimeoutError(), http.client.IncompleteRead(b""),
               http.client.BadStatusLine("")]  # a proxy's garbage: any HTTPException
    retried += [type(name, (Exception,), {})() for name in (  # aiohttp's, botocore's and h2's, by name
        "ClientConnectorError", "ClientPayloadError", "IncompleteReadError", "StreamResetError")]
    assert [worth_retrying(e) for e in retried] == [True] * 9
    assert not worth_retrying(FileNotFoundError()) and not worth_retrying(ValueError())


def test_an_http_status_is_retried_but_a_clients_own_error():
    """`http_open`'s status: a 5xx (a server's restart) and a 4xx that says 'later' are retried; another 4xx (a
    wrong password's 401, an expired signed URL's 403) was retried 5 times over 7.5 s, and is final at once."""
    def status(code):
        error = OSError(f"HTTP {code}")
        error.status = code
        return error
    codes = (302, 400, 401, 403, 405, 408, 410, 425, 429, 500, 502, 503)
    assert {code: worth_retrying(status(code)) for code in codes} == {
        302: False, 400: False, 401: False, 403: False, 405: False, 408: True, 410: False, 425: True, 429: True,
        500: True, 502: True, 503: True}


def test_a_set_url_whose_host_does_not_resolve_is_named_at_once(monkeypatch, no_such_host):
    """A mistyped host was asked again 5 times over 7.5 s, then named as 'unreadable (URLError: <urlopen error
    [Errno -2] Name or service not known>, after 5 attempts)'; no resolver answers otherwise: it is named at once."""
    monkeypatch.setattr(pipeline.shardset.time, "sleep", lambda s: pytest.fail("waited to try again"))
    host, words = no_such_host
    with pytest.raises(ShardError) as e:
        ShardSet(f"http://{host}/set")
    assert str(e.value) == f"http://{host}/set/manifest.json: unreadable (unknown host {host}: {words})"


def test_an_unknown_host_is_final_and_a_resolver_that_did_not_answer_is_not():
    """By the socket's own error, urllib's URLError around it, or aiohttp's connector error (its `os_error`)."""
    import urllib.error

    def gai(code):
        return socket.gaierror(code, "words")
    aiohttp_like = type("ClientConnectorDNSError", (OSError,), {})()
    aiohttp_like.os_error = gai(socket.EAI_NONAME)
    final = [gai(socket.EAI_NONAME), urllib.error.URLError(gai(socket.EAI_NONAME)), aiohttp_like]
    if hasattr(socket, "EAI_NODATA"):  # 'No address associated with hostname'
        final.append(urllib.error.URLError(gai(socket.EAI_NODATA)))
    assert [worth_retrying(e) for e in final] == [False] * len(final)
    assert worth_retrying(urllib.error.URLError(gai(socket.EAI_AGAIN)))  # 'Temporary failure in name resolution'
