"""fetch_release against a local HTTP server that may honour Range, ignore it, or hang up."""

import email.utils
import errno
import functools
import hashlib
import os
import http.server
import pathlib
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile

import pytest

from pipeline.errors import TinyinError
from pipeline.fetch import FetchError, fetch_release
from pipeline.locks import locked
from pipeline.shardset import RETRIES
from tests.servers import FaultyHTTPServer

NAME = "tiny.zip"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def validator_of(kind, path, data):
    """(header, value) a server of `validator` kind answers for file `path` holding `data`."""
    if kind in ("etag", "weak-etag"):
        return "ETag", ("W/" if kind == "weak-etag" else "") + f'"{hashlib.md5(data).hexdigest()}"'
    if kind == "last-modified":
        return "Last-Modified", email.utils.formatdate(path.stat().st_mtime, usegmt=True)
    return None, None


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files, answering `Range: bytes=N-` with 206 unless the server says otherwise.

    Server attributes: `honour_range` (False: always 200), `cut_after` (hang up after
    this many body bytes, None: never), `ranges` (the Range header of each request),
    `validator` (what a GET answers with: "etag" a strong ETag, the file's md5; "weak-etag";
    "last-modified" the file's mtime; None neither), `honour_if_range` (False: Range is served
    whatever If-Range says) and `if_ranges` (the If-Range header of each request). A HEAD is answered with the
    status `head_errors` pops (a 503 of a server under load, 501 of one that takes no HEAD) while it holds one;
    `heads` counts them; `after_head`, when set, replaces the file once a HEAD is answered. `send_length` False: no Content-Length, the body's end the connection's close (HTTP/1.0); a string: that Content-Length as it is (a malformed one).
    With `stall_after` N a GET sends N bytes of the body, sets `stalled` and hangs up once
    `release` is set (a link gone quiet).
    """

    def do_HEAD(self):
        self.server.heads += 1
        if self.server.head_errors:
            self.send_response(self.server.head_errors.pop(0))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.server.after_head is not None:  # replaced before the answer goes: the GET after it finds the new file
            path = pathlib.Path(self.translate_path(self.path))
            size = path.stat().st_size
            path.write_bytes(self.server.after_head)
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            return
        super().do_HEAD()

    def do_GET(self):
        wanted, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        self.server.ranges.append(wanted)
        self.server.if_ranges.append(if_range)
        path = pathlib.Path(self.translate_path(self.path))
        if not path.is_file():
            return self.send_error(404, "File not found")
        data = path.read_bytes()
        header, validator = validator_of(self.server.validator, path, data)
        if if_range is not None and if_range != validator and self.server.honour_if_range:
            wanted = None  # RFC 9110 13.1.5: the file changed, so the whole of it
        start = int(wanted.removeprefix("bytes=").removesuffix("-")) if wanted and self.server.honour_range else 0
        if start >= len(data) > 0:  # as RFC 9110 asks: 416 with the file's size
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if self.server.send_length:
            length = self.server.send_length
            self.send_header("Content-Length", length if isinstance(length, str) else str(len(data) - start))
        if validator:
            self.send_header(header, validator)
        self.end_headers()
        if self.server.stall_after is not None:
            self.wfile.write(data[start:][: self.server.stall_after])
            self.wfile.flush()
            self.server.stalled.set()
            self.server.release.wait(60)
            return
        self.wfile.write(data[start:][: self.server.cut_after])

    def log_message(self, *args):
        pass


@pytest.fixture
def payload(tmp_path):
    """The bytes of a small zip (incompressible, so it spans several chunks) served as /tiny.zip."""
    www = tmp_path / "www"
    www.mkdir()
    with zipfile.ZipFile(www / NAME, "w") as z:
        z.writestr("tiny-imagenet-200/wnids.txt", random.Random(0).randbytes(300_000))
    return (www / NAME).read_bytes()


@pytest.fixture
def serve(tmp_path):
    """Start servers of tmp_path/www on 127.0.0.1; all are shut down after the test."""
    running = []

    def start(honour_range=True, cut_after=None, validator=None, honour_if_range=True, head_errors=(),
              stall_after=None, send_length=True, after_head=None):
        handler = functools.partial(RangeHandler, directory=str(tmp_path / "www"))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.honour_range, server.cut_after, server.ranges = honour_range, cut_after, []
        server.validator, server.honour_if_range, server.if_ranges = validator, honour_if_range, []
        server.head_errors, server.heads, server.send_length = list(head_errors), 0, send_length
        server.after_head = after_head
        server.stall_after, server.stalled, server.release = stall_after, threading.Event(), threading.Event()
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
        thread.start()
        running.append((server, thread))
        return server

    yield start
    for server, thread in running:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def one_attempt(monkeypatch):
    """A fetch gives up at its first failure (`shardset.RETRIES` 1), as one killed mid-transfer would: what it
    left is for the next call to resume."""
    monkeypatch.setattr("pipeline.shardset.RETRIES", 1)


def _url(server):
    return f"http://127.0.0.1:{server.server_port}/{NAME}"


def _fetch(server, out, payload, **kwargs):
    checks = dict(expected_size=len(payload), md5=hashlib.md5(payload).hexdigest(), chunk_size=1 << 16, progress=False)
    return fetch_release(out, _url(server), **{**checks, **kwargs})


def test_full_download(serve, payload, tmp_path, capsys):
    server = serve()
    path = _fetch(server, tmp_path / "out" / "nested", payload, progress=True)
    assert path == tmp_path / "out" / "nested" / NAME
    assert path.read_bytes() == payload
    assert [p.name for p in path.parent.iterdir()] == [NAME]
    assert server.ranges == [None]
    assert f"{NAME}.part" in capsys.readouterr().err  # the progress bar


@pytest.mark.parametrize("validator", [None, "etag"])
def test_md5_mismatch(serve, payload, tmp_path, validator):
    """The .part goes, and with it the validator file a server's ETag began beside it."""
    actual = hashlib.md5(payload).hexdigest()
    with pytest.raises(FetchError) as info:
        _fetch(serve(validator=validator), tmp_path / "out", payload, md5="0" * 32)
    assert str(info.value) == f"{NAME}: expected md5 {'0' * 32}, got {actual}"
    assert list((tmp_path / "out").iterdir()) == []


