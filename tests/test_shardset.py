"""`ShardSet`: a local folder and the same set over HTTP answer alike; the one wording of a bad shard."""
import functools
import http.server
import shutil
import sys
import threading

import numpy as np
import pyarrow as pa
import pytest

import pipeline.shardset
from pipeline.errors import ShardError, UsageError
from pipeline.index import file_sha256
from pipeline.shardset import ShardSet, open_shard_set, size_error


@pytest.fixture()
def http_url(shards):
    """The synthetic shard set served by a local HTTP server."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_local_and_http_answer_the_same(shards, http_url):
    local, remote = ShardSet(shards), ShardSet(http_url)
    assert remote.manifest == local.manifest and remote.index.equals(local.index)
    assert local.counts == {"train": 240, "val": 30, "test": 30, "unlabeled": 30}
    assert [e["file"] for e in local.entries("train")] == [f"train-{i:06d}.tar" for i in range(4)]
    assert remote.where(remote.entries("val")[0]) == f"{http_url}/val-000000.tar"
    assert local.where(local.entries("val")[0]) == str(shards / "val-000000.tar")
    assert local.split_index("val")["key"].to_pylist() == remote.split_index("val")["key"].to_pylist()
    assert len(local.split_index("train")) == 240 and len(local.classes) == 6
    assert open_shard_set(local) is local


def test_memory_mapping_a_remote_set_is_refused_in_one_line(shards, http_url):
    """The fast path maps local files: given a set's URL (from the Python API) it says so, not an error
    about a file the URL does not name."""
    from pipeline.reader import ShardArrays

    with pytest.raises(ShardError) as e:
        ShardArrays(http_url, "train", checksum=False)
    assert str(e.value) == f"{http_url}: memory mapping needs a local copy of the shard set"


def test_the_index_is_parsed_from_a_buffer_arrow_owns(shards, monkeypatch):
    # A reader over Python memory (io.BytesIO, pa.py_buffer) could free it on an Arrow thread at
    # interpreter exit and abort the process (exit -6, seen in CI); see `arrow_owned`.
    data = (shards / "index.parquet").read_bytes()
    monkeypatch.setattr(ShardSet, "_read_bytes", lambda self, name: data if name == "index.parquet"
                        else (shards / name).read_bytes())
    sources, read_table = [], pipeline.shardset.pq.read_table
    monkeypatch.setattr(pipeline.shardset.pq, "read_table", lambda source: sources.append(source) or read_table(source))
    assert len(ShardSet(shards).index) == 330
    [source] = sources
    assert isinstance(source, pa.Buffer) and source.to_pybytes() == data
    assert source.address != np.frombuffer(data, np.uint8).ctypes.data  # a copy, not a view of `data`

def test_not_a_shard_set(tmp_path, http_url):
    with pytest.raises(ShardError) as e:
        ShardSet(tmp_path)
    assert str(e.value) == f"{tmp_path}: not a tinyin shard set (no manifest.json); run `tinyin shard build` first"
    with pytest.raises(ShardError) as e:
        ShardSet(http_url + "/nowhere")
    assert str(e.value) == (f"{http_url}/nowhere: not a tinyin shard set (no manifest.json); "
                            "run `tinyin shard build` first")


def test_a_split_without_samples(release, tmp_path):
    """A set of the first classes (`--classes`) holds no unlabeled images: the set's own lack, a ShardError."""
    from pipeline.build import build_shards

    build_shards(release, tmp_path / "sub", workers=1, shard_size=1000, classes=2, progress=False)
    with pytest.raises(ShardError) as e:
        ShardSet(tmp_path / "sub").entries("unlabeled")
    assert str(e.value) == f"{tmp_path / 'sub'}: no samples for split 'unlabeled' (splits: train, val, test)"


def test_a_split_that_is_none_of_the_splits_is_a_value_error(shards):
    """'nope' (or 'Val') said 'no samples for split', a ShardError, as if the set lacked a split it could hold."""
    with pytest.raises(ValueError) as e:
        ShardSet(shards).entries("nope")
    assert str(e.value) == "split must be one of train, val, test, unlabeled, not 'nope'"


