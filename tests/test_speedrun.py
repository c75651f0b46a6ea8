"""tools/speedrun.py on the synthetic shards: seeds run once each, the table and the time-to-accuracy curve."""
import argparse
import errno
import importlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import speedrun  # noqa: E402
from tests.conftest import refuse_writes_in  # noqa: E402

TINY = "--epochs 2 --warmup-epochs 1 --limit-batches 1 -b 8 --device cpu"


def as_if_trained_with(run, train_args, instead):
    """Make `run`'s record (process_wall.json's command, args.json) say it was trained with --train-args
    `instead` (a finished seed is reused only under the flags it was trained with; --wait-at-step holds a
    run that is not stopped), or into another --out (`train_args`, `instead`: the two folders)."""
    import train

    timing = run / "process_wall.json"
    saved = json.loads(timing.read_text())
    command = saved["command"].replace(train_args, instead)
    timing.write_text(json.dumps(dict(saved, command=command)))
    (run / "args.json").write_text(json.dumps(train.saved_args(train.parse_args(shlex.split(command)[1:]))))  # its values


@pytest.fixture(scope="module")
def seed0(shards, tmp_path_factory):
    """The --out of a speedrun of seed 0 alone (--train-args TINY), trained once for the tests that start
    from it (a train.py process each: seconds): treat as read-only, take a copy (`copy_seed0`)."""
    out = tmp_path_factory.mktemp("seed0") / "sr"
    speedrun.main(["--shards", str(shards), "--out", str(out), "--arch", "resnet10_64s2", "--seeds", "0",
                   "--train-args", TINY])
    return out


def copy_seed0(seed0, out):
    """`seed0`'s run of seed 0 in `out`/runs, as if trained there: a speedrun into `out` reuses it."""
    shutil.copytree(seed0 / "runs" / "seed0", out / "runs" / "seed0")
    as_if_trained_with(out / "runs" / "seed0", str(seed0), str(out))


def test_the_curve_puts_the_start_up_before_the_first_epoch():
    """The time not spent in epochs (imports, shards, compiling) comes first: each point is the minutes
    from the process's start, and the last one its whole time."""
    result = dict(seconds=150.0, metrics=[dict(epoch_time_s=30.0, val_top1=10.0), dict(epoch_time_s=60.0, val_top1=20.0)])
    assert speedrun.curve(result) == [(1.5, 10.0), (2.5, 20.0)]  # 60 s of start-up, then 30 s and 60 s


def test_the_curve_puts_each_epoch_at_the_end_of_its_validation_from_the_process_start():
    """train.py's process_s: each epoch's two checkpoints and the test, outside the epochs' time, were put
    before the first epoch, and every point but the last stood later than when its accuracy was known."""
    result = dict(seconds=150.0, metrics=[dict(epoch_time_s=30.0, val_top1=10.0, process_s=42.0),
                                          dict(epoch_time_s=60.0, val_top1=20.0, process_s=108.0)])
    assert speedrun.curve(result) == [(0.7, 10.0), (1.8, 20.0)]


def test_the_curve_of_a_seed_trained_again_starts_at_its_first_epoch():
    """A seed stopped and trained again: its process time is the second process's, its epochs both's, so
    they can sum to more; the start-up is then none, not a negative time before the first epoch."""
    result = dict(seconds=50.0, metrics=[dict(epoch_time_s=30.0, val_top1=10.0), dict(epoch_time_s=30.0, val_top1=20.0)])
    assert speedrun.curve(result) == [(0.5, 10.0), (1.0, 20.0)]