def test_an_md5_in_capitals_is_the_same_md5(serve, payload, tmp_path):
    path = _fetch(serve(), tmp_path / "out", payload, md5=hashlib.md5(payload).hexdigest().upper())
    assert path.read_bytes() == payload


def test_size_mismatch(serve, payload, tmp_path):
    with pytest.raises(FetchError) as info:
        _fetch(serve(), tmp_path / "out", payload, expected_size=len(payload) + 1)
    assert str(info.value) == f"{NAME}: expected {len(payload) + 1} bytes, got {len(payload)}"
    assert list((tmp_path / "out").iterdir()) == []


def test_checks_can_be_skipped(serve, payload, tmp_path):
    path = _fetch(serve(), tmp_path / "out", payload, expected_size=None, md5=None)
    assert path.read_bytes() == payload


def test_resumes_partial_download(serve, payload, tmp_path):
    server = serve()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"{NAME}.part").write_bytes(payload[:100_000])
    assert _fetch(server, tmp_path / "out", payload).read_bytes() == payload
    assert server.ranges == ["bytes=100000-"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == [NAME]


def test_interrupted_download_keeps_part_and_resumes(serve, payload, tmp_path, one_attempt):
    server = serve(cut_after=123_456)
    with pytest.raises(FetchError) as info:
        _fetch(server, tmp_path / "out", payload)
    assert str(info.value) == (f"cannot download {_url(server)}: connection closed after 123456 of {len(payload)} "
                               f"bytes; rerun the same command to resume from the 123,456 bytes in "
                               f"{tmp_path / 'out' / NAME}.part")
    assert (tmp_path / "out" / f"{NAME}.part").stat().st_size == 123_456
    server.cut_after = None
    assert _fetch(server, tmp_path / "out", payload).read_bytes() == payload
    assert server.ranges == [None, "bytes=123456-"]


def _cut_then_change(server, out, payload, tmp_path):
    """Download from `server` until it hangs up at byte 123456, then replace its file by another of the
    same size (a new mtime too); returns the new file's bytes and the If-Range validator of the old."""
    with pytest.raises(FetchError):
        _fetch(server, out, payload, expected_size=None, md5=None)
    old = validator_of(server.validator, tmp_path / "www" / NAME, payload)[1]
    changed = random.Random(1).randbytes(len(payload))
    (tmp_path / "www" / NAME).write_bytes(changed)
    os.utime(tmp_path / "www" / NAME, (1e9, 1e9))
    server.cut_after = None
    return changed, old


@pytest.mark.parametrize("validator", ["etag", "last-modified"])
def test_a_file_changed_on_the_server_since_the_part_began_is_downloaded_again(serve, payload, tmp_path, validator,
                                                                               one_attempt):
    """No md5 to catch it: the .part of the old file was resumed with the rest of the new one, and the
    spliced file (right size) taken for the download. If-Range with the validator that began the
    .part makes the server send the new file whole."""
    server, out = serve(cut_after=123_456, validator=validator), tmp_path / "out"
    changed, old = _cut_then_change(server, out, payload, tmp_path)
    assert (out / f"{NAME}.part.validator").read_text() == f"{old}\n"
    assert _fetch(server, out, payload, expected_size=None, md5=None).read_bytes() == changed
    assert (server.ranges, server.if_ranges) == ([None, "bytes=123456-"], [None, old])
    assert [p.name for p in out.iterdir()] == [NAME]


def test_an_unchanged_file_with_a_validator_resumes(serve, payload, tmp_path, one_attempt):
    server, out = serve(cut_after=123_456, validator="etag"), tmp_path / "out"
    with pytest.raises(FetchError):
        _fetch(server, out, payload, expected_size=None, md5=None)
    server.cut_after = None
    assert _fetch(server, out, payload, expected_size=None, md5=None).read_bytes() == payload
    etag = f'"{hashlib.md5(payload).hexdigest()}"'
    assert (server.ranges, server.if_ranges) == ([None, "bytes=123456-"], [None, etag])
    assert [p.name for p in out.iterdir()] == [NAME]


@pytest.mark.parametrize("validator", [None, "weak-etag"])
def test_a_part_with_no_validator_and_no_md5_is_downloaded_again(serve, payload, tmp_path, validator, one_attempt):
    """Nothing could tell a changed file from the old one: resuming risks a splice, so start over."""
    server, out = serve(cut_after=123_456, validator=validator), tmp_path / "out"
    changed, _ = _cut_then_change(server, out, payload, tmp_path)
    assert _fetch(server, out, payload, expected_size=None, md5=None).read_bytes() == changed
    assert (server.ranges, server.if_ranges) == ([None, None], [None, None])


def test_a_server_ignoring_if_range_is_caught_by_the_validator_of_its_answer(serve, payload, tmp_path, one_attempt):
    """A 206 whose ETag is not the .part's is the rest of another file: asked again from the start."""
    server, out = serve(cut_after=123_456, validator="etag", honour_if_range=False), tmp_path / "out"
    changed, old = _cut_then_change(server, out, payload, tmp_path)
    assert _fetch(server, out, payload, expected_size=None, md5=None).read_bytes() == changed
    assert (server.ranges, server.if_ranges) == ([None, "bytes=123456-", None], [None, old, None])


def test_server_ignoring_range_restarts_from_zero(serve, payload, tmp_path):
    server = serve(honour_range=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"{NAME}.part").write_bytes(b"not the start of the zip")
    assert _fetch(server, tmp_path / "out", payload).read_bytes() == payload
    assert server.ranges == [f"bytes={len(b'not the start of the zip')}-"]


@pytest.mark.parametrize("expected_size", ["known", None])
def test_part_already_complete(serve, payload, tmp_path, expected_size):
    server = serve()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"{NAME}.part").write_bytes(payload)
    size = len(payload) if expected_size else None
    assert _fetch(server, tmp_path / "out", payload, expected_size=size).read_bytes() == payload
    # With a known size nothing is asked for; without one the server answers 416.
    assert server.ranges == ([] if expected_size else [f"bytes={len(payload)}-"])


