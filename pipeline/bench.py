"""Loader throughput, side by side in one run: the ImageFolder+PIL baseline, tinyin's three read
paths, and a numpy-memmap gather of the same bytes as the ceiling. Used by `tinyin bench loader`
and `tools/bench_loader.py`; prints a Markdown table (images/s = median of the passes).

For the local paths it also times the first batch: `make_loader(folder)` called -> first batch
in hand, with this process's record of already-hashed shards cleared (as in a new process; the
page cache is whatever the machine has), and when the background data pass (checksums, pages,
the resident copy) is done. The throughput passes start after that pass.

With `remote=True` also the set served on loopback HTTP: curl's transfer rate (the ceiling), a
cold fetch into the cache, and the stream path."""
import contextlib
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import reader
from .atomic import long_name, refusal
from .errors import TinyinError, UsageError, plural
from .loader import make_loader
from .provenance import commit
from .reader import ShardArrays
from .release import is_image
from .schema import VARIANTS
from .shardset import open_shard_set
from .stream_workers import WORKER_RULE, started

SLOW = 50_000  # images/s below which a pass may stop mid-epoch (a full epoch would take minutes)
FAST_PASS = 100_000  # fast loaders run whole epochs back to back until at least this many images
PROBE_S = 0.5  # the warm-up pass that decides fast or slow lasts at least this long (see `_measure`)


def check_images(images):
    """--images of the bench commands and tools/bench_loader.py: a folder with train/ in it, which the
    ImageFolder baseline reads (any other folder failed in torchvision with a traceback, after the rows
    before it had run). One check, so that the command and the tool say the same. Returns `images`."""
    if images is not None and not (Path(images) / "train").is_dir():
        raise UsageError(f"--images {images}: no train/ folder; pass the extracted release (ROOT/train/WNID/images)")
    return images


def check_json(path):
    """--json of the bench commands and tools/bench_loader.py: a file in a folder that is there. Written after
    the measuring, a missing folder or a folder named was a traceback then, the rows left only on stdout.
    Returns `path`. A name over NAME_MAX is named (`long_name`): it was 'File name too long: PATH'."""
    if path is not None and (why := long_name(path)):
        raise UsageError(f"--json {path}: {why}; choose a shorter name")
    if path is not None and not Path(path).absolute().parent.is_dir():
        raise UsageError(f"--json {path}: no folder {Path(path).parent} to write it in")
    if path is not None and Path(path).is_dir():
        raise UsageError(f"--json {path}: a folder; name a file in it to write the rows in")
    if path is not None and str(path).endswith(os.sep):  # Path drops the '/': open() refused it after the measuring
        raise UsageError(f"--json {path}: a folder's name (it ends in '{os.sep}'); name a file to write the rows in")
    why = path is not None and refusal(Path(path).absolute().parent)
    if why:  # another user's folder, a read-only mount: found after the measuring, the JSON lost
        raise UsageError(f"--json {path}: cannot write in {Path(path).parent} ({why})")
    return path


def _time_pass(make_iter, first_epoch, min_images, stop_mid_epoch, min_seconds=0.0):
    """Images/s over whole epochs (or a cut epoch) until at least `min_images` images and `min_seconds`."""
    n, epoch, start = 0, first_epoch, time.perf_counter()

    def done():
        return n >= min_images and time.perf_counter() - start >= min_seconds
    while not done():
        for batch in make_iter(epoch):
            n += len(batch[1])
            if stop_mid_epoch and done():
                break
        epoch += 1
    return n / (time.perf_counter() - start)


def _measure(make_iter, passes, pass_images):
    """Median images/s over `passes` timed passes, after warm-up that also sizes them. Fast
    loaders get a whole warm-up pass so every page they will read is in the page cache.
    The first warm-up pass, which decides, lasts at least `PROBE_S`: a pass of a batch or two is
    mostly the epoch's start (a permutation, the workers' first shards), so at a small
    `pass_images` a loader of a million images/s read as slow by chance, and its row, timed over
    such passes, varied up to 100x between runs."""
    slow = _time_pass(make_iter, 0, pass_images, True, PROBE_S) < SLOW
    size = pass_images if slow else FAST_PASS
    if not slow:
        _time_pass(make_iter, 1, size, False)
    rates = [_time_pass(make_iter, 1000 * (p + 1), size, slow) for p in range(passes)]
    return statistics.median(rates), f"{size:,} {plural(size, 'image')}" + ("" if slow else " (whole epochs)")


