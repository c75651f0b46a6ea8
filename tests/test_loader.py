"""`make_loader`: exactly-once epochs, determinism, exact pixels, device stage, and clear errors."""
import gc
import io
import os
import shutil
import weakref
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from pipeline.device import DeviceStage, check_device
from pipeline.errors import ShardError, UsageError
from pipeline.index import read_index, read_manifest
from pipeline.loader import make_loader
from pipeline.order import NoFullBatch
from pipeline.reader import ShardArrays
from pipeline.source import open_release
from tests.conftest import copy_with_edited_index, needs_real


def keys_of(loader):
    return [k for _, _, keys in loader for k in keys]


@pytest.mark.parametrize("path, prefetch", [("fast", 0), ("fast", 3), ("resident", None)])
def test_every_sample_once_per_epoch_and_labels_match_index(shards, path, prefetch):
    index = read_index(shards, "train").to_pydict()
    label_of = dict(zip(index["key"], index["label"]))
    loader = make_loader(shards, "train", batch_size=50, with_keys=True, path=path, raw=True, prefetch=prefetch)
    seen = []
    for images, labels, keys in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (64, 64, 3)
        assert labels.tolist() == [label_of[k] for k in keys]
        seen += keys
    assert sorted(seen) == sorted(index["key"]) and len(loader) == -(-len(seen) // 50)


def test_order_is_deterministic_per_seed_and_epoch(shards):
    def order(seed, epoch):
        return keys_of(make_loader(shards, "train", batch_size=32, seed=seed, epoch=epoch, with_keys=True, raw=True))
    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and sorted(order(0, 0)) == sorted(order(0, 1))
    assert order(0, 0) != order(1, 0)
    loader = make_loader(shards, "train", batch_size=32, with_keys=True, raw=True)
    loader.set_epoch(1)
    assert keys_of(loader) == order(0, 1)
    assert keys_of(make_loader(shards, "val", batch_size=7, shuffle=False, with_keys=True, raw=True)) == \
        read_index(shards, "val").to_pydict()["key"]


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_are_disjoint_and_step_together(shards, drop_last):
    n = read_manifest(shards)["counts"]["train"]
    loaders = [make_loader(shards, "train", batch_size=32, rank=r, world_size=3, drop_last=drop_last,
                           with_keys=True, raw=True) for r in range(3)]
    parts = [keys_of(loader) for loader in loaders]
    assert all(set(a).isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1:])
    if drop_last:
        assert {len(p) for p in parts} == {(n // 3) // 32 * 32} and len({len(l) for l in loaders}) == 1
    else:
        assert sum(len(p) for p in parts) == n


@pytest.mark.parametrize("path", ["resident", "fast", "stream"])
def test_without_drop_last_every_rank_takes_as_many_batches(shards, path):
    """The 30 val samples on 4 ranks are 8, 8, 7 and 7: in batches of 7 the local paths gave ranks 0 and 1 two
    batches and ranks 2 and 3 one, and under DDP those two never joined the others' last all-reduce (a hang).
    Each of those splits its one batch in two, as the stream path spreads its samples, and every sample is read once."""
    loaders = [make_loader(shards, "val", batch_size=7, rank=r, world_size=4, path=path, raw=True, with_keys=True,
                           **({"workers": 0} if path == "stream" else {})) for r in range(4)]
    sizes = [[len(keys) for _, _, keys in loader] for loader in loaders]
    assert sizes == [[7, 1], [7, 1], [4, 3], [4, 3]] and [len(loader) for loader in loaders] == [2] * 4
    every = sorted(read_index(shards, "val")["key"].to_pylist())
    assert sorted(k for loader in loaders for k in keys_of(loader)) == every


@pytest.mark.parametrize("path", ["resident", "fast", "stream"])
@pytest.mark.parametrize("world_size, batch_size, message", [
    (32, 8, "world_size=32: 2 of the ranks would have no batch of the 30 samples to read, and DDP would wait on "
            "them for good; use at most 30 ranks"),
    (4, 1, "batch_size=1: 2 of the 4 ranks would take a batch fewer than the others (they hold a sample fewer), "
           "and DDP would wait on them for good; use a batch_size of at least 2, or drop_last=True"),
])
def test_ranks_that_cannot_take_as_many_batches_as_the_others_are_refused(shards, path, world_size, batch_size,
                                                                          message):
    """More ranks than samples (30 val samples on 32 ranks): on the local paths ranks 30 and 31 had no batch, the
    others one; every rank, the last one too, now refuses it at once, as the stream path did, in the same words
    (the stream path's were 'ranks hold [1, 1, ..., 0] samples: not all can fill 1 batches; use drop_last=True, a
    larger batch_size or more, smaller shards': every rank's count, and remedies that cannot help)."""
    kwargs = dict(batch_size=batch_size, world_size=world_size, path=path,
                  **({"workers": 0} if path == "stream" else {}))
    for rank in (0, world_size - 1):
        with pytest.raises(ValueError) as e:
            make_loader(shards, "val", rank=rank, **kwargs)
        assert str(e.value) == message
    if world_size == 4:  # drop_last: what every rank can take
        assert len(make_loader(shards, "val", rank=world_size - 1, drop_last=True, **kwargs)) == 7
    else:  # none: refused (`test_drop_last_that_leaves_no_batch_is_refused`)
        with pytest.raises(NoFullBatch):
            make_loader(shards, "val", rank=world_size - 1, drop_last=True, **kwargs)


@pytest.mark.parametrize("path", ["resident", "fast", "stream"])
@pytest.mark.parametrize("world_size, batch_size, message", [
    (1, 31, "batch_size=31, drop_last=True: the val split's 30 samples fill no batch, so every epoch would be "
            "empty; use a smaller batch_size, or drop_last=False"),
    (4, 8, "batch_size=8, drop_last=True: no rank's share of the val split's 30 samples (4 ranks) fills a batch, "
           "so every epoch would be empty; use a smaller batch_size, fewer ranks, or drop_last=False"),
])
def test_drop_last_that_leaves_no_batch_is_refused(shards, path, world_size, batch_size, message):
    """A batch_size above the split (or a rank's share of it) with drop_last gave a loader of no batch: a loop
    over it trained on nothing, without a word."""
    kwargs = dict(batch_size=batch_size, world_size=world_size, path=path, **({"workers": 0} if path == "stream" else {}))
    for rank in range(world_size):
        with pytest.raises(NoFullBatch) as e:
            make_loader(shards, "val", rank=rank, drop_last=True, **kwargs)
        assert str(e.value) == message
    assert len(make_loader(shards, "val", drop_last=True, **dict(kwargs, batch_size=batch_size - 1))) >= 1


@pytest.mark.parametrize("augment", ["none", "crop"])
def test_a_step_seeds_its_draws_only_when_it_draws(shards, augment, monkeypatch):
    """A per-step seed costs host time on every step: only an augmenting loader makes one, from
    (seed, epoch, rank, step)."""
    import pipeline.loader

    made = []
    monkeypatch.setattr(pipeline.loader, "step_seed", lambda *key: made.append(key) or 7)
    loader = make_loader(shards, "train", batch_size=64, seed=5, augment=augment)
    loader.set_epoch(2)
    steps = sum(1 for _ in loader)
    assert made == ([] if augment == "none" else [(5, 2, 0, k) for k in range(steps)])


@pytest.mark.parametrize("path", ["resident", "stream"])
def test_set_epoch_during_an_epoch_leaves_its_remaining_batches_as_they_were(shards, path):
    """The rest of an epoch after set_epoch(1) was called during it kept epoch 0's order but took
    epoch 1's crops and flips: its batches matched neither epoch."""
    def loader():
        return make_loader(shards, "train", batch_size=64, seed=5, augment="crop", path=path)
    whole = [images for images, _ in loader()]
    interrupted = loader()
    batches = iter(interrupted)
    first = next(batches)[0]
    interrupted.set_epoch(1)
    rest = [images for images, _ in batches]
    assert len(whole) == 4 and all(torch.equal(a, b) for a, b in zip(whole, [first] + rest, strict=True))


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_resumed_epoch_draws_the_augmentation_of_the_uninterrupted_one(shards, world_size):
    """Resumed at start (samples over all ranks), a rank's batches are the uninterrupted epoch's from its step
    start // (batch_size * world_size) on, crops and flips included: each step's draws are seeded by its number."""
    def batches(start):
        loader = make_loader(shards, "train", "gray28", batch_size=32, seed=5, epoch=1, rank=world_size - 1,
                             world_size=world_size, augment="crop", with_keys=True)
        loader.set_epoch(1, start=start)
        return [(images, keys) for images, _, keys in loader]
    whole, resumed = batches(0), batches(2 * 32 * world_size)
    assert len(resumed) == len(whole) - 2 >= 2
    assert all(keys == want_keys and torch.equal(images, want)
               for (images, keys), (want, want_keys) in zip(resumed, whole[2:], strict=True))


@pytest.mark.parametrize("variant, pad", [("rgb64", 4), ("gray28", 2)])
def test_the_crop_pads_each_variant_by_its_own_margin(shards, variant, pad):
    """augment='crop' crops from the image zero-padded by 4 pixels at 64x64, by 2 at 28x28: over an epoch some
    image is shifted by the whole margin, none further (rows of padding: 0 normalised by mean 0.5, std 0.5)."""
    channels = 3 if variant == "rgb64" else 1
    loader = make_loader(shards, "train", variant, batch_size=64, seed=5, augment="crop",
                         mean=(0.5,) * channels, std=(0.5,) * channels)
    shifts = []
    for images, _ in loader:
        blank = (images == -1).all(dim=(1, 3))  # (B, H): rows that are padding only
        for rows in blank.tolist():
            shifts.append(max(next((i for i, b in enumerate(r) if not b), len(r)) for r in (rows, rows[::-1])))
    assert max(shifts) == pad


def test_resident_gives_the_same_batches_as_fast(shards):
    def batches(**kw):  # normalised float batches: new tensors, not the fast path's reused buffers
        return list(make_loader(shards, "train", "gray28", batch_size=64, seed=5, **kw))

    a, threaded, b = batches(path="fast"), batches(path="fast", prefetch=2), batches(path="resident")
    assert len(a) == -(-read_manifest(shards)["counts"]["train"] // 64)  # 240 samples: 4 batches, none lost
    for other in (threaded, b):
        assert len(other) == len(a)
        assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, other, strict=True))


@pytest.mark.parametrize("variant", ["rgb64", "gray28"])
def test_batch_pixels_equal_the_source_jpegs(release, shards, variant):
    files = open_release(release)
    source_of = dict(zip(*(read_index(shards, "val").to_pydict()[c] for c in ("key", "source"))))
    for images, _, keys in make_loader(shards, "val", variant, batch_size=16, with_keys=True, raw=True):
        for img, key in zip(images.numpy(), keys, strict=True):
            rgb = Image.open(io.BytesIO(files.read(source_of[key]))).convert("RGB")
            want = rgb if variant == "rgb64" else rgb.resize((28, 28), Image.BILINEAR).convert("L")
            assert np.array_equal(img, np.asarray(want))


def test_device_stage_normalises_with_manifest_stats(shards):
    stats = read_manifest(shards)["stats"]["rgb64"]
    raw = next(iter(make_loader(shards, "val", batch_size=8, shuffle=False, raw=True)))[0]
    x, y = next(iter(make_loader(shards, "val", batch_size=8, shuffle=False)))
    want = (raw.permute(0, 3, 1, 2).float() / 255 - torch.tensor(stats["mean"]).view(1, 3, 1, 1)) \
        / torch.tensor(stats["std"]).view(1, 3, 1, 1)
    assert x.shape == (8, 3, 64, 64) and x.dtype == torch.float32 and torch.allclose(x, want, atol=1e-5)
    g, _ = next(iter(make_loader(shards, "val", "gray28", batch_size=8, shuffle=False, mean=(0.5,), std=(0.5,))))
    assert g.shape == (8, 1, 28, 28) and g.min() >= -1 and g.max() <= 1
    c, _ = next(iter(make_loader(shards, "val", batch_size=8, shuffle=False, size=224, channels_last=True,
                                 dtype=torch.bfloat16)))
    assert c.shape == (8, 3, 224, 224) and c.dtype == torch.bfloat16
    assert c.is_contiguous(memory_format=torch.channels_last)


def _pil_resize_224(rgb):
    return torch.from_numpy(np.array(TF.resize(Image.fromarray(rgb), [224, 224],
                                                 interpolation=TF.InterpolationMode.BILINEAR))).float()


def _check_resize(images):
    stage = DeviceStage((0, 0, 0), (1 / 255, 1 / 255, 1 / 255), size=224)  # identity scale: output in 0..255
    got = stage(images).permute(0, 2, 3, 1)
    want = torch.stack([_pil_resize_224(img.numpy()) for img in images])
    diff = (got - want).abs()
    # PIL rounds to uint8 (and uses fixed-point weights); the device stage keeps floats:
    # never more than one grey level apart, about a third of a level on average.
    assert diff.max() <= 1.01 and diff.mean() < 0.35, (diff.max(), diff.mean())


def test_224_upscale_matches_pil_bilinear_resize(shards):
    _check_resize(next(iter(make_loader(shards, "val", batch_size=16, raw=True)))[0].clone())


@needs_real
def test_224_upscale_matches_pil_on_real_images(real_shards):
    _check_resize(next(iter(make_loader(real_shards, "val", batch_size=32, raw=True)))[0].clone())


def test_empty_split_and_missing_folder_are_clear(shards, tmp_path):
    # A split that is none of a set's: a value no argument can take, a ValueError (make_loader's docstring), as
    # read_index and ShardSet.split_index say it; it was a ShardError, 'no samples for split', as if the set lacked it.
    with pytest.raises(ValueError) as e:
        make_loader(shards, "nope")
    assert str(e.value) == "split must be one of train, val, test, unlabeled, not 'nope'"
    with pytest.raises(ShardError, match="not a tinyin shard set"):
        make_loader(tmp_path, "train", path="fast")


def test_a_split_the_set_lacks_is_a_usage_error_on_every_path(release, tmp_path, monkeypatch):
    """A set of the first classes (`--classes`) has no unlabeled split: each path said the set's own lack, a
    ShardError ('SET: no samples for split 'unlabeled''), where make_loader's docstring refuses a choice that does
    not fit the shards as a UsageError. Each path, and a URL of the set (cached first, or streamed), says so."""
    from pipeline.build import build_shards
    from tests.servers import FaultyHTTPServer

    subset = tmp_path / "sub"
    build_shards(release, subset, workers=1, shard_size=1000, classes=2, progress=False)
    monkeypatch.setenv("TINYIN_CACHE", str(tmp_path / "cache"))
    server = FaultyHTTPServer(subset)
    try:
        for shards, path in [(subset, p) for p in ("auto", "fast", "resident", "stream")] + [
                (server.url, "auto"), (server.url, "stream")]:
            with pytest.raises(UsageError) as e:
                make_loader(shards, "unlabeled", path=path, workers=0 if path == "stream" else None)
            assert str(e.value) == (f"{shards} has no split 'unlabeled' (a set of the first 2 classes holds no "
                                    "unlabeled images); its splits: train, val, test"), path
        assert not (tmp_path / "cache").exists()  # nothing fetched for it
        with pytest.raises(UsageError) as e:  # the memory maps under the fast path, public themselves
            ShardArrays(subset, "unlabeled")
        assert str(e.value) == (f"{subset} has no split 'unlabeled' (a set of the first 2 classes holds no unlabeled "
                                "images); its splits: train, val, test")
    finally:
        server.close()


def test_a_folder_named_like_a_brace_pattern_is_a_shard_set(shards, tmp_path, monkeypatch):
    """A folder `run {1,2}` was taken for a brace pattern of shard URLs: path='auto' and 'stream' asked
    for sample_counts, 'fast' and 'resident' failed as 'None: no such folder'. So it still was as
    `~/run {1,2}` or `file://.../run {1,2}`, which a folder of another name is read as."""
    copy = shutil.copytree(shards, tmp_path / "run {1,2}")
    want = read_index(shards, "val").to_pydict()["key"]
    for path in ("auto", "fast", "resident", "stream"):
        loader = make_loader(copy, "val", batch_size=8, shuffle=False, path=path, with_keys=True, raw=True)
        assert [k for _, _, keys in loader for k in keys] == want, path
    monkeypatch.setenv("HOME", str(tmp_path))
    for where in ("~/run {1,2}", f"file://{copy}"):
        loader = make_loader(where, "val", batch_size=8, shuffle=False, with_keys=True, raw=True)
        assert [k for _, _, keys in loader for k in keys] == want, where


def test_a_list_of_shard_urls_is_refused_by_the_local_paths(shards):
    for path in ("fast", "resident"):
        for urls in ([shards / "val-000000.tar"], f"{shards}/val-{{000000..000000}}.tar"):
            with pytest.raises(UsageError) as e:
                make_loader(urls, "val", path=path, sample_counts=[30])
            assert str(e.value) == (f"path={path!r}: a list of shard URLs is read by the stream path only; "
                                    "the fast and resident paths map a shard set's folder")


def test_truncated_or_modified_shards_are_named(shards, tmp_path):
    copy = shutil.copytree(shards, tmp_path / "copy")
    bad = copy / "train-000002.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[:-4096])
    with pytest.raises(ShardError) as e:
        make_loader(copy, "train", path="fast")
    assert str(e.value) == f"{bad}: {len(data) - 4096:,} bytes, the manifest says {len(data):,} (truncated or replaced)"
    bad.unlink()
    with pytest.raises(ShardError, match=f"{bad}: missing"):
        make_loader(copy, "train")


@pytest.mark.parametrize("path, prefetch", [("fast", None), ("fast", 2), ("resident", None)])
def test_a_corrupt_shard_is_named_before_the_epoch_ends(shards, tmp_path, path, prefetch):
    """Checksums are checked in the background: make_loader returns at once, and the epoch raises
    the shard's one-line error before its last batch (every time it is iterated)."""
    copy = shutil.copytree(shards, tmp_path / "copy")
    bad = copy / "train-000002.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # same size: only the checksum can tell
    loader = make_loader(copy, "train", batch_size=16, path=path, prefetch=prefetch, raw=True)
    for _ in range(2):
        got = 0
        with pytest.raises(ShardError) as e:
            for _ in loader:
                got += 1
        assert str(e.value) == f"{bad}: checksum differs from the manifest (corrupt or modified)"
        assert got < len(loader)
    with pytest.raises(ShardError) as e:
        make_loader(copy, "train", path=path, prefetch=prefetch).wait_ready()
    assert str(e.value) == f"{bad}: checksum differs from the manifest (corrupt or modified)"
    assert len(list(make_loader(copy, "train", batch_size=16, path=path, prefetch=prefetch, raw=True,
                                checksum=False))) == len(loader)  # asked not to check: it does not


@pytest.mark.parametrize("path", ["fast", "resident"])
def test_a_loader_dropped_after_its_shard_error_is_freed(shards, tmp_path, path):
    """The storage's finalizer held its data pass, the pass its error, and the error, raised in the
    loop, the loader's frames: a loader that had named a corrupt shard was never freed, even by
    gc.collect() (its maps and file descriptors, the resident copy of the split)."""
    copy = shutil.copytree(shards, tmp_path / "copy")
    bad = copy / "train-000002.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    loader = make_loader(copy, "train", batch_size=16, path=path, raw=True)
    with pytest.raises(ShardError):
        list(loader)
    storage = weakref.ref(loader.source.storage)
    del loader
    gc.collect()
    assert storage() is None


def test_resident_serves_the_same_bytes_before_and_after_its_copy_is_complete(shards):
    from pipeline.reader import ShardArrays
    from pipeline.storage import ResidentStorage

    storage = ResidentStorage(ShardArrays(shards, "train", "gray28", checksum=False), "cpu")
    storage.data_pass.wait()
    idx = np.array([0, 5, 63, 64, 200, 239])
    after = [t.clone() for t in storage.batch(idx)]
    storage.complete = False
    before = storage.batch(idx)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)) and after[0].shape == (6, 28, 28)


