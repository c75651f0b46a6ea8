"""AlexNet, SqueezeNet 1.1 and ResNet-18 from torchvision's builders.

All three end in adaptive average pooling, so the same network runs on the
stored 64x64 images and on 224x224 (the 64x64 images upscaled on the device,
the resolution ImageNet weights were trained at).
"""

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
    build_pretrained=lambda w: _torchvision("alexnet")(weights=w), reset_head=_reset_alexnet,
)
def alexnet(num_classes: int = 200) -> nn.Module:
    """torchvision AlexNet (one-GPU variant) with a ``num_classes`` head."""
    return _torchvision("alexnet")(num_classes=num_classes)


@register_model(
    "squeezenet1_1", **RGB, head="classifier.1.", weights="SqueezeNet1_1_Weights.IMAGENET1K_V1",
    build_pretrained=lambda w: _torchvision("squeezenet1_1")(weights=w), reset_head=_reset_squeezenet,
)
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
