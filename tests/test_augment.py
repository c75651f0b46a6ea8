"""On-device augmentation: the padded crop + flip gather, and the random-resized crop + flip sample."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import get_model_weights
from torchvision.transforms.v2 import functional as TF2

from pipeline import device
from pipeline.augment import pad_crop_flip, resized_crop, rrc_boxes, rrc_theta
from pipeline.device import DeviceStage
from pipeline.loader import make_loader

MEAN, STD = (0.48, 0.45, 0.40), (0.23, 0.22, 0.23)
# float32 grid coordinates in [-1, 1] place a sample up to ~5e-6 px off its exact point; with a
# grey level at ~0.017 here and neighbours up to 255 levels apart, that moves a value up to ~4e-5.
TOL = 5e-5


def images(n=6, side=64, channels=3, seed=0):
    shape = (n, side, side, channels) if channels else (n, side, side)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def identity(n, side):
    return torch.tensor([[0.0, 0.0, side, side]]).repeat(n, 1), torch.zeros(n, dtype=torch.bool)


def test_pad_crop_flip_is_a_per_sample_padded_crop_and_flip():
    x = images(64, 12)
    out = pad_crop_flip(x, 2, torch.Generator().manual_seed(0))
    padded = F.pad(x, (0, 0, 2, 2, 2, 2))
    drawn = []
    for i in range(64):
        options = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                   if torch.equal(out[i], (lambda c: c.flip(1) if f else c)(padded[i, dy:dy + 12, dx:dx + 12]))]
        assert options, f"sample {i} is not a crop of its padded input"
        drawn.append(options[0])
    # Every shift, both ends included (a draw of 0..2*pad-1 never reached the right and bottom padding).
    assert {d[0] for d in drawn} == {d[1] for d in drawn} == set(range(5))
    assert 0 < sum(d[2] for d in drawn) < 64
    # They are the generator's draws: the rows' shifts, the columns', then a flip where a uniform is below 1/2.
    g = torch.Generator().manual_seed(0)
    dy, dx = (torch.randint(0, 5, (64,), generator=g).tolist() for _ in range(2))
    flips = (torch.rand(64, generator=g) < 0.5).tolist()
    assert drawn == list(zip(dy, dx, flips))


@pytest.mark.parametrize("size", [64, 224])
def test_the_identity_box_is_the_plain_normalised_and_resized_batch(size):
    x = images()
    plain = DeviceStage(MEAN, STD)(x)
    got = resized_crop(plain, rrc_theta(*identity(6, 64), 64, 64), size)
    want = DeviceStage(MEAN, STD, size=size)(x)  # F.interpolate(bilinear) when size != 64
    assert got.shape == (6, 3, size, size) and torch.allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("size", [64, 224])
def test_a_flip_mirrors_the_identity_output(size):
    plain = DeviceStage(MEAN, STD)(images())
    boxes, no_flip = identity(6, 64)
    flipped = resized_crop(plain, rrc_theta(boxes, ~no_flip, 64, 64), size)
    straight = resized_crop(plain, rrc_theta(boxes, no_flip, 64, 64), size)
    assert (flipped - straight.flip(-1)).abs().max() <= 1e-6


def test_a_box_is_a_bilinear_resized_crop_of_that_region():
    plain = DeviceStage(MEAN, STD)(images())
    # Downscale: every sample point lies inside the box, so it is torchvision's crop-then-resize.
    boxes = torch.tensor([[8.0, 16.0, 32.0, 32.0]]).repeat(6, 1)  # x0, y0, w, h
    got = resized_crop(plain, rrc_theta(boxes, torch.zeros(6, dtype=torch.bool), 64, 64), 16)
    want = TF2.resized_crop(plain, top=16, left=8, height=32, width=32, size=[16, 16], antialias=False)
    assert torch.allclose(got, want, atol=TOL, rtol=0)
    # Upscale the top-left quarter 2x: equal but for the last row and column, whose sample points
    # lie a quarter pixel past the box's inner edge: the sampler reads a quarter of the pixel beyond,
    # where crop-then-resize clamps to the box's last pixel.
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0]]).repeat(6, 1)
    got = resized_crop(plain, rrc_theta(boxes, torch.zeros(6, dtype=torch.bool), 64, 64), 64)
    want = F.interpolate(plain[..., :32, :32], size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(got[..., :-1, :-1], want[..., :-1, :-1], atol=TOL, rtol=0)
    step = max((plain[..., :33, 32] - plain[..., :33, 31]).abs().max(),
               (plain[..., 32, :33] - plain[..., 31, :33]).abs().max())  # across the box's inner edges
    edge = torch.cat([(got - want)[..., -1, :], (got - want)[..., :, -1]], dim=-1).abs().max()
    assert 0 < edge <= 0.5 * step + TOL  # a quarter of the step per axis, both axes at the corner


@pytest.mark.parametrize("scale", [(0.35, 1.0), (0.08, 0.5)])
def test_drawn_boxes_lie_inside_with_their_area_and_aspect_in_range(scale):
    n = 20000
    boxes, flips = rrc_boxes(n, 64, 64, scale, generator=torch.Generator().manual_seed(1))
    x0, y0, w, h = boxes.unbind(1)
    assert x0.min() >= 0 and y0.min() >= 0 and (x0 + w).max() <= 64 + 1e-4 and (y0 + h).max() <= 64 + 1e-4
    area, aspect = w * h / 64 ** 2, w / h
    assert area.min() >= scale[0] - 1e-5 and area.max() <= scale[1] + 1e-5
    # Clamping keeps the area, so it stays uniform in the range; it only narrows the aspect.
    assert abs(area.mean() - sum(scale) / 2) < 0.01
    assert aspect.min() >= 3 / 4 - 1e-5 and aspect.max() <= 4 / 3 + 1e-5
    assert abs(aspect.log().mean()) < 0.01  # log-uniform, symmetric about 1
    assert abs(flips.float().mean() - 0.5) < 0.02
    room = w < 63
    assert 0.45 < (x0[room] / (64 - w[room])).mean() < 0.55  # positions spread over the room left


def test_large_boxes_are_clamped_to_the_image_keeping_their_area():
    boxes, _ = rrc_boxes(20000, 64, 64, generator=torch.Generator().manual_seed(2))
    wide = boxes[:, 2] >= 64 - 1e-4
    assert wide.sum() > 100  # area * aspect > 1 happens often at scale up to 1
    assert torch.all(boxes[wide, 0].abs() < 1e-4)  # a full-width box starts at column 0


def test_the_stage_draws_from_the_generator():
    x, stage = images(), DeviceStage(MEAN, STD, augment="rrc")
    a, b = (stage(x, torch.Generator().manual_seed(7)) for _ in range(2))
    c = stage(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=0.1)
    assert not torch.allclose(a, DeviceStage(MEAN, STD)(x), atol=0.1)


def test_the_stage_samples_the_drawn_boxes(monkeypatch):
    x = images()
    boxes, flips = identity(6, 64)
    flips[::2] = True
    monkeypatch.setattr(device, "rrc_boxes", lambda *a, **k: (boxes, flips))
    got = DeviceStage(MEAN, STD, size=224, augment="rrc")(x)
    want = DeviceStage(MEAN, STD, size=224)(x)
    want[::2] = want[::2].flip(-1)
    assert torch.allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("side, channels, size, mean, out", [
    (64, 3, None, MEAN, 64), (64, 3, 224, MEAN, 224), (28, 0, None, (0.5,), 28)])
@pytest.mark.parametrize("channels_last, dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_rrc_output_shape_dtype_and_layout(side, channels, size, mean, out, channels_last, dtype):
    stage = DeviceStage(mean, mean, size=size, augment="rrc", dtype=dtype, channels_last=channels_last)
    y = stage(images(4, side, channels), torch.Generator().manual_seed(0))
    assert y.shape == (4, max(channels, 1), out, out) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("side, channels, mean, augment", [(64, 3, MEAN, "none"), (64, 3, MEAN, "crop"),
                                                        (28, 0, (0.5,), "none")])
@pytest.mark.parametrize("channels_last, dtype", [(False, torch.float32), (True, torch.float32),
                                                  (False, torch.bfloat16), (True, torch.bfloat16)])
def test_normalisation_gives_the_models_dtype_and_layout(side, channels, mean, augment, channels_last, dtype):
    """Without resampling: exactly uint8 -> float32, x * 1/(255 std) - mean/std, then the model's
    dtype and layout."""
    x = images(4, side, channels)
    stage = DeviceStage(mean, mean, augment=augment, dtype=dtype, channels_last=channels_last)
    y = stage(x, torch.Generator().manual_seed(1))
    if augment == "crop":
        x = pad_crop_flip(x, 4, torch.Generator().manual_seed(1))
    x = (x if x.dim() == 4 else x.unsqueeze(-1)).permute(0, 3, 1, 2)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    want = torch.addcmul(-m / m, x.float(), 1 / (255 * m)).to(dtype, memory_format=fmt)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt) and torch.equal(y, want)


def test_augment_values():
    x, seed = images(), 3
    modes = {v: DeviceStage(MEAN, STD, augment=v).augment for v in (False, None, "none", True, "crop", "rrc")}
    assert modes == {False: "none", None: "none", "none": "none", True: "crop", "crop": "crop", "rrc": "rrc"}
    crop = DeviceStage(MEAN, STD, augment="crop")(x, torch.Generator().manual_seed(seed))
    normalised = DeviceStage(MEAN, STD)(pad_crop_flip(x, 4, torch.Generator().manual_seed(seed)))
    assert torch.equal(crop, normalised)
    for bad in ("flip", 1, "RRC"):
        with pytest.raises(ValueError) as e:
            DeviceStage(MEAN, STD, augment=bad)
        assert str(e.value) == f"augment must be one of none, crop, rrc; got {bad!r}"
    # an area of 0 (a box of no pixels: NaN weights), or what is no pair of numbers (Python's unpacking error)
    # numbers as text: the first batch failed with 'unsupported operand type(s) for -: 'str' and 'str''
    for bad in ((0.5, 1.5), (0, 1), (0.5,), ("low", "high"), None, ("0.2", "1")):
        with pytest.raises(ValueError) as e:
            DeviceStage(MEAN, STD, augment="rrc", rrc_scale=bad)
        assert str(e.value) == f"rrc_scale must be (low, high) with 0 < low <= high <= 1; got {bad!r}"


@pytest.mark.parametrize("kwargs, message", [
    # each failed at the first batch with torch's own words, or gave NaN images without one
    (dict(size=0), "size must be an integer of at least 1, not 0"),
    (dict(size=56.5), "size must be an integer of at least 1, not 56.5"),
    (dict(augment="crop", pad=-1), "pad must be an integer of at least 0, not -1"),
    (dict(augment="crop", pad=1.5), "pad must be an integer of at least 0, not 1.5"),
    (dict(std=(0.5, 0, 0.5)), "std must be positive (it divides), not [0.5, 0, 0.5]"),
    (dict(mean=(0.5, float("nan"), 0.5)), "mean must be finite, not [0.5, nan, 0.5]"),
    (dict(mean="abc"), "mean must be a sequence of numbers, one per channel, not 'abc'"),
    (dict(mean=("0.5",) * 3), "mean must be a sequence of numbers, one per channel, not ('0.5', '0.5', '0.5')"),
    (dict(std=(0.5, 0.5)), "mean and std need one value per channel each, not 3 and 2"),
    (dict(dtype="bfloat16"), "dtype must be a torch dtype such as torch.float32 or torch.bfloat16, not 'bfloat16'"),
    (dict(dtype=torch.uint8), "dtype must be a floating-point dtype (images are normalised), not torch.uint8"),
    (dict(channels_last="no"), "channels_last must be True or False, not 'no'"),  # truthy: channels_last batches
])
def test_the_stages_arguments_are_checked_when_it_is_made(kwargs, message):
    with pytest.raises(ValueError) as e:
        DeviceStage(**{"mean": MEAN, "std": STD, **kwargs})
    assert str(e.value) == message


def test_make_loader_augments_with_rrc(shards):
    def first(**kw):
        return next(iter(make_loader(shards, "val", batch_size=8, shuffle=False, **kw)))[0]
    a, b = first(augment="rrc"), first(augment="rrc")
    assert a.shape == (8, 3, 64, 64) and torch.equal(a, b) and not torch.allclose(a, first(), atol=0.1)
    assert first(augment="rrc", rrc_scale=(1.0, 1.0)).shape == (8, 3, 64, 64)
    with pytest.raises(ValueError) as e:
        make_loader(shards, "val", augment="mixup")
    assert str(e.value) == "augment must be one of none, crop, rrc; got 'mixup'"


@pytest.mark.parametrize("size", [28, 32, 48, 100, 224])
def test_the_resize_is_torchvisions_bilinear_resize_shrinking_or_growing(size):
    """A shrink is antialiased, as torchvision's `resize` (and PIL) are: without it 64 -> 32 was up to
    68 grey levels off, 64 -> 28 up to 123."""
    x = images(4)
    got = DeviceStage((0, 0, 0), (1 / 255,) * 3, size=size)(x)  # identity scale: grey levels 0..255
    want = TF2.resize(x.permute(0, 3, 1, 2).float(), [size, size], antialias=True)
    assert got.shape == (4, 3, size, size) and (got - want).abs().max() < 1e-3


def test_every_batch_must_have_the_stages_channel_count():
    """Not only the first on a device: a grey batch after an RGB one came out as 3 channels."""
    rgb, grey = DeviceStage(MEAN, STD), DeviceStage((0.5,), (0.5,))
    assert rgb(images(2)).shape == (2, 3, 64, 64) and grey(images(2, 28, 0)).shape == (2, 1, 28, 28)
    for stage, x, message in ((rgb, images(2, 28, 0), "mean/std have 3 channels, images have 1"),
                              (grey, images(2), "mean/std have 1 channels, images have 3")):
        with pytest.raises(ValueError) as e:
            stage(x)
        assert str(e.value) == message


@pytest.mark.parametrize("x, message", [
    (np.zeros((2, 64, 64, 3), np.uint8), "images must be a torch tensor (torch.from_numpy for a numpy array), not a ndarray"),
    (images(2).permute(0, 3, 1, 2), "images must be a batch of square images, (N, H, H, C) channels last or (N, H, H), "
                                    "not (2, 3, 64, 64)"),
    (images(1)[0], "images must be a batch of square images, (N, H, H, C) channels last or (N, H, H), not (64, 64, 3)"),
    (images(1)[0, :, :, 0], "images must be a batch of square images, (N, H, H, C) channels last or (N, H, H), not (64, 64)"),
    (images(2)[:, :48], "images must be a batch of square images, (N, H, H, C) channels last or (N, H, H), "
                        "not (2, 48, 64, 3)"),
])
def test_what_is_no_batch_of_square_images_is_refused(x, message):
    """A numpy batch failed as AttributeError 'is_floating_point'; a channels-first batch as 'mean/std have 3
    channels, images have 64'; one (H, W, C) image as 'images have 1'; a wide batch came out stretched."""
    with pytest.raises(ValueError) as e:
        DeviceStage(MEAN, STD)(x)
    assert str(e.value) == message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_images_are_refused(dtype):
    """Float images in [0, 1] were scaled by 1/255 once more: a near-constant batch of -mean/std."""
    with pytest.raises(ValueError) as e:
        DeviceStage(MEAN, STD)(images(2).to(dtype) / 255)
    assert str(e.value) == f"images must be uint8 (0..255), not {dtype}"


