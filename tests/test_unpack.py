"""pipeline.unpack against the references, tarfile and zipfile, on archives written in each
format; unusual members read through the standard library; damage named."""
import bz2
import io
import os
import shutil
import stat
import subprocess
import threading
import tarfile
import zipfile
from dataclasses import dataclass

import pytest

from pipeline.errors import SourceError
from pipeline.source import open_release
from pipeline.unpack import Broken, Unsupported, files_in_tar, files_in_zip

LONG = "tiny-imagenet-200/train/" + "n01443537/" * 12 + "images/n01443537_0.JPEG"  # 147 chars: no ustar name field holds it


@dataclass(frozen=True)
class Kind:
    """A member without data, of this tarfile type (tarfile's type constants are bytes, as file contents are)."""
    type: bytes
    linkname: str = "tiny-imagenet-200/wnids.txt"


def archive(fmt, members, **kw):
    """An uncompressed tar of `members` [(name, bytes or Kind)] written by tarfile."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **kw) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, Kind):
                info.type, info.linkname = content.type, content.linkname
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def reference(data, symlinks=False):
    """What extracting `data` gives: its files, and its hard links with their targets' bytes (tar stores them once);
    with `symlinks`, its symbolic links too (which `files_in_tar` leaves to its caller), with their targets' bytes."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile() or m.islnk() or symlinks and m.issym()}


def released(path, data):
    """The files `open_release` reads from archive `data` written to `path`, named as in the archive."""
    path.write_bytes(data)
    files = open_release(path)
    return {"tiny-imagenet-200/" + name: files.read(name) for name in files.names()}


MEMBERS = [("tiny-imagenet-200", Kind(tarfile.DIRTYPE)), ("tiny-imagenet-200/wnids.txt", b"n01443537\n"),
           ("tiny-imagenet-200/empty", b""), ("tiny-imagenet-200/a511", b"a" * 511),
           ("tiny-imagenet-200/b512", b"b" * 512), ("tiny-imagenet-200/c513", bytes(range(256)) * 2 + b"c"),
           ("tiny-imagenet-200/link", Kind(tarfile.SYMTYPE, "wnids.txt")), ("tiny-imagenet-200/hard", Kind(tarfile.LNKTYPE)),
           ("tiny-imagenet-200/" + "d" * 90 + "/" + "e" * 90, b"split between the ustar prefix and name fields"),
           ("tiny-imagenet-200/fifo", Kind(tarfile.FIFOTYPE)), ("tiny-imagenet-200/last", b"z" * 10_000)]


@pytest.mark.parametrize("fmt, extra", [
    (tarfile.USTAR_FORMAT, []),
    (tarfile.GNU_FORMAT, [(LONG, b"GNU long name"), ("tiny-imagenet-200/caf\u00e9", b"utf-8 name"),
                          ("tiny-imagenet-200/hard-long", Kind(tarfile.LNKTYPE, LONG))]),
    (tarfile.PAX_FORMAT, [(LONG, b"pax path"), ("tiny-imagenet-200/caf\u00e9", b"pax utf-8 path"),
                          ("tiny-imagenet-200/hard-long", Kind(tarfile.LNKTYPE, LONG))]),
], ids=["ustar", "gnu", "pax"])
def test_every_regular_file_as_tarfile_reads_it(fmt, extra):
    # Hard links were skipped: a release whose duplicate images were hard-linked (fdupes -L, rdfind) lost them.
    data = archive(fmt, MEMBERS + extra)
    files = files_in_tar(data)
    assert files == reference(data)
    assert sorted(files) == sorted(name for name, content in MEMBERS + extra
                                   if not isinstance(content, Kind) or content.type == tarfile.LNKTYPE)
    assert files["tiny-imagenet-200/hard"] == b"n01443537\n"


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
    assert released(tmp_path / "release.tar", data) == reference(data, symlinks=True)


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