def _measure_epochs(make_iter, passes, n):
    """Median images/s over `passes` whole epochs of `n` images, after one untimed. For the stream path,
    which begins an epoch by reading whole shards (10,000 images each) in its workers: a pass cut after
    25,600 images timed mostly that start, and read 2.5-3.5x below the path's rate over an epoch."""
    _time_pass(make_iter, 0, n, False)
    rates = [_time_pass(make_iter, 1000 * (p + 1), n, False) for p in range(passes)]
    return statistics.median(rates), f"{n:,} {plural(n, 'image')} (whole epochs)"


def _imagefolder(root, variant, batch_size, workers):
    from torchvision import datasets, transforms

    steps = [transforms.Resize((28, 28)), transforms.Grayscale()] if variant == "gray28" else []
    # `is_image`: ImageFolder's own files less the AppleDouble `._*` ones of a macOS copy, which PIL cannot open
    # (the row failed with a traceback): the images `shard build` reads.
    dataset = datasets.ImageFolder(str(Path(root) / "train"), transforms.Compose(steps + [transforms.PILToTensor()]),
                                   is_valid_file=is_image)
    # The stream path's rule for its workers: a SIGTERM to the process group (a scheduler's, `kill -TERM -PGID`)
    # killed them, and torch raised "DataLoader worker (pid N) is killed by signal: Terminated." as a traceback.
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, **(WORKER_RULE if workers else {}))
    return lambda epoch: started(loader)


def _epochs(loader):
    def epoch_iter(epoch):
        loader.set_epoch(epoch)
        return iter(loader)
    return epoch_iter


def _stock_webdataset(shards, variant, batch_size, workers):
    """The peers' way to read these shards: stock `webdataset` parsing tar members and decoding .npy
    (a shuffle buffer, batches collated in the workers): what the stream path used to be."""
    import webdataset as wds

    member = VARIANTS[variant][0]
    urls = [str(shards.where(e)) for e in shards.entries("train")]
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node, empty_check=False)
               .shuffle(2000).decode().to_tuple(member, "cls").batched(batch_size))
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                           **(WORKER_RULE if workers else {}))  # as _imagefolder's
    return lambda epoch: started(loader)


def _stream_loader(shards, variant, batch_size, workers):
    loader = make_loader(shards, "train", variant, batch_size, path="stream", raw=True, workers=workers)
    return _epochs(loader), {"whole_epochs_of": loader.num_samples}


def _timed_loader(shards, variant, batch_size, path, **kw):
    """A local path's loader, with the seconds to its first batch and to the end of its data pass."""
    reader._verified.clear()  # hash every shard again, as a new process would
    start = time.perf_counter()
    loader = make_loader(shards.location, "train", variant, batch_size, path=path, raw=True, **kw)
    next(iter(loader))
    first = time.perf_counter() - start
    loader.wait_ready()
    return _epochs(loader), {"first_batch_s": first, "data_pass_s": time.perf_counter() - start}


def _ceiling(shards, variant, batch_size):
    """Random fancy-index gather from one contiguous memory-mapped array of the same pixels."""
    arrays = ShardArrays(shards, "train", variant, checksum=False)
    fd, path = tempfile.mkstemp(suffix=".npy")
    os.close(fd)
    try:  # a Ctrl-C while the copy is written (seconds) left it, the whole split (1.2 GB of rgb64), in /tmp
        flat = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(arrays), *arrays.shape))
        flat[:] = arrays.load_all().numpy().reshape(flat.shape)
        flat.flush()
        flat = np.load(path, mmap_mode="r")
    finally:
        os.unlink(path)  # the mapping stays valid; nothing is left behind

    def epoch_iter(epoch):
        perm = np.random.default_rng(epoch).permutation(len(flat))
        for start in range(0, len(perm), batch_size):
            idx = np.sort(perm[start:start + batch_size])
            yield flat[idx], idx
    return epoch_iter


