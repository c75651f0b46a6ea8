"""`tinyin shard verify` and `tinyin shard inspect`."""
import shutil

from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.index import read_manifest


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
    assert code == 1 and output == f"error: {bad}: missing"


def test_verify_rejects_a_folder_that_is_not_a_shard_set(tmp_path):
    code, output = run("shard", "verify", tmp_path)
    assert code == 1
    assert output == f"error: {tmp_path}: not a tinyin shard set (no manifest.json); run `tinyin shard build` first"


def test_inspect_prints_counts_and_draws_a_grid(shards, tmp_path):
    png = tmp_path / "grid.png"
    code, output = run("shard", "inspect", shards, "--png", png, "--per-class", 4)
    assert code == 0, output
    assert "train           240 samples in 4 shards" in output and "6 classes" in output
    img = Image.open(png)
    assert img.size == (260 + 4 * 66, 6 * 66)
