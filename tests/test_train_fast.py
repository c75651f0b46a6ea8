"""The speedrun's parts of train.py on the CPU: per-step lr schedules, EMA, flip TTA, mixup/CutMix,
`--recipe fast`, and a bit-identical mid-epoch resume of a run that uses them all."""

import argparse
import errno
import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from test_train import EVAL_KEYS, _same_run, _shards, cli, read_jsonl, run, stop_at

import train
from pipeline import checkpoint
from pipeline.mixing import cutmix_box, mix_batch, mix_generator
from pipeline.report import render_table


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    """4 classes: 120 train (8 steps of 16, the last of 8), 40 val, 10 test images."""
    return _shards(tmp_path_factory.mktemp("fast"), classes=4, train_per_class=30, val_per_class=10, test=10)


def flags(*argv):
    return train.parse_args(["--device", "cpu", *argv])


# --- lr schedule ---------------------------------------------------------------------------


def test_warmup_then_cosine_per_step():
    # 10 epochs of 5 steps: 10 warm-up steps (2 epochs), then cosine over the other 40.
    factor = train.lr_factor(flags("--epochs", "10", "--warmup-epochs", "2"), steps_per_epoch=5)
    assert [factor(s) for s in (0, 1, 4, 9)] == [0.1, 0.2, 0.5, 1.0]
    assert factor(10) == 1.0 and factor(30) == 0.5
    assert factor(49) == 0.5 * (1 + math.cos(math.pi * 39 / 40)) and factor(50) == 0.0


def test_onecycle_is_warmup_then_linear_decay_to_zero():
    factor = train.lr_factor(flags("--epochs", "10", "--warmup-epochs", "0.4", "--lr-scheduler", "onecycle"), 5)
    assert [factor(s) for s in (0, 1, 2, 26, 50)] == [0.5, 1.0, 1.0, 0.5, 0.0]  # round(0.4 * 5) = 2 warm-up steps
    factor = train.lr_factor(flags("--epochs", "4", "--warmup-epochs", "0.875", "--lr-scheduler", "onecycle"), 4)
    assert [factor(s) for s in (0, 2, 3, 4)] == [0.25, 0.75, 1.0, 1.0]  # round(3.5) = 4 warm-up steps, not 3
    factor = train.lr_factor(flags("--epochs", "4", "--lr-scheduler", "onecycle"), 5)  # no warm-up: decay at once
    assert [factor(s) for s in (0, 5, 10, 19)] == pytest.approx([1.0, 0.75, 0.5, 0.05], rel=1e-12)


def test_warmup_with_step_and_none():
    # 4 warm-up steps, then a decay every 3 epochs (12 steps) counted from the warm-up's end, as torchvision's
    # references chain them (SequentialLR, milestones=[warmup]): at steps 16 and 28, not 12 and 24.
    factor = train.lr_factor(flags("--epochs", "10", "--warmup-epochs", "1", "--lr-scheduler", "step",
                                   "--lr-step-size", "3", "--lr-gamma", "0.5"), 4)
    assert [factor(s) for s in (0, 3, 4, 15, 16, 27, 28)] == [0.25, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25]
    # A warm-up longer than a step's size: counted from epoch 0, its decays came all at once after it (0.01).
    factor = train.lr_factor(flags("--epochs", "5", "--warmup-epochs", "2", "--lr-scheduler", "step",
                                   "--lr-step-size", "1"), 4)
    assert [factor(s) for s in (7, 8, 11, 12)] == [1.0, 1.0, 1.0, 0.1]
    factor = train.lr_factor(flags("--epochs", "10", "--warmup-epochs", "1", "--lr-scheduler", "none"), 4)
    assert [factor(s) for s in (0, 1, 4, 39)] == [0.25, 0.5, 1.0, 1.0]


def test_no_warmup_keeps_the_per_epoch_schedules():
    args = flags("--epochs", "10")
    assert not train.per_step_schedule(args)
    factor = train.lr_factor(args, steps_per_epoch=5)  # the counter is the epoch: steps_per_epoch is unused
    assert [factor(e) for e in range(11)] == [0.5 * (1 + math.cos(math.pi * e / 10)) for e in range(11)]
    factor = train.lr_factor(flags("--lr-scheduler", "step", "--lr-step-size", "3"), 5)
    assert [factor(e) for e in (0, 2, 3, 6)] == [1.0, 1.0, 0.1, 0.1 ** 2]


def test_lr_per_step_without_a_warmup_keeps_the_cosine_per_step():
    """--recipe fast's lr is per step, with its warm-up or without: the speedrun's warm-up ablation (--warmup-epochs
    0) also made its cosine per epoch (the default's rule), two parts switched off where the table named one."""
    args = flags("--arch", "resnet18_64", "--recipe", "fast", "--warmup-epochs", "0")
    assert (args.lr_per, train.per_step_schedule(args)) == ("step", True)
    factor = train.lr_factor(flags("--epochs", "10", "--lr-per", "step"), steps_per_epoch=5)
    assert [factor(s) for s in (0, 25, 50)] == [1.0, 0.5, 0.0]
    assert factor(1) == 0.5 * (1 + math.cos(math.pi / 50))
    # the default: per step with a warm-up or onecycle, per epoch otherwise (the study's runs keep their lr)
    assert [flags(*argv).lr_per for argv in ([], ["--warmup-epochs", "1"], ["--lr-scheduler", "onecycle"])] == [
        "epoch", "step", "step"]


