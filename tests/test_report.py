"""pipeline.report on hand-written run folders (exact table text, curves, errors), and
tools/reproduce.py on the synthetic set (tiny runs of train.py)."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cli import report_cmd
from pipeline.errors import user_errors
from pipeline.report import LENET_RECORDED, STUDY, _duration, plot_curves, render_study, render_table, study_row, write_report
from pipeline.schema import DEFAULT_SHARDS
from tests.conftest import refuse_writes_in, stop_by


def make_run(root, name, args, rows, final=None, env=None):
    run = root / name
    run.mkdir()
    (run / "args.json").write_text(json.dumps(args))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if final is not None:
        (run / "final.json").write_text(json.dumps(final))
    if env is not None:
        (run / "env.json").write_text(json.dumps(env))
    return run


def row(epoch, train_top1, val_top1, seconds=30.0):
    return dict(epoch=epoch, lr=0.001, train_loss=4.0 - epoch, train_top1=train_top1, val_loss=4.5 - epoch,
                val_top1=val_top1, val_top5=val_top1 * 2, images_per_s=1000.0, epoch_time_s=seconds)


@pytest.fixture
def runs(tmp_path):
    lenet = make_run(tmp_path, "lenet5-28", dict(arch="lenet5", size=28, epochs=2, batch_size=32, pretrained=False),
                     [row(0, 5.0, 4.5), row(1, 9.125, 7.0)],
                     final=dict(test_top1=6.875, wall_time_s=61.4), env=dict(world_size=1))
    resnet = make_run(tmp_path, "resnet18-224", dict(arch="resnet18", size=224, epochs=50, batch_size=50, pretrained=True),
                      [row(0, 40.0, 55.5, seconds=1900.0), row(1, 60.0, 61.25, seconds=1900.0)],
                      env=dict(world_size=2))  # unfinished: no final.json yet
    alexnet = make_run(tmp_path, "alexnet-64", dict(arch="alexnet", size=64, epochs=1, batch_size=100,
                                                    pretrained=False, weights="/w/alexnet-owt-7be5be79.pth"),
                       [row(0, 1.0, 2.0, seconds=7.25)], final=dict(test_top1=1.5, wall_time_s=7.25))
    return [lenet, resnet, alexnet]


def test_render_table_exact(runs):
    assert render_table(runs) == (
        "| Method | Image scaling | Epochs | Batch size | Training accuracy | Validation accuracy | Test accuracy | Wall time |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| LeNet-5 | 28x28 grey | 2 | 32 | 9.12% | 7.00% | 6.88% | 1 min 01 s |\n"
        "| ResNet-18, ImageNet-pretrained | 224x224 RGB (64x64 upscaled) | 2 of 50 | 50 x 2 processes | 60.00% | 61.25% | - | 1 h 03 min |\n"
        "| AlexNet, from alexnet-owt-7be5be79.pth | 64x64 RGB | 1 | 100 | 1.00% | 2.00% | 1.50% | 7.3 s |\n"
    )


def test_a_run_given_as_dot_or_dot_dot_is_named_by_its_folder(runs, monkeypatch):
    """`tinyin report .` in a run folder named its row '' (a table row of `|  | 2 | ...`, a curve labelled ' train'),
    and `tinyin report ..` from a folder inside it '..'."""
    monkeypatch.chdir(runs[0])
    (runs[0] / "sub").mkdir()
    assert render_study(["."]).splitlines()[2].startswith("| lenet5-28 | 2 | 32 | ")
    monkeypatch.chdir(runs[0] / "sub")
    assert render_study([".."]).splitlines()[2].startswith("| lenet5-28 | 2 | 32 | ")


def test_a_runs_time_is_seconds_below_a_minute_minutes_below_an_hour_then_hours(tmp_path):
    """At the bounds (a minute, an hour) and rounded to the second, not cut: 90.6 s is 1 min 31 s."""
    times = [59.9, 60.0, 90.6, 3599.4, 3600.0, 5400.0]
    dirs = [make_run(tmp_path, f"run{i}", dict(arch="lenet5", size=28, epochs=1), [row(0, 5.0, 4.5)],
                     final=dict(test_top1=1.0, wall_time_s=t)) for i, t in enumerate(times)]
    walls = [line.rsplit("|", 2)[1].strip() for line in render_table(dirs).splitlines()[2:]]
    assert walls == ["59.9 s", "1 min 00 s", "1 min 31 s", "59 min 59 s", "1 h 00 min", "1 h 30 min"]


@pytest.mark.parametrize("seconds, said, minutes", [
    (0.25, "0.3 s", "0.0"), (0.35, "0.4 s", "0.0"), (0.45, "0.5 s", "0.0"), (12.25, "12.3 s", "0.2"),
    (9, "9.0 s", "0.2"), (27, "27.0 s", "0.5"), (90.5, "1 min 31 s", "1.5"), (91.5, "1 min 32 s", "1.5"),
    (150.5, "2 min 31 s", "2.5"), (5430, "1 h 31 min", "90.5"), (5490, "1 h 32 min", "91.5"),
    (5429.5, "1 h 30 min", "90.5")])
def test_a_runs_time_at_a_half_rounds_up(tmp_path, seconds, said, minutes):
    """Python's round and format round half to even, on the float's binary value: 0.25 s was '0.2 s' but 0.45 s
    '0.5 s', 90.5 s '1 min 30 s' but 91.5 s '1 min 32 s', 5430 s '1 h 30 min' but 5490 s '1 h 32 min', and the
    study table's minutes of 9 s '0.1' but of 27 s '0.5'."""
    run = make_run(tmp_path, "run", dict(arch="resnet18", size=64, epochs=1, batch_size=100), [row(0, 5.0, 4.5)],
                   final=dict(test_top1=1.0, wall_time_s=seconds))
    assert render_table([run]).splitlines()[2].endswith(f" | {said} |")
    assert render_study([run]).splitlines()[2].endswith(f" | {minutes} |")


@pytest.mark.parametrize("seconds, said", [
    (59.94, "59.9 s"), (59.95, "1 min 00 s"), (59.96, "1 min 00 s"), (59.99, "1 min 00 s"),
    (119.4, "1 min 59 s"), (119.5, "2 min 00 s"), (3599.4, "59 min 59 s"), (3599.5, "1 h 00 min"),
    (3599.9, "1 h 00 min"), (3629.9, "1 h 00 min"), (3659.0, "1 h 01 min"), (7169.9, "1 h 59 min"),
    (7199.0, "2 h 00 min"), (86399.6, "24 h 00 min")])
def test_a_runs_time_that_rounds_up_to_a_units_bound_is_said_in_the_larger_unit(seconds, said):
    """59.96 s printed '60.0 s', and the hours cut their minutes: 7199 s (1 h 59 min 59 s) was '1 h 59 min'."""
    assert _duration(seconds) == said


def test_not_a_training_run(tmp_path, runs):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as e:
        render_table([runs[0], empty])
    assert str(e.value) == f"{empty}: not a training run (no metrics.jsonl)"


