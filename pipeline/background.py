"""Background threads that are stopped and joined before the interpreter's teardown.

The loader's threads (a data pass, the prefetch ring's gather) spend their time inside torch. A
daemon thread still running when the interpreter tears down is stopped the moment it next takes
the GIL, and from inside torch's C++ that aborts the whole process: "terminate called without an
active exception", exit -6 instead of the run's own exit code. That happens to a run that ends
early (a one-line error, a stopped epoch) while such a thread is busy. `start_thread` registers
each thread with a stop event; at exit (atexit runs before the teardown) every one still running is
told to stop and joined.
"""
import atexit
import threading

_threads = []  # (stop event, thread) of each background thread that may still run


def start_thread(target, name, stop):
    """Start `target` on a daemon thread named `name`; at exit `stop` (a threading.Event that
    `target` checks between pieces of work, never blocking for long) is set and the thread joined.
    The thread is held, not the object it works for: the thread may be the one that frees it."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    _threads[:] = [(s, t) for s, t in _threads if t.is_alive()]
    _threads.append((stop, thread))
    thread.start()
    return thread


@atexit.register
def _stop_threads():
    for stop, _ in _threads:
        stop.set()
    for _, thread in _threads:
        thread.join()
