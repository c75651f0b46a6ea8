"""`verify_shards` re-checks a shard set end to end; `inspect_shards` summarises it and draws a grid.

Both take a shard folder or a local `ShardSet` (its manifest and index are read once); the
present/size/checksum check and its wording are `ShardSet.check_local_file`'s.
"""
from pathlib import Path

import numpy as np
import webdataset as wds
from webdataset import tariterators

from .atomic import folder_refusal, long_name
from .build import _stats, histograms
from .errors import ShardError, TinyinError, UsageError, plural
from .schema import CLS, GRAY28, JSON, MANIFEST_FILE, RGB64, VARIANTS
from .shardset import open_shard_set


def _local(shards):
    shard_set = open_shard_set(shards)
    if not shard_set.is_local:
        raise ShardError(f"{shard_set.location}: verify and inspect read a local copy of the shard set")
    return shard_set


class Problems(ShardError):
    """What `verify_shards` found wrong when it was more than one thing: `problems`, a line each (a
    ShardError's), and `summary`, the line that counts them; its message is all of them, a line each."""

    def __init__(self, problems, summary):
        self.problems, self.summary = problems, summary
        super().__init__("\n".join([*problems, summary]))


def verify_shards(shards, progress=True):
    """Check each shard's sha256 (and sum64) and count against the manifest, and decode every sample with the
    stock webdataset reader, comparing key, label, wnid, box and pixels with the index and its class (wnid) with the
    manifest's class of that label; then the train split's mean and std against the manifest's stats.
    Every problem is found, as fsck and `sha256sum -c` find them (one named the first bad shard, and the
    user repairing a set found the next one a run later): a shard's first, each class of the manifest's
    that its samples disagree with once, the stats (when every train shard could be read). Raises the
    ShardError of a lone problem, `Problems` of several; returns {'shards': n, 'samples': n}."""
    from tqdm import tqdm

    shard_set = _local(shards)
    manifest = shard_set.manifest
    index = shard_set.index.to_pydict()
    rows = {}
    for i, shard in enumerate(index["shard"]):
        rows.setdefault(shard, []).append(i)
    total, hist = 0, {"rgb64": 0, "gray28": 0}  # the train split's, summed as the build sums them
    problems, classes = [], {}  # classes: label -> the manifest's problem with its class, named once
    train_read = True
    bar = tqdm(total=sum(s["count"] for s in manifest["shards"]), unit="img", desc="verify", disable=not progress)
    for entry in manifest["shards"]:
        try:
            n, images = _verify_shard(shard_set, entry, index, rows.get(entry["file"], []), classes)
        except ShardError as e:
            problems.append(str(e))
            train_read = train_read and entry["split"] != "train"
            bar.update(entry["count"])
            continue
        if images[RGB64]:
            rgb_hist, gray_hist = histograms(images[RGB64], images[GRAY28])
            hist["rgb64"], hist["gray28"] = hist["rgb64"] + rgb_hist, hist["gray28"] + gray_hist
        total += n
        bar.update(n)
    bar.close()
    problems += classes.values()
    # The loader normalises by the stats, which no checksum covers. Both sides are rounded to 6 places;
    # give or take 1 in the last, as another numpy's build may round. A train shard unread leaves them unchecked.
    for name in VARIANTS if train_read else ():
        computed = _stats(hist[name])
        for key in ("mean", "std"):
            if not np.allclose(shard_set.stats(name)[key], computed[key], rtol=0, atol=1.5e-6):
                problems.append(f"{shard_set.where_name(MANIFEST_FILE)}: stats.{name}.{key} is "
                                f"{shard_set.stats(name)[key]}, the train split's is {computed[key]}")
    if len(problems) == 1:
        raise ShardError(problems[0])
    if problems:
        raise Problems(problems, f"{shard_set.location}: {len(problems)} problems, each named above")
    return {"shards": len(manifest["shards"]), "samples": total}


def _verify_shard(shard_set, entry, index, expected, classes):
    """`verify_shards`' check of the shard of manifest entry `entry`, whose rows of `index` are `expected`:
    ShardError at its first problem; a sample's wnid that is not its label's class of the manifest is put in
    `classes` (label -> the problem), the first for each label, and the check goes on. Returns its count and,
    for a train shard, its arrays ({RGB64: [...], GRAY28: [...]})."""
    manifest = shard_set.manifest
    path = Path(shard_set.where(entry))
    shard_set.check_local_file(entry, path)  # present, size, sha256, sum64
    mapped = np.memmap(path, np.uint8, mode="r")
    n, images = 0, {RGB64: [], GRAY28: []}
    try:
        for n, sample in enumerate(_samples(path), 1):
            i = expected[n - 1] if n <= len(expected) else None
            if (i is None or sample["__key__"] != index["key"][i] or int(sample[CLS]) != index["label"][i]
                    or sample[JSON]["wnid"] != (index["wnid"][i] or None)  # the index's '' is the json's null
                    or sample[JSON]["box"] != index["box"][i]):
                raise ShardError(f"{path}: sample {n} ({sample['__key__']}) disagrees with the index")
            if sample[JSON]["split"] != entry["split"]:
                raise ShardError(f"{path}: sample {sample['__key__']} is marked split {sample[JSON]['split']}")
            label = index["label"][i]  # the class list names the labels: reordered, a model's classes are misnamed
            wnid = manifest["classes"][label]["wnid"] if label >= 0 else None
            if sample[JSON]["wnid"] != wnid and label not in classes:  # the manifest's problem, not the shard's
                classes[label] = (f"{shard_set.where_name(MANIFEST_FILE)}: classes[{label}] is {wnid}, "
                                  f"its samples are {sample[JSON]['wnid']} ({sample['__key__']} in {path.name})")
            for name, (member, shape) in VARIANTS.items():
                at, length = index[f"{name}_offset"][i], index[f"{name}_length"][i]
                if sample[member].shape != shape or not np.array_equal(sample[member].ravel(), mapped[at:at + length]):
                    raise ShardError(f"{path}: {sample['__key__']}.{member} is not at its indexed offset")
                if entry["split"] == "train":
                    images[member].append(sample[member])
    except ShardError:
        raise
    except Exception as e:  # any reader failure means a damaged shard
        raise ShardError(f"{path}: unreadable ({e.__class__.__name__}: {e})") from None
    if n != entry["count"]:  # the index holds `count` rows per shard: ShardSet checked that at open
        raise ShardError(f"{path}: holds {n} {plural(n, 'sample')}, the manifest says {entry['count']}")
    return n, images


