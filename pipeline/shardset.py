"""`ShardSet`: one shard set, a local folder or a URL, opened once.

It reads the manifest and the Parquet index a single time and answers everything else from them:
splits, counts, statistics, classes and shard entries. It is also the one place that checks a
shard against the manifest (present, size, checksums), so every reader words a bad shard the same way.
Two checksums: a shard in transit (a stream read, a cache fetch) is checked by `sum64`, fast enough
for every epoch; a local copy by sha256, the set's identity (see `checksum`).

Remote sets are read through fsspec (`http(s)://`, `s3://`, `gs://`, ...; install the matching
extra, e.g. `pip install tinyin[s3]`). `pipe:` commands are not shard sets: they stay a stream-path
input (`make_loader(["pipe:..."], ...)`).
"""
import base64
import contextlib
import glob
import hashlib
import http.client
import json
import math
import os
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .checksum import file_sum64, sum64
from .errors import ShardError, UsageError, plural
from .index import SCHEMA, file_sha256
from .schema import CACHE_MARK_FILE, FORMAT_VERSION, INDEX_FILE, MANIFEST_FILE, VARIANTS, check_split, check_variant

#: The manifest's keys every reader relies on, and the type of each; and those of each shard entry.
MANIFEST_KEYS = {"classes": list, "counts": dict, "stats": dict, "shards": list, "skipped": list}
ENTRY_KEYS = {"file": str, "split": str, "count": int, "bytes": int, "sha256": str}
CLASS_KEYS = {"wnid": str, "words": str}
KINDS = {list: "a list", dict: "an object", str: "a string", int: "an integer"}


def is_url(location):
    """True for `scheme://...` locations (read through fsspec); False for local paths (`file://` too)."""
    return "://" in str(location) and not str(location).startswith("file://")


def split_url(text):
    """urllib's parts of URL `text`; a UsageError naming it where they cannot be told apart (`http://[::1`:
    urllib's 'Invalid IPv6 URL' was a traceback out of every command given it)."""
    try:
        return urllib.parse.urlsplit(text)
    except ValueError as e:
        raise UsageError(f"{text}: not a URL that can be read ({e})") from None