def test_a_per_step_run_records_the_lr_at_each_epochs_end(small_shards, tmp_path):
    run(small_shards, tmp_path, "--arch", "lenet5", "-b", "16", "--epochs", "3", "--lr", "0.1",
        "--warmup-epochs", "1", "--limit-batches", "4")
    # 4 steps an epoch (--limit-batches): 4 warm-up steps, then cosine over 8; the lr after step 8 and 12.
    assert [r["lr"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0.1, 0.1 * 0.5 * (1 + math.cos(math.pi / 2)), 0.0]


def test_a_per_epoch_schedule_moves_once_an_epoch_not_at_each_step(small_shards, tmp_path):
    run(small_shards, tmp_path, "--arch", "lenet5", "-b", "16", "--epochs", "3", "--lr", "0.1", "--limit-batches", "2")
    # cosine over 3 epochs, whatever the steps in each: the lr each epoch trained at (stepped at every step, the
    # epoch counter ran 2 steps ahead an epoch)
    assert [r["lr"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == pytest.approx(
        [0.1 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in (0, 1, 2)], rel=1e-12)


def test_a_per_step_schedule_counts_the_steps_limit_batches_leaves(small_shards, tmp_path, monkeypatch):
    """The rows' lr is put back on each epoch's end; within an epoch each step's lr is of --limit-batches' steps
    (2 here, not the split's 8): 2 warm-up steps, then onecycle's decay over the other 2."""
    used, step = [], torch.optim.SGD.step

    def recording_step(self, *a, **kw):
        used.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    run(small_shards, tmp_path, "--arch", "lenet5", "-b", "16", "--epochs", "2", "--warmup-epochs", "1",
        "--lr-scheduler", "onecycle", "--limit-batches", "2")
    assert used == [0.01 * f for f in (0.5, 1.0, 1.0, 0.5)]


def test_a_resume_on_another_batch_keeps_the_per_step_schedule_on_its_epochs(small_shards, tmp_path, monkeypatch):
    """A mid-epoch resume with another -b (or on another number of ranks) takes the rest of the epoch
    in other steps than `schedule_position` counted for it: the counter stayed a step ahead for the
    rest of the run, onecycle's last step trained at lr 0 and the metrics recorded a negative lr."""
    lrs, step = [], torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: lrs.append(self.param_groups[0]["lr"]) or
                        step(self, *a, **k))
    flags = ["--arch", "lenet5", "--epochs", "2", "--lr", "0.1", "--lr-scheduler", "onecycle"]
    stop_at(small_shards, tmp_path, 3, *flags, "-b", "16")
    lrs.clear()
    run(small_shards, tmp_path, *flags, "-b", "20", "--resume", "auto")
    # -b 20: 6 steps an epoch, 12 in all. Epoch 0's 48 samples done count as 3 steps (ceil(48 / 20)) and
    # its other 72 take 4 more (20, 20, 20, 12); epoch 1 then has steps 6 to 11 of the schedule, not 7 to 12.
    assert lrs == [0.1 * (1 - s / 12) for s in (3, 4, 5, 6, *range(6, 12))]
    assert [r["lr"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0.1 * (1 - 6 / 12), 0.0]


# --- EMA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("every", [1, 2])
def test_ema_follows_the_recurrence_over_weights_and_batchnorm_statistics(every):
    """Updated every `every` steps, the average decays by 0.5 ** every per update (the same span of steps)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = train.make_ema(module, argparse.Namespace(ema=0.5, ema_every=every))
    seen = []
    for _ in range(14):  # a "step": new weights, new running statistics
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        module(torch.randn(5, 3))
        ema.update_parameters(module)
        seen.append({k: v.clone() for k, v in module.state_dict().items()})
    averaged = ema.module.state_dict()
    for k in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        want = seen[0][k]  # the first update copies; the n-th after it decays by min(0.5 ** every, (1 + n) / (10 + n))
        for n in range(1, 14):  # 2/11, 3/12, ... up to 0.5 at n = 8 (0.25 at n = 2), then that
            d = min(0.5 ** every, (1 + n) / (10 + n))
            want = d * want + (1 - d) * seen[n][k]
        torch.testing.assert_close(averaged[k], want, rtol=1e-6, atol=1e-6)
    assert int(ema.n_averaged) == 14
    assert train.make_ema(module, argparse.Namespace(ema=0.0, ema_every=1)) is None


def test_ema_every_n_steps_and_the_model_it_evaluates(small_shards, tmp_path):
    final = run(small_shards, tmp_path, "--arch", "lenet5", "-b", "16", "--epochs", "2", "--lr", "0.05",
                "--ema", "0.9", "--ema-every", "3")
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    # 8 steps an epoch: updated after steps 3, 6, 9, 12 and 15 of the run (counted per epoch: 3, 6, 3, 6)
    assert int(ckpt["ema"]["n_averaged"]) == 5
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["eval_model"] == "ema" and final["eval_model"] == "ema"

    # The test metrics are the average's, not the trained weights'.
    parts = train.build(flags("--shards", small_shards, "--arch", "lenet5", "-b", "16"), torch.device("cpu"), 1)
    args = argparse.Namespace(tta=False, amp=False, limit_batches=None, compile=False)

    def test_loss(weights):
        parts.module.load_state_dict(weights)
        return train.evaluate(parts.module, parts.criterion, parts.test, torch.device("cpu"), args)["loss"]

    ema_weights = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "n_averaged"}
    assert test_loss(ema_weights) == final["test_loss"] != test_loss(ckpt["model"])

    # --weights of its checkpoint is the average too: --test-only reported the trained weights' accuracy
    # (not the run's), and a fine-tune from best.pth started from weights other than the best ones.
    result = run(small_shards, tmp_path / "eval", "--arch", "lenet5", "-b", "16", "--test-only",
                 "--weights", tmp_path / "checkpoint.pth")
    assert result["test"]["loss"] == final["test_loss"]


def test_test_only_says_what_it_evaluated_and_a_tta_the_run_had(small_shards, tmp_path, capsys):
    """--test-only of a --tta run's checkpoint without --tta reported other figures than the run's final.json for
    the same weights, and eval.json did not say it was without TTA (nor of which file, nor the average or not)."""
    base = ["--arch", "lenet5", "-b", "16", "--limit-batches", "1"]
    final = run(small_shards, tmp_path, *base, "--epochs", "1", "--ema", "0.9", "--tta", "--label-smoothing", "0.1")
    ckpt = tmp_path / "checkpoint.pth"
    capsys.readouterr()
    # --weights of an --ema run's file evaluates its average (without --ema: `load_weights_file`), and says so
    same = run(small_shards, tmp_path / "same", *base, "--test-only", "--weights", ckpt, "--tta",
               "--label-smoothing", "0.1")
    assert (same["test"]["top1"], same["test"]["loss"]) == (final["test_top1"], final["test_loss"])
    assert (same["weights"], same["eval_model"], same["tta"]) == (str(ckpt), "ema", True)
    assert "note:" not in capsys.readouterr().err
    plain = run(small_shards, tmp_path / "plain", *base, "--test-only", "--resume", ckpt, "--ema", "0.9")
    assert capsys.readouterr().err == (
        f"note: {ckpt}: its run validated and tested with --tta --label-smoothing 0.1, this evaluation has --no-tta "
        "--label-smoothing 0.0, and its figures are not the run's; give --tta --label-smoothing 0.1 for those\n")
    assert json.loads((tmp_path / "plain" / "eval.json").read_text()) == plain
    assert (plain["weights"], plain["eval_model"], plain["tta"]) == (str(ckpt), "ema", False)
    # --ema on a file without an average evaluates its weights, not an average of them
    torch.save(torch.load(ckpt, weights_only=True)["model"], tmp_path / "plain.pth")
    assert run(small_shards, tmp_path / "plain", *base, "--test-only", "--weights", tmp_path / "plain.pth",
               "--ema", "0.9")["eval_model"] == "model"


def test_compiled_graphs_see_only_full_batches(small_shards, tmp_path, monkeypatch):
    """--compile drops the epoch's last, smaller train batch and pads the splits' last eval batches:
    each new batch size would compile the model again (tens of seconds on a GPU)."""
    seen = []

    def backend(graph, inputs):  # records the batch sizes of the images each compiled graph is made for
        seen.extend(t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.shape[1:] == (1, 28, 28))
        return graph.forward

    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile(model, backend=backend, **kw))
    torch._dynamo.reset()
    final = run(small_shards, tmp_path, "--arch", "lenet5", "-b", "16", "--epochs", "2", "--lr", "0.05",
                "--compile", "--ema", "0.9")
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert seen and set(seen) == {16}, seen  # train batches: 7 of 16 (the 8th, of 8, dropped); val 16, 16, 8; test 10
    assert [r["epoch"] for r in rows] == [0, 1] and final["eval_model"] == "ema"

    # Padding changes no metric: the same weights evaluated with and without it.
    parts = train.build(flags("--shards", small_shards, "--arch", "lenet5", "-b", "16"), torch.device("cpu"), 1)
    parts.module.load_state_dict(torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"])
    plain, padded = (train.evaluate(parts.module, parts.criterion, parts.val, torch.device("cpu"),
                                    argparse.Namespace(tta=False, amp=False, limit_batches=None, compile=pad))
                     for pad in (False, True))
    assert (padded["top1"], padded["top5"]) == (plain["top1"], plain["top5"])
    assert padded["loss"] == pytest.approx(plain["loss"], rel=1e-6)


def test_a_compiled_evaluation_pads_a_last_batch_one_image_short():
    """Every last batch smaller than the loader's is padded (one short of it too): each new size compiles anew."""
    class Loader(list):
        batch_size = 4

    seen = []
    model = nn.Linear(3, 5)
    model.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    images, target = torch.randn(7, 3), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    train.evaluate(model, nn.CrossEntropyLoss(), Loader([(images[:4], target[:4]), (images[4:], target[4:])]),
                   torch.device("cpu"), argparse.Namespace(tta=False, amp=False, limit_batches=None, compile=True))
    assert seen == [4, 4]


def test_a_later_epoch_that_only_ties_the_best_val_top1_keeps_the_first_best_pth(small_shards, tmp_path, monkeypatch):
    """best.pth is the first epoch to reach the best val top-1: a tie later is no better, and fine-tuning or
    evaluating best.pth takes the earlier weights."""
    tops = iter([50.0, 60.0, 60.0, 10.0])  # the three epochs' validation, then the test
    monkeypatch.setattr(train, "evaluate", lambda *args: dict(loss=1.0, top1=next(tops), top5=100.0))
    run(small_shards, tmp_path, "--arch", "lenet5", "-b", "16", "--epochs", "3", "--limit-batches", "1")
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert (best["state"]["epoch"], best["state"]["best_acc"]) == (2, 60.0)


def test_ema_and_checkpoints_must_agree(small_shards, tmp_path, capsys):
    base = ["--arch", "lenet5", "-b", "16", "--epochs", "2"]

    def resume_error(out, *extra):
        capsys.readouterr()
        assert cli("--shards", small_shards, "--device", "cpu", "--output-dir", out, *base, *extra, "--resume", "auto") == 1
        return capsys.readouterr().err

    stop_at(small_shards, tmp_path / "plain", 3, *base)
    assert resume_error(tmp_path / "plain", "--ema", "0.99") == (
        f"error: {tmp_path / 'plain' / 'checkpoint.pth'}: holds no EMA of the weights (made without --ema); "
        "resume it without --ema, or use another --output-dir\n")
    stop_at(small_shards, tmp_path / "ema", 3, *base, "--ema", "0.99")
    assert resume_error(tmp_path / "ema") == (f"error: {tmp_path / 'ema' / 'checkpoint.pth'}: holds an EMA of the "
                                              "weights (made with --ema 0.99); resume it with --ema 0.99\n")
    # Another decay was taken without a word: the average then mixed two decays.
    assert resume_error(tmp_path / "ema", "--ema", "0.999") == (
        f"error: {tmp_path / 'ema' / 'checkpoint.pth'}: holds an EMA of the weights made with --ema 0.99, this run "
        "has --ema 0.999, and one average must keep its decay; resume it with --ema 0.99, or use another --output-dir\n")
    assert resume_error(tmp_path / "ema", "--ema", "0.99", "--ema-every", "4") == (
        f"error: {tmp_path / 'ema' / 'checkpoint.pth'}: holds an EMA of the weights made with --ema 0.99 --ema-every 1, "
        "this run has --ema 0.99 --ema-every 4, and one average must keep its decay; resume it with --ema 0.99 "
        "--ema-every 1, or use another --output-dir\n")


# --- TTA -----------------------------------------------------------------------------------


def test_evaluate_counts_the_top5_and_the_loss_of_every_image_over_batches_of_any_size():
    """Top-5 is the target among the five highest logits (of 7 classes: ranked 5th it counts, 6th not); the loss
    is the mean over the split's images, not over its batches (here of 3 images and 1)."""
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1, 0]] * 4)
    target = torch.tensor([0, 4, 5, 1])  # ranked 1st, 5th, 6th and 2nd
    loader = [(logits[:3], target[:3]), (logits[3:], target[3:])]
    criterion = nn.CrossEntropyLoss()
    result = train.evaluate(nn.Identity(), criterion, loader, torch.device("cpu"),
                            argparse.Namespace(tta=False, amp=False, limit_batches=None, compile=False))
    assert (result["top1"], result["top5"]) == (25.0, 75.0)
    assert result["loss"] == pytest.approx(criterion(logits, target).item(), rel=1e-6)


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 5, 6))
    images, target = torch.randn(7, 3, 4, 5), torch.randint(0, 6, (7,))
    loader = [(images[:4], target[:4]), (images[4:], target[4:])]
    criterion = nn.CrossEntropyLoss()

    def evaluate(tta):
        return train.evaluate(model, criterion, loader, torch.device("cpu"),
                              argparse.Namespace(tta=tta, amp=False, limit_batches=None, compile=False))

    with torch.no_grad():
        logits = (model(images) + model(images.flip(3))) / 2
    plain, tta = evaluate(False), evaluate(True)
    assert tta["loss"] == pytest.approx(criterion(logits, target).item(), rel=1e-6)
    assert tta["top1"] == 100 * (logits.argmax(1) == target).sum().item() / 7
    assert tta["loss"] != plain["loss"]


