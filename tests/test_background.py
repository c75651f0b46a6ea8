"""Threads that are busy when the process exits (`pipeline.background`): each finishes the piece of
work in hand, and no other, before the interpreter's teardown. Left to the teardown, a thread inside
torch aborts the process ("terminate called without an active exception": exit -6, not the run's
own code)."""
import subprocess
import sys
from pathlib import Path

import pytest


def exit_mid_work(tmp_path, code):
    """Run `code`, which writes what its thread does to the file `LOG`, then "exit" and a one-line
    error; return the lines logged before and after the exit."""
    log = tmp_path / "log"
    result = subprocess.run([sys.executable, "-c", f"LOG = {str(log)!r}\n" + code], capture_output=True,
                            text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert (result.returncode, result.stderr) == (1, "error: a mistake\n")
    before, after = log.read_text().split("exit\n")
    return before.splitlines(), after.splitlines()


def test_a_data_pass_running_at_exit_finishes_its_shard_and_stops(tmp_path):
    before, after = exit_mid_work(tmp_path, """
import sys, threading, time
from pipeline.storage import DataPass

busy = threading.Event()

class Arrays:  # 20 shards of 0.1 s each; the third takes 1 s and the process exits during it
    entries = [None] * 20
    def touch_shard(self, s):
        if s == 2:
            busy.set()
        time.sleep(1.0 if s == 2 else 0.1)

DataPass(Arrays(), checksum=False, after=lambda s: open(LOG, "a").write(f"{s}\\n"))
busy.wait()
open(LOG, "a").write("exit\\n")
sys.exit("error: a mistake")
""")
    assert (before, after) == (["0", "1"], ["2"])  # the shard in hand, no other


def test_a_ring_running_at_exit_finishes_its_batch_and_stops(tmp_path):
    """1 of 30 runs stopped mid-epoch on the real shards (fast path, prefetch 4) aborted so before."""
    before, after = exit_mid_work(tmp_path, """
import sys, threading, time
from pipeline.ring import prefetch_ring

busy = threading.Event()

def fill(idx, out):  # 0.1 s a batch; the third takes 1 s and the process exits during it
    open(LOG, "a").write(f"start {idx[0]}\\n")
    if idx[0] == 2:
        busy.set()
    time.sleep(1.0 if idx[0] == 2 else 0.1)
    open(LOG, "a").write(f"end {idx[0]}\\n")

ring = prefetch_ring(([i] for i in range(20)), fill, (1,), 1, 4, "cpu")
next(ring)
busy.wait()
open(LOG, "a").write("exit\\n")
sys.exit("error: a mistake")
""")
    assert before == ["start 0", "end 0", "start 1", "end 1", "start 2"]
    assert after == ["end 2"]  # the batch in hand, no other


def test_a_dropped_storage_stops_its_data_pass_and_is_freed_at_once(shards):
    """A dropped loader's pass read on to its end (~6-8 s on the real train split) and held its
    storage: making four resident loaders in a row took 5.4 GB before the first passes ended."""
    import gc
    import threading
    import weakref

    from pipeline.reader import ShardArrays
    from pipeline.storage import ResidentStorage

    arrays, gate, seen = ShardArrays(shards, "train", checksum=False), threading.Event(), []

    def verify(s):  # shard 0 waits until the storage has been dropped
        seen.append(s)
        assert s != 0 or gate.wait(10)

    arrays.verify_shard = verify
    storage = ResidentStorage(arrays, "cpu")
    data_pass, alive = storage.data_pass, weakref.ref(storage)
    del storage
    gc.collect()
    assert alive() is None  # the pass's thread does not keep it (nor its copy of the split)
    gate.set()
    data_pass.thread.join(10)
    assert seen == [0] and str(data_pass.error) == "the data pass's storage was dropped before its end"


def test_a_dropped_storage_frees_its_maps_without_the_cyclic_gc(shards):
    """The stopped pass's error held a traceback back to the pass and so its maps: a cycle that
    kept every dropped loader's maps and file descriptors (10 each on the real train split)
    until the cyclic GC ran, which a notebook or a sweep may not do for a long while."""
    import gc
    import threading
    import weakref

    from pipeline.reader import ShardArrays
    from pipeline.storage import MappedStorage

    arrays, gate = ShardArrays(shards, "train", checksum=False), threading.Event()
    arrays.touch_shard = lambda s: gate.wait(10)  # shard 0 waits until the storage has been dropped
    storage = MappedStorage(arrays, checksum=False)
    thread, maps, data_pass = storage.data_pass.thread, weakref.ref(arrays), weakref.ref(storage.data_pass)
    gc.disable()
    try:
        del arrays, storage
        gate.set()
        thread.join(10)
        assert (data_pass(), maps()) == (None, None)
    finally:
        gc.enable()


def test_a_storage_interrupted_as_its_pass_starts_frees_its_maps_without_the_cyclic_gc(shards, monkeypatch):
    """A Ctrl-C as make_loader started a resident storage's pass (a notebook's), before the storage had it stopped
    once dropped: the pass found the storage gone, and its error's traceback held the pass and its maps (and
    file descriptors) until the cyclic GC ran."""
    import gc
    import threading
    import weakref

    import pipeline.storage
    from pipeline.reader import ShardArrays

    arrays, gate, started = ShardArrays(shards, "train", checksum=False), threading.Event(), []
    arrays.verify_shard = lambda s: gate.wait(10)  # shard 0 waits until the storage has been dropped

    def interrupted(storage):  # the Ctrl-C, right after the pass has started
        started.append((storage.data_pass.thread, weakref.ref(storage.data_pass)))
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.storage, "_stop_when_dropped", interrupted)
    maps = weakref.ref(arrays)
    gc.disable()
    try:
        try:
            pipeline.storage.ResidentStorage(arrays, "cpu")
        except KeyboardInterrupt:
            pass
        del arrays
        (thread, data_pass), = started
        started.clear()
        gate.set()
        thread.join(10)
        del thread
        assert (data_pass(), maps()) == (None, None)
    finally:
        gc.enable()


