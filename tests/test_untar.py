"""pipeline.untar against tarfile, the reference, on archives tarfile writes in each format;
unusual members read through tarfile; damage named."""
import io
import shutil
import subprocess
import tarfile
from dataclasses import dataclass

import pytest

from pipeline.errors import SourceError
from pipeline.source import open_release
from pipeline.untar import Broken, Unsupported, files_in_tar

LONG = "tiny-imagenet-200/train/" + "n01443537/" * 12 + "images/n01443537_0.JPEG"  # 147 chars: no ustar name field holds it


@dataclass(frozen=True)
class Kind:
    """A member without data, of this tarfile type (tarfile's type constants are bytes, as file contents are)."""
    type: bytes


def archive(fmt, members, **kw):
    """An uncompressed tar of `members` [(name, bytes or Kind)] written by tarfile."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **kw) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, Kind):
                info.type, info.linkname = content.type, "tiny-imagenet-200/wnids.txt"
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def reference(data):
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


MEMBERS = [("tiny-imagenet-200", Kind(tarfile.DIRTYPE)), ("tiny-imagenet-200/wnids.txt", b"n01443537\n"),
           ("tiny-imagenet-200/empty", b""), ("tiny-imagenet-200/a511", b"a" * 511),
           ("tiny-imagenet-200/b512", b"b" * 512), ("tiny-imagenet-200/c513", bytes(range(256)) * 2 + b"c"),
           ("tiny-imagenet-200/link", Kind(tarfile.SYMTYPE)), ("tiny-imagenet-200/hard", Kind(tarfile.LNKTYPE)),
           ("tiny-imagenet-200/" + "d" * 90 + "/" + "e" * 90, b"split between the ustar prefix and name fields"),
           ("tiny-imagenet-200/fifo", Kind(tarfile.FIFOTYPE)), ("tiny-imagenet-200/last", b"z" * 10_000)]


@pytest.mark.parametrize("fmt, extra", [
    (tarfile.USTAR_FORMAT, []),
    (tarfile.GNU_FORMAT, [(LONG, b"GNU long name"), ("tiny-imagenet-200/caf\u00e9", b"utf-8 name")]),
    (tarfile.PAX_FORMAT, [(LONG, b"pax path"), ("tiny-imagenet-200/caf\u00e9", b"pax utf-8 path")]),
], ids=["ustar", "gnu", "pax"])
def test_every_regular_file_as_tarfile_reads_it(fmt, extra):
    data = archive(fmt, MEMBERS + extra)
    files = files_in_tar(data)
    assert files == reference(data)
    assert sorted(files) == sorted(name for name, content in MEMBERS + extra if not isinstance(content, Kind))


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar command on this machine")
def test_an_archive_written_by_the_tar_command(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    (root / "n01443537" / ("x" * 120)).mkdir(parents=True)
    (root / "wnids.txt").write_bytes(b"n01443537\n")
    (root / "n01443537" / ("x" * 120) / "deep.JPEG").write_bytes(b"\xff\xd8" * 700)
    data = subprocess.run(["tar", "-cf", "-", "-C", str(tmp_path), "tiny-imagenet-200"], check=True,
                          capture_output=True).stdout
    files = files_in_tar(data)
    assert files == reference(data) and len(files) == 2


@pytest.mark.parametrize("kw, members", [
    ({"pax_headers": {"comment": "a global header"}}, []),  # pax 'g' member
    ({}, [("tiny-imagenet-200/sparse", Kind(tarfile.GNUTYPE_SPARSE))]),
], ids=["pax-global", "gnu-sparse"])
def test_unusual_members_are_left_to_tarfile(kw, members, tmp_path):
    fmt = tarfile.PAX_FORMAT if kw else tarfile.GNU_FORMAT
    data = archive(fmt, MEMBERS + members, **kw)
    with pytest.raises(Unsupported):
        files_in_tar(data)
    (tmp_path / "release.tar").write_bytes(data)
    files = open_release(tmp_path / "release.tar")
    assert {name: files.read(name) for name in files.names()} == {
        name.removeprefix("tiny-imagenet-200/"): b for name, b in reference(data).items()}


def test_damage_is_named(tmp_path):
    data = bytearray(archive(tarfile.USTAR_FORMAT, MEMBERS))
    second = 3 * 512  # the folder's header, wnids.txt's header and data, then `empty`'s header
    data[second] ^= 1
    with pytest.raises(Broken, match=f"^bad checksum in the header at byte {second:,}$"):
        files_in_tar(bytes(data))
    data[second] ^= 1
    cut = bytes(data[:data.index(b"tiny-imagenet-200/last") + 512 + 100])  # 100 of `last`'s 10,000 bytes
    with pytest.raises(Broken, match="^unexpected end of data$"):
        files_in_tar(cut)
    (tmp_path / "cut.tar").write_bytes(cut)
    with pytest.raises(SourceError, match=f"^{tmp_path / 'cut.tar'}: unreadable archive \\(unexpected end of data\\)$"):
        open_release(tmp_path / "cut.tar")
