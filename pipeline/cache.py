"""`cached_copy`: a remote shard set's splits fetched into a local folder, so a URL reads like a folder.

The manifest and index are written first (from the one `ShardSet` open), then each shard of the
asked splits is fetched to `<file>.part`, hashed while it arrives, checked against the manifest
(`ShardSet.check_*`, the one wording) and renamed into place. So a file under its own name is
always a verified copy: a second open fetches nothing, and a broken-off `.part` resumes with a
range request. One process per cache folder fetches at a time (an `flock` on `.lock`): the ranks
of a node, or any processes sharing the folder, download each shard once and the others wait.

HTTP(S) shards are read with `http.client` straight into a reused buffer: fsspec's HTTP file
(aiohttp behind an event-loop thread) measured 0.1-0.2 GB/s on loopback where curl gets 1.3-2 GB/s.
Other URLs (`s3://`, `gs://`, ...) go through the set's fsspec filesystem in large blocks.
"""
import concurrent.futures
import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import sys
import threading
import urllib.parse
from pathlib import Path

from .errors import ShardError
from .index import write_json
from .schema import INDEX_FILE, MANIFEST_FILE
from .shardset import ShardSet, is_url, missing_error, open_shard_set

BLOCK = 4 << 20  # bytes per read; large enough that hashing and writing a block cost far more than a call
RETRIES = 3  # attempts per shard: a cut connection resumes, a bad checksum starts over
TIMEOUT_S = 60
WORKERS = 4  # shards fetched at once


def is_set_url(shards):
    """True for a remote shard-set location (a URL of a folder holding manifest.json), as opposed to a
    local folder, a ShardSet of a folder, or the stream path's shard URLs and brace patterns."""
    if isinstance(shards, ShardSet):
        return not shards.is_local
    text = str(shards)
    return isinstance(shards, (str, Path)) and is_url(text) and "{" not in text and not text.endswith(".tar")


def cache_folder(location, cache_dir=None):
    """Where the copy of the set at `location` lives: `<root>/<16 hex digits of the URL's sha256>`,
    root being `cache_dir`, else $TINYIN_CACHE, else ~/.cache/tinyin."""
    root = cache_dir or os.environ.get("TINYIN_CACHE") or Path.home() / ".cache" / "tinyin"
    return Path(root) / hashlib.sha256(str(location).rstrip("/").encode()).hexdigest()[:16]


