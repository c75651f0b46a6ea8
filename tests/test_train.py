"""train.py end to end on tiny synthetic shards: flags, errors, metrics files, checkpoints, signals,
mid-epoch and elastic resume, DDP on CPU."""

import argparse
import contextlib
import errno
import itertools
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from pipeline import build_shards, checkpoint, make_loader, provenance, read_index, read_manifest
from pipeline.errors import ShardError, UsageError, run_cli
from pipeline.order import epoch_order, step_seed
from pipeline.synth import synthesize
from tests.conftest import damage_torch_file, refuse_writes_in

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
    """train.py in this process (pytest's), on the CPU."""
    argv = ["--shards", shards, "--device", "cpu", "--output-dir", out, *flags]
    return train.main(train.parse_args([str(a) for a in argv]))


def test_the_logs_durations_are_written_with_a_space_before_their_unit(tiny_shards, tmp_path, capsys):
    """The epoch's line and the test's ended '... 86 img/s 0.4s' and '| wall 1.2s', where train.py's other lines (and
    the rest of the project) write '0.4 s'."""
    run(tiny_shards, tmp_path, "--arch", "lenet5", "-b", "4", "--epochs", "1", "--limit-batches", "1")
    lines = capsys.readouterr().out.splitlines()
    epoch = next(line for line in lines if line.startswith("epoch 0: "))
    test = next(line for line in lines if line.startswith("test top1 "))
    assert re.fullmatch(r"epoch 0: .* \| \d+ img/s \d+\.\d s", epoch), epoch
    assert re.fullmatch(r"test top1 \d+\.\d\d top5 \d+\.\d\d \| wall \d+\.\d s", test), test


@pytest.fixture
def no_shards_read(monkeypatch):
    """train.py's tests of what it does before the data: its shard set opened as one of no shards, where a
    test's --shards folder holds none (a test stops train.py at its `build`, before anything reads one)."""
    monkeypatch.setattr(train, "open_shards", lambda args: argparse.Namespace(manifest={"shards": []}))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """straight(shards, *flags): the folder of an uninterrupted in-process run with those flags, made once in the
    module, the reference of the resume tests that share its flags (read only: they resume into folders of their
    own)."""
    runs = {}

    def made(shards, *flags):
        key = (str(shards), *map(str, flags))
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp("straight")
            run(shards, runs[key], *flags)
        return runs[key]
    return made


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


EVAL_KEYS = {"val", "test", "weights", "eval_model", "tta", "limit_batches"}  # eval.json's, as --test-only returns them


def cli(*argv):
    """train.py as its __main__ runs it, in this process, for a run that must fail: its exit code."""
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: train.main(train.parse_args([str(a) for a in argv])))
    return e.value.code


