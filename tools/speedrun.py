"""The speedrun of issue 9: `train.py --recipe fast` for several seeds, timed from process start.

    python tools/speedrun.py --shards SHARDS --out OUT                      # resnet18_64, seeds 0 and 1
    python tools/speedrun.py --shards S --out O --arch resnet10_64s2 --seeds 0,1,2 --train-args '--epochs 30'
    python tools/speedrun.py --shards S --out O --ablate ema,tta,smoothing,augment   # + one part off at a time

Each seed is one `train.py` process; its minutes are the process's wall time, from start to the
final test evaluation (shards already built: the build is not part of a speedrun), compiling
included: each run compiles cold, from a torch.compile cache of its own, as on a fresh machine. Writes
OUT/speedrun.md (per seed and mean +- spread: minutes, val and test top-1), OUT/speedrun.json and
OUT/speedrun.png (val top-1 against minutes: the time-to-accuracy curve). Run folders go to
OUT/runs/; a seed whose final.json is there, trained with the same train.py flags, is not run again
(with other flags, from another --arch or --train-args in the same --out, it trains afresh; so it does
where its args.json holds other values than the flags give now, a recipe tuned since, or its env.json
another set than --shards holds now).

--ablate (issue 9's table of what each part adds) then trains the first seed again once per named
part, with only that part switched off (ABLATIONS: the train.py flags that do it, which win over
the recipe), and writes OUT/ablation.md (+ .json): each variant's minutes, epochs and val/test top-1
beside the full recipe's on the same seed. One seed a variant: a difference smaller than the
seeds' spread in speedrun.md is noise.
"""
import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py and pipeline/, run from anywhere, installed or not

from flag_values import flag_words, flags_among, joined  # noqa: E402
from pipeline.atomic import folder_refusal  # noqa: E402
from pipeline.errors import (ArgumentParser, TinyinError, UsageError, at_least, hide_password, names_among,  # noqa: E402
                             path_text, user_errors)
from reproduce import Stop, check_shards  # noqa: E402

#: --ablate's variants: name -> (the part switched off, the train.py flags that switch it off)
ABLATIONS = {
    "ema": ("EMA of the weights", "--ema 0"),
    "tta": ("flip test-time augmentation", "--no-tta"),
    "smoothing": ("label smoothing", "--label-smoothing 0"),
    "augment": ("augmentation", "--augment none"),  # + the full recipe's, in words (AUGMENT_NAMES)
    "nesterov": ("Nesterov momentum", "--no-nesterov"),
    "warmup": ("lr warm-up", "--warmup-epochs 0"),
    "amp": ("bf16 autocast", "--no-amp"),
    "channels-last": ("channels_last", "--no-channels-last"),
    "compile": ("torch.compile", "--no-compile"),
}
#: train.py's --augment values, in its --help's words: "augmentation (random crop with padding + flip)"
AUGMENT_NAMES = {"crop": "random crop with padding + flip", "rrc": "random-resized crop + flip"}


def part_name(variant, recipe):
    """ABLATIONS[variant]'s part, as the full recipe's run (`recipe`: its train.py args) has it: its augmentation
    named, which --train-args may change ('--augment crop': the table said "random-resized crop + flip")."""
    part = ABLATIONS[variant][0]
    named = AUGMENT_NAMES.get(recipe.augment) if variant == "augment" else None  # --augment none: no name
    return f"{part} ({named})" if named else part


def train_argv(args, seed, run, variant=None):
    """train.py's flags for one seed, the full recipe or with ABLATIONS[variant]'s part switched off."""
    off = shlex.split(ABLATIONS[variant][1]) if variant else []
    # --overwrite: a seed is trained again from its start (its minutes count from its process's start), also
    # over the checkpoint a stopped one left
    argv = ["--shards", args.shards, "--arch", args.arch, "--size", "64", "--recipe", "fast", "--seed", str(seed),
            "--output-dir", str(run), "--overwrite", *shlex.split(args.train_args), *off]
    return argv + (["--device", args.device] if args.device else [])


def seed_list(text):
    """An argparse type: --seeds' seeds (comma-separated), each once ('0,0': one run, not a row twice), each one that
    train.py's --seed takes, in its words: '--seeds 0,-1' trained seed 0, then train.py refused -1 (its flags are
    checked with seed 0's); '0,a' said 'comma-separated integers, not '0,a'', where --seed a says 'not a whole
    number: 'a''."""
    return list(dict.fromkeys(map(at_least(0), text.split(","))))


