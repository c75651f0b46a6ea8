"""Training-step throughput: images/s of complete SGD steps (forward, backward, optimiser step)
for each network and input size of the zoo, fed four ways, side by side in one run:

- (a) ``ceiling``: one uint8 batch already on the device, reused through the device stage
  (no loader at all: what the model alone can take);
- (b) ``resident``: `make_loader(path="resident")`, the split copied to the device once;
- (c) ``fast``: `make_loader(path="fast")`, memory-mapped shards gathered into a pinned ring by
  a background thread on CUDA (in the caller's thread on the CPU);
- (d) ``imagefolder``: the study's pipeline, torchvision `ImageFolder` + PIL + CPU transforms
  through a `DataLoader` with every core as a worker and `pin_memory=True` (on CUDA).

On CUDA the step runs under bf16 autocast with channels_last; (a) and (b) can also run through
`torch.compile`. Warm-up steps are excluded, CUDA is synchronised around every timed window,
and a row reports the median (and min-max) of its windows. Used by `tinyin bench train` and
`tools/bench_train.py`.
"""
import itertools
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import models
from models.recipes import RECIPES

from .device import IMAGENET_MEAN, IMAGENET_STD, DeviceStage
from .errors import UsageError, plural
from . import provenance
from .index import read_manifest
from .loader import make_loader
from .order import NoFullBatch
from .reader import ShardArrays
from .release import is_image
from .stream_workers import WORKER_RULE, started

#: (arch, size) rows of the zoo, in the study's order.
ROWS = (("lenet5", 28), ("alexnet", 64), ("squeezenet1_1", 64), ("resnet18", 64),
        ("alexnet", 224), ("squeezenet1_1", 224), ("resnet18", 224))
#: feed letter -> name, in table order.
FEEDS = {"a": "ceiling", "b": "resident", "c": "fast", "d": "imagefolder"}
FEED_LABELS = {"ceiling": "(a) ceiling: one batch on the device", "resident": "(b) resident loader",
               "fast": "(c) fast path", "imagefolder": "(d) study: ImageFolder + PIL"}