@pytest.mark.parametrize("idx, bad", [([0, 240], 240), ([-1, 5], -1), ([239, 10**6], 10**6)])
def test_shard_arrays_refuses_a_position_outside_the_split(shards, idx, bad):
    """A position past the split (or negative) fell in no shard's range: its row came back as whatever
    the fresh buffer held, uninitialised memory, with no error."""
    from pipeline.reader import ShardArrays

    with pytest.raises(IndexError) as e:
        ShardArrays(shards, "train", "gray28", checksum=False).gather(idx)
    assert str(e.value) == f"positions must be in 0..239 (the split's samples), got {bad}"


def test_an_index_whose_offsets_break_the_stride_is_refused(shards, tmp_path):
    """The fast and resident paths read a shard as a strided array, from its first offset at the stride
    of the first two: an index row elsewhere would be silently ignored, its pixels not the index's."""
    from pipeline.reader import ShardArrays

    fifth = read_index(shards).column("rgb64_offset")[4].as_py()
    copy, _ = copy_with_edited_index(shards, tmp_path, "rgb64_offset", 3, fifth)
    with pytest.raises(ShardError) as e:
        ShardArrays(copy, "train", "rgb64", checksum=False)
    assert str(e.value) == f"{copy / 'train-000000.tar'}: samples are not evenly spaced (not written by tinyin shard build)"