# --- mixing --------------------------------------------------------------------------------


def test_mixup_is_the_weighted_sum_of_the_batch_and_its_permutation():
    x, target = torch.randn(6, 3, 8, 8), torch.arange(6)
    mixed, a, b, lam = mix_batch(x, target, "mixup", 0.2, mix_generator(0, 1, 0, 5))
    g = mix_generator(0, 1, 0, 5)  # the same draws, made here by hand
    want_lam, perm = g.beta(0.2, 0.2), torch.from_numpy(g.permutation(6))
    assert lam == want_lam and 0 < lam < 1
    assert torch.equal(mixed, x * lam + x[perm] * (1 - lam))
    assert torch.equal(a, target) and torch.equal(b, target[perm])


class FixedDraws:
    """A stand-in for the numpy Generator with chosen draws (a box that is clipped at the border)."""

    def __init__(self, lam, perm, centre):
        self.lam, self.perm, self.centre = lam, perm, list(centre)

    def beta(self, a, b):
        return self.lam

    def permutation(self, n):
        return np.array(self.perm)

    def integers(self, n):
        return self.centre.pop(0)


def test_cutmix_pastes_a_box_and_lam_is_its_actual_area():
    x, target = torch.arange(3 * 8 * 8, dtype=torch.float32).view(3, 1, 8, 8) + 1, torch.tensor([0, 1, 2])
    # lam 0.75: a 4x4 box centred at (0, 7), clipped to rows 0-1 and columns 5-7: 6 of 64 pixels pasted.
    mixed, a, b, lam = mix_batch(x, target, "cutmix", 1.0, FixedDraws(0.75, [2, 0, 1], [0, 7]))
    assert lam == 1 - 6 / 64
    want = x.clone()
    want[:, :, 0:2, 5:8] = x[[2, 0, 1], :, 0:2, 5:8]
    assert torch.equal(mixed, want) and torch.equal(b, torch.tensor([2, 0, 1])) and torch.equal(a, target)
    assert cutmix_box(8, 8, 0.75, FixedDraws(0, 0, [4, 4])) == (2, 6, 2, 6)  # unclipped: (1 - lam) of the image
    # An odd cut (int(8 * 0.4) = 3) spans cut // 2 each side of the centre, as the CutMix paper's code (rand_bbox)
    # draws it: 2 x 2 here, the pasted share then what lam is corrected to.
    assert cutmix_box(8, 8, 0.84, FixedDraws(0, 0, [4, 4])) == (3, 5, 3, 5)


def test_cutmix_from_the_generator_matches_its_box():
    x, target = torch.randn(5, 3, 16, 16), torch.arange(5)
    for step in range(4):
        mixed, _, b, lam = mix_batch(x, target, "cutmix", 1.0, mix_generator(2, 0, 0, step))
        g = mix_generator(2, 0, 0, step)  # the same draws, by hand
        drawn, perm = g.beta(1.0, 1.0), g.permutation(5)
        y0, y1, x0, x1 = cutmix_box(16, 16, drawn, g)
        assert lam == 1 - (y1 - y0) * (x1 - x0) / 256 and torch.equal(b, target[perm])
        pasted = torch.zeros(16, 16, dtype=torch.bool)
        pasted[y0:y1, x0:x1] = True
        assert torch.equal(mixed[:, :, pasted], x[perm][:, :, pasted]) and torch.equal(mixed[:, :, ~pasted], x[:, :, ~pasted])


def test_mixing_is_deterministic_per_step_and_mix_prob_skips_batches():
    x, target = torch.randn(4, 3, 8, 8), torch.arange(4)
    one, two = (mix_batch(x, target, "mixup", 0.2, mix_generator(0, 0, 0, 3)) for _ in range(2))
    assert one[3] == two[3] and torch.equal(one[0], two[0])
    assert mix_batch(x, target, "mixup", 0.2, mix_generator(0, 0, 0, 4))[3] != one[3]
    lams = [mix_batch(x, target, "cutmix", 1.0, mix_generator(0, 0, 0, s), prob=0.5)[3] for s in range(40)]
    unmixed = [s for s, lam in enumerate(lams) if lam == 1.0]
    assert 10 < len(unmixed) < 30
    skipped = mix_batch(x, target, "cutmix", 1.0, mix_generator(0, 0, 0, unmixed[0]), prob=0.5)
    assert skipped[0] is x and skipped[2] is target
    with pytest.raises(ValueError, match="mode must be one of"):
        mix_batch(x, target, "blend", 1.0, mix_generator(0, 0, 0, 0))


def test_mix_prob_is_the_share_of_batches_mixed():
    """Not the share left unmixed: at 0.5 (the test above) the two read alike."""
    x, target = torch.randn(2, 3, 4, 4), torch.arange(2)
    lams = [mix_batch(x, target, "mixup", 1.0, mix_generator(0, 0, 0, s), prob=0.25)[3] for s in range(100)]
    assert 15 < sum(lam != 1.0 for lam in lams) < 35


def test_cutmix_on_a_non_square_batch_weighs_by_the_share_of_its_pixels():
    """lam is 1 - the pasted area over h * w: on a square batch h * h reads alike."""
    x, target = torch.arange(3 * 4 * 8, dtype=torch.float32).view(3, 1, 4, 8), torch.tensor([0, 1, 2])
    # lam 0.75: a 2 x 4 box centred at (0, 7), clipped to row 0 and columns 5-7: 3 of 32 pixels pasted.
    mixed, _, _, lam = mix_batch(x, target, "cutmix", 1.0, FixedDraws(0.75, [2, 0, 1], [0, 7]))
    assert lam == 1 - 3 / 32
    want = x.clone()
    want[:, :, 0:1, 5:8] = x[[2, 0, 1], :, 0:1, 5:8]
    assert torch.equal(mixed, want)