def test_sigterm_keeps_the_finished_seeds_and_the_stopped_one_trains_again(seed0, shards, tmp_path, capfd,
                                                                            monkeypatch):
    """SIGTERM to speedrun.py (a scheduler, gpu_session's --deadline) while seed 1 trains: train.py
    gets it passed on and checkpoints, speedrun.md keeps seed 0's row, the exit is 128 + 15; the
    rerun trains seed 1 from its start (its minutes count from its process's start). Two seeds then
    give a row each, a mean ± spread and a curve, and a run again trains nothing."""
    out = tmp_path / "sr"
    copy_seed0(seed0, out)  # seed 0 finished (trained with TINY into `out`)
    args = ["--shards", str(shards), "--out", str(out), "--arch", "resnet10_64s2", "--seeds", "0,1", "--train-args"]
    as_if_trained_with(out / "runs" / "seed0", TINY, TINY + " --wait-at-step 1")  # it would wait there
    proc = subprocess.Popen([sys.executable, speedrun.__file__, *args, TINY + " --wait-at-step 1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("waiting for a signal"):
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted at epoch 0 step 1: checkpoint saved" in stderr
    assert stderr.endswith("error: train.py of seed 1 failed (exit 143); rerun to train that run again\n")
    rows = [line.split("|")[1].strip() for line in (out / "speedrun.md").read_text().splitlines() if line.startswith("| ")]
    assert rows == ["seed", "0"]

    capfd.readouterr()
    as_if_trained_with(out / "runs" / "seed0", TINY + " --wait-at-step 1", TINY)
    speedrun.main([*args, TINY])
    assert "resumed from" not in "".join(capfd.readouterr())  # trained again from its start
    results = json.loads((out / "speedrun.json").read_text())
    assert [r["seed"] for r in results] == [0, 1]
    assert [m["epoch"] for m in results[1]["metrics"]] == [0, 1]

    for r in results:
        final = json.loads((out / "runs" / f"seed{r['seed']}" / "final.json").read_text())
        assert r["final"] == final and (final["epochs"], final["eval_model"], final["tta"]) == (2, "ema", True)
        minutes = [m for m, _ in r["curve"]]
        assert [top1 for _, top1 in r["curve"]] == [row["val_top1"] for row in r["metrics"]]
        assert 0 < minutes[0] < minutes[1] <= r["seconds"] / 60 + 1e-9  # the curve ends within the process's time
    md = (out / "speedrun.md").read_text().splitlines()
    assert md[0] == f"# python tools/speedrun.py --shards {shards} --out {out} --arch resnet10_64s2 --seeds 0,1 --train-args '{TINY}'"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in md if line.startswith("| ")][1:]
    assert [row[0] for row in rows] == ["0", "1", "mean ± spread"]
    f0, f1 = (r["final"] for r in results)
    assert rows[0][3:6] == [f"{f0['val_top1']:.2f}", f"{f0['test_top1']:.2f}", "ema + flip TTA"]
    mean, half = (f0["test_top1"] + f1["test_top1"]) / 2, abs(f0["test_top1"] - f1["test_top1"]) / 2
    assert rows[2][4] == f"{mean:.2f} ± {half:.2f}"
    assert (out / "speedrun.png").stat().st_size > 1000

    before = (out / "runs" / "seed1" / "final.json").stat().st_mtime_ns
    monkeypatch.setattr(speedrun.subprocess, "Popen", lambda *a, **k: pytest.fail("ran train.py again"))
    speedrun.main([*args, TINY])  # both seeds finished: nothing trains
    assert (out / "runs" / "seed1" / "final.json").stat().st_mtime_ns == before
    assert (out / "speedrun.md").read_text().splitlines() == md


def test_ablation_switches_off_one_part_per_run(seed0, shards, tmp_path):
    out = tmp_path / "sr"
    copy_seed0(seed0, out)  # the full recipe's run, finished
    speedrun.main(["--shards", str(shards), "--out", str(out), "--arch", "resnet10_64s2", "--seeds", "0",
                   "--train-args", TINY, "--ablate", "ema,tta"])
    args = {name: json.loads((out / "runs" / name / "args.json").read_text())
            for name in ("seed0", "seed0-no-ema", "seed0-no-tta")}
    assert [(a["ema"], a["tta"], a["label_smoothing"]) for a in args.values()] == \
        [(0.999, True, 0.1), (0.0, True, 0.1), (0.999, False, 0.1)]
    finals = [json.loads((out / "runs" / name / "final.json").read_text()) for name in args]
    assert [(f["eval_model"], f["tta"]) for f in finals] == [("ema", True), ("model", True), ("ema", False)]
    md = (out / "ablation.md").read_text().splitlines()
    assert md[1] == "# seed 0; each row: --recipe fast with one part switched off"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in md if line.startswith("| ")][1:]
    assert [row[:2] for row in rows] == [["nothing: the full recipe", ""], ["EMA of the weights", "`--ema 0`"],
                                         ["flip test-time augmentation", "`--no-tta`"]]
    assert [row[3] for row in rows] == [str(f["epochs"]) for f in finals]
    assert [row[4] for row in rows] == [f"{f['val_top1']:.2f}" for f in finals]
    assert [row[5] for row in rows[1:]] == [f"{f['val_top1'] - finals[0]['val_top1']:+.2f}" for f in finals[1:]]
    assert [r["variant"] for r in json.loads((out / "ablation.json").read_text())] == [None, "ema", "tta"]


def test_each_ablation_row_says_its_epochs():
    """Under --time-budget each run sets its own epochs from its measured epoch time: a variant without
    torch.compile trained 7 epochs where the full recipe trained 12, and the table said only its minutes
    and its 4 points less, as if switching the part off alone had cost them."""
    def result(variant, epochs, val):
        return dict(seed=0, variant=variant, seconds=180.0,
                    final=dict(epochs=epochs, val_top1=val, test_top1=val - 1))

    md = speedrun.render_ablation(result(None, 12, 40.0), [result("compile", 7, 36.0)], ["--ablate", "compile"],
                                  argparse.Namespace(augment="rrc"))
    assert md.splitlines()[3:] == [
        "| without | train.py flags | minutes (process) | epochs | val top-1 (%) | change in val (points) "
        "| test top-1 (%) |",
        "|---|---|---|---|---|---|---|",
        "| nothing: the full recipe | | 3.00 | 12 | 40.00 | | 39.00 |",
        "| torch.compile | `--no-compile` | 3.00 | 7 | 36.00 | -4.00 | 35.00 |"]


