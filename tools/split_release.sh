#!/usr/bin/env bash
# Get the release onto the GPU machine, which only sees this repo (64 MiB a call) and keeps /tmp
# only while it stays warm.
#   here:  tools/split_release.sh split [ARCHIVE]   -> out/release-parts/part-{aa,ab,ac} (< 60 MiB each; out/ is git-ignored)
#   there: tools/split_release.sh stash             -> copies the carried part(s) into /tmp/release-parts
#          tools/split_release.sh join              -> /tmp/tiny-imagenet-200.tar.gz, sha256 checked
set -euo pipefail
SHA=f1adac85b2ed3f04c4be445c51567108d05d23eb0f55d64511109291823dd943
PARTS=out/release-parts
cd "$(dirname "$0")/.."
case "${1:-}" in
  split)
    src=${2:-../shared/data/tiny-imagenet-200.tar.gz}
    [ -f "$src" ] || src=../../shared/data/tiny-imagenet-200.tar.gz   # from a worktree under /work/wt
    echo "$SHA  $src" | sha256sum -c --quiet
    mkdir -p "$PARTS" && rm -f "$PARTS"/part-*
    split -n 3 -a 2 "$src" "$PARTS/part-"   # 165,333,191 bytes -> three of ~52.6 MiB
    ls -l "$PARTS" ;;
  stash)
    mkdir -p /tmp/release-parts && cp "$PARTS"/part-* /tmp/release-parts/ && ls -l /tmp/release-parts ;;
  join)
    cat /tmp/release-parts/part-aa /tmp/release-parts/part-ab /tmp/release-parts/part-ac > /tmp/tiny-imagenet-200.tar.gz
    echo "$SHA  /tmp/tiny-imagenet-200.tar.gz" | sha256sum -c ;;
  wheels)   # webdataset (+ braceexpand) for the GPU machine's Python 3.12; only verify/stream paths import it
    rm -rf .whl && mkdir -p .whl
    ${PIP:-/work/main/.venv/bin/pip} download -q --no-deps -d .whl webdataset==1.0.2 braceexpand==0.1.7
    ls -l .whl ;;
  *) echo "usage: $0 split [ARCHIVE] | stash | join | wheels" >&2; exit 2 ;;
esac
