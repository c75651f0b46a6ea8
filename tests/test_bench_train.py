"""pipeline.bench_train on the synthetic set: the plan of cases, what each feed delivers, the
one-line errors, and the CLI's table and JSON (a tiny run; no figures are asserted)."""
import gc
import itertools
import json
import multiprocessing
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch
from click.testing import CliRunner

import pipeline.bench_train as bt
from pipeline.bench_train import Case, Feeds, bench_train, format_table, environment, plan
from pipeline.cli import main
from pipeline.device import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import ShardError, UsageError
from pipeline.reader import ShardArrays
from tests.conftest import SYNTH, stop_by


def test_plan_rows_batches_and_compile():
    cases = plan(["lenet5", "resnet18"], [28, 64], ("study", 256, 32), ("c", "a"), compile=True)
    assert cases == [
        Case("lenet5", 28, 32, "ceiling"), Case("lenet5", 28, 32, "fast"), Case("lenet5", 28, 32, "ceiling", True),
        Case("lenet5", 28, 256, "ceiling"), Case("lenet5", 28, 256, "fast"), Case("lenet5", 28, 256, "ceiling", True),
        Case("resnet18", 64, 50, "ceiling"), Case("resnet18", 64, 50, "fast"), Case("resnet18", 64, 50, "ceiling", True),
        Case("resnet18", 64, 256, "ceiling"), Case("resnet18", 64, 256, "fast"), Case("resnet18", 64, 256, "ceiling", True),
        Case("resnet18", 64, 32, "ceiling"), Case("resnet18", 64, 32, "fast"), Case("resnet18", 64, 32, "ceiling", True),
    ]
    # the whole zoo: 7 rows, the 224 rows at the study's batch 100
    everything = plan()
    assert sorted({(c.arch, c.size) for c in everything}) == sorted(
        [("lenet5", 28), ("alexnet", 64), ("squeezenet1_1", 64), ("resnet18", 64),
         ("alexnet", 224), ("squeezenet1_1", 224), ("resnet18", 224)])
    assert {c.batch for c in everything if c.size == 224} == {100, 256}


@pytest.mark.parametrize("kwargs, message", [
    (dict(archs=["vgg16"]), "--arch vgg16: unknown; choose from: lenet5, alexnet, squeezenet1_1, resnet18"),
    (dict(archs=["lenet5"], sizes=[64]), "--size 64: no such row for lenet5 (the zoo has: lenet5 at 28)"),
    (dict(sizes=[100]), "--size 100: no such row (the zoo has: lenet5 at 28; alexnet at 64; squeezenet1_1 at 64; "
                        "resnet18 at 64; alexnet at 224; squeezenet1_1 at 224; resnet18 at 224)"),  # was a TypeError
    (dict(feeds=["a", "e"]), "--feeds e: unknown; choose from: a (ceiling), b (resident), c (fast), d (imagefolder)"),
    (dict(batches=["study", "0", "x"]), "--batch 0,x: need positive integers or 'study'"),
    # `--batch ""` (a script's empty variable): no case, and bench_train ran the whole zoo at the default batches
    (dict(archs=["lenet5"], batches=()), "--batch: no batch size given; need positive integers or 'study'"),
    (dict(archs=[]), "--arch: no network given; choose from: lenet5, alexnet, squeezenet1_1, resnet18"),  # all four ran
    (dict(feeds=()), "--feeds: no feed given; choose from: a (ceiling), b (resident), c (fast), d (imagefolder)"),
])
def test_plan_errors(kwargs, message):
    with pytest.raises(UsageError) as e:
        plan(**kwargs)
    assert str(e.value) == message


def test_no_cases_are_no_rows(shards):
    """Not the whole default plan (7 networks at 2 batches, hours on a CPU) in their place."""
    assert bench_train(shards, cases=[], log=None) == []


def test_fewer_than_three_windows_are_refused(shards):
    """A median of two windows is their mean, and hides which one was off: three at least (three are fine)."""
    with pytest.raises(UsageError) as caught:
        bench_train(shards, cases=[], windows=2, log=None)
    assert str(caught.value) == "--windows 2: need at least 3 (the median of fewer hides the spread)"
    assert bench_train(shards, cases=[], windows=3, log=None) == []