def trained_at_once(monkeypatch, fails={}):
    """speedrun.run_seed as if each run had trained (a minute, two epochs, val top-1 40, test 39), and no curve
    drawn: for what speedrun.py writes of the runs it plans; a (seed, variant) of `fails` fails with its exit code.
    Returns the variants it runs (the full recipe: None)."""
    def run_seed(args, seed, out, variant=None):
        runs.append(variant)
        if (seed, variant) in fails:
            raise subprocess.CalledProcessError(fails[seed, variant], ["train.py"])
        return dict(seed=seed, variant=variant, seconds=60.0, command="train.py --seed 0",
                    final=dict(arch=args.arch, epochs=2, val_top1=40.0, test_top1=39.0, eval_model="ema"),
                    metrics=[dict(epoch=e, val_top1=40.0, epoch_time_s=1.0, process_s=30.0 * e) for e in (1, 2)])

    runs = []
    monkeypatch.setattr(speedrun, "run_seed", run_seed)
    monkeypatch.setattr(speedrun, "plot", lambda results, png: None)
    return runs


def ablation_rows(out):
    """ablation.md's rows (their cells), less the header."""
    md = (out / "ablation.md").read_text().splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in md if line.startswith("| ")][1:]


def test_the_augmentation_row_names_the_augmentation_the_full_recipe_used(shards, tmp_path, monkeypatch):
    """`--train-args '--augment crop'`: the full recipe trained with the padded crop (args.json), and ablation.md
    said "without augmentation (random-resized crop + flip)", the recipe's, which no run used."""
    trained_at_once(monkeypatch)
    for augment, named in (("--augment crop", "random crop with padding + flip"), ("", "random-resized crop + flip")):
        speedrun.main(["--shards", str(shards), "--out", str(tmp_path / "sr"), "--seeds", "0", "--device", "cpu",
                       "--train-args", augment, "--ablate", "augment,ema"])
        assert [row[:2] for row in ablation_rows(tmp_path / "sr")] == [
            ["nothing: the full recipe", ""], [f"augmentation ({named})", "`--augment none`"],
            ["EMA of the weights", "`--ema 0`"]]


