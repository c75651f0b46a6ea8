"""AlexNet, SqueezeNet 1.1 and ResNet-18 from torchvision's builders.

All three end in adaptive average pooling, so the same network runs on the
stored 64x64 images and on 224x224 (the 64x64 images upscaled on the device,
the resolution ImageNet weights were trained at).
"""

import functools

from torch import nn

from .registry import register_model

RGB = dict(variant="rgb64", channels=3, sizes=(64, 224))


def _torchvision(builder):
    """torchvision's model builder `builder`, imported on first use. Importing torchvision takes
    ~3 s on a small machine, most of it torch._dynamo: a training run's optimizer imports that
    anyway (LeNet-5's run saves ~0.6 s), but `train.py --help`, a flag error and the tools that only
    read the registry do not wait for it."""
    from torchvision import models

    return getattr(models, builder)


def _smallest(title: str, side: int):
    """Wrap a builder: its network refuses, in one line naming `side`, a batch whose images are smaller than
    `side` pixels a side (as LeNet-5 refuses a size other than 28). torchvision's own error came from deep in
    the forward pass, naming neither the input nor the size it needs: AlexNet at 62 pixels, 'Given input size:
    (256x2x2). Calculated output size: (256x0x0). Output size is too small'."""
    def check(module: nn.Module, args: tuple) -> None:
        x = args[0]
        if x.dim() != 4 or min(x.shape[-2:]) < side:
            raise ValueError(f"{title} takes (N, 3, H, W) batches with H and W of at least {side} (the rgb64 "
                             f"variant, size 64 or 224), not {tuple(x.shape)}")

    def wrap(build):
        @functools.wraps(build)
        def built(*args, **kwargs) -> nn.Module:
            model = build(*args, **kwargs)
            model.register_forward_pre_hook(check)
            return model
        return built
    return wrap


def _reset_alexnet(model: nn.Module, num_classes: int) -> None:
    model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)


def _reset_squeezenet(model: nn.Module, num_classes: int) -> None:
    # SqueezeNet classifies with a 1x1 conv (512 -> classes) before global pooling.
    model.classifier[1] = nn.Conv2d(512, num_classes, kernel_size=1)
    model.num_classes = num_classes


def _reset_resnet(model: nn.Module, num_classes: int) -> None:
    model.fc = nn.Linear(model.fc.in_features, num_classes)


@register_model(
    "alexnet", **RGB, head="classifier.6.", weights="AlexNet_Weights.IMAGENET1K_V1",
    build_pretrained=_smallest("AlexNet", 63)(lambda w: _torchvision("alexnet")(weights=w)), reset_head=_reset_alexnet,
)
@_smallest("AlexNet", 63)
def alexnet(num_classes: int = 200) -> nn.Module:
    """torchvision AlexNet (one-GPU variant) with a ``num_classes`` head."""
    return _torchvision("alexnet")(num_classes=num_classes)


@register_model(
    "squeezenet1_1", **RGB, head="classifier.1.", weights="SqueezeNet1_1_Weights.IMAGENET1K_V1",
    build_pretrained=_smallest("SqueezeNet 1.1", 17)(lambda w: _torchvision("squeezenet1_1")(weights=w)),
    reset_head=_reset_squeezenet,
)
@_smallest("SqueezeNet 1.1", 17)
def squeezenet1_1(num_classes: int = 200) -> nn.Module:
    """torchvision SqueezeNet 1.1 with a ``num_classes`` head."""
    return _torchvision("squeezenet1_1")(num_classes=num_classes)


@register_model(
    "resnet18", **RGB, head="fc.", weights="ResNet18_Weights.IMAGENET1K_V1",
    build_pretrained=lambda w: _torchvision("resnet18")(weights=w), reset_head=_reset_resnet,
)
def resnet18(num_classes: int = 200) -> nn.Module:
    """torchvision ResNet-18 with a ``num_classes`` head."""
    return _torchvision("resnet18")(num_classes=num_classes)
