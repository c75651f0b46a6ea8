"""Download the official Tiny ImageNet 200 release, resumably, and verify it.

urllib and tqdm, so fetching needs nothing beyond the base install; a URL's
`user:password@` is sent as basic auth, as for a shard set's URL. A 248 MB file
over a slow link must survive interruptions, so bytes go to `<name>.part` and a
later call resumes it with an HTTP Range request, sent with `If-Range` (RFC 9110
13.1.5) so that a file changed on the server meanwhile is sent whole again
instead of being appended to the start of the old one. A transfer that fails on the way (a cut
connection, a 503, a reset) is tried again as a remote shard's is (`shardset.retry_waits`,
`shardset.worth_retrying`), each attempt resuming from the bytes the .part holds.
"""

import hashlib
import http.client
import os
import pathlib
import re
import stat
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

from .atomic import folder_refusal, long_name
from .errors import FULL_DISK_ERRNOS, TinyinError, check_flag, check_integer, plural
from .locks import locked
from .shardset import http_request, retry_waits, status_line, unknown_host, worth_retrying

OFFICIAL_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
OFFICIAL_SIZE = 248100043  # bytes of the official zip
OFFICIAL_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TIMEOUT_S = 60


class FetchError(TinyinError):
    """A download failed or its result did not verify; the message is one line. A TinyinError, as every other
    problem the Python API names is (a shard set's ShardError, a bad flag's UsageError): `except TinyinError` missed
    it, and the CLI turned it into one (exit 1) itself."""


def md5_problem(md5):
    """Why `md5` is no md5, or None for 32 hex digits: `data fetch --md5` and fetch_release's md5 are checked before
    the download (a pasted `md5sum` line or a digit short was found wrong only once the whole file had arrived,
    and the file was deleted)."""
    if isinstance(md5, str) and re.fullmatch(r"[0-9a-fA-F]{32}", md5):
        return None
    return f"{md5!r} is not an md5 (32 hex digits)"


def _mismatch(path, name, expected_size, md5):
    """The one-line complaint about `path` not matching, or None if it matches."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"{name}: expected {expected_size} bytes, got {size}"
    if md5 is not None:
        digest = hashlib.md5(usedforsecurity=False)
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != md5.lower():
            return f"{name}: expected md5 {md5}, got {digest.hexdigest()}"
    return None


def _identity(path):
    """What tells file `path` from another renamed into its place (inode, size, mtime), None if no file is there."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def _found(final, expected_size, md5, found):
    """`final`, already there, after telling `found` (if given) what it matched."""
    if found is not None:
        found("md5 ok" if md5 is not None else "size ok" if expected_size is not None else "nothing to check it against")
    return final


SCHEMES = ("http", "https", "ftp", "file")  # what urllib opens


def _request(url, headers=None, method=None):
    """A urllib Request for `url`. Over HTTP(S) its `user:password@` goes as basic auth (urllib would take
    it for part of the host name: 'Name or service not known'); ftp:// reads it itself."""
    if urllib.parse.urlsplit(url).scheme in ("http", "https"):
        request = http_request(url, headers)
    else:
        request = urllib.request.Request(url, headers=headers or {})
    if method:
        request.method = method
    return request


def _head(url):
    """The Content-Length of a HEAD request for `url`, or None if the answer gives none; `_Failed` if it fails.
    501 (Not Implemented: a server that takes GET alone) is the server's last word on HEAD, as a 405 is."""
    try:
        with urllib.request.urlopen(_request(url, method="HEAD"), timeout=TIMEOUT_S) as response:
            return _content_length(response.headers)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 501:
            raise _Failed(status_line(e), retry=False) from None
        raise _failed(e, url) from None
    except (OSError, http.client.HTTPException) as e:
        raise _failed(e, url) from None


def _content_length(headers):
    """An answer's Content-Length, or None where it gives none or one that is no number of bytes ('300152x', a
    server's bug): http.client then reads the body to the connection's close, and so does the download (int() of
    it was a ValueError traceback)."""
    length = headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _remote_size(url, part, final):
    """The size the server gives for `url` (a HEAD request's Content-Length), or None if it gives none. The HEAD
    is tried again as the download is (`_retried`): a blip on it went on without the size, and a file already
    in `out` of any size was taken for the download. None after a final answer (a 404, a 401, a host that
    does not resolve, a server that takes no HEAD): the download that follows says what is wrong, or gets the
    file. When every attempt failed, None where file `final` is there (a job's fetch-if-needed on a node
    without the network takes it, as it did), else FetchError (`_given_up`): the download would try as long."""
    try:
        return _retried(lambda: _head(url))
    except _Failed as e:
        if e.retry and not final.is_file():
            raise _given_up(url, part, None, e) from None  # no md5: one would have been the check
        return None