def _loaders(shards, images, variant, batch_size, workers, include_baseline, device):
    """`bench_loader`'s rows of `variant`, in order: (loader, workers, a function that builds it). Nothing is
    built here, so `planned_rows` counts them with no set."""
    loaders = []
    if include_baseline:
        loaders.append(("ImageFolder + PIL (baseline)", workers, lambda: _imagefolder(images, variant, batch_size, workers)))
    loaders += [
        ("stock webdataset (tar members, npy decode)", workers,
         lambda: _stock_webdataset(shards, variant, batch_size, workers)),
        ("tinyin stream (whole shards)", workers, lambda: _stream_loader(shards, variant, batch_size, workers)),
        ("tinyin fast (mmap gather)", "0 (inline)", lambda: _timed_loader(shards, variant, batch_size, "fast")),
        ("tinyin resident", 0, lambda: _timed_loader(shards, variant, batch_size, "resident", device=device)),
        ("ceiling: numpy memmap gather", 0, lambda: _ceiling(shards, variant, batch_size)),
    ]
    if device != "cpu":
        loaders.append((f"tinyin fast -> {device}, float, 224 upscale", "1 thread",
                        lambda: _device_loader(shards, variant, batch_size, device)))
    return loaders


# `bench_remote`'s rows, in order; the two of CURL_ROWS only with curl on PATH.
CURL_CEILING, CURL_DOWNLOAD = "ceiling: curl, loopback HTTP (1 connection)", "curl -o: the shards downloaded into files"
REMOTE_FETCH, REMOTE_STREAM = "remote fetch (cold cache -> checked copy)", "remote stream (make_loader(URL, path=stream))"
CURL_ROWS = (CURL_CEILING, CURL_DOWNLOAD)
REMOTE_ROWS = (*CURL_ROWS, REMOTE_FETCH, REMOTE_STREAM)


def planned_rows(variants=("rgb64", "gray28"), include_baseline=True, device="cpu", remote=False):
    """How many rows `bench_loader` makes with these arguments (`variants=()`, `remote=True`: `bench_remote`):
    the M of a stopped table's "stopped early after N of M rows"."""
    local = len(_loaders(None, None, None, 0, 0, include_baseline, device))  # bench_loader's rows of a variant
    remote_rows = len(REMOTE_ROWS) - (0 if shutil.which("curl") else len(CURL_ROWS))
    return len(variants) * local + (remote and remote_rows)


def bench_loader(shards, images, batch_size=256, workers=2, passes=3, pass_images=25_600,
                 variants=("rgb64", "gray28"), include_baseline=True, device="cpu", remote=False, log=print):
    """Measure every loader for each variant; returns a list of row dicts and logs as it goes.
    shards: a local shard folder or ShardSet (opened once here). remote: add the loopback-HTTP rows
    (`bench_remote`) at the end.
    A KeyboardInterrupt (Ctrl-C; `tinyin bench loader` turns SIGTERM into one) ends the run early
    and returns the rows measured so far, fewer than `planned_rows`."""
    shards = open_shard_set(shards)
    rows = []
    try:
        for variant in variants:
            for name, how, build in _loaders(shards, images, variant, batch_size, workers, include_baseline, device):
                built = build()
                epoch_iter, times = built if isinstance(built, tuple) else (built, {})
                whole = times.pop("whole_epochs_of", None)  # the stream path: timed over whole epochs of so many images
                rate, size = (_measure_epochs(epoch_iter, passes, whole) if whole
                              else _measure(epoch_iter, passes, pass_images))
                row = {"variant": variant, "loader": name, "workers": how, "images_per_s": rate, "pass": size, **times}
                rows.append(row)
                first = f", first batch {times['first_batch_s']:.2f} s" if times else ""
                log(f"  {variant:<6} {name:<44} {rate:>12,.0f} images/s{first}")
    except KeyboardInterrupt:  # a long table stopped: the rows already measured are still worth printing
        log(f"stopped after {len(rows)} of {planned_rows(variants, include_baseline, device, remote)} rows")
        remote = False  # no remote rows after a stop
    for row in rows:
        base = next((r["images_per_s"] for r in rows if r["variant"] == row["variant"] and "baseline" in r["loader"]), None)
        ceil = next((r["images_per_s"] for r in rows if r["variant"] == row["variant"] and "ceiling" in r["loader"]), None)
        row["x_baseline"] = row["images_per_s"] / base if base else None
        row["of_ceiling"] = row["images_per_s"] / ceil if ceil else None  # None: stopped before the ceiling's row
    if remote:
        rows += bench_remote(shards.location, batch_size, workers, passes, log)
    return rows