def test_feeds_deliver_model_ready_batches(shards, release):
    feeds = Feeds(shards, release, torch.device("cpu"), workers=0)
    arrays = ShardArrays(shards, "train", "rgb64")
    for feed in ("ceiling", "resident", "fast", "imagefolder"):
        images, labels = next(feeds.batches(Case("resnet18", 224, 8, feed)))
        assert images.shape == (8, 3, 224, 224) and images.dtype == torch.float32, feed
        assert labels.shape == (8,) and labels.dtype == torch.int64, feed
        grey, _ = next(feeds.batches(Case("lenet5", 28, 8, feed)))
        assert grey.shape == (8, 1, 28, 28), feed
    # (a) is the same batch every step, normalised with the row's (ImageNet) statistics
    ceiling = feeds.batches(Case("resnet18", 64, 8, "ceiling"))
    (first, y1), (second, y2) = next(ceiling), next(ceiling)
    assert torch.equal(first, second) and torch.equal(y1, y2)
    idx = torch.arange(8) * (len(arrays) // 8)
    raw = arrays.gather(idx.numpy()).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(first, (raw - mean) / std)
    assert torch.equal(y1, torch.from_numpy(arrays.labels[idx.numpy()]))


def test_feeds_time_a_loader_after_its_data_pass_and_free_the_one_they_replace(shards, monkeypatch):
    """A (b) row is timed on the resident copy, not on the batches served while it is made; the
    split a row no longer needs is freed when its loader is dropped (the cyclic GC is off here)."""
    verify = ShardArrays.verify_shard
    monkeypatch.setattr(ShardArrays, "verify_shard", lambda self, s: (time.sleep(0.1), verify(self, s)))
    feeds = Feeds(shards, None, torch.device("cpu"), workers=0)
    next(feeds.batches(Case("resnet18", 64, 8, "resident")))
    (loader,) = feeds._loaders.values()
    assert loader.source.storage.complete
    split = weakref.ref(loader.source.storage.data)
    del loader
    gc.collect()
    gc.disable()
    try:
        next(feeds.batches(Case("resnet18", 224, 8, "resident")))  # another device stage: a new loader
        assert split() is None, "the split of the replaced loader is still held"
    finally:
        gc.enable()


def test_a_malformed_manifest_is_one_line(shards, tmp_path):
    """bench train read the manifest by itself, unchecked: counts without train was a KeyError traceback."""
    for name in ("index.parquet", "manifest.json"):
        (tmp_path / name).write_bytes((shards / name).read_bytes())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["counts"]["train"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError) as caught:
        bench_train(tmp_path, cases=[], log=None)
    assert str(caught.value) == f"{tmp_path / 'manifest.json'}: counts says 0 train samples, its train shards hold 240"


def test_batch_larger_than_the_split(shards):
    feeds = Feeds(shards, None, torch.device("cpu"), workers=0)
    with pytest.raises(UsageError) as e:
        next(feeds.batches(Case("lenet5", 28, 1000, "resident")))
    assert str(e.value) == "--feeds resident: the train split holds fewer images than one batch; use a smaller --batch"
    with pytest.raises(UsageError) as e:
        feeds.batches(Case("lenet5", 28, 1000, "ceiling"))
    assert str(e.value) == "--feeds a: the train split holds 240 images, fewer than one batch of 1000"


def test_a_batch_larger_than_the_split_is_a_row_that_says_so(shards):
    """A small set under the default --batch study,256: the batch-256 row's error ended the run, its
    table and JSON lost, the rows measured before it only in the log. Now every row is in the table."""
    log = []
    rows = bench_train(shards, cases=[Case("lenet5", 28, 8, "ceiling"), Case("lenet5", 28, 256, "ceiling"),
                                      Case("lenet5", 28, 256, "fast")], warmup=0, steps=1, log=log.append)
    reason = "not measured: the train split holds 240 images, fewer than one batch of 256"
    assert [r["skipped"] for r in rows] == [None, reason, reason]
    assert rows[0]["images_per_s"] > 0 and rows[0]["of_ceiling"] == 1.0
    assert [(r["images_per_s"], r["rates"], r["of_ceiling"]) for r in rows[1:]] == [(None, [], None)] * 2
    assert log[1:] == [f"  lenet5@28 b256 ceiling: {reason}", f"  lenet5@28 b256 fast: {reason}"]
    assert format_table(rows, "x", environment("cpu"), 0, 1, 3).splitlines()[6:] == [
        f"| lenet5 | 28 | 256 | (a) ceiling: one batch on the device | no | {reason} | - | - | - |",
        f"| lenet5 | 28 | 256 | (c) fast path | no | {reason} | - | - | - |"]


def test_a_stopped_table_does_not_count_a_row_not_measured_as_measured(shards):
    """Stopped right after a row that says it was not measured (a batch larger than the split), the log
    and the table's header said "2 of 3 rows measured": one was."""
    log = []

    def stop_after_the_batch_256_row(line):
        log.append(line)
        if line.startswith("  lenet5@28 b256 "):
            raise KeyboardInterrupt
    rows = bench_train(shards, cases=[Case("lenet5", 28, 8, "ceiling"), Case("lenet5", 28, 256, "ceiling"),
                                      Case("lenet5", 28, 8, "fast")], warmup=0, steps=1, log=stop_after_the_batch_256_row)
    assert [r["skipped"] is None for r in rows] == [True, False]
    assert log[2:] == ["stopped after 2 of 3 rows"]
    assert format_table(rows, "x", environment("cpu"), 0, 1, 3, planned=3).splitlines()[3] == \
        "# stopped early after 2 of 3 rows"


def test_a_size_that_is_no_integer_is_named_in_clicks_words(shards):
    """`--size 28,x` said ''28,x' is not a comma-separated list', which it is; the item that is no integer now."""
    result = CliRunner().invoke(main, ["bench", "train", "--shards", str(shards), "--size", "28,x"])
    assert (result.exit_code, result.output) == (2, "error: Invalid value for '--size': 'x' is not a valid integer.\n")


def test_imagefolder_needs_images(shards):
    """Up front: found at feed d's first row, the error lost the rows of feeds a to c measured before it."""
    result = CliRunner().invoke(main, ["bench", "train", "--shards", str(shards), "--arch", "lenet5",
                                       "--feeds", "a,d", "--batch", "8", "--warmup", "0", "--steps", "1"])
    assert result.exit_code == 2
    assert result.output == (
        "error: --feeds d (the study's ImageFolder pipeline) needs --images FOLDER, an extracted release\n")


def test_imagefolder_of_other_classes_than_the_set_is_refused_up_front(shards, tmp_path):
    """A release of other classes than the set (a `--classes` subset beside its full release) failed in the
    loss with 'IndexError: Target 4 is out of bounds', a traceback after the rows of feeds a to c."""
    for wnid in ("n01", "n02"):
        (tmp_path / "train" / wnid).mkdir(parents=True)
    result = CliRunner().invoke(main, ["bench", "train", "--shards", str(shards), "--images", str(tmp_path),
                                       "--arch", "lenet5", "--batch", "8", "--warmup", "0", "--steps", "1"])
    assert (result.exit_code, result.output.splitlines()[-1]) == (2, (
        f"error: --images {tmp_path}: train/ holds 2 classes, the shard set 6; feed d "
        "labels every class folder, so it needs a release of exactly the set's classes"))


@pytest.mark.parametrize("command", ["train", "loader"])
@pytest.mark.parametrize("device, message", [
    ("tpu0", "argument --device: 'tpu0' is not a device; use cpu, cuda or cuda:N"),
    ("mps", "argument --device: tinyin runs on cpu or cuda, not mps"),
    pytest.param("cuda", f"argument --device: cuda, but torch {torch.__version__} sees no CUDA device here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without CUDA")),
])
def test_a_device_this_machine_lacks_is_one_line(shards, release, command, device, message):
    """torch's 'Found no NVIDIA driver' (or its list of device types) was a traceback."""
    extra = ["--arch", "lenet5"] if command == "train" else ["--images", str(release)]
    result = CliRunner().invoke(main, ["bench", command, "--shards", str(shards), "--device", device, *extra])
    assert (result.exit_code, result.output.splitlines()[-1]) == (2, f"error: {message}")


