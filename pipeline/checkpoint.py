"""train.py's checkpoint, apart from the live run: which run a checkpoint belongs to, how the file is
written and read back, what a resume (or an evaluation of a checkpoint) must agree with, and the command
that resumes an interrupted run.

A checkpoint (`CHECKPOINT_FORMAT`) belongs to one run (`run_identity`: the network, its input, the seed and
the dataset). A resume that would change what the run trains, or the order it reads its epoch in, is refused
in one line naming the flags to resume with (`check_epoch_order`, `check_limit_batches`, `check_recipe`,
`check_norm`, `check_plan`, `restore_ema`), and it keeps the run's own start (`keep_start`).
What needs the run's objects or its process group stays in train.py: `save_checkpoint` (what a checkpoint
holds, gathered from every rank), `restore` (the run state from one) and `check_same_start` (every rank
resumes the same one). Nothing here imports train.py: what of it a check needs (its parser, for the flags'
defaults; the run's parts) is handed in.
"""
import hashlib
import os
import shlex

import torch

from models.recipes import RECIPES
from models.registry import DAMAGED, damaged_member

from .atomic import atomic_file
from .errors import CheckpointError, hide_password, plural, refused_open
from .stream_plan import DEAL, LANES

CHECKPOINT_FORMAT = "tinyin-train-2"  # format 1 (before mid-epoch resume) only held whole epochs
DEBUG_ONCE = ("--resume", "--stop-after-steps", "--wait-at-step")  # flags the "continue with:" line drops


# --- whose run it is -----------------------------------------------------------------------


def classes_of(manifest):
    """The shards' classes in label order, short: "10 classes (<12 hex digits of their wnids' sha256>)"."""
    wnids = ",".join(c["wnid"] for c in manifest["classes"])
    return f"{len(manifest['classes'])} classes ({hashlib.sha256(wnids.encode()).hexdigest()[:12]})"


def run_identity(args, manifest):
    """What a checkpoint must share with this run to continue it: the network, its input, the
    seed (the epoch order and the weights follow from it) and the dataset (classes and size)."""
    return dict(arch=args.arch, size=args.size, seed=args.seed,
                dataset=f"{classes_of(manifest)}, {manifest['counts']['train']} train")


