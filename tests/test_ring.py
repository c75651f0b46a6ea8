"""The prefetch ring (`pipeline.ring`): batches in order, errors surfaced, and a consumer that stops
at any point ends the gather thread (it used to hang when it stopped with `depth` batches to come)."""
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
    """Run `work` in a thread; fail (rather than hang the suite) if it has not returned in time."""
    done = threading.Thread(target=work, daemon=True)
    done.start()
    done.join(seconds)
    assert not done.is_alive(), "prefetch_ring did not let go of its gather thread"


def test_batches_arrive_in_order_with_their_images():
    got = [(images[:, 0].tolist(), idx.tolist()) for images, idx in prefetch_ring(batches(), fill, (1,), 3, DEPTH, "cpu")]
    assert got == [(list(range(3 * i, 3 * i + 3)),) * 2 for i in range(BATCHES)]
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
