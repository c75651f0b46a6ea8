"""tools/gpu_session.py's CPU dry run (--smoke) on the synthetic release: every part runs, its
results reach --out, and a second call trains nothing again. Device time is scarce; this is what
keeps a GPU session from finding a broken script. It runs as on the GPU machine's image, where
webdataset is not installed."""
import argparse
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

SESSION = Path(__file__).resolve().parents[1] / "tools" / "gpu_session.py"

# On PYTHONPATH, run by every Python process the session starts (gpu_session.py keeps PYTHONPATH for
# its children): webdataset and its dependency cannot be imported, as on the lent GPU machine.
NO_WEBDATASET = """import importlib.abc, sys
class NoWebdataset(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in ("webdataset", "braceexpand"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: not on the GPU machine)")
sys.meta_path.insert(0, NoWebdataset())
"""


@pytest.fixture(scope="module")
def gpu_image_env(tmp_path_factory):
    """The environment of a process on the GPU machine's image: no webdataset (checked here)."""
    site = tmp_path_factory.mktemp("no-webdataset")
    (site / "sitecustomize.py").write_text(NO_WEBDATASET)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    probe = subprocess.run([sys.executable, "-c", "import webdataset"], env=env, capture_output=True, text=True)
    assert probe.returncode == 1 and "blocked: not on the GPU machine" in probe.stderr, probe.stderr
    return env


def session(env, *args):
    return subprocess.run([sys.executable, str(SESSION), *args], capture_output=True, text=True, env=env)


def test_smoke_runs_every_part_once(release, tmp_path, gpu_image_env):
    common = ["--release", str(release), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
              "--smoke", "--commit", "abc123"]
    first = session(gpu_image_env, *common)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["bench.md", "curves.png", "json.tar", "r224.md",
                                                      "speedrun.md", "speedrun.png", "table2.md"]
    with tarfile.open(out / "json.tar") as tf:
        assert sorted(tf.getnames()) == ["bench.json", "env.json", "speedrun.json", "table2.json"]
        env = json.load(tf.extractfile("env.json"))
        table2 = json.load(tf.extractfile("table2.json"))
    assert (env["device"], env["gpu"], env["torch"]) == ("cpu", None, torch.__version__)
    assert [r["name"] for r in table2["runs"]] == ["lenet5-28", "squeezenet1_1-64"] and table2["jobs"] == 2
    assert "up to 2 rows trained side by side" in (out / "table2.md").read_text()
    # one epoch's row, against the (a) row it measured itself: the smoke bench has no resnet18@224
    assert "bench train --shards" in first.stdout and "--arch resnet18 --size 224 --batch 4 --feeds a" in first.stdout
    assert re.fullmatch(r"\| 1 \| [\d,]+ \| \d+% \| [\d.]+% \|", (out / "r224.md").read_text().splitlines()[-1])

    # The second call: nothing finished runs again; with the ablation, whose variant is the one run trained
    # (the speedrun's seed is not trained again). One call for both: each call starts torch in 5 processes.
    second = session(gpu_image_env, *common, "--speedrun-args", "--ablate ema")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "== bench: done earlier (" in second.stdout
    assert second.stdout.count(": finished earlier, not run again") == 2  # Table 2's rows
    trained = [line for line in second.stdout.splitlines()  # a command run: `sh`'s "$ ", a row's "== ROW: "
               if line.startswith(("$ ", "== ")) and "train.py --shards" in line]
    assert len(trained) == 1 and "--seed 0 " in trained[0] and "--ema 0" in trained[0], trained  # the variant only
    assert "bench train" not in second.stdout  # nor the r224 run's (a) row
    assert "| EMA of the weights | `--ema 0` |" in (out / "ablation.md").read_text()
    with tarfile.open(out / "json.tar") as tf:
        assert [r["variant"] for r in json.load(tf.extractfile("ablation.json"))] == [None, "ema"]


