"""Batch mixing for training: mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019), on the device.

`mix_batch` pairs each image of a float NCHW batch with another of the same batch (a random
permutation) and blends them: mixup takes the weighted sum of the two images, CutMix pastes a box
of the partner into the image. The loss is then `lam * CE(out, target_a) + (1 - lam) * CE(out, target_b)`.

The few random numbers a batch needs (the mixing weight, the permutation, the box) come from a
numpy Generator on the host, seeded per (seed, epoch, rank, step) by `mix_generator`, for three
reasons: numpy draws Beta(alpha, alpha) exactly (torch's Beta sampler takes no generator, and
its `_standard_gamma` draws from the global stream); the weight and the box are needed on the
host anyway (a Python float for the loss, ints for the box's slices), so nothing is read back from
the GPU; and a resumed run draws what the uninterrupted one drew at every step.
"""

import numpy as np
import torch

MODES = ("mixup", "cutmix")
MIX_STREAM = 1  # a fifth SeedSequence entry: mixing never shares a stream with the augmentation's step_seed


def mix_generator(seed, epoch, rank, step):
    """The numpy Generator of one training step's mixing draws, from (seed, epoch, rank, step) only."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, rank, step, MIX_STREAM]))


def cutmix_box(height, width, lam, generator):
    """The box (y0, y1, x0, x1) CutMix pastes: area about (1 - lam) of the image, centre uniform,
    clipped at the border (so the area actually pasted may be smaller: `mix_batch` corrects lam)."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(generator.integers(height)), int(generator.integers(width))
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    return int(y0), int(y1), int(x0), int(x1)


def mix_batch(images, target, mode, alpha, generator, prob=1.0):
    """Mix a float NCHW batch with a permutation of itself: (mixed_images, target_a, target_b, lam).

    mode: "mixup" (lam * x + (1 - lam) * x[perm]) or "cutmix" (a box of x[perm] pasted into x).
    alpha: lam ~ Beta(alpha, alpha); for cutmix lam is then corrected to the share of each image
    left unpasted (1 - box area / image area), so the loss weights match the pixels.
    generator: a numpy Generator (see `mix_generator`); prob: the chance this batch is mixed at
    all (otherwise it comes back as it is, with lam 1.0). lam is a Python float, one per batch.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if prob < 1.0 and generator.random() >= prob:
        return images, target, target, 1.0
    lam = float(generator.beta(alpha, alpha))
    perm = torch.from_numpy(generator.permutation(images.shape[0]))
    if images.device.type == "cuda":  # pinned, so the copy is asynchronous and never waits for the GPU
        perm = perm.pin_memory()
    perm = perm.to(images.device, non_blocking=True)
    partner = images[perm]
    if mode == "mixup":
        mixed = images * lam + partner * (1.0 - lam)
    else:
        h, w = images.shape[-2:]
        y0, y1, x0, x1 = cutmix_box(h, w, lam, generator)
        mixed = images.clone()
        mixed[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return mixed, target, target[perm], lam