def test_the_one_wording_of_a_bad_shard(shards, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(shards, copy)
    s = ShardSet(copy)
    entry = s.entries("val")[0]
    path = copy / entry["file"]
    s.check_local_file(entry)  # intact
    data = bytearray(path.read_bytes())
    data[1000] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError) as e:
        s.check_local_file(entry)
    assert str(e.value) == f"{path}: checksum differs from the manifest (corrupt or modified)"
    s.check_local_file(entry, checksum=False)  # same size: only the checksum can tell
    with pytest.raises(ShardError) as e:
        s.check_bytes(entry, bytes(data[:-512]), where="http://x/val-000000.tar")
    assert str(e.value) == (f"http://x/val-000000.tar: {len(data) - 512:,} bytes, the manifest says "
                            f"{entry['bytes']:,} (truncated or replaced)")
    path.unlink()
    with pytest.raises(ShardError) as e:
        s.check_local_file(entry)
    assert str(e.value) == f"{path}: missing (listed in the manifest)"


def test_s3_through_the_real_client(shards):
    from servers import S3Server

    s3 = S3Server()
    try:
        url = s3.upload(shards, "tiny", "sets/synth")
        remote, local = ShardSet(url), ShardSet(shards)
        assert remote.manifest == local.manifest and remote.index.equals(local.index)
        entry = remote.entries("val")[0]
        assert remote.where(entry) == f"{url}/val-000000.tar"
        remote.check_bytes(entry, remote.fs.cat_file(remote.where(entry)))
    finally:
        s3.close()


def test_faulty_http_server_faults(shards):
    import urllib.request

    from servers import FaultyHTTPServer

    server = FaultyHTTPServer(shards, {"val-000000.tar": "corrupt", "test-000000.tar": "cut-once"})
    try:
        good = (shards / "val-000000.tar").read_bytes()
        got = urllib.request.urlopen(f"{server.url}/val-000000.tar").read()
        assert len(got) == len(good) and got != good
        with pytest.raises(Exception):
            urllib.request.urlopen(f"{server.url}/test-000000.tar").read()
        assert urllib.request.urlopen(f"{server.url}/test-000000.tar").read() == (shards / "test-000000.tar").read_bytes()
        request = urllib.request.Request(f"{server.url}/val-000000.tar", headers={"Range": "bytes=10-19"})
        assert len(urllib.request.urlopen(request).read()) == 10
        assert server.requests["test-000000.tar"] == 2
    finally:
        server.close()