def test_deadline_stops_a_part_and_keeps_what_it_has(shards, tmp_path, gpu_image_env):
    """--deadline: Table 2's rows (waiting mid-epoch) get SIGTERM and checkpoint, the report so far
    reaches --out, the next part is not started, the exit says what is unfinished. (That the rerun
    resumes the rows is reproduce.py's test_reproduce_stopped_by_sigterm_reports_and_resumes.)
    The deadline's timer is SIGALRM (`deadline_timer`): the test rings it once both rows wait at
    their step 1, where a --deadline long enough for a loaded suite (rows that took over 30 s to get
    there) kept the test idle for a minute."""
    out, work = tmp_path / "out", tmp_path / "work"
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("w") as so, stderr.open("w") as se:
        proc = subprocess.Popen([sys.executable, str(SESSION), "--shards", str(shards), "--out", str(out), "--work",
                                 str(work), "--smoke", "--commit", "abc123", "--parts", "table2,r224", "--deadline",
                                 "3600", "--train-args", "--wait-at-step 1"],
                                env=gpu_image_env, stdout=so, stderr=se, text=True, start_new_session=True)
    logs = [work / "smoke" / "paper" / row / "train.log" for row in ("lenet5-28", "squeezenet1_1-64")]
    try:
        guard = time.monotonic() + 300  # against a hang, not a measurement
        while not all(log.is_file() and "waiting for a signal at epoch 0 step 1" in log.read_text() for log in logs):
            assert proc.poll() is None and time.monotonic() < guard, stdout.read_text() + stderr.read_text()
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGALRM)  # the session alone: its parts' processes are not the timer's
        proc.wait(timeout=300)
    finally:
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            if session_of(pid) == proc.pid:
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 1, stdout.read_text()[-3000:] + stderr.read_text()[-3000:]
    assert "== --deadline reached: SIGTERM to tools/reproduce.py" in stdout.read_text()
    assert "== r224: not started: past the --deadline" in stdout.read_text()
    assert stderr.read_text().splitlines()[-1] == (
        f"error: unfinished: table2 (stopped at the --deadline), r224 (not started); their results so far are in "
        f"{out}; rerun the same command to continue (finished parts and rows are not run again)")
    assert sorted(p.name for p in out.iterdir()) == ["json.tar", "table2.md"]
    report = (out / "table2.md").read_text()
    for row, log in zip(("lenet5-28", "squeezenet1_1-64"), logs):
        assert f"| {row} | - | - | no epoch finished: stopped by SIGTERM |" in report
        assert "interrupted at epoch 0 step 1: checkpoint saved" in log.read_text()
    with tarfile.open(out / "json.tar") as tf:
        assert sorted(tf.getnames()) == ["env.json", "table2.json"]


def test_the_deadline_timer_is_set_for_the_time_left_from_the_start(monkeypatch):
    monkeypatch.syspath_prepend(str(SESSION.parent))
    import gpu_session

    monkeypatch.setattr(gpu_session, "PAST_DEADLINE", [])
    monkeypatch.setattr(gpu_session, "START", time.time() - 100)  # the imports took 100 s
    handler = signal.getsignal(signal.SIGALRM)
    try:
        gpu_session.deadline_timer(3600)
        left, interval = signal.setitimer(signal.ITIMER_REAL, 0)  # read and disarmed
        assert 3490 < left <= 3500 and interval == 0 and gpu_session.PAST_DEADLINE == []
    finally:
        signal.signal(signal.SIGALRM, handler)


def test_a_deadline_past_before_the_parts_starts_none(shards, tmp_path):
    """--deadline shorter than the imports: no part starts (and none is killed in its start-up)."""
    done = subprocess.run([sys.executable, str(SESSION), "--shards", str(shards), "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work"), "--parts", "table2,r224", "--device", "cpu",
                           "--deadline", "0.001"], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert "== table2: not started: past the --deadline" in done.stdout
    assert "== r224: not started: past the --deadline" in done.stdout
    assert "$ " not in done.stdout
    assert done.stderr.splitlines()[-1] == (
        f"error: unfinished: table2 (not started), r224 (not started); their results so far are in "
        f"{tmp_path / 'out'}; rerun the same command to continue (finished parts and rows are not run again)")