def test_a_failed_or_stopped_run_and_those_not_run_are_named(shards, tmp_path, monkeypatch, capsys):
    """--seeds 0,1,2 whose seed 1 failed: speedrun.md held seed 0's row alone, not a word of 1 and 2 (with seed 2
    failed, a mean ± spread of two seeds as if of all), and the error line named no run."""
    out = tmp_path / "sr"
    base = ["--shards", str(shards), "--out", str(out), "--device", "cpu", "--ablate", "ema,tta,smoothing"]
    trained_at_once(monkeypatch, fails={(1, None): 1})
    with pytest.raises(SystemExit) as exit:
        speedrun.main([*base, "--seeds", "0,1,2"])
    assert exit.value.code == 1
    assert capsys.readouterr().err == "error: train.py of seed 1 failed (exit 1); rerun to train that run again\n"
    md = (out / "speedrun.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in md if line.startswith("| ")] == ["seed", "0"]
    assert md[-2:] == ["", "Not finished: seed 1 (train.py exit 1), seed 2 (not run)"]

    trained_at_once(monkeypatch, fails={(0, "tta"): 143})  # stopped (SIGTERM) in the ablation
    with pytest.raises(SystemExit) as exit:
        speedrun.main([*base, "--seeds", "0"])
    assert exit.value.code == 143
    assert capsys.readouterr().err == ("error: train.py of seed 0 without flip test-time augmentation failed "
                                       "(exit 143); rerun to train that run again\n")
    assert [row[0] for row in ablation_rows(out)] == ["nothing: the full recipe", "EMA of the weights"]
    assert (out / "ablation.md").read_text().splitlines()[-2:] == [
        "", "Not finished: seed 0 without flip test-time augmentation (train.py exit 143), "
        "seed 0 without label smoothing (not run)"]


def test_the_train_py_line_of_a_checkout_whose_path_has_a_space():
    """speedrun.md's '# train.py FLAGS' line cut the command at its first space: in '/home/me/my runs/tinyin' it
    read "# train.py runs/tinyin/train.py' --shards ...", a path and a stray quote for the flags."""
    result = dict(seed=0, seconds=60.0, command="'/home/me/my runs/tinyin/train.py' --shards 's h' --seed 0",
                  final=dict(epochs=2, val_top1=40.0, test_top1=39.0, eval_model="ema"))
    assert speedrun.render([result], ["--seeds", "0"]).splitlines()[1] == "# train.py --shards 's h' --seed 0"


def test_a_part_the_full_recipe_has_off_too_is_not_run(shards, tmp_path, monkeypatch, capsys):
    """On the CPU the recipe has no bf16 (on CUDA only), and `--train-args --no-tta` none of the flip TTA:
    `--ablate amp,tta` trained the full recipe twice more, and the table's rows said 'without bf16 autocast:
    +0.00', as if it added nothing. They are not run, and named."""
    runs = trained_at_once(monkeypatch)
    speedrun.main(["--shards", str(shards), "--out", str(tmp_path / "sr"), "--seeds", "0", "--device", "cpu",
                   "--train-args", "--no-tta", "--ablate", "amp,ema,tta"])
    assert runs == [None, "ema"]
    assert [row[:2] for row in ablation_rows(tmp_path / "sr")] == [["nothing: the full recipe", ""],
                                                                  ["EMA of the weights", "`--ema 0`"]]
    assert (tmp_path / "sr" / "ablation.md").read_text().splitlines()[-1] == (
        "Not run, off in the full recipe too (its train.py flags are the same without them): "
        "bf16 autocast (`--no-amp`), flip test-time augmentation (`--no-tta`)")
    assert capsys.readouterr().out.splitlines()[:2] == [
        "--ablate amp: bf16 autocast is off in the full recipe too (`--no-amp` changes none of its train.py flags): "
        "not run",
        "--ablate tta: flip test-time augmentation is off in the full recipe too (`--no-tta` changes none of its "
        "train.py flags): not run"]


def finished_run(run, arch):
    """The files speedrun.py reads of a finished train.py run of `arch` (one epoch)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text(json.dumps(dict(epoch=0, val_top1=10.0, epoch_time_s=1.0)) + "\n")
    (run / "final.json").write_text(json.dumps(dict(arch=arch, epochs=1, val_top1=10.0, test_top1=9.0, eval_model="ema")))


def test_each_run_compiles_from_a_cache_of_its_own(tmp_path, monkeypatch):
    """torch.compile's caches (on by default, one folder for every process): the first run compiled cold and
    the second seed and each --ablate variant from its cache, in seconds, which under --time-budget bought
    them more epochs than the run they were set beside."""
    caches = []

    class Started(speedrun.Stop):
        def started(self, cmd, **popen):
            folder = Path(popen["env"]["TORCHINDUCTOR_CACHE_DIR"])
            caches.append((folder, sorted(os.listdir(folder))))
            (folder / "fxgraph").mkdir()  # what a compile leaves there
            finished_run(Path(cmd[cmd.index("--output-dir") + 1]), "resnet18_64")
            return Finished()

    class Finished:  # train.py's process, ended
        def wait(self):
            return 0

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(speedrun, "Stop", Started)
    args = argparse.Namespace(shards="shards", arch="resnet18_64", train_args="", device=None)
    for seed, variant in ((0, None), (1, None), (0, "tta")):
        speedrun.run_seed(args, seed, tmp_path, variant)
    assert len({folder for folder, _ in caches}) == 3 and [listing for _, listing in caches] == [[], [], []]
    assert [folder.exists() for folder, _ in caches] == [False] * 3  # removed after its run


def test_a_seed_trained_with_other_flags_in_the_same_out_trains_again(shards, tmp_path, monkeypatch, capsys):
    """A second speedrun into the same --out with another --arch (or --train-args) reused seed 0's
    run of the first: resnet10_64s2's figures under a `--arch resnet18_64` header, no word said."""
    out, started = tmp_path / "sr", []
    earlier = "train.py --arch resnet10_64s2 --seed 0"
    finished_run(out / "runs" / "seed0", "resnet10_64s2")
    (out / "runs" / "seed0" / "process_wall.json").write_text(json.dumps(dict(seconds=60.0, command=earlier)))

    class TrainPy:  # stands in for train.py's process: a finished run of the --arch it is given
        def __init__(self, cmd, cwd, env=None):
            started.append(cmd)
            finished_run(Path(cmd[cmd.index("--output-dir") + 1]), cmd[cmd.index("--arch") + 1])

        def wait(self):
            return 0

    importlib.import_module("train")  # before Popen is replaced: importing torch starts processes
    monkeypatch.setattr(speedrun.subprocess, "Popen", TrainPy)
    speedrun.main(["--shards", str(shards), "--out", str(out), "--seeds", "0", "--arch", "resnet18_64", "--device", "cpu"])
    assert f"{out / 'runs' / 'seed0'}: trained with other flags ({earlier}); training it again\n" in capsys.readouterr().out
    assert len(started) == 1
    assert json.loads((out / "speedrun.json").read_text())[0]["final"]["arch"] == "resnet18_64"
    assert json.loads((out / "runs" / "seed0" / "process_wall.json").read_text())["command"].endswith(
        f"--arch resnet18_64 --size 64 --recipe fast --seed 0 --output-dir {out / 'runs' / 'seed0'} --overwrite --device cpu")


def finished_seed0(monkeypatch, out, args, dataset=None, **values):
    """A finished run of seed 0 in `out` as speedrun.py would reuse it: trained with the train.py flags it gives
    `args` (process_wall.json), their values in args.json (but `values`), env.json's "dataset" `dataset`
    (None: no env.json); returns train.py's stand-ins' list of the commands they are started with."""
    import train

    run, started = out / "runs" / "seed0", []
    argv = speedrun.train_argv(args, 0, run)
    finished_run(run, "resnet18_64")
    command = shlex.join([str(speedrun.ROOT / "train.py"), *argv])
    (run / "process_wall.json").write_text(json.dumps(dict(seconds=60.0, command=command)))
    (run / "args.json").write_text(json.dumps(dict(train.saved_args(train.parse_args(argv)), **values)))
    (run / "env.json").unlink(missing_ok=True)
    if dataset:
        (run / "env.json").write_text(json.dumps(dict(device="cpu", dataset=dataset)))

    class TrainPy:  # stands in for train.py's process: a finished run
        def __init__(self, cmd, cwd, env=None):
            started.append(cmd)
            finished_run(Path(cmd[cmd.index("--output-dir") + 1]), "resnet18_64")

        def wait(self):
            return 0

    monkeypatch.setattr(speedrun.subprocess, "Popen", TrainPy)  # after torch's import, which starts processes
    return started


def test_a_seed_trained_with_the_same_flags_under_another_recipe_trains_again(tmp_path, monkeypatch, capsys):
    """The same command after the fast recipe was tuned (lr 0.4 to 0.8 in models/recipes.py): seed 0's run at lr 0.4
    was reused as the new recipe's, and with every seed finished the tuning never ran. A run whose args.json the
    command still gives is reused, also the epochs a --time-budget chose."""
    from models.recipes import FAST, RECIPES

    args = argparse.Namespace(shards="shards", arch="resnet18_64", train_args="--time-budget 5", device="cpu")
    started = finished_seed0(monkeypatch, tmp_path, args, epochs=12, budget_epochs=12)  # the budget's choice
    speedrun.run_seed(args, 0, tmp_path)
    assert started == []

    monkeypatch.setitem(RECIPES["fast"], ("resnet18_64", 64), dict(FAST, lr=0.8))
    speedrun.run_seed(args, 0, tmp_path)
    assert len(started) == 1
    assert capsys.readouterr().out.splitlines()[0] == (f"{tmp_path / 'runs' / 'seed0'}: trained with the same flags "
                                                       "but other values: --lr 0.4 (now 0.8); training it again")


def test_a_seed_trained_on_another_set_at_the_same_shards_path_trains_again(shards, tmp_path, monkeypatch, capsys):
    """A 10-class trial's set at --shards, deleted and the release built there, then the same command: seed 0's
    run on the 10 classes was reused as the release's. env.json says the set a run trained on."""
    from pipeline.checkpoint import classes_of
    from pipeline.index import read_manifest

    manifest = read_manifest(shards)
    here = f"{classes_of(manifest)}, {manifest['counts']['train']} train"
    args = argparse.Namespace(shards=str(shards), arch="resnet18_64", train_args="", device="cpu")
    for dataset, trained in ((here, False), (None, False), ("10 classes (0123456789ab), 5000 train", True)):
        started = finished_seed0(monkeypatch, tmp_path, args, dataset)
        speedrun.run_seed(args, 0, tmp_path)
        assert len(started) == trained
    assert capsys.readouterr().out.splitlines()[0] == (
        f"{tmp_path / 'runs' / 'seed0'}: trained on another set at --shards {shards} (10 classes (0123456789ab), "
        f"5000 train; now {here}); training it again")


def test_relative_shards_and_out_are_the_callers(shards, tmp_path, monkeypatch):
    """`--shards shards --out sr` run from another folder than the repo's root: train.py ran in the repo's root,
    so it read the repo's `shards` (or found none: 'no such folder') and wrote its run where speedrun.py did
    not look. It runs in the caller's folder, as speedrun.py does."""
    seen = []

    class TrainPy:  # stands in for train.py's process: where its relative paths lead, and a finished run there
        def __init__(self, cmd, cwd, env=None):
            where = Path(cwd or os.getcwd())
            seen.append([where / cmd[cmd.index(flag) + 1] for flag in ("--shards", "--output-dir")])
            if where == tmp_path:  # never into the repo's root
                finished_run(where / cmd[cmd.index("--output-dir") + 1], "resnet18_64")

        def wait(self):
            return 0

    importlib.import_module("train")  # before Popen is replaced: importing torch starts processes
    monkeypatch.setattr(speedrun.subprocess, "Popen", TrainPy)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").symlink_to(shards)
    speedrun.main(["--shards", "shards", "--out", "s r", "--seeds", "0", "--device", "cpu"])
    assert seen == [[tmp_path / "shards", tmp_path / "s r" / "runs" / "seed0"]]
    assert json.loads((tmp_path / "s r" / "speedrun.json").read_text())[0]["final"]["arch"] == "resnet18_64"


def test_a_tilde_in_shards_and_out_is_the_home_folder(shards, tmp_path, monkeypatch):
    """`--out=~/sr` (the = form; a quoted "~/sr", a job script's value) reached speedrun.py as typed: its tables and
    runs went into a folder named `~` in the current one. A leading ~ is the home folder, as for train.py."""
    seen = []

    class TrainPy:  # stands in for train.py's process: the paths it is given, and a finished run there
        def __init__(self, cmd, cwd, env=None):
            seen.append([cmd[cmd.index(flag) + 1] for flag in ("--shards", "--output-dir")])
            finished_run(Path(seen[-1][1]), "resnet18_64")

        def wait(self):
            return 0

    importlib.import_module("train")  # before Popen is replaced: importing torch starts processes
    monkeypatch.setattr(speedrun.subprocess, "Popen", TrainPy)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "shards").symlink_to(shards)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    speedrun.main(["--shards=~/shards", "--out=~/sr", "--seeds", "0", "--device", "cpu"])
    assert seen == [[f"{tmp_path}/home/shards", f"{tmp_path}/home/sr/runs/seed0"]]
    assert json.loads((tmp_path / "home" / "sr" / "speedrun.json").read_text())[0]["final"]["arch"] == "resnet18_64"
    assert list((tmp_path / "cwd").iterdir()) == []


