"""One shard of the stream path read whole and checked, over any storage, and the buffers it is read into.

`read_checked` reads a shard in one sequential transfer (`read_whole`: urllib `readinto` for plain
`http(s)://`, fsspec for `s3://`, `gs://` and other URLs, a plain read for paths, webdataset's
`gopen` for `pipe:` commands) and checks it: against the manifest (size, then `sum64`) for a shard
set, against its own fixed-stride layout (`read_layout`) for a URL list. A failed read is tried
again (`shardset.retry_waits`: 5 reads over about 8 s), then named in a ShardError; a missing file or
a client's own error (`shardset.worth_retrying`: a 401, a bad URL) is named at once. `load_group`
reads the shards of one group of the epoch plan and views their images in place.

Read buffers are reused: a group's go back to this process once it is sliced (`recycle_buffers`),
and a DataLoader worker starts with its slots of buffers its source keeps for every epoch
(`shared_read_buffers`, `adopt_read_buffers`).
"""
import contextlib
import http.client
import mmap
import tarfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import ShardError, plural
from .reader import _strided_view
from .schema import CLS, MEMBERS, VARIANTS
from .shardset import http_open, is_url, missing_error, retry_waits, unknown_host, worth_retrying
from .tarshard import BLOCK, NPY_HEADERS

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux's value; Python 3.11's mmap does not name it


class Shard(NamedTuple):
    """What a worker needs to read and slice one shard."""

    url: str  # path, fsspec URL or `pipe:` command
    count: int
    entry: dict = None  # the manifest entry (bytes, checksums) of a shard set; None for a URL list
    offsets: np.ndarray = None  # the variant's byte offsets from the index; None: read the layout
    labels: np.ndarray = None
    keys: list = None


def read_checked(shard, variant, shard_set=None, storage_options=None, retries=None, backoff=None, stop=None):
    """`(data, offsets, labels, keys)` of `shard`, read whole and checked: against the manifest
    (size, then sum64, by `shard_set.check_bytes`) or, for a URL list, against its own layout.
    A failed read worth it (`shardset.worth_retrying`) is tried again, `retries` reads in all, waiting `backoff` s and then twice as long
    each time (`shardset.retry_waits`; a body that arrived whole but wrong is read again at once);
    then the last failure is a ShardError, saying how many reads were tried where none came whole (a transfer that
    broke off each time). `stop` (an Event), when set, ends a wait at once."""
    waits = retry_waits(retries, backoff)
    for attempt in range(len(waits) + 1):
        data = None
        try:
            data = read_whole(shard.url, storage_options)
            if shard.entry is None:
                return (data, *read_layout(data, shard, variant))
            shard_set.check_bytes(shard.entry, data, shard.url)
            return data, shard.offsets, shard.labels, shard.keys
        except FileNotFoundError:  # asking again will not make it appear
            # A URL list has no manifest: 'missing (listed in the manifest)' sent its user looking for one.
            missing = missing_error(shard.url) if shard.entry is not None else ShardError(f"{shard.url}: not found")
            raise missing from None
        except ShardError as e:  # broken off, short or corrupt: a transfer can go wrong, read it again
            error, why = e, None
        except Exception as e:  # a connection cut mid-transfer, a failing command, ...
            why = unknown_host(e, shard.url) or describe_error(e)
            error = ShardError(f"{shard.url}: unreadable shard ({why})")
            if not worth_retrying(e):  # a client's own error (a 401, a bad URL): asking again changes nothing
                raise error from None
        # The server answered in full: it is up, so the next read need not wait for it.
        whole = data is not None and (shard.entry is None or len(data) == shard.entry["bytes"])
        if attempt < len(waits) and not whole:
            if stop is None:
                time.sleep(waits[attempt])
            elif stop.wait(waits[attempt]):
                break
    if data is None and attempt:  # no transfer came whole: how many were tried, as fetch's and the cache's last word says
        after = f"after {attempt + 1} attempts"
        raise ShardError(f"{shard.url}: unreadable shard ({why}, {after})" if why else f"{error} ({after})")
    raise error


def describe_error(error):
    """A short description of a read error for a one-line message."""
    why = error.strerror if isinstance(error, OSError) and error.strerror else (str(error) or "")
    return f"{type(error).__name__}: {why}" if why else type(error).__name__


