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
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("lenet5", variant="gray28", channels=1, sizes=(28,), head="classifier.4.")
def lenet5(num_classes: int = 200) -> LeNet5:
    """LeNet-5 for 1x28x28 input; there are no pretrained weights for it."""
    return LeNet5(num_classes)
