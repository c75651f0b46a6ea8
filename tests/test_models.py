"""The model registry: shapes at every studied size, weights loading, errors."""

import functools
import hashlib
import http.server
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import models
from tests.conftest import damage_torch_file

EXPECTED_SIZES = {"lenet5": (28,), "alexnet": (64, 224), "squeezenet1_1": (64, 224), "resnet18": (64, 224),
                  "resnet18_64": (64,), "resnet18_64s2": (64,), "resnet10_64s2": (64,)}


def test_registry_lists_the_study_and_speedrun_models():
    assert models.list_models() == sorted(EXPECTED_SIZES)


def test_the_package_lists_its_lazy_names():
    """dir(models) named none of them (a notebook's tab completion offered no get_model), where dir(pipeline)
    names its own."""
    assert set(models.__all__) <= set(dir(models)) and "get_model" in models.__all__


def test_torch_and_torchvision_are_imported_only_when_needed():
    """Each takes ~3 s to import on a small machine: the recipes need neither (tools/reproduce.py
    reads them), LeNet-5 needs no torchvision, a network built from torchvision's imports it."""
    code = ("import sys, models.recipes; assert 'torch' not in sys.modules; "
            "models.get_model('lenet5'); assert 'torchvision' not in sys.modules; "
            "models.get_model('resnet10_64s2'); assert 'torchvision' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("name", models.list_models())
def test_forward_backward_at_each_allowed_size(name):
    info = models.model_input(name)
    assert info["sizes"] == EXPECTED_SIZES[name]
    assert info["channels"] == (1 if name == "lenet5" else 3)
    torch.manual_seed(0)
    model = models.get_model(name)
    for size in info["sizes"]:
        x = torch.randn(2, info["channels"], size, size)
        out = model(x)
        assert out.shape == (2, 200)
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        model.zero_grad()


def test_lenet5_is_the_study_architecture():
    model = models.get_model("lenet5", num_classes=10)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(16, 1, 5, 5), (16,), (32, 16, 5, 5), (32,), (120, 512), (120,), (84, 120), (84,), (10, 84), (10,)]
    # The layers without parameters too: an average pool or a lost ReLU keeps every shape above.
    assert [type(m).__name__ for m in (*model.features, *model.classifier)] == [
        "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Linear", "ReLU", "Linear", "ReLU", "Linear"]


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 1, 64, 64), (2, 3, 28, 28), (1, 28, 28)])
def test_lenet5_names_the_input_it_takes(shape):
    with pytest.raises(ValueError) as e:
        models.get_model("lenet5")(torch.zeros(shape))
    assert str(e.value) == f"LeNet-5 takes (N, 1, 28, 28) batches (the gray28 variant, size 28), not {shape}"


@pytest.mark.parametrize("name, title, side, shape", [
    ("alexnet", "AlexNet", 63, (2, 3, 62, 62)), ("alexnet", "AlexNet", 63, (2, 3, 64, 32)),
    ("alexnet", "AlexNet", 63, (3, 64, 64)), ("squeezenet1_1", "SqueezeNet 1.1", 17, (2, 3, 16, 16)),
])
def test_a_network_names_the_smallest_input_it_takes(name, title, side, shape):
    """AlexNet below 63 pixels (make_loader's size=32) failed deep in its forward pass with torchvision's 'Given
    input size: (256x2x2). Calculated output size: (256x0x0). Output size is too small'; SqueezeNet 1.1 below 17."""
    model = models.get_model(name, num_classes=10)
    for network in (model, models.model_spec(name).build_pretrained(None)):  # pretrained=True's builder, no weights
        with pytest.raises(ValueError) as e:
            network(torch.zeros(shape))
        assert str(e.value) == (f"{title} takes (N, 3, H, W) batches with H and W of at least {side} (the rgb64 "
                                f"variant, size 64 or 224), not {shape}")
    assert model(torch.zeros(1, 3, side, side)).shape == (1, 10)


@pytest.mark.parametrize("name", models.list_models())
def test_each_models_head_names_its_last_layer(name):
    """`head` is what a weights file of another class count loses (and a fresh one replaces): the last
    layer, whose outputs are the classes. Another prefix dropped the wrong layer's tensors, and the file
    did not fit."""
    head = models.model_spec(name).head
    weights = models.get_model(name, num_classes=7).state_dict()
    assert [k for k in weights if k.startswith(head)] == [f"{head}weight", f"{head}bias"]
    assert weights[f"{head}weight"].shape[0] == 7 and list(weights)[-1] == f"{head}bias"
    spec = models.model_spec(name)
    if spec.reset_head:  # pretrained=True's head on the 1000-class network: the builder's layer, for 7 classes
        imagenet = spec.build(1000)
        spec.reset_head(imagenet, 7)
        assert {k: v.shape for k, v in imagenet.state_dict().items()} == {k: v.shape for k, v in weights.items()}


