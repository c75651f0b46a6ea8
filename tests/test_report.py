"""pipeline.report on hand-written run folders: exact table text, curves, errors."""

import json

import pytest

from pipeline.report import plot_curves, render_table, write_report


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
        "| AlexNet, from alexnet-owt-7be5be79.pth | 64x64 RGB | 1 | 100 | 1.00% | 2.00% | 1.50% | 7.2 s |\n"
    )


def test_not_a_training_run(tmp_path, runs):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as e:
        render_table([runs[0], empty])
    assert str(e.value) == f"{empty}: not a training run (no metrics.jsonl)"


def test_plot_and_write_report(tmp_path, runs):
    png = plot_curves(runs, tmp_path / "c.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md, png = write_report(runs, tmp_path / "report")
    assert png == str(tmp_path / "report" / "curves.png")
    text = open(md).read()
    assert render_table(runs) in text and "![learning curves](curves.png)" in text


def test_limited_runs_say_so(tmp_path):
    run = tmp_path / "quick"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"arch": "resnet18", "size": 64, "epochs": 1, "batch_size": 100,
                                               "limit_batches": 100}))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "train_top1": 1.0, "val_top1": 2.0, "train_loss": 5,
                                                   "val_loss": 5, "val_top5": 8, "epoch_time_s": 60}) + "\n")
    assert "| ResNet-18 | 64x64 RGB | 1 (100 batches each) | 100 |" in render_table([run])


def test_augmented_runs_say_so(tmp_path):
    run = tmp_path / "aug"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"arch": "lenet5", "size": 28, "epochs": 1, "batch_size": 32,
                                               "augment": True}))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "train_top1": 1.0, "val_top1": 2.0, "train_loss": 5,
                                                   "val_loss": 5, "val_top5": 8, "epoch_time_s": 60}) + "\n")
    assert "| LeNet-5 + crop/flip augmentation | 28x28 grey | 1 | 32 |" in render_table([run])