def test_a_shard_of_two_samples_is_viewed_at_its_own_stride():
    """The last shard of a split can hold two samples (a split of 66 at 64 a shard): its stride is the
    distance between those two, not the 0 of a one-sample shard (which refused it as unevenly spaced)."""
    from pipeline.reader import _strided_view

    data = np.arange(100, dtype=np.uint8)
    assert _strided_view(data, np.array([10, 30]), 5, "s.tar").tolist() == [[10, 11, 12, 13, 14], [30, 31, 32, 33, 34]]
    assert _strided_view(data, np.array([40]), 3, "s.tar").tolist() == [[40, 41, 42]]


def test_a_view_that_would_end_past_the_shard_is_refused():
    """The last row must end inside the shard: as_strided checks nothing, and a row reaching past the end
    would read whatever memory follows the map."""
    from pipeline.reader import _strided_view

    with pytest.raises(ShardError) as e:
        _strided_view(np.arange(100, dtype=np.uint8), np.array([80, 93]), 8, "s.tar")
    assert str(e.value) == "s.tar: index points past the end of the shard"
    assert _strided_view(np.arange(100, dtype=np.uint8), np.array([80, 92]), 8, "s.tar")[1, -1] == 99


def test_an_index_row_whose_split_names_another_split_than_its_shards_is_refused(shards, tmp_path):
    """The first test row marked 'val' came last among val's rows, a label with no image (the loader's last
    position read no shard, its image whatever the buffer held) with no error. The set's open names it."""
    from pipeline.reader import ShardArrays

    first_test = read_index(shards).column("split").to_pylist().index("test")
    copy, key = copy_with_edited_index(shards, tmp_path, "split", first_test, "val")
    with pytest.raises(ShardError) as e:
        ShardArrays(copy, "val", "gray28", checksum=False)
    assert str(e.value) == (f"{copy / 'index.parquet'}: {key} of test-000000.tar is marked split val, "
                            "the manifest lists test-000000.tar in test")