def read_whole(url, storage_options=None):
    """A shard's bytes in one sequential read. FileNotFoundError when it is not there."""
    if url.startswith("pipe:"):
        # webdataset only here and for brace patterns: training from a shard folder needs neither,
        # and the lent GPU machine's image has no webdataset.
        import webdataset as wds

        with wds.gopen(url, "rb") as stream:  # closing checks the command's exit status
            return stream.read()
    if url.startswith(("http://", "https://")) and not storage_options:
        return _read_http(url)
    if is_url(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        return fs.cat_file(path)
    return Path(url).read_bytes()


def _read_http(url):
    """GET `url` into one buffer of its Content-Length. Why not fsspec here: its aiohttp client
    measured 450-570 MB/s on loopback at twice the CPU, urllib's `readinto` 800 MB/s, as fast as
    curl; on 2 cores that CPU is what the gather and the server need."""
    with http_open(url) as response:
        size = response.length
        if size is None:  # no Content-Length (chunked): the size check catches a short body
            return response.read()
        view, got = _buffer(size), 0
        try:
            while got < size:
                n = response.readinto(view[got:])
                if not n:
                    break
                got += n
        except http.client.IncompleteRead:
            pass
        if got < size:
            _SPARE.append(view.obj)
            raise ShardError(f"{url}: transfer broke off after {got:,} of {size:,} bytes")
    return view


def read_layout(data, shard, variant):
    """Offsets of `variant`, labels and keys of a shard held in memory, without an index.

    The first sample's four tar headers give the stride; the shard must be exactly `count`
    samples of it plus the end-of-archive blocks, and every sample must carry the same member
    names and `.npy` header at the same places.
    """
    url, count = shard.url, shard.count
    at, members = 0, []
    try:
        for _ in MEMBERS:
            info = tarfile.TarInfo.frombuf(bytes(data[at:at + BLOCK]), "ascii", "surrogateescape")
            members.append((info.name, at + BLOCK, info.size))
            at += BLOCK + -(-info.size // BLOCK) * BLOCK
    except tarfile.TarError as e:
        raise ShardError(f"{url}: not a tinyin shard ({e})") from None
    stride, expected = at, count * at + 2 * BLOCK
    if len(data) != expected:
        raise ShardError(f"{url}: {len(data):,} {plural(len(data), 'byte')}, {count} "
                         f"{plural(count, 'sample')} take {expected:,} (truncated or not this shard)")
    rows = np.frombuffer(data, np.uint8, count * stride).reshape(count, stride)
    member, shape = VARIANTS[variant]
    found = {name.split(".", 1)[-1]: (pos, size) for name, pos, size in members}
    if set(found) != set(MEMBERS):
        raise ShardError(f"{url}: not a tinyin shard (members {sorted(found)})")
    header, (pos, _) = np.frombuffer(NPY_HEADERS[member], np.uint8), found[member]
    names = [bytes(r).rstrip(b"\0").decode("ascii", "replace") for r in rows[:, :100]]
    keys = [n.split(".", 1)[0] for n in names]
    if (not np.array_equal(rows[:, pos:pos + len(header)], np.broadcast_to(header, (count, len(header))))
            or any(n != f"{k}.{MEMBERS[0]}" for n, k in zip(names, keys))):
        raise ShardError(f"{url}: samples are not evenly spaced (not written by tinyin shard build)")
    cls_at = found[CLS][0]
    try:
        labels = np.array([int(bytes(r).rstrip(b"\0")) for r in rows[:, cls_at:cls_at + 16]], np.int64)
    except ValueError:
        raise ShardError(f"{url}: a sample's {CLS} is not a number") from None
    return np.arange(count, dtype=np.int64) * stride + pos + len(header), labels, keys


class Group(NamedTuple):
    """The shards of one group in memory, in split order: each shard's images as a strided numpy
    (n, bytes per image) view of its raw bytes (no copy), with labels, keys and first split position."""

    views: list
    labels: list
    keys: list
    first_ids: np.ndarray
    data: list  # the raw shard buffers under `views`


def load_group(shards, first_ids, variant, shard_set=None, storage_options=None, stop=None):
    """Read and check the shards of one group and view their images in place (`stop`: see `read_checked`)."""
    size = int(np.prod(VARIANTS[variant][1]))
    views, labels, keys, raw = [], [], [], []
    for shard in shards:
        data, offsets, shard_labels, shard_keys = read_checked(shard, variant, shard_set, storage_options, stop=stop)
        views.append(_strided_view(np.frombuffer(data, np.uint8), offsets, size, shard.url))
        labels.append(np.asarray(shard_labels, np.int64))
        keys.append(shard_keys)
        raw.append(data)
    return Group(views, labels, keys, np.asarray(first_ids, np.int64), raw)


# --- read buffers, reused -----------------------------------------------------------------------
# Read buffers of groups already sliced, reused for the next shards of this process: a fresh
# 169 MB buffer costs its pages' faults and zeroing (the larger part of a worker's system time).
# A worker also starts with its slots of the source's pool (`shared_read_buffers`), so its epochs reuse them.
_SPARE = []
_SPARE_LOCK = threading.Lock()  # epochs read in two threads of one process (two in-process loaders) share it


def _buffer(size):
    """A writable memoryview of `size` bytes over a spare read buffer if one is large enough."""
    with _SPARE_LOCK:
        for i, spare in enumerate(_SPARE):
            if len(spare) >= size:
                return memoryview(_SPARE.pop(i))[:size]
    return memoryview(bytearray(size))


def recycle_buffers(group):
    """Give a sliced group's read buffers back for reuse (only those `_buffer` handed out)."""
    with _SPARE_LOCK:
        _SPARE.extend(d.obj for d in group.data
                      if isinstance(d, memoryview) and isinstance(d.obj, (bytearray, mmap.mmap)))


def shared_read_buffers(shards, workers, lanes, mix):
    """Per worker, read buffers in memory shared with this process (anonymous MAP_SHARED maps,
    inherited by the forked workers), as many as a worker holds at once: its lanes' groups in use
    and the next one read, of `mix` shards each. Workers start fresh every epoch; fresh buffers
    made the kernel fault in and zero every byte read again, 2-2.5 CPU-s/GB on this VM, where
    the pool's pages, touched in the first epoch, stay resident (for the life of the source).
    None for a URL list (shard sizes unknown) or no workers (the process keeps its `_SPARE`)."""
    if not workers or any(s.entry is None for s in shards):
        return None
    size = max(s.entry["bytes"] for s in shards)
    slots = (-(-lanes // workers) + 1) * mix
    return [[mmap.mmap(-1, size) for _ in range(slots)] for _ in range(workers)]


def adopt_read_buffers(buffers):
    """Put a worker's slots of `shared_read_buffers` first in line for its reads."""
    for buffer in buffers:
        # Map all its pages in one call: a new worker would otherwise fault on each 4 KiB page
        # of the (already resident) pool as it reads, 0.6-0.7 of its CPU-s per epoch here.
        with contextlib.suppress(OSError):  # kernels before 5.14 do not know the advice
            buffer.madvise(MADV_POPULATE_WRITE)
    _SPARE[:0] = buffers
