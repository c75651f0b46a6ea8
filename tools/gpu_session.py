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
speedrun.json and ablation.json (8 files: the device tool returns at most 8). The bench is not run
again once its table is in --work/results; the other parts' tools skip what finished (Table 2's
rows, the speedrun's seeds and variants, the 224 run), and train.py's --resume auto continues an
interrupted Table 2 row, so a session can split the work into several calls of under 10 minutes
while the machine stays warm (e.g. `--speedrun-args '--seeds 0'`, then '--seeds 0,1'). A --smoke
run keeps its runs and results in --work/smoke (the shards and images are shared): a real run in
the same --work would take them for its own, finished.

--deadline S stops the parts S seconds after the start (SIGTERM: train.py checkpoints, the bench
keeps its rows, reproduce.py and speedrun.py write what finished), so that their results, whole or
so far, are in --out before the device tool's own limit kills the call; a part that fails does not
stop the next. Every part's results are copied to --out as soon as it ends. SIGTERM to this script
(`timeout`'s, which does not reach the part's process group) stops the part running as the
--deadline does, starts nothing more, and exits 143 once the results so far are in --out; SIGUSR1
(a scheduler's warning) alike, passed on as SIGUSR1 (every part's tool stops on it), exit 138.
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path, PurePosixPath

START = time.time()  # --deadline counts from here
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flag_values import flag_words, joined  # noqa: E402  (beside this file)
from pipeline.atomic import folder_refusal  # noqa: E402
from pipeline.errors import ArgumentParser, at_least, names_among, path_text, positive_float  # noqa: E402

PARTS = ("bench", "table2", "r224", "speedrun")
RESULTS = ("bench.md", "table2.md", "curves.png", "r224.md", "speedrun.md", "speedrun.png", "ablation.md")
TABLE2_ROWS = "lenet5-28,alexnet-64,squeezenet1_1-64,resnet18-64"  # the study's from-scratch rows
SMOKE_TABLE2_ROWS = "lenet5-28,squeezenet1_1-64"  # --smoke's: two rows side by side, as on the GPU
JSON = ("env.json", "bench.json", "table2.json", "speedrun.json", "ablation.json")  # packed into json.tar


#: a stopped part's time to write what it has (train.py: finish its step, save a checkpoint)
GRACE_S = 45
#: the signal, once this script got one of errors.STOPS (SIGTERM: the device tool's limit, a scheduler; SIGUSR1: a
#: scheduler's warning): the part running is stopped as at the --deadline, and no other starts
STOPPED = []
#: not empty once the --deadline's timer rang (`deadline_timer`): the part running is stopped, no other starts
PAST_DEADLINE = []
#: the command `sh` waits for, while it waits: the one the timer stops
WAITING = []


class DeadlineReached(Exception):
    """The --deadline's timer rang while `sh` waited for a part's command."""


def stopped_by():
    """'stopped by SIGTERM' (or SIGUSR1): the words for a part or command that STOPPED's signal stopped."""
    return f"stopped by {STOPPED[0].name}"


def deadline_timer(seconds):
    """Ring at START + `seconds` (SIGALRM): mark PAST_DEADLINE and, if `sh` is waiting for a command, stop
    it. One timer, not a timeout at each wait: one clock for the parts and the checks between them, and a
    test rings it once its rows wait (a deadline long enough for a loaded machine left it idle a minute)."""
    def ring(signum, frame):
        first = not PAST_DEADLINE
        PAST_DEADLINE.append(signum)
        # Not once the command has ended: its output is read and its code is the part's
        if first and WAITING and WAITING[-1].returncode is None:
            raise DeadlineReached

    signal.signal(signal.SIGALRM, ring)
    left = START + seconds - time.time()
    if left > 0:
        signal.setitimer(signal.ITIMER_REAL, left)
    else:  # past already (the imports took that long): nothing is waited for yet
        ring(signal.SIGALRM, None)


def table2_rows(text):
    """An argparse type: --table2-rows, as given, once reproduce.py's --rows takes it (in its words): a row name
    mistyped was reproduce.py's refusal in the table2 part, after the bench's minutes."""
    from reproduce import ROWS  # torch and the models (main imports them next): only when the flag is given

    names_among(ROWS, "row", f"Table 2's ({TABLE2_ROWS})")(text)
    return text


