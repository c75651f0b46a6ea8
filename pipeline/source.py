"""Read the files of a Tiny ImageNet release from a folder, a .zip or a .tar[.gz], without extracting.

`open_release(src)` returns a `ReleaseFiles`: a mapping from paths relative to the release root
(`wnids.txt`, `train/n01443537/images/n01443537_0.JPEG`, ...) to their bytes. Archives are read in
one sequential pass into memory (the whole release is ~250 MB of JPEG bytes, ~330 MB as a tar),
which is both the fastest way to read a gzipped tar and what lets the decode workers receive plain
bytes; `unpack` takes the files out of the archive.
"""
import bisect
import codecs
import gzip
import io
import os
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path

from .errors import SourceError
from .unpack import BLOCK, Broken, Unsupported, enter_file, enter_hard_link, files_in_tar, files_in_zip, truncated

ROOT_MARKER = "wnids.txt"
GZIP_MAGIC = b"\x1f\x8b"
TAR_NAMES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")  # what tarfile reads
ZIP_MAGIC = b"PK\x03\x04"  # a zip's first local file header
MAX_HOPS = 40  # links followed on the way to one file before it is a loop (Linux's limit)


class ReleaseFiles:
    """Files of a release: `names()` lists relative paths, `read(name)` returns bytes."""

    def __init__(self, label, files=None, folder=None):
        self.label = label  # shown in error messages: the --src the user gave
        self._files = files  # name -> bytes (archives)
        self._folder = folder  # Path (folders, read lazily)
        if folder is not None:
            self._names = _files_under(folder, label)
        else:
            self._names = sorted(files)

    def names(self):
        return self._names

    def __contains__(self, name):
        if self._files is not None:
            return name in self._files
        # A broken link is present (as `names()` lists it), so that reading it names it: a dangling
        # W_boxes.txt or words.txt read as absent, the boxes or words left out with no word.
        path = self._folder / name
        return path.is_file() or path.is_symlink()

    def read(self, name):
        try:
            if self._files is not None:
                data = self._files[name]
                if isinstance(data, _Unreadable):
                    raise SourceError(f"{self.label}: cannot read {name} ({data})")
                return data
            return (self._folder / name).read_bytes()
        except (KeyError, OSError) as e:
            raise SourceError(f"{self.label}: cannot read {name} ({e.__class__.__name__})") from None

    def text(self, name):
        """A text file's lines (stripped, blank lines dropped): `numbered(name)` without the numbers."""
        return [line for _, line in self.numbered(name)]

    def numbered(self, name):
        """A text file's lines, stripped and blank ones dropped, each with its line number in the file: `[(n, line)]`
        (from 1, blank lines counted: numbered among the others, a line after a blank one was named a line early);
        missing file -> SourceError.
        A UTF-8 byte order mark (Windows editors write one) is dropped: it would be part of the first name.
        A file that starts with UTF-16's byte order mark is read as UTF-16: Windows PowerShell 5's `>` and
        `Out-File`, and Notepad's 'Unicode', write that. Read as UTF-8, each name had a NUL between its letters:
        wnids.txt's failed the build with 'class folder train/W is not in wnids.txt', words.txt's lost every
        class's words with no word."""
        if name not in self:
            raise SourceError(f"{self.label}: missing {name}")
        data = self.read(name)
        encoding = "utf-16" if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"
        return [(n, line.strip()) for n, line in enumerate(data.decode(encoding, "replace").splitlines(), 1)
                if line.strip()]


def _files_under(folder, label):
    """Sorted '/'-joined paths, relative to `folder`, of the files under it, symlinked folders followed
    (`rglob` does not: a class folder linked in from another disk had no images), a folder at each of its paths
    but not inside itself (a link to a folder above it would loop). A broken link is listed, so that reading it
    names it. A folder that cannot be listed is a SourceError naming it (`label`: the --src given)."""
    def unlisted(error):
        # os.walk skips such a folder without a word: another user's class folder (mode 700) lost its
        # images from a build that said "skipped 0", as an unreadable image would not have been.
        rel = os.path.relpath(error.filename, folder).replace(os.sep, "/")
        raise SourceError(f"{label}: cannot read folder {rel}/ ({error.__class__.__name__})")

    # The real folders of each walked folder's path, itself included: a folder is walked at each path that leads to it
    # (as the release's archive reads it: `_follow_links`), unless it is one of them or holds one (a loop). Walked once
    # in all, a folder reached first through a link (`subset/n01 -> ../train/n01`, in os.walk's arbitrary order) was
    # left out at its own path: its images lost from train/ ('no images of class n01'), where its tar built whole.
    names, within = [], {os.fspath(folder): {os.path.realpath(folder)}}
    for path, folders, files in os.walk(folder, onerror=unlisted, followlinks=True):
        rel = os.path.relpath(path, folder)
        names += [name if rel == "." else f"{rel}/{name}".replace(os.sep, "/") for name in files
                  if os.path.isfile(os.path.join(path, name)) or os.path.islink(os.path.join(path, name))]
        kept = []
        for name in folders:
            real = os.path.realpath(os.path.join(path, name))
            if not any(r == real or r.startswith(os.path.join(real, "")) for r in within[path]):
                within[os.path.join(path, name)] = within[path] | {real}
                kept.append(name)
        folders[:] = kept
    return sorted(names)