def test_the_mixing_draws_stay_what_checkpoints_were_made_with():
    """A checkpoint holds (seed, epoch, step), not the draws: another stream for (seed, epoch, rank, step), a
    constant or their order changed, would resume a mixed run on other boxes, weights and partners."""
    g = mix_generator(1, 2, 3, 4)
    assert g.integers(1000, size=4).tolist() == [988, 167, 330, 803] and g.beta(1.0, 1.0) == 0.5532978341615111


def test_a_cutmix_box_is_clipped_to_each_sides_own_length():
    """On a 4 x 8 image (square ones could not tell the sides apart): lam 0 asks for the whole image."""
    assert cutmix_box(4, 8, 0.0, FixedDraws(0, 0, [3, 7])) == (1, 4, 3, 8)


def test_train_top1_counts_each_images_own_label_under_mix(small_shards, tmp_path, monkeypatch):
    """Under --mix a step has two targets; its top-1 is counted against the image's own (target_a),
    not its partner's: a partner label the model can never predict changes nothing."""
    argv = ("--arch", "lenet5", "-b", "16", "--epochs", "1", "--limit-batches", "3")
    run(small_shards, tmp_path / "plain", *argv)
    monkeypatch.setattr(train, "mix", lambda images, target, state, args: (images, target, target - 100, 1.0))
    run(small_shards, tmp_path / "partner", *argv)
    plain, partner = (read_jsonl(tmp_path / name / "metrics.jsonl")[0]["train_top1"] for name in ("plain", "partner"))
    assert partner == plain > 0


class TargetMean(nn.Module):
    """A stand-in criterion whose value is the mean label: it shows which target a loss term used."""

    def __init__(self, **kw):
        super().__init__()

    def forward(self, output, target):
        return output.sum() * 0 + target.float().mean()


def test_a_mixed_steps_loss_weighs_each_target_by_its_share(small_shards, tmp_path, monkeypatch):
    """lam * loss(target_a) + (1 - lam) * loss(target_b): the partner's label at (1 - lam), not lam."""
    monkeypatch.setattr(train.nn, "CrossEntropyLoss", TargetMean)
    argv = ("--arch", "lenet5", "-b", "16", "--epochs", "1", "--limit-batches", "3")
    run(small_shards, tmp_path / "plain", *argv)
    monkeypatch.setattr(train, "mix", lambda images, target, state, args: (images, target, target + 10, 0.75))
    run(small_shards, tmp_path / "mixed", *argv)
    plain, mixed = (read_jsonl(tmp_path / name / "metrics.jsonl")[0]["train_loss"] for name in ("plain", "mixed"))
    assert mixed - plain == pytest.approx(0.25 * 10, rel=1e-6)


def test_label_smoothing_reaches_the_criterion(small_shards):
    args = flags("--shards", small_shards, "--arch", "lenet5", "--label-smoothing", "0.1")
    assert train.build(args, torch.device("cpu"), 1).criterion.label_smoothing == 0.1


def test_each_step_of_each_epoch_mixes_with_its_own_draws():
    """train.mix draws for (seed, epoch, rank, step of the epoch): a fixed epoch mixed every epoch alike."""
    x, target = torch.randn(4, 3, 8, 8), torch.arange(4)
    args = argparse.Namespace(mix="mixup", mix_alpha=0.2, mix_prob=1.0, seed=3)
    for epoch, step in ((0, 2), (1, 2), (1, 5)):
        lam = train.mix(x, target, argparse.Namespace(epoch=epoch, epoch_steps=step), args)[3]
        assert lam == mix_generator(3, epoch, 0, step).beta(0.2, 0.2)


# --- recipe and flags ------------------------------------------------------------------------


def test_recipe_fast_resolves_per_device():
    args = flags("--arch", "resnet18_64", "--recipe", "fast")
    assert (args.epochs, args.batch_size, args.lr, args.momentum, args.nesterov, args.wd) == (40, 512, 0.4, 0.9, True, 5e-4)
    assert (args.label_smoothing, args.lr_scheduler, args.warmup_epochs, args.ema, args.ema_every) == (0.1, "cosine", 2.0, 0.999, 4)
    assert args.lr_per == "step"
    assert (args.tta, args.augment, args.mix, args.size) == (True, "rrc", "none", 64)
    assert (args.amp, args.channels_last, args.compile) == (False, False, False)  # CUDA-only speed-ups: off on the CPU
    for arch in ("resnet18_64s2", "resnet10_64s2"):
        assert train.parse_args(["--arch", arch, "--recipe", "fast", "--device", "cuda"]).compile is True
    args = train.parse_args(["--arch", "resnet18_64", "--recipe", "fast", "--device", "cuda"])
    assert (args.amp, args.channels_last, args.compile) == (True, True, True)
    # the study's resnet18 at 64 px has the row too: recipes are compared on one network (BENCHMARKS.md's CPU runs)
    args = flags("--arch", "resnet18", "--size", "64", "--recipe", "fast")
    assert (args.epochs, args.batch_size, args.lr, args.augment, args.ema) == (40, 512, 0.4, "rrc", 0.999)


def test_recipe_paper_is_the_studys_tables():
    """Table 2 (from scratch, 40 epochs) and Table 3 (ImageNet-pretrained at 224: 10 epochs, 50 for paper-50):
    plain SGD at lr 0.001, momentum 0.9, no weight decay, a constant lr; the batch sizes and normalisation of
    the study's notebooks. A changed number here reproduces another experiment than the paper's, silently."""
    from models.recipes import resolve_recipe

    optim = dict(lr=0.001, momentum=0.9, wd=0.0, lr_scheduler="none", label_smoothing=0.0)
    pretrained = dict(optim, batch_size=100, pretrained=True, norm="imagenet")
    assert resolve_recipe("paper", "lenet5", 28) == dict(optim, epochs=40, batch_size=32, norm="half")
    for arch in ("alexnet", "squeezenet1_1", "resnet18"):
        assert resolve_recipe("paper", arch, 64) == dict(optim, epochs=40, batch_size=50, norm="imagenet")
        assert resolve_recipe("paper", arch, 224) == dict(pretrained, epochs=10)
        assert resolve_recipe("paper-50", arch, 224) == dict(pretrained, epochs=50)


def test_recipe_fast_takes_any_cuda_device_for_cuda():
    from models.recipes import resolve_recipe

    for device, on in (("cuda", True), ("cuda:1", True), ("cpu", False)):
        row = resolve_recipe("fast", "resnet18_64", 64, device)
        assert (row["amp"], row["channels_last"], row["compile"]) == (on, on, on)


def test_explicit_flags_beat_recipe_fast():
    args = train.parse_args(["--arch", "resnet18_64", "--recipe", "fast", "--device", "cuda", "--lr", "0.1",
                             "--epochs", "3", "--no-compile", "--ema", "0", "--augment", "--no-tta", "--mix", "cutmix"])
    assert (args.lr, args.epochs, args.compile, args.amp, args.ema, args.augment, args.tta) == (0.1, 3, False, True, 0.0, "crop", False)
    assert (args.mix, args.mix_alpha, args.batch_size) == ("cutmix", 1.0, 512)  # cutmix's default alpha
    assert flags("--mix", "mixup").mix_alpha == 0.2 and flags("--augment", "none").augment == "none"
    assert flags().augment == "none" and flags("--augment", "rrc").augment == "rrc"


