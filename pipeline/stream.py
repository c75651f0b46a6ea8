"""`StreamSource`: one split read shard by shard, each shard whole, for sets that are remote or
larger than local disk.

Each DataLoader worker reads a shard in one sequential transfer (urllib `readinto` for plain
`http(s)://`, fsspec for `s3://`, `gs://` and other URLs, a plain read for paths, webdataset's
`gopen` for `pipe:` commands), checks it, and slices its samples out of memory: every sample of
a tinyin shard occupies the same number of bytes (see `tarshard`), so a shard's images are one
strided array and a batch is one fancy-index gather into a reused shared-memory buffer (one
transfer per batch). No tar member is parsed in Python; the shards stay standard tars that
stock `webdataset` reads.

The epoch plan (`stream_plan.plan_epoch`) is a pure function of the per-shard counts and (seed,
epoch, rank, world_size, batch_size): which shards a rank reads, how their samples are mixed, and
how they are cut into batches. Workers only carry it out, so the batches are the same with 0, 1 or 2
workers, and `set_epoch(epoch, start)` resumes mid-epoch with exactly the batches the
uninterrupted run would have yielded from there (on the same number of ranks).

Two inputs:
- a shard set (folder or URL, opened once as a `ShardSet`): counts, offsets, labels and keys
  from the manifest and index; each shard checked for size, then `sum64` (`ShardSet.check_bytes`;
  sha256 for a set built before sum64) before it is used.
- a list of shard URLs (typically `pipe:` commands) with `sample_counts`: there is no index, so a
  shard's layout is read from its own first sample and checked at every stride (the fixed stride
  makes a shard self-describing); its size must be exactly what its count implies. Why not
  demand the manifest: a `pipe:` list is for shards reached only through a command (`aws s3 cp`,
  `gsutil cat`), where the manifest may not be reachable the same way. There is no checksum to
  compare against: pass the set's location instead of a URL list to get one.

Three modules beside this one: `stream_plan` (the epoch plan), `stream_read` (one shard read
whole and checked, and the read buffers reused), `stream_workers` (how the worker processes start
and stop: fork, signals). Here: the workers' part of the plan (`_Lanes`), their shared-memory
batch buffers (`_ring_buffers`) and the source itself.
"""
import multiprocessing
import numbers
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import ShardError, UsageError, plural
from .schema import VARIANTS, check_variant
from .shardset import ShardSet, is_url, local_path, missing_error, names_a_tar, open_shard_set
from .stream_plan import LANES, MIX, plan_epoch
from .stream_read import (Shard, adopt_read_buffers, describe_error, load_group, recycle_buffers,
                          shared_read_buffers)
from .stream_workers import FORK, ignore_sigterm_but_the_parents, shut_down, starting_workers

RING = 4  # shared-memory batch buffers a worker reuses (DataLoader holds 2 in flight per worker)


# --- workers ------------------------------------------------------------------------------------
def _as_is(item):
    """collate_fn: an item as the worker made it (the default would copy labels into new shared memory)."""
    return item


class _Failure:
    """What a worker sends instead of raising: DataLoader would re-wrap the error and bury the URL."""

    def __init__(self, message):
        self.message = message


def _gather(group, ids, out):
    """Gather one chunk (sorted split positions) into `out` (n, bytes per image); returns its labels
    (int64 array) and keys. One fancy-index gather per shard, from the shard's bytes into `out`
    (numpy, not `torch.index_select`: on these strided views torch measured 8-10 ms a batch of 256
    with 2 threads, numpy 0.2-0.6 ms)."""
    flat, labels, keys = out.numpy(), np.empty(len(ids), np.int64), []
    cuts = np.searchsorted(ids, group.first_ids).tolist() + [len(ids)]
    for s, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
        if lo < hi:
            local = ids[lo:hi] - group.first_ids[s]
            flat[lo:hi] = group.views[s][local]
            labels[lo:hi] = group.labels[s][local]
            keys += [group.keys[s][i] for i in local]
    return labels, keys


def _ring_buffers(workers, rows, row_bytes, slots=RING):
    """Per worker, `slots` (rows, row_bytes) batch buffers in shared memory, made by the main
    process before the workers start: a worker fills a slot and sends only its number, and the
    main process views its own copy. A fresh shared tensor costs 2.5-5 ms per 3 MB batch (new
    tmpfs pages, each faulted and zeroed), and sending one costs a connection and an fd per
    batch, against 0.2 ms for the gather itself."""
    return [[torch.empty((rows, row_bytes), dtype=torch.uint8).share_memory_() for _ in range(slots)]
            for _ in range(workers)]


