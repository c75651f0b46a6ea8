"""`epoch_order`: the epoch order as a pure function of (seed, epoch, rank, world size, batch size, start)."""
import numpy as np
import pytest

from pipeline.order import (MoreRanksThanSamples, UnevenBatchesOfOne, batch_sizes, check_even_batches,
                            epoch_order, step_seed)
from pipeline.stream_plan import plan_epoch


def test_same_arguments_same_order_and_epochs_differ():
    a = epoch_order(1000, seed=3, epoch=0)
    assert np.array_equal(a, epoch_order(1000, seed=3, epoch=0))
    assert sorted(a.tolist()) == list(range(1000))
    assert not np.array_equal(a, epoch_order(1000, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(1000, seed=4, epoch=0))
    assert np.array_equal(epoch_order(10, seed=3, epoch=5, shuffle=False), np.arange(10))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_are_disjoint_and_equal_with_drop_last(world_size):
    parts = [epoch_order(1003, seed=0, epoch=2, rank=r, world_size=world_size, batch_size=16, drop_last=True)
             for r in range(world_size)]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) % 16 == 0
    assert len(parts[0]) == (1003 // world_size) // 16 * 16
    together = np.concatenate(parts)
    assert len(np.unique(together)) == len(together)
    full = [epoch_order(1003, seed=0, epoch=2, rank=r, world_size=world_size) for r in range(world_size)]
    assert sorted(np.concatenate(full).tolist()) == list(range(1003))


@pytest.mark.parametrize("before, after", [(2, 1), (2, 3), (1, 2), (3, 3)])
def test_a_resume_on_another_world_size_sees_the_rest_exactly_once(before, after):
    n, batch, steps = 1000, 8, 7
    consumed = [epoch_order(n, seed=1, epoch=4, rank=r, world_size=before, batch_size=batch, drop_last=True)[: steps * batch]
                for r in range(before)]
    start = steps * batch * before
    rest = [epoch_order(n, seed=1, epoch=4, rank=r, world_size=after, batch_size=batch, start=start)
            for r in range(after)]
    seen = np.concatenate(consumed + rest)
    assert len(seen) == n and sorted(seen.tolist()) == list(range(n))  # every sample exactly once
    # What was consumed is the permutation's prefix; what follows on one rank is exactly its rest.
    order = epoch_order(n, seed=1, epoch=4)
    assert sorted(np.concatenate(consumed).tolist()) == sorted(order[:start].tolist())
    if after == 1:
        assert np.array_equal(rest[0], order[start:])


def test_same_world_size_resume_continues_the_same_sequence():
    whole = epoch_order(500, seed=2, epoch=1, rank=1, world_size=2, batch_size=10, drop_last=True)
    resumed = epoch_order(500, seed=2, epoch=1, rank=1, world_size=2, batch_size=10, drop_last=True, start=60)
    assert np.array_equal(resumed, whole[30:])


def test_bad_arguments():
    with pytest.raises(ValueError, match="need 0 <= rank < world_size, got rank=2, world_size=2"):
        epoch_order(10, seed=0, epoch=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"start must be between 0 and 10 \(the split's size\), not 11"):
        epoch_order(10, seed=0, epoch=0, start=11)


def test_the_order_and_the_draws_stay_what_checkpoints_were_made_with():
    """A checkpoint holds (seed, epoch, samples consumed), not the order: a change in how the permutation
    or a step's seed is drawn (say, default_rng([epoch, seed])) resumed a run on other samples, some twice
    and some never, and other augmentations, with every other test passing. Pinned here."""
    assert epoch_order(10, seed=0, epoch=0).tolist() == [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]
    assert epoch_order(10, seed=0, epoch=1).tolist() == [9, 1, 3, 8, 7, 6, 0, 4, 2, 5]
    assert epoch_order(10, seed=1, epoch=0).tolist() == [8, 4, 7, 0, 1, 2, 5, 9, 6, 3]
    assert (step_seed(0, 0, 0, 0), step_seed(1, 2, 3, 4)) == (2235979303852607087, 9187138123186481832)


def test_step_seed_depends_on_every_part():
    seeds = {step_seed(s, e, r, t) for s in (0, 1) for e in (0, 1) for r in (0, 1) for t in (0, 1)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)
    assert step_seed(0, 1, 2, 3) == step_seed(0, 1, 2, 3)


def test_with_drop_last_a_rank_with_one_sample_more_gets_no_extra_batch():
    """26 samples on 3 ranks deal 9, 9 and 8: with batches of 3 the first two ranks could fill 3 batches,
    the third only 2. Every rank must stop after 2 (a rank with a step more than the others waits
    forever in its all-reduce), and the 8 samples left out are the permutation's last ones."""
    parts = [epoch_order(26, seed=0, epoch=0, rank=r, world_size=3, batch_size=3, drop_last=True) for r in range(3)]
    assert [len(p) for p in parts] == [6, 6, 6]
    order = epoch_order(26, seed=0, epoch=0)
    assert sorted(np.concatenate(parts).tolist()) == sorted(order[:18].tolist())


def test_each_rank_orders_as_many_samples_as_its_batches_take():
    """The loader cuts a rank's `epoch_order` into `batch_sizes`: samples past their sum were never read, a sum past
    the order's end cut short batches. With drop_last the order's length was its own rule, written beside
    `rank_batch_sizes`' (n // world_size // batch_size batches); `epoch_order` now takes it from there."""
    for n, world_size, batch_size, start in [(1003, 3, 16, 0), (26, 3, 3, 0), (97, 2, 16, 32), (500, 4, 7, 61),
                                             (10, 4, 3, 0), (10, 1, 20, 4), (30, 4, 7, 30), (96, 2, 16, 0)]:
        for drop_last in (True, False):
            for rank in range(world_size):
                args = dict(rank=rank, world_size=world_size, batch_size=batch_size, drop_last=drop_last, start=start)
                assert len(epoch_order(n, seed=5, epoch=1, **args)) == sum(batch_sizes(n, **args)), (n, args)


def test_start_may_be_the_whole_split_and_not_below_zero():
    """A checkpoint at the end of an epoch resumes with start == n: nothing left, not an error; a
    negative start would deal the permutation's last samples, so it is refused."""
    assert epoch_order(10, seed=0, epoch=0, start=10).tolist() == []
    with pytest.raises(ValueError, match=r"^start must be between 0 and 10 \(the split's size\), not -3$"):
        epoch_order(10, seed=0, epoch=0, start=-3)


def test_a_rank_a_sample_short_splits_its_last_batch_and_a_resume_before_it_sees_the_same_batches():
    """97 samples on 2 ranks in batches of 16: 49 and 48, so rank 0 has 3 batches and one of a sample; rank 1
    splits its last batch so that it takes 4 too. Every batch before stays full: resumed after 1 or 2 steps
    (start 32, 64), each rank's batches are those of the uninterrupted epoch from there."""
    def batches(rank, start):
        order = epoch_order(97, seed=1, epoch=0, rank=rank, world_size=2, batch_size=16, start=start)
        sizes = batch_sizes(97, rank=rank, world_size=2, batch_size=16, start=start)
        return [part.tolist() for part in np.split(order, np.cumsum(sizes)[:-1])]
    assert [[len(b) for b in batches(r, 0)] for r in (0, 1)] == [[16, 16, 16, 1], [16, 16, 8, 8]]
    for start, step in ((32, 1), (64, 2)):
        assert all(batches(r, start) == batches(r, 0)[step:] for r in (0, 1))


def test_ranks_that_cannot_take_as_many_batches_are_told_apart_by_the_class_of_the_refusal():
    """train.py words its own advice for each cause: it caught check_even_batches' ValueError and told the two
    apart by `count < world_size`, the rule written a second time. Each cause is now a ValueError class of its own."""
    with pytest.raises(MoreRanksThanSamples, match=r"^world_size=32: 2 of the ranks would have no batch of the 30 "):
        check_even_batches(30, 32, 8)
    with pytest.raises(MoreRanksThanSamples):  # no sample on a rank, whatever the batch size
        check_even_batches(30, 32, 1)
    with pytest.raises(UnevenBatchesOfOne, match=r"^batch_size=1: 2 of the 4 ranks would take a batch fewer "):
        check_even_batches(30, 4, 1)
    assert not issubclass(MoreRanksThanSamples, UnevenBatchesOfOne) and not issubclass(UnevenBatchesOfOne,
                                                                                       MoreRanksThanSamples)
    assert issubclass(MoreRanksThanSamples, ValueError) and issubclass(UnevenBatchesOfOne, ValueError)
    assert [check_even_batches(30, 4, 7), check_even_batches(32, 32, 1), check_even_batches(0, 4, 1)] == [2, 1, 0]


def test_a_rank_a_batch_short_splits_its_last_batch_on_the_local_paths_and_spreads_it_on_the_stream():
    """One rule for both (`rank_batch_sizes`), with one difference that each path needs. 97 samples on 2 ranks in
    batches of 16 are 49 and 48: rank 1 holds 3 batches of the 4 rank 0 takes. The resident and fast paths split its
    last batch (16, 16, 8, 8): a resume deals the rest from start = steps * 16 * 2, on any number of ranks, so every
    batch before that one must be full. The stream path spreads its 48 over 4 batches of 12: it resumes by batch on
    the same ranks only, and its plan is what stream checkpoints were made with."""
    assert [batch_sizes(97, rank=r, world_size=2, batch_size=16) for r in (0, 1)] == [[16, 16, 16, 1], [16, 16, 8, 8]]
    assert [plan_epoch([49, 48], seed=0, epoch=0, rank=r, world_size=2, batch_size=16).sizes
            for r in (0, 1)] == [[16, 16, 16, 1], [12, 12, 12, 12]]
    # The local paths' reason: after k full steps the ranks have read the first k * 32 samples of the permutation.
    permutation = epoch_order(97, seed=1, epoch=0)
    orders = [epoch_order(97, seed=1, epoch=0, rank=r, world_size=2) for r in (0, 1)]
    for steps in (1, 2):
        read = np.concatenate([orders[r][:sum(batch_sizes(97, rank=r, world_size=2, batch_size=16)[:steps])]
                               for r in (0, 1)])
        assert sorted(read) == sorted(permutation[:steps * 32])
