"""The stream path's epoch plan: which shards a rank reads, how their samples are mixed and cut into
batches. A pure function of the per-shard counts and (seed, epoch, rank, world_size, batch_size):
nothing is read here, and the workers of `stream.StreamSource` only carry a plan out, so the batches
are the same with 0, 1 or 2 workers and a resumed epoch (`start=`) yields exactly the batches the
uninterrupted one would have from there (on the same number of ranks).

Why not `order.epoch_order` (the local paths' plan): a stream worker holds a few whole shards in
memory at a time, so a batch can only draw from the shards being read, and ranks are dealt shards
(one sequential transfer each; only the few cut to even the ranks out are read by two) instead of
interleaved samples.
"""
from typing import NamedTuple

import numpy as np

from .order import check_start, rank_batch_sizes

LANES = 2  # shard groups read side by side (one per worker); consecutive batches alternate between them
MIX = 2  # shards per group: a batch draws from the union of this many shards, fully shuffled


class Chunk(NamedTuple):
    """Samples of one batch that come from one shard group: what a worker gathers in one copy."""

    seq: int  # position in the epoch's chunk sequence
    batch: int  # the batch it belongs to (a batch that straddles two groups has two chunks)
    lane: int  # the group's lane: worker `lane % workers` reads it
    group: int  # index into EpochPlan.groups
    ids: np.ndarray  # int64 positions in the split (index order), in batch order


class EpochPlan(NamedTuple):
    """One rank's epoch: shard groups (tuples of shard numbers), batch sizes of the whole epoch,
    the first batch to yield (a resumed epoch skips the others) and the chunks from there on."""

    groups: list
    sizes: list
    first: int
    chunks: list


DEAL = 2  # the deal's version, saved in checkpoints: 1 dealt whole shards only (ranks a shard apart)


def deal_shards(counts, order, world_size, rng=None):
    """Every rank's [(shard, rows)] and sample totals, which differ by at most one.

    Shards go largest first to the rank with the fewest samples so far, whole: one sequential
    read each. That leaves totals up to one shard apart, and drop_last would cut every rank to
    the smallest (3 ranks over 10 equal shards: 89,856 of 100,000 samples an epoch). So ranks
    above their share then hand their surplus, off the end of their last shards, to the ranks
    below it: a shard cut so is read whole by each rank that holds part of it, at most
    world_size - 1 extra shard reads an epoch. rng (shuffled epochs) draws which rows move
    (shards are written in build order); without it they are the shard's last rows.
    The same holds with fewer shards than ranks: the ranks dealt none take their share from the others.
    """
    deals, totals = [[] for _ in range(world_size)], [0] * world_size
    for s in sorted(order, key=lambda s: -counts[s]):  # stable: equal counts keep the shuffled order
        r = totals.index(min(totals))
        deals[r].append((s, np.arange(counts[s])))
        totals[r] += counts[s]
    # Each rank's share: the extra ones go to the ranks holding most, so the fewest rows move.
    base, extra = divmod(sum(totals), world_size)
    share = [base] * world_size
    for r in sorted(range(world_size), key=lambda r: -totals[r])[:extra]:
        share[r] += 1
    surplus = []  # (shard, rows) handed on, in rank order
    for r in range(world_size):
        while totals[r] > share[r]:
            s, rows = deals[r].pop()
            if rng is not None:
                rows = rows[rng.permutation(len(rows))]
            give = min(totals[r] - share[r], len(rows))
            keep, moved = np.sort(rows[: len(rows) - give]), np.sort(rows[len(rows) - give:])
            if len(keep):
                deals[r].append((s, keep))
            surplus.append((s, moved))
            totals[r] -= give
    for r in range(world_size):
        while totals[r] < share[r]:
            s, rows = surplus.pop(0)
            take = min(share[r] - totals[r], len(rows))
            deals[r].append((s, rows[:take]))
            if take < len(rows):
                surplus.insert(0, (s, rows[take:]))
            totals[r] += take
    return deals, totals


