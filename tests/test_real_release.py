"""The real release from ../shared/data: counts, labels against the annotation files, exact pixels.
Skipped with a reason when the archive is absent."""
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.index import read_index, read_manifest
from pipeline.reader import ShardArrays
from pipeline.source import open_release
from tests.conftest import REAL_RELEASE, needs_real

pytestmark = [needs_real, pytest.mark.slow]


@pytest.fixture(scope="module")
def files():
    return open_release(REAL_RELEASE)


def test_counts_classes_and_no_skips(real_shards):
    m = read_manifest(real_shards)
    assert m["counts"] == {"train": 100_000, "val": 5_000, "test": 5_000, "unlabeled": 10_000}
    assert len(m["classes"]) == 200 and m["skipped"] == []
    assert m["classes"][0] == {"wnid": "n01443537", "words": "goldfish, Carassius auratus"}


def test_val_test_labels_and_split_match_val_annotations(real_shards, files):
    wnids = sorted(files.text("wnids.txt"))
    rows = [line.split("\t") for line in files.text("val/val_annotations.txt")]
    seen, want = {}, {}
    for name, wnid, *box in rows:
        seen[wnid] = seen.get(wnid, 0) + 1
        want[name] = ("val" if seen[wnid] <= 25 else "test", wnids.index(wnid), [int(v) for v in box])
    index = read_index(real_shards).to_pydict()
    got = {src.rsplit("/", 1)[-1]: (split, label, box) for src, split, label, box
           in zip(index["source"], index["split"], index["label"], index["box"]) if src.startswith("val/")}
    assert got == {k: tuple(v) for k, v in want.items()}


def test_train_labels_come_from_class_folders(real_shards):
    index = read_index(real_shards, "train").to_pydict()
    wnids = [c["wnid"] for c in read_manifest(real_shards)["classes"]]
    assert all(src.split("/")[1] == wnid == wnids[label]
               for src, wnid, label in zip(index["source"], index["wnid"], index["label"]))
    assert np.bincount(index["label"]).tolist() == [500] * 200


@pytest.mark.parametrize("split", ["train", "val", "test", "unlabeled"])
def test_pixels_equal_pil_decode(real_shards, files, split):
    rgb, gray = ShardArrays(real_shards, split, "rgb64"), ShardArrays(real_shards, split, "gray28")
    sources = read_index(real_shards, split).to_pydict()["source"]
    picks = np.sort(np.random.default_rng(0).choice(len(rgb), 300, replace=False))
    got_rgb, got_gray = rgb.gather(picks).numpy(), gray.gather(picks).numpy()
    for k, i in enumerate(picks):
        img = Image.open(io.BytesIO(files.read(sources[i]))).convert("RGB")
        assert np.array_equal(got_rgb[k], np.asarray(img))
        assert np.array_equal(got_gray[k], np.asarray(img.resize((28, 28), Image.BILINEAR).convert("L")))


def test_greyscale_jpegs_are_about_two_percent(real_shards, files):
    sources = read_index(real_shards, "train").to_pydict()["source"][::50]
    grey = sum(Image.open(io.BytesIO(files.read(s))).mode == "L" for s in sources)
    assert 0.005 < grey / len(sources) < 0.05