@pytest.mark.parametrize("size", [28, 48, 63])  # 63: a shrink by the least
def test_rrc_to_a_smaller_size_is_torchvisions_antialiased_resized_crop(size, monkeypatch):
    """Below the stored size a box may shrink: `F.grid_sample` read 4 pixels per output and aliased (the
    whole image to 28 was up to 136 grey levels from the resize the validation batches get)."""
    x = images(6)
    # x0, y0, w, h: the whole image (as a validation batch is resized), larger and smaller than the output
    boxes = torch.tensor([[0, 0, 64, 64], [0, 0, 64, 64], [5, 9, 50, 40], [20, 3, 44, 60], [30, 30, 20, 24],
                          [1, 2, 40, 40]], dtype=torch.float32)
    flips = torch.tensor([False, True, False, True, False, True])
    monkeypatch.setattr(device, "rrc_boxes", lambda *a, **k: (boxes, flips))
    got = DeviceStage((0, 0, 0), (1 / 255,) * 3, size=size, augment="rrc")(x)  # identity scale: grey levels
    plain = DeviceStage((0, 0, 0), (1 / 255,) * 3, size=size)(x)
    assert (got[0] - plain[0]).abs().max() < 1e-3 and (got[1] - plain[1].flip(-1)).abs().max() < 1e-3
    for i, (left, top, width, height) in enumerate(boxes.int().tolist()):
        want = TF2.resized_crop(x[i].permute(2, 0, 1).float(), top=top, left=left, height=height, width=width,
                                size=[size, size], antialias=True)
        assert (got[i] - (want.flip(-1) if flips[i] else want)).abs().max() < 1e-3


