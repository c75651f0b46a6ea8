"""Bad input: one clear line naming the file, exit code 1, nothing half-written."""
import codecs
import concurrent.futures
import errno
import io
import os
import socket
import json
import lzma
import shutil
import signal
import tarfile
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import pipeline.build
import pipeline.cli
from pipeline.build import build_shards
from pipeline.cli import main
from pipeline.errors import SourceError, UsageError
from pipeline.atomic import write_json
from pipeline.index import write_index
from pipeline.release import plan_release
from pipeline.schema import INDEX_FILE, MANIFEST_FILE
from pipeline.source import open_release
from pipeline.tarshard import write_shard
from tests.conftest import SHARD_SIZE


@pytest.fixture
def broken(release, tmp_path):
    """A private copy of the synthetic release to damage."""
    return shutil.copytree(release, tmp_path / "release")


def first_train_image(root):
    wnid = sorted((root / "wnids.txt").read_text().split())[0]
    return root / "train" / wnid / "images" / f"{wnid}_0.JPEG"


def jpeg_bytes(img, fmt="JPEG"):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def build(src, out, *extra):
    result = CliRunner().invoke(main, ["shard", "build", "--src", str(src), "--out", str(out), "--quiet", *extra])
    return result.exit_code, result.output.strip()


def assert_fails(src, tmp_path, message):
    out = tmp_path / "out"
    code, output = build(src, out)
    assert code == 1, output
    assert output == f"error: {message}"
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_missing_wnids(broken, tmp_path):
    (broken / "wnids.txt").unlink()
    assert_fails(broken, tmp_path, f"{broken}: missing wnids.txt (not a Tiny ImageNet release)")


def test_a_src_holding_two_releases_is_refused(release, tmp_path):
    # It built the first (in name order; in an archive, the shorter path) and ignored the other, unsaid.
    both = tmp_path / "both"
    for name in ("tiny-imagenet-200", "a"):
        shutil.copytree(release, both / name)
    assert_fails(both, tmp_path, f"{both}: holds 2 releases (a/, tiny-imagenet-200/); pass the one to build")
    archive = tmp_path / "both.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(both.rglob("*")):
            zf.write(path, path.relative_to(both))
    assert_fails(archive, tmp_path, f"{archive}: holds 2 releases (a/, tiny-imagenet-200/); pass the one to build")


def test_missing_split_folder(broken, tmp_path):
    shutil.rmtree(broken / "val")
    assert_fails(broken, tmp_path, f"{broken}: missing folder val/")


def test_a_wnid_listed_twice_is_named(broken, tmp_path):
    wnids = (broken / "wnids.txt").read_text().split()
    (broken / "wnids.txt").write_text("\n".join(wnids + [wnids[3], wnids[1]]) + "\n")
    assert_fails(broken, tmp_path, f"{broken}: wnids.txt lists {', '.join(sorted([wnids[1], wnids[3]]))} twice")


@pytest.mark.parametrize("edit", [lambda text: " ".join(text.split()) + "\n",  # `echo $(ls train) > wnids.txt`
                                  lambda text: text.replace("\n", "\tsome words\n", 1)],  # lines of words.txt
                         ids=["one-line", "with-words"])
def test_a_wnids_line_of_more_than_one_wnid_is_named(broken, tmp_path, edit):
    """Read as one wnid, such a line failed the build with 'class folder train/W is not in wnids.txt', of a W it lists."""
    wnids = broken / "wnids.txt"
    wnids.write_text(edit(wnids.read_text()))
    line = wnids.read_text().splitlines()[0]
    assert_fails(broken, tmp_path, f"{broken}: wnids.txt:1: expected one wnid a line, got {line!r}")


def test_class_folder_not_in_wnids(broken, tmp_path):
    shutil.copytree(broken / "train" / sorted((broken / "wnids.txt").read_text().split())[0], broken / "train/n99999999")
    assert_fails(broken, tmp_path, f"{broken}: class folder train/n99999999 is not in wnids.txt")


def test_annotation_names_missing_file(broken, tmp_path):
    (broken / "val/images/val_3.JPEG").unlink()
    line = next(i for i, l in enumerate((broken / "val/val_annotations.txt").read_text().splitlines(), 1)
                if l.startswith("val_3.JPEG\t"))
    assert_fails(broken, tmp_path, f"{broken}: val/images/val_3.JPEG: named in val/val_annotations.txt:{line} but missing")


@pytest.mark.parametrize("relabel", [False, True])
def test_a_val_image_listed_twice_is_refused(broken, tmp_path, relabel):
    # It built: the image twice under one key (val 1 more than the release has), with `relabel` under two labels.
    annotations = broken / "val/val_annotations.txt"
    lines = annotations.read_text().splitlines()
    name, wnid, *box = lines[4].split("\t")
    other = next(w for w in sorted((broken / "wnids.txt").read_text().split()) if w != wnid) if relabel else wnid
    annotations.write_text("\n".join(lines + ["\t".join([name, other, *box])]) + "\n")
    assert_fails(broken, tmp_path,
                 f"{broken}: val/val_annotations.txt:{len(lines) + 1}: {name} is listed again (first at line 5)")


def test_malformed_boxes_name_the_release(broken, tmp_path):
    wnid = sorted((broken / "wnids.txt").read_text().split())[0]
    boxes = broken / "train" / wnid / f"{wnid}_boxes.txt"
    lines = boxes.read_text().splitlines()
    boxes.write_text("\n".join([lines[0].split("\t")[0] + "\t1\t2\tx\t4"] + lines[1:]) + "\n")
    assert_fails(broken, tmp_path, f"{broken}: train/{wnid}/{wnid}_boxes.txt:1: malformed box '1 2 x 4'")
    boxes.write_text("\n".join(lines) + "\n")
    annotations = broken / "val/val_annotations.txt"
    first, *rest = annotations.read_text().splitlines()
    annotations.write_text("\n".join(["\t".join(first.split("\t")[:2] + ["a", "b", "c", "d"])] + rest) + "\n")
    assert_fails(broken, tmp_path, f"{broken}: val/val_annotations.txt:1: malformed box 'a b c d'")


