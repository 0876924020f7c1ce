"""What every projection shares, whatever the network's shape: options, the result, the ranking of filters and
the blocks of (image, filter) pairs the walk down runs in."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_CHUNK_CPU",
    "DEFAULT_CHUNK_CUDA",
    "METHODS",
    "MODES",
    "PRECISIONS",
    "RANKS",
    "Projection",
    "block_signals",
    "blocks",
    "check_options",
    "ProjectRequest",
    "IDENTITY_MODULES",
    "HEAD_MODULES",
    "activation_after_conv",
    "check_top_n",
    "select_filters",
]

MODES = ("map", "max")
RANKS = ("max", "mean")
METHODS = ("deconvnet", "guided", "gradient")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}

# Projections are run in blocks of at most this many (image, filter) pairs, which bounds memory when a whole
# batch of images is projected at once. On the CPU small blocks are faster too: the intermediates stay in cache
# and under glibc's mmap threshold, so they are not page-faulted in afresh on every call (docs/projection.md,
# "Speed"); a GPU wants large batches.
DEFAULT_CHUNK_CPU = 5
DEFAULT_CHUNK_CUDA = 256


@dataclass
class Projection:
    """The result of :meth:`DeconvNet.project`.

    Attributes:
        maps: (B, top_n, C_in, H, W) the projection of each selected filter into input space, in the
            input's dtype; ``maps[b, k]`` belongs to filter ``channels[b, k]`` of image ``b``.
        channels: (B, top_n) int64 filter indices of the start layer, strongest first.
        activations: (B, top_n) the ranking score of each filter (max or mean of its activation map).
        layer: the start layer as a non-negative conv-layer index (0 = first conv), or -1 when the start layer
            (chosen by name) is not the output of a conv, its BatchNorm or its ReLU.
        logits: (B, num_classes) the model's logits when it has a classifier, else None.
        layer_name: the start layer's name: the conv's module name for a Sequential, otherwise the qualified
            name of the module (or the graph node) whose output the projection starts from.
    """

    maps: Tensor
    channels: Tensor
    activations: Tensor
    layer: int
    logits: Tensor | None = None
    layer_name: str = ""

    @property
    def probs(self) -> Tensor | None:
        """(B, num_classes) softmax of the logits, or None without a classifier."""
        return None if self.logits is None else torch.softmax(self.logits.float(), dim=1)


def check_options(mode: str, rank: str, method: str, precision: str) -> None:
    """ValueError naming the first of ``mode``, ``rank``, ``method``, ``precision`` that is not a known choice."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    if rank not in RANKS:
        raise ValueError(f"rank {rank!r}: use one of {', '.join(RANKS)}")
    if method not in METHODS:
        raise ValueError(f"method {method!r}: use one of {', '.join(METHODS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")


# modules a walk passes through unchanged, and modules that only appear in a classifier head
IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
HEAD_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Linear)


@dataclass(frozen=True)
class ProjectRequest:
    """The options of :meth:`xraydeconv.explain.DeconvNet.project` (documented there), checked when made."""

    top_n: int = 25
    layer: int | str | None = None
    mode: str = "map"
    rank: str = "max"
    method: str = "deconvnet"
    channels: Tensor | None = None
    precision: str = "fp32"
    progress: Callable[[int], None] | None = None

    def __post_init__(self) -> None:
        check_options(self.mode, self.rank, self.method, self.precision)


def check_top_n(top_n: int, channels: Tensor | None, n_ch: int, what: str) -> int:
    """The number of filters to project: ``channels.shape[1]`` when given, else ``top_n``, checked against the
    ``n_ch`` filters of the layer described by ``what``."""
    if channels is not None:
        top_n = channels.shape[1]
    if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= n_ch:
        raise ValueError(f"top_n {top_n}: must be between 1 and {n_ch}, the number of filters of {what}")
    return top_n


def select_filters(act: Tensor, rank: str, top_n: int, channels: Tensor | None) -> tuple[Tensor, Tensor]:
    """Rank the filters of ``act`` (B, C, h, w): (B, top_n) scores and (B, top_n) channel indices, strongest first
    (or the scores of the given ``channels``)."""
    flat = act.flatten(2)
    score = flat.amax(2) if rank == "max" else flat.mean(2)
    if channels is None:
        return torch.topk(score, top_n, dim=1)
    B, C = score.shape
    chans = channels.to(device=act.device, dtype=torch.long)
    if chans.shape[0] != B or chans.min() < 0 or chans.max() >= C:
        raise ValueError(f"channels: expected ({B}, top_n) indices in 0..{C - 1}")
    return score.gather(1, chans), chans


def blocks(n_images: int, top_n: int, chunk: int) -> Iterator[tuple[slice, slice, bool]]:
    """Blocks of at most ``chunk`` (image, filter) pairs: whole images while a block holds all ``top_n`` filters,
    else filter slices of one image. Yields (images, filters, whether the block finishes its images)."""
    per_img = max(1, chunk // top_n)
    per_filter = min(top_n, chunk)
    for b0 in range(0, n_images, per_img):
        imgs = slice(b0, min(n_images, b0 + per_img))
        for k0 in range(0, top_n, per_filter):
            yield imgs, slice(k0, min(top_n, k0 + per_filter)), k0 + per_filter >= top_n


def block_signals(act: Tensor, sel: Tensor, imgs: slice, mode: str) -> Tensor:
    """The start signals of one block: (images * filters, h, w) activation maps of the channels ``sel``
    (images, filters) of ``act[imgs]``; with ``mode="max"`` only each map's first maximum is kept."""
    B, C, h, w = act.shape
    flat = act.reshape(B, C, h * w)
    a = flat[imgs].gather(1, sel.unsqueeze(2).expand(-1, -1, h * w))  # (images, filters, h*w)
    if mode == "max":
        pos = a.argmax(2, keepdim=True)
        a = torch.zeros_like(a).scatter_(2, pos, a.gather(2, pos))
    return a.reshape(-1, h, w)


def activation_after_conv(features: nn.Sequential, conv: int) -> nn.Module:
    """The module of ``features`` whose output a projection from conv ``conv`` (an index among the Conv2d
    layers, negative from the end) starts at: the ReLU after it, or the conv itself when no ReLU follows it."""
    mods = list(features)
    at = [i for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)][conv]
    for m in mods[at + 1:]:
        if isinstance(m, nn.ReLU):
            return m
        if isinstance(m, nn.Conv2d):
            break
    return mods[at]
