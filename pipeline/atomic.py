"""Files written whole or not at all: under a temporary name beside the file, then renamed over it, so
that a reader (a loader, `tinyin report`, tools/reproduce.py's check for a finished row) never sees half
a file, and a write that fails (a full disk, a signal) leaves neither half a file nor its temporary twin."""
import contextlib
import json
import os
import tempfile
from pathlib import Path

from .errors import naming


@contextlib.contextmanager
def atomic_file(path, mode="w", suffix=".part", durable=False):
    """A file object on `<path><suffix>`, renamed over `path` once the block ends without an error. On an
    error the temporary file is removed (half a file, on the very disk that filled up), and an OSError
    naming no file names `path`.
    durable: the bytes are on the disk before the rename, and the rename before the return (fsync of the
    file, then of its folder), so that a machine that loses power or panics keeps the old file or the new
    one: without it a file system that orders neither (XFS, unlike ext4's rename heuristic) may keep the
    new name on an empty file. For what a lost hour of training rests on; the rest needs no such cost."""
    tmp = f"{path}{suffix}"
    try:
        with naming(path), open(tmp, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path, obj, indent=1):
    """Write `obj` as JSON (and a final newline) to `path`, whole or not at all."""
    with atomic_file(path) as f:
        f.write(json.dumps(obj, indent=indent) + "\n")


def refusal(folder):
    """Why no file can be made in `folder` (its strerror: another user's folder, a read-only mount), or None.
    The kernel is asked with a file made and gone at once (O_TMPFILE: nothing is left there), so that an
    output written after minutes of work is refused before them."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return e.strerror


def folder_refusal(folder):
    """Make `folder` (and its parents) for a tool's outputs; why it cannot take them ('cannot be made a folder
    (File exists)', 'cannot write in it (Permission denied)': another user's, a read-only mount), or None.
    Found before the work, not at its first write (a traceback out of a worker thread, a failed run). A name
    longer than the file system takes is named (`long_name`), where makedirs said 'File name too long'."""
    if why := long_name(folder):
        return why
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        return f"cannot be made a folder ({e.strerror})"
    why = refusal(folder)
    return f"cannot write in it ({why})" if why else None


def long_name(path, suffix=""):
    """Why folder or file `path` cannot be made: a name in it longer than its file system takes (NAME_MAX, 255
    bytes on most), or its last with `suffix` added (a temporary twin made beside it), named; None when all fit.
    The kernel's ENAMETOOLONG names neither the name nor the limit, and a twin's came out as the user's name's."""
    names = Path(os.path.abspath(path)).parts[1:]
    limit = _name_max(path)
    for name in names:
        if len(os.fsencode(name)) > limit:
            return f"the name {_shown(name)} is {len(os.fsencode(name))} bytes, more than the {limit} a name may have"
    size = len(os.fsencode(names[-1] + suffix)) if names else 0
    if suffix and size > limit:
        return (f"the name {_shown(names[-1])} leaves no room for {suffix!r} after it (its temporary twin beside it): "
                f"{size} bytes, more than the {limit} a name may have")
    return None


def _name_max(path):
    """NAME_MAX of the file system `path` would be made on (its nearest folder there), 255 if it cannot say."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _shown(name):
    """A long name shown by its start and end, enough to find it."""
    return repr(name) if len(name) <= 40 else repr(f"{name[:24]}...{name[-8:]}")
