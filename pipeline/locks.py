"""`locked`: an exclusive `flock` on a lock file, so that one process at a time fills a folder (the
cache's copy of a remote set, `data fetch`'s download); the others wait, then find the work done."""
import contextlib
import fcntl
import os

from .errors import READ_ONLY_ERRNOS


def _open(path):
    """The lock file and the lock to take on it. In a folder this process may not write (a copy made
    beforehand, on a read-only mount or by another user), a shared lock on the file opened for
    reading: a complete copy is read as it is, and only a fill fails."""
    try:
        return open(path, "a+"), fcntl.LOCK_EX
    except OSError as e:
        if e.errno not in READ_ONLY_ERRNOS or not path.is_file():
            raise
        return open(path, "rb"), fcntl.LOCK_SH


def _still_there(f, path):
    """Whether `path` is still the file `f` holds (a holder that removes it may have done so meanwhile)."""
    try:
        return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def locked(path, waiting=None, remove=False):
    """Hold an exclusive flock on `path` (created if need be). waiting: called once, before waiting,
    when another process holds the lock (to say why nothing happens meanwhile). remove: delete the
    lock file on the way out (a process that was waiting on it then takes the lock afresh)."""
    while True:
        f, how = _open(path)
        try:
            fcntl.flock(f, how | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
                waiting = None
            fcntl.flock(f, how)
        if not remove or _still_there(f, path):
            break
        f.close()  # its holder removed it: this lock no longer excludes a newcomer
    try:
        yield
    finally:
        if remove:
            path.unlink(missing_ok=True)  # before the unlock: a waiter then sees it gone
        f.close()  # closing the file releases the lock
