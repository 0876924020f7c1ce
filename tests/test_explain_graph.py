"""DeconvNet on any nn.Module CNN (its torch.fx graph): against Captum on ResNet-, DenseNet- and VGG-like nets and
on a net written with functional ReLU and pooling."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from conftest import layer_gradient
from torch import nn

from xraydeconv.explain.deconvnet import DeconvNet
from xraydeconv.explain.graph_deconvnet import GraphDeconvNet

captum_attr = pytest.importorskip("captum.attr")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _randomise_bn(net: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)
    return net.eval()


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ReLU module called twice, ``out += identity``, a 1x1 strided downsample."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNetLike(nn.Module):
    def __init__(self, widths=(8, 16, 16, 32), blocks=(2, 1, 1, 1), in_ch: int = 1, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(2 * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, feats):
        x = torch.cat(feats, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.ModuleDict):
    def __init__(self, n: int, cin: int, growth: int):
        super().__init__({f"denselayer{i + 1}": DenseLayer(cin + i * growth, growth) for i in range(n)})

    def forward(self, x):
        feats = [x]
        for layer in self.values():
            feats.append(layer(feats))
        return torch.cat(feats, 1)


class DenseNetLike(nn.Module):
    """torchvision's DenseNet layout: dense blocks concatenating, transitions with average pooling, and a
    functional ``F.relu`` after ``features``."""

    def __init__(self, growth: int = 4, classes: int = 5, relu_module: bool = False):
        super().__init__()
        # with relu_module, the final ReLU is a module (Captum can hook it): the same network otherwise
        self.final_relu = nn.ReLU() if relu_module else None
        c = 8
        feats = [("conv0", nn.Conv2d(1, c, 5, 2, 2, bias=False)), ("norm0", nn.BatchNorm2d(c)),
                 ("relu0", nn.ReLU(inplace=True)), ("pool0", nn.MaxPool2d(3, 2, 1))]
        for b in range(2):
            feats.append((f"denseblock{b + 1}", DenseBlock(3, c, growth)))
            c += 3 * growth
            if b == 0:
                trans = nn.Sequential()
                trans.add_module("norm", nn.BatchNorm2d(c))
                trans.add_module("relu", nn.ReLU(inplace=True))
                trans.add_module("conv", nn.Conv2d(c, c // 2, 1, bias=False))
                trans.add_module("pool", nn.AvgPool2d(2, 2))
                feats.append(("transition1", trans))
                c //= 2
        feats.append(("norm5", nn.BatchNorm2d(c)))
        self.features = nn.Sequential(OrderedDict(feats))
        self.classifier = nn.Linear(c, classes)

    def forward(self, x):
        out = self.final_relu(self.features(x)) if self.final_relu else F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


class VGGLike(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        cfg = [8, "M", 16, 16, "M", 24]
        layers, c = [], 1
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(c * 4, 16), nn.ReLU(True), nn.Dropout(), nn.Linear(16, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class FunctionalNet(nn.Module):
    """ReLUs and pooling as functions (``functional=True``) or as modules: the same network either way."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3)
        self.r1, self.r2, self.r3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.p1, self.p2 = nn.MaxPool2d(2), nn.AvgPool2d(3, 2, 1)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        if self.functional:
            x = F.max_pool2d(F.relu(self.c1(x)), 2)
            x = F.avg_pool2d(torch.relu(self.c2(x)), 3, 2, 1)
            x = self.c3(x).relu()
        else:
            x = self.p2(self.r2(self.c2(self.p1(self.r1(self.c1(x))))))
            x = self.r3(self.c3(x))
        return self.head(x.mean((2, 3)))


