"""Turn a release's annotation files into the list of samples to write, split by split.

Labels are the index of the wnid in `sorted(wnids)` (what `ImageFolder` gives). The official val
set is split per class: the first half of each class's images, in `val_annotations.txt` order,
go to `val`, the rest to `test` (25/25 on the real release, as in the study); `split_seed`
draws that split at random instead; a class with fewer than 2 val images, which would leave val or
test without it, is a problem. The official `test/` images are unlabelled (`unlabeled`, -1).
`classes=N` keeps only the first N classes (labels 0..N-1, the same as in the full plan).
"""
import re
from dataclasses import dataclass

import numpy as np

from .errors import SourceError, UsageError, plural
from .schema import MEMBERS

# torchvision's IMG_EXTENSIONS, the files the study's ImageFolder loader reads (in any case): a PNG put in
# the layout was left out unsaid. Each is decoded as that loader decodes it (`variants`).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# A sample's members are `<key>.<member>` in a ustar header's 100-byte ASCII name field, and WebDataset
# readers take the key to be the name up to its first dot.
MAX_KEY = 100 - max(len("." + m) for m in MEMBERS)


@dataclass(frozen=True)
class Item:
    """One image to write: where it comes from and what the shard records about it."""
    key: str      # WebDataset __key__: the file name without extension (unique in the release)
    split: str
    label: int
    wnid: str
    box: tuple    # (x0, y0, x1, y1) or None
    path: str     # path inside the release


@dataclass
class Plan:
    """Everything `build_shards` needs: classes and items per split, plus the problems found."""
    wnids: list
    words: dict
    items: dict       # split -> [Item]
    problems: list    # (path, reason) of items that cannot be written
    ignored: list     # images outside train/, val/ and test/ (the release has none there): in no split, not written