def _edited(shards, tmp_path, edit=None, index=None):
    """A folder with the manifest and index of `shards` (no shards: opening reads only those two),
    the manifest changed in place by `edit(manifest)` (or replaced by `edit`, when not callable)
    and the index replaced by `index(table)`."""
    import json

    import pyarrow.parquet as pq

    folder = tmp_path / "edited"
    folder.mkdir()
    manifest = json.loads((shards / "manifest.json").read_text())
    if callable(edit):
        edit(manifest)
    elif edit is not None:
        manifest = edit
    table = pq.read_table(shards / "index.parquet")
    pq.write_table(index(table) if index else table, folder / "index.parquet")
    if isinstance(manifest, dict) and "index_sha256" in manifest:  # an edit that keeps the checksum right:
        manifest["index_sha256"] = file_sha256(folder / "index.parquet")  # what is checked is the agreement
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_a_changed_byte_of_the_index_is_named(shards, tmp_path):
    """Labels, keys and offsets come from the index; a flipped bit there gave a wrong label on every
    path, with no error (the shards' checksums cannot see it)."""
    import json

    from pipeline.loader import make_loader

    folder = tmp_path / "set"
    shutil.copytree(shards, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["index_sha256"] == file_sha256(folder / "index.parquet")
    data = bytearray((folder / "index.parquet").read_bytes())
    data[len(data) // 2] ^= 1
    (folder / "index.parquet").write_bytes(data)
    message = f"{folder / 'index.parquet'}: checksum differs from the manifest (corrupt or modified)"
    assert _open_error(folder) == message
    with pytest.raises(ShardError) as e:
        make_loader(folder, "train")
    assert str(e.value) == message
    del manifest["index_sha256"]  # a set built before the index had a checksum opens as before
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "index.parquet").write_bytes((shards / "index.parquet").read_bytes())
    assert ShardSet(folder).counts == manifest["counts"]


def _open_error(folder):
    with pytest.raises(ShardError) as e:
        ShardSet(folder)
    return str(e.value)


def _edit_error(shards, tmp_path, edit=None, index=None):
    """The open error of `_edited(shards, tmp_path, edit, index)`, its folder written SET (and removed)."""
    folder = _edited(shards, tmp_path, edit, index)
    try:
        return _open_error(folder).replace(str(folder), "SET")
    finally:
        shutil.rmtree(folder)


MALFORMED = [
    ([], "not an object"),
    (lambda m: m.pop("format_version"), "no format_version"),
    (lambda m: m.pop("shards"), "no shards"),
    (lambda m: m.pop("stats"), "no stats"),
    (lambda m: m.update(classes={}), "classes is not a list"),
    (lambda m: m["shards"][1].pop("sha256"), "no shards[1].sha256"),
    (lambda m: m["shards"][0].update(count="64"), "shards[0].count is not an integer"),
    (lambda m: m["shards"].__setitem__(2, "train-000002.tar"), "shards[2] is not an object"),
    (lambda m: m["classes"][0].pop("wnid"), "no classes[0].wnid"),
    (lambda m: m["counts"].update(val=True), "counts.val is not an integer"),
    # the loader normalises by these: a std of 0 or NaN gave NaN images and no error, the others a traceback
    (lambda m: m["stats"]["rgb64"].update(std=[0, 0, 0]), "stats.rgb64.std is not 3 positive numbers"),
    (lambda m: m["stats"]["gray28"].update(std=[float("nan")]), "stats.gray28.std is not 1 positive number"),
    (lambda m: m["stats"]["rgb64"].update(mean=[0.5]), "stats.rgb64.mean is not 3 finite numbers"),
    (lambda m: m["stats"]["rgb64"].update(mean=float("nan")), "stats.rgb64.mean is not a list"),
    (lambda m: m["stats"].pop("gray28"), "no stats.gray28"),
    (lambda m: m.pop("skipped"), "no skipped"),  # `shard inspect` counts them: a KeyError traceback
    (lambda m: m.update(skipped=None), "skipped is not a list"),
    # read, and a URL's cached copy written, outside the set's folder: a remote manifest wrote over the user's files
    (lambda m: m["shards"][1].update(file="../../.bashrc"),
     "shards[1].file '../../.bashrc' is not a file name in the set's folder"),
    (lambda m: m["shards"][0].update(file="/etc/passwd"), "shards[0].file '/etc/passwd' is not a file name in the set's folder"),
    (lambda m: m["shards"][0].update(file=".."), "shards[0].file '..' is not a file name in the set's folder"),
    (lambda m: m["shards"][0].update(file="a\0.tar"), "shards[0].file 'a\\x00.tar' is not a file name in the set's folder"),
]


@pytest.mark.parametrize("edit, why", MALFORMED, ids=[why for _, why in MALFORMED])
def test_a_malformed_manifest_is_one_line(shards, tmp_path, edit, why):
    folder = _edited(shards, tmp_path, edit)
    assert _open_error(folder) == f"{folder / 'manifest.json'}: malformed ({why})"


@pytest.mark.parametrize("size, said", [(1, "1 byte"), (2, "2 bytes")])
def test_a_shard_cut_to_a_byte_is_said_in_the_singular(size, said):
    assert str(size_error("SET/train-000000.tar", size, {"bytes": 2048})) == (
        f"SET/train-000000.tar: {said}, the manifest says 2,048 (truncated or replaced)")


def test_manifest_and_index_must_agree(shards, tmp_path):
    """Edits a tester made by hand, each accepted by `shard verify` before (counts are what the loader
    sizes batches by; labels index the classes)."""
    error = functools.partial(_edit_error, shards, tmp_path)

    assert error(lambda m: m["counts"].update(train=5)) == "SET/manifest.json: counts says 5 train samples, its train shards hold 240"
    assert error(lambda m: m["counts"].update(train=1)) == "SET/manifest.json: counts says 1 train sample, its train shards hold 240"
    assert error(lambda m: m["shards"].pop(0)) == "SET/manifest.json: counts says 240 train samples, its train shards hold 176"
    assert error(lambda m: m.update(shards=[])) == "SET/manifest.json: counts says 240 train samples, its train shards hold 0"
    assert error(lambda m: m["shards"].append(m["shards"][0])) == (
        "SET/manifest.json: counts says 240 train samples, its train shards hold 304")

    def drop_first_shard(m):
        m["counts"]["train"] -= m["shards"].pop(0)["count"]
    assert error(drop_first_shard) == "SET/index.parquet: rows for train-000000.tar, which the manifest does not list"

    def listed_twice(m):
        m["shards"].append(m["shards"][0])
        m["counts"]["train"] += 64
    assert error(listed_twice) == "SET/manifest.json: malformed (train-000000.tar is listed twice)"
    extra = lambda t: pa.concat_tables([t, t.slice(len(t) - 1)])  # noqa: E731 (one more unlabeled row)
    assert error(index=extra) == "SET/index.parquet: 31 rows for unlabeled-000000.tar, the manifest says 30"
    assert error(lambda m: m.update(classes=[])) == "SET/index.parquet: train labels run 0..5, the manifest lists 0 classes"
    assert error(lambda m: m["classes"].pop()) == "SET/index.parquet: train labels run 0..5, the manifest lists 5 classes (0..4)"
    assert error(lambda m: m.update(classes=m["classes"][:1])) == (
        "SET/index.parquet: train labels run 0..5, the manifest lists 1 class (0..0)")

    def unlabeled_labelled(t):
        labels = pa.array([0 if s == "unlabeled" else v for s, v in zip(t["split"].to_pylist(), t["label"].to_pylist())],
                          pa.int16())
        return t.set_column(t.schema.get_field_index("label"), "label", labels)
    assert error(index=unlabeled_labelled) == "SET/index.parquet: unlabeled labels run 0..0, not -1"
    assert error(index=lambda t: t.drop_columns(["shard"])) == "SET/index.parquet: corrupt index (no column 'shard')"


def test_the_index_must_hold_each_split_in_the_manifests_shard_order(shards, tmp_path):
    """Two shards swapped in the manifest were 'ok' to verify (it reads rows by shard) and refused by
    the loader as 'the index lists 64 samples, the manifest 64'."""
    error = functools.partial(_edit_error, shards, tmp_path)

    def swap(m):
        m["shards"][0], m["shards"][1] = m["shards"][1], m["shards"][0]
    assert error(swap) == ("SET/index.parquet: rows for train-000000.tar come where the manifest lists "
                           "train-000001.tar (its shards are in another order)")
    first_row_last = lambda t: pa.concat_tables([t.slice(1, 100), t.slice(0, 1), t.slice(101)])  # noqa: E731
    assert error(index=first_row_last) == "SET/index.parquet: the rows of train-000000.tar are not together"
    folder = _edited(shards, tmp_path, lambda m: m["shards"].insert(0, m["shards"].pop(-1)))
    assert ShardSet(folder).entries("unlabeled")  # the splits' own order in the list does not matter


def test_each_index_row_must_be_of_its_shards_split(shards, tmp_path):
    """The readers take a split's rows by the index's split column: a train row marked val was 'ok' to verify
    (it reads rows by shard) and refused by the loader as 'the index lists 63 samples, the manifest 64'."""
    def marked(split):
        return lambda t: t.set_column(t.schema.get_field_index("split"), "split",
                                      pa.array([split, *t["split"].to_pylist()[1:]], pa.string()))
    key = ShardSet(shards).index["key"][0].as_py()
    assert _edit_error(shards, tmp_path, index=marked("val")) == (
        f"SET/index.parquet: {key} of train-000000.tar is marked split val, the manifest lists train-000000.tar in train")
    assert _edit_error(shards, tmp_path, index=marked(None)) == (
        f"SET/index.parquet: {key} of train-000000.tar is marked split None, the manifest lists train-000000.tar in train")


def test_a_listed_shard_of_no_samples_has_no_place_in_the_index_order(shards, tmp_path):
    """An empty shard (0 samples) has no index rows: listed between two others, it is no break in their order."""
    def empty_between(m):
        m["shards"].insert(1, dict(m["shards"][0], file="train-empty.tar", count=0, bytes=1024))
    shard_set = ShardSet(_edited(shards, tmp_path, empty_between))
    assert [(e["file"], e["count"]) for e in shard_set.entries("train")[:3]] == [
        ("train-000000.tar", 64), ("train-empty.tar", 0), ("train-000001.tar", 64)]


def test_a_folder_that_does_not_exist(tmp_path):
    assert _open_error(tmp_path / "nope") == f"{tmp_path / 'nope'}: no such folder"


def test_an_empty_path_is_named_so(shards):
    """make_loader("") (an unset variable's value) said ': no such folder', naming nothing."""
    from pipeline.loader import make_loader

    assert _open_error("") == "an empty path: give the shard set's folder or URL"
    with pytest.raises(ShardError) as e:
        make_loader("", "train")
    assert str(e.value) == "an empty path: give the shard set's folder or URL"


@pytest.mark.parametrize("location", [None, 3, ["/data/shards"], b"/data/shards"])
def test_a_location_that_is_no_folder_nor_url_is_named_so(location):
    """open_shard_set(None), or a list of shard URLs (make_loader's other input), said 'None: no such folder'
    or "['/data/shards']: no such folder", a ShardError for an argument's type."""
    from pipeline.index import read_manifest

    for opened in (ShardSet, open_shard_set, read_manifest):
        with pytest.raises(ValueError) as e:
            opened(location)
        assert str(e.value) == f"a shard set is opened from its folder or URL (a str or a path), not {location!r}"


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_storage_options_with_a_local_folder_are_refused(shards, scheme):
    """An endpoint or credentials given with a folder (a URL that lost its scheme, options meant for another set)
    were dropped without a word; so were options given with a set already open. No options, or {}, pass."""
    with pytest.raises(UsageError) as e:
        open_shard_set(f"{scheme}{shards}", storage_options={"anon": True})
    assert str(e.value) == (f"storage_options: {shards} is a local folder, read from this machine's disk; "
                            "storage_options are for a URL's file system (s3://, gs://, http(s)://)")
    opened = ShardSet(f"{scheme}{shards}", storage_options={})
    with pytest.raises(UsageError) as e:
        open_shard_set(opened, storage_options={"anon": True})
    assert str(e.value) == (f"storage_options: {shards} is an open ShardSet, which reads with the options it was "
                            "opened with; pass them to open_shard_set with its location")
    assert open_shard_set(opened) is opened and open_shard_set(opened, {}) is opened


def test_a_missing_set_names_what_a_killed_build_into_it_left(tmp_path):
    """A build killed outright (kill -9, the OOM killer) leaves `<out>.tmp-<host>-<pid>` (up to 1.9 GB)
    that only a build into the same --out removes; `shard verify`, `make_loader` and train.py said only
    'no such folder' of that --out. Another set's temporary folder and a file of that name are not named."""
    for name in ("shards.tmp-vm-4242", "shards-v2.tmp-vm-17"):
        (tmp_path / name).mkdir()
    (tmp_path / "shards.tmp-notes.txt").write_text("mine\n")
    assert _open_error(tmp_path / "shards") == (
        f"{tmp_path / 'shards'}: no such folder; beside it, shards.tmp-vm-4242 is a build into it that has not "
        "finished (still running, or killed): building into it again removes a killed one's")


def test_a_file_of_the_set_for_its_folder_says_so(shards):
    """`make_loader("SET/manifest.json")` said "not a tinyin shard set (no manifest.json)" of the manifest."""
    manifest = shards / "manifest.json"
    assert _open_error(manifest) == f"{manifest}: a file, not a shard set's folder; pass the folder that holds it"


def test_remote_failures_are_one_line(monkeypatch, tmp_path):
    """A remote client's own errors (not OSError: botocore's) and a filesystem that connects when it is
    made (ftp) are ShardErrors naming the URL, not tracebacks."""
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no credentials anywhere, found at once
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert _open_error("s3://bucket/x") == (
            "s3://bucket/x/manifest.json: unreadable (NoCredentialsError: Unable to locate credentials)")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert _open_error("ftp://127.0.0.1:1/y") == (
        "ftp://127.0.0.1:1/y: cannot open (ConnectionRefusedError: [Errno 111] Connection refused)")


def test_a_url_without_the_extras_installed_is_one_line(monkeypatch):
    """`pip install tinyin` without `[http]`/`[s3]`/`[gcs]`, then a URL: a ModuleNotFoundError traceback."""
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if not installed: its import raises ModuleNotFoundError
    assert _open_error("https://host.example/tiny") == (
        "https://host.example/tiny: cannot open: a URL needs fsspec and its protocol's driver "
        "(pip install 'tinyin[http]', '[s3]' or '[gcs]')")


def test_read_manifest_words_a_non_object_manifest_as_shard_set_does(tmp_path):
    """`pipeline.read_manifest` (public; `bench train` reads class counts with it) raised
    AttributeError ('list' object has no attribute 'get') on a manifest that is a JSON list."""
    from pipeline.index import read_manifest

    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ShardError) as e:
        read_manifest(tmp_path)
    assert str(e.value) == f"{tmp_path / 'manifest.json'}: malformed (not an object)"


