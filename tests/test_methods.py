"""The attribution methods of ``heat_maps``: each recomputed independently (by hand, with Captum, through the
evaluation's own code path), and the controls of the randomisation test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xraydeconv.explain.deconvnet import DeconvNet
from xraydeconv.explain.methods import METHODS, explainer, gradcam_layer, heat_maps
from xraydeconv.metrics.sanity import model_randomisation_test
from xraydeconv.training.models import build

SIZE = 32


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, SIZE, SIZE) noisy films with one bright square whose third of the image (left/middle/right) is the
    class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.2 * torch.rand(n, 1, SIZE, SIZE, generator=g)
    rows = torch.randint(2, SIZE - 8, (n,), generator=g)
    for i in range(n):
        c = int(y[i]) * (SIZE // 3) + 2
        x[i, 0, rows[i]: rows[i] + 6, c: c + 6] += 0.8
    return x, y


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor]:
    """The ``shallow`` net trained for a few steps on the blobs (test accuracy checked), and 4 test films."""
    torch.manual_seed(0)
    model = build("shallow", num_classes=3, input_size=SIZE)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        x, y = _blobs(32, step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    x, y = _blobs(64, 1000)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.9  # it learnt the task: the controls mean something
    return model, x[:4]


class _Residual(nn.Module):
    """A small non-Sequential net (a skip connection): read as a graph by the deconvnet."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = self.act(self.block(h) + h)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_float_map_per_image(trained, method):
    model, x = trained
    kw = {"patch": 8, "stride": 4} if method == "occlusion" else {}
    maps = heat_maps(model, x[:2], method, top_n=4, **kw)
    assert maps.shape == (2, SIZE, SIZE) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.flatten(1).amax(1).gt(0).all()  # non-negative, never all zero here
    again = explainer(method, top_n=4, **kw)(model, x[:2])
    assert torch.equal(maps, again)


@pytest.mark.parametrize("method", ["deconvnet", "guided", "gradcam", "gradient-x-input"])
def test_methods_on_a_graph_model(method):
    x = torch.rand(2, 1, 12, 12)
    maps = heat_maps(_Residual().eval(), x, method, top_n=3)
    assert maps.shape == (2, 12, 12) and maps.dtype == torch.float32


@pytest.mark.parametrize("method,mode,walk", [("deconvnet", "map", "deconvnet"), ("deconvnet-max", "max", "deconvnet"),
                                              ("guided", "map", "guided"), ("gradient", "map", "gradient")])
def test_projected_methods_are_the_reports_combined_map(trained, method, mode, walk):
    from xraydeconv.reports import render

    model, x = trained
    p = DeconvNet(model).project(x, top_n=5, mode=mode, method=walk)
    want = render.heatmap(render.filter_heatmaps(p.maps.cpu()))
    assert torch.equal(heat_maps(model, x, method, top_n=5), want)


def test_deconvnet_row_is_the_evaluations_heat_map(tmp_path, monkeypatch):
    """Run ``evaluate`` on phantoms with a briefly trained net, catch the combined maps (and the film baseline) it
    scores, and get the same bits from ``heat_maps``."""
    from xraydeconv.data import open_dataset
    from xraydeconv.data.phantoms import generate
    from xraydeconv.reports import evaluate as ev
    from xraydeconv.training.checkpoint import save_checkpoint

    data = generate(tmp_path / "ph", per_class=1, size=64, seed=3, bias="marker", splits=("val", "test"),
                    progress=False)
    ds = open_dataset(data, split="val", input_size=64)
    torch.manual_seed(0)
    model = build("deeper", num_classes=len(ds.class_names), input_size=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xs, ys = torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))])
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(xs), ys).backward()
        opt.step()
    model.eval()
    ckpt = tmp_path / "net.pt"
    save_checkpoint(ckpt, model, model_name="deeper", class_names=list(ds.class_names),
                           input_size=64, config={"input_size": 64}, epoch=1)
    seen = []
    add = ev.LandmarkAgreement.add
    monkeypatch.setattr(ev.LandmarkAgreement, "add", lambda self, labels, heats, combined, masks, images=None: (
        seen.append((combined.clone(), images.clone())), add(self, labels, heats, combined, masks, images=images))[1])
    ev.evaluate(ckpt, tmp_path / "ev", data, ev.EvalOptions(top_n=6, limit=6, occlusion=False, examples=0,
                                                            max_misclassified=0), progress=False)
    assert seen
    from xraydeconv.training.checkpoint import load_checkpoint

    net = load_checkpoint(ckpt).model.eval()
    for combined, images in seen:
        x = images.unsqueeze(1)  # one channel: its mean over channels is the film itself
        assert torch.equal(heat_maps(net, x, "deconvnet", top_n=6), combined)
        assert torch.equal(heat_maps(net, x, "film"), images)