def _net(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = {"resnet": ResNetLike, "densenet": DenseNetLike, "vgg": VGGLike}[name]()
    return _randomise_bn(net, seed + 1)


def _captum(net, layer_module, x, chans, cls=None):
    """Captum's neuron attribution with the whole-map selector, one call per (image, channel)."""
    cls = cls or captum_attr.NeuronDeconvolution
    out = []
    for b in range(x.shape[0]):
        row = []
        for c in chans[b].tolist():
            attr = cls(net, layer_module)
            sel = lambda o, c=c: (o[:, c] * o[:, c].detach()).sum((1, 2))  # noqa: E731
            row.append(attr.attribute(x[b : b + 1], neuron_selector=sel)[0])
        out.append(torch.stack(row))
    return torch.stack(out)


X_SHAPE = (2, 1, 45, 49)  # a batch of 2 at an odd size


def _x(seed: int = 3, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(*X_SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize(
    "layer,module",
    [(None, lambda n: n.layer4), ("layer3", lambda n: n.layer3), ("layer1.1", lambda n: n.layer1[1]),
     (0, lambda n: n.relu)],  # conv index 0: the stem conv's ReLU
)
def test_resnet_like_equals_captum(layer, module):
    net = _net("resnet")
    x = _x()
    dn = DeconvNet(net, chunk_size=4)
    assert dn.graph is not None
    p = dn.project(x, top_n=3, layer=layer)
    assert p.maps.shape == (2, 3, 1, 45, 49)
    assert torch.allclose(p.logits, net(x), atol=1e-5)
    assert p.layer_name == {None: "layer4", 0: "relu"}.get(layer, layer)
    assert p.layer == (0 if layer == 0 else -1)
    ref = _captum(net, module(net), x, p.channels)
    assert ref.abs().sum() > 0
    assert _rel_err(p.maps, ref) <= 1e-4


@pytest.mark.parametrize("name,layer", [("resnet", None), ("resnet", "layer2"), ("densenet", "features.denseblock2")])
def test_float64_equals_captum_to_1e_10(name, layer):
    net = _net(name).double()
    x = _x(dtype=torch.float64)
    p = DeconvNet(net).project(x, top_n=2, layer=layer)
    ref = _captum(net, net.get_submodule(layer or "layer4"), x, p.channels)
    assert _rel_err(p.maps, ref) <= 1e-10


@pytest.mark.parametrize("layer", [None, "features.denseblock1", "features.transition1"])
def test_densenet_like_equals_captum(layer):
    net = _net("densenet")
    # the default layer is the functional F.relu after `features`; Captum hooks modules only, so its reference
    # is the twin network whose final ReLU is a module
    twin = DenseNetLike(relu_module=True).eval()
    twin.load_state_dict(net.state_dict())
    x = _x(4)
    p = DeconvNet(net, chunk_size=3).project(x, top_n=4, layer=layer)
    assert p.layer_name == (layer or "relu")
    assert torch.allclose(p.logits, net(x), atol=1e-5)
    ref = _captum(twin, twin.final_relu if layer is None else twin.get_submodule(layer), x, p.channels)
    assert _rel_err(p.maps, ref) <= 1e-4


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("layer", [None, "features.9", "features.3"])
def test_vgg_like_equals_captum_on_both_walks(graph, layer):
    net = _net("vgg")
    x = _x(5)
    dn = GraphDeconvNet(net) if graph else DeconvNet(net)
    if not graph:
        assert dn.graph is None  # a Sequential `features` of convs keeps the step-list walk
        if layer == "features.3":  # the step-list walk starts at convs and their ReLUs only
            with pytest.raises(ValueError, match="MaxPool2d is not a conv layer"):
                dn.project(x, top_n=3, layer=layer)
            return
    p = dn.project(x, top_n=3, layer=layer)
    # both defaults start at the last ReLU (the graph's: the last map before global pooling); the step-list walk
    # records the conv's name, as it always has
    names = {None: "features"} if graph else {None: "features.11", "features.9": "features.7"}
    assert p.layer_name == names.get(layer, layer)
    ref = _captum(net, net.get_submodule(layer or "features.13"), x, p.channels)
    assert _rel_err(p.maps, ref) <= 1e-4


def test_graph_named_conv_starts_at_its_own_output():
    """A conv named as the layer: the graph walk starts at the conv's output, before its (folded) BatchNorm."""
    net = _net("vgg")
    x = _x(6)
    p = GraphDeconvNet(net).project(x, top_n=3, layer="features.7")
    assert p.layer == 2
    ref = _captum(net, net.features[7], x, p.channels)
    assert _rel_err(p.maps, ref) <= 1e-4


def _functional_twins(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    fn = FunctionalNet(functional=True).eval()
    mod = FunctionalNet(functional=False).eval()
    mod.load_state_dict(fn.state_dict())
    return fn, mod


@pytest.mark.parametrize("layer,captum_layer", [(None, "r3"), ("c2", "c2"), (1, "r2")])
def test_functional_relu_and_pooling_are_walked_like_modules(layer, captum_layer):
    """F.relu / torch.relu / Tensor.relu and F.max_pool2d / F.avg_pool2d are walked like their modules: the
    projection of the functional net equals Captum's on the twin built from modules."""
    fn, mod = _functional_twins()
    x = _x(7)
    names = {None: "relu_2", 1: "relu_1"}  # graph node names of Tensor.relu() and torch.relu
    dn = DeconvNet(fn)
    assert dn.layer_name(layer) == names.get(layer, layer)
    p = dn.project(x, top_n=4, layer=layer)
    assert torch.allclose(p.logits, mod(x), atol=1e-6)
    ref = _captum(mod, mod.get_submodule(captum_layer), x, p.channels)
    assert _rel_err(p.maps, ref) <= 1e-4
    assert _rel_err(DeconvNet(mod).project(x, top_n=4, layer={None: "r3", 1: "r2"}.get(layer, layer)).maps, ref) <= 1e-4


def test_captum_cannot_see_functional_relu():
    """Captum's deconvolution hooks ReLU modules only: on the functional net it takes the plain gradient at each
    F.relu, which is not the deconvnet; ours rectifies there as at a module."""
    fn, mod = _functional_twins()
    x = _x(7)
    p = DeconvNet(fn).project(x, top_n=3, layer="c2")
    captum_fn = _captum(fn, fn.c2, x, p.channels)
    captum_mod = _captum(mod, mod.c2, x, p.channels)
    assert _rel_err(p.maps, captum_mod) <= 1e-4
    assert _rel_err(captum_fn, captum_mod) > 1e-2


@pytest.mark.parametrize("name,layer", [("resnet", None), ("resnet", "layer2.0"), ("densenet", "features.denseblock2")])
def test_guided_backprop_equals_captum(name, layer):
    net = _net(name, seed=2)
    x = _x(8)
    p = DeconvNet(net).project(x, top_n=3, layer=layer, method="guided")
    ref = _captum(net, net.get_submodule(layer or "layer4"), x, p.channels, captum_attr.NeuronGuidedBackprop)
    assert _rel_err(p.maps, ref) <= 1e-4


@pytest.mark.parametrize("name,layer", [("densenet", "features.denseblock2"), ("resnet", "layer3")])
def test_gradient_equals_autograd(name, layer):
    net = _net(name, seed=3)
    x = _x(9)
    p = DeconvNet(net).project(x, top_n=2, layer=layer, method="gradient")
    module = net.get_submodule(layer)
    for b in range(2):
        for k, c in enumerate(p.channels[b].tolist()):
            assert _rel_err(p.maps[b, k], layer_gradient(net, module, x[b : b + 1], c)) <= 1e-4


def test_max_mode_equals_captum_single_neuron():
    net = _net("resnet", seed=4)
    x = _x(10)
    p = DeconvNet(net).project(x, top_n=2, mode="max")
    act = {}
    h = net.layer4.register_forward_hook(lambda m, i, o: act.__setitem__("o", o.detach()))
    net(x)
    h.remove()
    for b in range(2):
        for k, c in enumerate(p.channels[b].tolist()):
            a = act["o"][b, c]
            i, j = divmod(int(a.flatten().argmax()), a.shape[1])
            assert p.activations[b, k] == a.max()
            attr = captum_attr.NeuronDeconvolution(net, net.layer4)
            ref = attr.attribute(x[b : b + 1], neuron_selector=lambda o, c=c, i=i, j=j, v=a[i, j]: o[:, c, i, j] * v)
            assert _rel_err(p.maps[b, k], ref[0]) <= 1e-4


@pytest.mark.parametrize("name", ["resnet", "densenet", "vgg"])
def test_sparse_and_dense_graph_walks_agree(name):
    net = _net(name, seed=5)
    x = _x(11)
    a = GraphDeconvNet(net, sparse=True).project(x, top_n=5)
    b = GraphDeconvNet(net, sparse=False).project(x, top_n=5)
    assert torch.equal(a.channels, b.channels)
    assert _rel_err(a.maps, b.maps) <= 1e-5


def test_bf16_graph_walk_is_close_to_fp32():
    net = _net("resnet", seed=6)
    x = _x(12)
    dn = DeconvNet(net)
    a, b = dn.project(x, top_n=4), dn.project(x, top_n=4, precision="bf16")
    assert b.maps.dtype == torch.float32 and torch.equal(a.channels, b.channels)
    assert _rel_err(b.maps, a.maps) <= 3e-2


def test_training_mode_is_projected_with_eval_semantics_and_shares_weights():
    net = _net("resnet", seed=7)
    x = _x(13)
    dn = DeconvNet(net)
    ref = dn.project(x, top_n=3)
    net.train()
    got = dn.project(x, top_n=3)
    assert net.training and torch.equal(got.maps, ref.maps)
    net.eval()
    with torch.no_grad():  # the projection follows the model's current weights
        net.layer1[0].conv1.weight.mul_(-2.0)
        net.layer1[0].bn1.running_var.mul_(3.0)
    after = dn.project(x, top_n=3)
    assert _rel_err(after.maps, _captum(net, net.layer4, x, after.channels)) <= 1e-4
    assert not torch.allclose(after.maps, ref.maps)


class _Odd(nn.Module):
    """A small net with a Tanh module and a sigmoid function in its trunk and a sigmoid head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh())
        self.conv = nn.Conv2d(4, 4, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.sigmoid(self.stem(x))
        x = self.relu(self.conv(x))
        return torch.sigmoid(self.fc(x.amax((2, 3))))


def test_unsupported_operations_are_named_with_their_place():
    net = _Odd().eval()
    x = torch.rand(1, 1, 12, 12)
    dn = DeconvNet(net)
    with pytest.raises(ValueError, match=r"layer 'relu': cannot project through sigmoid \(torch.sigmoid\)"):
        dn.project(x, top_n=1)
    with pytest.raises(ValueError, match=r"cannot project through stem.1 \(Tanh\)"):
        dn.resolve_layer("stem")
    # from the first conv, nothing unknown lies below; the sigmoid head is run as the model runs it
    p = dn.project(x, top_n=2, layer="stem.0")
    assert torch.allclose(p.logits, net(x))
    ref = _captum(net, net.stem[0], x, p.channels)
    assert _rel_err(p.maps, ref) <= 1e-4


def test_layer_names_and_indices():
    net = _net("resnet")
    dn = DeconvNet(net)
    with pytest.raises(ValueError, match=r"'layer1.0.relu': the module is called 2 times"):
        dn.resolve_layer("layer1.0.relu")
    with pytest.raises(ValueError, match="'layer9': no such module or node"):
        dn.resolve_layer("layer9")
    # 1 stem conv + 2 per block + 3 downsampling convs
    assert dn.num_layers == 1 + 2 * 5 + 3
    with pytest.raises(ValueError, match="out of range, the model has 14 conv layers"):
        dn.resolve_layer(14)
    assert dn.layer_channels() == 32 and dn.layer_channels("layer2") == 16 and dn.layer_channels(0) == 8
    x = _x(14)
    second_call = dn.project(x, top_n=3, layer="layer1.0.relu@1")  # the block's output ReLU
    block = dn.project(x, top_n=3, layer="layer1.0")
    assert second_call.layer_name == "layer1.0.relu@1"
    assert torch.equal(second_call.maps, block.maps)
    with pytest.raises(ValueError, match="top_n 33"):
        dn.project(x, top_n=33)
    with pytest.raises(ValueError, match=r"expected \(B, 1, H, W\)"):
        dn.project(torch.rand(1, 3, 20, 20))


class _DataDependent(nn.Module):
    """A forward torch.fx cannot trace (a branch on the data) with a ReLU module reused, max pooling and a
    residual addition."""

    def __init__(self, branch: bool = True):
        super().__init__()
        self.branch = branch
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.block = BasicBlock(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.block(self.stem(x))
        if self.branch and x.sum() > 0:
            x = x * 1.0
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _twin_without_branch(net: nn.Module) -> nn.Module:
    twin = _DataDependent(branch=False).eval()
    twin.load_state_dict(net.state_dict())
    return twin


@pytest.mark.parametrize("method,layer", [("deconvnet", None), ("guided", None), ("deconvnet", "stem.2"),
                                          ("gradient", "block")])
def test_untraceable_model_falls_back_to_hooks(method, layer):
    torch.manual_seed(0)
    net = _randomise_bn(_DataDependent(), 1)
    x = _x(15)
    dn = DeconvNet(net, chunk_size=4)
    assert dn.engine == "hooks" and dn.layer_name() == "block" and dn.layer_channels() == 8
    p = dn.project(x, top_n=3, layer=layer, method=method)
    assert p.layer_name == (layer or "block") and torch.allclose(p.logits, net(x), atol=1e-6)
    module = net.get_submodule(layer or "block")
    if method == "gradient":
        ref = _captum(net, module, x, p.channels, captum_attr.NeuronGradient)
    else:
        cls = captum_attr.NeuronDeconvolution if method == "deconvnet" else captum_attr.NeuronGuidedBackprop
        ref = _captum(net, module, x, p.channels, cls)
    assert _rel_err(p.maps, ref) <= 1e-4
    # the same network without the branch goes through the graph walk and gives the same maps
    graph = GraphDeconvNet(_twin_without_branch(net)).project(x, top_n=3, layer=layer, method=method)
    assert torch.equal(graph.channels, p.channels)
    assert _rel_err(graph.maps, p.maps) <= 1e-5


def test_hooks_max_mode_and_errors():
    torch.manual_seed(0)
    net = _randomise_bn(_DataDependent(), 1)
    x = _x(16)
    dn = DeconvNet(net)
    p = dn.project(x, top_n=2, mode="max", layer="stem.0")
    assert p.layer == 0
    twin = _twin_without_branch(net)
    assert _rel_err(GraphDeconvNet(twin).project(x, top_n=2, mode="max", layer="stem.0").maps, p.maps) <= 1e-5
    with pytest.raises(ValueError, match="'nope': no such module"):
        dn.project(x, layer="nope")
    with pytest.raises(ValueError, match="through hooks, in fp32 only"):
        dn.project(x, precision="bf16")
    with pytest.raises(ValueError, match="top_n 9"):
        dn.project(x, top_n=9)


def test_package_models_keep_the_step_list_walk():
    from xraydeconv.training.models import MODEL_NAMES, build

    for name in MODEL_NAMES:
        assert DeconvNet(build(name, num_classes=3, input_size=32)).graph is None


@pytest.mark.parametrize("arch,layers", [("resnet18", [None, "layer3.1"]), ("densenet121", ["features.denseblock3"])])
def test_torchvision_definitions_equal_captum(arch, layers):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = _randomise_bn(getattr(tv.models, arch)(weights=None, num_classes=4), 1)
    x = torch.rand(2, 3, 67, 71, generator=torch.Generator().manual_seed(0))
    dn = DeconvNet(net)
    for layer in layers:
        p = dn.project(x, top_n=2, layer=layer)
        assert torch.allclose(p.logits, net(x), atol=1e-4)
        ref = _captum(net, net.get_submodule(layer or "layer4"), x, p.channels)
        assert _rel_err(p.maps, ref) <= 1e-4


@pytest.mark.parametrize("name,backend", [("deeper", "auto"), ("deeper", "native"), ("shallow", "auto")])
def test_graph_walk_of_package_models_equals_the_step_list_walk(name, backend):
    """Our nets through their graph: SwitchMaxPool2d kept whole, tiled unpool -> ReLU -> conv chains scattered."""
    from xraydeconv.training.models import build

    torch.manual_seed(0)
    model = _randomise_bn(build(name, num_classes=5, input_size=48, pool_backend=backend), 1)
    x = torch.rand(2, 1, 50, 52, generator=torch.Generator().manual_seed(2))
    # the step-list walk's default start: the last ReLU (the graph's default is the last pool after it)
    relu = [f"features.{n}" for n, m in model.features.named_children() if isinstance(m, nn.ReLU)][-1]
    assert GraphDeconvNet(model).layer_channels() == DeconvNet(model).layer_channels()
    for method in ("deconvnet", "guided"):
        ref = DeconvNet(model).project(x, top_n=4, method=method)
        got = GraphDeconvNet(model).project(x, top_n=4, layer=relu, method=method)
        assert torch.equal(got.channels, ref.channels)
        assert torch.allclose(got.logits, ref.logits, atol=1e-5)
        assert _rel_err(got.maps, ref.maps) <= 1e-5


class _WithOptions(nn.Module):
    """A forward with arguments after the image: traced with their defaults."""

    def __init__(self, needs_mask: bool = False):
        super().__init__()
        self.needs_mask = needs_mask
        self.conv, self.relu, self.fc = nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Linear(4, 2)

    def forward(self, x, return_features=False, scale=2.0):
        f = self.relu(self.conv(x))
        return f if return_features else self.fc(f.mean((2, 3)) * scale)


class _NeedsMask(_WithOptions):
    def forward(self, x, mask):
        return super().forward(x * mask)


def test_forward_arguments_after_the_image_keep_their_defaults():
    torch.manual_seed(0)
    net = _WithOptions().eval()
    x = _x(17)
    dn = DeconvNet(net)
    assert dn.engine == "graph" and dn.layer_name() == "relu"
    p = dn.project(x, top_n=2)
    assert torch.allclose(p.logits, net(x))
    assert _rel_err(p.maps, _captum(net, net.relu, x, p.channels)) <= 1e-4
    with pytest.raises(ValueError, match="_NeedsMask: its forward takes 'mask' besides the image"):
        DeconvNet(_NeedsMask())
