"""Re-run the study's rows with `train.py --recipe paper`, then write the report.

    python tools/reproduce.py --shards out/shards --out runs/paper
    python tools/reproduce.py --rows lenet5-28,resnet18-64 --epochs 1     # a quick look

Each row trains in its own subprocess into OUT/ARCH-SIZE with `--resume auto`, so an
interrupted reproduction picks up where it stopped. Pretrained (224) rows need the ImageNet
weights: they are fetched into the torch.hub cache first, or taken from --weights-dir; when
neither works the row is skipped with the reason.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere, installed or not

import models  # noqa: E402
from pipeline.report import write_report  # noqa: E402
from models.recipes import RECIPES  # noqa: E402

ROWS = {f"{arch}-{size}": (arch, size) for arch, size in RECIPES["paper"]}


def weights_flags(arch, weights_dir):
    """Extra train.py flags for a pretrained row, or raise WeightsUnavailable with the reason."""
    url = models.model_spec(arch).weights.url
    if weights_dir and (Path(weights_dir) / os.path.basename(url)).is_file():
        return ["--weights", str(Path(weights_dir) / os.path.basename(url))]
    models.get_model(arch, pretrained=True)  # downloads into the hub cache, where train.py will find it
    return []


def main(args):
    rows = args.rows.split(",") if args.rows else list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"error: unknown row(s) {', '.join(unknown)}; choose from: {', '.join(ROWS)}")
    done, skipped = [], []
    for name in rows:
        arch, size = ROWS[name]
        cmd = [sys.executable, str(ROOT / "train.py"), "--shards", args.shards, "--arch", arch, "--size", str(size),
               "--recipe", "paper", "--output-dir", str(Path(args.out) / name), "--resume", "auto"]
        if RECIPES["paper"][arch, size].get("pretrained"):
            try:
                cmd += weights_flags(arch, args.weights_dir)
            except models.WeightsUnavailable as e:
                print(f"skipping {name}: {e}")
                skipped.append(name)
                continue
        if args.epochs:
            cmd += ["--epochs", str(args.epochs)]
        if args.device:
            cmd += ["--device", args.device]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"error: row {name} failed; rerun to resume it")
        done.append(Path(args.out) / name)
    if done:
        md, png = write_report(done, args.out)
        print(Path(md).read_text())
        print(f"wrote {md} and {png}")
    if skipped:
        print(f"skipped: {', '.join(skipped)}")


def get_args_parser():
    p = argparse.ArgumentParser(description="Reproduce the study's table with train.py --recipe paper")
    p.add_argument("--shards", default="out/shards", help="shard folder (default: out/shards)")
    p.add_argument("--out", default="runs/paper", help="one sub-folder per row, plus report.md (default: runs/paper)")
    p.add_argument("--rows", help=f"comma-separated subset of: {', '.join(ROWS)} (default: all)")
    p.add_argument("--epochs", type=int, help="override every row's epochs, for a quick run (default: the recipe's)")
    p.add_argument("--device", help="passed to train.py (default: train.py's, cuda if available)")
    p.add_argument("--weights-dir", help="folder holding the ImageNet .pth files under their torchvision names (default: none)")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
