"""The streaming read path: same samples as the fast path, whole shards sliced in memory, a plan
that is a pure function (exactly once, equal batches per rank, mid-epoch starts), the same
batches from a folder, HTTP, S3 and `pipe:` commands, and loud (ShardError naming the URL) or
retried on any missing, short, corrupt or cut-off shard."""

import gc
import itertools
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline.build import build_shards
from pipeline.errors import ShardError, UsageError
from pipeline.index import read_index
from pipeline.loader import make_loader
from pipeline.reader import ShardArrays
from pipeline.shardset import RETRIES, open_shard_set
from pipeline.cache import is_set_url
from pipeline.stream import _Failure, _Lanes, is_url_list, stream_from_set, stream_from_urls
from pipeline.stream_plan import deal_shards, plan_epoch
from pipeline.stream_read import Shard, read_checked
from pipeline.synth import synthesize
from servers import FaultyHTTPServer

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_BYTES = 16896  # one sample's four tar members (see tarshard)
COUNTS = [50, 50, 50, 50, 40]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """train: 240 samples in shards of 50, 50, 50, 50, 40; val: 30 samples in one shard."""
    root = tmp_path_factory.mktemp("stream")
    synthesize(root / "release", classes=6, train_per_class=40, val_per_class=10, test=20, progress=False)
    build_shards(root / "release", root / "shards", workers=1, shard_size=50, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def http(shards):
    """The shard set on a loopback HTTP server with no faults."""
    server = FaultyHTTPServer(shards)
    yield server
    server.close()


@pytest.fixture(autouse=True)
def no_hang_no_leak():
    """A hang fails the test instead of stalling the suite; no DataLoader worker outlives a test."""
    def hung(signum, frame):  # without a handler SIGALRM would end the whole pytest process
        raise TimeoutError("the test hung for 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
    assert multiprocessing.active_children() == []


def _epoch(source):
    """All batches of one epoch as (sizes, keys, labels, images)."""
    sizes, keys, labels, images = [], [], [], []
    for batch_images, batch_labels, batch_keys in source:
        assert batch_images.dtype == torch.uint8 and batch_labels.dtype == torch.int64
        assert len(batch_images) == len(batch_labels) == len(batch_keys)
        sizes.append(len(batch_keys))
        keys += batch_keys
        labels.append(batch_labels)
        images.append(batch_images.clone())
    return sizes, keys, torch.cat(labels).numpy(), torch.cat(images).numpy()


def _kept(source):
    """Every batch of `source`, its images copied: a worker's batch buffer is reused after the next."""
    return [(images.clone(), labels, keys) for images, labels, keys in source]


def _same(a, b):
    """Two epochs (from `_epoch`) equal batch for batch, byte for byte."""
    assert a[0] == b[0] and a[1] == b[1]
    assert np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])


def _urls(shards, split="train"):
    return sorted(str(p) for p in shards.glob(f"{split}-*.tar"))


@pytest.mark.parametrize("variant,workers", [("rgb64", 2), ("gray28", 0)])
def test_same_samples_as_fast_path(shards, variant, workers):
    sizes, keys, labels, images = _epoch(stream_from_set(shards, "train", variant=variant, batch_size=32,
                                                          workers=workers))
    arrays = ShardArrays(shards, "train", variant)
    assert sorted(keys) == sorted(arrays.keys) and len(set(keys)) == len(arrays)  # each exactly once
    at = {k: i for i, k in enumerate(arrays.keys)}
    idx = np.array([at[k] for k in keys])
    assert np.array_equal(labels, arrays.labels[idx])
    order = np.argsort(idx)  # gather wants sorted positions
    assert np.array_equal(images[order], arrays.gather(idx[order]).numpy())  # byte for byte
    assert images.shape[1:] == arrays.shape
    assert sizes == [32] * 7 + [16]


@pytest.mark.parametrize("how", ["zip", "threads"])
def test_two_epochs_in_flight_at_once_each_get_their_own_batches(shards, how):
    """Two iterators of one source (zipped, or in two threads) shared its workers' batch buffers:
    each overwrote the other's images (592 of 2,000 under the wrong key in a tester's run)."""
    import threading

    source = stream_from_set(shards, "train", batch_size=16, workers=2, seed=7)
    alone = _epoch(source)
    if how == "zip":
        pairs = [(a[0].clone(), a[1], a[2], b[0].clone(), b[1], b[2]) for a, b in zip(source, source)]
        got = [[(p[0], p[1], p[2]) for p in pairs], [(p[3], p[4], p[5]) for p in pairs]]
    else:
        got, start = [None, None], threading.Barrier(2)

        def one(i):
            start.wait()
            got[i] = _kept(source)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    for epoch in got:
        _same(alone, (alone[0], [k for _, _, keys in epoch for k in keys],
                      torch.cat([labels for _, labels, _ in epoch]).numpy(),
                      torch.cat([images for images, _, _ in epoch]).numpy()))
    assert source._busy is False and source._pool is not None  # the first epoch's buffers, kept for the next


def test_batches_do_not_depend_on_workers(shards):
    runs = [_epoch(stream_from_set(shards, "train", batch_size=24, workers=w, seed=5, epoch=1)) for w in (0, 1, 2)]
    _same(runs[0], runs[1])
    _same(runs[0], runs[2])


def test_deterministic_per_seed_and_epoch(shards):
    source = stream_from_set(shards, "train", batch_size=32, workers=0, seed=3)
    first = _epoch(source)[1]
    assert _epoch(stream_from_set(shards, "train", batch_size=32, workers=0, seed=3))[1] == first
    source.set_epoch(1)
    second = _epoch(source)[1]
    assert second != first and sorted(second) == sorted(first)
    assert _epoch(stream_from_set(shards, "train", batch_size=32, workers=0, seed=4))[1] != first
    source.set_epoch(0)
    assert _epoch(source)[1] == first