def test_64px_resnets_keep_64px_maps_in_the_first_stage():
    # The point of the 3x3 stride-1 stem without max-pool: layer1 sees the full 64x64 image
    # (torchvision's resnet18 sees 16x16 there); the s2 variants halve that once.
    seen = {}
    for name in ("resnet18", "resnet18_64", "resnet18_64s2", "resnet10_64s2"):
        model = models.get_model(name, num_classes=10)
        model.layer1.register_forward_hook(lambda m, i, o, name=name: seen.update({name: tuple(o.shape[-2:])}))
        model(torch.randn(1, 3, 64, 64))
    assert seen == {"resnet18": (16, 16), "resnet18_64": (64, 64), "resnet18_64s2": (32, 32), "resnet10_64s2": (32, 32)}
    assert models.get_model("resnet18_64").conv1.kernel_size == (3, 3)
    assert len(models.get_model("resnet10_64s2").layer3) == 1


@pytest.mark.parametrize("name, blocks", [("resnet18_64", 2), ("resnet18_64s2", 2), ("resnet10_64s2", 1)])
def test_64px_resnets_blocks_and_initialisation(name, blocks):
    """Their BasicBlocks per stage, each block's last BatchNorm at zero (zero_init_residual: every block
    starts as the identity), and the 3x3 stem initialised as ResNet's other convs (fan_out, relu)."""
    torch.manual_seed(0)
    model = models.get_model(name, num_classes=10)
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [len(stage) for stage in stages] == [blocks] * 4
    assert all(torch.all(block.bn2.weight == 0) for stage in stages for block in stage)
    assert model.conv1.weight.std().item() == pytest.approx((2 / (64 * 3 * 3)) ** 0.5, rel=0.1)

def test_register_refuses_duplicates():
    with pytest.raises(ValueError, match="'lenet5' is already registered"):
        models.register_model("lenet5", variant="gray28", channels=1, sizes=(28,), head="x")(lambda n: None)


def test_unknown_name():
    with pytest.raises(ValueError) as e:
        models.get_model("vgg16")
    assert str(e.value) == "unknown model 'vgg16'; choose from: alexnet, lenet5, resnet10_64s2, resnet18, resnet18_64, resnet18_64s2, squeezenet1_1"


def test_lenet5_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="lenet5 has no pretrained ImageNet weights"):
        models.get_model("lenet5", pretrained=True)


# --- --weights FILE ---------------------------------------------------------------------


def _same(a: nn.Module, b: nn.Module, skip: str | None = None) -> bool:
    """Equal state dicts, ignoring keys that start with `skip` (a replaced head)."""
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not (skip and k.startswith(skip)))


def test_weights_file_state_dict_and_checkpoint(tmp_path):
    src = models.get_model("lenet5", num_classes=10)
    torch.save(src.state_dict(), tmp_path / "sd.pth")
    torch.save({"model": src.state_dict(), "epoch": 3, "args": {"arch": "lenet5"}}, tmp_path / "ckpt.pth")
    for f in ("sd.pth", "ckpt.pth"):
        assert _same(src, models.get_model("lenet5", num_classes=10, weights=str(tmp_path / f)))


def test_weights_file_with_imagenet_head_keeps_a_fresh_head(tmp_path):
    src = models.get_model("resnet18", num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "imagenet.pth")
    model = models.get_model("resnet18", num_classes=200, weights=str(tmp_path / "imagenet.pth"))
    assert model.fc.out_features == 200
    assert _same(src, model, skip="fc.")


def test_weights_file_with_imagenet_head_gets_the_head_pretrained_puts_on(tmp_path):
    """SqueezeNet's builder starts its head at N(0, 0.01) with zero bias, --pretrained's (the study's) at
    PyTorch's default: Table 3's rows of tools/reproduce.py, which pass the ImageNet file as --weights,
    fine-tuned another start than `--recipe paper` (and the study) did."""
    spec = models.model_spec("squeezenet1_1")
    torch.save(spec.build(1000).state_dict(), tmp_path / "imagenet.pth")
    torch.manual_seed(0)
    model = models.get_model("squeezenet1_1", num_classes=200, weights=str(tmp_path / "imagenet.pth"))
    torch.manual_seed(0)
    expected = spec.build(200)  # loading a file draws no random numbers: reset_head draws what it did
    spec.reset_head(expected, 200)
    assert _same(expected, model, skip="features.")
    assert model.classifier[1].bias.abs().min() > 0