def test_cli_table_and_json(shards, release, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "train", "--shards", str(shards), "--images", str(release),
                                       "--arch", "lenet5", "--batch", "16", "--warmup", "1", "--steps", "1",
                                       "--workers", "0", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["env"]["torch"] == torch.__version__ and data["env"]["gpu"] is None and data["env"]["commit"]
    rows = data["rows"]
    assert [(r["arch"], r["size"], r["batch"], r["feed"], r["compiled"]) for r in rows] == [
        ("lenet5", 28, 16, feed, False) for feed in ("ceiling", "resident", "fast", "imagefolder")]
    assert rows[0]["of_ceiling"] == 1.0
    for r in rows:
        assert len(r["rates"]) == 3 and r["min"] <= r["images_per_s"] <= r["max"] and r["peak_bytes"] is None
        assert r["of_ceiling"] == r["images_per_s"] / rows[0]["images_per_s"]
    lines = [line for line in result.output.splitlines() if line.startswith(("#", "|"))]
    assert lines[0].startswith("# tinyin bench train")  # then sys.argv, which CliRunner leaves as pytest's
    # what was measured: the device asked for (it said "no GPU" under --device cpu, on any machine)
    assert f"), device cpu; torch {torch.__version__}, " in lines[1]
    assert lines[2] == "# complete SGD steps (lr 0.001, momentum 0.9); 1 warm-up step excluded; median of 3 windows of 1 step"
    assert lines[3] == "| model | input | batch | feed | compiled | images/s | min-max | of (a) | peak GPU memory |"
    assert [line.split(" | ")[3] for line in lines[5:]] == [
        "(a) ceiling: one batch on the device", "(b) resident loader", "(c) fast path", "(d) study: ImageFolder + PIL"]
    assert lines[5:] == format_table(rows, "x", environment("cpu"), 1, 1, 3).splitlines()[5:]


@pytest.mark.parametrize("env, shown", [
    (dict(device="cpu", gpu=None, cores=2), "2 cores ({cpu}), device cpu"),
    (dict(device="cuda:1", gpu="NVIDIA H100 80GB HBM3", cores=1), "1 core ({cpu}), device cuda:1 (NVIDIA H100 80GB HBM3)"),
])
def test_header_names_the_device_measured(env, shown):
    """Not "no GPU" under --device cpu on a machine with one: the device the rows ran on, and its GPU's name."""
    env = dict(environment("cpu"), **env)
    header = format_table([], "x", env, 0, 1, 3).splitlines()[1]
    assert header == (f"# commit {env['commit']}; {env['host']}: {shown.format(cpu=env['cpu'])}; "
                      f"torch {env['torch']}, torchvision {env['torchvision']}; {env['precision']}")


@pytest.mark.parametrize("n, steps, rows", [
    (1, "1 warm-up step excluded; median of 3 windows of 1 step", "0 of 1 row"),
    (2, "2 warm-up steps excluded; median of 3 windows of 2 steps", "0 of 2 rows")])
def test_the_header_counts_its_steps_and_rows_in_the_singular_for_one(n, steps, rows):
    """It said '1 warm-up steps', 'of 1 steps', 'after 0 of 1 rows'."""
    lines = format_table([], "x", environment("cpu"), n, n, 3, planned=n).splitlines()
    assert lines[2:4] == [f"# complete SGD steps (lr 0.001, momentum 0.9); {steps}", f"# stopped early after {rows}"]


def test_cli_sigterm_keeps_the_rows_measured(shards, tmp_path):
    """SIGTERM (a scheduler, gpu_session's --deadline) mid-table: the rows measured so far are
    printed and written, the table says it stopped early, and the exit is 128 + 15. SIGUSR1 as well:
    `test_cli_stopped_by_a_signal_keeps_the_rows_measured` (in this process: a process costs seconds)."""
    signum = signal.SIGTERM
    out = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "bench", "train", "--shards", str(shards),
                             "--arch", "lenet5", "--batch", "16", "--warmup", "0", "--steps", "50",
                             "--device", "cpu", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the first row's line: the second row is being measured now (rows two and three: 300 steps, some seconds
    # here, against the signal's microseconds; 20 steps a window left a fast machine a margin it could lose)
    first = proc.stderr.readline()
    assert first.startswith("  lenet5@28 b16 ceiling: "), first + proc.stderr.read()
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    data = json.loads(out.read_text())
    measured = len(data["rows"])
    assert data["planned"] == 3 and 1 <= measured < 3
    assert stderr.endswith(f"stopped after {measured} of 3 rows\n"), stderr
    lines = stdout.splitlines()
    assert lines[3] == f"# stopped early after {measured} of 3 rows"
    assert len([line for line in lines if line.startswith("| lenet5 |")]) == measured


def in_the_second_row(monkeypatch, act):
    """Call `act` as bench_train times its second row (a signal, an error raised); the others are timed as usual."""
    windows, started = bt.time_windows, []

    def timed(*args):
        started.append(args)
        if len(started) == 2:
            act()
        return windows(*args)
    monkeypatch.setattr(bt, "time_windows", timed)


def out_of_memory(message):
    """An `act` for `in_the_second_row`: the row runs out of GPU memory."""
    def act():
        raise torch.OutOfMemoryError(message)
    return act


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_cli_stopped_by_a_signal_keeps_the_rows_measured(shards, tmp_path, monkeypatch, signum):
    """SIGTERM, and SIGUSR1 (a scheduler's word before it preempts a job; it killed the bench where it stood, the
    rows lost), raised in this process as the second row is measured: exit 128 + the signal, the first row
    printed and written, the table says it stopped early."""
    in_the_second_row(monkeypatch, stop_by(signum))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "train", "--shards", str(shards), "--arch", "lenet5", "--batch", "16",
                                       "--warmup", "0", "--steps", "1", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 128 + signum, result.output
    data = json.loads(out.read_text())
    assert (data["planned"], len(data["rows"])) == (3, 1)
    assert result.stderr.endswith("stopped after 1 of 3 rows\n"), result.stderr
    lines = result.stdout.splitlines()
    assert lines[3] == "# stopped early after 1 of 3 rows"
    assert len([line for line in lines if line.startswith("| lenet5 |")]) == 1


def test_time_windows_times_only_its_windows_after_the_warm_up(monkeypatch):
    """Warm-up steps (slow here: compilation, cudnn's search) are not timed; each window counts its images
    over its own steps."""
    clock, calls = [0.0], []
    monkeypatch.setattr(bt.time, "perf_counter", lambda: clock[0])

    def step(images, labels):
        calls.append(len(labels))
        clock[0] += 100.0 if len(calls) <= 2 else 0.5 * len(calls)  # warm-up steps cost 100 s each

    batches = iter([(None, range(8))] * 2 + [(None, range(4))] * 6)
    rates = bt.time_windows(step, batches, torch.device("cpu"), warmup=2, steps=2, windows=3)
    assert calls == [8, 8, 4, 4, 4, 4, 4, 4]
    assert rates == [8 / (1.5 + 2.0), 8 / (2.5 + 3.0), 8 / (3.5 + 4.0)]


def test_a_row_is_the_median_of_its_windows_and_its_share_of_its_own_ceiling(shards, monkeypatch):
    """images/s is the windows' median (not their mean), min-max their range, and `of (a)` divides by the
    ceiling row of the same network, size, batch and compile setting; a batch of the whole split is measured."""
    windows = {("ceiling", 8, False): [10, 30, 20], ("fast", 8, False): [1, 9, 2], ("ceiling", 8, True): [40, 60, 50],
               ("resident", 8, True): [5, 5, 5], ("ceiling", 16, False): [100, 100, 100],
               ("fast", 16, False): [10, 10, 10], ("ceiling", 240, False): [7, 7, 7]}

    def batches(self, case):
        yield case
    monkeypatch.setattr(bt.Feeds, "batches", batches)
    monkeypatch.setattr(bt, "_model", lambda case, device, num_classes, cache: None)
    monkeypatch.setattr(bt, "make_step", lambda model, device: None)
    monkeypatch.setattr(bt, "time_windows", lambda step, batches, device, warmup, steps, windows_:
                        list(windows[(case := next(batches)).feed, case.batch, case.compiled]))
    cases = [Case("lenet5", 28, batch, feed, compiled) for feed, batch, compiled in windows]
    rows = bt.bench_train(shards, cases=cases, log=lambda line: None)
    assert [(r["feed"], r["batch"], r["compiled"], r["images_per_s"], r["min"], r["max"], r["of_ceiling"], r["skipped"])
            for r in rows] == [("ceiling", 8, False, 20, 10, 30, 1.0, None), ("fast", 8, False, 2, 1, 9, 0.1, None),
                               ("ceiling", 8, True, 50, 40, 60, 1.0, None), ("resident", 8, True, 5, 5, 5, 0.1, None),
                               ("ceiling", 16, False, 100, 100, 100, 1.0, None), ("fast", 16, False, 10, 10, 10, 0.1, None),
                               ("ceiling", 240, False, 7, 7, 7, 1.0, None)]


def test_imagefolder_feed_reads_a_macos_copy_as_the_build_does(shards, macos_copy):
    """Feed (d) over a release copied on macOS (an AppleDouble `._NAME.JPEG` beside each image) failed in PIL with
    an UnidentifiedImageError traceback: a batch of all 240 train images is the build's 40 of each class."""
    torch.manual_seed(0)
    images, labels = next(Feeds(shards, macos_copy, torch.device("cpu"), workers=0)._imagefolder("lenet5", 28, 240))
    assert images.shape == (240, 1, 28, 28) and labels.bincount().tolist() == [40] * 6


def test_the_imagefolder_feeds_workers_read_on_through_a_sigterm_to_the_group(shards, release):
    """A SIGTERM to the process group (a scheduler's `kill -TERM -PGID`, gpu_session's --deadline) reaches feed (d)'s
    DataLoader workers too: they died of it, and torch raised "DataLoader worker (pid(s) N) exited unexpectedly"
    as a traceback in the middle of the row. They now take the stream path's rule, as `tinyin bench loader`'s
    ImageFolder baseline does: stopping is the main process's job."""
    batches = Feeds(shards, release, torch.device("cpu"), workers=2)._imagefolder("lenet5", 28, 16)
    try:
        seen = len(next(batches)[1])
        workers = multiprocessing.active_children()
        assert len(workers) == 2
        subprocess.run(["kill", "-TERM", *(str(w.pid) for w in workers)], check=True)  # from another process
        seen += sum(len(labels) for _, labels in itertools.islice(batches, 14))  # the rest of the epoch
    finally:
        batches.close()
    assert seen == SYNTH["classes"] * SYNTH["train_per_class"]


@pytest.mark.parametrize("flag, value, message", [
    ("--arch", ",", "--arch: no network given; choose from: lenet5, alexnet, squeezenet1_1, resnet18"),
    ("--arch", "", "--arch: no network given; choose from: lenet5, alexnet, squeezenet1_1, resnet18"),
    ("--feeds", ",", "--feeds: no feed given; choose from: a (ceiling), b (resident), c (fast), d (imagefolder)"),
    ("--size", ",,", "--size: no size given; choose from: 28, 64, 224"),
    ("--batch", ",", "--batch: no batch size given; need positive integers or 'study'")])
def test_a_list_of_none_is_a_usage_error(shards, monkeypatch, flag, value, message):
    """`--arch ,` (or a script's empty variable) was read as not given: all four networks ran, and `--feeds ,` all
    the feeds, where `--batch ,` was refused (`plan`). They are refused so too."""
    monkeypatch.setattr(bt, "bench_train", lambda *a, **k: [])  # before, the rows it ran: not measured here
    result = CliRunner().invoke(main, ["bench", "train", "--shards", str(shards), "--device", "cpu", f"{flag}={value}"])
    assert (result.exit_code, result.output) == (2, f"error: {message}\n")


def test_the_tables_header_is_the_command_quoted_for_a_shell(tmp_path, monkeypatch):
    """The header `# tinyin bench train ...` is what a rerun pastes: a --shards or --json path with a space was
    written unquoted, and a shell split it in two."""
    argv = ["--shards", str(tmp_path / "my shards"), "--arch", "lenet5", "--device", "cpu", "--json", "b é.json"]
    monkeypatch.setattr(sys, "argv", ["tinyin", "bench", "train", *argv])
    monkeypatch.setattr(bt, "bench_train", lambda *a, **k: [])  # no row measured: the header is the point
    (tmp_path / "my shards").mkdir()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["bench", "train", *argv])
    assert result.output.splitlines()[0] == (
        f"# tinyin bench train --shards '{tmp_path}/my shards' --arch lenet5 --device cpu --json 'b é.json'")
    assert json.loads((tmp_path / "b é.json").read_text())["command"] == result.output.splitlines()[0][2:]