def test_existing_file_is_not_downloaded_again(serve, payload, tmp_path):
    server = serve()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / NAME).write_bytes(payload)
    assert _fetch(server, tmp_path / "out", payload).read_bytes() == payload
    assert server.ranges == []


def test_a_complete_file_in_a_folder_this_user_may_not_write_is_returned(serve, payload, tmp_path, monkeypatch):
    """The release in a shared data folder (another user's, a read-only mount): the lock file could not be
    made there, and 'data fetch' failed, 'error: Permission denied: OUT/.tiny.zip.lock', on a complete copy.
    (The refusal is the lock's open: root, running the tests, may write anywhere.)"""
    server, out = serve(), tmp_path / "out"
    out.mkdir()
    (out / NAME).write_bytes(payload)

    def refused(path, mode="r", *args, **kwargs):
        if set(mode) & set("wa+"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr("pipeline.locks.open", refused, raising=False)
    assert _fetch(server, out, payload) == out / NAME and server.ranges == []


@pytest.mark.parametrize("where, why", [("file", "cannot be made a folder (File exists)"),
                                        ("file/sub", "cannot be made a folder (Not a directory)"),
                                        ("read-only", "cannot write in it (Permission denied)")])
def test_an_out_that_cannot_take_the_file_is_named_before_downloading(serve, payload, tmp_path, monkeypatch, where,
                                                                       why):
    """An `out` that is a file, under a file, or another user's folder (a read-only mount) was an OSError traceback
    out of its mkdir, or of its lock file's open ('Permission denied: OUT/.tiny.zip.lock'): a FetchError in one line
    now, as the tools say of their --out, before anything is asked."""
    from tests.conftest import refuse_writes_in

    server = serve()
    (tmp_path / "file").write_text("")
    (tmp_path / "read-only").mkdir()
    refuse_writes_in(monkeypatch, tmp_path / "read-only")
    with pytest.raises(FetchError) as info:
        _fetch(server, tmp_path / where, payload)
    assert str(info.value) == f"{tmp_path / where}: {why}" and server.ranges == [] and server.heads == 0


def test_a_second_fetch_into_the_folder_waits_for_the_first_and_takes_its_file(serve, payload, tmp_path, capsys):
    """Two fetches into one folder (one per node on shared storage) appended to one .part, and the md5
    check then deleted it; now the second waits on the first's lock, then finds its file."""
    server, out = serve(), tmp_path / "out"
    out.mkdir()
    asked = threading.Event()
    result = {}
    with locked(out / f".{NAME}.lock", remove=True):  # the first fetch, still downloading
        thread = threading.Thread(target=lambda: result.update(path=_fetch(server, out, payload)))
        thread.start()
        while f"waiting for another download of {NAME} into {out}\n" not in capsys.readouterr().err:
            assert thread.is_alive()
            asked.wait(0.01)
        (out / NAME).write_bytes(payload)  # what the first one leaves
    thread.join()
    assert result["path"].read_bytes() == payload and server.ranges == []  # nothing downloaded again
    assert [p.name for p in out.iterdir()] == [NAME]  # no lock file left


def test_a_folder_whose_file_system_takes_no_locks_is_one_line(serve, payload, tmp_path, monkeypatch):
    """An NFS mount whose lock service does not answer: flock's ENOLCK was an OSError traceback."""
    import fcntl

    from click.testing import CliRunner

    from pipeline.cli import main

    def no_locks(f, how):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    server, out = serve(), tmp_path / "dl"
    result = CliRunner().invoke(main, ["data", "fetch", "--out", str(out), "--url", _url(server),
                                       "--md5", hashlib.md5(payload).hexdigest()])
    assert (result.exit_code, result.output) == (
        1, f"error: {out}/.{NAME}.lock: cannot lock it ({os.strerror(errno.ENOLCK)}): its file system takes no file "
           "locks, which keep two processes from filling one folder at once; use a folder on another file system\n")
    assert server.ranges == [] and not (out / f"{NAME}.part").exists()


def test_existing_bad_file_is_replaced(serve, payload, tmp_path):
    server = serve()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / NAME).write_bytes(b"truncated")
    assert _fetch(server, tmp_path / "out", payload).read_bytes() == payload
    assert server.ranges == [None]


def test_a_damaged_file_is_checked_once_before_it_is_replaced(serve, payload, tmp_path, monkeypatch):
    """A file of the right size but a wrong md5 (a byte flipped on disk) had its md5 taken twice, before the
    lock and again inside it, before the download began: seconds each on the 248 MB release."""
    import pipeline.fetch

    server, out, checked, mismatch = serve(), tmp_path / "out", [], pipeline.fetch._mismatch
    out.mkdir()
    (out / NAME).write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
    monkeypatch.setattr(pipeline.fetch, "_mismatch", lambda path, *args: checked.append(path.name) or mismatch(path, *args))
    assert _fetch(server, out, payload).read_bytes() == payload
    assert (checked, server.ranges) == ([NAME, f"{NAME}.part"], [None])


