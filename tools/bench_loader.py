#!/usr/bin/env python
"""Loader images/s side by side: ImageFolder+PIL baseline vs tinyin's paths vs the memmap ceiling.

    .venv/bin/python tools/bench_loader.py                       # the real archive in ../shared/data
    .venv/bin/python tools/bench_loader.py --src RELEASE.tar.gz  # any release archive or folder
    .venv/bin/python tools/bench_loader.py --shards DIR --images ROOT

Given an archive, it builds shards and extracts a baseline copy into a temporary folder (removed
at the end), then runs the same measurement as `tinyin bench loader`.
"""
import argparse
import json
import os
import shlex
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.bench import bench_loader, check_images, check_json, format_table, planned_rows  # noqa: E402
from pipeline.build import build_shards  # noqa: E402
from pipeline.cli import bench_loader_cmd  # noqa: E402
from pipeline.device import check_device  # noqa: E402
from pipeline.errors import UsageError, run_cli, sigterm_interrupts, stop_code  # noqa: E402
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=str(DEFAULT_SRC), type=os.path.expanduser, help="release archive or folder (default: %(default)s)")
    parser.add_argument("--shards", type=os.path.expanduser, help="an existing shard folder (skips the build)")
    parser.add_argument("--images", type=os.path.expanduser, help="an extracted release folder (skips the extraction)")
    # Numbers as typed: `checked_as_the_command` reads them.
    parser.add_argument("--batch-size", default=256, help="images per batch (default: %(default)s)")
    parser.add_argument("--workers", default=2, help="baseline/stream workers (default: %(default)s)")
    parser.add_argument("--passes", default=5, help="timed passes per loader (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="resident/224 device (default: %(default)s)")
    parser.add_argument("--remote", action="store_true", help="also the loopback-HTTP rows: curl, remote fetch, remote stream")
    parser.add_argument("--json", type=os.path.expanduser, help="also write the rows here")
    args = parser.parse_args()
    checked_as_the_command(args, ("batch_size", "workers", "passes"))  # --passes 0: a traceback after the warm-up
    check_device(args.device)  # found by the resident row, after the baseline's minutes
    check_json(args.json)  # as `tinyin bench loader` checks it
    check_images(args.images)  # before the build of --src, as the command does (found after it, the build was lost)
    if args.shards is not None:
        local_folder("--shards", args.shards)  # as `tinyin bench loader` and train.py check it
    if (args.shards is None or args.images is None) and not Path(args.src).exists():
        sys.exit(f"error: {args.src}: not found (pass --src)")  # as tools/bench_build.py says it
    tmp = Path(tempfile.mkdtemp(prefix="tinyin-bench-loader-"))
    try:
        shards, images = args.shards, args.images
        if shards is None:
            print(f"building shards from {args.src} ...", file=sys.stderr)
            shards = tmp / "shards"
            build_shards(args.src, shards, progress=False)
        if images is None:
            src = Path(args.src)
            images = src if src.is_dir() else extract(src, tmp / "images")
        check_images(images)  # as `tinyin bench loader` checks it
        with sigterm_interrupts() as stopped_by:  # SIGTERM ends the table early, as Ctrl-C does: the rows so far are kept
            rows = bench_loader(shards, images, batch_size=args.batch_size, workers=args.workers, passes=args.passes,
                                device=args.device, remote=args.remote, log=lambda m: print(m, file=sys.stderr))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    planned = planned_rows(device=args.device, remote=args.remote)
    print(format_table(rows, "python tools/bench_loader.py " + shlex.join(sys.argv[1:]), args.batch_size, planned))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if len(rows) < planned:
        sys.exit(stop_code(stopped_by))


if __name__ == "__main__":
    with sigterm_interrupts():  # SIGTERM (kill, timeout, a scheduler) removes the temporary folder, as Ctrl-C does
        run_cli(main)  # a user's mistake (no such --shards or --src, not a release): one line, not a traceback
