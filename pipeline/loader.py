"""`make_loader`: the one loader API (train.py, the benchmark and the tests all use it).

Three read paths, one output contract, built from separate parts: the epoch order
(`order.epoch_order`, a pure function), the storage (`storage.MappedStorage`,
`storage.ResidentStorage`) and, for the fast path, the prefetch ring (`ring.prefetch_ring`).
- ``fast``: memory-mapped local shards, gathered a batch at a time at the indexed offsets into
  reused buffers: with `prefetch` (default on CUDA) by a background thread into a ring of pinned
  buffers, so gathering overlaps the GPU's work; on the CPU in the caller's thread, where torch
  already spreads each copy over every core (a second Python thread measured 2-3x slower there:
  two OpenMP teams and the GIL contending for the same cores).
- ``resident``: the whole split copied once to the device; shuffling and batching happen there.
- ``stream``: whole shards read one after another and sliced in memory (`stream.StreamSource`),
  for remote or huge shard sets.
``auto`` picks ``resident`` for a local split of at most `RESIDENT_MAX` bytes (1.2 GB for the
64x64 train split: it fits any modern GPU, and in RAM it is anonymous memory that the kernel
cannot evict, unlike page-cache pages of a memory map), ``fast`` for a larger local split, and
``stream`` for a list of shard URLs.
The local paths check shard checksums in the background during the first epoch (see `storage`):
the first batch comes at once, and a bad shard raises ShardError before the epoch's last batch.
An option the chosen path does not use is refused (UsageError), never silently dropped.
Every path ends in the same `DeviceStage` (normalise, augment, resize on the device).
"""

import os

import numpy as np
import torch

from .augment import RRC_SCALE, augment_mode, check_rrc_scale
from .device import DeviceStage, check_device, check_dtype, check_stats
from .errors import UsageError, check_flag, check_integer
from .order import NoFullBatch, batch_sizes, epoch_order, step_seed
from .cache import cached_copy, is_set_url
from .reader import ShardArrays
from .ring import prefetch_ring
from .schema import VARIANTS, check_variant
from .shardset import ShardSet, open_shard_set
from .stream import is_url_list, stream_source
from .storage import MappedStorage, ResidentStorage

PATHS = ("auto", "fast", "resident", "stream")
RESIDENT_MAX = 2 << 30


class _LocalSource:
    """Raw uint8 batches of one rank from a storage, in the epoch order, with the data pass guarded."""

    def __init__(self, storage, batch_size, shuffle, seed, rank, world_size, drop_last, device, prefetch):
        self.storage, self.batch_size, self.shuffle, self.seed = storage, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last, self.prefetch = rank, world_size, drop_last, prefetch
        self.epoch, self.start, self.device = 0, 0, torch.device(device)
        self.set_epoch(0)

    def set_epoch(self, epoch, start=0):
        # Here, not at the next len() or iteration: a start past the split, ranks that cannot take as many batches
        # as each other. The batches depend on start only, not on the epoch.
        self.sizes = batch_sizes(len(self.storage), rank=self.rank, world_size=self.world_size,
                                 batch_size=self.batch_size, drop_last=self.drop_last, start=start)
        self.epoch, self.start = epoch, start

    @property
    def num_samples(self):
        return sum(self.sizes)

    def order(self):
        return epoch_order(len(self.storage), seed=self.seed, epoch=self.epoch, rank=self.rank,
                           world_size=self.world_size, batch_size=self.batch_size, shuffle=self.shuffle,
                           drop_last=self.drop_last, start=self.start)

    def __len__(self):
        return len(self.sizes)

    def _batches(self):
        order, bounds = self.order(), np.cumsum([0, *self.sizes])
        for start, end in zip(bounds[:-1], bounds[1:]):
            # Sorting each batch's members groups them by shard and walks each memory map forward;
            # a batch is still a random subset, and its order inside is irrelevant to SGD.
            yield np.sort(order[start:end]) if self.shuffle else order[start:end]

    def _raw(self):
        storage = self.storage
        # No batch holds more than the split: batch_size=10**8 ("all in one batch") made a 1.2 TB buffer.
        rows = min(self.batch_size, len(storage))
        if self.prefetch:
            for images, idx in prefetch_ring(self._batches(), storage.gather, storage.shape, rows,
                                             self.prefetch, self.device):
                yield images, storage.labels[torch.from_numpy(idx)], idx
        elif isinstance(storage, MappedStorage):
            buffer = torch.empty((rows, *storage.shape), dtype=torch.uint8)  # valid until the next batch
            for idx in self._batches():
                yield (*storage.batch(idx, out=buffer), idx)
        else:
            for idx in self._batches():
                yield (*storage.batch(idx), idx)

    def __iter__(self):
        last, data_pass = len(self) - 1, self.storage.data_pass
        for i, batch in enumerate(self._raw()):
            # A bad shard is raised at the next batch after the data pass finds it, and the last
            # batch waits for the pass: an epoch never ends on unverified data.
            data_pass.wait() if i == last else data_pass.check()
            yield batch

    def wait_ready(self):
        self.storage.data_pass.wait()