class _Ring:
    """A worker's slots of `_ring_buffers`. The main process hands a slot back (`free`) once the
    batch that holds it has been replaced by the next; the worker never waits for one: with none
    free it takes a fresh buffer (sent as a tensor), so no ordering of the two processes can deadlock."""

    def __init__(self, free, buffers):
        self.free, self.buffers, self.idle = free, buffers, list(range(len(buffers)))

    def take(self, n):
        """(slot or None, an (n, row_bytes) uint8 tensor in shared memory)."""
        while not self.free.empty():
            self.idle.append(self.free.get())
        rows, row_bytes = self.buffers[0].shape
        if n <= rows and self.idle:
            slot = self.idle.pop()
            return slot, self.buffers[slot][:n]
        return None, torch.empty((n, row_bytes), dtype=torch.uint8).share_memory_()


class _Lanes(IterableDataset):
    """Carries out an EpochPlan: worker w gathers the chunks of lanes w, w + workers, ... in
    order, reading each group's shards in a background thread one group ahead. Items are
    (seq, worker, slot, images, labels, keys): images None when they are in ring slot `slot` of
    `rings[worker]` (`_ring_buffers`), labels an int64 array; `free[w]` takes back worker w's slots.
    read_buffers[w]: worker w's slots of `shared_read_buffers` (None: each worker makes its own)."""

    def __init__(self, plan, shards, variant, shard_set, storage_options, batch_size, free=None, read_buffers=None,
                 rings=None):
        self.plan, self.shards, self.variant, self.batch_size = plan, shards, variant, batch_size
        self.shard_set, self.storage_options, self.free = shard_set, storage_options, free
        self.read_buffers, self.rings = read_buffers, rings
        self.first_ids = np.concatenate([[0], np.cumsum([s.count for s in shards])]).astype(np.int64)

    def __getstate__(self):  # maps do not pickle: a spawned (not forked) worker reads into its own buffers
        return {**self.__dict__, "read_buffers": None}

    def _load(self, g, stop):
        numbers = sorted(self.plan.groups[g])  # in split order, so `_gather` can search first_ids
        return load_group([self.shards[s] for s in numbers], self.first_ids[numbers], self.variant,
                          self.shard_set, self.storage_options, stop)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.read_buffers:
            adopt_read_buffers(self.read_buffers[worker])
        chunks = [c for c in self.plan.chunks if c.lane % workers == worker]
        needed = list(dict.fromkeys(c.group for c in chunks))  # groups in order of first use
        last_use = {c.group: i for i, c in enumerate(chunks)}
        ahead = len({c.lane for c in chunks}) + 1  # one group in use per lane, and the next one read
        shape = VARIANTS[self.variant][1]
        row_bytes = int(np.prod(shape))
        ring = _Ring(self.free[worker], self.rings[worker]) if info is not None else None
        read_ahead, loads = ThreadPoolExecutor(1, thread_name_prefix="tinyin-read"), {}
        stop = threading.Event()  # set as the lanes end: a read waiting to try a shard again gives up at once
        try:
            for i, chunk in enumerate(chunks):
                for g in needed[:needed.index(chunk.group) + ahead]:
                    if g not in loads and last_use[g] >= i:
                        loads[g] = read_ahead.submit(self._load, g, stop)
                group = loads[chunk.group].result()
                slot, out = ring.take(len(chunk.ids)) if ring else (None, torch.empty((len(chunk.ids), row_bytes),
                                                                                      dtype=torch.uint8))
                labels, keys = _gather(group, chunk.ids, out)
                images = None if slot is not None else out.view(len(chunk.ids), *shape)
                yield chunk.seq, worker, slot, images, labels, keys
                if last_use[chunk.group] == i:  # sliced: its buffers serve the next reads
                    recycle_buffers(loads.pop(chunk.group).result())
                    del group
            return
        except ShardError as e:
            failure = _Failure(str(e))
        except Exception as e:  # a bug rather than a bad shard: still one line, naming what was read
            failure = _Failure(f"{self.shards[self.plan.groups[chunk.group][0]].url}: cannot slice ({describe_error(e)})")
        finally:
            stop.set()
            read_ahead.shutdown(wait=True, cancel_futures=True)
        # Yielded with the error dropped: a frame suspended holding it (in `e`, or through a future in
        # `loads`) sits in the error's own traceback, a cycle only the cyclic GC frees, on whichever
        # thread it runs, the read thread included, which cannot join itself.
        loads.clear()
        yield failure


