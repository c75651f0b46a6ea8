"""Everything issue 8 asks of a GPU machine, in one re-runnable command.

    python tools/gpu_session.py --release /tmp/tiny-imagenet-200.tar.gz --out $OUT
    python tools/gpu_session.py --release REL --out OUT --parts bench       # one part per call
    python tools/gpu_session.py --release SYNTH_FOLDER --out OUT --smoke    # a CPU dry run

Parts, in order: `bench` (the `tinyin bench train` table), `table2` (tools/reproduce.py, Table 2
with --recipe paper, plus --amp --channels-last and the four rows side by side on CUDA), `r224`
(ResNet-18 from scratch at 224 for 2 epochs, its images/s against the bench's ceiling (a)),
`speedrun` (issue 9: tools/speedrun.py, --recipe fast for two seeds). Work (shards, extracted
images, run folders with checkpoints) goes to --work; results to --work/results, copied to --out at
the end: bench.md, table2.md, curves.png, r224.md, speedrun.md, speedrun.png, ablation.md (with
--speedrun-args '--ablate ...'), and json.tar holding env.json, bench.json, table2.json,
speedrun.json and ablation.json (8 files: the device tool returns at most 8). A part whose result
is in --work/results is not run again, and train.py's --resume auto continues an interrupted row,
so a session can split the work into several calls of under 10 minutes while the machine stays warm.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("bench", "table2", "r224", "speedrun")
RESULTS = ("bench.md", "table2.md", "curves.png", "r224.md", "speedrun.md", "speedrun.png", "ablation.md")
JSON = ("env.json", "bench.json", "table2.json", "speedrun.json", "ablation.json")  # packed into json.tar


def sh(cmd, log=None):
    """Run `cmd` (a list) from the repo root with PYTHONPATH on it; exit on failure."""
    print(f"$ {shlex.join(map(str, cmd))}", flush=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE if log else None)
    if log:
        print(out.stdout, end="", flush=True)
        Path(log).write_text(out.stdout)
    if out.returncode != 0:
        sys.exit(f"error: {cmd[1] if len(cmd) > 1 else cmd[0]} failed (exit {out.returncode}); rerun to continue")
    return out


def shards_and_images(args, work):
    """The shard folder (built with every core if needed) and an extracted release for feed d."""
    from pipeline.build import build_shards

    src = Path(args.release) if args.release else None
    shards = Path(args.shards) if args.shards else work / "shards"
    if not (shards / "manifest.json").is_file():
        t0 = time.time()
        build_shards(src, shards, workers=os.cpu_count(), progress=False)
        print(f"built shards in {time.time() - t0:.1f} s", flush=True)
    if src is None:
        return shards, None
    if src.is_dir():
        return shards, src
    images = work / "images"
    if not (images / "done").is_file():
        t0 = time.time()
        with tarfile.open(src) as tf:  # train/ and wnids.txt only: what ImageFolder reads
            members = [m for m in tf if m.name.split("/")[1:2] in (["train"], ["wnids.txt"])]
            tf.extractall(images, members=members, filter="data")
        (images / "done").touch()
        print(f"extracted {len(members):,} members in {time.time() - t0:.1f} s", flush=True)
    return shards, next(images.glob("*/wnids.txt")).parent


def part_bench(args, res, shards, images):
    cmd = [sys.executable, "-m", "pipeline.cli", "bench", "train", "--shards", shards, "--json", res / "bench.json"]
    if images:
        cmd += ["--images", images]
    if args.smoke:
        cmd += ["--arch", "lenet5", "--batch", "16", "--warmup", "1", "--steps", "1"]
    sh(cmd + shlex.split(args.bench_args or ""), log=res / "bench.md")


def part_table2(args, res, shards, work):
    cmd = [sys.executable, "tools/reproduce.py", "--shards", shards, "--out", work / "paper",
           "--rows", "lenet5-28,alexnet-64,squeezenet1_1-64,resnet18-64"]
    on_cuda = args.device.startswith("cuda")
    train_args = "--amp --channels-last" if on_cuda else ""
    jobs = args.table2_jobs or (4 if on_cuda else 1)
    if args.smoke:  # two rows side by side, so the dry run takes the path the GPU run takes
        cmd += ["--rows", "lenet5-28,squeezenet1_1-64", "--epochs", "1", "--limit-batches", "2"]
        jobs = args.table2_jobs or 2
    sh(cmd + ["--device", args.device, "--jobs", jobs,
              "--train-args", f"{train_args} {args.train_args or ''}".strip()])
    for name, dest in (("report.md", "table2.md"), ("report.json", "table2.json"), ("curves.png", "curves.png")):
        shutil.copy(work / "paper" / name, res / dest)


def part_r224(args, res, shards, work):
    run = work / "resnet18-224-scratch"
    cmd = [sys.executable, "train.py", "--shards", shards, "--arch", "resnet18", "--size", "224", "--epochs", "2",
           "-b", "100", "--lr", "0.001", "--momentum", "0.9", "--wd", "0", "--lr-scheduler", "none",
           "--norm", "imagenet", "--output-dir", run, "--resume", "auto", "--device", args.device]
    if args.device.startswith("cuda"):
        cmd += ["--amp", "--channels-last"]
    if args.smoke:
        cmd += ["--epochs", "1", "--limit-batches", "2", "-b", "4"]
    if not (run / "final.json").is_file():
        sh(cmd)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    bench = json.loads((res / "bench.json").read_text())["rows"] if (res / "bench.json").is_file() else []
    ceiling = next((r["images_per_s"] for r in bench if (r["arch"], r["size"], r["batch"], r["feed"], r["compiled"])
                    == ("resnet18", 224, 100, "ceiling", False)), None)
    lines = [f"# {shlex.join(map(str, cmd[1:]))}", "| epoch | train images/s | of bench (a), resnet18@224 b100 | val top-1 |",
             "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['images_per_s'] / ceiling:.0%}" if ceiling else "- (no bench row)"
        lines.append(f"| {r['epoch'] + 1} | {r['images_per_s']:,.0f} | {ratio} | {r['val_top1']:.2f}% |")
    (res / "r224.md").write_text("\n".join(lines) + "\n")
    print((res / "r224.md").read_text(), flush=True)


def part_speedrun(args, res, shards, work):
    cmd = [sys.executable, "tools/speedrun.py", "--shards", shards, "--out", work / "speedrun", "--device", args.device]
    if args.smoke:
        cmd += ["--arch", "resnet10_64s2", "--seeds", "0", "--train-args", "--epochs 2 --warmup-epochs 1 --limit-batches 1 -b 8"]
    sh(cmd + shlex.split(args.speedrun_args or ""))
    for name in ("speedrun.md", "speedrun.json", "speedrun.png", "ablation.md", "ablation.json"):
        if (work / "speedrun" / name).is_file():  # ablation.*: only with --speedrun-args '--ablate ...'
            shutil.copy(work / "speedrun" / name, res / name)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", help="the release archive (.tar.gz) or an extracted/synthetic release folder")
    p.add_argument("--shards", help="an existing shard folder (skips the build)")
    p.add_argument("--out", required=True, help="where the result files are copied (e.g. $OUT)")
    p.add_argument("--work", default="/tmp/tinyin-gpu", help="shards, images, runs, results (default: %(default)s)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: %(default)s")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--commit", help="the commit, where the copy has no .git (default: git rev-parse)")
    p.add_argument("--bench-args", help="more `tinyin bench train` flags, e.g. '--arch resnet18 --no-compile'")
    p.add_argument("--train-args", help="more train.py flags for Table 2's rows")
    p.add_argument("--table2-jobs", type=int,
                   help="Table 2 rows trained side by side (tools/reproduce.py --jobs; default: 4 on CUDA, 1 on the CPU)")
    p.add_argument("--speedrun-args", help="more tools/speedrun.py flags, e.g. \"--train-args '--epochs 30'\"")
    p.add_argument("--smoke", action="store_true", help="a tiny scale for a CPU dry run (synthetic data)")
    args = p.parse_args()
    if not args.release and not args.shards:
        p.error("give --release or --shards")
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        p.error(f"--parts: choose from {', '.join(PARTS)}")
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.commit:
        os.environ["TINYIN_COMMIT"] = args.commit
    from pipeline.bench_train import environment

    work, out = Path(args.work), Path(args.out)
    res = work / "results"
    res.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    if args.commit and env["commit"] == "unknown":
        env["commit"] = args.commit
    (res / "env.json").write_text(json.dumps(env, indent=1))
    t0 = time.time()
    shards, images = shards_and_images(args, work)
    done = {"bench": "bench.json", "table2": "table2.md", "r224": "r224.md",
            "speedrun": "ablation.md" if "--ablate" in (args.speedrun_args or "") else "speedrun.md"}
    for part in parts:
        if (res / done[part]).is_file():
            print(f"== {part}: done earlier ({res / done[part]}), not run again", flush=True)
            continue
        print(f"== {part} ({time.time() - t0:.0f} s in)", flush=True)
        if part == "bench":
            part_bench(args, res, shards, images)
        elif part == "table2":
            part_table2(args, res, shards, work)
        elif part == "r224":
            part_r224(args, res, shards, work)
        else:
            part_speedrun(args, res, shards, work)
    for name in RESULTS:
        if (res / name).is_file():
            shutil.copy(res / name, out / name)
    with tarfile.open(out / "json.tar", "w") as tf:
        for name in JSON:
            if (res / name).is_file():
                tf.add(res / name, arcname=name)
    print(f"results in {out}: {', '.join(sorted(os.listdir(out)))} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