class Loader:
    """An iterable of `(images, labels)` or `(images, labels, keys)` batches; see `make_loader`."""

    def __init__(self, source, keys, stage, device, with_keys, raw, seed, rank, world_size, batch_size):
        self.source, self._keys, self.stage, self.device = source, keys, stage, torch.device(device)
        self.with_keys, self.raw, self.seed, self.epoch, self.start = with_keys, raw, seed, 0, 0
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size

    def set_epoch(self, epoch, start=0):
        """Reshuffle for `epoch`: the same (seed, epoch) always gives the same order. It applies
        to the next iteration; one already under way keeps its own order and augmentation draws.

        start: samples of this epoch already consumed, over all ranks (a resumed run's skip:
        nothing before it is read again). A multiple of batch_size * world_size keeps each
        batch's augmentation what it was in the uninterrupted run.
        """
        check_integer("epoch", epoch, 0)
        check_integer("start", start, 0)
        epoch, start = int(epoch), int(start)  # numpy integers too (see make_loader)
        # The source first: a start it refuses leaves the loader as it was (its epoch set before,
        # the next epoch read the old order with the new epoch's augmentation draws).
        self.source.set_epoch(epoch, start)
        self.epoch, self.start = epoch, start

    def __len__(self):
        return len(self.source)

    @property
    def num_samples(self):
        """Samples this rank sees per epoch."""
        return self.source.num_samples

    def wait_ready(self):
        """Block until the background pass over a local set's data is done (checksums, pages,
        the resident copy); ShardError naming a bad shard. Iterating never needs this: it is
        for timing the steady state (the benchmark) and for checking a set up front."""
        getattr(self.source, "wait_ready", lambda: None)()

    def __iter__(self):
        draws = not self.raw and self.stage.augment != "none"
        generator = torch.Generator(self.device) if draws else None
        # The epoch as this iteration starts, as the source's order is: a set_epoch() before it ends
        # (a prefetcher a batch ahead) must not change the draws of the batches still to come.
        epoch, first_step = self.epoch, self.start // (self.batch_size * self.world_size)
        for step, (images, labels, ids) in enumerate(self.source, first_step):
            if draws:  # per (seed, epoch, rank, step): a resume draws what the uninterrupted run drew
                generator.manual_seed(step_seed(self.seed, epoch, self.rank, step))
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


def _channels(variant):
    """Colour channels of `variant`'s images: (H, W, 3) or (H, W)."""
    return 3 if len(VARIANTS[variant][1]) == 3 else 1


def _check_args(batch_size, seed, epoch, rank, world_size, size, prefetch, workers, mean, std, dtype, variant,
                rrc_scale):
    """The arguments every path uses, checked before any shard is opened."""
    for name, value, low in (("batch_size", batch_size, 1), ("seed", seed, 0), ("epoch", epoch, 0),
                             ("world_size", world_size, 1), ("rank", rank, 0)):
        check_integer(name, value, low)
    if rank >= world_size:
        raise ValueError(f"need rank < world_size, got rank={rank}, world_size={world_size}")
    if size is not None:
        check_integer("size", size, 1)
    if prefetch is not None:
        check_integer("prefetch", prefetch, 0)
    if workers is not None:  # 1.5 failed inside torch's DataLoader, -1 named every argument of the stream source
        check_integer("workers", workers, 0)
    _check_stats(mean, std, variant)
    check_rrc_scale(rrc_scale)  # the device stage checks it too, but only once the shards are open
    check_dtype(dtype)


