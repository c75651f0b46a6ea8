"""Summarise training runs the way the study did: one table row per run, plus learning curves.

A run is an output folder of train.py: args.json (what was asked), metrics.jsonl (one row
per epoch), final.json (test accuracy and wall time, once the run has finished).
"""

import errno
import fcntl
import json
import os
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch
from matplotlib.ticker import MaxNLocator

from models.recipes import RECIPES  # plain dicts: no torch

from .atomic import folder_refusal
from .errors import hide_password, plural
from .schema import RUN_LOCK_FILE

__all__ = ["read_run", "render_table", "render_study", "study_row", "plot_curves", "write_report"]

NAMES = {"lenet5": "LeNet-5", "alexnet": "AlexNet", "squeezenet1_1": "SqueezeNet 1.1", "resnet18": "ResNet-18"}
SCALING = {28: "28x28 grey", 64: "64x64 RGB", 224: "224x224 RGB (64x64 upscaled)"}
#: args.json's "augment" -> what the Method column adds. True is "crop" from before --augment took a
#: name. (Not pipeline.augment.augment_mode: that module imports torch, which the report never needs.)
AUGMENT_LABELS = {"crop": " + crop/flip augmentation", True: " + crop/flip augmentation",
                  "rrc": " + random-resized crop/flip augmentation"}
#: The study's figures (../shared/STUDY.md), as fractions. Key: (arch, size, pretrained, epochs of
#: the table row). "recorded" is what the study's own notebooks saved: (epoch or None, text, value).
STUDY = {
    ("lenet5", 28, False, 40): dict(table="Table 2", train=0.218, val=0.220,
                                    recorded=(30, "val after epoch 30 (lenet.ipynb; it ran 30 epochs)", 0.139)),
    ("alexnet", 64, False, 40): dict(table="Table 2", train=0.237, val=0.240),
    ("squeezenet1_1", 64, False, 40): dict(table="Table 2", train=0.233, val=0.230),
    ("resnet18", 64, False, 40): dict(table="Table 2", train=0.228, val=0.237,
                                      recorded=(1, "val after epoch 1 (run_models2.ipynb, interrupted)", 0.079)),
    # Table 3 has two rows per network: the label says which one a run is set beside
    ("alexnet", 224, True, 10): dict(table="Table 3, 10 epochs", train=0.562, val=0.573),
    ("squeezenet1_1", 224, True, 10): dict(table="Table 3, 10 epochs", train=0.589, val=0.586),
    ("resnet18", 224, True, 10): dict(table="Table 3, 10 epochs", train=0.628, val=0.625),
    ("alexnet", 224, True, 50): dict(table="Table 3, 50 epochs", train=0.590, val=0.587),
    ("squeezenet1_1", 224, True, 50): dict(table="Table 3, 50 epochs", train=0.544, val=0.546),
    ("resnet18", 224, True, 50): dict(table="Table 3, 50 epochs", train=0.660, val=0.665),
}
# Saved 224 models of run_models.ipynb (epochs not recorded): val / test.
_SAVED_224 = {"alexnet": (0.570, 0.562), "squeezenet1_1": (0.551, 0.539), "resnet18": (0.667, 0.658)}
for (_arch, _size, _pre, _epochs), _entry in STUDY.items():
    if _size == 224:
        _entry["recorded"] = (None, "saved model, val / test (epochs not recorded)", _SAVED_224[_arch])
#: The study's train split: the release's every train image (a run on fewer is not set beside its figures).
STUDY_TRAIN_IMAGES = 100000
#: LeNet-5's recorded val curve (lenet.ipynb): epoch -> val accuracy.
LENET_RECORDED = {1: 0.007, 2: 0.007, 3: 0.008, 4: 0.015, 5: 0.020, 10: 0.061, 15: 0.098, 20: 0.115, 25: 0.130,
                  29: 0.141, 30: 0.139}
