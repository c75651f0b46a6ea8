"""Shared fixtures: a small synthetic release and its shards (built once per session), and the
real release from ../shared/data when it is there (tests that need it skip with a reason)."""
import errno
import json
import os
import shutil
import signal
import socket
import struct
import warnings
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.build import build_shards
from pipeline.index import file_sha256
from pipeline.locks import locked
from pipeline.synth import synthesize

# Ctrl-C tests raise SIGINT in this process or send it to a command they start. A shell starts a background
# job (`make test &`, a runner's script) with SIGINT ignored, and then Python installs no KeyboardInterrupt
# handler, here or in the commands (an ignored signal stays ignored across exec): those tests failed there, or
# waited on a command that never stopped. Python's own handler, as an interactive start gives.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REAL_RELEASE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiny-imagenet-200.tar.gz"
needs_real = pytest.mark.skipif(not REAL_RELEASE.is_file(),
                                reason=f"real Tiny ImageNet release not found at {REAL_RELEASE}")

# Small but with several shards per split, odd sizes, and greyscale JPEGs in it.
SYNTH = dict(classes=6, train_per_class=40, val_per_class=10, test=30, seed=3)
SHARD_SIZE = 64


@pytest.fixture(scope="session")
def release(tmp_path_factory):
    """A synthetic release folder in the official layout."""
    return synthesize(tmp_path_factory.mktemp("synth") / "release", progress=False, **SYNTH)


@pytest.fixture(scope="session")
def shards(release, tmp_path_factory):
    """The synthetic release built into shards (treat as read-only)."""
    out = tmp_path_factory.mktemp("built") / "shards"
    build_shards(release, out, workers=2, shard_size=SHARD_SIZE, progress=False)
    return out


@pytest.fixture
def macos_copy(release, tmp_path):
    """`release` as macOS copies it to an exFAT drive or packs it: an AppleDouble `._NAME` (the file's metadata,
    which PIL cannot open) beside each file, and a `.DS_Store` in each folder."""
    copy = shutil.copytree(release, tmp_path / "macos-copy")
    for path in [p for p in copy.rglob("*") if p.is_file()]:
        (path.parent / f"._{path.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    for folder in [copy, *(p for p in copy.rglob("*") if p.is_dir())]:
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return copy


@pytest.fixture(scope="session")
def real_shards(tmp_path_factory):
    """The real release built into shards once per session (about half a minute)."""
    if not REAL_RELEASE.is_file():
        pytest.skip(f"real Tiny ImageNet release not found at {REAL_RELEASE}")
    # Under pytest-xdist (`make test`) the workers share one build, in the folder above their own: the first to
    # need it builds it, under the lock, and the others wait for it (each building its own took twice the ~20 s
    # and the 1.9 GB). The build renames its folder into place only once complete: a manifest marks one.
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "real-shards"
    with locked(root / "real-shards.lock"):
        if not (out / "manifest.json").is_file():
            build_shards(REAL_RELEASE, out, progress=False)
    return out


@pytest.fixture
def quick_retries(monkeypatch):
    """Remote shard transfers tried again 1 ms apart, not over the seconds that ride out a server's restart
    (`shardset.retry_waits`): for a test that drives a read to its final failure. Set before any fork, so
    stream workers inherit it."""
    monkeypatch.setattr("pipeline.shardset.BACKOFF_S", 0.001)


@pytest.fixture
def no_such_host(monkeypatch):
    """(host, the resolver's words for it) of a host name that never resolves ('.invalid', RFC 2606), with no
    proxy set, so that the name looked up is the URL's own. Skips where no resolver says it does not exist."""
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    host = "nosuch.invalid"
    try:
        socket.getaddrinfo(host, 80)
    except socket.gaierror as e:
        if e.errno == socket.EAI_NONAME:
            return host, e.strerror
    pytest.skip(f"no resolver here says that {host} does not exist")


@pytest.fixture
def fork_warns_as_on_3_12(monkeypatch):
    """os.fork warns, as Python 3.12's does in a process with threads, on any Python (DeprecationWarning)."""
    fork = os.fork

    def fork_as_on_3_12():
        warnings.warn(f"This process (pid={os.getpid()}) is multi-threaded, use of fork() may lead to deadlocks "
                      "in the child.", DeprecationWarning, stacklevel=2)
        return fork()

    monkeypatch.setattr(os, "fork", fork_as_on_3_12)


def stop_by(signum):
    """A stop: `signum` raised in this process, as if sent to it, for the handler of the code under test to take
    (with none, SIGUSR1's default would end pytest itself: a failure instead)."""
    def stop():
        assert callable(signal.getsignal(signum)), f"{signal.Signals(signum).name} would end the process where it stands"
        signal.raise_signal(signum)
    return stop


def refuse_writes_in(monkeypatch, folder, code=errno.EACCES):
    """Make any os.open to write or create under `folder` fail with errno `code`, as the kernel refuses another
    user's folder (EACCES) or a read-only mount (EROFS): root, running the tests, may write anywhere."""
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):
        if os.fspath(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(code, os.strerror(code), os.fspath(path))  # OSError gives the errno's subclass
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", refusing)


def copy_with_edited_index(shards, tmp_path, column, row, value):
    """A copy of `shards` with `column` of index row `row` set to `value` and the manifest's index_sha256
    updated to match, so that the open accepts it and only the checks of what the index says can object.
    Returns (the copy, the row's key)."""
    copy = shutil.copytree(shards, tmp_path / "copy")
    table = pq.read_table(copy / "index.parquet")
    values = table.column(column).to_pylist()
    values[row] = value
    table = table.set_column(table.schema.get_field_index(column), column, [values])
    pq.write_table(table, copy / "index.parquet")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["index_sha256"] = file_sha256(copy / "index.parquet")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy, table.column("key")[row].as_py()


def damage_torch_file(path, source):
    """Copy torch file `source` (a zip, as torch.save writes) to `path` with one byte of its largest member's
    data flipped, as a bad copy or disk leaves it; returns that member's name (what its CRC-32 check names)."""
    data = bytearray(Path(source).read_bytes())
    with zipfile.ZipFile(source) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    name_len, extra_len = struct.unpack_from("<HH", data, member.header_offset + 26)  # the local header's
    start = member.header_offset + 30 + name_len + extra_len  # stored, not deflated: the bytes as they are
    data[start + member.file_size // 2] ^= 0xFF
    Path(path).write_bytes(data)
    return member.filename