def test_an_unchanged_shard_is_hashed_once_a_process(shards, tmp_path, monkeypatch):
    """Every loader of a split (each epoch's val loader, a test pass) checks its shards: one this process
    already hashed, unchanged since, is only read in, not hashed again (a second of CPU per GB)."""
    import hashlib
    import types

    import pipeline.reader
    from pipeline.reader import ShardArrays

    hashed = []
    monkeypatch.setattr(pipeline.reader, "hashlib", types.SimpleNamespace(
        sha256=lambda data: hashed.append(len(data)) or hashlib.sha256(data)))
    copy = shutil.copytree(shards, tmp_path / "copy")
    first = ShardArrays(copy, "train", "gray28")
    assert len(hashed) == len(first.entries) == 4
    ShardArrays(copy, "train", "gray28")
    assert len(hashed) == 4


def test_gather_refuses_an_out_buffer_too_small_for_its_positions(shards):
    from pipeline.reader import ShardArrays

    arrays = ShardArrays(shards, "train", "gray28", checksum=False)
    with pytest.raises(ValueError) as e:
        arrays.gather([0, 1, 2], out=torch.empty((2, 28, 28), dtype=torch.uint8))
    assert str(e.value) == "out has shape (2, 28, 28), need at least (3, (28, 28)), contiguous"
    with pytest.raises(ValueError) as e:
        arrays.gather([0, 1, 2], out=torch.empty((3, 28, 56), dtype=torch.uint8)[:, :, ::2])
    assert str(e.value) == "out has shape (3, 28, 28), need at least (3, (28, 28)), contiguous"
    out = torch.empty((4, 28, 28), dtype=torch.uint8)
    assert torch.equal(arrays.gather([0, 1, 2], out=out), arrays.gather([0, 1, 2]))


