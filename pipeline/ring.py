"""The prefetch ring: a background thread gathers batches into a few reused (pinned) buffers.

`prefetch_ring(batches, fill, ...)` is a generator stage: for each index array of `batches` a
thread calls `fill(idx, out)` into a free buffer of the ring, and the consumer gets `(images,
idx)` in order, the images moved to `device` (asynchronously from pinned memory on CUDA). A
buffer is refilled only once the consumer has asked for the next batch and, on CUDA, once the
event recorded after its host-to-device copy has passed, so a DMA never reads a buffer that is
being overwritten. Torch releases the GIL while copying, so the gather overlaps the caller's work.
"""
import queue
import threading

import torch

from .background import start_thread


def prefetch_ring(batches, fill, shape, batch_size, depth, device):
    """Yield `(images, idx)` for each `idx` of `batches`, `depth` batches gathered ahead by a thread.

    fill(idx, out): writes the images of `idx` into the uint8 buffer `out` (batch_size, *shape).
    On the CPU the images are a view of a ring buffer, valid until the next batch is requested.
    An error in `fill` is raised in the consumer, never a silent hang.
    """
    device = torch.device(device)
    pin = device.type == "cuda"
    with torch.inference_mode(False):  # the gather thread writes into these: they must be normal tensors
        ring = [torch.empty((batch_size, *shape), dtype=torch.uint8, pin_memory=pin) for _ in range(depth + 1)]
    free, ready, stop = queue.Queue(), queue.Queue(depth), threading.Event()
    for slot in range(len(ring)):
        free.put(slot)

    def hand_over(item):
        """Put `item` in `ready`; False if told to stop first (the consumer is gone, or the process exits)."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for idx in batches:
                slot = None
                while slot is None and not stop.is_set():
                    try:
                        slot = free.get(timeout=0.1)
                    except queue.Empty:
                        pass
                if stop.is_set():
                    return
                fill(idx, ring[slot])
                if not hand_over((slot, idx)):
                    return
            hand_over(None)
        except BaseException as e:  # surfaced in the consumer
            hand_over(e)

    thread, held, copied = None, None, {}  # copied: slot -> CUDA event marking the end of its host-to-device copy
    try:
        # Started inside the `try`: a Ctrl-C as it starts (in `Thread.start`, or as that returns)
        # must still set `stop`, or the thread polls on, holding the maps and the ring, for good.
        thread = start_thread(produce, "tinyin-gather", stop)  # stopped after its batch at exit
        while True:
            item = ready.get()
            if held is not None:
                if held in copied:
                    copied.pop(held).synchronize()  # the DMA must finish before the buffer is refilled
                free.put(held)
                held = None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            slot, idx = item
            images = ring[slot][: len(idx)]
            if device.type != "cpu":
                images = images.to(device, non_blocking=True)
                if pin:
                    copied[slot] = torch.cuda.Event()
                    copied[slot].record()
            held = slot
            yield images, idx
    finally:
        # A consumer that stops early (islice, an error, SIGTERM) leaves the thread waiting on a full
        # `ready` or an empty `free`: it sees `stop` there within 0.1 s. A consumer dropped in a
        # reference cycle is closed by whichever thread runs the GC: on the gather thread itself,
        # `stop` is enough (it returns after the batch in hand), and a join would raise.
        stop.set()
        if thread not in (None, threading.current_thread()):
            thread.join()
