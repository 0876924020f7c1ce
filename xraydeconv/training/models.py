"""The three anatomy classifiers of the poster's Table 1: ``shallow``, ``deeper`` and ``deeper-aug``.

The poster gives accuracies but no layer counts, so the architectures are ours:

* ``shallow``: three 5x5/5x5/3x3 conv layers without BatchNorm, each followed by ReLU and a 2x2 max pool.
  Its receptive field covers only part of the image, the kind of early net the poster contrasts with.
* ``deeper``: VGG-style, four stages of two 3x3 conv + BatchNorm + ReLU with widths 16-32-64-128, each
  stage closed by a 2x2/s2 max pool (8 conv layers, about 0.29 M parameters) -- small enough to train on a CPU.
* ``deeper-aug``: the same architecture as ``deeper``; it differs only in being trained with augmentation.

Every model has ``features`` (an ``nn.Sequential`` of Conv2d / BatchNorm2d / ReLU / SwitchMaxPool2d / Dropout
only, which the deconvnet walks backwards) and ``classifier`` (global average pool, dropout, linear), so that
``model.classifier(model.features(x)) == model(x)``. The global average pool makes every input size work:
``input_size`` is recorded on the model but does not change its weights.
"""

from __future__ import annotations

from torch import Tensor, nn

from xraydeconv.errors import UserError
from xraydeconv.nn import SwitchMaxPool2d

MODEL_NAMES: tuple[str, ...] = ("shallow", "deeper", "deeper-aug")

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
    return nn.Sequential(*layers), c


def _deeper_features(in_channels: int, pool_backend: str) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    c = in_channels
    for width in DEEPER_WIDTHS:
        for _ in range(2):
            # no conv bias: the BatchNorm right after it has its own shift
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c = width
        layers.append(SwitchMaxPool2d(2, 2, backend=pool_backend))
    return nn.Sequential(*layers), c


def build(
    name: str,
    num_classes: int = 24,
    in_channels: int = 1,
    input_size: int = 256,
    pool_backend: str = "auto",
) -> AnatomyNet:
    """Build an untrained classifier by name (one of ``MODEL_NAMES``).

    Args:
        name: ``"shallow"``, ``"deeper"`` or ``"deeper-aug"``.
        num_classes: number of anatomy classes (logits).
        in_channels: image channels (1 for radiographs).
        input_size: the side of the square training images; kept as ``model.input_size`` (any size works).
        pool_backend: ``SwitchMaxPool2d`` backend, ``"auto"``, ``"kernel"`` or ``"native"``.
    Returns:
        An ``AnatomyNet`` in training mode.
    Raises:
        UserError: unknown model name or non-positive sizes.
    """
    if name not in MODEL_NAMES:
        raise UserError(f"model {name!r}: unknown, choose one of {', '.join(MODEL_NAMES)}")
    if num_classes < 1 or in_channels < 1 or input_size < 16:
        raise UserError(
            f"model {name!r}: needs num_classes >= 1, in_channels >= 1 and input_size >= 16 "
            f"(got {num_classes}, {in_channels}, {input_size})"
        )
    if name == "shallow":
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
