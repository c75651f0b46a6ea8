"""The speedrun of issue 9: `train.py --recipe fast` for several seeds, timed from process start.

    python tools/speedrun.py --shards SHARDS --out OUT                      # resnet18_64, seeds 0 and 1
    python tools/speedrun.py --shards S --out O --arch resnet10_64s2 --seeds 0,1,2 --train-args '--epochs 30'

Each seed is one `train.py` process; its minutes are the process's wall time, from start to the
final test evaluation (shards already built: the build is not part of a speedrun). Writes
OUT/speedrun.md (per seed and mean +- spread: minutes, val and test top-1), OUT/speedrun.json and
OUT/speedrun.png (val top-1 against minutes: the time-to-accuracy curve). Run folders go to
OUT/runs/; a seed whose final.json is there is not run again.
"""
import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch

ROOT = Path(__file__).resolve().parents[1]


def run_seed(args, seed, out):
    """Train one seed (unless done before); its process wall time and run folder."""
    run = out / "runs" / f"seed{seed}"
    timing = run / "process_wall.json"
    if not (run / "final.json").is_file() or not timing.is_file():
        cmd = [sys.executable, str(ROOT / "train.py"), "--shards", args.shards, "--arch", args.arch, "--size", "64",
               "--recipe", "fast", "--seed", str(seed), "--output-dir", str(run), *shlex.split(args.train_args)]
        if args.device:
            cmd += ["--device", args.device]
        print(f"$ {shlex.join(cmd)}", flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT)
        run.mkdir(parents=True, exist_ok=True)
        timing.write_text(json.dumps(dict(seconds=time.time() - t0, command=shlex.join(cmd[1:]))))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return dict(seed=seed, final=json.loads((run / "final.json").read_text()), metrics=rows,
                **json.loads(timing.read_text()))


def curve(result):
    """(minutes, val top-1) after each epoch: the epochs' train+val time summed, plus the start-up
    (the process's time not spent in epochs, put before the first: imports, shards, compiling)."""
    spent = sum(r["epoch_time_s"] for r in result["metrics"])
    t = max(result["seconds"] - spent, 0.0)
    points = []
    for r in result["metrics"]:
        t += r["epoch_time_s"]
        points.append((t / 60, r["val_top1"]))
    return points


def spread(values):
    """'mean +- half the range' of a list (two seeds: their midpoint and half their gap)."""
    return f"{statistics.fmean(values):.2f} ± {(max(values) - min(values)) / 2:.2f}"


def render(results, argv):
    """speedrun.md: the command, one row per seed, then the mean +- spread."""
    lines = [f"# python tools/speedrun.py {shlex.join(argv)}",
             f"# train.py {results[0]['command'].split(' ', 1)[1]}", "",
             "| seed | minutes (process) | epochs | val top-1 (%) | test top-1 (%) | evaluated |",
             "|---|---|---|---|---|---|"]
    for r in results:
        f = r["final"]
        lines.append(f"| {r['seed']} | {r['seconds'] / 60:.2f} | {f['epochs']} | {f['val_top1']:.2f} | "
                     f"{f['test_top1']:.2f} | {f['eval_model']}{' + flip TTA' if f.get('tta') else ''} |")
    if len(results) > 1:
        lines.append(f"| mean ± spread | {spread([r['seconds'] / 60 for r in results])} | | "
                     f"{spread([r['final']['val_top1'] for r in results])} | "
                     f"{spread([r['final']['test_top1'] for r in results])} | |")
    return "\n".join(lines) + "\n"


def plot(results, png):
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for r in results:
        minutes, top1 = zip(*curve(r))
        ax.plot(minutes, top1, marker=".", label=f"seed {r['seed']}")
    ax.set(xlabel="minutes from process start", ylabel="val top-1 (%)", title=f"--recipe fast, {results[0]['final']['arch']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(prog="speedrun.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="the shard folder (or URL) train.py reads")
    p.add_argument("--out", required=True, help="where speedrun.md/.json/.png and runs/ go")
    p.add_argument("--arch", default="resnet18_64", help="a network the fast recipe has a row for (default: %(default)s)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--device", default=None, help="passed to train.py (default: train.py's)")
    p.add_argument("--train-args", default="", help="more train.py flags, e.g. '--epochs 30' (they win over the recipe)")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds: comma-separated integers, not {args.seeds!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        results = [run_seed(args, seed, out) for seed in seeds]
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: train.py failed (exit {e.returncode}); rerun to continue")
    (out / "speedrun.md").write_text(render(results, sys.argv[1:] if argv is None else argv))
    (out / "speedrun.json").write_text(json.dumps([dict(r, curve=curve(r)) for r in results], indent=1))
    plot(results, out / "speedrun.png")
    print((out / "speedrun.md").read_text(), end="")


if __name__ == "__main__":
    main()
