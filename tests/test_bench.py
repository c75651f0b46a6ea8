"""`bench_loader` on the synthetic set: every row measured, the local paths' first batch timed; `bench_remote`:
the loopback-HTTP rows, with curl's rate as their ceiling."""
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import bench
from pipeline.bench import bench_remote, format_table
from pipeline.provenance import commit
from pipeline.shardset import ShardSet, open_shard_set
from tests.conftest import SYNTH, refuse_writes_in, stop_by


def test_loader_table_has_the_first_batch_of_the_local_paths(shards, monkeypatch):
    monkeypatch.setattr(bench, "FAST_PASS", 1000)  # a few epochs of the 240-sample set, not 100,000 images
    monkeypatch.setattr(bench, "PROBE_S", 0)  # the deciding pass: 240 images, not half a second a row
    rows = bench.bench_loader(shards, None, batch_size=64, workers=0, passes=1, pass_images=240, variants=("gray28",),
                              include_baseline=False, log=lambda m: None)
    first = {r["loader"]: r.get("first_batch_s") for r in rows}
    assert len(rows) == bench.planned_rows(("gray28",), include_baseline=False)
    assert list(first) == ["stock webdataset (tar members, npy decode)", "tinyin stream (whole shards)", "tinyin fast (mmap gather)", "tinyin resident",
                           "ceiling: numpy memmap gather"]
    assert first["tinyin fast (mmap gather)"] > 0 and first["tinyin resident"] > 0
    assert first["tinyin stream (whole shards)"] is None is first["stock webdataset (tar members, npy decode)"] and all(r["images_per_s"] > 0 for r in rows)
    assert all(r["data_pass_s"] >= r["first_batch_s"] for r in rows if r.get("first_batch_s"))
    # The stream path begins each epoch by reading whole shards: timed over passes cut mid-epoch, it read
    # 2.5-3.5x below its rate over whole epochs (real set: 14-20k against 50-56k rgb64 images/s).
    assert {r["loader"]: r["pass"] for r in rows}["tinyin stream (whole shards)"] == "240 images (whole epochs)"
    table = bench.format_table(rows, "test", 64).splitlines()
    cores = f"{os.cpu_count()} core{'s' * (os.cpu_count() != 1)}"
    assert table[:2] == ["# test", f"# commit {commit()}; {platform.node()}: {cores}, torch "
                         f"{torch.__version__}, batch 64, train split, shuffled, median of passes"]
    assert table[2].endswith("| pass | first batch (data pass done) |")
    assert table[4].endswith("| — |") and table[5].endswith("| — |") and table[6].endswith(" s) |") and table[8].endswith("| — |")


@pytest.mark.parametrize("cores, said", [(1, "1 core"), (2, "2 cores")])
def test_the_tables_header_says_one_core_in_the_singular(monkeypatch, cores, said):
    monkeypatch.setattr(bench.os, "cpu_count", lambda: cores)
    assert bench.format_table([], "test", 64).splitlines()[1] == (
        f"# commit {commit()}; {platform.node()}: {said}, torch {torch.__version__}, batch 64, train split, shuffled, "
        "median of passes")


def test_the_planned_rows_are_counted_from_the_loaders_the_table_measures(shards, monkeypatch):
    """planned_rows restated bench_loader's loaders as a number (5, one more with the baseline, one with a
    device) and bench_remote's rows as another (4, 2 without curl): it counts the same lists now, so a loader
    added to the table is in the plan of a stopped one."""
    assert [bench.planned_rows(device=device) for device in ("cpu", "cuda:0")] == [12, 14]  # 2 variants
    assert bench.planned_rows((), remote=True) == len(bench.REMOTE_ROWS) - (not shutil.which("curl")) * 2
    monkeypatch.setattr(bench, "FAST_PASS", 1000)
    monkeypatch.setattr(bench, "PROBE_S", 0)
    loaders = bench._loaders
    extra = ("extra", 0, lambda: lambda epoch: [(None, [0] * 240)])
    monkeypatch.setattr(bench, "_loaders", lambda *args: [*loaders(*args), extra])
    rows = bench.bench_loader(shards, None, batch_size=64, workers=0, passes=1, pass_images=240, variants=("gray28",),
                              include_baseline=False, log=lambda m: None)
    assert [len(rows), rows[-1]["loader"]] == [bench.planned_rows(("gray28",), include_baseline=False), "extra"] == [6, "extra"]


def test_remote_rows_fetch_the_train_split_and_name_their_ceiling(shards):
    rows = bench_remote(shards, batch_size=32, workers=0, passes=1, log=lambda m: None)
    names = [r["loader"] for r in rows]
    assert len(rows) == bench.planned_rows((), remote=True)
    fetch = rows[names.index("remote fetch (cold cache -> checked copy)")]
    assert names[-1] == "remote stream (make_loader(URL, path=stream))" and fetch["images_per_s"] > 0
    if shutil.which("curl"):
        assert names[:2] == ["ceiling: curl, loopback HTTP (1 connection)", "curl -o: the shards downloaded into files"]
        assert rows[0]["of_ceiling"] == 1.0 and rows[1]["images_per_s"] > 0
        assert fetch["of_ceiling"] == fetch["images_per_s"] / rows[0]["images_per_s"]
    assert "| remote fetch (cold cache -> checked copy) |" in format_table(rows, "cmd", 32)


