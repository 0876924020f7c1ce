"""DeconvNet against Captum's neuron deconvolution / guided backprop and against autograd, on random nets."""

from __future__ import annotations

import pytest
import torch
from conftest import layer_gradient
from torch import nn

from xraydeconv.explain.deconvnet import DeconvNet

captum_attr = pytest.importorskip("captum.attr")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _randomise_bn(net: nn.Module, gen: torch.Generator) -> None:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)


def _net(arch: str, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    if arch == "plain":
        layers = [nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                  nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()]
    elif arch == "bn_overlap":  # BatchNorm, overlapping 3x3/s2 pooling, a strided conv, ceil_mode
        layers = [nn.Conv2d(1, 8, 5, padding=2), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2),
                  nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                  nn.MaxPool2d(3, 2, padding=1, ceil_mode=True), nn.Dropout(0.5),
                  nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
    elif arch == "rgb_valid":  # 3 input channels, valid convs, no pooling at the top
        layers = [nn.Conv2d(3, 6, 3), nn.ReLU(), nn.MaxPool2d(2, 2),
                  nn.Conv2d(6, 10, 3, padding="same"), nn.ReLU(),
                  nn.Conv2d(10, 10, 3, bias=False), nn.BatchNorm2d(10), nn.ReLU()]
    else:
        raise KeyError(arch)
    net = nn.Sequential(*layers)
    _randomise_bn(net, torch.Generator().manual_seed(seed + 1))
    return net.eval()


def _relus(net: nn.Sequential) -> list[nn.ReLU]:
    return [m for m in net if isinstance(m, nn.ReLU)]


def _captum(cls, net, relu, x, chans):
    """Captum neuron attribution with the design's selector, one call per (image, channel)."""
    out = []
    for b in range(x.shape[0]):
        row = []
        for c in chans[b].tolist():
            attr = cls(net, relu)
            a = attr.attribute(x[b : b + 1], neuron_selector=lambda o, c=c: (o[:, c] * o[:, c].detach()).sum((1, 2)))
            row.append(a[0])
        out.append(torch.stack(row))
    return torch.stack(out)


CASES = [
    ("plain", (2, 1, 32, 32), -1),
    ("bn_overlap", (3, 1, 37, 41), -1),  # odd sizes, batch > 1
    ("bn_overlap", (2, 1, 33, 33), 1),  # a middle layer
    ("rgb_valid", (2, 3, 27, 30), -1),
    ("rgb_valid", (1, 3, 27, 30), 0),
]


@pytest.mark.parametrize("arch,shape,layer", CASES)
def test_map_mode_equals_captum_neuron_deconvolution(arch, shape, layer):
    net = _net(arch)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(3))
    dn = DeconvNet(net, chunk_size=4)  # small chunks also exercise the chunking
    p = dn.project(x, top_n=4, layer=layer)
    assert p.maps.shape == (shape[0], 4, shape[1], shape[2], shape[3])
    assert p.channels.shape == p.activations.shape == (shape[0], 4)
    assert p.logits is None
    ref = _captum(captum_attr.NeuronDeconvolution, net, _relus(net)[layer], x, p.channels)
    assert ref.abs().sum() > 0
    assert _rel_err(p.maps, ref) <= 1e-4


@pytest.mark.parametrize("arch,shape,layer", CASES[:3])
def test_guided_equals_captum_neuron_guided_backprop(arch, shape, layer):
    net = _net(arch, seed=5)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(4))
    p = DeconvNet(net).project(x, top_n=3, layer=layer, method="guided")
    ref = _captum(captum_attr.NeuronGuidedBackprop, net, _relus(net)[layer], x, p.channels)
    assert _rel_err(p.maps, ref) <= 1e-4


def test_gradient_equals_autograd():
    net = _net("bn_overlap", seed=7)
    x = torch.rand(2, 1, 35, 35, generator=torch.Generator().manual_seed(5))
    p = DeconvNet(net).project(x, top_n=3, method="gradient")
    relu = _relus(net)[-1]
    for b in range(2):
        for k, c in enumerate(p.channels[b].tolist()):
            assert _rel_err(p.maps[b, k], layer_gradient(net, relu, x[b : b + 1], c)) <= 1e-4