def ctrl_c_to_speedrun(shards, tmp_path, monkeypatch, when):
    """speedrun.main with a stand-in for train.py's process that Ctrl-C reaches `when` ("start": as it is
    started, "train": while it trains) and that checkpoints and exits 130 on it; (the exit code, the signals
    speedrun.py passed on to train.py)."""
    sent = []

    class TrainPy:
        def __init__(self, cmd, cwd, env=None):
            if when == "start":
                os.kill(os.getpid(), signal.SIGINT)  # a handler runs before the next line

        def send_signal(self, signum):
            sent.append(signum)

        def wait(self):
            if when == "train":
                os.kill(os.getpid(), signal.SIGINT)
            self.returncode = 128 + signal.SIGINT
            return self.returncode

    importlib.import_module("train")  # before Popen is replaced: importing torch starts processes
    monkeypatch.setattr(speedrun.subprocess, "Popen", TrainPy)
    try:
        with pytest.raises(SystemExit) as exit:
            speedrun.main(["--shards", str(shards), "--out", str(tmp_path / "sr"), "--seeds", "0", "--device", "cpu"])
    except KeyboardInterrupt:
        pytest.fail(f"Ctrl-C at train.py's {when} went through speedrun.py as a traceback, train.py not told")
    return exit.value.code, sent


