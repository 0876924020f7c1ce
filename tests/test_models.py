"""The three anatomy classifiers: shapes, layer rules the deconvnet relies on, and bad names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xraydeconv.errors import UserError
from xraydeconv.nn import SwitchMaxPool2d
from xraydeconv.training.models import MODEL_NAMES, POSTER_ACCURACY, build, count_parameters

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