def test_bench_loader_remote_only_needs_no_images(shards):
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["bench", "loader", "--shards", str(shards)])
    assert result.exit_code == 2 and "--images is required (the ImageFolder baseline reads it), unless --remote-only" in result.output
    result = CliRunner().invoke(main, ["bench", "loader", "--shards", str(shards), "--remote-only", "--passes", "1",
                                       "--workers", "0", "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    loaders = [line.split(" | ")[1] for line in result.stdout.splitlines() if line.startswith("| rgb64")]
    assert loaders[-2:] == ["remote fetch (cold cache -> checked copy)", "remote stream (make_loader(URL, path=stream))"]


def test_a_remote_stream_row_that_fails_says_so_and_the_table_exits_1_naming_it(shards, monkeypatch, tmp_path):
    """A stream path that failed on the set URL (a bad shard, a server's error) was a row saying "not on this
    branch: ..." (words from before the stream path read set URLs), and `tinyin bench loader` exited 0: a script
    or CI job could not tell. The row says it failed, and after the table and JSON the command exits 1 naming it."""
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.errors import ShardError

    def failing(*args, **kwargs):
        raise ShardError("http://127.0.0.1:1/train-000000.tar: short read\nmore words")
    monkeypatch.setattr(bench, "make_loader", failing)
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(main, ["bench", "loader", "--shards", str(shards), "--remote-only", "--passes", "1",
                                       "--workers", "0", "--batch-size", "32", "--json", str(out)])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[-1] == (
        "error: 1 row failed: remote stream (make_loader(URL, path=stream)) (the table says why)")
    why = "failed: ShardError: http://127.0.0.1:1/train-000000.tar: short read"
    assert result.stdout.splitlines()[-1] == f"| rgb64 | remote stream (make_loader(URL, path=stream)) | 0 | — | — | — | {why} | — |"
    assert json.loads(out.read_text())[-1]["pass"] == why


def test_the_ceilings_copy_of_the_split_is_removed_when_stopped(shards, tmp_path, monkeypatch):
    """A Ctrl-C while the ceiling row wrote its flat copy of the split left the file (real set: 1.2 GB) in /tmp."""
    monkeypatch.setattr(bench.tempfile, "tempdir", str(tmp_path))

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench.ShardArrays, "load_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench._ceiling(shards, "gray28", 64)
    assert list(tmp_path.iterdir()) == []


def test_a_fast_loader_is_not_read_as_slow_from_a_pass_of_one_batch(monkeypatch):
    """At `--pass-images 256` the deciding pass was one batch, mostly the epoch's start: a loader of
    ~250k images/s (10 batches of 256 an epoch, 10 ms to start one) read as 25k/s, slow, and was timed
    over 256-image passes that measure its start. Time is a fake clock here: the test does not depend
    on this machine's speed."""
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def epoch_iter(epoch):
        clock[0] += 0.01  # the start of an epoch
        for _ in range(10):
            clock[0] += 1e-6
            yield None, range(256)
    assert bench._measure(epoch_iter, passes=1, pass_images=256)[1] == "100,000 images (whole epochs)"


@pytest.mark.parametrize("command", ["loader", "train"])
def test_images_without_a_train_folder_is_a_usage_error(shards, tmp_path, command):
    """It failed in torchvision's ImageFolder with a FileNotFoundError traceback (bench train: after the
    rows of feeds a to c had run)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["bench", command, "--shards", str(shards), "--images", str(tmp_path)])
    assert (result.exit_code, result.output) == (
        2, f"error: --images {tmp_path}: no train/ folder; pass the extracted release (ROOT/train/WNID/images)\n")


@pytest.mark.parametrize("command", ["loader", "train"])
def test_an_empty_shards_is_refused_as_train_py_refuses_it(shards, tmp_path, monkeypatch, command):
    """`--shards ''` (an unset shell variable) was the current folder: a set in it was measured, or a loader
    refused a folder named nowhere (`error: : no such folder` and the like). train.py refuses it."""
    from click.testing import CliRunner

    from pipeline.cli import main

    monkeypatch.chdir(shards)
    result = CliRunner().invoke(main, ["bench", command, "--shards", "", "--remote-only" if command == "loader" else
                                       "--arch=lenet5"])
    assert (result.exit_code, result.output) == (2, "error: argument --shards: empty; give a path\n")


@pytest.mark.parametrize("flag", ["--images", "--json"])
@pytest.mark.parametrize("command", ["loader", "train"])
def test_an_empty_images_or_json_is_refused_as_tools_bench_loader_refuses_it(release, shards, monkeypatch, command,
                                                                             flag):
    """`--images "$DATA"` with DATA unset, in the release's folder: the current folder was measured as the
    ImageFolder baseline's, without a word (elsewhere: 'error: --images : no train/ folder'); --json '' was 'a
    folder'. tools/bench_loader.py refuses both as train.py refuses an empty path."""
    from click.testing import CliRunner

    from pipeline.cli import main

    def measured(*args, **kwargs):
        raise AssertionError("measured")

    monkeypatch.setattr("pipeline.bench.bench_loader", measured)
    monkeypatch.setattr("pipeline.bench_train.bench_train", measured)
    monkeypatch.chdir(release)
    result = CliRunner().invoke(main, ["bench", command, "--shards", str(shards), "--images", str(release), flag, ""])
    assert (result.exit_code, result.output) == (2, f"error: argument {flag}: empty; give a path\n")


@pytest.mark.parametrize("command", ["loader", "train"])
def test_shards_defaults_to_readmes_folder_as_train_pys_does(shards, tmp_path, monkeypatch, command):
    """`--shards` was required of the bench commands alone: README's `tinyin shard build --out data/shards` and
    train.py's default did not carry over. A missing default is said to be one, with how to make it."""
    from click.testing import CliRunner

    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["bench", command, *(["--remote-only"] if command == "loader" else ["--arch", "lenet5", "--size", "28",
            "--batch", "8", "--feeds", "a", "--warmup", "0", "--steps", "1", "--json", "rows.json"])]
    result = CliRunner().invoke(main, argv)
    assert (result.exit_code, result.output) == (
        1, "error: --shards data/shards (the default): no shard set there; build one with "
           "`tinyin shard build --src RELEASE --out data/shards`, or pass --shards\n")
    if command == "train":  # the default read: a row measured (the loader's rows serve the set over HTTP: slower)
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "shards").symlink_to(shards)
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 0, result.output
        assert [(r["arch"], r["feed"]) for r in json.loads((tmp_path / "rows.json").read_text())["rows"]] == [
            ("lenet5", "ceiling")]


def _run_tool(monkeypatch, script, *argv):
    """tools/`script` run as a script with `argv`, in this process: the SystemExit it ends with (code None
    when it returns)."""
    import runpy
    import sys
    from pathlib import Path

    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    try:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / script), run_name="__main__")
    except SystemExit as stopped:
        return stopped
    return SystemExit()


