"""Summarise training runs the way the study did: one table row per run, plus learning curves.

A run is an output folder of train.py: args.json (what was asked), metrics.jsonl (one row
per epoch), final.json (test accuracy and wall time, once the run has finished).
"""

import json
import os
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch
from matplotlib.ticker import MaxNLocator

__all__ = ["read_run", "render_table", "plot_curves", "write_report"]

NAMES = {"lenet5": "LeNet-5", "alexnet": "AlexNet", "squeezenet1_1": "SqueezeNet 1.1", "resnet18": "ResNet-18"}
SCALING = {28: "28x28 grey", 64: "64x64 RGB", 224: "224x224 RGB (64x64 upscaled)"}
COLUMNS = ["Method", "Image scaling", "Epochs", "Batch size", "Training accuracy",
           "Validation accuracy", "Test accuracy", "Wall time"]


def read_run(run) -> dict:
    """Load a run folder: ``dict(name, args, rows, final, env)``; ``ValueError`` if it has no metrics."""
    run = Path(run)
    if not (run / "metrics.jsonl").is_file():
        raise ValueError(f"{run}: not a training run (no metrics.jsonl)")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]

    def optional(name):
        return json.loads((run / name).read_text()) if (run / name).is_file() else {}

    return dict(name=run.name, args=optional("args.json"), rows=rows, final=optional("final.json"), env=optional("env.json"))


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def _percent(value) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _row(run: dict) -> list[str]:
    args, rows, final = run["args"], run["rows"], run["final"]
    method = NAMES.get(args.get("arch"), args.get("arch", "?"))
    if args.get("pretrained"):
        method += ", ImageNet-pretrained"
    elif args.get("weights"):
        method += f", from {os.path.basename(args['weights'])}"
    if args.get("augment"):
        method += " + crop/flip augmentation"
    epochs = str(len(rows))
    if args.get("epochs") and args["epochs"] != len(rows):
        epochs += f" of {args['epochs']}"  # an unfinished run says so
    if args.get("limit_batches"):
        epochs += f" ({args['limit_batches']} batches each)"  # a --limit-batches run saw a subset
    batch = str(args.get("batch_size", "?"))
    if run["env"].get("world_size", 1) > 1:
        batch += f" x {run['env']['world_size']} processes"
    last = rows[-1] if rows else {}
    wall = final.get("wall_time_s", sum(r.get("epoch_time_s", 0) for r in rows))
    return [method, SCALING.get(args.get("size"), str(args.get("size", "?"))), epochs, batch,
            _percent(last.get("train_top1")), _percent(last.get("val_top1")), _percent(final.get("test_top1")),
            _duration(wall)]


def render_table(run_dirs) -> str:
    """A Markdown table, one row per run, in the study's column layout (plus test accuracy, wall time)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_row(read_run(run))) + " |" for run in run_dirs]
    return "\n".join(lines) + "\n"


def plot_curves(run_dirs, out_png) -> str:
    """Loss and top-1 per epoch, train solid and val dashed, one colour per run; saved as PNG."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for i, path in enumerate(run_dirs):
        run = read_run(path)
        epochs = [r["epoch"] + 1 for r in run["rows"]]
        colour = f"C{i % 10}"
        for ax, key in ((ax_loss, "loss"), (ax_acc, "top1")):
            ax.plot(epochs, [r[f"train_{key}"] for r in run["rows"]], color=colour, marker=".", label=f"{run['name']} train")
            ax.plot(epochs, [r[f"val_{key}"] for r in run["rows"]], color=colour, marker=".", linestyle="--",
                    label=f"{run['name']} val")
    for ax, ylabel in ((ax_loss, "cross-entropy loss"), (ax_acc, "top-1 accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize="small")
    fig.savefig(out_png, dpi=120)
    return str(out_png)


def write_report(run_dirs, out_dir) -> tuple[str, str]:
    """Write ``report.md`` (the table, linking the curves) and ``curves.png`` into ``out_dir``."""
    table = render_table(run_dirs)  # first, so a bad run dir fails before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_curves(run_dirs, out / "curves.png")
    md = out / "report.md"
    md.write_text(f"# Tiny ImageNet runs\n\n{table}\n![learning curves](curves.png)\n")
    return str(md), png