# The loopback server of the remote rows: Python's http.server, but the body goes out with
# os.sendfile (socket.sendfile) instead of 64 KiB read()/write() copies. That copy loop cost
# 0.6 CPU-s/GB here against 0.15, on the same 2 cores the clients use; both rows read this server.
_SERVER = """
import functools, http.server, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def copyfile(self, source, outputfile):
        self.connection.sendfile(source)
handler = functools.partial(Handler, directory=sys.argv[2])
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
"""


@contextlib.contextmanager
def serve_folder(folder):
    """An HTTP server (`_SERVER`: http.server sending file bodies with sendfile) for `folder` on a free
    loopback port, in its own process as a real server would be (the benchmark's GIL is not the
    server's); yields the base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(port), str(folder)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):  # up to 10 s for the interpreter to start and bind
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()


def _curl(urls, folder=None):
    """Seconds for one curl process to fetch `urls` one after another into /dev/null (or, a download,
    into files of `folder`), and the bytes."""
    cmd = ["curl", "-sS", "--fail", "-w", "%{size_download}\\n"]
    for url in urls:
        cmd += ["-o", os.path.join(folder, url.rsplit("/", 1)[-1]) if folder else os.devnull, url]
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - start, sum(int(n) for n in out.split())


def bench_remote(shards, batch_size=256, workers=2, passes=3, log=print):
    """Rows for the train split served on loopback HTTP (`serve_folder`), one server for all: curl's
    transfer rate into /dev/null (the link: the ceiling), curl downloading the shards into files (the
    same job as a fetch), and `cached_copy` from a cold cache to checked local files, in alternating
    passes, then `make_loader(URL, path="stream")` over `passes` whole epochs. One untimed fetch comes
    first: on this project's VM the first write into its ext4 after a pause costs far more than one
    right after another (2.4 against 0.65 CPU-s/GB; tmpfs shows no such difference), which is the
    file system, not the fetch. The folders are made by `tempfile` (TMPDIR picks the file system).
    Samples/s = bytes/s over the set's bytes per sample. A KeyboardInterrupt ends it early, as `bench_loader`."""
    from .cache import cached_copy
    from .shardset import ShardSet

    local = ShardSet(shards)
    entries = local.entries("train")
    total = sum(e["bytes"] for e in entries)
    per_sample = total / local.counts["train"]
    rows = []

    def row(name, how, rate, note, of):
        rows.append({"variant": "rgb64+gray28" if "stream" not in name else "rgb64", "loader": name, "workers": how,
                     "images_per_s": rate, "pass": note, "x_baseline": None, "of_ceiling": of})
        log(f"  remote {name:<44} {rate:>12,.0f} images/s  {note}")

    def timed_into_new_folder(transfer):
        """bytes/s of transfer(folder) into a new folder, deleted afterwards (every pass starts cold)."""
        folder = tempfile.mkdtemp(prefix="tinyin-bench-cache-")
        try:
            start = time.perf_counter()
            transfer(folder)
            return total / (time.perf_counter() - start)
        finally:
            shutil.rmtree(folder)

    def curl_into(folder):
        secs, got = _curl([f"{url}/{e['file']}" for e in entries], folder)
        if got != total:
            raise RuntimeError(f"curl fetched {got:,} of {total:,} bytes from {url}")
        return total / secs

    def fetch_into(folder):
        cached_copy(url, "train", cache_dir=folder, progress=False)

    try:
        with serve_folder(shards) as url:
            curl, download, fetch = [], [], []
            has_curl = shutil.which("curl") is not None
            if not has_curl:
                log("  remote: no curl on PATH; no ceiling row")
            warm = timed_into_new_folder(fetch_into)
            for _ in range(passes):
                if has_curl:
                    curl.append(curl_into(None))
                    download.append(timed_into_new_folder(curl_into))
                fetch.append(timed_into_new_folder(fetch_into))
            gb = lambda rates: ", ".join(f"{r / 1e9:.2f}" for r in rates)  # noqa: E731
            ceiling = statistics.median(curl) / per_sample if curl else None
            if curl:
                row(CURL_CEILING, "1 process", ceiling,
                    f"{total / 1e9:.2f} GB of train shards x {passes} to /dev/null: {gb(curl)} GB/s", 1.0)
                rate = statistics.median(download) / per_sample
                row(CURL_DOWNLOAD, "1 process", rate, f"{gb(download)} GB/s",
                    rate / ceiling)
            rate = statistics.median(fetch) / per_sample
            of_download = f", {statistics.median(fetch) / statistics.median(download):.1f}x curl -o" if curl else ""
            row(REMOTE_FETCH, f"{_fetch_workers()} threads", rate,
                f"{gb(fetch)} GB/s{of_download} (untimed first pass: {warm / 1e9:.2f})",
                rate / ceiling if ceiling else None)
            try:
                loader = make_loader(url, "train", path="stream", raw=True, workers=workers, batch_size=batch_size)
                why = (None if loader.num_samples == local.counts["train"] else
                       f"its epoch holds {loader.num_samples:,} images, the train split {local.counts['train']:,}")
            except Exception as e:  # noqa: BLE001 - the stream path's own errors, reported as the row's note
                lines = str(e).strip().splitlines()
                why = e.__class__.__name__ + (f": {lines[0]}" if lines else "")
            if why is None:
                # Whole epochs, each from its workers' start: what a training epoch costs on this path.
                rate, size = _measure_epochs(_epochs(loader), passes, loader.num_samples)
                row(REMOTE_STREAM, workers, rate, size, rate / ceiling if ceiling else None)
            else:  # a failure, said as one (it was "not on this branch", from before the stream path read set URLs)
                log(f"  remote stream: failed: {why}")
                rows.append({"variant": "rgb64", "loader": REMOTE_STREAM,
                             "workers": workers, "images_per_s": None, "pass": "failed: " + why[:120],
                             "x_baseline": None, "of_ceiling": None})
    except KeyboardInterrupt:  # as bench_loader's: the rows so far
        log(f"stopped after {len(rows)} of {planned_rows((), remote=True)} remote rows")
    return rows


