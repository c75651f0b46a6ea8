"""Re-run the study's tables with `train.py --recipe paper`, then write the report beside the study's.

    python tools/reproduce.py --shards data/shards --out runs/paper                  # Table 2 + Table 3
    python tools/reproduce.py --rows lenet5-28 --epochs 1 --limit-batches 5 --out runs/look  # a quick look
    python tools/reproduce.py --train-args="--amp --channels-last" --device cuda     # on a GPU
    python tools/reproduce.py --rows lenet5-28,alexnet-64,squeezenet1_1-64,resnet18-64 --jobs 4

Rows: Table 2 (lenet5-28, alexnet-64, squeezenet1_1-64, resnet18-64: from scratch, 40 epochs) and
Table 3 (ARCH-224: ImageNet-pretrained, 10 epochs; ARCH-224-50: 50 epochs). Each row trains in its
own train.py subprocess into OUT/ROW with `--resume auto`: an interrupted reproduction picks up
where it stopped, and a finished row (final.json with its epochs, args.json with its --limit-batches)
is not run again. Table 3 rows need the ImageNet weights as a local file (--weights-dir, or already
in the torch.hub cache; nothing is downloaded): without one the row is reported as "not run: no
ImageNet weights here". Before the first row starts, train.py's own checks of every row's flags
run (a bad --train-args or a --device this machine lacks is one line, exit 2, nothing trained).
OUT/report.md (+ report.json, curves.png) puts our rows beside the study's reported and
recorded values, with minutes per row and the whole table's wall time (OUT/ROW/reproduce.json
keeps each row's process wall clock, summed over resumes, and when it ran). `--jobs N` trains N
rows side by side, each row's output in OUT/ROW/train.log. Why: on a GPU, Table 2's small batches
(32 and 50) should leave it idle between kernel launches (the step is bound by the host's launch
rate), so rows sharing it should finish the table sooner than one after another (not yet measured
on a GPU); each row's minutes are then its own process's, measured side by side.

A row that fails, and SIGTERM, SIGINT or SIGUSR1 (Ctrl-C, a scheduler, gpu_session.py's --deadline),
do not lose what trained: on a signal every running row's train.py writes its checkpoint and exits
(the signal is passed on to them), no further row starts, and the report is written for the rows
so far (an unfinished row says "12 of 40, stopped or failed" for its epochs) before the exit (128 + signum after a signal).
"""

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere, installed or not

import models  # noqa: E402
from flag_values import flag_words, flags_among, joined  # noqa: E402
from models.recipes import RECIPES  # noqa: E402
from pipeline.atomic import folder_refusal, write_json  # noqa: E402
from pipeline.cache import is_set_url  # noqa: E402
from pipeline.errors import (ArgumentParser, TinyinError, UsageError, at_least, hide_password, names_among,  # noqa: E402
                             path_text, plural, user_errors)
from pipeline.report import write_report  # noqa: E402
from pipeline.schema import DEFAULT_SHARDS  # noqa: E402
from pipeline.shardset import local_folder  # noqa: E402

TABLE2 = {f"{arch}-{size}": ("paper", arch, size) for arch, size in RECIPES["paper"] if size != 224}
TABLE3 = {**{f"{arch}-{size}": ("paper", arch, size) for arch, size in RECIPES["paper"] if size == 224},
          **{f"{arch}-{size}-50": ("paper-50", arch, size) for arch, size in RECIPES["paper-50"]}}
ROWS = {**TABLE2, **TABLE3}
NO_WEIGHTS = "no ImageNet weights here"


def weights_file(arch, weights_dir):
    """The local ImageNet weights file for `arch` under its torchvision name (in `weights_dir`, else
    torch.hub's cache), or None."""
    cached = Path(models.model_spec(arch).hub_cache_file())
    for path in (Path(weights_dir) / cached.name if weights_dir else None, cached):
        if path and path.is_file():
            return path
    return None


def finished(run, shards, epochs, limit_batches=None):
    """Whether `run` already holds a finished training on `shards` of `epochs` epochs of `limit_batches`
    batches (None: whole epochs). A quick look's run of as many epochs is not the one asked for: its row
    runs again, and train.py refuses to resume it with another --limit-batches. Nor is a run on another
    shard set (a trial on a `--classes 10` subset, then the release, both into the default --out): its
    row runs, and train.py refuses the checkpoint of another set. Nor is a run whose final.json or args.json
    is no JSON object (damaged, edited), or whose metrics are gone: its row runs, and train.py's resume writes
    them anew."""
    final, args = run / "final.json", run / "args.json"
    if not (final.is_file() and args.is_file() and has_epochs(run)):
        return False
    try:
        final, saved = json.loads(final.read_text()), json.loads(args.read_text())
    except ValueError:
        return False
    if not (isinstance(final, dict) and isinstance(saved, dict)):
        return False
    return (final.get("epochs") == epochs and saved.get("limit_batches") == limit_batches
            and saved.get("shards") == hide_password(shards))  # as train.py keeps it: a URL's password hidden