def saved_records(path, *keys):
    """A train.py checkpoint's records `keys` (its "identity", its "args": dicts), each None where `path` holds
    none. Memory-mapped: only the small records are read, of a file that is loaded (or refused) in full later."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a legacy (not zip) file cannot be mapped; it is no train.py checkpoint
        saved = None
    records = (saved.get(k) if isinstance(saved, dict) else None for k in keys)
    return [r if isinstance(r, dict) else None for r in records]


def weights_run(path):
    """(the classes (`classes_of` its shards), --size, --norm) a train.py checkpoint was trained with; None for
    what a file does not record."""
    identity, run_args = saved_records(path, "identity", "args")
    dataset = identity.get("dataset") if identity else None
    return (dataset.rsplit(", ", 1)[0] if isinstance(dataset, str) else None,
            identity.get("size") if identity else None,
            run_args.get("norm") if run_args else None)


# --- the file ------------------------------------------------------------------------------


def save_atomic(obj, path):
    """torch.save to a temp name, synced to the disk, then rename, so a crash (of the process, or of the
    machine) never leaves half a checkpoint. A write that fails (a full disk) removes the temp file and
    raises OSError naming `path`."""
    # Into a file object, not to the path: torch's own file writer turns a full disk into a
    # RuntimeError ("unexpected pos ..."), a traceback, where Python's write raises ENOSPC.
    with atomic_file(path, "wb", suffix=".tmp", durable=True) as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            # A write that failed leaves the zip writer a step behind: its end-of-file check (run on the way
            # out, into Python's buffer) raises "unexpected pos ..." over the write's OSError, the one to say.
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def check_resume_file(path):
    """CheckpointError when the --resume file is a folder or is not there: said before anything else reads the
    run's files (a typo's `--resume run/checkpont.pth` was told that --output-dir run holds a checkpoint.pth the
    run would replace: 'continue that run with --resume auto', to one trying to continue it)."""
    if os.path.isdir(path):
        raise CheckpointError(f"--resume {path}: a folder; pass {os.path.join(path, 'checkpoint.pth')}, "
                              f"or --resume auto with --output-dir {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume {path}: no such file")


def load_checkpoint(path, identity):
    """A train.py checkpoint of this run; CheckpointError naming what is wrong otherwise."""
    check_resume_file(path)
    member = damaged_member(path)  # torch.load does not check: the run went on from damaged weights
    if member:
        raise CheckpointError(f"{path}: {DAMAGED.format(member=member)}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load of an arbitrary file raises nearly anything (KeyError, struct.error...)
        if why := refused_open(e):  # another user's file: no word against its bytes
            raise CheckpointError(f"{path}: cannot read ({why})") from None
        raise CheckpointError(f"{path}: not a train.py checkpoint ({e.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format", "none") if isinstance(ckpt, dict) else "none"
        raise CheckpointError(f"{path}: not a train.py checkpoint of format {CHECKPOINT_FORMAT} (format: {found})")
    check_same_run(path, ckpt["identity"], identity)
    return ckpt


def check_same_run(path, saved, identity):
    """CheckpointError unless a checkpoint's identity (`saved`, its `run_identity`) is this run's (`identity`)."""
    differs = [f"{k} {saved.get(k)} there, {v} here" for k, v in identity.items() if saved.get(k) != v]
    if differs:
        raise CheckpointError(f"{path}: a checkpoint of another run ({'; '.join(differs)}); "
                              "pass the flags it was made with, or another --output-dir")


def restore_ema(parts, ckpt, path, args):
    """Load the checkpoint's EMA; CheckpointError when the checkpoint and this run disagree on having one
    (starting an average mid-run, or dropping one, would quietly change what is validated), or on its
    --ema or --ema-every (one average of two decays: the state dict keeps the average, not its decay).
    --test-only trains nothing: it evaluates the file's average, or its weights, whatever --ema says."""
    here = parts.ema is not None
    there = ckpt["args"].get("ema") if "ema" in ckpt else None
    if args.test_only and here != bool(there):
        # An evaluation of the file, as of it by --weights: its average if it has one, else its weights, whatever
        # --ema says (README: --test-only may differ in --ema). The --recipe fast run's command without the
        # recipe was refused 'resume it with --ema 0.999'. `parts.module` holds the checkpoint's weights by now.
        if there:  # no EMA here: the network evaluated is `parts.module`, and takes the average
            parts.module.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["ema"].items()
                                          if k.startswith("module.")})
        else:  # the EMA here is a copy of the fresh weights it was built from
            parts.ema.module.load_state_dict(parts.module.state_dict())
        return
    if here and not there:
        raise CheckpointError(f"{path}: holds no EMA of the weights (made without --ema); "
                              "resume it without --ema, or use another --output-dir")
    if there and not here:
        raise CheckpointError(f"{path}: holds an EMA of the weights (made with --ema {there}); resume it with --ema {there}")
    saved = (there, ckpt["args"].get("ema_every", 1))
    if here and saved != (args.ema, args.ema_every) and not args.test_only:  # evaluating it needs no decay
        named = saved[1] != args.ema_every  # --ema-every only where it differs
        said = lambda ema, every: f"--ema {ema}" + (f" --ema-every {every}" if named else "")  # noqa: E731
        raise CheckpointError(f"{path}: holds an EMA of the weights made with {said(*saved)}, this run has "
                              f"{said(args.ema, args.ema_every)}, and one average must keep its decay; resume it "
                              f"with {said(*saved)}, or use another --output-dir")
    if here:
        parts.ema.load_state_dict(ckpt["ema"])


# --- what a resume must agree with ---------------------------------------------------------