def test_bench_loader_script_without_the_release_is_one_line(monkeypatch, tmp_path):
    """README's `tools/bench_loader.py` on a machine without ../shared/data: a SourceError traceback."""
    missing = tmp_path / "tiny-imagenet-200.tar.gz"
    assert _run_tool(monkeypatch, "bench_loader.py", "--src", missing).code == f"error: {missing}: not found (pass --src)"


def test_bench_loader_script_checks_images_before_the_build(monkeypatch, capsys, release, tmp_path):
    """--images with no train/ was found after the build of --src (a minute on the real release)."""
    assert _run_tool(monkeypatch, "bench_loader.py", "--src", release, "--images", tmp_path).code == 2
    assert capsys.readouterr().err == (f"error: --images {tmp_path}: no train/ folder; pass the extracted release "
                                       "(ROOT/train/WNID/images)\n")


def test_bench_loader_script_on_a_folder_that_is_no_set_is_one_line(monkeypatch, capsys, release, tmp_path):
    """It was a ShardError traceback."""
    assert _run_tool(monkeypatch, "bench_loader.py", "--shards", tmp_path, "--images", release).code == 1
    assert capsys.readouterr().err == (f"error: {tmp_path}: not a tinyin shard set (no manifest.json); "
                                       "run `tinyin shard build` first\n")


def test_bench_loader_script_on_an_archive_of_no_release_is_one_line(monkeypatch, capsys, shards, tmp_path):
    """With --shards given, no build read --src first: it was a StopIteration traceback (an archive
    without wnids.txt) or tarfile's ReadError (no archive at all), after the extraction."""
    import tarfile

    (tmp_path / "notes.txt").write_text("not a release")
    archive = tmp_path / "other.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "notes.txt", "notes.txt")
    for src, message in ((archive, "missing wnids.txt (not a Tiny ImageNet release)"),
                         (tmp_path / "notes.txt", "unreadable archive (not a folder, .zip or .tar[.gz])")):
        assert _run_tool(monkeypatch, "bench_loader.py", "--shards", shards, "--src", src).code == 1
        assert capsys.readouterr().err == f"error: {src}: {message}\n"


@pytest.mark.parametrize("name, reason", [("none", "no such folder"), ("file", "a file, not a shard folder")])
def test_bench_shards_that_is_no_folder_is_said_as_train_says_it(monkeypatch, capsys, release, tmp_path, name, reason):
    """The bench commands' --shards was click's usage error (exit 2, `Invalid value for '--shards': Directory
    '...' does not exist.`), where train.py and `shard verify` say a missing set in their words, exit 1."""
    from click.testing import CliRunner

    from pipeline.cli import main

    (tmp_path / "file").write_bytes(b"")
    expected = f"error: --shards {tmp_path / name}: {reason}\n"
    for command in ("loader", "train"):
        result = CliRunner().invoke(main, ["bench", command, "--shards", str(tmp_path / name)])
        assert (result.exit_code, result.output) == (1, expected)
    assert _run_tool(monkeypatch, "bench_loader.py", "--shards", tmp_path / name, "--images", release).code == 1
    assert capsys.readouterr().err == expected


TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.mark.parametrize("flag, value", [("--images", "{tmp}"), ("--images", "{tmp}/none"), ("--images", "{tmp}/file"),
                                         ("--json", "{tmp}/no/rows.json"), ("--json", "{tmp}"),
                                         ("--json", "{tmp}/" + "j" * 300 + ".json")])
def test_the_bench_command_and_tool_name_a_mistake_alike(monkeypatch, capsys, shards, release, tmp_path, flag, value):
    """`tinyin bench loader` and tools/bench_loader.py checked --images and --json each in its own words: one
    mistake, two messages (`Invalid value for '--json': File 'DIR' is a directory.`, `--json DIR: a folder; ...`)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    (tmp_path / "file").write_bytes(b"")
    args = ["--shards", str(shards), "--images", str(release), flag, value.format(tmp=tmp_path)]
    result = CliRunner().invoke(main, ["bench", "loader", *args])
    assert (_run_tool(monkeypatch, "bench_loader.py", *args).code, capsys.readouterr().err) == (2, result.output)
    assert result.exit_code == 2 and result.output.startswith(f"error: {flag} {value.format(tmp=tmp_path)}: ")


@pytest.mark.parametrize("flag, value", [("--passes", "0"), ("--batch-size", "-1"), ("--workers", "-1"),
                                         ("--passes", "x")])
def test_the_bench_command_and_tool_name_a_bad_number_alike(monkeypatch, capsys, shards, release, flag, value):
    """tools/bench_loader.py said `argument --passes: must be at least 1, not 0` (argparse's words; `--passes x`:
    its usage and `invalid int value`, three lines), `tinyin bench loader` click's: one mistake, two messages."""
    from click.testing import CliRunner

    from pipeline.cli import main

    args = ["--shards", str(shards), "--images", str(release), flag, value]
    result = CliRunner().invoke(main, ["bench", "loader", *args])
    assert (_run_tool(monkeypatch, "bench_loader.py", *args).code, capsys.readouterr().err) == (2, result.output)
    assert result.exit_code == 2 and result.output.startswith(f"error: Invalid value for '{flag}': ")