def test_a_line_after_blank_lines_is_named_by_its_line_in_the_file(broken, tmp_path):
    """Blank lines (an editor's, a copy's) count as the editor counts them: the lines were numbered without them,
    and the line named was one the file holds above the wrong one."""
    wnid = sorted((broken / "wnids.txt").read_text().split())[0]
    boxes = broken / "train" / wnid / f"{wnid}_boxes.txt"
    lines = boxes.read_text().splitlines()
    boxes.write_text("\r\n".join([lines[0], "", " ", lines[1].split("\t")[0] + "\t1\t2\tx\t4"] + lines[2:]) + "\r\n")
    assert_fails(broken, tmp_path, f"{broken}: train/{wnid}/{wnid}_boxes.txt:4: malformed box '1 2 x 4'")
    boxes.write_text("\n".join(lines) + "\n")
    annotations = broken / "val/val_annotations.txt"
    lines = annotations.read_text().splitlines()
    annotations.write_text("\n".join(lines[:2] + [""] + lines[2:] + ["", lines[1]]) + "\n")
    name = lines[1].split("\t")[0]
    assert_fails(broken, tmp_path, f"{broken}: val/val_annotations.txt:{len(lines) + 3}: {name} is listed again "
                                   "(first at line 2)")


def test_a_box_too_large_for_the_index_names_its_line(broken, tmp_path):
    """The index holds boxes as int16: a coordinate of 40000 failed the build after every shard was
    written, with pyarrow's traceback (ArrowInvalid: Value 40000 too large to fit in C integer type)."""
    wnid = sorted((broken / "wnids.txt").read_text().split())[0]
    boxes = broken / "train" / wnid / f"{wnid}_boxes.txt"
    lines = boxes.read_text().splitlines()
    boxes.write_text("\n".join([lines[0].split("\t")[0] + "\t1\t2\t40000\t4"] + lines[1:]) + "\n")
    assert_fails(broken, tmp_path, f"{broken}: train/{wnid}/{wnid}_boxes.txt:1: malformed box '1 2 40000 4' "
                                   "(coordinates must lie in -32768..32767)")


def test_text_files_from_an_editor_build_the_same_set(release, shards, tmp_path):
    """CRLF, a UTF-8 byte order mark, blank lines, spaces around the tabs or in place of them (before: the BOM made
    the first wnid `class folder train/W is not in wnids.txt`, spaces around a tab `wnid ' W ' is not in
    wnids.txt`, and words.txt with spaces lost every class's words, silently)."""
    edited = shutil.copytree(release, tmp_path / "release")
    for name, edit in (("wnids.txt", lambda line: line), ("val/val_annotations.txt", lambda l: l.replace("\t", " \t ")),
                       ("words.txt", lambda line: line.replace("\t", "    "))):
        lines = (edited / name).read_text().splitlines()
        text = "".join(f" {edit(line)} \r\n" + " \r\n" * (i == 1) for i, line in enumerate(lines))  # a blank line
        (edited / name).write_bytes(("\ufeff" + text + "\t\r\n").encode())
    code, output = build(edited, tmp_path / "out", "--shard-size", str(SHARD_SIZE))
    assert code == 0 and output.endswith("skipped 0"), output
    built, reference = (json.loads((s / "manifest.json").read_text()) for s in (tmp_path / "out", shards))
    assert built["shards"] == reference["shards"] and built["classes"] == reference["classes"]
    assert all(c["words"].startswith("synthetic class ") for c in built["classes"])


def test_text_files_saved_as_utf16_build_the_same_set(release, shards, tmp_path):
    """UTF-16 with its byte order mark, as Windows PowerShell 5's `>` and Notepad's 'Unicode' save a file (before:
    wnids.txt failed the build with 'class folder train/W is not in wnids.txt', words.txt lost every class's
    words with no word)."""
    edited = shutil.copytree(release, tmp_path / "release")
    wnid = sorted((release / "wnids.txt").read_text().split())[0]
    for name, bom, encoding in (("wnids.txt", codecs.BOM_UTF16_LE, "utf-16-le"),
                                ("val/val_annotations.txt", codecs.BOM_UTF16_LE, "utf-16-le"),
                                ("words.txt", codecs.BOM_UTF16_BE, "utf-16-be"),
                                (f"train/{wnid}/{wnid}_boxes.txt", codecs.BOM_UTF16_LE, "utf-16-le")):
        text = (edited / name).read_text().replace("\n", "\r\n")
        (edited / name).write_bytes(bom + text.encode(encoding))
    code, output = build(edited, tmp_path / "out", "--shard-size", str(SHARD_SIZE))
    assert code == 0 and output.endswith("skipped 0"), output
    built, reference = (json.loads((s / "manifest.json").read_text()) for s in (tmp_path / "out", shards))
    assert built["shards"] == reference["shards"] and built["classes"] == reference["classes"]
    assert all(c["words"].startswith("synthetic class ") for c in built["classes"])