def row_command(name, args):
    """(run folder, train.py command) for one row, the command None when the row finished earlier;
    None when the row cannot run here (a Table 3 row without its ImageNet weights file)."""
    recipe, arch, size = ROWS[name]
    run = Path(args.out) / name
    cmd = [sys.executable, str(ROOT / "train.py"), "--shards", args.shards, "--arch", arch, "--size", str(size),
           "--recipe", recipe, "--output-dir", str(run), "--resume", "auto"]
    if RECIPES[recipe][arch, size].get("pretrained"):
        weights = weights_file(arch, args.weights_dir)
        if weights is None:
            return None
        cmd += ["--weights", str(weights)]
    epochs = args.epochs or RECIPES[recipe][arch, size]["epochs"]
    cmd += ["--epochs", str(epochs)]
    if args.limit_batches:
        cmd += ["--limit-batches", str(args.limit_batches)]
    if args.device:
        cmd += ["--device", args.device]
    cmd += shlex.split(args.train_args or "")
    return run, None if finished(run, args.shards, epochs, args.limit_batches) else cmd


class Stop:
    """SIGTERM, SIGINT and SIGUSR1 to the reproduction: recorded, and passed on to the rows' train.py
    processes, which checkpoint and exit (they take repeats, as from a terminal's Ctrl-C that
    reached the whole process group, as one); `started` refuses to start a row after one. SIGUSR1
    (a scheduler's warning before its limit, train.py's third stop) ended this process at once, its
    rows left training on without it, no report written."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.signum = 0
        self._running = set()

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):  # runs in the main thread, between its bytecodes
        self.signum = self.signum or signum
        for proc in list(self._running):
            proc.send_signal(signum)

    def started(self, cmd, **popen):
        """`subprocess.Popen(cmd, **popen)`, tracked until `ended`; None once a stop was asked for."""
        if self.signum:
            return None
        proc = subprocess.Popen(cmd, **popen)
        self._running.add(proc)
        if self.signum:  # the signal came while it started, maybe before it was tracked: pass it on
            proc.send_signal(self.signum)
        return proc

    def ended(self, proc):
        self._running.discard(proc)


def train_row(name, run, cmd, stop, log=None, env=None):
    """Run one row's train.py (its output to `log` when given) and add the time it took to
    run/reproduce.json, as seconds and as a (start, end) interval; returns the exit code, or None
    when a stop came before the row started."""
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "a") if log else contextlib.nullcontext() as f:
        proc = stop.started(cmd, env=env, **(dict(stdout=f, stderr=subprocess.STDOUT) if log else {}))
        if proc is None:
            return None
        print(f"== {name}: {hide_password(shlex.join(cmd[1:]))}" + (f" (log: {log})" if log else ""), flush=True)
        code = proc.wait()
        stop.ended(proc)
    t1 = time.time()
    record = run / "reproduce.json"
    before = json.loads(record.read_text()) if record.is_file() else {}
    write_json(record, dict(wall_s=before.get("wall_s", 0.0) + t1 - t0,
                            command=[hide_password(a) for a in cmd[1:]],  # a --shards URL's password, token
                            intervals=before.get("intervals", []) + [[t0, t1]]), indent=None)
    if log:
        print(f"== {name}: {'finished' if code == 0 else f'failed (exit {code})'} after {(t1 - t0) / 60:.1f} min",
              flush=True)
    return code


def union_seconds(intervals):
    """The time covered by at least one of the (start, end) intervals: the wall clock of rows that
    ran one after another, side by side, or both."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def most_at_once(intervals):
    """The most of the (start, end) intervals that cover one moment (0 for none): how many rows trained
    side by side. One that ends when another starts is not beside it."""
    most = at_once = 0
    for _, change in sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals]):
        at_once += change
        most = max(most, at_once)
    return most


def table_times(runs):
    """(the whole table's wall clock, the most rows that trained side by side) from the rows' reproduce.json
    files. The time of a record written before intervals were kept, and of a row's runs before its record had
    them (its wall_s beyond its intervals: a row resumed from such a record adds an interval to the older
    seconds), counts as time of its own."""
    intervals, older = [], 0.0
    for run in runs:
        record = run / "reproduce.json"
        if record.is_file():
            saved = json.loads(record.read_text())
            kept = saved.get("intervals", [])
            intervals += kept
            older += max(0.0, saved["wall_s"] - sum(end - start for start, end in kept))
    return union_seconds(intervals) + older, most_at_once(intervals)