@pytest.mark.parametrize("idx, kind", [(np.ones(240, bool), "bool of shape (240,)"),
                                       (np.array([0.5, 2.7]), "float64 of shape (2,)"),
                                       (3, "int64 of shape ()"), ([[0, 1]], "int64 of shape (1, 2)")])
def test_gather_refuses_what_are_no_positions(shards, idx, kind):
    """A boolean mask was cast to positions 0 and 1 (every True the image at 1), 2.7 to 2, and one position
    failed as 'len() of unsized object'."""
    from pipeline.reader import ShardArrays

    arrays = ShardArrays(shards, "train", "gray28", checksum=False)
    with pytest.raises(ValueError) as e:
        arrays.gather(idx)
    assert str(e.value) == f"positions must be a 1-D sequence of integers (np.flatnonzero(mask) for a mask), not {kind}"
    assert arrays.gather([]).shape == (0, 28, 28) and arrays.gather(torch.tensor([3, 9])).shape == (2, 28, 28)


def test_gather_refuses_positions_out_of_order(shards):
    """Each shard's rows are cut out of the positions by where its first row falls in them: unsorted, the
    cuts were wrong and images went to other positions' places, without an error."""
    from pipeline.reader import ShardArrays

    arrays = ShardArrays(shards, "train", "gray28", checksum=False)
    with pytest.raises(ValueError) as e:
        arrays.gather([70, 5, 130])
    assert str(e.value) == "gather needs sorted positions"


def test_shard_arrays_names_the_variants_it_has(shards):
    from pipeline.reader import ShardArrays

    with pytest.raises(ValueError) as e:
        ShardArrays(shards, "train", "rgb32")
    assert str(e.value) == "variant must be one of ['gray28', 'rgb64'], not 'rgb32'"


def test_a_listed_shard_of_no_samples_has_no_rows_to_copy(shards, tmp_path):
    """A split's empty last shard (count 0, as a manifest may list one) has no view: the resident path's
    data pass copies nothing for it (it was handed a view index past the last, an IndexError)."""
    import hashlib
    import json

    from pipeline.checksum import sum64
    from pipeline.reader import ShardArrays
    from pipeline.storage import ResidentStorage

    copy = shutil.copytree(shards, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    last = max(i for i, e in enumerate(manifest["shards"]) if e["split"] == "train")
    (copy / "train-empty.tar").write_bytes(bytes(1024))
    manifest["shards"].insert(last + 1, dict(manifest["shards"][last], file="train-empty.tar", count=0, bytes=1024,
                                             sha256=hashlib.sha256(bytes(1024)).hexdigest(), sum64=sum64(bytes(1024))))
    (copy / "manifest.json").write_text(json.dumps(manifest))
    arrays = ShardArrays(copy, "train", "gray28")
    assert [rows is None for rows in map(arrays.shard_rows, range(5))] == [False, False, False, False, True]
    storage = ResidentStorage(arrays, "cpu")
    storage.data_pass.wait()
    assert storage.complete and torch.equal(storage.batch(np.arange(240))[0], arrays.gather(np.arange(240)))


def test_a_shard_changed_after_this_process_verified_it_is_hashed_again(shards, tmp_path):
    """Each process hashes a shard once, keyed by (path, size, mtime): one damaged in place after a
    loader verified it, its size kept, is hashed again (keyed without its mtime it passed as verified)."""
    from pipeline.reader import ShardArrays

    copy = shutil.copytree(shards, tmp_path / "copy")
    ShardArrays(copy, "train", "gray28")  # every train shard hashed and found good
    path = copy / "train-000001.tar"
    data, mtime = bytearray(path.read_bytes()), path.stat().st_mtime_ns
    data[5000] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # later, whatever the file system's time resolution
    with pytest.raises(ShardError) as e:
        ShardArrays(copy, "train", "gray28")
    assert str(e.value) == f"{path}: checksum differs from the manifest (corrupt or modified)"


@pytest.mark.parametrize("kwargs, message", [
    (dict(workers=2), "workers=2: the resident path (chosen by path='auto') reads in the calling process; "
                      "only path='stream' uses workers"),
    (dict(path="fast", workers=0), "workers=0: the fast path reads in the calling process; only path='stream' uses workers"),
    (dict(path="resident", prefetch=2), "prefetch=2: the resident path does not prefetch; only path='fast' does"),
    (dict(path="stream", prefetch=2), "prefetch=2: the stream path does not prefetch; only path='fast' does"),
    (dict(path="stream", checksum=False),  # dropped: the shards were checked all the same
     "checksum=False: the stream path checks each shard as it reads it, every epoch; "
     "only the fast and resident paths skip their checksum pass"),
    (dict(sample_counts=[64, 64, 64, 48]),
     "sample_counts: a shard set's counts come from its manifest; sample_counts is for a list of shard URLs"),
])
def test_an_option_the_path_does_not_use_is_refused(shards, kwargs, message):
    with pytest.raises(UsageError) as e:
        make_loader(shards, "train", **kwargs)
    assert str(e.value) == message


@pytest.mark.parametrize("augment", [False, "none", True, "crop"])
def test_an_rrc_scale_without_the_random_resized_crop_is_refused(shards, augment, monkeypatch):
    """rrc_scale is the random-resized crop's: with another augment it was dropped without a word (crops at the pad's
    place, or none), where an option the loader does not use is refused; rrc_scale at its default is not one given."""
    monkeypatch.setattr("pipeline.loader.open_shard_set", lambda *a: pytest.fail("a shard set was opened"))
    with pytest.raises(UsageError) as e:
        make_loader(shards, "train", augment=augment, rrc_scale=[0.5, 1])
    assert str(e.value) == (f"rrc_scale=[0.5, 1]: augment={augment!r} draws no random-resized crop; "
                            "only augment='rrc' uses rrc_scale")
    monkeypatch.undo()
    assert len(make_loader(shards, "train", augment=augment, rrc_scale=(0.35, 1), batch_size=64)) == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=224), "size=224"),
    (dict(augment=True, mean=(0.5,) * 3, std=(0.5,) * 3), "mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), augment=True"),
    (dict(augment="rrc", dtype=torch.bfloat16, channels_last=True), "augment='rrc', dtype=torch.bfloat16, channels_last=True"),
    (dict(rrc_scale=(0.5, 1.0)), "rrc_scale=(0.5, 1.0)"),  # dropped silently too
])
def test_an_option_of_the_device_stage_is_refused_with_raw(shards, kwargs, message, monkeypatch):
    """raw=True yields the stored bytes: these were dropped silently (augment=True gave unaugmented images)."""
    monkeypatch.setattr("pipeline.loader.open_shard_set", lambda *a: pytest.fail("a shard set was opened"))
    with pytest.raises(UsageError) as e:
        make_loader(shards, "train", raw=True, **kwargs)
    assert str(e.value) == message + ": raw=True yields the stored uint8 images, without the device stage"


