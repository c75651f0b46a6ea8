"""The hand-assembled tar members are exactly what the standard library would write."""
import hashlib
import tarfile

import numpy as np
import pytest

from pipeline.tarshard import tar_header, write_shard


@pytest.mark.parametrize("name, size", [("n01443537_0.rgb64.npy", 12416), ("val_9999.json", 77), ("a.cls", 1), ("k.x", 0),
                                        ("n" * 100, 5)])  # a name of 100 bytes fills its field: no NUL is needed
def test_header_matches_tarfile(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    assert tar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT)


def test_long_names_are_refused():
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        tar_header("x" * 101, 1)


def test_fixed_stride_and_offsets(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(f"key_{i}", rng.integers(0, 255, (64, 64, 3), np.uint8), rng.integers(0, 255, (28, 28), np.uint8),
                i, b'{"i":%d}' % i) for i in range(5)]
    sha, size, offsets = write_shard(tmp_path / "s.tar", samples)
    data = (tmp_path / "s.tar").read_bytes()
    assert size == len(data) == 5 * 16896 + 1024
    assert [(b[0] - a[0], b[1] - a[1]) for a, b in zip(offsets, offsets[1:])] == [(16896, 16896)] * 4
    for (key, rgb, gray, label, meta), (rgb_at, gray_at) in zip(samples, offsets):
        assert data[rgb_at:rgb_at + rgb.size] == rgb.tobytes() and data[gray_at:gray_at + gray.size] == gray.tobytes()
    with tarfile.open(tmp_path / "s.tar") as tar:
        names = tar.getnames()
        assert names[:4] == ["key_0.rgb64.npy", "key_0.gray28.npy", "key_0.cls", "key_0.json"]
        assert tar.extractfile("key_3.cls").read() == b"3"
    assert not (tmp_path / "s.tar.part").exists()


def test_every_name_of_the_schema_is_read_somewhere():
    """pipeline/schema.py describes the format once, for every reader and writer to import: a name there that
    no code reads (VAL_PER_CLASS = 25: the split is each class's first half) says something no code does."""
    import ast
    from pathlib import Path

    from pipeline import schema

    root = Path(__file__).resolve().parent.parent
    read = set()
    for path in [*root.glob("pipeline/*.py"), *root.glob("tools/*.py"), *root.glob("models/*.py"), root / "train.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("schema"):
                read |= {alias.name for alias in node.names}
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "schema":
                read.add(node.attr)
    assert sorted(name for name in vars(schema) if name.isupper() and name not in read) == []


def test_the_returned_checksum_is_the_files_and_a_whole_block_is_not_padded(tmp_path):
    """The sha256 write_shard returns goes into the manifest: it is the file's, end-of-archive blocks included.
    A member of a whole number of blocks (here a 512-byte json) takes no padding, as tarfile writes it."""
    rng = np.random.default_rng(1)
    samples = [(f"k{i}", rng.integers(0, 255, (64, 64, 3), np.uint8), rng.integers(0, 255, (28, 28), np.uint8), i,
                b" " * 512) for i in range(2)]
    sha, size, _ = write_shard(tmp_path / "s.tar", samples)
    data = (tmp_path / "s.tar").read_bytes()
    assert sha == hashlib.sha256(data).hexdigest() and size == len(data) == 2 * 16896 + 1024  # the json: a header and its 512 bytes
    with tarfile.open(tmp_path / "s.tar") as tar:
        assert [(m.name, m.size) for m in tar.getmembers()][2:4] == [("k0.cls", 1), ("k0.json", 512)]
        assert tar.extractfile("k1.json").read() == b" " * 512