def test_a_run_folder_that_is_not_there_is_said_as_a_missing_shards_folder_is(tmp_path, runs):
    """`tinyin report runs/lenet5-82` (a typo) was click's usage error, exit 2: "Invalid value for 'RUNS...':
    Directory '...' does not exist.", where a folder that is no run, train.py's missing --shards and the
    benches' are tinyin's one line, exit 1 (README, Errors)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    (tmp_path / "file").write_text("")
    for missing, said in ((tmp_path / "none", "no such folder"), (tmp_path / "file", "a file, not a run folder")):
        result = CliRunner().invoke(main, ["report", str(runs[0]), str(missing), "--out", str(tmp_path / "report")])
        assert (result.exit_code, result.output) == (1, f"error: {missing}: {said}\n")
    assert not (tmp_path / "report").exists()


def test_unreadable_run_files_are_one_line_errors_naming_the_file(tmp_path, runs):
    from click.testing import CliRunner

    from pipeline.cli import main

    def report(*args):
        result = CliRunner().invoke(main, ["report", *map(str, args)])
        return result.exit_code, result.output.strip()

    run = runs[0]
    good = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(good + '{"epoch": 2, "lr": 0.001}\n')
    assert report(run) == (1, f"error: {run / 'metrics.jsonl'}: line 3: not a metrics row "
                              "(no train_loss, train_top1, val_loss, val_top1)")
    (run / "metrics.jsonl").write_text(good + '{"epoch": 2, "lr": 0.001 "train_loss": 1}\n')
    assert report(run) == (1, f"error: {run / 'metrics.jsonl'}: line 3: not a metrics row "
                              "(Expecting ',' delimiter: line 1 column 26 (char 25))")
    (run / "metrics.jsonl").write_text(good + "[]\n")
    assert report(run) == (1, f"error: {run / 'metrics.jsonl'}: line 3: not a metrics row (a list)")
    for line, kind in (("3", "a number"), ("2.5", "a number"), ('"x"', "text"), ("null", "null"), ("true", "true")):
        (run / "metrics.jsonl").write_text(good + line + "\n")  # Python's names: 'a int', 'a str', 'a NoneType'
        assert report(run) == (1, f"error: {run / 'metrics.jsonl'}: line 3: not a metrics row ({kind})")
    (run / "metrics.jsonl").write_text(good)
    args = (run / "args.json").read_text()
    (run / "args.json").write_text("[]")
    assert report(run) == (1, f"error: {run / 'args.json'}: not a JSON object (a list)")
    (run / "args.json").write_text("40")
    assert report(run) == (1, f"error: {run / 'args.json'}: not a JSON object (a number)")
    (run / "args.json").write_text(args[:-1])
    assert report(run) == (1, f"error: {run / 'args.json'}: not a JSON object "
                              f"(Expecting ',' delimiter: line 1 column {len(args)} (char {len(args) - 1}))")
    (run / "args.json").write_text(args)
    # A value of another type than train.py writes (a hand edit) was a traceback from the middle of the table.
    (run / "env.json").write_text('{"world_size": null}')
    assert report(run) == (1, f"error: {run / 'env.json'}: world_size is not a whole number (null)")
    (run / "env.json").write_text('{"world_size": 1}')
    (run / "metrics.jsonl").write_text(good + json.dumps(row(2, "9%", 7.0)) + "\n")
    assert report(run) == (1, f"error: {run / 'metrics.jsonl'}: line 3: not a metrics row (train_top1 is not a "
                              'number ("9%"))')
    (run / "metrics.jsonl").write_text(good)
    out = run / "args.json" / "report"  # under a file
    assert report(run, "--out", out) == (1, f"error: --out {out}: cannot be made a folder (Not a directory)")


def test_plot_and_write_report(tmp_path, runs):
    png = plot_curves(runs, tmp_path / "c.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md, png = write_report(runs, tmp_path / "report")
    assert png == str(tmp_path / "report" / "curves.png")
    text = open(md).read()
    assert render_table(runs) in text and "![learning curves](curves.png)" in text


def test_the_report_commands_help_names_every_file_it_writes(tmp_path, runs):
    """`tinyin report --help` named report.md and curves.png, not report.json."""
    write_report(runs, tmp_path / "report")
    help_ = next(param.help for param in report_cmd.params if param.name == "out")
    assert [name for name in sorted(os.listdir(tmp_path / "report")) if name not in help_] == []


def test_limited_runs_say_so(tmp_path):
    run = tmp_path / "quick"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"arch": "resnet18", "size": 64, "epochs": 1, "batch_size": 100,
                                               "limit_batches": 100}))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "train_top1": 1.0, "val_top1": 2.0, "train_loss": 5,
                                                   "val_loss": 5, "val_top5": 8, "epoch_time_s": 60}) + "\n")
    assert "| ResNet-18 | 64x64 RGB | 1 (100 batches each) | 100 |" in render_table([run])


def test_an_unfinished_run_that_no_train_py_holds_says_it_stopped_or_failed(tmp_path):
    """A run that failed (or was stopped) after 2 of its 40 epochs said "2 of 40", as one still training does: a
    user could wait on it. train.py holds OUTPUT_DIR/.train.lock while it trains; where the file is and no one
    holds it, the run says it stopped or failed. Held, or no file (a train.py from before it), "2 of 40" alone."""
    run = make_run(tmp_path, "lenet5-28", dict(arch="lenet5", size=28, epochs=40, batch_size=32),
                   [row(0, 5.0, 4.5), row(1, 9.125, 7.0)])
    cells = lambda: (render_table([run]).splitlines()[2].split(" | ")[2],  # noqa: E731
                     render_study([run]).splitlines()[2].split(" | ")[1])
    assert cells() == ("2 of 40", "2 of 40")
    (run / ".train.lock").touch()
    assert cells() == ("2 of 40, stopped or failed", "2 of 40, stopped or failed")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
                               "fcntl.lockf(f, fcntl.LOCK_EX); print(flush=True); sys.stdin.read()",
                               str(run / ".train.lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # held
        assert cells() == ("2 of 40", "2 of 40")
    finally:
        holder.communicate("")
    (run / "final.json").write_text(json.dumps(dict(epochs=2, test_top1=6.875, wall_time_s=61.4)))
    assert cells() == ("2 of 40", "2 of 40")  # finished (final.json): it neither stopped nor failed


def test_a_final_json_of_fewer_epochs_than_the_metrics_is_ignored(tmp_path):
    # A 2-epoch run resumed to --epochs 400 and stopped in epoch 3: train.py (before it removed
    # final.json at the start) left the 2-epoch run's test figure and wall time, shown as this run's.
    run = make_run(tmp_path, "resumed", dict(arch="lenet5", size=28, epochs=400, batch_size=32),
                   [row(0, 5.0, 4.5), row(1, 9.125, 7.0), row(2, 11.0, 8.0)],
                   final=dict(arch="lenet5", size=28, epochs=2, test_top1=6.875, wall_time_s=61.4))
    assert render_table([run]).splitlines()[2] == "| LeNet-5 | 28x28 grey | 3 of 400 | 32 | 11.00% | 8.00% | - | 1 min 30 s |"


def test_a_final_json_of_more_epochs_than_the_metrics_is_ignored(tmp_path):
    """A 3-epoch run resumed from its epoch-1 checkpoint and stopped: its metrics are rewritten to the checkpoint's
    epoch, and the 3-epoch run's final.json, left there, is not this run's test figure or time."""
    run = make_run(tmp_path, "rewound", dict(arch="lenet5", size=28, epochs=3, batch_size=32), [row(0, 5.0, 4.5)],
                   final=dict(arch="lenet5", size=28, epochs=3, test_top1=6.875, wall_time_s=91.4))
    assert render_table([run]).splitlines()[2] == "| LeNet-5 | 28x28 grey | 1 of 3 | 32 | 5.00% | 4.50% | - | 30.0 s |"


def test_a_run_stopped_before_its_first_epoch_ended_says_no_time(tmp_path):
    """A run stopped in its first epoch has no metrics row nor final.json: nothing records its time, which the
    tables said as '0.0 s' and '0.0' minutes, and the study's footer as '0.0 min'."""
    run = make_run(tmp_path, "stopped", dict(arch="lenet5", size=28, epochs=40, batch_size=32), [])
    assert render_table([run]).splitlines()[2] == "| LeNet-5 | 28x28 grey | 0 of 40 | 32 | - | - | - | - |"
    lines = render_study([run]).splitlines()
    assert lines[2] == ("| stopped | 0 of 40 | 32 | - / - / - | 0.218 / 0.220 (Table 2) | 0.139: val after epoch 30 "
                        "(lenet.ipynb; it ran 30 epochs) | (not at epoch 30) | - |")
    assert lines[4] == "Training time, sum of the rows: -."
    finished = make_run(tmp_path, "finished", dict(arch="lenet5", size=28, epochs=1, batch_size=32), [row(0, 5.0, 4.5)],
                        final=dict(test_top1=1.0, wall_time_s=90.0))
    assert render_study([run, finished]).splitlines()[5] == "Training time, sum of the rows: 1.5 min."


def test_blank_lines_in_the_metrics_are_skipped(tmp_path):
    """An editor's trailing blank line (or one between rows) is no metrics row, and no error."""
    run = make_run(tmp_path, "edited", dict(arch="lenet5", size=28, epochs=2, batch_size=32), [])
    (run / "metrics.jsonl").write_text(json.dumps(row(0, 5.0, 4.5)) + "\n\n" + json.dumps(row(1, 9.0, 7.0)) + "\n  \n")
    assert render_table([run]).splitlines()[2] == "| LeNet-5 | 28x28 grey | 2 | 32 | 9.00% | 7.00% | - | 1 min 00 s |"


def test_augmented_runs_say_so(tmp_path):
    run = tmp_path / "aug"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"arch": "lenet5", "size": 28, "epochs": 1, "batch_size": 32,
                                               "augment": True}))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "train_top1": 1.0, "val_top1": 2.0, "train_loss": 5,
                                                   "val_loss": 5, "val_top5": 8, "epoch_time_s": 60}) + "\n")
    assert "| LeNet-5 + crop/flip augmentation | 28x28 grey | 1 | 32 |" in render_table([run])
    # mixing, an EMA and TTA change the figures too: a run with them read like a plain one
    args = json.loads((run / "args.json").read_text())
    (run / "args.json").write_text(json.dumps(dict(args, augment="rrc", mix="cutmix", ema=0.999, tta=True)))
    assert ("| LeNet-5 + random-resized crop/flip augmentation + cutmix + EMA 0.999 + flip TTA | 28x28 grey | 1 | 32 |"
            in render_table([run]))