def test_r224_ratio_reads_the_rows_of_a_stopped_bench(tmp_path):
    """A bench stopped at the --deadline leaves its rows so far in --work, not in the results:
    the 224 run's ratio to (a) reads them (here its run finished earlier, so nothing trains)."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session

    work = tmp_path / "work"
    run = work / "resnet18-224-scratch"
    run.mkdir(parents=True)
    (work / "results").mkdir()
    (run / "final.json").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps(dict(epoch=0, images_per_s=900.0, val_top1=1.25)) + "\n")
    ceiling = dict(arch="resnet18", size=224, batch=100, feed="ceiling", compiled=False, images_per_s=1200.0)
    (work / "bench.json").write_text(json.dumps(dict(planned=20, rows=[ceiling])))
    args = argparse.Namespace(device="cuda", smoke=False)
    assert gpu_session.part_r224(args, work / "results", "shards", None, work) is None
    assert (work / "results" / "r224.md").read_text().splitlines()[-1] == "| 1 | 900 | 75% | 1.25% |"


def test_a_release_archive_gives_imagefolder_its_train_folder(release, tmp_path):
    """Feed (d) reads train/ from files: the archive's train/ and wnids.txt are written, byte for byte,
    and nothing else; a member whose path leaves the folder stops it."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session

    tgz = tmp_path / "release.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(release, "tiny-imagenet-200")
    folder = tmp_path / "images"
    count = gpu_session.extract_for_imagefolder(tgz, folder)
    expected = {p.relative_to(release).as_posix(): p.read_bytes() for p in release.rglob("*")
                if p.is_file() and p.relative_to(release).parts[0] in ("train", "wnids.txt")}
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == expected
    assert count == len(expected) > 200

    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        tf.add(release / "wnids.txt", "tiny-imagenet-200/wnids.txt")
        tf.add(release / "wnids.txt", "tiny-imagenet-200/train/../../outside.txt")
    with pytest.raises(SystemExit, match="^error: .*evil.tar: train/../../outside.txt: a path out of the release folder$"):
        gpu_session.extract_for_imagefolder(evil, tmp_path / "evil")
    assert not (tmp_path / "outside.txt").exists()


def test_train_folder_is_extracted_only_for_the_bench(release, shards, tmp_path):
    """Only the bench's feed (d) reads the extracted train/: other parts do not wait for it."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session

    tgz = tmp_path / "release.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(release, "tiny-imagenet-200")
    args, work = argparse.Namespace(release=str(tgz), shards=str(shards)), tmp_path / "work"
    assert gpu_session.shards_and_images(args, work, images_needed=False) == (shards, None)
    assert not work.exists()
    assert gpu_session.shards_and_images(args, work, images_needed=True) == (shards, work / "images" / "release")
    assert (work / "images" / "release" / "wnids.txt").read_bytes() == (release / "wnids.txt").read_bytes()


def test_sigusr1_stops_the_part_running_and_no_other_starts(monkeypatch, capsys):
    """SIGUSR1 (a scheduler's warning) killed the session at once, its part left running in its own group and
    the results so far never copied to --out. It is SIGTERM's stop now, passed on as SIGUSR1 (every part's
    tool stops on it), exit 138. The part here sends it to the session itself once its handler is set."""
    monkeypatch.syspath_prepend(str(SESSION.parent))
    import gpu_session
    from pipeline.errors import STOPS, sigterm_interrupts

    monkeypatch.setattr(gpu_session, "STOPPED", [])
    part = ("import os, signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(128 + signal.SIGUSR1)); "
            "os.kill(os.getppid(), signal.SIGUSR1); time.sleep(60)")
    handlers = {sig: signal.getsignal(sig) for sig in STOPS}
    try:
        with sigterm_interrupts(STOPS):
            assert gpu_session.sh([sys.executable, "-c", part]) == 138
            assert gpu_session.sh([sys.executable, "-c", "pass"]) == 138
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert gpu_session.STOPPED == [signal.SIGUSR1]
    said = capsys.readouterr().out.splitlines()
    assert said[1:] == ["== SIGUSR1 received: passed on to -c",
                        f"== not started: {sys.executable} -c pass (stopped by SIGUSR1)"], said


def test_a_part_runs_in_a_process_group_of_its_own_in_this_session(tmp_path):
    """Its group takes the kill after the grace, train.py processes included; a session of its own
    would outlive the device tool's call."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session

    ids = tmp_path / "ids"
    code = f"import os; open({str(ids)!r}, 'w').write(f'{{os.getpid()}} {{os.getpgid(0)}} {{os.getsid(0)}}')"
    assert gpu_session.sh([sys.executable, "-c", code]) == 0
    pid, group, session_id = map(int, ids.read_text().split())
    assert group == pid != os.getpgid(0) and session_id == os.getsid(0)