#: What the study's recipe is beyond `--recipe paper`'s flags (which leave these at train.py's
#: defaults): no Nesterov, warm-up, augmentation, mixing, EMA or TTA.
STUDY_PLAIN = dict(nesterov=False, warmup_epochs=0.0, augment="none", mix="none", ema=0.0, tta=False)
#: The flags that change a run's figures, compared with the study's recipe, in the order they are named.
RECIPE_FLAGS = ("batch_size", "lr", "momentum", "wd", "lr_scheduler", "label_smoothing", *STUDY_PLAIN, "norm")
COLUMNS = ["Method", "Image scaling", "Epochs", "Batch size", "Training accuracy",
           "Validation accuracy", "Test accuracy", "Wall time"]


def _training(run: Path):
    """Whether a train.py trains in the run folder now (holds its RUN_LOCK_FILE): True or False; None where that cannot
    be told (no lock file: a train.py from before it; a file system without locks). A shared lock taken and let go:
    it needs no write permission."""
    try:
        f = open(run / RUN_LOCK_FILE, "rb")
    except OSError:
        return None
    with f:  # closing the file lets go of the shared lock
        try:
            fcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            return True if e.errno in (errno.EACCES, errno.EAGAIN) else None
    return False


def read_run(run) -> dict:
    """Load a run folder: ``dict(name, args, rows, final, env, training)``; ``ValueError`` naming the file if it
    has no metrics or one of its files cannot be read as train.py writes it.
    ``final`` is {} while the run is unfinished: no final.json, or one whose epochs differ from the metrics'.
    ``training``: whether a train.py trains there now (None: cannot be told)."""
    if not Path(run).is_dir():  # a typo, or a URL: said as train.py says a missing --shards folder
        where = hide_password(str(run))
        raise ValueError(f"{where}: a file, not a run folder" if Path(run).exists() else f"{where}: no such folder")
    run = Path(run)
    if not (run / "metrics.jsonl").is_file():
        raise ValueError(f"{run}: not a training run (no metrics.jsonl)")
    rows = _metrics_rows(run / "metrics.jsonl")

    def optional(name):
        path = run / name
        if not path.is_file():
            return {}
        try:
            value = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path}: not a JSON object ({e})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{path}: not a JSON object ({_kind(value)})")
        bad = _bad_field(value, FIELD_KINDS[name])
        if bad:
            raise ValueError(f"{path}: {bad}")
        return value

    final = optional("final.json")
    if final.get("epochs", len(rows)) != len(rows):
        final = {}  # an earlier, shorter run's, left by a resume that trained further (train.py now removes it)
    # The folder's own name, not the last part as given: `tinyin report .` (inside the run) named its row '' and
    # `tinyin report ..` its row '..'.
    name = Path(os.path.abspath(run)).name
    # A name's bytes that are no UTF-8 (a Latin-1 'é' from an old disk or archive), as the terminal shows them:
    # Python's surrogates for them were a traceback out of matplotlib's legend.
    name = os.fsencode(name).decode("utf-8", "replace")
    return dict(name=name, args=optional("args.json"), rows=rows, final=final, env=optional("env.json"),
                training=_training(run))


#: What the table and the curves read from every metrics row.
ROW_KEYS = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1")
_WHOLE, _NUMBER, _TEXT = ((int,), "a whole number"), ((int, float), "a number"), ((str,), "text")
#: The fields of a run's files that the report computes with, and the JSON types train.py writes there:
#: a hand-edited value of another type (env.json's `"world_size": null`) failed with a traceback.
FIELD_KINDS = {
    "args.json": dict(arch=_TEXT, size=_WHOLE, epochs=_WHOLE, batch_size=_WHOLE, ema=_NUMBER,
                      weights=((str, type(None)), "text or null"), augment=((str, bool), "text"),
                      limit_batches=((int, type(None)), "a whole number or null")),
    "env.json": dict(world_size=_WHOLE, dataset=_TEXT),
    "final.json": dict(epochs=_WHOLE, test_top1=_NUMBER, wall_time_s=_NUMBER),
    "metrics.jsonl": dict(epoch=_WHOLE, **dict.fromkeys(ROW_KEYS[1:], _NUMBER)),
}