def test_a_signal_as_train_py_starts_is_passed_on_to_it(shards, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) the moment a seed's train.py had started, before speedrun.py passed signals on: a
    KeyboardInterrupt traceback (SIGTERM: speedrun.py died of it), and train.py, never told, trained on alone,
    orphaned. Now the handlers are set before its start, and the signal is passed on to it."""
    assert ctrl_c_to_speedrun(shards, tmp_path, monkeypatch, "start") == (130, [signal.SIGINT])


def test_ctrl_c_is_passed_on_to_train_py_and_ends_in_one_line(shards, tmp_path, monkeypatch, capsys):
    """SIGINT (Ctrl-C) while a seed trains was a KeyboardInterrupt traceback out of speedrun.py, whose
    train.py, if the signal reached speedrun.py alone, trained on without it. Now it is passed on, as
    SIGTERM is, and the exit is train.py's 130."""
    assert ctrl_c_to_speedrun(shards, tmp_path, monkeypatch, "train") == (130, [signal.SIGINT])
    assert capsys.readouterr().err == "error: train.py of seed 0 failed (exit 130); rerun to train that run again\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_out_that_is_a_file(shards, tmp_path):
    """A FileExistsError traceback."""
    (tmp_path / "sr").write_text("")
    with pytest.raises(SystemExit) as exit:
        speedrun.main(["--shards", str(shards), "--out", str(tmp_path / "sr"), "--device", "cpu"])
    assert exit.value.code == f"error: --out {tmp_path / 'sr'}: cannot be made a folder (File exists)"


def test_out_with_a_name_longer_than_the_file_system_takes(shards, tmp_path):
    """makedirs said 'cannot be made a folder (File name too long)', naming neither the name nor the limit."""
    out = tmp_path / ("o" * 300) / "sr"
    with pytest.raises(SystemExit) as exit:
        speedrun.main(["--shards", str(shards), "--out", str(out), "--device", "cpu"])
    assert exit.value.code == (f"error: --out {out}: the name '{'o' * 24}...{'o' * 8}' is 300 bytes, more than the "
                               "255 a name may have")
    assert list(tmp_path.iterdir()) == []


def test_out_it_may_not_write_in(shards, tmp_path, monkeypatch):
    """An --out there but another user's, or read-only: each seed's train.py failed to make its run folder,
    and the advice was 'rerun to train that run again'."""
    (tmp_path / "sr").mkdir()
    refuse_writes_in(monkeypatch, tmp_path / "sr", errno.EROFS)
    with pytest.raises(SystemExit) as exit:
        speedrun.main(["--shards", str(shards), "--out", str(tmp_path / "sr"), "--device", "cpu"])
    assert exit.value.code == f"error: --out {tmp_path / 'sr'}: cannot write in it (Read-only file system)"


def test_a_seed_named_twice_is_one_row(shards, tmp_path, monkeypatch):
    """`--seeds 0,0` gave seed 0's row twice and a mean ± spread of 0.00 minutes and points over them."""
    class TrainPy:  # stands in for train.py's process: a finished run
        def __init__(self, cmd, cwd, env=None):
            finished_run(Path(cmd[cmd.index("--output-dir") + 1]), cmd[cmd.index("--arch") + 1])

        def wait(self):
            return 0

    importlib.import_module("train")  # before Popen is replaced: importing torch starts processes
    monkeypatch.setattr(speedrun.subprocess, "Popen", TrainPy)
    speedrun.main(["--shards", str(shards), "--out", str(tmp_path / "sr"), "--seeds", "0,1,0", "--device", "cpu"])
    assert [r["seed"] for r in json.loads((tmp_path / "sr" / "speedrun.json").read_text())] == [0, 1]