def test_an_unrelated_file_is_not_taken_for_the_download_when_nothing_is_known_of_it(serve, payload, tmp_path):
    """With no size and no md5 the server's size (HEAD) is what a file already there must match."""
    server = serve()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / NAME).write_bytes(b"garbage")
    assert _fetch(server, tmp_path / "out", payload, expected_size=None, md5=None).read_bytes() == payload
    assert server.ranges == [None]


def test_a_head_refused_once_is_asked_again_for_the_size_a_file_already_there_must_match(serve, payload, tmp_path):
    """The HEAD that gives the size was asked once: a 503 (or a cut connection) on it went on without the size,
    and a file already there of any size was taken for the download ('already have ... (nothing to check it
    against)'). It is tried again as the download is."""
    server = serve(head_errors=[503])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / NAME).write_bytes(b"garbage")
    assert _fetch(server, tmp_path / "out", payload, expected_size=None, md5=None).read_bytes() == payload
    assert (server.heads, server.ranges) == (2, [None])


def test_a_head_refused_at_every_attempt_says_so_before_anything_is_made(serve, payload, tmp_path, quick_retries):
    server = serve(head_errors=[503] * RETRIES)
    with pytest.raises(FetchError) as info:
        _fetch(server, tmp_path / "out", payload, expected_size=None, md5=None)
    assert str(info.value) == (f"cannot download {_url(server)}: HTTP 503 Service Unavailable "
                               f"(after {RETRIES} attempts)")
    assert (server.heads, server.ranges) == (RETRIES, []) and not (tmp_path / "out").exists()


def test_a_file_already_there_is_taken_where_no_head_gets_through(serve, payload, tmp_path, quick_retries):
    """A job's fetch-if-needed on a node without the network: the file it fetched before is taken, as it was
    before the HEAD was tried again, with nothing to check it against."""
    server, found = serve(head_errors=[503] * RETRIES), []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / NAME).write_bytes(payload)
    assert _fetch(server, tmp_path / "out", payload, expected_size=None, md5=None, found=found.append).read_bytes() == payload
    assert (server.heads, server.ranges, found) == (RETRIES, [], ["nothing to check it against"])


@pytest.mark.parametrize("status", [404, 405, 501])
def test_a_final_answer_to_the_head_is_not_asked_again(serve, payload, tmp_path, monkeypatch, status):
    """A HEAD the server does not take (405, or 501 from one that serves GET alone) leaves the size unknown
    and the download goes on; a 404 is the download's to say. None is asked again, nor waited for."""
    monkeypatch.setattr("pipeline.fetch.time.sleep", lambda s: pytest.fail("waited to try again"))
    server = serve(head_errors=[status])
    assert _fetch(server, tmp_path / "out", payload, expected_size=None, md5=None).read_bytes() == payload
    assert (server.heads, server.ranges) == (1, [None])


@pytest.mark.parametrize("change", [1000, -1000])
def test_a_file_replaced_between_the_head_and_the_download_is_the_download(serve, payload, tmp_path, change):
    """The HEAD's size is the check of a --url download without an md5; the file replaced on the server before
    its GET arrived whole and was deleted: 'tiny.zip: expected 300152 bytes, got 301152', sizes never given."""
    new = random.Random(2).randbytes(len(payload) + change)
    server = serve(after_head=new)
    assert _fetch(server, tmp_path / "out", payload, expected_size=None, md5=None).read_bytes() == new
    assert (server.heads, server.ranges) == (1, [None])


@pytest.mark.parametrize("checks", [dict(expected_size=None), dict(expected_size=None, md5=None)], ids=["md5", "none"])
def test_a_part_longer_than_the_file_is_started_again(serve, payload, tmp_path, checks):
    """Not a prefix of the file: with an md5 the server's 416 gives the size, without one its HEAD does."""
    server = serve()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"{NAME}.part").write_bytes(payload + b"more")
    assert _fetch(server, tmp_path / "out", payload, **checks).read_bytes() == payload
    assert server.ranges == ([f"bytes={len(payload) + 4}-", None] if "md5" not in checks else [None])
    assert [p.name for p in (tmp_path / "out").iterdir()] == [NAME]


@pytest.mark.parametrize("url", ["notaurl", "/data/tiny.zip", "gopher://x/tiny.zip"])
def test_what_is_not_a_url_is_refused_before_anything_is_made(tmp_path, url):
    with pytest.raises(TinyinError) as info:  # a FetchError: every problem the Python API names is a TinyinError
        fetch_release(tmp_path / "out", url, progress=False)
    assert str(info.value) == f"cannot download {url}: not a URL (http://, https://, ftp://, file://)"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/", "http://127.0.0.1:9"])
def test_a_url_without_a_file_name_is_refused_before_anything_is_made(tmp_path, url):
    """Named after nothing, the download would be `out/.part`, renamed onto the folder itself."""
    with pytest.raises(FetchError) as info:
        fetch_release(tmp_path / "out", url, progress=False)
    assert str(info.value) == f"cannot download {url}: no file name in the URL"
    assert not (tmp_path / "out").exists()


def test_a_url_urllib_cannot_parse_is_one_line(tmp_path):
    """A typo in an IPv6 address ended in urlsplit's ValueError traceback."""
    with pytest.raises(FetchError) as info:
        fetch_release(tmp_path / "out", "http://[::1/tiny.zip", progress=False)
    assert str(info.value) == "cannot download http://[::1/tiny.zip: Invalid IPv6 URL"
    assert not (tmp_path / "out").exists()


def test_http_error(serve, payload, tmp_path):
    server = serve()
    url = f"http://127.0.0.1:{server.server_port}/missing.zip"
    with pytest.raises(FetchError) as info:
        fetch_release(tmp_path / "out", url, progress=False)
    assert str(info.value) == f"cannot download {url}: HTTP 404 File not found"