def test_an_annotation_line_short_of_a_field_is_named(broken):
    """Five fields (a coordinate missing): the line is named as it is, not read as a malformed box of three."""
    annotations = broken / "val/val_annotations.txt"
    lines = annotations.read_text().splitlines()
    short = lines[0].rsplit("\t", 1)[0]
    annotations.write_text("\n".join([short] + lines[1:]) + "\n")
    with pytest.raises(SourceError) as caught:
        plan_release(open_release(broken))
    assert str(caught.value) == f"{broken}: val/val_annotations.txt:1: expected 'file wnid x0 y0 x1 y1', got {short!r}"


def test_a_class_without_images_fails_or_is_skipped(broken, tmp_path):
    with open(broken / "wnids.txt", "a") as f:
        f.write("n99999999\n")
    reason = "no images of class n99999999 (listed in wnids.txt)"
    assert_fails(broken, tmp_path, f"{broken}: train/n99999999/images/: {reason}")
    code, output = build(broken, tmp_path / "out", "--on-error", "skip")
    assert code == 0 and output.endswith("skipped 2"), output
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["skipped"] == [{"source": "train/n99999999/images/", "reason": reason},
                                   {"source": "val/val_annotations.txt",
                                    "reason": "class n99999999 has 0 val images; val and test need at least one each"}]


@pytest.mark.parametrize("keep, held", [(0, "0 val images"), (1, "1 val image")])
def test_a_class_without_val_and_test_images_fails_or_is_skipped(broken, tmp_path, keep, held):
    """(before: built, `skipped 0`, with the class absent from val or from test; one image was '1 val images')"""
    wnid = sorted((broken / "wnids.txt").read_text().split())[2]
    annotations = broken / "val/val_annotations.txt"
    lines = annotations.read_text().splitlines()
    gone = [l for l in lines if l.split("\t")[1] == wnid][keep:]
    annotations.write_text("".join(f"{l}\n" for l in lines if l not in gone))
    for line in gone:
        (broken / "val/images" / line.split("\t")[0]).unlink()
    reason = f"class {wnid} has {held}; val and test need at least one each"
    assert_fails(broken, tmp_path, f"{broken}: val/val_annotations.txt: {reason}")
    code, output = build(broken, tmp_path / "out", "--on-error", "skip")
    assert code == 0 and output.endswith("skipped 1"), output
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["skipped"] == [{"source": "val/val_annotations.txt", "reason": reason}]
    assert (manifest["counts"]["val"], manifest["counts"]["test"]) == (25, 25 + keep)


def test_file_names_that_cannot_be_sample_keys_fail_or_are_skipped(broken, tmp_path):
    """A key goes into a 100-byte ASCII tar name with its member's suffix, and WebDataset readers end a
    key at its first dot (before: a non-ASCII or long name was a traceback after the decoding, and
    `a.b.JPEG` built a shard that `shard verify` and stock readers split into another sample)."""
    first = first_train_image(broken)
    shutil.copy(first, first.with_name("caf\u00e9_0.JPEG"))
    shutil.copy(broken / "val/images/val_3.JPEG", broken / "val/images/val.3.JPEG")
    annotations = broken / "val/val_annotations.txt"
    line = next(l for l in annotations.read_text().splitlines() if l.startswith("val_3.JPEG\t"))
    annotations.write_text(annotations.read_text() + line.replace("val_3", "val.3") + "\n")
    long_name = "t" * 90 + ".JPEG"  # a key of 90 characters: one too many
    shutil.copy(broken / "test/images/test_0.JPEG", broken / "test/images" / long_name)
    reason = "the file name cannot be a sample key (ASCII, no '.' before the extension, at most 89 characters)"
    wrong = [str(first.with_name("caf\u00e9_0.JPEG").relative_to(broken)), "val/images/val.3.JPEG",
             f"test/images/{long_name}"]
    assert_fails(broken, tmp_path, f"{broken}: {wrong[0]}: {reason}")
    code, output = build(broken, tmp_path / "out", "--on-error", "skip")
    assert code == 0 and output.endswith("skipped 3"), output
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["skipped"] == [{"source": path, "reason": reason} for path in wrong]
    assert manifest["counts"] == {"train": 240, "val": 30, "test": 30, "unlabeled": 30}


