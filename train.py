"""Train one of the study's CNNs on Tiny ImageNet shards (torchvision references/classification style).

    python train.py --arch lenet5 --recipe paper                  # the study's LeNet-5 row
    python train.py --arch alexnet --size 224 --pretrained        # ImageNet weights, 64x64 upscaled to 224
    torchrun --nproc_per_node 4 train.py --arch resnet18 --amp    # DDP, one process per GPU

Writes to --output-dir: args.json, env.json, metrics.jsonl/.csv (one row per epoch),
checkpoint.pth (every epoch, every --checkpoint-every steps, and on SIGTERM/SIGINT/SIGUSR1;
resume with --resume auto), best.pth (best val top-1) and final.json (test-split accuracy of
the final model, total wall time; written when the run finishes, removed when training starts), and
.train.lock (locked while a run trains there: a second one is refused).

Beyond the study's plain SGD: --nesterov, a linear --warmup-epochs and a onecycle schedule (both
per step, in closed form of the step), --ema (validate and test an exponential moving average of
the weights), --tta (flip test-time augmentation), --mix mixup/cutmix, and --augment crop/rrc on
the device. `--recipe fast` (models/recipes.py) puts them together for the speedrun.
--time-budget MINUTES fits a run into its minutes: after two epochs it sets --epochs to as many as
the time left holds (`budget_epochs`).

Preemption: a run's data state is (seed, epoch, samples of the epoch consumed over all ranks),
because the epoch order is a pure function of (seed, epoch) (pipeline/order.py). A checkpoint
records that, with the model, optimiser, each rank's partial epoch metrics and RNG state, so
`--resume auto` continues mid-epoch; on the same number of ranks the result is bit-identical to
an uninterrupted run, and on another number of ranks the rest of the epoch is dealt out to them.
"""

import argparse
import contextlib
import csv
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings

from pipeline.errors import stopped_at_once

with stopped_at_once():  # the imports (torch's: seconds): a signal ends them in one line, 130, 143 or 138
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.optim.swa_utils import AveragedModel
    from tqdm import tqdm

    import models
    from models.recipes import recipe_names, resolve_recipe
    from models.registry import DAMAGED, damaged_member
    from pipeline import IMAGENET_MEAN, IMAGENET_STD, make_loader, provenance
    from pipeline.atomic import folder_refusal, long_name, write_json
    from pipeline.cache import cached_copy, is_set_url
    from pipeline.checkpoint import (CHECKPOINT_FORMAT, check_epoch_order, check_limit_batches, check_norm,
                                     check_plan, check_recipe, check_resume_file, check_same_run, classes_of,
                                     continue_command, flag_text, keep_start, load_checkpoint, restore_ema,
                                     resume_path, run_identity, save_atomic, saved_flags, saved_records, weights_run)
    from pipeline.device import check_device
    from pipeline.errors import (ENVIRONMENT_ERRNOS, ArgumentParser, CheckpointError, ShardError, TinyinError,
                                 UsageError, at_least, hide_password, path_text, plural, positive_float, refused_open,
                                 run_cli, sigterm_interrupts, when_orphaned)
    from pipeline.augment import AUGMENTS
    from pipeline.mixing import MODES as MIX_MODES, mix_batch, mix_generator
    from pipeline.order import MoreRanksThanSamples, NoFullBatch, UnevenBatchesOfOne, check_even_batches, step_seed
    from pipeline.schema import DEFAULT_SHARDS, RUN_LOCK_FILE
    from pipeline.shardset import ShardSet, local_folder
    from pipeline.stream_plan import DEAL

NORMS = {"dataset": (None, None), "imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5,) * 3, (0.5,) * 3)}
FIELDS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "images_per_s", "epoch_time_s",
          "eval_model", "process_s"]  # eval_model: "ema" when --ema validated the average, else "model"; process_s:
# seconds from the start of the process that validated the epoch (PROCESS_START) to the validation's end
MIX_ALPHA = {"mixup": 0.2, "cutmix": 1.0}  # --mix-alpha defaults: the values the mixup and CutMix papers used on ImageNet
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # what schedulers send before preemption


# --- processes -----------------------------------------------------------------------------


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (metrics are kept as sums so the mean is exact)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def gather(obj) -> list:
    """`obj` from every rank, in rank order (a list of one outside DDP)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def errors_on_every_rank():
    """Under DDP, a user's mistake that some ranks find within the block (a TinyinError, or an OSError of the
    environment: what `run_cli` says in one line) ends every rank: those that found it with its line, the others
    with the first such rank's, named (collective: the block holds none, and every rank comes to its end). For what
    each rank finds for itself: its node's copy of the shards (missing, damaged), a --weights or --resume file not on
    its node. Only the ranks that found it stopped; the others went on into the next collective and ended there in
    gloo's traceback ('Connection closed by peer'), or waited on NCCL's."""
    try:
        yield
    except TinyinError as e:
        gather((e.exit_code, str(e)))
        raise
    except OSError as e:
        if e.errno in ENVIRONMENT_ERRNOS:  # (another is a bug's: its traceback, as before)
            gather((1, f"{e.strerror}: {e.filename}" if e.filename else e.strerror))
        raise
    found = [(r, error) for r, error in enumerate(gather("")) if error]  # (exit code, line), or '' for none
    if found:
        r, (code, text) = found[0]
        error = TinyinError(f"rank {r}: {text}")
        error.exit_code = code  # a UsageError's 2
        raise error


def process_start():
    """When this process started, on time.time()'s clock (Linux's /proc: importing torch alone takes
    seconds, which a time budget must count); elsewhere, now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


PROCESS_START = process_start()  # --time-budget counts from here

#: --time-budget decides --epochs after this many epochs: the first compiles (the step and the
#: evaluation), the second shows the steady epoch time.
BUDGET_AFTER_EPOCHS = 2


#: the share of --time-budget kept back from the plan: a machine's speed drifts after the choice
#: (on the 2-core VM, epochs after it ran 22-36% slower than the one it was priced at; a GPU
#: drifts far less), and a speedrun over its minutes has failed.
BUDGET_MARGIN = 0.05


def budget_epochs(budget_s, elapsed_s, epoch_s, test_s, done=BUDGET_AFTER_EPOCHS):
    """--time-budget's --epochs: the `done` epochs, plus as many more of `epoch_s` seconds each as
    fit in what `budget_s` (less `BUDGET_MARGIN`) leaves after `elapsed_s` and the final test
    (`test_s`); at least `done`."""
    return done + max(0, math.floor(((1 - BUDGET_MARGIN) * budget_s - elapsed_s - test_s) / epoch_s))


#: what torch's env:// rendezvous reads beside WORLD_SIZE to join the other processes: torchrun sets them (and
#: LOCAL_RANK, each process's GPU); a job script that starts train.py itself in torchrun's place must set them all
RENDEZVOUS_VARIABLES = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_number(name, low, high=None):
    """Environment variable `name` as a whole number from `low` to `high`; TinyinError, one line, otherwise."""
    text = os.environ[name]
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        where = f"of at least {low}" if high is None else f"from {low} to {high}"
        raise TinyinError(f"{name}={text} in the environment: must be a whole number {where}")
    return value


def launch_world_size():
    """The number of processes started for the run (WORLD_SIZE, torchrun's; 1 without one). TinyinError, one line,
    for an environment no run can start in, which a job script that sets the variables itself in torchrun's place
    (Slurm's srun, RANK from SLURM_PROCID) can give: a WORLD_SIZE of 0 (a ZeroDivisionError in the loader) or not a
    number (a ValueError), and under 2 or more a `RENDEZVOUS_VARIABLES` missing (torch's ValueError, a traceback) or a
    RANK outside 0..WORLD_SIZE-1 (the join waited 30 minutes for the rank 0 that never came)."""
    if "WORLD_SIZE" not in os.environ:
        return 1
    world_size = launch_number("WORLD_SIZE", 1)
    if world_size > 1:
        missing = [name for name in RENDEZVOUS_VARIABLES if not os.environ.get(name)]
        if missing:
            raise TinyinError(f"WORLD_SIZE={world_size} in the environment but not {', '.join(missing)} (the processes "
                              f"join each other by {', '.join(RENDEZVOUS_VARIABLES)}): start train.py with torchrun, "
                              "which sets them, or set them all")
        launch_number("RANK", 0, world_size - 1)
    return world_size


def launch_nodes(world_size):
    """The nodes the `world_size` processes run on: torchrun's agents, each of LOCAL_WORLD_SIZE processes (1 where
    that is not set, or does not divide them)."""
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    except ValueError:
        return 1
    return world_size // local if 0 < local < world_size and world_size % local == 0 else 1


def local_gpu():
    """This process's GPU under torchrun: the index LOCAL_RANK names. TinyinError, one line, where it names none: more
    processes on the node than it has GPUs (`torchrun --nproc_per_node 8` on a node of 4; torch's 'invalid device
    ordinal', a traceback), or no LOCAL_RANK set (a job script in torchrun's place: a KeyError)."""
    if not os.environ.get("LOCAL_RANK"):
        raise TinyinError("--device cuda on several processes, but no LOCAL_RANK in the environment: each process "
                          "takes the GPU of its LOCAL_RANK; start train.py with torchrun, which sets it, or set it")
    local, count = launch_number("LOCAL_RANK", 0), torch.cuda.device_count()
    if local >= count:
        raise TinyinError(f"LOCAL_RANK={local}: this node has {count} CUDA {plural(count, 'device')}, one per "
                          f"process; start at most {count} {plural(count, 'process')} on it "
                          f"(torchrun --nproc_per_node {count})")
    return local


@contextlib.contextmanager
def distributed(args):
    """Join torchrun's process group when launched by it; yields (device, world_size). The one
    place the group is torn down, however the run ends (finished, interrupted, or an error).
    The join waits for every rank (a node that starts late: minutes) in C++: main enters it
    within `stopped_at_once`."""
    world_size = launch_world_size()
    if world_size > 1:  # torchrun put RANK, LOCAL_RANK and MASTER_ADDR in the environment
        if args.device == "cuda":
            torch.cuda.set_device(local_gpu())
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device(args.device)
    together = False  # whether every rank is leaving here at once
    try:
        yield device, world_size
        together = True
    except SystemExit as e:  # Interrupted: every rank stops at the same wait for a batch (StopSignals)
        together = isinstance(e.code, int) and e.code >= 128
        raise
    finally:
        if dist.is_initialized():
            if together:
                # Why: on torch 2.11 a Gloo worker thread frees each finished collective's tensors,
                # which takes the GIL, and the group's destructor (run when the DDP reducer goes at
                # exit) joins that thread while holding the GIL: about 1 in 6 two-rank runs hung
                # there. The barrier ends the last collective on every rank and the sleep releases
                # the GIL, so the workers have freed everything before the group goes.
                dist.barrier()
                time.sleep(0.1)
            dist.destroy_process_group()