COMPILABLE = ("ceiling", "resident")
NORMS = {"half": ((0.5,) * 3, (0.5,) * 3), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


@dataclass(frozen=True)
class Case:
    """One row of the table: a network at an input size and batch, fed one way."""

    arch: str
    size: int
    batch: int
    feed: str
    compiled: bool = False


def study_batch(arch, size):
    """The study's batch size for this row (`--recipe paper`)."""
    return RECIPES["paper"][arch, size]["batch_size"]


def plan(archs=None, sizes=None, batches=("study", 256), feeds=("a", "b", "c"), compile=False):
    """The cases to measure, in table order; UsageError for a selection that matches nothing.

    batches: ints and/or "study" (the row's batch in the study). feeds: letters of `FEEDS`.
    compile: also run (a) and (b) through torch.compile, after the rows of the same batch run without it.
    """
    arch_choices, feed_choices = ", ".join(dict(ROWS)), ", ".join(f"{k} ({v})" for k, v in FEEDS.items())
    size_choices = ", ".join(map(str, sorted({s for _, s in ROWS})))
    for flag, given, noun, choices in (("--arch", archs, "network", arch_choices), ("--size", sizes, "size", size_choices),
                                       ("--feeds", feeds, "feed", feed_choices)):
        if given is not None and not given:  # `--arch ,` (a script's empty variable): read as not given, all four ran
            raise UsageError(f"{flag}: no {noun} given; choose from: {choices}")
    for arch in archs or ():
        if arch not in {a for a, _ in ROWS}:
            raise UsageError(f"--arch {arch}: unknown; choose from: {arch_choices}")
    bad = [f for f in feeds if f not in FEEDS]
    if bad:
        raise UsageError(f"--feeds {','.join(bad)}: unknown; choose from: {feed_choices}")
    if not batches:  # `--batch ""`: no case, and bench_train, given none, ran the whole default plan
        raise UsageError("--batch: no batch size given; need positive integers or 'study'")
    bad = [str(b) for b in batches if b != "study" and not (str(b).isdigit() and int(b) > 0)]
    if bad:
        raise UsageError(f"--batch {','.join(bad)}: need positive integers or 'study'")
    rows = [(a, s) for a, s in ROWS if (not archs or a in archs) and (not sizes or s in sizes)]
    if not rows:
        have = "; ".join(f"{a} at {s}" for a, s in ROWS if not archs or a in archs)
        which = f" for {','.join(archs)}" if archs else ""  # --size alone: any network
        raise UsageError(f"--size {','.join(map(str, sizes))}: no such row{which} (the zoo has: {have})")
    cases = []
    for arch, size in rows:
        sizes_b = dict.fromkeys(study_batch(arch, size) if b == "study" else int(b) for b in batches)
        for batch in sizes_b:
            # The compiled (a) and (b) back to back: they share one compiled network (`_model`), and no other row
            # holds it (kept through the eager rows between and after them, it counted in their peak memory).
            for compiled in (False, True) if compile else (False,):
                for letter in FEEDS:  # table order, whatever order the feeds were given in
                    if letter in feeds and (not compiled or FEEDS[letter] in COMPILABLE):
                        cases.append(Case(arch, size, batch, FEEDS[letter], compiled))
    return cases


# --- the step --------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # device work is asynchronous: time only what has finished


def make_step(model, device):
    """One complete SGD step (the study's optimiser) as `step(images, labels)`; no host sync in it."""
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    amp = device.type == "cuda"

    def step(images, labels):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def time_windows(step, batches, device, warmup, steps, windows):
    """Images/s of each of `windows` timed windows of `steps` steps, after `warmup` untimed steps.
    A window's clock includes waiting for the batch: that is the loader's share of the step."""
    for _ in range(warmup):
        step(*next(batches))
    rates = []
    for _ in range(windows):
        _sync(device)
        n, t0 = 0, time.perf_counter()
        for _ in range(steps):
            images, labels = next(batches)
            step(images, labels)
            n += len(labels)
        _sync(device)
        rates.append(n / (time.perf_counter() - t0))
    return rates


# --- the feeds -------------------------------------------------------------------------------


def _forever(loader, what, set_epoch=None, start=iter):
    """Batches of `loader` over epoch after epoch (reshuffled by `set_epoch(epoch)` where given;
    a DataLoader reshuffles by itself), each epoch's iterator `start(loader)`; UsageError if an
    epoch holds no full batch."""
    for epoch in itertools.count():
        if set_epoch is not None:
            set_epoch(epoch)
        empty = True
        for batch in start(loader):
            empty = False
            yield batch[0], batch[1]
        if empty:
            raise _fewer_than_a_batch(what)


def _fewer_than_a_batch(what):
    return UsageError(f"{what}: the train split holds fewer images than one batch; use a smaller --batch")


class Feeds:
    """Builds each feed's endless batch iterator, reusing loaders between cases that share them."""

    def __init__(self, shards, images, device, workers):
        self.shards, self.images, self.device, self.workers = shards, images, device, workers
        self._loaders = {}

    def _stage_args(self, arch, size):
        info = models.model_input(arch)
        mean, std = NORMS[RECIPES["paper"][arch, size]["norm"]]
        cuda = self.device.type == "cuda"
        return info, dict(mean=mean[: info["channels"]], std=std[: info["channels"]],
                          size=None if size == info["native"] else size, channels_last=cuda,
                          dtype=torch.bfloat16 if cuda else torch.float32)

    def _loader(self, path, arch, size, batch):
        info, stage = self._stage_args(arch, size)
        key = (path, info["variant"], batch, tuple(sorted(stage.items())))
        if key not in self._loaders:
            # One loader per path at a time: a resident split is 1.2 GB of device memory.
            self._loaders = {k: v for k, v in self._loaders.items() if k[0] != path}
            try:
                self._loaders[key] = make_loader(self.shards, "train", info["variant"], batch, shuffle=True,
                                                 drop_last=True, device=self.device, path=path, **stage)
            except NoFullBatch:  # its words name make_loader's arguments, not the bench's flags
                raise _fewer_than_a_batch(f"--feeds {path}") from None
            # Untimed: the data pass (the shards' pages, the resident copy to the device) runs in the
            # background, and until it is done batches come the slow way; the rows time the steady state.
            self._loaders[key].wait_ready()
        loader = self._loaders[key]
        return _forever(loader, f"--feeds {path}", loader.set_epoch)

    def _ceiling(self, arch, size, batch):
        info, stage = self._stage_args(arch, size)
        arrays = ShardArrays(self.shards, "train", info["variant"])
        if len(arrays) < batch:
            raise UsageError(f"--feeds a: the train split holds {len(arrays)} "
                             f"{plural(len(arrays), 'image')}, fewer than one batch of {batch}")
        step = max(len(arrays) // batch, 1)
        idx = torch.arange(batch) * step  # spread over the split: every class, not one shard's first rows
        images = arrays.gather(idx.numpy()).to(self.device)
        labels = torch.from_numpy(arrays.labels[idx.numpy()]).to(self.device)
        device_stage = DeviceStage(**stage)
        return ((device_stage(images), labels) for _ in itertools.count())

    def _imagefolder(self, arch, size, batch):
        from torchvision import datasets, transforms

        if self.images is None:
            raise UsageError("--feeds d (the study's ImageFolder pipeline) needs --images FOLDER, an extracted release")
        mean, std = NORMS[RECIPES["paper"][arch, size]["norm"]]
        steps = {28: [transforms.Resize((28, 28)), transforms.Grayscale()], 224: [transforms.Resize((224, 224))]}
        channels = models.model_input(arch)["channels"]
        tf = transforms.Compose(steps.get(size, []) + [transforms.ToTensor(),
                                                       transforms.Normalize(mean[:channels], std[:channels])])
        # The images `shard build` reads: not the AppleDouble `._*` files of a macOS copy, which PIL cannot open.
        dataset = datasets.ImageFolder(str(Path(self.images) / "train"), tf, is_valid_file=is_image)
        cuda = self.device.type == "cuda"
        # The stream path's rule for its workers, as `bench loader`'s baseline: a SIGTERM to the process group
        # (a scheduler's, `kill -TERM -PGID`) killed them, and torch raised "DataLoader worker (pid(s) N) exited
        # unexpectedly" as a traceback.
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                             num_workers=self.workers, pin_memory=cuda,
                                             **(WORKER_RULE if self.workers else {}))
        fmt = torch.channels_last if cuda else torch.contiguous_format
        for images, labels in _forever(loader, "--feeds d", start=started):
            yield (images.to(self.device, non_blocking=True).contiguous(memory_format=fmt),
                   labels.to(self.device, non_blocking=True))

    def batches(self, case):
        """An endless iterator of model-ready (images, labels) batches for `case`."""
        if case.feed == "ceiling":
            return self._ceiling(case.arch, case.size, case.batch)
        if case.feed == "imagefolder":
            return self._imagefolder(case.arch, case.size, case.batch)
        return self._loader(case.feed, case.arch, case.size, case.batch)

    def keep_only(self, feed):
        """Drop the loaders of other feeds: a resident split left on the GPU would count in every row's peak."""
        self._loaders = {k: v for k, v in self._loaders.items() if k[0] == feed}

    def close(self):
        self._loaders.clear()


# --- the run ---------------------------------------------------------------------------------


def _model(case, device, num_classes, cache):
    """A fresh network (same seed for every feed) on `device`; compiled cases share one compiled
    module per (arch, size, batch), so (a) and (b) pay for compilation once (`bench_train` empties `cache` for
    any other row, so it holds one at most)."""
    if case.compiled and (case.arch, case.size, case.batch) in cache:
        return cache[case.arch, case.size, case.batch]
    torch.manual_seed(0)
    model = models.get_model(case.arch, num_classes)
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    model.train()
    if case.compiled:
        # What torch.compile kept of the rows before, as in a new process (train.py --compile): a network compiled
        # again at another batch or size took it for a shape that changes, and was compiled for any (dynamic
        # shapes, not the static ones of a run), and every compile counted toward the recompile limit.
        torch._dynamo.reset()
        model = torch.compile(model)
        cache[case.arch, case.size, case.batch] = model
    return model


def row_name(row):
    """A row's (or a case's, `asdict`) short name, as the log and the failed rows' error say it: 'lenet5@28 b16 fast'."""
    return f"{row['arch']}@{row['size']} b{row['batch']} {row['feed']}{' compiled' if row['compiled'] else ''}"


def failed_rows(rows):
    """The rows of `bench_train` that failed (an OOM, a compiler's error), not those not measured for a reason
    known beforehand (a batch larger than the split)."""
    return [r for r in rows if (r["skipped"] or "").startswith("failed: ")]


def _not_measured(case, why):
    """The row of a case not measured: `why` instead of its figures."""
    return dict(asdict(case), images_per_s=None, min=None, max=None, rates=[], peak_bytes=None, skipped=why)


def _measure(case, feeds, device, num_classes, compiled, warmup, steps, windows):
    """The windows' images/s of `case` (`time_windows`), its model, optimiser and feed gone afterwards."""
    step = make_step(_model(case, device, num_classes, compiled), device)
    batches = feeds.batches(case)
    try:
        return time_windows(step, batches, device, warmup, steps, windows)
    finally:
        batches.close()  # now, not at garbage collection: feed d's workers must not run into the next row
        del step, batches  # the model and optimiser go before the next row's peak memory is reset


def bench_train(shards, images=None, cases=None, device="cpu", warmup=10, steps=50, windows=3,
                workers=None, log=print):
    """Measure every case; returns a list of row dicts (the `Case` fields plus images/s median,
    min, max, the windows' rates, ratio to (a) of the same compile setting, peak GPU memory, and
    `skipped`: None, or why the row was not measured, its figures None, e.g. a batch larger than the
    train split, or a row that failed: "failed: OutOfMemoryError: CUDA out of memory. ...", the rows
    after it measured all the same).
    A KeyboardInterrupt (Ctrl-C; `tinyin bench train` turns SIGTERM into one) ends the run early
    and returns the rows measured so far, fewer than the cases."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if windows < 3:
        raise UsageError(f"--windows {windows}: need at least 3 (the median of fewer hides the spread)")
    manifest = read_manifest(shards)
    num_classes, n_train = len(manifest["classes"]), manifest["counts"]["train"]
    feeds = Feeds(shards, images, device, os.cpu_count() if workers is None else workers)
    cases = list(plan() if cases is None else cases)
    if any(case.feed == "imagefolder" for case in cases):
        if images is None:  # found at feed d's first row, the error ended the run and lost feeds a to c's rows
            raise UsageError("--feeds d (the study's ImageFolder pipeline) needs --images FOLDER, an extracted release")
        # ImageFolder labels its class folders 0..n-1: more than the network's outputs failed in the
        # loss (IndexError: Target 4 is out of bounds), after the rows of feeds a to c had run.
        found = sum(1 for p in (Path(images) / "train").iterdir() if p.is_dir())
        if found != num_classes:
            raise UsageError(f"--images {images}: train/ holds {found} {plural(found, 'class')}, the "
                             f"shard set {num_classes}; feed d labels every class folder, so it needs a release of "
                             "exactly the set's classes")
    rows, compiled = [], {}
    try:
        for case in cases:
            name = row_name(asdict(case))
            if case.batch > n_train:
                # A small set (`data synth`, `shard build --classes`) under the default --batch study,256: the
                # row's error ended the run and lost the rows measured before it. Now a row that says why.
                rows.append(_not_measured(case, f"not measured: the train split holds {n_train} "
                                                f"{plural(n_train, 'image')}, fewer than one batch of {case.batch}"))
                log(f"  {name}: {rows[-1]['skipped']}")
                continue
            feeds.keep_only(case.feed)
            if not (case.compiled and (case.arch, case.size, case.batch) in compiled):
                compiled.clear()  # no row but its own holds a compiled network (its weights, its gradients)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                rates = _measure(case, feeds, device, num_classes, compiled, warmup, steps, windows)
            except UsageError:
                raise
            except Exception as e:  # noqa: BLE001 - an OOM, a compiler's error: ended the run, the rows before it lost
                compiled.clear()  # a compiled model that failed is not reused
                lines = str(e).strip().splitlines()
                rows.append(_not_measured(case, f"failed: {type(e).__name__}" + (f": {lines[0]}" if lines else "")))
                log(f"  {name}: {rows[-1]['skipped']}")
                continue
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            row = dict(asdict(case), images_per_s=statistics.median(rates), min=min(rates), max=max(rates),
                       rates=rates, peak_bytes=peak, skipped=None)
            rows.append(row)
            log(f"  {name}: {row['images_per_s']:,.0f} images/s")
    except KeyboardInterrupt:  # a long table stopped: the rows already measured are still worth printing
        # "after N rows", not "N measured": the N count the rows that said why they were not measured
        log(f"stopped after {len(rows)} of {len(cases)} {plural(len(cases), 'row')}")
    finally:
        feeds.close()
    for row in rows:
        ceiling = next((r["images_per_s"] for r in rows if r["feed"] == "ceiling" and r["compiled"] == row["compiled"]
                        and (r["arch"], r["size"], r["batch"]) == (row["arch"], row["size"], row["batch"])), None)
        row["of_ceiling"] = row["images_per_s"] / ceiling if ceiling and row["images_per_s"] else None
    return rows


# --- what produced the numbers ---------------------------------------------------------------


def environment(device):
    """Machine, accelerator, versions and commit, for the table's header and env.json."""
    env = provenance.environment(torch.device(device))
    env["precision"] = "bf16 autocast, channels_last" if env["gpu"] else "float32 (no autocast on the CPU)"
    return env


def _gib(n):
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def format_table(rows, command, env, warmup, steps, windows, planned=None):
    """The Markdown table, headed by the command, commit, machine and versions that produced it
    (and, when `planned` cases were more than the rows, by how many rows it stopped after)."""
    gpu = f" ({env['gpu']})" if env["gpu"] else ""  # the device measured: it said "no GPU" under --device cpu
    lines = [f"# {command}",
             f"# commit {env['commit']}; {env['host']}: {env['cores']} {plural(env['cores'], 'core')} ({env['cpu']}), "
             f"device {env['device']}{gpu}; torch {env['torch']}, torchvision {env['torchvision']}; {env['precision']}",
             f"# complete SGD steps (lr 0.001, momentum 0.9); {warmup} {plural(warmup, 'warm-up step')} excluded; "
             f"median of {windows} windows of {steps} {plural(steps, 'step')}"
             + (", CUDA synchronised" if env["gpu"] else ""),
             *([f"# stopped early after {len(rows)} of {planned} {plural(planned, 'row')}"]
               if planned and planned > len(rows) else []),
             "| model | input | batch | feed | compiled | images/s | min-max | of (a) | peak GPU memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        case = f"| {r['arch']} | {r['size']} | {r['batch']} | {FEED_LABELS[r['feed']]} | {'yes' if r['compiled'] else 'no'} |"
        if r["skipped"]:  # the reason in the images/s column: a row is never left out without a word
            lines.append(f"{case} {r['skipped']} | - | - | - |")
            continue
        ratio = "-" if r["of_ceiling"] is None else f"{r['of_ceiling']:.0%}"
        lines.append(f"{case} {r['images_per_s']:,.0f} | {r['min']:,.0f}-{r['max']:,.0f} | {ratio} | {_gib(r['peak_bytes'])} |")
    return "\n".join(lines)