def _logit_grad_by_hand(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """d logit_t / d x one image at a time, through ``.backward()`` on each image's own logit."""
    rows = []
    for i in range(x.shape[0]):
        xi = x[i: i + 1].clone().requires_grad_(True)
        model(xi)[0, t[i]].backward()
        rows.append(xi.grad[0])
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def test_gradient_x_input_and_saliency(trained):
    captum = pytest.importorskip("captum.attr")
    model, x = trained
    t = model(x).argmax(1)
    g = _logit_grad_by_hand(model, x, t)
    gxi, sal = heat_maps(model, x, "gradient-x-input"), heat_maps(model, x, "saliency")
    torch.testing.assert_close(gxi, (g * x).sum(1).abs(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sal, g.abs().amax(1), rtol=0, atol=1e-6)
    ref = captum.InputXGradient(model).attribute(x.clone(), target=t).sum(1).abs()
    torch.testing.assert_close(gxi, ref, rtol=0, atol=1e-5)
    ref = captum.Saliency(model).attribute(x.clone(), target=t, abs=True).amax(1)
    torch.testing.assert_close(sal, ref, rtol=0, atol=1e-5)
    # a given target: the other class's logit, recomputed
    other = (t + 1) % 3
    torch.testing.assert_close(heat_maps(model, x, "gradient-x-input", target=other),
                               (_logit_grad_by_hand(model, x, other) * x).sum(1).abs(), rtol=0, atol=1e-6)


def test_gradient_x_input_of_a_linear_model_is_analytic():
    torch.manual_seed(1)
    lin = nn.Linear(2 * 5 * 5, 3)
    model = nn.Sequential(nn.Flatten(), lin).eval()
    x = torch.randn(2, 2, 5, 5)
    maps = heat_maps(model, x, "gradient-x-input", target=[2, 0])
    w = lin.weight.detach().view(3, 2, 5, 5)
    want = torch.stack([(w[2] * x[0]).sum(0).abs(), (w[0] * x[1]).sum(0).abs()])
    torch.testing.assert_close(maps, want, rtol=0, atol=1e-6)


def _gradcam_by_hand(below: nn.Module, above: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a = below(x).detach().requires_grad_(True)
    above(a).gather(1, t[:, None]).sum().backward()
    alpha = a.grad.mean((2, 3))  # (B, K)
    cam = torch.einsum("bk,bkhw->bhw", alpha, a.detach()).clamp_min(0)
    return F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def test_gradcam_by_hand_and_captum(trained):
    captum = pytest.importorskip("captum.attr")
    model, x = trained
    t = model(x).argmax(1)
    feats = list(model.features)
    relu = gradcam_layer(model)  # the deconvnet's default layer: the ReLU after the last conv
    k = next(i for i, m in enumerate(feats) if m is relu)
    assert isinstance(relu, nn.ReLU) and isinstance(feats[k - 1], nn.Conv2d)
    assert not any(isinstance(m, nn.Conv2d) for m in feats[k:])
    below = nn.Sequential(*feats[: k + 1])
    above = lambda a: model.classifier(nn.Sequential(*feats[k + 1:])(a))  # noqa: E731
    cam = heat_maps(model, x, "gradcam")
    torch.testing.assert_close(cam, _gradcam_by_hand(below, above, x, t), rtol=0, atol=1e-6)
    ref = captum.LayerGradCam(model, relu).attribute(x, target=t, relu_attributions=True)
    ref = captum.LayerAttribution.interpolate(ref, (SIZE, SIZE), "bilinear")[:, 0]
    torch.testing.assert_close(cam, ref, rtol=0, atol=1e-5)
    # the first conv by index is weighed at its ReLU, as the deconvnet starts there
    first_relu = gradcam_layer(model, 0)
    assert first_relu is feats[1] and gradcam_layer(model, "0") is first_relu
    ref = captum.LayerGradCam(model, first_relu).attribute(x, target=t, relu_attributions=True)
    torch.testing.assert_close(heat_maps(model, x, "gradcam", layer=0),
                               captum.LayerAttribution.interpolate(ref, (SIZE, SIZE), "bilinear")[:, 0],
                               rtol=0, atol=1e-5)


def test_gradcam_at_a_named_module_of_another_model():
    captum = pytest.importorskip("captum.attr")
    model, x = _Residual().eval(), torch.rand(3, 1, 12, 12)
    cam = heat_maps(model, x, "gradcam", layer="block", target=2)
    assert (cam.flatten(1).amax(1) > cam.flatten(1).amin(1)).all()
    ref = captum.LayerGradCam(model, model.block).attribute(x, target=2, relu_attributions=True)
    torch.testing.assert_close(cam, captum.LayerAttribution.interpolate(ref, (12, 12), "bilinear")[:, 0],
                               rtol=1e-5, atol=1e-9)  # a random net's map is small: compare relatively
    assert gradcam_layer(model) is model.act  # the graph's default layer: the last feature map before pooling
    with pytest.raises(ValueError, match="nowhere"):
        heat_maps(model, x, "gradcam", layer="nowhere")


def test_occlusion_map_recomputed_on_a_tiny_input():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 2)).eval()
    x = torch.rand(2, 1, 6, 6)
    maps = heat_maps(model, x, "occlusion", patch=3, stride=2, target=[1, 0])
    want = torch.zeros(2, 6, 6, dtype=torch.float64)
    for b, t in enumerate([1, 0]):
        clean = torch.softmax(model(x[b: b + 1]), 1)[0, t]
        acc, cnt = torch.zeros(6, 6, dtype=torch.float64), torch.zeros(6, 6, dtype=torch.float64)
        for y0 in (0, 2, 3):  # 0, 2 and the far edge 6 - 3
            for x0 in (0, 2, 3):
                occ = x[b: b + 1].clone()
                occ[..., y0: y0 + 3, x0: x0 + 3] = x[b].mean()
                drop = clean - torch.softmax(model(occ), 1)[0, t]
                acc[y0: y0 + 3, x0: x0 + 3] += float(drop.detach())
                cnt[y0: y0 + 3, x0: x0 + 3] += 1
        want[b] = (acc / cnt).clamp_min(0)
    torch.testing.assert_close(maps, want.float(), rtol=0, atol=1e-6)


def test_sanity_controls(trained):
    """The film does not depend on the weights (similarity 1 at every step); the saliency and the projected
    gradient do, and drop as the net is randomised; the projections do not see the classifier at all."""
    model, x = trained
    film = model_randomisation_test(model, explainer("film"), x)
    for key in ("spearman", "ssim", "topk"):
        np.testing.assert_allclose(film.scores[key], 1.0, rtol=0, atol=1e-12)
    sal = model_randomisation_test(model, explainer("saliency"), x)
    assert isinstance(model.get_submodule(sal.layers[0]), nn.Linear)  # the classifier goes first
    assert np.nanmean(sal.scores["spearman"][0]) < 0.5 and np.nanmean(sal.scores["spearman"][-1]) < 0.2
    grad = model_randomisation_test(model, explainer("gradient", top_n=4), x)
    assert [isinstance(model.get_submodule(n), nn.Linear) for n in grad.layers] == [True, False, False, False]
    np.testing.assert_allclose(grad.scores["spearman"][0], 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(grad.scores["ssim"][0], 1.0, rtol=0, atol=1e-12)
    rho = np.nanmean(grad.scores["spearman"], axis=1)
    assert np.all(np.diff(rho) < 0) and rho[-1] < 0.6  # each conv randomised takes more away
    assert np.nanmean(grad.scores["ssim"][-1]) < 0.3


def test_bad_arguments(trained):
    model, x = trained
    with pytest.raises(ValueError, match="method 'lrp'"):
        heat_maps(model, x, "lrp")
    with pytest.raises(ValueError, match="unknown option.*patch"):
        heat_maps(model, x, "gradcam", patch=3)
    with pytest.raises(ValueError, match="unknown option.*mode"):
        explainer("deconvnet-max", mode="map")
    with pytest.raises(ValueError, match="target: 3 classes for 4 images"):
        heat_maps(model, x, "saliency", target=[0, 1, 2])
    with pytest.raises(ValueError, match="another model"):
        heat_maps(model, x, "deconvnet", deconvnet=DeconvNet(_Residual()))


def test_gradcam_of_the_resnet_at_its_default_layer():
    captum = pytest.importorskip("captum.attr")
    torch.manual_seed(4)
    model, x = build("resnet18", num_classes=3, input_size=64).eval(), torch.rand(2, 1, 64, 64)  # layer4: 2x2
    assert gradcam_layer(model) is model.layer4
    assert DeconvNet(model).layer_name() == "layer4"
    t = model(x).argmax(1)
    ref = captum.LayerGradCam(model, model.layer4).attribute(x, target=t, relu_attributions=True)
    assert ref.shape == (2, 1, 2, 2) and (ref.flatten(1).amax(1) > ref.flatten(1).amin(1)).all()
    torch.testing.assert_close(heat_maps(model, x, "gradcam"),
                               captum.LayerAttribution.interpolate(ref, (64, 64), "bilinear")[:, 0],
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no such module"):
        heat_maps(_Residual().eval(), x[:, :, :12, :12], "gradcam", layer=0)  # its first conv feeds F.relu