def test_macos_metadata_files_are_no_images(release, shards, tmp_path):
    """macOS leaves an AppleDouble `._NAME` beside each file it copies to an exFAT drive or packs, and
    Finder's zips a `__MACOSX/` folder of them (before: `._val_0.JPEG: not listed in
    val/val_annotations.txt`, and with --on-error skip every `._` file skipped as not an image)."""
    broken = shutil.copytree(release, tmp_path / "release")
    for path in [p for p in broken.rglob("*") if p.is_file()]:
        (path.parent / f"._{path.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    zipped = tmp_path / "release.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for path in sorted(p for p in broken.rglob("*") if p.is_file()):
            rel = path.relative_to(broken)
            zf.write(path, f"tiny-imagenet-200/{rel}")
            zf.writestr(f"__MACOSX/tiny-imagenet-200/{rel.parent}/._{path.name}", b"\x00\x05\x16\x07")
    for src in (broken, zipped):
        out = tmp_path / f"out-{src.suffix}"
        code, output = build(src, out, "--shard-size", str(SHARD_SIZE))
        assert code == 0 and output.endswith("skipped 0"), output
        built, reference = (json.loads((s / "manifest.json").read_text()) for s in (out, shards))
        assert built["shards"] == reference["shards"] and built["counts"] == reference["counts"]


def test_a_zip_with_backslashes_between_folders_builds(release, shards, tmp_path):
    """Windows PowerShell 5's Compress-Archive separates folders with '\\' (before: `missing wnids.txt
    (not a Tiny ImageNet release)`)."""
    zipped = tmp_path / "release.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for path in sorted(p for p in release.rglob("*") if p.is_file()):
            zf.writestr("\\".join(("tiny-imagenet-200", *path.relative_to(release).parts)), path.read_bytes())
    code, output = build(zipped, tmp_path / "out", "--shard-size", str(SHARD_SIZE))
    assert code == 0 and output.endswith("skipped 0"), output
    built, reference = (json.loads((s / "manifest.json").read_text()) for s in (tmp_path / "out", shards))
    assert built["shards"] == reference["shards"]


def test_symlinked_folders_are_followed(release, shards, tmp_path):
    """A release with folders linked in from elsewhere builds as the plain one does (before: `no images
    of class W` for a linked class folder, `named in val/val_annotations.txt:1 but missing` for a linked
    val/images); a link to a folder above loops no walk, and a broken link is named."""
    broken = shutil.copytree(release, tmp_path / "release")
    wnid = sorted((broken / "wnids.txt").read_text().split())[0]
    elsewhere = tmp_path / "other-disk"
    elsewhere.mkdir()
    for folder in (f"train/{wnid}", "val/images"):
        moved = shutil.move(broken / folder, elsewhere / folder.replace("/", "-"))
        (broken / folder).symlink_to(moved)
    (broken / "test/images/loop").symlink_to(broken / "test")
    code, output = build(broken, tmp_path / "out", "--shard-size", str(SHARD_SIZE))
    assert code == 0 and output.endswith("skipped 0"), output
    built, reference = (json.loads((s / "manifest.json").read_text()) for s in (tmp_path / "out", shards))
    assert built["shards"] == reference["shards"]
    image = broken / f"train/{wnid}/images/extra_0.JPEG"
    image.symlink_to(tmp_path / "gone.JPEG")
    shutil.rmtree(tmp_path / "out")
    assert_fails(broken, tmp_path, f"{broken}: cannot read {image.relative_to(broken)} (FileNotFoundError)")


def test_a_folder_linked_to_from_inside_the_release_is_read_at_its_own_path_too(release, shards, tmp_path):
    """A link in the release to one of its own folders (a shortcut, a subset's view) reached first, as here at the top,
    had the walk leave the folder out at its own path: 'no images of class W', where the release's tar builds.
    Now the set is the plain one's, the images under the link counted as outside the splits; a loop is still none."""
    linked = shutil.copytree(release, tmp_path / "release")
    wnid = sorted((linked / "wnids.txt").read_text().split())[0]
    (linked / "shortcut").symlink_to(f"train/{wnid}")
    (linked / f"train/{wnid}/images/up").symlink_to("../..")
    code, output = build(linked, tmp_path / "out", "--shard-size", str(SHARD_SIZE))
    assert code == 0 and output.endswith(f"skipped 0; ignored 40 images outside train/, val/ and test/ "
                                         f"(shortcut/images/{wnid}_0.JPEG, ...)"), output
    built, reference = (json.loads((s / "manifest.json").read_text()) for s in (tmp_path / "out", shards))
    assert built["shards"] == reference["shards"]


@pytest.mark.parametrize("damage, reason", [
    ("garbage", "not an image (corrupt JPEG)"),
    ("truncated", "corrupt or truncated JPEG (image file is truncated"),
    ("small", "image is 32x32, expected 64x64"),
])
def test_bad_images_fail_or_are_skipped(broken, tmp_path, damage, reason):
    path = first_train_image(broken)
    data = path.read_bytes()
    path.write_bytes({
        "garbage": b"this is not a jpeg" * 20,
        "truncated": data[: len(data) // 2],
        "small": jpeg_bytes(Image.new("RGB", (32, 32), "red")),
    }[damage])
    rel = str(path.relative_to(broken))
    out = tmp_path / "out"
    code, output = build(broken, out)
    assert code == 1 and output.startswith(f"error: {rel}: {reason}"), output
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
    code, output = build(broken, out, "--on-error", "skip")
    assert code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["skipped"]) == 1 and manifest["skipped"][0]["source"] == rel
    assert manifest["skipped"][0]["reason"].startswith(f"{rel}: {reason}")
    assert manifest["counts"]["train"] == 239 and "skipped 1" in output


def test_the_build_names_what_it_skipped(broken, tmp_path, monkeypatch):
    """Each skipped input on stderr, with its reason (before: only `skipped 3`), up to a limit."""
    images = sorted(first_train_image(broken).parent.glob("*.JPEG"), key=lambda p: int(p.stem.split("_")[1]))[:3]
    for path in images:
        path.write_bytes(b"")
    lines = [f"skipped {p.relative_to(broken)}: not an image (corrupt JPEG)" for p in images]
    args = ["shard", "build", "--src", str(broken), "--quiet", "--on-error", "skip"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and result.stderr == "".join(f"{line}\n" for line in lines), result.output
    assert result.stdout.rstrip().endswith("skipped 3")
    monkeypatch.setattr(pipeline.cli, "SKIPPED_SHOWN", 1)
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out2")])
    assert result.stderr == f"{lines[0]}\nskipped 2 more (manifest.json lists them all)\n"


def test_unreadable_archives(release, tmp_path):
    tgz = tmp_path / "release.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(release, "tiny-imagenet-200")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(tgz.read_bytes()[: tgz.stat().st_size // 2])
    code, output = build(cut, tmp_path / "out")
    assert code == 1 and output.startswith(f"error: {cut}: unreadable archive ("), output
    junk = tmp_path / "junk.zip"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    code, output = build(junk, tmp_path / "out")
    assert code == 1 and output == f"error: {junk}: unreadable archive (not a folder, .zip or .tar[.gz])"
    code, output = build(tmp_path / "nope", tmp_path / "out")
    assert code == 1 and output == f"error: {tmp_path / 'nope'}: no such file or folder"
    assert not (tmp_path / "out").exists()


def test_an_archive_of_0_bytes_is_named_empty(tmp_path):
    """A copy or download that wrote nothing: a .zip (or a file of no suffix) of 0 bytes was 'not a folder, .zip or
    .tar[.gz]', where a .tar[.gz] was 'empty file'."""
    for name in ("tiny-imagenet-200.zip", "tiny-imagenet-200.tar.gz", "tiny-imagenet-200"):
        (tmp_path / name).write_bytes(b"")
        assert_fails(tmp_path / name, tmp_path, f"{tmp_path / name}: unreadable archive (empty file)")


def test_a_pipe_is_refused_in_one_line(tmp_path):
    # `--src <(curl URL)` or /dev/stdin: a .tar.gz gave tarfile's traceback (Illegal seek), a zip "corrupt or
    # truncated zip"; and a pipe with no writer yet was opened, which waits for one for good.
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)

    def hung(signum, frame):  # the old code's wait: fail the test instead of stalling the suite
        pytest.fail("the build opened the pipe and waited for a writer")  # not an OSError, which the readers catch

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        assert_fails(pipe, tmp_path, f"{pipe}: not a file or folder (a pipe?); save the archive to a file and pass that")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_truncated_archives_say_so(release, tmp_path):
    """A tar cut exactly at or inside a member header (no end-of-archive blocks) and a zip cut short
    are named as truncated (before: a tar built with fewer images and `skipped 0`, or failed on what
    the lost part held; a zip was `not a folder, .zip or .tar[.gz]`)."""
    tar = tmp_path / "release.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as tf:
        tf.add(release, "tiny-imagenet-200")
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
    member = next(m for m in members if m.name.endswith("_0.JPEG") and "/train/" in m.name)
    after_last = members[-1].offset_data + -(-members[-1].size // 512) * 512  # every member, no end blocks
    for cut in (member.offset, member.offset + 100, after_last):
        path = tmp_path / f"cut-{cut}.tar"
        path.write_bytes(tar.read_bytes()[:cut])
        code, output = build(path, tmp_path / "out")
        assert (code, output) == (1, f"error: {path}: unreadable archive (truncated: it ends at byte {cut:,}, "
                                     "before tar's end-of-archive blocks)")
    zipped = tmp_path / "release.zip"
    shutil.make_archive(str(zipped.with_suffix("")), "zip", release.parent, release.name)
    cut = tmp_path / "cut.zip"
    cut.write_bytes(zipped.read_bytes()[:zipped.stat().st_size - 100])
    code, output = build(cut, tmp_path / "out")
    assert (code, output) == (1, f"error: {cut}: corrupt or truncated zip (no central directory at its end)")
    assert sorted(p.name for p in tmp_path.glob("out*")) == []


def test_truncated_archives_that_tarfile_reads_say_so(release, tmp_path):
    """The archives the fast reader leaves to `tarfile` (other compressions, a pax global header as
    `git archive` writes, pre-POSIX tars), cut at a member header (before: built from what was left,
    `skipped 0`)."""
    plain = tmp_path / "release.tar"
    with tarfile.open(plain, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "a global header"}) as tf:
        for name in ("wnids.txt", "words.txt", "val", "test", "train"):  # train last: the cut loses images
            tf.add(release / name, f"tiny-imagenet-200/{name}")
    with tarfile.open(plain) as tf:
        cut = [m for m in tf.getmembers() if m.name.endswith(".JPEG")][-1].offset
    data = plain.read_bytes()[:cut]
    for path, content in ((tmp_path / "cut.tar", data), (tmp_path / "cut.tar.xz", lzma.compress(data))):
        path.write_bytes(content)
        code, output = build(path, tmp_path / "out")
        assert (code, output) == (1, f"error: {path}: unreadable archive (truncated: it ends at byte {cut:,}, "
                                     "before tar's end-of-archive blocks)")
    assert sorted(p.name for p in tmp_path.glob("out*")) == []


def test_a_cut_compressed_tar_is_named_unreadable_not_unknown(release, tmp_path):
    """A .tar.bz2 cut short (a download that stopped) failed tarfile.is_tarfile, and the build said
    'not a folder, .zip or .tar[.gz]'; its name says what it is, and the error what is wrong."""
    path = tmp_path / "release.tar.bz2"
    with tarfile.open(path, "w:bz2") as tf:
        tf.add(release, "tiny-imagenet-200")
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    code, output = build(path, tmp_path / "out")
    assert (code, output) == (1, f"error: {path}: unreadable archive (no tar data in it: truncated or corrupt)")


def test_a_failure_in_a_late_shard_leaves_nothing(broken, tmp_path):
    wnid = sorted((broken / "wnids.txt").read_text().split())[-1]
    (broken / "train" / wnid / "images" / f"{wnid}_39.JPEG").write_bytes(b"broken")
    code, output = build(broken, tmp_path / "out", "--shard-size", "16")
    assert code == 1 and "not an image" in output
    assert list(tmp_path.iterdir()) == [broken]


@pytest.mark.parametrize("args, flag, wrong", [
    (["shard", "build", "--src", "R", "--out", "FILE"], "--out", "Directory '{}' is a file"),
    (["data", "synth", "--out", "FILE"], "--out", "Directory '{}' is a file"),
    (["data", "fetch", "--out", "FILE"], "--out", "Directory '{}' is a file"),
    (["report", "DIR", "--out", "FILE"], "--out", "Directory '{}' is a file"),
    (["shard", "inspect", "DIR", "--png", "DIR"], "--png", "File '{}' is a directory"),
    (["bench", "loader", "--shards", "DIR", "--remote-only", "--json", "DIR"], "--json", ""),
    (["bench", "train", "--shards", "DIR", "--json", "DIR"], "--json", ""),
], ids=lambda v: "-".join(v[:2]) if isinstance(v, list) else None)
def test_an_output_of_the_wrong_kind_is_one_line(tmp_path, args, flag, wrong):
    """A file given for an output folder, a folder for an output file: click's usage and hint above the
    error line, four lines, where every other mistake is one (train.py's argparse ones too). The bench
    commands' --json in tools/bench_loader.py's words (`bench.check_json`)."""
    (tmp_path / "file").write_bytes(b"")
    paths = {"R": str(tmp_path), "FILE": str(tmp_path / "file"), "DIR": str(tmp_path)}
    result = CliRunner().invoke(main, [paths.get(a, a) for a in args])
    bad = paths[args[args.index(flag) + 1]]
    message = (f"Invalid value for '{flag}': {wrong.format(bad)}." if wrong else
               f"--json {bad}: a folder; name a file in it to write the rows in")
    assert (result.exit_code, result.output) == (2, f"error: {message}\n")


@pytest.mark.parametrize("args", [["shard", "build", "--src", "R", "--out", "FILE/"], ["data", "synth", "--out", "FILE/"],
                                  ["data", "fetch", "--out", "FILE/"], ["report", "R", "--out", "FILE/"]],
                         ids=lambda args: "-".join(args[:2]))
def test_a_file_given_as_an_output_folder_with_a_slash_is_refused_as_without(tmp_path, args):
    """`--out FILE/` was taken by click (stat's ENOTDIR: no such path), and each command failed in its own words,
    exit 1: 'Not a directory: FILE' (synth, build), 'FILE: cannot be made a folder (File exists)' (fetch, report)."""
    (tmp_path / "file").write_bytes(b"")
    paths = {"R": str(tmp_path), "FILE/": f"{tmp_path / 'file'}/"}
    result = CliRunner().invoke(main, [paths.get(a, a) for a in args])
    assert (result.exit_code, result.output) == (
        2, f"error: Invalid value for '--out': Directory '{tmp_path / 'file'}' is a file.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("args", [["data", "synth", "--out", "LONG"], ["data", "fetch", "--out", "LONG"],
                                  ["report", "R", "--out", "LONG"]],
                         ids=lambda args: "-".join(args[:2]))
