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
                ready.put((slot, idx))
            ready.put(None)
        except BaseException as e:  # surfaced in the consumer
            ready.put(e)

    thread = threading.Thread(target=produce, name="tinyin-gather", daemon=True)
    thread.start()
    held, copied = None, {}  # copied: slot -> CUDA event marking the end of its host-to-device copy
    try:
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
        stop.set()
        # A consumer that stops early (islice, an error, SIGTERM) may leave the thread blocked on a full
        # `ready`: empty it until the thread has seen `stop`, or the join would wait for ever.
        while thread.is_alive():
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