@pytest.mark.parametrize("checks", [dict(expected_size=None, md5=None), {}], ids=["size-by-head", "md5"])
def test_a_url_with_user_and_password_logs_in(payload, tmp_path, checks):
    """`http://user:password@host/file` (as curl takes it, and as a shard set's URL works): urllib read
    the user and password as part of the host name, and failed with 'Name or service not known'."""
    server = FaultyHTTPServer(tmp_path / "www", auth="ann:p@ss")
    try:
        url = f"{server.url.replace('://', '://ann:p%40ss@')}/{NAME}"
        checks = {"expected_size": len(payload), "md5": hashlib.md5(payload).hexdigest(), **checks}
        assert fetch_release(tmp_path / "out", url, progress=False, **checks).read_bytes() == payload
        assert server.requests[NAME] == 1
    finally:
        server.close()


def test_an_https_url_with_user_and_password_sends_them_as_basic_auth():
    """As for http:// (the test servers speak only plain HTTP): the user and password leave the host name."""
    from pipeline.fetch import _request

    request = _request("https://ann:p%40ss@example.org/tiny.zip", {"Range": "bytes=5-"})
    assert (request.full_url, request.host) == ("https://example.org/tiny.zip", "example.org")
    assert request.unredirected_hdrs == {"Authorization": "Basic YW5uOnBAc3M="}  # ann:p@ss
    assert request.headers == {"Range": "bytes=5-"}


