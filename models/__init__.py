"""The study's networks behind one registry: ``get_model("resnet18", num_classes=200)``.

The registry holds lenet5, alexnet, squeezenet1_1 and resnet18 (the study's networks), and
resnet18_64, resnet18_64s2 and resnet10_64s2 (64-px ResNets for the speedrun, models/resnet64.py).

Imports are put off until needed, because torch and torchvision take ~6 s to import on a small
machine: ``models.recipes`` (plain dicts) is read without either (tools/reproduce.py only launches
train.py), and torchvision is imported by the first network built from it, not for LeNet-5.
Public API (imported lazily, like pipeline's):
`get_model`, `list_models`, `model_spec`, `model_input`, `register_model`, `load_weights_file`,
`ModelSpec`, `WeightsUnavailable`.
"""
import importlib

__all__ = sorted(["ModelSpec", "WeightsUnavailable", "get_model", "list_models", "load_weights_file",
                  "model_input", "model_spec", "register_model"])
_NETWORKS = ("lenet5", "resnet64", "torchvision_zoo")  # imported for their @register_model side effect


def __getattr__(name):
    if name in __all__:
        for module in _NETWORKS:
            importlib.import_module(f".{module}", __name__)
        return getattr(importlib.import_module(".registry", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))  # the lazy names too (tab completion in a notebook), as pipeline's