class StopSignals:
    """Turns SIGTERM, SIGINT and SIGUSR1 into a request to stop at the end of the current step.

    The handler only records the signal: the train loop polls `requested()` after each step,
    writes a checkpoint there and exits. Repeats are ignored rather than fatal, because torchrun
    forwards the signal the workers already received from the terminal or the scheduler.
    The wait for the next batch is cut short by a signal (`waited`): it has no step to finish.
    Under DDP the ranks agree after every such wait, of training, validation and the test, through
    an all-reduce (on a gloo group, so CUDA never syncs for it): all stop before the same step or
    batch, whichever rank the signal reached, and none waits in a collective the others left.
    """

    def __init__(self):
        self.signum = 0
        self.agreed = 0  # under DDP: the signal the ranks agreed on at the last wait (`waited`)
        self._previous = {}
        self._group = None
        self._waiting = False  # whether a signal now raises StopWaiting (`waited`)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread handle signals
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        if dist.is_initialized():
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signum = self.signum or signum
        if self._waiting:
            self._waiting = False  # once: a repeat must not cut short the cleanup that StopWaiting runs
            raise StopWaiting

    def waited(self, batches):
        """`batches`, where a signal (or one noted already) ends the wait for the next one with `StopWaiting`.
        On the stream path the wait is for a worker's shard read, which a slow or hung server can hold for
        minutes: the signal was only noted, for a stop after the step that batch would make. There is no step
        in progress during the wait (the last one's state is whole, as at a stop after a step), and the
        epoch's iterators end in their `finally` (the workers shut down).
        Under DDP every wait, for a batch or the end, ends in the ranks' agreement: a rank stopped in its wait
        takes part in it, and all raise `StopWaiting` together, before any of them starts the step (whose
        gradients the others would wait for) or leaves for the next collective."""
        batches, end = iter(batches), object()
        while True:
            try:
                self._waiting = bool(self._previous)  # handlers: the main thread's only
                if self._waiting and self.signum:
                    raise StopWaiting
                batch = next(batches, end)
                self._waiting = False  # in the `try`: a signal before it is this wait's StopWaiting
            except StopWaiting:
                if self._group is None:
                    raise
                batch = end  # the others learn of it in the agreement, which stops them all
            finally:
                self._waiting = False
            if self._group is not None and self._agree():
                raise StopWaiting
            if batch is end:
                return
            yield batch

    def request(self, signum):
        """Stop as if `signum` had arrived (--stop-after-steps: a deterministic stand-in for a scheduler)."""
        self._handle(signum, None)

    def requested(self) -> int:
        """The signal number to stop for, or 0 to go on; under DDP the one every rank agreed on at the last
        wait (`waited`), where they stop."""
        return self.signum if self._group is None else self.agreed

    def _agree(self) -> int:
        """The signal number every rank stops for, or 0 to go on (collective: an all-reduce MAX)."""
        flag = torch.tensor([self.signum])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        self.agreed = int(flag)
        return self.agreed


def stop_when_the_launcher_dies(every=0.5):
    """Under torchrun, send this process SIGTERM (`StopSignals`: the step finished, a checkpoint, exit 143) once
    torchrun is gone. torchrun starts each worker in a session of its own, where no signal to torchrun's group
    reaches: killed outright (kill -9, the OOM killer), it left its workers training on to the end, unseen, holding
    --output-dir's lock. A thread that polls the parent, as the shard build's workers do (`errors.when_orphaned`)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun's: a plain run may outlive its shell (nohup) on purpose
        return
    when_orphaned(os.getppid(), lambda: os.kill(os.getpid(), signal.SIGTERM), "tinyin-launcher", every)


class StopWaiting(KeyboardInterrupt):
    """A signal while the train loop waited for a batch (`StopSignals.waited`): raised as a Ctrl-C is, so that
    every `finally` on the way runs and no `except Exception` (torch's DataLoader, the stream's lanes) takes
    it for a failure of the read."""


class Interrupted(Exception):
    """Raised out of the train loop after the stop checkpoint is written; main exits with 128 + signum."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


# --- the run's state -----------------------------------------------------------------------


@dataclasses.dataclass
class RunState:
    """Everything about where a run is, beyond the model and optimiser: what a checkpoint holds.

    `epoch` is the epoch in progress (or the next one, at an epoch boundary) and `samples_done`
    the samples of it consumed over all ranks: with the (seed, epoch) order that is the data
    state. `sums` is this rank's partial (loss*n, correct, n) for the epoch's metrics row, so a
    resumed epoch reports exactly what an uninterrupted one would.
    """

    epoch: int = 0
    samples_done: int = 0
    step: int = 0  # optimiser steps of the whole run (--checkpoint-every counts these)
    epoch_steps: int = 0  # steps taken in `epoch` (--limit-batches counts these)
    train_seconds: float = 0.0  # training time of `epoch` spent before the last resume
    best_acc: float = 0.0
    history: list = dataclasses.field(default_factory=list)
    wall_time: float = 0.0  # train + val time of every finished epoch, across resumes
    sums: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))

    def next_epoch(self):
        """Move to the start of the next epoch."""
        self.epoch, self.samples_done, self.epoch_steps, self.train_seconds = self.epoch + 1, 0, 0, 0.0
        self.sums = torch.zeros_like(self.sums)

    def state_dict(self) -> dict:
        """Collective under DDP: every rank's partial sums and RNG state (a resume on the same
        number of ranks gives each rank its own back, which is what keeps it bit-identical)."""
        own = {k: getattr(self, k) for k in ("epoch", "samples_done", "step", "epoch_steps", "train_seconds",
                                             "best_acc", "history", "wall_time")}
        return dict(own, rank_sums=gather(self.sums.tolist()), rng=gather(rng_state()))

    @classmethod
    def from_state_dict(cls, saved, device, seed):
        """This rank's state from a checkpoint's `state`, on this run's number of ranks."""
        state = cls(**{k: saved[k] for k in ("epoch", "samples_done", "step", "epoch_steps", "train_seconds",
                                             "best_acc", "history", "wall_time")})
        r, world_size = rank(), dist.get_world_size() if dist.is_initialized() else 1
        if len(saved["rank_sums"]) == world_size:  # same ranks: each continues its own sums and RNG streams
            state.sums = torch.tensor(saved["rank_sums"][r], dtype=torch.float64)
            set_rng_state(saved["rng"][r], device)
        else:  # elastic: rank 0 carries the epoch's totals so far; RNG streams are new, from the step
            total = torch.tensor(saved["rank_sums"], dtype=torch.float64).sum(0)
            state.sums = total if r == 0 else torch.zeros(3, dtype=torch.float64)
            seed_everything(step_seed(seed, state.epoch, r, state.step))
        state.sums = state.sums.to(device)
        return state