def test_read_index_names_a_corrupt_index_and_a_read_error(shards, tmp_path, monkeypatch):
    """`pipeline.read_index` (public): a file that is no Parquet is pyarrow's ArrowInvalid, a failed read its
    OSError (pyarrow's ArrowIOError is no ArrowException); each is one ShardError naming the index."""
    import errno
    import json
    from pathlib import Path

    from pipeline.index import read_index

    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["index_sha256"]  # a set built before it: the Parquet reader is what finds the damage
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    path = tmp_path / "index.parquet"
    path.write_bytes(b"PAR")
    with pytest.raises(ShardError) as e:
        read_index(tmp_path)
    assert str(e.value) == (f"{path}: corrupt index (Could not open Parquet input source '<Buffer>': Parquet file size "
                            "is 3 bytes, smaller than the minimum file footer (8 bytes))")

    read_bytes = Path.read_bytes

    def unreadable(self):
        if self == path:
            raise OSError(errno.EIO, "Input/output error")
        return read_bytes(self)
    monkeypatch.setattr(Path, "read_bytes", unreadable)
    with pytest.raises(ShardError) as e:
        read_index(tmp_path, "train")
    assert str(e.value) == f"{path}: unreadable (OSError: [Errno 5] Input/output error)"


def test_read_index_checks_the_index_against_the_manifest(shards, tmp_path):
    """`pipeline.read_index` (public) read the file by itself: a flipped byte gave other labels or offsets without
    a word, where every reader of the set names it (the manifest's sha256 of the index)."""
    from pipeline.index import read_index

    folder = shutil.copytree(shards, tmp_path / "set")
    data = bytearray((folder / "index.parquet").read_bytes())
    data[len(data) // 2] ^= 1
    (folder / "index.parquet").write_bytes(data)
    for split in (None, "val"):
        with pytest.raises(ShardError) as e:
            read_index(folder, split)
        assert str(e.value) == f"{folder / 'index.parquet'}: checksum differs from the manifest (corrupt or modified)"


@pytest.mark.parametrize("split", ["Val", "training", ""])
def test_read_index_refuses_a_split_that_is_none_of_the_sets(shards, split):
    """`pipeline.read_index` (public) gave an empty table for a misspelt split, without a word."""
    from pipeline.index import read_index

    with pytest.raises(ValueError) as e:
        read_index(shards, split)
    assert str(e.value) == f"split must be one of train, val, test, unlabeled, not {split!r}"
    assert read_index(shards, "val").num_rows == 30 and read_index(shards).num_rows == 330


@pytest.mark.parametrize("split", ["Val", "training"])
def test_split_index_refuses_a_split_that_is_none_of_the_sets(shards, split):
    """ShardSet.split_index (public) gave an empty table for a misspelt split, without a word."""
    with pytest.raises(ValueError) as e:
        ShardSet(shards).split_index(split)
    assert str(e.value) == f"split must be one of train, val, test, unlabeled, not {split!r}"
    assert ShardSet(shards).split_index("val").num_rows == 30


@pytest.mark.parametrize("variant", ["rgb32", ["rgb64"]])
def test_stats_names_the_variants(shards, variant):
    """ShardSet.stats('rgb32') was a KeyError; the readers name the variants."""
    with pytest.raises(ValueError) as e:
        ShardSet(shards).stats(variant)
    assert str(e.value) == f"variant must be one of ['gray28', 'rgb64'], not {variant!r}"
    assert len(ShardSet(shards).stats("gray28")["mean"]) == 1


def test_read_manifest_refuses_another_format_version_and_a_corrupt_file(tmp_path):
    """A set of another shard format (a later tinyin's) is not read as this one's layout; a manifest that is
    no JSON is a one-line ShardError, not a JSONDecodeError's traceback."""
    from pipeline.index import read_manifest

    (tmp_path / "manifest.json").write_text('{"format_version": 2, "shards": []}')
    with pytest.raises(ShardError) as e:
        read_manifest(tmp_path)
    assert str(e.value) == f"{tmp_path / 'manifest.json'}: format version 2, this tinyin reads 1"
    (tmp_path / "manifest.json").write_text('{"shards": []}')  # no version at all: not read as this one's either
    with pytest.raises(ShardError) as e:
        read_manifest(tmp_path)
    assert str(e.value) == f"{tmp_path / 'manifest.json'}: malformed (no format_version)"  # as ShardSet says it
    (tmp_path / "manifest.json").write_text('{"format_version": 1,')  # cut off mid-write
    with pytest.raises(ShardError) as e:
        read_manifest(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'manifest.json'}: corrupt manifest (Expecting property name")


def test_a_file_url_names_the_local_folder(shards, tmp_path):
    """`file:///data/shards` (what fsspec, a browser or a config file gives) was read as a folder named
    `file:`: 'no such folder', from the loader, `shard verify` and train.py alike."""
    from pipeline.shardset import local_path

    url = shards.resolve().as_uri()
    assert ShardSet(url).location == str(shards.resolve()) and ShardSet(url).manifest == ShardSet(shards).manifest
    assert local_path("file://localhost/data/a%20b") == "/data/a b" and local_path("rel/shards") == "rel/shards"
    with pytest.raises(ShardError) as e:
        ShardSet("file://nas/data/shards")
    assert str(e.value) == "file://nas/data/shards: a file:// URL of host 'nas'; give a path on this machine"


def test_a_url_that_cannot_be_parsed_is_a_usage_error_everywhere_it_is_given(tmp_path):
    """`http://[::1` (a bracket left open) was urllib's 'Invalid IPv6 URL' traceback out of make_loader,
    `tinyin shard verify`, train.py, reproduce.py and speedrun.py (test_report.py's test of theirs)."""
    from click.testing import CliRunner

    from pipeline import make_loader
    from pipeline.cache import cache_folder
    from pipeline.cli import main as tinyin

    said = "http://[::1: not a URL that can be read (Invalid IPv6 URL)"
    for call, words in ((lambda: make_loader("http://[::1", "train"), said),
                        (lambda: cache_folder("http://[::1", tmp_path), said),
                        (lambda: ShardSet("file://[::1"), "file://[::1: not a URL that can be read (Invalid IPv6 URL)")):
        with pytest.raises(UsageError) as e:
            call()
        assert str(e.value) == words
    result = CliRunner().invoke(tinyin, ["shard", "verify", "http://[::1"])
    assert (result.exit_code, result.output) == (2, f"error: {said}\n")


def test_a_local_sets_unreadable_manifest_is_one_line_at_once(tmp_path, monkeypatch):
    """A local disk's error (a symlink loop; a stale NFS handle, a failing disk) is not a server's blip: no
    retries over 8 s, no 'after 5 attempts'."""
    monkeypatch.setattr(pipeline.shardset.time, "sleep", lambda s: pytest.fail("waited to read a local file again"))
    bad = tmp_path / "manifest.json"
    bad.symlink_to(bad.name)
    with pytest.raises(ShardError) as e:
        ShardSet(tmp_path)
    assert str(e.value) == f"{bad}: unreadable (OSError: [Errno 40] Too many levels of symbolic links: '{bad}')"