def is_file_name(name):
    """True for a plain file name (no folder in it, not '.' or '..'): what a manifest may name as a shard."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def local_path(location):
    """Local `location` as a path: a `file://` URL's (what fsspec, a browser or a config file may give;
    it was read as a folder named `file:`, 'no such folder'), a leading `~` the home folder (as the CLI's
    flags read it: make_loader("~/shards") was 'no such folder'), anything else as it is."""
    text = os.path.expanduser(str(location))
    if not text.startswith("file://"):
        return text
    parts = split_url(text)
    if parts.netloc not in ("", "localhost"):
        raise ShardError(f"{text}: a file:// URL of host {parts.netloc!r}; give a path on this machine")
    return urllib.request.url2pathname(parts.path)


def names_a_tar(location):
    """True when `location` names one `.tar` (a shard, not a set's folder): by its path, so a signed
    URL's query string (`.../train-000000.tar?sig=...`) does not hide it."""
    text = str(location)
    return (split_url(text).path if is_url(text) else text).endswith(".tar")


# The wording of every shard check, in one place.
def missing_error(where):
    return ShardError(f"{where}: missing (listed in the manifest)")


def no_folder_error(where, folder, alone="no such folder"):
    """'no such folder' for the shard set `folder` (`where`: how the user gave it), naming the temporary
    folders (`<name>.tmp-<host>-<pid>`) that builds into it left beside it: a build killed outright
    (kill -9, the OOM killer) leaves one, up to 1.9 GB, that only a build into the same folder removes.
    `alone`: what is said where there is none."""
    folder = Path(os.path.abspath(folder))
    left = sorted(p.name for p in folder.parent.glob(f"{glob.escape(folder.name)}.tmp-*") if p.is_dir())
    if not left:
        return ShardError(f"{where}: {alone}")
    return ShardError(f"{where}: no such folder; beside it, {', '.join(left)} is a build into it that has not "
                      "finished (still running, or killed): building into it again removes a killed one's")


def local_folder(flag, location, default=None):
    """The folder of a local shard set given as `flag LOCATION` (`--shards data/shards`; a `file://` URL's
    too), as a path; ShardError naming the flag when it is no folder: 'no such folder' (`no_folder_error`)
    or 'a file, not a shard folder'. train.py's and the bench commands' one check, so they say it alike
    (click's `Path(exists=True)` said it as a usage error, exit 2, in its own words). `default`: the flag's
    default, where it has one (`DEFAULT_SHARDS`): that one missing is said to be the default, and how to make
    a set there (a first run without --shards was told 'no such folder' of a folder it never named)."""
    folder = Path(local_path(location))
    if not folder.is_dir():
        where, alone = f"{flag} {location}", ()
        if location == default:
            where += " (the default)"
            alone = (f"no shard set there; build one with `tinyin shard build --src RELEASE --out {location}`, "
                     f"or pass {flag}",)
        if not folder.exists():
            raise no_folder_error(where, folder, *alone)
        raise ShardError(f"{where}: a file, not a shard folder")
    return str(folder)


def size_error(where, actual, entry):
    return ShardError(f"{where}: {actual:,} {plural(actual, 'byte')}, the manifest says {entry['bytes']:,} "
                      "(truncated or replaced)")


def checksum_error(where):
    return ShardError(f"{where}: checksum differs from the manifest (corrupt or modified)")


def arrow_owned(data):
    """A copy of `data` (bytes) in a buffer Arrow allocated, to parse from.

    Why not `io.BytesIO(data)` or `pa.py_buffer(data)`: Arrow would read into (or wrap) Python
    objects, and its reader's async state can be freed later on an Arrow worker thread. Freeing a
    Python object there takes the GIL; at interpreter exit that thread is stopped inside C++
    (`pthread_exit` from `take_gil`) and the process aborts with 'terminate called without an active
    exception', exit -6 (apache/arrow#34314). An Arrow buffer is freed without the GIL.
    """
    out = pa.BufferOutputStream()
    out.write(data)
    return out.getvalue()


class ShardSet:
    """A shard set written by `tinyin shard build`, at a local folder or a URL.

    `manifest` (dict) and `index` (pyarrow Table, one row per sample; `index_bytes`, the file) are read once. Use
    `entries(split)` for the shard entries of a split (dicts with file, split, count, bytes, sha256
    and, from builds since sum64, sum64),
    `where(entry)` for a shard's path or URL, and `check_*` for the one wording of a bad shard.
    Raises ShardError when the location holds no complete shard set, or when its manifest and index
    disagree (see `_check_consistent`: an edited or mismatched manifest is refused at the door, for
    every reader, rather than mis-sizing batches or labels later).
    """

    def __init__(self, location, storage_options=None):
        if isinstance(location, ShardSet):
            raise TypeError("already a ShardSet: use it as it is")
        # None, 3 or a list of shard URLs (open_shard_set, read_manifest in a notebook) said 'None: no such folder',
        # a ShardError for an argument's type, as make_loader's shards did.
        if not isinstance(location, (str, os.PathLike)):
            raise ValueError(f"a shard set is opened from its folder or URL (a str or a path), not {location!r}")
        if not str(location):  # an unset variable's "" said ': no such folder', naming nothing
            raise ShardError("an empty path: give the shard set's folder or URL")
        self.location = str(location).rstrip("/") if is_url(location) else local_path(location)
        self.is_local = not is_url(location)
        self.storage_options = storage_options  # the stream path reads the shards with them too
        # They were dropped without a word: options meant for a URL (an endpoint, credentials) with a folder are a
        # URL that lost its scheme, or options meant for another set; a UsageError, as make_loader's options that do
        # not fit the shards given (an empty dict, no options, passes).
        if storage_options and self.is_local:
            raise UsageError(f"storage_options: {self.location} is a local folder, read from this machine's disk; "
                             "storage_options are for a URL's file system (s3://, gs://, http(s)://)")
        # A cached copy (pipeline.cache) takes a shard of the right size for complete: a damaged one is removed
        # where a check finds it, or every later run would fail on it (see `_checksum_error`).
        self.is_cached_copy = self.is_local and _is_cached_copy(self.location)
        self._fs = None
        # Plain HTTP(S) reads its two small files with urllib, as the shards are read (cache, stream):
        # fsspec's aiohttp session, shared by every set in the process, hung now and then on loopback
        # in the test suite (a GET never answered, both ends waiting).
        self._plain_http = self.location.startswith(("http://", "https://")) and not storage_options
        if not self.is_local:
            try:
                import fsspec
            except ImportError:  # a plain `pip install tinyin`: the extras bring it (setup.cfg)
                raise ShardError(f"{self.location}: cannot open: a URL needs fsspec and its protocol's driver "
                                 "(pip install 'tinyin[http]', '[s3]' or '[gcs]')") from None
            try:
                self._fs, self._root = fsspec.core.url_to_fs(self.location, **(storage_options or {}))
            except Exception as e:  # any: a missing extra, a bad URL, and some filesystems connect here (ftp)
                raise ShardError(f"{self.location}: cannot open ({_named(e)})") from None
        self.manifest = self._read_manifest()
        self.index = self._read_index()
        self._check_consistent()

    # --- reading the two small files -----------------------------------------------------------
    def _read_bytes(self, name):
        """The bytes of file `name` of the set, None when it is not there. A remote read that fails is tried
        again as a shard's transfer is (`retry_waits`, `worth_retrying`): a server's blip at the start of a run
        ended it at once, where the same blip a minute later was ridden out."""
        where = self.where_name(name)
        waits = [] if self.is_local else retry_waits()
        for attempt in range(len(waits) + 1):
            try:
                if self.is_local:
                    return Path(where).read_bytes()
                if self._plain_http:
                    return _http_get(where)
                return self._fs.cat_file(f"{self._root}/{name}")
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
                if not self.is_local and e.errno is None and str(e) not in ("", where, f"{self._root}/{name}"):
                    # The store's own word for what is missing, not the file (s3fs's 'The specified bucket does
                    # not exist'): a mistyped bucket was 'not a tinyin shard set; run `tinyin shard build` first'.
                    raise ShardError(f"{self.location}: cannot open ({_named(e)})") from None
                return None
            except Exception as e:  # any: each remote client has its own (botocore's NoCredentialsError, socket.gaierror)
                if attempt == len(waits) or not worth_retrying(e):
                    tries = f", after {attempt + 1} attempts" if attempt else ""
                    raise ShardError(f"{where}: unreadable ({unknown_host(e, where) or _named(e)}{tries})") from None
            time.sleep(waits[attempt])

    def _read_manifest(self):
        data = self._read_bytes(MANIFEST_FILE)
        if data is None and self.is_local and not os.path.exists(self.location):
            raise no_folder_error(self.location, self.location)
        if data is None and self.is_local and os.path.isfile(self.location):  # the manifest itself, say
            raise ShardError(f"{self.location}: a file, not a shard set's folder; pass the folder that holds it")
        if data is None:
            raise ShardError(f"{self.location}: not a tinyin shard set (no {MANIFEST_FILE}); "
                             "run `tinyin shard build` first")
        where = self.where_name(MANIFEST_FILE)
        try:
            manifest = json.loads(data)
        except ValueError as e:
            raise ShardError(f"{where}: corrupt manifest ({e})") from None
        if not isinstance(manifest, dict):
            raise ShardError(f"{where}: malformed (not an object)")
        if "format_version" not in manifest:
            raise ShardError(f"{where}: malformed (no format_version)")
        if manifest["format_version"] != FORMAT_VERSION:  # before the keys: another format may have others
            raise ShardError(f"{where}: format version {manifest['format_version']}, this tinyin reads {FORMAT_VERSION}")
        _check_keys(where, manifest, MANIFEST_KEYS)
        for i, entry in enumerate(manifest["classes"]):
            _check_keys(where, entry, CLASS_KEYS, f"classes[{i}]")
        for i, entry in enumerate(manifest["shards"]):
            _check_keys(where, entry, ENTRY_KEYS, f"shards[{i}]")
            # A name with a folder in it was read, and a URL's cached copy written, outside the set's folder
            # (a remote manifest's '../../.bashrc' wrote the server's bytes over the user's file).
            if not is_file_name(entry["file"]):
                raise ShardError(f"{where}: malformed (shards[{i}].file {entry['file']!r} is not a file name "
                                 "in the set's folder)")
        for split, count in manifest["counts"].items():
            if not _is(count, int):
                raise ShardError(f"{where}: malformed (counts.{split} is not an integer)")
        for variant, (_, shape) in VARIANTS.items():
            _check_stats(where, manifest["stats"], variant, shape[2] if len(shape) == 3 else 1)
        return manifest

    def _read_index(self):
        data = self._read_bytes(INDEX_FILE)
        if data is None:
            raise ShardError(f"{self.location}: missing {INDEX_FILE}")
        if "index_sha256" in self.manifest and hashlib.sha256(data).hexdigest() != self.manifest["index_sha256"]:
            raise checksum_error(self.where_name(INDEX_FILE))  # sets built before it have no index_sha256
        self.index_bytes = data  # the file as read (a cached copy writes these bytes)
        try:
            return pq.read_table(arrow_owned(data))
        except (pa.ArrowException, OSError) as e:
            raise ShardError(f"{self.where_name(INDEX_FILE)}: corrupt index ({e})") from None

    def _check_consistent(self):
        """ShardError unless manifest and index agree: each split's count is the sum of its shards'
        counts, the index holds exactly `count` rows for each listed shard and none for another, in the
        manifest's order (`_check_order`), and its labels fit the manifest's classes (-1 for the unlabeled split). Vectorised: a few
        milliseconds on the full 120,000-row index, so every open can afford it."""
        manifest, index = self.where_name(MANIFEST_FILE), self.where_name(INDEX_FILE)
        shards = self.manifest["shards"]
        for split in dict.fromkeys([*self.counts, *(e["split"] for e in shards)]):
            total = sum(e["count"] for e in shards if e["split"] == split)
            if self.counts.get(split, 0) != total:
                said = self.counts.get(split, 0)
                raise ShardError(f"{manifest}: counts says {said:,} {split} {plural(said, 'sample')}, "
                                 f"its {split} shards hold {total:,}")
        missing = [name for name in SCHEMA.names if name not in self.index.column_names]
        if missing:
            raise ShardError(f"{index}: corrupt index (no column {missing[0]!r})")
        rows = {r["values"]: r["counts"] for r in pc.value_counts(self.index["shard"]).to_pylist()}
        listed = set()
        for entry in shards:
            if entry["file"] in listed:
                raise ShardError(f"{manifest}: malformed ({entry['file']} is listed twice)")
            listed.add(entry["file"])
            if rows.get(entry["file"], 0) != entry["count"]:
                found = rows.get(entry["file"], 0)
                raise ShardError(f"{index}: {found:,} {plural(found, 'row')} for {entry['file']}, "
                                 f"the manifest says {entry['count']:,}")
        unlisted = sorted(set(rows) - listed)
        if unlisted:
            raise ShardError(f"{index}: rows for {unlisted[0]}, which the manifest does not list")
        split_of = {e["file"]: e["split"] for e in shards}  # (each listed once: checked above)
        self._check_splits(index, split_of)
        self._check_order(index, split_of)
        n = len(self.classes)
        for r in self.index.group_by("split").aggregate([("label", "min"), ("label", "max")]).to_pylist():
            split, labels = r["split"], f"{r['split']} labels run {r['label_min']}..{r['label_max']}"
            if split == "unlabeled" and (r["label_min"], r["label_max"]) != (-1, -1):
                raise ShardError(f"{index}: {labels}, not -1")
            if split != "unlabeled" and (r["label_min"] < 0 or r["label_max"] >= n):
                raise ShardError(f"{index}: {labels}, the manifest lists {n} "
                                 f"{plural(n, 'class')}" + (f" (0..{n - 1})" if n else ""))

    def _check_splits(self, index, split_of):
        """ShardError unless each index row's split is its shard's in the manifest: the readers take a split's rows
        by that column (a train row marked val was 'ok' to verify, which reads rows by shard, and refused by the
        loader as 'the index lists 63 samples, the manifest 64'). split_of: each shard file's split in the manifest."""
        listed = pc.take(pa.array(list(split_of.values()), pa.string()),
                         pc.index_in(self.index["shard"], value_set=pa.array(list(split_of), pa.string())))
        wrong = pc.fill_null(pc.not_equal(self.index["split"], listed), True)  # a null split is no split
        if pc.any(wrong).as_py():
            row = self.index.filter(wrong).slice(0, 1).to_pylist()[0]
            raise ShardError(f"{index}: {row['key']} of {row['shard']} is marked split {row['split']}, "
                             f"the manifest lists {row['shard']} in {split_of[row['shard']]}")

    def _check_order(self, index, split_of):
        """ShardError unless each shard's index rows are together and, within each split, in the manifest's
        order of its shards: the readers take a split's rows in that order (a manifest with two shards
        swapped was 'ok' to verify, which reads rows by shard, and refused by the loader as 'the index
        lists 25 samples, the manifest 25')."""
        files = self.index["shard"]
        if not len(files):
            return
        runs = [files[0].as_py(), *pc.filter(files[1:], pc.not_equal(files[1:], files[:-1])).to_pylist()]
        for split in dict.fromkeys(split_of.values()):
            held = [f for f in runs if split_of[f] == split]
            listed = [e["file"] for e in self.manifest["shards"] if e["split"] == split and e["count"]]
            k = next((k for k, f in enumerate(held) if k >= len(listed) or f != listed[k]), None)
            if k is not None and held[k] in held[:k]:
                raise ShardError(f"{index}: the rows of {held[k]} are not together")
            if k is not None:
                raise ShardError(f"{index}: rows for {held[k]} come where the manifest lists {listed[k]} "
                                 "(its shards are in another order)")

    # --- what the set holds ----------------------------------------------------------------------
    @property
    def classes(self):
        """[{'wnid', 'words'}] in label order."""
        return self.manifest["classes"]

    @property
    def counts(self):
        """{split: samples}."""
        return self.manifest["counts"]

    @property
    def splits(self):
        """The splits that hold samples, in the manifest's order (a set built with `--classes` has no unlabeled one)."""
        return [k for k, v in self.counts.items() if v]

    def check_holds(self, split):
        """UsageError unless the set holds samples of `split`, ValueError for a split that is none of SPLITS: a split
        asked for (make_loader's, a cached copy's) that the set lacks is a choice that does not fit it. `entries` says
        a lack it meets the set's own way (ShardError)."""
        check_split(split)
        if split not in self.splits:
            subset = self.manifest.get("build", {}).get("classes")
            why = f" (a set of the first {subset} classes holds no unlabeled images)" if subset and split == "unlabeled" else ""
            raise UsageError(f"{self.location} has no split {split!r}{why}; its splits: {', '.join(self.splits)}")

    def stats(self, variant):
        """{'mean': [...], 'std': [...]} of the train split for `variant`, in [0, 1] units."""
        check_variant(variant)  # 'rgb32' was a KeyError
        return self.manifest["stats"][variant]

    def entries(self, split):
        """The manifest's shard entries of `split`, in order; ShardError when it has no samples, ValueError for a split
        that is none of SPLITS (`split_index`'s)."""
        check_split(split)  # 'Val' was a ShardError, 'no samples for split', as if the set lacked one
        entries = [s for s in self.manifest["shards"] if s["split"] == split]
        if not sum(s["count"] for s in entries):
            raise ShardError(f"{self.location}: no samples for split {split!r} (splits: {', '.join(self.splits)})")
        return entries

    def split_index(self, split):
        """The index rows of `split` (in shard order) as a pyarrow Table; ValueError for a split that is none of SPLITS."""
        check_split(split)  # 'Val' gave an empty table, without a word
        return self.index.filter(pc.equal(self.index["split"], split))

    def where_name(self, name):
        """The path or URL of file `name` inside the set; a URL's query string (a signed URL's token)
        stays at its end, asked for with every file."""
        if self.is_local:
            return str(Path(self.location) / name)
        base, mark, query = self.location.partition("?")
        return f"{base.rstrip('/')}/{name}{mark}{query}"

    def where(self, entry):
        """The path or URL of a shard entry."""
        return self.where_name(entry["file"])

    @property
    def fs(self):
        """The fsspec filesystem of a remote set (None for a local folder)."""
        return self._fs

    # --- the one shard check -----------------------------------------------------------------
    def check_size(self, entry, actual, where=None):
        """ShardError unless `actual` bytes is what the manifest lists for `entry`."""
        if actual != entry["bytes"]:
            raise size_error(where or self.where(entry), actual, entry)

    def check_sha256(self, entry, digest, where=None):
        """ShardError unless the hex `digest` is the manifest's sha256 for `entry`."""
        if digest != entry["sha256"]:
            raise self._checksum_error(where or self.where(entry))

    def check_sum64(self, entry, digest, where=None):
        """ShardError unless the hex `digest` is the manifest's sum64 for `entry`."""
        if digest != entry["sum64"]:
            raise self._checksum_error(where or self.where(entry))

    def _checksum_error(self, where):
        """The ShardError of a shard whose bytes differ. A cached copy's is removed first: the cache checks
        only the size of a shard it holds (hashing the whole copy on every run would cost more than the
        run's start), so the damaged file would fail every run until deleted by hand; gone, it is fetched again."""
        if not self.is_cached_copy:
            return checksum_error(where)
        try:
            with contextlib.suppress(FileNotFoundError):  # another rank of the node found it first
                os.remove(where)
            done = "removed: the next run fetches it again"
        except OSError:  # a read-only copy (pipeline.cache reads one as it is)
            done = "delete it, and the next run fetches it again"
        return ShardError(f"{where}: checksum differs from the manifest (a damaged cached copy; {done})")

    def check_bytes(self, entry, data, where=None):
        """Check a whole shard held in memory, as every transfer is checked: its size, then its
        `sum64` (its sha256 when the manifest lists no sum64, as in sets built before it)."""
        self.check_size(entry, len(data), where)
        if "sum64" in entry:
            self.check_sum64(entry, sum64(data), where)
        else:
            self.check_sha256(entry, hashlib.sha256(data).hexdigest(), where)

    def check_local_file(self, entry, path=None, checksum=True):
        """Check a local copy of a shard: present, size, and (with `checksum`) sha256 and sum64, so a
        shard that passes here passes every reader's check."""
        path = Path(path or self.where(entry))
        try:
            self.check_size(entry, os.stat(path).st_size, path)
            if checksum:
                self.check_sha256(entry, file_sha256(path), path)
                if "sum64" in entry:
                    self.check_sum64(entry, file_sum64(path), path)
        except FileNotFoundError:
            raise missing_error(path) from None
        except OSError as e:  # a symlink loop, a stale NFS handle, a failing disk: one line naming the shard
            raise ShardError(f"{path}: unreadable ({_named(e)})") from None


def _is_cached_copy(folder):
    """Whether `folder` is pipeline.cache's copy of a remote set, where the cache made it: its mark names this
    very folder. (The cache's `.lock` marked it: a copy of the folder made elsewhere as one's own set, or a
    folder holding another tool's `.lock`, had a damaged shard removed, said to be fetched again.)"""
    try:
        mark = json.loads(Path(folder, CACHE_MARK_FILE).read_text())
        return os.path.realpath(mark["folder"]) == os.path.realpath(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_keys(where, obj, keys, name=""):
    """ShardError unless `obj` (called `name` in the message) is a dict with each of `keys`, of its type."""
    if not isinstance(obj, dict):
        raise ShardError(f"{where}: malformed ({name} is not an object)")
    for key, kind in keys.items():
        what = f"{name}.{key}" if name else key
        if key not in obj:
            raise ShardError(f"{where}: malformed (no {what})")
        if not _is(obj[key], kind):
            raise ShardError(f"{where}: malformed ({what} is not {KINDS[kind]})")


def _check_stats(where, stats, variant, channels):
    """ShardError unless `stats` holds, for `variant`, a finite mean and a positive std per channel: the
    loader normalises by them unchecked (an edited std of 0 or NaN gave NaN images without an error, a
    missing or short one a traceback at the first batch)."""
    if variant not in stats:
        raise ShardError(f"{where}: malformed (no stats.{variant})")
    _check_keys(where, stats[variant], {"mean": list, "std": list}, f"stats.{variant}")
    for key, low in (("mean", -math.inf), ("std", 0)):
        values = stats[variant][key]
        if len(values) != channels or not all((_is(v, int) or _is(v, float)) and low < v < math.inf for v in values):
            kind = f"{'positive' if key == 'std' else 'finite'} {plural(channels, 'number')}"
            raise ShardError(f"{where}: malformed (stats.{variant}.{key} is not {channels} {kind})")


def _is(value, kind):
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))  # True is no count