def test_an_archive_cut_at_a_header_is_truncated():
    """Cut exactly at or inside a member's header, a tar lacks its end-of-archive blocks: Broken, not
    the members before the cut (tarfile stops there quietly)."""
    data = archive(tarfile.USTAR_FORMAT, MEMBERS)
    at = data.index(b"tiny-imagenet-200/last")
    for cut in (at, at + 511):
        with pytest.raises(Broken, match=f"^truncated: it ends at byte {cut:,}, before tar's end-of-archive blocks$"):
            files_in_tar(data[:cut])
    assert files_in_tar(data[:data.index(b"z" * 10_000) + 10_240 + 512]) == reference(data)  # one zero block is enough


def zip_archive(members, compression=zipfile.ZIP_DEFLATED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, content in members:
            if isinstance(content, Kind):
                zf.mkdir(name)
            else:
                zf.writestr(name, content)
    return buf.getvalue()


def zip_reference(data):
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}


def zip_files(data):
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return files_in_zip(data, [i for i in zf.infolist() if not i.is_dir()])


ZIP_MEMBERS = [(name, content) for name, content in MEMBERS + [(LONG, b"long"), ("tiny-imagenet-200/caf\u00e9", b"utf-8")]
               if content == Kind(tarfile.DIRTYPE) or not isinstance(content, Kind)]


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_every_zip_member_as_zipfile_reads_it(compression):
    data = zip_archive(ZIP_MEMBERS, compression)
    files = zip_files(data)
    assert files == zip_reference(data) and len(files) == len(ZIP_MEMBERS) - 1