def test_an_output_name_too_long_for_the_file_system_is_one_line(tmp_path, args):
    """It was OSError's traceback, `[Errno 36] File name too long`, then 'File name too long: PATH' (report:
    'cannot write the report (OSError: [Errno 36] File name too long: PATH)'), naming neither the name nor the
    limit; it names them as shard build's --out and train.py's --output-dir do."""
    long, run = tmp_path / ("a" * 300) / "release", tmp_path / "run"  # run: a training run's folder, for report
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 0, "train_loss": 1, "train_top1": 1, "val_loss": 1, "val_top1": 1}\n')
    result = CliRunner().invoke(main, [{"R": str(run), "LONG": str(long)}.get(a, a) for a in args])
    assert (result.exit_code, result.output) == (2, f"error: --out {long}: the name '{'a' * 24}...{'a' * 8}' is 300 "
                                                    "bytes, more than the 255 a name may have; choose a shorter name\n")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_clicks_usage_errors_are_one_line(tmp_path):
    """Any flag, the top group's own too."""
    for args, message in ((["--bogus"], "No such option '--bogus'."), (["shard", "build"], "Missing option '--src'."),
                          (["shard", "bild"], "No such command 'bild'. Did you mean 'build'?")):
        result = CliRunner().invoke(main, args)
        assert (result.exit_code, result.output) == (2, f"error: {message}\n")