def _named(error):
    """`error` as 'ExceptionClass: message', so a client's terse message still says what failed."""
    return f"{error.__class__.__name__}: {error}"


# A remote shard's transfer that fails (the stream path's reads, the cache's fetches) is tried again,
# RETRIES attempts in all, waiting BACKOFF_S and then twice as long each time: 0.5 + 1 + 2 + 4 = 7.5 s of
# waits, about 8-10 s with the attempts. Why so long: a server's restart, a load balancer's blip or a DNS
# hiccup lasts seconds, and giving up ends a training run (3 attempts over 0.6 s of waits, or with no
# wait, ended runs within 2 s); why no longer: a server that is really gone is named within seconds, not hours later
# by a job's time limit; why doubling: a cut connection is tried again soon, a server coming back up is
# not hammered. A missing file is final at once and a body that arrived whole but wrong is read again at
# once: waiting would change neither.
RETRIES = 5
BACKOFF_S = 0.5


def retry_waits(retries=None, backoff=None):
    """The seconds to wait after each failed attempt at a remote shard but the last: `backoff` (BACKOFF_S)
    doubled each time, `retries` (RETRIES) attempts in all. The module's values are read when called, so a
    test lowering them lowers them for every path (forked stream workers too, when set before the fork)."""
    retries = RETRIES if retries is None else retries
    backoff = BACKOFF_S if backoff is None else backoff
    return [backoff * 2 ** attempt for attempt in range(retries - 1)]