def test_weights_file_of_another_model_is_refused(tmp_path):
    """Every key was listed: 3,000 characters for AlexNet's file given to ResNet-18."""
    torch.save(models.get_model("lenet5").state_dict(), tmp_path / "lenet.pth")
    with pytest.raises(ValueError) as e:
        models.get_model("resnet18", weights=str(tmp_path / "lenet.pth"))
    assert str(e.value) == (f"{tmp_path / 'lenet.pth'}: does not fit this model (missing ['conv1.weight', 'bn1.weight', "
                            "'bn1.bias', 'bn1.running_mean'] and 98 more, unexpected ['features.0.weight', "
                            "'features.0.bias', 'features.3.weight', 'features.3.bias'] and 6 more)")


def test_a_checkpoint_of_another_network_with_the_same_tensors_is_refused(tmp_path):
    """resnet18_64 and resnet18_64s2 differ only in conv1's stride: one's checkpoint loaded into the
    other without a word (train.py --weights too), a network that was never trained so."""
    src = models.get_model("resnet18_64s2", num_classes=10)
    torch.save({"model": src.state_dict(), "args": {"arch": "resnet18_64s2"}}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError) as e:
        models.get_model("resnet18_64", num_classes=10, weights=str(tmp_path / "ckpt.pth"))
    assert str(e.value) == f"{tmp_path / 'ckpt.pth'}: holds resnet18_64s2 weights (a train.py checkpoint), not resnet18_64"
    assert _same(src, models.get_model("resnet18_64s2", num_classes=10, weights=str(tmp_path / "ckpt.pth")))


def test_a_damaged_weights_file_is_refused_naming_its_member(tmp_path):
    """torch.load does not check a file's CRC-32s: with one byte of its tensors flipped, a weights file
    loaded without a word, and was trained from or evaluated as it was."""
    src = models.get_model("lenet5", num_classes=10)
    torch.save(src.state_dict(), tmp_path / "good.pth")
    member = damage_torch_file(tmp_path / "bad.pth", tmp_path / "good.pth")
    assert len(torch.load(tmp_path / "bad.pth", weights_only=True)) == len(src.state_dict())  # torch reads it
    with pytest.raises(ValueError) as e:
        models.get_model("lenet5", num_classes=10, weights=str(tmp_path / "bad.pth"))
    assert str(e.value) == (f"{tmp_path / 'bad.pth'}: damaged: its {member} fails its CRC-32 check "
                            "(a bad copy, or a failing disk)")
    assert _same(src, models.get_model("lenet5", num_classes=10, weights=str(tmp_path / "good.pth")))


def test_a_file_that_is_no_state_dict_is_a_value_error(tmp_path):
    """From the Python API these were struct.error, KeyError or AttributeError from deep inside."""
    (tmp_path / "text.pth").write_text("bad gateway\n")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError) as e:
        models.get_model("lenet5", weights=str(tmp_path / "text.pth"))
    assert str(e.value) == f"{tmp_path / 'text.pth'}: not a weights file (IndexError)"
    with pytest.raises(ValueError) as e:
        models.get_model("lenet5", weights=str(tmp_path / "list.pth"))
    assert str(e.value) == f"{tmp_path / 'list.pth'}: not a state dict (a list)"
    for value, said in ((3, "an int"), (None, "None"), (torch.zeros(1), "a Tensor")):  # it said 'a int', 'a NoneType'
        torch.save(value, tmp_path / "other.pth")
        with pytest.raises(ValueError) as e:
            models.get_model("lenet5", weights=str(tmp_path / "other.pth"))
        assert str(e.value) == f"{tmp_path / 'other.pth'}: not a state dict ({said})"


def test_an_ema_checkpoint_gives_its_average(tmp_path):
    """A train.py checkpoint of an --ema run: the average is the network the run validated and tested."""
    model, average = (models.get_model("lenet5", num_classes=10) for _ in range(2))
    ema = {"module." + k: v for k, v in average.state_dict().items()}
    torch.save({"model": model.state_dict(), "ema": dict(ema, n_averaged=torch.tensor(3)), "args": {"arch": "lenet5"}},
               tmp_path / "ckpt.pth")
    assert _same(average, models.get_model("lenet5", num_classes=10, weights=str(tmp_path / "ckpt.pth")))