def test_render_study_beside_the_study(tmp_path):
    lenet = make_run(tmp_path, "lenet5-28", dict(arch="lenet5", size=28, epochs=40, batch_size=32),
                     [row(e, 10.0 + e, 5.0 + e / 4) for e in range(31)], final=dict(test_top1=12.5, wall_time_s=600.0))
    r224 = make_run(tmp_path, "resnet18-224", dict(arch="resnet18", size=224, epochs=10, batch_size=100,
                                                   weights="/w/resnet18-f37072fd.pth"),
                    [row(0, 50.0, 60.0)], final=dict(test_top1=59.0, wall_time_s=90.0))
    a50 = make_run(tmp_path, "alexnet-224-50", dict(arch="alexnet", size=224, epochs=50, batch_size=100, pretrained=True),
                   [row(0, 50.0, 60.0, seconds=60.0)])
    scratch = make_run(tmp_path, "resnet18-224-scratch", dict(arch="resnet18", size=224, epochs=2, batch_size=100),
                       [row(0, 1.0, 2.0)])
    assert render_study([lenet, r224, a50, scratch], not_run=[("squeezenet1_1-224", "not run: no ImageNet weights here")],
                        wall_s=900) == (
        "| Row | Epochs | Batch | Ours: train / val / test | Study reported: train / val | Study recorded | Ours, comparable | Minutes |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| lenet5-28 | 31 of 40 | 32 | 0.400 / 0.125 / 0.125 | 0.218 / 0.220 (Table 2) | "
        "0.139: val after epoch 30 (lenet.ipynb; it ran 30 epochs) | val 0.122 after epoch 30 | 10.0 |\n"
        "| resnet18-224 | 1 of 10 | 100 | 0.500 / 0.600 / 0.590 | 0.628 / 0.625 (Table 3, 10 epochs) | "
        "0.667 / 0.658: saved model, val / test (epochs not recorded) | val / test 0.600 / 0.590 | 1.5 |\n"
        "| alexnet-224-50 | 1 of 50 | 100 | 0.500 / 0.600 / - | 0.590 / 0.587 (Table 3, 50 epochs) | "
        "0.570 / 0.562: saved model, val / test (epochs not recorded) | val / test 0.600 / - | 1.0 |\n"
        "| resnet18-224-scratch | 1 of 2 | 100 | 0.010 / 0.020 / - | no such row in the study | - | - | 0.5 |\n"
        "| squeezenet1_1-224 | - | - | not run: no ImageNet weights here | - | - | - | - |\n"
        "\n"
        "Training time, sum of the rows: 13.0 min; the whole table, wall clock (start-up, evaluation and test included): 15.0 min.\n"
    )


def test_the_table_gives_the_last_epochs_accuracies(tmp_path):
    """The study's tables give the trained model's accuracy: the last epoch's, not the best one seen."""
    run = make_run(tmp_path, "lenet5-28", dict(arch="lenet5", size=28, epochs=2, batch_size=32),
                   [row(0, 5.0, 9.0), row(1, 4.0, 8.0)])
    assert render_table([run]).splitlines()[2].split(" | ")[4:6] == ["4.00%", "8.00%"]
    assert render_study([run]).splitlines()[2].split(" | ")[3] == "0.040 / 0.080 / -"

def test_every_study_row_says_the_studys_figures(tmp_path):
    """Each row's reported and recorded figures as ../shared/STUDY.md gives them (the tests above show 4
    of the 10 rows): a mistyped figure set every run of its row beside a number the study never had."""
    saved = ": saved model, val / test (epochs not recorded)"
    want = {  # (arch, size, epochs, pretrained): (reported, recorded), in STUDY.md's figures
        ("lenet5", 28, 40, False): ("0.218 / 0.220 (Table 2)", "0.139: val after epoch 30 (lenet.ipynb; it ran 30 epochs)"),
        ("alexnet", 64, 40, False): ("0.237 / 0.240 (Table 2)", "-"),
        ("squeezenet1_1", 64, 40, False): ("0.233 / 0.230 (Table 2)", "-"),
        ("resnet18", 64, 40, False): ("0.228 / 0.237 (Table 2)", "0.079: val after epoch 1 (run_models2.ipynb, interrupted)"),
        ("alexnet", 224, 10, True): ("0.562 / 0.573 (Table 3, 10 epochs)", "0.570 / 0.562" + saved),
        ("squeezenet1_1", 224, 10, True): ("0.589 / 0.586 (Table 3, 10 epochs)", "0.551 / 0.539" + saved),
        ("resnet18", 224, 10, True): ("0.628 / 0.625 (Table 3, 10 epochs)", "0.667 / 0.658" + saved),
        ("alexnet", 224, 50, True): ("0.590 / 0.587 (Table 3, 50 epochs)", "0.570 / 0.562" + saved),
        ("squeezenet1_1", 224, 50, True): ("0.544 / 0.546 (Table 3, 50 epochs)", "0.551 / 0.539" + saved),
        ("resnet18", 224, 50, True): ("0.660 / 0.665 (Table 3, 50 epochs)", "0.667 / 0.658" + saved),
    }
    runs = [make_run(tmp_path, f"{arch}-{size}-{epochs}", dict(arch=arch, size=size, epochs=epochs, pretrained=pretrained),
                     [row(0, 1.0, 2.0)]) for arch, size, epochs, pretrained in want]
    assert [line.split(" | ")[4:6] for line in render_study(runs).splitlines()[2:12]] == [list(v) for v in want.values()]
    assert LENET_RECORDED == {1: 0.007, 2: 0.007, 3: 0.008, 4: 0.015, 5: 0.020, 10: 0.061, 15: 0.098, 20: 0.115,
                              25: 0.130, 29: 0.141, 30: 0.139}  # the curve plotted beside LeNet-5 runs

def test_a_run_on_other_data_is_not_set_beside_the_study(tmp_path):
    """A run on 10 synthetic classes sat beside the study's 200-class figures as if comparable."""
    args, rows = dict(arch="lenet5", size=28, epochs=40, batch_size=32), [row(0, 70.0, 72.0)]
    small = make_run(tmp_path, "synthetic", args, rows, env=dict(dataset="10 classes (0123456789ab), 1000 train"))
    full = make_run(tmp_path, "release", args, rows, env=dict(dataset="200 classes (0123456789ab), 100000 train"))
    # a build with --on-error skip that left images out: all the classes, not all the train images
    skipped = make_run(tmp_path, "skipped", args, rows, env=dict(dataset="200 classes (0123456789ab), 99990 train"))
    assert "| not comparable: trained on 200 classes (0123456789ab), 99990 train, the study on the full release |" in (
        render_study([skipped]).splitlines()[2])
    lines = render_study([small, full]).splitlines()
    assert lines[2] == ("| synthetic | 1 of 40 | 32 | 0.700 / 0.720 / - | not comparable: trained on 10 classes "
                        "(0123456789ab), 1000 train, the study on the full release | - | - | 0.5 |")
    assert lines[3].startswith("| release | 1 of 40 | 32 | 0.700 / 0.720 / - | 0.218 / 0.220 (Table 2) |")


def test_a_run_on_some_batches_of_each_epoch_is_not_set_beside_the_study(tmp_path):
    """`reproduce.py --rows resnet18-64 --epochs 1 --limit-batches 5` (its quick look) on the release set the val
    accuracy of 5 batches of training, on 5 batches of val, beside the study's recorded 0.079 as "comparable". A
    limit that the epoch does not reach (batch 50 x 2000 = the 100000 images) trained on all of them."""
    full = dict(dataset="200 classes (0123456789ab), 100000 train")
    args = dict(arch="resnet18", size=64, epochs=1, batch_size=50, norm="imagenet")
    quick = make_run(tmp_path, "quick", dict(args, limit_batches=5), [row(0, 1.0, 2.0)], env=full)
    ddp = make_run(tmp_path, "ddp", dict(args, batch_size=25, limit_batches=1999), [row(0, 1.0, 2.0)],
                   env=dict(full, world_size=2))
    whole = make_run(tmp_path, "whole", dict(args, limit_batches=2000), [row(0, 1.0, 2.0)], env=full)
    lines = render_study([quick, ddp, whole]).splitlines()
    assert lines[2] == ("| quick | 1 (5 batches each) | 50 | 0.010 / 0.020 / - | not comparable: trained and evaluated on "
                        "--limit-batches 5 (250 of the 100000 train images an epoch), the study on every image "
                        "| - | - | 0.5 |")
    assert "| not comparable: trained and evaluated on --limit-batches 1999 (99950 of the 100000 train images an " in (
        lines[3])
    assert lines[4].startswith("| whole | 1 (2000 batches each) | 50 | 0.010 / 0.020 / - | 0.228 / 0.237 (Table 2) | "
                               "0.079: val after epoch 1 (run_models2.ipynb, interrupted) | val 0.020 after epoch 1 |")
    (quick / "args.json").write_text(json.dumps(dict(args, limit_batches="5")))  # by hand
    with pytest.raises(ValueError, match=r'/quick/args.json: limit_batches is not a whole number or null \("5"\)$'):
        render_study([quick])