# --- the source -----------------------------------------------------------------------------------
class StreamSource:
    """Raw batches `(images uint8 (B,64,64,3) or (B,28,28), labels int64 (B,), keys)` of one split.

    shards: [Shard] (see `stream_from_set` and `stream_from_urls`). The same (seed, epoch) gives
    the same batches with 0, 1 or 2 workers (more workers add lanes to the plan, see
    `plan_epoch`); `set_epoch` reshuffles. Every sample is
    read at most once per epoch and every rank yields the same number of batches (DDP never waits
    on a rank that has finished):
    - drop_last=True: floor(min_rank_samples / batch_size) full batches on every rank; the rest of
      a rank's samples are not used this epoch.
    - drop_last=False: every sample exactly once, in nb = ceil(max_rank_samples / batch_size)
      batches. A rank with enough samples for nb batches yields full ones and a short last one; a
      rank with fewer spreads its samples evenly over the nb batches (sizes differ by at most 1).
    A shard that is short, corrupt, cut off mid-transfer or unreachable is read again (5 reads over
    about 8 s, `shardset.retry_waits`: a server's restart is ridden out) and then named in a ShardError;
    a missing one is named at once; an epoch never ends short.
    With workers, the source keeps their read and batch buffers from its first epoch on
    (`shared_read_buffers`, `_ring_buffers`): (lanes per worker + 1) x mix shards per worker,
    about 1.4 GB for 2 workers over 169 MB shards, held for the life of the source so that every
    epoch reuses the same pages.
    """

    def __init__(self, shards, variant="rgb64", batch_size=256, shuffle=True, seed=0, epoch=0, drop_last=False,
                 rank=0, world_size=1, workers=2, storage_options=None, shard_set=None, lanes=LANES, mix=MIX):
        check_variant(variant)
        if not shards or batch_size < 1 or not 0 <= rank < world_size or workers < 0:
            raise ValueError(f"need shards, batch_size >= 1, 0 <= rank < world_size, workers >= 0; got {len(shards)} "
                             f"shards, batch_size={batch_size}, rank={rank}, world_size={world_size}, workers={workers}")
        self.shards, self.variant, self.storage_options, self.shard_set = list(shards), variant, storage_options, shard_set
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size, self.workers, self.lanes, self.mix = rank, world_size, workers, lanes, mix
        self._pool = self._rings = None  # the workers' read and batch buffers, made at the first epoch
        self._lock, self._busy = threading.Lock(), False  # whether an epoch in flight holds them
        self.set_epoch(epoch)  # fails here, not at the first epoch, if the ranks cannot be balanced

    def set_epoch(self, epoch, start=0):
        """Plan `epoch` (deterministically from seed and epoch). start: samples of this epoch already
        consumed over all ranks, a multiple of batch_size * world_size or the whole epoch; the batches after it are
        exactly those an uninterrupted epoch yields from there (this run's world_size must be the
        one that consumed them)."""
        self.plan = plan_epoch([s.count for s in self.shards], seed=self.seed, epoch=epoch, rank=self.rank,
                               world_size=self.world_size, batch_size=self.batch_size, shuffle=self.shuffle,
                               drop_last=self.drop_last, start=start, lanes=max(self.lanes, self.workers),
                               mix=self.mix)
        self.epoch, self.start = epoch, start  # after the plan: a refused start changes nothing

    def __len__(self):
        """Batches still to come this epoch (after `start`)."""
        return len(self.plan.sizes) - self.plan.first

    @property
    def num_samples(self):
        """Samples this rank yields this epoch (after `start`)."""
        return sum(self.plan.sizes[self.plan.first:])

    def __iter__(self):
        """The epoch's batches. With workers, a batch's images live in a reused shared-memory
        buffer: valid until the next batch is requested (clone to keep one)."""
        if not self.plan.chunks:
            return
        # More workers than lanes would sit idle: the plan has max(lanes, workers) lanes.
        free = [multiprocessing.SimpleQueue() for _ in range(self.workers)]
        # Everything from here inside the `try`: a Ctrl-C at any point must still stop the workers and
        # give the buffers back (`_busy` left set, every later epoch made and faulted in new ones).
        chunks, beside = None, True  # beside: until this epoch has claimed the source's buffers
        try:
            # An epoch in flight beside another (two threads, two iterators of one loader) gets buffers of
            # its own: sharing them, each overwrote the other's batches (images under the wrong labels).
            with self._lock:
                beside, self._busy = self._busy, True
                pool, rings = self._pool, self._rings
                if self.workers and (beside or pool is None):
                    lanes = max(self.lanes, self.workers)  # as planned
                    pool = shared_read_buffers(self.shards, self.workers, lanes, self.mix) or []
                    rows = min(self.batch_size, sum(s.count for s in self.shards))  # no batch holds more
                    rings = _ring_buffers(self.workers, rows, int(np.prod(VARIANTS[self.variant][1])))
                    if not beside:
                        self._pool, self._rings = pool, rings
            dataset = _Lanes(self.plan, self.shards, self.variant, self.shard_set, self.storage_options,
                             self.batch_size, free, pool, rings)
            # Forked, whatever multiprocessing's default, each worker with its SIGTERM rule (`stream_workers`).
            with starting_workers():
                chunks = (iter(DataLoader(dataset, batch_size=None, num_workers=self.workers, persistent_workers=False,
                                          collate_fn=_as_is, worker_init_fn=ignore_sigterm_but_the_parents,
                                          multiprocessing_context=FORK))
                          if self.workers else iter(dataset))
            yield from self._batches(chunks, free, rings)
        finally:
            # Stop the workers (or the in-process read thread) now, also after an error or an early
            # stop, on this thread: a traceback holding this frame would otherwise keep them alive.
            try:
                if self.workers and chunks is not None:
                    shut_down(chunks)  # the workers waited for together, not each in turn
                elif chunks is not None:
                    chunks.close()
            finally:
                # Also when a Ctrl-C lands in the lines above (a notebook's, as an epoch ends): the buffers
                # were left marked busy for good, and every later epoch made and faulted in new ones. Once
                # the workers are stopped (shut_down terminates, in its own `finally`, any it was waiting for);
                # one still running (more Ctrl-Cs, in torch's own shutdown) may write into them: kept busy then.
                workers = getattr(chunks, "_workers", ()) if self.workers else ()
                if not beside and not any(w.is_alive() for w in workers):
                    self._busy = False
                for queue in free:
                    queue.close()

    def _batches(self, chunks, free, rings):
        """Put the workers' chunks back in plan order, join the few batches made of two, and hand
        each ring slot back once its batch has been replaced by the next."""
        plan, early, parts, next_seq = self.plan, {}, [], 0
        for item in chunks:
            if isinstance(item, _Failure):
                raise ShardError(item.message)
            seq, worker, slot, images, labels, keys = item
            if images is None:
                images = rings[worker][slot][:len(labels)].view(len(labels), *VARIANTS[self.variant][1])
            early[seq] = (worker, slot, images, torch.from_numpy(labels), keys)
            while next_seq in early:  # workers run side by side: a chunk may arrive before its turn
                parts.append(early.pop(next_seq))
                batch = plan.chunks[next_seq].batch
                next_seq += 1
                if next_seq == len(plan.chunks) or plan.chunks[next_seq].batch != batch:
                    if len(parts) == 1:
                        yield parts[0][2:]
                    else:  # a copy: the parts' slots are free at once
                        joined = (torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts]),
                                  [k for p in parts for k in p[4]])
                        self._hand_back(parts, free)
                        parts = []
                        yield joined
                    self._hand_back(parts, free)
                    parts = []
        if next_seq != len(plan.chunks):  # cannot happen unless a worker died quietly: never a short epoch
            raise ShardError(f"{self.shards[0].url} (and {len(self.shards) - 1} more): the epoch ended after "
                             f"{next_seq} of {len(plan.chunks)} chunks")

    @staticmethod
    def _hand_back(parts, free):
        for worker, slot, *_ in parts:
            if slot is not None:
                free[worker].put(slot)


