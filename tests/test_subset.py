"""`tinyin shard build --classes N`: the first N classes only, each sample as the full build writes it."""
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.build import build_shards
from pipeline.cli import main
from pipeline.index import read_index, read_manifest
from pipeline.release import plan_release
from pipeline.source import open_release
from pipeline.synth import synthesize
from pipeline.verify import verify_shards
from tests.conftest import SHARD_SIZE, SYNTH

N = 3


def members(shards):
    """{key: {member: bytes}} over every shard of a set, read straight from the tars."""
    out = {}
    for path in sorted(Path(shards).glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, member = m.name.split(".", 1)
                out.setdefault(key, {})[member] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def subset(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("subset") / "shards"
    build_shards(release, out, workers=2, shard_size=SHARD_SIZE, progress=False, classes=N)
    return out


def test_counts_classes_labels_and_manifest(release, shards, subset):
    m = read_manifest(subset)
    half = SYNTH["val_per_class"] // 2
    assert m["counts"] == {"train": N * SYNTH["train_per_class"], "val": N * half, "test": N * half, "unlabeled": 0}
    wnids = sorted((release / "wnids.txt").read_text().split())
    assert [c["wnid"] for c in m["classes"]] == wnids[:N]
    assert m["classes"] == read_manifest(shards)["classes"][:N]
    assert m["build"]["classes"] == N and "classes" not in read_manifest(shards)["build"]
    for split, per_class in (("train", SYNTH["train_per_class"]), ("val", half), ("test", half)):
        labels = read_index(subset, split).to_pydict()["label"]
        assert np.bincount(labels).tolist() == [per_class] * N
    assert verify_shards(subset, progress=False) == {"shards": len(m["shards"]), "samples": sum(m["counts"].values())}


def test_samples_are_byte_identical_to_the_full_build(shards, subset):
    full, mine = members(shards), members(subset)
    kept = {k for k, v in full.items() if int(v["cls"]) in range(N)}
    assert set(mine) == kept and len(kept) == N * (SYNTH["train_per_class"] + SYNTH["val_per_class"])
    assert all(mine[k] == full[k] for k in kept)  # arrays, label and json, byte for byte


@pytest.mark.parametrize("n", [N, SYNTH["classes"]])
def test_a_seeded_split_draws_the_same_halves_as_the_full_plan(release, n):
    """Also with every class kept (`--classes` of the release's count: a subset all the same, no unlabeled split)."""
    files = open_release(release)
    full, mine = plan_release(files, split_seed=7), plan_release(files, split_seed=7, classes=n)
    for split in ("train", "val", "test"):
        assert mine.items[split] == [it for it in full.items[split] if it.label < n]
    assert mine.items["unlabeled"] == [] and mine.wnids == full.wnids[:n]


@pytest.mark.parametrize("n, message", [(SYNTH["classes"] + 1, f"the release has {SYNTH['classes']} classes"),
                                        (0, "must be at least 1")])
def test_out_of_range_is_a_one_line_usage_error(release, tmp_path, n, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["shard", "build", "--src", str(release), "--out", str(out),
                                       "--classes", str(n), "--quiet"])
    assert (result.exit_code, result.output) == (2, f"error: --classes {n}: {message}\n")
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("classes, said", [(1, "1 class"), (2, "2 classes")])
def test_out_of_range_names_the_releases_classes_in_the_singular_for_one(tmp_path, classes, said):
    """A release of one class said 'the release has 1 classes'."""
    release = synthesize(tmp_path / "release", classes=classes, train_per_class=1, val_per_class=2, test=1,
                         progress=False)
    result = CliRunner().invoke(main, ["shard", "build", "--src", str(release), "--out", str(tmp_path / "out"),
                                       "--classes", str(classes + 1), "--quiet"])
    assert (result.exit_code, result.output) == (2, f"error: --classes {classes + 1}: the release has {said}\n")


def test_help_explains_it():
    result = CliRunner().invoke(main, ["shard", "build", "--help"])
    assert "--classes N" in result.output and "quick experiments on the CPU" in " ".join(result.output.split())


def test_a_subset_reads_nothing_of_the_classes_it_leaves_out(release, tmp_path):
    """A val image missing from class N (label N, the first one left out) is a problem of the full plan only."""
    copy = shutil.copytree(release, tmp_path / "release")
    outside = sorted((copy / "wnids.txt").read_text().split())[N]
    name = next(line.split("\t")[0] for line in (copy / "val/val_annotations.txt").read_text().splitlines()
                if line.split("\t")[1] == outside)
    (copy / "val/images" / name).unlink()
    assert plan_release(open_release(copy), classes=N).problems == []
    assert [path for path, _ in plan_release(open_release(copy)).problems] == [f"val/images/{name}"]
