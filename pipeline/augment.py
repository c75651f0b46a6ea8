"""Per-sample augmentations of a batch, on the batch's device, drawn from a `torch.Generator`.

- ``crop``: random crop from the zero-padded image + horizontal flip, one gather on the uint8
  batch (`pad_crop_flip`).
- ``rrc``: random-resized crop + horizontal flip, one `F.grid_sample` on the float batch
  (`rrc_boxes` draws the boxes and flips, `rrc_theta` turns them into affine matrices,
  `resized_crop` samples them), with the flip and the resize to the output size in the same
  sample. To an output smaller than the image (a box may then shrink), `antialiased_resized_crop`
  instead: torchvision's antialiased crop-then-resize, as two per-sample weight matrices.
"""
import math

import torch
import torch.nn.functional as F

AUGMENTS = ("none", "crop", "rrc")
RRC_SCALE = (0.35, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


def augment_mode(augment):
    """The augmentation `augment` names: False/None/"none" -> "none", True/"crop" -> "crop", "rrc"."""
    if augment is None or augment is False or augment == "none":
        return "none"
    if augment is True or augment == "crop":
        return "crop"
    if augment == "rrc":
        return "rrc"
    raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}; got {augment!r}")


def check_rrc_scale(scale):
    """`scale` as a tuple (low, high); ValueError unless it is two numbers with 0 < low <= high <= 1."""
    try:
        if any(isinstance(v, (str, bytes)) for v in scale):  # ("0.2", "1"): float() took them, the first batch not
            raise TypeError
        low, high = (float(v) for v in scale)
    except (TypeError, ValueError):  # None, one number, three: Python's unpacking error said nothing of rrc_scale
        low = high = math.nan
    if not 0 < low <= high <= 1:
        raise ValueError(f"rrc_scale must be (low, high) with 0 < low <= high <= 1; got {scale!r}")
    return tuple(scale)


def pad_crop_flip(x, pad, generator=None):
    """Per-sample random crop from the zero-padded image, and random horizontal flip (uint8 NHWC)."""
    n, h, w, _ = x.shape
    dev = x.device
    padded = F.pad(x, (0, 0, pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=dev, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=dev, generator=generator)
    flip = torch.rand((n, 1), device=dev, generator=generator) < 0.5
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(flip, w - 1 - cols, cols) + dx  # the flip folded into the gather: free
    rows = torch.arange(h, device=dev).expand(n, h) + dy
    batch = torch.arange(n, device=dev).view(n, 1, 1)
    return padded[batch, rows.unsqueeze(2), cols.unsqueeze(1)]


def rrc_boxes(n, height, width, scale=RRC_SCALE, ratio=RRC_RATIO, generator=None, device=None):
    """Draw `n` random-resized-crop boxes and flips: (boxes (n, 4) float [x0, y0, w, h] in pixels, flips (n,) bool).

    Like torchvision's RandomResizedCrop: area fraction uniform in `scale`, aspect w/h log-uniform
    in `ratio`, flip with probability 1/2; but boxes are continuous (sub-pixel) and never rejected:
    a box wider (taller) than the image is clamped to the image's width (height) and made taller
    (wider) so that its area is kept. Its aspect then lies between the image's and the drawn one,
    so it stays in `ratio` when the image's own aspect does (square images: always).
    """
    # One draw for all five parameters; float32 whatever torch's default dtype (float64 made boxes and weights that
    # float32 images cannot be sampled or multiplied with: 'expected scalar type Float but found Double').
    u = torch.rand((n, 5), device=device, generator=generator, dtype=torch.float32)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1])
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    # w > width and h > height cannot both hold (area <= height * width): at most one side is clamped.
    wide, tall = w > width, h > height
    w, h = (torch.where(wide, width, torch.where(tall, area / height, w)),
            torch.where(tall, height, torch.where(wide, area / width, h)))
    x0, y0 = (width - w) * u[:, 2], (height - h) * u[:, 3]
    return torch.stack([x0, y0, w, h], dim=1), u[:, 4] < 0.5


def rrc_theta(boxes, flips, height, width):
    """(n, 2, 3) matrices for `F.affine_grid(align_corners=False)` that map the output onto each box.

    boxes: (n, 4) [x0, y0, w, h] in pixels, the image spanning [0, width] x [0, height]; flips: (n,)
    bool, a mirrored box (negative x scale).
    """
    x0, y0, w, h = boxes.unbind(1)
    theta = boxes.new_zeros((len(boxes), 2, 3))
    theta[:, 0, 0] = torch.where(flips, -w, w) / width
    theta[:, 0, 2] = (2 * x0 + w) / width - 1  # the box's centre in [-1, 1] coordinates
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    return theta


def resized_crop(x, theta, size):
    """Sample float NCHW `x` through `theta` into (N, C, size, size): bilinear, the edges clamped
    (padding_mode="border"), as `F.interpolate(bilinear, align_corners=False)` clamps them."""
    if not len(x):  # a batch of no images: affine_grid refused it ('Expected non-zero, positive output size')
        return x.new_empty((0, x.shape[1], size, size))
    grid = F.affine_grid(theta, (x.shape[0], x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _axis_weights(start, length, side, size):
    """(n, size, side) weights of torchvision's antialiased bilinear resize (a triangle filter
    widened by the shrink factor, normalised over the pixels it covers) of each box [start, start +
    length) of an axis of `side` pixels to `size` outputs; only pixels overlapping the box count, as
    if cropped first. Where a box grows, this is plain bilinear with its edges clamped."""
    scale = (length / size).unsqueeze(1)  # (n, 1): box pixels per output pixel
    centre = start.unsqueeze(1) + (torch.arange(size, device=start.device, dtype=start.dtype) + 0.5) * scale  # (n, size)
    pixel = torch.arange(side, device=start.device, dtype=start.dtype)  # left edges
    weights = (1 - (pixel + 0.5 - centre.unsqueeze(2)).abs() / scale.clamp(min=1).unsqueeze(2)).clamp(min=0)
    inside = (pixel + 1 > start.view(-1, 1, 1)) & (pixel < (start + length).view(-1, 1, 1))
    weights = weights * inside
    return weights / weights.sum(2, keepdim=True)


def antialiased_resized_crop(x, boxes, flips, size):
    """Each box of float NCHW `x` resized to (size, size), antialiased where it shrinks, mirrored
    where `flips`: for whole-pixel boxes, torchvision's `resized_crop(..., antialias=True)`.

    Why not `resized_crop` here: `F.grid_sample` reads the 4 pixels nearest each output's centre,
    so a box larger than the output aliases (a whole 64-px image to 28: up to 136 grey levels from
    torchvision's resize, which the validation batches, resized by `F.interpolate`, do get). Two
    batched products with the per-sample weights of each axis (`_axis_weights`) filter it instead.
    """
    x0, y0, w, h = boxes.unbind(1)
    rows = _axis_weights(y0, h, x.shape[2], size)
    cols = _axis_weights(x0, w, x.shape[3], size)
    cols = torch.where(flips.view(-1, 1, 1), cols.flip(1), cols)  # a flip reverses the output columns
    return rows.unsqueeze(1) @ x @ cols.transpose(1, 2).unsqueeze(1)