@pytest.mark.parametrize("tool, args, code, message", [
    ("bench_build.py", ["--src", "{shards}"], 1, "{shards}: missing wnids.txt (not a Tiny ImageNet release)"),
    ("bench_build.py", ["--src", "{shards}", "--repeat", "0"], 2, "argument --repeat: must be at least 1, not 0"),
    ("bench_build.py", ["--src", "{shards}", "--workers", "-1"], 2, "argument --workers: must be at least 1, not -1"),
    ("bench_loader.py", ["--shards", "{shards}", "--images", "{tmp}"], 2,
     "--images {tmp}: no train/ folder; pass the extracted release (ROOT/train/WNID/images)"),
    ("bench_loader.py", ["--shards", "{shards}", "--images", "{tmp}", "--device", "mps"], 2,
     "argument --device: tinyin runs on cpu or cuda, not mps"),
    ("bench_loader.py", ["--shards", "{shards}", "--images", "{tmp}", "--passes", "0"], 2,
     "Invalid value for '--passes': 0 is not in the range x>=1."),
    ("bench_loader.py", ["--shards", "{shards}", "--images", "{tmp}", "--json", "{tmp}/no/rows.json"], 2,
     "--json {tmp}/no/rows.json: no folder {tmp}/no to write it in"),
    ("bench_loader.py", ["--shards", "{shards}", "--images", "{tmp}", "--json", "{tmp}"], 2,
     "--json {tmp}: a folder; name a file in it to write the rows in"),
])
def test_the_bench_tools_name_a_users_mistake_in_one_line(shards, tmp_path, monkeypatch, capsys, tool, args, code,
                                                          message):
    """bench_build's --repeat 0 printed an empty table, its --workers -1 was a ValueError traceback.
    Tracebacks: the build's SourceError, torchvision's FileNotFoundError after the build, a --device
    the loaders refuse found only at the resident row, after the baseline's minutes, --passes 0 (no median)
    after the baseline's warm-up, and a --json in no folder or naming one, found after all the measuring.
    (In this process: a process of its own paid torch's import for each; test_help runs each tool as one.)"""
    fill = lambda text: text.format(shards=shards, tmp=tmp_path)  # noqa: E731
    assert (_run_tool(monkeypatch, tool, *map(fill, args)).code, capsys.readouterr().err) == (code, f"error: {fill(message)}\n")


