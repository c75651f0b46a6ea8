"""Re-run the study's tables with `train.py --recipe paper`, then write the report beside the study's.

    python tools/reproduce.py --shards out/shards --out runs/paper                  # Table 2 + Table 3
    python tools/reproduce.py --rows lenet5-28 --epochs 1 --limit-batches 5        # a quick look
    python tools/reproduce.py --train-args="--amp --channels-last" --device cuda     # on a GPU

Rows: Table 2 (lenet5-28, alexnet-64, squeezenet1_1-64, resnet18-64: from scratch, 40 epochs) and
Table 3 (ARCH-224: ImageNet-pretrained, 10 epochs; ARCH-224-50: 50 epochs). Each row trains in its
own train.py subprocess into OUT/ROW with `--resume auto`: an interrupted reproduction picks up
where it stopped, and a finished row (final.json with its epochs) is not run again. Table 3 rows
need the ImageNet weights as a local file (--weights-dir, or already in the torch.hub cache;
nothing is downloaded): without one the row is reported as "not run: no ImageNet weights here".
OUT/report.md (+ report.json, curves.png) puts our rows beside the study's reported and
recorded values, with minutes per row and the whole table's wall time (OUT/ROW/reproduce.json
keeps each row's process wall clock, summed over resumes).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere, installed or not

import models  # noqa: E402
from models.recipes import RECIPES  # noqa: E402
from pipeline.report import write_report  # noqa: E402

TABLE2 = {f"{arch}-{size}": ("paper", arch, size) for arch, size in RECIPES["paper"] if size != 224}
TABLE3 = {**{f"{arch}-{size}": ("paper", arch, size) for arch, size in RECIPES["paper"] if size == 224},
          **{f"{arch}-{size}-50": ("paper-50", arch, size) for arch, size in RECIPES["paper-50"]}}
ROWS = {**TABLE2, **TABLE3}
NO_WEIGHTS = "no ImageNet weights here"


def weights_file(arch, weights_dir):
    """The local ImageNet weights file for `arch` under its torchvision name, or None."""
    import torch

    name = os.path.basename(models.model_spec(arch).weights.url)
    for folder in (weights_dir, Path(torch.hub.get_dir()) / "checkpoints"):
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def finished(run, epochs):
    """Whether `run` already holds a finished training of `epochs` epochs."""
    final = run / "final.json"
    return final.is_file() and json.loads(final.read_text()).get("epochs") == epochs


def run_row(name, args):
    """Train one row (resuming it if it was interrupted); returns (run folder, None) or (None, reason)."""
    recipe, arch, size = ROWS[name]
    run = Path(args.out) / name
    cmd = [sys.executable, str(ROOT / "train.py"), "--shards", args.shards, "--arch", arch, "--size", str(size),
           "--recipe", recipe, "--output-dir", str(run), "--resume", "auto"]
    if RECIPES[recipe][arch, size].get("pretrained"):
        weights = weights_file(arch, args.weights_dir)
        if weights is None:
            return None, NO_WEIGHTS
        cmd += ["--weights", str(weights)]
    epochs = args.epochs or RECIPES[recipe][arch, size]["epochs"]
    cmd += ["--epochs", str(epochs)]
    if args.limit_batches:
        cmd += ["--limit-batches", str(args.limit_batches)]
    if args.device:
        cmd += ["--device", args.device]
    cmd += shlex.split(args.train_args or "")
    if finished(run, epochs):
        print(f"== {name}: finished earlier, not run again", flush=True)
        return run, None
    print(f"== {name}: {shlex.join(cmd[1:])}", flush=True)
    t0 = time.time()
    code = subprocess.run(cmd).returncode
    run.mkdir(parents=True, exist_ok=True)
    record = run / "reproduce.json"
    before = json.loads(record.read_text())["wall_s"] if record.is_file() else 0.0
    record.write_text(json.dumps(dict(wall_s=before + time.time() - t0, command=cmd[1:])))
    if code != 0:
        sys.exit(f"error: row {name} failed (exit {code}); rerun to resume it")
    return run, None


def main(args):
    rows = args.rows.split(",") if args.rows else list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"error: unknown row(s) {', '.join(unknown)}; choose from: {', '.join(ROWS)}")
    done, not_run = [], []
    for name in rows:
        run, reason = run_row(name, args)
        if run is None:
            print(f"== {name}: not run: {reason}", flush=True)
            not_run.append((name, reason))
        else:
            done.append(run)
    wall = sum(json.loads((r / "reproduce.json").read_text())["wall_s"] for r in done if (r / "reproduce.json").is_file())
    md, png = write_report(done, args.out, not_run=not_run, wall_s=wall if done else None)
    print(Path(md).read_text())
    print(f"wrote {md}" + (f" and {png}" if png else ""))


def get_args_parser():
    p = argparse.ArgumentParser(description="Reproduce the study's tables with train.py --recipe paper")
    p.add_argument("--shards", default="out/shards", help="shard folder (default: out/shards)")
    p.add_argument("--out", default="runs/paper", help="one sub-folder per row, plus report.md (default: runs/paper)")
    p.add_argument("--rows", help=f"comma-separated subset of: {', '.join(ROWS)} (default: all)")
    p.add_argument("--epochs", type=int, help="override every row's epochs, for a quick run (default: the recipe's)")
    p.add_argument("--limit-batches", type=int, help="passed to train.py: batches per epoch and per evaluation (default: all)")
    p.add_argument("--device", help="passed to train.py (default: train.py's, cuda if available)")
    p.add_argument("--weights-dir", help="folder holding the ImageNet .pth files under their torchvision names (default: none)")
    p.add_argument("--train-args", help="more train.py flags, e.g. '--amp --channels-last' (default: none)")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
