"""pipeline.variants: the direct decode of plain JPEGs gives what `Image.open` gives, pixel for
pixel, on every kind of JPEG PIL writes and on damaged ones; everything else goes through `Image.open`."""
import io
import random

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ImageError
from pipeline.variants import _plain_mode, decode_images


def jpeg(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def picture(mode, seed, size=(64, 64)):
    """Smooth gradients plus noise: entropy data of a realistic length."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], -1) + rng.integers(0, 40, (size[1], size[0], 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).convert(mode)


def reference(data):
    """What the study's PIL pipeline reads: `Image.open(...).convert('RGB')` and its 28x28 grey, or None."""
    try:
        rgb = Image.open(io.BytesIO(data)).convert("RGB")
    except Exception:
        return None
    return np.asarray(rgb), np.asarray(rgb.resize((28, 28), Image.BILINEAR).convert("L"))


EXIF = Image.Exif()
EXIF[0x010E] = "an image description"
KINDS = {
    "baseline": (picture("RGB", 0), {}),
    "quality-95-444": (picture("RGB", 1), dict(quality=95, subsampling=0)),
    "422": (picture("RGB", 2), dict(subsampling=1)),
    "progressive": (picture("RGB", 3), dict(progressive=True)),
    "optimized": (picture("RGB", 4), dict(optimize=True)),
    "exif-icc-comment": (picture("RGB", 5), dict(exif=EXIF.tobytes(), icc_profile=b"\0" * 300, comment=b"tinyin")),
    "restart-markers": (picture("RGB", 6), dict(restart_marker_blocks=1)),
    "greyscale": (picture("L", 7), {}),
}


@pytest.mark.parametrize("kind", KINDS)
def test_the_direct_decode_equals_image_open(kind):
    img, kw = KINDS[kind]
    data = jpeg(img, **kw)
    assert _plain_mode(data) == img.mode
    rgb, gray = decode_images(data, "x.JPEG")
    expected_rgb, expected_gray = reference(data)
    assert rgb.tobytes() == expected_rgb.tobytes() and gray.tobytes() == expected_gray.tobytes()


def test_an_extended_huffman_frame_and_a_restart_interval_before_it_are_plain():
    """SOF1 (extended sequential Huffman, 8-bit: decoded as baseline) and a DRI segment before the frame
    (libjpeg writes it after, other encoders before) are a plain JPEG's: the direct decode, not Image.open."""
    data = jpeg(picture("RGB", 8))
    sof = data.index(b"\xff\xc0")
    extended = data[:sof + 1] + b"\xc1" + data[sof + 2:]
    restart = data[:2] + b"\xff\xdd\x00\x04\x00\x00" + extended[2:]  # an interval of 0: no restart markers
    for case in (extended, restart):
        assert _plain_mode(case) == "RGB"
        rgb, gray = decode_images(case, "x.JPEG")
        expected_rgb, expected_gray = reference(case)
        assert rgb.tobytes() == expected_rgb.tobytes() and gray.tobytes() == expected_gray.tobytes()


def test_damaged_jpegs_decode_or_fail_as_image_open_does():
    rng = random.Random(0)
    outcomes = set()
    for seed in range(300):
        data = bytearray(jpeg(picture(rng.choice(["RGB", "L"]), seed)))
        at = rng.randrange(2, len(data))
        damage = rng.choice(["flip", "cut", "zero"])
        if damage == "flip":
            data[at] ^= 1 << rng.randrange(8)
        elif damage == "cut":
            del data[at:]
        else:
            data[at:at + 16] = bytes(len(data[at:at + 16]))
        expected = reference(bytes(data))
        if expected is None:
            with pytest.raises(ImageError):
                decode_images(bytes(data), "x.JPEG")
        else:
            assert [a.tobytes() for a in decode_images(bytes(data), "x.JPEG")] == [a.tobytes() for a in expected]
        outcomes.add((damage, expected is None))
    # Flipped and zeroed bytes are sometimes decoded (libjpeg warns and goes on), sometimes refused;
    # PIL refuses every cut JPEG.
    assert outcomes == {("flip", False), ("flip", True), ("zero", False), ("zero", True), ("cut", True)}


def saved(img, fmt):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


SIXTEEN_BITS = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))  # mode I;16


@pytest.mark.parametrize("fmt, img", [
    ("JPEG", picture("CMYK", 8)), ("TIFF", picture("CMYK", 8)), ("PNG", picture("1", 8)), ("PNG", picture("LA", 8)),
    ("PNG", picture("P", 8)), ("PNG", picture("RGBA", 8)), ("PNG", SIXTEEN_BITS), ("GIF", picture("P", 8)),
], ids=lambda v: v if isinstance(v, str) else v.mode)
def test_any_image_pil_opens_is_what_the_studys_loader_reads(fmt, img):
    """A CMYK JPEG (full ImageNet holds a few) or a PNG saved under a .JPEG name was refused, though the
    study's `ImageFolder` loader, `Image.open(f).convert('RGB')`, reads it: each is now that, byte for byte."""
    data = saved(img, fmt)
    assert Image.open(io.BytesIO(data)).mode == img.mode
    assert _plain_mode(data) is None  # a CMYK JPEG's 4 layers are no plain JPEG's: Image.open converts them
    rgb, gray = decode_images(data, "x.JPEG")
    expected_rgb, expected_gray = reference(data)
    assert rgb.tobytes() == expected_rgb.tobytes() and gray.tobytes() == expected_gray.tobytes()


def twelve_bits(data):
    """`data` with its frame header's sample precision 12 bits, which PIL does not read: not the plain path."""
    at = data.index(b"\xff\xc0") + 4
    return data[:at] + bytes([12]) + data[at + 1:]


@pytest.mark.parametrize("data, message", [
    (jpeg(picture("RGB", 0, (32, 32))), "x.JPEG: image is 32x32, expected 64x64"),
    # 64 high, 32 wide: PIL's JPEG decoder, given the size 64x64, decoded it "whole" into a 64x64 image
    (jpeg(picture("RGB", 0, (32, 64))), "x.JPEG: image is 32x64, expected 64x64"),
    # 64 wide, 32 high: not the plain path (its height is not 64), and Image.open's size is refused as well
    (jpeg(picture("RGB", 0, (64, 32))), "x.JPEG: image is 64x32, expected 64x64"),
    (saved(picture("RGB", 0), "PNG")[:3000], "x.JPEG: corrupt or truncated PNG (image file is truncated)"),
    (b"this is not a jpeg" * 20, "x.JPEG: not an image (corrupt JPEG)"),
    (twelve_bits(jpeg(picture("RGB", 0))), "x.JPEG: not an image (corrupt JPEG)"),
], ids=["32x32", "32x64", "64x32", "cut-png", "garbage", "12-bit"])
def test_other_inputs_take_image_open_and_its_reasons(data, message):
    assert _plain_mode(data) is None
    with pytest.raises(ImageError) as caught:
        decode_images(data, "x.JPEG")
    assert str(caught.value) == message
