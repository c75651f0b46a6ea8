"""Errors the user can act on, and the one place that turns them into a line on stderr and an exit code.

Both front ends (the `tinyin` click CLI and `train.py`) go through `user_errors()`: a
`TinyinError` prints as ``error: MESSAGE`` (one line, no traceback) and exits with the error's
`exit_code`: 2 for a `UsageError` (a bad flag value or combination, as argparse and click use),
1 for everything else (missing or foreign files, a checkpoint from another run, ...).
"""
import argparse
import contextlib
import errno
import math
import numbers
import os
import re
import signal
import sys
import threading
import time


def plural(n, noun) -> str:
    """`noun` after a count of exactly 1, else its plural ('shards', 'classes', 'batches'): a message's 'N shards'
    said '1 shards' ('has 1 val images', '1 warm-up steps'). The caller writes the count itself, in its format."""
    return noun if n == 1 else noun + ("es" if noun.endswith(("s", "x", "sh", "tch")) else "s")  # 'epochs', not 'epoches'


class TinyinError(Exception):
    """Base class: a user-facing problem with input, output or options (no traceback shown)."""

    exit_code = 1


class UsageError(TinyinError):
    """A flag value or combination that cannot work (exit code 2, as argparse and click use)."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a UsageError: one line on stderr, exit code 2 (under `user_errors()`), instead
    of the usage block argparse prints above the line. train.py's and the tools' parsers."""

    def error(self, message):
        raise UsageError(message)


def check_integer(name, value, low):
    """ValueError unless `value` is an int (not a bool) of at least `low`: what numpy and torch
    would otherwise reject deep inside the first batch, after the data pass has started. The Python API's
    integer arguments (make_loader's, fetch_release's)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer of at least {low}, not {value!r}")


def check_flag(name, value):
    """ValueError unless `value` is True or False (numpy's too): a string is truthy, so shuffle="no" or
    drop_last="False" (a config file's value) did the opposite of what it said, without a word."""
    import numpy as np  # here: the CLI's start does not need it

    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, not {value!r}")


def at_least(low, kind=int):
    """An argparse type: a finite number >= low ('must be at least 1, not 0'); of an int flag, a whole one (`--epochs
    1.5` said 'not a number: '1.5''). train.py's and the tools' number flags: one mistake, one message (the tools'
    said argparse's 'invalid int value: 'x'', where train.py says 'not a whole number: 'x'')."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'a whole' if kind is int else 'a'} number: {text!r}") from None
        if not value >= low or value == math.inf:  # also rejects nan
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, not {text}")  # 'at least 0', not '0.0'
        return value
    return parse


def positive_float(text):
    """An argparse type: a float > 0 ('must be positive, not -1')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def path_text(text):
    """An argparse type: a path that is not empty, a leading `~` or `~user` its home folder (`os.path.expanduser`,
    as the tinyin commands' paths; a URL never starts with one). An empty one (an unset shell variable:
    `--resume "$CKPT"`) read as "not given": a fresh run, or no --weights, in place of the one asked for, without a
    word; an empty --shards was the current folder, 'error: : no such folder'. A shell expands `~` only at a word's
    start: `--output-dir=~/runs/a`, a quoted "~/runs/a" or a job script's value put the run in a folder named `~`.
    train.py's path flags and the tools' (whose empty --out wrote into the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("empty; give a path")
    return os.path.expanduser(text)


def names_among(choices, noun, unset):
    """An argparse type: comma-separated names among `choices` (each a `noun`: 'row'), each once, in their order
    (a name twice ran its work twice). An empty value (an unset shell variable: `--rows "$ROWS"`) is refused, not
    read as not given, naming `unset`: what leaving the flag out does ('all'). One form for the tools' lists
    (reproduce.py's --rows, speedrun.py's --ablate, gpu_session.py's --parts), whose words for one mistake differed:
    'argument --rows: unknown row vgg16-64; choose from: ...', '--ablate: unknown part ...', '--parts: choose from
    ...' (not naming the part)."""
    def parse(text):
        if not text:
            raise argparse.ArgumentTypeError(f"empty; name {plural(2, noun)} ({', '.join(choices)}), "
                                             f"or leave it out for {unset}")
        names = list(dict.fromkeys(text.split(",")))
        unknown = [name or repr(name) for name in names if name not in choices]  # 'bench,': the part ''
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {plural(len(unknown), noun)} {', '.join(unknown)}; "
                                             f"choose from: {', '.join(choices)}")
        return names
    return parse


class SourceError(TinyinError):
    """The release (folder, zip or tar) is missing something or cannot be read."""


class ImageError(TinyinError):
    """One image cannot be used (corrupt, wrong size, wrong format). `--on-error skip` records these."""


class ShardError(TinyinError):
    """A shard set is incomplete, corrupt, or disagrees with its manifest."""


class CheckpointError(TinyinError):
    """A checkpoint or weights file that is missing, unreadable, or belongs to another run or network."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as a Ctrl-C is so that every `finally` cleans up (see `sigterm_interrupts`); `signum`: the
    signal, SIGTERM or another that the block handles so (train.py's SIGUSR1), whose code `user_errors` exits with."""

    def __init__(self, signum=signal.SIGTERM):
        super().__init__()
        self.signum = signum


@contextlib.contextmanager
def sigterm_interrupts(signals=(signal.SIGTERM,)):
    """Within the block, SIGTERM (`kill`, a scheduler) raises `Terminated` in the main thread instead of
    ending the process where it stands, so temporary files are removed as after a Ctrl-C. A command
    with a handler of its own installs it inside the block and restores this one after.
    `signals`: those so handled; SIGINT among them raises KeyboardInterrupt (Python's own handler),
    any other `Terminated`. Yields the list of the signals it raised as `Terminated`: a command that
    catches the interrupt to end early with what it has (the bench tables: the rows so far) exits
    with `stop_code` of it."""
    noted = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield noted
        return

    def terminate(signum, frame):
        noted.append(signum)
        raise Terminated(signum)
    previous = {sig: signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else terminate)
                for sig in signals}
    try:
        yield noted
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


#: The line a command stopped by a signal ends with (`user_errors`, `stopped_at_once`): SIGUSR1 is train.py's third
#: stop signal (what schedulers send before they preempt: `StopSignals`).
STOPPED = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGUSR1: "stopped by SIGUSR1"}