def _natural(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _stem(path):
    return path.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _key(path, problems):
    """The sample key of image `path`, or None (and a problem) if its name cannot be one."""
    key = _stem(path)
    if key.isascii() and "." not in key and 1 <= len(key) <= MAX_KEY:
        return key
    problems.append((path, f"the file name cannot be a sample key (ASCII, no '.' before the extension, "
                           f"at most {MAX_KEY} characters)"))
    return None


def is_image(path):
    """Whether the release's file `path` is an image the build reads: torchvision's IMG_EXTENSIONS, as the
    study's ImageFolder, less macOS's AppleDouble files (the benches' ImageFolder rows take it too)."""
    # `._name.JPEG` is no image: macOS writes such an AppleDouble file (the file's metadata) beside
    # every file it copies to a FAT or exFAT drive or packs with its Finder or tar.
    return path.lower().endswith(IMAGE_SUFFIXES) and not path.rsplit("/", 1)[-1].startswith("._")


#: The index stores box coordinates as int16: a larger one failed the finished build with pyarrow's traceback.
BOX_LIMITS = (int(np.iinfo(np.int16).min), int(np.iinfo(np.int16).max))


def _box(fields, where):
    try:
        x0, y0, x1, y1 = (int(v) for v in fields)
    except ValueError:
        raise SourceError(f"{where}: malformed box {' '.join(fields)!r}") from None
    if not all(BOX_LIMITS[0] <= v <= BOX_LIMITS[1] for v in (x0, y0, x1, y1)):
        raise SourceError(f"{where}: malformed box {' '.join(fields)!r} (coordinates must lie in "
                          f"{BOX_LIMITS[0]}..{BOX_LIMITS[1]})")
    return (x0, y0, x1, y1)


def _read_wnids(files):
    lines = files.numbered("wnids.txt")
    for n, line in lines:
        # Several wnids a line (`echo $(ls train) > wnids.txt`) or a wnid and its words (lines of words.txt) read as one
        # wnid that no class folder has: 'class folder train/W is not in wnids.txt', of a W the file lists.
        if len(line.split()) > 1:
            raise SourceError(f"{files.label}: wnids.txt:{n}: expected one wnid a line, got {line!r}")
    wnids = [line for _, line in lines]
    if not wnids:
        raise SourceError(f"{files.label}: wnids.txt is empty")
    twice = sorted({w for w in wnids if wnids.count(w) > 1})
    if twice:
        raise SourceError(f"{files.label}: wnids.txt lists {', '.join(twice)} twice")
    for folder in ("train/", "val/", "test/"):
        if not any(n.startswith(folder) for n in files.names()):
            raise SourceError(f"{files.label}: missing folder {folder}")
    words = {}
    if "words.txt" in files:
        for line in files.text("words.txt"):
            wnid, text = (line.split(None, 1) + [""])[:2]  # a tab, or spaces where an editor replaced it
            words[wnid] = text.strip()
    return sorted(wnids), words


def _train_items(files, wnids, kept, problems):
    label_of = {w: i for i, w in enumerate(wnids)}
    by_class = {w: [] for w in wnids}
    for name in files.names():
        parts = name.split("/")
        if parts[0] != "train" or len(parts) < 3:
            continue
        if parts[1] not in label_of:
            raise SourceError(f"{files.label}: class folder train/{parts[1]} is not in wnids.txt")
        # Any image under train/W/, as the study's ImageFolder reads its class folders (os.walk): one put
        # beside images/ or in a folder within it was left out with no word.
        if is_image(name):
            by_class[parts[1]].append(name)
    items = []
    for wnid in wnids[:kept]:
        if not by_class[wnid]:  # it would be a class no sample has: a label the network never sees
            problems.append((f"train/{wnid}/images/", f"no images of class {wnid} (listed in wnids.txt)"))
        boxes = {}
        boxes_file = f"train/{wnid}/{wnid}_boxes.txt"
        present = set(by_class[wnid])
        for n, line in (files.numbered(boxes_file) if boxes_file in files else []):
            fields = line.split()
            image = f"train/{wnid}/images/{fields[0]}"
            if image not in present:
                problems.append((image, f"named in {boxes_file}:{n} but missing"))
                continue
            boxes[image] = _box(fields[1:5], f"{files.label}: {boxes_file}:{n}")
        for path in sorted(by_class[wnid], key=_natural):
            key = _key(path, problems)
            if key is not None:
                items.append(Item(key, "train", label_of[wnid], wnid, boxes.get(path), path))
    return items


def _val_test_items(files, wnids, kept, split_seed, problems):
    label_of = {w: i for i, w in enumerate(wnids)}
    present = {n for n in files.names() if n.startswith("val/images/") and is_image(n)}
    per_class = {w: [] for w in wnids}
    listed = {}  # path -> position in val_annotations.txt
    for n, line in files.numbered("val/val_annotations.txt"):
        where = f"val/val_annotations.txt:{n}"
        fields = [f.strip() for f in line.split("\t")] if "\t" in line else line.split()
        if len(fields) < 6:
            raise SourceError(f"{files.label}: {where}: expected 'file wnid x0 y0 x1 y1', got {line!r}")
        path, wnid = f"val/images/{fields[0]}", fields[1]
        if path in listed:  # it would be two samples of one image under one key, and with two wnids, two labels
            raise SourceError(f"{files.label}: {where}: {fields[0]} is listed again (first at line {listed[path]})")
        if wnid not in label_of:
            raise SourceError(f"{files.label}: {where}: wnid {wnid} is not in wnids.txt")
        listed[path] = n
        if label_of[wnid] >= kept:
            continue
        if path not in present:
            problems.append((path, f"named in {where} but missing"))
            continue
        box, key = _box(fields[2:6], f"{files.label}: {where}"), _key(path, problems)
        if key is not None:
            per_class[wnid].append(Item(key, "", label_of[wnid], wnid, box, path))
    for path in sorted(present - listed.keys(), key=_natural):
        problems.append((path, "not listed in val/val_annotations.txt"))
    rng = np.random.default_rng(split_seed) if split_seed is not None else None
    val, test = [], []
    # Classes in label order, so the first `kept` draw the same random halves as in the full plan.
    for wnid in wnids[:kept]:
        items = per_class[wnid]
        if len(items) < 2:  # val or test would hold none of the class, and its accuracy go unmeasured there
            problems.append(("val/val_annotations.txt",
                             f"class {wnid} has {len(items)} val {plural(len(items), 'image')}; val and "
                             "test need at least one each"))
        if rng is not None:
            items = [items[i] for i in rng.permutation(len(items))]
        half = len(items) // 2
        val += [_with_split(it, "val") for it in items[:half]]
        test += [_with_split(it, "test") for it in items[half:]]
    # Keep each split in annotation order (the study's order), whichever way it was drawn.
    return sorted(val, key=lambda it: listed[it.path]), sorted(test, key=lambda it: listed[it.path])


def _with_split(item, split):
    return Item(item.key, split, item.label, item.wnid, item.box, item.path)


def plan_release(files, split_seed=None, classes=None):
    """Read wnids/words/boxes/annotations and return the `Plan` (raises SourceError on structure).

    `classes=N` plans only the first N classes in label order, and no `unlabeled` split: those
    images belong to every class, so they are no part of a subset (UsageError if N is out of range).
    """
    wnids, words = _read_wnids(files)
    if classes is not None and not 1 <= classes <= len(wnids):
        raise UsageError(f"--classes {classes}: the release has {len(wnids)} {plural(len(wnids), 'class')}")
    kept = len(wnids) if classes is None else classes
    problems = []
    train = _train_items(files, wnids, kept, problems)
    val, test = _val_test_items(files, wnids, kept, split_seed, problems)
    unlabeled = []
    if classes is None:
        for path in sorted((n for n in files.names() if n.startswith("test/images/") and is_image(n)), key=_natural):
            key = _key(path, problems)
            if key is not None:
                unlabeled.append(Item(key, "unlabeled", -1, "", None, path))
    # val/ and test/ keep their images in images/ (val's labels name them there), train/ in its class folders
    # (the folder is the class): one elsewhere would be left out with no word, so it is a problem (the build
    # fails, or with --on-error skip lists it skipped).
    read = ("val", "test") if classes is None else ("val",)  # a subset reads nothing of test/
    # One at the top or in a folder of its own belongs to no split: not a problem, but `shard build` counts
    # them in its summary (a user who put images there may have meant them used). `is_image`: a littered
    # archive's `._*` files (and `__MACOSX/`'s, all such) are none.
    ignored = []
    for name in files.names():
        top, _, rest = name.partition("/")
        if top in read and is_image(name) and not rest.startswith("images/"):
            problems.append((name, f"outside {top}/images/, where the release keeps the {top} images"))
        elif top == "train" and "/" not in rest and is_image(name):
            problems.append((name, "outside the class folders train/WNID/, where the release keeps the train images"))
        elif top not in ("train", "val", "test") and is_image(name):
            ignored.append(name)
    items = {"train": train, "val": val, "test": test, "unlabeled": unlabeled}
    seen = {}
    for item in train + val + test + unlabeled:
        if seen.setdefault(item.key, item.path) != item.path:
            raise SourceError(f"{files.label}: {item.path} and {seen[item.key]} share the key {item.key}")
    wnids = wnids[:kept]
    return Plan(wnids, {w: words.get(w, "") for w in wnids}, items, problems, ignored)