def rng_state():
    return dict(torch=torch.get_rng_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


# --- data and model ------------------------------------------------------------------------


def autocast(device, args):
    """bf16 autocast: a CUDA-only speed-up here (CPU bf16 is slower than fp32 on most CPUs)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")


def open_shards(args):
    """The shard set, opened once (its manifest and index read once per run); ShardError (one line,
    exit 1) for a missing or foreign set. A URL's train/val/test splits are fetched into the node's
    cache first (one download per node, shared by its ranks), except on the stream path, which reads
    the URL itself."""
    if is_set_url(args.shards):
        if args.data_path == "stream":
            return ShardSet(args.shards)
        # Not StopSignals' stop after the step: the fetch has nothing to checkpoint and can take minutes that
        # no signal could cut short. A signal ends it at once (128 + the signal: 143, 130 for Ctrl-C, 138 for
        # SIGUSR1); the shards that arrived stay in the cache, and the next run goes on from them.
        with sigterm_interrupts(STOP_SIGNALS):
            return ShardSet(cached_copy(args.shards, ("train", "val", "test")))
    local_folder("--shards", args.shards, DEFAULT_SHARDS)
    return ShardSet(args.shards)


def load_data(args, device, world_size, shard_set):
    """Train/val/test loaders for the model's variant, resized on the device when --size asks."""
    info = models.model_input(args.arch)
    mean, std = (v if v is None else v[: info["channels"]] for v in NORMS[args.norm])  # grey: one channel
    common = dict(variant=info["variant"], size=None if args.size == info["native"] else args.size,
                  mean=mean, std=std, batch_size=args.batch_size, seed=args.seed, rank=rank(),
                  world_size=world_size, device=device, channels_last=args.channels_last, path=args.data_path)
    if args.workers is not None:  # only the stream path has workers (parse_args refuses -j otherwise)
        common["workers"] = args.workers
    # drop_last under DDP so every rank takes the same number of steps (DDP all-reduces each one), and
    # under --compile, where the epoch's last, smaller batch would compile the model again (a dynamic-shape
    # graph, tens of seconds on a GPU, then serving the full batches too).
    try:
        train = make_loader(shard_set, "train", shuffle=True, drop_last=world_size > 1 or args.compile,
                            augment=args.augment, with_keys=args.dump_keys, **common)
    except NoFullBatch:  # the loader's words name its arguments, not train.py's flags
        why = f"{world_size} ranks" if world_size > 1 else "--compile"
        held = shard_set.counts["train"] // world_size
        raise UsageError(f"-b {args.batch_size}: no whole batch to train on: each rank holds about "
                         f"{held} train {plural(held, 'image')}, and under {why} an epoch's "
                         f"last, partial batch is left out; use a smaller --batch-size") from None
    val, test = (make_loader(shard_set, split, shuffle=False, **common) for split in ("val", "test"))
    return train, val, test


def build_model(args, manifest):
    """The network, from scratch, torchvision's ImageNet weights, or --weights FILE; under --test-only the
    file's head must fit (another class count's is replaced by a fresh one, which scores chance), and a
    train.py checkpoint's classes must be the shards' (other classes' outputs are scored against other labels),
    its --size and --norm this run's. Resuming,
    from scratch: the checkpoint replaces every weight, so a resume (a preempted job requeued on an offline
    node) needs neither the ImageNet download nor the --weights file any more."""
    num_classes = len(manifest["classes"])
    if resume_path(args):
        return models.get_model(args.arch, num_classes)
    try:
        if not (args.test_only and args.weights):
            return models.get_model(args.arch, num_classes, pretrained=args.pretrained, weights=args.weights)
        model = models.get_model(args.arch, num_classes)
        dropped = models.load_weights_file(model, args.weights, models.model_spec(args.arch).head, arch=args.arch)
    except models.WeightsUnavailable as e:
        raise CheckpointError(str(e)) from None
    except FileNotFoundError:
        raise CheckpointError(f"--weights {args.weights}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"--weights {args.weights}: a folder, not a weights file") from None
    except Exception:  # noqa: BLE001 - torch.load of an arbitrary file raises nearly anything (KeyError, struct.error...)
        raise CheckpointError(f"--weights {args.weights}: {describe_weights(args.weights, args.arch)}") from None
    if dropped:
        raise CheckpointError(f"--weights {args.weights}: its head is not for these shards' "
                              f"{num_classes} {plural(num_classes, 'class')}, and "
                              "--test-only would evaluate a fresh one (chance level); train from it first")
    trained_on, size, norm = weights_run(args.weights)
    if trained_on not in (None, classes_of(manifest)):  # a plain state dict does not say
        raise CheckpointError(f"--weights {args.weights}: trained on {trained_on}, not these shards' "
                              f"{classes_of(manifest)}, and --test-only would score its outputs against other "
                              "labels; give the shards it was trained on")
    if size not in (None, args.size):  # 64 against 224 (as --resume refuses it): the figures of another input
        raise CheckpointError(f"--weights {args.weights}: trained at --size {size}, this run has --size {args.size}, "
                              f"and --test-only would score it on inputs of another size; give --size {size}")
    check_norm(norm, args, f"--weights {args.weights}")
    return model


def describe_weights(path, arch):
    """Why a weights file does not load, in a few words (the full key lists fill a screen)."""
    member = damaged_member(path)
    if member:
        return DAMAGED.format(member=member)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch.load raised, the file is not weights
        if why := refused_open(e):  # another user's file: no word against its bytes
            return f"cannot read ({why})"
        return f"not a weights file ({e.__class__.__name__})"  # torch's own error, not the model's wrapper
    run_args = saved.get("args") if isinstance(saved, dict) else None
    other = run_args.get("arch") if isinstance(run_args, dict) else None
    if other and other != arch:
        return f"holds {other} weights (a train.py checkpoint), not {arch}"
    return f"does not fit {arch} (other tensor names or shapes)"


def per_step_schedule(args):
    """Whether the lr changes every step rather than once an epoch (--lr-per, which `parse_args` fills in)."""
    return args.lr_per == "step"


def lr_factor(args, steps_per_epoch):
    """The lr multiplier in closed form of the scheduler's counter, so a resumed run may extend
    --epochs exactly: of the epoch for the per-epoch schedules, of the run's step otherwise.

    Per step: a linear warm-up over the first round(warmup_epochs * steps_per_epoch) steps (from
    1/warm to 1), then cosine or onecycle's linear decay over the remaining steps (to 0 after the
    last one), step's decay every --lr-step-size epochs counted from the warm-up's end (as
    torchvision's references chain them: SequentialLR, milestones=[warmup]), or none's constant.
    """
    if not per_step_schedule(args):
        if args.lr_scheduler == "step":
            return lambda epoch: args.lr_gamma ** (epoch // args.lr_step_size)
        if args.lr_scheduler == "cosine":
            return lambda epoch: 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
        return lambda epoch: 1.0
    warm, total = round(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(total - warm, 1)  # 0 at the warm-up's end, 1 after the last step
        if args.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if args.lr_scheduler == "onecycle":
            return 1 - progress
        if args.lr_scheduler == "step":
            # from the warm-up's end, like cosine's progress: counted from epoch 0, the decays that fell in
            # the warm-up all came at once after it (warm-up 2, step size 1: the peak lr for one step, then 1%)
            return args.lr_gamma ** ((step - warm) // (steps_per_epoch * args.lr_step_size))
        return 1.0
    return factor


def make_scheduler(optimizer, args, steps_per_epoch, last_epoch=-1):
    """LambdaLR over `lr_factor`; `last_epoch` is the counter's last value (an epoch, or a step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args, steps_per_epoch), last_epoch=last_epoch)


def schedule_position(state, args, steps_per_epoch, world_size):
    """The counter a schedule restarts from: the epoch in progress, or for a per-step schedule the
    step it is at. That is the run's global step on the same number of ranks; on another (an
    elastic resume: a step holds another number of samples) it is the epoch's samples so far in
    this run's steps, so the schedule keeps its epochs (the rest of that epoch may take a step more
    or fewer: `finish_epoch` puts the counter back on the epoch's end)."""
    if not per_step_schedule(args):
        return state.epoch
    done = -(-state.samples_done // (args.batch_size * world_size))
    return state.epoch * steps_per_epoch + min(done, steps_per_epoch)


@dataclasses.dataclass
class Parts:
    """The live objects of a run (what is built, not what is saved: that is RunState)."""

    model: nn.Module  # what is called: DDP- and/or compile-wrapped
    module: nn.Module  # the bare network: what is saved and loaded
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    train: object
    val: object
    test: object
    identity: dict  # what makes a checkpoint this run's (see run_identity)
    device: torch.device
    world_size: int
    steps_per_epoch: int  # of a whole epoch on this run's ranks (at most --limit-batches): the per-step schedule's unit
    shard_counts: list  # the train shards' samples, in order: the stream path's epoch plan follows them
    ema: AveragedModel = None  # --ema: the average (saved and loaded with the model)
    eval_model: nn.Module = None  # what validation and test call: the EMA's network with --ema, else `model`
    lr_scheduler: object = None


def rank_ordered_mean(received, bucket):
    """A DDP comm hook (CPU, 3 or more ranks): the mean of the ranks' gradients, summed in rank order.

    Why: DDP lays its gradient buckets out anew after its first step, and gloo's ring allreduce sums
    each element in an order set by where it falls in its bucket. A resumed run's first step summed
    some gradients in another order than the same step of the uninterrupted run (which had the new
    layout by then): on 3 ranks the weights differed in their last bits, on every data path, where a
    resume on the same ranks is otherwise bit-identical. (2 ranks: a + b = b + a, DDP's own is exact.)
    The cost, measured here for ResNet-18's 45 MB of gradients on 3 ranks: ~2x the allreduce's time
    (a gather receives (ranks - 1) x the gradients, the ring 2 (ranks - 1) / ranks x). On CUDA a
    resume matches to float rounding anyway (cudnn.benchmark), so NCCL runs DDP's own allreduce.
    received: {(bucket, size): the buffers the ranks' gradients are gathered into}, reused every step.
    """
    grads = bucket.buffer()
    ranks = dist.get_world_size()
    key = (bucket.index(), grads.numel())
    if key not in received:
        received[key] = [torch.empty_like(grads) for _ in range(ranks)]
    parts = received[key]

    def mean(_):
        grads.copy_(parts[0])
        for part in parts[1:]:
            grads.add_(part)
        return grads.div_(ranks)

    return dist.all_gather(parts, grads, async_op=True).get_future().then(mean)


def check_same_set(manifest, args):
    """ShardError on every rank unless all ranks opened the same shard set, told by its shards' sha256 (a build is
    byte for byte the same on every machine). Each node reads its own --shards: a node holding another build (a
    stale copy, the release fetched or synthesised again) trained its ranks on that set's samples at their positions
    of the epoch order, and validated on its val split, without a word; with other counts, gloo aborted a collective."""
    sets = gather(hashlib.sha256(" ".join(e["sha256"] for e in manifest["shards"]).encode()).hexdigest())
    differs = [r for r, other in enumerate(sets) if other != sets[0]]
    if differs:
        raise ShardError(f"--shards {args.shards}: rank {differs[0]} opened another shard set than rank 0 (other "
                         "shards, by their sha256); every node must read the same set")


def check_eval_batches(manifest, args, world_size):
    """UsageError unless every rank takes as many val and test batches as the others (every image is scored:
    no drop_last), which the loader refuses otherwise (`order.check_even_batches`), in its own words: a
    ValueError's traceback here. Before any model is built: with more ranks than images a rank had no batch."""
    for split in ("val", "test"):
        count = manifest["counts"].get(split, 0)
        try:
            check_even_batches(count, world_size, args.batch_size)
        except MoreRanksThanSamples:
            raise UsageError(f"{world_size} ranks: the {split} split holds {count} {plural(count, 'image')}, too "
                             "few for a batch on every rank (DDP would wait on a rank without one for good); run "
                             f"on at most {count} {plural(count, 'rank')}") from None
        except UnevenBatchesOfOne:
            raise UsageError(f"-b 1 on {world_size} ranks: the {split} split's {count} images leave some ranks a "
                             "batch fewer than the others (DDP would wait on them for good); use -b 2 or more") from None


def build(args, device, world_size, shard_set=None):
    """Model, optimiser and loaders for this rank, from `shard_set` (`open_shards`' by default); the lr schedule
    comes with the state (`restore`)."""
    shard_set = open_shards(args) if shard_set is None else shard_set
    manifest = shard_set.manifest
    check_eval_batches(manifest, args, world_size)
    seed_everything(args.seed)  # the same initial weights on every rank
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with errors_on_every_rank():  # a --weights file not on every node
        module = build_model(args, manifest)
    torch.manual_seed(args.seed + rank())  # but different dropout masks
    module.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    model = module
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if device.type == "cpu" and world_size > 2:
            model.register_comm_hook({}, rank_ordered_mean)
    if args.compile:
        model = torch.compile(model)
    ema = make_ema(module, args)
    eval_model = model if ema is None else torch.compile(ema.module) if args.compile else ema.module
    optimizer = torch.optim.SGD(module.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd,
                                nesterov=args.nesterov)
    train, val, test = load_data(args, device, world_size, shard_set)
    steps_per_epoch = min(len(train), args.limit_batches or len(train))
    return Parts(model, module, nn.CrossEntropyLoss(label_smoothing=args.label_smoothing), optimizer,
                 train, val, test, run_identity(args, manifest), device, world_size, steps_per_epoch,
                 [e["count"] for e in shard_set.entries("train")], ema, eval_model)


def make_ema(module, args):
    """--ema: an AveragedModel of `module` (a copy on its device), or None without --ema.

    use_buffers=True averages the BatchNorm statistics along with the weights, so the average is
    ready to evaluate (no pass over the data to recompute them). Updated every --ema-every steps
    with decay**every, so the average spans the same number of steps whatever the interval.
    """
    if not args.ema:
        return None
    return AveragedModel(module, multi_avg_fn=ema_with_warmup(args.ema ** args.ema_every), use_buffers=True)


def ema_with_warmup(decay):
    """AveragedModel's update for an EMA whose decay warms up: min(decay, (1 + n) / (10 + n)) at the
    n-th update, as TensorFlow's ExponentialMovingAverage(num_updates=n) does. Without it a short run
    (a few hundred steps: the CPU, a 10-class subset) evaluates little more than its initial weights,
    which decay 0.999 takes thousands of updates to forget. The decay is computed on the device;
    AveragedModel itself reads its count on the host, one sync per update (every --ema-every steps)."""

    @torch.no_grad()
    def update(averaged, current, n):
        floating = averaged[0].is_floating_point()
        d = torch.clamp((1 + n) / (10 + n), max=decay).to(averaged[0].dtype if floating else torch.float32)
        if floating:
            torch._foreach_lerp_(averaged, current, [1 - d] * len(averaged))
        else:  # integer buffers (BatchNorm's num_batches_tracked): lerp takes floats only
            for a, c in zip(averaged, current, strict=True):
                a.copy_(a * d + c * (1 - d))

    return update


def sync_ema_buffers(parts):
    """Under DDP, give every rank rank 0's EMA BatchNorm statistics before they are used.

    The weights are the same on every rank (DDP), their averages too; the statistics are not: each
    rank's BatchNorm updates its own between DDP's broadcasts, and so does each rank's average.
    Only rank 0's is saved, so evaluating with rank 0's on every rank keeps a resumed DDP run's
    metrics those of the uninterrupted run (the other ranks' own are never read).
    """
    if parts.ema is not None and dist.is_initialized():
        for buffer in parts.ema.module.buffers():
            dist.broadcast(buffer, 0)


# --- checkpoints ---------------------------------------------------------------------------


def save_checkpoint(parts, state, args, paths):
    """Write the checkpoint to each of `paths` (rank 0; collective under DDP: gathers every rank's state)."""
    ckpt = dict(format=CHECKPOINT_FORMAT, model=parts.module.state_dict(), optimizer=parts.optimizer.state_dict(),
                lr_scheduler=parts.lr_scheduler.state_dict(), args=saved_args(args), identity=parts.identity,
                world_size=parts.world_size, batch_size=args.batch_size, state=state.state_dict(), stream_deal=DEAL,
                stream_counts=parts.shard_counts)
    if parts.ema is not None:
        ckpt["ema"] = parts.ema.state_dict()  # the average and its update count (rank 0's: see sync_ema_buffers)
    if rank() == 0:
        for path in paths:
            save_atomic(ckpt, path)


def restore(parts, args, ckpt_path, notes=()):
    """The run state to start from: a fresh one, or the checkpoint's (model, EMA, optimiser, RNG, data
    position), with the lr schedule rebuilt for this run's --epochs (cosine's length may change). `notes`:
    `keep_run_flags`', said after the line that names the checkpoint."""
    state = RunState()
    state.sums = state.sums.to(parts.device)
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path, parts.identity)
        if args.time_budget and ckpt["args"].get("budget_epochs"):  # decided before the stop: keep it
            args.epochs = args.budget_epochs = ckpt["args"]["budget_epochs"]
        state = RunState.from_state_dict(ckpt["state"], parts.device, args.seed)
        if args.time_budget and not args.budget_epochs and state.epoch >= BUDGET_AFTER_EPOCHS and not args.test_only:
            # the choice comes at the end of epoch 2: it would never be made, the budget silently unused
            raise UsageError(f"--time-budget: {ckpt_path} is at epoch {state.epoch}, past the choice of --epochs "
                             f"(made after {BUDGET_AFTER_EPOCHS} epochs); resume it with --epochs N instead")
        check_epoch_order(ckpt, state, args, parts.world_size, ckpt_path, parts.shard_counts)
        check_limit_batches(ckpt["args"].get("limit_batches"), args, ckpt_path)
        check_recipe(ckpt["args"], args, ckpt_path)  # before the norm: its advice alone resumed without the recipe
        check_norm(ckpt["args"].get("norm"), args, ckpt_path)
        check_plan(ckpt["args"], args, ckpt_path, get_args_parser())
        start_note = keep_start(ckpt["args"], args, get_args_parser()) if not args.test_only else ""
        if not args.test_only and (state.epoch > args.epochs or (state.epoch == args.epochs and state.samples_done)):
            least = state.epoch + bool(state.samples_done)  # at an epoch's end, that epoch count itself
            raise UsageError(f"--epochs {args.epochs}: {ckpt_path} is past it (at epoch {state.epoch} step "
                             f"{state.epoch_steps}); resume with --epochs {least} or more")
        parts.module.load_state_dict(ckpt["model"])
        restore_ema(parts, ckpt, ckpt_path, args)
        parts.optimizer.load_state_dict(ckpt["optimizer"])
        if rank() == 0:
            where = f"epoch {state.epoch} step {state.epoch_steps}" if state.samples_done else f"the start of epoch {state.epoch}"
            if args.test_only:
                print(f"evaluating {ckpt_path}, saved at {where}")
            else:
                print(f"resumed from {ckpt_path} at {where} ({state.samples_done} "
                      f"{plural(state.samples_done, 'sample')} "
                      f"of it done, {ckpt['world_size']} -> {parts.world_size} {plural(parts.world_size, 'rank')})")
                for note in (start_note, *notes):
                    if note:
                        print(f"note: {note}", file=sys.stderr)
    position = schedule_position(state, args, parts.steps_per_epoch, parts.world_size)
    parts.lr_scheduler = make_scheduler(parts.optimizer, args, parts.steps_per_epoch, last_epoch=position - 1)
    return state


def resume_flags(ckpt_path, args, manifest):
    """`keep_run_flags` of the checkpoint at `ckpt_path`, once it is known to be this run's (`manifest`: the shards'):
    a checkpoint of another run kept its -b first, and a run of -b 64 resumed on a set of 16 images under --compile
    was told '-b 64: no whole batch to train on', a flag never given, for a checkpoint of another dataset."""
    identity, saved_args = saved_records(ckpt_path, "identity", "args")
    if identity is not None:  # (a file without one is no train.py checkpoint: `load_checkpoint` says so)
        check_same_run(ckpt_path, identity, run_identity(args, manifest))
    return keep_run_flags(saved_args or {}, args)


def keep_run_flags(saved_args, args):
    """Set the flags a training resume's command leaves out to its run's own (`saved_args`: the checkpoint's),
    --epochs (`keep_epochs`) and -b, before the loaders are built; returns {dest: the note to print} for
    those whose run's value differs from what the command alone would have run."""
    kept = dict(epochs=keep_epochs(saved_args, args), batch_size=keep_flag(saved_args, args, "batch_size", "-b"))
    return {dest: note for dest, note in kept.items() if note}


def keep_flag(saved_args, args, dest, flag):
    """Set args.`dest` to its run's value (`saved_args`'), unless the resume's command gives `flag` (or trains
    nothing): train.py's default, or its recipe's, is not the run's. A run of -b 64 resumed with `--resume auto`
    trained on at 128, with the same lr (a mid-epoch stream checkpoint was refused: 'resume it with -b 64').
    Returns the note to print when the two differ ('' when they do not)."""
    saved = saved_args.get(dest)
    if args.test_only or saved is None or saved == getattr(args, dest) or dest in given_flags(args.argv):
        return ""
    default = getattr(args, dest)
    setattr(args, dest, saved)
    return f"{flag} {saved} kept from the run (not {default})"


def keep_epochs(saved_args, args):
    """A training resume without --epochs goes on to its run's own (`keep_flag`), not to train.py's default or its
    recipe's: a run of --epochs 2 resumed with `--resume auto` trained on to 30, its final.json removed. Another
    --recipe's epochs still apply (paper's 10-epoch run goes on to 50 under paper-50). Returns the note to print
    when the run's differ from what the command alone would have run ('' when they do not)."""
    if args.recipe != saved_args.get("recipe") or (args.time_budget and saved_args.get("budget_epochs")):
        return ""  # (a --time-budget's choice is kept as such, without a note)
    note = keep_flag(saved_args, args, "epochs", "--epochs")
    return note and f"{note}; give --epochs N to train it further"


def check_same_start(state, ckpt_path, args):
    """CheckpointError on every rank unless all ranks start from the same checkpoint step. Each rank
    finds --resume's file itself: where the nodes do not share --output-dir, `--resume auto` resumed
    rank 0 and started the other node's ranks afresh, one DDP training two different models (rank 0's
    saved) until their step counts parted and a collective hung."""
    starts = gather((state.epoch, state.epoch_steps, state.step) if ckpt_path else None)
    differs = [r for r, start in enumerate(starts) if start != starts[0]]
    if differs:
        said = lambda r: "found no checkpoint" if starts[r] is None else f"resumes epoch {starts[r][0]} step {starts[r][1]}"  # noqa: E731
        raise CheckpointError(f"--resume {args.resume}: rank 0 {said(0)}, rank {differs[0]} {said(differs[0])} "
                              f"(--output-dir {args.output_dir}): every node must read the same checkpoint, "
                              "from an --output-dir they share")


# --- training ------------------------------------------------------------------------------


def train_one_epoch(parts, state, args, stop, after_step, keys=None):
    """Train `state.epoch` from `state.samples_done` on: the rest of the epoch, or until
    `after_step()` says stop or `stop` ends the wait for a batch (`StopSignals.waited`). Updates
    `state` after every step; returns True if the epoch finished."""
    model, loader, device = parts.model, parts.train, parts.device
    model.train()
    loader.set_epoch(state.epoch, start=state.samples_done)
    left = None if args.limit_batches is None else max(args.limit_batches - state.epoch_steps, 0)
    bar = tqdm(itertools.islice(loader, left), desc=f"epoch {state.epoch}", initial=state.epoch_steps,
               total=state.epoch_steps + min(len(loader), left if left is not None else len(loader)),
               disable=True if rank() else None, leave=False)
    per_step = per_step_schedule(args)
    for batch in stop.waited(bar):
        images, target = batch[0], batch[1]
        if keys is not None:
            keys.extend(batch[2])
        images, target, target_b, lam = mix(images, target, state, args)
        with autocast(device, args):
            output = model(images)
            loss = parts.criterion(output, target)
            if lam != 1.0:
                loss = lam * loss + (1 - lam) * parts.criterion(output, target_b)
        parts.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parts.optimizer.step()
        if per_step:
            parts.lr_scheduler.step()
        n = target.numel()
        state.sums[0] += loss.detach() * n  # loss*n, correct, n: no per-step sync
        state.sums[1] += (output.argmax(1) == target).sum()  # under --mix: against target_a, the image's own label
        state.sums[2] += n
        # Under DDP every rank's batch is full (drop_last), so the global count is n * ranks.
        state.samples_done += n * parts.world_size
        state.step += 1
        state.epoch_steps += 1
        if parts.ema is not None and state.step % args.ema_every == 0:
            parts.ema.update_parameters(parts.module)
        if state.epoch_steps % 20 == 0 and not bar.disable:  # .item() syncs with the GPU: only now and then
            bar.set_postfix(loss=f"{state.sums[0].item() / state.sums[2].item():.3f}")
        if after_step():
            return False
    return True


def mix(images, target, state, args):
    """--mix: (images, target_a, target_b, lam) of this step's mixed batch, drawn for (seed, epoch,
    rank, step) so a resume mixes what the uninterrupted run did; without --mix the batch itself, lam 1."""
    if args.mix == "none":
        return images, target, target, 1.0
    generator = mix_generator(args.seed, state.epoch, rank(), state.epoch_steps)
    return mix_batch(images, target, args.mix, args.mix_alpha, generator, prob=args.mix_prob)


def predict(model, images, args):
    """The model's logits, or with --tta the mean of the logits of the image and its mirror image.

    Logits, not probabilities, are averaged: the loss stays the criterion's on logits, the top-k
    ranking is practically the same, and it costs no softmax per view. In fp32, so bf16's
    rounding does not decide ties between the views.
    """
    if not args.tta:
        return model(images)
    return (model(images).float() + model(images.flip(3)).float()) / 2


def pad_batch(images, size):
    """`images` followed by zero images up to `size`, in the same memory format. A compiled model
    evaluates a split's last, smaller batch with the graph it has, not a new one; in eval mode one
    image's output does not depend on the others'."""
    padded = torch.zeros_like(images[:1]).expand(size, *images.shape[1:]).clone(memory_format=torch.preserve_format)
    padded[: len(images)] = images
    return padded


@torch.no_grad()  # not inference_mode: the loader's gather thread writes into buffers made here
def evaluate(model, criterion, loader, device, args, stop=None):
    """Loss, top-1 and top-5 (%) over the whole split, summed across ranks (on the device: one
    read-back at the end, so evaluation never waits on the GPU batch by batch). With `stop`
    (StopSignals), a signal ends it at the wait for its next batch (`StopSignals.waited`)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, top1, top5, n
    batches = itertools.islice(loader, args.limit_batches)
    for images, target in batches if stop is None else stop.waited(batches):
        if args.compile and len(images) < loader.batch_size:
            images = pad_batch(images, loader.batch_size)
        with autocast(device, args):
            output = predict(model, images, args)[: len(target)]
        hits = output.topk(min(5, output.shape[1]), dim=1).indices == target[:, None]  # (B, k), ranked
        n = target.numel()
        sums[0] += criterion(output.float(), target) * n
        sums[1] += hits[:, 0].sum()
        sums[2] += hits.any(1).sum()
        sums[3] += n
    loss_sum, top1, top5, n = reduce_sum(sums).tolist()
    return dict(loss=loss_sum / n, top1=100 * top1 / n, top5=100 * top5 / n)


def finish_epoch(parts, state, args, stop):
    """Validate, record the epoch's metrics row, and move `state` to the next epoch; returns (row, is_best).
    StopWaiting (`StopSignals.waited`) when a signal ends the validation, with `state` as it was."""
    t0 = time.time()
    loss_sum, correct, n = reduce_sum(state.sums.clone()).tolist()
    sync_ema_buffers(parts)
    val = evaluate(parts.eval_model, parts.criterion, parts.val, parts.device, args, stop)
    train_seconds, now = state.train_seconds, time.time()
    epoch_time = train_seconds + (now - t0)
    end = (state.epoch + 1) * parts.steps_per_epoch
    if per_step_schedule(args) and parts.lr_scheduler.last_epoch != end:
        # A mid-epoch resume on another number of ranks or another -b took the epoch's rest in other steps
        # than `schedule_position` counted: without this the schedule stayed shifted for the rest of the run.
        parts.lr_scheduler = make_scheduler(parts.optimizer, args, parts.steps_per_epoch, last_epoch=end - 1)
    # lr: the epoch's for a per-epoch schedule; a per-step one's at the epoch's end
    row = dict(epoch=state.epoch, lr=parts.optimizer.param_groups[0]["lr"], train_loss=loss_sum / n,
               train_top1=100 * correct / n, val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"],
               images_per_s=n / train_seconds, epoch_time_s=epoch_time, eval_model=eval_model_name(parts),
               process_s=now - PROCESS_START)
    if not per_step_schedule(args):
        with warnings.catch_warnings():
            # A resume from the epoch's checkpoint before validation steps no optimiser in
            # this process: torch warned of a first lr skipped, which a schedule rebuilt at its position is not.
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
            parts.lr_scheduler.step()
    is_best = not state.history or val["top1"] > state.best_acc
    state.history.append(row)
    state.wall_time += epoch_time
    state.best_acc = max(state.best_acc, val["top1"])
    state.next_epoch()
    return row, is_best


# --- files ---------------------------------------------------------------------------------


def write_metrics(out, history, append=None):
    """Rewrite metrics.jsonl/.csv from `history`, or append one row to them."""
    rows, mode = ([append], "a") if append else (history, "w")
    with open(os.path.join(out, "metrics.jsonl"), mode) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(out, "metrics.csv"), mode, newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        if mode == "w":
            w.writeheader()
        w.writerows(rows)


def write_keys(out, epoch, keys):
    """--dump-keys: append what this rank trained on since the last checkpoint to keys-rank{r}.txt.
    Flushed only where a checkpoint is written, so the file matches the checkpointed run exactly."""
    if keys:
        with open(os.path.join(out, f"keys-rank{rank()}.txt"), "a") as f:
            f.writelines(f"{epoch} {k}\n" for k in keys)
        keys.clear()


def environment(device, world_size, dataset):
    """What the numbers were measured on, and how the run was started (env.json). `dataset`: the run
    identity's (classes and train count), so a report can tell a run on the full release from others."""
    return dict(provenance.environment(device), world_size=world_size, dataset=dataset,
                argv=[hide_password(a) for a in sys.argv],
                time=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))


def saved_args(args):
    """The flags as args.json and the checkpoint keep them, a --shards URL's password and token hidden (in `shards` and
    `argv`): run folders are shared and published, and the identity a resume checks comes from the set."""
    hidden = lambda v: [hide_password(a) for a in v] if isinstance(v, list) else hide_password(v) if isinstance(v, str) else v  # noqa: E731
    return {k: hidden(v) for k, v in vars(args).items()}


def write_args(out, args):
    """args.json: the run's flags (rewritten when --time-budget chooses --epochs)."""
    write_json(os.path.join(out, "args.json"), saved_args(args), indent=2)


def write_run_files(out, args, device, world_size, history, dataset):
    """args.json, env.json, and metrics files rewritten from `history` (a resumed run drops rows past its checkpoint)."""
    write_args(out, args)
    write_json(os.path.join(out, "env.json"), environment(device, world_size, dataset), indent=2)
    write_metrics(out, history)


# --- main ----------------------------------------------------------------------------------


def eval_model_name(parts):
    """What validation and test evaluate, for the metrics: "ema" (--ema) or "model"."""
    return "model" if parts.ema is None else "ema"


def test_only(parts, args, path):
    """--test-only: evaluate val and test (the EMA with --ema), write eval.json: the figures, the file they are
    of (`path`), and what was evaluated, as final.json says it (--ema's average or the model, --tta or not), and
    over how many batches of each split (--limit-batches; None: every batch)."""
    sync_ema_buffers(parts)
    result = {split: evaluate(parts.eval_model, parts.criterion, loader, parts.device, args)
              for split, loader in (("val", parts.val), ("test", parts.test))}
    # the file's: an --ema run's is its average, with --ema or without; --ema on another file's evaluates a copy
    # of its weights (for a --resume, `restore_ema`)
    averaged = saved_records(path, "ema")[0] is not None
    # limit_batches: a look at a few batches of each split read as an evaluation of all of it
    result.update(weights=path, eval_model="ema" if averaged else "model", tta=args.tta, limit_batches=args.limit_batches)
    if rank() == 0:
        print(json.dumps(result))
        write_json(os.path.join(args.output_dir, "eval.json"), result, indent=2)
    return result


#: what --test-only may evaluate otherwise than the run did, the figures of the same weights then not its own:
#: --tta (top-1, top-5 and the loss) and --label-smoothing (the loss)
EVAL_FLAGS = ("tta", "label_smoothing")


def evaluation_note(path, args):
    """The note for a --test-only of a train.py checkpoint (`path`) whose run validated and tested with other
    `EVAL_FLAGS` than this evaluation ('' otherwise, and for a file that does not say): eval.json's figures
    for its final.json's weights differed from the run's without a word (a --tta run's 25% test top-1: 30%)."""
    run_args = saved_records(path, "args")[0]
    if run_args is None:
        return ""
    saved = saved_flags(run_args, EVAL_FLAGS, get_args_parser())
    differ = [k for k in EVAL_FLAGS if saved[k] != getattr(args, k)]
    if not differ:
        return ""
    said = lambda values: " ".join(flag_text(k, values[k]) for k in differ)  # noqa: E731
    return (f"{path}: its run validated and tested with {said(saved)}, this evaluation has {said(vars(args))}, and "
            f"its figures are not the run's; give {said(saved)} for those")


def train(parts, state, args, stop):
    """Epochs from `state` to --epochs, checkpointing at each epoch's end, every --checkpoint-every
    steps, and when `stop` reports a signal (then raises Interrupted)."""
    out, main_rank = args.output_dir, rank() == 0
    ckpt_path = os.path.join(out, "checkpoint.pth")
    keys = [] if args.dump_keys else None
    clock = dict(t0=time.time(), before=state.train_seconds)  # this epoch's training time, across resumes
    saved = {}  # (epoch, step) of the last checkpoint written

    def tick():
        if parts.device.type == "cuda":
            torch.cuda.synchronize(parts.device)  # the steps queued so far are this epoch's time, not validation's
        state.train_seconds = clock["before"] + time.time() - clock["t0"]

    def checkpoint(*extra):
        # best.pth before checkpoint.pth: a run killed between the two resumes before the epoch and writes
        # best.pth again, where one resumed after it counted the epoch best and never wrote its weights.
        save_checkpoint(parts, state, args, [*extra, ckpt_path])
        saved.update(at=(state.epoch, state.step))
        if keys is not None:
            write_keys(out, state.epoch if state.samples_done else state.epoch - 1, keys)

    def after_step():
        if args.stop_after_steps == state.step:
            stop.request(signal.SIGUSR1)
        if args.wait_at_step == state.step:  # debug: a test sends a real signal to a run known to be mid-epoch
            print(f"waiting for a signal at epoch {state.epoch} step {state.epoch_steps}", flush=True)
            while not stop.signum:
                time.sleep(0.01)
        if stop.requested():
            return True
        if args.checkpoint_every and state.step % args.checkpoint_every == 0:
            tick()
            checkpoint()
        return False

    if state.step == 0 and state.samples_done == 0:
        checkpoint()  # the untrained state: a run stopped before its first checkpoint is resumable too
    # --time-budget: what earlier processes spent (their finished epochs, and their training of the epoch resumed,
    # which this one's clock misses: its epoch time counts it); a save's time
    earlier_s, checkpoint_s = state.wall_time + state.train_seconds, 0.0
    while state.epoch < args.epochs:
        clock.update(t0=time.time(), before=state.train_seconds)
        try:
            finished = train_one_epoch(parts, state, args, stop, after_step, keys)
        except StopWaiting:  # a signal while the epoch waited for a batch: the last step's state is whole
            finished = False
        tick()
        if not finished or stop.requested():  # a signal during the epoch, or during its last step
            if saved.get("at") != (state.epoch, state.step):  # under DDP the stop comes at the wait after the step,
                checkpoint()  # where --checkpoint-every or the untrained state's checkpoint may have just been written
            raise Interrupted(stop.requested())
        train_s = state.train_seconds
        t0 = time.time()
        if not (args.checkpoint_every and state.step % args.checkpoint_every == 0):
            # The epoch's training, before its validation: a failure there (on the stream path the val shards
            # read again, over the network from a URL: a server gone, a shard unreadable) or a kill -9 (the OOM
            # killer; a scheduler's SIGKILL after its SIGTERM's grace, shorter than a CPU run's validation)
            # lost the whole epoch's training. A resume from here trains no more and validates. The cost, a
            # second save an epoch, was 27-72 ms (mostly its fsync) on a small CPU run's 5-9 s epochs; a
            # 135 MB resnet18_64 checkpoint (momenta, EMA) took 0.3-0.8 s here. --time-budget counts it.
            checkpoint()
        before_val_s = time.time() - t0
        try:
            row, is_best = finish_epoch(parts, state, args, stop)
        except StopWaiting:  # the checkpoint just written is the stop checkpoint: a resume from it validates
            raise Interrupted(stop.requested()) from None
        if main_rank:
            print(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} top1 {row['train_top1']:.2f} | "
                  f"val loss {row['val_loss']:.4f} top1 {row['val_top1']:.2f} top5 {row['val_top5']:.2f} | "
                  f"{row['images_per_s']:.0f} img/s {row['epoch_time_s']:.1f} s")
            write_metrics(out, state.history, append=row)
        if args.time_budget and not args.budget_epochs and state.epoch == BUDGET_AFTER_EPOCHS:
            # before the epoch's checkpoint, so that a resume keeps the choice
            choose_budget_epochs(parts, state, args, time.time() - PROCESS_START + earlier_s,
                                 row["epoch_time_s"] + before_val_s + checkpoint_s, row["epoch_time_s"] - train_s)
        t0 = time.time()
        checkpoint(*([os.path.join(out, "best.pth")] if is_best else []))
        checkpoint_s = time.time() - t0
        if stop.requested():  # arrived during validation: the epoch's checkpoint is the stop checkpoint
            raise Interrupted(stop.requested())


def choose_budget_epochs(parts, state, args, elapsed_s, epoch_s, val_s):
    """--time-budget's choice (`budget_epochs`), made once: sets --epochs and args.budget_epochs
    (which the checkpoint and args.json keep) and rebuilds the lr schedule for it. The test is
    priced as one more validation (TTA included); every rank takes rank 0's choice, since their
    clocks differ."""
    epochs = gather(budget_epochs(60 * args.time_budget, elapsed_s, epoch_s, val_s))[0]
    args.epochs = args.budget_epochs = epochs
    position = schedule_position(state, args, parts.steps_per_epoch, parts.world_size)
    parts.lr_scheduler = make_scheduler(parts.optimizer, args, parts.steps_per_epoch, last_epoch=position - 1)
    if rank() == 0:
        print(f"--time-budget {args.time_budget:g} min: {elapsed_s:.1f} s so far, an epoch {epoch_s:.1f} s, "
              f"the test ~{val_s:.1f} s: --epochs {epochs}", flush=True)
        # parse_args refuses --warmup-epochs at or past --epochs; a choice can land there after the fact
        if epochs < args.warmup_epochs or (epochs == args.warmup_epochs and args.lr_scheduler != "none"):
            print(f"note: --time-budget {args.time_budget:g} min holds {epochs} "
                  f"{plural(epochs, 'epoch')}, no more than --warmup-epochs "
                  f"{args.warmup_epochs:g}: the run ends in its warm-up, the lr never decays (give fewer warm-up "
                  "epochs or more minutes)", file=sys.stderr, flush=True)
        write_args(args.output_dir, args)


def final_test(parts, state, args, stop=None):
    """Test-split accuracy of the final model (its EMA with --ema); final.json. Interrupted when a signal
    ends the test (`StopSignals.waited`): the last epoch's checkpoint is the stop checkpoint, and a resume
    from it tests."""
    sync_ema_buffers(parts)
    try:
        test = evaluate(parts.eval_model, parts.criterion, parts.test, parts.device, args, stop)
    except StopWaiting:
        raise Interrupted(stop.requested()) from None
    last = state.history[-1] if state.history else {}
    final = dict(arch=args.arch, size=args.size, epochs=len(state.history), test_top1=test["top1"],
                 test_top5=test["top5"], test_loss=test["loss"], train_top1=last.get("train_top1"),
                 val_top1=last.get("val_top1"), best_val_top1=state.best_acc, wall_time_s=state.wall_time,
                 eval_model=eval_model_name(parts), tta=args.tta)
    if rank() == 0:
        print(f"test top1 {test['top1']:.2f} top5 {test['top5']:.2f} | wall {state.wall_time:.1f} s")
        write_json(os.path.join(args.output_dir, "final.json"), final, indent=2)
    return final


@contextlib.contextmanager
def output_dir_lock(args):
    """Hold an exclusive lock on OUTPUT_DIR/.train.lock while this run trains (rank 0; collective under
    DDP). TinyinError on every rank when another process holds it: two runs in one folder (a command
    typed twice, a job requeued while the first still runs) each appended their rows to one
    metrics.jsonl (epochs 0, 0, 1, 1, ...) and overwrote each other's checkpoints, without a word. The
    kernel drops the lock when its holder exits, however it exits (kill -9 included). A POSIX lock
    (lockf), not flock: the stream path's forked loader workers would share an flock, and outlive a
    killed run by seconds, refusing its resume meanwhile; NFS also takes POSIX locks."""
    f, busy = None, False
    if rank() == 0:
        f = open(os.path.join(args.output_dir, RUN_LOCK_FILE), "a")
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            busy = e.errno in (errno.EACCES, errno.EAGAIN)  # else a file system without locks: train unguarded
    try:
        if gather(busy)[0]:
            raise TinyinError(f"--output-dir {args.output_dir}: another train.py is training there (it holds "
                              f"{RUN_LOCK_FILE}); let it finish, or use another --output-dir")
        yield
    finally:
        if f is not None:
            f.close()  # releases the lock


def check_no_run_replaced(args, ckpt_path):
    """CheckpointError (collective under DDP) when this run would replace a checkpoint.pth in --output-dir
    that it does not resume: a job script requeued without --resume auto started the preempted run again
    and its first checkpoint replaced the one left, hours of training lost without a word (and a new run
    in a finished run's folder its results). --overwrite says to start afresh there all the same."""
    own = os.path.join(args.output_dir, "checkpoint.pth")
    replaced = (rank() == 0 and not args.overwrite and os.path.isfile(own)
                and not (ckpt_path and os.path.isfile(ckpt_path) and os.path.samefile(ckpt_path, own)))
    if gather(replaced)[0]:
        raise CheckpointError(f"--output-dir {args.output_dir} holds a run's checkpoint.pth, which this run would "
                              "replace: continue that run with --resume auto, start afresh over it with --overwrite, "
                              "or use another --output-dir")


def stale_files(out, ckpt_path, state):
    """The files in --output-dir `out` that are not of the run starting there (`ckpt_path`: the checkpoint it
    resumes, `state` its state), for it to remove. Not finished any more (a resume that trains further, or a new
    run in an old folder): an earlier final.json would stand beside the metrics until `final_test` rewrites it.
    A new run's best.pth is its own: an old one would stand until its first epoch ends; so is its eval.json (an
    old --test-only's figures, naming this folder's checkpoint.pth). A resume of another folder's checkpoint over
    a run here (--overwrite) kept that run's best.pth, which the resumed run replaced only once its val top-1
    passed the other's best, and its eval.json: best.pth stays only where it is of the resumed run's epochs (its
    history the start of the checkpoint's, with its best val top-1), eval.json only where no run is replaced."""
    if not ckpt_path:
        return ["final.json", "best.pth", "eval.json"]
    own, best = os.path.join(out, "checkpoint.pth"), os.path.join(out, "best.pth")
    stale = ["final.json"]
    if os.path.isfile(own) and not os.path.samefile(ckpt_path, own):
        stale.append("eval.json")
    if os.path.isfile(best):
        saved = saved_records(best, "state")[0] or {}
        history = saved.get("history")
        if not (isinstance(history, list) and history == state.history[: len(history)]
                and saved.get("best_acc") == state.best_acc):
            stale.append("best.pth")
    return stale


def make_output_dir(path):
    """Create --output-dir (and its parents); one line (exit 1) when that cannot be done, or when it takes no file
    (another user's folder, a read-only mount: `folder_refusal`)."""
    if why := folder_refusal(path):
        raise TinyinError(f"--output-dir {path}: {why}")


def main(args):
    """Train (or --test-only evaluate) as `args` say; returns final.json's dict. Exits 128 + signum
    after writing a checkpoint when SIGTERM, SIGINT or SIGUSR1 arrives mid-run."""
    with contextlib.ExitStack() as run:
        with stopped_at_once():  # the join of the other ranks: a signal ends it in one line, 130, 143 or 138
            check_device(args.device)
            stop_when_the_launcher_dies()
            device, world_size = run.enter_context(distributed(args))
        stop, held = run.enter_context(StopSignals()), run.enter_context(contextlib.ExitStack())
        with errors_on_every_rank():  # each rank's own files: a node may lack them
            ckpt_path = resume_path(args)
            # The ImageNet head has 1000 classes: replaced. Said of a --pretrained the command typed, without --resume:
            # one --recipe paper set (its 224 rows), or a --resume auto that found no checkpoint (another --output-dir),
            # was said to be the mistake, where the checkpoint to evaluate was missing.
            if args.test_only and args.pretrained and not args.resume and "pretrained" in given_flags(args.argv):
                raise UsageError("--test-only evaluates a trained network: --pretrained gives ImageNet's weights a "
                                 "fresh head (chance level); train from them first")
            if args.test_only and not (ckpt_path or args.weights):
                where = f" (no checkpoint.pth in {args.output_dir})" if args.resume == "auto" else ""
                raise UsageError(f"--test-only evaluates a trained network: give --resume (a checkpoint, or auto)"
                                 f"{where} or --weights FILE")
            if not is_set_url(args.shards):  # a typo said first: not a checkpoint in --output-dir it would replace
                local_folder("--shards", args.shards, DEFAULT_SHARDS)  # (whose advice, --resume auto, met the missing folder next)
            if ckpt_path and args.resume != "auto":  # so is a --resume typo: it is no run's checkpoint to continue
                check_resume_file(ckpt_path)
        locked = False
        if not args.test_only:  # before the data loads: a mistake is told at once
            check_no_run_replaced(args, ckpt_path)
            # A second run in a folder where one trains: refused before it loads the data and says "resumed from"
            # (a folder without the lock file has no run training there, and gets the file only once the run starts).
            if locked := gather(rank() == 0 and os.path.isfile(os.path.join(args.output_dir, RUN_LOCK_FILE)))[0]:
                make_output_dir(args.output_dir)  # read-only: said as for a new run, not by the lock file's open
                held.enter_context(output_dir_lock(args))
        with errors_on_every_rank():  # a node's own copy, or its fetch
            shard_set = open_shards(args)
        check_same_set(shard_set.manifest, args)  # first: a node's stale set is no checkpoint "of another run"
        # A resume's run's own flags where the command leaves them out: -b before the loaders take it
        kept = resume_flags(ckpt_path, args, shard_set.manifest) if ckpt_path else {}
        if rank() == 0 and "batch_size" not in kept and (note := recipe_batch_note(args, world_size)):
            print(note, file=sys.stderr, flush=True)  # (a kept -b is the run's, not the recipe's)
        parts = build(args, device, world_size, shard_set)
        state = restore(parts, args, ckpt_path, kept.values())
        check_same_start(state, ckpt_path, args)
        make_output_dir(args.output_dir)  # once the flags and files are known to work
        if args.test_only:  # writes eval.json only: it may look at a run while that run trains on
            # Not StopSignals' stop after a training step, which never comes here: an evaluation has nothing
            # to checkpoint, and ran on to its end (minutes for the test split at 224 on a CPU). A signal ends it
            # at once (128 + the signal: 143, 130 for Ctrl-C, 138 for SIGUSR1), and one noted already ends it
            # before it starts.
            with sigterm_interrupts(STOP_SIGNALS):
                if stop.signum:
                    signal.raise_signal(stop.signum)
                if rank() == 0 and (note := evaluation_note(ckpt_path or args.weights, args)):
                    print(f"note: {note}", file=sys.stderr, flush=True)
                return test_only(parts, args, ckpt_path or args.weights)
        if not locked:  # a new folder, made just now
            held.enter_context(output_dir_lock(args))
        if rank() == 0:
            write_run_files(args.output_dir, args, device, world_size, state.history, parts.identity["dataset"])
            for name in stale_files(args.output_dir, ckpt_path, state):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(args.output_dir, name))
        own = os.path.join(args.output_dir, "checkpoint.pth")
        if args.dump_keys and not (ckpt_path and os.path.isfile(own) and os.path.samefile(ckpt_path, own)):
            # Every rank its own: a run that continues none here starts its keys afresh (they were appended to an
            # earlier run's, an --overwrite's keys twice over); a resume of this folder's checkpoint appends.
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(args.output_dir, f"keys-rank{rank()}.txt"))
        try:
            train(parts, state, args, stop)
            return final_test(parts, state, args, stop)
        except Interrupted as e:
            if rank() == 0:
                print(f"interrupted at epoch {state.epoch} step {state.epoch_steps}: checkpoint saved to "
                      f"{os.path.join(args.output_dir, 'checkpoint.pth')}; continue with: "
                      f"{continue_command(args, world_size, __file__, launch_nodes(world_size))}", file=sys.stderr,
                      flush=True)
            raise SystemExit(128 + e.signum) from None