def check_epoch_order(ckpt, state, args, world_size, path, counts=None):
    """CheckpointError when this run cannot carry on the checkpoint's epoch where it stopped. The rest of
    an epoch is the rest of the order the checkpoint's data path planned, and the stream path's (shards
    dealt to ranks, `stream_plan`) is neither the resident and fast paths' (`order.epoch_order`) nor its
    own on another number of ranks, batch size or lane count, or on shards of other sizes (`counts`: this
    run's train shards' samples; the same release built with another --shard-size is the same run):
    resumed so, some samples would be trained on twice that epoch and others not at all, without a word.
    At an epoch boundary anything goes on, and so it does where the epoch was trained whole (its checkpoint before
    validation, one rank without drop_last): no rest is left to share. That was refused as 'stopped mid-epoch', a
    run killed in its validation told to resume with the -b, -j and --data-path of an epoch with nothing left."""
    if not state.samples_done or (counts is not None and state.samples_done == sum(counts)):
        return
    saved = ckpt["args"].get("data_path", "auto")
    where = f"{path}: stopped mid-epoch (epoch {state.epoch} step {state.epoch_steps})"
    if (saved == "stream") != (args.data_path == "stream"):
        raise CheckpointError(f"{where} on --data-path {saved}, whose order of the epoch --data-path "
                              f"{args.data_path} does not share; resume it with --data-path {saved}")
    if saved != "stream":  # the resident and fast paths' order goes on from any position, on any ranks
        return
    if ckpt["world_size"] != world_size:
        saved_ranks = ckpt["world_size"]
        raise CheckpointError(f"{where} on {saved_ranks} {plural(saved_ranks, 'rank')}; the stream path resumes "
                              f"mid-epoch on the same number only (this run has {world_size})")
    if world_size > 1 and ckpt.get("stream_deal", 1) != DEAL:  # one rank's deal never changed
        raise CheckpointError(f"{where} on {world_size} ranks by an earlier tinyin, whose stream path dealt the "
                              f"shards to ranks otherwise (deal {ckpt.get('stream_deal', 1)}, this one's is {DEAL}); "
                              "finish that epoch with the tinyin that saved it, or start the run again")
    saved_counts = ckpt.get("stream_counts")  # None: a checkpoint from before they were saved
    if saved_counts is not None and counts is not None and list(saved_counts) != list(counts):
        said = lambda c: ", ".join(f"{n:,}" for n in c[:4]) + (f", ... ({len(c)} shards)" if len(c) > 4 else "")  # noqa: E731
        raise CheckpointError(f"{where} on train shards of {said(saved_counts)} samples, whose order of the epoch "
                              f"shards of {said(counts)} (these) do not share (the stream path reads whole shards); "
                              "resume it on the shards it was made with")
    if ckpt["batch_size"] != args.batch_size:  # the plan cuts its lanes into batches
        raise CheckpointError(f"{where} with -b {ckpt['batch_size']}, whose order of the epoch -b "
                              f"{args.batch_size} does not share; resume it with -b {ckpt['batch_size']}")
    # The stream path plans max(LANES, workers) lanes (more workers than lanes would sit idle), so -j above
    # LANES orders the epoch otherwise; the loader's default is 2 workers.
    workers = [2 if w is None else w for w in (ckpt["args"].get("workers"), args.workers)]
    if max(LANES, workers[0]) != max(LANES, workers[1]):
        fits = f"-j {LANES} or fewer" if workers[0] <= LANES else f"-j {workers[0]}"
        raise CheckpointError(f"{where} with -j {workers[0]}, whose order of the epoch -j {workers[1]} does not "
                              f"share (the stream path reads max({LANES}, -j) shard groups side by side); "
                              f"resume it with {fits}")


def check_limit_batches(saved, args, path):
    """CheckpointError unless this run caps its epochs at the checkpoint's --limit-batches (`saved`), or
    only evaluates. A quick look resumed without it (tools/reproduce.py's rows share an --out with the
    real run) mixed epochs of a few batches with whole ones in one run's metrics, and args.json, from
    which `tinyin report` labels a run's epochs, named only the last command's."""
    if saved == args.limit_batches or args.test_only:
        return
    said = lambda n: "no --limit-batches" if n is None else f"--limit-batches {n}"  # noqa: E731
    fix = "without --limit-batches" if saved is None else f"with --limit-batches {saved}"
    raise CheckpointError(f"{path}: made with {said(saved)}, this run has {said(args.limit_batches)}, and one run's "
                          f"epochs must see the same batches; resume it {fix}, or use another --output-dir")


