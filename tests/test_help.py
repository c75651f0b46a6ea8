"""Every script's --help prints and exits 0: argparse formats help strings with %, so a stray one
(a "5%" in a help text) turns --help into a traceback. And every option of theirs and of `tinyin`'s
commands says what it sets."""
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _argparse_options(text):
    """[flags, help] of each option in argparse's --help `text`: its first line, and the indented lines under it."""
    options = []
    for line in text.split("\noptions:\n", 1)[1].splitlines():
        if line.startswith("  -"):
            flags, _, words = line.strip().partition("  ")
            options.append([flags, words.strip()])
        elif line.startswith("   ") and options:
            options[-1][1] = f"{options[-1][1]} {line.strip()}".strip()
    return options


@pytest.mark.parametrize("script, flag, wrong, error", [
    ("train.py", "--time-budget MINUTES", ["--time-budget", "x"], "argument --time-budget: not a number: 'x'"),
    ("tools/reproduce.py", "--jobs", ["--jobs", "x"], "argument --jobs: not a whole number: 'x'"),
    ("tools/speedrun.py", "--ablate", ["--ablate"], "argument --ablate: expected one argument"),
    ("tools/gpu_session.py", "--deadline", ["--deadline", "x"], "argument --deadline: not a number: 'x'"),
    ("tools/bench_build.py", "--repeat", ["--repeat", "x"], "argument --repeat: not a whole number: 'x'"),
    ("tools/bench_loader.py", "--remote", ["--remote", "x"], "unrecognized arguments: x"),
])
def test_help_prints(script, flag, wrong, error, monkeypatch, capsys):
    """And every option says what it sets: one whose help was only its default (tools/bench_loader.py's
    `--batch-size  default: 256`, tools/gpu_session.py's --device) left the user to guess. A wrong flag is one
    line, exit 2, as train.py's: the tools printed argparse's whole usage block above it. (--help in a process of
    its own: each script starts as one; the wrong flag in this one, as _run_script runs it.)"""
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr[-2000:]
    assert flag in result.stdout
    options = _argparse_options(result.stdout)
    assert len(options) > 4
    assert [flags for flags, words in options if not words or words.startswith("default:")] == []
    monkeypatch.chdir(ROOT)
    assert _run_script(monkeypatch, capsys, script, *wrong) == (2, "", f"error: {error}\n")


@pytest.mark.parametrize("script, wrong, error", [
    ("train.py", ["--epochs", "1.5"], "argument --epochs: not a whole number: '1.5'"),
    ("tools/reproduce.py", ["--epochs", "1.5"], "argument --epochs: not a whole number: '1.5'"),
    ("tools/bench_build.py", ["--workers", "2.5"], "argument --workers: not a whole number: '2.5'"),
    ("tools/bench_build.py", ["--shard-size", "0"], "argument --shard-size: must be at least 1, not 0"),
    ("tools/gpu_session.py", ["--out", "o", "--shards", "s", "--table2-jobs", "0"],
     "argument --table2-jobs: must be at least 1, not 0"),
    ("tools/gpu_session.py", ["--out", "o", "--shards", "s", "--deadline", "-1"],
     "argument --deadline: must be positive, not -1"),
])
def test_the_tools_name_a_bad_number_in_train_pys_words(tmp_path, monkeypatch, capsys, script, wrong, error):
    """One mistake, one message: the tools said argparse's 'invalid int value: '1.5'' where train.py says 'not a
    whole number'; bench_build's --shard-size 0 said the build's '--shard-size 0: must be at least 1', and
    gpu_session took --table2-jobs 0 (refused by reproduce.py after the bench's minutes) and --deadline -1 (every
    part 'not started: past the --deadline')."""
    monkeypatch.chdir(tmp_path)
    assert _run_script(monkeypatch, capsys, script, *wrong) == (2, "", f"error: {error}\n")


def _run_script(monkeypatch, capsys, script, *argv):
    """`script` (train.py or tools/NAME) run as a script with `argv`, in this process (a process of its own pays
    torch's import, seconds, for a parse): (its exit code, its stdout, its stderr)."""
    import runpy

    monkeypatch.syspath_prepend(str((ROOT / script).parent))  # as a script's own folder is: flag_values, reproduce
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *argv])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    captured = capsys.readouterr()
    return exit.value.code, captured.out, captured.err


