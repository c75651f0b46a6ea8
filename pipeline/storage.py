"""Where a local split's images are read from: one class per storage, the same batches from each.

- `MappedStorage`: the memory-mapped shards (`reader.ShardArrays`), gathered on the CPU.
- `ResidentStorage`: the whole split copied once to `device` (GPU memory, or anonymous RAM that
  the kernel cannot evict); a batch is one `index_select` there.

One pass over the data, in the background. Opening a storage only maps the shards and checks
their sizes (a `stat` each), so the first batch is gathered at once. Then one thread (`DataPass`)
reads each shard once, in order: it hashes the shard through its mapping (sha256 against the
manifest; with `checksum=False` it only touches each page), which is also what brings the pages
into the mapping; and for the resident storage it copies that shard's rows into the device copy
while they are hot. Until the copy is complete the resident storage serves batches from the maps:
the same bytes, so the batches do not depend on when the copy finished.

Why this design: on the real train split (1.7 GB) the first batch used to wait 4-7 s for three
passes over the data (sha256 of every shard, `MAP_POPULATE`, the resident copy). The alternative,
a first batch served once its own shards are checked, does not help a shuffled epoch: its first
batch touches every shard. Checking during the epoch keeps the contract that matters -- a corrupt
shard never trains silently to the end of an epoch: the loader raises the pass's ShardError
(naming the shard) at the next batch after it is found, and waits for the pass to finish before
it hands out an epoch's last batch. Some batches of a corrupt shard may be trained on before the
error; none after it, and never a whole epoch.
"""
import copy
import inspect
import threading
import weakref

import numpy as np
import torch

from .background import start_thread


def _weak(function):
    """A callable returning `function`, weakly for a bound method (None once its object is gone)."""
    return weakref.WeakMethod(function) if inspect.ismethod(function) else (lambda: function)


class DataPass:
    """A background thread that reads every shard of `arrays` once (verify or touch), then calls
    `after(s)` per shard and `done()` at the end. `check()` raises its error if it has failed;
    `wait()` blocks until it has finished (and raises its error); `stop()` ends it after its shard.

    `after` and `done` are held weakly when they are bound methods (a storage's own): the thread
    must not keep a dropped loader's storage (a resident split, 1.2 GB) alive, and it stops at the
    next shard once that storage is gone (a notebook that makes loader after loader had a pass,
    and its memory, per loader for the seconds each took to finish)."""

    def __init__(self, arrays, checksum=True, after=None, done=None):
        self.arrays, self.checksum = arrays, checksum
        self._after, self._done = (None if f is None else _weak(f) for f in (after, done))
        self.error, self.finished, self._stop = None, threading.Event(), threading.Event()
        self.thread = start_thread(self._run, "tinyin-data-pass", self._stop)  # stopped after its shard at exit

    def stop(self):
        """End the pass after the shard in hand (its owner is gone)."""
        self._stop.set()
        self._forget_traceback()

    def _forget_traceback(self):
        """Once the owner is gone and the pass has ended, drop its error's traceback: nobody will
        raise it, and it holds `_run`'s frame and through it this pass and its maps, a cycle that
        only the cyclic GC frees (a notebook's dropped loaders kept their maps and file
        descriptors, 10 each on the real train split, until it ran). Called at both events, as
        either may come last."""
        if self._stop.is_set() and self.finished.is_set() and self.error is not None:
            self.error.__traceback__ = None

    def _run(self):
        try:
            for s in range(len(self.arrays.entries)):
                if self._stop.is_set():
                    raise RuntimeError("the data pass was stopped before its end")
                (self.arrays.verify_shard if self.checksum else self.arrays.touch_shard)(s)
                self._call(self._after, s)
            self._call(self._done)
        except BaseException as e:  # raised in the consumer by check() / wait()
            self.error = e
        finally:
            self.finished.set()
            self._forget_traceback()

    def _call(self, ref, *args):
        if ref is not None:
            function = ref()
            if function is None:
                # Its owner is gone, whether or not it stopped the pass: a Ctrl-C as a storage started its pass
                # came before `_stop_when_dropped`, and this error's traceback then held the pass and its maps
                # until the cyclic GC ran. Nobody will raise it: stopped, its traceback is let go at the end.
                self._stop.set()
                raise RuntimeError("the data pass's storage was dropped before its end")
            function(*args)

    def check(self):
        if self.error is not None:
            raise _fresh(self.error)

    def wait(self):
        self.finished.wait()
        self.check()


