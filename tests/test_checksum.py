"""`sum64`, the checksum every transfer is checked by: its definition pinned (a pure-Python reference and
fixed values, so every machine and numpy version agrees with the manifests already built), the changes it
must catch, the build writing it, and the readers that fall back to sha256 without it."""
import hashlib
import json
import shutil

import numpy as np
import pytest

from pipeline.checksum import _KEYS, BLOCK_WORDS, file_sum64, sum64
from pipeline.errors import ShardError
from pipeline.index import read_manifest
from pipeline.shardset import ShardSet
from pipeline.stream import stream_from_set

BLOCK_BYTES = 8 * BLOCK_WORDS


def reference(data):
    """The docstring's definition, word by word in Python integers."""
    padded = data + bytes(-len(data) % BLOCK_BYTES)
    keys = [int(k) for k in _KEYS]
    sums = []
    for at in range(0, len(padded), BLOCK_BYTES):
        words = np.frombuffer(padded[at:at + BLOCK_BYTES], "<u8").tolist()
        sums.append(sum(w * k for w, k in zip(words, keys)) % 2**64)
    message = len(data).to_bytes(8, "little") + b"".join(s.to_bytes(8, "little") for s in sums)
    return hashlib.sha256(message).hexdigest()[:16]


def test_sum64_is_its_definition_and_stays_fixed():
    data = np.random.default_rng(0).bytes(2 * BLOCK_BYTES + 13)  # two whole blocks and a ragged tail
    assert sum64(data) == reference(data) == sum64(memoryview(data)) == sum64(np.frombuffer(data, np.uint8))
    assert _KEYS[:2].tolist() == [int.from_bytes(hashlib.shake_256(b"tinyin sum64 v1").digest(16)[i:i + 8], "little") | 1
                                  for i in (0, 8)]
    assert sum64(b"") == "af5570f5a1810b7a" and sum64(b"\0") == "4cbbd8ca5215b8d1"
    assert sum64(bytes(range(256)) * 4099) == "239a16bb01ac6f30"


def test_sum64_catches_a_flipped_byte_anywhere_a_longer_body_and_swapped_blocks():
    data = bytearray(np.random.default_rng(1).bytes(3 * BLOCK_BYTES + 100))
    digest = sum64(data)
    for at in (0, 7, BLOCK_BYTES - 1, BLOCK_BYTES, len(data) // 2, 3 * BLOCK_BYTES, len(data) - 1):
        for bit in (0x01, 0x80):
            data[at] ^= bit
            assert sum64(data) != digest, (at, bit)
            data[at] ^= bit
    assert sum64(data) == digest
    assert sum64(data + b"\0") != digest  # zero padding alone would hide it: the length is in the digest
    swapped = data[BLOCK_BYTES:2 * BLOCK_BYTES] + data[:BLOCK_BYTES] + data[2 * BLOCK_BYTES:]
    assert sum64(swapped) != digest


def test_file_sum64_of_an_empty_file_is_that_of_no_bytes(tmp_path):
    """A shard truncated to nothing (a copy that failed at once) must be checked like any other file, not
    be a ValueError from mmap, which cannot map an empty file."""
    (tmp_path / "empty.tar").write_bytes(b"")
    assert file_sum64(tmp_path / "empty.tar") == sum64(b"") == "af5570f5a1810b7a"


def test_the_build_lists_each_shards_sum64(shards):
    for entry in read_manifest(shards)["shards"]:
        path = shards / entry["file"]
        assert entry["sum64"] == file_sum64(path) == sum64(path.read_bytes())


def test_a_wrong_sum64_fails_verify_and_a_set_without_sum64_is_checked_by_sha256(shards, tmp_path):
    copy = shutil.copytree(shards, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = manifest["shards"][0]
    entry["sum64"] = "0" * 16  # sha256 still right: `shard verify` must still object
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=f"^{copy / entry['file']}: checksum differs from the manifest"):
        ShardSet(copy).check_local_file(entry)

    for e in manifest["shards"]:  # a set built before sum64
        del e["sum64"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    bad = copy / "train-000001.tar"
    data = bytearray(bad.read_bytes())
    data[100] ^= 1
    bad.write_bytes(data)
    with pytest.raises(ShardError, match=f"^{bad}: checksum differs from the manifest"):
        for _ in stream_from_set(copy, "train", workers=0):
            pass
