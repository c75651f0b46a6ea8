#!/usr/bin/env python
"""Loader images/s side by side: ImageFolder+PIL baseline vs tinyin's paths vs the memmap ceiling.

    .venv/bin/python tools/bench_loader.py                       # the real archive in ../shared/data
    .venv/bin/python tools/bench_loader.py --src RELEASE.tar.gz  # any release archive or folder
    .venv/bin/python tools/bench_loader.py --shards DIR --images ROOT
    .venv/bin/python tools/bench_loader.py --shards DIR --remote-only   # the loopback-HTTP rows alone

Given an archive, it builds shards and extracts a baseline copy into a temporary folder (removed
at the end), then runs the same measurement as `tinyin bench loader`.
"""
import argparse
import json
import shlex
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.bench import (bench_loader, bench_remote, check_images, check_json, failed_error, format_table,  # noqa: E402
                            planned_rows)
from pipeline.build import build_shards  # noqa: E402
from pipeline.cli import bench_loader_cmd  # noqa: E402
from pipeline.device import check_device  # noqa: E402
from pipeline.errors import STOPS, ArgumentParser, UsageError, path_text, run_cli, sigterm_interrupts, stop_code  # noqa: E402
from pipeline.source import ROOT_MARKER, not_a_release, not_an_archive  # noqa: E402
from pipeline.shardset import local_folder  # noqa: E402

DEFAULT_SRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200.tar.gz"


def extract(src, dest):
    """Extract an archive for the ImageFolder baseline; return the folder holding wnids.txt.
    The build's own SourceError (`not_an_archive`, `not_a_release`) for a file that is no archive or an
    archive of no release (with --shards given no build ran to say it first: they were a ReadError or
    StopIteration traceback)."""
    if zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as zf:
            zf.extractall(dest)
    else:
        try:
            with tarfile.open(src) as tf:
                tf.extractall(dest, filter="data")
        except tarfile.ReadError:
            raise not_an_archive(src) from None
    root = next(Path(dest).rglob(ROOT_MARKER), None)
    if root is None:
        raise not_a_release(src)
    return root.parent


def checked_as_the_command(args, names):
    """`args`' values of `names` (argparse's dests), as typed, read by `tinyin bench loader`'s own options:
    one range, and one message for one mistake (click's, `Invalid value for '--passes': 0 is not in the
    range x>=1.`; the tool said it in argparse's words, `argument --passes: must be at least 1, not 0`)."""
    ctx = click.Context(bench_loader_cmd)
    for param in bench_loader_cmd.params:
        if param.name in names:
            try:
                setattr(args, param.name, param.type_cast_value(ctx, getattr(args, param.name)))
            except click.BadParameter as e:  # as the command's `_one_line` turns it into a line
                raise UsageError(e.format_message()) from None


# The options the tool shares with `tinyin bench loader`: its flags, defaults and help, read from the command.
COMMAND_OPTIONS = ("batch_size", "workers", "passes", "pass_images", "device", "remote", "remote_only")


def add_command_option(parser, name):
    """`tinyin bench loader`'s option `name` (click's name, argparse's dest) on `parser`: its flag, default and
    help, so the tool takes it with the same meaning. Numbers as typed: `checked_as_the_command` reads them."""
    param = next(p for p in bench_loader_cmd.params if p.name == name)
    text = param.help.replace("%", "%%")
    if param.is_flag:
        parser.add_argument(*param.opts, action="store_true", help=text)
    else:
        parser.add_argument(*param.opts, default=param.default, help=f"{text}  [default: %(default)s]")


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=str(DEFAULT_SRC), type=path_text, help="release archive or folder (default: %(default)s)")
    parser.add_argument("--shards", type=path_text, help="an existing shard folder (skips the build)")
    parser.add_argument("--images", type=path_text, help="an extracted release folder (skips the extraction)")
    for name in COMMAND_OPTIONS:
        add_command_option(parser, name)
    parser.add_argument("--json", type=path_text, help="also write the rows here")
    args = parser.parse_args()
    checked_as_the_command(args, ("batch_size", "workers", "passes", "pass_images"))  # --passes 0: a traceback after the warm-up
    check_device(args.device)  # found by the resident row, after the baseline's minutes
    check_json(args.json)  # as `tinyin bench loader` checks it
    check_images(args.images)  # before the build of --src, as the command does (found after it, the build was lost)
    if args.shards is not None:
        local_folder("--shards", args.shards)  # as `tinyin bench loader` and train.py check it
    needs_images = args.images is None and not args.remote_only  # the remote rows read no images
    if (args.shards is None or needs_images) and not Path(args.src).exists():
        sys.exit(f"error: {args.src}: not found (pass --src)")  # as tools/bench_build.py says it
    tmp = Path(tempfile.mkdtemp(prefix="tinyin-bench-loader-"))
    try:
        shards, images = args.shards, args.images
        if shards is None:
            print(f"building shards from {args.src} ...", file=sys.stderr)
            shards = tmp / "shards"
            build_shards(args.src, shards, progress=False)
        if needs_images:
            src = Path(args.src)
            images = src if src.is_dir() else extract(src, tmp / "images")
        check_images(images)  # as `tinyin bench loader` checks it
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
        with sigterm_interrupts(STOPS) as stopped_by:  # SIGTERM (SIGUSR1) ends the table early, as Ctrl-C does: the rows so far are kept
            if args.remote_only:
                rows = bench_remote(shards, batch_size=args.batch_size, workers=args.workers, passes=args.passes, log=log)
            else:
                rows = bench_loader(shards, images, batch_size=args.batch_size, workers=args.workers, passes=args.passes,
                                    pass_images=args.pass_images, device=args.device, remote=args.remote, log=log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    planned = planned_rows((), remote=True) if args.remote_only else planned_rows(device=args.device, remote=args.remote)
    print(format_table(rows, "python tools/bench_loader.py " + shlex.join(sys.argv[1:]), args.batch_size, planned))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if len(rows) < planned:
        sys.exit(stop_code(stopped_by))
    if error := failed_error(rows):  # as `tinyin bench loader`: after the table, the failed rows named, exit 1
        raise error


if __name__ == "__main__":
    with sigterm_interrupts(STOPS):  # SIGTERM (kill, timeout, a scheduler; its SIGUSR1) removes the temporary folder, as Ctrl-C does
        run_cli(main)  # a user's mistake (no such --shards or --src, not a release): one line, not a traceback