def test_a_device_it_cannot_use_is_refused_in_one_line(tmp_path, monkeypatch):
    """A mistyped --device (or cuda where torch sees none) was torch's traceback from env.json's GPU name."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session
    from pipeline.errors import UsageError

    monkeypatch.setattr(sys, "argv", ["gpu_session.py", "--shards", "s", "--out", str(tmp_path / "out"), "--device", "cdua"])
    with pytest.raises(UsageError, match=r"^argument --device: 'cdua' is not a device; use cpu, cuda or cuda:N$"):
        gpu_session.main()
    assert not (tmp_path / "out").exists()


def test_a_missing_release_is_one_line(tmp_path, gpu_image_env):
    """Step 5 of the runbook on a cold machine (no release in /tmp): the error, not a traceback."""
    missing = tmp_path / "tiny-imagenet-200.tar.gz"
    done = session(gpu_image_env, "--release", str(missing), "--out", str(tmp_path / "out"), "--work",
                   str(tmp_path / "work"), "--parts", "table2,r224", "--device", "cpu")
    assert (done.returncode, done.stderr) == (1, f"error: {missing}: no such file or folder\n")


def test_sigterm_stops_the_part_running_and_keeps_what_it_has(shards, tmp_path, gpu_image_env):
    """SIGTERM to the session's process group (the device tool's limit: `timeout`'s signal) reaches the
    part running in its own group as at the --deadline: Table 2's row checkpoints, the report so far
    reaches --out, nothing more starts, exit 143. Before, the script died at once, its part's results
    never copied to --out and the part's processes left running."""
    out, work = tmp_path / "out", tmp_path / "work"
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"  # files: a pipe would wait for any process left
    with stdout.open("w") as so, stderr.open("w") as se:
        proc = subprocess.Popen([sys.executable, str(SESSION), "--shards", str(shards), "--out", str(out), "--work",
                                 str(work), "--smoke", "--commit", "abc123", "--parts", "table2,r224", "--table2-rows",
                                 "lenet5-28", "--train-args", "--wait-at-step 1"],
                                env=gpu_image_env, stdout=so, stderr=se, text=True, start_new_session=True)
    log = work / "smoke" / "paper" / "lenet5-28" / "train.log"
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a measurement
        while not (log.is_file() and "waiting for a signal at epoch 0 step 1" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, stdout.read_text() + stderr.read_text()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=300)
        left = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if session_of(pid) == proc.pid]
    finally:  # whatever is left of the session: ended
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            if session_of(pid) == proc.pid:
                os.kill(pid, signal.SIGKILL)
    assert left == []
    assert proc.returncode == 143, stdout.read_text()[-3000:] + stderr.read_text()[-3000:]
    assert "== SIGTERM received: passed on to tools/reproduce.py" in stdout.read_text()
    assert "== r224: not started: stopped by SIGTERM" in stdout.read_text()
    assert stderr.read_text().splitlines()[-1] == (
        f"error: unfinished: table2 (stopped by SIGTERM), r224 (not started); their results so far are in "
        f"{out}; rerun the same command to continue (finished parts and rows are not run again)")
    assert sorted(p.name for p in out.iterdir()) == ["json.tar", "table2.md"]
    assert "| lenet5-28 | - | - | no epoch finished: stopped by SIGTERM |" in (out / "table2.md").read_text()
    assert "interrupted at epoch 0 step 1: checkpoint saved" in log.read_text()


def session_of(pid):
    """The session id of process `pid`, or None once it is gone."""
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