def script(*argv, **kw):
    """train.py in a subprocess (what a user or a scheduler runs)."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, argv)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120, **kw)


def train_keys(shards):
    return read_index(shards, "train").to_pydict()["key"]  # index order = position in the epoch permutation


# --- flags -------------------------------------------------------------------------------


def test_defaults_and_native_size():
    args = train.parse_args(["--model", "lenet5"])
    assert (args.arch, args.size, args.norm, args.output_dir) == ("lenet5", 28, "dataset", os.path.join("runs", "lenet5-28"))
    assert train.parse_args(["--arch", "alexnet", "--size", "224"]).size == 224


def test_the_norm_defaults_to_imagenets_with_pretrained_weights():
    """ImageNet's weights were trained on inputs normalised with ImageNet's statistics; an explicit --norm wins."""
    assert train.parse_args(["--arch", "resnet18", "--pretrained"]).norm == "imagenet"
    assert train.parse_args(["--arch", "resnet18", "--pretrained", "--norm", "dataset"]).norm == "dataset"


def test_recipe_paper_rows():
    args = train.parse_args(["--arch", "lenet5", "--recipe", "paper"])
    assert (args.epochs, args.batch_size, args.lr, args.momentum, args.wd) == (40, 32, 0.001, 0.9, 0.0)
    assert (args.lr_scheduler, args.norm, args.pretrained) == ("none", "half", False)
    args = train.parse_args(["--arch", "squeezenet1_1", "--size", "224", "--recipe", "paper"])
    assert (args.epochs, args.batch_size, args.pretrained, args.norm) == (10, 100, True, "imagenet")
    args = train.parse_args(["--arch", "resnet18", "--size", "224", "--recipe", "paper-50"])
    assert (args.epochs, args.batch_size, args.pretrained, args.lr) == (50, 100, True, 0.001)
    # the study's recipe at 224 from scratch: --no-pretrained wins over the recipe (there was no way to say it)
    args = train.parse_args(["--arch", "resnet18", "--size", "224", "--recipe", "paper", "--no-pretrained"])
    assert (args.epochs, args.batch_size, args.pretrained, args.norm) == (10, 100, False, "imagenet")
    args = train.parse_args(["--arch", "resnet18", "--recipe", "paper"])
    assert (args.size, args.epochs, args.batch_size, args.pretrained, args.norm) == (64, 40, 50, False, "imagenet")
    for arch in ("alexnet", "squeezenet1_1"):  # Table 2's other 64x64 rows: batch 50 too (STUDY.md)
        args = train.parse_args(["--arch", arch, "--size", "64", "--recipe", "paper"])
        assert (args.epochs, args.batch_size, args.pretrained, args.norm) == (40, 50, False, "imagenet")


@pytest.mark.parametrize("world_size, extra, note", [
    (2, [], "note: --recipe paper sets -b 32 per process: 2 processes train on 64 images a step, not the recipe's 32\n"),
    (2, ["-b", "16"], ""),  # the user's own -b: 16 x 2 is the study's 32
    (1, [], ""),
    (2, ["--test-only", "--weights", "w.pth"], ""),  # an evaluation steps on no batch
])
def test_a_recipes_batch_under_torchrun_is_said_to_be_per_process(monkeypatch, no_shards_read, capsys, tmp_path,
                                                                  world_size, extra, note):
    """torchrun with --recipe paper stepped on world_size x the study's batch without a word; only `tinyin
    report`, after the run, called it not comparable."""
    class Built(Exception):
        pass

    def build(*_):
        raise Built
    monkeypatch.setattr(train, "distributed", lambda args: contextlib.nullcontext((torch.device("cpu"), world_size)))
    monkeypatch.setattr(train, "build", build)
    with pytest.raises(Built):
        train.main(train.parse_args(["--arch", "lenet5", "--recipe", "paper", "--device", "cpu", "--shards", str(tmp_path),
                                     "--output-dir", str(tmp_path), *extra]))  # a folder there: build() is not run
    assert capsys.readouterr().err == note


def test_a_resume_under_torchrun_says_no_recipe_batch_for_the_runs_own(monkeypatch, no_shards_read, capsys, tmp_path):
    """A 2-rank --recipe paper run of -b 16 resumed without -b goes on at its 16 (its loaders are built so), and
    the recipe's note, which named -b 32, is not said."""
    built = []

    def build(args, *_):
        built.append(args.batch_size)
        raise RuntimeError("built")
    monkeypatch.setattr(train, "distributed", lambda args: contextlib.nullcontext((torch.device("cpu"), 2)))
    monkeypatch.setattr(train, "build", build)
    torch.save(dict(args=dict(batch_size=16, recipe="paper")), tmp_path / "checkpoint.pth")
    with pytest.raises(RuntimeError, match="built"):
        train.main(train.parse_args(["--arch", "lenet5", "--recipe", "paper", "--device", "cpu", "--shards",
                                     str(tmp_path), "--output-dir", str(tmp_path), "--resume", "auto"]))
    assert (built, capsys.readouterr().err) == ([16], "")


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
    (["-b", "0"], "argument -b/--batch-size: must be at least 1, not 0"),
    (["--lr", "-1"], "argument --lr: must be positive, not -1"),
    (["--lr", "0"], "argument --lr: must be positive, not 0"),  # a run that never moves its weights
    (["--lr", "nan"], "argument --lr: must be positive, not nan"),
    (["--lr", "inf"], "argument --lr: must be positive, not inf"),
    (["--momentum", "nan"], "argument --momentum: must be at least 0, not nan"),
    (["--lr", "fast"], "argument --lr: not a number: 'fast'"),
    # as typed, not as Python's floats: it said 'at least 0.0', '--label-smoothing 1: ... not 1.0'
    (["--label-smoothing", "1.5"], "argument --label-smoothing: must be below 1, not 1.5"),
    (["--time-budget", "0"], "argument --time-budget: must be at least 0.01, not 0"),
    (["--epochs", "1.5"], "argument --epochs: not a whole number: '1.5'"),  # it said 'not a number'
    (["-b", "x"], "argument -b/--batch-size: not a whole number: 'x'"),
    (["--epochs", "0"], "argument --epochs: must be at least 1, not 0"),
    (["--checkpoint-every", "0"], "argument --checkpoint-every: must be at least 1, not 0"),
    # torch's seeds are 64-bit: a longer one was a traceback once the run built its model
    (["--seed", str(2**64)], f"argument --seed: must be below 2**63, not {2**64}"),
    (["--limit-batches", "0"], "argument --limit-batches: must be at least 1, not 0"),
    (["--momentum", "-0.5"], "argument --momentum: must be at least 0, not -0.5"),
    (["--label-smoothing", "1"], "argument --label-smoothing: must be below 1, not 1"),
    (["-j", "-1"], "argument -j/--workers: must be at least 0, not -1"),
    (["-j", "2"], "argument -j/--workers: only --data-path stream uses loader workers; "
                  "--data-path auto reads the shards in the training process"),
    (["-j", "0", "--data-path", "fast"], "argument -j/--workers: only --data-path stream uses loader workers; "
                                         "--data-path fast reads the shards in the training process"),
    (["--momentum", "inf"], "argument --momentum: must be at least 0, not inf"),
    (["--wd", "inf"], "argument --wd/--weight-decay: must be at least 0, not inf"),
    (["--device", "foo"], "argument --device: 'foo' is not a device; use cpu, cuda or cuda:N"),
    (["--device", "mps"], "argument --device: tinyin runs on cpu or cuda, not mps"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    # An empty value (an unset shell variable) read as not given: a fresh run over the one to resume.
    (["--resume", ""], "argument --resume: empty; give a path"),
    (["--weights", ""], "argument --weights: empty; give a path"),
    (["--output-dir", ""], "argument --output-dir: empty; give a path"),
    (["--shards", ""], "argument --shards: empty; give a path"),
])
def test_bad_flags_are_one_line_errors_with_exit_code_2(argv, message, capsys):
    assert cli(*argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_user_mistakes_are_one_line_errors_with_exit_code_1(train_shards, tiny_shards, tmp_path, capsys):
    def error(*argv):
        code = cli("--device", "cpu", "--epochs", "1", "--output-dir", tmp_path / "out", *argv)
        return code, capsys.readouterr().err

    assert error("--shards", tmp_path / "nonexistent") == (1, f"error: --shards {tmp_path / 'nonexistent'}: no such folder\n")
    (tmp_path / "killed.tmp-vm-4242").mkdir()  # what a build killed outright left (see test_shardset)
    assert error("--shards", tmp_path / "killed") == (
        1, f"error: --shards {tmp_path / 'killed'}: no such folder; beside it, killed.tmp-vm-4242 is a build into it "
           "that has not finished (still running, or killed): building into it again removes a killed one's\n")
    assert error("--shards", tmp_path) == (
        1, f"error: {tmp_path}: not a tinyin shard set (no manifest.json); run `tinyin shard build` first\n")

    lenet = tmp_path / "lenet"
    run(train_shards, lenet, "--arch", "lenet5", "--epochs", "1", "--limit-batches", "1")
    ckpt = lenet / "checkpoint.pth"
    assert error("--shards", tiny_shards, "--arch", "resnet18", "--weights", ckpt, "--output-dir", tmp_path / "w") == (
        1, f"error: --weights {ckpt}: holds lenet5 weights (a train.py checkpoint), not resnet18\n")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    assert error("--shards", train_shards, "--arch", "lenet5", "--weights", tmp_path / "other.pth") == (
        1, f"error: --weights {tmp_path / 'other.pth'}: does not fit lenet5 (other tensor names or shapes)\n")
    assert error("--shards", train_shards, "--arch", "lenet5", "--weights", tmp_path / "none.pth") == (
        1, f"error: --weights {tmp_path / 'none.pth'}: no such file\n")

    # A checkpoint of another run: another seed, or another dataset (the tiny set has 2 classes).
    assert error("--shards", train_shards, "--arch", "lenet5", "--output-dir", lenet, "--resume", "auto", "--seed", "7") == (
        1, f"error: {ckpt}: a checkpoint of another run (seed 0 there, 7 here); "
           "pass the flags it was made with, or another --output-dir\n")
    there, here = (checkpoint.run_identity(train.parse_args(["--arch", "lenet5"]), read_manifest(s))["dataset"]
                   for s in (train_shards, tiny_shards))
    assert (there[:10], here[:9]) == ("10 classes", "2 classes")
    # Said before the run's -b (128, kept where the command gives none) meets the tiny set's 16 images: under
    # --compile (drop_last) it said '-b 128: no whole batch to train on', a flag never given.
    for compile_ in ((), ("--compile",)):
        assert error("--shards", tiny_shards, "--arch", "lenet5", "--resume", ckpt, *compile_) == (
            1, f"error: {ckpt}: a checkpoint of another run (dataset {there} there, {here} here); "
               "pass the flags it was made with, or another --output-dir\n")
    # One byte flipped in a tensor (a bad copy, a failing disk): torch.load reads it without a word, and the
    # run went on from, or evaluated, weights that were never trained.
    member = damage_torch_file(tmp_path / "damaged.pth", ckpt)
    damaged = f"damaged: its {member} fails its CRC-32 check (a bad copy, or a failing disk)"
    assert error("--shards", train_shards, "--arch", "lenet5", "--resume", tmp_path / "damaged.pth") == (
        1, f"error: {tmp_path / 'damaged.pth'}: {damaged}\n")
    for test_only in ((), ("--test-only",)):
        assert error("--shards", train_shards, "--arch", "lenet5", "--weights", tmp_path / "damaged.pth", *test_only) == (
            1, f"error: --weights {tmp_path / 'damaged.pth'}: {damaged}\n")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert error("--shards", train_shards, "--arch", "lenet5", "--resume", tmp_path / "junk.pth") == (
        1, f"error: {tmp_path / 'junk.pth'}: not a train.py checkpoint (UnpicklingError)\n")
    assert error("--shards", train_shards, "--arch", "lenet5", "--resume", tmp_path / "none.pth") == (
        1, f"error: --resume {tmp_path / 'none.pth'}: no such file\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without CUDA")
def test_device_cuda_without_a_gpu_is_a_usage_error(capsys):
    assert cli("--device", "cuda") == 2
    assert capsys.readouterr().err == (
        f"error: argument --device: cuda, but torch {torch.__version__} sees no CUDA device here\n")


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_a_gpu_named_by_its_index_under_torchrun_is_a_usage_error(device, capsys, monkeypatch):
    """Under torchrun each rank takes the GPU of its LOCAL_RANK with --device cuda; --device cuda:N put every rank
    on GPU N, their gradients all-reduced through gloo, without a word."""
    for name, value in dict(TORCHRUN_ENV, WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    assert cli("--device", device) == 2
    assert capsys.readouterr().err == (
        f"error: argument --device: {device} under torchrun, where each process takes the GPU of its LOCAL_RANK; "
        "give --device cuda\n")


#: what torchrun gives rank 0 of its workers beside WORLD_SIZE (train.py joins nothing in these tests: `no_join`)
TORCHRUN_ENV = dict(RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")


@pytest.fixture
def no_join(monkeypatch):
    """torch.distributed's join of the other ranks fails the test: a run refused before it."""
    def join(*args, **kwargs):
        raise AssertionError("joined the process group")
    monkeypatch.setattr(train.dist, "init_process_group", join)


@pytest.mark.parametrize("env, line", [
    (dict(WORLD_SIZE="2"), "WORLD_SIZE=2 in the environment but not RANK, MASTER_ADDR, MASTER_PORT"),
    (dict(WORLD_SIZE="2", RANK="1", MASTER_ADDR="node0"), "WORLD_SIZE=2 in the environment but not MASTER_PORT"),
    (dict(TORCHRUN_ENV, WORLD_SIZE="2", RANK="2"), "RANK=2 in the environment: must be a whole number from 0 to 1"),
    (dict(WORLD_SIZE="0"), "WORLD_SIZE=0 in the environment: must be a whole number of at least 1"),
    (dict(WORLD_SIZE="two"), "WORLD_SIZE=two in the environment: must be a whole number of at least 1"),
], ids=["no-rank", "no-port", "rank-past-the-last", "no-processes", "not-a-number"])
def test_a_launch_environment_no_run_can_start_in_is_one_line(tiny_shards, tmp_path, monkeypatch, capsys, no_join,
                                                              env, line):
    """A job script that sets torchrun's variables itself (Slurm's srun, RANK from SLURM_PROCID) and gets one wrong:
    torch's ValueError for a RANK or MASTER_PORT missing (a traceback), a join that waited 30 minutes for a rank 0
    that never came (a RANK past the last), a ZeroDivisionError in the loader (WORLD_SIZE 0), int()'s ValueError."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli("--shards", tiny_shards, "--device", "cpu", "--arch", "lenet5", "--output-dir", tmp_path / "run") == 1
    rendezvous = " (the processes join each other by RANK, MASTER_ADDR, MASTER_PORT): start train.py with torchrun, " \
                 "which sets them, or set them all"
    assert capsys.readouterr().err == f"error: {line}{rendezvous if 'but not' in line else ''}\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("local_rank, line", [
    ("4", "LOCAL_RANK=4: this node has 4 CUDA devices, one per process; start at most 4 processes on it "
          "(torchrun --nproc_per_node 4)"),
    (None, "--device cuda on several processes, but no LOCAL_RANK in the environment: each process takes the GPU "
           "of its LOCAL_RANK; start train.py with torchrun, which sets it, or set it"),
])
def test_a_process_without_a_gpu_of_its_own_is_one_line(monkeypatch, no_join, local_rank, line):
    """`torchrun --nproc_per_node 8` on a node of 4 GPUs: torch's 'invalid device ordinal', a traceback, on the ranks
    past the GPUs; a job script in torchrun's place that set no LOCAL_RANK: a KeyError."""
    for name, value in dict(TORCHRUN_ENV, WORLD_SIZE="8", RANK="4", LOCAL_RANK=local_rank).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)

    def set_device(index):
        raise AssertionError(f"took cuda:{index}")
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with pytest.raises(train.TinyinError) as e, train.distributed(argparse.Namespace(device="cuda")):
        pass
    assert str(e.value) == line


def test_a_checkpoint_or_weights_file_it_may_not_read_is_not_called_no_checkpoint(train_shards, tmp_path, capsys,
                                                                                  monkeypatch):
    """Another user's run folder (checkpoint.pth mode 600): '--resume' said 'not a train.py checkpoint
    (PermissionError)' and '--weights' 'not a weights file (PermissionError)', words against a good file
    that invite deleting it. (As root the refusal is the open's: root may read any file.)"""
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT}, ckpt)
    real_open = open

    def refused(path, *args, **kwargs):
        if os.fspath(path) == str(ckpt):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refused)
    for flag, named in (("--resume", ""), ("--weights", "--weights ")):
        assert cli("--device", "cpu", "--arch", "lenet5", "--shards", train_shards, "--output-dir", tmp_path / "out",
                   flag, ckpt) == 1
        assert capsys.readouterr().err == f"error: {named}{ckpt}: cannot read (Permission denied)\n"


def test_files_that_are_not_what_a_flag_needs_are_one_line_errors(train_shards, tmp_path, capsys):
    """Each of these was a traceback: torch.load raises KeyError, IndexError or AttributeError on
    some short files, IsADirectoryError on a folder; makedirs on a file."""
    def error(*argv):
        code = cli("--device", "cpu", "--epochs", "1", "--arch", "lenet5", "--shards", train_shards, *argv)
        return code, capsys.readouterr().err

    out = tmp_path / "out"
    (tmp_path / "hello.pth").write_text("hello\n")  # KeyError inside torch.load
    (tmp_path / "gateway.pth").write_text("bad gateway\n")  # IndexError inside torch.load
    torch.save([1, 2], tmp_path / "list.pth")  # loads, but is no state dict
    assert error("--output-dir", out, "--resume", tmp_path / "hello.pth") == (
        1, f"error: {tmp_path / 'hello.pth'}: not a train.py checkpoint (KeyError)\n")
    assert error("--output-dir", out, "--weights", tmp_path / "gateway.pth") == (
        1, f"error: --weights {tmp_path / 'gateway.pth'}: not a weights file (IndexError)\n")
    assert error("--output-dir", out, "--weights", tmp_path / "list.pth") == (
        1, f"error: --weights {tmp_path / 'list.pth'}: does not fit lenet5 (other tensor names or shapes)\n")
    assert error("--output-dir", out, "--weights", tmp_path) == (1, f"error: --weights {tmp_path}: a folder, not a weights file\n")
    assert error("--output-dir", out, "--resume", tmp_path) == (
        1, f"error: --resume {tmp_path}: a folder; pass {tmp_path / 'checkpoint.pth'}, or --resume auto with --output-dir {tmp_path}\n")
    assert error("--output-dir", tmp_path / "hello.pth") == (
        1, f"error: --output-dir {tmp_path / 'hello.pth'}: cannot be made a folder (File exists)\n")
    assert error("--output-dir", tmp_path / "hello.pth" / "run") == (
        1, f"error: --output-dir {tmp_path / 'hello.pth' / 'run'}: cannot be made a folder (Not a directory)\n")
    assert error("--output-dir", out, "--shards", tmp_path / "hello.pth") == (
        1, f"error: --shards {tmp_path / 'hello.pth'}: a file, not a shard folder\n")
    assert not out.exists()


def test_an_output_dir_that_takes_no_file_is_one_line_naming_it(tiny_shards, tmp_path, capsys, monkeypatch):
    """Another user's folder, a read-only mount: --output-dir was made (it was there) and the run went on to
    its lock file's open, which named the lock file; it is asked as the tools ask their --out
    (`atomic.folder_refusal`). (The refusal is the kernel's to any write-open there; root may write anywhere.)"""
    out = tmp_path / "shared"
    out.mkdir()
    refuse_writes_in(monkeypatch, out, errno.EROFS)
    assert cli("--shards", tiny_shards, "--device", "cpu", "--arch", "lenet5", "--epochs", "1", "--output-dir", out) == 1
    assert capsys.readouterr().err == f"error: --output-dir {out}: cannot write in it (Read-only file system)\n"
    assert list(out.iterdir()) == []


def test_a_resume_in_an_output_dir_that_takes_no_file_is_one_line_naming_it(tiny_shards, tmp_path, capsys, monkeypatch):
    """A run's folder gone read-only (a mount) or another user's: a resume there said 'error: Read-only file system:
    .../.train.lock', the lock file's open, where a new run is told '--output-dir X: cannot write in it (...)'."""
    out = tmp_path / "shared"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"a preempted run's")
    (out / ".train.lock").write_bytes(b"")
    refuse_writes_in(monkeypatch, out, errno.EROFS)
    assert cli("--shards", tiny_shards, "--device", "cpu", "--arch", "lenet5", "--output-dir", out, "--resume", "auto") == 1
    assert capsys.readouterr().err == f"error: --output-dir {out}: cannot write in it (Read-only file system)\n"
    assert sorted(p.name for p in out.iterdir()) == [".train.lock", "checkpoint.pth"]


def test_an_output_dir_name_longer_than_the_file_system_takes_is_named_at_once(tiny_shards, tmp_path, capsys,
                                                                               monkeypatch):
    """A name over NAME_MAX (255 bytes) in --output-dir: the data was loaded and the network built, then its
    makedirs said '--output-dir PATH: cannot be made a folder (File name too long)', naming no name."""
    monkeypatch.setattr(train, "build", lambda *a: pytest.fail("the data was loaded"))
    out = tmp_path / ("r" * 300) / "run"
    assert cli("--shards", tiny_shards, "--device", "cpu", "--arch", "lenet5", "--output-dir", out) == 2
    assert capsys.readouterr().err == (f"error: --output-dir {out}: the name '{'r' * 24}...{'r' * 8}' is 300 bytes, "
                                       "more than the 255 a name may have; choose a shorter name\n")


def test_test_only_needs_a_trained_network(train_shards, tmp_path, capsys):
    """It used to evaluate freshly initialised weights (chance level) and write eval.json, exit 0."""
    base = ["--device", "cpu", "--arch", "lenet5", "--shards", train_shards, "--output-dir", tmp_path, "--test-only"]
    assert cli(*base) == 2
    assert capsys.readouterr().err == (
        "error: --test-only evaluates a trained network: give --resume (a checkpoint, or auto) or --weights FILE\n")
    assert cli(*base, "--resume", "auto") == 2
    assert capsys.readouterr().err == (
        f"error: --test-only evaluates a trained network: give --resume (a checkpoint, or auto) (no checkpoint.pth in "
        f"{tmp_path}) or --weights FILE\n")
    assert list(tmp_path.iterdir()) == []


def test_test_only_refuses_a_fresh_head(train_shards, tmp_path, capsys):
    """--pretrained, or --weights of another class count (the ImageNet file, a run on other shards), replace the
    head with a freshly initialised one: --test-only evaluated that (chance level) and wrote eval.json, exit 0."""
    out = tmp_path / "out"
    base = ["--device", "cpu", "--shards", train_shards, "--output-dir", out, "--test-only"]
    assert cli(*base, "--arch", "squeezenet1_1", "--pretrained") == 2
    assert capsys.readouterr().err == ("error: --test-only evaluates a trained network: --pretrained gives ImageNet's "
                                       "weights a fresh head (chance level); train from them first\n")
    torch.save(train.models.get_model("lenet5", num_classes=1000).state_dict(), tmp_path / "imagenet.pth")
    assert cli(*base, "--arch", "lenet5", "--weights", tmp_path / "imagenet.pth") == 1
    assert capsys.readouterr().err == (
        f"error: --weights {tmp_path / 'imagenet.pth'}: its head is not for these shards' 10 classes, and --test-only "
        "would evaluate a fresh one (chance level); train from it first\n")
    assert not out.exists()
    # The training command with --test-only added evaluates its checkpoint: the file's head does not matter there.
    run(train_shards, out, "--arch", "lenet5", "--weights", tmp_path / "imagenet.pth", "--epochs", "1", "--limit-batches", "1")
    assert run(train_shards, out, "--arch", "lenet5", "--weights", tmp_path / "imagenet.pth", "--test-only",
               "--resume", "auto", "--limit-batches", "1")["val"]["top1"] >= 0


def test_test_only_without_a_checkpoint_says_so_where_it_did_not_type_pretrained(tmp_path, capsys):
    """--recipe paper's 224 rows set --pretrained: their command with --test-only added (--resume auto, in a folder
    without the run's checkpoint; or no --resume) was told '--pretrained gives ImageNet's weights a fresh head', a
    flag never typed, and so was a typed --pretrained whose --resume auto found no checkpoint."""
    base = ["--device", "cpu", "--shards", tmp_path, "--output-dir", tmp_path, "--arch", "resnet18", "--size", "224",
            "--test-only"]
    give = "error: --test-only evaluates a trained network: give --resume (a checkpoint, or auto)"
    for extra, where in (([], ""), (["--resume", "auto"], f" (no checkpoint.pth in {tmp_path})")):
        for start in (["--recipe", "paper"], ["--pretrained"] if extra else ["--recipe", "paper", "--no-pretrained"]):
            assert cli(*base, *start, *extra) == 2
            assert capsys.readouterr().err == f"{give}{where} or --weights FILE\n", (start, extra)


def test_test_only_refuses_a_checkpoint_of_other_classes(train_shards, tmp_path, capsys):
    """A run on another 10 classes has a head that fits: --test-only scored its outputs against these labels
    (val top-1 0-10%) and exited 0. A train.py checkpoint records its classes; a plain state dict does not."""
    other = _shards(tmp_path / "other", classes=10, train_per_class=2, val_per_class=2, test=1, seed=1)
    run(other, tmp_path / "run", "--arch", "lenet5", "--epochs", "1", "--limit-batches", "1")
    base = ["--device", "cpu", "--arch", "lenet5", "--shards", train_shards, "--output-dir", tmp_path / "eval",
            "--test-only", "--limit-batches", "1"]
    assert cli(*base, "--weights", tmp_path / "run" / "best.pth") == 1
    there, here = (checkpoint.classes_of(read_manifest(s)) for s in (other, train_shards))
    assert there != here and capsys.readouterr().err == (
        f"error: --weights {tmp_path / 'run' / 'best.pth'}: trained on {there}, not these shards' {here}, and "
        "--test-only would score its outputs against other labels; give the shards it was trained on\n")
    assert run(other, tmp_path / "eval", "--arch", "lenet5", "--test-only", "--limit-batches", "1",
               "--weights", tmp_path / "run" / "best.pth")["val"]["top1"] >= 0  # its own classes


def test_test_only_refuses_a_checkpoint_of_another_size(tiny_shards, tmp_path, capsys):
    """A 224 run's best.pth evaluated with --weights and no --size was scored at 64 px without a word (a squeezenet1_1
    checkpoint's test loss 1.379 against its final.json's 1.363), where --resume refuses another --size."""
    flags = ["--arch", "squeezenet1_1", "--norm", "imagenet", "--size", "224"]
    identity = checkpoint.run_identity(train.parse_args(flags), read_manifest(tiny_shards))
    torch.save({"model": train.models.get_model("squeezenet1_1", num_classes=2).state_dict(), "identity": identity,
                "args": dict(vars(train.parse_args(flags)), argv=flags)}, tmp_path / "best.pth")
    base = ["--device", "cpu", "--shards", tiny_shards, "--output-dir", tmp_path / "eval", "--test-only", "-b", "2",
            "--limit-batches", "1", "--weights", tmp_path / "best.pth", *flags[:-2]]
    assert cli(*base) == 1
    assert capsys.readouterr().err == (
        f"error: --weights {tmp_path / 'best.pth'}: trained at --size 224, this run has --size 64, and --test-only "
        "would score it on inputs of another size; give --size 224\n")
    assert not (tmp_path / "eval").exists()
    model = train.build_model(train.parse_args([str(a) for a in (*base, "--size", "224")]), read_manifest(tiny_shards))
    assert model.classifier[1].out_channels == 2  # the file's network, evaluated at its own size


def test_no_whole_batch_per_rank_is_a_usage_error(train_shards, tmp_path, capsys):
    """drop_last under --compile (and DDP) with a batch above the split: a ZeroDivisionError at the
    epoch's end, after an empty epoch, before."""
    assert cli("--device", "cpu", "--arch", "lenet5", "--shards", train_shards, "--output-dir", tmp_path,
               "--compile", "-b", "1001") == 2
    assert capsys.readouterr().err == (
        "error: -b 1001: no whole batch to train on: each rank holds about 1000 train images, and under --compile an "
        "epoch's last, partial batch is left out; use a smaller --batch-size\n")


@pytest.mark.parametrize("batch, world_size, message", [
    (32, 6, "6 ranks: the val split holds 4 images, too few for a batch on every rank (DDP would wait on a rank "
            "without one for good); run on at most 4 ranks"),
    (1, 3, "-b 1 on 3 ranks: the val split's 4 images leave some ranks a batch fewer than the others (DDP would wait "
           "on them for good); use -b 2 or more"),
])
def test_ranks_that_cannot_take_as_many_eval_batches_are_a_usage_error(tiny_shards, tmp_path, batch, world_size,
                                                                       message):
    """The val and test loaders read every image (no drop_last): with more ranks than images the loader refuses
    (a rank would have no batch, and DDP wait on it), in its own words, a ValueError traceback out of train.py."""
    counts = read_manifest(tiny_shards)["counts"]
    assert (counts["val"], counts["test"]) == (4, 4)
    args = train.parse_args(["--device", "cpu", "--arch", "lenet5", "--shards", tiny_shards, "--output-dir",
                             str(tmp_path), "-b", str(batch)])
    with pytest.raises(UsageError) as e:  # before the model is built (DDP needs the process group)
        train.build(args, torch.device("cpu"), world_size)
    assert str(e.value) == message


def test_a_missing_shards_folder_is_said_before_a_checkpoint_it_would_replace(tmp_path, monkeypatch, capsys):
    """`train.py --shards nope` (a typo) where the default --arch's runs/resnet18-64 holds a checkpoint.pth said
    the checkpoint's error (continue it with --resume auto, or --overwrite), whose advice met the missing folder next."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "resnet18-64").mkdir(parents=True)
    (tmp_path / "runs" / "resnet18-64" / "checkpoint.pth").write_bytes(b"")
    assert cli("--shards", "nope", "--device", "cpu") == 1
    assert capsys.readouterr().err == "error: --shards nope: no such folder\n"


def test_without_shards_the_default_is_said_with_how_to_make_a_set_there(tmp_path, monkeypatch, capsys):
    """`train.py` without --shards read out/shards, where README's commands build data/shards: its commands run
    without the flag were told 'error: --shards out/shards: no such folder', of a folder they never named. The
    default is README's folder now, and a missing one is said to be the default, with how to make a set there;
    a build's leftover beside it is still named."""
    monkeypatch.chdir(tmp_path)
    assert cli("--device", "cpu") == 1
    assert capsys.readouterr().err == (
        "error: --shards data/shards (the default): no shard set there; build one with "
        "`tinyin shard build --src RELEASE --out data/shards`, or pass --shards\n")
    (tmp_path / "data" / "shards.tmp-vm-4242").mkdir(parents=True)
    assert cli("--device", "cpu") == 1
    assert capsys.readouterr().err == (
        "error: --shards data/shards (the default): no such folder; beside it, shards.tmp-vm-4242 is a build into it "
        "that has not finished (still running, or killed): building into it again removes a killed one's\n")


def test_the_script_prints_one_line_and_no_traceback(tmp_path):
    result = script("--shards", tmp_path / "nonexistent", "--device", "cpu")
    assert (result.returncode, result.stderr) == (1, f"error: --shards {tmp_path / 'nonexistent'}: no such folder\n")
    result = script("-b", "0")
    assert (result.returncode, result.stderr) == (2, "error: argument -b/--batch-size: must be at least 1, not 0\n")


# --- training ----------------------------------------------------------------------------


def test_lenet5_learns_and_writes_its_files(train_shards, tmp_path):
    before = time.time() - train.PROCESS_START
    final = run(train_shards, tmp_path, "--arch", "lenet5", "--recipe", "paper", "--epochs", "3", "--lr", "0.01")
    after = time.time() - train.PROCESS_START
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert list(rows[0]) == train.FIELDS
    # each epoch's validation ended this long after the process started (the speedrun's time-to-accuracy curve)
    assert before < rows[0]["process_s"] < rows[1]["process_s"] < rows[2]["process_s"] < after
    assert rows[2]["train_loss"] < rows[0]["train_loss"] and rows[2]["val_loss"] < rows[0]["val_loss"]
    assert rows[2]["val_top1"] > 50  # chance is 10%
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(train.FIELDS) and len(csv_lines) == 4
    args = json.loads((tmp_path / "args.json").read_text())
    assert (args["arch"], args["batch_size"], args["lr"], args["norm"], args["epochs"]) == ("lenet5", 32, 0.01, "half", 3)
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["world_size"] == 1
    assert env["commit"] == provenance.commit() and env["gpu"] is None and env["cpu"]
    identity = checkpoint.run_identity(train.parse_args(["--arch", "lenet5"]), read_manifest(train_shards))
    assert env["dataset"] == identity["dataset"]
    assert env["dataset"].startswith("10 classes (") and env["dataset"].endswith("), 1000 train")
    on_disk = json.loads((tmp_path / "final.json").read_text())
    assert on_disk == pytest.approx(final)
    assert final["epochs"] == 3 and final["train_top1"] == rows[2]["train_top1"] and final["val_top1"] == rows[2]["val_top1"]
    assert 0 <= final["test_top1"] <= final["test_top5"] <= 100 and final["wall_time_s"] > 0
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert set(ckpt) == {"format", "model", "optimizer", "lr_scheduler", "args", "identity", "world_size", "batch_size", "state",
                         "stream_deal", "stream_counts"}
    state = ckpt["state"]
    # 1000 images in batches of 32: 32 steps per epoch (the last one of 8).
    assert (state["epoch"], state["samples_done"], state["epoch_steps"], state["step"]) == (3, 0, 0, 3 * 32)
    assert state["history"] == rows and state["rank_sums"] == [[0.0, 0.0, 0.0]] and len(state["rng"]) == 1
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["state"]["best_acc"] == max(r["val_top1"] for r in rows)

    # --test-only on the final checkpoint reproduces the final test accuracy.
    result = run(train_shards, tmp_path / "eval", "--arch", "lenet5", "--norm", "half", "--test-only",
                 "--resume", str(tmp_path / "checkpoint.pth"))
    assert result["test"]["top1"] == final["test_top1"]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == result


def drop_times(rows):
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_time_s", "process_s")} for r in rows]


def _same_run(a, b):
    """Bit for bit: every tensor of the final model, every metric but the timings."""
    sa, sb = torch.load(a / "checkpoint.pth", weights_only=True), torch.load(b / "checkpoint.pth", weights_only=True)
    assert sa["state"]["epoch"] == sb["state"]["epoch"] and sa["state"]["step"] == sb["state"]["step"]
    assert list(sa["model"]) == list(sb["model"]) and len(sa["model"]) > 0
    unequal = [k for k in sa["model"] if not torch.equal(sa["model"][k], sb["model"][k])]
    assert unequal == []
    ra, rb = (drop_times(read_jsonl(d / "metrics.jsonl")) for d in (a, b))
    assert len(ra) == sa["state"]["epoch"] and ra == rb
    fa, fb = (json.loads((d / "final.json").read_text()) for d in (a, b))
    assert {k: v for k, v in fa.items() if k != "wall_time_s"} == {k: v for k, v in fb.items() if k != "wall_time_s"}


def test_resume_matches_an_uninterrupted_run(train_shards, tmp_path, straight):
    # The default cosine schedule depends on --epochs: extending a 1-epoch run to 2 must still match.
    flags = ["--arch", "lenet5", "-b", "64", "--augment", "--checkpoint-every", "7"]
    run(train_shards, tmp_path / "resumed", *flags, "--epochs", "1")
    run(train_shards, tmp_path / "resumed", *flags, "--epochs", "2", "--resume", "auto")
    _same_run(straight(train_shards, *flags, "--epochs", "2"), tmp_path / "resumed")


def test_a_resume_refuses_another_optimizer_and_an_end_before_its_checkpoint(train_shards, tmp_path, capsys):
    """The optimiser's state dict sets lr, momentum and weight decay: other values on the command line
    were ignored without a word while args.json recorded them (then kept, with a note; now refused, as
    the rest of a run's plan). And a run stopped mid-epoch 1 resumed with --epochs 1 ended at once, its
    partial epoch tested but in no metrics row."""
    flags = ["--arch", "lenet5", "-b", "64", "--epochs", "2"]
    stop_at(train_shards, tmp_path, 20, *flags)  # 16 steps an epoch: epoch 1 step 4
    capsys.readouterr()
    assert cli("--shards", train_shards, "--device", "cpu", "--output-dir", tmp_path, *flags[:-1], "1",
               "--resume", "auto") == 2
    assert capsys.readouterr().err == (
        f"error: --epochs 1: {tmp_path / 'checkpoint.pth'} is past it (at epoch 1 step 4); resume with --epochs 2 or more\n")
    assert cli("--shards", train_shards, "--device", "cpu", "--output-dir", tmp_path, *flags, "--lr", "0.2",
               "--momentum", "0", "--resume", "auto") == 1
    ckpt = tmp_path / "checkpoint.pth"
    assert capsys.readouterr().err == (
        f"error: {ckpt}: made with --lr 0.01 --momentum 0.9, this run has --lr 0.2 --momentum 0.0, and one run trains "
        f"to one plan; resume it with --lr 0.01 --momentum 0.9, or use another --output-dir (--weights {ckpt} starts "
        "a new run from its weights)\n")


def test_a_new_run_in_an_old_folder_leaves_none_of_its_results(tiny_shards, tmp_path):
    """Stopped before its first epoch ends, a new run in a finished run's folder held that run's
    final.json and best.pth beside its own metrics (`tinyin report` showed the old test figure), and its
    --test-only's eval.json (the old weights' figures, naming the folder's checkpoint.pth)."""
    flags = ["--arch", "lenet5", "-b", "4", "--epochs", "2"]
    run(tiny_shards, tmp_path, *flags)
    (tmp_path / "eval.json").write_text(json.dumps(dict(weights=str(tmp_path / "checkpoint.pth"))))
    assert {"final.json", "best.pth"} <= {p.name for p in tmp_path.iterdir()}
    stop_at(tiny_shards, tmp_path, 1, *flags, "--lr", "0.05", "--overwrite")
    assert not {"final.json", "best.pth", "eval.json"} & {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_resume_over_another_run_leaves_none_of_its_best_pth_and_eval_json(tiny_shards, tmp_path):
    """`--resume a/checkpoint.pth --output-dir b --overwrite` over b's run kept b's best.pth (its epoch of 75% val
    top-1) beside a's metrics, replaced only once the resumed run's val top-1 passed a's best, and b's eval.json.
    A resume of the folder's own checkpoint keeps its best.pth and eval.json."""
    flags = ["--arch", "lenet5", "-b", "4", "--epochs", "1", "--limit-batches", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    run(tiny_shards, a, *flags)
    b.mkdir()
    (b / "checkpoint.pth").write_bytes(b"b's run")
    torch.save(dict(state=dict(history=[dict(epoch=0, val_top1=75.0)], best_acc=75.0)), b / "best.pth")
    for folder in (a, b):
        (folder / "eval.json").write_text("{}")
    run(tiny_shards, b, *flags, "--resume", a / "checkpoint.pth", "--overwrite")
    assert not {"best.pth", "eval.json"} & {p.name for p in b.iterdir()}
    best = (a / "best.pth").read_bytes()
    run(tiny_shards, a, *flags, "--resume", "auto")
    assert (a / "best.pth").read_bytes() == best and (a / "eval.json").read_text() == "{}"


def test_a_new_run_replaces_an_old_folders_checkpoint_before_its_first_step(tiny_shards, tmp_path, monkeypatch):
    """The untrained checkpoint is written first: a new run in a finished run's folder that crashed in its first
    step left that run's checkpoint.pth, which `--resume auto` then continued as if it were the new run's."""
    (tmp_path / "checkpoint.pth").write_bytes(b"a finished run's")

    def crash(self, *a, **kw):  # as if the machine died: no handler, no stop checkpoint
        raise RuntimeError("machine lost")
    monkeypatch.setattr(torch.optim.SGD, "step", crash)
    with pytest.raises(RuntimeError, match="machine lost"):
        run(tiny_shards, tmp_path, "--arch", "lenet5", "-b", "4", "--epochs", "2", "--overwrite")
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["state"]
    assert (state["epoch"], state["step"], state["history"]) == (0, 0, [])


@pytest.mark.parametrize("resume", [None, "another"])
def test_a_run_that_would_replace_its_folders_checkpoint_is_refused(tiny_shards, tmp_path, capsys, resume):
    """A job script requeued without --resume auto started the preempted run again, and its first checkpoint
    replaced the one left there: hours of training lost without a word. So did a resume of another folder's
    checkpoint into it. Refused before anything is read or written; --overwrite starts afresh (above)."""
    flags = ["--arch", "lenet5", "-b", "4", "--epochs", "2", "--limit-batches", "1"]
    out, other = tmp_path / "run", tmp_path / "other"
    run(tiny_shards, other, *flags)
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"a preempted run's")
    again = ["--resume", other / "checkpoint.pth"] if resume else []
    capsys.readouterr()
    assert cli("--shards", tiny_shards, "--device", "cpu", "--output-dir", out, *flags, *again) == 1
    assert capsys.readouterr().err == (
        f"error: --output-dir {out} holds a run's checkpoint.pth, which this run would replace: continue that run "
        "with --resume auto, start afresh over it with --overwrite, or use another --output-dir\n")
    assert [p.name for p in out.iterdir()] == ["checkpoint.pth"]
    assert (out / "checkpoint.pth").read_bytes() == b"a preempted run's"


def test_resume_wins_over_overwrite(tiny_shards, tmp_path, capsys):
    """Both given (a continue command from a run started with --overwrite): the run goes on, nothing is lost."""
    flags = ["--arch", "lenet5", "-b", "4", "--epochs", "2", "--overwrite"]
    stop_at(tiny_shards, tmp_path, 3, *flags)
    capsys.readouterr()
    run(tiny_shards, tmp_path, *flags, "--resume", "auto")
    assert capsys.readouterr().out.splitlines()[0].startswith(f"resumed from {tmp_path / 'checkpoint.pth'} at epoch 0 step 3 ")


def test_a_resume_of_the_folders_own_checkpoint_by_another_spelling_goes_on(tiny_shards, tmp_path, capsys):
    """`--output-dir run --resume ./run/checkpoint.pth`: the same file, not a checkpoint this run would replace."""
    flags = ["--arch", "lenet5", "-b", "4", "--epochs", "2"]
    stop_at(tiny_shards, tmp_path, 3, *flags)
    capsys.readouterr()
    ckpt = f"{tmp_path}/../{tmp_path.name}/checkpoint.pth"
    run(tiny_shards, tmp_path, *flags, "--resume", ckpt)
    assert capsys.readouterr().out.splitlines()[0].startswith(f"resumed from {ckpt} at epoch 0 step 3 ")


def test_a_tilde_in_a_path_flag_is_the_home_folder(tiny_shards, tmp_path, monkeypatch, capsys):
    """`--output-dir=~/runs/a` (the = form; a quoted "~/runs/a", a job script's value) reached train.py as typed, and
    the run went into a folder named `~` in the current one. --shards, --output-dir, --resume and --weights read a
    leading ~ as the home folder, as the tinyin commands do; --resume auto stays auto."""
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    (home / "data" / "shards").symlink_to(tiny_shards)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    flags = ["--shards=~/data/shards", "--device", "cpu", "--arch", "lenet5", "-b", "8", "--epochs", "1"]
    with pytest.raises(SystemExit):  # preempted at step 1 (see stop_at)
        train.main(train.parse_args([*flags, "--output-dir=~/runs/a", "--stop-after-steps", "1"]))
    assert (home / "runs" / "a" / "checkpoint.pth").is_file() and not (tmp_path / "~").exists()
    capsys.readouterr()
    train.main(train.parse_args([*flags, "--output-dir=~/runs/a", "--resume=~/runs/a/checkpoint.pth"]))
    assert capsys.readouterr().out.splitlines()[0].startswith(f"resumed from {home}/runs/a/checkpoint.pth at epoch 0 ")
    assert (home / "runs" / "a" / "final.json").is_file() and not (tmp_path / "~").exists()
    args = train.parse_args(["--weights", "~/w.pth", "--resume", "auto"])
    assert (args.weights, args.resume, args.output_dir) == (f"{home}/w.pth", "auto", "runs/resnet18-64")


def test_a_resume_of_a_missing_file_into_a_runs_folder_is_refused_naming_the_file(tiny_shards, tmp_path, capsys):
    """A mistyped --resume where a run's checkpoint.pth is: the one-line refusal names the missing file, before
    anything is read (the checkpoint there is kept). It said that the folder holds a checkpoint.pth this run would
    replace, 'continue that run with --resume auto', to one trying to continue it."""
    (tmp_path / "checkpoint.pth").write_bytes(b"a preempted run's")
    base = ("--shards", tiny_shards, "--device", "cpu", "--output-dir", tmp_path, "--arch", "lenet5")
    assert cli(*base, "--resume", tmp_path / "chekpoint.pth") == 1
    assert capsys.readouterr().err == f"error: --resume {tmp_path / 'chekpoint.pth'}: no such file\n"
    assert cli(*base, "--resume", tmp_path) == 1  # the run's folder, not its file
    assert capsys.readouterr().err == (f"error: --resume {tmp_path}: a folder; pass {tmp_path / 'checkpoint.pth'}, "
                                       f"or --resume auto with --output-dir {tmp_path}\n")
    assert (tmp_path / "checkpoint.pth").read_bytes() == b"a preempted run's"


def test_a_resume_without_epochs_goes_on_to_the_runs_own(tiny_shards, tmp_path, capsys):
    """`--resume auto` without --epochs took train.py's default: a finished run of --epochs 1 trained on to 30, its
    final.json removed as it started. It keeps the run's own now, and a given --epochs still trains further."""
    flags = ["--arch", "lenet5", "-b", "4", "--limit-batches", "1"]
    run(tiny_shards, tmp_path, *flags, "--epochs", "1")
    capsys.readouterr()
    run(tiny_shards, tmp_path, *flags, "--resume", "auto")
    out, err = capsys.readouterr()
    assert out.startswith(f"resumed from {tmp_path / 'checkpoint.pth'} at the start of epoch 1 ")
    assert err == "note: --epochs 1 kept from the run (not 30); give --epochs N to train it further\n"
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((tmp_path / "final.json").read_text())["epochs"] == 1
    assert json.loads((tmp_path / "args.json").read_text())["epochs"] == 1
    run(tiny_shards, tmp_path, *flags, "--resume", "auto", "--epochs", "2")
    assert capsys.readouterr().err == ""
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_resume_without_b_trains_on_at_the_runs_own_batch(tiny_shards, tmp_path, capsys):
    """`--resume auto` without -b took train.py's default: a run of -b 4 went on at 128 with the same lr, from an
    epoch's end or mid-epoch, without a word (a mid-epoch stream checkpoint was refused: 'resume it with -b 4').
    It keeps the run's own now, with a note, and trains what the uninterrupted run did."""
    flags = ["--arch", "lenet5", "--epochs", "2"]
    run(tiny_shards, tmp_path / "straight", *flags, "-b", "4")
    run(tiny_shards, tmp_path / "boundary", *flags[:2], "--epochs", "1", "-b", "4")
    stop_at(tiny_shards, tmp_path / "mid", 2, *flags, "-b", "4")
    capsys.readouterr()
    for resumed in ("boundary", "mid"):
        run(tiny_shards, tmp_path / resumed, *flags, "--resume", "auto")
        assert capsys.readouterr().err == "note: -b 4 kept from the run (not 128)\n"
        assert json.loads((tmp_path / resumed / "args.json").read_text())["batch_size"] == 4
        _same_run(tmp_path / "straight", tmp_path / resumed)


def test_test_only_in_a_runs_folder_evaluates_another_checkpoint(tiny_shards, tmp_path):
    """--test-only writes no checkpoint: a run's folder is no reason to refuse evaluating another file there."""
    flags = ["--arch", "lenet5", "-b", "4", "--epochs", "1", "--limit-batches", "1"]
    run(tiny_shards, tmp_path / "a", *flags)
    run(tiny_shards, tmp_path / "b", *flags)
    before = (tmp_path / "b" / "checkpoint.pth").read_bytes()
    assert run(tiny_shards, tmp_path / "b", *flags, "--test-only", "--resume", tmp_path / "a" / "checkpoint.pth")
    assert (tmp_path / "b" / "checkpoint.pth").read_bytes() == before


def test_an_end_before_an_epoch_boundary_checkpoint_names_the_least_epochs_that_resume(train_shards, tmp_path, capsys):
    """A checkpoint at the end of epoch 2 resumes with --epochs 2 (it only tests); the refusal of
    --epochs 1 told to give 3 or more, as for a checkpoint in the middle of epoch 2."""
    flags = ["--arch", "lenet5", "-b", "64", "--limit-batches", "2"]
    run(train_shards, tmp_path, *flags, "--epochs", "2")
    capsys.readouterr()
    assert cli("--shards", train_shards, "--device", "cpu", "--output-dir", tmp_path, *flags, "--epochs", "1",
               "--resume", "auto") == 2
    assert capsys.readouterr().err == (
        f"error: --epochs 1: {tmp_path / 'checkpoint.pth'} is past it (at epoch 2 step 0); resume with --epochs 2 or more\n")


def stop_at(shards, out, step, *flags):
    """Run until global step `step` as if preempted there (the hidden --stop-after-steps sends no
    signal but takes the same path as SIGUSR1: checkpoint at that step, exit 138)."""
    with pytest.raises(SystemExit) as e:
        run(shards, out, *flags, "--stop-after-steps", str(step))
    assert e.value.code == 128 + signal.SIGUSR1
    return torch.load(out / "checkpoint.pth", weights_only=True)


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augment"])
@pytest.mark.parametrize("path", ["resident", "fast", "stream"])
def test_mid_epoch_resume_is_bit_identical(train_shards, tmp_path, path, augment, capsys, straight):
    # 1000 images in batches of 64: 16 steps per epoch. Stopped twice: mid-epoch 0 (step 5),
    # then mid-epoch 1 (global step 21), after periodic checkpoints at steps 7 and 14.
    flags = ["--arch", "lenet5", "-b", "64", *(["--augment"] if augment else []), "--checkpoint-every", "7",
             "--epochs", "2", "--data-path", path]
    reference = straight(train_shards, *flags)
    ckpt = stop_at(train_shards, tmp_path / "resumed", 5, *flags)
    assert (ckpt["state"]["epoch"], ckpt["state"]["epoch_steps"], ckpt["state"]["samples_done"]) == (0, 5, 5 * 64)
    assert ckpt["stream_deal"] == 2  # whatever the path: a later resume may be on the stream path at a boundary
    out = tmp_path / "resumed"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted at epoch 0 step 5: checkpoint saved to {out / 'checkpoint.pth'}; continue with: python train.py "
        f"--shards {train_shards} --device cpu --output-dir {out} {' '.join(flags)} --resume auto")
    ckpt = stop_at(train_shards, out, 21, *flags, "--resume", "auto")
    assert (ckpt["state"]["epoch"], ckpt["state"]["epoch_steps"], ckpt["state"]["step"]) == (1, 5, 21)
    assert len(ckpt["state"]["history"]) == 1
    run(train_shards, out, *flags, "--resume", "auto")
    _same_run(reference, out)


def test_a_mid_epoch_checkpoint_resumes_only_on_its_paths_epoch_order(tiny_shards, tmp_path, capsys):
    """The stream path's epoch order is not the resident and fast paths': a 2-rank stream run stopped
    mid-epoch and resumed with --data-path resident trained 62 of 300 samples twice and 82 not at all in
    that epoch, without a word. At an epoch boundary the path may change."""
    flags = ["--shards", tiny_shards, "--device", "cpu", "--output-dir", tmp_path, "--arch", "lenet5", "-b", "4"]
    stop_at(tiny_shards, tmp_path, 1, *flags[4:], "--epochs", "2", "--data-path", "stream", "-j", "0")
    capsys.readouterr()
    assert cli(*flags, "--epochs", "2", "--data-path", "resident", "--resume", "auto") == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'checkpoint.pth'}: stopped mid-epoch (epoch 0 step 1) on --data-path stream, whose "
        "order of the epoch --data-path resident does not share; resume it with --data-path stream\n")
    run(tiny_shards, tmp_path, *flags[4:], "--epochs", "1", "--data-path", "stream", "-j", "0", "--resume", "auto")
    run(tiny_shards, tmp_path, *flags[4:], "--epochs", "2", "--data-path", "resident", "--resume", "auto")
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1]


def test_a_mid_epoch_stream_checkpoint_resumes_only_with_as_many_lanes(tiny_shards, tmp_path, capsys):
    """The stream path plans max(2, -j) lanes: a run stopped mid-epoch with -j 3 and resumed with the
    default -j trained 20 of 300 samples twice and 20 not at all in that epoch, without a word."""
    flags = ["--shards", tiny_shards, "--device", "cpu", "--output-dir", tmp_path, "--arch", "lenet5", "-b", "4",
             "--epochs", "1", "--data-path", "stream"]
    stop_at(tiny_shards, tmp_path, 1, *flags[4:], "-j", "0")
    capsys.readouterr()
    assert cli(*flags, "-j", "3", "--resume", "auto") == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'checkpoint.pth'}: stopped mid-epoch (epoch 0 step 1) with -j 0, whose order of the "
        "epoch -j 3 does not share (the stream path reads max(2, -j) shard groups side by side); "
        "resume it with -j 2 or fewer\n")
    run(tiny_shards, tmp_path, *flags[4:], "-j", "1", "--resume", "auto")  # 0, 1 and 2 workers: the same order


def test_a_mid_epoch_stream_checkpoint_resumes_only_with_its_batch_size(tiny_shards, tmp_path, capsys):
    """The stream plan cuts its lanes into batches: stopped after 5 steps of -b 20 and resumed with -b 10,
    10 of 300 samples were trained twice and 10 not at all that epoch; with -b 40, a ValueError traceback."""
    flags = ["--shards", tiny_shards, "--device", "cpu", "--output-dir", tmp_path, "--arch", "lenet5",
             "--epochs", "1", "--data-path", "stream", "-j", "0"]
    stop_at(tiny_shards, tmp_path, 1, *flags[4:], "-b", "4")
    capsys.readouterr()
    for b in (2, 8):
        assert cli(*flags, "-b", b, "--resume", "auto") == 1
        assert capsys.readouterr().err == (
            f"error: {tmp_path / 'checkpoint.pth'}: stopped mid-epoch (epoch 0 step 1) with -b 4, whose order of "
            f"the epoch -b {b} does not share; resume it with -b 4\n")


def test_a_mid_epoch_stream_checkpoint_resumes_only_on_shards_of_its_sizes(train_shards, tmp_path, capsys):
    """The stream plan deals and mixes whole shards: a run stopped mid-epoch and resumed on the same release
    built again with another --shard-size (the same classes and train count, so the same run) trained 267 of
    1,000 samples twice that epoch and 267 not at all, without a word."""
    resharded = tmp_path / "resharded"
    build_shards(Path(train_shards).parent / "release", resharded, workers=1, shard_size=300, progress=False)
    flags = ["--device", "cpu", "--output-dir", tmp_path / "run", "--arch", "lenet5", "-b", "50", "--epochs", "1",
             "--data-path", "stream", "-j", "0"]
    stop_at(train_shards, tmp_path / "run", 10, *flags)
    capsys.readouterr()
    assert cli("--shards", resharded, *flags, "--resume", "auto") == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'run' / 'checkpoint.pth'}: stopped mid-epoch (epoch 0 step 10) on train shards of "
        "1,000 samples, whose order of the epoch shards of 300, 300, 300, 100 (these) do not share (the stream "
        "path reads whole shards); resume it on the shards it was made with\n")
    run(train_shards, tmp_path / "run", *flags, "--resume", "auto")  # its own shards, wherever they are


def test_a_mid_epoch_multi_rank_stream_checkpoint_of_the_earlier_deal_is_refused():
    """Deal 1 gave ranks whole shards only; deal 2 evens the ranks out, so on several ranks the rest of an
    epoch a deal-1 checkpoint stopped in is another order now. One rank's deal is the same in both."""
    state = train.RunState(epoch=3, samples_done=128, epoch_steps=4)
    args = argparse.Namespace(data_path="stream", batch_size=16, workers=2)
    old = dict(args=dict(data_path="stream", workers=2), world_size=2, batch_size=16)
    with pytest.raises(train.CheckpointError) as e:
        checkpoint.check_epoch_order(old, state, args, 2, "runs/x/checkpoint.pth")
    assert str(e.value) == (
        "runs/x/checkpoint.pth: stopped mid-epoch (epoch 3 step 4) on 2 ranks by an earlier tinyin, whose stream "
        "path dealt the shards to ranks otherwise (deal 1, this one's is 2); finish that epoch with the tinyin "
        "that saved it, or start the run again")
    checkpoint.check_epoch_order({**old, "stream_deal": 2}, state, args, 2, "runs/x/checkpoint.pth")
    checkpoint.check_epoch_order({**old, "world_size": 1}, state, args, 1, "runs/x/checkpoint.pth")
    checkpoint.check_epoch_order(old, train.RunState(epoch=3), args, 2, "runs/x/checkpoint.pth")  # at a boundary


def test_a_stream_checkpoint_of_an_epoch_trained_whole_resumes_with_any_order():
    """The checkpoint before validation of a one-rank run holds the epoch trained whole (240 of 240 samples): no rest
    is left, so no order to share. It was refused as 'stopped mid-epoch (epoch 1 step 5) with -b 50, whose order of
    the epoch -b 64 does not share', and so with another -j, number of ranks or --data-path: a run killed in its
    validation was told to resume with them. One sample short of the whole, the epoch is still under way."""
    counts = [64, 64, 64, 48]
    saved = dict(args=dict(data_path="stream", workers=None), world_size=1, batch_size=50, stream_deal=2,
                 stream_counts=counts)
    for data_path, batch_size, workers, world_size in (("stream", 64, 3, 2), ("auto", 50, None, 1)):
        checkpoint.check_epoch_order(saved, train.RunState(epoch=1, samples_done=240, epoch_steps=5),
                                     argparse.Namespace(data_path=data_path, batch_size=batch_size, workers=workers),
                                     world_size, "c.pth", counts)
    with pytest.raises(train.CheckpointError) as e:
        checkpoint.check_epoch_order(saved, train.RunState(epoch=1, samples_done=239, epoch_steps=5),
                                     argparse.Namespace(data_path="stream", batch_size=64, workers=None), 1, "c.pth",
                                     counts)
    assert str(e.value).startswith("c.pth: stopped mid-epoch (epoch 1 step 5) with -b 50, whose order")


def test_a_mid_epoch_checkpoint_names_what_its_stream_order_needs():
    """The stream path resumes mid-epoch on as many ranks only (also fewer is refused), and a checkpoint of the
    default -j planned 2 lanes; the resident and fast paths' order goes on on any ranks and batch size."""
    state = train.RunState(epoch=1, samples_done=64, epoch_steps=2)
    saved = dict(args=dict(data_path="stream", workers=None), world_size=2, batch_size=16, stream_deal=2)
    where = "c.pth: stopped mid-epoch (epoch 1 step 2)"
    with pytest.raises(train.CheckpointError) as e:
        checkpoint.check_epoch_order(saved, state, argparse.Namespace(data_path="stream", batch_size=16, workers=None),
                                     1, "c.pth")
    assert str(e.value) == f"{where} on 2 ranks; the stream path resumes mid-epoch on the same number only (this run has 1)"
    with pytest.raises(train.CheckpointError) as e:
        checkpoint.check_epoch_order(saved, state, argparse.Namespace(data_path="stream", batch_size=16, workers=3),
                                     2, "c.pth")
    assert str(e.value) == (f"{where} with -j 2, whose order of the epoch -j 3 does not share (the stream path reads "
                            "max(2, -j) shard groups side by side); resume it with -j 2 or fewer")
    fast = dict(saved, args=dict(data_path="fast", workers=None))
    checkpoint.check_epoch_order(fast, state, argparse.Namespace(data_path="resident", batch_size=8, workers=None),
                                 1, "c.pth")


def test_the_elastic_resume_of_a_rank_past_the_first_starts_its_sums_and_rng_afresh(monkeypatch):
    """On another number of ranks rank 0 carries the epoch's sums so far: rank 1 carrying them too counted
    them twice in the epoch's train loss and top-1. Its RNG streams start from (seed, epoch, rank, step)."""
    monkeypatch.setattr(train.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(train.dist, "get_world_size", lambda *a: 2)
    saved = dict(epoch=1, samples_done=96, step=9, epoch_steps=3, train_seconds=1.0, best_acc=5.0, history=[],
                 wall_time=2.0, rank_sums=[[6.0, 10.0, 96.0]], rng=[train.rng_state()])  # of 1 rank
    for r, sums in ((0, [6.0, 10.0, 96.0]), (1, [0.0, 0.0, 0.0])):
        monkeypatch.setattr(train.dist, "get_rank", lambda *a, r=r: r)
        state = train.RunState.from_state_dict(saved, torch.device("cpu"), seed=7)
        assert (state.sums.tolist(), state.epoch, state.samples_done, state.step) == (sums, 1, 96, 9)
        assert torch.initial_seed() == step_seed(7, 1, r, 9)


def test_an_elastic_resume_restarts_a_per_step_schedule_at_the_epochs_samples_in_its_own_steps():
    """96 samples of epoch 2 done: 3 steps of 2 ranks x 16, 6 of one rank's."""
    args = argparse.Namespace(lr_per="step", batch_size=16)
    state = train.RunState(epoch=2, samples_done=96)
    assert [train.schedule_position(state, args, 10, ranks) for ranks in (1, 2)] == [26, 23]


def test_ranks_of_which_only_another_than_rank_0_finds_a_checkpoint_are_refused(tiny_shards, tmp_path, monkeypatch,
                                                                                capsys):
    # the same set (its hash, a str), and rank 1 found a checkpoint where rank 0 found none
    monkeypatch.setattr(train, "gather", lambda obj: [obj, obj if isinstance(obj, str) else (1, 1, 5)])
    assert cli("--shards", tiny_shards, "--device", "cpu", "--output-dir", tmp_path / "run", "--arch", "lenet5",
               "--resume", "auto") == 1
    assert capsys.readouterr().err == (
        f"error: --resume auto: rank 0 found no checkpoint, rank 1 resumes epoch 1 step 1 (--output-dir "
        f"{tmp_path / 'run'}): every node must read the same checkpoint, from an --output-dir they share\n")


def test_ranks_that_find_different_checkpoints_are_refused(tiny_shards, tmp_path, monkeypatch, capsys):
    """Nodes that do not share --output-dir: with --resume auto rank 0 resumed and the other node's ranks
    started afresh under one DDP (two models trained, until a collective hung). Here the other rank is
    a stand-in: `gather` answers for it that it found no checkpoint."""
    flags = ["--shards", tiny_shards, "--device", "cpu", "--output-dir", tmp_path, "--arch", "lenet5", "-b", "4",
             "--epochs", "2"]
    stop_at(tiny_shards, tmp_path, 5, *flags[4:])
    capsys.readouterr()
    monkeypatch.setattr(train, "gather", lambda obj: [obj, obj if isinstance(obj, str) else None])  # the same set
    assert cli(*flags, "--resume", "auto") == 1
    assert capsys.readouterr().err == (
        f"error: --resume auto: rank 0 resumes epoch 1 step 1, rank 1 found no checkpoint (--output-dir {tmp_path}): "
        "every node must read the same checkpoint, from an --output-dir they share\n")


@pytest.mark.parametrize("block, error", [(0, (1, "--shards data/shards: no such folder")),
                                          (2, (1, "--weights /home/me/w.pth: no such file"))],
                         ids=["its-own-shards", "its-own-weights"])
def test_a_mistake_that_another_rank_finds_for_itself_ends_this_one_in_one_line(train_shards, tmp_path, monkeypatch,
                                                                                 capsys, block, error):
    """Nodes read copies of their own (README): one without its copy, or without a --weights file kept in a home
    folder of its own, stopped its ranks with the line, and the others went on into the next collective, where gloo
    ended them in a traceback ('Connection closed by peer'), or NCCL waited. Here rank 1 is a stand-in: `gather`
    answers for it with its error at the end of the `block`-th check of each rank's own files, of 3 (where each
    rank says '' for none)."""
    blocks = itertools.count()
    monkeypatch.setattr(train, "gather", lambda obj: [obj, error if obj == "" and next(blocks) == block else obj])
    assert cli("--shards", train_shards, "--device", "cpu", "--output-dir", tmp_path / "run", "--arch", "lenet5",
               "--epochs", "1", "--limit-batches", "1") == 1
    assert capsys.readouterr().err == f"error: rank 1: {error[1]}\n"


def test_a_rank_that_finds_a_mistake_for_itself_tells_the_others_before_it_ends(tmp_path, monkeypatch, capsys):
    told = []
    monkeypatch.setattr(train, "gather", lambda obj: told.append(obj) or [obj, ""])
    assert cli("--shards", tmp_path / "nosuch", "--device", "cpu", "--output-dir", tmp_path / "run",
               "--arch", "lenet5") == 1
    line = capsys.readouterr().err
    assert line == f"error: --shards {tmp_path / 'nosuch'}: no such folder\n" and told == [(1, line[7:-1])]


def test_ranks_that_open_different_shard_sets_are_refused(train_shards, tiny_shards, tmp_path, monkeypatch, capsys):
    """Each node reads its own --shards: one holding another build (a stale copy, the release synthesised or
    fetched again) trained its ranks on that set's samples, without a word (two nodes, synth seeds 0 and 1:
    exit 0 on both), or with other train counts aborted in a collective (SIGABRT, a traceback from gloo).
    Here the other rank is a stand-in: `gather` answers for it with another set."""
    monkeypatch.setattr(train, "gather", lambda obj: [obj, "0" * 64 if obj and isinstance(obj, str) else obj])
    assert cli("--shards", train_shards, "--device", "cpu", "--output-dir", tmp_path, "--arch", "lenet5") == 1
    assert capsys.readouterr().err == (
        f"error: --shards {train_shards}: rank 1 opened another shard set than rank 0 (other shards, by their "
        "sha256); every node must read the same set\n")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    # Said so on a resume too, where this node's set is not the one its checkpoint was trained on: the set is
    # what is wrong there, not the checkpoint (not 'a checkpoint of another run (dataset ...)').
    monkeypatch.undo()
    run(train_shards, tmp_path / "run", "--arch", "lenet5", "--epochs", "1", "--limit-batches", "1")
    monkeypatch.setattr(train, "gather", lambda obj: [obj, "0" * 64 if obj and isinstance(obj, str) else obj])
    assert cli("--shards", tiny_shards, "--device", "cpu", "--output-dir", tmp_path / "run", "--arch", "lenet5",
               "--resume", "auto") == 1
    assert capsys.readouterr().err == (
        f"error: --shards {tiny_shards}: rank 1 opened another shard set than rank 0 (other shards, by their "
        "sha256); every node must read the same set\n")


STOPPED_BY = pytest.mark.parametrize("signum, code, line", [(signal.SIGTERM, 143, "terminated\n"),
                                                            (signal.SIGUSR1, 138, "stopped by SIGUSR1\n")],
                                     ids=["sigterm", "sigusr1"])


@STOPPED_BY
def test_a_signal_during_the_fetch_of_a_set_url_stops_it_at_once(tiny_shards, tmp_path, monkeypatch, capsys, signum,
                                                                  code, line):
    """Ctrl-C or SIGTERM while a set URL was fetched into the cache (minutes for the real set on a slow link)
    waited for the whole fetch and a first step: StopSignals only asks the train loop to stop after a step.
    SIGUSR1 there then said `terminated` and exited 143, where README gives every signal 128 + its number (138)."""
    from tests.servers import FaultyHTTPServer

    server, fetch, handler = FaultyHTTPServer(tiny_shards), train.cached_copy, signal.getsignal(signum)

    def signalled_fetch(*args, **kwargs):
        os.kill(os.getpid(), signum)  # as a scheduler's arrives, mid-fetch
        return fetch(*args, **kwargs)
    monkeypatch.setattr(train, "cached_copy", signalled_fetch)
    monkeypatch.setenv("TINYIN_CACHE", str(tmp_path / "cache"))
    try:
        assert cli("--shards", server.url, "--device", "cpu", "--output-dir", tmp_path / "run", "--arch", "lenet5",
                   "-b", "4", "--epochs", "1") == code
    finally:
        server.close()
    assert capsys.readouterr().err == line and not (tmp_path / "run").exists()
    assert signal.getsignal(signum) is handler


def test_a_signal_while_the_stream_waits_for_a_batch_stops_the_run_at_once(tiny_shards, tmp_path, monkeypatch, capsys):
    """On the stream path the training process waits for a worker's batch, which a slow or hung server can hold
    for minutes: Ctrl-C or SIGTERM there was only noted, for a stop after the step that batch would make, and
    the run waited on (here for good). The wait now ends at the signal, and the run stops as after a step:
    the checkpoint of the last step, its line, 143."""
    def hung(url, storage_options=None):  # in the worker, which the run's one batch waits for
        os.kill(os.getppid(), signal.SIGTERM)  # as a scheduler's arrives, mid-wait
        threading.Event().wait()  # a server that never answers

    def hang(signum, frame):  # the wait before the fix: a failure, not a stalled suite
        raise TimeoutError("the run waited on for the batch")
    monkeypatch.setattr("pipeline.stream_read.read_whole", hung)
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    out = tmp_path / "run"
    flags = ["--shards", tiny_shards, "--device", "cpu", "--output-dir", out, "--arch", "lenet5", "-b", "4",
             "--epochs", "1", "--data-path", "stream", "-j", "1"]
    try:
        assert cli(*flags) == 143
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert capsys.readouterr().err == (f"interrupted at epoch 0 step 0: checkpoint saved to {out / 'checkpoint.pth'}; "
                                       f"continue with: python train.py {' '.join(map(str, flags))} --resume auto\n")
    state = torch.load(out / "checkpoint.pth", weights_only=True)["state"]
    assert (state["epoch"], state["step"], state["samples_done"]) == (0, 0, 0)
    assert multiprocessing.active_children() == []  # the worker, stuck in its read, stopped with the run


def signalled_at_sync(shards, out, epochs, call, where, capsys):
    """A run of lenet5 (-b 4, `epochs`) that gets SIGTERM as its `call`-th sync_ema_buffers starts (the first thing
    of a validation, and of the final test): it exits 143 with the stop line at `where` ('epoch E step S')."""
    sync, calls = train.sync_ema_buffers, []

    def signalled_sync(parts):
        calls.append(parts)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's arrives
        return sync(parts)
    flags = ["--shards", shards, "--device", "cpu", "--output-dir", out, "--arch", "lenet5", "-b", "4",
             "--epochs", epochs]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "sync_ema_buffers", signalled_sync)
        assert cli(*flags) == 143
    assert capsys.readouterr().err == (f"interrupted at {where}: checkpoint saved to {out / 'checkpoint.pth'}; "
                                       f"continue with: python train.py {' '.join(map(str, flags))} --resume auto\n")


def test_a_signal_during_validation_stops_the_run_with_the_epochs_checkpoint(tiny_shards, tmp_path, capsys):
    """Ctrl-C or SIGTERM during an epoch's validation (minutes for the val split at 224 on a CPU, or for good on the
    stream path while a val shard's server hangs) was only noted: the validation ran on to its end. The epoch's
    checkpoint is written before its validation, and a resume from it validates: the run now stops at the next
    batch of the validation, with that checkpoint's line."""
    out = tmp_path / "run"
    signalled_at_sync(tiny_shards, out, 2, 1, "epoch 0 step 4", capsys)
    assert read_jsonl(out / "metrics.jsonl") == []  # no row: the epoch is not validated
    run(tiny_shards, out, "--arch", "lenet5", "-b", "4", "--epochs", "2", "--resume", "auto")
    assert [row["epoch"] for row in read_jsonl(out / "metrics.jsonl")] == [0, 1]  # the resume validated epoch 0


def test_a_signal_during_the_final_test_stops_the_run_with_the_last_epochs_checkpoint(tiny_shards, tmp_path, capsys):
    """Ctrl-C or SIGTERM during the final test (minutes for the test split at 224 on a CPU) was only noted, for a stop
    after a training step that never comes there: the test ran on to its end, wrote final.json and exited 0. The
    last epoch's checkpoint stands, and a resume from it tests: the run now stops at the next batch of the test."""
    out = tmp_path / "run"
    signalled_at_sync(tiny_shards, out, 1, 2, "epoch 1 step 0", capsys)  # the 1st: epoch 0's validation
    assert not (out / "final.json").exists()
    final = run(tiny_shards, out, "--arch", "lenet5", "-b", "4", "--epochs", "1", "--resume", "auto")
    assert json.loads((out / "final.json").read_text()) == final and final["epochs"] == 1  # tested, not trained


@STOPPED_BY
def test_a_signal_during_a_test_only_evaluation_stops_it_at_once(tiny_shards, tmp_path, monkeypatch, capsys, signum,
                                                                 code, line):
    """Ctrl-C or SIGTERM while --test-only evaluated (minutes for the test split at 224 on a CPU) was only noted,
    for a stop after a training step that never comes there: the evaluation ran on to its end, wrote eval.json
    and exited 0. SIGUSR1 there then said `terminated` and exited 143, where README gives it 138."""
    out = tmp_path / "run"
    run(tiny_shards, out, "--arch", "lenet5", "-b", "4", "--epochs", "1")
    evaluate, handler = train.evaluate, signal.getsignal(signum)

    def signalled_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signum)  # as a scheduler's arrives, mid-evaluation
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(train, "evaluate", signalled_evaluate)
    capsys.readouterr()
    assert cli("--shards", tiny_shards, "--device", "cpu", "--output-dir", out, "--arch", "lenet5", "-b", "4",
               "--test-only", "--resume", "auto") == code
    assert capsys.readouterr().err == line and not (out / "eval.json").exists()
    assert signal.getsignal(signum) is handler


def test_dropout_rng_is_carried_over(tiny_shards, tmp_path):
    # squeezenet1_1 has dropout, so this checks that the RNG state is saved at the step and restored
    # (at lr 0.01 its last ReLU dies on this data, and dead units ignore dropout).
    flags = ["--arch", "squeezenet1_1", "-b", "4", "--epochs", "2", "--lr", "0.001"]
    run(tiny_shards, tmp_path / "straight", *flags)
    stop_at(tiny_shards, tmp_path / "resumed", 2, *flags)  # 16 images: 4 steps per epoch
    run(tiny_shards, tmp_path / "resumed", *flags, "--resume", "auto")
    _same_run(tmp_path / "straight", tmp_path / "resumed")


def test_a_crash_resumes_from_the_last_periodic_checkpoint(train_shards, tmp_path, monkeypatch):
    flags = ["--arch", "lenet5", "-b", "100", "--epochs", "1", "--checkpoint-every", "4", "--dump-keys"]
    run(train_shards, tmp_path / "straight", *flags)
    steps = []
    real_step = torch.optim.SGD.step

    def crash_in_step_7(self, *a, **kw):  # as if the machine died: no handler, no final checkpoint
        steps.append(1)
        if len(steps) == 7:
            raise RuntimeError("machine lost")
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", crash_in_step_7)
    with pytest.raises(RuntimeError, match="machine lost"):
        run(train_shards, tmp_path / "resumed", *flags)
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)
    state = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["state"]
    assert (state["epoch"], state["step"], state["samples_done"]) == (0, 4, 400)
    # keys-rank0.txt holds what the checkpoint holds: steps 5 and 6 are redone, not counted twice.
    assert len((tmp_path / "resumed" / "keys-rank0.txt").read_text().splitlines()) == 400
    run(train_shards, tmp_path / "resumed", *flags, "--resume", "auto")
    _same_run(tmp_path / "straight", tmp_path / "resumed")
    keys = [line.split()[1] for line in (tmp_path / "resumed" / "keys-rank0.txt").read_text().splitlines()]
    assert keys == [line.split()[1] for line in (tmp_path / "straight" / "keys-rank0.txt").read_text().splitlines()]
    assert len(keys) == 1000 and sorted(keys) == sorted(train_keys(train_shards))


def test_a_crash_while_best_pth_is_written_loses_no_best_epoch(tiny_shards, tmp_path, monkeypatch):
    """The epoch's checkpoint.pth was written before best.pth: a run killed (kill -9, the OOM killer) while
    best.pth was written resumed after that epoch, already counted as the best, and never wrote best.pth
    again; best.pth held an earlier epoch's weights (here, a new run's only epoch: none at all) without a word."""
    flags = ["--arch", "lenet5", "-b", "4", "--epochs", "1"]
    run(tiny_shards, tmp_path / "straight", *flags)
    real_save = train.save_atomic

    def crash_at_best(obj, path):  # as if the machine died: no handler, no final checkpoint
        if Path(path).name == "best.pth":
            raise RuntimeError("machine lost")
        return real_save(obj, path)

    monkeypatch.setattr(train, "save_atomic", crash_at_best)
    with pytest.raises(RuntimeError, match="machine lost"):
        run(tiny_shards, tmp_path / "resumed", *flags)
    monkeypatch.setattr(train, "save_atomic", real_save)
    run(tiny_shards, tmp_path / "resumed", *flags, "--resume", "auto")
    _same_run(tmp_path / "straight", tmp_path / "resumed")
    straight, resumed = (torch.load(tmp_path / d / "best.pth", weights_only=True) for d in ("straight", "resumed"))
    assert resumed["state"]["best_acc"] == straight["state"]["best_acc"]
    assert all(torch.equal(resumed["model"][k], straight["model"][k]) for k in straight["model"])


def test_a_stream_run_whose_validation_fails_keeps_the_epochs_training(train_shards, tmp_path, monkeypatch, recwarn):
    """On the stream path validation reads the val shards again (over the network from a URL): a failure there
    (a server gone, a shard unreadable) ended the run with the epoch's checkpoint not yet written, and the
    resume trained the whole epoch again. The epoch's training is now checkpointed before its validation; the
    resume validates it once, and the run is the uninterrupted one's, its metrics row written once."""
    flags = ["--arch", "lenet5", "-b", "64", "--epochs", "1", "--data-path", "stream", "--dump-keys"]  # 15 * 64 + 40
    run(train_shards, tmp_path / "straight", *flags)
    real_evaluate, evaluated = train.evaluate, []

    def val_unreadable(*args):
        raise ShardError("val-000000.tar: unreadable shard (ConnectionResetError)")
    monkeypatch.setattr(train, "evaluate", val_unreadable)
    with pytest.raises(ShardError, match="val-000000.tar: unreadable"):
        run(train_shards, tmp_path / "resumed", *flags)
    state = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["state"]
    assert (state["epoch"], state["step"], state["samples_done"], state["history"]) == (0, 16, 1000, [])
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text() == ""
    assert len((tmp_path / "resumed" / "keys-rank0.txt").read_text().splitlines()) == 1000
    monkeypatch.setattr(train, "evaluate", lambda *args: evaluated.append(args) or real_evaluate(*args))
    monkeypatch.setattr(torch.optim.SGD, "step", lambda *a, **kw: pytest.fail("trained again"))
    recwarn.clear()
    run(train_shards, tmp_path / "resumed", *flags, "--resume", "auto")
    assert len(evaluated) == 2  # validated once, then the final test
    assert [str(w.message) for w in recwarn if "lr_scheduler" in str(w.message)] == []  # no step here: no lr skipped
    _same_run(tmp_path / "straight", tmp_path / "resumed")
    assert [(d / "keys-rank0.txt").read_text() for d in (tmp_path / "straight", tmp_path / "resumed")] == \
        [(tmp_path / "straight" / "keys-rank0.txt").read_text()] * 2


@pytest.mark.parametrize("path,every,steps", [
    ("resident", None, [0, 4, 4]),  # the epoch's training, then the epoch's checkpoint after validation
    ("fast", None, [0, 4, 4]),
    ("fast", 3, [0, 3, 4, 4]),
    ("fast", 4, [0, 4, 4]),  # --checkpoint-every just saved the epoch's last step: not twice
    ("stream", None, [0, 4, 4]),
    ("stream", 3, [0, 3, 4, 4]),
    ("stream", 4, [0, 4, 4]),
])
def test_every_path_checkpoints_before_validation_and_not_twice(tiny_shards, tmp_path, monkeypatch, path, every,
                                                                steps):
    saved, real = [], train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda parts, state, args, paths: saved.append(state.step)
                        or real(parts, state, args, paths))
    run(tiny_shards, tmp_path, "--arch", "lenet5", "-b", "4", "--epochs", "1", "--data-path", path,
        *(["--checkpoint-every", every] if every else []))
    assert saved == steps  # 16 images in batches of 4


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full, a disk that is always full")
def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temp_file(train_shards, tmp_path, capsys):
    """torch.save(obj, path) turned the full disk into a RuntimeError ("unexpected pos ..."), a traceback,
    and left the half-written checkpoint.pth.tmp taking up the space."""
    tmp_path.joinpath("checkpoint.pth.tmp").symlink_to("/dev/full")  # where the checkpoint is written first
    assert cli("--shards", train_shards, "--device", "cpu", "--arch", "lenet5", "--epochs", "1",
               "--output-dir", tmp_path) == 1
    assert capsys.readouterr().err == f"error: No space left on device: {tmp_path / 'checkpoint.pth'}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".train.lock", "args.json", "env.json", "metrics.csv",
                                                          "metrics.jsonl"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full, a disk that is always full")
def test_a_full_disk_while_writing_final_json_is_one_line_and_leaves_no_half_file(train_shards, tmp_path, capsys):
    """final.json (as args.json, env.json, eval.json) was written in place: a full disk gave `error: No space
    left on device`, no word of which file, and left a truncated final.json, on which tools/reproduce.py's
    check for a finished row failed with a JSONDecodeError traceback."""
    tmp_path.joinpath("final.json.part").symlink_to("/dev/full")  # where final.json is written first
    assert cli("--shards", train_shards, "--device", "cpu", "--arch", "lenet5", "--epochs", "1",
               "--output-dir", tmp_path) == 1
    assert capsys.readouterr().err == f"error: No space left on device: {tmp_path / 'final.json'}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".train.lock", "args.json", "best.pth", "checkpoint.pth",
                                                          "env.json", "metrics.csv", "metrics.jsonl"]


# train.py run as a script, rank 0 of 2 (torchrun's environment) whose rank 1 never comes: the join waits for it (in
# C++, up to its 30-minute timeout), and the signal argv[1] arrives meanwhile.
SIGNAL_IN_THE_JOIN = """
import os, runpy, sys, threading
import torch.distributed as dist

join, signum = dist.init_process_group, int(sys.argv[1])

def signalled_join(*args, **kwargs):
    threading.Timer(0.5, os.kill, (os.getpid(), signum)).start()  # as a scheduler's arrives, mid-join
    return join(*args, **kwargs)

dist.init_process_group = signalled_join
sys.argv = ["train.py", *sys.argv[2:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "interrupted\n"),
                                                (signal.SIGTERM, 143, "terminated\n"),
                                                (signal.SIGUSR1, 138, "stopped by SIGUSR1\n")],
                         ids=["ctrl-c", "sigterm", "sigusr1"])
def test_a_signal_while_a_rank_waits_for_the_others_to_join_ends_it_in_one_line(tiny_shards, tmp_path, signum, code,
                                                                                line):
    """Under torchrun a rank first waits for every other (a node that starts late: minutes), in C++, where Python's
    handlers never run: Ctrl-C did nothing until the join's 30-minute timeout, SIGTERM killed the run outright
    (exit -15, which speedrun.py reports as a failure), and so did SIGUSR1 (-10), left to its default when SIGTERM
    was handled. Nothing is made yet that needs cleaning up: one line and 130, 143 or 138, as during the
    imports."""
    from tests.test_multinode import free_port

    env = dict(os.environ, PYTHONPATH=str(ROOT), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    done = subprocess.run([sys.executable, "-c", SIGNAL_IN_THE_JOIN, str(int(signum)), "--shards", str(tiny_shards),
                           "--device", "cpu", "--arch", "lenet5", "--output-dir", str(tmp_path / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (code, "", line)
    assert not (tmp_path / "run").exists()


# A stand-in for torchrun: starts train.py in a session of its own, with torchrun's TORCHELASTIC_RUN_ID, passing
# on its stdout and stderr, prints the worker's pid and waits (to be killed).
LAUNCHER = """
import os, subprocess, sys, time
worker = subprocess.Popen(sys.argv[1:], env=dict(os.environ, TORCHELASTIC_RUN_ID="test"), start_new_session=True)
print(worker.pid, flush=True)
time.sleep(300)
"""


def test_a_worker_whose_torchrun_is_killed_checkpoints_and_stops(tiny_shards, tmp_path):
    """torchrun starts its workers in sessions of their own: killed outright (kill -9, the OOM killer, which README
    named the way to stop at once), it left them training on, unseen, to the end of the run, holding the output
    folder's lock (a resume was refused meanwhile)."""
    out = tmp_path / "run"
    flags = ["--shards", tiny_shards, "--arch", "lenet5", "-b", "4", "--epochs", "50", "--device", "cpu",
             "--output-dir", out]
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, sys.executable, str(ROOT / "train.py"),
                                 *map(str, flags), "--wait-at-step", "1"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    worker = int(launcher.stdout.readline())
    try:
        assert launcher.stdout.readline() == "waiting for a signal at epoch 0 step 1\n"
        launcher.kill()
        _, err = launcher.communicate(timeout=60)  # the pipes close when the worker has exited too
    finally:
        launcher.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
    assert err == (f"interrupted at epoch 0 step 1: checkpoint saved to {out / 'checkpoint.pth'}; continue with: "
                   f"python train.py {' '.join(map(str, flags))} --resume auto\n")
    state = torch.load(out / "checkpoint.pth", weights_only=True)["state"]
    assert (state["epoch"], state["epoch_steps"]) == (0, 1)


# train.py run as a script that sends itself the signal argv[1] as it starts to import torch (seconds of it).
SIGNAL_AT_TORCH_IMPORT = """
import os, runpy, sys

signum = int(sys.argv[1])

class SignalAtTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signum)
        return None

sys.meta_path.insert(0, SignalAtTorch())
sys.argv = ["train.py", "--help"]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "interrupted\n"),
                                                (signal.SIGTERM, 143, "terminated\n"),
                                                (signal.SIGUSR1, 138, "stopped by SIGUSR1\n")],
                         ids=["ctrl-c", "sigterm", "sigusr1"])
def test_a_signal_while_train_py_imports_torch_ends_it_in_one_line(signum, code, line):
    """Ctrl-C, SIGTERM or SIGUSR1 in train.py's first seconds, while it imports torch: one line and 130, 143 or 138.
    (Before: Ctrl-C was a KeyboardInterrupt traceback, SIGTERM a death by the signal, which speedrun.py reported as
    its train.py's failure, `exit -15`, and exited 1; SIGUSR1, left to its default when SIGTERM was handled, too.)"""
    done = subprocess.run([sys.executable, "-c", SIGNAL_AT_TORCH_IMPORT, str(int(signum))], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (code, "", line)


@pytest.mark.parametrize("path, group", [((), False), (("--data-path", "stream"), True)],
                         ids=["to-the-process", "stream-to-the-group"])
def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(train_shards, tmp_path, path, group, capsys,
                                                                   straight):
    # group: SIGTERM to the whole process group, as `kill -TERM -PGID`, Slurm or a scheduler sends it,
    # so the stream path's DataLoader workers get it too: they used to die of it, and torch's SIGCHLD
    # handler raised "DataLoader worker ... is killed by signal" in the main process (exit 1).
    # The signal goes to a train.py process; the uninterrupted run (shared with the other resume tests: the
    # same flags) and the resume run in this one.
    run_flags = ["--arch", "lenet5", "-b", "64", "--augment", "--checkpoint-every", "7", "--epochs", "2", *path]
    flags = ["--shards", train_shards, *run_flags, "--device", "cpu"]
    out = tmp_path / "resumed"
    # --wait-at-step: the run prints a line after global step 12 of 32 and waits there for a real signal.
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, flags), "--output-dir", str(out),
                             "--wait-at-step", "12"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=group)
    try:
        assert proc.stdout.readline() == "waiting for a signal at epoch 0 step 12\n"
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143
    assert err == (f"interrupted at epoch 0 step 12: checkpoint saved to {out / 'checkpoint.pth'}; continue with: "
                   f"python train.py {' '.join(map(str, flags))} --output-dir {out} --resume auto\n")
    state = torch.load(out / "checkpoint.pth", weights_only=True)["state"]
    assert (state["epoch"], state["epoch_steps"], state["samples_done"]) == (0, 12, 12 * 64)
    reference = straight(train_shards, *run_flags)
    capsys.readouterr()
    run(train_shards, out, *run_flags, "--resume", "auto")
    assert capsys.readouterr().out.splitlines()[0] == \
        f"resumed from {out / 'checkpoint.pth'} at epoch 0 step 12 (768 samples of it done, 1 -> 1 rank)"
    _same_run(reference, out)


@pytest.mark.parametrize("rgb_arch, size", [("resnet18", 64), ("squeezenet1_1", 224)])
def test_rgb_network_smoke(tiny_shards, tmp_path, rgb_arch, size):
    final = run(tiny_shards, tmp_path, "--arch", rgb_arch, "--size", str(size), "-b", "8", "--epochs", "1")
    assert final["epochs"] == 1 and final["test_top1"] is not None


def torchrun(nproc, *flags, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "train.py"), *map(str, flags)]
    return subprocess.run(cmd, cwd=cwd, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=180,
                          capture_output=True, text=True)


def ranks(nproc, *flags, cwd):
    """train.py on `nproc` ranks of this machine in the environment torchrun --standalone gives its workers (one
    thread each unless OMP_NUM_THREADS says otherwise), without torchrun's own process, one more import of torch (a
    real torchrun: `torchrun` above, test_multinode): the first failing rank's exit code, every rank's stderr."""
    from tests.test_multinode import free_port

    env = dict(os.environ, PYTHONPATH=str(ROOT), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, flags)]
    # Files, not pipes: a rank whose pipe filled while this waited on another's would block, and the other on it
    logs = [(Path(cwd) / f"rank{r}.stdout", Path(cwd) / f"rank{r}.stderr") for r in range(nproc)]
    procs = []
    try:
        for r, (out, err) in enumerate(logs):
            with out.open("w") as o, err.open("w") as e:
                procs.append(subprocess.Popen(cmd, cwd=cwd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=o,
                                              stderr=e, text=True))
        guard = time.monotonic() + 180  # a rank that failed can leave the others waiting for it: then all killed
        for p in procs:
            p.wait(timeout=max(guard - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    return subprocess.CompletedProcess(cmd, next((c for c in codes if c), 0), "".join(o.read_text() for o, _ in logs),
                                       "".join(e.read_text() for _, e in logs))


def read_keys(out, rank):
    """--dump-keys of one rank: [(epoch, key)]."""
    return [(int(e), k) for e, k in (line.split() for line in (out / f"keys-rank{rank}.txt").read_text().splitlines())]


def test_ddp_two_processes_on_cpu_and_a_resume_on_two_is_bit_identical(train_shards, tmp_path):
    flags = ["--shards", train_shards, "--arch", "lenet5", "--epochs", "2", "-b", "50", "--device", "cpu",
             "--augment", "--dump-keys"]
    out = tmp_path / "ddp"
    result = ranks(2, *flags, "--output-dir", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    seen = [[k for e, k in read_keys(out, r) if e == 0] for r in (0, 1)]
    # 1000 images, 2 ranks x 10 steps x 50: nothing is dropped, and no image is seen twice.
    assert len(seen[0]) == len(seen[1]) == 500 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(train_keys(train_shards))
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1]

    # Stopped mid-epoch 1 (global step 13 = its step 3) and resumed on 2 ranks: each rank gets its own
    # partial sums and RNG stream back, so the run is the uninterrupted one, bit for bit.
    resumed = tmp_path / "resumed"
    result = ranks(2, *flags, "--output-dir", resumed, "--stop-after-steps", "13", cwd=tmp_path)
    assert f"interrupted at epoch 1 step 3: checkpoint saved to {resumed / 'checkpoint.pth'}" in result.stderr
    result = ranks(2, *flags, "--output-dir", resumed, "--resume", "auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _same_run(out, resumed)
    for r in (0, 1):
        assert read_keys(resumed, r) == read_keys(out, r)


def test_ddp_three_ranks_on_the_stream_path_use_even_shares_and_resume_bit_identical(tmp_path):
    """3 ranks over train shards of 300, 300, 300 and 100: each rank holds 333 or 334 samples, 8 steps of
    40 (whole shards only gave each 300: 7 steps). On 3 ranks a resumed run's weights differed from the
    uninterrupted run's in their last bits, on every path (gloo's ring sums in an order set by DDP's
    bucket layout, which DDP rebuilds after its first step): `rank_ordered_mean` sums in rank order."""
    synthesize(tmp_path / "release", progress=False)
    shards = tmp_path / "shards"
    build_shards(tmp_path / "release", shards, workers=1, shard_size=300, progress=False)
    flags = ["--shards", shards, "--arch", "lenet5", "--epochs", "2", "-b", "40", "--device", "cpu", "--augment",
             "--dump-keys", "--data-path", "stream", "-j", "0"]
    out, resumed = tmp_path / "ddp", tmp_path / "resumed"
    result = ranks(3, *flags, "--output-dir", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    seen = [k for r in range(3) for e, k in read_keys(out, r) if e == 0]
    assert len(seen) == len(set(seen)) == 3 * 8 * 40
    result = ranks(3, *flags, "--output-dir", resumed, "--stop-after-steps", "11", cwd=tmp_path)
    assert f"interrupted at epoch 1 step 3: checkpoint saved to {resumed / 'checkpoint.pth'}" in result.stderr
    result = ranks(3, *flags, "--output-dir", resumed, "--resume", "auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _same_run(out, resumed)
    for r in range(3):
        assert read_keys(resumed, r) == read_keys(out, r)


@pytest.mark.parametrize("local, launcher, where", [
    ("8", "torchrun --nnodes 2 --nproc_per_node 8", " (on each of the 2 nodes, with the run's --rdzv flags)"),
    ("16", "torchrun --nproc_per_node 16", ""),
], ids=["two-nodes", "one-node"])
def test_an_interrupted_run_of_several_nodes_is_told_to_continue_on_as_many(train_shards, tmp_path, monkeypatch,
                                                                             capsys, local, launcher, where):
    """2 nodes of 8 (torchrun's LOCAL_WORLD_SIZE): the "continue with:" line said `torchrun --nproc_per_node 16`, 16
    processes on one node (on a node of 8 GPUs, 8 processes without one). Here rank 0 of 16 stands alone, without
    DDP, the other ranks' collectives answered for by its own (`gather`)."""
    def no_ddp(model, device_ids):
        model.register_comm_hook = lambda state, hook: None
        return model
    monkeypatch.setattr(train, "distributed", lambda args: contextlib.nullcontext((torch.device("cpu"), 16)))
    monkeypatch.setattr(train.nn.parallel, "DistributedDataParallel", no_ddp)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    monkeypatch.chdir(tmp_path)  # train.py named by its path, as in a job's folder
    out = tmp_path / "run"
    stop_at(train_shards, out, 1, "--arch", "lenet5", "-b", "4", "--limit-batches", "2")
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted at epoch 0 step 1: checkpoint saved to {out / 'checkpoint.pth'}; continue with: {launcher} "
        f"{ROOT / 'train.py'} --shards {train_shards} --device cpu --output-dir {out} --arch lenet5 -b 4 "
        f"--limit-batches 2 --resume auto{where}")


def test_two_rank_run_resumes_on_one_rank_exactly_once(train_shards, tmp_path, capsys):
    out, keys = tmp_path / "elastic", train_keys(train_shards)
    flags = ["--shards", train_shards, "--arch", "lenet5", "--epochs", "2", "-b", "50", "--device", "cpu",
             "--output-dir", out, "--dump-keys"]
    # 2 ranks x 50 per step: stopped after global step 4 = 400 of epoch 0's 1000 samples.
    result = torchrun(2, *flags, "--stop-after-steps", "4", cwd=tmp_path)
    assert f"interrupted at epoch 0 step 4: checkpoint saved to {out / 'checkpoint.pth'}; continue with: " \
           f"torchrun --nproc_per_node 2 {ROOT / 'train.py'} " in result.stderr  # run in tmp_path: train.py is not there
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (ckpt["world_size"], ckpt["state"]["samples_done"], len(ckpt["state"]["rank_sums"])) == (2, 400, 2)
    rank0 = read_keys(out, 0)
    before = rank0 + read_keys(out, 1)
    perm = epoch_order(len(keys), seed=0, epoch=0)
    assert sorted(k for _, k in before) == sorted(keys[i] for i in perm[:400])  # the permutation's first 400

    run(train_shards, out, *flags[2:], "--resume", "auto")  # 1 process
    assert capsys.readouterr().out.splitlines()[0] == \
        f"resumed from {out / 'checkpoint.pth'} at epoch 0 step 4 (400 samples of it done, 2 -> 1 rank)"
    after = read_keys(out, 0)[len(rank0):]
    epoch0 = [k for e, k in before + after if e == 0]
    # Exactly once: the 600 left (a multiple of the batch: nothing dropped) plus the 400 before.
    assert len(epoch0) == 1000 and sorted(epoch0) == sorted(keys)
    # Epoch 1 is what one rank does on its own: the whole permutation, in batches of 50 (members sorted).
    epoch1 = [k for e, k in after if e == 1]
    want = epoch_order(len(keys), seed=0, epoch=1)
    assert epoch1 == [keys[i] for b in range(0, 1000, 50) for i in np.sort(want[b:b + 50])]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1] and json.loads((out / "final.json").read_text())["epochs"] == 2


# train.py's cli as one rank of 2 (the environment torchrun gives it; rank 0 prints `saved at step S` at each checkpoint)
# where rank 1 gets SIGTERM at argv[1]: `validation` (as its first validation starts), `read` (from its stream worker,
# whose shard read then never ends: a hung server) or `none`.
SIGNAL_ON_RANK_1 = """
import os, signal, sys, threading
import pipeline.stream_read
import train
from pipeline.errors import run_cli

where, rank_1, saving = sys.argv[1], os.environ["RANK"] == "1", train.save_checkpoint
sync, read, validations = train.sync_ema_buffers, pipeline.stream_read.read_whole, []

def saved(parts, state, args, paths):
    saving(parts, state, args, paths)
    if train.rank() == 0:
        print(f"saved at step {state.step}", flush=True)

def signalled_sync(parts):
    validations.append(parts)
    if rank_1 and where == "validation" and len(validations) == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's arrives
    return sync(parts)

def hung(url, storage_options=None):  # in the stream worker, which the rank's first batch waits for
    if not rank_1:
        return read(url, storage_options)
    os.kill(os.getppid(), signal.SIGTERM)  # as a scheduler's arrives, mid-wait
    threading.Event().wait()  # a server that never answers

train.save_checkpoint, train.sync_ema_buffers = saved, signalled_sync
if where == "read":
    pipeline.stream_read.read_whole = hung
run_cli(lambda: train.main(train.parse_args(sys.argv[2:])))
"""


def two_ranks(where, *flags):
    """train.py on 2 ranks (gloo, the CPU), rank 1 signalled at `where` (SIGNAL_ON_RANK_1): each rank's
    (exit code, stdout, stderr)."""
    from tests.test_multinode import free_port

    env = dict(os.environ, PYTHONPATH=str(ROOT), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ranks = [subprocess.Popen([sys.executable, "-c", SIGNAL_ON_RANK_1, where, *map(str, flags)], cwd=ROOT,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for r in (0, 1)]
    try:
        done = [p.communicate(timeout=90) for p in ranks]
        return [(p.returncode, out, err) for p, (out, err) in zip(ranks, done)]
    finally:
        for p in ranks:  # with its stream worker, left in the hung read by a rank that never stopped
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)


def test_a_signal_during_validation_on_several_ranks_stops_them_with_the_epochs_checkpoint(tiny_shards, tmp_path):
    """Under DDP a signal during validation (minutes for the val split at 224 on a CPU; torchrun gives its workers 30 s
    between its SIGTERM and its SIGKILL) was only noted, for a stop after the next training step: the validation ran on
    to its end. The ranks now agree on a stop at every batch's wait, validation's too, whichever rank the signal
    reached: they stop with the epoch's checkpoint written before the validation (once), and a resume from it
    validates, the run the uninterrupted one's bit for bit."""
    flags = ["--shards", tiny_shards, "--device", "cpu", "--arch", "lenet5", "-b", "4", "--epochs", "2"]
    out = tmp_path / "run"
    (code0, saves, err0), (code1, _, err1) = two_ranks("validation", *flags, "--output-dir", out)
    assert (code0, code1, err1) == (143, 143, "")  # 16 images, 2 ranks x 4 a step: 2 steps an epoch
    assert err0 == (f"interrupted at epoch 0 step 2: checkpoint saved to {out / 'checkpoint.pth'}; continue with: "
                    f"torchrun --nproc_per_node 2 train.py {' '.join(map(str, flags))} --output-dir {out} "
                    "--resume auto\n")
    assert saves == "saved at step 0\nsaved at step 2\n"  # the untrained state, the epoch's before its validation
    assert read_jsonl(out / "metrics.jsonl") == []
    straight = [two_ranks("none", *flags, "--output-dir", tmp_path / "straight"),
                two_ranks("none", *flags, "--output-dir", out, "--resume", "auto")]
    assert [[code for code, _, _ in ranks] for ranks in straight] == [[0, 0], [0, 0]], straight
    _same_run(tmp_path / "straight", out)


def test_a_signal_while_a_rank_waits_for_its_batch_stops_every_rank(tiny_shards, tmp_path):
    """Under DDP a rank waiting for its batch (on the stream path a shard read that a slow or hung server holds for
    minutes) only noted a signal, for a stop after the step that batch would make, and the others waited for it in
    the step's all-reduce: here for good. The ranks now agree on a stop once each has its batch or was stopped
    waiting for it, before the step: every rank stops with the last step's checkpoint, 143."""
    flags = ["--shards", tiny_shards, "--device", "cpu", "--arch", "lenet5", "-b", "4", "--epochs", "1",
             "--data-path", "stream", "-j", "1"]
    out = tmp_path / "run"
    (code0, saves, err0), (code1, _, err1) = two_ranks("read", *flags, "--output-dir", out)
    assert (code0, code1, err1) == (143, 143, "")
    assert err0 == (f"interrupted at epoch 0 step 0: checkpoint saved to {out / 'checkpoint.pth'}; continue with: "
                    f"torchrun --nproc_per_node 2 train.py {' '.join(map(str, flags))} --output-dir {out} "
                    "--resume auto\n")
    assert saves == "saved at step 0\n"  # the untrained state is the stop's: not written twice
    state = torch.load(out / "checkpoint.pth", weights_only=True)["state"]
    assert (state["epoch"], state["step"], state["samples_done"]) == (0, 0, 0)


def test_a_stop_on_several_ranks_right_after_a_periodic_checkpoint_writes_it_once(tiny_shards, tmp_path):
    """Under DDP the ranks agree on a stop at the wait after a step, where --checkpoint-every may have just saved
    that step: the stop does not write it a second time (a 135 MB ResNet-18 checkpoint took 0.3-0.8 s here)."""
    flags = ["--shards", tiny_shards, "--device", "cpu", "--arch", "lenet5", "-b", "4", "--epochs", "2",
             "--checkpoint-every", "3", "--stop-after-steps", "3", "--output-dir", tmp_path]
    (code0, out, err0), (code1, _, _) = two_ranks("none", *flags)
    assert (code0, code1) == (138, 138) and err0.startswith("interrupted at epoch 1 step 1: ")
    # the untrained state; epoch 0 before and after its validation; step 3, once
    assert [line for line in out.splitlines() if line.startswith("saved")] == \
        ["saved at step 0", "saved at step 2", "saved at step 2", "saved at step 3"]


# --- augmentation randomness ---------------------------------------------------------------


def _augment_seeds(loader):
    """The generator seed each batch's augmentation was drawn with, and the batches."""
    seeds, batches, stage = [], [], loader.stage

    def recording(images, generator):
        seeds.append(generator.initial_seed())
        return stage(images, generator)

    recording.augment = stage.augment  # the loader seeds a step's draws only for a stage that draws
    loader.stage = recording
    batches = [images.clone() for images, _ in loader]
    return seeds, batches


def test_augmentation_is_drawn_per_rank_and_step_and_survives_a_resume(train_shards):
    def loader(rank, world_size=2):
        return make_loader(train_shards, "train", "rgb64", batch_size=50, seed=3, rank=rank, world_size=world_size,
                           drop_last=True, augment=True)

    ranks = [loader(r) for r in (0, 1)]
    for ld in ranks:
        ld.set_epoch(2)
    (s0, b0), (s1, _) = _augment_seeds(ranks[0]), _augment_seeds(ranks[1])
    assert s0 == [step_seed(3, 2, 0, k) for k in range(10)] and s1 == [step_seed(3, 2, 1, k) for k in range(10)]
    assert not set(s0) & set(s1)  # two ranks never share a batch's draws
    resumed = loader(0)
    resumed.set_epoch(2, start=4 * 50 * 2)  # after 4 steps on 2 ranks
    s, b = _augment_seeds(resumed)
    assert s == s0[4:] and len(b) == 6 and all(torch.equal(x, y) for x, y in zip(b, b0[4:], strict=True))


@pytest.mark.parametrize("path", ["auto", "fast", "resident"])
def test_a_run_reads_the_manifest_and_the_index_once(train_shards, monkeypatch, path):
    """build() opens the shard set once and hands the one ShardSet to the train, val and test loaders."""
    import builtins
    import io

    import pyarrow.parquet as pq

    counts = read_manifest(train_shards)["counts"]
    reads = []
    real_open, real_read_table = io.open, pq.read_table

    def counting_open(file, *a, **kw):
        if Path(str(file)).name in ("manifest.json", "index.parquet"):
            reads.append(Path(str(file)).name)
        return real_open(file, *a, **kw)

    def counting_read_table(source, *a, **kw):
        if isinstance(source, (str, Path)):
            reads.append(Path(source).name)
        return real_read_table(source, *a, **kw)

    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(pq, "read_table", counting_read_table)
    parts = train.build(train.parse_args(["--shards", train_shards, "--arch", "lenet5", "--data-path", path]),
                        torch.device("cpu"), 1)
    assert sorted(reads) == ["index.parquet", "manifest.json"]
    assert [len(parts.train), len(parts.val), len(parts.test)] == [-(-counts[s] // 128) for s in ("train", "val", "test")]
    next(iter(parts.val))
    assert len(reads) == 2


def test_limit_batches_caps_every_split(train_shards, tmp_path):
    run(train_shards, tmp_path, "--arch", "lenet5", "--epochs", "1", "-b", "16", "--limit-batches", "3", "--dump-keys")
    assert len((tmp_path / "keys-rank0.txt").read_text().splitlines()) == 3 * 16
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["epoch"] == 0


def test_dump_keys_of_a_new_run_over_an_old_one_start_afresh(tiny_shards, tmp_path):
    """--dump-keys appended a new run's keys (--overwrite over a run there) to the old run's keys-rank0.txt."""
    flags = ["--arch", "lenet5", "--epochs", "1", "-b", "4", "--limit-batches", "2", "--dump-keys"]
    run(tiny_shards, tmp_path, *flags)
    first = (tmp_path / "keys-rank0.txt").read_text()
    assert len(first.splitlines()) == 2 * 4
    run(tiny_shards, tmp_path, *flags, "--overwrite")
    assert (tmp_path / "keys-rank0.txt").read_text() == first


def test_a_resume_with_another_limit_batches_is_refused(train_shards, tmp_path, capsys):
    """A --limit-batches 2 quick look resumed without it trained on, its 2-batch epoch 0 among the whole
    ones, and `tinyin report` (from the last args.json) called every epoch whole; the reverse, too."""
    base = ["--shards", train_shards, "--device", "cpu", "--arch", "lenet5", "-b", "64", "--output-dir", tmp_path]
    run(train_shards, tmp_path, "--arch", "lenet5", "-b", "64", "--epochs", "1", "--limit-batches", "2")
    capsys.readouterr()
    ckpt = tmp_path / "checkpoint.pth"
    assert cli(*base, "--epochs", "2", "--resume", "auto") == 1
    assert capsys.readouterr().err == (
        f"error: {ckpt}: made with --limit-batches 2, this run has no --limit-batches, and one run's epochs must "
        "see the same batches; resume it with --limit-batches 2, or use another --output-dir\n")
    assert cli(*base, "--epochs", "2", "--limit-batches", "3", "--resume", "auto") == 1
    assert capsys.readouterr().err.startswith(f"error: {ckpt}: made with --limit-batches 2, this run has --limit-batches 3,")
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1
    assert set(run(train_shards, tmp_path, "--arch", "lenet5", "--test-only", "--resume", "auto")) == EVAL_KEYS
    whole = tmp_path / "whole"
    run(train_shards, whole, "--arch", "lenet5", "-b", "500", "--epochs", "1")
    assert cli(*base[:-1], whole, "--epochs", "2", "--limit-batches", "1", "--resume", "auto") == 1
    assert capsys.readouterr().err == (
        f"error: {whole / 'checkpoint.pth'}: made with no --limit-batches, this run has --limit-batches 1, and one "
        "run's epochs must see the same batches; resume it without --limit-batches, or use another --output-dir\n")


def test_a_resume_or_evaluation_with_another_norm_is_refused(tiny_shards, tmp_path, capsys):
    """A --recipe paper run (lenet5: --norm half) resumed or evaluated without the recipe took --norm dataset
    without a word: it trained on, or was scored, on inputs its weights were not trained for (a 3-epoch run's
    best.pth: val loss 1.59 against its own 1.22)."""
    run(tiny_shards, tmp_path, "--arch", "lenet5", "--epochs", "1", "--norm", "half")
    base = ["--shards", tiny_shards, "--device", "cpu", "--arch", "lenet5", "--output-dir", tmp_path]
    said = "made with --norm half, this run has --norm dataset, and the weights are for inputs normalised as they " \
           "were trained; give --norm half\n"
    capsys.readouterr()
    for flags in (["--epochs", "2", "--resume", "auto"], ["--test-only", "--resume", "auto"]):
        assert cli(*base, *flags) == 1
        assert capsys.readouterr().err == f"error: {tmp_path / 'checkpoint.pth'}: {said}"
    assert cli(*base, "--test-only", "--weights", tmp_path / "best.pth") == 1
    assert capsys.readouterr().err == f"error: --weights {tmp_path / 'best.pth'}: {said}"
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1
    assert set(run(tiny_shards, tmp_path, "--arch", "lenet5", "--norm", "half", "--test-only", "--resume", "auto")) == EVAL_KEYS


def test_a_resume_without_the_runs_recipe_is_refused(tiny_shards, tmp_path, capsys):
    """A --recipe paper run resumed without the recipe, with the --norm half the norm check asked for, trained
    on with train.py's defaults (-b 128, cosine over 30 epochs: its next epoch's lr 0.0005), and only the lr and
    wd were named, in a note."""
    run(tiny_shards, tmp_path, "--arch", "lenet5", "--recipe", "paper", "--epochs", "1")
    base = ["--shards", tiny_shards, "--device", "cpu", "--arch", "lenet5", "--output-dir", tmp_path, "--resume", "auto"]
    capsys.readouterr()
    assert cli(*base, "--epochs", "2", "--norm", "half") == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'checkpoint.pth'}: made with --recipe paper, this run has no --recipe, which changes its "
        "batch, epochs, lr schedule or normalisation mid-run; resume it with --recipe paper, or use another --output-dir\n")
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1
    # an evaluation trains nothing: the norm is all it needs
    assert set(run(tiny_shards, tmp_path, "--arch", "lenet5", "--norm", "half", "--test-only", "--resume", "auto")) == EVAL_KEYS
    assert run(tiny_shards, tmp_path, "--arch", "lenet5", "--recipe", "paper", "--epochs", "2", "--resume", "auto")["epochs"] == 2
    # Table 3's rows of paper and paper-50 differ in their epochs only: a 10-epoch run may go on to 50 as either
    at_224 = train.parse_args(["--arch", "resnet18", "--size", "224"])
    row = lambda recipe: checkpoint.recipe_row(recipe, at_224)  # noqa: E731
    assert row("paper") == row("paper-50") != row(None) == {}


def hold_lock(path):
    """Another process holding `path`'s lock as a training run's rank 0 does (a POSIX lock: this process's own
    would not exclude itself); it lets go when its stdin closes."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
                               "fcntl.lockf(f, fcntl.LOCK_EX); print(flush=True); sys.stdin.read()", str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    holder.stdout.readline()
    return holder


def lock_is_free(path):
    """Whether another process could take `path`'s lock now."""
    return subprocess.run([sys.executable, "-c", "import fcntl, sys; fcntl.lockf(open(sys.argv[1], 'a'), "
                           "fcntl.LOCK_EX | fcntl.LOCK_NB)", str(path)], capture_output=True, timeout=10).returncode == 0


def test_a_file_system_without_locks_trains_unguarded_and_a_held_lock_refuses(tmp_path, monkeypatch):
    """Only "another holds it" (EACCES, EAGAIN) refuses the run; a file system that takes no locks (ENOLCK)
    trains as before the lock existed."""
    args = argparse.Namespace(output_dir=str(tmp_path))
    for code in (errno.ENOLCK, errno.EAGAIN):
        def lockf(f, how, code=code):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(train.fcntl, "lockf", lockf)
        with contextlib.ExitStack() as stack:
            if code == errno.EAGAIN:
                stack.enter_context(pytest.raises(train.TinyinError, match="another train.py is training there"))
            with train.output_dir_lock(args):
                pass


def test_test_only_goes_on_to_the_checkpoint_of_a_pretrained_runs_command(tmp_path, monkeypatch, no_shards_read):
    """The training command with --test-only added: its --pretrained names where the run started, the checkpoint's
    weights are what is evaluated (refused only without a checkpoint: ImageNet's weights with a fresh head)."""
    class Built(Exception):
        pass

    def build(*_):
        raise Built
    monkeypatch.setattr(train, "build", build)
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    with pytest.raises(Built):
        train.main(train.parse_args(["--arch", "resnet18", "--pretrained", "--device", "cpu", "--test-only",
                                     "--shards", str(tmp_path), "--output-dir", str(tmp_path), "--resume", "auto"]))


def test_a_second_run_in_a_folder_where_one_trains_is_refused(tiny_shards, tmp_path, capsys):
    """The same command typed twice: both runs appended their rows to one metrics.jsonl (epochs 0, 0, 1, 1, 2,
    2) and overwrote each other's checkpoints, final.json and best.pth, without a word. --test-only, which
    writes eval.json only, may look at a run while it trains."""
    run(tiny_shards, tmp_path, "--arch", "lenet5", "--epochs", "1")
    base = ["--shards", tiny_shards, "--device", "cpu", "--arch", "lenet5", "--output-dir", tmp_path]
    holder = hold_lock(tmp_path / ".train.lock")
    try:
        capsys.readouterr()
        assert cli(*base, "--epochs", "2", "--resume", "auto") == 1  # one line: it said "resumed from" first
        assert capsys.readouterr() == ("", f"error: --output-dir {tmp_path}: another train.py is training there "
                                           "(it holds .train.lock); let it finish, or use another --output-dir\n")
        assert set(run(tiny_shards, tmp_path, "--arch", "lenet5", "--test-only", "--resume", "auto")) == EVAL_KEYS
    finally:
        holder.communicate(timeout=10)
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1
    assert run(tiny_shards, tmp_path, "--arch", "lenet5", "--epochs", "2", "--resume", "auto")["epochs"] == 2


def test_the_output_dir_lock_goes_with_the_run_not_with_its_forked_children(tmp_path):
    """The stream path's loader workers are forked while the lock is held: an flock, which they shared,
    outlived a kill -9 of the run by their seconds of shutdown, and its immediate resume was refused."""
    child = None
    try:
        with train.output_dir_lock(argparse.Namespace(output_dir=str(tmp_path))):
            child = os.fork()
            if child == 0:  # a worker: it only lives on
                try:
                    signal.pause()
                finally:
                    os._exit(0)
            held = not lock_is_free(tmp_path / ".train.lock")
        assert held and lock_is_free(tmp_path / ".train.lock")  # the run is gone, its child not yet
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)


def test_a_resume_that_trains_further_removes_final_json(tiny_shards, tmp_path):
    # A finished 1-epoch run, resumed to --epochs 400 and stopped mid-epoch 1: its final.json (the
    # 1-epoch run's test figure and wall time) was left beside the new metrics, and `tinyin report`
    # showed it as this run's.
    from pipeline.report import render_table

    out, flags = tmp_path / "run", ["--arch", "lenet5", "-b", "8"]  # 16 images: 2 steps per epoch
    run(tiny_shards, out, *flags, "--epochs", "1")
    assert json.loads((out / "final.json").read_text())["epochs"] == 1
    stop_at(tiny_shards, out, 3, *flags, "--epochs", "400", "--resume", "auto")
    assert not (out / "final.json").exists()
    row = render_table([out]).splitlines()[2].split(" | ")
    assert row[1:4] == ["28x28 grey", "1 of 400, stopped or failed", "8"] and row[6] == "-"  # not finished
    run(tiny_shards, out, *flags, "--epochs", "2", "--resume", "auto")  # finished again: written again
    assert json.loads((out / "final.json").read_text())["epochs"] == 2


def test_test_only_evaluates_each_split_of_a_checkpoint_past_its_epochs(tiny_shards, tmp_path):
    """An evaluation trains nothing: a checkpoint past --epochs (the default 30 against a 40-epoch run) is
    evaluated, not refused, and its val figures are the last metrics row's, its test figure final.json's."""
    flags = ["--arch", "lenet5", "-b", "4", "--limit-batches", "1"]
    final = run(tiny_shards, tmp_path, *flags, "--epochs", "2")
    result = run(tiny_shards, tmp_path, *flags, "--epochs", "1", "--test-only", "--resume", "auto")
    row = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert result["val"] == dict(loss=row["val_loss"], top1=row["val_top1"], top5=row["val_top5"])
    assert (result["test"]["loss"], result["test"]["top1"]) == (final["test_loss"], final["test_top1"])


def test_eval_json_says_how_many_batches_of_each_split_it_evaluated(tiny_shards, tmp_path):
    """An evaluation of --limit-batches N wrote an eval.json like a whole one's: its figures of a few batches
    could be read as the splits'. eval.json records limit_batches, null for every batch."""
    flags = ["--arch", "lenet5", "-b", "4", "--epochs", "1", "--limit-batches", "1"]
    run(tiny_shards, tmp_path, *flags)
    for limit, more in ((1, ["--limit-batches", "1"]), (None, [])):
        result = run(tiny_shards, tmp_path, "--arch", "lenet5", "-b", "4", "--test-only", "--resume", "auto", *more)
        assert json.loads((tmp_path / "eval.json").read_text())["limit_batches"] == result["limit_batches"] == limit


def test_the_metrics_are_summed_over_the_ranks(tiny_shards, tmp_path, monkeypatch):
    """Under DDP each rank trains and evaluates its share: the train and val rows and the test figure are
    of every rank's sums (`reduce_sum`). Here another rank stands in that took as many images as this one
    and got none right at no loss: every figure halves, exactly."""
    flags = ["--arch", "lenet5", "-b", "4", "--epochs", "1", "--limit-batches", "2"]
    alone = run(tiny_shards, tmp_path / "alone", *flags)

    def with_a_rank_that_got_none_right(t):
        t = t.clone()
        t[-1] *= 2  # the images counted twice, the loss and the hits once
        return t

    monkeypatch.setattr(train, "reduce_sum", with_a_rank_that_got_none_right)
    both = run(tiny_shards, tmp_path / "both", *flags)
    rows = [read_jsonl(tmp_path / out / "metrics.jsonl")[0] for out in ("alone", "both")]
    for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5"):
        assert rows[1][key] == rows[0][key] / 2, key
    assert [both[k] for k in ("test_loss", "test_top1", "test_top5")] == [
        alone[k] / 2 for k in ("test_loss", "test_top1", "test_top5")]


def test_final_json_keeps_the_best_val_top1_beside_the_last(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "evaluate", lambda *a: dict(loss=1.5, top1=30.0, top5=80.0))
    parts = argparse.Namespace(ema=None, eval_model=None, criterion=None, test=None, device=torch.device("cpu"))
    state = train.RunState(history=[dict(train_top1=20.0, val_top1=50.0), dict(train_top1=40.0, val_top1=45.0)],
                           best_acc=50.0, wall_time=12.0)
    args = argparse.Namespace(arch="lenet5", size=28, tta=False, output_dir=str(tmp_path))
    want = dict(arch="lenet5", size=28, epochs=2, test_top1=30.0, test_top5=80.0, test_loss=1.5, train_top1=40.0,
                val_top1=45.0, best_val_top1=50.0, wall_time_s=12.0, eval_model="model", tta=False)
    assert train.final_test(parts, state, args) == want
    assert json.loads((tmp_path / "final.json").read_text()) == want


def test_env_json_keeps_no_password_or_token_of_a_shards_url(monkeypatch):
    url = "https://ann:p%40ss@host/tiny?sv=1&sig=x"
    monkeypatch.setattr(sys, "argv", ["train.py", "--shards", url])
    assert train.environment(torch.device("cpu"), 1, "2 classes")["argv"] == [
        "train.py", "--shards", "https://ann:***@host/tiny?sv=1&sig=***"]


def test_args_json_and_the_checkpoint_keep_no_password_or_token_of_a_shards_url():
    url = "https://ann:p%40ss@host/tiny?sv=1&sig=x"
    args = argparse.Namespace(shards=url, lr=0.1, argv=["--shards", url, "--lr", "0.1"])
    assert train.saved_args(args) == {"shards": "https://ann:***@host/tiny?sv=1&sig=***", "lr": 0.1,
                                      "argv": ["--shards", "https://ann:***@host/tiny?sv=1&sig=***", "--lr", "0.1"]}
    # Hidden in the line to rerun as well: rerun it with the password and a token (a new one if this expired).
    assert checkpoint.continue_command(args, 1) == (
        "python train.py --shards 'https://ann:***@host/tiny?sv=1&sig=***' --lr 0.1 --resume auto")
    assert args.shards == "https://ann:p%40ss@host/tiny?sv=1&sig=x"  # the run itself still logs in


def test_shards_as_a_file_url_is_the_folder(train_shards):
    """--shards file:///data/shards was 'error: --shards file:///...: no such folder'."""
    shard_set = train.open_shards(train.parse_args(["--shards", Path(train_shards).resolve().as_uri(), "--arch", "lenet5"]))
    assert shard_set.location == str(Path(train_shards).resolve()) and shard_set.counts["train"] == 1000
