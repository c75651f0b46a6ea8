"""`pipeline.atomic`: a file is replaced whole or not at all, and a failed write leaves nothing behind."""
import errno
import io
import json
import os

import pytest
import torch

from pipeline import atomic
from pipeline.atomic import atomic_file, write_json
from pipeline.checkpoint import save_atomic


def test_the_file_appears_whole_and_its_temporary_twin_goes(tmp_path):
    path = tmp_path / "final.json"
    path.write_text("old")
    write_json(path, {"epochs": 3}, indent=2)
    assert path.read_text() == '{\n  "epochs": 3\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.json"]


def test_an_error_inside_leaves_the_old_file_and_no_temporary_one(tmp_path):
    """A signal or a bug between the first write and the last: readers keep the old file, whole."""
    path = tmp_path / "args.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(path) as f:
            f.write('{"half": ')
            raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["args.json"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux), where every write fails for a full disk")
def test_a_full_disk_names_the_file_and_frees_the_temporary_one(tmp_path):
    path = tmp_path / "checkpoint.pth"
    (tmp_path / "checkpoint.pth.tmp").symlink_to("/dev/full")  # a disk that is always full
    with pytest.raises(OSError) as e:
        with atomic_file(path, "wb", suffix=".tmp") as f:
            f.write(bytes(1 << 16))
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(path))
    assert list(tmp_path.iterdir()) == []  # the half file (here the link to it) is gone, and no checkpoint.pth


def test_json_round_trips(tmp_path):
    obj = {"wall_s": 1.5, "intervals": [[0, 1.5]], "command": ["--arch", "lenet5"]}
    write_json(tmp_path / "reproduce.json", obj, indent=None)
    assert json.loads((tmp_path / "reproduce.json").read_text()) == obj
    write_json(tmp_path / "final.json", {"epochs": 3, "test_top1": 5.5})  # indented by one by default, as run files are
    assert (tmp_path / "final.json").read_text() == '{\n "epochs": 3,\n "test_top1": 5.5\n}\n'


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a file descriptor's file by /proc (Linux)")
def test_a_checkpoint_is_on_the_disk_before_its_name_and_its_name_before_the_return(tmp_path, monkeypatch):
    """Without the syncs, a machine that lost power or panicked after the rename could keep checkpoint.pth as
    an empty file on a file system that orders neither (XFS): the run's hours lost. What syncs, in what order
    with the rename; write_json's small files (metrics, args) are not synced: they cost a sync each."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                        real_fsync(fd)))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    path = tmp_path / "checkpoint.pth"
    save_atomic({"step": 7}, path)
    assert events == [("fsync", str(path) + ".tmp"), ("replace", str(path)), ("fsync", str(tmp_path))]
    assert torch.load(path, weights_only=True) == {"step": 7}
    events.clear()
    write_json(tmp_path / "final.json", {})
    assert events == [("replace", str(tmp_path / "final.json"))]



@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a file descriptor's file by /proc (Linux)")
def test_a_durable_file_holds_all_its_bytes_when_it_is_synced(tmp_path, monkeypatch):
    """The fsync must find the bytes in the file, not in Python's buffer: synced before the buffer is
    flushed, the disk could keep a file short of what was written (the flush comes at the close)."""
    sizes = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (sizes.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size)),
                                                        real_fsync(fd)))
    path = tmp_path / "best.pth"
    with atomic_file(path, "wb", suffix=".tmp", durable=True) as f:
        f.write(bytes(1000))
    assert sizes[0] == (str(path) + ".tmp", 1000)


class _AlmostFullDisk(io.RawIOBase):
    """A file on a disk with `free` bytes left: the write that reaches them is cut short, the next fails
    with ENOSPC, as write(2) does."""

    def __init__(self, path, free):
        self.file, self.free = open(path, "wb", buffering=0), free

    def writable(self):
        return True

    def write(self, data):
        if not self.free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self.file.write(bytes(data)[:self.free])
        self.free -= n
        return n

    def fileno(self):
        return self.file.fileno()

    def close(self):
        self.file.close()
        super().close()


def test_a_checkpoint_that_fills_the_disk_names_the_file_and_frees_the_temporary_one(tmp_path, monkeypatch):
    """A disk with room for part of a checkpoint (a ResNet-18 run's 134 MB with 45 MB free): torch's writer,
    a step behind after the failed write, checks its place at the end of the file and raised 'RuntimeError:
    [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598' over the OSError, a traceback out of
    train.py. (The /dev/full test above fails every write, the end's too, so it kept the OSError.)"""
    monkeypatch.setattr(atomic, "open", lambda path, mode: io.BufferedWriter(_AlmostFullDisk(path, 1 << 20)),
                        raising=False)
    path = tmp_path / "checkpoint.pth"
    with pytest.raises(OSError) as e:
        save_atomic({"model": torch.zeros(1 << 20)}, path)  # 4 MB
    assert (type(e.value), e.value.errno, e.value.filename) == (OSError, errno.ENOSPC, str(path))
    assert list(tmp_path.iterdir()) == []