def check_train_flags(args, variants):
    """train.py's own flag checks for every run planned, before the first starts: a mistake (an arch
    the recipe has no row for, --train-args that clash with it) is one line here, not a failed run
    after minutes of others with the advice to rerun. Returns each run's train.py args (the full recipe's: None)."""
    import train
    from pipeline.device import check_device

    # Flags set for each run would win from --train-args: '--seed 5' trained every "seed" alike. --resume won over each
    # run's --overwrite: a stopped seed went on from its checkpoint, its minutes the second process's alone; and
    # --test-only trained nothing, then a traceback (no final.json).
    for dests, why in (({"shards", "arch", "size", "recipe", "seed", "output_dir"},
                        "set by speedrun.py for each run (from its --shards, --arch, --seeds and --out; --recipe fast, "
                        "--size 64)"),
                       ({"resume", "test_only"}, "a speedrun trains each run from its start (--overwrite), its minutes "
                                                 "counted from its process's start")):
        if clash := flags_among(args.train_args, dests):
            print(f"error: --train-args: {', '.join(clash)}: {why}", file=sys.stderr)
            sys.exit(UsageError.exit_code)
    planned = {}
    for variant in [None, *variants]:
        try:
            planned[variant] = train.parse_args(train_argv(args, 0, "run", variant))
            check_device(planned[variant].device)  # also a GPU it lacks
        except TinyinError as e:
            run = "the full recipe" if variant is None else f"--ablate {variant}"
            print(f"error: train.py refuses the flags of {run}: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
    return planned


@contextlib.contextmanager
def compile_cache():
    """The environment of one run's train.py: torch.compile's caches (inductor's FX graph and AOT autograd
    caches, Triton's kernels: on by default, in /tmp/torchinductor_USER) in a fresh folder of its own, removed
    after. Shared, the first run compiled cold and every later one (the second seed, each --ablate variant,
    a run of the next call on a warm machine) from its cache: their minutes, and under --time-budget their
    epochs, were not measured alike. None (this process's environment) when TORCHINDUCTOR_CACHE_DIR is set:
    the runs share the cache asked for."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="speedrun-compile-cache-", ignore_cleanup_errors=True) as folder:
        yield dict(os.environ, TORCHINDUCTOR_CACHE_DIR=folder)


def not_the_same_run(run, argv):
    """Why `run`, trained with train.py's flags `argv` (process_wall.json's command), is not the run they give
    now ('' when it is): the values of its args.json that they no longer give, as '--lr 0.4 (now 0.8)'. The
    same command under a recipe tuned since (models/recipes.py) or another default (train.py's --device: cuda
    where there is one) was reused: its figures stood in the table as this command's, beside seeds trained
    with the new values, or alone (all seeds reused: the tuning never measured). The epochs a --time-budget
    chose are the run's own; --shards, --output-dir and argv are the command's. And a local --shards
    folder that holds another set now (env.json's "dataset": a 10-class trial's, deleted and the release
    built there) is not the run's data."""
    import train
    from pipeline.cache import is_set_url
    from pipeline.checkpoint import run_identity
    from pipeline.index import read_manifest

    parsed = train.parse_args(argv)
    planned = json.loads(json.dumps(train.saved_args(parsed)))  # as args.json keeps them
    try:
        saved = json.loads((run / "args.json").read_text())
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        return "its args.json (what it was trained with) is gone or damaged"
    mine = {"argv", "shards", "output_dir", *(("epochs", "budget_epochs") if planned["time_budget"] else ())}
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} (now {v})" for k, v in planned.items()
               if k not in mine and saved.get(k) != v]
    if changed:
        return f"trained with the same flags but other values: {', '.join(changed)}"
    try:
        there = json.loads((run / "env.json").read_text()).get("dataset")
    except (OSError, ValueError, AttributeError):
        there = None  # a run that does not say: its flags are all there is to compare
    if not there or is_set_url(parsed.shards):  # a URL's set: train.py checks the cache's copy against it
        return ""
    now = run_identity(parsed, read_manifest(parsed.shards))["dataset"]  # as train.py writes it in env.json
    return f"trained on another set at --shards {parsed.shards} ({there}; now {now})" if there != now else ""