def test_a_group_without_its_command_shows_its_help_not_an_error():
    """Not one of the usage errors made one line: `tinyin` or `tinyin shard` alone asks what there is."""
    for args, first in (([], "Usage: main [OPTIONS] COMMAND [ARGS]..."), (["shard"], "Usage: main shard [OPTIONS] COMMAND [ARGS]...")):
        result = CliRunner().invoke(main, args)
        assert (result.exit_code, result.output.splitlines()[0]) == (2, first)


def test_an_out_name_longer_than_the_file_system_takes_is_named_before_the_release_is_read(release, tmp_path,
                                                                                            monkeypatch):
    """A name over NAME_MAX (255 bytes) in --out, or one so near it that the build's folder beside it
    (`<out>.tmp-<host>-<pid>`) is over: 'cannot create the output folder (File name too long)', naming the whole
    path, and for a name of 250 bytes, which the file system takes, blaming the user's."""
    monkeypatch.setattr(pipeline.build, "open_release", lambda *a: pytest.fail("the release was read"))
    over, near = "o" * 300, "n" * 250
    result = CliRunner().invoke(main, ["shard", "build", "--src", str(release), "--out", str(tmp_path / over / "set")])
    assert (result.exit_code, result.output) == (2, f"error: --out {tmp_path / over / 'set'}: the name "
                                                    f"'{'o' * 24}...{'o' * 8}' is 300 bytes, more than the 255 a name may "
                                                    "have; choose a shorter name\n")
    result = CliRunner().invoke(main, ["shard", "build", "--src", str(release), "--out", str(tmp_path / near)])
    twin = f".tmp-{socket.gethostname()}-{os.getpid()}"
    assert (result.exit_code, result.output) == (2, f"error: --out {tmp_path / near}: the name '{'n' * 24}...{'n' * 8}' "
                                                    f"leaves no room for '{twin}' after it (its temporary twin beside it): "
                                                    f"{250 + len(twin)} bytes, more than the 255 a name may have; choose a "
                                                    "shorter name\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_synth_into_a_folder_with_files_is_one_line(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x").write_text("")
    result = CliRunner().invoke(main, ["data", "synth", "--out", str(tmp_path / "old")])
    assert (result.exit_code, result.output) == (1, f"error: {tmp_path / 'old'}: already exists and is not empty\n")