@pytest.mark.parametrize("argv, message", [
    (["--nesterov", "--momentum", "0"], "argument --nesterov: needs a momentum above 0, not --momentum 0"),
    (["--warmup-epochs", "3", "--epochs", "3"], "argument --warmup-epochs: must be below --epochs (3), not 3"),
    # a value the recipe set is said to be its (the quick try `--recipe fast --epochs 2` named a flag never typed)
    (["--arch", "resnet18_64", "--recipe", "fast", "--epochs", "2"],
     "argument --warmup-epochs: must be below --epochs (2), not --recipe fast's 2"),
    (["--arch", "resnet18_64", "--recipe", "fast", "--warmup-epochs", "40"],
     "argument --warmup-epochs: must be below --recipe fast's --epochs (40), not 40"),
    (["--arch", "resnet18_64", "--recipe", "fast", "--lr-per", "epoch"],
     "argument --lr-per: epoch, but --recipe fast's --warmup-epochs changes the lr every step"),
    (["--arch", "resnet18_64", "--recipe", "fast", "--momentum", "0"],
     "argument --nesterov: needs a momentum above 0, not --momentum 0 (--recipe fast sets it: add --no-nesterov)"),
    (["--ema", "1"], "argument --ema: must be below 1, not 1"),
    (["--lr-per", "epoch", "--warmup-epochs", "1"],
     "argument --lr-per: epoch, but --warmup-epochs changes the lr every step"),
    (["--lr-per", "epoch", "--lr-scheduler", "onecycle"],
     "argument --lr-per: epoch, but --lr-scheduler onecycle changes the lr every step"),
    # It trained the one epoch and ignored the budget: the choice comes after epoch 2.
    (["--time-budget", "10", "--epochs", "1"],
     "argument --time-budget: chooses --epochs after 2 epochs; give --epochs 2 or more, not 1"),
    (["--mix", "cutmix", "--mix-prob", "1.5"], "argument --mix-prob: must be at most 1, not 1.5"),
    (["--mix", "cutmix", "--mix-prob", "2"], "argument --mix-prob: must be at most 1, not 2"),  # it said '2.0'
    (["--mix-alpha", "0.4"], "argument --mix-alpha: only acts with --mix"),
    (["--ema-every", "2"], "argument --ema-every: only acts with --ema"),
    (["--mix-prob", "0.5"], "argument --mix-prob: only acts with --mix"),
    # a step schedule's flags with the default cosine: they trained the cosine without a word
    (["--lr-step-size", "5", "--lr-gamma", "0.5"], "argument --lr-step-size: only acts with --lr-scheduler step"),
    (["--lr-scheduler", "onecycle", "--lr-gamma", "0.5"], "argument --lr-gamma: only acts with --lr-scheduler step"),
    (["--augment", "flip"], "argument --augment: invalid choice: 'flip' (choose from 'none', 'crop', 'rrc')"),
    (["--arch", "alexnet", "--size", "64", "--recipe", "fast"],
     "argument --recipe: recipe 'fast' has no row for alexnet at --size 64; it has: resnet18_64 --size 64, "
     "resnet18_64s2 --size 64, resnet10_64s2 --size 64, resnet18 --size 64"),
])
def test_bad_speedrun_flags_are_one_line_errors(argv, message, capsys):
    assert cli(*argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_the_report_names_the_augmentation(tmp_path):
    def method(augment):
        run = tmp_path / str(augment)
        run.mkdir()
        (run / "args.json").write_text(json.dumps({"arch": "lenet5", "size": 28, "augment": augment}))
        (run / "metrics.jsonl").write_text("")
        return render_table([run]).splitlines()[-1].split(" | ")[0].removeprefix("| ")

    assert [method(a) for a in ("none", False, "crop", True, "rrc")] == [
        "LeNet-5", "LeNet-5", "LeNet-5 + crop/flip augmentation", "LeNet-5 + crop/flip augmentation",
        "LeNet-5 + random-resized crop/flip augmentation"]


# --- resume ----------------------------------------------------------------------------------


def _same_ema_and_momenta(a, b):
    """Bit for bit, beyond `_same_run`'s model: the final checkpoints' EMA and SGD momenta."""
    a, b = (torch.load(d / "checkpoint.pth", weights_only=True) for d in (a, b))
    assert list(a["ema"]) == list(b["ema"]) and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    momenta = [[s["momentum_buffer"] for s in c["optimizer"]["state"].values()] for c in (a, b)]
    assert len(momenta[0]) > 0 and all(torch.equal(x, y) for x, y in zip(*momenta, strict=True))


def test_mid_epoch_resume_of_a_speedrun_style_run_is_bit_identical(small_shards, tmp_path):
    # 8 steps an epoch; the warm-up is 12 steps. Stopped mid-warm-up (step 3) and mid-epoch 1 (step 11),
    # after periodic checkpoints at 5 and 10: the lr, the EMA, the momentum, the cutmix draws and the
    # crops must all continue exactly.
    run_flags = ["--arch", "lenet5", "-b", "16", "--epochs", "3", "--lr", "0.05", "--nesterov", "--label-smoothing",
                 "0.1", "--warmup-epochs", "1.5", "--ema", "0.9", "--tta", "--mix", "cutmix", "--augment", "crop",
                 "--checkpoint-every", "5"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(small_shards, straight, *run_flags)
    ckpt = stop_at(small_shards, resumed, 3, *run_flags)
    assert (ckpt["state"]["epoch"], ckpt["state"]["epoch_steps"], int(ckpt["ema"]["n_averaged"])) == (0, 3, 3)
    ckpt = stop_at(small_shards, resumed, 11, *run_flags, "--resume", "auto")
    assert (ckpt["state"]["epoch"], ckpt["state"]["epoch_steps"]) == (1, 3)
    run(small_shards, resumed, *run_flags, "--resume", "auto")
    _same_run(straight, resumed)
    _same_ema_and_momenta(straight, resumed)
    rows = read_jsonl(straight / "metrics.jsonl")
    assert [r["eval_model"] for r in rows] == ["ema"] * 3 and rows[-1]["lr"] == 0.0


class Killed(BaseException):
    """A kill -9 as the run sees it: nothing after it runs (no handler catches a BaseException of its own)."""


@pytest.mark.parametrize("path", ["resident", "fast"])
def test_a_run_killed_during_validation_keeps_the_epochs_training(small_shards, tmp_path, monkeypatch, path):
    """kill -9 (the OOM killer; a scheduler's SIGKILL after its SIGTERM's grace, shorter than a CPU run's
    validation) while the local paths validated: the epoch's checkpoint came after validation, and the resume
    trained the whole epoch again (only the stream path saved before it). Now the resume trains no more,
    validates once, and the run is the uninterrupted one's, bit for bit: the EMA, the momenta, the per-step lr."""
    flags = ["--arch", "lenet5", "-b", "16", "--epochs", "2", "--lr", "0.05", "--nesterov", "--label-smoothing", "0.1",
             "--warmup-epochs", "1.5", "--ema", "0.9", "--tta", "--augment", "crop", "--data-path", path]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(small_shards, straight, *flags)
    real_evaluate, evaluated = train.evaluate, []

    def killed_in_epoch_1(*args):
        evaluated.append(args)
        if len(evaluated) == 2:
            raise Killed
        return real_evaluate(*args)
    monkeypatch.setattr(train, "evaluate", killed_in_epoch_1)
    with pytest.raises(Killed):
        run(small_shards, resumed, *flags)
    state = torch.load(resumed / "checkpoint.pth", weights_only=True)["state"]
    assert (state["epoch"], state["step"], state["samples_done"], len(state["history"])) == (1, 16, 120, 1)
    assert len(read_jsonl(resumed / "metrics.jsonl")) == 1
    evaluated.clear()
    monkeypatch.setattr(train, "evaluate", lambda *args: evaluated.append(args) or real_evaluate(*args))
    monkeypatch.setattr(torch.optim.SGD, "step", lambda *a, **kw: pytest.fail("trained again"))
    run(small_shards, resumed, *flags, "--resume", "auto")
    assert len(evaluated) == 2  # validated once, then the final test
    _same_run(straight, resumed)
    _same_ema_and_momenta(straight, resumed)


def test_a_resume_needs_no_longer_the_weights_it_started_from(small_shards, tmp_path):
    """The checkpoint replaces every weight, yet a resume loaded --weights FILE (or downloaded --pretrained's
    ImageNet file) first: a preempted fine-tune requeued where the file is gone (a scratch folder, an offline
    node without torch.hub's cache) failed with 'error: --weights FILE: no such file'."""
    run(small_shards, tmp_path / "source", "--arch", "lenet5", "-b", "16", "--epochs", "1")
    weights = tmp_path / "start.pth"
    (tmp_path / "source" / "best.pth").rename(weights)
    flags = ["--arch", "lenet5", "-b", "16", "--epochs", "2", "--weights", weights]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(small_shards, straight, *flags)
    stop_at(small_shards, resumed, 11, *flags)
    weights.unlink()
    run(small_shards, resumed, *flags, "--resume", "auto")
    _same_run(straight, resumed)


def test_a_resume_with_another_plan_is_refused(small_shards, tmp_path, capsys):
    """A resume took another lr schedule, loss, augmentation, mixing or --tta without a word (and another --lr,
    --momentum, --wd or --nesterov with a note, keeping the checkpoint's): a step-schedule run with label
    smoothing, mixup and TTA resumed without them went on with cosine and none of them, two plans in one
    metrics.jsonl and args.json naming the second only."""
    plan = ["--lr-scheduler", "step", "--lr-step-size", "1", "--label-smoothing", "0.1", "--mix", "mixup", "--tta"]
    base = ["--arch", "lenet5", "-b", "16", "--epochs", "2", "--limit-batches", "2"]
    stop_at(small_shards, tmp_path, 1, *base, *plan)
    ckpt = tmp_path / "checkpoint.pth"
    tail = f", or use another --output-dir (--weights {ckpt} starts a new run from its weights)\n"

    def resume_error(*extra):
        capsys.readouterr()
        assert cli("--shards", small_shards, "--device", "cpu", "--output-dir", tmp_path, *base, *extra,
                   "--resume", "auto") == 1
        return capsys.readouterr().err

    assert resume_error() == (
        f"error: {ckpt}: made with --lr-scheduler step --lr-step-size 1 --label-smoothing 0.1 --mix mixup --mix-alpha "
        "0.2 --tta, this run has --lr-scheduler cosine --lr-step-size 10 --label-smoothing 0.0 --mix none --no-tta, and "
        "one run trains to one plan; resume it with --lr-scheduler step --lr-step-size 1 --label-smoothing 0.1 --mix "
        "mixup --mix-alpha 0.2 --tta" + tail)
    said = ("--lr 0.01 --momentum 0.9 --wd 0.0005 --no-nesterov --lr-per epoch --warmup-epochs 0.0 --lr-gamma 0.1 "
            "--augment none --mix-alpha 0.2 --mix-prob 1.0 --tta")
    assert resume_error(*plan, "--lr", "0.2", "--momentum", "0.5", "--wd", "0", "--nesterov", "--warmup-epochs", "1",
                        "--lr-gamma", "0.5", "--augment", "--mix-alpha", "0.4", "--mix-prob", "0.5", "--no-tta") == (
        f"error: {ckpt}: made with {said}, this run has --lr 0.2 --momentum 0.5 --wd 0.0 --nesterov --lr-per step "
        "--warmup-epochs 1.0 --lr-gamma 0.5 --augment crop --mix-alpha 0.4 --mix-prob 0.5 --no-tta, and one run trains to one plan; resume "
        f"it with {said}" + tail)
    assert not (tmp_path / "metrics.jsonl").read_text()
    # an evaluation trains nothing (the speedrun-style run's bit-identical resume shows the plan's own flags resume it)
    assert set(run(small_shards, tmp_path, "--arch", "lenet5", "--test-only", "--resume", "auto")) == EVAL_KEYS


def test_a_resume_keeps_the_runs_start_in_args_json(small_shards, tmp_path, capsys):
    """A resume takes every weight from its checkpoint, but args.json took --pretrained / --weights from the
    resume command: a from-scratch run resumed with --weights FILE was reported "from FILE" (`tinyin report`)."""
    base = ["--arch", "lenet5", "-b", "16", "--epochs", "2", "--limit-batches", "2"]
    stop_at(small_shards, tmp_path / "scratch", 1, *base)
    capsys.readouterr()
    run(small_shards, tmp_path / "scratch", *base, "--weights", tmp_path / "absent.pth", "--resume", "auto")
    assert capsys.readouterr().err.splitlines()[0] == (
        f"note: --weights {tmp_path / 'absent.pth'} not used: a resumed run goes on from its checkpoint's weights "
        "(the run started from scratch)")
    assert json.loads((tmp_path / "scratch" / "args.json").read_text())["weights"] is None
    # a run started from a weights file keeps it, named again or not
    weights = str(tmp_path / "scratch" / "best.pth")
    stop_at(small_shards, tmp_path / "tuned", 1, *base, "--weights", weights)
    capsys.readouterr()
    run(small_shards, tmp_path / "tuned", *base, "--resume", "auto")
    assert "note:" not in capsys.readouterr().err
    assert json.loads((tmp_path / "tuned" / "args.json").read_text())["weights"] == weights


def test_a_checkpoint_without_a_plan_flag_was_made_with_its_default():
    """An older train.py's checkpoint holds no --mix-prob, --tta, --warmup-epochs or --lr-per (their defaults are
    what it did: --lr-per's was per step with a warm-up), and its --augment was on or off (on: crop)."""
    args = flags("--augment")
    saved = {k: v for k, v in vars(args).items() if k not in ("mix_prob", "tta", "warmup_epochs", "lr_per")}
    parser = train.get_args_parser()  # its defaults stand for the flags a checkpoint lacks
    checkpoint.check_plan(dict(saved, augment=True), args, "old.pth", parser)
    warm = flags("--augment", "--warmup-epochs", "1")  # a --recipe fast run of before: per step, as now
    checkpoint.check_plan(dict(saved, augment=True, warmup_epochs=1.0), warm, "old.pth", parser)
    with pytest.raises(train.CheckpointError, match="^old.pth: made with --augment none, this run has --augment crop,"):
        checkpoint.check_plan(dict(saved, augment=False), args, "old.pth", parser)
    with pytest.raises(train.CheckpointError, match="^old.pth: made with --no-tta, this run has --tta,"):
        checkpoint.check_plan(dict(saved, augment=True), flags("--augment", "--tta"), "old.pth", parser)


# --- --time-budget -------------------------------------------------------------------------


def test_budget_epochs_counts_what_is_left():
    # 600 s less the 5% margin = 570 s; 60 s gone, the test ~5 s: 505 s hold 50 more 10-s epochs.
    assert train.BUDGET_MARGIN == 0.05
    assert train.budget_epochs(600, 60, 10, 5) == 52
    assert train.budget_epochs(600, 60, 10, 5, done=3) == 53
    assert train.budget_epochs(600, 60, 10, 10.5) == 51  # 499.5 s: just short of 50 more
    assert train.budget_epochs(600, 560, 10, 5) == 2  # nothing left: the epochs done, not fewer
    assert train.budget_epochs(600, 700, 10, 5) == 2


def test_time_budget_sets_epochs_after_two_and_a_resume_keeps_it(small_shards, tmp_path, monkeypatch, capsys):
    """The choice (4 here, in place of the measured one) replaces --epochs 9 after epoch 2: the run
    ends after 4 with the cosine at 0, args.json says so; a run stopped after the choice resumes
    with it, bit for bit the same as the straight run, without choosing again."""
    calls = []
    monkeypatch.setattr(train, "budget_epochs", lambda *a: calls.append(a) or 4)
    flags = ["--arch", "lenet5", "-b", "16", "--epochs", "9", "--lr", "0.1", "--warmup-epochs", "2",
             "--limit-batches", "2", "--time-budget", "10"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    final = run(small_shards, straight, *flags)
    assert final["epochs"] == 4 and len(calls) == 1
    budget_s, elapsed_s, epoch_s, test_s = calls[0]
    assert budget_s == 600 and elapsed_s > 0 and 0 < test_s < epoch_s
    rows = read_jsonl(straight / "metrics.jsonl")
    assert len(rows) == 4 and rows[-1]["lr"] == 0.0  # the schedule was rebuilt for 4 epochs, not 9
    saved = json.loads((straight / "args.json").read_text())
    assert (saved["epochs"], saved["budget_epochs"], saved["time_budget"]) == (4, 4, 10.0)
    assert f"--time-budget 10 min: {elapsed_s:.1f} s so far, an epoch {epoch_s:.1f} s, the test ~{test_s:.1f} s: " \
           "--epochs 4" in capsys.readouterr().out

    ckpt = stop_at(small_shards, resumed, 5, *flags)  # epoch 2's first step: after the choice
    assert (ckpt["args"]["budget_epochs"], ckpt["args"]["epochs"], ckpt["state"]["epoch"]) == (4, 4, 2)
    monkeypatch.setattr(train, "budget_epochs", lambda *a: pytest.fail("chose again after the resume"))
    run(small_shards, resumed, *flags, "--resume", "auto")
    _same_run(straight, resumed)


def test_a_time_budget_counts_the_training_an_earlier_process_did_of_the_epoch_it_resumes(small_shards, tmp_path,
                                                                                          monkeypatch):
    """A run stopped mid-epoch before the choice: the time so far counted this process and the earlier ones'
    finished epochs, not the earlier process's training of the epoch resumed (up to an epoch's, more epochs
    chosen than the minutes hold)."""
    calls = []
    monkeypatch.setattr(train, "budget_epochs", lambda *a: calls.append(a) or 2)
    flags = ["--arch", "lenet5", "-b", "16", "--epochs", "3", "--limit-batches", "2", "--time-budget", "10"]
    stop_at(small_shards, tmp_path, 3, *flags)  # epoch 1's first step
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert (ckpt["state"]["epoch"], ckpt["state"]["epoch_steps"]) == (1, 1)
    ckpt["state"]["train_seconds"] = 5000.0  # epoch 1's training in the stopped process, as if it took that long
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    monkeypatch.setattr(train, "PROCESS_START", train.time.time())  # this process: a second or so
    run(small_shards, tmp_path, *flags, "--resume", "auto")
    assert len(calls) == 1 and calls[0][1] > 5000 + ckpt["state"]["wall_time"]


def test_a_time_budget_with_as_many_epochs_as_it_waits_for_is_accepted():
    """--epochs 2 reaches the choice after epoch 2; 1 would end before it (refused)."""
    assert (flags("--time-budget", "10", "--epochs", "2").epochs, train.BUDGET_AFTER_EPOCHS) == (2, 2)


def test_a_time_budget_given_to_a_resume_past_its_choice_is_refused(small_shards, tmp_path, capsys):
    """--time-budget chooses --epochs at the end of epoch 2: added to the resume of a run past it, the choice
    was never made, and the run went on to its --epochs with the budget silently unused."""
    flags = ["--arch", "lenet5", "-b", "16", "--limit-batches", "1"]
    run(small_shards, tmp_path, *flags, "--epochs", "2")
    assert cli("--shards", small_shards, "--device", "cpu", "--output-dir", tmp_path, *flags, "--epochs", "9",
               "--time-budget", "10", "--resume", "auto") == 2
    assert capsys.readouterr().err.endswith(
        f"error: --time-budget: {tmp_path / 'checkpoint.pth'} is at epoch 2, past the choice of --epochs (made after "
        "2 epochs); resume it with --epochs N instead\n")


def test_a_spent_time_budget_stops_after_two_epochs(small_shards, tmp_path, capsys):
    # In pytest's process the budget (0.6 s) was spent long before: the two epochs done, then the test.
    final = run(small_shards, tmp_path, "--arch", "lenet5", "-b", "16", "--epochs", "5", "--limit-batches", "1",
                "--time-budget", "0.01")
    assert final["epochs"] == 2 and len(read_jsonl(tmp_path / "metrics.jsonl")) == 2
    assert capsys.readouterr().out.count(": --epochs 2\n") == 1


def test_a_time_budget_that_ends_within_the_warm_up_says_so(small_shards, tmp_path, capsys):
    """A choice of no more epochs than --warmup-epochs ended the run at the peak lr, never decayed, without a word."""
    final = run(small_shards, tmp_path, "--arch", "lenet5", "-b", "16", "--epochs", "5", "--limit-batches", "1",
                "--warmup-epochs", "2", "--time-budget", "0.01")  # spent: the choice is the 2 epochs done
    assert final["epochs"] == 2 and read_jsonl(tmp_path / "metrics.jsonl")[-1]["lr"] == 0.01  # the peak
    assert capsys.readouterr().err.endswith(
        "note: --time-budget 0.01 min holds 2 epochs, no more than --warmup-epochs 2: the run ends in its warm-up, "
        "the lr never decays (give fewer warm-up epochs or more minutes)\n")


def test_a_resume_that_names_another_start_says_where_the_run_started():
    """The checkpoint's start stands (args.json says it); the note names it."""
    parser = train.get_args_parser()
    args = argparse.Namespace(pretrained=False, weights="w.pth")
    assert checkpoint.keep_start(dict(pretrained=True, weights=None), args, parser) == (
        "--weights w.pth not used: a resumed run goes on from its checkpoint's weights (the run started from ImageNet "
        "weights)")
    assert (args.pretrained, args.weights) == (True, None)
    args = argparse.Namespace(pretrained=True, weights=None)
    assert checkpoint.keep_start(dict(pretrained=False, weights=None), args, parser) == (
        "--pretrained not used: a resumed run goes on from its checkpoint's weights (the run started from scratch)")


def test_a_resume_may_name_a_recipe_whose_row_differs_in_its_epochs_only():
    """paper's 224 rows and paper-50's: a 10-epoch run goes on to 50 under paper-50; another recipe's row is refused."""
    args = argparse.Namespace(recipe="paper-50", arch="resnet18", size=224, test_only=False)
    checkpoint.check_recipe(dict(recipe="paper"), args, "c.pth")
    with pytest.raises(train.CheckpointError, match="^c.pth: made with --recipe fast, this run has --recipe paper-50,"):
        checkpoint.check_recipe(dict(recipe="fast"), args, "c.pth")


def test_a_resume_keeps_its_runs_epochs_unless_the_command_names_them_or_another_recipe():
    """Without --epochs a resume goes on to its run's own, also under the run's recipe (whose 40 replaced a given
    --epochs 5); another recipe's epochs (paper's 10-epoch run under paper-50) and a given --epochs still apply."""
    def kept(saved, argv, epochs, recipe=None, time_budget=None):
        args = argparse.Namespace(argv=argv, epochs=epochs, recipe=recipe, test_only=False, time_budget=time_budget)
        return train.keep_epochs(saved, args), args.epochs

    note = "--epochs 5 kept from the run (not {}); give --epochs N to train it further"
    assert kept(dict(epochs=5, recipe=None), [], 30) == (note.format(30), 5)
    assert kept(dict(epochs=5, recipe="paper"), ["--recipe", "paper"], 40, "paper") == (note.format(40), 5)
    assert kept(dict(epochs=10, recipe="paper"), ["--recipe", "paper-50"], 50, "paper-50") == ("", 50)
    assert kept(dict(epochs=5, recipe=None), ["--epochs", "8"], 8) == ("", 8)
    assert kept(dict(epochs=30, recipe=None), [], 30) == ("", 30)
    budget = ["--recipe", "fast", "--time-budget", "10"]  # its choice is restore's to keep, as before, without a note
    assert kept(dict(epochs=4, recipe="fast", budget_epochs=4), budget, 40, "fast", 10.0) == ("", 40)


def test_a_resume_keeps_its_runs_batch_unless_the_command_names_one():
    """Without -b a resume goes on at its run's batch, also under its recipe; a given -b (however spelled) still
    applies, and an evaluation takes its own."""
    def kept(saved, argv, batch, recipe=None, test_only=False):
        args = argparse.Namespace(argv=argv, batch_size=batch, epochs=30, recipe=recipe, test_only=test_only,
                                  time_budget=None)
        return train.keep_run_flags(dict(saved, epochs=30, recipe=recipe), args), args.batch_size

    assert kept(dict(batch_size=64), [], 128) == ({"batch_size": "-b 64 kept from the run (not 128)"}, 64)
    assert kept(dict(batch_size=16), ["--recipe", "paper"], 32, "paper") == (
        {"batch_size": "-b 16 kept from the run (not 32)"}, 16)
    assert kept(dict(batch_size=32), ["--recipe", "paper"], 32, "paper") == ({}, 32)
    assert kept(dict(batch_size=64), ["-b", "128"], 128) == ({}, 128)
    assert kept(dict(batch_size=64), ["--batch-size=8"], 8) == ({}, 8)
    assert kept(dict(batch_size=64), ["--test-only"], 128, test_only=True) == ({}, 128)
    assert kept({}, [], 128) == ({}, 128)  # a checkpoint whose args do not say


def test_a_checkpoint_that_names_no_norm_resumes_with_any():
    checkpoint.check_norm(None, argparse.Namespace(norm="half"), "c.pth")  # an older train.py's: it does not say


def test_the_continue_line_drops_the_one_shot_flags_in_either_spelling():
    args = argparse.Namespace(argv=["--lr", "0.1", "--stop-after-steps=5", "--wait-at-step", "3", "--resume=old.pth"])
    assert checkpoint.continue_command(args, 1) == "python train.py --lr 0.1 --resume auto"


def test_an_ema_checkpoint_is_evaluated_whatever_the_decay_given():
    """--test-only of an --ema run's checkpoint evaluates its average: the decay the command names does not matter;
    a training resume must keep it."""
    loaded = []
    parts = argparse.Namespace(ema=argparse.Namespace(load_state_dict=loaded.append))
    ckpt = dict(args=dict(ema=0.999, ema_every=4), ema={"n_averaged": 3})
    checkpoint.restore_ema(parts, ckpt, "c.pth", argparse.Namespace(ema=0.99, ema_every=1, test_only=True))
    assert loaded == [{"n_averaged": 3}]
    with pytest.raises(train.CheckpointError) as e:
        checkpoint.restore_ema(parts, ckpt, "c.pth", argparse.Namespace(ema=0.99, ema_every=1, test_only=False))
    assert str(e.value) == (
        "c.pth: holds an EMA of the weights made with --ema 0.999 --ema-every 4, this run has --ema 0.99 --ema-every "
        "1, and one average must keep its decay; resume it with --ema 0.999 --ema-every 4, or use another --output-dir")


def test_test_only_evaluates_a_checkpoints_average_or_weights_with_or_without_ema():
    """README: --test-only may differ in --ema. A --recipe fast run's checkpoint evaluated without the recipe was
    refused 'resume it with --ema 0.999', and a plain run's with --ema 'holds no EMA'; --weights of either file
    evaluated it. Now the file's average is evaluated without --ema, and its weights (not the fresh ones the EMA
    was copied from) with it."""
    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    trained, average, fresh = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    ckpt = dict(args=dict(ema=0.999, ema_every=4), ema=AveragedModel(average).state_dict())
    module = nn.Linear(2, 2)
    module.load_state_dict(trained.state_dict())  # `restore` loads the model's weights first
    checkpoint.restore_ema(argparse.Namespace(ema=None, module=module), ckpt, "c.pth", flags("--test-only"))
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), average.state_dict().values()))
    ema = AveragedModel(fresh)
    checkpoint.restore_ema(argparse.Namespace(ema=ema, module=trained), dict(args={}), "c.pth",
                           flags("--test-only", "--ema", "0.9"))
    assert all(torch.equal(a, b) for a, b in zip(ema.module.state_dict().values(), trained.state_dict().values()))


