"""`tinyin shard verify` and `tinyin shard inspect`."""
import errno
import json
import os
import shutil
import tarfile

import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.checksum import file_sum64
from pipeline.cli import main
from pipeline.errors import ShardError, UsageError
from pipeline.index import file_sha256, read_index, read_manifest
from pipeline.tarshard import tar_header
from pipeline.verify import inspect_shards, verify_shards
from tests.conftest import copy_with_edited_index, refuse_writes_in
from tests.servers import FaultyHTTPServer


SAMPLE_BYTES = 16896  # every sample's four members, padded (see pipeline.tarshard)


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output.strip()


def test_verify_accepts_a_good_set(shards):
    code, output = run("shard", "verify", shards, "--quiet")
    n = sum(read_manifest(shards)["counts"].values())
    assert code == 0 and output == f"ok: {len(read_manifest(shards)['shards'])} shards, {n:,} samples verified"


def test_verify_names_the_first_bad_shard(shards, tmp_path):
    copy = shutil.copytree(shards, tmp_path / "copy")
    bad = copy / "train-000001.tar"
    data = bytearray(bad.read_bytes())
    data[5000] ^= 0xFF
    bad.write_bytes(bytes(data))
    code, output = run("shard", "verify", copy, "--quiet")
    assert code == 1 and output == f"error: {bad}: checksum differs from the manifest (corrupt or modified)"
    bad.unlink()
    code, output = run("shard", "verify", copy, "--quiet")
    assert code == 1 and output == f"error: {bad}: missing (listed in the manifest)"
    bad.write_bytes(bytes(data[:-512]))
    code, output = run("shard", "verify", copy, "--quiet")
    assert code == 1 and output == (f"error: {bad}: {len(data) - 512:,} bytes, the manifest says {len(data):,} "
                                    "(truncated or replaced)")


def test_verify_names_every_bad_shard_then_counts_them(shards, tmp_path):
    """It named the first alone: a user repairing a set found the next bad shard a run later. Now every one, a
    line each, then their count (exit 1 as before); the manifest's stats go unchecked while a train shard is
    unread (its images would be missing from the mean, not wrong in the manifest)."""
    copy = shutil.copytree(shards, tmp_path / "copy")
    corrupt, gone = copy / "train-000001.tar", copy / "val-000000.tar"
    data = bytearray(corrupt.read_bytes())
    data[5000] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    gone.unlink()
    assert run("shard", "verify", copy, "--quiet") == (1, "\n".join([
        f"error: {corrupt}: checksum differs from the manifest (corrupt or modified)",
        f"error: {gone}: missing (listed in the manifest)",
        f"error: {copy}: 2 problems, each named above"]))
    with pytest.raises(ShardError) as e:
        verify_shards(copy, progress=False)
    assert str(e.value) == (f"{corrupt}: checksum differs from the manifest (corrupt or modified)\n"
                            f"{gone}: missing (listed in the manifest)\n{copy}: 2 problems, each named above")


def _copy_with_rewritten_shard(shards, tmp_path, shard, rewrite):
    """A copy of `shards` where `rewrite(tar_bytes, tarfile)` changed one shard in place and the
    manifest's size and checksums say the new bytes are right: only the per-sample checks can object."""
    copy = shutil.copytree(shards, tmp_path / "copy")
    path = copy / shard
    with tarfile.open(path) as tar:
        data = rewrite(bytearray(path.read_bytes()), tar)
    path.write_bytes(bytes(data))
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["file"] == shard)
    entry.update(bytes=path.stat().st_size, sha256=file_sha256(path), sum64=file_sum64(path))
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy, path


def test_verify_catches_a_sample_whose_label_differs_from_the_index(shards, tmp_path):
    key = read_index(shards, "train").to_pydict()["key"][2]  # the third sample of train-000000.tar

    def relabel(data, tar):
        member = tar.getmember(f"{key}.cls")
        at = member.offset_data
        old = bytes(data[at:at + member.size])
        new = str((int(old) + 1) % 6).encode()  # another of the 6 classes, as many digits
        assert len(new) == len(old)
        data[at:at + member.size] = new
        return data

    copy, path = _copy_with_rewritten_shard(shards, tmp_path, "train-000000.tar", relabel)
    code, output = run("shard", "verify", copy, "--quiet")
    assert (code, output) == (1, f"error: {path}: sample 3 ({key}) disagrees with the index")