def test_connection_refused(tmp_path, quick_retries):
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{NAME}"
    with pytest.raises(FetchError) as info:
        fetch_release(tmp_path / "out", url, progress=False)
    # urllib's reason, not its '<urlopen error ...>' wrapping of it
    assert str(info.value) == (f"cannot download {url}: [Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)} "
                               f"(after {RETRIES} attempts)")  # nothing arrived: no word of resuming
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_cli_fetch_downloads_and_reports_errors_in_one_line(serve, payload, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    url = _url(serve())
    result = CliRunner().invoke(main, ["data", "fetch", "--out", str(tmp_path / "dl"), "--url", url,
                                       "--md5", hashlib.md5(payload).hexdigest()])
    assert result.exit_code == 0 and (tmp_path / "dl" / NAME).read_bytes() == payload
    result = CliRunner().invoke(main, ["data", "fetch", "--out", str(tmp_path / "bad"), "--url", url, "--md5", "0" * 32])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == f"error: {NAME}: expected md5 {'0' * 32}, got {hashlib.md5(payload).hexdigest()}"


# `tinyin data fetch ARGS`, its Ctrl-C taken as a terminal delivers it: a suite started in the background hands its
# children SIGINT ignored, and Python then installs no handler of its own.
FETCH = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from pipeline.cli import main
main(sys.argv[1:], prog_name="tinyin")
"""


@pytest.mark.parametrize("signum, line", [(signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupted"),
                                          (signal.SIGUSR1, "stopped by SIGUSR1")])
def test_a_signal_stops_the_fetch_in_one_line_and_the_rerun_resumes(serve, tmp_path, signum, line):
    """SIGUSR1 (a scheduler's word before it preempts a job, which train.py's fetch of a set URL takes as SIGTERM)
    killed `data fetch` where it stood: no line, and its lock file left. Each stop is now one line and 128 + the
    signal, and what arrived stays in the .part for the rerun."""
    (tmp_path / "www").mkdir()
    data = random.Random(1).randbytes(3 << 19)  # 1.5 MiB: the first 1 MiB chunk reaches the .part, then the link stalls
    (tmp_path / "www" / NAME).write_bytes(data)
    server, out, md5 = serve(stall_after=(1 << 20) + 1000), tmp_path / "out", hashlib.md5(data).hexdigest()
    proc = subprocess.Popen([sys.executable, "-c", FETCH, "data", "fetch", "--out", str(out), "--url", _url(server),
                             "--md5", md5], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = out / f"{NAME}.part"
    try:
        while not (part.is_file() and part.stat().st_size == 1 << 20):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        server.release.set()
    assert (proc.returncode, stdout, stderr.splitlines()[-1]) == (128 + signum, "", line)  # after the progress bar
    assert [p.name for p in out.iterdir()] == [part.name] and part.stat().st_size == 1 << 20  # no lock file left
    server.stall_after = None
    assert fetch_release(out, _url(server), len(data), md5, progress=False).read_bytes() == data
    assert server.ranges == [None, f"bytes={1 << 20}-"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_names_the_part_not_the_url(serve, payload, tmp_path, monkeypatch, code):
    """The disk (or quota) filling mid-download said 'error: cannot download URL: [Errno 28] No space left on
    device': the server blamed, and not a word of which disk to clean. It is the machine's error naming the
    .part, kept (what arrived resumes once there is room)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    real_open = pathlib.Path.open

    class Full:
        """A file on a disk that is full: its writes fail."""
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(code, os.strerror(code))

    def opened(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if path.name.endswith(".part") else f
    monkeypatch.setattr(pathlib.Path, "open", opened)
    out = tmp_path / "dl"
    result = CliRunner().invoke(main, ["data", "fetch", "--out", str(out), "--url", _url(serve()),
                                       "--md5", hashlib.md5(payload).hexdigest()])
    last = result.output.splitlines()[-1]  # after the progress bar's
    assert (result.exit_code, last) == (1, f"error: {os.strerror(code)}: {out / NAME}.part")
    monkeypatch.undo()
    assert (out / f"{NAME}.part").is_file()
    assert _fetch(serve(), out, payload).read_bytes() == payload


def test_a_redirect_loop_is_one_line(payload, tmp_path):
    """urllib's reason for a redirect it gives up on runs over three lines: 'error: cannot download URL: HTTP 302
    The HTTP server returned a redirect error that would lead to an infinite loop.\nThe last 30x error ...'."""
    from click.testing import CliRunner

    from pipeline.cli import main

    server = FaultyHTTPServer(tmp_path / "www", {NAME: "redirect-loop"})
    try:
        result = CliRunner().invoke(main, ["data", "fetch", "--out", str(tmp_path / "dl"), "--url", f"{server.url}/{NAME}",
                                           "--md5", hashlib.md5(payload).hexdigest()])
    finally:
        server.close()
    assert (result.exit_code, result.output) == (
        1, f"error: cannot download {server.url}/{NAME}: HTTP 302 The HTTP server returned a redirect error that "
           "would lead to an infinite loop.\n")


def test_a_folder_where_the_download_goes_is_refused_before_downloading(serve, payload, tmp_path):
    """OUT/NAME a folder (an archive unpacked under its own name): the whole file was downloaded, then its rename
    into place was an IsADirectoryError traceback."""
    from click.testing import CliRunner

    from pipeline.cli import main

    server, out = serve(), tmp_path / "dl"
    (out / NAME).mkdir(parents=True)
    result = CliRunner().invoke(main, ["data", "fetch", "--out", str(out), "--url", _url(server),
                                       "--md5", hashlib.md5(payload).hexdigest()])
    assert (result.exit_code, result.output) == (
        1, f"error: {out / NAME}: a folder, not a file; move it away to download {NAME} here\n")
    assert server.ranges == [] and sorted(p.name for p in out.iterdir()) == [NAME]


def test_cli_says_a_file_already_there_is_not_downloaded(serve, payload, tmp_path):
    """A second `data fetch` of a complete file said 'downloaded PATH', though nothing was: it says what it
    found, and what the file matched (the md5, or without --md5 the size the server gives)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    server, out, md5 = serve(), tmp_path / "dl", hashlib.md5(payload).hexdigest()
    fetch = ["data", "fetch", "--out", str(out), "--url", _url(server)]
    results = [CliRunner().invoke(main, args) for args in (fetch + ["--md5", md5], fetch + ["--md5", md5], fetch)]
    assert [(r.exit_code, r.stdout) for r in results] == [  # the progress bar on stderr
        (0, f"downloaded {out / NAME}\n"), (0, f"already have {out / NAME} (md5 ok)\n"),
        (0, f"already have {out / NAME} (size ok)\n")]
    assert server.ranges == [None]  # one download


def test_a_file_already_there_says_what_it_matched_and_a_download_says_nothing(serve, payload, tmp_path, monkeypatch):
    server, out, found = serve(), tmp_path / "out", []
    _fetch(server, out, payload, found=found.append)
    for checks in ({}, dict(md5=None), dict(md5=None, expected_size=None)):
        _fetch(server, out, payload, found=found.append, **checks)
    monkeypatch.setattr("pipeline.fetch._remote_size", lambda url, part, final: None)  # a server that gives no size
    _fetch(server, out, payload, found=found.append, md5=None, expected_size=None)
    assert found == ["md5 ok", "size ok", "size ok", "nothing to check it against"]


def test_cli_md5_without_url_is_a_usage_error(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["data", "fetch", "--out", str(tmp_path / "dl"), "--md5", "0" * 32])
    assert result.exit_code == 2 and not (tmp_path / "dl").exists()
    assert result.output == "error: --md5 checks a --url download (the official zip's md5 is built in)\n"


def test_cli_an_empty_out_is_a_usage_error(serve, tmp_path):
    """--out "$DATA" with DATA unset: fetch_release's ValueError ('out must be a folder's path') was a traceback."""
    from click.testing import CliRunner

    from pipeline.cli import main

    server = serve()
    result = CliRunner().invoke(main, ["data", "fetch", "--out", "", "--url", _url(server)])
    assert (result.exit_code, result.output) == (2, "error: --out is empty: give the folder to download into\n")
    assert server.ranges == [] and server.heads == 0


@pytest.mark.parametrize("md5", ["90528d7ca1a48142e341f4ef8d21d0d", "90528d7ca1a48142e341f4ef8d21d0de  tiny.zip"])
def test_cli_a_malformed_md5_is_refused_before_downloading(serve, tmp_path, md5):
    """A digit short, or a pasted `md5sum` line: the whole file was downloaded, found not to match, deleted."""
    from click.testing import CliRunner

    from pipeline.cli import main

    server = serve()
    result = CliRunner().invoke(main, ["data", "fetch", "--out", str(tmp_path / "dl"), "--url", _url(server), "--md5", md5])
    assert result.exit_code == 2 and not (tmp_path / "dl").exists() and server.ranges == []
    assert result.output == f"error: Invalid value for '--md5': {md5!r} is not an md5 (32 hex digits)\n"


@pytest.mark.parametrize("md5", ["90528d7ca1a48142e341f4ef8d21d0d", 0x90528D7CA1A48142E341F4EF8D21D0DE])
def test_a_malformed_md5_from_python_is_refused_before_downloading(serve, tmp_path, md5):
    """The CLI's check of --md5, fetch_release's own: a ValueError, as make_loader's values that no argument takes."""
    server = serve()
    with pytest.raises(ValueError) as info:
        fetch_release(tmp_path / "dl", _url(server), md5=md5, progress=False)
    assert str(info.value) == f"md5: {md5!r} is not an md5 (32 hex digits)"
    assert not (tmp_path / "dl").exists() and server.ranges == []


@pytest.mark.parametrize("given, message", [
    (dict(expected_size="5"), "expected_size must be an integer of at least 0, not '5'"),
    (dict(expected_size=-1), "expected_size must be an integer of at least 0, not -1"),
    (dict(expected_size=True), "expected_size must be an integer of at least 0, not True"),
    (dict(chunk_size=0), "chunk_size must be an integer of at least 1, not 0"),
    (dict(progress="no"), "progress must be True or False, not 'no'"),
    (dict(found="x"), "found must be a function or None, not 'x'"),
    (dict(url=None), "url must be a URL (a string), not None"),
    (dict(out=None), "out must be a folder's path, not None"),
])
def test_a_value_no_argument_takes_is_refused_before_downloading(serve, payload, tmp_path, given, message):
    """As md5's: expected_size="5" was a TypeError traceback ("'>' not supported"), -1 or True a download deleted
    as 'tiny.zip: expected -1 bytes, got 300152', chunk_size=0 five attempts that each read nothing
    ('connection closed after 0 of N bytes'), progress="no" a bar, found="x" a TypeError once the file was there,
    out=None a TypeError: ValueErrors, as make_loader's, before anything is asked."""
    server = serve()
    args = {**dict(out=tmp_path / "dl", url=_url(server), expected_size=len(payload), md5=None, progress=False), **given}
    with pytest.raises(ValueError) as info:
        fetch_release(**args)
    assert str(info.value) == message
    assert not (tmp_path / "dl").exists() and server.ranges == [] and server.heads == 0


@pytest.mark.parametrize("fault", ["cut-once", "busy-once"])
def test_a_transfer_cut_or_refused_once_is_tried_again_from_what_arrived(payload, tmp_path, fault):
    """A connection cut mid-body, or a 503 from a server under load, ended `data fetch` at once ('cannot download
    URL: ...'), where a remote shard's transfer was tried again. It is tried again as a shard's is
    (`shardset.retry_waits`), resuming from the bytes the .part holds."""
    server = FaultyHTTPServer(tmp_path / "www", {NAME: fault})
    try:
        path = fetch_release(tmp_path / "out", f"{server.url}/{NAME}", expected_size=len(payload),
                             md5=hashlib.md5(payload).hexdigest(), progress=False)
    finally:
        server.close()
    assert path.read_bytes() == payload and [p.name for p in path.parent.iterdir()] == [NAME]
    # the cut one resumed from the half its first answer brought
    assert server.starts == {"cut-once": [(NAME, 0), (NAME, len(payload) // 2)], "busy-once": [(NAME, 0)]}[fault]


def test_a_transfer_cut_at_every_attempt_says_how_many_and_that_a_rerun_resumes(serve, payload, tmp_path,
                                                                                   quick_retries):
    """Each attempt resumes from the last one's bytes; after the last, the error says so, and the rerun does."""
    server, out = serve(cut_after=50_000), tmp_path / "out"
    with pytest.raises(FetchError) as info:
        _fetch(server, out, payload)
    assert str(info.value) == (
        f"cannot download {_url(server)}: connection closed after 50000 of {len(payload) - 200_000} bytes "
        f"(after {RETRIES} attempts); rerun the same command to resume from the 250,000 bytes in {out / NAME}.part")
    assert server.ranges == [None] + [f"bytes={n}-" for n in range(50_000, 250_000, 50_000)]
    server.cut_after = None
    assert _fetch(server, out, payload).read_bytes() == payload
    assert server.ranges[RETRIES:] == ["bytes=250000-"]


def test_a_body_without_a_length_cut_short_is_tried_again_and_not_deleted(serve, payload, tmp_path, quick_retries):
    """A server that sends no Content-Length ends the body by closing the connection, and a cut one looked whole:
    the .part was deleted as 'tiny.zip: expected 300152 bytes, got 50000'. The size known tells it is short."""
    server, out = serve(cut_after=50_000, send_length=False), tmp_path / "out"
    with pytest.raises(FetchError) as info:
        _fetch(server, out, payload)
    assert str(info.value) == (
        f"cannot download {_url(server)}: connection closed after 50000 of {len(payload) - 200_000} bytes "
        f"(after {RETRIES} attempts); rerun the same command to resume from the 250,000 bytes in {out / NAME}.part")
    server.cut_after = None
    assert _fetch(server, out, payload).read_bytes() == payload
    assert server.ranges == [None] + [f"bytes={n}-" for n in range(50_000, 300_000, 50_000)]


@pytest.mark.parametrize("checks", [{}, dict(expected_size=None), dict(expected_size=None, md5=None)],
                         ids=["size", "md5", "head"])
def test_a_malformed_content_length_is_read_to_the_connections_close(serve, payload, tmp_path, checks):
    """A Content-Length that is no number (a server's bug) was a ValueError traceback out of the download: 'invalid
    literal for int() with base 10'. http.client reads such a body to the connection's close, and the download
    takes it, checked as any."""
    server = serve(send_length=f"{len(payload)}x")
    assert _fetch(server, tmp_path / "out", payload, **checks).read_bytes() == payload
    assert server.ranges == [None] and [p.name for p in (tmp_path / "out").iterdir()] == [NAME]


@pytest.mark.parametrize("checks", [dict(expected_size=0, md5=None), dict(expected_size=None, md5=None)],
                         ids=["size", "head"])
def test_an_empty_file_is_downloaded(serve, tmp_path, checks):
    """A size of 0 (given, or the HEAD's) asked for nothing, and the check of the .part never made was a
    traceback: 'FileNotFoundError: [Errno 2] No such file or directory: OUT/empty.zip.part'."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "empty.zip").write_bytes(b"")
    server = serve()
    path = fetch_release(tmp_path / "out", f"http://127.0.0.1:{server.server_port}/empty.zip", progress=False, **checks)
    assert path.read_bytes() == b"" and [p.name for p in path.parent.iterdir()] == ["empty.zip"]
    assert server.ranges == [None]


def test_a_final_answer_is_not_asked_again(serve, payload, tmp_path, monkeypatch):
    """A 404 (or a wrong password's 401) is the server's last word: one request, no wait (`worth_retrying`)."""
    monkeypatch.setattr("pipeline.fetch.time.sleep", lambda s: pytest.fail("waited to try again"))
    server = serve()
    with pytest.raises(FetchError) as info:
        fetch_release(tmp_path / "out", f"http://127.0.0.1:{server.server_port}/missing.zip", progress=False)
    assert str(info.value).endswith(": HTTP 404 File not found") and server.ranges == [None]


@pytest.mark.parametrize("checks", [{}, dict(expected_size=None, md5=None)], ids=["known-size", "head"])
def test_a_missing_file_of_a_file_url_is_named_at_once(tmp_path, monkeypatch, checks):
    """urllib's URLError around the FileNotFoundError: asked again as a cut connection, 5 times over 7.5 s."""
    monkeypatch.setattr("pipeline.fetch.time.sleep", lambda s: pytest.fail("waited to try again"))
    url = f"file://{tmp_path}/{NAME}"
    with pytest.raises(FetchError) as info:
        fetch_release(tmp_path / "out", url, progress=False, **checks)
    assert str(info.value) == (f"cannot download {url}: [Errno {errno.ENOENT}] {os.strerror(errno.ENOENT)}: "
                               f"'{tmp_path / NAME}'")


@pytest.mark.parametrize("where", ["tiny-imagenet-200", "file.zip/tiny.zip"], ids=["folder", "under-a-file"])
@pytest.mark.parametrize("checks", [{}, dict(expected_size=None, md5=None)], ids=["known-size", "head"])
def test_a_file_url_of_a_folder_is_named_at_once(tmp_path, monkeypatch, checks, where):
    """--url file:///data/tiny-imagenet-200 (the release unpacked, not its zip), or a path under a file: 'Is a
    directory' was asked again as a cut connection is, 5 times over 7.5 s, and named '(after 5 attempts)'."""
    monkeypatch.setattr("pipeline.fetch.time.sleep", lambda s: pytest.fail("waited to try again"))
    (tmp_path / "tiny-imagenet-200").mkdir()
    (tmp_path / "file.zip").write_bytes(b"zip")
    url = f"file://{tmp_path}/{where}"
    code = errno.EISDIR if where == "tiny-imagenet-200" else errno.ENOTDIR
    with pytest.raises(FetchError) as info:
        fetch_release(tmp_path / "out", url, progress=False, **checks)
    assert str(info.value) == f"cannot download {url}: [Errno {code}] {os.strerror(code)}: '{tmp_path / where}'"


@pytest.mark.parametrize("checks", [{}, dict(expected_size=None, md5=None)], ids=["known-size", "head"])
def test_a_host_that_does_not_resolve_is_named_at_once(tmp_path, monkeypatch, no_such_host, checks):
    """A mistyped host ('Name or service not known') was asked again as a cut connection is, 5 times over 7.5 s,
    though no resolver will answer otherwise: it is named at once ('.invalid' never resolves, RFC 2606); also
    by the HEAD asked first for the size of a --url download without an md5."""
    monkeypatch.setattr("pipeline.fetch.time.sleep", lambda s: pytest.fail("waited to try again"))
    host, words = no_such_host
    url = f"http://{host}/{NAME}"
    with pytest.raises(FetchError) as info:
        fetch_release(tmp_path / "out", url, progress=False, **checks)
    assert str(info.value) == f"cannot download {url}: unknown host {host}: {words}"
    assert not (tmp_path / "out" / f"{NAME}.part").exists()


def test_a_proxy_that_does_not_resolve_is_named_and_not_the_urls_host(serve, payload, tmp_path, monkeypatch,
                                                                      no_such_host):
    """The name looked up is the proxy's ($http_proxy): the URL's own host is no unknown host."""
    monkeypatch.setattr("pipeline.fetch.time.sleep", lambda s: pytest.fail("waited to try again"))
    host, words = no_such_host
    monkeypatch.setenv("http_proxy", f"http://{host}:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's opener reads the proxies once, when made
    url = _url(serve())
    with pytest.raises(FetchError) as info:
        fetch_release(tmp_path / "out", url, progress=False)
    assert str(info.value) == f"cannot download {url}: unknown host {host} (the proxy in $http_proxy): {words}"
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # the URL's host goes round it
    assert _fetch(serve(), tmp_path / "out", payload).read_bytes() == payload


@pytest.mark.parametrize("length", [251, 245])
def test_a_file_name_with_no_room_for_its_part_is_refused_before_anything_is_made(serve, payload, tmp_path, length):
    """A URL's file name that fits NAME_MAX (255 bytes) but not with '.part' after it failed as 'File name too long:
    OUT/.NAME.lock' (its lock's name), naming neither the name nor the limit; with room for '.part' but not for the
    .part's '.validator' (a server that sends an ETag), once the answer came, over 5 attempts. It is refused at once
    as a long --out is (`atomic.long_name`)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    name = "a" * (length - 4) + ".zip"
    server, out = serve(validator="etag"), tmp_path / "dl"
    (tmp_path / "www" / name).write_bytes(b"data")
    result = CliRunner().invoke(main, ["data", "fetch", "--out", str(out), "--url", f"{_url(server)[:-len(NAME)]}{name}"])
    assert (result.exit_code, result.output) == (1, (
        f"error: cannot download {_url(server)[:-len(NAME)]}{name}: the name {'a' * 24 + '...' + 'aaaa.zip'!r} leaves "
        f"no room for '.part.validator' after it (its temporary twin beside it): {length + 15} bytes, more than "
        "the 255 a name may have\n"))
    assert not out.exists() and server.ranges == []


def test_a_file_already_there_under_a_name_with_no_room_for_its_part_is_returned(serve, payload, tmp_path):
    """No .part is made for it: its name leaving no room for one is no reason to refuse it."""
    name, out = "a" * 241 + ".zip", tmp_path / "dl"
    out.mkdir()
    (out / name).write_bytes(payload)
    server = serve()
    url = f"{_url(server)[:-len(NAME)]}{name}"
    assert fetch_release(out, url, expected_size=len(payload), md5=None, progress=False) == out / name
    assert server.ranges == [] and [p.name for p in out.iterdir()] == [name]