def test_a_file_of_another_format_is_no_checkpoint_to_resume(tmp_path):
    torch.save({"format": "tinyin-train-1", "identity": {}}, tmp_path / "old.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "weights.pth")
    for name, found in (("old.pth", "tinyin-train-1"), ("weights.pth", "none")):
        with pytest.raises(train.CheckpointError) as e:
            checkpoint.load_checkpoint(str(tmp_path / name), {})
        assert str(e.value) == f"{tmp_path / name}: not a train.py checkpoint of format tinyin-train-2 (format: {found})"


def test_a_checkpoint_or_weights_file_cut_short_is_not_called_unreadable(tmp_path):
    """A copy cut short by a few bytes (an interrupted scp): torch.load's seek for the zip's end raises
    OSError(EINVAL) with no file named, which read 'cannot read (Invalid argument)', as if the disk or the
    file's mode were at fault. Only an OSError naming the file (its open: another user's, mode 600) is that."""
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "model": {"w": torch.zeros(1000)}}, tmp_path / "c.pth")
    path = tmp_path / "c.pth"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(OSError) as e:
        torch.load(path, weights_only=True)
    assert (e.value.errno, e.value.filename) == (errno.EINVAL, None)  # what torch does with such a file
    with pytest.raises(train.CheckpointError) as e:
        checkpoint.load_checkpoint(str(path), {})
    assert str(e.value) == f"{path}: not a train.py checkpoint (OSError)"
    assert train.describe_weights(path, "lenet5") == "not a weights file (OSError)"