class _Unreadable(str):
    """In place of an archive member's bytes, why it has none: a symbolic link that leads to no file there."""


def _follow_links(files, links):
    """`files` ({name: bytes}) with the symbolic links `links` ({name: target}) read as extracting the archive
    and reading them would: a link to a file is its bytes (a target relative to the link's folder, every link
    on the way followed), a link to a folder every file under it, each folder once (a link to a folder above
    it would loop; the folder walk does the same). A link to no file of the archive (outside it, missing, in
    a loop) is listed with an `_Unreadable` reason: reading it fails, naming it, as a folder's broken link does."""
    if not links:
        return files
    names = sorted(set(files) | set(links))

    def real(path, hops=0):
        """`path` with every link on it followed, or ValueError(why not)."""
        parts = []
        for part in path.split("/"):
            if part == "..":
                if not parts:
                    raise ValueError("outside the archive")
                parts.pop()
            elif part not in ("", "."):
                parts.append(part)
                if "/".join(parts) in links:
                    if hops == MAX_HOPS:
                        raise ValueError("in a loop of links")
                    target = links["/".join(parts)]
                    if target.startswith("/"):
                        raise ValueError("outside the archive")
                    parts = [p for p in real("/".join(parts[:-1] + [target]), hops + 1).split("/") if p]
        return "/".join(parts)

    out, expanded = dict(files), set()
    todo = [(name, links[name]) for name in sorted(links, reverse=True)]  # (link's name, its target)
    while todo:
        name, shown = todo.pop()
        try:
            target = real(name)
        except ValueError as e:
            out[name] = _Unreadable(f"a symbolic link to {shown}, {e}")
            continue
        if target in files:
            out[name] = files[target]
            continue
        prefix = target + "/" if target else ""
        first = bisect.bisect_left(names, prefix)
        if first == len(names) or not names[first].startswith(prefix):
            out[name] = _Unreadable(f"a symbolic link to {shown}, which the archive does not hold")
        elif target not in expanded and not (real(name.rpartition("/")[0]) + "/").startswith(prefix):
            expanded.add(target)
            for member in names[first:bisect.bisect_left(names, prefix + "\U0010ffff")]:
                inside = name + "/" + member[len(prefix):]
                if member in files:
                    out[inside] = files[member]
                else:
                    todo.append((inside, links[member]))
    return out


def _lost(hard_links):
    """`{name: _Unreadable}` for the hard links `{name: target}` to no file or symbolic link before them, which
    extracting the archive fails for ('Cannot hard link'): listed, reading one names it (one was skipped unsaid)."""
    return {name: _Unreadable(f"a hard link to {target}, with no file or symbolic link of that name before it in the archive")
            for name, target in hard_links.items()}


def _extracted(files, links, lost):
    """A tar's members (`unpack.enter_file`, `enter_hard_link`; names as the archive has them) as extracting it
    gives them, `./` taken off the names, its links followed and its lost hard links listed."""
    return _follow_links({name.lstrip("./"): b for name, b in {**_lost(lost), **files}.items()},
                         {name.lstrip("./"): target for name, target in links.items()})


def not_a_release(src):
    """The error of a folder or archive `src` that holds no wnids.txt."""
    return SourceError(f"{src}: missing {ROOT_MARKER} (not a Tiny ImageNet release)")


def not_an_archive(src):
    """The error of a file `src` that is neither a zip nor a tar."""
    return SourceError(f"{src}: unreadable archive (not a folder, .zip or .tar[.gz])")


def _strip_root(names_to_bytes, label):
    """Re-key archive members relative to the folder holding wnids.txt (e.g. `tiny-imagenet-200/`)."""
    roots = sorted((n for n in names_to_bytes if n == ROOT_MARKER or n.endswith("/" + ROOT_MARKER)), key=len)
    if not roots:
        raise not_a_release(label)
    prefix = roots[0][: -len(ROOT_MARKER)]
    _one_release(label, [prefix] + [r[: -len(ROOT_MARKER)] for r in roots if not r.startswith(prefix)])
    return {n[len(prefix):]: b for n, b in names_to_bytes.items() if n.startswith(prefix)}


