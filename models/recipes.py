"""Training recipes: named sets of train.py flags, applied under the flags a user types.

`paper` is the study's Table 2 (from scratch) and Table 3's 10-epoch rows (ImageNet-pretrained,
upscaled to 224); `paper-50` is Table 3's 50-epoch rows. All use the study's optimiser: plain SGD,
lr 0.001, momentum 0.9, no weight decay, constant lr. Batch sizes and normalisation follow the
tables and the study's notebooks (../shared/STUDY.md): LeNet-5 batch 32 with (0.5, 0.5); the
64x64 rows batch 50 with ImageNet mean/std (as `run_models2.ipynb` normalised them); the 224
rows batch 100, ImageNet weights and statistics.
"""

PAPER_OPTIM = dict(lr=0.001, momentum=0.9, wd=0.0, lr_scheduler="none", label_smoothing=0.0)
_PRETRAINED_224 = dict(batch_size=100, pretrained=True, norm="imagenet")

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
}


def recipe_names():
    """The recipe names, for --recipe's choices."""
    return sorted(RECIPES)


def resolve_recipe(name, arch, size):
    """The flags of recipe `name` for (arch, size); ValueError naming the rows it has otherwise."""
    rows = RECIPES.get(name)
    if rows is None:
        raise ValueError(f"unknown recipe {name!r}; choose from: {', '.join(recipe_names())}")
    if (arch, size) not in rows:
        have = ", ".join(f"{a} --size {s}" for a, s in rows)
        raise ValueError(f"recipe {name!r} has no row for {arch} at --size {size}; it has: {have}")
    return dict(rows[arch, size])
