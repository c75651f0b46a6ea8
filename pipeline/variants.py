"""Decode one JPEG into the stored uint8 variants, rejecting images the study could not use.

`rgb64` is exactly `PIL.Image.open(f).convert('RGB')` and `gray28` exactly
`rgb.resize((28, 28), Image.BILINEAR).convert('L')` (torchvision's `Resize((28, 28))` then
`Grayscale()` on a PIL image, the study's LeNet-5 input): tests compare them byte for byte.
"""
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

SIZE = (64, 64)
MODES = ("RGB", "L")  # greyscale JPEGs (~2% of the release) are normal: replicated to RGB


def decode_variants(data, name):
    """Return `(rgb64, gray28)` uint8 arrays (64x64x3, 28x28) for JPEG bytes; ImageError if unusable."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "JPEG":
            raise ImageError(f"{name}: {img.format} data under a .JPEG name")
        if img.mode not in MODES:
            raise ImageError(f"{name}: {img.mode} JPEG, expected RGB or greyscale")
        if img.size != SIZE:
            raise ImageError(f"{name}: image is {img.size[0]}x{img.size[1]}, expected 64x64")
        rgb = img.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (corrupt JPEG)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: corrupt or truncated JPEG ({e})") from None
    gray = rgb.resize((28, 28), Image.BILINEAR).convert("L")
    # Read-only views of the pixels' bytes: half the cost of np.asarray, which copies them twice.
    return (np.frombuffer(rgb.tobytes(), np.uint8).reshape(64, 64, 3),
            np.frombuffer(gray.tobytes(), np.uint8).reshape(28, 28))