def test_a_stream_checkpoint_of_the_default_workers_names_them_as_two():
    """-j not given is the loader's 2 workers: a refusal names -j 2 (what the run read with), not a None or a 0."""
    state, path = train.RunState(epoch=0, samples_done=4, epoch_steps=1), "runs/x/checkpoint.pth"
    default = dict(args=dict(data_path="stream", workers=None), world_size=1, batch_size=4)
    with pytest.raises(train.CheckpointError) as e:
        checkpoint.check_epoch_order(default, state, argparse.Namespace(data_path="stream", batch_size=4, workers=3), 1, path)
    assert str(e.value) == (
        f"{path}: stopped mid-epoch (epoch 0 step 1) with -j 2, whose order of the epoch -j 3 does not share (the "
        "stream path reads max(2, -j) shard groups side by side); resume it with -j 2 or fewer")
    with pytest.raises(train.CheckpointError) as e:
        checkpoint.check_epoch_order(dict(default, args=dict(data_path="stream", workers=3)), state,
                                     argparse.Namespace(data_path="stream", batch_size=4, workers=None), 1, path)
    assert str(e.value).endswith("with -j 3, whose order of the epoch -j 2 does not share (the stream path reads "
                                 "max(2, -j) shard groups side by side); resume it with -j 3")


