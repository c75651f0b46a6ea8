"""`StreamSource`: one split read as a stream of shards, by a stock webdataset pipeline.

The twin of `reader.ShardArrays` for shards that are remote (`http://...`, `pipe:curl ...`) or
too large to map: nothing is indexed or seeked, each shard is read front to back, once.

Each epoch, with one `random.Random(f"{seed}:{epoch}")` shared by all ranks:
1. The shards are shuffled, then dealt to ranks largest first, each to the rank with the fewest
   samples so far, so per-rank sample counts differ by at most one shard's count. With fewer
   shards than ranks, every rank reads every shard and keeps every `world_size`-th sample.
2. A rank's shards go round-robin to its DataLoader workers (a worker may get none). A worker runs
   `tarfile_to_samples -> decode -> shuffle(buffer) -> batched`, its buffer seeded by (seed,
   epoch, rank, worker), and checks each shard against its expected sample count.
3. The main process cuts the workers' batches to this rank's plan of batch sizes (`_plan`): full
   batches whichever worker they came from, and the same number of batches on every rank.
Mixing reaches only as far as the shuffle buffer, which is why `tinyin shard build` shuffles the
train samples (with a fixed seed) before cutting them into shards.
"""
import random
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import ShardError
from .index import read_manifest
from .schema import CLS, VARIANTS
from .tarshard import NPY_HEADERS


class _Failure:
    """What a worker sends instead of raising: DataLoader would re-wrap the error and bury the file name."""

    def __init__(self, message):
        self.message = message


def _collate(samples):
    """[(image, label, key)] -> (uint8 tensor, int64 tensor, keys), with a single copy of the pixels."""
    images, labels, keys = zip(*samples)
    out = torch.empty((len(images), *images[0].shape), dtype=torch.uint8)
    if get_worker_info() is not None:
        out.share_memory_()  # DataLoader would copy the batch into shared memory: stack it there at once
    np.stack(images, out=out.numpy())
    return out, torch.tensor(labels, dtype=torch.int64), list(keys)


class _Shards(IterableDataset):
    """One rank's shards [(url, count)]; each DataLoader worker streams its round-robin share."""

    def __init__(self, shards, stride, variant, batch_size, shuffle_buffer, seed):
        self.shards, self.stride, self.variant, self.batch_size = shards, stride, variant, batch_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        member, shape = VARIANTS[self.variant]
        header, size = NPY_HEADERS[member], int(np.prod(shape))
        seen, current = {}, [None]

        def shard_list():
            for url, count in self.shards[worker::workers]:
                current[0] = url
                yield {"url": url}
                # Resumed only once every sample of `url` has passed `decode` (the stages are lazy).
                got = seen.get(url, 0)
                if count is not None and got != count:
                    raise ShardError(f"{url}: truncated or corrupt shard: expected {count} samples, got {got}")

        def decode(samples):
            for sample in samples:
                url, key = sample["__url__"], sample["__key__"]
                seen[url] = i = seen.get(url, 0) + 1
                if self.stride and (i - 1) % self.stride[1] != self.stride[0]:
                    continue  # another rank's sample (fewer shards than ranks)
                data = sample.get(member)
                # tarshard writes one fixed header: comparing it is cheaper than np.load and as strict.
                if data is None or len(data) != len(header) + size or not data.startswith(header):
                    raise ShardError(f"{url}: sample {key}: {member} missing or not a uint8 {shape} array")
                try:
                    label = int(sample[CLS])
                except (KeyError, ValueError):
                    raise ShardError(f"{url}: sample {key}: missing or bad {CLS}") from None
                yield np.frombuffer(data, np.uint8, size, len(header)).reshape(shape), label, key

        wanted = (f".{member}", f".{CLS}")  # the other members' bytes are skipped, never copied
        pipe = wds.DataPipeline(
            shard_list,
            wds.tarfile_to_samples(handler=wds.reraise_exception, select_files=lambda name: name.endswith(wanted)),
            decode,
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(f"{self.seed}:{worker}"))
            if self.shuffle_buffer > 1 else None,
            # Whole batches per worker: one shared-memory transfer each, no re-copy in the main process.
            wds.batched(self.batch_size, collation_fn=_collate, partial=True),
        )
        try:
            yield from pipe
        except ShardError as e:
            yield _Failure(str(e))
        except Exception as e:  # tarfile, gopen, OS errors: name the shard being read
            why = e.strerror if isinstance(e, OSError) and e.strerror else (e.args[0] if e.args else "")
            yield _Failure(f"{current[0]}: unreadable shard ({type(e).__name__}: {why})")