def _check_stats(mean, std, variant):
    """ValueError unless mean and std are given together, as finite numbers (std positive), one per channel."""
    if (mean is None) != (std is None):  # one alone was silently replaced by the manifest's pair
        given, missing = ("mean", "std") if std is None else ("std", "mean")
        raise ValueError(f"{given} without {missing}: pass both, or neither for the train split's statistics")
    if mean is None:
        return
    check_stats(mean, std)
    channels = _channels(variant)
    if not len(mean) == len(std) == channels:
        raise ValueError(f"mean and std need one value per channel of {variant} ({channels}), "
                         f"not {len(mean)} and {len(std)}")


def _rrc_scale_given(rrc_scale):
    """Whether `rrc_scale` (checked) is another than the default, RRC_SCALE."""
    return tuple(float(v) for v in rrc_scale) != RRC_SCALE


def _refuse_stage_options(size, augment, mean, std, dtype, channels_last, rrc_scale):
    """UsageError naming the device stage's options given with raw=True (the stored uint8 images)."""
    given = [f"{name}={value!r}" for name, value in (("size", size), ("mean", mean), ("std", std)) if value is not None]
    given += [f"augment={augment!r}"] * (augment_mode(augment) != "none")
    given += [f"rrc_scale={rrc_scale!r}"] * _rrc_scale_given(rrc_scale)
    given += [f"dtype={dtype}"] * (dtype != torch.float32) + ["channels_last=True"] * bool(channels_last)
    if given:
        raise UsageError(f"{', '.join(given)}: raw=True yields the stored uint8 images, without the device stage")


def _refuse_unused(path, auto, local, workers, prefetch, sample_counts, checksum):
    """UsageError for an option the chosen path (or input) does not use: none is silently dropped."""
    chosen = f"the {path} path" + (" (chosen by path='auto')" if auto else "")
    if not local and path != "stream":  # it had no set to map: 'None: no such folder'
        raise UsageError(f"path={path!r}: a list of shard URLs is read by the stream path only; "
                         "the fast and resident paths map a shard set's folder")
    if workers is not None and path != "stream":
        raise UsageError(f"workers={workers}: {chosen} reads in the calling process; only path='stream' uses workers")
    if prefetch is not None and path != "fast":
        raise UsageError(f"prefetch={prefetch}: {chosen} does not prefetch; only path='fast' does")
    if sample_counts is not None and local:
        raise UsageError("sample_counts: a shard set's counts come from its manifest; "
                         "sample_counts is for a list of shard URLs")
    if not checksum and not local:
        raise UsageError("checksum=False: a list of shard URLs has no manifest to check against")
    if not checksum and path == "stream":  # it was dropped: every shard still checked
        raise UsageError(f"checksum=False: {chosen} checks each shard as it reads it, every epoch; "
                         "only the fast and resident paths skip their checksum pass")


def _check_a_full_batch(batches, drop_last, samples, split, batch_size, world_size):
    """`NoFullBatch` (a ValueError) where drop_last leaves an epoch no batch: a loop over the loader trained on
    nothing, without a word."""
    if drop_last and batches == 0:
        whose = (f"no rank's share of the {split} split's {samples:,} samples ({world_size} ranks) fills a batch"
                 if world_size > 1 else f"the {split} split's {samples:,} samples fill no batch")
        more = ", fewer ranks" if world_size > 1 else ""
        raise NoFullBatch(f"batch_size={batch_size}, drop_last=True: {whose}, so every epoch would be empty; use a "
                         f"smaller batch_size{more}, or drop_last=False")


