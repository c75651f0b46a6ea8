"""The device stage: uint8 batches in, model-ready float batches out, all on the batch's device.

What runs, per batch, with no CPU worker touching a pixel (the same code runs on the CPU when
there is no GPU):
1. ``augment="crop"``: a per-sample padded crop + flip, one gather on the uint8 batch (a byte
   per pixel, the flip folded into the gather's indices).
2. scale + normalise: one fused multiply-add, uint8 -> float32.
3. the resize to the model's size (e.g. 224): `F.interpolate(bilinear)`, antialiased when it
   shrinks (as torchvision's `resize` and PIL are); or, with
   ``augment="rrc"``, the random-resized crop, its flip and that resize are one `F.grid_sample`
   of the normalised batch (one read of it, one write of the output), see `augment`; to a size
   below the stored one, antialiased too (`augment.antialiased_resized_crop`).
"""
import math

import torch
import torch.nn.functional as F

from .augment import (RRC_SCALE, antialiased_resized_crop, augment_mode, check_rrc_scale, pad_crop_flip, resized_crop,
                      rrc_boxes, rrc_theta)
from .errors import UsageError, check_flag, check_integer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_device(name, present=True, what="argument --device", error=UsageError):
    """A `--device` value as a torch.device: cpu or cuda[:N], and with `present` one this machine has.
    UsageError otherwise (torch's own errors are tracebacks at the first use). `present=False` checks
    the spelling only: a GPU run's flags parse on any machine. `what` names the value in the message;
    `error` is the class of the refusal of a value that is no device tinyin runs on ('gpu', 'mps'): make_loader's
    is a ValueError, as its other values that no argument takes are; a device this machine lacks is a
    UsageError whatever `error` is."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise error(f"{what}: {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise error(f"{what}: tinyin runs on cpu or cuda, not {device.type}")
    if present and device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{what}: {name}, but torch {torch.__version__} sees no CUDA device here")
    if present and device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"{what}: {name}, but there are {torch.cuda.device_count()} CUDA devices")
    return device


def check_stats(mean, std):
    """ValueError unless mean and std are sequences of finite numbers, std positive (their count: the caller's)."""
    for name, values in (("mean", mean), ("std", std)):
        try:
            # A str is iterable, but its characters are no statistics; a number as text ("0.5", a config file's)
            # passed float() and failed at the first batch with torch's words ('too many dimensions 'str'').
            if isinstance(values, (str, bytes)) or any(isinstance(v, (str, bytes)) for v in values):
                raise TypeError
            finite = all(math.isfinite(float(v)) for v in values)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a sequence of numbers, one per channel, not {values!r}") from None
        if not finite:  # a NaN mean made every image NaN, an infinite std every image 0: no error anywhere
            raise ValueError(f"{name} must be finite, not {list(values)}")
    if not all(float(v) > 0 for v in std):
        raise ValueError(f"std must be positive (it divides), not {list(std)}")


def check_dtype(dtype):
    """ValueError unless `dtype` is a floating-point torch dtype (the images are normalised)."""
    if not isinstance(dtype, torch.dtype):  # "float16" or np.float16: AttributeError 'is_floating_point'
        raise ValueError(f"dtype must be a torch dtype such as torch.float32 or torch.bfloat16, not {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype (images are normalised), not {dtype}")


class DeviceStage:
    """Turn uint8 images (N, H, W, C) or (N, H, W) on any device into normalised (N, C, H', W').

    mean/std: per-channel, in [0, 1] units. size: output side (None keeps the stored size).
    The images are square (H == W), as every variant of a shard set is (rgb64, gray28: the build refuses
    an image of another size), so every batch `make_loader` gives: the output is size x size, or H x H for
    size=None. A non-square batch of one's own is refused (it would come out stretched to a square,
    or, at W == size, not resized).
    augment: per sample, drawn from `generator`: False/None/"none" (off); True/"crop" (random crop
    with padding `pad`, and horizontal flip); "rrc" (random-resized crop of area fraction in
    `rrc_scale`, aspect in (3/4, 4/3), and horizontal flip).
    """

    def __init__(self, mean, std, size=None, augment=False, pad=4, rrc_scale=RRC_SCALE, dtype=torch.float32,
                 channels_last=False):
        # Checked here, as make_loader checks them: a size of 0, a std of 0 or "float16" failed at the first
        # batch with torch's own words (or gave NaN images), and mean and std of other lengths broadcast there.
        check_stats(mean, std)
        if len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel each, not {len(mean)} and {len(std)}")
        if size is not None:
            check_integer("size", size, 1)
        check_integer("pad", pad, 0)  # -1 failed at the first crop ('random_ expects 'from' to be less than 'to''), 1.5 too
        check_dtype(dtype)
        check_flag("channels_last", channels_last)  # "no" is truthy: the batches came channels_last, without a word
        self.mean, self.std = tuple(mean), tuple(std)
        self.size, self.augment, self.pad, self.rrc_scale = size, augment_mode(augment), pad, check_rrc_scale(rrc_scale)
        self.dtype, self.channels_last = dtype, channels_last
        self._affine = {}  # device -> (scale, shift) tensors, built once

    def _scale_shift(self, device, channels):
        # Checked on every batch, not only when the tensors are built: a later batch of another channel
        # count broadcast against them silently (grey through an RGB stage came out as 3 channels).
        if len(self.mean) != channels:
            raise ValueError(f"mean/std have {len(self.mean)} channels, images have {channels}")
        if device not in self._affine:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device)
            std = torch.tensor(self.std, dtype=torch.float32, device=device)
            # (x / 255 - mean) / std == x * scale + shift
            self._affine[device] = ((1 / (255 * std)).view(1, -1, 1, 1), (-mean / std).view(1, -1, 1, 1))
        return self._affine[device]

    def __call__(self, images, generator=None):
        # A numpy batch was an AttributeError ('is_floating_point'); a channels-first (N, C, H, W) batch or one
        # (H, W, C) image read as 64 or 1 channels ('mean/std have 3 channels, images have 64').
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch tensor (torch.from_numpy for a numpy array), "
                             f"not a {type(images).__name__}")
        if images.dim() not in (3, 4) or images.shape[1] != images.shape[2]:
            raise ValueError(f"images must be a batch of square images, (N, H, H, C) channels last or (N, H, H), "
                             f"not {tuple(images.shape)}")
        if images.dtype.is_floating_point:  # float images in [0, 1] were divided by 255 again: every pixel ~ -mean/std
            raise ValueError(f"images must be uint8 (0..255), not {images.dtype}")
        x = images if images.dim() == 4 else images.unsqueeze(-1)  # greyscale: (N, H, W) -> (N, H, W, 1)
        if self.augment == "crop":
            x = pad_crop_flip(x, self.pad, generator)
        x = x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: already channels_last
        scale, shift = self._scale_shift(x.device, x.shape[1])
        x = torch.addcmul(shift, x.float(), scale)  # one fused pass: uint8 -> normalised float32
        n, _, h, w = x.shape
        size = h if self.size is None else self.size
        if self.augment == "rrc":
            boxes, flips = rrc_boxes(n, h, w, self.rrc_scale, generator=generator, device=x.device)
            if size < max(h, w):  # a box may be larger than the output: the sampler would alias
                x = antialiased_resized_crop(x, boxes, flips, size)
            else:  # every box grows (none exceeds the image): one bilinear sample
                x = resized_crop(x, rrc_theta(boxes, flips, h, w), size)
        elif size != w:
            # A shrink without antialias samples 4 pixels of each output's footprint and aliases (64 -> 32:
            # up to 68 grey levels from torchvision's resize); an upscale keeps the plain, faster kernel.
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < w)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.to(dtype=self.dtype, memory_format=fmt)
