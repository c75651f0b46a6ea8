"""`locked`: an exclusive `flock` on a lock file, so that one process at a time fills a folder (the
cache's copy of a remote set, `data fetch`'s download); the others wait, then find the work done."""
import contextlib
import errno
import fcntl
import os

from .errors import READ_ONLY_ERRNOS, TinyinError

# flock's answers on a file system that takes no file locks: an NFS mount whose lock service does not answer
# (ENOLCK, 'No locks available'), Lustre mounted without -o flock (ENOSYS), others (EOPNOTSUPP).
NO_LOCK_ERRNOS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


class LockError(TinyinError):
    """The lock file's file system takes no file locks; the message is one line, naming the file."""


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


def _flock(f, how, path, elsewhere):
    """flock(f, how); LockError where the file system takes none (`NO_LOCK_ERRNOS`), `f` closed: it was an OSError
    traceback ('[Errno 37] No locks available'). The lock file stays: another process may hold it."""
    try:
        fcntl.flock(f, how)
    except OSError as e:
        if e.errno not in NO_LOCK_ERRNOS:
            raise
        f.close()
        raise LockError(f"{path}: cannot lock it ({e.strerror}): its file system takes no file locks, which keep "
                        f"two processes from filling one folder at once; {elsewhere}") from None


@contextlib.contextmanager
def locked(path, waiting=None, remove=False, elsewhere="use a folder on another file system"):
    """Hold an exclusive flock on `path` (created if need be). waiting: called once, before waiting,
    when another process holds the lock (to say why nothing happens meanwhile). remove: delete the
    lock file on the way out (a process that was waiting on it then takes the lock afresh). LockError, ending
    with `elsewhere` (what to do instead), where the file system of `path` takes no file locks."""
    while True:
        f, how = _open(path)
        try:
            _flock(f, how | fcntl.LOCK_NB, path, elsewhere)
        except BlockingIOError:
            if waiting is not None:
                waiting()
                waiting = None
            _flock(f, how, path, elsewhere)
        if not remove or _still_there(f, path):
            break
        f.close()  # its holder removed it: this lock no longer excludes a newcomer
    try:
        yield
    finally:
        if remove:
            path.unlink(missing_ok=True)  # before the unlock: a waiter then sees it gone
        f.close()  # closing the file releases the lock