def make_loader(shards, split, variant="rgb64", batch_size=256, shuffle=True, seed=0, epoch=0, drop_last=False,
                rank=0, world_size=1, device="cpu", size=None, augment=False, with_keys=False, mean=None, std=None,
                dtype=torch.float32, channels_last=False, workers=None, path="auto", raw=False, prefetch=None,
                checksum=True, sample_counts=None, rrc_scale=RRC_SCALE):
    """Batches of one split of a shard set, ready for a model on `device`.

    shards: a shard set -- a folder from `tinyin shard build`, the URL of one (http(s)://, s3://, gs://:
    the split is fetched into a local cache first, see `cache.cached_copy`, unless path="stream") or a
    `ShardSet` (opened once: pass the same ShardSet to the train, val and test loaders) -- or a list of
    shard URLs / `pipe:` commands / a brace pattern (the stream path; `sample_counts`, per shard, then
    sizes epochs and splits ranks).
    Yields `(images, labels)` (`+ keys` with `with_keys=True`): images float (B, C, H, W) on
    `device`, scaled to [0, 1] and normalised by mean/std (given together, a value per channel;
    default: the train split's stats from the manifest), resized to `size` and augmented when asked (augment: "none", "crop" or
    "rrc", with `rrc_scale`, refused with another, see `DeviceStage`; True means "crop"), as `dtype` (torch.bfloat16 halves them), in
    `channels_last` memory format if asked; or, with `raw=True`, the uint8 (B, H, W[, C])
    batch itself (valid until the next batch is requested; an option of the device stage is refused
    with it, never dropped). Labels int64.
    Same (seed, epoch): same order; `set_epoch` reshuffles. With `world_size > 1` ranks get
    disjoint samples and the same number of batches (full ones with `drop_last=True`; see
    `order.rank_batch_sizes`): a split that cannot give each rank as many is refused (ValueError), as is a
    batch_size that leaves drop_last no batch at all (`order.NoFullBatch`).
    path: "resident" (the split copied to `device` once), "fast" (memory-mapped shards, each batch gathered
    `prefetch` batches ahead by a background thread: default 4 on CUDA, else 0, inline), "stream" (`workers`
    DataLoader processes, default 2, each reading whole shards) or "auto": resident for a local split of up to
    2 GiB, else fast; stream for a list of shard URLs. An option the chosen path does not use, or that does not fit
    the shards given (sample_counts missing with shard URLs, or given with a shard set; a split the set lacks, such
    as a --classes set's 'unlabeled'), is refused as a UsageError (as a device this machine lacks is); a value no argument can take is a ValueError (check_integer, check_variant;
    a device that is none, 'gpu', or that tinyin does not run on, 'mps').
    checksum=False skips the resident and fast paths' background sha256 pass over the split's shards.
    """
    # None or 3 was "None: no such folder", a dict "a list of shard URLs needs sample_counts", a list of
    # numbers was taken, to fail in the stream's workers, and an empty one named every argument of the stream's source
    # ('need shards, batch_size >= 1, ...; got 0 shards, batch_size=256, ...')
    location = (str, os.PathLike, ShardSet)
    if not isinstance(shards, location) and not (isinstance(shards, (list, tuple)) and shards
                                                and all(isinstance(url, (str, os.PathLike)) for url in shards)):
        raise ValueError(f"shards must be a shard set (its folder or URL, or a ShardSet) or a list of shard URLs, "
                         f"not {shards!r}")
    if not isinstance(split, str):  # a list of splits failed as "unhashable type: 'list'"
        raise ValueError(f"split must be one split's name, such as 'train', not {split!r}")
    check_variant(variant)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, not {path!r}")
    for name, value in (("shuffle", shuffle), ("drop_last", drop_last), ("with_keys", with_keys),
                        ("channels_last", channels_last), ("raw", raw), ("checksum", checksum)):
        check_flag(name, value)
    augment_mode(augment)  # a bad value is refused before any shard is opened
    check_device(device, what="device", error=ValueError)  # "cuda" without a GPU: torch's traceback at the first batch
    _check_args(batch_size, seed, epoch, rank, world_size, size, prefetch, workers, mean, std, dtype, variant,
                rrc_scale)
    # numpy integers pass the checks; Python ints from here on (the stream plan multiplied a list by a
    # numpy bool made of batch_size=np.int64(32): TypeError deep inside).
    batch_size, seed, epoch, rank, world_size = (int(v) for v in (batch_size, seed, epoch, rank, world_size))
    size, prefetch, workers = (None if v is None else int(v) for v in (size, prefetch, workers))
    if raw:  # raw batches skip the device stage: its options would be dropped silently
        _refuse_stage_options(size=size, augment=augment, mean=mean, std=std, dtype=dtype, channels_last=channels_last,
                              rrc_scale=rrc_scale)
    elif augment_mode(augment) != "rrc" and _rrc_scale_given(rrc_scale):  # dropped: crops at the default scale, or none
        raise UsageError(f"rrc_scale={rrc_scale!r}: augment={augment!r} draws no random-resized crop; "
                         "only augment='rrc' uses rrc_scale")

    def choose(shard_set):
        """The read path for `shard_set` (None: shard URLs), an option it does not use refused, and on the resident
        and fast paths a batch_size or world_size the split cannot serve: before their storage's data pass starts, and
        before a set URL's split is fetched."""
        chosen = path
        if path == "auto":
            split_bytes = shard_set.counts.get(split, 0) * int(np.prod(VARIANTS[variant][1])) if shard_set else 0
            chosen = "stream" if shard_set is None else "resident" if split_bytes <= RESIDENT_MAX else "fast"
        _refuse_unused(chosen, path == "auto", shard_set is not None, workers, prefetch, sample_counts, checksum)
        if chosen != "stream":
            samples = shard_set.counts[split]
            _check_a_full_batch(len(batch_sizes(samples, world_size=world_size, batch_size=batch_size, drop_last=True)),
                                drop_last, samples, split, batch_size, world_size)
            batch_sizes(samples, world_size=world_size, batch_size=batch_size, drop_last=drop_last)  # even batches
        return chosen

    if is_set_url(shards) and path != "stream":  # a URL reads like a folder: its split fetched once per node
        shards = cached_copy(shards, split, check=choose)  # an option is refused before the download, not after it
    shard_set = None if is_url_list(shards) else open_shard_set(shards)
    if shard_set is not None:  # on every path: the set lacks it ('unlabeled' of a --classes set), a UsageError
        shard_set.check_holds(split)
    path = choose(shard_set)
    keys = None
    if path == "stream":  # a shard set (folder, URL, ShardSet) or a list of shard URLs with sample_counts
        source = stream_source(shards if shard_set is None else shard_set, split, sample_counts=sample_counts,
                               variant=variant, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                               drop_last=drop_last, rank=rank, world_size=world_size,
                               workers=2 if workers is None else workers)
        samples = shard_set.counts[split] if shard_set else sum(sample_counts)  # (stream_source checked them)
        _check_a_full_batch(len(source), drop_last, samples, split, batch_size, world_size)
    else:  # (`choose` checked the batches)
        arrays = ShardArrays(shard_set, split, variant, checksum=False)  # checksums: the storage's data pass
        keys = arrays.keys
        storage = (ResidentStorage(arrays, device, checksum) if path == "resident"
                   else MappedStorage(arrays, checksum))
        if prefetch is None:
            prefetch = 4 if path == "fast" and torch.device(device).type == "cuda" else 0
        source = _LocalSource(storage, batch_size, shuffle, seed, rank, world_size, drop_last, device, prefetch)
    if mean is None:  # shard URLs without explicit stats: map [0, 1] to [-1, 1]
        channels = _channels(variant)
        stats = shard_set.stats(variant) if shard_set else {"mean": [0.5] * channels, "std": [0.5] * channels}
        mean, std = stats["mean"], stats["std"]
    stage = DeviceStage(mean, std, size=size, augment=augment, pad=4 if variant == "rgb64" else 2,
                        rrc_scale=rrc_scale, dtype=dtype, channels_last=channels_last)
    loader = Loader(source, keys, stage, device, with_keys, raw, seed, rank, world_size, batch_size)
    loader.set_epoch(epoch)
    return loader