def test_a_bar_in_a_runs_or_weights_name_stays_in_its_cell(tmp_path):
    """A run folder `lr|0.1` (or weights `a|b.pth`) ended its cell at the `|`: its epochs stood under Batch, its
    batch under the accuracies, one cell too many. It is escaped, as Markdown allows in a table."""
    args = dict(arch="alexnet", size=64, epochs=1, batch_size=100, pretrained=False, weights="/w/a|b.pth")
    run = make_run(tmp_path, "lr|0.1", args, [row(0, 1.0, 2.0, seconds=7.25)], final=dict(test_top1=1.5))
    assert render_table([run]).splitlines()[2] == (
        "| AlexNet, from a\\|b.pth | 64x64 RGB | 1 | 100 | 1.00% | 2.00% | 1.50% | 7.3 s |")
    assert render_study([run]).splitlines()[2].startswith("| lr\\|0.1 | 1 | 100 | 0.010 / 0.020 / 0.015 |")


def test_recorded_epoch_not_reached(tmp_path):
    run = make_run(tmp_path, "resnet18-64", dict(arch="resnet18", size=64, epochs=40, batch_size=50), [])
    assert "| 0.079: val after epoch 1 (run_models2.ipynb, interrupted) | (not at epoch 1) |" in render_study([run])


def test_write_report_study_section_and_json(tmp_path, runs):
    md, _ = write_report(runs, tmp_path / "r", not_run=[("alexnet-224", "not run: no ImageNet weights here")], wall_s=61.0)
    text = open(md).read()
    assert "## Beside the study\n\n" + render_study(runs, [("alexnet-224", "not run: no ImageNet weights here")], 61.0) in text
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["lenet5-28", "resnet18-224", "alexnet-64"]
    assert data["not_run"] == [["alexnet-224", "not run: no ImageNet weights here"]] and data["wall_s"] == 61.0


REPRODUCE = Path(__file__).resolve().parents[1] / "tools" / "reproduce.py"
sys.path.insert(0, str(REPRODUCE.parent))
from reproduce import check_shards, child_env, table_times, union_seconds  # noqa: E402


def test_a_shards_url_that_cannot_be_parsed_is_refused_before_any_row():
    """reproduce.py's and speedrun.py's check of --shards (before any run starts) asked is_set_url first, outside
    its refusal: `http://[::1` was urllib's 'Invalid IPv6 URL' traceback."""
    with pytest.raises(SystemExit) as e:
        check_shards("http://[::1")
    assert e.value.code == "error: http://[::1: not a URL that can be read (Invalid IPv6 URL)"