def stream_from_set(shards, split, variant="rgb64", storage_options=None, **kw):
    """A `StreamSource` over `split` of a shard set (folder, URL or ShardSet), opened once: counts,
    offsets, labels and keys from its manifest and index, shards checked against the manifest."""
    shard_set = open_shard_set(shards, storage_options)
    check_variant(variant)
    entries = shard_set.entries(split)
    table = shard_set.split_index(split)
    names = np.asarray(table["shard"].to_pylist())
    offsets = table[f"{variant}_offset"].to_numpy()
    labels, keys = table["label"].to_numpy().astype(np.int64), table["key"].to_pylist()
    out, at = [], 0
    for entry in entries:
        rows = np.flatnonzero(names == entry["file"])
        if len(rows) != entry["count"] or (len(rows) and rows[0] != at):
            raise ShardError(f"{shard_set.where(entry)}: the index lists {len(rows)} "
                             f"{plural(len(rows), 'sample')}, the manifest {entry['count']}")
        if rows.size:
            out.append(Shard(str(shard_set.where(entry)), entry["count"], entry, offsets[rows], labels[rows],
                             keys[at:at + len(rows)]))
        at += len(rows)
    if shard_set.is_local:
        for shard in out:  # cheap checks before any worker starts
            path = Path(shard.url)
            if not path.is_file():
                raise missing_error(path)
            shard_set.check_size(shard.entry, path.stat().st_size, path)
    # The set's own: a ShardSet opened with an endpoint or credentials (make_loader's way to pass them) read its
    # manifest and index with them, then each shard without, from the default endpoint.
    return StreamSource(out, variant=variant, storage_options=shard_set.storage_options, shard_set=shard_set, **kw)