def cached_copy(shards, splits, cache_dir=None, workers=WORKERS, progress=None, storage_options=None):
    """A local folder holding the manifest, index and verified shards of `splits` of remote set `shards`.

    shards: a URL (http(s)://, s3://, gs://, any fsspec URL) or a remote ShardSet; splits: names.
    Shards already in the cache are not fetched again; a set rebuilt under the same URL (another
    manifest) replaces the copies whose checksum changed. progress: a bar on stderr (default: on a
    terminal, in the process with LOCAL_RANK 0). Raises ShardError naming the URL of a shard that is
    missing, short, corrupt or unreachable after retries; no file is left looking complete.
    """
    remote = open_shard_set(shards, storage_options)
    entries = [e for split in ([splits] if isinstance(splits, str) else splits) for e in remote.entries(split)]
    folder = cache_folder(remote.location, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = sys.stderr.isatty() and os.environ.get("LOCAL_RANK", "0") == "0"
    with _locked(folder / ".lock"):
        _write_metadata(remote, folder)
        _Fetch(remote, folder, workers, progress).run(entries)
    return folder


@contextlib.contextmanager
def _locked(path):
    """Hold an exclusive flock on `path`: the other processes of the node wait here."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_metadata(remote, folder):
    """Write the manifest and index of `remote` into `folder`, dropping copies a new manifest disowns."""
    import pyarrow.parquet as pq

    path = folder / MANIFEST_FILE
    try:
        old = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        old = None
    if old == remote.manifest:
        return
    # Copies the old and the new manifest agree on stay; any other file (or one of unknown origin) goes.
    pairs = lambda m: {(e["file"], e["sha256"]) for e in m["shards"]}  # noqa: E731
    keep = pairs(old) & pairs(remote.manifest) if old and "shards" in old else set()
    for entry in (old or {}).get("shards", []) + remote.manifest["shards"]:
        if (entry["file"], entry["sha256"]) not in keep:
            (folder / entry["file"]).unlink(missing_ok=True)
            (folder / f"{entry['file']}.part").unlink(missing_ok=True)
    tmp = folder / f"{INDEX_FILE}.part"
    pq.write_table(remote.index, tmp)
    os.replace(tmp, folder / INDEX_FILE)
    write_json(path, remote.manifest)  # last: a folder with a manifest has its index


class _Fetch:
    """The shards of one `cached_copy` call, fetched by a thread pool into `folder`."""

    def __init__(self, remote, folder, workers, progress):
        self.remote, self.folder, self.workers, self.progress = remote, folder, workers, progress
        self.stop = threading.Event()  # set on the first failure: the other transfers give up
        self.bar = None

    def run(self, entries):
        todo = [e for e in entries if not self._complete(e)]
        if not todo:
            return
        from tqdm import tqdm

        done = sum(self._part_size(e) for e in todo)
        self.bar = tqdm(total=sum(e["bytes"] for e in todo), initial=done, unit="B", unit_scale=True,
                        desc=f"fetch {self.remote.location}", disable=not self.progress)
        try:
            with concurrent.futures.ThreadPoolExecutor(min(self.workers, len(todo))) as pool:
                futures = [pool.submit(self._fetch_shard, e) for e in todo]
                try:
                    for future in concurrent.futures.as_completed(futures):
                        future.result()
                except BaseException:
                    self.stop.set()
                    raise
        finally:
            self.bar.close()

    def _complete(self, entry):
        path = self.folder / entry["file"]
        return path.is_file() and path.stat().st_size == entry["bytes"]

    def _part_size(self, entry):
        part = self.folder / f"{entry['file']}.part"
        return min(part.stat().st_size, entry["bytes"]) if part.is_file() else 0

    def _fetch_shard(self, entry):
        """Fetch one shard into `<file>.part` (resuming what is there), verify it, rename it into place."""
        url, part = self.remote.where(entry), self.folder / f"{entry['file']}.part"
        error = None
        for _ in range(RETRIES):
            if self.stop.is_set():
                return
            digest = hashlib.sha256()
            start = part.stat().st_size if part.is_file() else 0
            if start > entry["bytes"]:
                part.unlink()
                start = 0
            with open(part, "ab" if start else "wb") as f:
                if start:  # the kept bytes count towards the checksum
                    with open(part, "rb") as kept:
                        for block in iter(lambda: kept.read(BLOCK), b""):
                            digest.update(block)
                try:
                    if start < entry["bytes"]:  # a full .part (a crash before the rename) only needs its check
                        self._receive(url, entry, start, f, digest)
                except FileNotFoundError:
                    if not part.stat().st_size:
                        part.unlink()
                    raise missing_error(url) from None
                except _Restart as e:
                    part.unlink()
                    error = e
                    continue
                except (OSError, http.client.HTTPException) as e:
                    error = e  # a cut connection or a refused request: resume from what arrived
                    continue
                except Exception as e:  # noqa: BLE001 - fsspec backends raise their own families
                    if not _transient(e):
                        raise ShardError(f"{url}: cannot fetch ({e.__class__.__name__}: {e})") from None
                    error = e
                    continue
            try:
                self.remote.check_size(entry, part.stat().st_size, url)
                self.remote.check_sha256(entry, digest.hexdigest(), url)
            except ShardError as e:
                error = e
                if part.stat().st_size >= entry["bytes"]:
                    part.unlink()  # a full-length body with the wrong bytes: start over, never resume it
                continue
            os.replace(part, self.folder / entry["file"])
            return
        if isinstance(error, ShardError):
            raise error
        raise ShardError(f"{url}: cannot fetch ({_describe(error)}, after {RETRIES} attempts)")

    def _receive(self, url, entry, start, f, digest):
        """Append bytes `start..` of the shard at `url` to `f`, hashing them as they arrive."""
        blocks = _http_blocks(url, start, entry["bytes"]) if url.split("://")[0] in ("http", "https") \
            else _fsspec_blocks(self.remote.fs, url, start, entry["bytes"])
        with contextlib.closing(blocks):
            if next(blocks) != start:  # the server ignored the range: it sends the whole file
                raise _Restart("the server ignored the range request")
            for block in blocks:
                if self.stop.is_set():
                    return
                digest.update(block)  # releases the GIL: other threads receive meanwhile
                f.write(block)
                self.bar.update(len(block))


class _Restart(Exception):
    """The transfer cannot continue where the .part ends; the next attempt starts over."""


def _transient(error):
    """Whether an fsspec backend's exception is worth a retry (connection trouble, a timeout)."""
    name = type(error).__name__.lower()
    return any(word in name for word in ("connect", "timeout", "payload", "incomplete", "disconnect", "reset"))


def _describe(error):
    text = str(error) or error.__class__.__name__
    return text.splitlines()[0] if text else "unknown error"


def _http_blocks(url, start, size):
    """Yield the offset served from, then memoryviews of bytes `start..size` of `url` (each valid until the
    next is requested). FileNotFoundError on a 404; OSError on any other HTTP error."""
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.netloc, timeout=TIMEOUT_S)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""),
                     headers={"Range": f"bytes={start}-"} if start else {})
        response = conn.getresponse()
        if response.status == 404:
            raise FileNotFoundError(url)
        if response.status not in (200, 206):
            raise OSError(f"HTTP {response.status} {response.reason}")
        yield start if response.status == 206 else 0
        buffer = memoryview(bytearray(BLOCK))
        left = size - start
        while left > 0:
            n = response.readinto(buffer[:min(BLOCK, left)])
            if not n:
                return  # the body ended early: the size check names it
            left -= n
            yield buffer[:n]
    finally:
        conn.close()


def _fsspec_blocks(fs, url, start, size):
    """The same as `_http_blocks` through an fsspec filesystem (S3, GCS, ...), a ranged read per block."""
    with fs.open(url, "rb", block_size=BLOCK * 4, cache_type="none") as f:
        f.seek(start)
        yield start
        left = size - start
        while left > 0:
            block = f.read(min(BLOCK * 4, left))
            if not block:
                return
            left -= len(block)
            yield block