# getaddrinfo's answers that a host name does not exist, or has no address: a mistyped host, and asking again
# gets the same answer. 'Temporary failure in name resolution' (EAI_AGAIN: no resolver answered) is worth it.
UNKNOWN_HOST_ERRORS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def _unresolved(error):
    """The socket.gaierror saying that a host name does not resolve, where `error` is one, or holds one (urllib's
    URLError as its `reason`, aiohttp's connector errors as their `os_error`); else None."""
    for e in (error, getattr(error, "reason", None), getattr(error, "os_error", None)):
        if isinstance(e, socket.gaierror) and e.errno in UNKNOWN_HOST_ERRORS:
            return e
    return None


def unknown_host(error, url):
    """'unknown host NAME: the resolver's words' where `error`, raised by a request for `url`, says that the host
    it looked up does not resolve (`_unresolved`); else None. The host is the URL's, or for urllib the proxy's
    where one is set for the URL ($http_proxy, $https_proxy, less the hosts of $no_proxy): a mistyped proxy was
    named as the data's host."""
    e = _unresolved(error)
    if e is None:
        return None
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme) if isinstance(error, urllib.error.URLError) else None
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        proxy_host = urllib.parse.urlsplit(proxy if "://" in proxy else f"//{proxy}").hostname
        return f"unknown host {proxy_host} (the proxy in ${parts.scheme}_proxy): {e.strerror}"
    return f"unknown host {parts.hostname}: {e.strerror}"


