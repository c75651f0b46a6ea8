"""`cached_copy`: a remote shard set's splits fetched into a local folder, so a URL reads like a folder.

The manifest and index are written first (from the one `ShardSet` open), then each shard of the
asked splits is fetched to `<file>.part`, checked as every transfer is (size and `sum64`,
`ShardSet.check_bytes`, the one wording) and renamed into place. So a file under its own name is
always a checked copy: a second open fetches nothing, and a broken-off `.part` resumes with a
range request. (sha256 is not computed here: the loader's data pass hashes every local shard
anyway, beside the first epoch, so hashing here too would pass over the data twice.)
While the set's URL cannot be opened, a complete copy is used as it is (a note on stderr says so).
One process per cache folder fetches at a time (an `flock` on `.lock`): the ranks
of a node, or any processes sharing the folder, download each shard once and the others wait.

HTTP(S) shards are read with urllib straight into a reused buffer: fsspec's HTTP file
(aiohttp behind an event-loop thread) measured 0.1-0.2 GB/s on loopback where curl gets 1.3-2 GB/s.
urllib, as for the manifest, the index and the stream path: the same redirects followed and the
same proxies (`http_proxy`, `https_proxy`, `no_proxy`) used.
Other URLs (`s3://`, `gs://`, ...) go through the set's fsspec filesystem in large blocks.
"""
import concurrent.futures
import contextlib
import hashlib
import json
import mmap
import os
import socket
import sys
import threading
import urllib.error
import urllib.parse
from pathlib import Path

from .atomic import atomic_file, write_json
from .errors import FULL_DISK_ERRNOS, READ_ONLY_ERRNOS, ShardError, hide_password
from .locks import locked
from .schema import CACHE_LOCK_FILE, CACHE_MARK_FILE, INDEX_FILE, MANIFEST_FILE
from .shardset import (ShardSet, http_open, is_url, missing_error, names_a_tar, open_shard_set, retry_waits,
                       is_file_name, split_url, worth_retrying)

BLOCK = 4 << 20  # bytes per read; large enough that receiving a block costs far more than a call
FSSPEC_BLOCK = 32 << 20  # bytes per ranged read through fsspec (a request each: S3 and GCS bill per request)
TIMEOUT_S = 60
WORKERS = 4  # shards fetched at once


def is_set_url(shards):
    """True for a remote shard-set location (a URL of a folder holding manifest.json), as opposed to a
    local folder, a ShardSet of a folder, or the stream path's shard URLs and brace patterns."""
    if isinstance(shards, ShardSet):
        return not shards.is_local
    text = str(shards)
    return isinstance(shards, (str, Path)) and is_url(text) and "{" not in text and not names_a_tar(text)


def cache_folder(location, cache_dir=None):
    """Where the copy of the set at `location` lives: `<root>/<16 hex digits of the URL's sha256>`,
    root being `cache_dir`, else $TINYIN_CACHE, else ~/.cache/tinyin. The URL is taken without its
    user:password@ and query string: credentials and tokens that change between runs name the same
    set (a set that differs all the same has another manifest, and its copies are replaced). A leading `~` of
    the root is the home folder, as for $HF_HOME and $TORCH_HOME: a shell leaves it as it is in quotes, and a
    Dockerfile's ENV or a .env file never expands it."""
    root = cache_dir or os.environ.get("TINYIN_CACHE") or Path.home() / ".cache" / "tinyin"
    parts = split_url(str(location))
    key = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query="")).rstrip("/")
    return Path(root).expanduser() / hashlib.sha256(key.encode()).hexdigest()[:16]