@pytest.mark.parametrize("seeds, message", [("0,a", "not a whole number: 'a'"), ("0,-1", "must be at least 0, not -1"),
                                           ("", "not a whole number: ''")])
def test_bad_seeds_are_a_one_line_error(capsys, seeds, message):
    """In train.py's words for its --seed: '0,a' said 'comma-separated integers, not '0,a''; '0,-1' trained seed 0
    (the flags were checked with it alone), then train.py refused -1, and speedrun.py said to rerun."""
    with pytest.raises(SystemExit) as exit:
        speedrun.main(["--shards", "x", "--out", "y", "--seeds", seeds])
    assert (exit.value.code, capsys.readouterr().err) == (2, f"error: argument --seeds: {message}\n")


def test_a_part_named_twice_in_ablate_is_one_run(monkeypatch):
    """`--ablate ema,tta,ema` planned the no-ema run twice: ablation.md got its row twice."""
    planned = []

    def stop_at_the_check(args, variants):
        planned.append(variants)
        raise SystemExit(0)
    monkeypatch.setattr(speedrun, "check_train_flags", stop_at_the_check)
    with pytest.raises(SystemExit):
        speedrun.main(["--shards", "x", "--out", "y", "--ablate", "ema,tta,ema"])
    assert planned == [["ema", "tta"]]
    with pytest.raises(SystemExit):
        speedrun.main(["--shards", "x", "--out", "y", "--ablate", "all"])
    assert planned[-1] == list(speedrun.ABLATIONS)


def test_all_among_the_ablated_parts_is_every_part(monkeypatch, capsys):
    """'--ablate all,ema' said 'unknown part all; choose from: all, ema, ...', refusing what it offered."""
    planned = []
    monkeypatch.setattr(speedrun, "check_train_flags", lambda args, variants: planned.append(variants) or sys.exit(0))
    with pytest.raises(SystemExit):
        speedrun.main(["--shards", "x", "--out", "y", "--ablate", "ema,all"])
    assert planned == [list(speedrun.ABLATIONS)]
    with pytest.raises(SystemExit):
        speedrun.main(["--shards", "x", "--out", "y", "--ablate", "all,dropout"])
    assert capsys.readouterr().err.startswith("error: argument --ablate: unknown part dropout; ")


def test_a_variant_switches_its_part_off_whatever_the_train_args():
    """--train-args apply to every run; the variant's own flags come after them, so they win."""
    import train

    args = argparse.Namespace(shards="s", arch="resnet18_64", train_args="--ema 0.99 --tta", device="cpu")
    assert [(a.ema, a.tta) for a in (train.parse_args(speedrun.train_argv(args, 0, "run", variant))
                                     for variant in (None, "ema", "tta"))] == [(0.99, True), (0.0, True), (0.99, False)]


ABLATE = "all, ema, tta, smoothing, augment, nesterov, warmup, amp, channels-last, compile"


@pytest.mark.parametrize("ablate, said", [("ema,dropout", f"unknown part dropout; choose from: {ABLATE}"),
                                          ("dropout,ema,mixup", f"unknown parts dropout, mixup; choose from: {ABLATE}"),
                                          ("ema,", f"unknown part ''; choose from: {ABLATE}"),
                                          ("", f"empty; name parts ({ABLATE}), or leave it out for no ablation")])
def test_unknown_ablation_is_a_one_line_error(capsys, ablate, said):
    """It said 'unknown part(s)' for one part and for two; in argparse's form, as reproduce.py's --rows and
    gpu_session.py's --parts say theirs (it said '--ablate: unknown part ...'). An empty one (an unset shell
    variable) read as not given: no ablation, without a word."""
    with pytest.raises(SystemExit) as exit:
        speedrun.main(["--shards", "x", "--out", "y", "--ablate", ablate])
    assert (exit.value.code, capsys.readouterr().err) == (2, f"error: argument --ablate: {said}\n")


@pytest.mark.parametrize("extra, message", [
    (["--arch", "lenet5"], "argument --size: lenet5 takes 28, not 64"),
    (["--train-args", "--epochs 1"], "argument --warmup-epochs: must be below --epochs (1), not --recipe fast's 2"),
    # the full recipe takes it; its variant without the EMA refuses it ("... the flags of --ablate ema: ...")
    (["--ablate", "ema", "--train-args", "--ema-every 2"], "argument --ema-every: only acts with --ema"),
])
def test_train_flags_are_checked_before_any_run_starts(tmp_path, capsys, extra, message):
    """Both used to fail inside train.py, with the advice to rerun that run."""
    with pytest.raises(SystemExit):
        speedrun.main(["--shards", "x", "--out", str(tmp_path / "sr"), *extra])
    assert capsys.readouterr().err.splitlines()[-1].endswith(f": {message}")
    assert not (tmp_path / "sr").exists()


@pytest.mark.parametrize("train_args, named", [("--epochs 3 --seed=5 --outp X", "--output-dir, --seed"),
                                               ("--seed=5", "--seed")])
