"""The anatomy classifiers: shapes, layer rules the deconvnet relies on, resnet18, and bad names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xraydeconv.errors import UserError
from xraydeconv.nn import SwitchMaxPool2d
from xraydeconv.training.models import (
    ARCHITECTURES,
    MODEL_NAMES,
    POSTER_ACCURACY,
    BasicBlock,
    build,
    count_parameters,
)

ALLOWED = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, SwitchMaxPool2d, nn.Dropout)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("size", [64, 97, 128])
def test_logits_shape_for_any_input_size(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = build(name, num_classes=24, input_size=size).eval()
    x = torch.rand(3, 1, size, size)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (3, 24)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_features_then_classifier_is_the_forward(name: str) -> None:
    torch.manual_seed(0)
    model = build(name, num_classes=7, in_channels=3, input_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.classifier(model.features(x)), model(x), rtol=0, atol=0)
    assert model.model_name == name and model.input_size == 64


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_features_hold_only_layers_the_deconvnet_walks(name: str) -> None:
    model = build(name)
    assert isinstance(model.features, nn.Sequential)
    for layer in model.features:
        assert isinstance(layer, ALLOWED), type(layer)
    pools = [m for m in model.features if isinstance(m, SwitchMaxPool2d)]
    assert pools, "every net pools with switches"
    for p in pools:
        ks = p.kernel_size if isinstance(p.kernel_size, tuple) else (p.kernel_size, p.kernel_size)
        st = p.stride if isinstance(p.stride, tuple) else (p.stride, p.stride)
        assert ks == (2, 2) and st == (2, 2)
    assert not any(isinstance(m, nn.MaxPool2d) and not isinstance(m, SwitchMaxPool2d) for m in model.modules())


def test_shallow_is_shallow_and_deeper_is_vgg_like() -> None:
    shallow, deeper = build("shallow"), build("deeper")
    convs_s = [m for m in shallow.features if isinstance(m, nn.Conv2d)]
    convs_d = [m for m in deeper.features if isinstance(m, nn.Conv2d)]
    assert 2 <= len(convs_s) <= 3
    assert len(convs_d) >= 8
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1) for c in convs_d)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in deeper.features) == len(convs_d)
    # a conv's output feeds its BatchNorm, whose output feeds a ReLU
    layers = list(deeper.features)
    for i, m in enumerate(layers):
        if isinstance(m, nn.Conv2d):
            assert isinstance(layers[i + 1], nn.BatchNorm2d) and isinstance(layers[i + 2], nn.ReLU)
    assert count_parameters(shallow) < count_parameters(deeper) < 1_000_000


def test_deeper_aug_has_the_deeper_architecture() -> None:
    a, b = build("deeper"), build("deeper-aug")
    assert [tuple(v.shape) for v in a.state_dict().values()] == [tuple(v.shape) for v in b.state_dict().values()]
    assert list(a.state_dict()) == list(b.state_dict())


def test_native_pool_backend_matches_the_default() -> None:
    torch.manual_seed(0)
    a = build("deeper", pool_backend="native").eval()
    b = build("deeper").eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_gradients_reach_the_first_layer() -> None:
    model = build("deeper", input_size=64)
    model(torch.rand(4, 1, 64, 64)).logsumexp(1).sum().backward()
    first = model.features[0].weight.grad
    assert first is not None and first.abs().sum() > 0


def test_unknown_model_is_a_user_error() -> None:
    with pytest.raises(UserError, match="resnet"):
        build("resnet")
    with pytest.raises(UserError):
        build("deeper", num_classes=0)


def test_poster_numbers_cover_every_model() -> None:
    assert set(POSTER_ACCURACY) == set(MODEL_NAMES)


# --- resnet18: torchvision's layout, one input channel, not part of Table 1 ---------------------------------------


def _resnet18_parameter_count(in_channels: int, num_classes: int) -> int:
    """ResNet-18 counted layer by layer: convs without bias, BatchNorm weight + bias, the linear layer."""
    conv = lambda cin, cout, k: cin * cout * k * k  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total = conv(in_channels, 64, 7) + bn(64)
    cin = 64
    for i, w in enumerate((64, 128, 256, 512)):
        for j in range(2):
            c0 = cin if j == 0 else w
            total += conv(c0, w, 3) + bn(w) + conv(w, w, 3) + bn(w)
            if j == 0 and (i > 0 or c0 != w):
                total += conv(c0, w, 1) + bn(w)
        cin = w
    return total + 512 * num_classes + num_classes


def test_resnet18_is_an_architecture_but_not_a_table1_net() -> None:
    assert "resnet18" in ARCHITECTURES and "resnet18" not in MODEL_NAMES
    assert ARCHITECTURES[: len(MODEL_NAMES)] == MODEL_NAMES


@pytest.mark.parametrize("size", [64, 97, 128])
def test_resnet18_logits_shape_for_any_input_size(size: int) -> None:
    torch.manual_seed(0)
    model = build("resnet18", input_size=size).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 1, size, size))
    assert logits.shape == (2, 24) and torch.isfinite(logits).all()
    assert model.model_name == "resnet18" and model.input_size == size
    assert model.conv1.in_channels == 1 and model.fc.out_features == 24


def test_resnet18_parameter_count_and_torchvision_names() -> None:
    model = build("resnet18")
    assert count_parameters(model) == _resnet18_parameter_count(1, 24) == 11_182_552
    assert count_parameters(build("resnet18", num_classes=1000, in_channels=3)) == 11_689_512  # torchvision's
    keys = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer4.1.bn2.bias", "fc.weight", "fc.bias"} <= keys
    assert not any(k.startswith("layer1.0.downsample") for k in keys)


def test_resnet18_pools_with_switches_and_reuses_its_relus() -> None:
    model = build("resnet18", pool_backend="native")
    assert isinstance(model.maxpool, SwitchMaxPool2d) and model.maxpool.backend == "native"
    assert (model.maxpool.kernel_size, model.maxpool.stride, model.maxpool.padding) == ((3, 3), (2, 2), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8
    calls: dict[int, int] = {}
    for b in blocks:
        b.relu.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
    model(torch.rand(1, 1, 64, 64))
    assert sorted(calls.values()) == [2] * 8  # one ReLU module per block, called twice


def test_resnet18_native_pool_backend_matches_the_default() -> None:
    torch.manual_seed(0)
    a = build("resnet18", pool_backend="native").eval()
    b = build("resnet18").eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_resnet18_training_step() -> None:
    torch.manual_seed(0)
    model = build("resnet18", input_size=64)
    x, y = torch.rand(4, 1, 64, 64), torch.tensor([0, 5, 11, 23])
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["conv1.weight"].abs().sum() > 0, "the gradient reaches the first layer"
    opt.step()
    for n, p in model.named_parameters():  # plain SGD: w <- w - lr * grad
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * grads[n], rtol=0, atol=1e-6)
    # BatchNorm statistics moved by momentum 0.1 towards the batch mean of the stem's conv output (old weights)
    batch_mean = nn.functional.conv2d(x, before["conv1.weight"], stride=2, padding=3).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.bn1.running_mean, 0.9 * before["bn1.running_mean"] + 0.1 * batch_mean)
    assert int(model.bn1.num_batches_tracked) == 1