def reproduce_here(monkeypatch, capsys, *args):
    """tools/reproduce.py run as a script with `args` in this process, for a call it refuses (a process of its own
    paid its start for a one-line refusal): (its exit code, its stderr)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [str(REPRODUCE), *args])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(REPRODUCE), run_name="__main__")
    code, err = exit.value.code, capsys.readouterr().err
    if isinstance(code, str):  # as Python ends a process on sys.exit("..."): the text on stderr, exit code 1
        code, err = 1, f"{err}{code}\n"
    return code, err


def test_reproduce_hides_a_shards_urls_password_and_token(tmp_path, capsys):
    """The '== ROW: train.py ...' line and ROW/reproduce.json showed a --shards URL whole."""
    from reproduce import Stop, train_row

    cmd = [sys.executable, "-c", "pass", "--shards", "https://ann:pw@h/tiny?sig=S"]
    assert train_row("row", tmp_path / "row", cmd, Stop()) == 0
    assert capsys.readouterr().out == "== row: -c pass --shards 'https://ann:***@h/tiny?sig=***'\n"
    record = json.loads((tmp_path / "row" / "reproduce.json").read_text())
    assert record["command"] == ["-c", "pass", "--shards", "https://ann:***@h/tiny?sig=***"]


def test_reproduce_lists_a_table3_row_without_weights_as_not_run(tmp_path, monkeypatch, capsys):
    """No ImageNet weights file in --weights-dir nor in the torch.hub cache: the row is reported, not
    run (in this process: the weights' file name comes from torchvision, which pytest has imported)."""
    import reproduce

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # not the user's cache
    out = tmp_path / "paper"
    reproduce.main(reproduce.parse_args(
        ["--shards", str(tmp_path), "--out", str(out), "--rows", "alexnet-224", "--weights-dir", str(tmp_path)]))
    assert "== alexnet-224: not run: no ImageNet weights here\n" in capsys.readouterr().out
    assert "| alexnet-224 | - | - | not run: no ImageNet weights here |" in (out / "report.md").read_text()


def test_reproduce_takes_the_weights_dirs_file_before_the_hub_caches(tmp_path, monkeypatch):
    import reproduce

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = Path(reproduce.models.model_spec("alexnet").hub_cache_file())
    given = tmp_path / "weights" / cached.name
    for path in (cached, given):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    assert reproduce.weights_file("alexnet", given.parent) == given
    assert reproduce.weights_file("alexnet", None) == cached


def test_sigusr1_is_passed_on_to_the_rows_as_sigterm_is():
    """SIGUSR1 (a scheduler's warning before its limit; train.py checkpoints and stops on it) ended
    reproduce.py and speedrun.py at once, their train.py left running without them, no report written.
    Their `Stop` passes it on, records it and starts nothing after it, as it does SIGTERM and SIGINT."""
    from reproduce import Stop

    row = ("import signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(128 + signal.SIGUSR1)); "
           "print('ready', flush=True); time.sleep(60)")
    with Stop() as stop:
        proc = stop.started([sys.executable, "-c", row], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline() == "ready\n"
            stop_by(signal.SIGUSR1)()  # fails, not pytest's death, where Stop lets it through
            assert proc.wait(timeout=30) == 138
        finally:
            proc.kill()
            proc.stdout.close()
        stop.ended(proc)
        assert stop.signum == signal.SIGUSR1
        assert stop.started([sys.executable, "-c", "pass"]) is None


def test_reproduce_names_each_failed_row(shards, tmp_path, monkeypatch):
    import reproduce

    monkeypatch.setattr(reproduce, "train_row", lambda name, run, cmd, stop, log=None, env=None: 1)
    for rows, message in (("lenet5-28", "error: row lenet5-28 failed (exit 1); rerun to resume it"),
                          ("lenet5-28,alexnet-64",
                           "error: rows lenet5-28 (exit 1), alexnet-64 (exit 1) failed; rerun to resume them")):
        with pytest.raises(SystemExit) as exit:
            reproduce.main(reproduce.parse_args(
                ["--shards", str(shards), "--out", str(tmp_path / rows), "--rows", rows, "--device", "cpu"]))
        assert exit.value.code == message


def test_reproduce_rows_side_by_side(shards, tmp_path, capsys):
    """--jobs 2: two rows train at once, each into its own log; a third that fails (a checkpoint of
    another run in its folder) does not stop them, its log's end is shown and the exit names it; the
    rerun resumes only that row (the finished rows are not trained again), and the table's wall clock
    counts overlapping time once. Table 2's LeNet-5 row for 1 epoch of 2 batches is the smoke row."""
    import reproduce

    out = tmp_path / "paper"
    # The third row is resnet18-64, not alexnet-64: AlexNet's 57M weights made every epoch write ~0.9 GB
    # (checkpoint.pth and best.pth), for nothing these tests ask of the row.
    (out / "resnet18-64").mkdir(parents=True)
    (out / "resnet18-64" / "checkpoint.pth").write_bytes(b"not a checkpoint")
    common = ["--shards", str(shards), "--out", str(out), "--rows", "lenet5-28,squeezenet1_1-64,resnet18-64",
              "--epochs", "1", "--limit-batches", "2", "--device", "cpu", "--jobs", "2"]
    with pytest.raises(SystemExit) as exit:  # in this process (the rows' train.py in their own)
        reproduce.main(reproduce.parse_args(common))
    first = capsys.readouterr()
    # A text as the exit code: Python writes it on stderr after all else, and exits 1.
    assert exit.value.code == "error: row resnet18-64 failed (exit 1); rerun to resume it"
    assert f"== resnet18-64: the end of {out / 'resnet18-64' / 'train.log'}:\n" in first.err
    assert "checkpoint.pth: not a train.py checkpoint (UnpicklingError)\n" in first.err
    for name in ("lenet5-28", "squeezenet1_1-64"):
        assert f"(log: {out / name / 'train.log'})" in first.out
        assert f"== {name}: finished after " in first.out
        assert json.loads((out / name / "final.json").read_text())["epochs"] == 1
        assert "test top1" in (out / name / "train.log").read_text()
    final = json.loads((out / "lenet5-28" / "final.json").read_text())
    args = json.loads((out / "lenet5-28" / "args.json").read_text())
    assert (final["epochs"], args["batch_size"], args["lr"], args["limit_batches"]) == (1, 32, 0.001, 2)
    report = (out / "report.md").read_text()  # written all the same, with what trained
    assert "| lenet5-28 | 1 of 40 | 32 |" not in report  # --epochs 1 is what the run asked for
    assert "| lenet5-28 | 1 (2 batches each) | 32 |" in report
    assert "| squeezenet1_1-64 | 1 (2 batches each) | 50 |" in report
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| resnet18-64 | - | - | no epoch finished: failed (exit 1) | - | - | - | - |" in report
    (lenet,), (squeeze,) = (json.loads((out / n / "reproduce.json").read_text())["intervals"]
                            for n in ("lenet5-28", "squeezenet1_1-64"))
    assert lenet[0] < squeeze[1] and squeeze[0] < lenet[1], "the two rows did not overlap"

    (out / "resnet18-64" / "checkpoint.pth").unlink()
    wall = json.loads((out / "lenet5-28" / "reproduce.json").read_text())["wall_s"]
    reproduce.main(reproduce.parse_args(common))  # no SystemExit: exit 0
    second = capsys.readouterr().out
    assert "== lenet5-28: finished earlier, not run again" in second
    assert "== squeezenet1_1-64: finished earlier, not run again" in second
    assert json.loads((out / "lenet5-28" / "reproduce.json").read_text())["wall_s"] == wall
    assert "== resnet18-64: finished after " in second
    report = json.loads((out / "report.json").read_text())
    records = [json.loads((out / n / "reproduce.json").read_text()) for n in ("lenet5-28", "squeezenet1_1-64", "resnet18-64")]
    assert [len(r["intervals"]) for r in records] == [1, 1, 2]  # resnet18: the failed try and the rerun
    intervals = [i for r in records for i in r["intervals"]]
    assert report["jobs"] == 2
    assert report["wall_s"] == pytest.approx(union_seconds(intervals))
    assert report["wall_s"] < sum(r["wall_s"] for r in records)
    assert "up to 2 rows trained side by side" in (out / "report.md").read_text()


def test_reproduce_stopped_by_sigterm_reports_and_resumes(shards, tmp_path):
    """SIGTERM to reproduce.py alone (as from a scheduler, or gpu_session's --deadline): the two
    running rows get it passed on and checkpoint in epoch 2, the third row never starts, the report
    shows the rows so far, the exit is 128 + 15; the rerun resumes both and trains the third."""
    import os
    import signal
    import time

    import reproduce

    out = tmp_path / "paper"
    common = ["--shards", str(shards), "--out", str(out), "--rows", "lenet5-28,squeezenet1_1-64,resnet18-64",
              "--epochs", "2", "--limit-batches", "1", "--device", "cpu", "--jobs", "2"]
    proc = subprocess.Popen([sys.executable, str(REPRODUCE), *common, "--train-args", "--wait-at-step 2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = [out / name / "train.log" for name in ("lenet5-28", "squeezenet1_1-64")]
    deadline = time.time() + 120
    while not all(log.is_file() and "waiting for a signal at epoch 1 step 1" in log.read_text() for log in logs):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.endswith("error: stopped by SIGTERM; lenet5-28, squeezenet1_1-64, resnet18-64 unfinished "
                           "(the report shows them so far); rerun to resume\n"), stderr
    assert "== resnet18-64:" not in stdout  # never started
    report = (out / "report.md").read_text()
    assert "| lenet5-28 | 1 of 2 (1 batch each), stopped or failed | 32 |" in report
    assert "| squeezenet1_1-64 | 1 of 2 (1 batch each), stopped or failed | 50 |" in report
    assert "| resnet18-64 | - | - | not started: stopped by SIGTERM | - | - | - | - |" in report
    for log in logs:
        assert "interrupted at epoch 1 step 1: checkpoint saved" in log.read_text()

    reproduce.main(reproduce.parse_args(common))  # in this process (the rows' train.py in their own): exit 0
    report = (out / "report.md").read_text()
    for name, batch in (("lenet5-28", 32), ("squeezenet1_1-64", 50), ("resnet18-64", 50)):
        assert f"| {name} | 2 (1 batch each) | {batch} |" in report
    assert [len(json.loads((out / n / "reproduce.json").read_text())["intervals"])
            for n in ("lenet5-28", "squeezenet1_1-64", "resnet18-64")] == [2, 2, 1]
    assert "resumed from " in (out / "lenet5-28" / "train.log").read_text()


def test_rows_side_by_side_share_the_cores_unless_the_user_set_the_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert child_env(1) is None
    assert [child_env(jobs)["OMP_NUM_THREADS"] for jobs in (2, 4)] == ["1", "1"]  # never 0
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert child_env(4)["OMP_NUM_THREADS"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert child_env(4) is None  # the user's own setting stands


def test_the_cores_are_shared_by_the_rows_that_run(shards, tmp_path, monkeypatch):
    """`--jobs 4` with one row left to train (the others finished earlier, or not asked for) gave that row a
    quarter of the cores: the threads are shared by the rows that train side by side, not by --jobs."""
    import reproduce

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    envs = {}
    monkeypatch.setattr(reproduce, "train_row", lambda name, run, cmd, stop, log=None, env=None: envs.update({name: env}) or 0)
    monkeypatch.setattr(reproduce, "write_report", lambda *a, **k: (tmp_path / "report.md", None))
    (tmp_path / "report.md").write_text("")
    for rows, threads in (("lenet5-28", None), ("lenet5-28,squeezenet1_1-64", "8"),
                          ("lenet5-28,squeezenet1_1-64,resnet18-64,alexnet-64,alexnet-224-50", "4")):
        envs.clear()
        reproduce.main(reproduce.parse_args(["--shards", str(shards), "--out", str(tmp_path / "out"), "--rows", rows,
                                             "--device", "cpu", "--jobs", "4"]))
        assert {env and env["OMP_NUM_THREADS"] for env in envs.values()} == {threads}, rows


def test_the_report_says_how_many_rows_trained_side_by_side_from_their_records(tmp_path, capsys):
    """The footer's "up to N rows trained side by side" was --jobs N of the call that wrote the report: `--jobs 4`
    with rows one after another said 4, and a rerun that found the rows finished said nothing of the 2 that had
    trained at once. It is the most rows whose recorded times overlap."""
    import reproduce

    for most, intervals in ((2, [[0, 10], [5, 15]]), (1, [[0, 10], [10, 20], [20, 30]]), (3, [[0, 10], [0, 10], [9, 11]])):
        out = tmp_path / f"{most}-{len(intervals)}"
        out.mkdir()
        names = ("lenet5-28", "squeezenet1_1-64", "resnet18-64")[:len(intervals)]
        for name, interval in zip(names, intervals):
            run = make_run(out, name, dict(arch=name.split("-")[0], size=int(name.split("-")[1]), epochs=1,
                                           batch_size=32, limit_batches=None, shards="set"),
                           [row(0, 1.0, 1.0)], final=dict(epochs=1))
            (run / "reproduce.json").write_text(json.dumps(dict(wall_s=10.0, intervals=[interval])))
        said = (f" min; up to {most} rows trained side by side, so each row's minutes were measured sharing the "
                "machine." if most > 1 else " min.")
        for jobs in ("1", "4"):
            reproduce.main(reproduce.parse_args(["--out", str(out), "--shards", "set", "--epochs", "1", "--rows",
                                                 ",".join(names), "--jobs", jobs]))
            assert (out / "report.md").read_text().split("\n\n![learning curves]")[0].endswith(said), (intervals, jobs)
    capsys.readouterr()


def test_a_rows_record_from_before_intervals_counts_its_wall_time_of_its_own(tmp_path):
    """reproduce.json written before intervals were kept holds only wall_s: it adds to the others' union."""
    old, new = tmp_path / "old", tmp_path / "new"
    for run, record in ((old, dict(wall_s=30.0)), (new, dict(wall_s=20.0, intervals=[[0.0, 10.0], [5.0, 20.0]]))):
        run.mkdir()
        (run / "reproduce.json").write_text(json.dumps(record))
    assert table_times([old, new, tmp_path / "never-run"])[0] == 50.0


def test_a_row_resumed_from_a_record_from_before_intervals_keeps_its_earlier_wall_time(tmp_path, capsys):
    """The resume added its interval to the record, and from then on the table counted the intervals alone: the
    30 s of the row's runs before intervals were kept were lost from the whole table's wall clock."""
    from reproduce import Stop, train_row

    run = tmp_path / "row"
    run.mkdir()
    (run / "reproduce.json").write_text(json.dumps(dict(wall_s=30.0, command=["train.py"])))
    assert train_row("row", run, [sys.executable, "-c", "pass"], Stop()) == 0
    record = json.loads((run / "reproduce.json").read_text())
    [[start, end]] = record["intervals"]
    assert record["wall_s"] == pytest.approx(30.0 + end - start)
    assert table_times([run])[0] == pytest.approx(30.0 + end - start)
    (run / "reproduce.json").write_text(json.dumps(dict(wall_s=50.0, intervals=[[100.0, 110.0], [200.0, 210.0]])))
    assert table_times([run])[0] == 50.0  # 30 s before the intervals, 2 x 10 s in them


def test_union_seconds():
    assert union_seconds([]) == 0.0
    assert union_seconds([(0.0, 10.0), (5.0, 12.0), (20.0, 25.0)]) == 17.0  # overlap counted once
    assert union_seconds([(20.0, 25.0), (0.0, 10.0), (2.0, 3.0)]) == 15.0  # unsorted; one inside another
    assert union_seconds([(0.0, 1.0), (1.0, 2.0)]) == 2.0  # end to end: one after another


@pytest.mark.parametrize("flag", ["--jobs", "--epochs", "--limit-batches"])
def test_reproduce_bad_counts(tmp_path, monkeypatch, capsys, flag):
    """--epochs 0 and --limit-batches 0 read as "not given": the recipe's 40 epochs, every batch. Refused, they
    said '--epochs must be at least 1, not 0' (exit 1), where '--epochs x' and train.py's '--epochs 0' say
    'argument --epochs: ...' (exit 2)."""
    assert reproduce_here(monkeypatch, capsys, "--rows", "lenet5-28", "--out", str(tmp_path), flag, "0") == (
        2, f"error: argument {flag}: must be at least 1, not 0\n")


def test_reproduce_without_shards_says_its_default_and_how_to_make_a_set_there(tmp_path, monkeypatch, capsys):
    """Its default was out/shards, where README's commands build data/shards (train.py's default, one constant)."""
    monkeypatch.chdir(tmp_path)
    assert reproduce_here(monkeypatch, capsys, "--rows", "lenet5-28", "--out", str(tmp_path / "out")) == (
        1, "error: --shards data/shards (the default): no shard set there; build one with "
           "`tinyin shard build --src RELEASE --out data/shards`, or pass --shards\n")


def test_reproduce_checks_the_shards_before_any_row_starts(tmp_path, monkeypatch, capsys):
    """A --shards that does not exist said 'not a shard set (no manifest.json)', where train.py, `shard verify`
    and the benches say 'no such folder' (and name a killed build's temporary folder beside it)."""
    result = reproduce_here(monkeypatch, capsys, "--rows", "lenet5-28", "--out", str(tmp_path / "out"), "--shards",
                            str(tmp_path / "none"))
    assert result == (1, f"error: --shards {tmp_path / 'none'}: no such folder\n")
    assert not (tmp_path / "out" / "lenet5-28").exists()
    (tmp_path / "release").mkdir()
    result = reproduce_here(monkeypatch, capsys, "--rows", "lenet5-28", "--out", str(tmp_path / "out"), "--shards",
                            str(tmp_path / "release"))
    assert result == (
        1, f"error: --shards {tmp_path / 'release'}: not a shard set (no manifest.json); run `tinyin shard build` first\n")
    assert not (tmp_path / "out" / "lenet5-28").exists()


def test_reproduce_interrupted_before_the_rows_start_says_so_in_one_line(shards, tmp_path, monkeypatch, capsys):
    """A Ctrl-C in the seconds before the first row starts (train.py's checks of the rows' flags, torch's import)
    was a KeyboardInterrupt traceback: it is 'interrupted', exit 130, as train.py's and the other tools'."""
    import train

    def ctrl_c(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "parse_args", ctrl_c)
    assert reproduce_here(monkeypatch, capsys, "--rows", "lenet5-28", "--out", str(tmp_path / "out"), "--shards",
                          str(shards), "--device", "cpu") == (130, "interrupted\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--train-args", "--ema 0.5 --ema-every 0"], "argument --ema-every: must be at least 1, not 0"),
    (["--device", "cuda"], f"argument --device: cuda, but torch {torch.__version__} sees no CUDA device here"),
])
def test_reproduce_checks_train_flags_before_any_row_starts(shards, tmp_path, monkeypatch, capsys, flags, message):
    """Both used to start the row, which train.py refused (exit 2), then said "rerun to resume it":
    the rerun was refused alike. Now one line before any row starts, exit 2 as train.py's."""
    import reproduce

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same line on a GPU machine
    with pytest.raises(SystemExit) as exit:
        reproduce.main(reproduce.parse_args(
            ["--shards", str(shards), "--out", str(tmp_path / "out"), "--rows", "lenet5-28,alexnet-64", *flags]))
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"error: train.py refuses the flags of row lenet5-28: {message}\n"
    assert not (tmp_path / "out").exists()


def test_reproduce_train_args_may_not_set_what_reproduce_sets_for_each_row(shards, tmp_path, capsys):
    """They won over the row's own: `--train-args '--epochs 5'` trained rows that never counted as finished
    (against the recipe's 40), `--output-dir D` every row into D."""
    import reproduce

    with pytest.raises(SystemExit) as exit:
        reproduce.main(reproduce.parse_args(
            ["--shards", str(shards), "--out", str(tmp_path / "out"), "--rows", "lenet5-28",
             "--train-args", "-b 4 --epochs 5 --output-dir D"]))
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        "error: --train-args: --epochs, --output-dir: set by reproduce.py for each row (from its --shards, --out, "
        "--epochs and --limit-batches; the row's --arch, --size and --recipe; --resume auto)\n")
    assert not (tmp_path / "out").exists()


def test_reproduce_a_row_refused_by_train_py_is_not_told_to_rerun(shards, tmp_path, monkeypatch, capsys):
    """A refusal only the row's run finds (exit 2: an --epochs before its checkpoint's step) said
    "rerun to resume it", which train.py refuses alike; the report said "failed (exit 2)"."""
    import reproduce

    monkeypatch.setattr(reproduce, "train_row", lambda name, run, cmd, stop, log=None, env=None: 2)
    with pytest.raises(SystemExit) as exit:
        reproduce.main(reproduce.parse_args(
            ["--shards", str(shards), "--out", str(tmp_path / "out"), "--rows", "lenet5-28,alexnet-64"]))
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("error: train.py refused the flags of rows lenet5-28, alexnet-64 (see train.py's "
                                       "error above); a rerun with them is refused alike: change them\n")
    assert "| lenet5-28 | - | - | no epoch finished: train.py refused its flags (exit 2) |" in \
        (tmp_path / "out" / "report.md").read_text()


def test_reproduce_weights_dir_that_is_no_folder(tmp_path):
    """A mistyped --weights-dir read as a folder without the files: every Table 3 row "not run: no
    ImageNet weights here", exit 0."""
    import reproduce

    with pytest.raises(SystemExit) as exit:
        reproduce.main(reproduce.parse_args(
            ["--out", str(tmp_path / "out"), "--rows", "alexnet-224", "--weights-dir", str(tmp_path / "wieghts")]))
    assert exit.value.code == f"error: --weights-dir {tmp_path / 'wieghts'}: no such folder"
    assert not (tmp_path / "out").exists()
    # the weights file itself, given for its folder, was "no such folder" too
    (tmp_path / "alexnet-owt-7be5be79.pth").write_bytes(b"")
    with pytest.raises(SystemExit) as exit:
        reproduce.main(reproduce.parse_args(["--out", str(tmp_path / "out"), "--rows", "alexnet-224",
                                             "--weights-dir", str(tmp_path / "alexnet-owt-7be5be79.pth")]))
    assert exit.value.code == (f"error: --weights-dir {tmp_path / 'alexnet-owt-7be5be79.pth'}: a file, not a folder; "
                               "give the folder that holds the weights files")
    assert not (tmp_path / "out").exists()


def test_reproduce_pretrained_row_with_a_local_weights_file(shards, tmp_path):
    """A Table 3 row runs from a local ImageNet file (SqueezeNet 1.1: 5 MB) without any download."""
    from torchvision.models import squeezenet1_1

    import reproduce

    torch.manual_seed(0)
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save(squeezenet1_1(num_classes=1000).state_dict(), weights / "squeezenet1_1-b8a52dc0.pth")
    out = tmp_path / "paper"
    reproduce.main(reproduce.parse_args(  # in this process (the row's train.py in its own): no SystemExit, exit 0
        ["--shards", str(shards), "--out", str(out), "--rows", "squeezenet1_1-224", "--epochs", "1",
         "--limit-batches", "1", "--device", "cpu", "--weights-dir", str(weights), "--train-args", "-b 4"]))
    args = json.loads((out / "squeezenet1_1-224" / "args.json").read_text())
    assert args["weights"] == str(weights / "squeezenet1_1-b8a52dc0.pth") and not args["pretrained"]
    assert args["batch_size"] == 4 and args["norm"] == "imagenet"
    assert "| squeezenet1_1-224 | 1 (1 batch each) | 4 |" in (out / "report.md").read_text()
    assert study_row(args) is STUDY[("squeezenet1_1", 224, True, 10)]  # a local weights file is the pretrained row
    assert "| not comparable: trained on 6 classes (" in (out / "report.md").read_text()  # the synthetic set


def test_reproduce_unknown_row(tmp_path, monkeypatch, capsys):
    """It said 'unknown row(s)' for one row and for two. It exited 1, as a failed row does, for the user's own
    mistake; it is a usage error, exit 2, as train.py's '--arch vgg16' is."""
    code, err = reproduce_here(monkeypatch, capsys, "--rows", "vgg16-64", "--out", str(tmp_path))
    assert code == 2
    assert err.startswith("error: argument --rows: unknown row vgg16-64; choose from: lenet5-28, alexnet-64,")
    code, err = reproduce_here(monkeypatch, capsys, "--rows", "vgg16-64,lenet5-28,vgg11-64", "--out", str(tmp_path))
    assert code == 2
    assert err.startswith("error: argument --rows: unknown rows vgg16-64, vgg11-64; choose from: lenet5-28, "
                                    "alexnet-64,")


ALL_ROWS = ("lenet5-28, alexnet-64, squeezenet1_1-64, resnet18-64, alexnet-224, squeezenet1_1-224, resnet18-224, "
            "alexnet-224-50, squeezenet1_1-224-50, resnet18-224-50")


@pytest.mark.parametrize("rows, message", [
    ("", f"empty; name rows ({ALL_ROWS}), or leave it out for all"),
    ("vgg16-64,lenet5-28,vgg11-64", f"unknown rows vgg16-64, vgg11-64; choose from: {ALL_ROWS}"),
])
def test_reproduce_refuses_bad_rows_as_it_parses_its_flags(tmp_path, capsys, rows, message):
    """`--rows "$ROWS"` with the variable unset trained every row of the study (hours), as if not given. Refused, it
    exited 1, as a failed row does; it is the user's mistake: exit 2, in argparse's form, as '--epochs 0' is. Both
    refusals are the parse's, as '--epochs 0' is (they were main's own copy of argparse's line and exit)."""
    import reproduce

    with pytest.raises(SystemExit) as exit, user_errors():  # as the script runs it
        reproduce.parse_args(["--rows", rows, "--out", str(tmp_path / "out")])
    assert (exit.value.code, capsys.readouterr().err) == (2, f"error: argument --rows: {message}\n")
    assert not (tmp_path / "out").exists()


def test_reproduce_a_row_named_twice_trains_once(shards, tmp_path, monkeypatch):
    """`--rows lenet5-28,lenet5-28 --jobs 2` trained two train.py processes into one folder at once; the
    report showed the row twice, and its minutes summed both processes' time."""
    import reproduce

    trained = []
    monkeypatch.setattr(reproduce, "train_row", lambda name, run, cmd, stop, log=None, env=None: trained.append(name) or 0)
    reproduce.main(reproduce.parse_args(
        ["--shards", str(shards), "--out", str(tmp_path / "out"), "--rows", "lenet5-28,alexnet-64,lenet5-28",
         "--jobs", "2"]))
    assert sorted(trained) == ["alexnet-64", "lenet5-28"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.count("| lenet5-28 |") == 1


def test_reproduce_out_that_is_a_file(shards, tmp_path, capsys):
    """A NotADirectoryError traceback, out of the first row's thread."""
    import reproduce

    (tmp_path / "out").write_text("")
    with pytest.raises(SystemExit) as exit:
        reproduce.main(reproduce.parse_args(
            ["--shards", str(shards), "--out", str(tmp_path / "out"), "--rows", "lenet5-28"]))
    assert exit.value.code == f"error: --out {tmp_path / 'out'}: cannot be made a folder (File exists)"


@pytest.mark.parametrize("argv, message", [
    (["{run}", "--out", ""], "--out is empty: give the folder for the report"),
    (["", "{run}"], "RUNS is empty: give a run folder (train.py's --output-dir)"),
], ids=["out", "runs"])
def test_report_refuses_an_empty_path(runs, monkeypatch, argv, message):
    """`tinyin report "$RUN" --out "$OUT"` with a variable unset, in a run's folder: --out "" wrote report.md,
    report.json and curves.png into it, and RUNS "" was that run (reported twice here), both exit 0."""
    from click.testing import CliRunner

    from pipeline.cli import main

    monkeypatch.chdir(runs[0])
    before = sorted(os.listdir(runs[0]))
    result = CliRunner().invoke(main, ["report", *(a.format(run=runs[0]) for a in argv)])
    assert (result.exit_code, result.output) == (2, f"error: {message}\n")
    assert sorted(os.listdir(runs[0])) == before


def test_a_run_folder_named_in_bytes_that_are_no_utf8_is_reported(tmp_path):
    """A run folder named in Latin-1 ('caf\\xe9', an old disk's or archive's): its name, in Python's surrogates
    for those bytes, was a TypeError traceback out of matplotlib's legend. Shown as a terminal shows it."""
    from click.testing import CliRunner

    from pipeline.cli import main

    run = make_run(tmp_path, os.fsdecode(b"caf\xe9"), dict(arch="lenet5", size=28, epochs=1, batch_size=32),
                   [row(0, 5.0, 4.5)])
    result = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "out")])
    assert (result.exit_code, repr(result.exception)) == (0, "None")
    assert result.output.endswith(f"wrote {tmp_path / 'out' / 'report.md'} and {tmp_path / 'out' / 'curves.png'}\n")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["runs"][0]["name"] == "caf\ufffd"


