"""`build_shards`: the offline stage. Release in, WebDataset shards + Parquet index + manifest out.

The release is read in one pass (`source`), planned into splits (`release`), and cut into
shards of `shard_size` samples. Each shard is one task for a worker process, which decodes its
JPEGs (`variants`) and writes the tar (`tarshard`), so decoding and writing use every core and
the parent only dispatches bytes. Everything is written into a sibling `<out>.tmp-<host>-<pid>` folder
that is renamed into place only when the manifest is complete: an interrupted build never leaves
a shard set that looks complete, and the same input and options give the same bytes. A build removes
the temporary folders that killed builds on this host left beside its `out`.
"""
import contextlib
import errno
import json
import multiprocessing as mp
import numbers
import os
import shutil
import signal
import socket
import stat
import time
import warnings
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
from numpy.random import default_rng
from PIL import Image

from . import index as index_io
from .atomic import long_name, write_json
from .checksum import file_sum64
from .errors import FORK_WARNING, ImageError, ShardError, SourceError, UsageError, signals_deferred, when_orphaned
from .release import plan_release
from .schema import FORMAT_VERSION, INDEX_FILE, MANIFEST_FILE, SHARD_PATTERN, SPLITS
from .source import ROOT_MARKER, open_release
from .tarshard import write_shard
from .variants import decode_images

_progress = _stop = None  # per-worker handles on the shared image counter and stop flag (set by _init_worker)


class Stopped(Exception):
    """A worker's task given up because the parent is leaving the build (Ctrl-C, another shard failed)."""


def _init_worker(counter, stop, parent):
    global _progress, _stop
    _progress, _stop = counter, stop
    # A parent killed outright (SIGKILL, the OOM killer) cannot stop its workers, and they never see
    # their task queue close (each holds its write end too, from the fork): they idled for good.
    when_orphaned(parent, lambda: os._exit(1), "tinyin-orphan")
    # Ctrl-C reaches the whole process group. A worker that took it would return it as its task's
    # exception and go on to the next task (or die inside the pool's queue and hang the parent);
    # the parent alone handles it, and sets `stop`. So with SIGUSR1 (a scheduler's, to every process of the job).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # Not the CLI's SIGTERM handler, which the fork inherits: the pool ends broken workers with SIGTERM.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _tick(n):
    """Count `n` more images decoded; give up the task if the parent has set the stop flag (checked
    every 256 images: the shards the pool already handed to its queue cannot be cancelled)."""
    if _stop is not None and _stop.is_set():
        raise Stopped
    if _progress is not None:
        with _progress.get_lock():
            _progress.value += n


CHUNK = 256  # images decoded between two looks at the stop flag; also the height of a strip, in images
RGB_BYTES, GRAY_BYTES = 64 * 64 * 3, 28 * 28  # one image's pixels in each variant


def _write_one_shard(path, split, entries, on_error):
    """Worker task: decode `entries` [(Item, jpeg_bytes)] and write them as one shard."""
    samples, rows, skipped = [], [], []
    # Exact integer histograms (train only): mean/std that do not depend on shard order.
    rgb_hist, gray_hist = np.zeros(3 * 256, np.int64), np.zeros(256, np.int64)
    for start in range(0, len(entries), CHUNK):
        decoded = []
        for item, data in entries[start:start + CHUNK]:
            try:
                decoded.append((item, *decode_images(data, item.path)))
            except ImageError as e:
                if on_error == "fail":
                    raise
                skipped.append({"source": item.path, "reason": str(e)})
        _tick(min(CHUNK, len(entries) - start))
        if not decoded:
            continue
        # The chunk's images pasted one below the other into a strip a variant: one `tobytes` gives every
        # image's bytes, one after the other, and one `histogram` counts them (~40 µs an image less than
        # a `tobytes` an image and numpy's histograms of the whole shard, whose copies fault in fresh memory).
        rgb_strip, gray_strip = Image.new("RGB", (64, 64 * len(decoded))), Image.new("L", (28, 28 * len(decoded)))
        for i, (_, rgb, gray) in enumerate(decoded):
            rgb_strip.paste(rgb, (0, 64 * i))
            gray_strip.paste(gray, (0, 28 * i))
        rgb_bytes, gray_bytes = memoryview(rgb_strip.tobytes()), memoryview(gray_strip.tobytes())
        if split == "train":
            rgb_hist += rgb_strip.histogram()  # 256 counts of R, then of G, then of B
            gray_hist += gray_strip.histogram()
        for i, (item, _, _) in enumerate(decoded):
            rows.append(item)
            meta = {"wnid": item.wnid or None, "split": split, "box": list(item.box) if item.box else None,
                    "source": item.path.rsplit("/", 1)[-1]}
            samples.append((item.key, rgb_bytes[i * RGB_BYTES:(i + 1) * RGB_BYTES],
                            gray_bytes[i * GRAY_BYTES:(i + 1) * GRAY_BYTES], item.label,
                            json.dumps(meta, separators=(",", ":")).encode()))
    sha, size, offsets = write_shard(path, samples)
    return {"sha256": sha, "sum64": file_sum64(path), "bytes": size, "rows": rows, "offsets": offsets,
            "skipped": skipped, "rgb_hist": rgb_hist.reshape(3, 256), "gray_hist": gray_hist}


