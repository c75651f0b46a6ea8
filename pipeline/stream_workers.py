"""How the stream path's DataLoader workers start and stop.

They are forked (`FORK`), inside `starting_workers`, and each one's worker_init_fn
(`ignore_sigterm_but_the_parents`) makes it ignore a SIGTERM that its main process did not send:
stopping (finishing the step, checkpointing, shutting the workers down) is the main process's job.
The stream path shuts them down together (`shut_down`), not each in turn.
"""
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import warnings

from torch.utils.data import _utils

from .errors import FORK_WARNING, signals_deferred


# Forked, as torch does on Linux: Python 3.12 warns that the process has threads. Found at train.py's
# forks (torch 2.11): numpy's OpenBLAS server, pyarrow's jemalloc thread and 2 Arrow pool threads (the
# index read), tqdm's monitor (the epoch bar) and torch's OpenMP (GNU libgomp) worker, all idle. The
# one real hazard is libgomp: a forked child that runs a parallel torch op after the parent used the
# pool hangs for good (measured: with 2 threads it hangs, with 1 it runs); torch's worker loop sets 1
# thread before any of our code, and a worker only reads, gathers with numpy (no BLAS) and allocates
# tensors; it never calls pyarrow or tqdm. Spawned or forkserver workers would dodge the threads but
# cost 4.4-6.4 s per loader start (train and val, every epoch) against 0.5-0.8 s forked (val split, 2
# workers, load 7), lose the shared read buffers (`stream_read.shared_read_buffers`), and a forkserver's
# is not this process's child (`_exit_on_sigterm_from`). So the warning is silenced (`starting_workers`),
# for 3.12 test runs and -W default.
# And fork is asked for, not taken from multiprocessing's default: Python 3.14 makes that forkserver
# on Linux (as does a program's own set_start_method), and the workers lost all of the above.
#: The workers' start method, where the platform has it.
FORK = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


@contextlib.contextmanager
def starting_workers():
    """Around the start of the workers: Ctrl-C and SIGUSR1 held back (`_interrupts_deferred`); SIGTERM blocked
    (`_sigterm_blocked`): the workers fork with it blocked, none dies of one before its init runs;
    Python 3.12's warning at a fork of a process with threads silenced (`FORK` says why)."""
    with _interrupts_deferred(), _sigterm_blocked(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", FORK_WARNING, DeprecationWarning)
        yield


def started(loader):
    """iter(`loader`), a DataLoader given `WORKER_RULE`, its workers started within `starting_workers`: for the
    benches' own loaders (ImageFolder, stock webdataset), whose workers a group's SIGTERM reaches as well."""
    with starting_workers():
        return iter(loader)


def ignore_sigterm_but_the_parents(worker_id):
    """worker_init_fn: a worker ignores SIGTERM unless its own main process sends it.

    A preemption signals every process of the job at once (`kill -TERM -PGID`, Slurm, a scheduler).
    torch's worker handler died of it, and torch's SIGCHLD handler then raised "DataLoader worker
    ... is killed by signal" in the main process, in the middle of a step (a crash that lost every
    step since the last checkpoint) or, if it came to be handled only as the epoch's generator was
    being finalised, as an "Exception ignored" traceback. Stopping is the main process's job
    (train.py's StopSignals): it finishes the step, checkpoints and shuts the workers down as it
    does after any epoch. A SIGTERM from the main process itself (torch's terminate() of a worker
    slow to stop, multiprocessing's at exit) still ends the worker quietly, as torch's handler does
    (not SIG_IGN: multiprocessing's exit joins the workers it terminates, and would wait forever).
    Why a thread: a Python handler is not told the sender, so SIGTERM is blocked in every thread
    of the worker (threads started later, and `pipe:` commands, inherit the mask: a command reads
    on and ends with the worker's pipe) and taken by `sigwaitinfo`, which is.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # already, from the fork (_sigterm_blocked)
    for sig, handler in _held.items():  # forked while `_interrupts_deferred` held them back: the process's own
        signal.signal(sig, handler)
    threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), name="tinyin-sigterm", daemon=True).start()


#: DataLoader keyword arguments that give its workers the stream path's start and SIGTERM rule (`started`).
WORKER_RULE = dict(worker_init_fn=ignore_sigterm_but_the_parents, multiprocessing_context=FORK)


def shut_down(chunks):
    """torch's `_shutdown_workers` of the DataLoader iterator `chunks` (the stream path's: no pin-memory thread), with
    one deadline for all its workers. torch tells them to stop, then joins each in turn with a timeout of its own
    (MP_STATUS_CHECK_INTERVAL, 5 s) and terminates those still running only after: a stop while N workers were stuck
    in a read (a hung server) waited 5 s x N. Here they are told, then waited for together, for that interval in all,
    and those still running terminated (their parent's SIGTERM ends them at once: `ignore_sigterm_but_the_parents`);
    torch's shutdown then does the rest, as before: it joins them, and terminates any that is still running (also
    after a second Ctrl-C in the wait here)."""
    running = []
    try:
        if not chunks._shutdown and _utils.python_exit_status is False:  # as torch's: not again, nor at the exit
            chunks._workers_done_event.set()
            for worker_id in range(len(chunks._workers)):
                if chunks._workers_status[worker_id]:
                    chunks._mark_worker_as_unavailable(worker_id, shutdown=True)
            deadline, running = time.monotonic() + _utils.MP_STATUS_CHECK_INTERVAL, chunks._workers
            while running := [w for w in running if w.is_alive()]:
                if not multiprocessing.connection.wait([w.sentinel for w in running],
                                                       max(0, deadline - time.monotonic())):
                    break  # the interval is over
    finally:
        for w in running:
            w.terminate()
        chunks._shutdown_workers()


@contextlib.contextmanager
def _sigterm_blocked():
    """SIGTERM blocked in this thread meanwhile; one that arrives is delivered after (a fork inherits
    the mask, so a worker is never without its SIGTERM rule, from its first instruction on)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_held = {}  # while `_interrupts_deferred` holds signals back: {signal: the handler it stands in for}


@contextlib.contextmanager
def _interrupts_deferred():
    """`errors.signals_deferred` for Ctrl-C and SIGUSR1 (which train.py's handler, as its Ctrl-C's, turns into
    an interrupt while it waits for a batch: `StopSignals.waited`), around the start of the workers: torch's
    DataLoader iterator, interrupted there, is left half made and cannot shut down the workers it had started:
    one idled for the life of the process, holding the source's shared read buffers (1.3 GB on the real train
    split), and torch printed an "Exception ignored" traceback as the iterator went. A worker forked meanwhile
    gets the real handlers back (`ignore_sigterm_but_the_parents`)."""
    with signals_deferred((signal.SIGINT, signal.SIGUSR1)) as standing_in:
        _held.update(standing_in)
        try:
            yield
        finally:
            _held.clear()


def _exit_on_sigterm_from(parent):
    """A worker's SIGTERM thread: end the worker at the first SIGTERM that `parent` sends, ignore the others."""
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)  # what torch's handler does for its parent's SIGTERM: no error for the SIGCHLD handler
