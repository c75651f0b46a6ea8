"""ResNets for 64x64 inputs (the speedrun's networks; `resnet18` stays torchvision's ImageNet one).

torchvision's ResNet-18 starts with a 7x7 stride-2 conv and a stride-2 max-pool, built for 224 px:
at 64 px its last stage sees 2x2 maps. The usual Tiny ImageNet fix (about 60% val top-1 in 100
epochs) keeps the body and makes the stem a 3x3 stride-1 conv without max-pool, so the stages see
64, 32, 16 and 8 px: about 16x the compute of `resnet18` at 64 px. The cheaper variants trade
some of that back for speed:

- `resnet18_64`: 3x3 stride-1 stem, no max-pool (2.2 G multiply-adds, 4.4 GFLOP, per image forward).
- `resnet18_64s2`: the same with a stride-2 stem (stages at 32..4 px, about a quarter of the cost).
- `resnet10_64s2`: one BasicBlock per stage and a stride-2 stem (about half of `resnet18_64s2`).

All start the last BatchNorm of each residual block at zero (`zero_init_residual`): every block
begins as the identity, which lets short, high-lr schedules train from the first step.
"""

from torch import nn

from .registry import register_model

RGB64 = dict(variant="rgb64", channels=3, sizes=(64,), head="fc.")


def resnet_64(layers, num_classes=200, stem_stride=1):
    """torchvision's ResNet with BasicBlocks `layers` and a 3x3 stem of `stem_stride`, no max-pool."""
    from torchvision.models.resnet import BasicBlock, ResNet  # on first use, as in torchvision_zoo.py

    model = ResNet(BasicBlock, list(layers), num_classes=num_classes, zero_init_residual=True)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as ResNet inits its convs
    model.maxpool = nn.Identity()
    return model


@register_model("resnet18_64", **RGB64)
def resnet18_64(num_classes: int = 200) -> nn.Module:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 64x64 input."""
    return resnet_64((2, 2, 2, 2), num_classes, stem_stride=1)


@register_model("resnet18_64s2", **RGB64)
def resnet18_64s2(num_classes: int = 200) -> nn.Module:
    """ResNet-18 with a 3x3 stride-2 stem and no max-pool: stages at 32, 16, 8, 4 px."""
    return resnet_64((2, 2, 2, 2), num_classes, stem_stride=2)


@register_model("resnet10_64s2", **RGB64)
def resnet10_64s2(num_classes: int = 200) -> nn.Module:
    """ResNet-10 (one BasicBlock per stage) with a 3x3 stride-2 stem and no max-pool."""
    return resnet_64((1, 1, 1, 1), num_classes, stem_stride=2)
