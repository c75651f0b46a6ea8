"""`make_loader`: the one loader API (train.py, the benchmark and the tests all use it).

Three read paths, one output contract:
- ``fast``: memory-mapped local shards, gathered a batch at a time at the indexed offsets
  (`ShardArrays`) into reused buffers: on CUDA by a background thread into a ring of pinned
  buffers, so gathering overlaps the GPU's work; on the CPU in the caller's thread, where torch
  already spreads each copy over every core (a second Python thread measured 2-3x slower there:
  two OpenMP teams and the GIL contending for the same cores).
- ``resident``: the whole split copied once to the device; shuffling and batching happen there.
- ``stream``: whole shards read one after another and sliced in memory (`stream.StreamSource`),
  for remote or huge shard sets.
``auto`` picks ``resident`` for a local split of at most `RESIDENT_MAX` bytes (1.2 GB for the
64x64 train split: it fits any modern GPU, and in RAM it is anonymous memory that the kernel
cannot evict, unlike page-cache pages of a memory map), ``fast`` for a larger local split, and
``stream`` for URLs.
Every path ends in the same `DeviceStage` (normalise, augment, resize on the device).
"""
import queue
import threading
from pathlib import Path

import numpy as np
import torch

from .device import DeviceStage
from .index import read_manifest
from .order import epoch_order, step_seed
from .reader import ShardArrays
from .schema import VARIANTS

PATHS = ("auto", "fast", "resident", "stream")
RESIDENT_MAX = 2 << 30


class _FastSource:
    """Raw uint8 batches from `ShardArrays` (fast path) or from a device-resident copy (resident)."""

    def __init__(self, arrays, batch_size, shuffle, seed, rank, world_size, drop_last, resident, device, prefetch):
        self.arrays, self.batch_size, self.shuffle, self.seed = arrays, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last, self.prefetch = rank, world_size, drop_last, prefetch
        self.epoch, self.start, self.device = 0, 0, torch.device(device)
        self.labels = torch.from_numpy(arrays.labels)
        self.resident = arrays.load_all().to(self.device) if resident else None
        self.resident_labels = self.labels.to(self.device) if resident else None

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    @property
    def num_samples(self):
        return len(self.order())

    def order(self):
        return epoch_order(len(self.arrays), seed=self.seed, epoch=self.epoch, rank=self.rank,
                           world_size=self.world_size, batch_size=self.batch_size, shuffle=self.shuffle,
                           drop_last=self.drop_last, start=self.start)

    def __len__(self):
        return -(-len(self.order()) // self.batch_size)

    def _batches(self):
        order = self.order()
        if self.shuffle:
            # Sorting each batch's members groups them by shard and walks each memory map forward;
            # a batch is still a random subset, and its order inside is irrelevant to SGD.
            full = len(order) // self.batch_size * self.batch_size
            order = np.concatenate([np.sort(order[:full].reshape(-1, self.batch_size), axis=1).ravel(),
                                    np.sort(order[full:])])
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size]

    def __iter__(self):
        if self.resident is not None:
            for idx in self._batches():
                index = torch.from_numpy(idx).to(self.device, non_blocking=True)
                images = self.resident.index_select(0, index).view(len(idx), *self.arrays.shape)
                yield images, self.resident_labels.index_select(0, index), idx
            return
        yield from self._threaded() if self.prefetch else self._inline()

    def _inline(self):
        """Gather in the caller's thread into one reused buffer (valid until the next batch)."""
        buffer = torch.empty((self.batch_size, *self.arrays.shape), dtype=torch.uint8)
        for idx in self._batches():
            images = self.arrays.gather(idx, out=buffer)
            yield images, self.labels[torch.from_numpy(idx)], idx

    def _threaded(self):
        """Gather in a background thread (torch releases the GIL while copying) into a ring of
        `prefetch + 1` reused buffers; a buffer is handed back when the next batch is requested."""
        pin = self.device.type == "cuda"
        with torch.inference_mode(False):  # the gather thread writes into these: they must be normal tensors
            ring = [torch.empty((self.batch_size, *self.arrays.shape), dtype=torch.uint8, pin_memory=pin)
                    for _ in range(self.prefetch + 1)]
        free, ready, stop = queue.Queue(), queue.Queue(self.prefetch), threading.Event()
        for slot in range(len(ring)):
            free.put(slot)

        def produce():
            try:
                for idx in self._batches():
                    slot = None
                    while slot is None and not stop.is_set():
                        try:
                            slot = free.get(timeout=0.1)
                        except queue.Empty:
                            pass
                    if stop.is_set():
                        return
                    self.arrays.gather(idx, out=ring[slot])
                    ready.put((slot, idx))
                ready.put(None)
            except BaseException as e:  # surfaced in the consumer, never a silent hang
                ready.put(e)

        thread = threading.Thread(target=produce, name="tinyin-gather", daemon=True)
        thread.start()
        held, copied = None, {}  # copied: slot -> CUDA event marking the end of its host-to-device copy
        try:
            while True:
                item = ready.get()
                if held is not None:
                    if held in copied:
                        copied.pop(held).synchronize()  # the DMA must finish before the buffer is refilled
                    free.put(held)
                    held = None
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                slot, idx = item
                images = ring[slot][: len(idx)]
                if self.device.type != "cpu":
                    images = images.to(self.device, non_blocking=True)
                    if pin:
                        copied[slot] = torch.cuda.Event()
                        copied[slot].record()
                held = slot
                yield images, self.labels[torch.from_numpy(idx)], idx
        finally:
            stop.set()
            thread.join()