def test_a_loader_whose_data_pass_failed_is_freed_without_the_cyclic_gc(shards, tmp_path):
    """The pass raised its stored error in the consumer, whose frames (the loader's) were then added to the
    error's traceback: loader -> storage -> pass -> error -> loader, so a loader that had met a damaged shard
    kept its maps (or its resident copy of the split) until the cyclic GC ran."""
    import gc
    import shutil
    import weakref

    from pipeline import make_loader
    from pipeline.errors import ShardError

    damaged = tmp_path / "shards"
    shutil.copytree(shards, damaged)
    shard = damaged / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[3000] ^= 1  # a pixel byte, the size kept: only the pass's checksum finds it
    shard.write_bytes(data)
    for path in ("fast", "resident"):
        gc.disable()
        try:
            loader = make_loader(damaged, "train", batch_size=16, path=path)
            storage = weakref.ref(loader.source.storage)
            with pytest.raises(ShardError, match="train-000001.tar: checksum differs from the manifest"):
                for epoch in range(2):
                    loader.set_epoch(epoch)
                    for _ in loader:
                        pass
            del loader
            assert storage() is None, path
        finally:
            gc.enable()


def test_a_storage_dropped_after_its_pass_failed_frees_its_maps_without_the_cyclic_gc(shards):
    """The pass had ended on a damaged shard before its storage was dropped: stopping it then must let go
    of its error's traceback, which holds the pass's frame and through it the pass and its maps."""
    import gc
    import weakref

    from pipeline.errors import ShardError
    from pipeline.reader import ShardArrays
    from pipeline.storage import MappedStorage

    def verify(s):
        raise ShardError("train-000000.tar: checksum differs from the manifest")

    arrays = ShardArrays(shards, "train", checksum=False)
    arrays.verify_shard = verify
    storage = MappedStorage(arrays)
    assert storage.data_pass.finished.wait(10)
    maps, data_pass = weakref.ref(arrays), weakref.ref(storage.data_pass)
    gc.disable()
    try:
        del arrays, storage
        assert (data_pass(), maps()) == (None, None)
    finally:
        gc.enable()


def test_a_pass_error_is_raised_in_the_consumer_with_its_cause_and_traceback():
    """The consumer raises a copy of the pass's error (`_fresh`): a copy of an exception drops its cause,
    its context and its traceback, which then showed neither the failed read under it ("The above exception
    was the direct cause") nor where in the pass it was raised."""
    import traceback

    from pipeline.errors import ShardError
    from pipeline.storage import DataPass

    class Arrays:
        entries = [0]

        def verify_shard(self, s):
            try:
                raise OSError(5, "Input/output error")
            except OSError as e:
                raise ShardError("train-000000.tar: unreadable") from e

    data_pass = DataPass(Arrays())
    with pytest.raises(ShardError) as caught:
        data_pass.wait()
    error = caught.value
    assert error is not data_pass.error and str(error) == "train-000000.tar: unreadable"
    assert (error.__cause__, error.__context__, error.__suppress_context__) == (
        data_pass.error.__cause__, data_pass.error.__cause__, True)
    assert str(error.__cause__) == "[Errno 5] Input/output error"
    assert [frame.name for frame in traceback.extract_tb(error.__traceback__)][-3:] == ["check", "_run", "verify_shard"]


def test_only_threads_still_running_are_kept_for_the_exit():
    """Each epoch starts threads (a ring, a data pass): the ones that ended are let go as the next starts,
    not kept (with their stop events) for the life of the process."""
    import threading

    from pipeline import background

    stops = [threading.Event() for _ in range(3)]
    for stop in stops[:2]:
        background.start_thread(lambda: None, "tinyin-test", stop).join()
    hold = threading.Event()
    thread = background.start_thread(hold.wait, "tinyin-test", stops[2])
    try:
        assert [s for s, t in background._threads if t.name == "tinyin-test"] == [stops[2]]
    finally:
        hold.set()
        thread.join()
