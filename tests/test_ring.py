"""The prefetch ring (`pipeline.ring`): batches in order, errors surfaced, and a consumer that stops
at any point ends the gather thread (it used to hang when it stopped with `depth` batches to come)."""
import gc
import sys
import threading
import time

import numpy as np
import pytest
import torch

from pipeline.ring import prefetch_ring

BATCHES, DEPTH = 6, 4


def fill(idx, out):
    out[: len(idx)] = torch.from_numpy(idx).to(torch.uint8)[:, None]


def batches(n=BATCHES):
    return [np.arange(3 * i, 3 * i + 3) for i in range(n)]


def gather_threads():
    return [t for t in threading.enumerate() if t.name == "tinyin-gather"]


def in_thread(work, seconds=20):
    """Run `work` in a thread; fail (rather than hang the suite) if it has not returned in time, and with
    its error if it raised one (a thread's exception is otherwise only a warning: the test passed)."""
    errors = []

    def run():
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - raised again in the test's own thread
            errors.append(e)

    done = threading.Thread(target=run, daemon=True)
    done.start()
    done.join(seconds)
    assert not done.is_alive(), "prefetch_ring did not let go of its gather thread"
    if errors:
        raise errors[0]


def test_batches_arrive_in_order_with_their_images():
    got = [(images[:, 0].tolist(), idx.tolist()) for images, idx in prefetch_ring(batches(), fill, (1,), 3, DEPTH, "cpu")]
    assert got == [(list(range(3 * i, 3 * i + 3)),) * 2 for i in range(BATCHES)]
    assert gather_threads() == []


def test_a_short_batch_gets_only_its_own_images():
    """The ring's buffers hold batch_size images: a short last batch is the first len(idx) of them, not
    the whole buffer (whose other rows are a previous batch's)."""
    got = [(images[:, 0].tolist(), idx.tolist()) for images, idx in
           prefetch_ring([np.arange(3), np.arange(3, 5)], fill, (1,), 3, DEPTH, "cpu")]
    assert got == [([0, 1, 2], [0, 1, 2]), ([3, 4], [3, 4])]


def test_the_batch_in_hand_is_not_refilled_until_the_next_is_asked_for():
    """On the CPU the images are a view of a ring buffer: valid until the consumer asks for the next batch.
    With depth 1 (two buffers) the thread, gone as far ahead as it may, waits for the consumer's buffer;
    handing it back as it was yielded let the thread gather batch 2 into the batch-0 images in hand."""
    asked, refilled = threading.Event(), threading.Event()

    def indices():
        yield from batches(2)
        asked.set()  # the thread asks for batch 2 once batch 1 is handed over
        yield np.arange(6, 9)

    def fill_and_tell(idx, out):
        fill(idx, out)
        if idx[0] == 6:
            refilled.set()

    ring = prefetch_ring(indices(), fill_and_tell, (1,), 3, 1, "cpu")
    images, idx = next(ring)
    assert asked.wait(20)
    refilled.wait(1)  # long enough for the thread to gather it if it had a buffer; it must not have one
    assert (images[:, 0].tolist(), idx.tolist(), refilled.is_set()) == ([0, 1, 2], [0, 1, 2], False)
    assert [i.tolist() for _, i in ring] == [[3, 4, 5], [6, 7, 8]]
    assert gather_threads() == []


@pytest.mark.parametrize("taken", range(BATCHES + 1))
def test_stopping_after_any_batch_ends_the_thread(taken):
    exhausted = threading.Event()

    def indices():  # lets the consumer stop only once the thread has gone as far ahead as it can
        yield from batches()
        exhausted.set()

    def consume():
        ring = prefetch_ring(indices(), fill, (1,), 3, DEPTH, "cpu")
        for _ in zip(range(taken), ring):
            pass
        exhausted.wait(1)  # set from 2 batches taken on: the thread has every batch, then ends the queue
        time.sleep(0.1)
        ring.close()

    in_thread(consume)
    assert gather_threads() == []


def test_an_error_in_fill_reaches_the_consumer_and_ends_the_thread():
    def failing(idx, out):
        if idx[0] == 9:
            raise OSError("disk gone")
        fill(idx, out)

    seen = []

    def consume():
        with pytest.raises(OSError, match="disk gone"):
            for images, _ in prefetch_ring(batches(), failing, (1,), 3, DEPTH, "cpu"):
                seen.append(int(images[0, 0]))

    in_thread(consume)
    assert seen == [0, 3, 6] and gather_threads() == []


def test_a_keyboard_interrupt_in_fill_reaches_the_consumer():
    """Not only an Exception: a Ctrl-C or SystemExit raised on the gather thread, kept there, left the
    consumer waiting for a batch that would never come."""
    def interrupted(idx, out):
        if idx[0] == 3:
            raise KeyboardInterrupt
        fill(idx, out)

    def consume():
        with pytest.raises(KeyboardInterrupt):
            list(prefetch_ring(batches(), interrupted, (1,), 3, DEPTH, "cpu"))

    in_thread(consume)
    assert gather_threads() == []


def test_a_ring_freed_by_the_gc_on_its_own_gather_thread_stops_it_without_joining_itself():
    """A consumer dropped in a reference cycle is closed by whichever thread runs the cyclic GC; when
    that is the gather thread, its `finally` must not join the thread it runs on ("cannot join
    current thread", printed as an unraisable exception and left to the teardown)."""
    dropped, unraisable, collected = threading.Event(), [], threading.Event()

    def collecting(idx, out):
        if idx[0] == 6 and dropped.wait(5):  # the third batch: gathered once the consumer is gone
            gc.collect()  # frees the consumer here, on the gather thread
            collected.set()
        fill(idx, out)

    old_hook, gc_was_on = sys.unraisablehook, gc.isenabled()
    sys.unraisablehook, _ = unraisable.append, gc.disable()
    try:
        ring = prefetch_ring(batches(), collecting, (1,), 3, 2, "cpu")  # 3 buffers: batch 2 is gathered now
        next(ring)
        cycle = [ring]
        cycle.append(cycle)
        del ring, cycle
        dropped.set()
        assert collected.wait(5)
        for thread in gather_threads():
            thread.join(5)
    finally:
        sys.unraisablehook = old_hook
        if gc_was_on:
            gc.enable()
    assert [str(u.exc_value) for u in unraisable] == [] and gather_threads() == []


def test_an_interrupt_as_the_thread_starts_stops_it(monkeypatch):
    """A Ctrl-C that landed while the gather thread started (in `Thread.start`, or as it returned)
    left that thread polling for good, holding the storage's maps and the ring: 1 in 40-60 of
    loaders interrupted at random in their first 50 ms (fast path, prefetch=2)."""
    import pipeline.ring

    started, start_thread = [], pipeline.ring.start_thread

    def start_then_interrupt(target, name, stop):
        started.append((stop, start_thread(target, name, stop)))
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.ring, "start_thread", start_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        next(prefetch_ring(batches(), fill, (1,), 3, DEPTH, "cpu"))
    ((stop, thread),) = started
    try:
        assert stop.is_set()
    finally:
        stop.set()
        thread.join()