class Loader:
    """An iterable of `(images, labels)` or `(images, labels, keys)` batches; see `make_loader`."""

    def __init__(self, source, keys, stage, device, with_keys, raw, seed, rank, world_size, batch_size):
        self.source, self._keys, self.stage, self.device = source, keys, stage, torch.device(device)
        self.with_keys, self.raw, self.seed, self.epoch, self.start = with_keys, raw, seed, 0, 0
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size

    def set_epoch(self, epoch, start=0):
        """Reshuffle for `epoch`: the same (seed, epoch) always gives the same order.

        start: samples of this epoch already consumed, over all ranks (a resumed run's skip:
        nothing before it is read again). A multiple of batch_size * world_size keeps each
        batch's augmentation what it was in the uninterrupted run.
        """
        self.epoch, self.start = epoch, start
        self.source.set_epoch(epoch, start)

    def __len__(self):
        return len(self.source)

    @property
    def num_samples(self):
        """Samples this rank sees per epoch."""
        return self.source.num_samples

    def __iter__(self):
        generator = torch.Generator(self.device)
        first_step = self.start // (self.batch_size * self.world_size)
        for step, (images, labels, ids) in enumerate(self.source, first_step):
            # Augmentation is drawn per (seed, epoch, rank, step): a resume draws what the uninterrupted run drew.
            generator.manual_seed(step_seed(self.seed, self.epoch, self.rank, step))
            labels = labels.to(self.device, non_blocking=True)
            if self.device.type != images.device.type:
                images = images.to(self.device, non_blocking=True)
            if not self.raw:
                images = self.stage(images, generator)
            if self.with_keys:
                keys = list(ids) if self._keys is None else [self._keys[i] for i in ids]
                yield images, labels, keys
            else:
                yield images, labels


def make_loader(shards, split, variant="rgb64", batch_size=256, shuffle=True, seed=0, epoch=0, drop_last=False,
                rank=0, world_size=1, device="cpu", size=None, augment=False, with_keys=False, mean=None, std=None,
                dtype=torch.float32, channels_last=False, workers=2, path="auto", raw=False, prefetch=None,
                checksum=True, sample_counts=None):
    """Batches of one split of a shard set, ready for a model on `device`.

    shards: a local shard folder (from `tinyin shard build`), the URL of one (http(s)://, s3://, gs://:
    the split is fetched into a local cache, see `cache.cached_copy`, unless path="stream"), or shard
    URLs / a brace pattern (the stream path).
    Yields `(images, labels)` (`+ keys` with `with_keys=True`): images float (B, C, H, W) on
    `device`, scaled to [0, 1] and normalised by mean/std (default: the train split's stats
    from the manifest), resized to `size` and augmented when asked; or, with `raw=True`, the
    uint8 (B, H, W[, C]) batch itself (valid until the next batch is requested). Labels int64.
    With path="stream", `shards` may also be a shard set's URL (http(s)://, s3://, gs://: the folder
    holding manifest.json; counts and stats come from the manifest) or a list of shard URLs /
    `pipe:` commands with `sample_counts` (per shard, from the manifest) to size epochs and split ranks.
    prefetch: batches the fast path's background thread gathers ahead (default: 4 on CUDA, and
    0 on the CPU, which gathers in the caller's thread).
    Same (seed, epoch): same order; `set_epoch` reshuffles. With `world_size > 1` ranks get
    disjoint samples and, with `drop_last=True`, the same number of batches.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, not {variant!r}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, not {path!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    from .cache import cached_copy, is_set_url

    if is_set_url(shards) and path != "stream":  # a URL reads like a folder: its split fetched once per node
        shards = cached_copy(shards, split)
    local = isinstance(shards, (str, Path)) and Path(shards).is_dir()
    if path == "auto" and not local:
        path = "stream"
    keys = None
    if path == "stream":  # a shard set (folder, URL, ShardSet) or a list of shard URLs with sample_counts
        from .stream import stream_source

        source = stream_source(shards, split, sample_counts=sample_counts, variant=variant, batch_size=batch_size,
                               shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last, rank=rank,
                               world_size=world_size, workers=workers)
    else:
        arrays = ShardArrays(shards, split, variant, checksum=checksum)
        keys = arrays.keys
        if path == "auto":
            path = "resident" if len(arrays) * arrays.row_bytes <= RESIDENT_MAX else "fast"
        if prefetch is None:
            prefetch = 4 if torch.device(device).type == "cuda" else 0
        source = _FastSource(arrays, batch_size, shuffle, seed, rank, world_size, drop_last,
                             resident=path == "resident", device=device, prefetch=prefetch)
    if mean is None or std is None:  # remote shards without explicit stats: map [0, 1] to [-1, 1]
        channels = 3 if len(VARIANTS[variant][1]) == 3 else 1
        shard_set = getattr(source, "shard_set", None)  # the stream path opened the set already
        stats = (shard_set.stats(variant) if shard_set is not None else read_manifest(shards)["stats"][variant] if local
                 else {"mean": [0.5] * channels, "std": [0.5] * channels})
        mean, std = stats["mean"], stats["std"]
    stage = DeviceStage(mean, std, size=size, augment=augment, pad=4 if variant == "rgb64" else 2,
                        dtype=dtype, channels_last=channels_last)
    loader = Loader(source, keys, stage, device, with_keys, raw, seed, rank, world_size, batch_size)
    loader.set_epoch(epoch)
    return loader