def test_table2_train_args_of_one_flag_reach_reproduce(tmp_path, monkeypatch):
    """`--train-args=--no-amp` on the CPU (no --amp --channels-last before it) was handed on as
    `--train-args --no-amp`, which reproduce.py refused: 'expected one argument'."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session
    import reproduce

    commands = []
    monkeypatch.setattr(gpu_session, "sh", lambda cmd: commands.append(cmd) or 1)
    args = argparse.Namespace(table2_rows="lenet5-28", smoke=False, device="cpu", table2_jobs=None, train_args="--no-amp")
    assert gpu_session.part_table2(args, tmp_path, "shards", None, tmp_path) == {}
    parsed = reproduce.parse_args(list(map(str, commands[0][2:])))
    assert (parsed.rows, parsed.train_args, parsed.device) == (["lenet5-28"], "--no-amp", "cpu")


def test_a_part_stopped_now_wins_over_an_earlier_calls_result(tmp_path):
    """The runbook's compiled bench rows (`rm results/bench.json`, then `--bench-args '--compile ...'`)
    stopped at the --deadline: --out got the earlier eager table's bench.md beside the new bench.json."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session

    res, work, out = tmp_path / "results", tmp_path / "work", tmp_path / "out"
    for folder in (res, work, out):
        folder.mkdir()
    (res / "bench.md").write_text("eager table, an earlier call's\n")
    (res / "env.json").write_text("{}")
    (work / "bench.md").write_text("compiled rows so far\n")
    (work / "bench.json").write_text('{"rows": []}')
    gpu_session.publish(res, out, {"bench.md": work / "bench.md", "bench.json": work / "bench.json"})
    assert (out / "bench.md").read_text() == "compiled rows so far\n"
    with tarfile.open(out / "json.tar") as tf:
        assert sorted(tf.getnames()) == ["bench.json", "env.json"]
        assert tf.extractfile("bench.json").read() == b'{"rows": []}'


def test_a_smoke_run_is_not_taken_for_the_real_one(shards, tmp_path, monkeypatch):
    """--smoke, then the real run in the same --work (a careful operator's first GPU call): the real
    run took the smoke's finished 224 run (2 batches of 4) for its own and reported its numbers as
    the 2 epochs at batch 100 (the speedrun's seeds and the bench likewise). Here train.py is a stand-in
    that writes what a finished run leaves."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session

    trained = []

    def fake_sh(cmd, log=None):
        cmd = list(map(str, cmd))
        if cmd[1] != "train.py":
            return 1  # the bench's (a) row: not measured here
        run, batch = Path(cmd[cmd.index("--output-dir") + 1]), int(cmd[cmd.index("-b") + 1])
        trained.append(batch)
        run.mkdir(parents=True, exist_ok=True)
        (run / "final.json").write_text("{}")
        (run / "metrics.jsonl").write_text(json.dumps(dict(epoch=0, images_per_s=float(batch), val_top1=1.0)) + "\n")
        return 0

    monkeypatch.setattr(gpu_session, "sh", fake_sh)
    common = ["gpu_session.py", "--shards", str(shards), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
              "--parts", "r224", "--device", "cpu"]
    for smoke in (["--smoke"], []):
        monkeypatch.setattr(sys, "argv", common + smoke)
        gpu_session.main()
    assert trained == [4, 100]
    assert (tmp_path / "out" / "r224.md").read_text().splitlines()[-1] == "| 1 | 100 | - (no (a) row) | 1.00% |"
    assert (tmp_path / "work" / "smoke" / "resnet18-224-scratch" / "final.json").is_file()


@pytest.mark.parametrize("prefix", ["", "~/"], ids=["relative", "tilde"])
def test_relative_shards_and_work_are_the_callers(shards, tmp_path, monkeypatch, prefix):
    """`--shards s --work w` from a folder other than the repo's root: the parts run there (`sh`), so train.py
    read the repo's `s` (or none) and wrote its runs in the repo's `w`, where the results were not looked for.
    `--work=~/w` (the = form; a quoted "~/w", a job script's value) was made absolute as typed: the runs went into
    a folder named `~` in the current one, and `--shards=~/s` was no shard folder. A leading ~ is the home folder."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session

    seen = []

    def fake_sh(cmd, log=None):
        cmd = list(map(str, cmd))
        if cmd[1] == "train.py":
            seen.append([cmd[cmd.index(flag) + 1] for flag in ("--shards", "--output-dir")])
        return 1

    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    where = tmp_path / "home" if prefix else tmp_path
    (where / "s").symlink_to(shards)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gpu_session, "sh", fake_sh)
    monkeypatch.setattr(sys, "argv", ["gpu_session.py", f"--shards={prefix}s", f"--out={prefix}o", f"--work={prefix}w",
                                      "--parts", "r224", "--device", "cpu"])
    with pytest.raises(SystemExit):  # the stand-in's runs failed
        gpu_session.main()
    assert seen == [[str(where / "s"), str(where / "w" / "resnet18-224-scratch")]]
    assert (where / "o" / "json.tar").is_file() and not (tmp_path / "~").exists()