def _complete_length(content_range):
    """N of a 416 answer's `Content-Range: bytes */N` (the file's size), or None."""
    unit, _, rest = (content_range or "").partition(" ")
    size = rest.rpartition("/")[2]
    return int(size) if unit == "bytes" and size.isdigit() else None


def _validator(headers):
    """What identifies this version of the file for If-Range: its strong ETag, else its Last-Modified
    (a weak ETag may not be sent in If-Range), or None if the server gives neither."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _validator_file(part):
    """The file beside `part` holding the validator of the response that began it (one line)."""
    return part.with_name(f"{part.name}.validator")


class _Failed(Exception):
    """One attempt at the download failed: `reason` (one line), and whether another attempt may get past it
    (`retry`, by `shardset.worth_retrying`)."""

    def __init__(self, reason, retry):
        super().__init__(reason)
        self.reason, self.retry = reason, retry


def _failed(error, url):
    """`error`, raised by a request for `url` (urllib's HTTPError or URLError, a cut connection), as `_Failed`."""
    if isinstance(error, urllib.error.HTTPError):
        return _Failed(status_line(error), worth_retrying(error))
    if isinstance(error, urllib.error.URLError):
        return _Failed(unknown_host(error, url) or str(error.reason), worth_retrying(error))
    return _Failed(str(error) or type(error).__name__, worth_retrying(error))


class _Changed(Exception):
    """A 206 for another version of the file than the .part's (a server that ignores If-Range)."""


def _download(url, part, expected_size, md5, chunk_size, progress):
    """Append the rest of `url` to `part`, or rewrite it if the server sends the whole file (it ignores
    Range, or If-Range tells it the file changed since `part` began). Returns the file's size as a whole
    answer (200) gives it, else None."""
    start = part.stat().st_size if part.exists() else 0
    if expected_size is not None and start > expected_size:
        start = 0  # longer than the file: not a prefix of it, so start again
    if expected_size is not None and start == expected_size and part.is_file():
        # Nothing left to ask for; verification decides whether it is good. Not without a .part: a file of 0
        # bytes (a HEAD's size) was never asked for, and the check of a .part never made was a traceback.
        return None
    saved = _validator_file(part)
    validator = saved.read_text("latin-1").strip() if start and saved.is_file() else None  # as headers are
    if start and validator is None and md5 is None:
        # Nothing would tell whether the server's file is still the one `part` began with: resumed,
        # a changed file would come out as the old file's start joined to the new one's end, and the
        # size check alone passes that when the sizes agree. Downloading again costs time, not data.
        start = 0
    headers = {"Range": f"bytes={start}-", **({"If-Range": validator} if validator else {})} if start else {}
    try:
        with urllib.request.urlopen(_request(url, headers), timeout=TIMEOUT_S) as response:
            if response.status != 206:
                start = 0  # a full answer (200) replaces whatever we had
            elif validator and _validator(response.headers) not in (None, validator):
                raise _Changed
            length = _content_length(response.headers)
            total = expected_size if expected_size is not None else (start + length if length is not None else None)
            bar = tqdm(total=total, initial=start, desc=part.name, unit="B", unit_scale=True,
                       unit_divisor=1024, disable=not progress)
            received = 0
            with part.open("ab" if start else "wb") as f, bar:
                if not start:  # after `part` is emptied: a validator never stands beside older bytes
                    saved.unlink(missing_ok=True)
                    if new := _validator(response.headers):
                        saved.write_text(f"{new}\n", "latin-1")
                while chunk := response.read(chunk_size):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            # http.client ends a short body quietly, and one without a Content-Length (its end the connection's
            # close) as if it were whole: the size known says so then, where the .part was deleted as a file of
            # the wrong size. The .part stays for the next attempt to resume.
            wanted = length if length is not None else None if expected_size is None else expected_size - start
            if wanted is not None and received < wanted:
                raise _Failed(f"connection closed after {received} of {wanted} bytes", retry=True)
            return received if response.status == 200 and length is not None else None
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416: the .part already holds everything the server has
            raise _failed(e, url) from None
        total = _complete_length(e.headers.get("Content-Range"))
        if total is not None and total < start:  # longer than the file: not a prefix of it, so start again
            part.unlink()
            return _download(url, part, total, md5, chunk_size, progress)
    except _Changed:  # the server sent the rest of another file: start again
        part.unlink()
        return _download(url, part, expected_size, md5, chunk_size, progress)
    except (OSError, http.client.HTTPException) as e:  # urllib's URLError too
        if isinstance(e, OSError) and e.errno in FULL_DISK_ERRNOS:
            # This machine's disk, not the server: the user must know which disk to clean (a write's error
            # names no file). The .part is kept: what arrived resumes once there is room.
            raise OSError(e.errno, e.strerror, str(part)) from None
        raise _failed(e, url) from None
    return None


def _retried(attempt):
    """`attempt()`'s value, tried again as a remote shard's transfer is (`shardset.retry_waits`: 5 attempts over
    about 8 s) while the `_Failed` it raises is worth it (`shardset.worth_retrying`: a cut connection, a 5xx, a
    reset; not a 404). After the last, or a final one, that `_Failed`, its `attempts` set."""
    waits = retry_waits()
    for n in range(len(waits) + 1):
        try:
            return attempt()
        except _Failed as e:
            if not e.retry or n == len(waits):
                e.attempts = n + 1
                raise
        time.sleep(waits[n])


def _given_up(url, part, md5, failure):
    """The FetchError of `failure` (`_retried`'s): how many attempts, and whether a rerun resumes."""
    tries = f" (after {failure.attempts} {plural(failure.attempts, 'attempt')})" if failure.attempts > 1 else ""
    kept = part.stat().st_size if failure.retry and part.is_file() else 0
    # A rerun resumes the .part where something would catch a mix of two versions of the file (`_download`).
    resumes = kept and (md5 is not None or _validator_file(part).is_file())
    again = f"; rerun the same command to resume from the {kept:,} bytes in {part}" if resumes else ""
    return FetchError(f"cannot download {url}: {failure.reason}{tries}{again}")


def _download_retried(url, part, expected_size, md5, chunk_size, progress):
    """`_download`, tried again (`_retried`), each attempt resuming from what the .part holds; its value. FetchError
    after the last, saying whether a rerun resumes."""
    try:
        return _retried(lambda: _download(url, part, expected_size, md5, chunk_size, progress))
    except _Failed as e:
        raise _given_up(url, part, md5, e) from None


def _check_args(out, url, expected_size, md5, chunk_size, progress, found):
    """ValueError for a value no argument of `fetch_release` takes, as make_loader's, before anything is asked: a
    size given as a string ("5") was a TypeError traceback, a negative one or True a download deleted as 'NAME:
    expected -1 bytes, got N', chunk_size=0 five attempts that each read nothing, progress="no" a bar, a `found`
    that is no function a TypeError once the file was there."""
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):  # None: a TypeError; '': the current folder
        raise ValueError(f"out must be a folder's path, not {out!r}")
    if not isinstance(url, str):
        raise ValueError(f"url must be a URL (a string), not {url!r}")
    if expected_size is not None:
        check_integer("expected_size", expected_size, 0)
    if md5 is not None and (problem := md5_problem(md5)):
        raise ValueError(f"md5: {problem}")
    check_integer("chunk_size", chunk_size, 1)
    check_flag("progress", progress)
    if found is not None and not callable(found):
        raise ValueError(f"found must be a function or None, not {found!r}")