def _samples(path):
    """The decoded samples of local shard `path`, read from the open file by the stock webdataset reader.
    Not `WebDataset(path)`: that takes a path for a URL pattern, so a folder named with braces or '::'
    was read as other files and one with '?' or '#' cut short (a good set was 'unreadable')."""
    with open(path, "rb") as stream:
        yield from wds.DataPipeline(lambda: iter([{"url": str(path), "stream": stream}]),
                                    tariterators.tar_file_expander, tariterators.group_by_keys, wds.decode())


def inspect_shards(shards, png=None, max_classes=20, per_class=8):
    """Counts per split, classes and bytes as text, and a PNG grid (one row per class, with its
    words; at most `per_class` columns, as many as the fullest class shown holds). The grid's
    folder is created. Returns {'text': str, 'png': path}."""
    from PIL import Image, ImageDraw

    from .reader import ShardArrays

    for name, value in (("max_classes", max_classes), ("per_class", per_class)):
        if value < 1:  # the CLI's click ranges refuse these; a call from Python gets the same
            raise UsageError(f"{name} must be at least 1, not {value}")
    shard_set = _local(shards)
    shards, manifest = Path(shard_set.location), shard_set.manifest
    png = Path(png) if png else shards / "samples.png"
    _check_image_name(png)  # before the work, not at the save after it
    _check_writable(png)
    n_classes, n_files = len(manifest["classes"]), len(manifest["shards"])
    lines = [f"{shards}: format {manifest['format_version']}, {n_classes} {plural(n_classes, 'class')}, "
             f"{n_files} {plural(n_files, 'shard')}, {sum(s['bytes'] for s in manifest['shards']):,} bytes"]
    for split, count in manifest["counts"].items():
        n_shards = sum(1 for s in manifest["shards"] if s["split"] == split)
        lines.append(f"  {split:<10} {count:>8,} {plural(count, 'sample')} in {n_shards} {plural(n_shards, 'shard')}")
    for name in VARIANTS:  # those ShardSet checked: another key there is no reader's
        stats = shard_set.stats(name)
        lines.append(f"  train {name} mean {stats['mean']} std {stats['std']}")
    skipped = len(manifest["skipped"])
    lines.append(f"  skipped {skipped} {plural(skipped, 'input')}")
    arrays = ShardArrays(shard_set, "train", "rgb64")
    labels = arrays.labels
    classes = manifest["classes"][:max_classes]
    picks = [np.flatnonzero(labels == row)[:per_class] for row in range(len(classes))]
    columns = max(len(p) for p in picks)  # what the classes hold, not what was asked for
    cell, text_w = 64, 260
    grid = Image.new("RGB", (text_w + columns * (cell + 2), len(classes) * (cell + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for row, cls in enumerate(classes):
        for col, img in enumerate(arrays.gather(picks[row]).numpy()):
            grid.paste(Image.fromarray(img), (text_w + col * (cell + 2), row * (cell + 2)))
        draw.text((4, row * (cell + 2) + 24), f"{row} {cls['wnid']} {cls['words'][:36]}", fill="black")
    try:
        grid.save(png)
    except OSError as e:  # no permission on png itself, a full disk
        raise TinyinError(f"{png}: cannot write ({e.__class__.__name__}: {e})") from None
    lines.append(f"  wrote {png}")
    return {"text": "\n".join(lines), "png": str(png)}


def _check_writable(png):
    """TinyinError unless a file can be made in `png`'s folder (created now: `folder_refusal`). The default,
    SHARDS/samples.png, is refused on a shared set (another user's, a read-only mount): that showed after the
    work (10 s on the real set), and the counts were never printed. A name over NAME_MAX for the file itself
    (UsageError) was found by the save too: 'cannot write (OSError: [Errno 36] File name too long: ...)'."""
    why = folder_refusal(png.parent)
    if why:
        raise TinyinError(f"{png.parent}: {why}, for {png.name}; name another file with --png")
    if why := long_name(png):  # the folder's names fit (folder_refusal): the file's own is too long
        raise UsageError(f"--png {png}: {why}; choose a shorter name")


def _check_image_name(png):
    """UsageError unless `png` ends in an extension PIL can write (it picks the format by it)."""
    from PIL import Image

    Image.init()  # registers every format PIL has, as `save` would
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if png.suffix.lower() not in writable:
        what = f"unknown image extension {png.suffix}" if png.suffix else "no extension"
        raise UsageError(f"--png {png}: {what}; use .png")
