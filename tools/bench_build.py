#!/usr/bin/env python
"""Time `build_shards` on a release (default: the real archive in ../shared/data) and print a table.

    .venv/bin/python tools/bench_build.py [--src PATH] [--workers N] [--repeat 2]

Each run builds into a fresh temporary folder (page cache warm after the first read).
"""
import argparse
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.build import build_shards  # noqa: E402
from pipeline.errors import (STOPS, ArgumentParser, at_least, path_text, plural, run_cli, signals_deferred,  # noqa: E402
                             sigterm_interrupts)
from pipeline.provenance import commit  # noqa: E402

DEFAULT_SRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200.tar.gz"


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=str(DEFAULT_SRC), type=path_text, help="release folder/zip/tar (default: %(default)s)")
    # at least 1: --repeat 0 printed an empty table, --workers -1 was a traceback
    parser.add_argument("--workers", type=at_least(1), default=None, help="decode processes (default: all cores)")
    parser.add_argument("--shard-size", type=at_least(1), default=10000, help="samples per shard (default: %(default)s)")
    parser.add_argument("--repeat", type=at_least(1), default=2, help="builds to time (default: %(default)s)")
    args = parser.parse_args()
    if not Path(args.src).exists():
        sys.exit(f"error: {args.src}: not found (pass --src)")
    rows = []
    for run in range(args.repeat):
        tmp = None
        try:
            # A SIGTERM (Ctrl-C) deferred: one just after the folder was made, before `tmp` named it, left it.
            with signals_deferred():
                tmp = Path(tempfile.mkdtemp(prefix="tinyin-bench-build-"))
            t = time.perf_counter()
            manifest = build_shards(args.src, tmp / "shards", workers=args.workers, shard_size=args.shard_size,
                                    progress=False)
            seconds = time.perf_counter() - t
        finally:
            if tmp is not None:
                with signals_deferred():  # stopped halfway, the removal left the rest of the build
                    shutil.rmtree(tmp, ignore_errors=True)
        n = sum(manifest["counts"].values())
        rows.append((run + 1, n, seconds, n / seconds))
    print(f"# tinyin shard build: {shlex.join(sys.argv)}")
    print(f"# commit {commit()}; {platform.node()}, {os.cpu_count()} {plural(os.cpu_count(), 'core')}, "
          f"workers={args.workers or os.cpu_count()}, src={args.src}")
    print("| run | images | seconds | images/s |\n|---|---|---|---|")
    for run, n, seconds, rate in rows:
        print(f"| {run} | {n:,} | {seconds:.1f} | {rate:,.0f} |")


if __name__ == "__main__":
    with sigterm_interrupts(STOPS):  # SIGTERM (kill, timeout, a scheduler; its SIGUSR1) removes the temporary folder, as Ctrl-C does
        run_cli(main)  # a user's mistake (--src not a release): one line, not a traceback