def test_report_out_it_may_not_write_in(runs, tmp_path, monkeypatch):
    """`tinyin report RUN --out X` with X read-only (a mount, another user's folder) said 'X: cannot write the report
    (OSError: [Errno 30] Read-only file system: 'X')', the path twice and a class name, where reproduce.py says
    '--out X: cannot write in it (...)'."""
    from click.testing import CliRunner

    from pipeline.cli import main

    (tmp_path / "out").mkdir()
    refuse_writes_in(monkeypatch, tmp_path / "out", errno.EROFS)
    result = CliRunner().invoke(main, ["report", str(runs[0]), "--out", str(tmp_path / "out")])
    assert (result.exit_code, result.output) == (
        1, f"error: --out {tmp_path / 'out'}: cannot write in it (Read-only file system)\n")
    assert os.listdir(tmp_path / "out") == []


# `tinyin report ARGS` in a child process that sends itself the signal argv[1] as the report's figure is saved.
SIGNALLED_AT_THE_PLOT = """
import os, signal, sys
from matplotlib.figure import Figure
from pipeline.cli import main

def savefig(self, *args, **kwargs):
    os.kill(os.getpid(), int(sys.argv[1]))
    raise AssertionError("the signal did not stop the report")

Figure.savefig = savefig
main(sys.argv[2:], prog_name="tinyin")
"""


