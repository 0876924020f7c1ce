"""The anatomy classifiers: the poster's Table 1 nets ``shallow``, ``deeper``, ``deeper-aug``, and ``resnet18``.

The poster gives accuracies but no layer counts, so the architectures are ours:

* ``shallow``: three 5x5/5x5/3x3 conv layers without BatchNorm, each followed by ReLU and a 2x2 max pool.
  Its receptive field covers only part of the image, the kind of early net the poster contrasts with.
* ``deeper``: VGG-style, four stages of two 3x3 conv + BatchNorm + ReLU with widths 16-32-64-128, each
  stage closed by a 2x2/s2 max pool (8 conv layers, about 0.29 M parameters) -- small enough to train on a CPU.
* ``deeper-aug``: the same architecture as ``deeper``; it differs only in being trained with augmentation.

Every model has ``features`` (an ``nn.Sequential`` of Conv2d / BatchNorm2d / ReLU / SwitchMaxPool2d / Dropout
only, which the deconvnet walks backwards; a ``FusedSequential``, which runs each ReLU + pool pair, and in training
each BatchNorm + ReLU (+ pool) chain, as one kernel)
and ``classifier`` (global average pool, dropout, linear), so that
``model.classifier(model.features(x)) == model(x)``. The global average pool makes every input size work:
``input_size`` is recorded on the model but does not change its weights.

``resnet18`` is torchvision's ResNet-18 layout (module names ``conv1``, ``bn1``, ``relu``, ``maxpool``,
``layer1``-``layer4`` of two BasicBlocks each, ``avgpool``, ``fc``; one ReLU module called twice per block) with
a single-channel input and a SwitchMaxPool2d 3x3/s2 max pool: a larger residual net to compare the Table 1 nets
with. It has no ``features`` Sequential: the deconvnet projects it through its graph. It is not part of Table 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xraydeconv.errors import UserError
from xraydeconv.nn import FusedSequential, SwitchMaxPool2d

# The nets of the poster's Table 1 (trained by ``train --all`` and the demo).
MODEL_NAMES: tuple[str, ...] = ("shallow", "deeper", "deeper-aug")
# Every architecture ``build`` knows.
ARCHITECTURES: tuple[str, ...] = (*MODEL_NAMES, "resnet18")

# Test accuracy (%) on ImageCLEF 2009 reported by the poster (Table 1), shown beside ours.
POSTER_ACCURACY: dict[str, float] = {"shallow": 71.1, "deeper": 90.36, "deeper-aug": 95.62}

# Models trained with the batched augmentation of xraydeconv.training.augment.
AUGMENTED: frozenset[str] = frozenset({"deeper-aug"})

DEEPER_WIDTHS: tuple[int, ...] = (16, 32, 64, 128)


class GlobalAvgPool2d(nn.Module):
    """(B, C, H, W) -> (B, C, 1, 1) mean over the spatial positions, for any H and W.

    Equal to ``nn.AdaptiveAvgPool2d(1)``, but its backward is a plain broadcast, which CUDA can run under
    ``torch.use_deterministic_algorithms(True)`` (adaptive pooling's CUDA backward refuses to).
    """

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class AnatomyNet(nn.Module):
    """A conv feature extractor followed by a global-average-pool classifier.

    Args:
        features: the conv trunk, (B, in_channels, H, W) -> (B, C, h, w).
        feature_channels: C, the channel count of the trunk's output.
        num_classes: number of output logits.
        dropout: dropout probability before the linear layer.
    """

    def __init__(self, features: nn.Sequential, feature_channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.features = features
        self.classifier = nn.Sequential(
            GlobalAvgPool2d(),
            nn.Flatten(1),
            nn.Dropout(dropout),
            nn.Linear(feature_channels, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) images -> (B, num_classes) logits."""
        return self.classifier(self.features(x))


def _shallow_features(in_channels: int, pool_backend: str) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    c = in_channels
    for width, k in ((16, 5), (32, 5), (64, 3)):
        layers += [nn.Conv2d(c, width, k, padding=k // 2), nn.ReLU(inplace=True)]
        layers.append(SwitchMaxPool2d(2, 2, backend=pool_backend))
        c = width
    return FusedSequential(*layers, backend=pool_backend), c


def _deeper_features(in_channels: int, pool_backend: str) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    c = in_channels
    for width in DEEPER_WIDTHS:
        for _ in range(2):
            # no conv bias: the BatchNorm right after it has its own shift
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c = width
        layers.append(SwitchMaxPool2d(2, 2, backend=pool_backend))
    return FusedSequential(*layers, backend=pool_backend), c


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 conv + BatchNorm, ``out += identity``, one ReLU module called twice.

    (B, cin, H, W) -> (B, cout, H / stride, W / stride); ``downsample`` (1x1 strided conv + BatchNorm) matches the
    identity's shape when the stride or the width changes.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


RESNET18_WIDTHS: tuple[int, ...] = (64, 128, 256, 512)


class ResNet18(nn.Module):
    """ResNet-18 in torchvision's layout: (B, in_channels, H, W) images -> (B, num_classes) logits.

    Stem 7x7/s2 conv + BatchNorm + ReLU + 3x3/s2 max pool (``SwitchMaxPool2d``), four stages of two BasicBlocks
    (widths 64-128-256-512, stride 2 from the second stage on), global average pool, linear. Weights are
    initialised as torchvision does (Kaiming normal, fan out, for the convs; BatchNorm 1 and 0).
    """

    def __init__(self, num_classes: int = 24, in_channels: int = 1, pool_backend: str = "auto") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = SwitchMaxPool2d(3, 2, 1, backend=pool_backend)
        cin = 64
        for i, width in enumerate(RESNET18_WIDTHS):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width)))
            cin = width
        self.avgpool = GlobalAvgPool2d()
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) images -> (B, num_classes) logits."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(
    name: str,
    num_classes: int = 24,
    in_channels: int = 1,
    input_size: int = 256,
    pool_backend: str = "auto",
) -> nn.Module:
    """Build an untrained classifier by name (one of ``ARCHITECTURES``).

    Args:
        name: ``"shallow"``, ``"deeper"``, ``"deeper-aug"`` or ``"resnet18"``.
        num_classes: number of anatomy classes (logits).
        in_channels: image channels (1 for radiographs).
        input_size: the side of the square training images; kept as ``model.input_size`` (any size works).
        pool_backend: ``SwitchMaxPool2d`` backend, ``"auto"``, ``"kernel"`` or ``"native"``.
    Returns:
        An ``AnatomyNet`` (``ResNet18`` for ``"resnet18"``) in training mode, with ``model_name`` and ``input_size``.
    Raises:
        UserError: unknown model name or non-positive sizes.
    """
    if name not in ARCHITECTURES:
        raise UserError(f"model {name!r}: unknown, choose one of {', '.join(ARCHITECTURES)}")
    if num_classes < 1 or in_channels < 1 or input_size < 16:
        raise UserError(
            f"model {name!r}: needs num_classes >= 1, in_channels >= 1 and input_size >= 16 "
            f"(got {num_classes}, {in_channels}, {input_size})"
        )
    model: nn.Module
    if name == "resnet18":
        model = ResNet18(num_classes, in_channels, pool_backend)
    elif name == "shallow":
        features, c = _shallow_features(in_channels, pool_backend)
        model = AnatomyNet(features, c, num_classes, dropout=0.0)
    else:
        features, c = _deeper_features(in_channels, pool_backend)
        model = AnatomyNet(features, c, num_classes, dropout=0.3)
    model.model_name = name
    model.input_size = input_size
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