def _kind(value) -> str:
    """What a JSON value that is no object is, in the words of `FIELD_KINDS`: Python's name of its type said
    'a int', 'a float', 'a str' and 'a NoneType' to the user who wrote 3, "x" or null in a file."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "a list" if isinstance(value, list) else "text" if isinstance(value, str) else "a number"


def _bad_field(value: dict, kinds: dict) -> str:
    """What is wrong with the first field of `value` that is not of its kind in `kinds` ('' if none is)."""
    for key, (types, said) in kinds.items():
        if key in value and not isinstance(value[key], types):
            return f"{key} is not {said} ({json.dumps(value[key])})"
    return ""


def _metrics_rows(path) -> list[dict]:
    """The rows of metrics.jsonl; ValueError naming the line of one that is not a metrics row."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}: line {n}: not a metrics row ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {n}: not a metrics row ({_kind(row)})")
        missing = [key for key in ROW_KEYS if key not in row]
        if missing:
            raise ValueError(f"{path}: line {n}: not a metrics row (no {', '.join(missing)})")
        bad = _bad_field(row, FIELD_KINDS["metrics.jsonl"])
        if bad:
            raise ValueError(f"{path}: line {n}: not a metrics row ({bad})")
        rows.append(row)
    return rows


def _half_up(seconds, places=0, unit=1) -> Decimal:
    """`seconds` (as its JSON file writes them) in `unit`s of seconds (60: minutes), rounded half up to `places`
    decimals. Python's round and format round half to even, and the float's binary value, not the number written:
    0.25 s was '0.2 s' but 0.45 s '0.5 s', 90.5 s '1 min 30 s' but 91.5 s '1 min 32 s', 5430 s (1 h 30 min 30 s)
    '1 h 30 min', and 9 s '0.1' minutes but 27 s '0.5'."""
    exact = Decimal(repr(float(seconds))) / unit
    return exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)