def test_rrc_theta_maps_the_output_onto_the_box_of_a_non_square_image():
    """Exact matrices: x is scaled and centred by the width, y by the height (square images could not tell)."""
    boxes = torch.tensor([[8.0, 4.0, 32.0, 16.0]]).repeat(2, 1)  # x0, y0, w, h on a 48-high, 64-wide image
    theta = rrc_theta(boxes, torch.tensor([False, True]), 48, 64)
    want = torch.tensor([[[0.5, 0, -0.25], [0, 16 / 48, -0.5]], [[-0.5, 0, -0.25], [0, 16 / 48, -0.5]]])
    torch.testing.assert_close(theta, want, rtol=0, atol=1e-7)


def test_a_boxs_column_and_row_are_drawn_independently():
    """One draw for both placed every box on the image's diagonal (top-left to bottom-right)."""
    boxes, _ = rrc_boxes(20000, 64, 64, generator=torch.Generator().manual_seed(3))
    x0, y0, w, h = boxes.unbind(1)
    room = (w < 63) & (h < 63)
    across, down = x0[room] / (64 - w[room]), y0[room] / (64 - h[room])
    assert 0.45 < down.mean() < 0.55 and abs(torch.corrcoef(torch.stack([across, down]))[0, 1]) < 0.05


@pytest.mark.parametrize("height, width", [(48, 64), (64, 48)])
def test_boxes_of_a_non_square_image_keep_their_area_when_clamped(height, width):
    """A box clamped to the height of a wide image takes its width from that height, and the other
    way round (square images could not tell the two apart)."""
    boxes, _ = rrc_boxes(20000, height, width, generator=torch.Generator().manual_seed(4))
    x0, y0, w, h = boxes.unbind(1)
    assert ((h >= height - 1e-4) | (w >= width - 1e-4)).sum() > 100  # the long side never reaches the edge
    assert x0.min() >= 0 and y0.min() >= 0 and (x0 + w).max() <= width + 1e-4 and (y0 + h).max() <= height + 1e-4
    area = w * h / (height * width)
    assert area.min() >= 0.35 - 1e-5 and area.max() <= 1 + 1e-5 and abs(area.mean() - 0.675) < 0.01  # uniform


