"""`tinyin shard build`: contents byte for byte, labels and splits, determinism, atomicity."""
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tqdm
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from pipeline import build
from pipeline.build import _byte_histogram, _plan_tasks, _run_tasks, build_shards, histograms
from pipeline.cli import main
from pipeline.errors import ShardError, SourceError
from pipeline.index import read_index, read_manifest
from pipeline.release import MAX_KEY, Item, plan_release
from pipeline.source import open_release
from pipeline.tarshard import write_shard
from pipeline.variants import decode_images
from tests.conftest import SHARD_SIZE, SYNTH

ROOT = Path(__file__).resolve().parents[1]


def expected_variants(jpeg_path):
    rgb = Image.open(jpeg_path).convert("RGB")
    return np.asarray(rgb), np.asarray(rgb.resize((28, 28), Image.BILINEAR).convert("L"))


def read_samples(shards, split):
    files = sorted(str(p) for p in Path(shards).glob(f"{split}-*.tar"))
    return list(wds.WebDataset(files, shardshuffle=False).decode())


def val_annotations(release):
    rows = [line.split("\t") for line in (release / "val/val_annotations.txt").read_text().splitlines() if line]
    return [(r[0], r[1], tuple(int(v) for v in r[2:6])) for r in rows]


def tree_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def test_counts_layout_and_manifest(release, shards):
    m = read_manifest(shards)
    n_val = SYNTH["classes"] * SYNTH["val_per_class"]
    assert m["counts"] == {"train": SYNTH["classes"] * SYNTH["train_per_class"], "val": n_val // 2,
                           "test": n_val // 2, "unlabeled": SYNTH["test"]}
    wnids = sorted((release / "wnids.txt").read_text().split())
    assert [c["wnid"] for c in m["classes"]] == wnids
    assert all(c["words"] for c in m["classes"])
    assert [s["file"] for s in m["shards"] if s["split"] == "train"] == [
        f"train-{i:06d}.tar" for i in range(-(-m["counts"]["train"] // SHARD_SIZE))]
    for s in m["shards"]:
        path = shards / s["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"] and path.stat().st_size == s["bytes"]
    assert m["skipped"] == []
    assert not list(shards.parent.glob("*.tmp-*"))


def test_stats_are_the_train_split_mean_and_std(shards):
    """The manifest's normalisation stats: numpy's mean/std over every train pixel, per channel."""
    samples = read_samples(shards, "train")
    rgb = np.stack([s["rgb64.npy"] for s in samples]).reshape(-1, 3) / 255.0
    gray = np.stack([s["gray28.npy"] for s in samples]).reshape(-1, 1) / 255.0
    stats = read_manifest(shards)["stats"]
    for name, values in (("rgb64", rgb), ("gray28", gray)):
        np.testing.assert_allclose(stats[name]["mean"], values.mean(0), rtol=0, atol=1e-6)
        np.testing.assert_allclose(stats[name]["std"], values.std(0), rtol=0, atol=1e-6)


def test_byte_histogram_counts_every_value_at_any_length():
    values = np.random.default_rng(0).integers(0, 256, 4097, dtype=np.uint8)
    for n in (0, 1, 2, 3, 4096, 4097):
        assert _byte_histogram(values[:n]).tolist() == np.bincount(values[:n], minlength=256).tolist()


def test_a_shard_of_several_chunks_is_its_images_one_by_one(tmp_path, monkeypatch):
    """The worker decodes a chunk of images at a time (into strips); the shard and its histograms are what
    each image's own decode gives, across chunks, a chunk of only unusable images and a last partial one."""
    monkeypatch.setattr(build, "CHUNK", 4)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(14):
        pixels = rng.integers(0, 256, (64, 64, 3), np.uint8)
        img = Image.fromarray(pixels).convert("L" if i % 5 == 0 else "RGB")
        buf = io.BytesIO()
        img.save(buf, "JPEG" if i % 3 else "PNG")  # a PNG takes Image.open
        data = buf.getvalue() if i not in (4, 5, 6, 7, 12) else b"not an image"
        entries.append((Item(f"k_{i}", "train", i % 3, f"n{i}", (1, 2, 3, 4) if i % 2 else None, f"a/k_{i}.JPEG"), data))
    result = build._write_one_shard(str(tmp_path / "s.tar"), "train", entries, "skip")
    kept = [(item, [np.asarray(img) for img in decode_images(data, item.path)]) for item, data in entries
            if data != b"not an image"]
    meta = [json.dumps({"wnid": it.wnid, "split": "train", "box": list(it.box) if it.box else None,
                        "source": it.path.rsplit("/", 1)[-1]}, separators=(",", ":")).encode() for it, _ in kept]
    expected = write_shard(tmp_path / "expected.tar", [(it.key, rgb, gray, it.label, m)
                                                        for (it, (rgb, gray)), m in zip(kept, meta)])
    assert (tmp_path / "s.tar").read_bytes() == (tmp_path / "expected.tar").read_bytes()
    assert (result["sha256"], result["bytes"], result["offsets"]) == expected
    assert result["rows"] == [it for it, _ in kept]
    assert [s["source"] for s in result["skipped"]] == [f"a/k_{i}.JPEG" for i in (4, 5, 6, 7, 12)]
    rgb_hist, gray_hist = histograms([rgb for _, (rgb, _) in kept], [gray for _, (_, gray) in kept])
    assert result["rgb_hist"].tolist() == rgb_hist.tolist() and result["gray_hist"].tolist() == gray_hist.tolist()


def test_the_longest_shards_are_handed_out_first_and_returned_in_task_order(release, tmp_path, monkeypatch):
    """A short shard handed out last fills in beside the last long one; handed out last, a long one was
    written by one worker alone while the others waited."""
    submitted = []

    class Recording(build.ProcessPoolExecutor):
        def submit(self, fn, path, *args, **kwargs):
            submitted.append(Path(path).name)
            return super().submit(fn, path, *args, **kwargs)

    monkeypatch.setattr(build, "ProcessPoolExecutor", Recording)
    files = open_release(release)
    items = plan_release(files).items["val"]
    tasks = [("a.tar", "val", items[:1]), ("b.tar", "val", items[:3]), ("c.tar", "val", items[1:3]),
             ("d.tar", "val", items[3:6])]
    results = _run_tasks(files, tasks, tmp_path, 1, "fail", progress=False)
    assert submitted == ["b.tar", "d.tar", "c.tar", "a.tar"]
    assert [r["rows"] for r in results] == [items[:1], items[:3], items[1:3], items[3:6]]


def test_train_samples_are_byte_exact_with_labels_from_folders(release, shards):
    wnids = sorted((release / "wnids.txt").read_text().split())
    samples = read_samples(shards, "train")
    assert len(samples) == SYNTH["classes"] * SYNTH["train_per_class"]
    for s in samples:
        wnid = s["__key__"].rsplit("_", 1)[0]
        jpeg = release / "train" / wnid / "images" / f"{s['__key__']}.JPEG"
        rgb, gray = expected_variants(jpeg)
        assert s["rgb64.npy"].dtype == np.uint8 and s["rgb64.npy"].shape == (64, 64, 3)
        assert np.array_equal(s["rgb64.npy"], rgb) and np.array_equal(s["gray28.npy"], gray)
        assert s["cls"] == wnids.index(wnid)
        assert s["json"]["wnid"] == wnid and s["json"]["split"] == "train"
        assert s["json"]["source"] == jpeg.name
    boxes = dict(line.split("\t", 1) for line in
                 (release / "train" / wnids[0] / f"{wnids[0]}_boxes.txt").read_text().splitlines())
    first = next(s for s in samples if s["__key__"].startswith(wnids[0]))
    assert first["json"]["box"] == [int(v) for v in boxes[first["json"]["source"]].split()]


def test_every_image_file_the_studys_loader_reads_is_planned(release, tmp_path):
    """A PNG (or BMP, TIFF, WEBP) put in the layout was left out with no word; the study's ImageFolder
    reads it, as any name torchvision's IMG_EXTENSIONS ends, in any case. Other files stay out."""
    copy = shutil.copytree(release, tmp_path / "release")
    wnid = sorted((copy / "wnids.txt").read_text().split())[0]
    images = [f"train/{wnid}/images/extra_{i}{suffix}" for i, suffix in enumerate((".png", ".JPG", ".bmp", ".webp",
                                                                                   ".ppm", ".PGM", ".tif"))]
    images += ["test/images/extra_7.tiff", "test/images/extra_8.PNG", "test/images/extra_9.jpeg"]
    others = [f"train/{wnid}/images/.DS_Store", f"train/{wnid}/images/Thumbs.db", "test/images/extra_10.txt"]
    for name in images + others:
        (copy / name).write_bytes(b"")
    plan = plan_release(open_release(copy))
    planned = {item.path for items in plan.items.values() for item in items}
    assert planned.issuperset(images) and planned.isdisjoint(others) and plan.problems == []
    assert len(planned) == sum(SYNTH[k] for k in ("train_per_class", "val_per_class")) * SYNTH["classes"] \
        + SYNTH["test"] + len(images)


@pytest.mark.parametrize("seed", [0, 7])
def test_a_split_seed_draws_each_classs_halves_at_random_seed_0_too(release, seed):
    """`split_seed` draws each class's val half with default_rng(seed), classes in label order, each split then
    kept in annotation order; a seed of 0 is a seed (not the first-half split of no seed)."""
    rows = val_annotations(release)
    rng, want = np.random.default_rng(seed), set()
    for wnid in sorted((release / "wnids.txt").read_text().split()):
        mine = [r[0] for r in rows if r[1] == wnid]
        want.update(mine[i] for i in rng.permutation(len(mine))[:len(mine) // 2])
    plan = plan_release(open_release(release), split_seed=seed)
    assert [it.path for it in plan.items["val"]] == [f"val/images/{r[0]}" for r in rows if r[0] in want]
    assert [it.path for it in plan.items["test"]] == [f"val/images/{r[0]}" for r in rows if r[0] not in want]


def test_a_val_image_its_annotations_do_not_list_is_named(release, tmp_path):
    """It has no label: a problem (the build fails, or skips it and says so), never left out unsaid."""
    copy = shutil.copytree(release, tmp_path / "release")
    shutil.copy(copy / "val/images/val_0.JPEG", copy / "val/images/val_extra.JPEG")
    assert plan_release(open_release(copy)).problems == [("val/images/val_extra.JPEG",
                                                          "not listed in val/val_annotations.txt")]


def test_a_box_of_a_missing_train_image_is_named(release, tmp_path):
    """A line of W_boxes.txt naming no image of the class: the image is missing, and that is a problem."""
    copy = shutil.copytree(release, tmp_path / "release")
    wnid = sorted((copy / "wnids.txt").read_text().split())[0]
    boxes = copy / "train" / wnid / f"{wnid}_boxes.txt"
    lines = boxes.read_text().splitlines()
    boxes.write_text("\n".join(lines + [f"{wnid}_gone.JPEG\t1\t2\t3\t4"]) + "\n")
    assert plan_release(open_release(copy)).problems == [
        (f"train/{wnid}/images/{wnid}_gone.JPEG", f"named in train/{wnid}/{wnid}_boxes.txt:{len(lines) + 1} but missing")]


def test_a_key_of_the_longest_length_is_planned(release, tmp_path):
    """A key may fill its tar name field with the longest member's suffix (MAX_KEY, 89 characters): one that
    long is a sample, one longer a problem."""
    copy = shutil.copytree(release, tmp_path / "release")
    wnid = sorted((copy / "wnids.txt").read_text().split())[0]
    for key in ("k" * MAX_KEY, "l" * (MAX_KEY + 1)):
        (copy / f"train/{wnid}/images/{key}.JPEG").write_bytes(b"")
    plan = plan_release(open_release(copy))
    assert MAX_KEY == 89 and "k" * MAX_KEY in {item.key for item in plan.items["train"]}
    assert [path for path, _ in plan.problems] == [f"train/{wnid}/images/{'l' * (MAX_KEY + 1)}.JPEG"]


def test_a_box_at_the_index_limits_is_kept(release, tmp_path):
    """The index holds boxes as int16: -32768 and 32767 fit, and are kept as they are."""
    copy = shutil.copytree(release, tmp_path / "release")
    wnid = sorted((copy / "wnids.txt").read_text().split())[0]
    boxes = copy / "train" / wnid / f"{wnid}_boxes.txt"
    lines = boxes.read_text().splitlines()
    image = lines[0].split("\t")[0]
    boxes.write_text("\n".join([f"{image}\t-32768\t0\t32767\t32767"] + lines[1:]) + "\n")
    plan = plan_release(open_release(copy))
    assert plan.problems == []
    assert next(it.box for it in plan.items["train"] if it.path.endswith("/" + image)) == (-32768, 0, 32767, 32767)


def test_an_image_outside_the_layout_is_read_as_imagefolder_does_or_named(release, tmp_path):
    """An image beside train/W/images/ or in a folder within it was left out with no word (a class holding only
    such images failed as 'no images of class W'); the study's ImageFolder reads every image under a class
    folder. One in val/ or test/ outside images/, or in train/ outside a class folder (ImageFolder reads none
    such: it has no class), has no place in the plan: it is named, not dropped unsaid."""
    copy = shutil.copytree(release, tmp_path / "release")
    wnid = sorted((copy / "wnids.txt").read_text().split())[0]
    (copy / "train" / wnid / "images" / "more").mkdir()
    train = [f"train/{wnid}/beside_0.JPEG", f"train/{wnid}/images/more/within_1.JPEG"]
    for name in train + ["val/stray_2.JPEG", "test/stray_3.JPEG", "train/stray_4.JPEG"]:
        (copy / name).write_bytes(b"")
    plan = plan_release(open_release(copy))
    assert {it.path for it in plan.items["train"] if it.wnid == wnid}.issuperset(train)
    assert plan.problems == [("test/stray_3.JPEG", "outside test/images/, where the release keeps the test images"),
                             ("train/stray_4.JPEG",
                              "outside the class folders train/WNID/, where the release keeps the train images"),
                             ("val/stray_2.JPEG", "outside val/images/, where the release keeps the val images")]
    # a subset reads nothing of test/
    assert [p for p, _ in plan_release(open_release(copy), classes=2).problems] == ["train/stray_4.JPEG",
                                                                                     "val/stray_2.JPEG"]


def test_images_outside_the_splits_are_counted_in_the_summary(release, tmp_path):
    """An image at the release's top or in a folder of its own (no split's) was left out without a word. Not an
    error (it belongs to no split), the build's summary counts them now; a littered archive's junk (`._*`,
    `__MACOSX/`, `.DS_Store`, `Thumbs.db`) and files that are no image stay unsaid."""
    copy = shutil.copytree(release, tmp_path / "release")
    (copy / "extra").mkdir()
    (copy / "__MACOSX").mkdir()
    for name in ("extra/b.JPEG", "top.png", "._top.png", "__MACOSX/._b.JPEG", ".DS_Store", "Thumbs.db", "notes.txt"):
        (copy / name).write_bytes(b"")
    assert plan_release(open_release(copy)).ignored == ["extra/b.JPEG", "top.png"]
    for out, said in (("two", "2 images outside train/, val/ and test/ (extra/b.JPEG, ...)"),
                      ("one", "1 image outside train/, val/ and test/ (extra/b.JPEG)")):
        result = CliRunner().invoke(main, ["shard", "build", "--src", str(copy), "--out", str(tmp_path / out),
                                           "--classes", "1", "--quiet"])
        assert result.exit_code == 0 and result.output.endswith(f"; skipped 0; ignored {said}\n"), result.output
        (copy / "top.png").unlink(missing_ok=True)  # the second build: one image


def test_a_broken_link_to_a_list_of_a_folder_release_is_named(release, tmp_path):
    """A W_boxes.txt (or words.txt) that is a link to no file read as absent: the class's boxes left out unsaid."""
    copy = shutil.copytree(release, tmp_path / "release")
    wnid = sorted((copy / "wnids.txt").read_text().split())[0]
    boxes = copy / "train" / wnid / f"{wnid}_boxes.txt"
    boxes.unlink()
    boxes.symlink_to(tmp_path / "gone.txt")
    with pytest.raises(SourceError) as e:
        plan_release(open_release(copy))
    assert str(e.value) == f"{copy}: cannot read train/{wnid}/{wnid}_boxes.txt (FileNotFoundError)"


def test_greyscale_jpegs_are_replicated_to_rgb(release, shards):
    grey = [p for p in release.rglob("*.JPEG") if Image.open(p).mode == "L"]
    assert grey, "the synthetic release should contain greyscale JPEGs"
    by_key = {s["__key__"]: s for split in ("train", "val", "test", "unlabeled") for s in read_samples(shards, split)}
    for p in grey:
        rgb = by_key[p.stem]["rgb64.npy"]
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], np.asarray(Image.open(p)))


def test_val_test_split_is_first_half_per_class_in_annotation_order(release, shards):
    wnids = sorted((release / "wnids.txt").read_text().split())
    rows = val_annotations(release)
    half = SYNTH["val_per_class"] // 2
    want = {"val": [], "test": []}
    for wnid in wnids:
        mine = [r for r in rows if r[1] == wnid]
        want["val"] += [r[0] for r in mine[:half]]
        want["test"] += [r[0] for r in mine[half:]]
    order = [r[0] for r in rows]
    for split in ("val", "test"):
        samples = read_samples(shards, split)
        assert [s["json"]["source"] for s in samples] == sorted(want[split], key=order.index)
        truth = {r[0]: r for r in rows}
        for s in samples:
            name = s["json"]["source"]
            assert s["cls"] == wnids.index(truth[name][1]) and s["json"]["box"] == list(truth[name][2])
            rgb, gray = expected_variants(release / "val/images" / name)
            assert np.array_equal(s["rgb64.npy"], rgb) and np.array_equal(s["gray28.npy"], gray)
    unlabeled = read_samples(shards, "unlabeled")
    assert len(unlabeled) == SYNTH["test"] and all(s["cls"] == -1 and s["json"]["box"] is None for s in unlabeled)


def test_train_and_unlabeled_are_in_their_recorded_order(release, shards):
    """The order of the samples fixes every shard's bytes (the set's identity, which a resume checks):
    train is the class folders' images, class by class in label order and by natural name order within
    each (`_2` before `_10`), shuffled as the manifest's `train_order` says; unlabeled, the test/ images
    in natural name order. (Neither was pinned: a build with no shuffle, every shard one or two classes,
    or with `test_10` before `test_2`, passed every test.)"""
    wnids = sorted((release / "wnids.txt").read_text().split())
    listed = [f"{w}_{i}" for w in wnids for i in range(SYNTH["train_per_class"])]
    manifest = read_manifest(shards)
    assert manifest["train_order"] == "shuffled before sharding (numpy default_rng(0).permutation)"
    train = read_index(shards, "train").to_pydict()["key"]
    assert train == [listed[i] for i in np.random.default_rng(0).permutation(len(listed))]
    assert read_index(shards, "unlabeled").to_pydict()["key"] == [f"test_{i}" for i in range(SYNTH["test"])]


def test_split_seed_draws_a_recorded_random_half(release, shards, tmp_path):
    out = tmp_path / "seeded"
    m = build_shards(release, out, split_seed=7, shard_size=SHARD_SIZE, progress=False)
    assert m["build"]["split_seed"] == 7 and "seed 7" in m["split_rule"]
    val = read_index(out, "val").to_pydict()
    default = read_index(shards, "val").to_pydict()
    assert sorted(val["key"]) != sorted(default["key"])
    assert np.bincount(val["label"]).tolist() == [SYNTH["val_per_class"] // 2] * SYNTH["classes"]
    assert set(val["key"]).isdisjoint(read_index(out, "test").to_pydict()["key"])


def test_the_index_says_what_each_samples_own_members_say(shards):
    """Each index row's split, label, wnid, box and source are those in its sample's `cls` and `json` (the
    members the tests above check against the release): the index's boxes, wnids and sources were
    checked nowhere, and a build that wrote no box there passed."""
    index = read_index(shards).to_pydict()
    row = {key: i for i, key in enumerate(index["key"])}
    samples = [s for split in ("train", "val", "test", "unlabeled") for s in read_samples(shards, split)]
    assert len(samples) == len(row)
    for s in samples:
        i = row[s["__key__"]]
        assert (index["split"][i], index["label"][i], index["wnid"][i] or None, index["box"][i],
                index["source"][i].rsplit("/", 1)[-1]) == (s["json"]["split"], s["cls"], s["json"]["wnid"],
                                                          s["json"]["box"], s["json"]["source"])
        assert index["source"][i].startswith({"train": "train/", "unlabeled": "test/"}.get(s["json"]["split"], "val/"))


def test_index_offsets_point_at_the_arrays(release, shards):
    table = read_index(shards).to_pydict()
    for i in range(0, len(table["key"]), 37):
        data = (shards / table["shard"][i]).read_bytes()
        for name, shape in (("rgb64", (64, 64, 3)), ("gray28", (28, 28))):
            at, n = table[f"{name}_offset"][i], table[f"{name}_length"][i]
            member = f"{table['key'][i]}.{name}.npy"
            with tarfile.open(shards / table["shard"][i]) as tar:
                want = np.load(io.BytesIO(tar.extractfile(member).read()))
            assert np.frombuffer(data[at:at + n], np.uint8).reshape(shape).tolist() == want.tolist()


def test_same_input_same_bytes_from_folder_zip_and_tar(release, shards, tmp_path):
    zip_path, tar_path = tmp_path / "release.zip", tmp_path / "release.tar.gz"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(release.rglob("*")):
            zf.write(p, f"tiny-imagenet-200/{p.relative_to(release)}")
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(release, "tiny-imagenet-200")
    want = tree_digest(shards)
    for src, name in ((release, "again"), (zip_path, "zip"), (tar_path, "tar")):
        build_shards(src, tmp_path / name, shard_size=SHARD_SIZE, progress=False)
        got = tree_digest(tmp_path / name)
        shards_only = {k: v for k, v in got.items() if k.endswith(".tar") or k == "index.parquet"}
        assert shards_only == {k: v for k, v in want.items() if k in shards_only} and len(shards_only) > 3
    assert tree_digest(tmp_path / "again") == want  # the manifest too, for the same --src name


def test_rebuild_into_same_folder_is_a_no_op_and_other_options_are_refused(release, tmp_path):
    out = tmp_path / "out"
    build_shards(release, out, shard_size=SHARD_SIZE, progress=False)
    before = tree_digest(out)
    build_shards(release, out, shard_size=SHARD_SIZE, progress=False)
    assert tree_digest(out) == before
    result = CliRunner().invoke(main, ["shard", "build", "--src", str(release), "--out", str(out), "--shard-size", "50"])
    assert result.exit_code == 1
    assert result.output.strip() == (f"error: {out}: already holds a different build (shard_size: {SHARD_SIZE} -> 50); "
                                     "choose another --out or delete it")
    tgz = tmp_path / "release.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(release, "tiny-imagenet-200")
    result = CliRunner().invoke(main, ["shard", "build", "--src", str(tgz), "--out", str(out), "--split-seed", "3",
                                       "--shard-size", str(SHARD_SIZE)])
    assert result.exit_code == 1
    assert result.output.strip() == (f"error: {out}: already holds a different build (source: release -> "
                                     "release.tar.gz, split_seed: none -> 3); choose another --out or delete it")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["shard", "build", "--src", str(release), "--out", str(tmp_path / "other")])
    assert result.exit_code == 1 and "is not a tinyin shard set (no manifest.json)" in result.output
    assert tree_digest(out) == before


def test_rebuild_into_same_folder_repairs_missing_and_damaged_files(release, shards, tmp_path):
    """Building again with the same input and options writes again exactly the files that are gone
    or differ, and leaves the others untouched (mtime too: it keys the reader's sha256 cache).
    (Before: `built`, exit 0, and the set stayed broken.)"""
    out = tmp_path / "out"
    build_shards(release, out, shard_size=SHARD_SIZE, progress=False)
    (out / "train-000000.tar").unlink()
    (out / "index.parquet").unlink()  # labels and offsets that no shard's checksum covers
    damaged = bytearray((out / "val-000000.tar").read_bytes())
    damaged[5000] ^= 1
    (out / "val-000000.tar").write_bytes(damaged)
    for p in out.iterdir():
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    result = CliRunner().invoke(main, ["shard", "build", "--src", str(release), "--out", str(out),
                                       "--shard-size", str(SHARD_SIZE), "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("; skipped 0; repaired train-000000.tar, val-000000.tar, index.parquet")
    assert tree_digest(out) == tree_digest(shards)
    assert sorted(p.name for p in out.iterdir() if p.stat().st_mtime_ns != 1_000_000_000) == [
        "index.parquet", "train-000000.tar", "val-000000.tar"]


def test_rebuild_into_same_folder_repairs_a_damaged_manifest(release, shards, tmp_path):
    """A changed checksum in manifest.json has `shard verify` name a good shard corrupt; the repair it calls for
    writes the manifest again when every shard and the index are this build's. (Before: refused as 'already
    holds a different build (other input)', the set left broken.)"""
    out = shutil.copytree(shards, tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    result = CliRunner().invoke(main, ["shard", "build", "--src", str(release), "--out", str(out),
                                       "--shard-size", str(SHARD_SIZE), "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("; skipped 0; repaired manifest.json")
    assert tree_digest(out) == tree_digest(shards)


def test_rebuild_of_a_changed_release_with_the_same_options_is_refused(release, shards, tmp_path):
    """The options and the release's name match, its content does not (an image replaced): not a repair.
    (Without the manifest comparison the changed shard and the index were put in beside the old
    manifest, whose checksums then named a good shard corrupt: exit 0, a broken set.)"""
    changed = shutil.copytree(release, tmp_path / "new" / release.name)
    wnid = sorted((changed / "wnids.txt").read_text().split())[0]
    image = changed / "train" / wnid / "images" / f"{wnid}_0.JPEG"
    Image.open(image).transpose(Image.FLIP_LEFT_RIGHT).save(image, "JPEG")
    out = shutil.copytree(shards, tmp_path / "out")
    result = CliRunner().invoke(main, ["shard", "build", "--src", str(changed), "--out", str(out),
                                       "--shard-size", str(SHARD_SIZE), "--quiet"])
    assert (result.exit_code, result.output.strip()) == (
        1, f"error: {out}: already holds a different build (other input); choose another --out or delete it")
    assert tree_digest(out) == tree_digest(shards)


def test_cli_build_prints_counts_and_speed(release, tmp_path):
    result = CliRunner().invoke(main, ["shard", "build", "--src", str(release), "--out", str(tmp_path / "s"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "train 240, val 30, test 30, unlabeled 30" in result.output and "images/s" in result.output
    assert json.loads((tmp_path / "s/manifest.json").read_text())["counts"]["train"] == 240


def test_the_bar_counts_shards_written_while_a_folder_is_still_read(release, tmp_path, monkeypatch):
    # A folder is read as its shards are handed out, from a slow disk most of the build: the bar stood at 0
    # until the last shard was handed out, however many had been written.
    bars = []

    class Bar(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    files = open_release(release)
    tasks = _plan_tasks(plan_release(files), SHARD_SIZE)
    first_of = {items[0].path: i for i, (_, _, items) in enumerate(tasks)}
    read = files.read

    def slow_read(name):
        if first_of.get(name) == 1:  # the disk is slow: shard 0 is written before shard 1 is read
            for _ in range(6000):  # (a bound for a worker that never writes it: the assert below fails then)
                if (tmp_path / tasks[0][0]).exists():
                    break
                time.sleep(0.01)
        if first_of.get(name) == 2:
            assert bars[0].n >= len(tasks[0][2])  # shard 1 may be written by now too
        return read(name)

    monkeypatch.setattr(files, "read", slow_read)
    _run_tasks(files, tasks, tmp_path, 1, "fail", progress=True)


# `tinyin shard build ARGS` in a child process whose decode workers log each shard they write and,
# after their first, wait at a gate. The gate opens when the parent cancels a queued shard, i.e. only
# once it has stopped the build; before that fix, the workers' own Ctrl-C ended their wait.
# `submitted` marks that the parent has queued every shard and waits for them.
GATED_BUILD = """
import signal, sys, time
from concurrent.futures import Future
from pathlib import Path
import pipeline.build as build
from pipeline.cli import main

log, gate, submitted = (Path(a) for a in sys.argv[1:4])
write_one_shard, cancel, wait, first = build._write_one_shard, Future.cancel, build.wait, [True]

def gated_write(path, *args):
    result = write_one_shard(path, *args)
    with open(log, "a") as f:
        f.write(Path(path).name + "\\n")
    if first:
        first.clear()
        while not gate.exists():
            time.sleep(0.01)
    return result

def cancel_and_open(future):
    if cancel(future):
        gate.touch()
        return True
    return False

def wait_and_mark(*args, **kwargs):
    submitted.touch()
    return wait(*args, **kwargs)

build._write_one_shard, Future.cancel, build.wait = gated_write, cancel_and_open, wait_and_mark
# Ctrl-C as a terminal delivers it: a suite started in the background (`make test &`) hands its children
# SIGINT ignored, and Python then installs no handler of its own (the build never stopped: a hang).
signal.signal(signal.SIGINT, signal.default_int_handler)
main(sys.argv[4:], prog_name="tinyin")
"""


def gated_build(tmp_path, *args):
    """Start GATED_BUILD in its own process group; return it and its log once a shard is written."""
    log, gate, submitted = tmp_path / "written.log", tmp_path / "gate", tmp_path / "submitted"
    proc = subprocess.Popen([sys.executable, "-c", GATED_BUILD, str(log), str(gate), str(submitted),
                             "shard", "build", "--quiet", *map(str, args)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the log's line, not the file alone: `open(log, "a")` makes it before the line is in, and a signal sent
    # between the two (to the group: the worker too) left it empty, the test's "1 <= 0" (seen once in a full run)
    while not (log.exists() and log.read_text().endswith("\n") and submitted.exists()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    return proc, log


def finish(proc):
    """The build's (stdout, stderr) once it exits; none of its processes (workers) is left behind."""
    try:
        proc.wait(timeout=60)  # its output is a few lines: the pipes do not fill
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()


def test_ctrl_c_stops_after_the_shards_in_hand(release, tmp_path):
    """Ctrl-C (SIGINT to the process group) mid-build: the workers finish the shards they hold, the
    queued ones are dropped, the temporary folder is removed; `interrupted`, exit code 130. (Before:
    the workers took the signal as a task's error and went on through every queued shard.)"""
    out = tmp_path / "out"
    proc, log = gated_build(tmp_path, "--src", release, "--out", out, "--workers", 2, "--shard-size", 4)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = finish(proc)
    assert (proc.returncode, stdout, stderr) == (130, "", "interrupted\n")
    # Only the (at most) 2 shards being written of the 84 planned: the 3 the pool had handed to its
    # queue (workers + 1, not cancellable) see the stop flag and are given up.
    assert 1 <= len(log.read_text().split()) <= 2
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


@pytest.mark.parametrize("signum, line", [(signal.SIGTERM, "terminated"), (signal.SIGUSR1, "stopped by SIGUSR1")])
@pytest.mark.parametrize("to_group", [False, True])
def test_sigterm_cleans_up_as_ctrl_c_does(release, tmp_path, signum, line, to_group):
    """SIGTERM (`kill`, a scheduler) to the build, or to its process group: the temporary folder is removed,
    `terminated`, exit code 143. (Before: the process died where it stood and left `out.tmp-<pid>` behind for
    good.) SIGUSR1 (a scheduler's word before it preempts a job) as well: `stopped by SIGUSR1`, 138, where it
    killed the build (and its workers) where it stood, without a line, the temporary folder left."""
    out = tmp_path / "out"
    proc, log = gated_build(tmp_path, "--src", release, "--out", out, "--workers", 2, "--shard-size", 4)
    os.killpg(proc.pid, signum) if to_group else proc.send_signal(signum)
    stdout, stderr = finish(proc)
    assert (proc.returncode, stdout, stderr) == (128 + signum, "", f"{line}\n")
    assert 1 <= len(log.read_text().split()) <= 2
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_a_build_removes_what_killed_builds_on_this_host_left(release, tmp_path):
    """Leftovers of builds killed outright (SIGKILL): removed if the process is gone and ran here;
    a live build's and another host's (a shared file system) are left alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = socket.gethostname()
    other = "x" * len(host)  # another host of a name as long: its pid sits where this host's would
    leftovers = [f"out.tmp-{host}-{dead}", f"out.tmp-{host}-{os.getppid()}", f"out.tmp-{host}x-{dead}",
                 f"out.tmp-other-{dead}", f"out.tmp-{other}-{dead}", f"other.tmp-{host}-{dead}"]
    for name in leftovers:
        (tmp_path / name).mkdir()
        (tmp_path / name / "train-000000.tar").write_bytes(b"half a shard")
    build_shards(release, tmp_path / "out", shard_size=SHARD_SIZE, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + leftovers[1:])


def live_members(group):
    """Pids of the processes of process group `group` that still run (zombies, awaiting their reaper, do not)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
            if int(fields[2]) == group and fields[0] != "Z":
                pids.append(int(stat.parent.name))
    return pids


def test_workers_exit_when_the_build_is_killed_outright(release, tmp_path):
    """SIGKILL (the OOM killer, `kill -9`) to the build's main process alone: its decode workers, one
    waiting at the gate inside a shard, the other for a task, exit within about a second. (Before: both
    idled for good, holding their memory: each holds the write end of its own task queue, from the fork.)"""
    out = tmp_path / "out"
    proc, log = gated_build(tmp_path, "--src", release, "--out", out, "--workers", 2, "--shard-size", 4)
    assert len(live_members(proc.pid)) == 3
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30  # not a timing: only how long to wait before calling it a hang
    while live_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = live_members(proc.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []


# `tinyin shard build ARGS` in a child process that sends itself SIGTERM at one moment inside the pool,
# once: `spawn`, as the first decode worker has been forked (before the pool's manager thread starts);
# `acquire`, as `wait` has taken the lock of a running future, not yet the others' (it takes them one by one).
SIGTERM_INSIDE_THE_POOL = """
import os, signal, sys
import concurrent.futures._base as base, concurrent.futures.process as process
from pipeline.cli import main

where, signum, sent = sys.argv[1], int(sys.argv[2]), []

def send(name):
    if name == where and not sent:
        sent.append(name)
        os.kill(os.getpid(), signum)

spawn_process = process.ProcessPoolExecutor._spawn_process

def spawn(self):
    spawn_process(self)
    send("spawn")

def acquire_futures(self):
    for future in self.futures:
        future._condition.acquire()
        if future.running():  # a worker's: the pool's manager thread will take its lock to set its result
            send("acquire")

process.ProcessPoolExecutor._spawn_process, base._AcquireFutures.__enter__ = spawn, acquire_futures
main(sys.argv[3:], prog_name="tinyin")
"""


@pytest.mark.parametrize("signum, line", [(signal.SIGTERM, "terminated"), (signal.SIGUSR1, "stopped by SIGUSR1")])
@pytest.mark.parametrize("where", ["spawn", "acquire"])
def test_sigterm_inside_the_pool_does_not_hang_the_build(release, tmp_path, where, signum, line):
    """SIGTERM (or Ctrl-C, SIGUSR1) as the pool forks its workers, or as `wait` takes its futures' locks:
    `terminated`, exit code 143, nothing left. (Before: a hang for good, seen once in ~400 signals at random: at
    exit, joining a worker that nothing stopped; in the shutdown, joining the pool's manager thread, which
    waited on a future's lock that the interrupted `wait` had left held.)"""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_INSIDE_THE_POOL, where, str(signum), "shard", "build", "--quiet",
                             "--src", str(release), "--out", str(out), "--workers", "2", "--shard-size", "4"],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = finish(proc)
    assert (proc.returncode, stdout, stderr) == (128 + signum, "", f"{line}\n")
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


@pytest.mark.parametrize("out_there", [False, True])
def test_two_builds_finishing_at_once_both_succeed(release, shards, tmp_path, monkeypatch, out_there):
    """Another build of the same input into the same `out` (another shell, a job array) may rename its
    finished set into place between this build's look at `out` and its own rename. This build then
    finds its twin there and leaves it as it is. (Before: a traceback, `OSError: [Errno 39] Directory
    not empty`, from the rename.)"""
    import pipeline.build as build

    out = tmp_path / "out"
    if out_there:
        out.mkdir()  # made beforehand, empty: the rename replaces it
    rename = os.replace
    twin = tmp_path / "twin"

    def twin_finishes_first(src, dst):
        if Path(dst) == out and not twin.exists():
            subprocess.run(["cp", "-a", str(shards), str(twin)], check=True)
            if out.exists():
                out.rmdir()
            rename(twin, out)  # the twin's own rename, a moment before this build's
        rename(src, dst)

    monkeypatch.setattr(build.os, "replace", twin_finishes_first)
    manifest = build_shards(release, out, shard_size=SHARD_SIZE, progress=False)
    assert manifest["_repaired"] == []
    assert tree_digest(out) == tree_digest(shards)
    assert not list(tmp_path.glob("out.tmp-*"))


def test_the_workers_are_forked_without_python_3_12s_thread_warning(release, tmp_path, fork_warns_as_on_3_12):
    """Python 3.12 warns (DeprecationWarning) at each worker's fork that the process has threads (numpy's,
    pyarrow's, tqdm's: harmless to the workers, see `build._run_tasks`): two lines in every 3.12 test run's
    summary, and on stderr with -W default. Here os.fork warns as 3.12's does, on any Python."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_shards(release, tmp_path / "shards", workers=2, shard_size=SHARD_SIZE, progress=False)
    assert [str(w.message) for w in caught] == []


def test_a_leftover_of_another_users_live_build_is_left_alone(tmp_path, monkeypatch):
    """Signal 0 to another user's process is refused (EPERM): it runs, and its build folder is in use."""
    host = socket.gethostname()
    (tmp_path / f"out.tmp-{host}-4242").mkdir()

    def refused(pid, sig):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
    monkeypatch.setattr("pipeline.build.os.kill", refused)
    build._remove_dead_builds(tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == [f"out.tmp-{host}-4242"]


def test_the_manifest_holds_the_indexs_sha256(shards):
    """Labels, keys and offsets come from the index, which no shard's checksum covers: without its sha256 in the
    manifest, a changed byte there mislabels samples unseen."""
    index_bytes = (shards / "index.parquet").read_bytes()
    assert read_manifest(shards)["index_sha256"] == hashlib.sha256(index_bytes).hexdigest()


def test_a_full_builds_manifest_records_no_classes(shards):
    """build.classes only for a --classes build: a full build's manifest stays what builds before --classes
    wrote, so that building again into such a set repairs it instead of refusing it as other input."""
    assert sorted(read_manifest(shards)["build"]) == ["on_error", "shard_size", "source", "split_seed"]


def test_a_full_build_into_a_subsets_folder_is_refused_naming_the_classes(release, tmp_path):
    """An option only the set there records (build.classes of a --classes build) differs too, and is named before
    the work: not found out after the whole build as 'other input'."""
    out = tmp_path / "out"
    out.mkdir()
    build = {"source": release.name, "shard_size": SHARD_SIZE, "split_seed": None, "on_error": "fail", "classes": 2}
    (out / "manifest.json").write_text(json.dumps({"format_version": 1, "build": build}))
    with pytest.raises(ShardError) as e:
        build_shards(release, out, shard_size=SHARD_SIZE, progress=False)
    assert str(e.value) == (f"{out}: already holds a different build (classes: 2 -> none); "
                            "choose another --out or delete it")


def test_a_leftover_under_this_processs_own_name_is_cleared_first(release, tmp_path):
    """A killed build whose pid this process now has (pids are reused) left `out.tmp-<host>-<pid>`: it is this
    build's folder now, emptied first, not 'cannot create the output folder (File exists)'."""
    stale = tmp_path / f"out.tmp-{socket.gethostname()}-{os.getpid()}"
    stale.mkdir()
    (stale / "train-000000.tar").write_bytes(b"half a shard")
    build_shards(release, tmp_path / "out", shard_size=SHARD_SIZE, progress=False, classes=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "train-000000.tar").read_bytes() != b"half a shard"


def test_a_folder_made_for_the_set_keeps_its_group_and_mode(release, tmp_path):
    """`--out` made beforehand for a shared set (group `lab`, setgid, mode 2750): the build renamed its
    own folder over it, of the builder's group and umask's mode, so the group could no longer read the
    set; files written into that folder (cp, tar -x) take its group. The set now keeps both."""
    others = [g for g in os.getgroups() if g != os.getegid()]
    if not others and os.geteuid() != 0:
        pytest.skip("no group other than this user's own to give the folder (root may give any)")
    group = others[0] if others else os.getegid() + 4242
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, -1, group)
    os.chmod(out, 0o2750)
    build_shards(release, out, shard_size=SHARD_SIZE, progress=False)
    assert (oct(out.stat().st_mode & 0o7777), out.stat().st_gid) == (oct(0o2750), group)
    assert {p.stat().st_gid for p in out.iterdir()} == {group}


def test_a_folder_of_a_group_the_builder_is_not_in_keeps_its_mode(release, tmp_path, monkeypatch):
    """The kernel refuses a chown to a group this user is not in (EPERM): the set is built all the same,
    of the user's own group, in the folder's mode."""
    def refused(path, uid, gid):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
    monkeypatch.setattr("pipeline.build.os.chown", refused)
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o2750)
    build_shards(release, out, shard_size=SHARD_SIZE, progress=False)
    assert (oct(out.stat().st_mode & 0o7777), out.stat().st_gid) == (oct(0o2750), os.getegid())


def test_a_folder_made_read_only_for_its_owner_is_built_in_all_the_same(release, tmp_path):
    """An empty --out of mode 0555 was renamed over, as any empty folder: taking on its mode must not take
    the builder's own right to write its files there (refused to anyone but root)."""
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o555)
    build_shards(release, out, shard_size=SHARD_SIZE, progress=False)
    assert oct(out.stat().st_mode & 0o7777) == oct(0o755)