#: The signals the `tinyin` commands stop on as on Ctrl-C (`sigterm_interrupts(STOPS)`: one line, 128 + the signal, the
#: cleanup done, a download's arrivals kept for the rerun, a bench table's rows so far kept): SIGUSR1 too, as train.py
#: takes it, where it killed `shard build` (its temporary folder left), `bench` (its rows lost) and `report` where they
#: stood, without a line.
STOPS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def stopped_at_once():
    """Within the block (a program's imports, before any handler of its own: torch's take seconds; train.py's
    join of the other ranks), Ctrl-C, SIGTERM and SIGUSR1 end the process at once, with `user_errors`' line
    and exit code (`interrupted`, 130; `terminated`, 143; `stopped by SIGUSR1`, 138). Ctrl-C there was a
    KeyboardInterrupt traceback out of torch's import, SIGTERM and SIGUSR1 a death by the signal, which
    speedrun.py took for its train.py's failure (exit 1). At once (os._exit): nothing is made yet that needs
    cleaning up, and no library's bare `except:` around an import can swallow it. Also from a thread of its
    own, woken by the signal (set_wakeup_fd): a Python handler runs only between the main thread's bytecodes,
    and a wait in C++ that releases the GIL holds those off for good (torch.distributed's join: Ctrl-C did
    nothing until its 30-minute timeout). Main thread only, as handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    stopping = threading.Lock()  # one line: the handler and the thread may both take the signal

    def stop(signum, frame=None):
        if stopping.acquire(blocking=False):  # else the other is on it (a repeat in the handler: not a deadlock)
            print(STOPPED[signum], file=sys.stderr, flush=True)
            os._exit(128 + signum)

    def watch():  # each signal with a Python handler writes its number to `wake`; closed, it reads b""
        while woken := os.read(read, 1):
            if woken[0] in STOPPED:
                stop(woken[0])
    read, wake = os.pipe()
    os.set_blocking(wake, False)  # as set_wakeup_fd asks
    previous = {sig: signal.signal(sig, stop) for sig in STOPPED}
    previous_fd = signal.set_wakeup_fd(wake)
    watcher = threading.Thread(target=watch, name="tinyin-stop", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(wake)
        watcher.join()
        os.close(read)


def stop_code(noted):
    """The exit code of a command stopped early: 128 + the signal, SIGTERM if `sigterm_interrupts` noted one, else Ctrl-C's."""
    return 128 + (noted[0] if noted else signal.SIGINT)