def test_a_file_without_the_head_does_not_fit(tmp_path):
    """Only a head of another class count is left out (and a fresh one kept); a file that has none is not the
    network's weights."""
    spec = models.model_spec("lenet5")
    body = {k: v for k, v in models.get_model("lenet5", num_classes=10).state_dict().items() if not k.startswith(spec.head)}
    torch.save(body, tmp_path / "body.pth")
    with pytest.raises(ValueError) as e:
        models.get_model("lenet5", num_classes=10, weights=str(tmp_path / "body.pth"))
    assert str(e.value).startswith(f"{tmp_path / 'body.pth'}: does not fit this model (missing ['{spec.head}")


def test_a_file_with_a_tensor_the_head_lacks_does_not_fit(tmp_path):
    """A key under the head's prefix that the network has no tensor for (another head's layer) is one the file
    has too many: the same ValueError as any other, not a KeyError from the check of the head's shapes."""
    spec = models.model_spec("lenet5")
    state = dict(models.get_model("lenet5", num_classes=10).state_dict(), **{spec.head + "scale": torch.ones(10)})
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(ValueError) as e:
        models.get_model("lenet5", num_classes=10, weights=str(tmp_path / "extra.pth"))
    assert str(e.value) == f"{tmp_path / 'extra.pth'}: does not fit this model (missing [], unexpected ['{spec.head}scale'])"


def test_pretrained_and_a_weights_file_are_one_or_the_other(tmp_path):
    with pytest.raises(ValueError) as e:
        models.get_model("resnet18", pretrained=True, weights=str(tmp_path / "w.pth"))
    assert str(e.value) == "pass either pretrained=True or weights=FILE, not both"


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True])
def test_num_classes_must_be_a_positive_integer(num_classes):
    with pytest.raises(ValueError) as e:
        models.get_model("lenet5", num_classes=num_classes)
    assert str(e.value) == f"num_classes must be a positive integer, not {num_classes!r}"


@pytest.mark.parametrize("pretrained", ["no", "False", 0, None])
def test_pretrained_must_be_true_or_false(pretrained):
    """A string is truthy: pretrained="no" (a config file's value) started from ImageNet's weights."""
    with pytest.raises(ValueError) as e:
        models.get_model("resnet18_64", pretrained=pretrained)
    assert str(e.value) == f"pretrained must be True or False, not {pretrained!r}"


def test_an_empty_weights_path_is_refused():
    """weights="" (an unset variable's value: os.environ.get("WEIGHTS", "")) started from scratch without a word,
    where train.py refuses an empty --weights for that reason."""
    with pytest.raises(ValueError) as e:
        models.get_model("lenet5", weights="")
    assert str(e.value) == "weights is empty: give a file's path, or None to start from scratch"


def test_num_classes_may_be_a_numpy_integer():
    model = models.get_model("lenet5", num_classes=np.int64(10))
    assert model.classifier[4].out_features == 10 and type(model.classifier[4].out_features) is int


# --- the real torch.hub download path, against a local HTTP server -------------------------


@pytest.fixture
def weights_server(tmp_path, monkeypatch):
    """Serve a 1000-class squeezenet1_1 state dict on 127.0.0.1 under a hub-style name.

    torchvision's builders call ``load_state_dict_from_url(check_hash=True)``, which
    checks the file against the hex digits after the last '-' in its name, so the file
    is named by its own SHA-256 prefix just like download.pytorch.org's files.
    """
    served = tmp_path / "served"
    served.mkdir()
    src = models.model_spec("squeezenet1_1").build(1000)
    torch.save(src.state_dict(), served / "tmp.pth")
    digest = hashlib.sha256((served / "tmp.pth").read_bytes()).hexdigest()[:8]
    (served / "tmp.pth").rename(served / f"squeezenet1_1-{digest}.pth")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=served))
    threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # never touch the user's cache
    weights = models.model_spec("squeezenet1_1").imagenet_weights()
    set_url = lambda url: monkeypatch.setattr(weights.value, "url", url)  # noqa: E731
    yield src, base, f"squeezenet1_1-{digest}.pth", set_url
    server.shutdown()


def test_pretrained_downloads_through_torch_hub(weights_server, tmp_path):
    src, base, name, set_url = weights_server
    set_url(f"{base}/{name}")
    model = models.get_model("squeezenet1_1", num_classes=200, pretrained=True)
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / name).exists()  # cached where TORCH_HOME says
    assert model.classifier[1].out_channels == 200 and model.num_classes == 200
    assert _same(src, model, skip="classifier.1.")
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 200)