# 4xx statuses that a later attempt may get past: Request Timeout, Too Early, Too Many Requests.
RETRIED_CLIENT_STATUSES = (408, 425, 429)


def worth_retrying(error):
    """Whether a remote transfer that raised `error` is worth another attempt: a cut or refused connection, an
    HTTP error status (`http_open`: a 503 under load, a proxy's 502), a timeout, and by name an fsspec
    backend's connection trouble; not a missing file (FileNotFoundError), nor a client's own error (a bad
    argument, a missing credential), which asking again would not change: a URL urllib refuses to send
    (`http.client.InvalidURL`: a space in it, to write as %20) took 5 attempts and 10 s to say so, and a
    4xx status (a wrong password's 401, an expired signed URL's 403) as long, but for those that say
    "later" (RETRIED_CLIENT_STATUSES); nor a refusal (PermissionError: s3fs's for a bucket's 403
    AccessDenied, a bad key's InvalidAccessKeyId, as the HTTP 403 is); nor a redirect urllib would not
    follow (a 3xx status: a loop, or more than 10), asked again 5 times over 7.5 s; nor an https server's
    certificate that fails verification (self-signed, expired, another host's: urllib's URLError around
    ssl's SSLCertVerificationError), asked again as long; nor a host name that does not resolve (`_unresolved`:
    a mistyped host, 'Name or service not known', asked again 5 times over 7.5 s); also where urllib's URLError
    holds such an error as its reason (a file:// URL's missing file, or a folder: `data fetch --url
    file:///data/tiny-imagenet-200`, the release unpacked, asked again as long)."""
    if any(isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
                          http.client.InvalidURL))
           for e in (error, getattr(error, "reason", None))) or _unresolved(error):
        return False
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in (error, getattr(error, "reason", None))):
        return False
    status = getattr(error, "status", None)  # `http_open`'s OSError, aiohttp's ClientResponseError
    if isinstance(status, int) and 300 <= status < 500 and status not in RETRIED_CLIENT_STATUSES:
        return False
    if isinstance(error, (OSError, http.client.HTTPException)):
        return True
    name = type(error).__name__.lower()
    return any(word in name for word in ("connect", "timeout", "payload", "incomplete", "disconnect", "reset"))