def test_plan_mixes_shards_and_alternates_groups():
    """Groups of two shards, permuted as a whole; consecutive batches come from different groups."""
    plan = plan_epoch([100] * 8, seed=0, epoch=0, batch_size=20)
    assert sorted(s for g in plan.groups for s in g) == list(range(8)) and all(len(g) == 2 for g in plan.groups)
    shards_in = [set((c.ids // 100).tolist()) for c in plan.chunks]
    assert all(len(s) == 2 for s in shards_in)  # a batch draws from both shards of its group
    groups = [c.group for c in plan.chunks]
    assert all(a != b for a, b in zip(groups, groups[1:]))
    unshuffled = plan_epoch([100] * 8, seed=0, epoch=0, batch_size=20, shuffle=False)
    assert np.array_equal(np.concatenate([c.ids for c in unshuffled.chunks if c.group == 0]), np.arange(200))


@pytest.mark.parametrize("drop_last", [False, True])
def test_plan_is_exactly_once_with_equal_batches(drop_last):
    """The rule on bigger, uneven counts, straight from the pure function: nothing is read."""
    counts = [1000] * 9 + [337]
    for world_size in (1, 3, 4, 12):
        plans = [plan_epoch(counts, seed=1, epoch=2, rank=r, world_size=world_size, batch_size=64,
                            drop_last=drop_last) for r in range(world_size)]
        assert len({len(p.sizes) for p in plans}) == 1
        ids = np.concatenate([c.ids for p in plans for c in p.chunks])
        assert len(np.unique(ids)) == len(ids)
        for p in plans:
            assert [sum(len(c.ids) for c in p.chunks if c.batch == b) for b in range(len(p.sizes))] == p.sizes
        if drop_last:
            assert all(s == 64 for p in plans for s in p.sizes)
        else:
            assert np.array_equal(np.sort(ids), np.arange(sum(counts)))
    assert plan_epoch(counts, seed=0, epoch=0, batch_size=256).sizes == [256] * 36 + [9337 - 36 * 256]
    with pytest.raises(ValueError, match="^batch_size=1: 1 of the 2 ranks would take a batch fewer than the others"):
        plan_epoch([1000, 1], seed=0, epoch=0, batch_size=1, world_size=2)
    # as many samples as batches: one each, no refusal (3 and 2 samples in 2 batches of 2)
    assert plan_epoch([3, 2], seed=0, epoch=0, batch_size=2, world_size=2, rank=1).sizes == [1, 1]
    # with drop_last every rank steps alike: rank 0's 3 samples would fill a batch of 3, rank 1's 2 cannot, so none
    assert [plan_epoch([3, 2], seed=0, epoch=0, batch_size=3, world_size=2, rank=r, drop_last=True).sizes
            for r in range(2)] == [[], []]
    with pytest.raises(ValueError, match="not a multiple of batch_size"):
        plan_epoch(counts, seed=0, epoch=0, batch_size=64, world_size=2, start=64)


def test_the_stream_plan_stays_what_checkpoints_were_made_with():
    """A stream checkpoint holds (seed, epoch, samples consumed, DEAL), not the plan: a change in the deal (which
    rank gets which shard, which rows move), the shuffles, the lanes or the spread of a short rank's batches
    would resume a run on other samples, some twice and some never. 3 ranks, shards of uneven counts: shard 0
    and shard 3 cut between ranks, a rank of two groups (a batch straddling them), a rank's batches spread."""
    got = []
    for rank in range(3):
        plan = plan_epoch([9, 3, 5, 2, 6, 4], seed=4, epoch=1, rank=rank, world_size=3, batch_size=3)
        got.append(([tuple(int(s) for s in g) for g in plan.groups], plan.sizes,
                    [(c.batch, c.lane, c.group, c.ids.tolist()) for c in plan.chunks]))
    assert got == [
        ([(3, 0)], [3, 3, 3, 1], [(0, 0, 0, [3, 6, 8]), (1, 0, 0, [0, 1, 4]), (2, 0, 0, [2, 5, 18]), (3, 0, 0, [7])]),
        ([(1, 3), (4,)], [3, 3, 3, 1], [(0, 0, 0, [10, 11, 17]), (1, 1, 1, [19, 20, 22]), (2, 0, 0, [9]),
                                        (2, 1, 1, [23, 24]), (3, 1, 1, [21])]),
        ([(5, 2)], [3, 2, 2, 2], [(0, 0, 0, [12, 16, 28]), (1, 0, 0, [15, 27]), (2, 0, 0, [13, 14]), (3, 0, 0, [25, 26])]),
    ]
    # 4 ranks: shard 4 cut three ways (rows it keeps and rows it hands on, both in row order), a rank of two groups
    plans = [plan_epoch([8, 10, 11, 6, 7, 8], seed=4, epoch=1, rank=r, world_size=4, batch_size=3) for r in range(4)]
    assert [([tuple(int(s) for s in g) for g in p.groups], p.sizes, [(c.batch, c.ids.tolist()) for c in p.chunks])
            for p in plans] == [
        ([(4, 2)], [3, 3, 2, 2, 2], [(0, [26, 27, 36]), (1, [18, 21, 24]), (2, [19, 22]), (3, [23, 28]), (4, [20, 25])]),
        ([(4, 3), (1,)], [3, 3, 2, 2, 2], [(0, [31, 41]), (0, [13]), (1, [8, 11, 15]), (2, [9, 12]), (3, [14, 16]),
                                           (4, [10, 17])]),
        ([(4, 5)], [3, 3, 3, 3, 1], [(0, [40, 44, 49]), (1, [38, 39, 45]), (2, [37, 47, 48]), (3, [42, 43, 46]), (4, [35])]),
        ([(3, 0)], [3, 3, 3, 3, 1], [(0, [0, 6, 33]), (1, [1, 7, 32]), (2, [4, 29, 34]), (3, [2, 5, 30]), (4, [3])]),
    ]
    # 17 samples dealt 6, 5, 6: the one extra sample each goes to the ranks holding most (0 and 2), so none moves
    assert [[tuple(int(s) for s in g) for g in plan_epoch([6, 5, 4, 2], seed=0, epoch=0, rank=r, world_size=3,
                                                            batch_size=2, shuffle=False).groups] for r in range(3)] == [
        [(0,)], [(1,)], [(2, 3)]]
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        plan_epoch([6, 5, 4, 2], seed=0, epoch=0, rank=3, world_size=3)


def test_ranks_get_even_shares_of_uneven_shards():
    """Whole shards only, 3 ranks over the real train split's 10 shards used 89,856 of 100,000 samples an
    epoch with drop_last (4 or 8 ranks 79,872): every rank was cut to the rank dealt the fewest. Ranks
    above their share now hand the surplus on, so every rank holds 100,000 / world_size, give or take one."""
    counts = [10000] * 10
    used = {}
    for world_size in (1, 2, 3, 4, 8, 12):
        plans = [plan_epoch(counts, seed=0, epoch=1, rank=r, world_size=world_size, batch_size=256, drop_last=True)
                 for r in range(world_size)]
        ids = np.concatenate([c.ids for p in plans for c in p.chunks])
        assert len(np.unique(ids)) == len(ids)
        used[world_size] = len(ids)
        held = deal_shards(counts, list(range(10)), world_size)[1]
        assert max(held) - min(held) <= 1
        reads = sum(len({s for g in p.groups for s in g}) for p in plans)
        assert reads <= 10 + world_size - 1  # a shard cut between ranks is read by each
    assert used == {1: 99840, 2: 99840, 3: 99840, 4: 99328, 8: 98304, 12: 98304}
    assert [[(s, rows.tolist()) for s, rows in deal] for deal in deal_shards([3, 3, 3, 3], [2, 0, 3, 1], 2)[0]] \
        == [[(2, [0, 1, 2]), (3, [0, 1, 2])], [(0, [0, 1, 2]), (1, [0, 1, 2])]]  # even already: whole shards
    moved = [deal_shards(counts, list(range(10)), 3, np.random.default_rng([0, e]))[0][2][-1] for e in range(2)]
    assert moved[0][0] == moved[1][0] and not np.array_equal(moved[0][1], moved[1][1])  # drawn, not the tail


def test_plan_start_is_the_uninterrupted_tail():
    counts = [1000] * 9 + [337]
    for world_size, drop_last in ((1, False), (2, True), (3, False)):
        for rank in range(world_size):
            whole = plan_epoch(counts, seed=7, epoch=1, rank=rank, world_size=world_size, batch_size=50,
                               drop_last=drop_last)
            for k in (0, 1, 37, len(whole.sizes) - 1, len(whole.sizes)):  # the end: the epoch, or its full batches
                part = plan_epoch(counts, seed=7, epoch=1, rank=rank, world_size=world_size, batch_size=50,
                                  drop_last=drop_last, start=min(k * 50 * world_size, sum(counts)))
                assert part.first == k and part.sizes == whole.sizes
                tail = [c for c in whole.chunks if c.batch >= k]
                assert [(c.batch, c.group, c.ids.tolist()) for c in part.chunks] == \
                       [(c.batch, c.group, c.ids.tolist()) for c in tail]
    whole = plan_epoch(counts, seed=7, epoch=1, batch_size=50, start=sum(counts))  # 186 batches of 50 and one of 37
    assert (whole.first, len(whole.sizes), whole.chunks) == (187, 187, [])
    for start in (187 * 50, 188 * 50, sum(counts) + 1):  # the end of the short last batch, a batch past it, a sample
        with pytest.raises(ValueError) as e:
            plan_epoch(counts, seed=7, epoch=1, batch_size=50, start=start)
        assert str(e.value) == f"start must be between 0 and 9337 (the split's size), not {start}"
    # With drop_last as well (a run without it consumed the epoch, its resume has it): 186 full batches, none left.
    whole = plan_epoch(counts, seed=7, epoch=1, batch_size=50, drop_last=True, start=sum(counts))
    assert (whole.first, len(whole.sizes), whole.chunks) == (186, 186, [])


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("split,world_size,workers", [("train", 2, 2), ("train", 3, 0), ("val", 2, 2)])
def test_ranks_and_workers(shards, split, world_size, workers, drop_last):
    """Disjoint ranks, equal batch counts, len() == what is yielded; val has 1 shard for 2 ranks."""
    batch = 16 if split == "train" else 4
    runs = []
    for rank in range(world_size):
        source = stream_from_set(shards, split, batch_size=batch, workers=workers, rank=rank,
                                 world_size=world_size, drop_last=drop_last, seed=1, epoch=2)
        sizes, keys = _epoch(source)[:2]
        assert len(source) == len(sizes) and source.num_samples == len(keys) == sum(sizes)
        runs.append((sizes, keys))
    all_keys = [k for _, keys in runs for k in keys]
    assert len(set(all_keys)) == len(all_keys)  # never twice
    assert len({len(sizes) for sizes, _ in runs}) == 1  # the same number of batches on every rank
    if drop_last:
        assert all(s == batch for sizes, _ in runs for s in sizes)
    else:
        assert sorted(all_keys) == sorted(ShardArrays(shards, split).keys)  # every sample once
        assert all(0 < s <= batch for sizes, _ in runs for s in sizes)


def test_ranks_read_shards_cut_between_them(shards):
    """3 ranks over 4 shards (64, 64, 64, 48 samples): shards cut to even the ranks out are read by two
    ranks, each slicing out its own rows; together every sample once, byte for byte."""
    arrays = ShardArrays(shards, "train")
    at = {k: i for i, k in enumerate(arrays.keys)}
    keys, by_rank = [], []
    for rank in range(3):
        source = stream_from_set(shards, "train", batch_size=16, workers=2, rank=rank, world_size=3,
                                 drop_last=True, seed=5, epoch=1)
        sizes, rank_keys, labels, images = _epoch(source)
        assert sizes == [16] * 5  # 80 samples a rank: whole shards only gave the ranks 64 each
        idx = np.array([at[k] for k in rank_keys])
        assert np.array_equal(labels, arrays.labels[idx])
        order = np.argsort(idx)
        assert np.array_equal(images[order], arrays.gather(idx[order]).numpy())
        keys += rank_keys
        by_rank.append({at[k] // 64 for k in rank_keys})
    assert sorted(keys) == sorted(arrays.keys)
    assert sum(len(s) for s in by_rank) > 4  # some shard was cut between ranks


@pytest.mark.parametrize("world_size,drop_last", [(1, False), (2, True)])
def test_mid_epoch_start_yields_the_uninterrupted_tail(shards, world_size, drop_last):
    B = 16
    for rank in range(world_size):
        kw = dict(batch_size=B, workers=2, seed=2, epoch=3, rank=rank, world_size=world_size, drop_last=drop_last)
        whole = _kept(stream_from_set(shards, "train", **kw))
        for k in (1, 4, len(whole) - 1):
            source = stream_from_set(shards, "train", **kw)
            source.set_epoch(3, start=k * B * world_size)
            assert len(source) == len(whole) - k and source.num_samples == sum(len(b[2]) for b in whole[k:])
            tail = _kept(source)
            assert len(tail) == len(whole) - k
            for (a_img, a_lab, a_keys), (b_img, b_lab, b_keys) in zip(tail, whole[k:], strict=True):
                assert a_keys == b_keys and torch.equal(a_lab, b_lab) and torch.equal(a_img, b_img)


def test_http_set_yields_the_same_batches_as_the_folder(shards, http):
    for rank in range(2):
        kw = dict(batch_size=16, workers=2, seed=9, epoch=1, rank=rank, world_size=2, drop_last=True)
        _same(_epoch(stream_from_set(http.url, "train", **kw)), _epoch(stream_from_set(shards, "train", **kw)))


def test_make_loader_takes_a_set_url(shards, http):
    loader = make_loader(http.url, "val", variant="gray28", path="stream", batch_size=8, with_keys=True, workers=0)
    local = make_loader(shards, "val", variant="gray28", path="stream", batch_size=8, with_keys=True, workers=0)
    assert loader.source.shard_set.manifest == local.source.shard_set.manifest  # no counts given by hand
    assert loader.stage.mean == local.stage.mean != (0.5,)  # the manifest's stats
    batches = list(loader)
    assert len(batches) == 4 and [b[2] for b in batches] == [b[2] for b in local]
    with pytest.raises(UsageError, match="sample_counts is for a list of shard URLs"):
        make_loader(http.url, "val", path="stream", sample_counts=[30])


def test_a_signed_shard_url_is_one_shard_not_a_set(shards, http):
    """`.../val-000000.tar?sig=...` was taken for a set's folder (its text does not end in .tar): the
    shard itself was refused with 'sample_counts is for a list of shard URLs'."""
    url = f"{http.url}/val-000000.tar?sig=abc"
    assert is_url_list(url) and not is_set_url(url) and is_set_url(f"{http.url}/?sig=abc")
    loader = make_loader(url, "val", variant="gray28", path="stream", batch_size=8, with_keys=True, workers=0,
                         sample_counts=[30], mean=(0.5,), std=(0.25,))
    local = make_loader(shards, "val", variant="gray28", path="stream", batch_size=8, with_keys=True, workers=0)
    assert [b[2] for b in loader] == [b[2] for b in local]


@pytest.mark.parametrize("fault,message", [
    ("missing", "{url}: missing (listed in the manifest)"),
    ("truncate", f"{{url}}: transfer broke off after {(50 * SAMPLE_BYTES + 1024) // 2:,} of {50 * SAMPLE_BYTES + 1024:,} bytes "
                 f"(after {RETRIES} attempts)"),
    ("corrupt", "{url}: checksum differs from the manifest (corrupt or modified)"),
])
@pytest.mark.parametrize("workers", [0, 2])
def test_faulty_http_shard_is_named(shards, fault, message, workers, quick_retries):
    name = "train-000002.tar"
    server = FaultyHTTPServer(shards, {name: fault})
    try:
        source = stream_from_set(server.url, "train", batch_size=16, workers=workers)
        with pytest.raises(ShardError) as err:
            _epoch(source)
        assert str(err.value) == message.format(url=f"{server.url}/{name}")
        assert server.requests[name] == (0 if fault == "missing" else 5)  # a bad transfer is read 5 times
    finally:
        server.close()


@pytest.mark.parametrize("retries", [2, 3])
def test_a_transfer_that_fails_each_time_says_how_many_were_tried(shards, retries):
    """The last word on a shard whose transfer broke off at each read said 'transfer broke off after N of M
    bytes', where fetch's and the cache's say after how many attempts: it says so now, from the reads made
    (`retries`), as does a connection refused each time."""
    server = FaultyHTTPServer(shards, {"val-000000.tar": "truncate"})
    try:
        url, size = f"{server.url}/val-000000.tar", (shards / "val-000000.tar").stat().st_size
        with pytest.raises(ShardError) as e:
            read_checked(Shard(url, 30), "gray28", retries=retries, backoff=0.001)
        assert str(e.value) == f"{url}: transfer broke off after {size // 2:,} of {size:,} bytes (after {retries} attempts)"
        assert server.requests["val-000000.tar"] == retries
    finally:
        server.close()
    with pytest.raises(ShardError) as e:  # nothing listens there now
        read_checked(Shard(url, 30), "gray28", retries=retries, backoff=0.001)
    assert str(e.value) == (f"{url}: unreadable shard (URLError: <urlopen error [Errno 111] Connection refused>, "
                            f"after {retries} attempts)")


def test_a_server_down_for_a_second_is_waited_for(shards):
    """A server's restart, a load balancer's blip: 3 reads 0.2 and 0.4 s apart all found it down, and the
    epoch (a training run) ended 'unreadable shard (URLError: ... Connection refused)' within a second.
    Reads are now tried over 7.5 s of waits, doubling from 0.5 s (`shardset.retry_waits`)."""
    server = FaultyHTTPServer(shards)
    try:
        source = stream_from_set(server.url, "train", batch_size=16, workers=0, seed=4)  # the manifest read
        server.down_for(1.0)
        _same(_epoch(source), _epoch(stream_from_set(shards, "train", batch_size=16, workers=0, seed=4)))
    finally:
        server.close()


def test_a_ctrl_c_while_a_read_waits_to_try_again_stops_it(shards, monkeypatch):
    """Reads wait seconds to try a shard again (`shardset.retry_waits`): without workers, a Ctrl-C in one
    waited for the read thread's every remaining try (7.5 s of waits) before the epoch stopped."""
    monkeypatch.setattr("pipeline.shardset.BACKOFF_S", 2.0)  # without the stop, 30 s and 5 reads
    reads = []
    ctrl_c = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))

    def refused(url, storage_options=None):
        reads.append(url)
        if len(reads) == 1:  # the Ctrl-C, soon after the server is found down (the main thread waiting on the read)
            ctrl_c.start()
        raise ConnectionRefusedError(111, "Connection refused")
    monkeypatch.setattr("pipeline.stream_read.read_whole", refused)
    try:
        with pytest.raises(KeyboardInterrupt):
            _epoch(stream_from_set(shards, "train", batch_size=16, workers=0))
    finally:
        ctrl_c.cancel()  # a read that failed without it must not interrupt the next test
    assert len(reads) == 1


def test_a_failed_epoch_stops_its_read_thread_at_the_error(shards):
    # Without workers the read thread is the consumer's: it stops when the error is raised, on the
    # consumer's thread, not when (and on whichever thread) the cyclic GC finds the epoch's frames.
    server = FaultyHTTPServer(shards, {"train-000002.tar": "missing"})
    earlier = set(threading.enumerate())  # an earlier test's, left to the GC, is not this one's
    reading = lambda: [t.name for t in set(threading.enumerate()) - earlier if t.name.startswith("tinyin-read")]  # noqa: E731
    gc.disable()
    try:
        with pytest.raises(ShardError) as err:
            _epoch(stream_from_set(server.url, "train", batch_size=16, workers=0))
        assert str(err.value) == f"{server.url}/train-000002.tar: missing (listed in the manifest)"
        assert reading() == []
        # A lane dropped after its failure is freed at once (no cycle through the error's traceback).
        source = stream_from_set(server.url, "train", batch_size=16, workers=0)
        lanes = iter(_Lanes(source.plan, source.shards, source.variant, source.shard_set, None, 16))
        item = next(lanes)
        while not isinstance(item, _Failure):
            item = next(lanes)
        assert item.message == str(err.value) and reading() == []  # stopped before the failure is told
        lanes = weakref.ref(lanes)
        assert lanes() is None
    finally:
        gc.enable()
        server.close()


def test_a_cut_transfer_is_retried(shards):
    name = "train-000001.tar"
    server = FaultyHTTPServer(shards, {name: "cut-once"})
    try:
        got = _epoch(stream_from_set(server.url, "train", batch_size=16, workers=2, seed=4))
        assert server.requests[name] == 2  # cut once, read again: no short epoch
        _same(got, _epoch(stream_from_set(shards, "train", batch_size=16, workers=2, seed=4)))
    finally:
        server.close()


def test_missing_manifest_is_named(tmp_path):
    server = FaultyHTTPServer(tmp_path)
    try:
        with pytest.raises(ShardError, match=f"^{server.url}/nothing: not a tinyin shard set"):
            make_loader(f"{server.url}/nothing", "train", path="stream")
    finally:
        server.close()


def test_s3_set_yields_the_same_batches(shards):
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    from servers import S3Server

    s3 = S3Server()
    try:
        url = s3.upload(shards, "tinyin", "synth")
        kw = dict(batch_size=32, workers=2, seed=1)
        # The endpoint in storage_options: fsspec caches filesystems by their options, not by the
        # environment, and an earlier test's S3 server is gone.
        remote = stream_from_set(url, "val", storage_options={"endpoint_url": s3.endpoint}, **kw)
        _same(_epoch(remote), _epoch(stream_from_set(shards, "val", **kw)))
    finally:
        s3.close()


def test_a_set_opened_with_storage_options_streams_its_shards_with_them(shards, quick_retries):
    """make_loader takes storage_options through a ShardSet opened with them: the set's manifest and index were read
    with its endpoint, then every shard without it, from AWS's ('Could not connect to the endpoint URL:
    "https://tinyin.s3.amazonaws.com/synth/val-000000.tar"')."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    from servers import S3Server

    s3 = S3Server()
    try:
        url = s3.upload(shards, "tinyin", "synth")
        del os.environ["AWS_ENDPOINT_URL"]  # the endpoint in the options only (close() puts back what was before)
        remote = open_shard_set(url, storage_options={"endpoint_url": s3.endpoint})
        keys = [k for _, _, batch in make_loader(remote, "val", path="stream", workers=0, raw=True, with_keys=True)
                for k in batch]
        assert sorted(keys) == sorted(read_index(shards, "val")["key"].to_pylist())
    finally:
        s3.close()


def test_pipe_urls_read_their_own_layout(shards):
    """No index: counts by hand, offsets, labels and keys from each shard's fixed stride."""
    pattern = f"pipe:cat {shards}/train-{{000000..000004}}.tar"
    kw = dict(batch_size=64, workers=2, seed=6)
    source = stream_from_urls(pattern, COUNTS, **kw)
    assert len(source) == 4
    _same(_epoch(source), _epoch(stream_from_set(shards, "train", **kw)))
    loader = make_loader([f"pipe:cat {u}" for u in _urls(shards)], "train", path="stream", sample_counts=COUNTS,
                         raw=True, with_keys=True, batch_size=64, workers=0, seed=6)
    assert sum(len(b[2]) for b in loader) == 240
    with pytest.raises(UsageError, match="needs sample_counts"):
        stream_from_urls(pattern, None)


def test_a_path_to_one_shard_streams_it_as_its_name_does(shards):
    """make_loader(Path('.../train-000001.tar')) was taken for a list of URLs, as its str is, then
    iterated as one: TypeError 'PosixPath' object is not iterable."""
    def keys(one):
        return [k for _, _, batch in make_loader(one, "train", sample_counts=[COUNTS[1]], batch_size=64, workers=0,
                                                 raw=True, with_keys=True) for k in batch]
    url = _urls(shards)[1]
    assert keys(Path(url)) == keys(url) and len(keys(url)) == COUNTS[1]


@pytest.mark.parametrize("counts, bad", [([50, 50, -1, 50, 40], "-1"), ([50, 50, 50.5, 50, 40], "50.5"),
                                         ({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}, "'a'")])
def test_sample_counts_that_are_not_counts_are_named(shards, counts, bad):
    """-1 was refused as 'ranks hold [...] samples: not all can fill 0 batches', 50.5 taken as 50 and a
    dict (URL -> count) failed in int() of its first key."""
    with pytest.raises(ValueError) as e:
        make_loader(_urls(shards), "train", path="stream", sample_counts=counts)
    assert str(e.value) == f"sample_counts must hold each shard's number of samples, an integer of at least 0, not {bad}"


@pytest.mark.parametrize("counts", ["128", b"30", 30])
def test_sample_counts_that_are_no_list_are_named(shards, counts):
    """A string was counted by its characters: "128" over 3 URLs as shards of 1, 2 and 8 samples (refused as 'not
    '1''), over 1 URL as 'sample_counts has 3 entries for 1 urls'; a lone number failed in len()."""
    urls = _urls(shards)[: 3 if counts == "128" else 1]
    with pytest.raises(ValueError) as e:
        make_loader(urls, "train", path="stream", sample_counts=counts)
    assert str(e.value) == ("sample_counts must be a list of each shard's number of samples, one per URL, "
                            f"not {counts!r}")


def _rename_first_member(f, sample):
    """Give sample `sample`'s first member another suffix, in place (its bytes and spacing unchanged)."""
    f.seek(sample * SAMPLE_BYTES)
    name = f.read(100)
    f.seek(sample * SAMPLE_BYTES + name.index(b".") + 1)
    f.write(b"X")


def _damaged(shards, tmp_path, how):
    urls = _urls(shards)
    bad = tmp_path / "train-000002.tar"
    shutil.copy(urls[2], bad)
    with open(bad, "r+b") as f:
        how(f)
    return urls[:2] + [str(bad)] + urls[3:], bad


@pytest.mark.parametrize("how,message", [
    (lambda f: f.truncate(20 * SAMPLE_BYTES + 3000), f"{20 * SAMPLE_BYTES + 3000:,} bytes, 50 samples take "
                                                     f"{50 * SAMPLE_BYTES + 1024:,} (truncated or not this shard)"),
    (lambda f: (f.seek(10 * SAMPLE_BYTES + 512), f.write(b"XXXX")), "samples are not evenly spaced"),
    (lambda f: (f.seek(0), f.write(b"\0" * 512)), "not a tinyin shard"),
    (lambda f: _rename_first_member(f, 10), "samples are not evenly spaced"),
])
def test_damaged_listed_shard_is_named(shards, tmp_path, how, message):
    urls, bad = _damaged(shards, tmp_path, how)
    with pytest.raises(ShardError) as err:
        _epoch(stream_from_urls(urls, COUNTS, batch_size=16, workers=2))
    assert str(err.value).startswith(f"{bad}: ") and message in str(err.value)


def test_a_url_list_count_below_its_shards_samples_is_refused(shards):
    """A URL list's counts are the user's word: one too small for its shard (50 samples, said 49) read only
    the first 49 and dropped the last without a word. The shard must be exactly that many samples."""
    url = _urls(shards)[0]
    with pytest.raises(ShardError) as err:
        _epoch(stream_from_urls([url], [49], batch_size=16, workers=0))
    assert str(err.value) == (f"{url}: {50 * SAMPLE_BYTES + 1024:,} bytes, 49 samples take {49 * SAMPLE_BYTES + 1024:,} "
                              "(truncated or not this shard)")


def test_a_url_list_shard_of_other_members_is_named(shards, tmp_path):
    """A sample whose members are not tinyin's four (here gray28.npz for gray28.npy, its header valid) is
    not a tinyin shard: said so, not a KeyError read again as an 'unreadable shard'."""
    import tarfile

    bad = tmp_path / "train-000000.tar"
    data = bytearray(Path(_urls(shards)[0]).read_bytes())
    at = 13312  # the first sample's second member: its rgb64 member (header and array) comes first
    info = tarfile.TarInfo.frombuf(bytes(data[at:at + 512]), "ascii", "surrogateescape")
    info.name = info.name.replace("gray28.npy", "gray28.npz")
    data[at:at + 512] = info.tobuf(tarfile.USTAR_FORMAT)
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError) as err:
        _epoch(stream_from_urls([str(bad)], [50], batch_size=16, workers=0))
    assert str(err.value) == f"{bad}: not a tinyin shard (members ['cls', 'gray28.npz', 'json', 'rgb64.npy'])"


def test_a_url_list_shard_is_read_with_labels_of_every_width(tmp_path):
    """A URL list's labels come from each sample's .cls member: 199 is three digits (the synthetic sets have
    six classes, one digit), and the images are each sample's own."""
    from pipeline.stream_read import Shard, read_layout
    from pipeline.tarshard import write_shard

    labels = [7, 42, 199, 0]
    samples = [(f"k{i}", np.full((64, 64, 3), i, np.uint8), np.full((28, 28), 10 + i, np.uint8), label, b"{}")
               for i, label in enumerate(labels)]
    write_shard(tmp_path / "s.tar", samples)
    data = (tmp_path / "s.tar").read_bytes()
    offsets, got, keys = read_layout(data, Shard(str(tmp_path / "s.tar"), 4), "gray28")
    assert (got.tolist(), keys) == (labels, ["k0", "k1", "k2", "k3"])
    assert [data[at:at + 784] for at in offsets] == [bytes([10 + i]) * 784 for i in range(4)]
    write_shard(tmp_path / "s.tar", [(*samples[0][:3], "\0", b"{}")])  # a .cls of a NUL byte: no number
    with pytest.raises(ShardError) as e:
        read_layout((tmp_path / "s.tar").read_bytes(), Shard(str(tmp_path / "s.tar"), 1), "gray28")
    assert str(e.value) == f"{tmp_path / 's.tar'}: a sample's cls is not a number"


def test_failing_pipe_and_missing_file_are_named(shards, tmp_path, quick_retries, http):
    """A shard of a URL list that is not there was 'missing (listed in the manifest)': a list has none."""
    missing = str(tmp_path / "train-000009.tar")
    with pytest.raises(ShardError) as e:
        _epoch(stream_from_urls(_urls(shards)[:4] + [missing], COUNTS, workers=2))
    assert str(e.value) == f"{missing}: not found"
    with pytest.raises(ShardError) as e:  # a 404
        _epoch(stream_from_urls([f"{http.url}/train-000009.tar"], [50], workers=0))
    assert str(e.value) == f"{http.url}/train-000009.tar: not found"
    with pytest.raises(ShardError, match=f"^pipe:cat {missing}: unreadable shard"):
        _epoch(stream_from_urls([f"pipe:cat {missing}"], [50], workers=0))


def test_local_set_checks(shards, tmp_path):
    with pytest.raises(ValueError, match=r"^split must be one of train, val, test, unlabeled, not 'nope'$"):
        stream_from_set(shards, "nope")
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    bad = copy / "train-000001.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[:100] + b"X" + data[101:])
    with pytest.raises(ShardError, match=f"^{bad}: checksum differs from the manifest"):
        _epoch(stream_from_set(copy, "train", workers=2))
    bad.write_bytes(data[:1000])
    with pytest.raises(ShardError, match=f"^{bad}: 1,000 bytes, the manifest says {len(data):,} .truncated"):
        stream_from_set(copy, "train")
    bad.unlink()
    with pytest.raises(ShardError, match=f"^{bad}: missing"):
        stream_from_set(copy, "train")


def test_stock_webdataset_reads_every_shard(shards):
    """The shards stay standard tars: stock webdataset sees the same samples as the stream path."""
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    stock = Counter((s["__key__"], int(s["cls"]), s["rgb64.npy"].tobytes())
                    for s in wds.WebDataset(urls, shardshuffle=False).decode())
    ours = Counter()
    for split in ("train", "val", "test", "unlabeled"):
        for images, labels, keys in stream_from_set(shards, split, workers=0):
            ours.update((k, int(l), img.numpy().tobytes()) for img, l, k in zip(images, labels, keys, strict=True))
    assert stock == ours and len(ours) == 240 + 30 + 30 + 20


def test_early_stop_releases_workers(shards):
    source = stream_from_set(shards, "train", batch_size=16, workers=2)
    for _ in source:
        break  # the autouse fixture checks that no worker process is left behind


def test_the_workers_are_forked_without_python_3_12s_thread_warning(shards, fork_warns_as_on_3_12):
    """Python 3.12 warns (DeprecationWarning) at each worker's fork that the process has threads (numpy's,
    pyarrow's, tqdm's, torch's OpenMP pool: harmless to the workers, see `stream_workers.FORK`): in every
    3.12 test run's summary, and on stderr of a train.py --data-path stream run with -W default. Here
    os.fork warns as 3.12's does, on any Python."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = len(_kept(stream_from_set(shards, "val", batch_size=16, workers=2)))
    assert (batches, [str(w.message) for w in caught]) == (2, [])


def test_the_workers_are_forked_whatever_multiprocessings_default(shards, monkeypatch):
    """Python 3.14 makes forkserver multiprocessing's default start method on Linux (a program may set it too):
    the workers were then the forkserver's children, not this process's (so without the SIGTERM rule that
    watches their parent, and without the shared read buffers), and took 2.8 s a loader start against 0.1 s."""
    import pipeline.stream

    contexts = []

    class Recorded(pipeline.stream.DataLoader):
        def __init__(self, *args, **kw):
            contexts.append(kw.get("multiprocessing_context"))
            super().__init__(*args, **kw)

    monkeypatch.setattr(pipeline.stream, "DataLoader", Recorded)
    default = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        batches = len(_kept(stream_from_set(shards, "val", batch_size=16, workers=2)))
    finally:
        multiprocessing.set_start_method(default, force=True)
    assert (batches, [c.get_start_method() for c in contexts]) == (2, ["fork"])


def test_workers_ignore_a_sigterm_not_from_their_parent_and_end_on_its(shards):
    # A preemption signals every process of the job (`kill -TERM -PGID`, Slurm): the workers died of it,
    # and torch's SIGCHLD handler raised "DataLoader worker ... is killed by signal" here. Stopping is
    # the main process's job: the workers read on, and end when it closes the source or terminates them.
    expected = _epoch(stream_from_set(shards, "train", batch_size=16, workers=0))
    source = stream_from_set(shards, "train", batch_size=16, workers=2)
    batches = iter(source)
    images, labels, keys = next(batches)
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    subprocess.run(["kill", "-TERM", *(str(w.pid) for w in workers)], check=True)  # from another process
    _same(_epoch(itertools.chain([(images.clone(), labels, keys)], batches)), expected)
    batches = iter(source)
    next(batches)
    worker = multiprocessing.active_children()[0]
    worker.terminate()  # torch's fallback for a worker slow to stop: its parent's SIGTERM still ends it, quietly
    worker.join(5)
    assert worker.exitcode == 0
    batches.close()


def test_a_worker_sent_sigterm_before_its_init_runs_does_not_die(shards, monkeypatch):
    """The workers fork with SIGTERM blocked: between the fork and worker_init_fn (torch installs its
    own handler first), one signalled by another process died of it (once in a suite run under load)."""
    import pipeline.stream

    go, real_init = multiprocessing.Event(), pipeline.stream.ignore_sigterm_but_the_parents

    def late_init(worker_id):  # inherited by the fork: the worker waits here, before the real init
        go.wait(30)
        real_init(worker_id)

    monkeypatch.setattr(pipeline.stream, "ignore_sigterm_but_the_parents", late_init)
    expected = _epoch(stream_from_set(shards, "train", batch_size=16, workers=0))
    source, got = stream_from_set(shards, "train", batch_size=16, workers=2), []
    reader = threading.Thread(target=lambda: got.append(_epoch(source)))
    reader.start()
    for _ in range(300):
        if len(multiprocessing.active_children()) == 2:
            break
        time.sleep(0.01)
    subprocess.run(["kill", "-TERM", *(str(w.pid) for w in multiprocessing.active_children())], check=True)
    time.sleep(0.2)  # delivered by now, to a worker still inside late_init
    go.set()
    reader.join(30)
    assert len(got) == 1
    _same(got[0], expected)


class _Stopped(KeyboardInterrupt):
    """What train.py's StopSignals raises for SIGUSR1 (as for Ctrl-C and SIGTERM) while it waits for a batch."""


def _stop_waiting(signum, frame):
    raise _Stopped


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1], ids=["ctrl-c", "sigusr1"])
def test_a_ctrl_c_as_the_workers_start_stops_them(shards, monkeypatch, signum):
    """torch's DataLoader iterator, interrupted while it started its workers, was left half made: a
    worker it had started idled for the life of the process, holding the source's shared read
    buffers (1.3 GB on the real train split), and the source's buffers stayed marked busy (every
    later epoch made and faulted in new ones). The Ctrl-C now comes once the workers have started.
    So does SIGUSR1, which train.py's handler turns into an interrupt while it waits for a batch (it
    was left half made there, and torch printed an "Exception ignored" traceback as it went)."""
    previous = signal.signal(signum, _stop_waiting) if signum == signal.SIGUSR1 else None
    try:
        _a_signal_as_the_workers_start_stops_them(shards, monkeypatch, signum)
    finally:
        if previous is not None:
            signal.signal(signum, previous)


