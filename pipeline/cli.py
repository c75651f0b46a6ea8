"""The `tinyin` command line: thin click wrappers, each calling one library function."""
import argparse
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path

import click

from .errors import (STOPS, TinyinError, UsageError, hide_password, path_text, plural, sigterm_interrupts, stop_code,
                     user_errors)
from .schema import DEFAULT_SHARDS

# click's word that a group was called with no command (click 8.2+): it shows the group's help, as asked.
_NO_COMMAND = getattr(click.exceptions, "NoArgsIsHelpError", ())


@contextlib.contextmanager
def _one_line():
    """click's usage errors (a bad flag value, a missing flag) as tinyin's `UsageError`: one line, as train.py's
    argparse ones are (click printed its usage and a hint above it: `--out FILE` was four lines), a URL's
    password and token hidden in them and in click's other errors."""
    try:
        yield
    except _NO_COMMAND:
        raise
    except click.UsageError as e:  # `error: Invalid value for '--out': Directory 'FILE' is a file.`
        raise UsageError(hide_password(e.format_message())) from None
    except click.ClickException as e:
        e.message = hide_password(e.message)
        raise


def _command_line(command):
    """`tinyin COMMAND` and the flags it was given, quoted for a shell: a bench table's header, run again by
    pasting it (a path with a space in it was split in two)."""
    return f"tinyin {command} {shlex.join(sys.argv[3:])}"