@pytest.mark.parametrize("signum, line", [(signal.SIGTERM, "terminated"), (signal.SIGUSR1, "stopped by SIGUSR1")])
def test_a_report_stopped_by_a_signal_says_so_in_one_line(runs, tmp_path, signum, line):
    """SIGUSR1 (a scheduler's word before it preempts a job) killed `tinyin report` where it stood, without a line:
    it stops as on SIGTERM now, `stopped by SIGUSR1`, exit 128 + 10, what it wrote left as SIGTERM leaves it."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", SIGNALLED_AT_THE_PLOT, str(signum), "report", str(runs[0]),
                           "--out", str(out)], cwd=Path(__file__).parent.parent, capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (128 + signum, "", f"{line}\n")
    assert os.listdir(out) == []


def test_reproduce_out_it_may_not_write_in(shards, tmp_path, monkeypatch):
    """An --out there but another user's, or read-only: a PermissionError traceback out of the first row's thread."""
    import reproduce

    (tmp_path / "out").mkdir()
    refuse_writes_in(monkeypatch, tmp_path / "out")
    with pytest.raises(SystemExit) as exit:
        reproduce.main(reproduce.parse_args(
            ["--shards", str(shards), "--out", str(tmp_path / "out"), "--rows", "lenet5-28"]))
    assert exit.value.code == f"error: --out {tmp_path / 'out'}: cannot write in it (Permission denied)"


def test_a_table3_row_is_the_recipes_and_says_its_epochs(tmp_path):
    """`reproduce.py --rows resnet18-224-50 --epochs 1` (a quick look at the 50-epoch row) set its
    run beside Table 3's 10-epoch figures, labelled only "(Table 3)"."""
    args = dict(arch="resnet18", size=224, epochs=1, batch_size=100, recipe="paper-50", weights="/w/resnet18-f37072fd.pth")
    assert study_row(args) is STUDY[("resnet18", 224, True, 50)]
    assert study_row(dict(args, recipe="paper")) is STUDY[("resnet18", 224, True, 10)]
    assert study_row(dict(args, recipe=None, epochs=50)) is STUDY[("resnet18", 224, True, 50)]
    run = make_run(tmp_path, "resnet18-224-50", args, [row(0, 50.0, 60.0)])
    assert render_study([run]).splitlines()[2].startswith(
        "| resnet18-224-50 | 1 | 100 | 0.500 / 0.600 / - | 0.660 / 0.665 (Table 3, 50 epochs) |")


