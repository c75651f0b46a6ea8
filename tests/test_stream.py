"""The streaming read path: same samples as the fast path, deterministic, balanced over ranks
and workers, and loud (ShardError naming the file) on any damaged or missing shard."""

import multiprocessing
import os
import shutil
import signal
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.build import build_shards
from pipeline.errors import ShardError
from pipeline.reader import ShardArrays
from pipeline.stream import StreamSource, stream_from_folder
from pipeline.synth import synthesize

SAMPLE_BYTES = 16896  # one sample's four tar members (see tarshard)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """train: 240 samples in shards of 50, 50, 50, 50, 40; val: 30 samples in one shard."""
    root = tmp_path_factory.mktemp("stream")
    synthesize(root / "release", classes=6, train_per_class=40, val_per_class=10, test=20, progress=False)
    build_shards(root / "release", root / "shards", workers=1, shard_size=50, progress=False)
    return root / "shards"


@pytest.fixture(autouse=True)
def no_hang_no_leak():
    """A hang fails the test instead of stalling the suite; no DataLoader worker outlives a test."""
    signal.alarm(60)
    yield
    signal.alarm(0)
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
        images.append(batch_images)
    return sizes, keys, torch.cat(labels).numpy(), torch.cat(images).numpy()


def _urls(shards, split="train"):
    return sorted(str(p) for p in shards.glob(f"{split}-*.tar")), [50, 50, 50, 50, 40]