def child_env(jobs):
    """The environment of each row's process: with rows side by side, the cores are shared out
    (OMP_NUM_THREADS, unless set) so that they do not fight over them."""
    if jobs <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))


def has_epochs(run):
    """Whether `run` finished an epoch (train.py writes metrics.jsonl empty at its start)."""
    metrics = run / "metrics.jsonl"
    return metrics.is_file() and bool(metrics.read_text().strip())


def log_tail(log, lines=5):
    """The last lines of a row's log, indented, for the error report."""
    text = Path(log).read_text(errors="replace").rstrip().splitlines()[-lines:]
    return "\n".join("    " + line for line in text)


def check_train_flags(todo, train_args):
    """train.py's own flag checks for every row to run, before the first starts: a mistake in
    --train-args or --device is one line here, not a failed row (or all of them) with the advice to
    rerun, which train.py would refuse alike. And --train-args must leave alone what is set per row."""
    import train  # torch and the models: the rows' own imports, once
    from pipeline.device import check_device

    # They would win: '--output-dir D' trained every row into D; '--epochs 5' rows that never count
    # as finished (against the recipe's 40).
    clash = flags_among(train_args, {"shards", "arch", "size", "recipe", "output_dir", "resume", "epochs",
                                     "limit_batches"})
    if clash:
        print(f"error: --train-args: {', '.join(clash)}: set by reproduce.py "
              "for each row (from its --shards, --out, --epochs and --limit-batches; the row's --arch, --size and "
              "--recipe; --resume auto)", file=sys.stderr)
        sys.exit(UsageError.exit_code)
    for name, _, cmd in todo:
        try:
            check_device(train.parse_args(cmd[2:]).device)  # less the interpreter and train.py; a GPU it lacks
        except TinyinError as e:
            print(f"error: train.py refuses the flags of row {name}: {e}", file=sys.stderr)
            sys.exit(e.exit_code)


def check_shards(shards):
    """Refuse a local --shards that is no shard set, before any run starts: each run would fail alike, and the
    advice after it was to rerun. A URL's set is train.py's to fetch (speedrun.py's check too)."""
    try:
        if is_set_url(shards):  # (a URL that cannot be parsed, 'http://[::1': refused here too)
            return
        folder = local_folder("--shards", shards, DEFAULT_SHARDS)  # 'no such folder', as train.py says it
    except TinyinError as e:
        sys.exit(f"error: {e}")
    if not (Path(folder) / "manifest.json").is_file():
        sys.exit(f"error: --shards {shards}: not a shard set (no manifest.json); run `tinyin shard build` first")