def run_seed(args, seed, out, variant=None):
    """Train one seed (unless done before), the full recipe or with ABLATIONS[variant]'s part
    switched off; its process wall time, metrics and final figures."""
    run = out / "runs" / (f"seed{seed}" if variant is None else f"seed{seed}-no-{variant}")
    timing = run / "process_wall.json"
    cmd = [sys.executable, str(ROOT / "train.py"), *train_argv(args, seed, run, variant)]
    command = hide_password(shlex.join(cmd[1:]))
    # A run of other flags in the folder (another --arch or --train-args, the same --out) is not
    # this one: its figures stood in the new command's table. train.py starts it afresh.
    earlier = json.loads(timing.read_text())["command"] if timing.is_file() else None
    finished = (run / "final.json").is_file()
    if finished and earlier is not None and earlier != command:
        print(f"{run}: trained with other flags ({earlier}); training it again", flush=True)
    changed = not_the_same_run(run, cmd[2:]) if finished and earlier == command else ""
    if changed:
        print(f"{run}: {changed}; training it again", flush=True)
    if not finished or earlier != command or changed:
        print(f"$ {hide_password(shlex.join(cmd))}", flush=True)  # a --shards URL's password and token: ***
        timing.unlink(missing_ok=True)  # until this run's is written, the earlier run's flags do not stand for its final.json
        t0 = time.time()
        # In the caller's folder, as the tool itself runs: a relative --shards and --out are the user's (run from
        # the repo's root, train.py read its own data/shards, or found none, and wrote runs where no one looked).
        # SIGTERM (a scheduler, gpu_session's --deadline), SIGUSR1 (a scheduler's warning) and SIGINT (Ctrl-C) are
        # passed on: train.py checkpoints and exits (a Ctrl-C that reached it too counts once). SIGINT was a
        # KeyboardInterrupt traceback here, and, sent to this process alone, left train.py training on without it. From
        # before its start (`Stop.started`): one that came as it started, before the handlers were set,
        # ended speedrun.py (a traceback, or SIGTERM's death) and left train.py training on, orphaned.
        with Stop() as stop, compile_cache() as env:
            proc = stop.started(cmd, cwd=None, env=env)
            if proc is None:  # the signal came before train.py was started: it is not
                raise subprocess.CalledProcessError(128 + stop.signum, cmd)
            code = proc.wait()
            seconds = time.time() - t0  # not the cache's removal after it
            stop.ended(proc)
        if code:
            raise subprocess.CalledProcessError(code, cmd)
        run.mkdir(parents=True, exist_ok=True)
        timing.write_text(json.dumps(dict(seconds=seconds, command=command)))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return dict(seed=seed, variant=variant, final=json.loads((run / "final.json").read_text()), metrics=rows,
                **json.loads(timing.read_text()))


