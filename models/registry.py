"""A name -> builder registry for the study's four networks and the speedrun's 64-px ResNets (`list_models()`).

Each entry also records what the network eats (image variant, channels, the
sizes it was studied at), where its classification head lives, and which
ImageNet weights it can start from, so `train.py` can validate `--size` and
`get_model` can swap heads without knowing any architecture.
"""

from __future__ import annotations

import numbers
import os
import urllib.error
import urllib.parse
import zipfile
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

#: Native resolution of each shard variant; any other size is resized on the device.
VARIANT_SIZES = {"gray28": 28, "rgb64": 64}


class WeightsUnavailable(RuntimeError):
    """ImageNet weights could not be fetched (no network, bad URL, corrupt download)."""


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one network.

    ``build(num_classes)`` returns a fresh model; ``build_pretrained(self.imagenet_weights())``
    returns the 1000-class ImageNet model and ``reset_head(model, num_classes)``
    puts a fresh classifier on it. ``head`` is the state-dict prefix of the last
    layer (its keys are the ones dropped when a file's class count differs).
    """

    name: str
    build: Callable[[int], nn.Module]
    variant: str
    channels: int
    sizes: tuple[int, ...]
    head: str
    weights: str | None = None  # torchvision's name of the ImageNet weights, e.g. "ResNet18_Weights.IMAGENET1K_V1"
    build_pretrained: Callable[[object], nn.Module] | None = None
    reset_head: Callable[[nn.Module, int], None] | None = None

    def imagenet_weights(self):
        """torchvision's weights entry (with ``.url``) that ``weights`` names; imports torchvision."""
        from torchvision.models import get_weight

        return get_weight(self.weights)

    def hub_cache_file(self) -> str:
        """Where torch.hub keeps the ImageNet weights file (there or not): once there, it is loaded
        without a download or a hash check."""
        name = os.path.basename(urllib.parse.urlparse(self.imagenet_weights().url).path)
        return os.path.join(torch.hub.get_dir(), "checkpoints", name)


_MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, **spec):
    """Decorator registering ``build(num_classes) -> nn.Module`` under ``name``.

    Keyword arguments are the remaining :class:`ModelSpec` fields (variant,
    channels, sizes, head, ...). Registering a name twice raises ``ValueError``:
    silently replacing a model would make results depend on import order.
    """

    def decorator(build):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = ModelSpec(name=name, build=build, **spec)
        return build

    return decorator


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODELS)


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` for ``name``; ``ValueError`` for an unknown name."""
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(list_models())}") from None


def model_input(name: str) -> dict:
    """What ``name`` takes: ``dict(variant=, channels=, sizes=, native=)``.

    ``native`` is the variant's stored size; other sizes in ``sizes`` are
    produced by resizing that variant on the device (64 -> 224).
    """
    spec = model_spec(name)
    return dict(variant=spec.variant, channels=spec.channels, sizes=spec.sizes, native=VARIANT_SIZES[spec.variant])


def get_model(name: str, num_classes: int = 200, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    """Build model ``name`` with a ``num_classes``-way head.

    pretrained: start from torchvision's ImageNet weights (downloaded through
        ``torch.hub``; cached under ``$TORCH_HOME``) and replace the head (kept for 1000
        classes: ImageNet's own classifier, as a ``weights`` file's head of the right shape is).
        Raises :class:`WeightsUnavailable` when the download fails.
    weights: path of a local state dict, or of a checkpoint dict with a
        ``'model'`` key (e.g. the ImageNet file downloaded elsewhere, or a
        ``checkpoint.pth`` of train.py: of an ``--ema`` run, its average). A head of another
        class count is dropped, and a fresh one put on as ``pretrained=True`` does.
    """
    spec = model_spec(name)
    # numpy's integers too (`labels.max() + 1`, a count read from an array), as make_loader takes them
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, not {num_classes!r}")
    num_classes = int(num_classes)
    if not isinstance(pretrained, bool):  # a string is truthy: pretrained="no" (a config file's value) downloaded
        raise ValueError(f"pretrained must be True or False, not {pretrained!r}")
    if weights is not None and not str(weights):  # an unset variable's "" trained from scratch, without a word
        raise ValueError("weights is empty: give a file's path, or None to start from scratch")
    if pretrained and weights:
        raise ValueError("pass either pretrained=True or weights=FILE, not both")
    if not pretrained:
        model = spec.build(num_classes)
        if weights and load_weights_file(model, weights, head=spec.head, arch=name) and spec.reset_head:
            # The builder's head is not always the one pretrained=True puts on (SqueezeNet's is N(0, 0.01) with
            # zero bias, reset_head's PyTorch's default, as the study's): the ImageNet file by hand must train alike.
            spec.reset_head(model, num_classes)
        return model

    if spec.weights is None:
        raise ValueError(f"{name} has no pretrained ImageNet weights; train it from scratch")
    imagenet = spec.imagenet_weights()
    cached = spec.hub_cache_file()
    was_cached = os.path.isfile(cached)
    member = damaged_member(cached) if was_cached else None  # neither torch.hub nor torch.load checks a cached file
    if member:
        raise WeightsUnavailable(f"{cached}: torch.hub's cached ImageNet weights for {name} are {DAMAGED.format(member=member)}; "
                                 "delete the file to download it again, or pass --weights FILE --norm imagenet")
    try:
        model = spec.build_pretrained(imagenet)
    except Exception as e:  # noqa: BLE001 - torch.load of a damaged or foreign file raises nearly anything
        if was_cached:  # nothing was downloaded: the file there is damaged or another one
            raise WeightsUnavailable(
                f"{cached}: torch.hub's cached ImageNet weights for {name} do not load ({e.__class__.__name__}); "
                "delete the file to download it again, or pass --weights FILE --norm imagenet"
            ) from e
        if not isinstance(e, (urllib.error.URLError, OSError, RuntimeError)):
            raise
        # URLError is an OSError; RuntimeError is the hub's hash check or a truncated file.
        # HTTPError prints well ("HTTP Error 404: ..."); other URLErrors are best told by their reason.
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise WeightsUnavailable(
            f"cannot download ImageNet weights for {name} from {imagenet.url} ({reason}); "
            "download the file elsewhere and pass --weights FILE --norm imagenet"
        ) from e
    if num_classes != len(imagenet.meta["categories"]):
        spec.reset_head(model, num_classes)
    return model


DAMAGED = "damaged: its {member} fails its CRC-32 check (a bad copy, or a failing disk)"


def damaged_member(path: str | os.PathLike) -> str | None:
    """The first member of the torch file ``path`` (a zip, as ``torch.save`` writes) whose bytes fail their
    CRC-32, or None: None too for a file that is no readable zip (an old-format file, a folder, none),
    where ``torch.load`` says what is wrong. ``torch.load`` does not check the CRCs: a weights file with a
    4 KiB block zeroed in its tensors loaded without a word, and was evaluated or trained from as it was.
    Reading the file once more costs ~25 ms for ResNet-18's 45 MB.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except Exception:  # noqa: BLE001 - no zip it can read (BadZipFile, OSError, NotImplementedError...): torch.load's word
        return None


def load_weights_file(model: nn.Module, path: str | os.PathLike, head: str, arch: str | None = None) -> list[str]:
    """Load a state dict (or a checkpoint's ``'model'``) from ``path`` into ``model``.

    A train.py checkpoint of an ``--ema`` run gives its average of the weights (its ``'ema'``), the
    network whose accuracy the run reported and whose best val top-1 made it ``best.pth``.

    When the file's head (keys starting with ``head``) has a different shape —
    typically 1000 ImageNet classes against our 200 — everything but the head
    is loaded and the model keeps its freshly initialised head: the file's head keys that were
    left out are returned (``[]`` when the whole file was loaded).
    arch: the registry name of ``model``; a train.py checkpoint of another network is refused
    (resnet18_64 and resnet18_64s2 have the same tensors, so their shapes cannot tell).
    """
    path = os.path.expanduser(path)  # a leading ~ as train.py's --weights reads it
    member = damaged_member(path)
    if member:
        raise ValueError(f"{path}: {DAMAGED.format(member=member)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # FileNotFoundError and the like: the caller names the path
    except Exception as e:  # noqa: BLE001 - on an arbitrary file torch.load raises nearly anything (struct.error, KeyError)
        raise ValueError(f"{path}: not a weights file ({e.__class__.__name__})") from None
    if isinstance(state, dict) and "model" in state:
        saved_args = state.get("args")
        other = saved_args.get("arch") if isinstance(saved_args, dict) else None
        if arch and other and other != arch:
            raise ValueError(f"{path}: holds {other} weights (a train.py checkpoint), not {arch}")
        if isinstance(state.get("ema"), dict):  # --ema: the average is what the run validated, tested and kept as best
            state = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
        else:
            state = state["model"]
    if not isinstance(state, dict):  # its type with its article: it said 'a int', 'a NoneType'
        kind = type(state).__name__
        said = "None" if state is None else f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind}"
        raise ValueError(f"{path}: not a state dict ({said})")
    own = model.state_dict()
    mismatched = [k for k in state if k.startswith(head) and k in own and state[k].shape != own[k].shape]
    if mismatched:
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Only the dropped head may be missing; anything else means the wrong file.
    if unexpected or any(not k.startswith(head) for k in missing) or (missing and not mismatched):
        raise ValueError(f"{path}: does not fit this model (missing {_first(missing)}, unexpected {_first(unexpected)})")
    return mismatched


def _first(keys, n=4):
    """`keys` as a list, its first `n` only and a count of the rest: another network's file listed every key, an
    error of 3,000 characters (AlexNet's file for ResNet-18)."""
    return f"{keys}" if len(keys) <= n else f"{keys[:n]} and {len(keys) - n} more"
