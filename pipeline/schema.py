"""The shard format, defined once: sample keys, variants, splits.

The writer, the index, the readers and the tests all import these names, so the
on-disk layout is described in exactly one place (FFCV's habit of named fields).
"""

FORMAT_VERSION = 1

#: --shards when it is not given (train.py, the bench commands, tools/reproduce.py): README's folder, which its
#: `shard build` writes (data/ is in .gitignore), so that its commands run as written. Here, not in shardset.py:
#: the CLI's options name it without importing pyarrow.
DEFAULT_SHARDS = "data/shards"

#: Sample members in a shard, in the order they are written to the tar.
RGB64 = "rgb64.npy"
GRAY28 = "gray28.npy"
CLS = "cls"
JSON = "json"
MEMBERS = (RGB64, GRAY28, CLS, JSON)

#: Image variants: name -> (member key, array shape). All are uint8.
VARIANTS = {
    "rgb64": (RGB64, (64, 64, 3)),
    "gray28": (GRAY28, (28, 28)),
}


def check_variant(variant):
    """ValueError unless `variant` names one of VARIANTS: the one wording of every reader's check."""
    if not isinstance(variant, str) or variant not in VARIANTS:  # a list was "unhashable type: 'list'"
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, not {variant!r}")


#: Splits written by `tinyin shard build`. `unlabeled` is the official test/ folder (label -1).
SPLITS = ("train", "val", "test", "unlabeled")


def check_split(split):
    """ValueError unless `split` names one of SPLITS (a misspelt one selected no rows, without a word)."""
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")


#: Shard file name pattern (WebDataset convention).
SHARD_PATTERN = "{split}-{index:06d}.tar"

INDEX_FILE = "index.parquet"
MANIFEST_FILE = "manifest.json"
#: The lock file of a cached copy of a remote set (`pipeline.cache`).
CACHE_LOCK_FILE = ".lock"
#: What marks a folder as such a copy: JSON naming the folder itself, so that a copy of it made elsewhere
#: (or a folder holding another tool's `.lock`) is the user's own set, none of whose files is ever removed.
CACHE_MARK_FILE = ".tinyin-cache.json"
#: The lock file of a train.py run folder: locked (POSIX `lockf`, rank 0's) while a run trains there
#: (train.py refuses a second run; `tinyin report` tells a run still training from one stopped or failed).
RUN_LOCK_FILE = ".train.lock"