def cached_copy(shards, splits, cache_dir=None, workers=WORKERS, progress=None, storage_options=None, check=None):
    """A local folder holding the manifest, index and verified shards of `splits` of remote set `shards`.

    shards: a URL (http(s)://, s3://, gs://, any fsspec URL) or a remote ShardSet; splits: names.
    Shards already in the cache are not fetched again; a set rebuilt under the same URL (another
    manifest) replaces the copies whose checksum changed. progress: a bar on stderr (default: on a
    terminal, in the process with LOCAL_RANK 0). Raises ShardError naming the URL of a shard that is
    missing (at once), short, corrupt or unreachable after retries (5 attempts over about 8 s,
    `shardset.retry_waits`), and OSError naming the file in the cache folder where its disk is full (at
    once); no file is left looking complete. check: called with the remote ShardSet once it is open, before any
    shard is fetched (make_loader refuses there an option its read path does not use, not after the download).
    """
    splits = [splits] if isinstance(splits, str) else list(splits)
    try:
        remote = open_shard_set(shards, storage_options)
    except ShardError as e:
        # A server or object store down, or a node without the network: a complete copy trains as it is (a
        # preempted job requeued meanwhile failed, every file it needed at hand).
        folder = None if isinstance(shards, ShardSet) else _complete_copy(cache_folder(shards, cache_dir), splits)
        if folder is None:
            raise
        if os.environ.get("LOCAL_RANK", "0") == "0":  # one note per node
            print(f"note: {hide_password(e)}; reading its copy fetched before, {folder}", file=sys.stderr, flush=True)
        return folder
    for split in splits:  # before any file is fetched: a split it lacks is the caller's choice (UsageError)
        remote.check_holds(split)
    if check is not None:
        check(remote)
    entries = [e for split in splits for e in remote.entries(split)]
    folder = cache_folder(remote.location, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = sys.stderr.isatty() and os.environ.get("LOCAL_RANK", "0") == "0"
    with locked(folder / CACHE_LOCK_FILE, elsewhere="set $TINYIN_CACHE to a folder on another file system"):
        _mark(folder, remote)
        _write_metadata(remote, folder)
        _Fetch(remote, folder, workers, progress).run(entries)
    return folder


def _complete_copy(folder, splits):
    """`folder` when it holds a copy of `splits` as `_Fetch` leaves a complete one (the manifest, the index and
    every shard of its size; the loader's data pass checks their sha256), else None."""
    if not (folder / MANIFEST_FILE).is_file():
        return None
    try:
        with locked(folder / CACHE_LOCK_FILE,  # not while another process fills it
                    elsewhere="set $TINYIN_CACHE to a folder on another file system"):
            copy = ShardSet(folder)
            entries = [e for split in splits for e in copy.entries(split)]
            complete = all(_fetched(folder, e) for e in entries)
    except (ShardError, OSError):  # not a set, or a split it lacks
        return None
    return folder if complete else None


def _fetched(folder, entry):
    """Whether `folder` holds shard `entry` as a fetch leaves it: renamed into place at its full size (a
    transfer is checked before its rename; the loader's data pass checks its sha256)."""
    path = folder / entry["file"]
    return path.is_file() and path.stat().st_size == entry["bytes"]


def _mark(folder, remote):
    """Mark `folder` as the cache's copy of `remote` (`ShardSet.is_cached_copy`: a damaged shard there is
    removed, to be fetched again), naming the folder itself, where it is."""
    mark = {"folder": os.path.realpath(folder), "url": hide_password(remote.location)}
    with contextlib.suppress(FileNotFoundError, ValueError):
        if json.loads((folder / CACHE_MARK_FILE).read_text()) == mark:
            return
    try:
        write_json(folder / CACHE_MARK_FILE, mark)
    except OSError as e:  # a copy made beforehand on a read-only mount, read as it is: nothing there is removed
        if e.errno not in READ_ONLY_ERRNOS:
            raise


def _write_metadata(remote, folder):
    """Write the manifest and index of `remote` into `folder`, dropping copies a new manifest disowns. An index
    changed or removed under the same manifest (a disk's error, a clean-up by hand) is written again: every
    open of the copy failed on it till the folder was deleted by hand."""
    path = folder / MANIFEST_FILE
    try:
        old = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        old = None
    # The copy's own manifest, as written before: its shards are what it may remove. One damaged or hand-edited
    # (no object, an entry without sha256) was a traceback here; one written by a tinyin before ShardSet refused
    # '../x' names a file outside the copy: neither is taken, and only the new manifest's files are replaced.
    old_shards = old.get("shards") if isinstance(old, dict) else None
    if not (isinstance(old_shards, list) and all(isinstance(e, dict) and is_file_name(e.get("file"))
                                                 and isinstance(e.get("sha256"), str) for e in old_shards)):
        old_shards = []
    if old == remote.manifest:
        with contextlib.suppress(OSError):
            if (folder / INDEX_FILE).read_bytes() == remote.index_bytes:
                return
    else:
        # Copies the old and the new manifest agree on stay; any other file (or one of unknown origin) goes.
        pairs = lambda shards: {(e["file"], e["sha256"]) for e in shards}  # noqa: E731
        keep = pairs(old_shards) & pairs(remote.manifest["shards"])
        for entry in old_shards + remote.manifest["shards"]:
            if (entry["file"], entry["sha256"]) not in keep:
                (folder / entry["file"]).unlink(missing_ok=True)
                (folder / f"{entry['file']}.part").unlink(missing_ok=True)
    with atomic_file(folder / INDEX_FILE, "wb") as f:
        f.write(remote.index_bytes)  # the bytes as served: the manifest's index_sha256 holds for them
    write_json(path, remote.manifest)  # last: a folder with a manifest has its index


class _Fetch:
    """The shards of one `cached_copy` call, fetched by a thread pool into `folder`."""

    def __init__(self, remote, folder, workers, progress):
        self.remote, self.folder, self.workers, self.progress = remote, folder, workers, progress
        self.stop = _Stop()  # set on the first failure: the other transfers give up
        self.bar = None

    def run(self, entries):
        todo = [e for e in entries if not _fetched(self.folder, e)]
        if not todo:
            return
        from tqdm import tqdm

        done = sum(self._part_size(e) for e in todo)
        self.bar = tqdm(total=sum(e["bytes"] for e in todo), initial=done, unit="B", unit_scale=True,
                        desc=f"fetch {hide_password(self.remote.location)}", disable=not self.progress)
        try:
            with concurrent.futures.ThreadPoolExecutor(min(self.workers, len(todo))) as pool:
                try:  # a signal while the transfers are handed out stops those begun too (they waited for good)
                    futures = [pool.submit(self._fetch_shard, e) for e in todo]
                    pending = set(futures)
                    while pending:
                        # Awake now and then: the kernel may give SIGTERM to a transfer's thread, and Python runs
                        # its handler only once the main thread runs code; a wait without a timeout slept until a
                        # shard came (a hung server's: for good).
                        finished, pending = concurrent.futures.wait(pending, timeout=0.5,
                                                                    return_when=concurrent.futures.FIRST_COMPLETED)
                        # In the shards' order: of two failed by the time this thread looks (a loaded machine's),
                        # the set's order named either, not the first (one thread: the one that failed first).
                        for future in (f for f in futures if f in finished):
                            future.result()
                except BaseException:
                    self.stop.set()
                    raise
        finally:
            self.bar.close()

    def _part_size(self, entry):
        part = self.folder / f"{entry['file']}.part"
        return min(part.stat().st_size, entry["bytes"]) if part.is_file() else 0

    def _fetch_shard(self, entry):
        """Fetch one shard into `<file>.part` (resuming what is there), verify it, rename it into place."""
        url, part, size = self.remote.where(entry), self.folder / f"{entry['file']}.part", entry["bytes"]
        # Attempts per shard as the stream path's (`retry_waits`): a cut connection resumes, a bad checksum
        # starts over. Waits end at once on a stop (a failure elsewhere, Ctrl-C, SIGTERM).
        waits, error, wait = retry_waits(), None, 0
        for attempt in range(len(waits) + 1):
            if self.stop.wait(wait):
                return
            wait = waits[attempt] if attempt < len(waits) else 0  # before the next; none after a server's whole answer
            start = part.stat().st_size if part.is_file() else 0
            if start > size:
                part.unlink()
                start = 0
            try:
                if start < size:  # a full .part (a crash before the rename) only needs its check
                    receive = _http_receive if url.split("://")[0] in ("http", "https") else self._fsspec_receive
                    receive(url, part, start, size, self._progress, self.stop)
            except FileNotFoundError:
                if part.is_file() and not part.stat().st_size:
                    part.unlink()
                raise missing_error(url) from None
            except _Restart as e:
                part.unlink(missing_ok=True)
                error, wait = e, 0
                continue
            except Exception as e:  # noqa: BLE001 - fsspec backends raise their own families
                if (isinstance(e, OSError) and e.errno in READ_ONLY_ERRNOS
                        and str(e.filename).startswith(str(part.parent))):
                    # The cache's own file (a folder another user filled, a read-only mount): no retry
                    # mends it, and it is no fault of the URL's (it was tried 5 times, then named that). A store's
                    # own refusal (s3fs's PermissionError for AccessDenied) is not the cache's.
                    raise ShardError(f"{e.filename}: cannot write ({e.strerror}); the cache folder is another "
                                     "user's or read-only: set $TINYIN_CACHE to a folder of your own") from None
                if isinstance(e, OSError) and e.errno in FULL_DISK_ERRNOS:
                    # This machine's disk, not the server: no wait frees it (5 attempts took 8 s), and the user
                    # must know which disk to clean (the error named the shard's URL).
                    raise OSError(e.errno, e.strerror, str(part)) from None
                if not worth_retrying(e):
                    raise ShardError(f"{url}: cannot fetch ({e.__class__.__name__}: {e})") from None
                error = e  # a cut connection or a refused request: resume from what arrived
                continue
            if self.stop.is_set():
                return
            try:
                self.remote.check_size(entry, part.stat().st_size, url)
                with open(part, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
                    self.remote.check_bytes(entry, mapped, url)
            except ShardError as e:
                error = e
                if part.stat().st_size >= size:
                    part.unlink()  # a full-length body with the wrong bytes: start over, never resume it
                    wait = 0
                continue
            os.replace(part, self.folder / entry["file"])
            return
        if isinstance(error, ShardError):
            raise error
        raise ShardError(f"{url}: cannot fetch ({_describe(error)}, after {len(waits) + 1} attempts)")

    def _progress(self, n):
        self.bar.update(n)

    def _fsspec_receive(self, url, part, start, size, progress, stop):
        """Append bytes `start..size` of `url` to `part` through the set's fsspec filesystem, a ranged
        read per block."""
        with self.remote.fs.open(url, "rb", block_size=FSSPEC_BLOCK, cache_type="none") as src, \
                open(part, "ab" if start else "wb") as f:
            src.seek(start)
            while start < size and not stop.is_set():
                block = src.read(min(FSSPEC_BLOCK, size - start))
                if not block:
                    return  # the body ended early: the size check names it
                f.write(block)
                start += len(block)
                progress(len(block))


class _Stop(threading.Event):
    """The stop of one fill's transfers (`_Fetch.stop`). Setting it also shuts the connections they read
    (`reading`): a transfer blocked on a server gone quiet saw the stop only at its socket's timeout (60 s), and the
    process, which waits for its threads, stopped that much later on a Ctrl-C or SIGTERM (a scheduler's grace
    before its SIGKILL may be shorter: the .part, at its full length while it is written, was then fetched again)."""

    def __init__(self):
        super().__init__()
        self._guard, self._reading = threading.Lock(), set()

    @contextlib.contextmanager
    def reading(self, response):
        """While the block runs, `set` shuts the connection `response` is read from (at once if set already)."""
        try:  # a duplicate of its socket's descriptor, open while the block runs: no other file takes its number
            fd = os.dup(response.fileno())
        except (OSError, ValueError, AttributeError):  # no socket to shut: the transfer sees the stop between reads
            fd = None
        try:
            sock = None if fd is None else socket.socket(fileno=fd)
        except OSError:  # not a socket
            os.close(fd)
            sock = None
        if sock is None:
            yield
            return
        with sock:
            with self._guard:
                self._reading.add(sock)
                if self.is_set():
                    _shut(sock)
            try:
                yield
            finally:
                with self._guard:
                    self._reading.discard(sock)

    def set(self):
        super().set()
        with self._guard:
            for sock in self._reading:
                _shut(sock)


def _shut(sock):
    """Shut connection `sock` both ways: a read blocked on it, through any descriptor, returns at once."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _http_receive(url, part, start, size, progress, stop):
    """Write bytes `start..size` of `url` into `part` (which holds the first `start`). The socket is
    read straight into a memory map of the preallocated file: no copy through a buffer and no write()
    per block, which measured 0.8-3.2 CPU s/GB here against 0.9 with the map. While it runs the file
    has its full length; it is cut back to what arrived when the transfer ends, however
    it ends (a process killed meanwhile leaves a full-length .part that fails its checksum and is fetched
    again). FileNotFoundError on a 404, OSError on another HTTP error, ConnectionError where the body ends before
    its Content-Length, _Restart if the range is ignored."""
    try:
        response = http_open(url, {"Range": f"bytes={start}-"} if start else {}, timeout=TIMEOUT_S)
    except urllib.error.URLError as e:  # no connection: the socket's own error (retried)
        raise e.reason if isinstance(e.reason, OSError) else OSError(str(e.reason)) from None
    with response:
        if response.status not in (200, 206):
            raise OSError(f"HTTP {response.status} {response.reason}")
        if start and response.status != 206:
            raise _Restart("the server ignored the range request")
        reading = stop.reading(response) if isinstance(stop, _Stop) else contextlib.nullcontext()
        with open(part, "r+b" if start else "w+b") as f, reading:
            at = start
            try:
                os.posix_fallocate(f.fileno(), 0, size)
                with mmap.mmap(f.fileno(), size) as mapping, memoryview(mapping) as view:
                    while at < size and not stop.is_set():
                        try:
                            n = response.readinto(view[at:min(at + BLOCK, size)])
                        except Exception as e:  # a timeout, a reset: retried as a cut connection (`worth_retrying`)
                            # Without the frames that raised it, which hold the slice of the map read into: the
                            # map's close found it exported ('BufferError: cannot close exported pointers exist'),
                            # and that error, never tried again, stood for the timeout.
                            raise e.with_traceback(None)
                        if not n and response.length:  # before its Content-Length: a cut connection, resumed
                            raise ConnectionError(f"the connection closed at byte {at:,} of {size:,}")
                        if not n:
                            return  # a whole body, shorter than the manifest's size: the size check names it
                        at += n
                        progress(n)
            finally:
                f.truncate(at)


class _Restart(Exception):
    """The transfer cannot continue where the .part ends; the next attempt starts over."""


def _describe(error):
    text = str(error) or error.__class__.__name__
    return text.splitlines()[0] if text else "unknown error"