def test_max_mode_keeps_only_the_strongest_activation():
    net = _net("bn_overlap", seed=2)
    x = torch.rand(2, 1, 40, 40, generator=torch.Generator().manual_seed(6))
    p = DeconvNet(net).project(x, top_n=3, mode="max")
    relu = _relus(net)[-1]
    store = {}
    h = relu.register_forward_hook(lambda m, i, o: store.__setitem__("o", o.detach()))
    net(x)
    h.remove()
    act = store["o"]
    for b in range(2):
        for k, c in enumerate(p.channels[b].tolist()):
            a = act[b, c]
            i, j = divmod(int(a.flatten().argmax()), a.shape[1])
            assert p.activations[b, k] == pytest.approx(a.max().item())
            attr = captum_attr.NeuronDeconvolution(net, relu)
            ref = attr.attribute(x[b : b + 1], neuron_selector=lambda o, c=c, i=i, j=j, v=a[i, j]: o[:, c, i, j] * v)
            assert _rel_err(p.maps[b, k], ref[0]) <= 1e-4
    # and it differs from the whole-map projection
    assert not torch.allclose(p.maps, DeconvNet(net).project(x, top_n=3).maps)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_blocks_of_images_and_filters_give_the_same_maps(chunk):
    net = _net("bn_overlap", seed=8)
    x = torch.rand(3, 1, 33, 35, generator=torch.Generator().manual_seed(10))
    ref = DeconvNet(net, chunk_size=1000).project(x, top_n=7)
    got = DeconvNet(net, chunk_size=chunk).project(x, top_n=7)
    assert torch.equal(got.channels, ref.channels)
    assert torch.allclose(got.maps, ref.maps, rtol=1e-5, atol=1e-7)


def test_ranking_max_and_mean():
    net = _net("plain", seed=1)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    store = {}
    h = _relus(net)[-1].register_forward_hook(lambda m, i, o: store.__setitem__("o", o.detach()))
    net(x)
    h.remove()
    act = store["o"].flatten(2)
    for rank, score in (("max", act.amax(2)), ("mean", act.mean(2))):
        p = DeconvNet(net).project(x, top_n=5, rank=rank)
        ref_v, ref_c = score.topk(5, dim=1)
        assert torch.equal(p.channels, ref_c)
        assert torch.allclose(p.activations, ref_v)
        assert (p.activations[:, :-1] >= p.activations[:, 1:]).all()


def test_shares_weights_and_folds_batchnorm_on_the_fly():
    net = _net("bn_overlap", seed=3)
    x = torch.rand(1, 1, 33, 33, generator=torch.Generator().manual_seed(2))
    dn = DeconvNet(net)
    before = dn.project(x, top_n=2)
    n_params = sum(p.numel() for p in net.parameters())
    with torch.no_grad():  # update the model after the DeconvNet was built: the projection must follow
        net[0].weight.mul_(-1.5)
        net[1].running_var.mul_(4.0)
    after = dn.project(x, top_n=2)
    ref = _captum(captum_attr.NeuronDeconvolution, net, _relus(net)[-1], x, after.channels)
    assert _rel_err(after.maps, ref) <= 1e-4
    assert not torch.allclose(before.maps, after.maps)
    assert sum(p.numel() for p in net.parameters()) == n_params


def test_training_mode_model_is_projected_with_eval_semantics():
    net = _net("bn_overlap", seed=4)
    x = torch.rand(2, 1, 33, 33, generator=torch.Generator().manual_seed(8))
    ref = DeconvNet(net).project(x, top_n=2)
    net.train()
    got = DeconvNet(net).project(x, top_n=2)
    assert net.training
    assert torch.equal(got.channels, ref.channels)
    assert torch.allclose(got.maps, ref.maps)


class _Classifier(nn.Module):
    def __init__(self, extra_head_op: bool = False):
        super().__init__()
        self.features = _net("plain", seed=9)
        self.classifier = nn.Sequential(nn.Linear(16 * 8 * 8, 5))
        self.extra = extra_head_op

    def forward(self, x):
        f = self.features(x)
        if self.extra:
            f = f * 2.0
        return self.classifier(torch.flatten(f, 1))