def test_flag_values_of_one_flag_need_no_equals_sign(tmp_path, monkeypatch, capsys):
    """`--bench-args --no-compile` (the runbook's kind of value, one flag) stopped argparse ("expected one
    argument"); every option whose value is more flags now takes it so, as it took `--bench-args=--no-compile`."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session
    import reproduce
    from pipeline.errors import run_cli

    monkeypatch.setattr(sys, "argv", ["gpu_session.py", "--out", str(tmp_path), "--bench-args", "--no-compile",
                                      "--train-args", "--amp", "--speedrun-args", "--seeds=0"])
    with pytest.raises(SystemExit) as exit:
        run_cli(gpu_session.main)  # parsed: refused only for want of a release
    assert (exit.value.code, capsys.readouterr().err) == (2, "error: give --release or --shards\n")
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--shards", str(tmp_path / "none"), "--train-args", "--amp"])
    with pytest.raises(SystemExit) as exit:  # parsed as its __main__ parses, refused for want of a shard set
        runpy.run_path(reproduce.__file__, run_name="__main__")
    assert exit.value.code == f"error: --shards {tmp_path / 'none'}: no such folder"


def test_flags_among_reads_train_args_as_a_shell_does_and_names_them_sorted():
    """A quoted value with a space (`--output-dir 'my runs'`) was split at the space: train.py refused the
    words, so no clash was found, and the tool's runs all trained into that one folder."""
    sys.path.insert(0, str(SESSION.parent))
    from flag_values import flags_among

    assert flags_among("--output-dir 'my runs' --amp", {"output_dir"}) == ["--output-dir"]
    every = {"shards", "arch", "size", "recipe", "seed", "output_dir"}
    assert flags_among("--seed 1 --size 64 --recipe fast --output-dir o --arch resnet18 --shards s", every) == [
        "--arch", "--output-dir", "--recipe", "--seed", "--shards", "--size"]


def test_each_option_whose_value_is_flags_takes_a_lone_value_that_starts_with_a_dash():
    """gpu_session's three such options, each followed by a value argparse would take for an option."""
    sys.path.insert(0, str(SESSION.parent))
    from flag_values import joined

    argv = ["--bench-args", "--repeat 2", "--train-args", "--no-amp", "--speedrun-args", "--seeds 0", "--deadline", "5"]
    assert joined(argv, ("--bench-args", "--train-args", "--speedrun-args")) == [
        "--bench-args=--repeat 2", "--train-args=--no-amp", "--speedrun-args=--seeds 0", "--deadline", "5"]


def test_table2_trains_its_rows_one_after_another_on_the_cpu(tmp_path, monkeypatch, capsys):
    """And --help says the defaults as they are: it gave '1 on the CPU' and the four rows, where --smoke trains
    two rows side by side."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session

    commands = []
    monkeypatch.setattr(gpu_session, "sh", lambda cmd: commands.append(list(map(str, cmd))) or 1)
    for device, smoke, jobs, rows in (("cpu", False, "1", "lenet5-28,alexnet-64,squeezenet1_1-64,resnet18-64"),
                                      ("cpu", True, "2", "lenet5-28,squeezenet1_1-64"),
                                      ("cuda", False, "4", "lenet5-28,alexnet-64,squeezenet1_1-64,resnet18-64")):
        args = argparse.Namespace(table2_rows=None, smoke=smoke, device=device, table2_jobs=None, train_args=None)
        gpu_session.part_table2(args, tmp_path, "shards", None, tmp_path)
        assert commands[-1][commands[-1].index("--jobs") + 1] == jobs
        assert commands[-1][commands[-1].index("--rows") + 1] == rows
    monkeypatch.setattr(sys, "argv", ["gpu_session.py", "--help"])
    with pytest.raises(SystemExit):
        gpu_session.main()
    said = " ".join(capsys.readouterr().out.split())
    assert ("--rows; default: lenet5-28,alexnet-64,squeezenet1_1-64,resnet18-64; with --smoke "
            "lenet5-28,squeezenet1_1-64)") in said
    assert "--jobs; default: 4 on CUDA; on the CPU 1, 2 with --smoke)" in said


@pytest.mark.parametrize("parts, said", [
    ("bench,", "unknown part ''; choose from: bench, table2, r224, speedrun"),
    ("bench,tabel2", "unknown part tabel2; choose from: bench, table2, r224, speedrun"),
    ("", "empty; name parts (bench, table2, r224, speedrun), or leave it out for all"),
])
def test_an_empty_part_is_refused_in_one_line(tmp_path, monkeypatch, capsys, parts, said):
    """`--parts bench,` (a trailing comma) named a part ''. Refused, it said '--parts: choose from ...', naming no
    part, where reproduce.py's --rows and speedrun.py's --ablate name theirs in argparse's form."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session
    from pipeline.errors import run_cli

    monkeypatch.setattr(sys, "argv", ["gpu_session.py", "--shards", "s", "--out", str(tmp_path), "--parts", parts])
    with pytest.raises(SystemExit) as exit:
        run_cli(gpu_session.main)
    assert (exit.value.code, capsys.readouterr().err) == (2, f"error: argument --parts: {said}\n")


