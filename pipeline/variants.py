"""Decode one JPEG into the stored uint8 variants, rejecting images the study could not use.

`rgb64` is exactly `PIL.Image.open(f).convert('RGB')` and `gray28` exactly
`rgb.resize((28, 28), Image.BILINEAR).convert('L')` (torchvision's `Resize((28, 28))` then
`Grayscale()` on a PIL image, the study's LeNet-5 input): tests compare them byte for byte.
So an image is taken in whatever PIL opens it as, as the study's `ImageFolder` loader takes it: a
CMYK JPEG (full ImageNet holds a few), a PNG or GIF saved under a .JPEG name, any mode `convert`
turns into RGB. Only its size must be 64x64.
"""
import io

from PIL import Image, UnidentifiedImageError

from .errors import ImageError

SIZE = (64, 64)
PLAIN_FRAMES = (0xC0, 0xC1, 0xC2)  # SOF markers of baseline, extended and progressive Huffman JPEGs
HEADER_SEGMENTS = (0xC4, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0))  # DHT, DQT, DRI, COM, APPn


def _plain_mode(data):
    """'RGB' or 'L' for a plain 8-bit 64x64 JPEG whose header holds only the usual segments, else None.

    Such a JPEG is decoded by PIL's own JPEG decoder directly (`Image.frombytes`), with the arguments
    `Image.open` would give it: the same pixels, without the ~70 µs of Python header parsing in
    `Image.open`, a third of the decode. Every other input takes `Image.open`, which names its faults.
    """
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos = 2
    while pos + 10 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in PLAIN_FRAMES:
            bits, height, width, layers = data[pos + 4], data[pos + 5:pos + 7], data[pos + 7:pos + 9], data[pos + 9]
            if bits == 8 and height == width == b"\x00\x40" and layers in (1, 3):
                return "L" if layers == 1 else "RGB"
            return None
        if marker not in HEADER_SEGMENTS:
            return None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def _open(data, name):
    """`Image.open(...).convert('RGB')`, with each reason to refuse the image as one ImageError."""
    kind = "JPEG"
    try:
        img = Image.open(io.BytesIO(data))
        kind = img.format
        if img.size != SIZE:
            raise ImageError(f"{name}: image is {img.size[0]}x{img.size[1]}, expected 64x64")
        return img.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (corrupt JPEG)") from None
    except ImageError:
        raise
    except Exception as e:  # OSError, SyntaxError, ValueError; the decoders of other formats raise more kinds
        raise ImageError(f"{name}: corrupt or truncated {kind} ({e})") from None


def decode_images(data, name):
    """Return `(rgb64, gray28)` PIL images (modes RGB and L) for JPEG bytes; ImageError if unusable."""
    rgb, mode = None, _plain_mode(data)
    if mode is not None:
        try:
            rgb = Image.frombytes(mode, SIZE, data, "jpeg", mode, "")
            if mode != "RGB":  # `convert` into the image's own mode is a copy
                rgb = rgb.convert("RGB")
        except (OSError, ValueError):
            pass  # damaged data: Image.open below says how
    if rgb is None:
        rgb = _open(data, name)
    return rgb, rgb.resize((28, 28), Image.BILINEAR).convert("L")

