"""The model-parameter randomisation test: similarities against scipy / scikit-image / Quantus, and its controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from xraydeconv.metrics import sanity


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    ).eval()


def _film(n: int = 4, size: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g)


def _gradient(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """|d top logit / d x|: a method known to depend on the weights."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.gather(1, out.argmax(1, keepdim=True)).sum().backward()
    return x.grad[:, 0].abs()


def test_spearman_equals_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (3, 6, 7)).astype(np.float64)  # many ties
    b = a + rng.normal(0, 2, a.shape)
    ours = sanity.spearman(a, b)
    ref = [stats.spearmanr(np.abs(a[i]).ravel(), np.abs(b[i]).ravel())[0] for i in range(3)]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    assert np.isnan(sanity.spearman(np.ones((1, 4, 4)), b[:1, :4, :4])[0])  # constant map: undefined


def test_ssim_equals_scikit_image() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(3, 20, 17, generator=g), torch.rand(3, 20, 17, generator=g)
    b[1] = a[1] * 0.5 + b[1] * 0.5
    ours = sanity.ssim(a, b)
    for i in range(3):
        x, y = a[i].double().numpy(), b[i].double().numpy()
        rng = max(x.max(), y.max()) - min(x.min(), y.min())
        assert ours[i] == pytest.approx(metrics.structural_similarity(x, y, data_range=rng), abs=1e-10)
    assert sanity.ssim(a, a) == pytest.approx(np.ones(3), abs=1e-12)


def test_topk_overlap_counts_shared_top_pixels() -> None:
    a = torch.arange(20.0).view(1, 4, 5)       # top 4 = pixels 16..19
    b = a.clone()
    b[0, 3, 4] = -100.0                         # |b| keeps pixel 19 on top (abs)
    b[0, 3, 3] = 0.0                            # pixel 18 drops out; pixel 15 comes in
    assert sanity.topk_overlap(a, b, top=0.2)[0] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="top 0"):
        sanity.topk_overlap(a, b, top=0)


def test_layers_and_reinitialisation_match_quantus() -> None:
    quantus = pytest.importorskip("quantus")
    model = _net()
    for ours_order, their_order in (("cascading", "top_down"), ("independent", "independent")):
        theirs = quantus.helpers.model.pytorch_model.PyTorchModel(model, device="cpu")
        expected = {name: {k: v.clone() for k, v in m.state_dict().items()}
                    for name, m in theirs.get_random_layer_generator(order=their_order, seed=7)}
        got = {name: {k: v.clone() for k, v in m.state_dict().items()}
               for name, m in sanity.randomised_models(model, ours_order, seed=7)}
        # the same layers and weights; Quantus walks independent randomisation input side first, we output side first
        assert list(got) == list(expected) if ours_order == "cascading" else sorted(got) == sorted(expected)
        for name, sd in got.items():
            assert all(torch.equal(sd[k], expected[name][k]) for k in sd), (ours_order, name)


def test_spearman_scores_match_quantus_mprt() -> None:
    quantus = pytest.importorskip("quantus")
    model, x = _net(), _film()
    y = model(x).argmax(1)

    def explain_func(model, inputs, targets, **kwargs):
        return _gradient(model, torch.as_tensor(inputs)).unsqueeze(1).numpy()

    metric = quantus.MPRT(layer_order="top_down", seed=3, disable_warnings=True, display_progressbar=False)
    theirs = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None, explain_func=explain_func,
                    device="cpu", batch_size=len(x))
    ours = sanity.model_randomisation_test(model, _gradient, x, order="cascading", seed=3)
    assert ours.layers == [k for k in theirs if k != "original"]
    for i, name in enumerate(ours.layers):
        np.testing.assert_allclose(ours.scores["spearman"][i], theirs[name], rtol=0, atol=1e-10)


def test_controls_the_film_stays_similar_the_gradient_drops() -> None:
    model, x = _net(), _film()
    film = sanity.model_randomisation_test(model, lambda m, t: t[:, 0], x)
    for key in sanity.SIMILARITIES:
        np.testing.assert_allclose(film.scores[key], 1.0, atol=1e-12)
    grad = sanity.model_randomisation_test(model, _gradient, x, keep_maps=2)
    last = grad.summary()[-1]  # every layer randomised
    assert last["layer"] == "0" and last["spearman"] < 0.5 and last["topk"] < 0.6, last
    assert grad.maps.shape == (1 + len(grad.layers), 2, 24, 24)
    assert torch.equal(grad.maps[0], _gradient(model, x)[:2])


def test_the_trained_model_is_left_alone() -> None:
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    list(sanity.randomised_models(model, "independent"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(state, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="order 'sideways'"):
        next(sanity.randomised_models(model, "sideways"))