def test_the_study_table_gives_a_ddp_runs_batch_per_process(tmp_path):
    """A 2-process run of batch 16 each (the study's 32 in all) read "16" in the study table's
    Batch column, where the run table says "16 x 2 processes"."""
    run = make_run(tmp_path, "lenet5-28", dict(arch="lenet5", size=28, epochs=1, batch_size=16), [row(0, 5.0, 4.5)],
                   env=dict(world_size=2))
    assert render_study([run]).splitlines()[2].startswith("| lenet5-28 | 1 | 16 x 2 processes | 0.050 / 0.045 / - |")


def test_a_run_of_another_recipe_is_not_set_beside_the_study(tmp_path):
    """A LeNet-5 run on train.py's defaults (batch 128, lr 0.01, weight decay, cosine schedule), and
    a --recipe fast ResNet-18, sat beside the study's figures, their val "comparable" with its
    notebooks' curve."""
    plain = dict(lr=0.001, momentum=0.9, wd=0.0, lr_scheduler="none", label_smoothing=0.0, nesterov=False,
                 warmup_epochs=0.0, augment="none", mix="none", ema=0.0, tta=False)
    paper = dict(plain, arch="lenet5", size=28, epochs=40, batch_size=32, norm="half")
    rows = [row(0, 1.0, 0.75)]
    ok = make_run(tmp_path, "paper", paper, rows)
    ddp = make_run(tmp_path, "paper-ddp", dict(paper, batch_size=16), rows, env=dict(world_size=2))
    old = make_run(tmp_path, "old", dict(paper, augment=False), rows)  # args.json from before --augment took a name
    default = make_run(tmp_path, "default", dict(paper, epochs=30, batch_size=128, lr=0.01, wd=5e-4,
                                                 lr_scheduler="cosine", norm="dataset"), rows)
    fast = make_run(tmp_path, "fast", dict(plain, arch="resnet18", size=64, epochs=40, batch_size=512, lr=0.4, wd=5e-4,
                                           lr_scheduler="cosine", label_smoothing=0.1, nesterov=True, warmup_epochs=2.0,
                                           augment="rrc", ema=0.999, tta=True, norm="imagenet"), rows)
    lines = render_study([ok, ddp, old, default, fast]).splitlines()
    for line, name in zip(lines[2:5], ("paper", "paper-ddp", "old")):
        assert line.split(" | ")[4] == "0.218 / 0.220 (Table 2)", name
    assert lines[5] == (
        "| default | 1 of 30 | 128 | 0.010 / 0.007 / - | not comparable: trained with batch 128, lr 0.01, wd 0.0005, "
        "lr_scheduler cosine, norm dataset; the study's recipe (--recipe paper): batch 32, lr 0.001, wd 0.0, "
        "lr_scheduler none, norm half | - | - | 0.5 |")
    assert lines[6].split(" | ")[4] == (
        "not comparable: trained with batch 512, lr 0.4, wd 0.0005, lr_scheduler cosine, label_smoothing 0.1, "
        "nesterov True, warmup_epochs 2.0, augment rrc, ema 0.999, tta True; the study's recipe (--recipe paper): "
        "batch 50, lr 0.001, wd 0.0, lr_scheduler none, label_smoothing 0.0, nesterov False, warmup_epochs 0.0, "
        "augment none, ema 0.0, tta False")


def test_reproduce_does_not_take_a_quick_look_for_the_finished_row(tmp_path):
    """A row finished by `--epochs 1 --limit-batches 5` (a quick look) counted as finished for a rerun
    of `--epochs 1` in the same --out: "finished earlier, not run again", its 5 batches reported."""
    from reproduce import get_args_parser, row_command

    make_run(tmp_path, "lenet5-28", dict(arch="lenet5", size=28, epochs=1, batch_size=32, limit_batches=5,
                                         shards=DEFAULT_SHARDS), [row(0, 1.0, 1.0)], final=dict(epochs=1))
    plan = lambda *flags: row_command("lenet5-28", get_args_parser().parse_args(["--out", str(tmp_path), *flags]))  # noqa: E731
    assert plan("--epochs", "1", "--limit-batches", "5")[1] is None  # the same run: finished
    assert plan("--epochs", "1")[1] is not None  # train.py then refuses to resume it without --limit-batches
    assert plan("--epochs", "1", "--limit-batches", "2")[1] is not None


def test_reproduce_does_not_take_a_row_finished_on_another_shard_set(tmp_path):
    """`reproduce.py --shards subset` (a `--classes 10` trial), then `--shards release`, both into the
    default --out: every row was "finished earlier, not run again", the subset's figures reported as
    the release's. Now the row runs (and train.py refuses the other set's checkpoint in one line)."""
    from reproduce import get_args_parser, row_command

    for name, shards in (("lenet5-28", "subset"), ("alexnet-64", "https://ann:***@h/tiny?sig=***")):
        make_run(tmp_path, name, dict(arch=name.split("-")[0], size=int(name.split("-")[1]), epochs=40,
                                      limit_batches=None, shards=shards), [row(0, 1.0, 1.0)], final=dict(epochs=40))
    plan = lambda name, shards: row_command(name, get_args_parser().parse_args(  # noqa: E731
        ["--out", str(tmp_path), "--shards", shards]))[1]
    assert plan("lenet5-28", "subset") is None
    assert plan("lenet5-28", "release") is not None
    assert plan("alexnet-64", "https://ann:pw@h/tiny?sig=S2") is None  # train.py keeps the URL so: the same set
    assert plan("alexnet-64", "https://h/other") is not None


def test_reproduce_reads_a_rows_damaged_files_without_a_traceback(tmp_path, capsys):
    """A finished row's final.json or args.json that is no JSON object (a hand edit, a disk's damage) was a traceback
    before any row ran: such a row is not taken as finished (train.py's resume writes them anew). A metrics.jsonl
    line that is no metrics row was a traceback after the rows ran, as `tinyin report` says it in one line."""
    import reproduce

    args = dict(arch="lenet5", size=28, epochs=1, batch_size=32, limit_batches=None, shards="set")
    plan = lambda: reproduce.row_command("lenet5-28", reproduce.parse_args(  # noqa: E731
        ["--out", str(tmp_path), "--shards", "set", "--epochs", "1"]))[1]
    run = make_run(tmp_path, "lenet5-28", args, [row(0, 1.0, 1.0)], final=dict(epochs=1))
    assert plan() is None  # finished
    for name, text in (("final.json", '{"epochs": 1'), ("final.json", "[1]"), ("args.json", "null")):
        saved = (run / name).read_text()
        (run / name).write_text(text)
        assert plan() is not None, (name, text)
        (run / name).write_text(saved)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 1, "train_loss": 1\n')
    with pytest.raises(SystemExit) as exit:
        reproduce.main(reproduce.parse_args(["--out", str(tmp_path), "--shards", "set", "--epochs", "1",
                                             "--rows", "lenet5-28", "--device", "cpu"]))
    assert exit.value.code == (f"error: {run / 'metrics.jsonl'}: line 2: not a metrics row "
                               "(Expecting ',' delimiter: line 1 column 29 (char 28))")


def test_reproduce_runs_a_finished_row_whose_metrics_are_gone(tmp_path):
    """A finished row whose metrics.jsonl was gone or empty (deleted by hand) was "finished earlier, not run
    again", then a KeyError out of the report's list of rows with no epoch. Its row runs: train.py's resume
    writes the metrics anew from its checkpoint."""
    import reproduce

    args = dict(arch="lenet5", size=28, epochs=1, batch_size=32, limit_batches=None, shards="set")
    run = make_run(tmp_path, "lenet5-28", args, [row(0, 1.0, 1.0)], final=dict(epochs=1))
    plan = lambda: reproduce.row_command("lenet5-28", reproduce.parse_args(  # noqa: E731
        ["--out", str(tmp_path), "--shards", "set", "--epochs", "1"]))[1]
    assert plan() is None
    (run / "metrics.jsonl").write_text("\n")
    assert plan() is not None
    (run / "metrics.jsonl").unlink()
    assert plan() is not None
