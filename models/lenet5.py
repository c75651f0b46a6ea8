"""LeNet-5 exactly as the study built it, for 1x28x28 grey images.

Shapes: 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4, so the classifier
sees 32 * 4 * 4 = 512 features.
"""

import torch
from torch import nn

from .registry import register_model


class LeNet5(nn.Module):
    """Two 5x5 conv/ReLU/max-pool stages (16 and 32 maps) and a 120-84-N MLP."""

    def __init__(self, num_classes: int = 200) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 4 * 4, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Any other size reached the classifier as the wrong number of features: torch's 'mat1 and mat2
        # shapes cannot be multiplied (2x800 and 512x120)', naming neither the input nor the size it needs.
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"LeNet-5 takes (N, 1, 28, 28) batches (the gray28 variant, size 28), "
                             f"not {tuple(x.shape)}")
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("lenet5", variant="gray28", channels=1, sizes=(28,), head="classifier.4.")
def lenet5(num_classes: int = 200) -> LeNet5:
    """LeNet-5 for 1x28x28 input; there are no pretrained weights for it."""
    return LeNet5(num_classes)