# --- flags ---------------------------------------------------------------------------------


def get_args_parser(add_help=True):
    p = ArgumentParser(prog="train.py", description="Train a CNN on Tiny ImageNet shards", add_help=add_help)
    p.add_argument("--shards", default=DEFAULT_SHARDS, type=path_text, help="shard folder from `tinyin shard build`, or its URL (http(s)://, s3://, gs://: fetched once per node into $TINYIN_CACHE, default ~/.cache/tinyin) (default: %(default)s)")
    p.add_argument("--arch", "--model", default="resnet18", choices=models.list_models(), help="network (default: resnet18)")
    p.add_argument("--size", type=int, choices=(28, 64, 224),
                   help="input size: 28 grey (lenet5), 64 RGB, 224 = RGB 64 upscaled on the device (default: the arch's native size)")
    p.add_argument("--recipe", choices=recipe_names(),
                   help="a named recipe for --arch/--size (models/recipes.py): paper = the study's Table 2 and Table 3's "
                        "10-epoch rows, paper-50 = Table 3's 50-epoch rows, fast = the speedrun's (64-px ResNets; "
                        "untuned); explicit flags still win (default: none)")
    p.add_argument("-b", "--batch-size", type=at_least(1), default=128, help="images per step per process (default: 128)")
    p.add_argument("--epochs", type=at_least(1), default=30, help="epochs to train (default: 30)")
    p.add_argument("--time-budget", type=at_least(0.01, float), default=None, metavar="MINUTES",
                   help=f"fit the run into MINUTES from the process's start to the end of the test: after "
                        f"{BUDGET_AFTER_EPOCHS} epochs, --epochs becomes as many as the time left (less "
                        f"{100 * BUDGET_MARGIN:g}%%) holds, by the last epoch's time (train, validation, checkpoint) "
                        f"with one more validation's for the test (at "
                        f"least {BUDGET_AFTER_EPOCHS}); --epochs until then is what the lr schedule starts from, so "
                        f"give {BUDGET_AFTER_EPOCHS} or more warm-up epochs for a decay that starts after the choice "
                        f"(default: none)")
    p.add_argument("--lr", type=positive_float, default=0.01, help="SGD learning rate (default: 0.01)")
    p.add_argument("--momentum", type=at_least(0.0, float), default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False,
                   help="Nesterov momentum (needs --momentum above 0) (default: off)")
    p.add_argument("--wd", "--weight-decay", dest="wd", type=at_least(0.0, float), default=5e-4, help="weight decay (default: 5e-4)")
    p.add_argument("--lr-scheduler", choices=("none", "step", "cosine", "onecycle"), default="cosine",
                   help="lr schedule: none, step, cosine (to 0 at --epochs), or onecycle (the warm-up, then linear "
                        "decay to 0 at --epochs) (default: cosine)")
    p.add_argument("--lr-per", choices=("epoch", "step"),
                   help="change the lr once an epoch or every step (default: per step with --warmup-epochs or "
                        "onecycle, per epoch otherwise, as the study's schedules were)")
    p.add_argument("--warmup-epochs", type=at_least(0.0, float), default=0.0, metavar="F",
                   help="linear lr warm-up from about 0 over the first F epochs (counted in steps; fractions allowed), "
                        "then the --lr-scheduler over the rest, per step (default: 0, no warm-up)")
    p.add_argument("--lr-step-size", type=at_least(1), default=10, help="epochs between decays for step, after the warm-up (default: 10)")
    p.add_argument("--lr-gamma", type=positive_float, default=0.1, help="decay factor for step (default: 0.1)")
    p.add_argument("--label-smoothing", type=at_least(0.0, float), default=0.0, help="cross-entropy label smoothing, below 1 (default: 0.0)")
    p.add_argument("--augment", nargs="?", const="crop", default="none", choices=AUGMENTS,
                   help="train augmentation on the device: crop = random crop with padding + flip (what a bare "
                        "--augment means), rrc = random-resized crop + flip (default: none)")
    p.add_argument("--mix", choices=("none", *MIX_MODES), default="none",
                   help="mix each train batch with a permutation of itself: mixup (weighted sum of images) or cutmix "
                        "(a pasted box); the loss weighs both labels, train top-1 counts the image's own (default: none)")
    p.add_argument("--mix-alpha", type=positive_float, default=None, metavar="A",
                   help="mixing weight ~ Beta(A, A) (default: 0.2 for mixup, 1.0 for cutmix)")
    p.add_argument("--mix-prob", type=positive_float, default=1.0, metavar="P",
                   help="share of the train batches that are mixed, at most 1 (default: 1.0)")
    p.add_argument("--ema", type=at_least(0.0, float), default=0.0, metavar="DECAY",
                   help="keep an exponential moving average of the weights (and BatchNorm statistics) with this "
                        "decay per step, below 1, e.g. 0.999 (warming up as min(DECAY, (1+n)/(10+n)) over the first "
                        "updates), and validate and test it instead; 0 = off (default: 0)")
    p.add_argument("--ema-every", type=at_least(1), default=1, metavar="N",
                   help="update the --ema average every N steps, with decay**N (default: 1)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                   help="flip test-time augmentation: validate and test on the mean logits of each image and its "
                        "mirror image (default: off)")
    p.add_argument("--norm", choices=tuple(NORMS),
                   help="input normalisation: the train split's mean/std, imagenet, or half (mean = std = 0.5, the study's LeNet-5) (default: imagenet with --pretrained, else dataset)")
    p.add_argument("-j", "--workers", type=at_least(0), default=None,
                   help="DataLoader workers per process for --data-path stream, the only path with workers (default: 2)")
    p.add_argument("--limit-batches", type=at_least(1), default=None, metavar="N",
                   help="quick runs: at most N batches per epoch of each split (default: all)")
    p.add_argument("--data-path", choices=("auto", "resident", "fast", "stream"), default="auto",
                   help="loader read path: resident (split copied to the device once), fast (memory-mapped shards), "
                        "stream (whole shards read by DataLoader workers); auto = resident when the split fits "
                        "in 2 GiB (default: auto)")
    # --no-X too, so a user can switch off what a recipe switched on
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast on CUDA (default: off)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="NHWC memory format (default: off)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (default: off). It then sees one batch size: each epoch's "
                        "last, smaller train batch is left out and the last eval batch padded")
    p.add_argument("--seed", type=at_least(0), default=0, help="seeds the weights, dropout and the shuffle order (default: 0)")
    p.add_argument("--output-dir", type=path_text, help="where logs and checkpoints go (default: runs/ARCH-SIZE)")
    p.add_argument("--resume", type=path_text,
                   help="checkpoint to continue from, or 'auto' for OUTPUT_DIR/checkpoint.pth if present; "
                        "continues mid-epoch, also on another number of ranks (a stream-path checkpoint taken mid-epoch: "
                        "on as many only) (default: none)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output-dir that holds a checkpoint.pth, replacing that run "
                        "(without it such a folder is refused unless --resume continues its run, which wins "
                        "when both are given) (default: off)")
    p.add_argument("--checkpoint-every", type=at_least(1), default=None, metavar="N",
                   help="also write checkpoint.pth every N optimiser steps (default: at each epoch's end, and on "
                        "SIGTERM, SIGINT or SIGUSR1)")
    p.add_argument("--test-only", action="store_true", help="only evaluate val and test, writing eval.json (default: off)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                   help="start from torchvision's ImageNet weights (default: off; --recipe paper's 224 rows: on)")
    p.add_argument("--weights", metavar="FILE", type=path_text,
                   help="start from a local state dict or checkpoint (an --ema run's: its average) (default: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dump-keys", action="store_true", help=argparse.SUPPRESS)  # debug: keys-rank{r}.txt per rank
    # debug: behave as if SIGUSR1 arrived during global step N (a deterministic preemption for tests)
    p.add_argument("--stop-after-steps", type=at_least(1), default=None, help=argparse.SUPPRESS)
    # debug: after global step N, print a line and wait for SIGTERM/SIGINT/SIGUSR1 (for the real-signal test)
    p.add_argument("--wait-at-step", type=at_least(1), default=None, help=argparse.SUPPRESS)
    return p


