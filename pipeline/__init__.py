"""tinyin's data side: the release -> WebDataset shards (offline), shards -> device batches (online).

Public API (imported lazily, so the CLI starts without importing torch):
`build_shards`, `make_loader`, `ShardSet` and `open_shard_set` (a set opened once, its manifest and index
read once, for several loaders), `ShardArrays`, `read_manifest`, `read_index`, `DeviceStage`,
`IMAGENET_MEAN`, `IMAGENET_STD`, and the errors `TinyinError`, `SourceError`, `ImageError`, `ShardError`.
"""
import importlib

_EXPORTS = {
    "build_shards": "build", "make_loader": "loader", "ShardArrays": "reader",
    "ShardSet": "shardset", "open_shard_set": "shardset",
    "read_manifest": "index", "read_index": "index",
    "DeviceStage": "device", "IMAGENET_MEAN": "device", "IMAGENET_STD": "device",
    "TinyinError": "errors", "SourceError": "errors", "ImageError": "errors", "ShardError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))  # the lazy names too (tab completion in a notebook)
