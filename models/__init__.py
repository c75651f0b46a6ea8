"""The study's networks behind one registry: ``get_model("resnet18", num_classes=200)``.

Importing the package registers lenet5, alexnet, squeezenet1_1 and resnet18 (the study's networks),
and resnet18_64, resnet18_64s2 and resnet10_64s2 (64-px ResNets for the speedrun, models/resnet64.py).
"""

from . import lenet5, resnet64, torchvision_zoo  # noqa: F401  (imported for their @register_model side effect)
from .registry import (
    ModelSpec,
    WeightsUnavailable,
    get_model,
    list_models,
    load_weights_file,
    model_input,
    model_spec,
    register_model,
)

__all__ = [
    "ModelSpec",
    "WeightsUnavailable",
    "get_model",
    "list_models",
    "load_weights_file",
    "model_input",
    "model_spec",
    "register_model",
]