def test_verify_catches_a_shard_that_ends_before_its_index_rows(shards, tmp_path):
    """Its last sample cut off (a valid tar, its checksums in the manifest right): the index and the
    manifest's count still list it, and only the count check sees it."""
    count = next(e["count"] for e in read_manifest(shards)["shards"] if e["file"] == "val-000000.tar")
    copy, path = _copy_with_rewritten_shard(shards, tmp_path, "val-000000.tar",
                                            lambda data, tar: data[:-(SAMPLE_BYTES + 1024)] + bytes(1024))
    assert run("shard", "verify", copy, "--quiet") == (
        1, f"error: {path}: holds {count - 1} samples, the manifest says {count}")


def test_verify_catches_a_sample_marked_with_another_split(shards, tmp_path):
    key = read_index(shards, "val").to_pydict()["key"][1]

    def mark_as_test(data, tar):  # the json member rewritten, header and all; it still fits its 512 bytes
        member = tar.getmember(f"{key}.json")
        meta = json.loads(bytes(data[member.offset_data:member.offset_data + member.size]))
        assert meta["split"] == "val"
        new = json.dumps(dict(meta, split="test"), separators=(",", ":")).encode()
        data[member.offset:member.offset + 1024] = tar_header(member.name, len(new)) + new.ljust(512, b"\0")
        return data

    copy, path = _copy_with_rewritten_shard(shards, tmp_path, "val-000000.tar", mark_as_test)
    assert run("shard", "verify", copy, "--quiet") == (1, f"error: {path}: sample {key} is marked split test")


