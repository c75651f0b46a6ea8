"""train.py end to end on tiny synthetic shards: flags, metrics files, resume, DDP on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from pipeline import build_shards, make_loader
from pipeline.synth import synthesize

ROOT = Path(__file__).resolve().parent.parent


def _shards(root, **synth):
    synthesize(root / "release", progress=False, **synth)
    build_shards(root / "release", root / "shards", workers=1, progress=False)
    return str(root / "shards")


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    """10 classes: 1000 train, 250 val, 250 test images."""
    return _shards(tmp_path_factory.mktemp("synth"), classes=10, train_per_class=100, val_per_class=50, test=10)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """2 classes, 16 train images: enough to push the RGB networks through every code path."""
    return _shards(tmp_path_factory.mktemp("tiny"), classes=2, train_per_class=8, val_per_class=4, test=2)


def run(shards, out, *flags):
    return train.main(train.parse_args(["--shards", shards, "--device", "cpu", "--output-dir", str(out), "-j", "1", *flags]))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# --- flags -------------------------------------------------------------------------------


def test_defaults_and_native_size():
    args = train.parse_args(["--model", "lenet5"])
    assert (args.arch, args.size, args.norm, args.output_dir) == ("lenet5", 28, "dataset", os.path.join("runs", "lenet5-28"))
    assert train.parse_args(["--arch", "alexnet", "--size", "224"]).size == 224


def test_recipe_paper_rows():
    args = train.parse_args(["--arch", "lenet5", "--recipe", "paper"])
    assert (args.epochs, args.batch_size, args.lr, args.momentum, args.wd) == (40, 32, 0.001, 0.9, 0.0)
    assert (args.lr_scheduler, args.norm, args.pretrained) == ("none", "half", False)
    args = train.parse_args(["--arch", "squeezenet1_1", "--size", "224", "--recipe", "paper"])
    assert (args.epochs, args.batch_size, args.pretrained, args.norm) == (10, 100, True, "imagenet")
    args = train.parse_args(["--arch", "resnet18", "--size", "224", "--recipe", "paper-50"])
    assert (args.epochs, args.batch_size, args.pretrained, args.lr) == (50, 100, True, 0.001)
    args = train.parse_args(["--arch", "resnet18", "--recipe", "paper"])
    assert (args.size, args.epochs, args.batch_size, args.pretrained, args.norm) == (64, 40, 50, False, "imagenet")


def test_explicit_flags_beat_the_recipe():
    # --wd 5e-4 equals the parser default: it must still count as given.
    args = train.parse_args(["--arch", "lenet5", "--recipe", "paper", "--epochs", "2", "--lr", "0.1", "--wd", "5e-4", "-b", "8"])
    assert (args.epochs, args.lr, args.wd, args.batch_size, args.momentum) == (2, 0.1, 5e-4, 8, 0.9)
    args = train.parse_args(["--arch", "alexnet", "--size", "224", "--recipe", "paper", "--weights", "w.pth", "--norm", "dataset"])
    assert (args.pretrained, args.weights, args.norm, args.epochs) == (False, "w.pth", "dataset", 10)


@pytest.mark.parametrize("argv, message", [
    (["--arch", "lenet5", "--size", "224"], "argument --size: lenet5 takes 28, not 224"),
    (["--arch", "alexnet", "--size", "28"], "argument --size: alexnet takes 64 or 224, not 28"),
    (["--arch", "lenet5", "--pretrained"], "argument --pretrained: lenet5 has no pretrained ImageNet weights"),
    (["--arch", "resnet18", "--pretrained", "--weights", "w.pth"], "use --pretrained or --weights FILE, not both"),
    (["--arch", "lenet5", "--recipe", "paper-50"],
     "argument --recipe: recipe 'paper-50' has no row for lenet5 at --size 28; it has: alexnet --size 224, "
     "squeezenet1_1 --size 224, resnet18 --size 224"),
])
def test_bad_combinations_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"train.py: error: {message}"


# --- training ----------------------------------------------------------------------------


def test_lenet5_learns_and_writes_its_files(train_shards, tmp_path):
    final = run(train_shards, tmp_path, "--arch", "lenet5", "--recipe", "paper", "--epochs", "3", "--lr", "0.01")
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert list(rows[0]) == train.FIELDS
    assert rows[2]["train_loss"] < rows[0]["train_loss"] and rows[2]["val_loss"] < rows[0]["val_loss"]
    assert rows[2]["val_top1"] > 50  # chance is 10%
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(train.FIELDS) and len(csv_lines) == 4
    args = json.loads((tmp_path / "args.json").read_text())
    assert (args["arch"], args["batch_size"], args["lr"], args["norm"], args["epochs"]) == ("lenet5", 32, 0.01, "half", 3)
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["world_size"] == 1
    on_disk = json.loads((tmp_path / "final.json").read_text())
    assert on_disk == pytest.approx(final)
    assert final["epochs"] == 3 and final["train_top1"] == rows[2]["train_top1"] and final["val_top1"] == rows[2]["val_top1"]
    assert 0 <= final["test_top1"] <= final["test_top5"] <= 100 and final["wall_time_s"] > 0
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and set(ckpt) >= {"model", "optimizer", "lr_scheduler", "args", "rng", "best_acc"}
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["best_acc"] == max(r["val_top1"] for r in rows)

    # --test-only on the final checkpoint reproduces the final test accuracy.
    result = run(train_shards, tmp_path / "eval", "--arch", "lenet5", "--norm", "half", "--test-only",
                 "--resume", str(tmp_path / "checkpoint.pth"))
    assert result["test"]["top1"] == final["test_top1"]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == result


def _same_run(a, b):
    sa, sb = torch.load(a / "checkpoint.pth", weights_only=True), torch.load(b / "checkpoint.pth", weights_only=True)
    assert sa["epoch"] == sb["epoch"]
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    drop_times = lambda rows: [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_time_s")} for r in rows]  # noqa: E731
    assert drop_times(read_jsonl(a / "metrics.jsonl")) == drop_times(read_jsonl(b / "metrics.jsonl"))
    fa, fb = (json.loads((d / "final.json").read_text()) for d in (a, b))
    assert {k: v for k, v in fa.items() if k != "wall_time_s"} == {k: v for k, v in fb.items() if k != "wall_time_s"}


def test_resume_matches_an_uninterrupted_run(train_shards, tmp_path):
    # The default cosine schedule depends on --epochs: extending a 1-epoch run to 2 must still match.
    flags = ["--arch", "lenet5", "-b", "64", "--augment"]
    run(train_shards, tmp_path / "straight", *flags, "--epochs", "2")
    run(train_shards, tmp_path / "resumed", *flags, "--epochs", "1")
    run(train_shards, tmp_path / "resumed", *flags, "--epochs", "2", "--resume", "auto")
    _same_run(tmp_path / "straight", tmp_path / "resumed")


def test_ctrl_c_leaves_a_resumable_checkpoint(tiny_shards, tmp_path, monkeypatch, capsys):
    # squeezenet1_1 has dropout, so this also checks that the RNG state is carried over
    # (at lr 0.01 its last ReLU dies on this data, and dead units ignore dropout).
    flags = ["--arch", "squeezenet1_1", "-b", "4", "--epochs", "2", "--lr", "0.001"]
    run(tiny_shards, tmp_path / "straight", *flags)
    real = train.train_one_epoch

    def interrupted(*a, **kw):
        if a[5] == 1:  # epoch 1: as if Ctrl-C arrived mid-epoch
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    with pytest.raises(SystemExit) as e:
        run(tiny_shards, tmp_path / "resumed", *flags)
    assert e.value.code == 130
    out = tmp_path / "resumed"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted: {out / 'checkpoint.pth'} holds the state after epoch 0; continue with --resume auto --output-dir {out}")
    assert torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["epoch"] == 0
    monkeypatch.setattr(train, "train_one_epoch", real)
    run(tiny_shards, tmp_path / "resumed", *flags, "--resume", "auto")
    _same_run(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.parametrize("arch, size", [("resnet18", 64), ("squeezenet1_1", 224)])
def test_rgb_network_smoke(tiny_shards, tmp_path, arch, size):
    final = run(tiny_shards, tmp_path, "--arch", arch, "--size", str(size), "-b", "8", "--epochs", "1")
    assert final["epochs"] == 1 and final["test_top1"] is not None


def test_ddp_two_processes_on_cpu(train_shards, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
           "--shards", train_shards, "--arch", "lenet5", "--epochs", "1", "-b", "50", "--device", "cpu", "-j", "1",
           "--output-dir", str(out), "--dump-keys"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(cmd, check=True, cwd=tmp_path, env=env, timeout=120, capture_output=True)
    seen = [[line.split()[1] for line in (out / f"keys-rank{r}.txt").read_text().splitlines()] for r in (0, 1)]
    all_keys = [k for _, _, keys in make_loader(train_shards, "train", shuffle=False, batch_size=500, with_keys=True) for k in keys]
    # 1000 images, 2 ranks x 10 steps x 50: nothing is dropped, and no image is seen twice.
    assert len(seen[0]) == len(seen[1]) == 500 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(all_keys)
    assert read_jsonl(out / "metrics.jsonl")[0]["epoch"] == 0 and (out / "final.json").exists()


def test_limit_batches_caps_every_split(train_shards, tmp_path):
    run(train_shards, tmp_path, "--arch", "lenet5", "--epochs", "1", "-b", "16", "--limit-batches", "3", "--dump-keys")
    assert len((tmp_path / "keys-rank0.txt").read_text().splitlines()) == 3 * 16
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["epoch"] == 0