def test_a_row_that_fails_is_a_row_that_says_so_and_the_rows_after_it_are_measured(shards, monkeypatch):
    """A row out of GPU memory (or a compiler's error) ended the run in a traceback, its table and JSON lost, the
    rows measured before it only in the log: the row now says why, and the next rows are measured."""
    in_the_second_row(monkeypatch, out_of_memory("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore words"))
    log = []
    rows = bench_train(shards, cases=[Case("lenet5", 28, 8, "ceiling"), Case("lenet5", 28, 8, "resident"),
                                      Case("lenet5", 28, 8, "fast")], warmup=0, steps=1, log=log.append)
    reason = "failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
    assert [r["skipped"] for r in rows] == [None, reason, None]
    assert (rows[1]["images_per_s"], rows[1]["of_ceiling"]) == (None, None) and rows[2]["of_ceiling"] > 0
    assert log[1] == f"  lenet5@28 b8 resident: {reason}"
    assert format_table(rows, "x", environment("cpu"), 0, 1, 3).splitlines()[6] == (
        f"| lenet5 | 28 | 8 | (b) resident loader | no | {reason} | - | - | - |")


def test_a_table_with_a_row_that_failed_exits_1_naming_it_after_the_table_and_json(shards, monkeypatch, tmp_path):
    """`tinyin bench train` (and tools/bench_train.py, the same command) exited 0 with a row out of GPU memory in its
    table: a script or CI job could not tell. The table and JSON are written whole, then the failed rows named."""
    in_the_second_row(monkeypatch, out_of_memory("CUDA out of memory. Tried to allocate 2.00 GiB."))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "train", "--shards", str(shards), "--arch", "lenet5", "--batch", "16",
                                       "--warmup", "0", "--steps", "1", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[-1] == "error: 1 row failed: lenet5@28 b16 resident (the table says why)"
    rows = [line for line in result.stdout.splitlines() if line.startswith("| lenet5 |")]
    assert len(rows) == 3 and "| failed: OutOfMemoryError: CUDA out of memory." in rows[1]
    assert [r["skipped"] is None for r in json.loads(out.read_text())["rows"]] == [True, False, True]


