"""Synthesise a small stand-in for Tiny ImageNet 200, in exactly the official layout.

The real release is 248 MB behind a network; tests and `make demo` need something
the same readers accept unchanged and that a small CNN can learn in an epoch or two.

Each class is a family of images: coloured stripes at a class-specific angle and
frequency over a class-specific background brightness, plus a square marker (white
on dark classes, black on bright ones) near a class-specific place, whose bounding
box is the annotated box. Angle, brightness and marker position all survive
greyscale conversion and downsampling to 28x28. Per-image jitter (stripe phase and
angle, marker shift and size, pixel noise) keeps the task from being memorisation.
"""

import os
import pathlib
import shutil

import numpy as np
from PIL import Image
from tqdm import tqdm

SIZE = 64
JPEG_QUALITY = 90
#: About this share of the real release is greyscale JPEGs, which readers must handle.
GREY_FRACTION = 0.02
PALETTE = {
    "red": (220, 50, 50),
    "green": (60, 180, 75),
    "blue": (50, 90, 220),
    "yellow": (235, 215, 60),
    "purple": (145, 60, 180),
    "cyan": (70, 200, 210),
    "orange": (245, 130, 40),
    "pink": (240, 140, 190),
}

_Y, _X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _class_specs(rng, classes):
    # Angles and brightnesses are evenly spread then shuffled independently, so any
    # two classes differ clearly in at least one cue, whatever the seed.
    angles = rng.permutation(classes) * np.pi / classes
    levels = 30 + 170 * rng.permutation(classes) / max(classes - 1, 1)
    names = list(PALETTE)
    return [
        {
            "angle": angles[k],
            "cycles": rng.uniform(2, 5),
            "colour": names[rng.integers(len(names))],
            "level": levels[k],
            "marker": rng.integers(14, 50, size=2),
        }
        for k in range(classes)
    ]


def _render(rng, spec):
    """One image of the class `spec`: (uint8 array SIZE x SIZE x 3, box (x0, y0, x1, y1))."""
    angle = spec["angle"] + rng.normal(0, np.radians(4))
    phase = rng.uniform(0, 2 * np.pi)
    along = _X * np.cos(angle) + _Y * np.sin(angle)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * spec["cycles"] / SIZE * along + phase)
    amount = rng.uniform(0.4, 0.7) * wave[..., None]
    img = (1 - amount) * spec["level"] + amount * np.array(PALETTE[spec["colour"]], np.float32)

    # Marker centre stays within 10..53 and half-size <= 8, so the box is inside 0..63.
    half = int(rng.integers(5, 9))
    cx, cy = (spec["marker"] + rng.integers(-4, 5, size=2)).tolist()
    x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
    img[y0 : y1 + 1, x0 : x1 + 1] = 255 if spec["level"] < 115 else 0

    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), (x0, y0, x1, y1)


def synthesize(out, classes=10, train_per_class=100, val_per_class=50, test=200, seed=0, progress=True):
    """Write a synthetic dataset in the official Tiny ImageNet 200 layout under `out`.

    Writes wnids.txt, words.txt, train/<wnid>/images/<wnid>_<i>.JPEG with
    train/<wnid>/<wnid>_boxes.txt, val/images/val_<i>.JPEG (classes shuffled
    together) with val/val_annotations.txt, and test/images/test_<i>.JPEG
    (unlabelled). Images are 64x64 JPEGs, about 2% of them greyscale. The same
    arguments always give byte-identical files.

    Raises FileExistsError if `out` exists and is not empty, ValueError if it is "" (an unset variable's: as a
    Path the current folder, written into without a word). Returns `out` as a Path.
    """
    if not os.fspath(out):
        raise ValueError("out is empty: give the folder to create")
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: already exists and is not empty")
    # Written into a symlink's target, made where missing, as shard build's --out is: a link to a folder not
    # made yet was '[Errno 17] File exists: LINK'.
    folder = pathlib.Path(os.path.realpath(out))
    made = not folder.exists()
    try:
        _write(folder, classes, train_per_class, val_per_class, test, seed, progress)
    except BaseException:  # Ctrl-C, SIGTERM (the CLI's Terminated), a full disk: no half a release is left
        _remove_written(folder, made)
        raise
    return out


def _write(out, classes, train_per_class, val_per_class, test, seed, progress):
    """`synthesize`'s files, written into the folder `out` (made if missing)."""
    rng = np.random.default_rng(seed)
    wnids = [f"n{n:08d}" for n in rng.choice(10**8, size=classes, replace=False)]
    specs = _class_specs(rng, classes)
    val_labels = rng.permutation(np.repeat(np.arange(classes), val_per_class))
    test_labels = rng.integers(classes, size=test)

    jobs = [
        ("train", f"train/{w}/images/{w}_{i}.JPEG", k) for k, w in enumerate(wnids) for i in range(train_per_class)
    ]
    jobs += [("val", f"val/images/val_{i}.JPEG", k) for i, k in enumerate(val_labels)]
    jobs += [("test", f"test/images/test_{i}.JPEG", k) for i, k in enumerate(test_labels)]
    grey = set(rng.choice(len(jobs), size=round(GREY_FRACTION * len(jobs)), replace=False).tolist())

    for folder in [f"train/{w}/images" for w in wnids] + ["val/images", "test/images"]:
        (out / folder).mkdir(parents=True, exist_ok=True)
    boxes = {w: [] for w in wnids}
    val_lines = []
    for j, (split, rel, k) in enumerate(tqdm(jobs, desc="synthesize", unit="img", disable=not progress)):
        pixels, box = _render(rng, specs[k])
        image = Image.fromarray(pixels)
        if j in grey:
            image = image.convert("L")
        image.save(out / rel, quality=JPEG_QUALITY)
        name, coords = rel.rsplit("/", 1)[1], "\t".join(map(str, box))
        if split == "train":
            boxes[wnids[k]].append(f"{name}\t{coords}\n")
        elif split == "val":
            val_lines.append(f"{name}\t{wnids[k]}\t{coords}\n")

    for wnid, lines in boxes.items():
        (out / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(lines))
    (out / "val" / "val_annotations.txt").write_text("".join(val_lines))
    (out / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    words = [
        f"{w}\tsynthetic class {k}, {s['colour']} stripes at {round(np.degrees(s['angle']))} degrees\n"
        for k, (w, s) in enumerate(zip(wnids, specs))
    ]
    (out / "words.txt").write_text("".join(words))


def _remove_written(out, made):
    """Remove what a stopped `synthesize` wrote in `out`: the folder itself where it `made` it, else (a folder
    that was empty) what it holds. Left there, half a release blocked the rerun ('already exists and is not
    empty') until the user found and deleted it."""
    if made:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