def _a_signal_as_the_workers_start_stops_them(shards, monkeypatch, signum):
    import pipeline.stream

    start, init, handler = multiprocessing.process.BaseProcess.start, pipeline.stream.ignore_sigterm_but_the_parents, \
        signal.getsignal(signum)
    started, seen = [], multiprocessing.SimpleQueue()

    def start_then_interrupt(process):  # the signal just after the first worker has started
        start(process)
        started.append(process)
        if len(started) == 1:
            signal.raise_signal(signum)

    def init_and_tell(worker_id):  # a worker forked meanwhile still has the process's own handler
        init(worker_id)
        seen.put(signal.getsignal(signum) is handler)

    monkeypatch.setattr(pipeline.stream, "ignore_sigterm_but_the_parents", init_and_tell)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start_then_interrupt)
    expected = _epoch(stream_from_set(shards, "train", batch_size=16, workers=0))
    source = stream_from_set(shards, "train", batch_size=16, workers=2)
    with pytest.raises(KeyboardInterrupt):
        _epoch(source)
    left = [p for p in multiprocessing.active_children() if p in started]  # not an earlier test's, still exiting
    assert (len(started), left, source._busy) == (2, [], False)
    _same(_epoch(source), expected)
    told = []
    while not seen.empty():
        told.append(seen.get())
    assert len(told) >= 2 and all(told)  # this epoch's two workers, and any of the first that got so far