def test_a_network_compiled_again_at_another_batch_is_compiled_for_its_shapes_alone(monkeypatch):
    """torch.compile kept what it had seen in the rows before: the second compiled lenet5 row (another batch) was
    compiled for any batch size (a SymInt in its graph's inputs), not for its own as train.py --compile's is."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([type(x).__name__ for x in example_inputs if not isinstance(x, torch.Tensor)])
        return gm.forward
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend=backend))
    cache = {}
    try:
        for batch in (8, 16):  # as bench_train's rows get their networks
            model = bt._model(Case("lenet5", 28, batch, "ceiling", True), torch.device("cpu"), 6, cache)
            model(torch.zeros(batch, 1, 28, 28))
    finally:
        torch._dynamo.reset()  # the graphs of this test's backend are no other test's
    assert graphs == [[], []]


def test_a_compiled_network_is_held_by_its_own_rows_alone(shards, monkeypatch):
    """The compiled network that (a) and (b) share was kept until the next one was compiled: its weights and
    gradients were in the memory (and the peak) of the eager (b), (c) and (d) rows between and after them. The two
    compiled rows now run back to back, after the eager ones, and no other row holds it."""
    compiled, held = [], []
    compile_ = torch.compile

    def compile_and_note(model):
        compiled.append(weakref.ref(model := compile_(model)))
        return model

    def note_the_compiled_networks_alive(model, *args):
        alive = [ref() for ref in compiled if ref() is not None]
        held.append((model in alive, len(alive), len(compiled)))
        return [1.0, 1.0, 1.0]
    monkeypatch.setattr(torch, "compile", compile_and_note)
    monkeypatch.setattr(bt, "make_step", lambda model, device: model)  # what each row's steps would train
    monkeypatch.setattr(bt.Feeds, "batches", lambda self, case: (batch for batch in ()))
    monkeypatch.setattr(bt, "time_windows", note_the_compiled_networks_alive)
    cases = plan(["lenet5"], None, ("8", "16"), ("a", "b", "c"), compile=True)
    rows = bench_train(shards, cases=cases, log=lambda line: None)
    assert [(r["batch"], r["feed"], r["compiled"], r["skipped"]) for r in rows] == [
        (batch, feed, compiled, None) for batch in (8, 16) for feed, compiled in (
            ("ceiling", False), ("resident", False), ("fast", False), ("ceiling", True), ("resident", True))]
    # (its own network compiled, compiled networks alive, compiled so far), row by row
    assert held == [(False, 0, 0), (False, 0, 0), (False, 0, 0), (True, 1, 1), (True, 1, 1),
                    (False, 0, 1), (False, 0, 1), (False, 0, 1), (True, 1, 2), (True, 1, 2)]
