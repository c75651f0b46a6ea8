"""Training recipes: named sets of train.py flags, applied under the flags a user types.

`paper` is the study's Table 2 (from scratch) and Table 3's 10-epoch rows (ImageNet-pretrained,
upscaled to 224); `paper-50` is Table 3's 50-epoch rows. All use the study's optimiser: plain SGD,
lr 0.001, momentum 0.9, no weight decay, constant lr. Batch sizes and normalisation follow the
tables and the study's notebooks (../shared/STUDY.md): LeNet-5 batch 32 with (0.5, 0.5); the
64x64 rows batch 50 with ImageNet mean/std (as `run_models2.ipynb` normalised them); the 224
rows batch 100, ImageNet weights and statistics.

`fast` is the speedrun's (issue 9: ResNet-18 at 64 px to 60% val top-1 in 10 minutes on one
H100), for the 64-px ResNets of models/resnet64.py. A first guess, untuned until measured on a GPU:
- batch 512, lr 0.4: CIFAR's usual ResNet-18 rate (0.1 per 128 images) scaled linearly with the batch;
- SGD momentum 0.9 with Nesterov, weight decay 5e-4 (on every parameter), label smoothing 0.1;
- 2 epochs of linear warm-up, then cosine to 0, per step;
- an EMA of the weights (decay 0.999 per step, updated every 4 steps: AveragedModel's update reads
  its counter on the host, a CUDA sync each time), flip test-time augmentation;
- random-resized crop + flip on the device; no mixing (it pays over hundreds of epochs, not tens);
- bf16, channels_last and torch.compile on CUDA only (`ON_CUDA`): on the CPU bf16 is slow, NHWC
  gains nothing and compiling costs minutes, so the same command runs there too;
- 40 epochs. resnet18_64 costs 13.3 GFLOP an image for forward and backward
  (torch.utils.flop_counter), 1.33 PFLOP an epoch of 100k images: at a third of an H100/H200's
  ~790 TFLOP/s (bf16) that is about 5 s an epoch (20k images/s), so 40 epochs take 3-4 minutes plus
  compiling and evaluation. Not measured: `--time-budget 10` (train.py) sets the epochs from the
  measured epoch time instead, after the 2 warm-up epochs.
The same row for the three networks; the cheaper ones may afford more epochs in the same time. It
also has a row for the study's `resnet18` at 64 (torchvision's: stride-2 stem and max-pool, so 16x16
after the stem, about 15x cheaper than resnet18_64), so recipes can be compared on one network: that is
how the CPU comparison on a 10-class subset runs (BENCHMARKS.md).
"""

#: a recipe value meaning "on when --device is cuda, off otherwise" (for speed-only flags)
ON_CUDA = "on-cuda"

PAPER_OPTIM = dict(lr=0.001, momentum=0.9, wd=0.0, lr_scheduler="none", label_smoothing=0.0)
_PRETRAINED_224 = dict(batch_size=100, pretrained=True, norm="imagenet")
FAST = dict(epochs=40, batch_size=512, lr=0.4, momentum=0.9, nesterov=True, wd=5e-4, label_smoothing=0.1,
            lr_scheduler="cosine", lr_per="step", warmup_epochs=2.0, ema=0.999, ema_every=4, tta=True, augment="rrc",
            amp=ON_CUDA, channels_last=ON_CUDA, compile=ON_CUDA)

#: recipe name -> {(arch, size): flags}
RECIPES = {
    "paper": {
        ("lenet5", 28): dict(PAPER_OPTIM, epochs=40, batch_size=32, norm="half"),
        ("alexnet", 64): dict(PAPER_OPTIM, epochs=40, batch_size=50, norm="imagenet"),
        ("squeezenet1_1", 64): dict(PAPER_OPTIM, epochs=40, batch_size=50, norm="imagenet"),
        ("resnet18", 64): dict(PAPER_OPTIM, epochs=40, batch_size=50, norm="imagenet"),
        ("alexnet", 224): dict(PAPER_OPTIM, epochs=10, **_PRETRAINED_224),
        ("squeezenet1_1", 224): dict(PAPER_OPTIM, epochs=10, **_PRETRAINED_224),
        ("resnet18", 224): dict(PAPER_OPTIM, epochs=10, **_PRETRAINED_224),
    },
    "paper-50": {
        (arch, 224): dict(PAPER_OPTIM, epochs=50, **_PRETRAINED_224) for arch in ("alexnet", "squeezenet1_1", "resnet18")
    },
    "fast": {
        (arch, 64): dict(FAST) for arch in ("resnet18_64", "resnet18_64s2", "resnet10_64s2", "resnet18")
    },
}


def recipe_names():
    """The recipe names, for --recipe's choices."""
    return sorted(RECIPES)


def resolve_recipe(name, arch, size, device="cpu"):
    """The flags of recipe `name` for (arch, size) on `device` (a torch device string: `ON_CUDA`
    values become whether it is CUDA); ValueError naming the rows it has otherwise."""
    rows = RECIPES.get(name)
    if rows is None:
        raise ValueError(f"unknown recipe {name!r}; choose from: {', '.join(recipe_names())}")
    if (arch, size) not in rows:
        have = ", ".join(f"{a} --size {s}" for a, s in rows)
        raise ValueError(f"recipe {name!r} has no row for {arch} at --size {size}; it has: {have}")
    on_cuda = str(device).startswith("cuda")
    return {k: on_cuda if v == ON_CUDA else v for k, v in rows[arch, size].items()}