@pytest.mark.parametrize("script, flag", [
    ("reproduce.py", "--shards"), ("reproduce.py", "--out"), ("reproduce.py", "--weights-dir"),
    ("speedrun.py", "--shards"), ("speedrun.py", "--out"),
    ("gpu_session.py", "--release"), ("gpu_session.py", "--shards"), ("gpu_session.py", "--out"),
    ("gpu_session.py", "--work"),
    ("bench_build.py", "--src"),
    ("bench_loader.py", "--src"), ("bench_loader.py", "--shards"), ("bench_loader.py", "--images"),
    ("bench_loader.py", "--json"),
])
def test_the_tools_refuse_an_empty_path_in_train_pys_words(tmp_path, monkeypatch, capsys, script, flag):
    """An empty path (an unset shell variable: `--out "$OUT"`) is train.py's 'argument --shards: empty; give a
    path', exit 2. The tools took it: --out '' wrote the results into the current folder (gpu_session's --work ''
    built and trained there), reproduce.py's --weights-dir '' read as not given, and --shards '' said
    'error: --shards : not a shard set' (speedrun.py: train.py's refusal, 'speedrun.py: error: train.py refuses
    the flags of the full recipe: ...'); bench_build's --src '' said the build's '--src is empty: give the release'."""
    assert _run_tool(monkeypatch, tmp_path, capsys, script, flag, "") == (2, f"error: argument {flag}: empty; give a path\n")
    assert list(tmp_path.iterdir()) == []


def _run_tool(monkeypatch, tmp_path, capsys, script, *argv):
    """tools/`script` run as a script with `argv` in `tmp_path`, in this process: (its exit code, its stderr)."""
    monkeypatch.chdir(tmp_path)
    code, _, err = _run_script(monkeypatch, capsys, f"tools/{script}", *argv)
    return code, err


@pytest.mark.parametrize("script, flag", [("reproduce.py", "--train-args"), ("speedrun.py", "--train-args"),
                                          ("gpu_session.py", "--bench-args"), ("gpu_session.py", "--train-args"),
                                          ("gpu_session.py", "--speedrun-args")])
@pytest.mark.parametrize("value, why", [("--amp '", "no closing quotation"), ("--amp \\", "no escaped character")])
def test_the_tools_refuse_flags_a_shell_cannot_split(tmp_path, monkeypatch, capsys, script, flag, value, why):
    """An unclosed quote in a value of more flags was shlex's 'ValueError: No closing quotation' traceback: out of
    the parse (reproduce.py, speedrun.py), or out of gpu_session.py's part after the parts before it had run."""
    argv = ["--shards", str(tmp_path / "none"), "--out", str(tmp_path / "out"), f"{flag}={value}"]
    assert _run_tool(monkeypatch, tmp_path, capsys, script, *argv) == (2, f"error: argument {flag}: {why} in {value!r}\n")
    assert list(tmp_path.iterdir()) == []


def _commands(group, path=("tinyin",)):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def test_every_tinyin_option_says_what_it_is():
    """`tinyin bench loader --batch-size` had no help at all and `tinyin bench train --device` only its default."""
    bare = [f"{name} {param.opts[0]}" for name, command in _commands(main) for param in command.params
            if isinstance(param, click.Option) and not re.sub(r"\[default: [^]]*\]\.?", "", param.help or "").strip()]
    assert bare == []


def test_bench_train_tool_names_itself_alone():
    """tools/bench_train.py's usage read `tools/bench_train.py bench train [OPTIONS]`, and those two words
    typed after the script were refused as extra arguments. Its errors stay one line, as `tinyin`'s."""
    def tool(*args):
        return subprocess.run([sys.executable, str(ROOT / "tools/bench_train.py"), *args], capture_output=True, text=True)
    assert tool("-h").stdout.splitlines()[0] == "Usage: tools/bench_train.py [OPTIONS]"
    wrong = tool("--windows", "1")
    assert (wrong.returncode, wrong.stdout, wrong.stderr) == (2, "", "error: Invalid value for '--windows': 1 is not in "
                                                                      "the range x>=3.\n")