def test_train_args_may_not_set_what_speedrun_sets_for_each_run(tmp_path, capsys, train_args, named):
    """`--train-args '--seed 5'` won over each run's --seed: seeds 0 and 1 both trained seed 5, a spread
    of 0 in the table; `--outp X` (abbreviated) sent both into X. A value of one word (`--train-args
    --seed=5`, no '=' after --train-args) was argparse's "expected one argument" (tools/flag_values.py)."""
    with pytest.raises(SystemExit) as exit:
        speedrun.main(["--shards", "x", "--out", str(tmp_path / "sr"), "--train-args", train_args])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        f"error: --train-args: {named}: set by speedrun.py for each run (from its --shards, "
        "--arch, --seeds and --out; --recipe fast, --size 64)\n")
    assert not (tmp_path / "sr").exists()


@pytest.mark.parametrize("train_args, named", [("--resume auto", "--resume"),
                                               ("--test-only --weights w.pth", "--test-only")])
def test_train_args_that_would_not_train_from_the_start_are_refused(tmp_path, capsys, train_args, named):
    """`--resume auto` won over each run's --overwrite: a seed stopped and rerun went on from its checkpoint, and its
    minutes were the second process's alone; `--test-only` trained nothing, then a FileNotFoundError traceback
    (metrics.jsonl, final.json: it writes eval.json)."""
    with pytest.raises(SystemExit) as exit:
        speedrun.main(["--shards", "x", "--out", str(tmp_path / "sr"), "--train-args", train_args])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (f"error: --train-args: {named}: a speedrun trains each run from its start "
                                       "(--overwrite), its minutes counted from its process's start\n")
    assert not (tmp_path / "sr").exists()


def test_a_device_train_py_lacks_is_refused_before_any_run_starts(tmp_path, monkeypatch, capsys):
    """`--device cuda` on a machine without one: train.py refused it (exit 2) and speedrun.py told
    to "rerun to train that run again", which train.py refuses alike."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit:
        speedrun.main(["--shards", "x", "--out", str(tmp_path / "sr"), "--device", "cuda"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("error: train.py refuses the flags of the full recipe: argument "
                                       f"--device: cuda, but torch {torch.__version__} sees no CUDA device here\n")
    assert not (tmp_path / "sr").exists()


@pytest.mark.parametrize("name, reason", [("none", "no such folder"), ("file", "a file, not a shard folder"),
                                          ("empty", "not a shard set (no manifest.json); run `tinyin shard build` first")])
def test_shards_that_is_no_set_is_refused_before_any_run_starts(tmp_path, monkeypatch, name, reason):
    """`--shards nope` (a typo) started train.py, which refused it, and speedrun.py then said "train.py failed;
    rerun to train that run again". It is checked first, as tools/reproduce.py checks it."""
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(speedrun, "run_seed", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as exit:
        speedrun.main(["--shards", str(tmp_path / name), "--out", str(tmp_path / "sr"), "--device", "cpu"])
    assert exit.value.code == f"error: --shards {tmp_path / name}: {reason}"
    assert not (tmp_path / "sr").exists()


def test_a_run_train_py_refuses_is_not_told_to_rerun(shards, tmp_path, monkeypatch, capsys):
    """A refusal only train.py's run finds (exit 2) is not a failure a rerun mends."""
    def refused(args, seed, out, variant=None):
        raise subprocess.CalledProcessError(2, ["train.py"])

    monkeypatch.setattr(speedrun, "run_seed", refused)
    with pytest.raises(SystemExit) as exit:
        speedrun.main(["--shards", str(shards), "--out", str(tmp_path / "sr"), "--device", "cpu"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("error: train.py refused its flags (see its error above); a rerun with them is "
                                       "refused alike: change them\n")


def test_a_shards_urls_password_and_token_are_hidden_in_what_is_printed_and_written(tmp_path, monkeypatch, capsys):
    """speedrun.md, process_wall.json and the '$ train.py ...' line showed a --shards URL whole: results
    are published, logs shared."""
    url, hidden = "https://ann:pw@h/tiny?sv=1&sig=S", "https://ann:***@h/tiny?sv=1&sig=***"
    args = argparse.Namespace(shards=url, arch="resnet18_64", train_args="", device=None)

    class Done:  # train.py, finished at once
        def __init__(self, cmd, cwd, env=None):
            run = Path(cmd[cmd.index("--output-dir") + 1])
            run.mkdir(parents=True)
            (run / "final.json").write_text(json.dumps(dict(epochs=1, val_top1=1.0, test_top1=2.0, eval_model="ema")))
            (run / "metrics.jsonl").write_text("")

        def wait(self):
            return 0

    monkeypatch.setattr(speedrun.subprocess, "Popen", Done)
    result = speedrun.run_seed(args, 0, tmp_path)
    run = tmp_path / "runs" / "seed0"
    train_args = f"--shards '{hidden}' --arch resnet18_64 --size 64 --recipe fast --seed 0 --output-dir {run} --overwrite"
    assert capsys.readouterr().out == f"$ {sys.executable} {speedrun.ROOT / 'train.py'} {train_args}\n"
    assert json.loads((run / "process_wall.json").read_text())["command"] == f"{speedrun.ROOT / 'train.py'} {train_args}"
    assert speedrun.render([result], ["--shards", url, "--out", "o"]).splitlines()[:2] == [
        f"# python tools/speedrun.py --shards '{hidden}' --out o", f"# train.py {train_args}"]