def recipe_row(name, args):
    """--recipe `name`'s flags for this run's --arch and --size, less its --epochs; {} for no recipe."""
    row = dict(RECIPES.get(name, {}).get((args.arch, args.size), {}))
    row.pop("epochs", None)
    return row


def check_recipe(saved_args, args, path):
    """CheckpointError unless a training resume names the --recipe its checkpoint was made with (`saved_args`'
    "recipe"; a checkpoint from before --recipe is not checked). Without it train.py's defaults came back
    mid-run: a --recipe paper LeNet-5 resumed with the --norm half the norm check asks for trained on at -b 128
    on a cosine schedule over 30 epochs, not at 32 with a constant lr for 40, and only a note about lr and wd."""
    saved = saved_args.get("recipe")
    if args.test_only or "recipe" not in saved_args or recipe_row(saved, args) == recipe_row(args.recipe, args):
        return  # paper's 224 rows and paper-50's differ in their epochs only, which a resume may change
    said = lambda r: f"--recipe {r}" if r else "no --recipe"  # noqa: E731
    fix = f"with --recipe {saved}" if saved else "without --recipe"
    raise CheckpointError(f"{path}: made with {said(saved)}, this run has {said(args.recipe)}, which changes its batch, "
                          f"epochs, lr schedule or normalisation mid-run; resume it {fix}, or use another --output-dir")


def check_norm(saved, args, path):
    """CheckpointError unless this run normalises its inputs as the checkpoint's (`saved`) did, also under
    --test-only (and there for --weights of a checkpoint too): the weights are for those inputs. A resume or evaluation without the --recipe the run was
    made with (paper: --norm half for lenet5, imagenet for the others) took the default, the shards' own
    statistics, without a word: training went on, or was scored, on inputs shifted and scaled otherwise."""
    if saved is None or saved == args.norm:  # None: a checkpoint that does not say
        return
    raise CheckpointError(f"{path}: made with --norm {saved}, this run has --norm {args.norm}, and the weights are for "
                          f"inputs normalised as they were trained; give --norm {saved}")


#: What a training resume must keep of its checkpoint's run, beyond what is checked on its own (the identity,
#: --recipe, --norm, --ema, --limit-batches): the flags that decide what is trained (the optimiser, the lr schedule,
#: the loss, the augmentation and mixing) and what validation measures (--tta). Resumed with others, a run went on
#: to another plan without a word, two plans in one metrics.jsonl and final.json and args.json naming the last.
PLAN_FLAGS = ("lr", "momentum", "wd", "nesterov", "lr_scheduler", "lr_per", "warmup_epochs", "lr_step_size",
              "lr_gamma", "label_smoothing", "augment", "mix", "mix_alpha", "mix_prob", "tta")


def flag_text(dest, value):
    """`dest` set to `value` as a command line says it: "--lr-scheduler step", "--no-tta"; '' for None
    (--mix-alpha without --mix)."""
    flag = "--" + dest.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return "" if value is None else f"{flag} {value}"


def saved_flags(saved_args, dests, parser):
    """A checkpoint's values (`saved_args`) of the flags `dests`; one it does not hold (an older train.py's)
    at its default (`parser`'s: train.py's), which is what that run did."""
    return {k: saved_args.get(k, parser.get_default(k)) for k in dests}