def main(args):
    rows = args.rows or list(ROWS)
    if args.weights_dir and not Path(args.weights_dir).is_dir():  # a typo read as "no weights": Table 3 not run
        if Path(args.weights_dir).exists():  # the weights file itself
            sys.exit(f"error: --weights-dir {args.weights_dir}: a file, not a folder; "
                     "give the folder that holds the weights files")
        sys.exit(f"error: --weights-dir {args.weights_dir}: no such folder")
    done, not_run, todo = [], [], []
    for name in rows:
        planned = row_command(name, args)
        if planned is None:
            print(f"== {name}: not run: {NO_WEIGHTS}", flush=True)
            not_run.append((name, NO_WEIGHTS))
            continue
        run, cmd = planned
        done.append(run)
        if cmd is None:
            print(f"== {name}: finished earlier, not run again", flush=True)
        else:
            todo.append((name, run, cmd))
    if todo:
        check_shards(args.shards)
    check_train_flags(todo, args.train_args)
    if why := folder_refusal(args.out):  # was a traceback out of the first row's thread
        sys.exit(f"error: --out {args.out}: {why}")
    # Side by side (--jobs > 1) each row's output goes to its own log; a thread per row is enough,
    # since each thread only waits on its train.py process.
    logs = {name: run / "train.log" if args.jobs > 1 else None for name, run, _ in todo}
    env = child_env(min(args.jobs, len(todo)))  # the rows that train side by side share the cores
    with Stop() as stop, ThreadPoolExecutor(max_workers=args.jobs) as pool:
        codes = list(pool.map(lambda row: train_row(*row, stop, log=logs[row[0]], env=env), todo))
    codes = {name: code for (name, _, _), code in zip(todo, codes)}

    def stopped(code):  # not started after a stop, or train.py's exit for the signal (128 + signum)
        return code is None or bool(stop.signum) and code in (128 + stop.signum, -stop.signum)

    failed = [(name, code) for name, code in codes.items() if code != 0 and not stopped(code)]
    for name, code in failed:
        if logs[name]:
            print(f"== {name}: the end of {logs[name]}:\n{log_tail(logs[name])}", file=sys.stderr)
    # The report of what has trained so far, after a failure or a stop too: nothing trained is lost.
    reported = [run for run in done if has_epochs(run)]
    signame = signal.Signals(stop.signum).name if stop.signum else ""

    def why_no_epoch(code):
        if code is None:
            return f"not started: stopped by {signame}"
        if code == UsageError.exit_code:
            return f"no epoch finished: train.py refused its flags (exit {code})"
        return "no epoch finished: " + (f"stopped by {signame}" if stopped(code) else f"failed (exit {code})")

    missing = [(run.name, why_no_epoch(codes[run.name])) for run in done if run not in reported]
    # The rows' minutes were measured sharing the machine where their recorded times overlap: --jobs N said so of
    # one row alone, and a rerun with the rows finished earlier said nothing of those that had.
    wall_s, jobs = table_times(done) if done else (None, 1)
    try:
        md, png = write_report(reported, args.out, not_run=missing + [(n, f"not run: {why}") for n, why in not_run],
                               wall_s=wall_s, jobs=max(1, jobs))
    except ValueError as e:  # a row's file that is not as train.py writes it: one line, as `tinyin report` says it
        sys.exit(f"error: {e}")
    print(Path(md).read_text())
    print(f"wrote {md}" + (f" and {png}" if png else ""), flush=True)
    unfinished = [name for name, code in codes.items() if stopped(code)]
    if unfinished:
        print(f"error: stopped by {signame}; {', '.join(unfinished)} unfinished (the report shows them so far); "
              "rerun to resume", file=sys.stderr)
        sys.exit(128 + stop.signum)
    # Exit 2 is train.py's UsageError that only the row's own run finds (an --epochs before its
    # checkpoint's step, ...): a rerun with the same flags is refused alike.
    refused = [name for name, code in failed if code == UsageError.exit_code]
    failed = [(name, code) for name, code in failed if code != UsageError.exit_code]
    if refused:
        print(f"error: train.py refused the flags of {plural(len(refused), 'row')} {', '.join(refused)} (see train.py's "
              "error above); a rerun with them is refused alike: change them", file=sys.stderr)
    if len(failed) == 1:
        sys.exit(f"error: row {failed[0][0]} failed (exit {failed[0][1]}); rerun to resume it")
    if failed:
        which = ", ".join(f"{name} (exit {code})" for name, code in failed)
        sys.exit(f"error: rows {which} failed; rerun to resume them")
    if refused:
        sys.exit(UsageError.exit_code)


def get_args_parser():
    p = ArgumentParser(description="Reproduce the study's tables with train.py --recipe paper")
    p.add_argument("--shards", default=DEFAULT_SHARDS, type=path_text, help="shard folder (default: %(default)s)")
    p.add_argument("--out", default="runs/paper", type=path_text, help="one sub-folder per row, plus report.md (default: runs/paper)")
    # A row named twice trained twice: side by side (--jobs) two train.py processes wrote one folder at once, and
    # the report listed it twice, its minutes summed over both. Empty ("$ROWS" unset) read as not given: every row.
    p.add_argument("--rows", type=names_among(ROWS, "row", "all"), help=f"comma-separated subset of: {', '.join(ROWS)} (default: all)")
    # at least 1: 0 would read as "not given", the recipe's 40 epochs, every batch
    p.add_argument("--epochs", type=at_least(1), help="override every row's epochs, for a quick run (default: the recipe's)")
    p.add_argument("--limit-batches", type=at_least(1), help="passed to train.py: batches per epoch and per evaluation (default: all)")
    p.add_argument("--device", help="passed to train.py (default: train.py's, cuda if available)")
    p.add_argument("--weights-dir", type=path_text, help="folder holding the ImageNet .pth files under their torchvision names (default: none)")
    p.add_argument("--train-args", type=flag_words, help="more train.py flags, e.g. '--amp --channels-last' (default: none)")
    p.add_argument("--jobs", type=at_least(1), default=1,
                   help="rows trained side by side, each in its own process with its output in OUT/ROW/train.log "
                        "(default: 1, one after another)")
    return p


def parse_args(argv):
    """The flags of `argv` (a list of str, as sys.argv[1:]); a mistake in one raises its UsageError."""
    return get_args_parser().parse_args(joined(argv, ("--train-args",)))


if __name__ == "__main__":
    # A bad flag: one line, exit 2, as train.py's. A Ctrl-C before the rows start (or after they end, while the
    # report is written): 'interrupted', exit 130, not a traceback; while they train, `Stop` takes it.
    with user_errors():
        main(parse_args(sys.argv[1:]))