def _one_release(label, roots):
    """Refuse a --src that holds several releases side by side (`roots`, their '/'-ended paths): building
    the first and ignoring the others took one of them, unsaid, for the one the user meant."""
    if len(roots) > 1:
        raise SourceError(f"{label}: holds {len(roots)} releases ({', '.join(roots)}); pass the one to build")


def _read_tar(path):
    try:
        data = path.read_bytes()
        if data[:2] == GZIP_MAGIC:
            data = gzip.decompress(data)
        if data[257:262] == b"ustar":
            try:
                links, lost = {}, {}
                files = files_in_tar(data, links, lost)
                return _extracted(files, links, lost)
            except Unsupported:
                pass  # an unusual member: tarfile reads the whole archive instead
        # bz2, xz, pre-POSIX tars, unusual members. Stream mode ('r|*'): one pass, no seeking.
        files, links, lost = {}, {}, {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
            for member in tar:
                if member.isfile():
                    enter_file(files, links, member.name, tar.extractfile(member).read())
                elif member.islnk():
                    enter_hard_link(files, links, lost, member.name, member.linkname)
                elif member.issym():
                    links[member.name] = member.linkname
            # tarfile stops as quietly at a header cut short as at the end-of-archive block it read whole.
            end = tar.fileobj.tell()  # bytes of tar read (decompressed)
            if end < tar.offset + BLOCK:
                raise truncated(end)
        return _extracted(files, links, lost)
    except (Broken, tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as e:
        if str(e) == "empty file" and data:  # tarfile's word when no whole header came out (a cut .tar.bz2)
            e = "no tar data in it: truncated or corrupt"
        raise SourceError(f"{path}: unreadable archive ({e})") from None


def _read_zip(path):
    try:
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if not i.is_dir()]
            try:
                files = files_in_zip(path.read_bytes(), members)
            except Unsupported:
                files = {i.filename: zf.read(i) for i in members}
            # Windows PowerShell 5's Compress-Archive writes '\' between folders, which the zip format
            # forbids in a name: it can only be a folder separator.
            files = {name.replace("\\", "/"): data for name, data in files.items()}
            # A symbolic link (`zip -y`, macOS's Archive Utility) is stored as a file of its target's path,
            # marked so in its Unix mode: read as such it was 'not an image (corrupt JPEG)'.
            links = {i.filename.replace("\\", "/") for i in members if stat.S_ISLNK(i.external_attr >> 16)}
            return _follow_links({name: data for name, data in files.items() if name not in links},
                                 {name: files[name].decode("utf-8", "surrogateescape") for name in links})
    except (Broken, zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error,
            NotImplementedError) as e:  # zipfile's word for a compression it lacks
        raise SourceError(f"{path}: unreadable archive ({e})") from None


def _starts_with(path, magic):
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def open_release(src):
    """Open a release given as a folder, a `.zip`, or a `.tar`/`.tar.gz`/`.tgz` file."""
    src = Path(src)
    if not src.exists():
        raise SourceError(f"{src}: no such file or folder")
    if src.is_dir():
        roots = [src] if (src / ROOT_MARKER).is_file() else sorted(p.parent for p in src.glob("*/" + ROOT_MARKER))
        if not roots:
            raise not_a_release(src)
        root = roots[0]
        _one_release(src, [f"{p.name}/" for p in roots])
        return ReleaseFiles(str(src), folder=root)
    if not src.is_file():  # a pipe (`--src <(curl URL)`, /dev/stdin) or a device: the readers seek in the archive
        raise SourceError(f"{src}: not a file or folder (a pipe?); save the archive to a file and pass that")
    # A copy or download that wrote nothing: a .zip of 0 bytes was 'not a folder, .zip or .tar[.gz]'.
    if src.stat().st_size == 0:
        raise SourceError(f"{src}: unreadable archive (empty file)")
    if zipfile.is_zipfile(src):
        files = _read_zip(src)
    elif _starts_with(src, ZIP_MAGIC):  # is_zipfile looks for the central directory, at a zip's end
        raise SourceError(f"{src}: corrupt or truncated zip (no central directory at its end)")
    elif src.name.endswith(TAR_NAMES) or tarfile.is_tarfile(src):  # the name: is_tarfile fails on a cut one
        files = _read_tar(src)
    else:
        raise not_an_archive(src)
    return ReleaseFiles(str(src), files=_strip_root(files, src))