def _fresh(error):
    """A copy of `error` to raise in the consumer, with the pass's traceback. Raising the stored error itself
    added the consumer's frames to its traceback, the loader's among them, which hold the storage and so this
    pass, which holds the error: a loader whose pass had failed (a damaged shard) was freed, with its maps or
    its resident copy of the split, only when the cyclic GC ran."""
    try:
        fresh = copy.copy(error)
    except Exception:  # noqa: BLE001 - an exception type that cannot be rebuilt from its args: raised itself
        return error
    fresh.__cause__, fresh.__context__, fresh.__suppress_context__ = (
        error.__cause__, error.__context__, error.__suppress_context__)
    return fresh.with_traceback(error.__traceback__)


def _stop_when_dropped(storage):
    """Stop `storage`'s data pass once the storage is gone (a dropped loader's pass reads no further).
    The finalizer holds the pass weakly: held strongly, it kept the pass's error, and the error, once
    raised in the consumer, its traceback's frames, the loader's, which hold the storage: a storage
    whose pass had failed was never freed, not even by the cyclic GC (maps, fds, a resident copy)."""
    weakref.finalize(storage, _stop_pass, weakref.ref(storage.data_pass))


def _stop_pass(ref):
    data_pass = ref()
    if data_pass is not None:  # gone already: then its thread has ended (it holds the pass while it runs)
        data_pass.stop()


class MappedStorage:
    """Batches gathered from the memory-mapped shards into a buffer on the CPU (the fast path)."""

    device = torch.device("cpu")

    def __init__(self, arrays, checksum=True):
        self.arrays, self.shape = arrays, arrays.shape
        self.labels = torch.from_numpy(arrays.labels)
        self.data_pass = DataPass(arrays, checksum)
        _stop_when_dropped(self)

    def __len__(self):
        return len(self.arrays)

    def gather(self, idx, out=None):
        """uint8 images of sorted positions `idx` (into `out` if given), on the CPU."""
        return self.arrays.gather(idx, out=out)

    def batch(self, idx, out=None):
        """(images, labels) of sorted positions `idx`, the images into `out` if given."""
        return self.arrays.gather(idx, out=out), self.labels[torch.from_numpy(idx)]


class ResidentStorage:
    """The split held whole on `device`, filled shard by shard by the data pass (the resident path)."""

    def __init__(self, arrays, device, checksum=True):
        self.arrays, self.shape, self.device = arrays, arrays.shape, torch.device(device)
        with torch.inference_mode(False):  # the pass's thread writes into it: a normal tensor
            self.data = torch.empty((len(arrays), arrays.row_bytes), dtype=torch.uint8, device=self.device)
        self.labels = torch.from_numpy(arrays.labels).to(self.device)
        self.complete = False
        self.data_pass = DataPass(arrays, checksum, after=self._copy, done=self._finish)
        _stop_when_dropped(self)

    def __len__(self):
        return len(self.arrays)

    def _copy(self, s):
        rows = self.arrays.shard_rows(s)
        if rows is not None:
            lo, view = rows
            self.data[lo:lo + len(view)].copy_(view)

    def _finish(self):
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # every shard's copy has landed
        self.complete = True

    def batch(self, idx, out=None):
        """(images, labels) of sorted positions `idx` on `device`: from the device copy once it
        is complete, from the maps before (the same bytes). `out` is not used (new tensors)."""
        index = torch.from_numpy(np.asarray(idx)).to(self.device, non_blocking=True)
        if not self.complete:
            return self.arrays.gather(idx).to(self.device), self.labels.index_select(0, index)
        return self.data.index_select(0, index).view(len(idx), *self.shape), self.labels.index_select(0, index)