@pytest.mark.parametrize("kwargs, message", [
    (dict(path="fast", prefetch=-1), "prefetch must be an integer of at least 0, not -1"),  # hung: a ring of 0 buffers
    (dict(rank=2, world_size=2), "need rank < world_size, got rank=2, world_size=2"),
    (dict(rank=-1), "rank must be an integer of at least 0, not -1"),
    (dict(world_size=0), "world_size must be an integer of at least 1, not 0"),
    (dict(size=0), "size must be an integer of at least 1, not 0"),
    (dict(size=100.5), "size must be an integer of at least 1, not 100.5"),
    (dict(seed=-1), "seed must be an integer of at least 0, not -1"),
    (dict(seed=None), "seed must be an integer of at least 0, not None"),
    (dict(epoch=-1), "epoch must be an integer of at least 0, not -1"),
    (dict(batch_size=64.0), "batch_size must be an integer of at least 1, not 64.0"),
    (dict(batch_size=0), "batch_size must be an integer of at least 1, not 0"),
    (dict(mean=[0.5] * 3, std=[0.5, 0, 0.5]), "std must be positive (it divides), not [0.5, 0, 0.5]"),
    # mean or std alone was replaced by the manifest's pair, silently; a wrong count failed at the first batch
    (dict(mean=(0.485, 0.456, 0.406)), "mean without std: pass both, or neither for the train split's statistics"),
    (dict(std=(0.229, 0.224, 0.225)), "std without mean: pass both, or neither for the train split's statistics"),
    (dict(mean=(0.5,), std=(0.5,)), "mean and std need one value per channel of rgb64 (3), not 1 and 1"),
    (dict(mean=(0.5,) * 3, std=(0.5,) * 2), "mean and std need one value per channel of rgb64 (3), not 3 and 2"),
    # a NaN mean gave NaN images and an infinite std images of 0, without a word; a scalar or a string
    # failed with numpy's or torch's own words, the latter at the first batch
    (dict(mean=[float("nan")] * 3, std=[0.5] * 3), "mean must be finite, not [nan, nan, nan]"),
    (dict(mean=[0.5] * 3, std=[0.5, float("inf"), 0.5]), "std must be finite, not [0.5, inf, 0.5]"),
    (dict(mean=0.5, std=0.5), "mean must be a sequence of numbers, one per channel, not 0.5"),
    (dict(mean=[0.5] * 3, std="0.2"), "std must be a sequence of numbers, one per channel, not '0.2'"),
    (dict(mean=[0.5, 0.5, "x"], std=[0.5] * 3), "mean must be a sequence of numbers, one per channel, not [0.5, 0.5, 'x']"),
    (dict(mean=[0.5] * 3, std=["0.2"] * 3), "std must be a sequence of numbers, one per channel, not ['0.2', '0.2', '0.2']"),
    (dict(variant="gray28", mean=(0.5,) * 3, std=(0.5,) * 3),
     "mean and std need one value per channel of gray28 (1), not 3 and 3"),
    (dict(dtype=torch.int64), "dtype must be a floating-point dtype (images are normalised), not torch.int64"),
    # each of these failed deep inside with Python's, numpy's or torch's own words (the rrc_scale ones only
    # once the shards were open)
    (dict(dtype="float16"), "dtype must be a torch dtype such as torch.float32 or torch.bfloat16, not 'float16'"),
    (dict(dtype=np.float32), "dtype must be a torch dtype such as torch.float32 or torch.bfloat16, not <class 'numpy.float32'>"),
    (dict(path="stream", workers=1.5), "workers must be an integer of at least 0, not 1.5"),
    (dict(path="stream", workers=-1), "workers must be an integer of at least 0, not -1"),
    (dict(augment="rrc", rrc_scale=(0.5,)), "rrc_scale must be (low, high) with 0 < low <= high <= 1; got (0.5,)"),
    (dict(augment="rrc", rrc_scale=["0.2", "1"]),
     "rrc_scale must be (low, high) with 0 < low <= high <= 1; got ['0.2', '1']"),
    (dict(augment="rrc", rrc_scale=None), "rrc_scale must be (low, high) with 0 < low <= high <= 1; got None"),
    (dict(augment="rrc", rrc_scale=(0, 1)), "rrc_scale must be (low, high) with 0 < low <= high <= 1; got (0, 1)"),
    # a string is truthy: each did the opposite of what it said, without a word
    (dict(shuffle="no"), "shuffle must be True or False, not 'no'"),
    (dict(drop_last="False"), "drop_last must be True or False, not 'False'"),
    (dict(with_keys="false"), "with_keys must be True or False, not 'false'"),
    (dict(channels_last=None), "channels_last must be True or False, not None"),
    (dict(raw="0"), "raw must be True or False, not '0'"),
    (dict(checksum="off"), "checksum must be True or False, not 'off'"),
])
def test_bad_arguments_are_refused_before_any_shard_is_opened(shards, kwargs, message, monkeypatch):
    """Each used to be accepted, then fail at the first batch deep in numpy or torch (or hang), with
    the background data pass already started."""
    monkeypatch.setattr("pipeline.loader.open_shard_set", lambda *a: pytest.fail("a shard set was opened"))
    with pytest.raises(ValueError) as e:
        make_loader(shards, "train", **kwargs)
    assert str(e.value) == message