def fetch_release(out, url=OFFICIAL_URL, expected_size=OFFICIAL_SIZE, md5=OFFICIAL_MD5, chunk_size=1 << 20, progress=True,
                  found=None):
    """Download `url` into directory `out` (created) and return the path of the file.

    The file is named after the last component of the URL's path. Bytes go to
    `<name>.part`, which a later call resumes with `Range: bytes=N-` and `If-Range: V`, V the
    validator (strong ETag, else Last-Modified) of the answer that began the .part, kept in
    `<name>.part.validator`; it restarts if the server answers 200 (the file changed, or Range is
    ignored). A .part with no validator known is resumed only when `md5` is given (it would catch a
    mix of two versions of the file); otherwise it is downloaded again. The finished file's size
    and md5 are checked (either check is skipped when its expected value is None) before it is
    renamed into place; with neither, the size is the one the server gives (HEAD, tried again as
    the download is; a whole answer's own size, newer, stands over it), when it gives one. A final
    file that already matches is returned without downloading (also from a folder this user may not
    write in), and `found`, when given, is called with what matched ('md5 ok', 'size ok', or
    'nothing to check it against'). One call at a time downloads into `out` (an flock on
    `.<name>.lock`, removed after): another waits, saying so on stderr, and then returns the file
    the first one downloaded. An `out` that cannot be made a folder, or written in, is a FetchError before anything
    is asked: "<out>: cannot be made a folder (File exists)", "<out>: cannot write in it (Permission denied)".

    A transfer that fails on the way (a cut connection, a 5xx) is tried again, 5 attempts over about 8 s
    (`shardset.retry_waits`), each resuming from the .part; a final answer (a 404) is not.
    Raises FetchError with a one-line message: "cannot download <url>: <reason>" on
    network errors (the .part is kept for resuming; after the last attempt the message says how many, and
    where a rerun resumes, from how many bytes), or "<name>: expected ..., got ..."
    on a size or md5 mismatch (the .part is deleted); OSError naming the .part where its disk or
    quota is full (the .part is kept). ValueError, before anything is asked, for a value no argument takes (an
    `md5` that is no md5, a size that is no whole number of bytes; see `_check_args`).
    """
    _check_args(out, url, expected_size, md5, chunk_size, progress, found)
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as e:  # a bracket left open: 'Invalid IPv6 URL'
        raise FetchError(f"cannot download {url}: {e}") from None
    if parts.scheme not in SCHEMES:
        raise FetchError(f"cannot download {url}: not a URL ({', '.join(s + '://' for s in SCHEMES)})")
    name = pathlib.PurePosixPath(parts.path).name
    if not name:
        raise FetchError(f"cannot download {url}: no file name in the URL")
    out = pathlib.Path(out)
    final, part = out / name, out / f"{name}.part"
    if os.path.isdir(final):  # an archive unpacked under its own name: its rename failed once the whole file had come
        raise FetchError(f"{final}: a folder, not a file; move it away to download {name} here")
    sized_by_head = expected_size is None and md5 is None
    if sized_by_head:
        # Nothing to check a file against: take the server's size, so that an unrelated file already
        # in `out`, or a .part longer than the file, is not taken for the download.
        expected_size = _remote_size(url, part, final)
    # Two fetches into one folder (a job per node on shared storage) would append to one .part: the
    # second waits here, then finds the first one's file.
    waiting = lambda: print(f"waiting for another download of {name} into {out}", file=sys.stderr, flush=True)  # noqa: E731
    seen = _identity(final)
    if seen and _mismatch(final, name, expected_size, md5) is None:
        # Before the lock, whose file this user may not make in a shared data folder (another user's, a
        # read-only mount): a job script's fetch-if-needed failed there on a complete copy. A final file is
        # only ever renamed into place whole, so the look needs no lock.
        return _found(final, expected_size, md5, found)
    # The longest name made beside the file is its .part's validator (`.NAME.lock` and NAME.part are shorter): a name
    # with no room for it failed as 'File name too long: OUT/.NAME.lock', or with room for those once the answer came.
    if why := long_name(final, ".part.validator"):
        raise FetchError(f"cannot download {url}: {why}")
    if why := folder_refusal(out):  # a file, a folder under one ('Not a directory'), another user's, a read-only mount
        raise FetchError(f"{out}: {why}")  # were OSError tracebacks out of the mkdir or the lock file's open
    with locked(out / f".{name}.lock", waiting, remove=True):
        # Another fetch's file, renamed into place while this one waited. The one looked at above is not
        # checked again: a damaged 248 MB file's md5 took its seconds twice.
        if _identity(final) not in (None, seen) and _mismatch(final, name, expected_size, md5) is None:
            return _found(final, expected_size, md5, found)
        sent = _download_retried(url, part, expected_size, md5, chunk_size, progress)
        if sized_by_head and sent is not None:
            # The file whole, its size the GET's: newer than the HEAD's. A file replaced on the server between
            # the two arrived whole and was deleted as 'NAME: expected 2000000 bytes, got 2500000', sizes never given.
            expected_size = sent
        problem = _mismatch(part, name, expected_size, md5)
        if problem:
            part.unlink()
            _validator_file(part).unlink(missing_ok=True)
            raise FetchError(problem)
        os.replace(part, final)
        _validator_file(part).unlink(missing_ok=True)
        return final