def test_verify_catches_an_index_length_short_of_the_array(shards, tmp_path):
    """The index's lengths are what a reader outside tinyin takes the arrays' extents from: a half
    length passed a check that compared only the first bytes."""
    copy, key = copy_with_edited_index(shards, tmp_path, "rgb64_length", 7, 64 * 64 * 3 // 2)
    assert run("shard", "verify", copy, "--quiet") == (
        1, f"error: {copy / 'train-000000.tar'}: {key}.rgb64.npy is not at its indexed offset")


def test_verify_catches_an_index_offset_that_points_at_another_sample(shards, tmp_path):
    # sample 5 of train-000000.tar now claims sample 6's grey pixels
    sixth = read_index(shards).column("gray28_offset")[5].as_py()
    copy, key = copy_with_edited_index(shards, tmp_path, "gray28_offset", 4, sixth)
    code, output = run("shard", "verify", copy, "--quiet")
    assert (code, output) == (1, f"error: {copy / 'train-000000.tar'}: {key}.gray28.npy is not at its indexed offset")


def test_verify_rejects_a_folder_that_is_not_a_shard_set(tmp_path):
    code, output = run("shard", "verify", tmp_path)
    assert code == 1
    assert output == f"error: {tmp_path}: not a tinyin shard set (no manifest.json); run `tinyin shard build` first"


def test_verify_refuses_a_manifest_that_disagrees_with_the_index(shards, tmp_path):
    # counts are what the loader sizes batches by: an edited count was 'ok' before (ShardSet's checks)
    copy = shutil.copytree(shards, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["counts"]["train"] = 5
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, output = run("shard", "verify", copy, "--quiet")
    assert (code, output) == (1, f"error: {copy / 'manifest.json'}: counts says 5 train samples, its train shards hold 240")


def test_verify_and_inspect_name_a_folder_that_does_not_exist(tmp_path):
    for command in ("verify", "inspect"):
        assert run("shard", command, tmp_path / "nope") == (1, f"error: {tmp_path / 'nope'}: no such folder")


@pytest.mark.parametrize("argv, message", [
    (["verify", ""], "SHARDS is empty: give the shard set's folder or URL"),
    (["inspect", ""], "SHARDS is empty: give the shard set's folder or URL"),
    (["inspect", "{shards}", "--png", ""], "--png is empty: give the file to write the grid in, or leave --png out"),
], ids=["verify", "inspect", "inspect --png"])
def test_verify_and_inspect_refuse_an_empty_path_as_a_usage_error(shards, monkeypatch, argv, message):
    """A job script's "$SHARDS" or --png "$PNG" with the variable unset: --png "" was taken as not given, the grid
    written into the shard set (SHARDS/samples.png), exit 0; an empty SHARDS was refused, but as a failure (exit 1)."""
    def work(*args, **kwargs):
        raise AssertionError("the samples were read")

    monkeypatch.setattr("pipeline.reader.ShardArrays", work)
    assert run("shard", *(a.format(shards=shards) for a in argv)) == (2, f"error: {message}")
    assert not (shards / "samples.png").exists()


def test_inspect_prints_counts_and_draws_a_grid(shards, tmp_path):
    png = tmp_path / "grid.png"
    code, output = run("shard", "inspect", shards, "--png", png, "--per-class", 4)
    assert code == 0, output
    assert "train           240 samples in 4 shards" in output and "6 classes" in output
    assert "\n  val              30 samples in 1 shard\n" in output  # it said '1 shards'
    img = Image.open(png)
    assert img.size == (260 + 4 * 66, 6 * 66)


def test_inspect_sizes_the_grid_by_what_the_classes_hold(shards, tmp_path):
    png = tmp_path / "new" / "folder" / "grid.png"  # its folder is created
    code, output = run("shard", "inspect", shards, "--png", png, "--per-class", 1000)
    assert code == 0, output
    assert Image.open(png).size == (260 + 40 * 66, 6 * 66)  # 40 train images per class, not 1000 columns
    under_a_file = png / "grid.png"  # its folder is a file: was 'cannot write (FileExistsError: [Errno 17] ...)'
    assert run("shard", "inspect", shards, "--png", under_a_file) == (
        1, f"error: {png}: cannot be made a folder (File exists), for grid.png; name another file with --png")


def test_inspect_names_a_png_name_over_name_max_before_the_work(shards, tmp_path, monkeypatch):
    """The save found it, after the work: 'cannot write (OSError: [Errno 36] File name too long: PATH)'."""
    monkeypatch.setattr("pipeline.reader.ShardArrays", lambda *a: pytest.fail("the shards were read"))
    png = tmp_path / ("g" * 300 + ".png")
    assert run("shard", "inspect", shards, "--png", png) == (
        2, f"error: --png {png}: the name '{'g' * 24}...{'g' * 4}.png' is 304 bytes, more than the 255 a name may "
           "have; choose a shorter name")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full, a disk that is always full")
def test_inspect_on_a_full_disk_is_one_line(shards, tmp_path):
    """The folder takes a new file, and the grid's own write then fails (a full disk): one line, as for a
    file it may not write."""
    png = tmp_path / "grid.png"
    png.symlink_to("/dev/full")
    assert run("shard", "inspect", shards, "--png", png, "--per-class", 1) == (
        1, f"error: {png}: cannot write (OSError: [Errno 28] No space left on device)")


def test_inspect_of_a_set_it_may_not_write_in_is_refused_before_the_work(shards, monkeypatch):
    """The default grid, SHARDS/samples.png, in a shared set (another user's, a read-only mount): the save
    failed after the work (10 s on the real set) and the counts were never printed. (The refusal is the
    kernel's to any write-open there, as a read-only mount gives; root, running the tests, may write anywhere.)"""
    def work(*args, **kwargs):
        raise AssertionError("the samples were read")

    refuse_writes_in(monkeypatch, shards, errno.EROFS)
    monkeypatch.setattr("pipeline.reader.ShardArrays", work)
    assert run("shard", "inspect", shards) == (
        1, f"error: {shards}: cannot write in it (Read-only file system), for samples.png; name another file with --png")


def test_inspect_refuses_counts_below_one_and_a_png_without_an_image_extension(shards, tmp_path):
    for flag, value in (("--classes", 0), ("--classes", -1), ("--per-class", -2)):
        code, output = run("shard", "inspect", shards, flag, value, "--png", tmp_path / "g.png")
        assert (code, output) == (2, f"error: Invalid value for '{flag}': {value} is not in the range x>=1.")
    new = tmp_path / "new"  # a refused name makes no folder for it
    assert run("shard", "inspect", shards, "--png", new / "grid") == (
        2, f"error: --png {new / 'grid'}: no extension; use .png")
    assert run("shard", "inspect", shards, "--png", new / "grid.xyz") == (
        2, f"error: --png {new / 'grid.xyz'}: unknown image extension .xyz; use .png")
    for kwargs, message in ((dict(max_classes=0), "max_classes must be at least 1, not 0"),
                            (dict(per_class=-2), "per_class must be at least 1, not -2")):  # from Python too
        with pytest.raises(UsageError) as e:
            inspect_shards(shards, png=tmp_path / "g.png", **kwargs)
        assert str(e.value) == message
    assert not list(tmp_path.iterdir())


def test_a_shard_that_cannot_be_read_is_one_line_naming_it(shards, tmp_path):
    """A symlink loop where a shard should be (a stale NFS handle and a failing disk fail the same
    way) was an OSError traceback from verify and from make_loader."""
    from pipeline.errors import ShardError
    from pipeline.loader import make_loader

    copy = shutil.copytree(shards, tmp_path / "copy")
    bad = copy / "train-000001.tar"
    bad.unlink()
    bad.symlink_to(bad.name)
    message = f"{bad}: unreadable (OSError: [Errno 40] Too many levels of symbolic links: '{bad}')"
    assert run("shard", "verify", copy, "--quiet") == (1, f"error: {message}")
    with pytest.raises(ShardError) as e:
        make_loader(copy, "train")
    assert str(e.value) == message


def test_inspect_prints_the_stats_of_the_variants_only(shards, tmp_path):
    """A key in the manifest's stats that is not a variant (a note a user added) is no reader's: the
    loader ignores it, and inspect printed every key, a TypeError traceback for one not a dict."""
    copy = shutil.copytree(shards, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stats"]["note"] = "computed on train"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, output = run("shard", "inspect", copy, "--png", tmp_path / "grid.png")
    assert code == 0, output
    assert [line for line in output.splitlines() if "mean" in line] == [
        f"  train {name} mean {manifest['stats'][name]['mean']} std {manifest['stats'][name]['std']}"
        for name in ("rgb64", "gray28")]


def test_verify_catches_classes_reordered_in_the_manifest(shards, tmp_path):
    """The manifest's class list names the labels (a model's outputs, a run's dataset identity);
    two classes swapped there was 'ok': each sample's own wnid, in its checksummed shard, disagrees."""
    copy = shutil.copytree(shards, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    classes = manifest["classes"]
    classes[0], classes[1] = classes[1], classes[0]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    index = read_index(shards, "train").to_pydict()
    firsts = sorted(index["label"].index(label) for label in (0, 1))  # each class named once, at its first sample

    def named(first):
        label, key, shard = index["label"][first], index["key"][first], index["shard"][first]
        return (f"error: {copy / 'manifest.json'}: classes[{label}] is {classes[label]['wnid']}, "
                f"its samples are {index['wnid'][first]} ({key} in {shard})")
    assert run("shard", "verify", copy, "--quiet") == (
        1, "\n".join([*map(named, firsts), f"error: {copy}: 2 problems, each named above"]))


def test_verify_catches_stats_edited_in_the_manifest(shards, tmp_path):
    """The loader normalises by the manifest's stats, which no checksum covers: an edited mean was 'ok'.
    verify recomputes them from the train shards, as the build does."""
    copy = shutil.copytree(shards, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    right = manifest["stats"]["gray28"]["std"]
    manifest["stats"]["gray28"]["std"] = [round(right[0] + 2e-6, 6)]  # beyond the rounding of the 6 places
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert run("shard", "verify", copy, "--quiet") == (
        1, f"error: {copy / 'manifest.json'}: stats.gray28.std is {manifest['stats']['gray28']['std']}, "
           f"the train split's is {right}")
    manifest["stats"]["gray28"]["std"] = [round(right[0] + 1e-6, 6)]  # within it: as a build elsewhere may round
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert run("shard", "verify", copy, "--quiet")[0] == 0


def test_verify_reads_a_set_whose_folder_name_has_url_pattern_characters(shards, tmp_path):
    """webdataset took the shard's path for a URL pattern: braces and '::' expanded to other files,
    '?' and '#' cut the name short, and a good set failed as 'unreadable'."""
    manifest = read_manifest(shards)
    ok = f"ok: {len(manifest['shards'])} shards, {sum(manifest['counts'].values()):,} samples verified"
    for name in ("set {a,b}", "set a::b", "set ?x#y"):
        copy = shutil.copytree(shards, tmp_path / name)
        assert run("shard", "verify", copy, "--quiet") == (0, ok), name


def test_verify_and_inspect_refuse_a_remote_set_in_one_line(shards):
    """They read the shards as local files: a URL is named, not taken for a path that does not exist."""
    server = FaultyHTTPServer(shards)
    try:
        for command in (verify_shards, inspect_shards):
            with pytest.raises(ShardError) as caught:
                command(server.url)
            assert str(caught.value) == f"{server.url}: verify and inspect read a local copy of the shard set"
    finally:
        server.close()


def test_verify_catches_an_index_key_that_names_another_sample(shards, tmp_path):
    """A renamed key with the label unchanged: the key, not only the label, must agree."""
    key = read_index(shards, "train").to_pydict()["key"][2]
    copy, _ = copy_with_edited_index(shards, tmp_path, "key", 2, "n00000000_99999")
    assert run("shard", "verify", copy, "--quiet") == (
        1, f"error: {copy / 'train-000000.tar'}: sample 3 ({key}) disagrees with the index")


@pytest.mark.parametrize("column, value", [("wnid", "n00000000"), ("box", [1, 2, 3, 4])])
def test_verify_catches_an_index_wnid_or_box_that_is_not_the_samples(shards, tmp_path, column, value):
    """The index's wnid and box columns (README's index, for a reader of it) were not compared: either edited
    was 'ok'."""
    copy, key = copy_with_edited_index(shards, tmp_path, column, 2, value)
    assert run("shard", "verify", copy, "--quiet") == (
        1, f"error: {copy / 'train-000000.tar'}: sample 3 ({key}) disagrees with the index")


def test_inspect_takes_an_image_extension_in_capitals(shards, tmp_path):
    """(And the grid is as many rows as --max-classes and columns as --per-class: 260 pixels of words, 66 a cell.)"""
    result = inspect_shards(shards, png=tmp_path / "grid.PNG", max_classes=2, per_class=1)
    grid = Image.open(tmp_path / "grid.PNG")
    assert (result["png"], grid.format, grid.size) == (str(tmp_path / "grid.PNG"), "PNG", (260 + 66, 2 * 66))


def test_verify_catches_an_array_whose_npy_header_names_another_shape(shards, tmp_path):
    """(64, 192) for (64, 64, 3): the same bytes, so the offsets hold, but a stock reader gets the wrong array."""
    key = read_index(shards, "train").to_pydict()["key"][1]

    def reshape(data, tar):
        at = tar.getmember(f"{key}.rgb64.npy").offset_data
        end = data.index(b"\n", at) + 1
        header = bytes(data[at:end])
        assert b"(64, 64, 3)" in header
        data[at:end] = header.replace(b"(64, 64, 3), }", b"(64, 192), }  ")
        return data

    copy, path = _copy_with_rewritten_shard(shards, tmp_path, "train-000000.tar", reshape)
    assert run("shard", "verify", copy, "--quiet") == (1, f"error: {path}: {key}.rgb64.npy is not at its indexed offset")