def test_a_negative_split_seed_is_a_usage_error(release, tmp_path):
    code, output = build(release, tmp_path / "out", "--split-seed", "-1")
    assert (code, output) == (2, "error: Invalid value for '--split-seed': -1 is not in the range x>=0.")
    assert not list(tmp_path.iterdir())
    with pytest.raises(UsageError) as e:  # the Python API too (numpy's ValueError, after the release was read)
        build_shards(release, tmp_path / "out", split_seed=-1, progress=False)
    assert str(e.value) == "--split-seed -1: must be at least 0" and not list(tmp_path.iterdir())



@pytest.mark.parametrize("kwargs, message", [
    (dict(shard_size=0), "--shard-size 0: must be at least 1"),
    (dict(workers=0), "--workers 0: must be at least 1"),
    (dict(workers=-1), "--workers -1: must be at least 1"),
    (dict(classes=0), "--classes 0: must be at least 1"),
    # no integer: each failed in Python's own words ("'<' not supported between instances of 'str' and 'int'")
    (dict(shard_size="64"), "--shard-size '64': must be an integer of at least 1"),
    (dict(shard_size=64.5), "--shard-size 64.5: must be an integer of at least 1"),
    (dict(workers=2.0), "--workers 2.0: must be an integer of at least 1"),
    (dict(classes="3"), "--classes '3': must be an integer of at least 1"),
    (dict(split_seed=True), "--split-seed True: must be an integer of at least 0"),
    # an unset variable's "" was the current folder: src="" built it, out="" was refused naming it
    (dict(src=""), "--src is empty: give the release: a folder, .zip or .tar[.gz]"),
    (dict(out=""), "--out is empty: give the folder to build into"),
])
def test_a_bad_argument_from_python_is_a_usage_error(release, tmp_path, monkeypatch, kwargs, message):
    """The CLI's ranges refuse them (exit 2); the Python API's own checks do, each a UsageError as the CLI's: a
    shard size of 0 was a ShardError (exit 1, '--shard-size must be at least 1, not 0'; range() had refused
    step 0 in a traceback), workers=0 built with every core and workers=-1 failed in the process pool's ValueError."""
    monkeypatch.chdir(release)  # the current folder: a release, that src="" built
    with pytest.raises(UsageError) as e:
        build_shards(**{"src": release, "out": tmp_path / "out", **kwargs}, progress=False)
    assert (type(e.value), str(e.value)) == (UsageError, message) and not list(tmp_path.iterdir())
@pytest.mark.parametrize("content, reason", [
    ("not json", "Expecting value: line 1 column 1 (char 0)"),
    ("[1, 2]", "not a JSON object"),
])
def test_an_out_folder_with_a_broken_manifest_is_refused(release, tmp_path, content, reason):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(content)
    code, output = build(release, out)
    assert (code, output) == (1, f"error: {out / 'manifest.json'}: not a tinyin manifest ({reason}); "
                                 "choose an empty folder")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_out_folder_that_cannot_be_made_fails_before_the_release_is_read(tmp_path):
    (tmp_path / "afile.txt").write_text("a file")
    out = tmp_path / "afile.txt" / "sub"
    code, output = build(tmp_path / "no-release-here", out)  # the release would fail, were it read first
    assert (code, output) == (1, f"error: {out}: cannot create the output folder (Not a directory)")


def test_when_several_shards_have_failed_the_first_is_named(release, tmp_path, monkeypatch):
    """A full disk fails every shard; when the build looks only after all have failed (a loaded machine),
    it names the first in order, not whichever a set yields (CI once named val-000000 here)."""
    def full(path, samples):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    def late_wait(futures, timeout, return_when):
        return concurrent.futures.wait(futures, return_when=concurrent.futures.ALL_COMPLETED)

    monkeypatch.setattr(pipeline.build, "write_shard", full)
    monkeypatch.setattr(pipeline.build, "wait", late_wait)
    code, output = build(release, tmp_path / "out", "--workers", "2", "--shard-size", "40")
    tmp = tmp_path / f"out.tmp-{socket.gethostname()}-{os.getpid()}"
    assert (code, output) == (1, f"error: No space left on device: {tmp / 'train-000000.tar'}")


def test_a_full_disk_is_one_line(release, tmp_path, monkeypatch):
    """An OSError of the environment (here ENOSPC in a worker) is `error: STRERROR: FILE`, exit code 1;
    others keep their traceback."""
    def full(path, samples):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(pipeline.build, "write_shard", full)  # the workers fork from this process
    code, output = build(release, tmp_path / "out", "--workers", "1")
    tmp = tmp_path / f"out.tmp-{socket.gethostname()}-{os.getpid()}"
    assert (code, output) == (1, f"error: No space left on device: {tmp / 'train-000000.tar'}")
    assert [p.name for p in tmp_path.iterdir()] == []

    def broken(path, samples):
        raise OSError(errno.EIO, os.strerror(errno.EIO), path)

    monkeypatch.setattr(pipeline.build, "write_shard", broken)
    result = CliRunner().invoke(main, ["shard", "build", "--src", str(release), "--out", str(tmp_path / "out"),
                                       "--quiet", "--workers", "1"])
    assert result.exit_code == 1 and isinstance(result.exception, OSError) and result.exception.errno == errno.EIO


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux), where every write fails for a full disk")
@pytest.mark.parametrize("name, write", [
    ("train-000000.tar", lambda path: write_shard(path, [])),
    (INDEX_FILE, lambda path: write_index(path.parent, [], [])),
    (MANIFEST_FILE, lambda path: write_json(path, {})),
])
def test_a_full_disk_names_the_file_being_written(tmp_path, name, write):
    """A write that fails on a full disk names no file (OSError(28, 'No space left on device'); pyarrow's
    for the index: 'Error writing bytes to file. Detail: [errno 28] ...'), so a real full disk was
    `error: No space left on device`, with no word of where: each write now names its file."""
    (tmp_path / f"{name}.part").symlink_to("/dev/full")
    with pytest.raises(OSError) as e:
        write(tmp_path / name)
    assert (e.value.errno, e.value.strerror, e.value.filename) == (errno.ENOSPC, "No space left on device",
                                                                   str(tmp_path / name))