def test_rrc_at_the_stored_size_is_one_bilinear_sample(monkeypatch):
    """No box is larger than the output there: the stage samples the boxes with `resized_crop` (the
    antialiased crop-then-resize would clamp each box's last row and column instead)."""
    x = images()
    boxes, flips = torch.tensor([[8.0, 16.0, 32.0, 40.0]]).repeat(6, 1), torch.tensor([False, True] * 3)
    monkeypatch.setattr(device, "rrc_boxes", lambda *a, **k: (boxes, flips))
    got = DeviceStage(MEAN, STD, augment="rrc")(x)
    want = resized_crop(DeviceStage(MEAN, STD)(x), rrc_theta(boxes, flips, 64, 64), 64)
    assert torch.allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ["alexnet", "squeezenet1_1", "resnet18"])
def test_imagenet_statistics_are_those_of_torchvisions_pretrained_weights(arch):
    """--norm imagenet (the study's 224 rows, from these weights) must normalise as they were trained."""
    transforms = get_model_weights(arch).IMAGENET1K_V1.transforms()
    assert (device.IMAGENET_MEAN, device.IMAGENET_STD) == (tuple(transforms.mean), tuple(transforms.std))


@pytest.mark.parametrize("size", [None, 32, 224])
def test_rrc_under_a_float64_default_dtype_draws_and_samples_as_under_float32(size):
    """torch.set_default_dtype(torch.float64) (a notebook's) made the boxes and the antialiased weights float64,
    and the float32 batch could not be sampled with them: 'expected scalar type Float but found Double'."""
    stage = DeviceStage(MEAN, STD, size=size, augment="rrc")
    want = stage(images(), torch.Generator().manual_seed(4))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = stage(images(), torch.Generator().manual_seed(4))
    finally:
        torch.set_default_dtype(default)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("augment", ["none", "crop", "rrc"])
@pytest.mark.parametrize("size", [None, 32, 64, 224])
def test_a_batch_of_no_images_comes_out_empty_whatever_the_augmentation(augment, size):
    """A batch of no images (a batch filtered by label in a notebook, say) came out of the random-resized
    crop at the stored size or above as torch's 'Expected non-zero, positive output size' from affine_grid;
    every other augmentation and size gave an empty batch, as it now does too."""
    out = DeviceStage(MEAN, STD, size=size, augment=augment)(images(0), torch.Generator().manual_seed(0))
    assert (tuple(out.shape), out.dtype) == ((0, 3, size or 64, size or 64), torch.float32)