def _cut(chunks, n):
    """The first `n` samples of `chunks` as one batch, and the rest; copies only to join chunks."""
    if len(chunks) == 1:
        images, labels, keys = chunks[0]
    else:
        images, labels = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        keys = [k for c in chunks for k in c[2]]
    return (images[:n], labels[:n], keys[:n]), ([(images[n:], labels[n:], keys[n:])] if n < len(keys) else [])


class StreamSource:
    """Raw batches `(images uint8 (B,64,64,3) or (B,28,28), labels int64 (B,), keys)` from shard URLs.

    urls: shard URLs or paths (anything webdataset's gopen opens), or a brace pattern string.
    sample_counts: samples per shard, aligned with urls; needed for `len()`, for `world_size > 1`
    and to catch short shards. The same (seed, epoch) gives the same batches; `set_epoch` reshuffles.

    Every rank yields the same number of batches (DDP never waits on a rank that has finished):
    - drop_last=True: floor(min_rank_samples / batch_size) full batches, then the rank stops;
      the rest of its samples are not used this epoch.
    - drop_last=False: every sample exactly once, in nb = ceil(max_rank_samples / batch_size)
      batches. A rank with enough samples for nb batches yields full ones and a short last one; a
      rank with fewer spreads its samples evenly over the nb batches (sizes differ by at most 1).
    """

    def __init__(self, urls, variant="rgb64", batch_size=256, shuffle=True, seed=0, epoch=0, drop_last=False,
                 rank=0, world_size=1, workers=2, shuffle_buffer=2000, sample_counts=None):
        self.urls = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, not {variant!r}")
        if not self.urls or batch_size < 1 or not 0 <= rank < world_size or workers < 0:
            raise ValueError(f"need urls, batch_size >= 1, 0 <= rank < world_size, workers >= 0; got {len(self.urls)} "
                             f"urls, batch_size={batch_size}, rank={rank}, world_size={world_size}, workers={workers}")
        if sample_counts is not None and len(sample_counts) != len(self.urls):
            raise ValueError(f"sample_counts has {len(sample_counts)} entries for {len(self.urls)} urls")
        if sample_counts is None and world_size > 1:
            raise ValueError("world_size > 1 needs sample_counts, to give every rank the same number of batches")
        self.counts = None if sample_counts is None else [int(c) for c in sample_counts]
        self.variant, self.batch_size, self.shuffle, self.seed, self.epoch = variant, batch_size, shuffle, seed, epoch
        self.drop_last, self.rank, self.world_size, self.workers = drop_last, rank, world_size, workers
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self._plan()  # fail here, not at the first epoch, if the ranks cannot be balanced

    def set_epoch(self, epoch, start=0):
        """Shuffle shards and samples for `epoch` (deterministically from seed and epoch)."""
        if start:
            raise ValueError("the stream path cannot start an epoch part-way yet")
        self.epoch = epoch

    def _plan(self):
        """This rank's [(url, count)], its sample stride (or None), and its batch sizes (None: unknown)."""
        order = list(range(len(self.urls)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        counts, ws, B = self.counts, self.world_size, self.batch_size
        if counts is None:
            return [(self.urls[i], None) for i in order], None, None
        if len(order) < ws:  # too few shards to deal out: every rank reads all, keeps its stride
            totals = [sum(len(range(r, c, ws)) for c in counts) for r in range(ws)]
            mine, stride = order, (self.rank, ws)
        else:  # largest first to the least-loaded rank; the sort is stable, equal counts stay shuffled
            groups, totals, stride = [[] for _ in range(ws)], [0] * ws, None
            for i in sorted(order, key=lambda i: -counts[i]):
                r = totals.index(min(totals))
                groups[r].append(i)
                totals[r] += counts[i]
            mine = groups[self.rank]
        n = totals[self.rank]  # depends on the counts only, not on the epoch
        if self.drop_last:
            sizes = [B] * (min(totals) // B)
        else:
            nb = -(-max(totals) // B)
            if min(totals) < nb:
                raise ValueError(f"ranks hold {totals} samples: not all can fill {nb} batches; "
                                 "use drop_last=True, a larger batch_size or more, smaller shards")
            if -(-n // B) == nb:
                sizes = [B] * (n // B) + [n % B] * (n % B > 0)
            else:
                base, extra = divmod(n, nb)
                sizes = [base + 1] * extra + [base] * (nb - extra)
        return [(self.urls[i], counts[i]) for i in mine], stride, sizes

    def __len__(self):
        sizes = self._plan()[2]
        if sizes is None:
            raise TypeError("len() of a StreamSource needs sample_counts")
        return len(sizes)

    @property
    def num_samples(self):
        """Samples this rank yields per epoch (None without sample_counts)."""
        sizes = self._plan()[2]
        return None if sizes is None else sum(sizes)

    def __iter__(self):
        shards, stride, sizes = self._plan()
        if sizes == []:
            return
        dataset = _Shards(shards, stride, self.variant, self.batch_size, self.shuffle_buffer,
                          f"{self.seed}:{self.epoch}:{self.rank}")
        chunks = iter(DataLoader(dataset, batch_size=None, num_workers=self.workers, persistent_workers=False))
        try:
            yield from self._rebatch(chunks, sizes, shards)
        finally:
            # Stop the workers now, also after an error or an early stop: a traceback holding
            # this frame would otherwise keep them alive.
            getattr(chunks, "_shutdown_workers", lambda: None)()

    def _rebatch(self, chunks, sizes, shards):
        """Cut the workers' batches into batches of `sizes` (None: unknown count, batch_size each)."""
        buf, have, done, seen = [], 0, 0, 0
        size = (lambda i: sizes[i]) if sizes is not None else (lambda i: self.batch_size)
        # Without drop_last the last batch waits for the end of the stream, so that a short or long
        # shard is reported before the epoch looks complete.
        stop = float("inf") if sizes is None else len(sizes) - (not self.drop_last)
        for chunk in chunks:
            if isinstance(chunk, _Failure):
                raise ShardError(chunk.message)
            buf.append(chunk)
            have, seen = have + len(chunk[2]), seen + len(chunk[2])
            while done < stop and have >= size(done):
                batch, buf = _cut(buf, size(done))
                have, done = have - size(done), done + 1
                yield batch
            if self.drop_last and done == stop:
                return  # every rank stops at the same count
        if sizes is not None and (self.drop_last or seen != sum(sizes)):
            raise ShardError(f"{shards[0][0]} (and {len(shards) - 1} more): rank {self.rank} read {seen} samples, "
                             f"expected {'at least ' if self.drop_last else ''}{sum(sizes)}")
        if have and not self.drop_last:
            yield _cut(buf, have)[0]


def stream_from_folder(shards, split, **kw):
    """A `StreamSource` over `split` of the local shard folder `shards`, counts from its manifest."""
    manifest = read_manifest(shards)
    entries = [s for s in manifest["shards"] if s["split"] == split]
    if not sum(s["count"] for s in entries):
        raise ShardError(f"{shards}: no samples for split {split!r} (splits: "
                         f"{', '.join(k for k, v in manifest['counts'].items() if v)})")
    paths = [Path(shards) / s["file"] for s in entries]
    for path, entry in zip(paths, entries):  # cheap checks before any worker starts
        if not path.is_file():
            raise ShardError(f"{path}: missing (listed in the manifest)")
        if path.stat().st_size != entry["bytes"]:
            raise ShardError(f"{path}: {path.stat().st_size:,} bytes, the manifest says {entry['bytes']:,} "
                             "(truncated or replaced)")
    return StreamSource([str(p) for p in paths], sample_counts=[s["count"] for s in entries], **kw)