@pytest.mark.parametrize("name, reason", [("none", "no such folder"),
                                          ("empty", "not a shard set (no manifest.json); run `tinyin shard build` first")])
def test_shards_that_is_no_set_without_a_release_is_refused_in_one_line(tmp_path, monkeypatch, name, reason):
    """--shards (no --release to build it from) that does not exist or holds no set: a TypeError traceback out of
    the build, after --out and env.json were made. Now the line reproduce.py and speedrun.py say, before anything."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session
    from pipeline.errors import run_cli

    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sys, "argv", ["gpu_session.py", "--shards", str(tmp_path / name), "--out", str(tmp_path / "out"),
                                      "--work", str(tmp_path / "work"), "--device", "cpu"])
    with pytest.raises(SystemExit) as exit:
        run_cli(gpu_session.main)
    assert exit.value.code == f"error: --shards {tmp_path / name}: {reason}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.parametrize("rows, said", [
    ("lenet5-28,alexnet64", "unknown row alexnet64; choose from: lenet5-28, alexnet-64, squeezenet1_1-64, resnet18-64, "
                            "alexnet-224, squeezenet1_1-224, resnet18-224, alexnet-224-50, squeezenet1_1-224-50, "
                            "resnet18-224-50"),
    ("", "empty; name rows (lenet5-28, alexnet-64, squeezenet1_1-64, resnet18-64, alexnet-224, squeezenet1_1-224, "
         "resnet18-224, alexnet-224-50, squeezenet1_1-224-50, resnet18-224-50), or leave it out for Table 2's "
         "(lenet5-28,alexnet-64,squeezenet1_1-64,resnet18-64)"),
])
def test_table2_rows_are_checked_before_any_part_runs(tmp_path, monkeypatch, capsys, rows, said):
    """A mistyped row was reproduce.py's refusal in the table2 part, after the bench's minutes on the GPU; an empty
    one (an unset shell variable) read as not given. Now reproduce.py's words for its --rows, before anything."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session
    from pipeline.errors import run_cli

    monkeypatch.setattr(sys, "argv", ["gpu_session.py", "--shards", str(tmp_path / "none"), "--out",
                                      str(tmp_path / "out"), "--table2-rows", rows])
    with pytest.raises(SystemExit) as exit:
        run_cli(gpu_session.main)
    assert (exit.value.code, capsys.readouterr().err) == (2, f"error: argument --table2-rows: {said}\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--out", "--work"])
def test_out_or_work_that_is_a_file_is_one_line(tmp_path, monkeypatch, flag):
    """--out a file: a FileExistsError traceback; --work a file: 'error: Not a directory: WORK/results'. Now the
    words reproduce.py and speedrun.py say of their --out."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session
    from pipeline.errors import run_cli

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    (tmp_path / "file").write_text("")
    folders = {"--out": str(tmp_path / "out"), "--work": str(tmp_path / "work"), flag: str(tmp_path / "file")}
    monkeypatch.setattr(sys, "argv", ["gpu_session.py", "--shards", str(tmp_path / "shards"), "--device", "cpu",
                                      "--parts", "r224", *(word for pair in folders.items() for word in pair)])
    with pytest.raises(SystemExit) as exit:
        run_cli(gpu_session.main)
    assert exit.value.code == f"error: {flag} {tmp_path / 'file'}: cannot be made a folder (File exists)"


@pytest.mark.parametrize("smoke", [[], ["--smoke"]], ids=["real", "smoke"])
def test_out_that_is_the_results_folder_of_work_is_one_line(tmp_path, monkeypatch, smoke):
    """--out WORK/results (where the help says the results are kept before the copy): the copy of a result from
    an earlier call onto itself was a SameFileError traceback."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session
    from pipeline.errors import run_cli

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    results = tmp_path / "work" / "smoke" / "results" if smoke else tmp_path / "work" / "results"
    results.mkdir(parents=True)
    (results / "bench.md").write_text("| rows |\n")
    monkeypatch.setattr(sys, "argv", ["gpu_session.py", "--shards", str(tmp_path / "shards"), "--device", "cpu",
                                      "--parts", "bench", "--work", str(tmp_path / "work"), "--out", str(results),
                                      *smoke])
    with pytest.raises(SystemExit) as exit:
        run_cli(gpu_session.main)
    assert exit.value.code == (f"error: --out {results}: the results folder of --work, which is copied to --out; "
                               "choose another folder")
    assert os.listdir(results) == ["bench.md"]