@pytest.mark.parametrize("where", ["after shut_down", "queue close", "before shut_down"])
def test_a_ctrl_c_as_an_epoch_stops_its_workers_leaves_the_buffers_to_the_next(shards, monkeypatch, where):
    """A Ctrl-C that landed while an epoch stopped its workers (a notebook's: as an epoch stopped early
    waits for them in `shut_down`, or as the source closes its queues after it) left the source's buffers
    marked busy for good: every later epoch made and faulted in read and batch buffers of its own (1.4 GB an
    epoch on the real train split). They are given back now, and the next epoch reuses them; only while a
    worker of the epoch still runs (more Ctrl-Cs, in torch's own shutdown) do they stay busy."""
    import multiprocessing.queues

    import pipeline.stream

    expected = _epoch(stream_from_set(shards, "train", batch_size=16, workers=0))
    source = stream_from_set(shards, "train", batch_size=16, workers=2)
    _same(_epoch(source), expected)
    pool, rings, left = source._pool, source._rings, []
    if where == "queue close":
        def interrupted(queue):
            raise KeyboardInterrupt
        monkeypatch.setattr(multiprocessing.queues.SimpleQueue, "close", interrupted)
    else:
        real = pipeline.stream.shut_down

        def interrupted(chunks):
            if where == "after shut_down":
                real(chunks)
            else:
                left.append(chunks)  # its workers still running
            raise KeyboardInterrupt
        monkeypatch.setattr(pipeline.stream, "shut_down", interrupted)
    epoch = iter(source)
    next(epoch)
    with pytest.raises(KeyboardInterrupt):
        epoch.close()  # stopped early: its workers stopped
    monkeypatch.undo()
    busy = source._busy
    for chunks in left:
        chunks._shutdown_workers()
    assert busy is (where == "before shut_down")
    source._busy = False
    _same(_epoch(source), expected)
    assert source._pool is pool and source._rings is rings


