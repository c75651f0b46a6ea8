"""Errors the user can act on. The CLI prints their message on one line and exits 1."""


class TinyinError(Exception):
    """Base class: a user-facing problem with input, output or options (no traceback shown)."""


class SourceError(TinyinError):
    """The release (folder, zip or tar) is missing something or cannot be read."""


class ImageError(TinyinError):
    """One image cannot be used (corrupt, wrong size, wrong format). `--on-error skip` records these."""


class ShardError(TinyinError):
    """A shard set is incomplete, corrupt, or disagrees with its manifest."""