@pytest.mark.parametrize("variant,workers", [("rgb64", 2), ("gray28", 0)])
def test_same_samples_as_fast_path(shards, variant, workers):
    sizes, keys, labels, images = _epoch(stream_from_folder(shards, "train", variant=variant, batch_size=32,
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


def test_unshuffled_order_is_index_order(shards):
    keys = _epoch(stream_from_folder(shards, "train", shuffle=False, batch_size=64, workers=0))[1]
    assert keys == ShardArrays(shards, "train").keys


def test_deterministic_per_seed_and_epoch(shards):
    source = stream_from_folder(shards, "train", batch_size=32, workers=2, seed=3)
    first = _epoch(source)[1]
    assert _epoch(stream_from_folder(shards, "train", batch_size=32, workers=2, seed=3))[1] == first
    source.set_epoch(1)
    second = _epoch(source)[1]
    assert second != first and sorted(second) == sorted(first)
    assert _epoch(stream_from_folder(shards, "train", batch_size=32, workers=2, seed=4))[1] != first
    source.set_epoch(0)
    assert _epoch(source)[1] == first


def test_shard_order_follows_seed_and_epoch(shards):
    """With no sample buffer, an epoch reads whole shards one after another, in a shuffled order."""
    urls, counts = _urls(shards)
    shard_of = {k: i for i, k in enumerate(ShardArrays(shards, "train").keys)}  # index position
    orders = []
    for epoch in range(4):
        keys = _epoch(StreamSource(urls, batch_size=50, workers=0, shuffle_buffer=0, epoch=epoch,
                                   sample_counts=counts))[1]
        positions = [shard_of[k] for k in keys]
        orders.append(tuple(p // 50 for p in positions[::50]))
        assert all(b - a == 1 for a, b in zip(positions, positions[1:]) if a // 50 == b // 50)
    assert len(set(orders)) > 1 and all(sorted(o) == list(range(5)) for o in orders)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("split,world_size,workers", [("train", 2, 2), ("train", 3, 0), ("val", 2, 2)])
def test_ranks_and_workers(shards, split, world_size, workers, drop_last):
    """Disjoint ranks, equal batch counts, len() == what is yielded; val has 1 shard for 2 ranks."""
    batch = 16 if split == "train" else 4
    runs = []
    for rank in range(world_size):
        source = stream_from_folder(shards, split, batch_size=batch, workers=workers, rank=rank,
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


def test_batch_plan_without_reading():
    """The rule on bigger, uneven counts: len/num_samples only, nothing is opened."""
    counts = [1000] * 9 + [337]
    urls = [f"http://example.invalid/train-{i:06d}.tar" for i in range(10)]
    for drop_last in (False, True):
        ranks = [StreamSource(urls, batch_size=256, rank=r, world_size=4, sample_counts=counts, drop_last=drop_last)
                 for r in range(4)]
        assert len({len(s) for s in ranks}) == 1
        total = sum(s.num_samples for s in ranks)
        assert total == sum(counts) if not drop_last else total == 4 * len(ranks[0]) * 256
    sizes = StreamSource(urls, batch_size=256, sample_counts=counts)._plan()[2]
    assert sizes == [256] * 36 + [9337 - 36 * 256]
    with pytest.raises(ValueError, match="sample_counts"):
        StreamSource(urls, world_size=2, rank=1)
    with pytest.raises(ValueError, match="cannot fill|not all can fill"):
        StreamSource(urls[:2], batch_size=1, world_size=2, sample_counts=[1000, 1])


def test_workers_rebatch_into_full_batches(shards):
    """Two workers each end with a partial batch; the main process joins them, none comes out short."""
    urls, counts = _urls(shards)
    sizes, keys = _epoch(StreamSource(urls, batch_size=48, workers=2, sample_counts=counts))[:2]
    assert sizes == [48] * 5 and len(set(keys)) == 240
    sizes = _epoch(StreamSource(urls, batch_size=36, workers=2))[0]  # counts unknown: the same
    assert sizes == [36] * 6 + [24]


def test_brace_pattern_and_pipe_urls(shards):
    pattern = f"pipe:cat {shards}/train-{{000000..000004}}.tar"
    source = StreamSource(pattern, batch_size=64, workers=2, sample_counts=[50, 50, 50, 50, 40])
    assert len(source) == 4 and len(set(_epoch(source)[1])) == 240


def _damaged(shards, tmp_path, how):
    urls, counts = _urls(shards)
    bad = tmp_path / "train-000002.tar"
    shutil.copy(urls[2], bad)
    with open(bad, "r+b") as f:
        how(f)
    return urls[:2] + [str(bad)] + urls[3:], counts, bad


def _truncate(at):
    return lambda f: f.truncate(at)


def _overwrite(at, data):
    return lambda f: (f.seek(at), f.write(data))


@pytest.mark.parametrize("how,message", [
    (_truncate(20 * SAMPLE_BYTES + 3000), "unexpected end of data"),  # inside a member
    (_truncate(20 * SAMPLE_BYTES), "expected 50 samples, got 20"),  # between samples: tar just ends
    (_overwrite(10 * SAMPLE_BYTES, b"garbage"), "expected 50 samples, got 10"),  # a bad header checksum
    (_overwrite(10 * SAMPLE_BYTES + 512, b"XXXX"), "not a uint8"),  # the .npy header
    (_truncate(0), "empty file"),
])
@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_shard_is_named(shards, tmp_path, how, message, workers):
    urls, counts, bad = _damaged(shards, tmp_path, how)
    with pytest.raises(ShardError, match=message) as err:
        _epoch(StreamSource(urls, batch_size=16, workers=workers, sample_counts=counts))
    assert str(err.value).startswith(str(bad))


def test_count_mismatch_and_missing_shard(shards, tmp_path):
    urls, counts = _urls(shards)
    with pytest.raises(ShardError, match=f"^{urls[4]}: .*expected 41 samples, got 40"):
        _epoch(StreamSource(urls, workers=2, sample_counts=counts[:4] + [41]))
    missing = str(tmp_path / "train-000009.tar")
    with pytest.raises(ShardError, match=f"^{missing}: "):
        _epoch(StreamSource(urls + [missing], workers=2))
    with pytest.raises(ShardError, match=f"^pipe:cat {missing}: "):
        _epoch(StreamSource([f"pipe:cat {missing}"], workers=0))


def test_folder_checks(shards, tmp_path):
    with pytest.raises(ShardError, match=rf"^{shards}: no samples for split 'nope'"):
        stream_from_folder(shards, "nope")
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    os.truncate(copy / "train-000001.tar", 1000)
    with pytest.raises(ShardError, match=f"^{copy / 'train-000001.tar'}: .*truncated"):
        stream_from_folder(copy, "train")
    (copy / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match=f"^{copy / 'train-000001.tar'}: missing"):
        stream_from_folder(copy, "train")


def test_early_stop_releases_workers(shards):
    source = stream_from_folder(shards, "train", batch_size=16, workers=2)
    for _ in source:
        break  # the autouse fixture checks that no worker process is left behind


def test_labels_and_keys_agree_across_variants(shards):
    rgb = Counter(zip(*_epoch(stream_from_folder(shards, "val", variant="rgb64", workers=0))[1:3]))
    gray = Counter(zip(*_epoch(stream_from_folder(shards, "val", variant="gray28", workers=2))[1:3]))
    assert rgb == gray and len(rgb) == 30