def stream_from_urls(urls, sample_counts, **kw):
    """A `StreamSource` over shard URLs (paths, fsspec URLs or `pipe:` commands, or a brace pattern)
    with their sample counts (from the set's manifest): each shard's layout is read from itself."""
    if isinstance(urls, (str, os.PathLike)):  # a Path to one .tar too: it was iterated ('not iterable')
        import webdataset as wds  # see read_whole

        urls = wds.shardlists.expand_urls(str(urls))
    urls = [str(u) for u in urls]
    # UsageError, as make_loader refuses sample_counts given with a shard set (`loader._refuse_unused`): this was a
    # ValueError, so one `except` caught the one mistake and not its mirror.
    if sample_counts is None:
        raise UsageError("a list of shard URLs needs sample_counts (from the set's manifest) to plan an epoch; "
                         "or pass the shard set's location (the folder or URL holding manifest.json)")
    # A string was counted by its characters: "128" as 3 shards of 1, 2 and 8 samples, or refused as
    # 'sample_counts has 3 entries for 1 urls'; a lone number failed as "object of type 'int' has no len()".
    if isinstance(sample_counts, (str, bytes)) or not hasattr(sample_counts, "__len__"):
        raise ValueError(f"sample_counts must be a list of each shard's number of samples, one per URL, "
                         f"not {sample_counts!r}")
    if len(sample_counts) != len(urls):  # '3 entries for 1 urls'
        raise UsageError(f"sample_counts has {len(sample_counts)} {plural(len(sample_counts), 'count')} for "
                         f"{len(urls)} shard {plural(len(urls), 'URL')}: give one per URL")
    for count in sample_counts:  # -1 was refused as 'ranks hold [-4] samples', a dict by int() of its keys
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"sample_counts must hold each shard's number of samples, an integer of at least 0, "
                             f"not {count!r}")
    if not any(sample_counts):  # nothing to read: it named every argument of StreamSource ('need shards, ...')
        raise UsageError(f"sample_counts: every count is 0, no sample to read in the {len(urls)} shard "
                         f"{plural(len(urls), 'URL')}")
    return StreamSource([Shard(u, int(c)) for u, c in zip(urls, sample_counts) if int(c)], **kw)


def is_url_list(shards):
    """True when `shards` names shards one by one (a list, a brace pattern, a `pipe:` command or
    a `.tar`), False when it names a whole shard set (a folder, a URL of one, a ShardSet). A local
    folder is a set whatever its name (one named `run {1,2}` was taken for a brace pattern), also as
    `~/run {1,2}` or `file:///.../run {1,2}`, which ShardSet reads as that folder (`local_path`)."""
    if isinstance(shards, (list, tuple)):
        return True
    text = str(shards)
    if isinstance(shards, ShardSet) or (not is_url(text) and os.path.isdir(local_path(text))):
        return False
    return text.startswith("pipe:") or "{" in text or names_a_tar(text)


def stream_source(shards, split, sample_counts=None, **kw):
    """The stream path's source for `make_loader`: a shard set or a list of shard URLs."""
    if is_url_list(shards):
        return stream_from_urls(shards, sample_counts, **kw)
    return stream_from_set(shards, split, **kw)  # make_loader refused sample_counts with a set (`_refuse_unused`)