def test_commit_names_the_commit_of_a_copy_without_git(shards, tmp_path, monkeypatch):
    """The device tool's copy of the tree has no .git: env.json said commit "unknown" unless --commit named it."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session
    from pipeline import bench_train

    monkeypatch.setattr(bench_train, "environment", lambda device: dict(commit="unknown", device=device))
    monkeypatch.setattr(gpu_session, "PART_RUNS", dict(gpu_session.PART_RUNS, r224=lambda *a: None))
    monkeypatch.setattr(sys, "argv", ["gpu_session.py", "--shards", str(shards), "--out", str(tmp_path / "out"),
                                      "--work", str(tmp_path / "work"), "--parts", "r224", "--device", "cpu",
                                      "--commit", "abc1234"])
    monkeypatch.setenv("TINYIN_COMMIT", "")  # main() sets it: put back after the test
    gpu_session.main()
    assert json.loads((tmp_path / "work" / "results" / "env.json").read_text()) == dict(commit="abc1234", device="cpu")


def test_a_whole_bench_table_with_a_failed_row_is_done(tmp_path, monkeypatch):
    """bench train exits 1 after its whole table when a row failed (an OOM): the part was 'failed', its table left
    out of the results, and the next call (the error line said to rerun the same command) measured it all again."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session

    res, work = tmp_path / "results", tmp_path / "work"
    res.mkdir()
    work.mkdir()
    rows = [dict(arch="lenet5", skipped=None), dict(arch="lenet5", skipped="failed: OutOfMemoryError: CUDA out of memory.")]

    def bench(cmd, log=None):
        (work / "bench.json").write_text(json.dumps(dict(planned=2, rows=rows)))
        Path(log).write_text("| table |\n")
        return 1

    monkeypatch.setattr(gpu_session, "sh", bench)
    args = argparse.Namespace(smoke=True, bench_args=None)
    assert gpu_session.part_bench(args, res, "shards", None, work) is None
    assert json.loads((res / "bench.json").read_text())["rows"] == rows
    assert (res / "bench.md").read_text() == "| table |\n"
    # a table stopped short (the --deadline) is still unfinished
    rows.pop()
    (res / "bench.json").unlink()
    assert sorted(gpu_session.part_bench(args, res, "shards", None, work)) == ["bench.json", "bench.md"]
    assert not (res / "bench.json").exists()


def test_out_that_is_work_keeps_a_stopped_parts_results(tmp_path, monkeypatch):
    """--out WORK (the folder the help names for the work; /tmp/tinyin-gpu by default): the bench stopped at the
    --deadline leaves its table so far as WORK/bench.md, whose copy to --out, onto itself, was a SameFileError
    traceback: the call ended there, the parts after it not run and 'unfinished' not said."""
    sys.path.insert(0, str(SESSION.parent))
    import gpu_session
    from pipeline.errors import run_cli

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    work = tmp_path / "work"

    def stopped_bench(cmd, log=None):
        Path(log).write_text("| rows so far |\n")
        return 143

    monkeypatch.setattr(gpu_session, "sh", stopped_bench)
    monkeypatch.setattr(sys, "argv", ["gpu_session.py", "--shards", str(tmp_path / "shards"), "--device", "cpu",
                                      "--parts", "bench", "--work", str(work), "--out", str(work)])
    with pytest.raises(SystemExit) as exit:
        run_cli(gpu_session.main)
    assert exit.value.code == 1
    assert (work / "bench.md").read_text() == "| rows so far |\n"
    with tarfile.open(work / "json.tar") as tf:
        assert tf.getnames() == ["env.json"]