def _fetch_workers():
    from .cache import WORKERS

    return WORKERS




def _device_loader(shards, variant, batch_size, device):
    # path="fast", as the row says: "auto" takes the resident path for any split up to 2 GiB (the 64x64 one
    # too), so the row measured the resident loader under the fast path's name.
    loader = make_loader(shards, "train", variant, batch_size, device=device, size=224, channels_last=True,
                         dtype=torch.bfloat16, path="fast")

    def epoch_iter(epoch):
        loader.set_epoch(epoch)
        for images, labels in loader:
            yield images, labels
        torch.cuda.synchronize(device)  # its own: the current device's (cuda:0) did not wait for --device cuda:1
    return epoch_iter


def failed_error(rows):
    """The TinyinError naming the rows of `bench_loader` and `bench_remote` that failed (those without images/s:
    the remote stream's), for the exit after the table and its JSON; None when none failed."""
    if failed := [r for r in rows if r["images_per_s"] is None]:
        return TinyinError(f"{len(failed)} {plural(len(failed), 'row')} failed: "
                           f"{', '.join(r['loader'] for r in failed)} (the table says why)")
    return None


def format_table(rows, command, batch_size, planned=None):
    """The Markdown table, headed by the command, commit and machine that produced it (and, when
    `planned` rows were more than the rows, by how many rows it stopped after)."""
    lines = [f"# {command}",
             f"# commit {commit()}; {platform.node()}: {os.cpu_count()} "
             f"{plural(os.cpu_count(), 'core')}, torch {torch.__version__}, batch {batch_size}, "
             f"train split, shuffled, median of passes",
             *([f"# stopped early after {len(rows)} of {planned} rows"] if planned and planned > len(rows) else []),
             "| variant | loader | workers | images/s | × baseline | of ceiling | pass | first batch (data pass done) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = f"{r['x_baseline']:.1f}×" if r["x_baseline"] else "—"
        rate = "—" if r["images_per_s"] is None else f"{r['images_per_s']:,.0f}"
        of = "—" if r["of_ceiling"] is None else f"{r['of_ceiling']:.0%}"
        first = (f"{r['first_batch_s']:.2f} s" + (f" ({r['data_pass_s']:.1f} s)" if r.get("data_pass_s") else "")
                 if r.get("first_batch_s") is not None else "—")
        lines.append(f"| {r['variant']} | {r['loader']} | {r['workers']} | {rate} | {x} | {of} | {r['pass']} | {first} |")
    return "\n".join(lines)