@pytest.mark.parametrize("command", ["loader", "train"])
def test_bench_json_in_no_folder_is_refused_before_measuring(shards, tmp_path, command):
    """Written after the measuring, it was a FileNotFoundError traceback then (the rows only on stdout)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["bench", command, "--shards", str(shards), "--json", str(tmp_path / "no" / "r.json")])
    assert (result.exit_code, result.output) == (
        2, f"error: --json {tmp_path / 'no' / 'r.json'}: no folder {tmp_path / 'no'} to write it in\n")


@pytest.mark.parametrize("command", ["loader", "train"])
def test_bench_json_ending_in_a_slash_is_refused_before_measuring(shards, tmp_path, monkeypatch, command):
    """`--json results/` (no such folder): bench loader's write failed after the measuring, an IsADirectoryError
    traceback, the rows only on stdout; bench train wrote them into a file named `results`."""
    from click.testing import CliRunner

    from pipeline.cli import main

    def measured(*args, **kwargs):
        raise AssertionError("measured")

    monkeypatch.setattr("pipeline.bench.bench_remote", measured)
    monkeypatch.setattr("pipeline.bench_train.bench_train", measured)
    path = f"{tmp_path / 'results'}/"
    result = CliRunner().invoke(main, ["bench", command, "--shards", str(shards), "--json", path,
                                       "--remote-only" if command == "loader" else "--arch=lenet5"])
    assert (result.exit_code, result.output) == (
        2, f"error: --json {path}: a folder's name (it ends in '/'); name a file to write the rows in\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["loader", "train"])
def test_bench_json_with_a_name_over_name_max_is_named(shards, tmp_path, command):
    """It said 'File name too long: PATH' (exit 1), naming neither the name nor the limit, as --out elsewhere did."""
    from click.testing import CliRunner

    from pipeline.cli import main

    path = tmp_path / ("j" * 300 + ".json")
    result = CliRunner().invoke(main, ["bench", command, "--shards", str(shards), "--json", str(path)])
    assert (result.exit_code, result.output) == (
        2, f"error: --json {path}: the name '{'j' * 24}...{'j' * 3}.json' is 305 bytes, more than the 255 a name may "
           "have; choose a shorter name\n")


@pytest.mark.parametrize("command", ["loader", "train"])
def test_bench_json_in_a_folder_it_may_not_write_in_is_refused_before_measuring(shards, tmp_path, command,
                                                                                monkeypatch):
    """A --json in a shared results folder of another user's (or on a read-only mount) failed after the
    measuring (minutes of it): 'error: Permission denied: FILE', bench train's command and environment lost.
    (The refusal is the kernel's to any write-open there; root, running the tests, may write anywhere.)"""
    from click.testing import CliRunner

    from pipeline.cli import main

    folder = tmp_path / "theirs"
    folder.mkdir()
    refuse_writes_in(monkeypatch, folder)
    result = CliRunner().invoke(main, ["bench", command, "--shards", str(shards), "--json", str(folder / "r.json")])
    assert (result.exit_code, result.output) == (
        2, f"error: --json {folder / 'r.json'}: cannot write in {folder} (Permission denied)\n")


@pytest.mark.parametrize("signum, line", [(signal.SIGTERM, "terminated"), (signal.SIGUSR1, "stopped by SIGUSR1")])
def test_bench_build_stopped_by_sigterm_removes_its_temporary_build(release, tmp_path, signum, line):
    """SIGTERM (kill, timeout, a scheduler) ended tools/bench_build.py at once and left its temporary
    folder, the partial build in it (on the real release up to 1.5 GB in /tmp), as Ctrl-C does not. So did
    SIGUSR1 (a scheduler's word before it preempts a job), without a line."""
    import time

    proc = subprocess.Popen([sys.executable, str(TOOLS / "bench_build.py"), "--src", str(release), "--repeat", "100"],
                            env=dict(os.environ, TMPDIR=str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob("tinyin-bench-build-*")):  # a build is under way
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stderr) == (128 + signum, f"{line}\n")
    assert list(tmp_path.iterdir()) == []



@pytest.mark.parametrize("hooked", ["mkdtemp", "rmtree"])
def test_bench_build_sigterm_at_its_temporary_folder_removes_it(tmp_path, monkeypatch, hooked):
    """A SIGTERM just after bench_build made its temporary folder (before the `try` that removes it) or
    while it removed it left the folder: the test above failed so under load (5 runs in 30, a delay in
    the signal handler's eval break)."""
    import importlib.util
    import tempfile

    from pipeline.errors import Terminated, sigterm_interrupts

    spec = importlib.util.spec_from_file_location("bench_build", TOOLS / "bench_build.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def build_shards(src, out, **kwargs):  # a build's files, at once
        out.mkdir()
        (out / "manifest.json").write_text("{}")
        return {"counts": {"train": 1}}

    real_mkdtemp, real_rmtree = tempfile.mkdtemp, shutil.rmtree

    def mkdtemp(*args, **kwargs):  # the signal's handler runs in raise_signal
        folder = real_mkdtemp(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)
        return folder

    def rmtree(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return real_rmtree(*args, **kwargs)
    monkeypatch.setattr(tool, "build_shards", build_shards)
    monkeypatch.setattr(tempfile if hooked == "mkdtemp" else shutil, hooked, {"mkdtemp": mkdtemp, "rmtree": rmtree}[hooked])
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(sys, "argv", ["bench_build.py", "--src", str(tmp_path)])
    with pytest.raises(Terminated), sigterm_interrupts():
        tool.main()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_bench_build_tables_each_builds_images_seconds_and_rate(tmp_path, monkeypatch, capsys):
    """The table's figures, over a fake clock: a run's images are the manifest's counts, its rate images over
    seconds; the header names the workers asked for, or all cores."""
    import importlib.util
    import tempfile
    import time

    spec = importlib.util.spec_from_file_location("bench_build", TOOLS / "bench_build.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(tool, "build_shards", lambda src, out, **kwargs: {"counts": {"train": 3000, "val": 1000}})
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    for argv, workers in (["--repeat", "2", "--workers", "3"], 3), ([], os.cpu_count()):
        clock = iter([100.0, 102.0, 110.0, 114.0])  # the builds take 2 s and 4 s
        monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
        monkeypatch.setattr(sys, "argv", ["bench_build.py", "--src", str(tmp_path), *argv])
        tool.main()
        rows = ["| 1 | 4,000 | 2.0 | 2,000 |", "| 2 | 4,000 | 4.0 | 1,000 |"]
        assert capsys.readouterr().out.splitlines() == [
            f"# tinyin shard build: bench_build.py --src {tmp_path}{''.join(' ' + a for a in argv)}",
            f"# commit {commit()}; {platform.node()}, {os.cpu_count()} cores, workers={workers}, src={tmp_path}",
            "| run | images | seconds | images/s |", "|---|---|---|---|", *rows]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_build_imports_numpy_random_with_its_module():
    """numpy imports numpy.random at its first use, and the build's first (the train order) came under
    the SIGTERM handler: a SIGTERM while it imported was lost (Cython's module setup wraps a call in a
    bare `except: pass`; importlib's module-lock callback prints `Exception ignored`), tools/bench_build.py
    went on through its 100 builds and exited 0 (the test above it failed so, 2 runs in 30 under load), or
    was an ImportError traceback. Imported with pipeline.build, before the handler."""
    out = subprocess.run([sys.executable, "-c", "import sys, pipeline.build; print('numpy.random' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    assert out == "True\n"


def _stop_the_loader_bench_at_row(monkeypatch, stop_at, stop):
    """bench_loader's loaders and their timing faked: row i (from 1) measures 1,000 * i images/s, and
    the `stop_at`-th calls `stop()` instead (a Ctrl-C or a SIGTERM in the middle of its passes)."""
    rows = []

    def measure(epoch_iter, passes, pass_images):
        rows.append(pass_images)
        if len(rows) == stop_at:
            stop()
        return 1000.0 * len(rows), f"{pass_images:,} images"
    for name in ("_imagefolder", "_stock_webdataset", "_stream_loader", "_timed_loader", "_ceiling"):
        monkeypatch.setattr(bench, name, lambda *args, **kwargs: (lambda epoch: iter(())))
    monkeypatch.setattr(bench, "_measure", measure)


def _ctrl_c():
    raise KeyboardInterrupt


# The table's rows when stopped in gray28's second row (of 12 planned): rgb64's six, gray28's baseline. Ratios
# to a row not measured (gray28's ceiling) are '—'.
STOPPED_ROWS = [
    "| rgb64 | ImageFolder + PIL (baseline) | 2 | 1,000 | 1.0× | 17% | 25,600 images | — |",
    "| rgb64 | stock webdataset (tar members, npy decode) | 2 | 2,000 | 2.0× | 33% | 25,600 images | — |",
    "| rgb64 | tinyin stream (whole shards) | 2 | 3,000 | 3.0× | 50% | 25,600 images | — |",
    "| rgb64 | tinyin fast (mmap gather) | 0 (inline) | 4,000 | 4.0× | 67% | 25,600 images | — |",
    "| rgb64 | tinyin resident | 0 | 5,000 | 5.0× | 83% | 25,600 images | — |",
    "| rgb64 | ceiling: numpy memmap gather | 0 | 6,000 | 6.0× | 100% | 25,600 images | — |",
    "| gray28 | ImageFolder + PIL (baseline) | 2 | 7,000 | 1.0× | — | 25,600 images | — |",
]


@pytest.mark.parametrize("stop, code", [(_ctrl_c, 130), (stop_by(signal.SIGTERM), 143), (stop_by(signal.SIGUSR1), 138)])
def test_bench_loader_stopped_keeps_the_rows_measured(shards, release, tmp_path, monkeypatch, stop, code):
    """A Ctrl-C or SIGTERM in the middle printed `interrupted` (`terminated`) and lost the table and the
    --json rows, those measured only in the stderr log. Now they are printed and written, the table says
    it stopped early, and the exit is 128 + the signal. SIGUSR1 as well (a process of the command stopped
    by it: `test_bench_loader_stopped_by_a_signal_keeps_the_rows_measured`)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    _stop_the_loader_bench_at_row(monkeypatch, 8, stop)
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(main, ["bench", "loader", "--shards", str(shards), "--images", str(release),
                                       "--json", str(out)])
    assert result.exit_code == code, result.output
    lines = result.stdout.splitlines()
    assert lines[2] == "# stopped early after 7 of 12 rows"
    assert lines[5:] == STOPPED_ROWS
    assert result.stderr.splitlines()[-1] == "stopped after 7 of 12 rows"
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["images_per_s"], r["x_baseline"], r["of_ceiling"]) for r in rows[5:]] == [
        ("rgb64", 6000.0, 6.0, 1.0), ("gray28", 7000.0, 1.0, None)]


@pytest.mark.parametrize("command, signum", [(["-m", "pipeline.cli", "bench", "loader"], signal.SIGTERM),
                                             ([str(TOOLS / "bench_loader.py")], signal.SIGUSR1)])
def test_bench_loader_stopped_by_a_signal_keeps_the_rows_measured(shards, release, tmp_path, signum, command):
    """SIGTERM, and SIGUSR1 (a scheduler's word before it preempts a job), to `tinyin bench loader` (and
    tools/bench_loader.py) as it measures: the rows so far printed and written, exit 128 + the signal. (SIGUSR1
    killed it where it stood, without a line, the rows measured lost.) A process each, one signal each (a
    process costs seconds, torch's import); each signal to each of them, raised in this process:
    `test_bench_loader_stopped_keeps_the_rows_measured`, `test_bench_loader_script_stopped_keeps_the_rows_measured`."""
    out = tmp_path / "rows.json"
    proc = subprocess.Popen([sys.executable, *command, "--shards", str(shards), "--images", str(release),
                             "--pass-images", "256", "--passes", "1", "--workers", "0", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()  # the baseline's row: the next one is being measured now
    assert first.startswith("  rgb64  ImageFolder + PIL (baseline) "), first + proc.stderr.read()
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    measured = len(json.loads(out.read_text()))
    assert (proc.returncode, stderr, stdout.splitlines()[2]) == (
        128 + signum, f"stopped after {measured} of 12 rows\n", f"# stopped early after {measured} of 12 rows")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_bench_loader_script_stopped_keeps_the_rows_measured(shards, release, tmp_path, monkeypatch, capsys, signum):
    """tools/bench_loader.py, as `tinyin bench loader`: its own table and --json were lost as well."""
    _stop_the_loader_bench_at_row(monkeypatch, 8, stop_by(signum))
    out = tmp_path / "rows.json"
    assert _run_tool(monkeypatch, "bench_loader.py", "--shards", shards, "--images", release, "--json", out).code == \
        128 + signum
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "# stopped early after 7 of 12 rows"
    assert lines[5:] == STOPPED_ROWS
    assert len(json.loads(out.read_text())) == 7


def test_the_bench_tool_takes_the_commands_pass_images(shards, release, monkeypatch, capsys):
    """tools/bench_loader.py had no --pass-images (`tinyin bench loader` has): 'unrecognized arguments'. It takes
    it now, read as the command reads it: the same rows, each pass of the images asked, and the same refusal."""
    from click.testing import CliRunner

    from pipeline.cli import main

    args = ["--shards", str(shards), "--images", str(release), "--pass-images", "512"]
    _stop_the_loader_bench_at_row(monkeypatch, 0, _ctrl_c)  # never stopped
    result = CliRunner().invoke(main, ["bench", "loader", *args])
    _stop_the_loader_bench_at_row(monkeypatch, 0, _ctrl_c)  # counting from the first row again
    assert _run_tool(monkeypatch, "bench_loader.py", *args).code is None
    table = capsys.readouterr().out.splitlines()
    assert table[2:] == result.stdout.splitlines()[2:] and len(table) == 2 + 2 + 12
    assert all(line.endswith("| 512 images | — |") for line in table[4:])
    args[-1] = "0"
    result = CliRunner().invoke(main, ["bench", "loader", *args])
    assert (_run_tool(monkeypatch, "bench_loader.py", *args).code, capsys.readouterr().err) == (2, result.output)
    assert result.output == "error: Invalid value for '--pass-images': 0 is not in the range x>=1.\n"


def test_the_bench_tool_takes_the_commands_remote_only(shards, tmp_path, monkeypatch, capsys):
    """tools/bench_loader.py had no --remote-only (`tinyin bench loader` has): the remote rows alone, with no
    --images and so no release to extract one from. It takes it now: the same rows, from `bench_remote`."""
    from click.testing import CliRunner

    from pipeline.cli import main

    asked = []

    def remote(shards, **kwargs):
        asked.append((shards, kwargs.pop("log") and kwargs))
        return [{"variant": "rgb64", "loader": name, "workers": 0, "images_per_s": 1000.0, "pass": "1 epoch",
                 "x_baseline": None, "of_ceiling": None} for name in bench.REMOTE_ROWS]
    monkeypatch.setattr(bench, "bench_remote", remote)
    monkeypatch.setattr(bench, "planned_rows", lambda variants=(), remote=False, **kwargs: len(bench.REMOTE_ROWS))
    args = ["--shards", str(shards), "--remote-only", "--passes", "1", "--workers", "0", "--batch-size", "32"]
    result = CliRunner().invoke(main, ["bench", "loader", *args])
    assert _run_tool(monkeypatch, "bench_loader.py", *args, "--src", tmp_path / "none.tar.gz").code is None
    table = capsys.readouterr().out.splitlines()
    assert table[2:] == result.stdout.splitlines()[2:] and len(table) == 2 + 2 + len(bench.REMOTE_ROWS)
    assert asked == [(str(shards), {"batch_size": 32, "workers": 0, "passes": 1})] * 2


def test_remote_rows_stopped_keep_the_rows_measured(shards, monkeypatch):
    """A Ctrl-C in the remote stream row's passes lost the rows of curl and the fetch measured before it."""
    def stop(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "_measure_epochs", stop)
    log = []
    try:
        rows = bench_remote(shards, batch_size=32, workers=0, passes=1, log=log.append)
    except KeyboardInterrupt:  # not out of the test: it would end the pytest session
        pytest.fail("the interrupt went through bench_remote: its rows were lost")
    planned = bench.planned_rows((), remote=True)
    assert [r["loader"] for r in rows][-1] == "remote fetch (cold cache -> checked copy)" and len(rows) == planned - 1
    assert log[-1] == f"stopped after {planned - 1} of {planned} remote rows"


def fake_loader(monkeypatch, rate_of_epoch, epoch_images=20_000, batch=1_000):
    """An epoch_iter over a fake clock: `epoch_images` images an epoch, read at `rate_of_epoch(epoch)` images/s.
    Returns it and the list of epochs asked for."""
    clock, asked = [0.0], []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def epoch_iter(epoch):
        asked.append(epoch)
        for _ in range(epoch_images // batch):
            clock[0] += batch / rate_of_epoch(epoch)
            yield None, range(batch)
    return epoch_iter, asked


def test_a_loaders_rate_is_the_median_of_its_timed_passes_after_untimed_warm_up(monkeypatch):
    """The deciding pass lasts at least PROBE_S (here 2.5 epochs at 100k/s), a whole warm-up pass of FAST_PASS
    images follows, then `passes` timed passes of FAST_PASS images: the row is their median, not their mean,
    and no warm-up epoch (slow here) is timed."""
    rates = {0: 1e5, 1: 1e6, 2: 4e6, 3: 2e6}
    epoch_iter, asked = fake_loader(monkeypatch, lambda epoch: rates[epoch // 1000] if epoch >= 1000 else rates[0])
    rate, note = bench._measure(epoch_iter, passes=3, pass_images=25_600)
    assert rate == pytest.approx(2e6, rel=1e-9) and note == "100,000 images (whole epochs)"
    assert asked == [0, 1, 2] + [1, 2, 3, 4, 5] + [p * 1000 + e for p in (1, 2, 3) for e in range(5)]


def test_the_stream_paths_rate_is_the_median_of_whole_epochs_after_an_untimed_one(monkeypatch):
    rates = {0: 1e3, 1: 1e6, 2: 4e6, 3: 2e6}
    epoch_iter, asked = fake_loader(monkeypatch, lambda epoch: rates[epoch // 1000])
    rate, note = bench._measure_epochs(epoch_iter, passes=3, n=20_000)
    assert rate == pytest.approx(2e6, rel=1e-9) and note == "20,000 images (whole epochs)"
    assert asked == [0, 1000, 2000, 3000]


def test_each_rows_ratios_are_to_its_own_variants_baseline_and_ceiling(shards, monkeypatch):
    """x baseline and of ceiling divide a row's rate by those of the same variant's baseline and ceiling rows."""
    rates = {"rgb64": {"baseline": 100, "webdataset": 150, "stream": 400, "fast": 800, "resident": 900, "ceiling": 1000},
             "gray28": {"baseline": 50, "webdataset": 100, "stream": 200, "fast": 2000, "resident": 3000, "ceiling": 4000}}
    monkeypatch.setattr(bench, "_imagefolder", lambda root, variant, *a: lambda epoch: rates[variant]["baseline"])
    monkeypatch.setattr(bench, "_stock_webdataset", lambda s, variant, *a: lambda epoch: rates[variant]["webdataset"])
    monkeypatch.setattr(bench, "_stream_loader", lambda s, variant, *a: (lambda epoch: rates[variant]["stream"],
                                                                          {"whole_epochs_of": 240}))
    monkeypatch.setattr(bench, "_timed_loader", lambda s, variant, b, path, **kw: (
        lambda epoch: rates[variant][path], {"first_batch_s": 0.5, "data_pass_s": 1.5}))
    monkeypatch.setattr(bench, "_ceiling", lambda s, variant, b: lambda epoch: rates[variant]["ceiling"])
    monkeypatch.setattr(bench, "_measure", lambda epoch_iter, passes, pass_images: (epoch_iter(0), "passes"))
    monkeypatch.setattr(bench, "_measure_epochs", lambda epoch_iter, passes, n: (epoch_iter(0), f"epochs of {n}"))
    rows = bench.bench_loader(shards, None, log=lambda line: None)
    assert [(r["variant"], r["images_per_s"], r["x_baseline"], r["of_ceiling"]) for r in rows] == [
        (variant, rate, rate / by[0], rate / by[-1]) for variant, named in rates.items()
        for rate, by in ((rate, list(named.values())) for rate in named.values())]
    assert [r["pass"] for r in rows[:3]] == ["passes", "passes", "epochs of 240"]
    table = format_table(rows, "tinyin bench loader", 256, planned=len(rows)).splitlines()
    assert table[2] == "| variant | loader | workers | images/s | × baseline | of ceiling | pass | first batch (data pass done) |"
    assert table[7] == "| rgb64 | tinyin fast (mmap gather) | 0 (inline) | 800 | 8.0× | 80% | passes | 0.50 s (1.5 s) |"


def test_remote_rows_are_medians_of_their_passes(shards, monkeypatch):
    """Each remote row is the median of its passes (fake transfers on a fake clock: seconds per pass), the
    untimed first fetch left out; of ceiling divides by curl's rate into /dev/null."""
    import contextlib

    import pipeline.cache

    clock, total = [0.0], sum(e["bytes"] for e in ShardSet(shards).entries("train"))
    curl_secs, fetch_secs = [1.0, 2.0, 4.0, 8.0, 2.0, 4.0], [10.0, 4.0, 16.0, 8.0]  # curl: /dev/null, files, ...

    def fake_curl(urls, folder=None):
        clock[0] += curl_secs[0]
        return curl_secs.pop(0), total

    def fake_fetch(*args, **kwargs):
        clock[0] += fetch_secs.pop(0)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(bench, "serve_folder", contextlib.contextmanager(lambda folder: (yield "http://loopback")))
    monkeypatch.setattr(bench.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(bench, "_curl", fake_curl)
    monkeypatch.setattr(pipeline.cache, "cached_copy", fake_fetch)
    monkeypatch.setattr(bench, "make_loader", lambda *a, **kw: "no loader")  # its row: not measured
    rows = bench_remote(shards, passes=3, log=lambda line: None)
    n = ShardSet(shards).counts["train"]  # images/s = bytes/s over the bytes of a sample
    assert [(r["images_per_s"], r["of_ceiling"]) for r in rows[:3]] == [
        pytest.approx((n / 2, 1.0)), pytest.approx((n / 4, 0.5)), pytest.approx((n / 8, 0.25))]
    assert rows[2]["pass"].endswith(f"(untimed first pass: {total / 10 / 1e9:.2f})") and not curl_secs + fetch_secs


@pytest.mark.parametrize("row", ["_imagefolder", "_stock_webdataset"])
def test_the_baselines_workers_read_on_through_a_sigterm_to_the_group(release, shards, row):
    """A SIGTERM to the process group (a scheduler's `kill -TERM -PGID`) reaches the baselines' DataLoader workers
    too: they died of it, and torch raised "DataLoader worker (pid N) is killed by signal: Terminated." (a traceback
    under `tinyin bench loader`'s 'terminated'). They now take the stream path's rule: stopping is the main
    process's job."""
    source = release if row == "_imagefolder" else open_shard_set(shards)
    make_iter = getattr(bench, row)(source, "rgb64", 16, 2)
    batches = make_iter(0)
    seen = len(next(batches)[1])
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    subprocess.run(["kill", "-TERM", *(str(w.pid) for w in workers)], check=True)  # from another process
    seen += sum(len(batch[1]) for batch in batches)
    assert seen == SYNTH["classes"] * SYNTH["train_per_class"]


def test_imagefolder_baseline_reads_a_macos_copy_as_the_build_does(macos_copy):
    """A release copied on macOS holds an AppleDouble `._NAME.JPEG` beside each image: ImageFolder took them for
    images, and the baseline row failed in PIL with an UnidentifiedImageError traceback (after the rows before
    it). It reads the images `shard build` reads: 40 of each of the 6 classes."""
    labels = torch.cat([batch[1] for batch in bench._imagefolder(macos_copy, "rgb64", 64, 0)(0)])
    assert labels.bincount().tolist() == [40] * 6


def test_the_device_row_reads_the_fast_path_it_names(shards, monkeypatch):
    """The CUDA row "tinyin fast -> cuda, float, 224 upscale" called make_loader with path "auto", which takes the
    resident path for a split of up to 2 GiB (the 64x64 train split too): it measured the resident loader."""
    made = []
    monkeypatch.setattr(bench, "make_loader", lambda *args, **kw: made.append(kw) or object())
    (name, how, build), = [row for row in bench._loaders(open_shard_set(shards), None, "rgb64", 64, 0, False, "cuda")
                           if "cuda" in row[0]]
    build()
    assert (name, how, made[0].get("path", "auto")) == ("tinyin fast -> cuda, float, 224 upscale", "1 thread", "fast")


def test_the_device_rows_epoch_ends_when_its_own_device_is_done(monkeypatch):
    """The pass's clock stopped at torch.cuda.synchronize() of the current device (cuda:0): under --device cuda:1
    the row's batches queued there were not waited for."""
    synced = []

    class Loader(list):
        def set_epoch(self, epoch):
            pass
    monkeypatch.setattr(bench, "make_loader", lambda *args, **kw: Loader([(None, [0] * 8)]))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    assert len(list(bench._device_loader(None, "rgb64", 8, "cuda:1")(0))) == 1
    assert synced == ["cuda:1"]