def sh(cmd, log=None):
    """Run `cmd` (a list) from the repo root with PYTHONPATH on it; its exit code. At the --deadline
    (`deadline_timer`) it gets SIGTERM, and when this script gets SIGTERM or SIGUSR1 that signal; whatever of
    it still runs GRACE_S later is killed. Nothing is started after either."""
    from pipeline.errors import STOPS, Terminated

    if STOPPED or PAST_DEADLINE:
        print(f"== not started: {shlex.join(map(str, cmd))} "
              f"({stopped_by() if STOPPED else 'past the --deadline'})", flush=True)
        return 128 + (STOPPED[0] if STOPPED else signal.SIGTERM)
    print(f"$ {shlex.join(map(str, cmd))}", flush=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    # Its own process group, so that the kill after the grace reaches its train.py processes too; not a
    # session of its own, which the device tool would leave running after the call (on the GPU) until
    # the machine goes back. A group of its own does not get the SIGTERM sent to this script's group
    # (`timeout`'s): this script passes it on.
    group = dict(process_group=0) if sys.version_info >= (3, 11) else dict(preexec_fn=os.setpgrp)
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE if log else None, **group)
    name = cmd[2] if cmd[1] == "-m" else cmd[1]
    try:
        WAITING.append(proc)
        if PAST_DEADLINE:  # the timer rang between the check above and now
            raise DeadlineReached
        out, _ = proc.communicate()
    except (DeadlineReached, Terminated) as e:
        WAITING.clear()  # the timer ringing in the grace below does not cut it short
        if isinstance(e, Terminated):  # sigterm_interrupts in main()
            for sig in STOPS:  # one stop: another would cut the grace short
                signal.signal(sig, signal.SIG_IGN)
            STOPPED.append(signal.Signals(e.signum))
        print(f"== {STOPPED[0].name} received: passed on to {name}" if STOPPED
              else f"== --deadline reached: SIGTERM to {name}", flush=True)
        proc.send_signal(STOPPED[0] if STOPPED else signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            print(f"== still running {GRACE_S} s later: killed", flush=True)
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    except KeyboardInterrupt:  # Ctrl-C does not reach a process group of its own: pass it on
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise
    finally:
        WAITING.clear()
    if log:
        print(out, end="", flush=True)
        Path(log).write_text(out)
    return proc.returncode


def existing(*pairs):
    """{result name: path} of the (name, path) pairs whose path exists: a stopped part's results so far."""
    return {name: Path(path) for name, path in pairs if Path(path).is_file()}


def shards_and_images(args, work, images_needed):
    """The shard folder (built with every core if needed) and, if `images_needed` (the bench's feed
    d), the release's train/ extracted for ImageFolder; else None."""
    from pipeline.build import build_shards

    src = Path(args.release) if args.release else None
    shards = Path(args.shards) if args.shards else work / "shards"
    if not (shards / "manifest.json").is_file():
        t0 = time.time()
        build_shards(src, shards, workers=os.cpu_count(), progress=False)
        print(f"built shards in {time.time() - t0:.1f} s", flush=True)
    if src is None or not images_needed:
        return shards, None
    if src.is_dir():
        return shards, src
    images = work / "images"
    if not (images / "done").is_file():
        t0 = time.time()
        count = extract_for_imagefolder(src, images / "release")
        (images / "done").touch()
        print(f"extracted {count:,} files in {time.time() - t0:.1f} s", flush=True)
    return shards, images / "release"


def extract_for_imagefolder(src, folder):
    """Write the release archive's train/ and wnids.txt (what ImageFolder reads) under `folder`;
    the number of files. The archive is read as the build reads it (pipeline.unpack), where
    tarfile's member-by-member extraction kept one core busy for 11-35 s on 2 cores."""
    from pipeline.source import open_release

    files = open_release(src)
    wanted = [name for name in files.names() if name == "wnids.txt" or name.startswith("train/")]
    made = set()
    for name in wanted:
        parts = PurePosixPath(name).parts
        if ".." in parts:  # what tarfile's filter="data" refused: a path out of the folder
            raise SystemExit(f"error: {src}: {name}: a path out of the release folder")
        path = folder.joinpath(*parts)
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_bytes(files.read(name))
    return len(wanted)


def part_bench(args, res, shards, images, work):
    """The `tinyin bench train` table; None when done (bench.md/.json in `res`), else what it has."""
    cmd = [sys.executable, "-m", "pipeline.cli", "bench", "train", "--shards", shards, "--json", work / "bench.json"]
    if images:
        cmd += ["--images", images]
    if args.smoke:
        cmd += ["--arch", "lenet5", "--batch", "16", "--warmup", "1", "--steps", "1"]
    (work / "bench.json").unlink(missing_ok=True)  # an earlier stopped table's
    code = sh(cmd + shlex.split(args.bench_args or ""), log=work / "bench.md")
    if code != 0 and whole_table(work / "bench.json"):
        # bench train's exit 1 after a whole table: a row failed (out of memory, a compiler's error), as the table
        # and its error line say; measuring it all again (minutes of the session's device time) would not change
        # that, and the next call did, told 'unfinished: bench (failed)' to rerun the same command
        print("== bench: every row in its table, a failed one among them (the table says why): done", flush=True)
        code = 0
    if code == 0:
        for name in ("bench.md", "bench.json"):
            shutil.copy(work / name, res / name)
        return None
    return existing(("bench.md", work / "bench.md"), ("bench.json", work / "bench.json"))


def whole_table(path):
    """Whether `path`, bench train's --json, holds a row for every case it planned (measured or failed)."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):  # not written: the bench ended before its table (a usage error, a crash)
        return False
    return len(table["rows"]) == table["planned"]


def part_table2(args, res, shards, images, work):
    """Table 2 by tools/reproduce.py; None when done, else its report of the rows so far."""
    # --smoke: two rows side by side, so the dry run takes the path the GPU run takes
    rows = args.table2_rows or (SMOKE_TABLE2_ROWS if args.smoke else TABLE2_ROWS)
    cmd = [sys.executable, "tools/reproduce.py", "--shards", shards, "--out", work / "paper", "--rows", rows]
    on_cuda = args.device.startswith("cuda")
    train_args = "--amp --channels-last" if on_cuda else ""
    jobs = args.table2_jobs or (4 if on_cuda else 2 if args.smoke else 1)
    if args.smoke:
        cmd += ["--epochs", "1", "--limit-batches", "2"]
    # `=`: a value of one flag ('--no-amp' on the CPU) is not taken for a flag of reproduce.py's own
    code = sh(cmd + ["--device", args.device, "--jobs", jobs,
                     "--train-args=" + f"{train_args} {args.train_args or ''}".strip()])
    report = {"table2.md": work / "paper" / "report.md", "table2.json": work / "paper" / "report.json",
              "curves.png": work / "paper" / "curves.png"}
    if code == 0:
        for name, path in report.items():
            shutil.copy(path, res / name)
        return None
    return existing(*report.items())


def part_r224(args, res, shards, images, work):
    """ResNet-18 from scratch at 224 for 2 epochs; r224.md (its images/s against bench (a))."""
    run, batch = work / "resnet18-224-scratch", 4 if args.smoke else 100
    cmd = [sys.executable, "train.py", "--shards", shards, "--arch", "resnet18", "--size", "224", "--epochs", "2",
           "-b", batch, "--lr", "0.001", "--momentum", "0.9", "--wd", "0", "--lr-scheduler", "none",
           "--norm", "imagenet", "--output-dir", run, "--resume", "auto", "--device", args.device]
    if args.device.startswith("cuda"):
        cmd += ["--amp", "--channels-last"]
    if args.smoke:
        cmd += ["--epochs", "1", "--limit-batches", "2"]
    finished = (run / "final.json").is_file() or sh(cmd) == 0
    if not (run / "metrics.jsonl").is_file():
        return None if finished else {}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ceiling = r224_ceiling(args, res, shards, work, batch)
    lines = [f"# {shlex.join(map(str, cmd[1:]))}",
             f"| epoch | train images/s | of bench (a), resnet18@224 b{batch} | val top-1 |", "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['images_per_s'] / ceiling:.0%}" if ceiling else "- (no (a) row)"
        lines.append(f"| {r['epoch'] + 1} | {r['images_per_s']:,.0f} | {ratio} | {r['val_top1']:.2f}% |")
    md = (res if finished else work) / "r224.md"
    md.write_text("\n".join(lines) + "\n")
    print(md.read_text(), flush=True)
    return None if finished else {"r224.md": md}


def r224_ceiling(args, res, shards, work, batch):
    """Bench (a)'s images/s for resnet18@224 at `batch`, uncompiled: from the bench's table, finished
    or stopped at the --deadline (its work copy), else measured now (that one row: seconds)."""
    def row(table):
        rows = json.loads(table.read_text())["rows"] if table.is_file() else []
        return next((r["images_per_s"] for r in rows if (r["arch"], r["size"], r["batch"], r["feed"], r["compiled"])
                     == ("resnet18", 224, batch, "ceiling", False)), None)

    own = work / "r224-ceiling.json"
    found = row(res / "bench.json") or row(work / "bench.json") or row(own)
    if found is None:
        cmd = [sys.executable, "-m", "pipeline.cli", "bench", "train", "--shards", shards, "--arch", "resnet18",
               "--size", "224", "--batch", batch, "--feeds", "a", "--no-compile", "--device", args.device, "--json", own]
        if args.smoke:
            cmd += ["--warmup", "1", "--steps", "1"]
        if sh(cmd) == 0:
            found = row(own)
    return found


def part_speedrun(args, res, shards, images, work):
    """issue 9's speedrun (and ablation) by tools/speedrun.py; None when done, else the seeds so far."""
    cmd = [sys.executable, "tools/speedrun.py", "--shards", shards, "--out", work / "speedrun", "--device", args.device]
    if args.smoke:
        cmd += ["--arch", "resnet10_64s2", "--seeds", "0", "--train-args", "--epochs 2 --warmup-epochs 1 --limit-batches 1 -b 8"]
    code = sh(cmd + shlex.split(args.speedrun_args or ""))
    # ablation.*: only with --speedrun-args '--ablate ...'
    written = existing(*((name, work / "speedrun" / name) for name in
                         ("speedrun.md", "speedrun.json", "speedrun.png", "ablation.md", "ablation.json")))
    if code == 0:
        for name, path in written.items():
            shutil.copy(path, res / name)
        return None
    return written


def publish(res, out, partial):
    """Copy the results to `out`: each finished part's from `res`, a stopped or failed part's so far
    (`partial`: result name -> path); the JSON files packed into json.tar. A part stopped in this call
    is newer than what an earlier call finished: its results so far win over `res` (the runbook's
    compiled bench rows, after `rm results/bench.json`, over the eager table's bench.md)."""
    files = {**{name: res / name for name in RESULTS + JSON if (res / name).is_file()}, **partial}
    for name in RESULTS:
        # Not where it is already: --out the folder a part writes it in (--out WORK, the bench's bench.md so far)
        # was a copy onto itself, a SameFileError traceback that ended the call before the parts after it
        if name in files and not ((out / name).exists() and os.path.samefile(files[name], out / name)):
            shutil.copy(files[name], out / name)
    with tarfile.open(out / "json.tar", "w") as tf:
        for name in JSON:
            if name in files:
                tf.add(files[name], arcname=name)


PART_RUNS = {"bench": part_bench, "table2": part_table2, "r224": part_r224, "speedrun": part_speedrun}


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", type=path_text, help="the release archive (.tar.gz) or an extracted/synthetic release folder")
    p.add_argument("--shards", type=path_text, help="an existing shard folder (skips the build)")
    p.add_argument("--out", required=True, type=path_text, help="where the result files are copied (e.g. $OUT)")
    p.add_argument("--work", default="/tmp/tinyin-gpu", type=path_text, help="shards, images, runs, results (default: %(default)s)")
    p.add_argument("--parts", default=",".join(PARTS), type=names_among(PARTS, "part", "all"), help="comma-separated subset of: %(default)s")
    p.add_argument("--device", default=None, help="the device every part runs on (default: cuda if available, else cpu)")
    p.add_argument("--commit", help="the commit, where the copy has no .git (default: git rev-parse)")
    p.add_argument("--bench-args", type=flag_words, help="more `tinyin bench train` flags, e.g. '--arch resnet18 --no-compile'")
    p.add_argument("--train-args", type=flag_words, help="more train.py flags for Table 2's rows")
    p.add_argument("--table2-rows", type=table2_rows, help=f"Table 2's rows to train (tools/reproduce.py --rows; default: {TABLE2_ROWS}; with --smoke {SMOKE_TABLE2_ROWS})")
    p.add_argument("--table2-jobs", type=at_least(1),
                   help="Table 2 rows trained side by side (tools/reproduce.py --jobs; default: 4 on CUDA; on the CPU 1, 2 with --smoke)")
    p.add_argument("--speedrun-args", type=flag_words, help="more tools/speedrun.py flags, e.g. \"--train-args '--epochs 30'\"")
    p.add_argument("--deadline", type=positive_float, metavar="SECONDS",
                   help=f"stop the parts this long after the start, keeping what they have (SIGTERM; killed "
                        f"{GRACE_S} s later): give the device call's timeout less {GRACE_S} s and a margin, "
                        "e.g. 530 for 590 (default: no limit)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny scale for a CPU dry run (synthetic data); its runs and results in --work/smoke")
    args = p.parse_args(joined(sys.argv[1:], ("--bench-args", "--train-args", "--speedrun-args")))
    if not args.release and not args.shards:
        p.error("give --release or --shards")
    # The parts run from the repo's root (`sh`): a relative path is the caller's, made absolute here (the
    # parts read another folder's `shards`, or none, and wrote their runs where the results were not looked for).
    for name in ("release", "shards", "work"):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    parts = args.parts
    import torch
    from pipeline.device import check_device

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(args.device)  # one line, not torch's traceback from env.json's GPU name
    if args.shards and not args.release:  # nothing to build it from: was the build's TypeError traceback (after the flags' own refusals)
        from reproduce import check_shards  # as reproduce.py and speedrun.py check it

        check_shards(args.shards)
    if args.commit:
        os.environ["TINYIN_COMMIT"] = args.commit
    from pipeline.bench_train import environment

    work, out = Path(args.work), Path(args.out)
    # A smoke run's finished runs and results apart: a real run would skip them as done and report them
    runs = work / "smoke" if args.smoke else work
    res = runs / "results"
    # As reproduce.py and speedrun.py check their --out: an --out that is a file was a FileExistsError traceback, a
    # --work that is one 'error: Not a directory: WORK/results'
    for flag, folder in (("--work", work), ("--out", out)):
        if why := folder_refusal(folder):
            sys.exit(f"error: {flag} {folder}: {why}")
    if os.path.realpath(out) == os.path.realpath(res):  # each copy onto itself: a SameFileError traceback
        sys.exit(f"error: --out {out}: the results folder of --work, which is copied to --out; choose another folder")
    res.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    if args.commit and env["commit"] == "unknown":
        env["commit"] = args.commit
    (res / "env.json").write_text(json.dumps(env, indent=1))
    if args.deadline is not None:
        deadline_timer(args.deadline)
    partial, unfinished = {}, []
    publish(res, out, partial)  # env.json and earlier calls' results, before anything can be killed
    bench_done = (res / "bench.json").is_file()  # by an earlier call: not run again (the others' tools skip what finished)
    shards, images = shards_and_images(args, work, images_needed="bench" in parts and not bench_done)
    for part in parts:
        if part == "bench" and bench_done:
            print(f"== bench: done earlier ({res / 'bench.json'}), not run again", flush=True)
            continue
        if STOPPED or PAST_DEADLINE:
            print(f"== {part}: not started: {stopped_by() if STOPPED else 'past the --deadline'}", flush=True)
            unfinished.append(f"{part} (not started)")
            continue
        print(f"== {part} ({time.time() - START:.0f} s in)", flush=True)
        so_far = PART_RUNS[part](args, res, shards, images, runs)
        if so_far is not None:
            partial.update(so_far)
            why = stopped_by() if STOPPED else "stopped at the --deadline" if PAST_DEADLINE else "failed"
            unfinished.append(f"{part} ({why})")
        publish(res, out, partial)  # now: a call killed later still brings this part's results back
    print(f"results in {out}: {', '.join(sorted(os.listdir(out)))} ({time.time() - START:.0f} s)")
    if unfinished:
        print(f"error: unfinished: {', '.join(unfinished)}; their results so far are in {out}; rerun the same "
              "command to continue (finished parts and rows are not run again)", file=sys.stderr)
        sys.exit(128 + STOPPED[0] if STOPPED else 1)  # 128 + signum after a signal, as train.py's


if __name__ == "__main__":
    from pipeline.errors import STOPS, run_cli, sigterm_interrupts

    with sigterm_interrupts(STOPS):  # SIGTERM and SIGUSR1 stop the running part as the --deadline does (sh)
        run_cli(main)  # an error the operator can act on (no release at --release, a bad --device): one line