def _duration(seconds) -> str:
    """A run's wall time: tenths of a second below a minute, minutes and seconds below an hour, then hours and
    minutes, each rounded half up to its last place; in the larger unit where it rounds up to its bound: 59.96 s
    is '1 min 00 s' (it was '60.0 s')."""
    if seconds is None:
        return "-"
    tenths = _half_up(seconds, 1)
    if tenths < 60:
        return f"{tenths} s"
    m, s = divmod(int(_half_up(seconds)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    # rounded to the minute, as the seconds above: 7199 s was '1 h 59 min'
    h, m = divmod(int(_half_up(seconds, unit=60)), 60)
    return f"{h} h {m:02d} min"


def _wall(run: dict):
    """A run's wall time in seconds: final.json's, else its finished epochs' (an unfinished run); None for a run
    stopped before its first epoch ended, which recorded none (it was said '0.0 s')."""
    if "wall_time_s" in run["final"]:
        return run["final"]["wall_time_s"]
    return sum(r.get("epoch_time_s", 0) for r in run["rows"]) if run["rows"] else None


def _percent(value) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _row(run: dict) -> list[str]:
    args, rows, final = run["args"], run["rows"], run["final"]
    method = NAMES.get(args.get("arch"), args.get("arch", "?"))
    if args.get("pretrained"):
        method += ", ImageNet-pretrained"
    elif args.get("weights"):
        method += f", from {os.path.basename(args['weights'])}"
    method += AUGMENT_LABELS.get(args.get("augment"), "")
    # What else changes a figure beyond the study's plain SGD: two runs that differ so must not read alike.
    if args.get("mix") not in (None, "none"):
        method += f" + {args['mix']}"
    if args.get("ema"):
        method += f" + EMA {args['ema']:g}"
    if args.get("tta"):
        method += " + flip TTA"
    epochs = str(len(rows))
    if args.get("epochs") and args["epochs"] != len(rows):
        epochs += f" of {args['epochs']}"  # an unfinished run says so
    if args.get("limit_batches"):
        limit = args["limit_batches"]
        epochs += f" ({limit} {plural(limit, 'batch')} each)"  # a --limit-batches run saw a subset
    if not final and run.get("training") is False:  # unfinished and no train.py on it: "12 of 40" read as running
        epochs += ", stopped or failed"
    batch = str(args.get("batch_size", "?"))
    if run["env"].get("world_size", 1) > 1:
        batch += f" x {run['env']['world_size']} processes"
    last = rows[-1] if rows else {}
    return [method, SCALING.get(args.get("size"), str(args.get("size", "?"))), epochs, batch,
            _percent(last.get("train_top1")), _percent(last.get("val_top1")), _percent(final.get("test_top1")),
            _duration(_wall(run))]


def study_row(args: dict):
    """The study's entry for a run's args (see `STUDY`), or None when the study has no such row.
    A 224 row is compared with Table 3's 50-epoch row when it used `--recipe paper-50` (a quick
    look at that row may train fewer epochs) or asked for 50 epochs or more."""
    pretrained = bool(args.get("pretrained") or args.get("weights"))
    arch, size, epochs = args.get("arch"), args.get("size"), args.get("epochs") or 0
    table_epochs = 40 if size != 224 else (50 if args.get("recipe") == "paper-50" or epochs >= 50 else 10)
    return STUDY.get((arch, size, pretrained, table_epochs))


def _recipe_difference(run: dict) -> str:
    """How a run's flags differ from the study's recipe for its row, as the "not comparable" text;
    '' when they do not. Flags its args.json does not hold (an older train.py's) are not compared."""
    args = run["args"]
    # paper-50's 224 rows differ from paper's in their epochs only, which are not compared
    study = {**RECIPES["paper"][args["arch"], args["size"]], **STUDY_PLAIN}
    ours = dict(args, batch_size=args.get("batch_size", 0) * run["env"].get("world_size", 1))  # the study's in all
    if ours.get("augment") in (True, False):  # args.json from before --augment took a name
        ours["augment"] = "crop" if ours["augment"] else "none"
    differ = [k for k in RECIPE_FLAGS if k in args and ours[k] != study[k]]
    if not differ:
        return ""
    said = lambda values: ", ".join(f"{'batch' if k == 'batch_size' else k} {values[k]}" for k in differ)  # noqa: E731
    return f"not comparable: trained with {said(ours)}; the study's recipe (--recipe paper): {said(study)}"


def _fraction(percent) -> str:
    return "-" if percent is None else f"{percent / 100:.3f}"


def _minutes(seconds) -> str:
    return "-" if seconds is None else str(_half_up(seconds, 1, unit=60))


def _study_cells(run: dict) -> list[str]:
    args, rows, final = run["args"], run["rows"], run["final"]
    study = study_row(args)
    last = rows[-1] if rows else {}
    ours = " / ".join(_fraction(v) for v in (last.get("train_top1"), last.get("val_top1"), final.get("test_top1")))
    wall = _wall(run)
    name = run["name"]
    dataset = run["env"].get("dataset")  # "200 classes (<hash>), 100000 train" for the release (runs since it is kept)
    why = "no such row in the study"
    # --limit-batches: the batches of each epoch (and evaluation) it took, over all processes, where they are fewer
    limit = args.get("limit_batches") or 0
    seen = limit * args.get("batch_size", 1) * run["env"].get("world_size", 1)
    if study is not None and dataset and not (dataset.startswith("200 classes")
                                              and dataset.endswith(f" {STUDY_TRAIN_IMAGES} train")):
        study, why = None, f"not comparable: trained on {dataset}, the study on the full release"
    elif study is not None and limit and seen < STUDY_TRAIN_IMAGES:  # a quick look: its val is of a few batches too
        study, why = None, (f"not comparable: trained and evaluated on --limit-batches {limit} ({seen} of the "
                            f"{STUDY_TRAIN_IMAGES} train images an epoch), the study on every image")
    elif study is not None and (differ := _recipe_difference(run)):  # another batch, lr, schedule, augmentation...
        study, why = None, differ
    epochs, batch = _row(run)[2:4]  # as the run table says them: "12 of 40, stopped or failed", "16 x 2 processes"
    if study is None:
        return [name, epochs, batch, ours, why, "-", "-", _minutes(wall)]
    reported = f"{study['train']:.3f} / {study['val']:.3f} ({study['table']})"
    recorded, at_epoch = "-", "-"
    if "recorded" in study:
        epoch, text, value = study["recorded"]
        recorded = f"{' / '.join(f'{v:.3f}' for v in value) if isinstance(value, tuple) else f'{value:.3f}'}: {text}"
        if epoch is not None:
            match = next((r for r in rows if r["epoch"] + 1 == epoch), None)
            at_epoch = f"val {_fraction(match['val_top1'])} after epoch {epoch}" if match else f"(not at epoch {epoch})"
        else:
            at_epoch = f"val / test {_fraction(last.get('val_top1'))} / {_fraction(final.get('test_top1'))}"
    return [name, epochs, batch, ours, reported, recorded, at_epoch, _minutes(wall)]


def _table_row(cells) -> str:
    """A Markdown table row of `cells`, a `|` in one (a run folder's or a weights file's name) escaped: it ended
    the cell, and every figure after it stood in the next column."""
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


STUDY_COLUMNS = ["Row", "Epochs", "Batch", "Ours: train / val / test", "Study reported: train / val",
                 "Study recorded", "Ours, comparable", "Minutes"]


def render_study(run_dirs, not_run=(), wall_s=None, jobs=1) -> str:
    """Our rows beside the study's reported and (where one exists) recorded values, as fractions;
    `not_run`: (row name, why it has no epoch to show) pairs listed below, e.g. ("alexnet-224",
    "not run: no ImageNet weights here"); `wall_s`: the whole table's wall clock;
    `jobs`: how many rows trained side by side (their minutes were measured sharing the machine)."""
    runs = [read_run(r) for r in run_dirs]
    lines = ["| " + " | ".join(STUDY_COLUMNS) + " |", "|" + "|".join("---" for _ in STUDY_COLUMNS) + "|"]
    lines += [_table_row(_study_cells(run)) for run in runs]
    lines += [f"| {name} | - | - | {why} | - | - | - | - |" for name, why in not_run]
    walls = [w for w in map(_wall, runs) if w is not None]
    footer = f"\nTraining time, sum of the rows: {f'{_minutes(sum(walls))} min' if walls else '-'}"
    if wall_s is not None:
        footer += f"; the whole table, wall clock (start-up, evaluation and test included): {_minutes(wall_s)} min"
    if jobs > 1:
        footer += f"; up to {jobs} rows trained side by side, so each row's minutes were measured sharing the machine"
    return "\n".join(lines) + "\n" + footer + ".\n"


def render_table(run_dirs) -> str:
    """A Markdown table, one row per run, in the study's column layout (plus test accuracy, wall time)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += [_table_row(_row(read_run(run))) for run in run_dirs]
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
    if any(read_run(p)["args"].get("arch") == "lenet5" for p in run_dirs):
        ax_acc.plot(list(LENET_RECORDED), [100 * v for v in LENET_RECORDED.values()], "kx",
                    label="study's LeNet-5 val (lenet.ipynb)")
    ax_acc.legend(fontsize="small")
    fig.savefig(out_png, dpi=120)
    return str(out_png)


def write_report(run_dirs, out_dir, not_run=(), wall_s=None, jobs=1) -> tuple[str, str]:
    """Write ``report.md`` (the table, our rows beside the study's, linking the curves),
    ``report.json`` (every run's args, metrics and final figures) and ``curves.png`` into ``out_dir``.
    not_run / wall_s / jobs: see `render_study`."""
    table = render_table(run_dirs)  # first, so a bad run dir fails before anything is written
    study = render_study(run_dirs, not_run, wall_s, jobs)
    runs = [read_run(r) for r in run_dirs]
    record = dict(runs=runs, not_run=[list(n) for n in not_run], wall_s=wall_s, jobs=jobs)
    out = Path(out_dir)
    md = out / "report.md"
    if why := folder_refusal(out):  # said as reproduce.py says it: 'cannot write in it (Read-only file system)'
        raise ValueError(f"--out {out}: {why}")
    try:
        png = plot_curves(run_dirs, out / "curves.png") if run_dirs else None
        curves = "\n![learning curves](curves.png)\n" if png else ""
        md.write_text(f"# Tiny ImageNet runs\n\n{table}\n## Beside the study\n\n{study}{curves}")
        (out / "report.json").write_text(json.dumps(record, indent=1))
    except OSError as e:  # a folder under a file, no permission, a full disk
        raise ValueError(f"{out}: cannot write the report ({e.__class__.__name__}: {e})") from None
    return str(md), png