def when_orphaned(parent, action, name, every=0.5):
    """Call `action()` in a daemon thread (named `name`) once process `parent` is gone: this process is then
    adopted, and its parent pid changes. For a parent that can die without a word to its children, killed
    outright (SIGKILL, the OOM killer): the shard build's workers, a torchrun worker. `parent` is the pid
    to watch, taken when the child was made (a child that reads it late may already be adopted)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(every)
        action()

    threading.Thread(target=watch, name=name, daemon=True).start()


@contextlib.contextmanager
def signals_deferred(signals=tuple(STOPPED)):
    """Within the block, `signals` are noted, and the first raised again right after it for the handler
    it would have met. For calls that must not stop halfway: a process pool's `submit` forking its
    workers and `wait` taking its futures' locks one by one (stopped there, the build hung for good),
    torch's DataLoader starting its workers (left half made, a worker idled for the life of the process).
    By default the three a command stops on (`STOPPED`): Ctrl-C, SIGTERM and SIGUSR1.
    Yields {signal: the handler stood in for} (a process forked meanwhile puts them back). Main thread
    only, as handlers; a handler not set from Python (getsignal: None) is left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield {}
        return
    held = []
    previous = {sig: handler for sig in signals if (handler := signal.getsignal(sig)) is not None}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield previous
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])


#: Python 3.12+'s DeprecationWarning at a fork of a process with threads, which the shard build's
#: and the stream path's worker forks silence (`build._run_tasks` and `stream_workers.FORK` say why).
FORK_WARNING = r"This process \(pid=\d+\) is multi-threaded, use of fork\(\) may lead to deadlocks"


# OSErrors that the machine, not the code, causes: a full disk, missing permission, a read-only file
# system, a file where a folder should be, a name longer than the file system takes (a `--out` pasted
# wrong). Other OSErrors keep their traceback: they may be bugs.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                      errno.ENAMETOOLONG}
# Those of a write to a folder this process may only read (a read-only mount, another user's folder).
READ_ONLY_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}
# Those of a write to a disk (or a quota) that is full.
FULL_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def refused_open(error):
    """Why the open of a file was refused (`error`'s strerror: another user's file, mode 600), or None where
    `error` is not that: an OSError naming no file is about the bytes read (torch.load's EINVAL on a copy cut
    short), which "cannot read" would blame on the file's mode or the disk."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        return error.strerror
    return None


@contextlib.contextmanager
def naming(path):
    """Within the block, an OSError that names no file names `path`: a write's or a close's (a full disk:
    ``No space left on device``, and no word of where) and pyarrow's (its own wording, the errno kept)."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, os.strerror(e.errno), str(path)) from e


# The password of `scheme://user:password@host` (percent-encoded, so no '/', '@' or space in it).
_PASSWORD = re.compile(r"\b([a-z][a-z0-9+.-]*://[^/@\s:]*:)[^/@\s]+@", re.IGNORECASE)
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
# A query parameter of a URL whose name ends in a word for a credential: a signed URL's signature or
# token (`sig`, `Signature`, `X-Amz-Signature`, `X-Amz-Credential`, `X-Amz-Security-Token`,
# `X-Goog-Signature`, `access_token`, `key`, ...). Its value ends at the next parameter, fragment, space
# or quote, less trailing punctuation of the text around it (`URL: reason`, `URL,`).
_TOKEN = re.compile(r"([?&;][^=&#\s]*(?:sig|signature|token|credential|secret|password|key|auth)=)"
                    r"[^&#\s'\"]*[^&#\s'\":,;.)]", re.IGNORECASE)


def hide_password(text) -> str:
    """`text` (str() of it) with the password of every `scheme://user:password@` URL shown as `***`, as
    pip and git show one, and the value of every query parameter naming a credential (`?sig=***`):
    error lines and a run's args.json end up in job logs and shared folders."""
    return _URL.sub(lambda url: _TOKEN.sub(r"\1***", _PASSWORD.sub(r"\1***@", url[0])), str(text))


def report(error: TinyinError) -> None:
    """Print `error` as the one line the user sees (stderr; a URL's password hidden) and exit with its code."""
    print(f"error: {hide_password(error)}", file=sys.stderr, flush=True)
    sys.exit(error.exit_code)


@contextlib.contextmanager
def user_errors():
    """Run a command body: a TinyinError becomes one line on stderr and its exit code, as does an
    OSError of the environment (a full disk, ...: ``error: STRERROR: FILE``, exit code 1); a Ctrl-C
    outside any handler of the command's own becomes ``interrupted`` and exit code 130 (a SIGTERM
    turned into `Terminated`: ``terminated``, 143; train.py's SIGUSR1: ``stopped by SIGUSR1``, 138)."""
    try:
        yield
    except TinyinError as e:
        report(e)
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        report(TinyinError(f"{e.strerror}: {e.filename}" if e.filename else e.strerror))
    except Terminated as e:
        print(STOPPED[e.signum], file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print(STOPPED[signal.SIGINT], file=sys.stderr, flush=True)
        sys.exit(130)


def run_cli(main, *args, **kwargs):
    """Call `main(*args, **kwargs)` under `user_errors()` (train.py's ``__main__``)."""
    with user_errors():
        return main(*args, **kwargs)