@pytest.mark.parametrize("where", [None, 3, b"shards", {"train": "shards"}, [1, 2], [], ()])
def test_shards_that_name_no_shard_set_nor_shard_urls_are_refused(where):
    """None or 3 said 'None: no such folder', a dict 'a list of shard URLs needs sample_counts', a
    list of numbers was taken, to fail in the stream's workers, and an empty one named every argument of the stream's
    source: 'need shards, batch_size >= 1, 0 <= rank < world_size, workers >= 0; got 0 shards, batch_size=256, ...'."""
    with pytest.raises(ValueError) as e:
        make_loader(where, "train", sample_counts=[1, 1])
    assert str(e.value) == ("shards must be a shard set (its folder or URL, or a ShardSet) or a list of shard URLs, "
                            f"not {where!r}")


@pytest.mark.parametrize("split", [["train", "val"], None])
def test_a_split_that_is_not_a_name_is_refused(shards, split):
    """A list of splits failed as "TypeError: unhashable type: 'list'"."""
    with pytest.raises(ValueError) as e:
        make_loader(shards, split)
    assert str(e.value) == f"split must be one split's name, such as 'train', not {split!r}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_device_this_machine_lacks_is_one_line(shards, monkeypatch):
    """README's own snippet (device="cuda") on a machine without a GPU: torch's 'Found no NVIDIA driver'
    traceback at the first batch, the data pass already started."""
    monkeypatch.setattr("pipeline.loader.open_shard_set", lambda *a: pytest.fail("a shard set was opened"))
    with pytest.raises(UsageError) as e:
        make_loader(shards, "train", device="cuda")
    assert str(e.value) == f"device: cuda, but torch {torch.__version__} sees no CUDA device here"


@pytest.mark.parametrize("device, message", [
    ("mps", "device: tinyin runs on cpu or cuda, not mps"),
    ("meta", "device: tinyin runs on cpu or cuda, not meta"),  # torch's device of shapes without data
    ("gpu", "device: 'gpu' is not a device; use cpu, cuda or cuda:N"),
    (None, "device: None is not a device; use cpu, cuda or cuda:N"),
])
def test_a_device_that_no_machine_gives_is_a_value_error_as_a_path_that_is_none_is(shards, device, message, monkeypatch):
    """make_loader(device="gpu") was a UsageError and make_loader(path="gpu") a ValueError: a value that no
    argument takes is a ValueError (make_loader's docstring), a device this machine lacks a UsageError."""
    monkeypatch.setattr("pipeline.loader.open_shard_set", lambda *a: pytest.fail("a shard set was opened"))
    with pytest.raises(ValueError) as e:
        make_loader(shards, "train", device=device)
    assert str(e.value) == message


def test_check_device_refuses_what_is_no_device_and_a_gpu_index_past_the_last(monkeypatch):
    """torch.device's TypeError (None, a float from Python) is the same one line as its RuntimeError; on a
    machine with one GPU, cuda:0 is it and cuda:1 is refused."""
    for value in (None, 1.5):
        with pytest.raises(UsageError) as e:
            check_device(value)
        assert str(e.value) == f"argument --device: {value} is not a device; use cpu, cuda or cuda:N"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == torch.device("cuda", 0) and check_device("cuda") == torch.device("cuda")
    with pytest.raises(UsageError) as e:
        check_device("cuda:1")
    assert str(e.value) == "argument --device: cuda:1, but there are 1 CUDA devices"


@pytest.mark.parametrize("path", ["resident", "stream"])
def test_set_epoch_refuses_a_negative_epoch_or_start(shards, path):
    loader = make_loader(shards, "train", path=path, batch_size=64)
    for args, message in (((-1,), "epoch must be an integer of at least 0, not -1"),
                          ((0, -64), "start must be an integer of at least 0, not -64")):
        with pytest.raises(ValueError) as e:
            loader.set_epoch(*args)
        assert str(e.value) == message


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("path", ["resident", "fast", "stream"])
def test_a_start_at_the_epochs_end_after_a_short_last_batch_leaves_nothing(shards, path, drop_last):
    """240 samples in batches of 64: the epoch ends after 3 * 64 + 48. train.py resumes from there (its checkpoint at
    the epoch's last step, before validation): the local paths took it, the stream path refused it as no multiple of
    64 ('start=240 is not a multiple of batch_size * world_size = 64', a traceback). With drop_last too: a run
    without --compile consumed the epoch, and its resume with --compile (drop_last) failed so on the stream path."""
    loader = make_loader(shards, "train", path=path, batch_size=64, drop_last=drop_last,
                         **({"workers": 0} if path == "stream" else {}))
    assert sum(len(labels) for _, labels in loader) == (192 if drop_last else 240)
    loader.set_epoch(0, start=240)
    assert (len(loader), list(loader)) == (0, [])


@pytest.mark.parametrize("path", ["resident", "fast", "stream"])
def test_a_start_past_the_split_is_refused_on_every_path(shards, path):
    """256 of 240 samples in batches of 64 is a whole batch past the epoch's short last one (48): the stream path
    took it for the epoch's end (no batch left), where the resident and fast paths refused it."""
    loader = make_loader(shards, "train", path=path, batch_size=64, **({"workers": 0} if path == "stream" else {}))
    with pytest.raises(ValueError) as e:
        loader.set_epoch(0, start=256)
    assert str(e.value) == "start must be between 0 and 240 (the split's size), not 256"