def test_pretrained_with_imagenets_1000_classes_keeps_its_head(weights_server):
    """It was replaced by a freshly initialised 1000-class one: ImageNet's classifier, silently random."""
    src, base, name, set_url = weights_server
    set_url(f"{base}/{name}")
    assert _same(src, models.get_model("squeezenet1_1", num_classes=1000, pretrained=True))


def test_pretrained_missing_file_is_weights_unavailable(weights_server):
    _, base, _, set_url = weights_server
    set_url(f"{base}/squeezenet1_1-0123abcd.pth")
    with pytest.raises(models.WeightsUnavailable) as e:
        models.get_model("squeezenet1_1", pretrained=True)
    assert str(e.value) == (
        f"cannot download ImageNet weights for squeezenet1_1 from {base}/squeezenet1_1-0123abcd.pth (HTTP Error 404: File not found); "
        "download the file elsewhere and pass --weights FILE --norm imagenet"
    )


def test_pretrained_unreachable_host_is_weights_unavailable(weights_server):
    _, _, name, set_url = weights_server
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{name}"
    set_url(url)
    with pytest.raises(models.WeightsUnavailable) as e:
        models.get_model("squeezenet1_1", pretrained=True)
    assert str(e.value) == (
        f"cannot download ImageNet weights for squeezenet1_1 from {url} ([Errno 111] Connection refused); "
        "download the file elsewhere and pass --weights FILE --norm imagenet"
    )


def test_pretrained_hash_mismatch_is_weights_unavailable(weights_server, tmp_path):
    _, base, name, set_url = weights_server
    bad = "squeezenet1_1-00000000.pth"  # the name's hash prefix no longer matches the content
    (tmp_path / "served" / name).rename(tmp_path / "served" / bad)
    set_url(f"{base}/{bad}")
    with pytest.raises(models.WeightsUnavailable, match="invalid hash value"):
        models.get_model("squeezenet1_1", pretrained=True)


def test_a_cached_file_whose_bytes_fail_their_crc_is_named(weights_server, tmp_path):
    """A cached file with one byte of its tensors flipped loaded without a word (no hash check there, none in
    torch.load): ImageNet weights that are not ImageNet's, fine-tuned from."""
    src, base, name, set_url = weights_server
    set_url(f"{base}/{name}")
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / name
    cached.parent.mkdir(parents=True)
    torch.save(src.state_dict(), tmp_path / "good.pth")
    member = damage_torch_file(cached, tmp_path / "good.pth")
    with pytest.raises(models.WeightsUnavailable) as e:
        models.get_model("squeezenet1_1", pretrained=True)
    assert str(e.value) == (f"{cached}: torch.hub's cached ImageNet weights for squeezenet1_1 are damaged: its {member} "
                            "fails its CRC-32 check (a bad copy, or a failing disk); delete the file to download it "
                            "again, or pass --weights FILE --norm imagenet")


@pytest.mark.parametrize("content, error", [(b"bad gateway\n", "UnpicklingError"), (b"", "EOFError"), ("list", "TypeError"),
                                            ("resnet18", "RuntimeError")])
def test_a_damaged_file_in_the_hub_cache_is_named(weights_server, tmp_path, content, error):
    """torch.hub loads a cached file without a hash check. A damaged one (a text page, an empty file, a list, or
    another network's weights put there by hand) was a traceback, or train.py's 'error: --weights None: not a
    weights file', or 'cannot download' for a file nothing downloaded."""
    src, base, name, set_url = weights_server
    set_url(f"{base}/{name}")
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / name
    cached.parent.mkdir(parents=True)
    if content == "list":
        torch.save([1, 2], cached)
    elif content == "resnet18":
        torch.save(models.model_spec("resnet18").build(1000).state_dict(), cached)
    else:
        cached.write_bytes(content)
    with pytest.raises(models.WeightsUnavailable) as e:
        models.get_model("squeezenet1_1", pretrained=True)
    assert str(e.value) == (f"{cached}: torch.hub's cached ImageNet weights for squeezenet1_1 do not load ({error}); "
                            "delete the file to download it again, or pass --weights FILE --norm imagenet")
    torch.save(src.state_dict(), cached)  # a good one loads without the network
    set_url(f"http://127.0.0.1:9/{name}")
    assert _same(src, models.get_model("squeezenet1_1", pretrained=True), skip="classifier.1.")