@pytest.mark.parametrize("extra", [False, True])
def test_model_with_features_and_classifier_gives_logits(extra):
    model = _Classifier(extra).eval()
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    dn = DeconvNet(model)
    for _ in range(2):  # the second call takes the fast head path when it is valid
        p = dn.project(x, top_n=3)
        assert torch.allclose(p.logits, model(x), atol=1e-5)
        assert torch.allclose(p.probs.sum(1), torch.ones(3))
    assert dn.resolve_layer("features.6") == 2 and dn.resolve_layer("7") == 2


def test_bad_arguments():
    dn = DeconvNet(_net("plain"))
    x = torch.rand(1, 1, 32, 32)
    with pytest.raises(ValueError, match="top_n 17"):
        dn.project(x, top_n=17)
    with pytest.raises(ValueError, match="top_n 0"):
        dn.project(x, top_n=0)
    with pytest.raises(ValueError, match="out of range"):
        dn.project(x, layer=3)
    with pytest.raises(ValueError, match="out of range"):
        dn.project(x, layer=-4)
    with pytest.raises(ValueError, match="not a conv layer"):
        dn.project(x, layer="2")  # the first MaxPool2d
    with pytest.raises(ValueError, match="mode"):
        dn.project(x, mode="mean")
    with pytest.raises(ValueError, match="expected"):
        dn.project(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="Linear has no Conv2d layer"):
        DeconvNet(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="cannot project through"):
        DeconvNet(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(2, 2, 3), nn.ReLU())).project(
            torch.rand(1, 1, 9, 9), top_n=1
        )


@pytest.mark.parametrize("name", ["shallow", "deeper"])
@pytest.mark.parametrize("backend", ["native", "auto"])
def test_package_models_with_switch_pooling_equal_captum(name, backend):
    import copy

    from xraydeconv.training.models import build

    torch.manual_seed(0)
    model = build(name, num_classes=24, input_size=48, pool_backend=backend)
    _randomise_bn(model, torch.Generator().manual_seed(1))
    x = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(2))
    p32 = DeconvNet(model.eval()).project(x, top_n=3)
    assert torch.allclose(p32.logits, model(x), atol=1e-5)
    # float64: in fp32 a random 8-layer net has max-pool windows whose two largest values differ in the 6th
    # digit, and the two implementations may then take different switches; in float64 they must agree exactly
    model = model.double()
    x = x.double()
    p = DeconvNet(model).project(x, top_n=3)
    assert torch.equal(p.channels, p32.channels)
    # Captum hooks every ReLU: give the reference copy non-inplace ones (same function)
    ref_model = copy.deepcopy(model)
    for i, m in enumerate(ref_model.features):
        if isinstance(m, nn.ReLU):
            ref_model.features[i] = nn.ReLU()
    ref = _captum(captum_attr.NeuronDeconvolution, ref_model, _relus(ref_model.features)[-1], x, p.channels)
    assert _rel_err(p.maps, ref) <= 1e-10


def test_bf16_walk_is_close_to_fp32():
    net = _net("bn_overlap", seed=6)
    x = torch.rand(2, 1, 45, 45, generator=torch.Generator().manual_seed(9))
    dn = DeconvNet(net)
    a, b = dn.project(x, top_n=4), dn.project(x, top_n=4, precision="bf16")
    assert b.maps.dtype == torch.float32 and torch.equal(a.channels, b.channels)
    assert _rel_err(b.maps, a.maps) <= 3e-2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_projection_matches_cpu():
    from xraydeconv.training.models import build

    torch.manual_seed(0)
    model = build("deeper", num_classes=24, input_size=64)
    _randomise_bn(model, torch.Generator().manual_seed(1))
    model = model.double().eval()  # float64: no max-pool near-ties between the two devices' convolutions
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cpu = DeconvNet(model).project(x, top_n=5)
    gpu = DeconvNet(model.cuda()).project(x.cuda(), top_n=5)
    assert torch.equal(gpu.channels.cpu(), cpu.channels)
    assert _rel_err(gpu.maps.cpu(), cpu.maps) <= 1e-10