def plan_epoch(counts, *, seed, epoch, rank=0, world_size=1, batch_size=256, shuffle=True, drop_last=False,
               start=0, lanes=LANES, mix=MIX):
    """The `EpochPlan` of `rank` for shards of `counts` samples (a pure function, nothing is read).

    1. The shards are shuffled by (seed, epoch), the same on every rank, and dealt (`deal_shards`:
       every rank gets as many samples as any other, give or take one);
       a rank shuffles its own shards again and takes them `mix` at a time as groups.
    2. A group's samples are permuted as a whole (the worker holds them all in memory); groups go
       round-robin to `lanes`, a lane's samples are cut into pieces of `batch_size`, and the rank's
       sample sequence takes one piece from each lane in turn (neighbouring batches never share a
       group, and each lane is one worker's sequential read).
    3. The sequence is cut into batches (`order.rank_batch_sizes`: as many on every rank; a rank a batch short of
       the others spreads its samples over them, where the local paths split their last); a batch's samples from
       one group form a chunk.
    start: samples of this epoch already consumed over all ranks, a multiple of
    batch_size * world_size (or the whole epoch, also with drop_last: nothing is left): the batches before
    it are left out, the rest are unchanged.
    """
    if not 0 <= rank < world_size or batch_size < 1 or lanes < 1 or mix < 1:
        raise ValueError(f"need 0 <= rank < world_size, batch_size, lanes, mix >= 1; got rank={rank}, "
                         f"world_size={world_size}, batch_size={batch_size}, lanes={lanes}, mix={mix}")
    # Past the split, as the local paths refuse it: 256 of 240 samples in batches of 64 was taken for the end of the
    # epoch (4 batches, the last of 48), where the resident and fast paths refused it.
    check_start(sum(counts), start)
    # The whole epoch, its last batch short (train.py's checkpoint before validation, or at the epoch's last
    # step): refused as no multiple, a resume from it failed in a traceback. With drop_last too: a run without it
    # (train.py without --compile) consumed the whole epoch, and its resume under --compile (drop_last) failed so.
    whole = start == sum(counts)
    if start % (batch_size * world_size) and not whole:
        raise ValueError(f"start={start} is not a multiple of batch_size * world_size = {batch_size * world_size}")
    counts = [int(c) for c in counts]
    first_id = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    order = list(np.random.default_rng([seed, epoch]).permutation(len(counts))) if shuffle else list(range(len(counts)))
    deals, totals = deal_shards(counts, order, world_size,
                                np.random.default_rng([seed, epoch, world_size]) if shuffle else None)
    sizes = rank_batch_sizes(totals[rank], sum(totals), world_size, batch_size, drop_last, spread=True)
    first = len(sizes) if whole else start // (batch_size * world_size)  # at most len(sizes), start within the split
    mine = deals[rank]
    if shuffle:
        mine = [mine[i] for i in np.random.default_rng([seed, epoch, rank]).permutation(len(mine))]
    groups = [mine[i:i + mix] for i in range(0, len(mine), mix)]

    lane_ids, lane_groups = [[] for _ in range(lanes)], [[] for _ in range(lanes)]
    for g, group in enumerate(groups):
        ids = np.concatenate([first_id[s] + rows for s, rows in group])
        if shuffle:
            ids = ids[np.random.default_rng([seed, epoch, rank, g]).permutation(len(ids))]
        lane_ids[g % lanes].append(ids)
        lane_groups[g % lanes].append(np.full(len(ids), g))
    pieces = []  # (ids, groups) pieces of batch_size, taken from the lanes in turn
    for ids, grp in zip(lane_ids, lane_groups):
        ids, grp = np.concatenate(ids or [np.zeros(0, np.int64)]), np.concatenate(grp or [np.zeros(0, np.int64)])
        pieces.append([(ids[i:i + batch_size], grp[i:i + batch_size]) for i in range(0, len(ids), batch_size)])
    turns = [lane[i] for i in range(max(map(len, pieces))) for lane in pieces if i < len(lane)]
    ids = np.concatenate([t[0] for t in turns]) if turns else np.zeros(0, np.int64)
    grp = np.concatenate([t[1] for t in turns]) if turns else np.zeros(0, np.int64)

    bounds = np.cumsum([0] + sizes)
    cuts = np.union1d(bounds, np.flatnonzero(np.diff(grp[: bounds[-1]])) + 1)  # batch and group boundaries
    chunks = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        batch = int(np.searchsorted(bounds, lo, side="right")) - 1
        if batch >= first:
            g = int(grp[lo])
            # Sorted: a batch is the same random subset, read shard by shard and front to back.
            chunks.append(Chunk(len(chunks), batch, g % lanes, g, np.sort(ids[lo:hi])))
    return EpochPlan([tuple(s for s, _ in group) for group in groups], sizes, first, chunks)
