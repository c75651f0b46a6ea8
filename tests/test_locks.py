"""`pipeline.locks.locked`: one holder at a time, a lock file its holder removes taken afresh, and a folder
this process may only read (a copy made beforehand on a read-only mount) read under a shared lock."""
import errno
import os
import threading

import pytest

from pipeline.locks import locked


def test_a_waiter_whose_lock_file_the_holder_removed_locks_a_fresh_one(tmp_path):
    """The waiter opened the lock file before its holder removed it: the lock it then gets is on a file no
    newcomer opens, which excludes no one. It must take the lock afresh, on the file under the name."""
    path, seen, waiting = tmp_path / ".lock", {}, threading.Event()

    def second():
        with locked(path, waiting=waiting.set, remove=True):
            seen["there"] = path.exists()
    with locked(path, remove=True):
        thread = threading.Thread(target=second)
        thread.start()
        assert waiting.wait(10)
    thread.join(10)
    assert seen == {"there": True} and not path.exists()


def test_a_waiter_that_must_wait_again_for_a_newcomer_says_so_once(tmp_path, monkeypatch):
    """The holder removed the lock file, and a newcomer locked the new one before the waiter took it afresh: the
    waiter waits a second time, and `waiting` (its line that another process holds the lock) is not said twice."""
    import fcntl

    path, said, threads = tmp_path / ".lock", [], []
    newcomer_in, release, blocked = threading.Event(), threading.Event(), threading.Semaphore(0)
    real_flock = fcntl.flock

    def flock(f, how):  # each wait for the lock is counted
        if not how & fcntl.LOCK_NB:
            blocked.release()
        return real_flock(f, how)
    monkeypatch.setattr(fcntl, "flock", flock)

    def start(target):
        threads.append(threading.Thread(target=target))
        threads[-1].start()

    def newcomer():
        with locked(path, remove=True):
            newcomer_in.set()
            assert release.wait(10)

    def waiter():
        with locked(path, waiting=lambda: said.append("waiting"), remove=True):
            pass

    class Handover(type(path)):  # the holder's lock file: the newcomer takes the new one between its removal and the unlock
        def unlink(self, missing_ok=False):
            super().unlink(missing_ok=missing_ok)
            start(newcomer)
            assert newcomer_in.wait(10)

    with locked(Handover(path), remove=True):
        start(waiter)
        assert blocked.acquire(timeout=10)  # the waiter waits on the holder's file
    assert blocked.acquire(timeout=10)  # then on the newcomer's
    release.set()
    for thread in threads:
        thread.join(10)
    assert said == ["waiting"] and not path.exists()


@pytest.fixture(params=[errno.EROFS, errno.EACCES, errno.EPERM], ids=["read-only-mount", "eacces", "eperm"])
def read_only(monkeypatch, tmp_path, request):
    """The lock's folder as one this process may not write: a read-only mount, another user's folder (root,
    running the tests, may write anywhere). The folder, and the errno of a write-open there."""
    def refuse_writes(path, mode="r", *args, **kwargs):
        if set(mode) & set("wa+"):
            raise OSError(request.param, os.strerror(request.param), str(path))
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr("pipeline.locks.open", refuse_writes, raising=False)
    return tmp_path, request.param


def test_in_a_read_only_folder_an_existing_lock_file_is_held_for_reading(read_only):
    folder, _ = read_only
    (folder / ".lock").write_bytes(b"")
    with locked(folder / ".lock"):
        entered = True
    assert entered and (folder / ".lock").exists()


def test_in_a_read_only_folder_two_readers_hold_the_lock_at_once(read_only):
    """A shared lock: a reader of a complete copy does not wait for another reader to finish."""
    folder, _ = read_only
    (folder / ".lock").write_bytes(b"")
    waited, entered = [], threading.Event()

    def second():
        with locked(folder / ".lock", waiting=lambda: waited.append(True)):
            entered.set()
    with locked(folder / ".lock"):
        thread = threading.Thread(target=second)
        thread.start()
        assert entered.wait(10)
    thread.join(10)
    assert waited == []


def test_in_a_read_only_folder_a_missing_lock_file_is_the_write_error(read_only):
    """Not FileNotFoundError from the fallback's read-open: the user is told the folder is read-only."""
    folder, code = read_only
    with pytest.raises(OSError) as caught:
        with locked(folder / ".lock"):
            pass
    assert (caught.value.errno, caught.value.filename) == (code, str(folder / ".lock"))


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS], ids=["nfs-without-lockd", "lustre-without-flock"])
def test_a_file_system_that_takes_no_locks_is_one_line_naming_the_lock_file(tmp_path, monkeypatch, code):
    """flock's ENOLCK (an NFS mount whose lock service does not answer) or ENOSYS (Lustre without -o flock) was an
    OSError traceback out of every command that fills a folder (`data fetch`, a URL's cache): a LockError, one line
    naming the file and what to do, its file closed."""
    import fcntl

    from pipeline.locks import LockError

    opened = []

    def no_locks(f, how):
        opened.append(f)
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(LockError) as caught:
        with locked(tmp_path / ".lock", remove=True, elsewhere="go elsewhere"):
            pytest.fail("entered without the lock")
    assert str(caught.value) == (f"{tmp_path / '.lock'}: cannot lock it ({os.strerror(code)}): its file system takes "
                                 "no file locks, which keep two processes from filling one folder at once; go elsewhere")
    assert len(opened) == 1 and opened[0].closed
