"""The Parquet index and the manifest of a shard set: writing them, and reading them back.

One index row per sample: where its arrays sit inside its tar (byte offset and length per
variant), so readers can gather pixels without parsing tar headers.
"""
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_file
from .schema import INDEX_FILE, VARIANTS, check_split

SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("label", pa.int16()), ("wnid", pa.string()),
    ("shard", pa.string()),
    ("rgb64_offset", pa.int64()), ("rgb64_length", pa.int32()),
    ("gray28_offset", pa.int64()), ("gray28_length", pa.int32()),
    ("box", pa.list_(pa.int16())), ("source", pa.string()),
])
LENGTHS = {name: int(np.prod(shape)) for name, (_, shape) in VARIANTS.items()}


def file_sha256(path):
    """The sha256 of a file, read in 4 MiB blocks (the manifest's per-shard checksum)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_index(folder, tasks, results):
    """Write `index.parquet` from the build's tasks [(shard, split, items)] and worker results."""
    cols = {name: [] for name in SCHEMA.names}
    for (shard, split, _), result in zip(tasks, results):
        for item, (rgb_at, gray_at) in zip(result["rows"], result["offsets"]):
            for name, value in (("key", item.key), ("split", split), ("label", item.label),
                                ("wnid", item.wnid), ("shard", shard),
                                ("rgb64_offset", rgb_at), ("rgb64_length", LENGTHS["rgb64"]),
                                ("gray28_offset", gray_at), ("gray28_length", LENGTHS["gray28"]),
                                ("box", list(item.box) if item.box else None), ("source", item.path)):
                cols[name].append(value)
    with atomic_file(Path(folder) / INDEX_FILE, "wb") as f:
        pq.write_table(pa.table(cols, schema=SCHEMA), f)


def read_manifest(shards):
    """The manifest of shard folder `shards` as a dict; ShardError if it is not a complete shard set: `ShardSet`'s
    checks and words (a manifest without `classes`, or whose counts lack train, was a KeyError in `bench train`)."""
    from .shardset import ShardSet  # shardset imports this module

    return ShardSet(shards).manifest


def read_index(shards, split=None):
    """The index as a pyarrow Table, optionally only the rows of one split (in shard order); ValueError
    for a split that is none of SPLITS. Checked as every reader's is (`ShardSet`: the manifest's sha256 of it,
    its agreement with the manifest): read by itself, a flipped byte gave other labels or offsets without a word."""
    if split is not None:  # 'Val' or 'training' gave an empty table, without a word
        check_split(split)
    from .shardset import ShardSet  # shardset imports this module

    shard_set = ShardSet(shards)
    return shard_set.index if split is None else shard_set.split_index(split)