def check_training_flags(parser, args, given, from_recipe=()):
    """Validate the speedrun's flags (after --recipe, which may have set them: `from_recipe`, their dests); fill
    --mix-alpha."""
    # A value the recipe set is said to be its: `--recipe fast --epochs 1` was told '--warmup-epochs: must be below
    # --epochs (1), not 2', a flag never typed, with no word of where its 2 came from.
    whose = lambda dest: f"--recipe {args.recipe}'s " if dest in from_recipe else ""  # noqa: E731
    if args.nesterov and args.momentum == 0:
        parser.error("argument --nesterov: needs a momentum above 0, not --momentum 0"
                     + (f" (--recipe {args.recipe} sets it: add --no-nesterov)" if "nesterov" in from_recipe else ""))
    if args.warmup_epochs >= args.epochs:
        parser.error(f"argument --warmup-epochs: must be below {whose('epochs')}--epochs ({args.epochs}), not "
                     f"{whose('warmup_epochs')}{args.warmup_epochs:g}")
    per_step_only = (f"{whose('warmup_epochs')}--warmup-epochs" if args.warmup_epochs
                     else f"{whose('lr_scheduler')}--lr-scheduler onecycle" if args.lr_scheduler == "onecycle" else "")
    if args.lr_per == "epoch" and per_step_only:
        parser.error(f"argument --lr-per: epoch, but {per_step_only} changes the lr every step")
    # Resolved here, so a warm-up's ablation (--warmup-epochs 0 under --recipe fast, whose --lr-per is step) keeps
    # its cosine per step: by the default alone, taking the warm-up away also made the cosine per epoch.
    args.lr_per = args.lr_per or ("step" if per_step_only else "epoch")
    if args.time_budget and args.epochs < BUDGET_AFTER_EPOCHS:  # the run would end before the choice, the budget unused
        parser.error(f"argument --time-budget: chooses --epochs after {BUDGET_AFTER_EPOCHS} epochs; give --epochs "
                     f"{BUDGET_AFTER_EPOCHS} or more, not {args.epochs}")
    if args.ema >= 1:
        parser.error(f"argument --ema: must be below 1, not {args.ema:g}")
    if args.mix_prob > 1:
        parser.error(f"argument --mix-prob: must be at most 1, not {args.mix_prob:g}")
    # --lr-step-size and --lr-gamma too: given with the default cosine, they trained a cosine without a word
    step_off = args.lr_scheduler != "step"
    for flag, needs, off in (("mix_alpha", "mix", args.mix == "none"), ("mix_prob", "mix", args.mix == "none"),
                             ("ema_every", "ema", not args.ema), ("lr_step_size", "lr-scheduler step", step_off),
                             ("lr_gamma", "lr-scheduler step", step_off)):
        if flag in given and off:
            parser.error(f"argument --{flag.replace('_', '-')}: only acts with --{needs}")
    if args.mix != "none" and args.mix_alpha is None:
        args.mix_alpha = MIX_ALPHA[args.mix]