def histograms(rgbs, grays):
    """Per-channel 256-bin histograms (int64) of the rgb64 and gray28 images `rgbs` and `grays` (non-empty
    lists): the manifest's stats are `_stats` of their sums over the train shards. `shard verify` recounts
    the shards with it; the build counts the same bytes a strip of images at a time (`_write_one_shard`),
    and a test holds the two equal."""
    planes = np.stack(rgbs).reshape(-1, 3).T.copy()  # one contiguous plane a channel
    return np.stack([_byte_histogram(plane) for plane in planes]), _byte_histogram(np.stack(grays).ravel())


def _byte_histogram(values):
    """How often each value 0..255 occurs in the contiguous uint8 array `values`."""
    # bincount converts its input to int64 first; counting byte pairs (uint16, 65,536 bins) converts
    # half as many values and runs ~3x faster on a shard's 41 M values per channel.
    even = len(values) & ~1
    pairs = np.bincount(values[:even].view(np.uint16), minlength=1 << 16).reshape(256, 256)
    return pairs.sum(0) + pairs.sum(1) + np.bincount(values[even:], minlength=256)


def _stats(hist):
    """Mean and std (of values scaled to [0, 1]) from per-channel 256-bin histograms."""
    hist = np.atleast_2d(hist).astype(np.float64)
    levels = np.arange(256) / 255.0
    count = hist.sum(1)
    mean = (hist * levels).sum(1) / np.maximum(count, 1)
    var = (hist * levels**2).sum(1) / np.maximum(count, 1) - mean**2
    return {"mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in np.sqrt(np.maximum(var, 0))]}


def _check_out(out, params):
    """Refuse an output folder that holds something other than this build."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / MANIFEST_FILE).is_file():
        raise ShardError(f"{out}: exists and is not a tinyin shard set (no {MANIFEST_FILE}); choose an empty folder")
    old = _read_manifest(out)
    was = {"format_version": old.get("format_version"), **(old.get("build") or {})}
    now = {"format_version": FORMAT_VERSION, **params}
    differ = [f"{key}: {_shown(was.get(key))} -> {_shown(now.get(key))}"
              for key in dict.fromkeys([*now, *was]) if was.get(key) != now.get(key)]
    if differ:
        raise ShardError(f"{out}: already holds a different build ({', '.join(differ)}); "
                         "choose another --out or delete it")


def _shown(value):
    return "none" if value is None else value


def _read_manifest(out):
    """The manifest of the shard set in `out`, or ShardError if it is not one (JSON, an object)."""
    path = out / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ShardError(f"{path}: not a tinyin manifest ({e}); choose an empty folder") from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: not a tinyin manifest (not a JSON object); choose an empty folder")
    return manifest


TRAIN_ORDER_SEED = 0


def _plan_tasks(plan, shard_size):
    tasks = []
    for split in SPLITS:
        items = plan.items[split]
        if split == "train":
            # The release lists train images class by class; a fixed shuffle before cutting shards
            # gives every shard every class, so a streaming reader's shuffle buffer sees a mix.
            # `default_rng` imported with this module: numpy imports numpy.random at its first use, and a
            # SIGTERM (Ctrl-C) that came while it did was lost (Cython's module setup runs a bare `except:
            # pass`), the build going on to the end and exiting 0.
            items = [items[i] for i in default_rng(TRAIN_ORDER_SEED).permutation(len(items))]
        for i, start in enumerate(range(0, len(items), shard_size)):
            tasks.append((SHARD_PATTERN.format(split=split, index=i), split, items[start:start + shard_size]))
    return tasks


def _run_tasks(files, tasks, tmp, workers, on_error, progress):
    from tqdm import tqdm

    total = sum(len(items) for _, _, items in tasks)
    # fork on purpose: a worker starts in milliseconds (a spawned one imports numpy, PIL and pyarrow again,
    # ~0.7 s on this machine, every build), is born with the parent's deferred Ctrl-C (a spawned one takes it
    # as a KeyboardInterrupt traceback while it imports), and is this process's child (a forkserver's is not:
    # `when_orphaned` watches this pid). Python 3.12 warns that the fork copies a process with threads:
    # numpy's OpenBLAS pool and pyarrow's jemalloc thread (both started at import), and tqdm's monitor. None
    # is a hazard here: a worker decodes (PIL), does integer numpy (no BLAS) and writes files, never calls
    # pyarrow or tqdm, and OpenBLAS and jemalloc make themselves safe across a fork (pthread_atfork). So that
    # one warning is silenced at the forks (`FORK_WARNING`), for the users and test runs that show it.
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    counter, stop = ctx.Value("q", 0), ctx.Event()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(counter, stop, os.getpid())) as pool, \
            tqdm(total=total, unit="img", desc="build", disable=not progress) as bar:
        try:
            # The longest shards first, the shorter ones (val and test of the real release) last: they fill in
            # beside the last long one, where in release order `unlabeled` came last, one worker writing it alone
            # while the others waited (~0.7 s of a build on 2 cores).
            futures = {}  # task index -> future, in submission order
            for i in sorted(range(len(tasks)), key=lambda j: -len(tasks[j][2])):
                name, split, items = tasks[i]
                entries = [(it, files.read(it.path)) for it in items]
                with signals_deferred(), warnings.catch_warnings():  # the first submit forks the workers
                    warnings.filterwarnings("ignore", FORK_WARNING, DeprecationWarning)
                    futures[i] = pool.submit(_write_one_shard, str(tmp / name), split, entries, on_error)
                # A folder is read here, as its shards are handed out: from a slow disk, most of the build.
                bar.update(counter.value - bar.n)
            pending = set(futures.values())
            while pending:
                with signals_deferred():  # for at most its timeout
                    done, pending = wait(pending, timeout=0.25, return_when=FIRST_EXCEPTION)
                bar.update(counter.value - bar.n)
                # In submission order, not the set's: when several shards failed by the time this thread
                # woke (a full disk fails them all), the one named is the first, on every run.
                for f in futures.values():
                    if f in done and f.exception() is not None:
                        raise f.exception()
        except BaseException:  # a failed shard, Ctrl-C: drop the queued shards, wait only for those in hand
            # wait=True here: the `with`'s own shutdown would reset the cancel request if the
            # pool's manager thread had not acted on it yet, and wait for every queued shard.
            stop.set()
            pool.shutdown(cancel_futures=True)
            raise
        bar.update(total - bar.n)
    return [futures[i].result() for i in range(len(tasks))]


def _temp_suffix():
    """What the name of the folder a build writes into adds to --out's (`<out>.tmp-<host>-<pid>`)."""
    return f".tmp-{socket.gethostname()}-{os.getpid()}"


def build_shards(src, out, workers=None, shard_size=10000, split_seed=None, on_error="fail", progress=True,
                 classes=None):
    """Build the shard set for release `src` (folder, .zip, .tar[.gz]) into folder `out`.

    `classes=N` builds only the first N classes (labels 0..N-1) and no `unlabeled` split, for
    quick experiments; the manifest's `build.classes` records it. Each sample is byte for byte
    the one the full build writes (the train order differs: it is shuffled among fewer samples).

    Building again into `out` with the same input and options repairs the set: files missing or
    damaged there are written again, the others left as they are.

    Returns the manifest (also written to `out/manifest.json`), with `_seconds` (the build's time),
    `_repaired` (the files written again into an existing set) and `_ignored` (the release's images
    outside train/, val/ and test/, in no split: `Plan.ignored`) added. Raises `SourceError`,
    `ImageError` (with `on_error='fail'`), `ShardError` or `UsageError` (`shard_size`, `workers`, `classes` or
    `split_seed` out of range)
    with a one-line message.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    # A bad argument is a UsageError (exit 2), as the CLI's own range checks make it: a ShardError says a set is bad.
    # workers=0 built with every core, -1 failed in the process pool's traceback; a split seed's numpy error came
    # after the release was read; shard_size="64" or 64.5 (the CLI's ranges never give one) failed in Python's words.
    for flag, value, low in (("--shard-size", shard_size, 1), ("--workers", workers, 1), ("--classes", classes, 1),
                             ("--split-seed", split_seed, 0)):
        if value is None and flag != "--shard-size":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise UsageError(f"{flag} {value!r}: must be an integer of at least {low}")
        if value < low:
            raise UsageError(f"{flag} {value}: must be at least {low}")
    # An unset variable's "" was the current folder: src="" built it (or said it 'holds 5 releases'), out="" was
    # refused as '/home/me: exists and is not a tinyin shard set'.
    for flag, value, what in (("--src", src, "the release: a folder, .zip or .tar[.gz]"),
                              ("--out", out, "the folder to build into")):
        if not str(value):
            raise UsageError(f"{flag} is empty: give {what}")
    # A leading `~` is the home folder, as the CLI's flags read it: from Python, out="~/shards" was built into a
    # folder named `~` in the current one, and src="~/release" was 'no such file or folder'.
    src, out = os.path.expanduser(src), os.path.expanduser(out)
    # Resolved: the build writes beside `out` and renames into it, so beside the folder itself, not
    # inside it (`--out .`) nor beside a symlink to it (on another disk; or dangling: its target is made).
    out = Path(os.path.realpath(out))
    if why := long_name(out, _temp_suffix()):  # found by the temporary folder's mkdir, naming neither
        raise UsageError(f"--out {out}: {why}; choose a shorter name")
    _check_outside_release(src, out)
    # The name of the release, however it is spelled: `--src .` (in the release folder) was "", `..` "..".
    params = {"source": Path(os.path.abspath(src)).name, "shard_size": shard_size, "split_seed": split_seed, "on_error": on_error}
    if classes is not None:  # only then: a full build's manifest stays byte for byte what it was
        params["classes"] = classes
    _check_out(out, params)
    _check_replaceable(out)
    started = time.perf_counter()
    _remove_dead_builds(out)
    tmp = out.parent / f"{out.name}{_temp_suffix()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # before the release is read (a minute for the real one): a folder that cannot be made fails now
        tmp.mkdir(parents=True)
    except OSError as e:
        raise ShardError(f"{out}: cannot create the output folder ({e.strerror})") from None
    _take_on_folder(tmp, out)
    try:
        files = open_release(src)
        plan = plan_release(files, split_seed, classes)
        if plan.problems and on_error == "fail":
            path, reason = plan.problems[0]
            raise SourceError(f"{files.label}: {path}: {reason}")
        tasks = _plan_tasks(plan, shard_size)
        results = _run_tasks(files, tasks, tmp, workers or os.cpu_count() or 1, on_error, progress)
        manifest = _manifest(plan, params, tasks, results)
        index_io.write_index(tmp, tasks, results)
        # Labels, keys and offsets come from the index: a changed byte there mislabels samples that
        # the shards' own checksums cannot catch.
        manifest["index_sha256"] = index_io.file_sha256(tmp / INDEX_FILE)
        write_json(tmp / MANIFEST_FILE, manifest)  # written last: its presence marks completion
        repaired = _move_into_place(tmp, out, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest["_seconds"] = time.perf_counter() - started
    manifest["_repaired"] = repaired
    manifest["_ignored"] = plan.ignored
    return manifest


def _remove_dead_builds(out):
    """Remove `<out>.tmp-<host>-<pid>` folders of builds on this host whose process is gone (SIGKILL,
    a crash). Another host's are left alone: `out` may be on a file system that host shares."""
    prefix = f"{out.name}.tmp-{socket.gethostname()}-"
    for folder in out.parent.glob(f"{out.name}.tmp-*"):
        pid = folder.name[len(prefix):]
        if folder.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user's
    return True


def _manifest(plan, params, tasks, results):
    shards = [{"file": name, "split": split, "count": len(r["rows"]), "bytes": r["bytes"], "sha256": r["sha256"],
               "sum64": r["sum64"]}
              for (name, split, _), r in zip(tasks, results)]
    counts = {s: sum(x["count"] for x in shards if x["split"] == s) for s in SPLITS}
    skipped = [{"source": p, "reason": reason} for p, reason in plan.problems]
    skipped += [s for r in results for s in r["skipped"]]
    return {
        "format_version": FORMAT_VERSION,
        "build": params,
        "train_order": f"shuffled before sharding (numpy default_rng({TRAIN_ORDER_SEED}).permutation)",
        "split_rule": ("first half of each class in val_annotations.txt order -> val, rest -> test"
                       if params["split_seed"] is None else
                       f"random half of each class (seed {params['split_seed']}) -> val, rest -> test"),
        "classes": [{"wnid": w, "words": plan.words[w]} for w in plan.wnids],
        "counts": counts,
        "stats": {"rgb64": _stats(sum(r["rgb_hist"] for r in results)),
                  "gray28": _stats(sum(r["gray_hist"] for r in results))},
        "shards": shards,
        "skipped": skipped,
    }


def _check_outside_release(src, out):
    """Refuse an `out` inside the train/, val/ or test/ folder of release folder `src` (or of the one release
    in it): the build succeeded, and its shards (or `shard inspect`'s samples.png) became part of the release,
    whose next build failed ('class folder train/shards is not in wnids.txt', 'val/images/shards/samples.png:
    not listed in val/val_annotations.txt'), naming the user's release, not the --out that did it."""
    if not os.path.isdir(src):
        return
    for marker in [Path(src, ROOT_MARKER), *Path(src).glob(f"*/{ROOT_MARKER}")]:
        for split in ("train", "val", "test"):
            folder = Path(os.path.realpath(marker.parent / split))
            if out == folder or folder in out.parents:
                raise UsageError(f"--out {out}: inside the release's {split}/ folder ({folder}): the shards would "
                                 "become part of the release, which the next build reads; choose a folder outside it")


def _check_replaceable(out):
    """Refuse, before the work, an `out` that the finished build could not be renamed into: a mount point
    (EBUSY; and a repair's files would cross file systems) and an empty current folder (it would be
    replaced, leaving the shell in a deleted folder that shows no shards)."""
    if os.path.ismount(out):
        raise ShardError(f"{out}: a mount point (the build writes beside --out, then renames); "
                         f"build into a folder inside it, e.g. --out {out / 'shards'}")
    if out.is_dir() and not any(out.iterdir()) and os.path.samefile(out, "."):
        raise ShardError(f"{out}: the current folder, which the build would replace (it writes beside --out, "
                         f"then renames); run it from the parent folder with --out {out.name}")


def _take_on_folder(tmp, out):
    """Give `tmp` the group and mode (its setgid bit included) of `out`, where `out` is a folder already: the
    rename puts `tmp` in its place. A folder made for a shared set (group `lab`, mode 2770) became the
    builder's own group and umask's mode, its files unreadable by the group, where files written into it
    (cp, tar -x) take its group. Set before any file is written, so that they take the group as there."""
    try:
        st = out.stat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    with contextlib.suppress(PermissionError):  # a group this user is not in: the folder keeps the user's
        os.chown(tmp, -1, st.st_gid)
    os.chmod(tmp, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)  # the build writes in it: a 0555 --out was renamed over


def _move_into_place(tmp, out, manifest):
    """Rename `tmp` to `out`. Where `out` already holds this very build, replace only those of its
    files whose bytes differ from the fresh ones (deleted, damaged; the manifest, where it alone differs) and
    return their names: the identical ones stay untouched, as their mtimes key the reader's per-process sha256 cache."""
    if not (out.exists() and any(out.iterdir())):
        try:
            os.replace(tmp, out)  # onto a missing or an empty folder (rename(2) replaces an empty one)
            return []
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # Files came since the look above: another build of this input (another shell, a job array)
            # finished first. It is compared with below, as any set already there is.
    _check_out(out, manifest["build"])  # files came meanwhile: another build's (say how it differs), the user's
    repaired = [name for name in [s["file"] for s in manifest["shards"]] + [INDEX_FILE]
                if not _same_bytes(out / name, tmp / name)]
    if _read_manifest(out) != manifest:
        if repaired:
            raise ShardError(f"{out}: already holds a different build (other input); choose another --out or delete it")
        # Every shard and the index are this build's: the manifest alone was damaged or edited since (a changed
        # checksum there had `shard verify` name a good shard corrupt, and this repair refused it as 'other input').
        repaired = [MANIFEST_FILE]
    for name in repaired:
        os.replace(tmp / name, out / name)
    return repaired


def _same_bytes(old, new):
    """Whether file `old` holds the bytes of file `new` (size, then sum64: any changed word is caught)."""
    return old.is_file() and old.stat().st_size == new.stat().st_size and file_sum64(old) == file_sum64(new)