def check_plan(saved_args, args, path, parser):
    """CheckpointError unless a training resume has its checkpoint's `PLAN_FLAGS` (`saved_args`), given or
    defaulted alike (`parser`: train.py's, for their defaults), as the other checks compare them; --test-only
    trains nothing and needs none."""
    if args.test_only:
        return
    saved = saved_flags(saved_args, PLAN_FLAGS, parser)
    if saved["augment"] in (True, False):  # from before --augment took a name: a bare --augment was crop
        saved["augment"] = "crop" if saved["augment"] else "none"
    if saved["lr_per"] is None:  # from before --lr-per: the warm-up or onecycle alone made a schedule per step
        saved["lr_per"] = "step" if saved["warmup_epochs"] or saved["lr_scheduler"] == "onecycle" else "epoch"
    differ = [k for k in PLAN_FLAGS if saved[k] != getattr(args, k)]
    if not differ:
        return
    said = lambda values: " ".join(filter(None, (flag_text(k, values[k]) for k in differ)))  # noqa: E731
    raise CheckpointError(f"{path}: made with {said(saved)}, this run has {said(vars(args))}, and one run trains to "
                          f"one plan; resume it with {said(saved)}, or use another --output-dir (--weights {path} "
                          "starts a new run from its weights)")


START_FLAGS = ("pretrained", "weights")  # where a run's weights came from, which `tinyin report` labels it by


def keep_start(saved_args, args, parser):
    """Set `args`' START_FLAGS to the checkpoint's (`saved_args`): a resumed run goes on from its checkpoint's
    weights, so it started where that run started, whatever the resume command names. args.json kept the
    command's: a from-scratch run resumed with --weights FILE was reported "from FILE" beside the study's
    fine-tuned rows. Returns the note to print when the command named another start ('' when it did not).
    `parser`: train.py's, for the defaults of an older checkpoint."""
    saved = saved_flags(saved_args, START_FLAGS, parser)
    named = {k: getattr(args, k) for k in START_FLAGS}
    vars(args).update(saved)
    if named == saved or not any(named.values()):  # the start not repeated: nothing of the command is dropped
        return ""
    said = f"--weights {named['weights']}" if named["weights"] else "--pretrained"
    began = saved["weights"] or ("ImageNet weights" if saved["pretrained"] else "scratch")
    return f"{said} not used: a resumed run goes on from its checkpoint's weights (the run started from {began})"


# --- the resume's command ------------------------------------------------------------------


def resume_path(args):
    """The checkpoint --resume names: 'auto' = OUTPUT_DIR/checkpoint.pth if it exists."""
    if args.resume == "auto":
        path = os.path.join(args.output_dir, "checkpoint.pth")
        return path if os.path.exists(path) else None
    return args.resume


def continue_command(args, world_size, script="train.py", nodes=1):
    """The command line that resumes this run (printed when it is interrupted). A URL's password and
    token show as `***` in it, as in every line printed: it goes to job logs, so it is not runnable
    verbatim for such a URL, and a signed URL's token may have expired by the rerun anyway.
    `script`: train.py's path; named `train.py` in its own folder, else by its absolute path (a job's
    `python ~/tinyin/train.py` in a folder of its own was told `python train.py`: no such file there).
    `nodes`: the torchrun agents the `world_size` processes ran under; a run of 2 nodes of 8 was told
    `torchrun --nproc_per_node 16`, 16 processes on one node (on one of 8 GPUs, 8 without a GPU)."""
    argv, skip = [], False
    for a in args.argv:  # drop --resume X and the hidden one-shot flags: --resume auto replaces them
        if skip:
            skip = False
        elif a in DEBUG_ONCE:
            skip = True
        elif not a.startswith(tuple(f"{flag}=" for flag in DEBUG_ONCE)):
            argv.append(a)
    script = "train.py" if os.path.samefile(os.path.dirname(os.path.abspath(script)), ".") else os.path.abspath(script)
    launcher = f"torchrun --nproc_per_node {world_size}" if world_size > 1 else "python"
    where = ""
    if nodes > 1:  # the rendezvous flags are the agents' own, which no worker sees
        launcher = f"torchrun --nnodes {nodes} --nproc_per_node {world_size // nodes}"
        where = f" (on each of the {nodes} nodes, with the run's --rdzv flags)"
    launcher = f"{launcher} {shlex.quote(script)}"
    return hide_password(f"{launcher} {shlex.join(argv + ['--resume', 'auto'])}{where}")  # printed to a job's log
