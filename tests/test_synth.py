"""The synthetic dataset has the official Tiny ImageNet layout, is deterministic and learnable."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import synth
from pipeline.synth import synthesize

CLASSES, TRAIN, VAL, TEST = 10, 60, 20, 50


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "release"
    assert synthesize(out, classes=CLASSES, train_per_class=TRAIN, val_per_class=VAL, test=TEST, progress=False) == out
    return out


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _box_ok(fields):
    x0, y0, x1, y1 = map(int, fields)
    return 0 <= x0 <= x1 <= 63 and 0 <= y0 <= y1 <= 63


def test_layout(release):
    wnids = (release / "wnids.txt").read_text().splitlines()
    assert len(wnids) == len(set(wnids)) == CLASSES
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    words = dict(line.split("\t") for line in (release / "words.txt").read_text().splitlines())
    assert sorted(words) == sorted(wnids)
    assert sorted(p.name for p in release.iterdir()) == ["test", "train", "val", "wnids.txt", "words.txt"]

    assert sorted(p.name for p in (release / "train").iterdir()) == sorted(wnids)
    for wnid in wnids:
        images = release / "train" / wnid / "images"
        assert sorted(p.name for p in images.iterdir()) == sorted(f"{wnid}_{i}.JPEG" for i in range(TRAIN))
        lines = (release / "train" / wnid / f"{wnid}_boxes.txt").read_text().splitlines()
        assert len(lines) == TRAIN
        for line in lines:
            name, *box = line.split("\t")
            assert (images / name).is_file() and _box_ok(box)

    val_images = release / "val" / "images"
    assert sorted(p.name for p in (release / "val").iterdir()) == ["images", "val_annotations.txt"]
    assert len(list(val_images.iterdir())) == CLASSES * VAL
    lines = (release / "val" / "val_annotations.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [f"val_{i}.JPEG" for i in range(CLASSES * VAL)]
    labels = []
    for line in lines:
        name, wnid, *box = line.split("\t")
        assert (val_images / name).is_file() and wnid in wnids and _box_ok(box)
        labels.append(wnid)
    assert all(labels.count(w) == VAL for w in wnids)
    assert labels != sorted(labels), "classes should be interleaved like the real val set"

    assert [p.name for p in (release / "test").iterdir()] == ["images"]
    assert sorted(p.name for p in (release / "test" / "images").iterdir()) == sorted(f"test_{i}.JPEG" for i in range(TEST))


def test_images_are_64px_jpegs_some_greyscale(release):
    modes = []
    for path in release.rglob("*.JPEG"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (64, 64)
            modes.append(image.mode)
    assert len(modes) == CLASSES * (TRAIN + VAL) + TEST
    assert set(modes) == {"RGB", "L"}
    assert 1 <= modes.count("L") <= 0.05 * len(modes)


def test_deterministic(tmp_path):
    kwargs = dict(classes=3, train_per_class=5, val_per_class=3, test=4, progress=False)
    a, b, c = (synthesize(tmp_path / name, seed=seed, **kwargs) for name, seed in [("a", 7), ("b", 7), ("c", 8)])
    assert _tree(a) == _tree(b)
    assert _tree(a) != _tree(c)


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError) as info:
        synthesize(tmp_path, progress=False)
    assert str(info.value) == f"{tmp_path}: already exists and is not empty"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_empty_output_dir_is_fine(tmp_path):
    synthesize(tmp_path, classes=2, train_per_class=1, val_per_class=1, test=0, progress=False)
    assert (tmp_path / "wnids.txt").read_text().count("\n") == 2


@pytest.mark.parametrize("made", [True, False], ids=["its-folder", "an-empty-folder"])
def test_a_stopped_synthesize_leaves_no_half_a_release(tmp_path, monkeypatch, made):
    """Ctrl-C (or SIGTERM, which the CLI raises as one) halfway: what it wrote is removed, and an empty --out given
    stays, empty. (Before: half a release stayed, and the rerun was refused: 'already exists and is not empty'.)"""
    out = tmp_path / "release"
    if not made:
        out.mkdir()
    save, saved = Image.Image.save, []

    def interrupted_save(image, *args, **kwargs):
        if len(saved) == 5:
            raise KeyboardInterrupt
        saved.append(save(image, *args, **kwargs))
    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        synthesize(out, classes=2, train_per_class=5, val_per_class=2, test=2, progress=False)
    assert sorted(tmp_path.rglob("*")) == ([] if made else [out])
    monkeypatch.undo()
    assert synthesize(out, classes=2, train_per_class=5, val_per_class=2, test=2, progress=False) == out


def _gray28(path):
    with Image.open(path) as image:
        return np.asarray(image.resize((28, 28), Image.BILINEAR).convert("L"), np.float32) / 255 - 0.5


def _tensors(labelled):
    """(N x 1 x 28 x 28 images, N labels) from (path, label) pairs."""
    return torch.tensor(np.stack([_gray28(p) for p, _ in labelled]))[:, None], torch.tensor([k for _, k in labelled])


def test_learnable_at_28px_greyscale(release):
    wnids = (release / "wnids.txt").read_text().splitlines()
    train = [(release / "train" / w / "images" / f"{w}_{i}.JPEG", k) for k, w in enumerate(wnids) for i in range(TRAIN)]
    annotations = (release / "val" / "val_annotations.txt").read_text().splitlines()
    val = [(release / "val" / "images" / name, wnids.index(wnid)) for name, wnid, *_ in map(str.split, annotations)]
    x, y = _tensors(train)
    xv, yv = _tensors(val)

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 5),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 12 * 12, CLASSES),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(3):
        for batch in torch.randperm(len(x)).split(32):
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = (net(xv).argmax(1) == yv).float().mean().item()
    assert accuracy > 3 / CLASSES


@pytest.mark.parametrize("flag, value, floor", [("--classes", "0", 1), ("--train-per-class", "-5", 1),
                                                ("--val-per-class", "1", 2), ("--test", "0", 1), ("--seed", "-1", 0)])
def test_cli_refuses_counts_that_make_no_release_in_one_line(tmp_path, flag, value, floor):
    """Each of these used to write a release `shard build` refuses (no val, no test/ images), or end
    in a traceback (numpy's `high <= 0`)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["data", "synth", "--out", str(tmp_path / "r"), flag, value])
    assert result.exit_code == 2 and not (tmp_path / "r").exists()
    assert result.output == f"error: Invalid value for '{flag}': {value} is not in the range x>={floor}.\n"


def test_an_empty_out_is_refused_not_the_current_folder(tmp_path, monkeypatch):
    """`--out "$DATA"` with DATA unset: the release was written into the current folder (when empty), exit 0."""
    from click.testing import CliRunner

    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["data", "synth", "--out", "", "--classes", "1", "--train-per-class", "1",
                                       "--val-per-class", "2", "--test", "1"])
    assert (result.exit_code, result.output) == (2, "error: --out is empty: give the folder to create\n")
    with pytest.raises(ValueError) as info:
        synthesize("", classes=1, train_per_class=1, val_per_class=2, test=1, progress=False)
    assert str(info.value) == "out is empty: give the folder to create"
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_is_a_symlink_to_a_folder_not_made_yet_is_written_there(tmp_path):
    """`--out LINK` to a folder on a bigger disk not made yet: '[Errno 17] File exists: LINK', exit 1, where
    shard build makes the target and builds into it. Stopped halfway, the target it made is removed."""
    from click.testing import CliRunner

    from pipeline.cli import main

    (tmp_path / "link").symlink_to(tmp_path / "disk" / "release")
    result = CliRunner().invoke(main, ["data", "synth", "--out", str(tmp_path / "link"), "--classes", "1",
                                       "--train-per-class", "1", "--val-per-class", "2", "--test", "1"])
    assert (result.exit_code, result.stdout) == (0, f"wrote synthetic release to {tmp_path / 'link'}\n")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "disk" / "release" / "wnids.txt").is_file()


def test_the_annotated_box_is_exactly_the_marker():
    """The marker is white on dark classes and black on bright ones, and fills its box, edges included: pixels
    that bright (or dark) occur nowhere else, so they span exactly the annotated box."""
    rng = np.random.default_rng(3)
    for spec in synth._class_specs(rng, 8):
        for _ in range(5):
            pixels, (x0, y0, x1, y1) = synth._render(rng, spec)
            marker = pixels.min(2) >= 200 if spec["level"] < 115 else pixels.max(2) <= 55
            ys, xs = np.nonzero(marker)
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x0, y0, x1, y1)
            assert marker.sum() == (x1 - x0 + 1) * (y1 - y0 + 1)


def test_val_images_of_all_classes_are_shuffled_together(release):
    """val/ is not class after class (a reader taking its first images would see one class)."""
    wnids = [line.split("\t")[1] for line in (release / "val/val_annotations.txt").read_text().splitlines()]
    assert sorted(wnids) == sorted((release / "wnids.txt").read_text().split() * VAL)
    assert sum(a != b for a, b in zip(wnids, wnids[1:])) > CLASSES * VAL // 2
