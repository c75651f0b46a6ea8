"""The epoch order: which samples a rank reads, in which order. A pure function, nothing else.

One permutation of the split per (seed, epoch), shared by every rank; ranks take interleaved
slices of it. Because the slices interleave, after k equal steps of `batch_size` on every one of
`world_size` ranks the samples consumed are exactly the first `k * batch_size * world_size` of the
permutation: the data state of a run is (seed, epoch, samples consumed), and resuming, on the
same number of ranks or another, is dealing out the rest of the permutation (`start=`).
"""
import hashlib

import numpy as np


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
    if drop_last:
        mine = mine[: (len(rest) // world_size) // batch_size * batch_size]
    return mine


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