def given_flags(argv):
    """The flags (as dests: "output_dir") that `argv` names, however spelled (`--outp X`, `--seed=1`);
    UsageError for an argv train.py refuses."""
    # Parse with every default None: what is set was given.
    probe = get_args_parser()
    probe.set_defaults(**dict.fromkeys(vars(probe.parse_args([]))))
    return {k for k, v in vars(probe.parse_args(argv)).items() if v is not None}


def recipe_batch_note(args, world_size):
    """The note for a --recipe's batch under torchrun ('' otherwise): -b is per process, so N processes step
    on N times the recipe's row (the study's batch 32, 50 or 100), which `tinyin report` then calls not
    comparable; said at the start, not after the run."""
    if world_size == 1 or not args.recipe or args.test_only or "batch_size" in given_flags(args.argv):
        return ""
    return (f"note: --recipe {args.recipe} sets -b {args.batch_size} per process: {world_size} processes train on "
            f"{args.batch_size * world_size} images a step, not the recipe's {args.batch_size}")


def parse_args(argv=None):
    """Parse argv, apply --recipe under the explicit flags, fill derived defaults, validate."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    given = given_flags(argv)
    if args.seed >= 2**63:  # torch.manual_seed(seed + rank) takes 64 bits: a longer one was its ValueError's traceback
        parser.error(f"argument --seed: must be below 2**63, not {args.seed}")

    info = models.model_input(args.arch)
    if args.size is None:
        args.size = info["native"]
    if args.size not in info["sizes"]:
        parser.error(f"argument --size: {args.arch} takes {' or '.join(map(str, info['sizes']))}, not {args.size}")
    from_recipe = set()  # the flags the recipe set (dests): those the command leaves out
    if args.recipe:
        try:
            recipe = resolve_recipe(args.recipe, args.arch, args.size, device=args.device)
        except ValueError as e:
            parser.error(f"argument --recipe: {e}")
        if "weights" in given:  # a local weights file stands in for the download
            recipe.pop("pretrained", None)
        from_recipe = set(recipe) - given
        for k in from_recipe:
            setattr(args, k, recipe[k])
    if args.label_smoothing >= 1:
        parser.error(f"argument --label-smoothing: must be below 1, not {args.label_smoothing:g}")  # '1', not '1.0'
    check_training_flags(parser, args, given, from_recipe)
    if args.workers is not None and args.data_path != "stream":
        parser.error(f"argument -j/--workers: only --data-path stream uses loader workers; "
                     f"--data-path {args.data_path} reads the shards in the training process")
    device = check_device(args.device, present=False)  # whether this machine has it: main()
    if launch_world_size() > 1 and device.type == "cuda" and device.index is not None:
        # `distributed` gives each rank its own GPU for "cuda" only
        parser.error(f"argument --device: {args.device} under torchrun, where each process takes the GPU of its "
                     "LOCAL_RANK; give --device cuda")
    if args.pretrained and args.weights:
        parser.error("use --pretrained or --weights FILE, not both")
    if args.pretrained and models.model_spec(args.arch).weights is None:
        parser.error(f"argument --pretrained: {args.arch} has no pretrained ImageNet weights")
    args.norm = args.norm or ("imagenet" if args.pretrained else "dataset")
    args.output_dir = args.output_dir or os.path.join("runs", f"{args.arch}-{args.size}")
    if why := long_name(args.output_dir):  # found by its makedirs after the data's load, naming no name
        parser.error(f"--output-dir {args.output_dir}: {why}; choose a shorter name")
    args.argv = argv  # for the "continue with:" line of an interrupted run
    args.budget_epochs = None  # --time-budget's choice of --epochs, once made
    return args


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