@pytest.mark.skipif(shutil.which("zip") is None, reason="no zip command on this machine")
def test_a_zip_written_by_the_zip_command(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    (root / "n01443537").mkdir(parents=True)
    (root / "wnids.txt").write_bytes(b"n01443537\n")
    (root / "n01443537" / "a.JPEG").write_bytes(bytes(range(256)) * 40)
    subprocess.run(["zip", "-qr", str(tmp_path / "r.zip"), "tiny-imagenet-200"], cwd=tmp_path, check=True)
    data = (tmp_path / "r.zip").read_bytes()
    assert zip_files(data) == zip_reference(data) and len(zip_files(data)) == 2


def test_other_zip_compressions_are_left_to_zipfile(tmp_path):
    data = zip_archive(ZIP_MEMBERS, zipfile.ZIP_BZIP2)
    with pytest.raises(Unsupported):
        zip_files(data)
    assert released(tmp_path / "release.zip", data) == zip_reference(data)


def test_zip_damage_is_named(tmp_path):
    data = bytearray(zip_archive(ZIP_MEMBERS, zipfile.ZIP_STORED))
    data[data.index(b"z" * 10_000) + 5_000] ^= 1
    (tmp_path / "bad.zip").write_bytes(data)
    with pytest.raises(SourceError, match=f"^{tmp_path / 'bad.zip'}: unreadable archive "
                                          "\\(tiny-imagenet-200/last: bad CRC-32 \\(damaged member\\)\\)$"):
        open_release(tmp_path / "bad.zip")


def test_an_encrypted_zip_is_one_line(tmp_path):
    data = bytearray(zip_archive([("tiny-imagenet-200/wnids.txt", b"n01443537\n")], zipfile.ZIP_STORED))
    data[data.index(b"PK\x03\x04") + 6] |= 1  # the 'encrypted' flag, in the local and the central header
    data[data.index(b"PK\x01\x02") + 8] |= 1
    (tmp_path / "locked.zip").write_bytes(data)
    with pytest.raises(SourceError) as caught:
        open_release(tmp_path / "locked.zip")
    assert str(caught.value) == (f"{tmp_path / 'locked.zip'}: unreadable archive (tiny-imagenet-200/wnids.txt: "
                                 "encrypted; extract the archive with its password and pass the folder)")


def test_a_pax_size_record_overrides_the_header():
    """Where a size does not fit the header's field (over 8 GiB), pax carries it and the field says 0."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content, pax in (("big", b"hello", {"size": "5"}), ("next", b"abc", {})):
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(content), pax
            tar.addfile(info, io.BytesIO(content))
    data = bytearray(buf.getvalue())
    at = data.index(b"big\0")  # the member's own header (after its pax header)
    data[at + 124:at + 136] = b"%011o\0" % 0
    data[at + 148:at + 156] = b" " * 8
    data[at + 148:at + 156] = b"%06o\0 " % sum(data[at:at + 512])
    assert files_in_tar(bytes(data)) == reference(bytes(data)) == {"big": b"hello", "next": b"abc"}


@pytest.mark.parametrize("suffix, mode", [(".tar.xz", "w:xz"), (".tar.bz2", "w:bz2")])
def test_other_compressions_of_a_tar_go_through_tarfile(tmp_path, suffix, mode):
    path = tmp_path / f"release{suffix}"
    with tarfile.open(path, mode) as tar:
        tar.addfile(tarfile.TarInfo("tiny-imagenet-200/wnids.txt"), io.BytesIO(b""))
        info = tarfile.TarInfo("tiny-imagenet-200/last")
        info.size = 10_000
        tar.addfile(info, io.BytesIO(b"z" * 10_000))
    files = open_release(path)
    assert {name: files.read(name) for name in files.names()} == {"wnids.txt": b"", "last": b"z" * 10_000}


def zip_of(root, path):
    """Zip folder `root` into `path` (outside it) as `zip -ry` does: a symbolic link stored as its target's
    path, S_IFLNK in its mode."""
    assert root not in path.parents
    with zipfile.ZipFile(path, "w") as zf:
        for name in sorted(p.relative_to(root).as_posix() for p in root.rglob("*")):
            if (root / name).is_symlink():
                info = zipfile.ZipInfo(name)
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, os.readlink(root / name))
            elif (root / name).is_file():
                zf.write(root / name, name)
    return path


def test_symbolic_links_are_read_as_extracting_gives(tmp_path):
    """An image that is a link to another file of the archive (a duplicate, `test/` to a train image) was
    skipped in a tar with no word (fewer unlabeled images) and read as its target's path in a zip ('not an
    image'). Each now reads as the folder the archive extracts to: links in chains, through linked folders,
    out of the release's folder but inside the archive; a link to a folder above it is not walked again."""
    root = tmp_path / "root"
    release, dups = root / "tiny-imagenet-200", root / "dups"
    (release / "test/images").mkdir(parents=True)
    dups.mkdir()
    (release / "wnids.txt").write_bytes(b"n01443537\n")
    (release / "a.JPEG").write_bytes(b"a" * 600)
    (dups / "d.JPEG").write_bytes(b"d" * 700)
    for name, target in [("test/images/same.JPEG", "../../a.JPEG"), ("test/images/chain.JPEG", "same.JPEG"),
                         ("test/images/side.JPEG", "../../../dups/d.JPEG"), ("linked", "../dups"),
                         ("via.JPEG", "linked/d.JPEG"), ("test/loop", "..")]:
        (release / name).symlink_to(target)
    expected = {"wnids.txt", "a.JPEG", "test/images/same.JPEG", "test/images/chain.JPEG", "test/images/side.JPEG",
                "linked/d.JPEG", "via.JPEG"}
    folder = open_release(release)
    assert set(folder.names()) == expected
    archives = [zip_of(root, tmp_path / "release.zip")]
    for suffix, mode, fmt in [(".tar", "w", tarfile.GNU_FORMAT), (".tar", "w", tarfile.PAX_FORMAT),
                              (".tar.bz2", "w:bz2", tarfile.PAX_FORMAT)]:  # bz2: tarfile's reader
        archives.append(tmp_path / f"{fmt}{suffix}")
        with tarfile.open(archives[-1], mode, format=fmt) as tar:
            tar.add(root, "")
    for path in archives:
        files = open_release(path)
        assert {name: files.read(name) for name in files.names()} == {name: folder.read(name) for name in expected}


def test_a_symbolic_link_to_no_file_of_the_archive_is_named(tmp_path):
    """Outside the archive, to a member it lacks, in a loop: listed, and reading it says why (as a
    folder's broken link: `cannot read NAME (FileNotFoundError)`), never skipped unsaid."""
    root = tmp_path / "root" / "tiny-imagenet-200"
    root.mkdir(parents=True)
    (root / "wnids.txt").write_bytes(b"n01443537\n")
    bad = {"abs.JPEG": ("/etc/hostname", "outside the archive"), "up.JPEG": ("../../x.JPEG", "outside the archive"),
           "gone.JPEG": ("none.JPEG", "which the archive does not hold"),
           "ring1.JPEG": ("ring2.JPEG", "in a loop of links"), "ring2.JPEG": ("ring1.JPEG", "in a loop of links")}
    for name, (target, _) in bad.items():
        (root / name).symlink_to(target)
    tarred = tmp_path / "release.tar"
    with tarfile.open(tarred, "w") as tar:
        tar.add(root, root.name)
    for path in (tarred, zip_of(root.parent, tmp_path / "release.zip")):
        files = open_release(path)
        assert files.names() == sorted(bad) + ["wnids.txt"]
        for name, (target, why) in bad.items():
            with pytest.raises(SourceError) as caught:
                files.read(name)
            assert str(caught.value) == f"{path}: cannot read {name} (a symbolic link to {target}, {why})"


def test_a_hard_link_to_a_symbolic_link_or_to_nothing_is_not_skipped(tmp_path):
    """A hard link to no file before it was skipped with no word. To a symbolic link (`ln` of a link, then
    `tar -c`) it is that link again, its target read from the hard link's own folder, as `tar -x` makes it;
    to no member before it (`tar --delete` of its file), where `tar -x` fails, it is listed and reading it
    names it. Both readers: ours (.tar) and tarfile's (.tar.bz2)."""
    members = [("r/wnids.txt", b"n01443537\n"), ("r/a/f", b"A"), ("r/b/f", b"B"),
               ("r/a/s", Kind(tarfile.SYMTYPE, "f")), ("r/b/h", Kind(tarfile.LNKTYPE, "r/a/s")),
               ("r/b/h2", Kind(tarfile.LNKTYPE, "r/b/h")), ("r/gone", Kind(tarfile.LNKTYPE, "r/none"))]
    data = archive(tarfile.GNU_FORMAT, members)
    links, lost = {}, {}
    assert sorted(files_in_tar(data, links, lost)) == ["r/a/f", "r/b/f", "r/wnids.txt"]
    assert links == {"r/a/s": "f", "r/b/h": "f", "r/b/h2": "f"} and lost == {"r/gone": "r/none"}
    (tmp_path / "release.tar.bz2").write_bytes(bz2.compress(data))
    for path in (tmp_path / "release.tar", tmp_path / "release.tar.bz2"):
        if path.suffix == ".tar":
            path.write_bytes(data)
        files = open_release(path)
        assert files.names() == ["a/f", "a/s", "b/f", "b/h", "b/h2", "gone", "wnids.txt"]
        assert [files.read(name) for name in ("a/s", "b/h", "b/h2")] == [b"A", b"B", b"B"]
        with pytest.raises(SourceError) as caught:
            files.read("gone")
        assert str(caught.value) == (f"{path}: cannot read gone (a hard link to r/none, with no file or symbolic "
                                     "link of that name before it in the archive)")


def test_a_file_appended_over_a_symbolic_link_is_read_as_extracting_gives(tmp_path):
    """`tar -r` of a real copy in place of a symbolic link (or a hard link of that name to a file): extracting
    leaves the last member, the file, but the link was read (its target's bytes, silently another image)."""
    members = [("r/wnids.txt", b"n01443537\n"), ("r/a", b"A"), ("r/b", b"B"),
               ("r/s", Kind(tarfile.SYMTYPE, "a")), ("r/h", Kind(tarfile.SYMTYPE, "a")),
               ("r/s", b"S"), ("r/h", Kind(tarfile.LNKTYPE, "r/b"))]
    data = archive(tarfile.GNU_FORMAT, members)
    (tmp_path / "release.tar").write_bytes(data)
    (tmp_path / "release.tar.bz2").write_bytes(bz2.compress(data))
    for path in (tmp_path / "release.tar", tmp_path / "release.tar.bz2"):
        files = open_release(path)
        assert {name: files.read(name) for name in files.names()} == {
            "wnids.txt": b"n01443537\n", "a": b"A", "b": b"B", "s": b"S", "h": b"B"}


def rewritten(data, at, field, value):
    """`data` with header field `field` (a slice) of the header at byte `at` set to `value`, its checksum made good."""
    data = bytearray(data)
    data[at + field.start:at + field.stop] = value
    data[at + 148:at + 156] = b" " * 8
    data[at + 148:at + 156] = b"%06o\0 " % sum(data[at:at + 512])
    return bytes(data)


def test_full_width_name_link_and_prefix_fields_are_read_whole():
    """A ustar name or link name of exactly 100 bytes and a prefix of exactly 155 fill their fields with no
    NUL after them: each is read to the field's end, as tarfile reads it."""
    name100 = "tiny-imagenet-200/" + "n" * 82
    prefixed = "tiny-imagenet-200/" + "d" * 137 + "/f.JPEG"  # split as a 155-byte prefix and 'f.JPEG'
    data = archive(tarfile.USTAR_FORMAT, [(name100, b"full name"), (prefixed, b"full prefix"),
                                          ("tiny-imagenet-200/hard", Kind(tarfile.LNKTYPE, name100))])
    assert len(name100) == 100 and data.index(b"d" * 137) + 137 - data.index(b"tiny-imagenet-200/d") == 155
    assert files_in_tar(data) == reference(data) == {name100: b"full name", prefixed: b"full prefix",
                                                      "tiny-imagenet-200/hard": b"full name"}


def test_an_old_style_folder_is_no_file():
    """A pre-POSIX tar marks a folder as a regular file ('\\0') whose name ends in '/': tarfile reads a folder."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("tiny-imagenet-200/old-folder/")
        info.type = tarfile.AREGTYPE
        tar.addfile(info)
        tar.addfile(tarfile.TarInfo("tiny-imagenet-200/old-folder/empty"), io.BytesIO(b""))
    data = buf.getvalue()
    assert data[156:157] == b"\0"
    assert files_in_tar(data) == reference(data) == {"tiny-imagenet-200/old-folder/empty": b""}


def test_members_this_reader_would_misread_are_left_to_tarfile(tmp_path):
    """A pax sparse file (its bytes are a sparse map, then data), a base-256 size: Unsupported, and tarfile
    reads the archive."""
    sparse = tarfile.TarInfo("tiny-imagenet-200/sparse")
    stored = b"1\n0\n10\n".ljust(512, b"\0") + b"s" * 10  # sparse format 1.0: the map, then the data
    sparse.size, sparse.pax_headers = len(stored), {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                                    "GNU.sparse.name": "tiny-imagenet-200/sparse",
                                                    "GNU.sparse.realsize": "10"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("tiny-imagenet-200/wnids.txt"), io.BytesIO(b""))
        tar.addfile(sparse, io.BytesIO(stored))
    gnu = archive(tarfile.GNU_FORMAT, [("tiny-imagenet-200/wnids.txt", b""), ("tiny-imagenet-200/a", b"abc")])
    at = gnu.index(b"tiny-imagenet-200/a")
    cases = {"pax-sparse": buf.getvalue(), "base-256": rewritten(gnu, at, slice(124, 136), b"\x80" + (3).to_bytes(11, "big"))}
    for name, data in cases.items():
        with pytest.raises(Unsupported):
            files_in_tar(data)
        assert released(tmp_path / f"{name}.tar", data) == reference(data), name
    assert reference(cases["pax-sparse"])["tiny-imagenet-200/sparse"] == b"s" * 10
    assert reference(cases["base-256"])["tiny-imagenet-200/a"] == b"abc"


def test_a_pax_record_of_length_zero_is_broken():
    """A record's length counts from its own first byte: 0 (or less) never moves on, and the parse looped forever."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("tiny-imagenet-200/wnids.txt")
        info.pax_headers = {"comment": "x"}
        tar.addfile(info, io.BytesIO(b""))
    data = bytearray(buf.getvalue())
    record = data.index(b"13 comment=x\n")
    data[record:record + 13] = b"0 comment=xx\n"
    result = []

    def parse():
        try:
            files_in_tar(bytes(data))
        except Broken as e:
            result.append(str(e))
    thread = threading.Thread(target=parse, daemon=True)  # a daemon: a loop that never ends must not hold the run
    thread.start()
    thread.join(10)
    assert result == ["invalid pax header"]


def test_an_incremental_gnu_archive_reads_as_gnu_tar_lists_it(tmp_path):
    """`tar -G` (GNU incremental, as backup tools write) keeps each member's access and change times where
    ustar keeps its name prefix, and stores folders as dumpdirs ('D'). tarfile takes the times for a prefix
    (`13602760400/tiny-imagenet-200/a`): every file whose access time was not wnids.txt's was dropped unsaid.
    Each is now named as GNU tar lists it."""
    data = archive(tarfile.GNU_FORMAT, [("tiny-imagenet-200/", b"Ya\0Ywnids.txt\0\0"),
                                        ("tiny-imagenet-200/wnids.txt", b"n01443537\n"), ("tiny-imagenet-200/a", b"abc")])
    data = rewritten(data, 0, slice(156, 157), b"D")
    for name, atime in (("tiny-imagenet-200/", b"15305323443"), ("tiny-imagenet-200/wnids.txt", b"15305323443"),
                        ("tiny-imagenet-200/a", b"13602760400")):
        at = data.index(name.encode() + b"\0")
        data = rewritten(data, at, slice(345, 369), atime + b"\0" + atime + b"\0")
    expected = {"tiny-imagenet-200/wnids.txt": b"n01443537\n", "tiny-imagenet-200/a": b"abc"}
    assert files_in_tar(data) == expected
    assert released(tmp_path / "incremental.tar", data) == expected
    if shutil.which("tar"):
        (tmp_path / "incremental.tar").write_bytes(data)
        listed = subprocess.run(["tar", "-tf", str(tmp_path / "incremental.tar")], check=True, capture_output=True,
                                text=True).stdout.split()
        assert listed == ["tiny-imagenet-200/", *expected]


def test_a_chain_of_more_than_40_links_is_a_loop(tmp_path):
    """As Linux follows links (ELOOP past 40): a chain of 40 links to a file reads as the file, one of 41 is named."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("tiny-imagenet-200/wnids.txt"), io.BytesIO(b""))
        for k in range(1, 42):
            info = tarfile.TarInfo(f"tiny-imagenet-200/l{k}")
            info.type, info.linkname = tarfile.SYMTYPE, f"l{k + 1}" if k < 41 else "wnids.txt"
            tar.addfile(info)
    (tmp_path / "links.tar").write_bytes(buf.getvalue())
    files = open_release(tmp_path / "links.tar")
    assert files.read("l2") == b""
    with pytest.raises(SourceError) as caught:
        files.read("l1")
    assert str(caught.value) == f"{tmp_path / 'links.tar'}: cannot read l1 (a symbolic link to l2, in a loop of links)"


def test_a_link_to_the_archives_top_and_a_nested_wnids_txt(tmp_path):
    """The release is the shallowest folder holding wnids.txt (a copy deeper in it is one of its files, not a
    second release), and a link to the archive's top folder, above the release, is not walked (as a folder's)."""
    data = archive(tarfile.USTAR_FORMAT, [("tiny-imagenet-200/wnids.txt", b"n01443537\n"),
                                          ("tiny-imagenet-200/backup/wnids.txt", b"old\n"),
                                          ("tiny-imagenet-200/top", Kind(tarfile.SYMTYPE, ".."))])
    assert released(tmp_path / "release.tar", data) == {"tiny-imagenet-200/wnids.txt": b"n01443537\n",
                                                        "tiny-imagenet-200/backup/wnids.txt": b"old\n"}
