"""The device stage: uint8 batches in, model-ready float batches out, all on the batch's device.

Augmentation (per-sample random crop with zero padding, and horizontal flip) is one gather on
the uint8 batch, so it costs a byte per pixel; then scale+normalise is one fused multiply-add,
and the upscale to the model's size (e.g. 224) is `F.interpolate(bilinear)` on the GPU, never
on the CPU workers. The same code runs on the CPU when there is no GPU.
"""
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DeviceStage:
    """Turn uint8 images (N, H, W, C) or (N, H, W) on any device into normalised (N, C, H', W').

    mean/std: per-channel, in [0, 1] units. size: output side (None keeps the stored size).
    augment: random crop (padding `pad`) + horizontal flip, per sample, drawn from `generator`.
    """

    def __init__(self, mean, std, size=None, augment=False, pad=4, dtype=torch.float32, channels_last=False):
        self.mean, self.std = tuple(mean), tuple(std)
        self.size, self.augment, self.pad = size, augment, pad
        self.dtype, self.channels_last = dtype, channels_last
        self._affine = {}  # device -> (scale, shift) tensors, built once

    def _scale_shift(self, device, channels):
        if device not in self._affine:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device)
            std = torch.tensor(self.std, dtype=torch.float32, device=device)
            if len(mean) != channels:
                raise ValueError(f"mean/std have {len(mean)} channels, images have {channels}")
            # (x / 255 - mean) / std == x * scale + shift
            self._affine[device] = ((1 / (255 * std)).view(1, -1, 1, 1), (-mean / std).view(1, -1, 1, 1))
        return self._affine[device]

    def crop_flip(self, x, generator=None):
        """Per-sample random crop from the zero-padded image, and random horizontal flip (uint8 NHWC)."""
        n, h, w, _ = x.shape
        p, dev = self.pad, x.device
        padded = F.pad(x, (0, 0, p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n, 1), device=dev, generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n, 1), device=dev, generator=generator)
        flip = torch.rand((n, 1), device=dev, generator=generator) < 0.5
        cols = torch.arange(w, device=dev).expand(n, w)
        cols = torch.where(flip, w - 1 - cols, cols) + dx  # the flip folded into the gather: free
        rows = torch.arange(h, device=dev).expand(n, h) + dy
        batch = torch.arange(n, device=dev).view(n, 1, 1)
        return padded[batch, rows.unsqueeze(2), cols.unsqueeze(1)]

    def __call__(self, images, generator=None):
        x = images if images.dim() == 4 else images.unsqueeze(-1)  # greyscale: (N, H, W) -> (N, H, W, 1)
        if self.augment:
            x = self.crop_flip(x, generator)
        x = x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: already channels_last
        scale, shift = self._scale_shift(x.device, x.shape[1])
        x = torch.addcmul(shift, x.float(), scale)  # one fused pass: uint8 -> normalised float32
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.to(dtype=self.dtype, memory_format=fmt)