def http_request(url, headers=None):
    """A urllib Request for plain HTTP(S) `url`, its `user:password@` (if any) sent as basic auth, as curl
    does: urllib would take it for part of the host name. Not sent on to a redirect's target."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return urllib.request.Request(url, headers=headers or {})
    user, _, host = parts.netloc.rpartition("@")
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host)), headers=headers or {})
    token = base64.b64encode(urllib.parse.unquote(user).encode()).decode()
    request.add_unredirected_header("Authorization", f"Basic {token}")
    return request


def status_line(error):
    """'HTTP <code> <reason>' of urllib's HTTPError `error`, in one line: its reason for a redirect it gives up on
    runs over three ('... would lead to an infinite loop.\nThe last 30x error message was:\nFound')."""
    reason = str(error.reason).strip().splitlines()
    return f"HTTP {error.code} {reason[0]}" if reason else f"HTTP {error.code}"


def http_open(url, headers=None, timeout=60):
    """The response to a GET of plain HTTP(S) `url` (`http_request`); FileNotFoundError on a 404,
    OSError('HTTP <code> <reason>') on another error status, the code its `status` (`worth_retrying`)."""
    try:
        return urllib.request.urlopen(http_request(url, headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 404:
            raise FileNotFoundError(url) from None
        error = OSError(status_line(e))
        error.status = e.code
        raise error from None


def _http_get(url):
    """The body of `url`; FileNotFoundError on a 404, OSError on another failure."""
    with http_open(url) as response:
        return response.read()


def open_shard_set(shards, storage_options=None):
    """`shards` as a ShardSet: a ShardSet is returned as it is, a folder or URL is opened."""
    if isinstance(shards, ShardSet) and storage_options:  # dropped without a word: the set's own were used
        raise UsageError(f"storage_options: {shards.location} is an open ShardSet, which reads with the options "
                         "it was opened with; pass them to open_shard_set with its location")
    return shards if isinstance(shards, ShardSet) else ShardSet(shards, storage_options)
