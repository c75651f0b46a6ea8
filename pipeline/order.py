"""The epoch order: which samples a rank reads, in which order. A pure function, nothing else.

One permutation of the split per (seed, epoch), shared by every rank; ranks take interleaved
slices of it. Because the slices interleave, after k equal steps of `batch_size` on every one of
`world_size` ranks the samples consumed are exactly the first `k * batch_size * world_size` of the
permutation: the data state of a run is (seed, epoch, samples consumed), and resuming, on the
same number of ranks or another, is dealing out the rest of the permutation (`start=`).
"""
import hashlib

import numpy as np

from .errors import plural


def epoch_order(n, *, seed, epoch, rank=0, world_size=1, batch_size=1, shuffle=True, drop_last=False, start=0):
    """This rank's sample positions (int64) for one epoch of an `n`-sample split, in order.

    start: samples of this epoch already consumed, counted over all ranks (a prefix of the
    permutation); the rest is dealt to this run's `world_size` ranks. With `drop_last` every rank
    gets the same number of full batches, and the few samples that do not fill one are left out.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    check_start(n, start)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n, dtype=np.int64)
    rest = order[start:]
    mine = rest[rank::world_size]
    if drop_last:  # as many as this rank's full batches take (`rank_batch_sizes`), the same on every rank
        mine = mine[: sum(batch_sizes(n, rank=rank, world_size=world_size, batch_size=batch_size, drop_last=True,
                                      start=start))]
    return mine


def batch_sizes(n, *, rank=0, world_size=1, batch_size=1, drop_last=False, start=0):
    """The sizes of the batches this rank cuts its `epoch_order` into (`rank_batch_sizes`: the same number on every
    rank): the rest of the split after `start` is dealt a sample apart, the first `(n - start) % world_size` ranks
    holding one more. A rank a batch short of the others splits its last batch in two, so that every batch before it
    stays full (`rank_batch_sizes` says why these paths need that, and the stream path does not).
    """
    check_start(n, start)
    share, longer = divmod(n - start, world_size)  # `longer` ranks hold share + 1 samples
    return rank_batch_sizes(share + (rank < longer), n - start, world_size, batch_size, drop_last)


def rank_batch_sizes(held, n, world_size, batch_size, drop_last, spread=False):
    """The sizes of the batches a rank holding `held` of `n` samples, dealt to `world_size` ranks a sample apart at
    most, cuts them into: the same number on every rank, as DDP needs (a rank with a batch fewer never joins the
    others' last all-reduce: they wait on it for good). The resident and fast paths' rule (`batch_sizes`) and the
    stream path's (`stream_plan.plan_epoch`, `spread=True`), which differ in one case only.

    With `drop_last` every batch is full: n // world_size // batch_size of them, the rest unused this epoch.
    Otherwise every sample is read once, in as many batches as the ranks holding most need (`check_even_batches`,
    which refuses ranks that cannot take that many): full ones and a short last one. Where a rank holding a sample
    fewer than the others holds a whole number of batches, it has a batch too few, and makes it up so:
    - the resident and fast paths (`spread=False`) split its last batch in two. Every batch before it stays full, so
      after k steps the ranks have read exactly the first k * batch_size * world_size samples of the permutation:
      the `start` a resume deals the rest from, on these ranks or on another number of them (a rank that spread its
      samples would have read fewer by then, and a resume from there leave the others unread that epoch).
    - the stream path (`spread=True`) spreads its samples evenly over the batches (97 samples on 2 ranks in batches
      of 16: 48 in 4 batches of 12, where the local paths cut 16, 16, 8, 8). It resumes by batch, on the same ranks
      only, so needs no full batches; and a stream checkpoint holds no plan, only where the epoch stopped: a rank
      cut otherwise would resume an epoch saved by an earlier tinyin on other samples (the checkpoint's deal
      version, `stream_plan.DEAL`, would have to change with it).
    """
    if drop_last:
        return [batch_size] * (n // world_size // batch_size)
    batches = check_even_batches(n, world_size, batch_size)
    full, last = divmod(held, batch_size)
    if full + (last > 0) == batches:
        return [batch_size] * full + [last] * (last > 0)
    if spread:
        base, extra = divmod(held, batches)
        return [base + 1] * extra + [base] * (batches - extra)
    return [batch_size] * (full - 1) + [batch_size - batch_size // 2, batch_size // 2]


class MoreRanksThanSamples(ValueError):
    """`check_even_batches`: some ranks would hold no sample, so no batch."""


class UnevenBatchesOfOne(ValueError):
    """`check_even_batches`: in batches of 1, the ranks holding a sample fewer would take a batch fewer."""


class NoFullBatch(ValueError):
    """`loader.make_loader`: with drop_last, an epoch would hold no batch (a batch_size above a rank's share)."""


def check_even_batches(n, world_size, batch_size):
    """The batches each rank takes of `n` samples dealt to `world_size` ranks a sample apart at most (the local
    paths' interleaved deal, the stream path's shards), without drop_last: as many as the ranks holding most need.
    A ValueError, the same on every rank, where the others cannot take that many, one class per cause (a caller
    words its own advice by the class, without this rule again): `MoreRanksThanSamples`, a rank with no sample;
    `UnevenBatchesOfOne`, in batches of 1, the ranks holding a sample fewer."""
    share, longer = divmod(n, world_size)  # `longer` ranks hold share + 1 samples
    batches = -(-(share + (longer > 0)) // batch_size)
    if share == 0 and longer:
        raise MoreRanksThanSamples(f"world_size={world_size}: {world_size - longer} of the ranks would have no batch "
                                   f"of the {n} {plural(n, 'sample')} to read, and DDP would wait on them for good; "
                                   f"use at most {longer} {plural(longer, 'rank')}")
    if share < batches:  # batch_size=1: the ranks one sample short have no batch to split or spread
        raise UnevenBatchesOfOne(f"batch_size=1: {world_size - longer} of the {world_size} ranks would take a batch "
                                 "fewer than the others (they hold a sample fewer), and DDP would wait on them for "
                                 "good; use a batch_size of at least 2, or drop_last=True")
    return batches


def check_start(n, start):
    """ValueError unless `start` (samples of the epoch already consumed) lies within an `n`-sample split."""
    if not 0 <= start <= n:
        raise ValueError(f"start must be between 0 and {n} (the split's size), not {start}")


def step_seed(seed, epoch, rank, step):
    """A 63-bit seed for the augmentation of one batch, from (seed, epoch, rank, step) only:
    where a resume split the epoch does not change what any step draws.

    A hash of the four numbers (~3 µs), not numpy's SeedSequence (~35 µs): it runs once a step,
    on the host, where a small model's GPU step is a few hundred µs of kernel launches."""
    digest = hashlib.blake2b(f"{seed},{epoch},{rank},{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