def test_workers_stuck_in_a_read_are_waited_for_together_when_the_epoch_stops(shards, monkeypatch):
    """A stop while every worker is stuck in a read (a hung server; train.py's StopWaiting, a Ctrl-C): torch's
    shutdown joined the workers one after another, each with a timeout of its own (MP_STATUS_CHECK_INTERVAL, 5 s),
    before it terminated those still running: 5 s per stuck worker (-j 8: 40 s). They are now waited for
    together, for that interval in all: one wait that runs out, for both of them, and none is left behind."""
    import multiprocessing.connection

    from torch.utils.data import _utils

    monkeypatch.setattr(_utils, "MP_STATUS_CHECK_INTERVAL", 0.2)  # quick either way: what counts is the waits
    stuck = multiprocessing.SimpleQueue()  # each worker puts its pid there as it starts its hung read

    def hung(url, storage_options=None):  # in the workers
        stuck.put(os.getpid())
        threading.Event().wait()

    def ctrl_c_once_all_are_stuck():
        pids = set()
        while len(pids) < 2:
            pids.add(stuck.get())
        os.kill(os.getpid(), signal.SIGINT)
    wait, ran_out = multiprocessing.connection.wait, []

    def counted_wait(objects, timeout=None):  # a join's wait for a worker (its sentinel: an int) that ran out
        ready = wait(objects, timeout)
        if not ready and all(isinstance(o, int) for o in objects):
            ran_out.append(len(objects))
        return ready
    monkeypatch.setattr("pipeline.stream_read.read_whole", hung)
    monkeypatch.setattr(multiprocessing.connection, "wait", counted_wait)
    threading.Thread(target=ctrl_c_once_all_are_stuck, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        _epoch(stream_from_set(shards, "train", batch_size=16, workers=2))
    # before: [1, 1]. After the one wait for both, torch's own join of the workers, just terminated, may run out
    # too where a loaded machine takes longer than the patched 0.2 s to end one (seen: [2, 1] beside 3 test runs).
    assert ran_out[0] == 2
    # and no_hang_no_leak: no worker left


def _running(pid):
    """Whether process `pid` exists and is not a zombie (an orphan's reaper may be slow or absent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_end_when_their_parent_is_killed(shards):
    # SIGKILL leaves no chance to shut the workers down: torch's watchdog in each worker sees its
    # parent gone within MP_STATUS_CHECK_INTERVAL (5 s) and ends it (SIGTERM from others is ignored).
    code = ("import multiprocessing, sys; from pipeline.stream import stream_from_set; "
            "batches = iter(stream_from_set(sys.argv[1], 'train', batch_size=16, workers=2)); next(batches); "
            "print(*(w.pid for w in multiprocessing.active_children()), flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(shards)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        pids = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(map(_running, pids))
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 20
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_running, pids))


def test_an_epoch_left_unfinished_until_the_interpreter_exits_stops_its_workers_quietly(shards, monkeypatch):
    """A script that exits holding an unfinished epoch (`it = iter(loader); next(it)` beside a function of its
    own) had it finalised in the interpreter's teardown, once sys.modules is emptied and sys.meta_path is None:
    the shutdown imported torch's `_utils` there and printed "Exception ignored ... ImportError: sys.meta_path is
    None, Python is likely shutting down" as the script ended, its own shutdown of the workers skipped."""
    batches = iter(stream_from_set(shards, "train", batch_size=16, workers=2))
    next(batches)
    for name in [m for m in sys.modules if m == "torch.utils.data" or m.startswith("torch.utils.data.")]:
        monkeypatch.delitem(sys.modules, name)  # as the teardown leaves sys.modules: nothing to import from
    monkeypatch.setattr(sys, "meta_path", None)
    batches.close()  # raised the ImportError
    monkeypatch.undo()
    assert multiprocessing.active_children() == []


def test_workers_reuse_their_read_and_batch_buffers_across_epochs(shards, http):
    inline = stream_from_set(http.url, "train", batch_size=32, workers=0)
    source = stream_from_set(http.url, "train", batch_size=32, workers=2)
    first = _epoch(source)
    pool, rings = source._pool, source._rings
    # Per worker: its lane's group in use and the next one, of MIX=2 shards, each as large as the largest shard.
    assert [[len(m) for m in mine] for mine in pool] == [[50 * SAMPLE_BYTES + 1024] * 4] * 2
    assert [[tuple(t.shape) for t in mine] for mine in rings] == [[(32, 64 * 64 * 3)] * 4] * 2
    for epoch in (0, 1):
        inline.set_epoch(epoch)
        source.set_epoch(epoch)
        _same(_epoch(source) if epoch else first, _epoch(inline))
    assert source._pool is pool and source._rings is rings
    listed = stream_from_urls(_urls(shards), COUNTS, batch_size=32, workers=1)
    _epoch(listed)
    assert listed._pool == []  # no manifest sizes: each worker reads into buffers of its own


def test_an_epoch_cut_short_by_its_reader_is_an_error_not_a_short_epoch(shards, monkeypatch):
    """Were a worker to end quietly before its last chunk, the batches it had not sent would be missing from the
    epoch: the source counts the chunks it put back in order and names the shortfall."""
    whole = _Lanes.__iter__

    def one_chunk_only(self):
        chunks = whole(self)
        try:
            yield next(chunks)
        finally:
            chunks.close()
    monkeypatch.setattr(_Lanes, "__iter__", one_chunk_only)
    source = stream_from_set(shards, "train", batch_size=32, workers=0)
    with pytest.raises(ShardError) as caught:
        list(source)
    assert str(caught.value) == (f"{source.shards[0].url} (and {len(source.shards) - 1} more): the epoch ended after "
                                 f"1 of {len(source.plan.chunks)} chunks")


def test_more_workers_than_lanes_add_lanes(shards):
    """Workers beyond the plan's lanes would sit idle: the plan has max(lanes, workers) lanes (3 workers, 3 lanes)."""
    source = stream_from_set(shards, "train", batch_size=16, workers=3)
    assert {chunk.lane for chunk in source.plan.chunks} == {0, 1, 2}
    want = plan_epoch([s.count for s in source.shards], seed=0, epoch=0, rank=0, world_size=1, batch_size=16,
                      shuffle=True, drop_last=False, lanes=3)
    assert [(c.seq, c.batch, c.lane, c.group, c.ids.tolist()) for c in source.plan.chunks] == \
        [(c.seq, c.batch, c.lane, c.group, c.ids.tolist()) for c in want.chunks]


def test_a_listed_shard_of_no_samples_is_never_read(shards, tmp_path):
    """A count of 0 (a split's empty last shard, as a manifest may list one) is a count: that shard adds nothing,
    and is not read (here it does not even exist): the epoch is the one without it."""
    urls, empty = _urls(shards), str(tmp_path / "train-000009.tar")
    with_empty = _epoch(stream_from_urls(urls[:2] + [empty] + urls[2:], COUNTS[:2] + [0] + COUNTS[2:], batch_size=32,
                                         workers=0))
    without = _epoch(stream_from_urls(urls, COUNTS, batch_size=32, workers=0))
    _same(with_empty, without)


class _Waits:
    """A `stop` event for `read_checked` that records each wait between reads and never stops one."""

    def __init__(self):
        self.waits = []

    def wait(self, seconds):
        self.waits.append(seconds)
        return False


def _listed_shard(shards, name="train-000000.tar", folder=None):
    """(Shard, ShardSet) of shard `name` of `shards` (its file read from `folder`, when given), as the
    stream path's workers read it."""
    from pipeline.shardset import ShardSet
    from pipeline.stream_read import Shard

    shard_set = ShardSet(shards)
    entry = next(e for e in shard_set.manifest["shards"] if e["file"] == name)
    return Shard(str(Path(folder or shards) / name), entry["count"], entry), shard_set


def test_a_missing_shard_is_not_waited_for_and_a_whole_but_wrong_one_is_read_again_at_once(shards, tmp_path):
    """Asking again does not make a missing file appear: one read, no wait. A body that arrived whole (the
    server is up) but failed its check is read again with no wait before it; only a short one waits."""
    from pipeline.stream_read import read_checked

    missing, shard_set = _listed_shard(shards, folder=tmp_path)
    stop = _Waits()
    with pytest.raises(ShardError) as e:
        read_checked(missing, "gray28", shard_set, retries=3, backoff=7, stop=stop)
    assert (str(e.value), stop.waits) == (f"{tmp_path / 'train-000000.tar'}: missing (listed in the manifest)", [])
    data = bytearray((shards / "train-000000.tar").read_bytes())
    data[5000] ^= 1
    (tmp_path / "train-000000.tar").write_bytes(bytes(data))
    with pytest.raises(ShardError) as e:
        read_checked(missing, "gray28", shard_set, retries=3, backoff=7, stop=stop)
    assert (str(e.value), stop.waits) == (f"{tmp_path / 'train-000000.tar'}: checksum differs from the manifest "
                                          "(corrupt or modified)", [])
    (tmp_path / "train-000000.tar").write_bytes(bytes(data[:-512]))
    with pytest.raises(ShardError):
        read_checked(missing, "gray28", shard_set, retries=3, backoff=7, stop=stop)
    assert stop.waits == [7, 14]
    with pytest.raises(ShardError) as e:  # with no stop event it sleeps between reads
        read_checked(missing, "gray28", shard_set, retries=2, backoff=0.001)
    assert str(e.value).startswith(f"{tmp_path / 'train-000000.tar'}: ")


def test_a_shard_url_whose_host_does_not_resolve_is_named_at_once(shards, no_such_host):
    """A mistyped host in a shard's URL was read 5 times over 7.5 s of waits, then 'unreadable shard (URLError:
    <urlopen error [Errno -2] Name or service not known>)': no resolver answers otherwise (`worth_retrying`)."""
    from pipeline.stream_read import read_checked

    host, words = no_such_host
    shard, shard_set = _listed_shard(shards)
    shard = shard._replace(url=f"http://{host}/train-000000.tar")
    stop = _Waits()
    with pytest.raises(ShardError) as e:
        read_checked(shard, "gray28", shard_set, retries=3, backoff=7, stop=stop)
    assert (str(e.value), stop.waits) == (f"{shard.url}: unreadable shard (unknown host {host}: {words})", [])


@pytest.mark.parametrize("refusal,message", [
    (dict(auth="ann:p@ss"), "HTTP 401 Unauthorized"), (dict(query="sig=a"), "HTTP 403 Forbidden")])
def test_a_clients_own_http_error_is_named_at_once_and_a_busy_server_is_asked_again(shards, refusal, message):
    """A wrong password's 401 or an expired signed URL's 403 was read 5 times over 7.5 s of waits, as a cut
    connection is: asking again changes neither (`shardset.worth_retrying`). A 503 is still asked again."""
    from pipeline.stream_read import read_checked

    name = "train-000000.tar"
    server = FaultyHTTPServer(shards, {name: "busy-once"}, **refusal)
    try:
        shard, shard_set = _listed_shard(shards)
        shard = shard._replace(url=f"{server.url}/{name}")
        stop = _Waits()
        with pytest.raises(ShardError) as e:
            read_checked(shard, "gray28", shard_set, retries=3, backoff=7, stop=stop)
        assert (str(e.value), stop.waits) == (f"{server.url}/{name}: unreadable shard (OSError: {message})", [])
        server.auth = server.query = None
        data = read_checked(shard, "gray28", shard_set, retries=3, backoff=7, stop=stop)[0]
        assert (bytes(data), stop.waits) == ((shards / name).read_bytes(), [7])  # 503, then served
    finally:
        server.close()


def test_a_spare_buffer_larger_than_a_shard_gives_exactly_the_shards_bytes(shards, http, monkeypatch):
    """Read buffers are reused across shards of different sizes (a split's last shard is smaller): one
    larger than the shard is cut to its size, or the read came back with the old shard's tail after it."""
    from pipeline import stream_read

    small = _urls(shards)[-1]  # 40 samples, the others 50
    monkeypatch.setattr(stream_read, "_SPARE", [bytearray(b"\xff" * (50 * SAMPLE_BYTES + 1024))])
    data = stream_read.read_whole(f"{http.url}/{Path(small).name}")
    assert bytes(data) == Path(small).read_bytes() and stream_read._SPARE == []


def test_each_worker_gets_read_buffers_for_its_lanes_groups_and_the_next(monkeypatch):
    """3 lanes on 2 workers: a worker holds up to 2 lanes' groups and reads the next, of 2 shards each: 6
    buffers of the largest shard's size, or its reads fall back to fresh buffers each epoch."""
    from pipeline.stream_read import Shard, shared_read_buffers

    listed = [Shard(f"s{i}.tar", 1, {"bytes": size}) for i, size in enumerate((8192, 12288, 4096))]
    buffers = shared_read_buffers(listed, workers=2, lanes=3, mix=2)
    assert [[len(b) for b in worker] for worker in buffers] == [[12288] * 6] * 2
    assert shared_read_buffers([Shard("s.tar", 1)], workers=2, lanes=3, mix=2) is None  # a URL list: sizes unknown


def test_a_kernel_without_the_populate_advice_is_no_error(monkeypatch):
    """MADV_POPULATE_WRITE came in Linux 5.14: before it, madvise raises EINVAL, and the buffer is used
    without the advice (its pages fault in as it is read)."""
    import errno

    from pipeline import stream_read

    class OldKernelMap:
        def madvise(self, advice):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    buffer = OldKernelMap()
    monkeypatch.setattr(stream_read, "_SPARE", [])
    stream_read.adopt_read_buffers([buffer])
    assert stream_read._SPARE == [buffer]


def test_starting_the_workers_leaves_sigterm_and_ctrl_c_as_they_were():
    """SIGTERM is blocked only while the workers fork (they inherit the mask): left blocked, the main process
    never saw a preemption's SIGTERM, and trained on instead of checkpointing and stopping."""
    from pipeline import stream_workers

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with stream_workers.starting_workers():
        assert signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert signal.SIGINT in stream_workers._held and signal.SIGUSR1 in stream_workers._held
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before and signal.SIGTERM not in before
    assert stream_workers._held == {}


def test_a_read_error_is_described_by_its_type_and_reason():
    """What an 'unreadable shard' message says of its cause: the type and the reason, or the type alone."""
    import errno

    from pipeline.stream_read import describe_error

    assert describe_error(OSError(errno.EIO, os.strerror(errno.EIO))) == f"OSError: {os.strerror(errno.EIO)}"
    assert describe_error(ValueError("bad header")) == "ValueError: bad header"
    assert describe_error(EOFError()) == "EOFError"