@pytest.mark.parametrize("path, start, message", [
    ("fast", 241, "start must be between 0 and 240 (the split's size), not 241"),
    ("stream", 10, "start=10 is not a multiple of batch_size * world_size = 64"),
])
def test_a_refused_set_epoch_leaves_the_loader_as_it_was(shards, path, start, message):
    """The stream path's refusal came after the loader had taken the new epoch: the next epoch read
    epoch 0's order with epoch 3's augmentation draws, and `loader.epoch` said 3. The local paths took
    any start and refused it only at the next len() or iteration."""
    def epoch(loader):
        return [(keys, images.clone()) for images, _, keys in loader]

    kwargs = dict(variant="gray28", batch_size=64, path=path, augment=True, with_keys=True,
                  **({"workers": 0} if path == "stream" else {}))
    loader = make_loader(shards, "train", **kwargs)
    with pytest.raises(ValueError) as e:
        loader.set_epoch(3, start=start)
    assert str(e.value) == message and (loader.epoch, loader.start) == (0, 0)
    got, want = epoch(loader), epoch(make_loader(shards, "train", **kwargs))
    assert [k for k, _ in got] == [k for k, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want, strict=True))


@pytest.mark.parametrize("path, kwargs", [("fast", {}), ("fast", {"prefetch": 1}), ("stream", {"workers": 1})])
def test_a_batch_size_beyond_the_split_gives_one_batch_of_it(shards, path, kwargs):
    """'Everything in one batch': the fast path's buffers and the stream workers' batch buffers were
    made for batch_size rows, whatever the split held: 10**8 asked for 1.2 TB and failed in torch's
    allocator (10**5 on a 30-sample split: 1.2 GB a buffer, 8 of them in shared memory for 2 stream workers)."""
    loader = make_loader(shards, "val", batch_size=10**8, path=path, raw=True, with_keys=True, **kwargs)
    batches = [(images.shape, sorted(keys)) for images, _, keys in loader]
    assert batches == [((30, 64, 64, 3), sorted(read_index(shards, "val")["key"].to_pylist()))]


@pytest.mark.parametrize("path", ["fast", "resident", "stream"])
def test_numpy_integers_give_what_python_ints_give(shards, path):
    """np.int64 arguments (a sweep's np.arange, a config read by numpy) passed the checks, then the stream
    path failed inside its plan: 'can't multiply sequence by non-int of type numpy.bool'."""
    def epoch(np_int, start):
        kwargs = dict(batch_size=np_int(40), seed=np_int(7), epoch=np_int(1), rank=np_int(1), world_size=np_int(2),
                      path=path, raw=True, with_keys=True, **({"workers": np_int(0)} if path == "stream" else {}))
        loader = make_loader(shards, "train", "gray28", **kwargs)
        loader.set_epoch(np_int(2), start=np_int(start))
        return len(loader), [(keys, labels.tolist()) for _, labels, keys in loader]

    assert epoch(np.int64, 80) == epoch(int, 80)


@pytest.mark.parametrize("counts, message", [
    (None, "a list of shard URLs needs sample_counts (from the set's manifest) to plan an epoch; "
           "or pass the shard set's location (the folder or URL holding manifest.json)"),
    ([64, 64], "sample_counts has 2 counts for 1 shard URL: give one per URL"),
    ([0], "sample_counts: every count is 0, no sample to read in the 1 shard URL"),  # it said 'need shards, ...'
])
def test_sample_counts_that_do_not_fit_the_shard_urls_are_a_usage_error(shards, counts, message):
    """The mirror of sample_counts given with a shard set (a UsageError, as every option that does not fit the
    shards given is) was a ValueError: one `except` caught the one mistake and not the other."""
    with pytest.raises(UsageError) as e:
        make_loader([str(shards / "train-000000.tar")], "train", sample_counts=counts)
    assert str(e.value) == message


def test_checksum_off_is_refused_for_shard_urls(shards):
    with pytest.raises(UsageError) as e:
        make_loader([str(shards / "train-000000.tar")], "train", checksum=False)
    assert str(e.value) == "checksum=False: a list of shard URLs has no manifest to check against"


def test_stream_and_fast_paths_give_the_same_samples(shards):
    def multiset(path):
        return Counter((k, int(l), img.numpy().tobytes()) for images, labels, keys in
                       make_loader(shards, "train", "gray28", batch_size=32, path=path, with_keys=True, raw=True,
                                   **({"workers": 2} if path == "stream" else {}))
                       for img, l, k in zip(images, labels, keys, strict=True))
    assert multiset("stream") == multiset("fast")


def test_shards_over_http_stream_with_default_stats(shards):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    try:
        train = [s for s in read_manifest(shards)["shards"] if s["split"] == "train"]
        urls = [f"http://127.0.0.1:{server.server_port}/{s['file']}" for s in train]
        loader = make_loader(urls, "train", batch_size=64, sample_counts=[s["count"] for s in train],
                             with_keys=True, workers=0)
        stored = {k: img for images, _, keys in make_loader(shards, "train", batch_size=64, raw=True, with_keys=True)
                  for k, img in zip(keys, images.clone(), strict=True)}
        keys = []
        for images, _, batch_keys in loader:
            # mean 0.5, std 0.5: [0, 255] onto [-1, 1] (a bound on the values passed with std 1, [-0.5, 0.5])
            want = torch.stack([stored[k] for k in batch_keys]).permute(0, 3, 1, 2).float() / 127.5 - 1
            assert images.shape[1:] == (3, 64, 64) and torch.allclose(images, want, rtol=0, atol=1e-6)
            keys += batch_keys
        assert sorted(keys) == sorted(stored)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_package_exports_what_its_docstring_names():
    """make_loader's docstring tells users to pass a ShardSet, which `pipeline` did not export; and the
    lazy names were missing from dir(pipeline) (a notebook's tab completion)."""
    import re

    import pipeline

    named = set(re.findall(r"`(\w+)`", pipeline.__doc__))
    assert {"ShardSet", "open_shard_set", "make_loader"} <= named <= set(dir(pipeline))
    assert all(getattr(pipeline, name) is not None for name in named)
