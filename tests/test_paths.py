"""A leading `~` of a path flag is the home folder, in every parser: a shell expands it only at a word's start,
so `--out=~/shards`, a quoted "~/shards" or a job script's value arrive as typed, and were a folder named `~`
in the current one. URLs are left as they are."""
import pwd
import runpy
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

import models
from pipeline import ShardArrays, make_loader, open_shard_set, read_index, read_manifest
from pipeline.build import build_shards
from pipeline.cli import main as tinyin

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """HOME in `tmp_path/home`, the current folder `tmp_path/cwd` (where a folder named `~` would appear)."""
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path / "home"


def path_params(group, names=()):
    """(command words, param) of every option and argument of the `tinyin` commands whose type is a click.Path."""
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from path_params(command, (*names, name))
        else:
            for param in command.params:
                if isinstance(param.type, click.Path):
                    yield f"{' '.join((*names, name))} {param.opts[0]}", command, param


def test_every_path_of_the_cli_takes_a_tilde_as_home_and_leaves_a_url(home):
    (home / "run").mkdir()
    params = list(path_params(tinyin))
    assert len(params) == 15
    for where, command, param in params:
        ctx = click.Context(command)
        value = "~/run" if param.type.exists else "~/new"
        assert param.type.convert(value, param, ctx) == str(home / value[2:]), where
        if not param.type.exists:
            assert param.type.convert("~root/new", param, ctx) == f"{pwd.getpwnam('root').pw_dir}/new", where
            assert param.type.convert("runs/~", param, ctx) == "runs/~", where  # not at the start: a name
    verify = dict((where, param) for where, _, param in params)["shard verify shards"]
    for url in ("http://host/~/shards", "s3://bucket/shards", "pipe:cat ~/shards/train-000000.tar"):
        assert verify.type.convert(url, verify, None) == url


def test_synth_and_build_into_tilde_paths_land_in_home(home):
    result = CliRunner().invoke(tinyin, ["data", "synth", "--out=~/release", "--classes", "2", "--train-per-class", "2",
                                         "--val-per-class", "2", "--test", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote synthetic release to {home / 'release'}\n"
    result = CliRunner().invoke(tinyin, ["shard", "build", "--src", "~/release", "--out=~/shards", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"built 4 shards in {home / 'shards'}: ")
    assert sorted(p.name for p in home.iterdir()) == ["release", "shards"]
    assert list(home.parent.joinpath("cwd").iterdir()) == []  # no folder named ~
    result = CliRunner().invoke(tinyin, ["bench", "train", "--shards=~/nowhere"])
    assert result.exit_code == 1 and result.output == f"error: --shards {home / 'nowhere'}: no such folder\n"


def test_build_shards_from_python_takes_a_tilde_as_home(home, release):
    """build_shards(src, "~/shards") was built into a folder named `~` in the current one."""
    (home / "release").symlink_to(release)
    manifest = build_shards("~/release", "~/shards", progress=False)
    assert (home / "shards" / "manifest.json").is_file() and manifest["build"]["source"] == "release"
    assert list(home.parent.joinpath("cwd").iterdir()) == []  # no folder named ~


def test_the_python_api_reads_a_tilde_as_home(home, shards):
    """make_loader("~/shards"), open_shard_set, ShardArrays, read_manifest and read_index said 'no such folder'
    (or 'not a tinyin shard set') and get_model(weights="~/w.pth") 'No such file or directory', where the CLI's
    and train.py's flags read a leading ~ as the home folder."""
    (home / "shards").symlink_to(shards)
    loader = make_loader("~/shards", "val", batch_size=32)
    assert sum(len(labels) for _, labels in loader) == 30
    assert open_shard_set("~/shards").location == str(home / "shards")
    assert len(ShardArrays(Path("~/shards"), "val")) == 30
    assert read_manifest("~/shards")["counts"]["val"] == 30 and read_index("~/shards", "val").num_rows == 30
    torch.save(models.get_model("lenet5").state_dict(), home / "w.pth")
    assert isinstance(models.get_model("lenet5", weights="~/w.pth"), torch.nn.Module)
    assert list(home.parent.joinpath("cwd").iterdir()) == []


@pytest.mark.parametrize("tool, argv, message", [
    ("bench_build.py", ["--src=~/nowhere"], "error: {home}/nowhere: not found (pass --src)"),
    ("bench_loader.py", ["--src=~/nowhere"], "error: {home}/nowhere: not found (pass --src)"),
    ("bench_loader.py", ["--shards=~/nowhere"], "error: --shards {home}/nowhere: no such folder\n"),
    ("bench_loader.py", ["--images=~/nowhere"], 
     "error: --images {home}/nowhere: no train/ folder; pass the extracted release (ROOT/train/WNID/images)\n"),
    ("bench_loader.py", ["--json=~/no/rows.json"], "error: --json {home}/no/rows.json: no folder {home}/no to write it in\n"),
    ("reproduce.py", ["--weights-dir=~/nowhere"], "error: --weights-dir {home}/nowhere: no such folder"),
    ("reproduce.py", ["--shards=~/nowhere"],
     "error: --shards {home}/nowhere: no such folder"),
    ("reproduce.py", ["--shards=~/shards", "--out=~/file", "--rows", "lenet5-28"],
     "error: --out {home}/file: cannot be made a folder (File exists)"),
], ids=["bench_build --src", "bench_loader --src", "bench_loader --shards", "bench_loader --images", "bench_loader --json",
        "reproduce --weights-dir", "reproduce --shards", "reproduce --out"])
def test_the_tools_take_a_tilde_as_home(home, shards, monkeypatch, capsys, tool, argv, message):
    """tools/: their path flags, as the tinyin commands' (a message ending in a newline is on stderr)."""
    (home / "shards").symlink_to(shards)
    (home / "file").write_text("")
    monkeypatch.setattr(sys, "argv", [tool, *argv])
    monkeypatch.syspath_prepend(str(TOOLS))  # as a script's folder is
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(TOOLS / tool), run_name="__main__")
    said = capsys.readouterr().err if isinstance(stopped.value.code, int) else stopped.value.code
    assert said == message.format(home=home)
    assert list(home.parent.joinpath("cwd").iterdir()) == []  # no folder named ~