def curve(result):
    """(minutes, val top-1) after each epoch: the minutes from the process's start to the end of the epoch's
    validation (train.py's process_s). A run from before train.py wrote it: the epochs' train+val time summed,
    plus the start-up (the process's time not spent in epochs, put before the first: imports, shards,
    compiling, but also each epoch's two checkpoints and the test, which put every point late)."""
    times = [r.get("process_s") for r in result["metrics"]]
    if None not in times and times == sorted(times):  # one process's (a seed is trained again from its start)
        return [(t / 60, r["val_top1"]) for t, r in zip(times, result["metrics"])]
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
    lines = [f"# python tools/speedrun.py {hide_password(shlex.join(argv))}",
             f"# train.py {shlex.join(shlex.split(results[0]['command'])[1:])}", "",  # less train.py's path, quoted
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


def switch_nothing_off(planned):
    """The --ablate parts whose run would be the full recipe's again (`planned`: check_train_flags'): off in it
    too, on the CPU the recipe's bf16, channels_last and torch.compile (on CUDA only), or switched off by
    --train-args ('--no-tta'). Each was trained as a variant, and its row's change in val, +0.00 or the
    noise of a second run, read as what the part adds."""
    full = dict(vars(planned[None]), argv=None)
    return [variant for variant in planned if variant and dict(vars(planned[variant]), argv=None) == full]


def render_ablation(full, variants, argv, recipe, off=()):
    """ablation.md: the full recipe's row, then one row per part switched off (`part_name` of the full
    recipe's train.py args, `recipe`), with its change in val top-1 against the full recipe on the same
    seed, and a line naming the parts not run (`off`: `switch_nothing_off`). Each row says its epochs: under
    --time-budget each run sets its own from its measured epoch time (a variant without compile, bf16 or
    channels_last trains fewer in the same minutes), which the table did not show."""
    f = full["final"]
    lines = [f"# python tools/speedrun.py {hide_password(shlex.join(argv))}",
             f"# seed {full['seed']}; each row: --recipe fast with one part switched off", "",
             "| without | train.py flags | minutes (process) | epochs | val top-1 (%) | change in val (points) "
             "| test top-1 (%) |",
             "|---|---|---|---|---|---|---|",
             f"| nothing: the full recipe | | {full['seconds'] / 60:.2f} | {f['epochs']} | {f['val_top1']:.2f} | | "
             f"{f['test_top1']:.2f} |"]
    for r in variants:
        v = r["final"]
        lines.append(f"| {part_name(r['variant'], recipe)} | `{ABLATIONS[r['variant']][1]}` | "
                     f"{r['seconds'] / 60:.2f} | {v['epochs']} | {v['val_top1']:.2f} | "
                     f"{v['val_top1'] - f['val_top1']:+.2f} | {v['test_top1']:.2f} |")
    if off:
        lines += ["", "Not run, off in the full recipe too (its train.py flags are the same without them): " +
                  ", ".join(f"{part_name(variant, recipe)} (`{ABLATIONS[variant][1]}`)" for variant in off)]
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
    p = ArgumentParser(prog="speedrun.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, type=path_text, help="the shard folder (or URL) train.py reads")
    p.add_argument("--out", required=True, type=path_text, help="where speedrun.md/.json/.png and runs/ go")
    p.add_argument("--arch", default="resnet18_64", help="a network the fast recipe has a row for (default: %(default)s)")
    p.add_argument("--seeds", default="0,1", type=seed_list, help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--device", default=None, help="passed to train.py (default: train.py's)")
    p.add_argument("--train-args", default="", type=flag_words, help="more train.py flags, e.g. '--epochs 30' (they win over the recipe)")
    p.add_argument("--ablate", metavar="PARTS", type=names_among(("all", *ABLATIONS), "part", "no ablation"),
                   help=f"then the first seed once per part switched off: 'all' or comma-separated of {', '.join(ABLATIONS)}")
    with user_errors():  # a bad flag: one line, exit 2, as train.py's
        args = p.parse_args(joined(sys.argv[1:] if argv is None else argv, ("--train-args",)))
    # 'all' among parts is every one ('all,ema' was refused as 'unknown part all; choose from: all, ...')
    variants = list(ABLATIONS) if "all" in (args.ablate or []) else args.ablate or []
    planned = check_train_flags(args, variants)
    check_shards(args.shards)  # before any run starts: a typo failed the first run, which told to "rerun"
    out = Path(args.out)
    if why := folder_refusal(out):  # was a traceback, or each run failed with the advice to rerun it
        sys.exit(f"error: --out {out}: {why}")
    off = switch_nothing_off(planned)
    for variant in off:
        print(f"--ablate {variant}: {part_name(variant, planned[None])} is off in the full recipe too "
              f"(`{ABLATIONS[variant][1]}` changes none of its train.py flags): not run", flush=True)
    command_line = sys.argv[1:] if argv is None else argv
    # The tables are rewritten after every run, so that a stop or a failure keeps the runs so far.
    results, ablated, todo = [], [], [v for v in variants if v not in off]
    try:
        for seed in args.seeds:
            results.append(run_seed(args, seed, out))
            (out / "speedrun.md").write_text(render(results, command_line))
            (out / "speedrun.json").write_text(json.dumps([dict(r, curve=curve(r)) for r in results], indent=1))
            plot(results, out / "speedrun.png")
        print((out / "speedrun.md").read_text(), end="")
        for variant in [None, *todo] if variants else []:
            if variant:
                ablated.append(run_seed(args, args.seeds[0], out, variant))
            (out / "ablation.md").write_text(render_ablation(results[0], ablated, command_line, planned[None], off))
            (out / "ablation.json").write_text(json.dumps([results[0], *ablated], indent=1))
        if variants:
            print((out / "ablation.md").read_text(), end="")
    except subprocess.CalledProcessError as e:
        # The run that failed or was stopped, and those after it, not run: named under the table of the runs so
        # far, which left them out without a word (a mean ± spread of two seeds of --seeds 0,1,2).
        if len(results) < len(args.seeds):
            table, runs = out / "speedrun.md", [f"seed {seed}" for seed in args.seeds[len(results):]]
        else:
            table = out / "ablation.md"
            runs = [f"seed {args.seeds[0]} without {part_name(v, planned[None])}" for v in todo[len(ablated):]]
        if results:  # else no table of this command's runs: none finished
            table.write_text(table.read_text() + f"\nNot finished: {runs[0]} (train.py exit {e.returncode})" +
                             "".join(f", {run} (not run)" for run in runs[1:]) + "\n")
        if e.returncode == UsageError.exit_code:  # train.py's UsageError, found in its run: not a rerun's fix
            print("error: train.py refused its flags (see its error above); a rerun with them is refused alike: "
                  "change them", file=sys.stderr)
            sys.exit(e.returncode)
        # A seed is not resumed: its minutes count from its process's start, so a rerun trains it again.
        print(f"error: train.py of {runs[0]} failed (exit {e.returncode}); rerun to train that run again",
              file=sys.stderr)
        sys.exit(e.returncode if e.returncode > 128 else 1)  # 128 + signum after a signal, as train.py's


if __name__ == "__main__":
    main()