def test_weights_that_do_not_say_their_norm_and_a_checkpoint_from_before_recipe_are_taken():
    """--weights of a file that records no --norm (a torchvision state dict) is used with any --norm; a
    checkpoint from before --recipe is resumed with one. Another recorded --norm is refused."""
    args = flags("--arch", "resnet18", "--norm", "imagenet", "--recipe", "paper")
    checkpoint.check_norm(None, args, "w.pth")
    checkpoint.check_recipe({"lr": 0.1}, args, "c.pth")
    with pytest.raises(train.CheckpointError, match=r"^w\.pth: made with --norm half, this run has --norm imagenet,"):
        checkpoint.check_norm("half", args, "w.pth")


def test_resume_auto_is_the_output_dirs_checkpoint_once_there_is_one(tmp_path):
    args = argparse.Namespace(resume="auto", output_dir=str(tmp_path))
    assert checkpoint.resume_path(args) is None  # a first run starts afresh
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    assert checkpoint.resume_path(args) == str(tmp_path / "checkpoint.pth")
    assert checkpoint.resume_path(argparse.Namespace(resume="runs/x.pth", output_dir=str(tmp_path))) == "runs/x.pth"


def test_the_continue_command_drops_the_one_shot_flags_and_resumes_auto():
    """A --stop-after-steps kept in it stopped the resumed run again; --resume X is replaced by --resume auto."""
    argv = ["--arch", "lenet5", "--resume", "old.pth", "--stop-after-steps", "3", "--wait-at-step=2", "-b", "8"]
    args = argparse.Namespace(argv=argv)
    assert checkpoint.continue_command(args, 1) == "python train.py --arch lenet5 -b 8 --resume auto"
    assert checkpoint.continue_command(args, 2) == (
        "torchrun --nproc_per_node 2 train.py --arch lenet5 -b 8 --resume auto")


def test_the_continue_command_names_train_py_where_it_is(tmp_path, monkeypatch):
    """`python ~/my repo/train.py` run in a job's own folder was told to continue with `python train.py`:
    no such file there. It is named by its path (quoted for the shell) unless it is in the current folder."""
    script = tmp_path / "my repo" / "train.py"
    script.parent.mkdir()
    args = argparse.Namespace(argv=["--output-dir", "run 1"])
    monkeypatch.chdir(tmp_path)
    assert checkpoint.continue_command(args, 1, str(script)) == (
        f"python '{script}' --output-dir 'run 1' --resume auto")
    assert checkpoint.continue_command(args, 2, str(script)) == (
        f"torchrun --nproc_per_node 2 '{script}' --output-dir 'run 1' --resume auto")
    monkeypatch.chdir(script.parent)
    assert checkpoint.continue_command(args, 1, str(script)) == "python train.py --output-dir 'run 1' --resume auto"


def test_a_runs_classes_are_named_by_their_wnids_in_label_order():
    """The identity a checkpoint keeps (its format unchanged, or every earlier checkpoint is 'of another run'):
    the same classes in another order label the samples otherwise, so they are another dataset."""
    manifest = {"classes": [{"wnid": "n01443537"}, {"wnid": "n01629819"}]}
    assert checkpoint.classes_of(manifest) == "2 classes (ae8c556285e6)"
    assert checkpoint.classes_of({"classes": manifest["classes"][::-1]}) != checkpoint.classes_of(manifest)


def test_a_stream_checkpoint_resumes_mid_epoch_only_on_as_many_ranks():
    state = train.RunState(epoch=1, samples_done=64, epoch_steps=4)
    saved = dict(args=dict(data_path="stream", workers=2), world_size=2, batch_size=16, stream_deal=2)
    with pytest.raises(train.CheckpointError) as e:
        checkpoint.check_epoch_order(saved, state, argparse.Namespace(data_path="stream", batch_size=16, workers=2),
                                     1, "c.pth")
    assert str(e.value) == ("c.pth: stopped mid-epoch (epoch 1 step 4) on 2 ranks; the stream path resumes mid-epoch "
                            "on the same number only (this run has 1)")
    with pytest.raises(train.CheckpointError) as e:  # it said 'on 1 ranks'
        checkpoint.check_epoch_order(dict(saved, world_size=1), state,
                                     argparse.Namespace(data_path="stream", batch_size=16, workers=2), 2, "c.pth")
    assert str(e.value) == ("c.pth: stopped mid-epoch (epoch 1 step 4) on 1 rank; the stream path resumes mid-epoch "
                            "on the same number only (this run has 2)")