def test_an_out_that_is_a_symlink_builds_into_its_target(release, shards, tmp_path):
    """`--out` a symlink to an empty folder (on a bigger disk), or to none yet: the set lands in the target
    and the link stays. (Before: the whole build, then `error: Not a directory`; the temporary folder
    was written beside the link, on the link's disk, and a repair through a link across disks failed
    with an EXDEV traceback.)"""
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "empty").mkdir()
    for link, target in (("link", "disk/empty"), ("dangling", "disk/later")):
        (tmp_path / link).symlink_to(tmp_path / target)
        assert build(release, tmp_path / link, "--shard-size", str(SHARD_SIZE))[0] == 0
        assert (tmp_path / link).is_symlink()
        assert sorted(p.name for p in (tmp_path / target).iterdir()) == sorted(p.name for p in shards.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "disk", "link"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["empty", "later"]


def test_an_out_that_cannot_be_renamed_into_is_refused_before_the_work(release, tmp_path, monkeypatch):
    """`--out .` in an empty folder: the build would replace it (the shell left in a deleted folder); a
    mount point: rename fails. Both refused before the release is read. (Before: the whole build, then a
    FileNotFoundError traceback for `.`, an EBUSY one for a mount point.) `--out .` in the set itself repairs."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert build(tmp_path / "no-release-here", ".") == (
        1, f"error: {here}: the current folder, which the build would replace (it writes beside --out, "
           "then renames); run it from the parent folder with --out here")
    monkeypatch.setattr(os.path, "ismount", lambda path: str(path) == str(here))
    assert build(tmp_path / "no-release-here", here) == (
        1, f"error: {here}: a mount point (the build writes beside --out, then renames); "
           f"build into a folder inside it, e.g. --out {here / 'shards'}")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"] and not list(here.iterdir())
    build_shards(release, here, shard_size=SHARD_SIZE, progress=False)
    (here / "val-000000.tar").unlink()
    monkeypatch.chdir(here)
    assert build(release, ".", "--shard-size", str(SHARD_SIZE))[1].endswith("; repaired val-000000.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_an_out_inside_the_releases_split_folders_is_refused(release, tmp_path):
    """`--out REL/train/shards` built, and the release was broken by it: the next build said 'REL: class folder
    train/shards is not in wnids.txt' (under val/images/: `shard inspect`'s samples.png 'not listed in
    val/val_annotations.txt'), naming the user's release, not the --out that did it."""
    copy = shutil.copytree(release, tmp_path / "release")
    for src, out, split in ((copy, copy / "train" / "shards", "train"), (copy, copy / "val" / "images" / "s", "val"),
                            (tmp_path, copy / "test" / "shards", "test")):  # a folder holding the release
        assert build(src, out) == (2, f"error: --out {out}: inside the release's {split}/ folder ({copy / split}): the "
                                      "shards would become part of the release, which the next build reads; choose a "
                                      "folder outside it")
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_the_source_is_named_however_the_release_is_spelled(release, tmp_path, monkeypatch):
    """`--src .` from inside the release folder, `--src ..` from below it: the manifest names the release
    (`release`), so that a build with the release spelled otherwise repairs that set. (Before: source ""
    or "..", and the repair was refused: `already holds a different build (source:  -> release)`.)"""
    out = tmp_path / "out"
    monkeypatch.chdir(release)
    assert build(".", out, "--shard-size", str(SHARD_SIZE))[0] == 0
    assert json.loads((out / "manifest.json").read_text())["build"]["source"] == "release"
    (out / "val-000000.tar").unlink()
    monkeypatch.chdir(release / "train")
    assert build("..", out, "--shard-size", str(SHARD_SIZE))[1].endswith("; repaired val-000000.tar")
    (out / "val-000000.tar").unlink()
    assert build(release, out, "--shard-size", str(SHARD_SIZE))[1].endswith("; repaired val-000000.tar")


def test_a_folder_that_cannot_be_listed_fails_the_build_naming_it(tmp_path, monkeypatch):
    """A folder of a release folder this user may not list (another user's, mode 700) was skipped by
    os.walk without a word: the build left its images out and said "skipped 0". (As root no mode stops a
    listing: the refusal is os.scandir's.)"""
    root = tmp_path / "release"
    locked = root / "train" / "n01" / "extra"
    locked.mkdir(parents=True)
    (root / "wnids.txt").write_text("n01\n")
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(SourceError) as e:
        open_release(root)
    assert str(e.value) == f"{root}: cannot read folder train/n01/extra/ (PermissionError)"
    with pytest.raises(SourceError) as e:  # --src the folder holding the release: named as given, as elsewhere
        open_release(tmp_path)
    assert str(e.value) == f"{tmp_path}: cannot read folder train/n01/extra/ (PermissionError)"