class _Path(click.Path):
    """click's Path with a leading `~` or `~user` read as that home folder (`os.path.expanduser`), as pip, git
    and train.py read it. A shell expands it only at a word's start: `--out=~/shards`, a quoted "~/shards" or a
    job script's value arrived as typed, and a folder named `~` was made in the current one. A URL (SHARDS of
    `shard verify` and `shard inspect`) never starts with `~`: it stays as it is.
    empty: what to give instead of an empty value (an unset shell variable: `--out "$OUT"`), refused as a usage
    error naming the option ('--out is empty: give the folder to create'): "" is the current folder to the
    file system, where a command wrote or read without a word."""

    def __init__(self, *args, empty=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.empty = empty

    def convert(self, value, param, ctx):
        if value == "" and self.empty:
            name = param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
            raise UsageError(f"{name} is empty: give {self.empty}")
        value = os.path.expanduser(value)
        trimmed = value.rstrip(os.sep)
        if not self.file_okay and trimmed != value and os.path.isfile(trimmed):
            # `--out FILE/`: stat's ENOTDIR is a path that is not there to click, taken; the command then failed
            # in other words ('Not a directory: FILE', exit 1) than `--out FILE`'s. Refused as that one is.
            super().convert(trimmed, param, ctx)
        return super().convert(value, param, ctx)


class _OneLine:
    """A click group or command that reports user-facing errors the way train.py does
    (`errors.user_errors`: one line on stderr, exit code 2 for usage errors and 1 otherwise; click's own
    too, `_one_line`), and stops on SIGTERM and SIGUSR1 (`STOPS`) as on Ctrl-C, cleaning up on the way out (exit code
    143, 138)."""

    def parse_args(self, ctx, args):  # the top group's own flags are parsed before any `invoke`
        with user_errors(), _one_line():
            return super().parse_args(ctx, args)

    def invoke(self, ctx):
        with user_errors(), sigterm_interrupts(STOPS), _one_line():
            return super().invoke(ctx)


class _Group(_OneLine, click.Group):
    """A `tinyin` group: its commands' errors one line each (`_OneLine`)."""


class _Command(_OneLine, click.Command):
    """A `tinyin` command run as a script of its own (`run_alone`)."""


def run_alone(command, prog_name, args):
    """Run `command`, one of tinyin's subcommands, as the script `prog_name` (tools/bench_train.py), on `args`:
    its --help's usage names the script alone (through the group it read `tools/bench_train.py bench train
    [OPTIONS]`, and those words typed after the script were refused as extra arguments)."""
    alone = _Command(prog_name, context_settings=main.context_settings, callback=command.callback,
                     params=command.params, help=command.help)
    alone.main(args, prog_name=prog_name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """tinyin: Tiny ImageNet as WebDataset shards, a fast loader, and the classic CNN zoo."""


@main.group(cls=_Group)
def data():
    """Get a release: synthesise a small one, or fetch the official archive."""


def _name_fits(ctx, param, value):
    """--out of the data commands and report: a name over NAME_MAX in it named (`atomic.long_name`), as shard build's --out
    and train.py's --output-dir are, where mkdir's 'File name too long: PATH' named neither the name nor the limit."""
    from .atomic import long_name

    if why := long_name(value):
        raise UsageError(f"{param.opts[0]} {value}: {why}; choose a shorter name")
    return value


@data.command("synth")
@click.option("--out", required=True, type=_Path(file_okay=False, empty="the folder to create"), callback=_name_fits,
              help="Folder to create.")
@click.option("--classes", default=10, show_default=True, type=click.IntRange(1), help="Number of classes.")
@click.option("--train-per-class", default=100, show_default=True, type=click.IntRange(1), help="Train images per class.")
@click.option("--val-per-class", default=50, show_default=True, type=click.IntRange(2),
              help="Val images per class (split half/half into val and test, so at least 2).")
@click.option("--test", "test_images", default=200, show_default=True, type=click.IntRange(1),
              help="Unlabelled test/ images (the release's test/ folder; `shard build` needs it).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Random seed: same seed, same bytes.")
def data_synth(out, classes, train_per_class, val_per_class, test_images, seed):
    """Write a small learnable dataset in the official Tiny ImageNet layout."""
    from .synth import synthesize

    try:
        path = synthesize(out, classes=classes, train_per_class=train_per_class,
                          val_per_class=val_per_class, test=test_images, seed=seed)
    except FileExistsError as e:
        raise TinyinError(str(e)) from None
    click.echo(f"wrote synthetic release to {path}")


def _md5(ctx, param, value):
    """--md5 of `data fetch`: 32 hex digits, checked before the download (`fetch.md5_problem`)."""
    from .fetch import md5_problem

    if value is not None and (problem := md5_problem(value)):
        raise click.BadParameter(problem)
    return value


@data.command("fetch")
@click.option("--out", required=True, type=_Path(file_okay=False, empty="the folder to download into"), callback=_name_fits,
              help="Folder to download into.")
@click.option("--url", default=None, help="Archive URL [default: the official cs231n zip, with its known size and md5].")
@click.option("--md5", default=None, callback=_md5, help="Expected md5 of a --url download [default: not checked].")
def data_fetch(out, url, md5):
    """Download the official release archive (resumes a partial download, checks size and md5)."""
    from . import fetch

    if md5 is not None and url is None:
        raise click.UsageError("--md5 checks a --url download (the official zip's md5 is built in)")
    kwargs = {} if url is None else {"url": url, "expected_size": None, "md5": md5}
    matched = []
    path = fetch.fetch_release(out, found=matched.append, **kwargs)  # stopped (`STOPS`): the .part stays, the lock goes
    click.echo(f"already have {path} ({matched[0]})" if matched else f"downloaded {path}")


@main.group(cls=_Group)
def shard():
    """Build, verify and inspect WebDataset shard sets."""


@shard.command("build")
@click.option("--src", required=True, type=_Path(), help="Release folder, .zip or .tar[.gz] (read without extracting).")
@click.option("--out", required=True, type=_Path(file_okay=False), help="Output folder for shards, index and manifest.")
@click.option("--workers", default=None, type=click.IntRange(1), help="Decode processes [default: all cores].")
@click.option("--shard-size", default=10000, show_default=True, type=click.IntRange(1), help="Samples per shard.")
@click.option("--split-seed", default=None, type=click.IntRange(0), help="Draw the per-class 25/25 val/test split at random with this seed [default: first 25 in val_annotations.txt order -> val].")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True, help="On a bad image: stop, or record it in the manifest and go on.")
@click.option("--classes", default=None, type=int, metavar="N",
              help="Only the first N classes (in label order; labels stay 0..N-1), without the unlabeled "
                   "test/ images (they belong to every class): a small set for quick experiments on the CPU "
                   "[default: all].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def shard_build(src, out, workers, shard_size, split_seed, on_error, classes, quiet):
    """Decode a release once into shards of uint8 rgb64 + gray28 arrays, with a Parquet index."""
    from .build import build_shards

    manifest = build_shards(src, out, workers=workers, shard_size=shard_size, split_seed=split_seed,
                            on_error=on_error, progress=not quiet, classes=classes)
    _name_skipped(manifest["skipped"])
    counts = ", ".join(f"{k} {v:,}" for k, v in manifest["counts"].items())
    n = sum(manifest["counts"].values())
    secs = manifest["_seconds"]
    repaired = f"; repaired {', '.join(manifest['_repaired'])}" if manifest["_repaired"] else ""
    ignored = manifest["_ignored"]  # not an error: in no split's folder, they belong to none
    ignored = (f"; ignored {len(ignored):,} {plural(len(ignored), 'image')} outside train/, val/ and test/ ({ignored[0]}"
               f"{', ...' if len(ignored) > 1 else ''})") if ignored else ""
    shards = len(manifest["shards"])
    click.echo(f"built {shards} {plural(shards, 'shard')} in {out}: {counts} "
               f"({n / secs:,.0f} images/s, {secs:.1f} s); skipped {len(manifest['skipped'])}{repaired}{ignored}")


SKIPPED_SHOWN = 20


def _name_skipped(skipped):
    """Name on stderr what a build skipped (`--on-error skip`), the first SKIPPED_SHOWN: a count alone
    leaves the user to dig the files out of the manifest."""
    for entry in skipped[:SKIPPED_SHOWN]:
        source, reason = entry["source"], entry["reason"]
        click.echo(f"skipped {reason if reason.startswith(source + ': ') else f'{source}: {reason}'}", err=True)
    if len(skipped) > SKIPPED_SHOWN:
        click.echo(f"skipped {len(skipped) - SKIPPED_SHOWN:,} more (manifest.json lists them all)", err=True)


def _local(shards, split, progress=None):
    """`shards` itself, or for a set URL the local cached copy of `split` (None: every split)."""
    from .cache import cached_copy, is_set_url
    from .shardset import ShardSet

    if not is_set_url(shards):
        return shards
    remote = ShardSet(shards)
    return cached_copy(remote, [split] if split else remote.splits, progress=progress)


@shard.command("verify")
@click.argument("shards", type=_Path(empty="the shard set's folder or URL"))
@click.option("--quiet", is_flag=True, help="No progress bar.")
def shard_verify(shards, quiet):
    """Re-check every shard's checksum and count, that every sample decodes with the right label and class,
    and the manifest's train mean and std; every problem is named, a line each, then their count.
    SHARDS may be a URL: every split is fetched into the local cache (size and sum64 checked on
    arrival), then checked here, sha256 included."""
    from .verify import Problems, verify_shards

    shards = _local(shards, None, progress=not quiet)
    try:
        report = verify_shards(shards, progress=not quiet)
    except Problems as e:  # a line each, as fsck and `sha256sum -c` name every bad file, then the count
        for problem in e.problems:
            click.echo(f"error: {hide_password(problem)}", err=True)
        raise TinyinError(e.summary) from None
    files, samples = report["shards"], report["samples"]
    click.echo(f"ok: {files} {plural(files, 'shard')}, {samples:,} {plural(samples, 'sample')} verified")


@shard.command("inspect")
@click.argument("shards", type=_Path(empty="the shard set's folder or URL"))
@click.option("--png", default=None, type=_Path(dir_okay=False, empty="the file to write the grid in, or leave --png out"), help="Where to write the sample grid, its folder created; the extension names the format [default: SHARDS/samples.png].")
@click.option("--classes", "max_classes", default=20, show_default=True, type=click.IntRange(1), help="Classes shown in the grid.")
@click.option("--per-class", default=8, show_default=True, type=click.IntRange(1), help="Samples per class in the grid (at most what a class holds).")
def shard_inspect(shards, png, max_classes, per_class):
    """Counts per split, classes, bytes, and a PNG grid of samples per class with their words.
    SHARDS may be a URL: its train split is fetched into the local cache first."""
    from .verify import inspect_shards

    shards = _local(shards, "train")
    summary = inspect_shards(shards, png=png, max_classes=max_classes, per_class=per_class)
    click.echo(summary["text"])


@main.group(cls=_Group)
def bench():
    """Measure throughput."""


def _not_empty(param, value):
    """A path flag of the bench commands: an empty one (an unset shell variable), the current folder to the file
    system, refused as train.py and tools/bench_loader.py refuse it (`errors.path_text`, exit 2)."""
    if value is not None:
        try:
            path_text(value)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"argument {param.opts[0]}: {e}") from None


def _release_root(ctx, param, value):
    """--images of the bench commands: `bench.check_images`, as tools/bench_loader.py checks it; an empty one
    (`_not_empty`) was the current folder, measured when a release."""
    from .bench import check_images

    _not_empty(param, value)
    return check_images(value)


def _shard_folder(ctx, param, value):
    """--shards of the bench commands: `shardset.local_folder`, train.py's check and words (exit 1), which
    tools/bench_loader.py uses too; an empty one (`_not_empty`) refused first."""
    from .shardset import local_folder

    _not_empty(param, value)
    return local_folder("--shards", value, DEFAULT_SHARDS)


def _json_file(ctx, param, value):
    """--json of the bench commands: `bench.check_json`, as tools/bench_loader.py checks it; an empty one
    (`_not_empty`) was said to be 'a folder'."""
    from .bench import check_json

    _not_empty(param, value)
    return check_json(value)


@bench.command("loader")
@click.option("--shards", default=DEFAULT_SHARDS, show_default=True, type=_Path(), callback=_shard_folder, help="Shard folder, from `tinyin shard build`.")
@click.option("--images", default=None, type=_Path(), metavar="DIRECTORY", callback=_release_root, help="The extracted release (ROOT/train is read by the ImageFolder baseline); required unless --remote-only.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1), help="Images per batch.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0), help="DataLoader workers for the baseline and the stream path.")
@click.option("--passes", default=5, show_default=True, type=click.IntRange(1), help="Timed passes per loader (median reported).")
@click.option("--pass-images", default=25_600, show_default=True, type=click.IntRange(1), help="Images per pass for loaders slower than 50k images/s.")
@click.option("--device", default="cpu", show_default=True, help="Device for the resident path (and the 224 row on CUDA).")
@click.option("--remote", is_flag=True, help="Also serve the shards on loopback HTTP: rows for curl's rate (the ceiling), a cold fetch into the cache, and the stream path.")
@click.option("--remote-only", is_flag=True, help="Only the loopback-HTTP rows of --remote (curl, fetch, stream; no --images).")
@click.option("--json", "json_path", default=None, type=_Path(), metavar="FILE", callback=_json_file, help="Also write the rows as JSON.")
def bench_loader_cmd(shards, images, batch_size, workers, passes, pass_images, device, remote, remote_only, json_path):
    """Images/s of the ImageFolder+PIL baseline and tinyin's loaders, side by side."""
    from .bench import bench_loader, bench_remote, failed_error, format_table, planned_rows
    from .device import check_device

    check_device(device)
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    planned = planned_rows((), remote=True) if remote_only else planned_rows(device=device, remote=remote)
    with sigterm_interrupts(STOPS) as stopped_by:  # SIGTERM ends the table early, as Ctrl-C does: the rows so far are kept
        if remote_only:
            rows = bench_remote(shards, batch_size=batch_size, workers=workers, passes=passes, log=log)
        elif images is None:
            raise click.UsageError("--images is required (the ImageFolder baseline reads it), unless --remote-only")
        else:
            rows = bench_loader(shards, images, batch_size=batch_size, workers=workers, passes=passes,
                                pass_images=pass_images, device=device, remote=remote, log=log)
    click.echo(format_table(rows, _command_line("bench loader"), batch_size, planned))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    if len(rows) < planned:
        raise SystemExit(stop_code(stopped_by))
    if error := failed_error(rows):  # after the table: a script or CI job saw exit 0 with a failed row in it
        raise error


def _csv(kind):
    """A click callback parsing a comma-separated list of `kind` (a click type) values, a bad one named in click's
    words for the type, as a lone value's are: `--size 28,x` said ''28,x' is not a comma-separated list'."""
    def parse(ctx, param, value):
        if value is None:
            return None
        return tuple(kind.convert(v, param, ctx) for v in value.split(",") if v)
    return parse


@bench.command("train")
@click.option("--shards", default=DEFAULT_SHARDS, show_default=True, type=_Path(), callback=_shard_folder, help="Shard folder, from `tinyin shard build`.")
@click.option("--images", default=None, type=_Path(), metavar="DIRECTORY", callback=_release_root, help="An extracted release (ROOT/train), for feed d [default: none, feed d off].")
@click.option("--arch", default=None, callback=_csv(click.STRING), help="Networks, comma-separated [default: all four].")
@click.option("--size", default=None, callback=_csv(click.INT), help="Input sizes, comma-separated (28, 64, 224) [default: all the zoo allows].")
@click.option("--batch", default="study,256", show_default=True, callback=_csv(click.STRING), help="Batch sizes; 'study' is the row's batch in the study.")
@click.option("--feeds", default=None, callback=_csv(click.STRING), help="a ceiling, b resident, c fast, d ImageFolder [default: a,b,c, and d with --images].")
@click.option("--compile/--no-compile", "compile_", default=None, help="Also run (a) and (b) through torch.compile [default: on CUDA only].")
@click.option("--device", default=None, help="Device the steps run on [default: cuda if available, else cpu].")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(0), help="Untimed steps first.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1), help="Steps per timed window.")
@click.option("--windows", default=3, show_default=True, type=click.IntRange(3), help="Timed windows (median reported).")
@click.option("--workers", default=None, type=click.IntRange(0), help="DataLoader workers of feed d [default: every core].")
@click.option("--json", "json_path", default=None, type=_Path(), metavar="FILE", callback=_json_file, help="Also write command, environment and rows as JSON.")
def bench_train_cmd(shards, images, arch, size, batch, feeds, compile_, device, warmup, steps, windows, workers, json_path):
    """Images/s of complete SGD steps per network, fed by the ceiling, tinyin's loaders and the study's pipeline."""
    import torch

    from .bench_train import bench_train, environment, failed_rows, format_table, plan, row_name
    from .device import check_device

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    compile_ = device.startswith("cuda") if compile_ is None else compile_
    feeds = (("a", "b", "c", "d") if images else ("a", "b", "c")) if feeds is None else feeds  # `--feeds ,`: plan's
    cases = plan(arch, size, batch, feeds, compile_)
    with sigterm_interrupts(STOPS) as stopped_by:  # SIGTERM (a scheduler, a deadline) ends the table early, as Ctrl-C does
        rows = bench_train(shards, images, cases, device=device, warmup=warmup, steps=steps, windows=windows,
                           workers=workers, log=lambda m: click.echo(m, err=True))
    env, command = environment(device), _command_line("bench train")
    click.echo(format_table(rows, command, env, warmup, steps, windows, planned=len(cases)))
    if json_path:
        Path(json_path).write_text(json.dumps(dict(command=command, env=env, planned=len(cases), rows=rows), indent=1))
    if len(rows) < len(cases):
        raise SystemExit(stop_code(stopped_by))
    # After the table and its JSON: a script or CI job that ran it saw exit 0 with a row out of memory in it.
    if failed := failed_rows(rows):
        raise TinyinError(f"{len(failed)} {plural(len(failed), 'row')} failed: {', '.join(map(row_name, failed))} "
                          "(the table says why)")


@main.command("report")
@click.argument("runs", nargs=-1, required=True, type=_Path(empty="a run folder (train.py's --output-dir)"))  # a missing one: report's own one line, exit 1
@click.option("--out", default="report", show_default=True, type=_Path(file_okay=False, empty="the folder for the report"),
              callback=_name_fits, help="Folder for report.md, report.json (every run's args, metrics and final figures) and curves.png.")
def report_cmd(runs, out):
    """The study's table (Markdown) for train.py's run folders RUNS, and their learning curves in one PNG."""
    from .report import write_report

    try:
        md, png = write_report(list(runs), out)
    except ValueError as e:
        raise TinyinError(str(e)) from None
    click.echo(Path(md).read_text().rstrip())
    click.echo(f"wrote {md} and {png}")


if __name__ == "__main__":
    main()
