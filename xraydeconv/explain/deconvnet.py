"""Zeiler & Fergus deconvnet: project the most activated filters of a conv layer back into the input.

The parallel network is read from the live modules of ``model.features`` (or a plain ``nn.Sequential``):
nothing is copied, BatchNorm is folded into the preceding conv's weight on every call, so a model that is
still being trained is always projected with its current weights.

Going down from the chosen layer, each step is the adjoint of the forward step: unpool with the
max-pool switches recorded in the forward pass, rectify, and apply the transposed conv with the same
(BatchNorm-folded) weights and no bias. With ``mode="map"`` this is exactly Captum's
``NeuronDeconvolution`` with the selector ``(o[:, c] * o[:, c].detach()).sum((1, 2))``; guided backprop
and the plain gradient are the same walk with a different rule at each ReLU.

Speed: all top-n projections of an image go down as one batch (in blocks), and on the CPU in fp32 each
"unpool -> ReLU -> transposed conv" is one call of the sparse kernel ``xraydeconv::relu_scatter_conv_transpose2d``
(``csrc/cpu/deconv_scatter.cpp``), which only touches the positive values; elsewhere PyTorch's own ops run,
channels-last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xraydeconv import ops

__all__ = ["DeconvNet", "Projection", "MODES", "RANKS", "METHODS"]

MODES = ("map", "max")
RANKS = ("max", "mean")
METHODS = ("deconvnet", "guided", "gradient")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}

# Projections are run in blocks of at most this many (image, filter) pairs, which bounds memory when a whole
# batch of images is projected at once (25 maps of a 32x256x256 layer are ~200 MB in fp32). On the CPU small
# blocks are faster too: the intermediates stay in cache and under glibc's mmap threshold (32 MB), so they are
# not page-faulted in afresh on every call (top-25 of the deeper net at 256 px: 0.47 s with blocks of 5 vs
# 0.55 s with one block of 25, 1 thread); a GPU wants large batches.
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
        layer: the start layer as a non-negative conv-layer index (0 = first conv).
        logits: (B, num_classes) the model's logits when it has a classifier, else None.
    """

    maps: Tensor
    channels: Tensor
    activations: Tensor
    layer: int
    logits: Tensor | None = None

    @property
    def probs(self) -> Tensor | None:
        """(B, num_classes) softmax of the logits, or None without a classifier."""
        return None if self.logits is None else torch.softmax(self.logits.float(), dim=1)


# --- the parallel network -------------------------------------------------------------------------------

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)


def _is_switch_pool(m: nn.Module) -> bool:
    # Recognised by its interface so this module never imports the model side of the package.
    return hasattr(m, "forward_with_switches") and hasattr(m, "kernel_size")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass
class _Step:
    kind: str  # "conv" | "bn" | "relu" | "pool" | "skip" | "other"
    module: nn.Module
    name: str
    bn: nn.BatchNorm2d | None = None  # the BatchNorm folded into this conv
    conv_index: int = -1


def _features_of(model: nn.Module) -> nn.Sequential:
    if isinstance(model, nn.Sequential):
        return model
    feats = getattr(model, "features", None)
    if isinstance(feats, nn.Sequential):
        return feats
    raise TypeError(
        f"DeconvNet needs an nn.Sequential or a model with an nn.Sequential `.features`, got {type(model).__name__}"
    )


def _plan(features: nn.Sequential, prefix: str) -> list[_Step]:
    steps: list[_Step] = []
    n_conv = 0
    for name, m in features.named_children():
        full = f"{prefix}{name}"
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise ValueError(f"{full}: only zero-padded convs can be projected (padding_mode={m.padding_mode})")
            steps.append(_Step("conv", m, full, conv_index=n_conv))
            n_conv += 1
        elif isinstance(m, nn.BatchNorm2d):
            if m.running_mean is None or m.running_var is None:
                raise ValueError(f"{full}: BatchNorm2d without running statistics cannot be projected")
            if steps and steps[-1].kind == "conv" and steps[-1].bn is None:
                steps[-1].bn = m  # folded: the conv then stands for conv+BN
            else:
                steps.append(_Step("bn", m, full))
        elif isinstance(m, nn.ReLU):
            steps.append(_Step("relu", m, full))
        elif isinstance(m, nn.MaxPool2d) or _is_switch_pool(m):
            if isinstance(m, nn.MaxPool2d) and _pair(m.dilation) != (1, 1):
                raise ValueError(f"{full}: dilated max pooling cannot be unpooled with switches")
            steps.append(_Step("pool", m, full))
        elif isinstance(m, _DROPOUTS):
            steps.append(_Step("skip", m, full))
        else:
            steps.append(_Step("other", m, full))
    return steps


def _bn_scale(bn: nn.BatchNorm2d) -> Tensor:
    scale = torch.rsqrt(bn.running_var + bn.eps)
    return scale * bn.weight if bn.weight is not None else scale


def _bn_forward(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    # Always the running statistics: projections use eval semantics even while the model trains.
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _folded_weight(s: _Step, dtype: torch.dtype, cache: dict[str, Tensor]) -> Tensor:
    """The conv's weight with its BatchNorm folded in, in ``dtype``; made once per projection call (in ``cache``)
    rather than once per block, yet always from the model's current weights."""
    w = cache.get(s.name)
    if w is None:
        w = s.module.weight
        if s.bn is not None:
            w = w * _bn_scale(s.bn).to(w.dtype).view(-1, 1, 1, 1)
        w = cache[s.name] = w.to(dtype)
    return w


# --- pooling with switches --------------------------------------------------------------------------------


@dataclass
class _PoolRecord:
    """What the forward pass of one max pool leaves behind for the unpooling."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    input_size: tuple[int, int]
    switches: Tensor | None = None  # uint8, same shape as the pooled output (xraydeconv.ops)
    indices: Tensor | None = None  # int64 flat indices into the input plane (torch's own max_pool2d)


def _non_overlapping(rec: _PoolRecord, pooled: tuple[int, int]) -> bool:
    """Windows tile the input without overlap or padding: each input pixel belongs to at most one window."""
    return (
        rec.stride == rec.kernel_size
        and rec.padding == (0, 0)
        and pooled[0] * rec.kernel_size[0] <= rec.input_size[0]
        and pooled[1] * rec.kernel_size[1] <= rec.input_size[1]
    )


def _pool_forward(m: nn.Module, x: Tensor) -> tuple[Tensor, _PoolRecord]:
    ks, st, pd = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size), _pair(m.padding)
    rec = _PoolRecord(ks, st, pd, (x.shape[-2], x.shape[-1]))
    if _is_switch_pool(m):
        out, rec.switches = m.forward_with_switches(x)
        return out, rec
    if ks[0] * ks[1] <= 255 and ops.has_kernels(x.device):
        out, rec.switches = ops.switch_pool2d(x, ks, st, pd, m.ceil_mode)
        return out, rec
    out, rec.indices = F.max_pool2d(x, ks, st, pd, 1, m.ceil_mode, return_indices=True)
    if _non_overlapping(rec, out.shape[-2:]) and ks[0] * ks[1] <= 255:
        # switches (row * kW + col inside the window) from torch's flat indices, for the fast unpooling
        row, col = rec.indices.div(x.shape[-1], rounding_mode="floor"), rec.indices.remainder(x.shape[-1])
        rec.switches = (row.remainder(ks[0]) * ks[1] + col.remainder(ks[1])).to(torch.uint8)
    return out, rec


def _unpool_tiled(y: Tensor, rec: _PoolRecord, group: int) -> Tensor:
    """Unpool for non-overlapping windows, written channels-last with one masked copy per window position.

    Every input pixel of a tiled pooling is written exactly once (by its window's switch or as a zero), so the
    output needs no zero fill and no scatter; the result has channels-last strides, as the transposed convs like.
    """
    P, C, h, w = y.shape
    H, W = rec.input_size
    kh, kw = rec.kernel_size
    k = P // group
    covered = (h * kh, w * kw)
    out = y.new_empty((P, H, W, C)) if covered == (H, W) else y.new_zeros((P, H, W, C))
    tiles = out[:, : covered[0], : covered[1]].unflatten(1, (h, kh)).unflatten(3, (w, kw))  # (P, h, kh, w, kw, C)
    src = y.permute(0, 2, 3, 1).unflatten(0, (k, group))  # (k, group, h, w, C)
    sw = rec.switches.permute(0, 2, 3, 1).unsqueeze(1)  # (k, 1, h, w, C)
    for r in range(kh):
        for c in range(kw):
            torch.mul(src, sw == r * kw + c, out=tiles[:, :, r, :, c, :].unflatten(0, (k, group)))
    return out.permute(0, 3, 1, 2)


def _unpool(y: Tensor, rec: _PoolRecord, group: int) -> Tensor:
    """Adjoint of the pooling selection for ``P = B * group`` signals; image ``p // group`` gave the switches."""
    P, C, h, w = y.shape
    H, W = rec.input_size
    if rec.switches is not None and _non_overlapping(rec, (h, w)):
        return _unpool_tiled(y, rec, group)
    if rec.indices is None:
        sw = rec.switches.repeat_interleave(group, dim=0) if group > 1 else rec.switches
        unpool = ops.switch_unpool2d if ops.has_kernels(y.device) else ops.native_switch_unpool2d
        return unpool(y.contiguous(), sw, rec.kernel_size, rec.stride, rec.padding, (H, W))
    idx = rec.indices.view(P // group, 1, C, h * w).expand(P // group, group, C, h * w)
    out = y.new_zeros(P // group, group, C, H * W)
    # scatter_add (not max_unpool2d's assignment) so that overlapping windows sum, as max-pool's gradient does
    out.scatter_add_(3, idx, y.reshape(P // group, group, C, h * w))
    return out.view(P, C, H, W)


# Transposed convs into fewer channels than this stay dense (see DeconvNet._scatter_ok).
SPARSE_MIN_CHANNELS = 8


def _has_scatter_kernel(t: Tensor) -> bool:
    """The sparse deconvnet step of xraydeconv._C can run on ``t`` (fp32 on the CPU, extension built)."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and ops.has_kernel("relu_scatter_conv_transpose2d")


# --- the deconvnet --------------------------------------------------------------------------------------------


class DeconvNet:
    """Zeiler & Fergus deconvnet over a CNN's conv layers, sharing the model's weights.

    Args:
        model: an ``nn.Sequential`` of Conv2d / BatchNorm2d / ReLU / MaxPool2d / SwitchMaxPool2d (Dropout and
            Identity are skipped), or a model holding such a Sequential as ``.features``; in the latter case a
            ``.classifier`` gives the logits of :class:`Projection`.
        chunk_size: at most this many (image, filter) projections are computed at once (default: 5 on the CPU,
            256 on a GPU).
        sparse: on the CPU in fp32 with ``method="deconvnet"``, run each "unpool -> ReLU -> transposed conv" (and
            "ReLU -> transposed conv") as one sparse scatter over the positive values (``xraydeconv._C``); the
            dense path (PyTorch's own ops) is used otherwise, or everywhere with ``sparse=False``.

    Example::

        dn = DeconvNet(model)
        p = dn.project(x, top_n=25)        # x: (B, 1, 256, 256)
        p.maps.shape                       # (B, 25, 1, 256, 256)
    """

    def __init__(self, model: nn.Module, chunk_size: int | None = None, sparse: bool = True) -> None:
        self.model = model
        self.features = _features_of(model)
        prefix = "features." if self.features is not model else ""
        self.steps = _plan(self.features, prefix)
        self.conv_steps = [i for i, s in enumerate(self.steps) if s.kind == "conv"]
        if not self.conv_steps:
            raise ValueError("the model has no Conv2d layer in its features: nothing to project")
        self.classifier = getattr(model, "classifier", None) if self.features is not model else None
        self.chunk_size = None if chunk_size is None else max(1, int(chunk_size))
        self._head: Callable[[Tensor], Tensor] | None = None
        self.sparse = sparse

    # ---- layers ----
    @property
    def num_layers(self) -> int:
        """Number of conv layers (valid ``layer`` indices are ``-num_layers .. num_layers - 1``)."""
        return len(self.conv_steps)

    def layer_channels(self, layer: int | str = -1) -> int:
        """Number of filters (output channels) of a conv layer."""
        return self.steps[self.conv_steps[self.resolve_layer(layer)]].module.out_channels

    def resolve_layer(self, layer: int | str) -> int:
        """Turn ``layer`` into a non-negative conv index.

        ``layer`` is either an int counting conv layers (negative from the end) or, as a str, the name of a module
        as in ``named_modules`` (``"features.12"`` or ``"12"``) that must be a Conv2d or the BatchNorm/ReLU after one.
        """
        n = self.num_layers
        if isinstance(layer, str):
            for i, s in enumerate(self.steps):
                if layer in (s.name, s.name.removeprefix("features.")):
                    return self._conv_of_step(i, layer)
                if s.bn is not None and layer in (self._bn_name(s), self._bn_name(s).removeprefix("features.")):
                    return s.conv_index
            raise ValueError(f"layer {layer!r}: no such module in the features")
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise ValueError(f"layer {layer}: out of range, the model has {n} conv layers (use {-n}..{n - 1})")
        return layer % n

    def _bn_name(self, s: _Step) -> str:
        for name, m in self.features.named_children():
            if m is s.bn:
                return ("features." if self.features is not self.model else "") + name
        return ""

    def _conv_of_step(self, i: int, layer: str) -> int:
        s = self.steps[i]
        if s.kind == "conv":
            return s.conv_index
        if s.kind == "relu":
            j = i - 1
            while j >= 0 and self.steps[j].kind in ("skip", "bn"):
                j -= 1
            if j >= 0 and self.steps[j].kind == "conv":
                return self.steps[j].conv_index
        raise ValueError(f"layer {layer!r}: {type(s.module).__name__} is not a conv layer")

    def _start_step(self, conv_index: int) -> int:
        """Index of the step whose output starts the projection: the conv's ReLU (or the conv itself)."""
        i = self.conv_steps[conv_index]
        j = i + 1
        while j < len(self.steps) and self.steps[j].kind in ("skip", "bn"):
            j += 1
        if j < len(self.steps) and self.steps[j].kind == "relu":
            return j
        return i

    # ---- forward ----
    def _forward(self, x: Tensor, start: int, guided: bool, need_all: bool):
        records: dict[int, object] = {}
        start_act = None
        h = x
        last = len(self.steps) - 1 if need_all else start
        for i, s in enumerate(self.steps[: last + 1]):
            if s.kind == "conv":
                records[i] = (h.shape[-2], h.shape[-1])
                h = s.module(h)
                if s.bn is not None:
                    h = _bn_forward(s.bn, h)
            elif s.kind == "bn":
                h = _bn_forward(s.module, h)
            elif s.kind == "relu":
                h = F.relu(h)
                if guided and i < start:
                    records[i] = h > 0
            elif s.kind == "pool":
                if i < start:
                    h, records[i] = _pool_forward(s.module, h)
                else:
                    h = s.module(h)
            elif s.kind == "skip":
                pass
            else:
                if i <= start:
                    raise ValueError(f"{s.name}: cannot project through a {type(s.module).__name__}")
                h = s.module(h)
            if i == start:
                start_act = h
        return start_act, records, h

    def _logits(self, x: Tensor, feats_out: Tensor) -> Tensor | None:
        # The features were just run, so the head alone gives the logits -- provided the model's forward is
        # classifier(features(x)) or classifier(flatten(features(x))): checked against model(x) on the first call.
        heads = (lambda f: self.classifier(f), lambda f: self.classifier(torch.flatten(f, 1)))
        if self._head is None:
            full = self.model(x)
            self._head = self.model
            for head in heads:
                try:
                    fast = head(feats_out)
                except (RuntimeError, TypeError, ValueError):
                    continue
                if fast.shape == full.shape and torch.allclose(fast, full, rtol=1e-4, atol=1e-5):
                    self._head = head
                    break
            return full
        return self.model(x) if self._head is self.model else self._head(feats_out)

    # ---- backward walk ----
    def _conv_transpose(self, g: Tensor, s: _Step, in_size: tuple[int, int], weights: dict) -> Tensor:
        conv: nn.Conv2d = s.module
        w = _folded_weight(s, g.dtype, weights)
        stride, pad, dil = _pair(conv.stride), _padding_of(conv), _pair(conv.dilation)
        k = (w.shape[-2], w.shape[-1])
        out_pad = tuple(
            in_size[d] - ((g.shape[-2 + d] - 1) * stride[d] - 2 * pad[d] + dil[d] * (k[d] - 1) + 1) for d in range(2)
        )
        # channels-last: oneDNN's transposed conv runs about twice as fast on it as on NCHW here
        g = g.contiguous(memory_format=torch.channels_last)
        return F.conv_transpose2d(g, w, None, stride, pad, out_pad, conv.groups, dil)

    def _conv_transpose_single(
        self, a: Tensor, chans: Tensor, s: _Step, in_size: tuple[int, int], weights: dict
    ) -> Tensor:
        """Transposed conv of signals that are non-zero in one channel only: (P, h, w) + channel ids -> (P, C_in, H, W).

        Only the selected filter's weights take part (a grouped conv with one group per projection) instead of a
        dense transposed conv that multiplies all the zero channels too.
        """
        conv: nn.Conv2d = s.module
        w = _folded_weight(s, a.dtype, weights).index_select(0, chans)
        P, h, wd = a.shape
        stride, pad, dil = _pair(conv.stride), _padding_of(conv), _pair(conv.dilation)
        k = (w.shape[-2], w.shape[-1])
        out_pad = tuple(
            in_size[d] - ((a.shape[-2 + d] - 1) * stride[d] - 2 * pad[d] + dil[d] * (k[d] - 1) + 1) for d in range(2)
        )
        if stride == (1, 1) and dil == (1, 1) and conv.groups == 1 and out_pad == (0, 0):
            # one shifted outer product per kernel tap, accumulated channels-last: a few memory passes instead of
            # a grouped conv with one tiny group per projection (which oneDNN runs poorly)
            full = a.new_zeros(P, h + k[0] - 1, wd + k[1] - 1, conv.in_channels)
            src = a.unsqueeze(3)
            wt = w.permute(0, 2, 3, 1)  # (P, kh, kw, C_in)
            for dy in range(k[0]):
                for dx in range(k[1]):
                    full[:, dy : dy + h, dx : dx + wd].addcmul_(src, wt[:, dy, dx].view(P, 1, 1, -1))
            H, W = in_size
            return full[:, pad[0] : pad[0] + H, pad[1] : pad[1] + W].permute(0, 3, 1, 2)
        out = F.conv_transpose2d(a.unsqueeze(0), w, None, stride, pad, out_pad, P, dil)
        return out.view(P, conv.in_channels, out.shape[-2], out.shape[-1])

    def _walk_down(
        self,
        start: int,
        records: dict,
        method: str,
        group: int,
        first: tuple[Tensor, Tensor],
        img_slice: slice,
        weights: dict[str, Tensor],
    ) -> Tensor:
        """Walk from step ``start`` down to the input; ``first`` = (the kept activation maps (P, h, w), their
        channel ids): one non-zero channel per projection until the first transposed conv."""
        g: Tensor | None = None
        rectified = False  # the deconvnet ReLU below a tiled unpool was already applied to the pooled signal
        sparse = method == "deconvnet" and self.sparse and _has_scatter_kernel(first[0])
        i = start
        while i >= 0:
            s = self.steps[i]
            if sparse and g is not None:
                # (tiled unpool ->) ReLU -> transposed conv as one sparse scatter over the positive values
                pool = s if s.kind == "pool" else None
                j = i - 1 if pool is not None else i
                tiled = pool is None or (
                    records[i].switches is not None and _non_overlapping(records[i], g.shape[-2:])
                )
                if (
                    j >= 1
                    and tiled
                    and self.steps[j].kind == "relu"
                    and self._scatter_ok(self.steps[j - 1], pool is not None)
                ):
                    sw = None if pool is None else records[i].switches[img_slice]
                    g = self._scatter_step(g, sw, records[i] if pool is not None else None, self.steps[j - 1],
                                           records[j - 1], group, weights)
                    i = j - 2
                    continue
            if s.kind == "conv":
                if g is None and sparse and self.steps[start].kind == "relu" and self._scatter_ok(s, False):
                    # first step, one non-zero channel per projection: the scatter skips the zero channels
                    a, chans = first
                    P, h, w = a.shape
                    src = a.new_zeros(P, h, w, s.module.out_channels)
                    src[torch.arange(P, device=a.device), :, :, chans] = a
                    g = self._scatter_step(src.permute(0, 3, 1, 2), None, None, s, records[i], group, weights)
                elif g is None:  # first step: one non-zero channel per projection
                    g = self._conv_transpose_single(first[0], first[1], s, records[i], weights)
                else:
                    g = self._conv_transpose(g, s, records[i], weights)
            elif g is None:
                if s.kind == "bn":  # an unfoldable BatchNorm between the conv and its ReLU
                    first = (first[0] * _bn_scale(s.module).to(first[0].dtype)[first[1]].view(-1, 1, 1), first[1])
            elif s.kind == "relu":
                if method == "deconvnet":
                    if not rectified:
                        g = F.relu_(g)
                else:
                    mask = records[i][img_slice].unsqueeze(1)
                    g = g.unflatten(0, (-1, group)) * mask
                    g = (F.relu_(g) if method == "guided" else g).flatten(0, 1)
                rectified = False
            elif s.kind == "pool":
                rec: _PoolRecord = records[i]
                sub = _PoolRecord(
                    rec.kernel_size,
                    rec.stride,
                    rec.padding,
                    rec.input_size,
                    None if rec.switches is None else rec.switches[img_slice],
                    None if rec.indices is None else rec.indices[img_slice],
                )
                below = self.steps[i - 1].kind if i > 0 else None
                if method == "deconvnet" and below == "relu" and _non_overlapping(sub, g.shape[-2:]):
                    # ReLU commutes with a tiled unpooling (it only moves values): rectify the 4x smaller signal
                    g = F.relu(g)
                    rectified = True
                g = _unpool(g, sub, group)
            elif s.kind == "bn":
                g = g * _bn_scale(s.module).to(g.dtype).view(1, -1, 1, 1)
            i -= 1
        return g

    def _scatter_ok(self, s: _Step, pooled: bool) -> bool:
        if s.kind != "conv":
            return False
        conv: nn.Conv2d = s.module
        if _pair(conv.stride) != (1, 1) or _pair(conv.dilation) != (1, 1) or conv.groups != 1:
            return False
        # wide outputs: scatter the positive values; the transposed first conv (1-4 image channels, no unpooling
        # below it): a gathering dot product over 16-channel vectors; in between the dense transposed conv wins
        narrow = not pooled and conv.in_channels <= 4 and conv.out_channels % 16 == 0
        return conv.in_channels >= SPARSE_MIN_CHANNELS or narrow

    def _scatter_step(
        self, g: Tensor, switches: Tensor | None, rec: _PoolRecord | None, s: _Step, in_size, group: int, weights: dict
    ) -> Tensor:
        conv: nn.Conv2d = s.module
        key = s.name + ":hwc"
        if key not in weights:  # (filters, kH, kW, in channels)
            weights[key] = _folded_weight(s, g.dtype, weights).permute(0, 2, 3, 1).contiguous()
        wt = weights[key]
        src = g.permute(0, 2, 3, 1).contiguous()  # free when g is already channels-last
        sw = None if switches is None else switches.permute(0, 2, 3, 1).contiguous()
        pk = (1, 1) if rec is None else rec.kernel_size
        out = ops.relu_scatter_conv_transpose2d(src, sw, wt, pk, _padding_of(conv), in_size, group)
        return out.permute(0, 3, 1, 2)

    @torch.no_grad()
    def project(
        self,
        x: Tensor,
        top_n: int = 25,
        layer: int | str = -1,
        mode: str = "map",
        rank: str = "max",
        method: str = "deconvnet",
        channels: Tensor | None = None,
        precision: str = "fp32",
        progress: Callable[[int], None] | None = None,
    ) -> Projection:
        """Project the ``top_n`` most activated filters of a conv layer back into input space.

        Args:
            x: (B, C_in, H, W) input images (the model's dtype and device).
            top_n: how many filters per image, 1 <= top_n <= the layer's channels.
            layer: conv-layer index (``-1`` = last conv) or a module name; the projection starts at that conv's
                ReLU output (at the conv/BatchNorm output when no ReLU follows it).
            mode: ``"map"`` keeps the filter's whole activation map; ``"max"`` only its strongest activation
                (the first maximum in row-major order), as in Zeiler & Fergus.
            rank: order the filters by the ``"max"`` or the ``"mean"`` of their activation maps.
            method: ``"deconvnet"`` (rectify the signal at each ReLU), ``"guided"`` (guided backprop: also mask by
                the forward ReLU) or ``"gradient"`` (plain gradient: forward mask only).
            channels: optional (B, top_n) int64 filter indices to project instead of the ranked top ones
                (``activations`` then holds their scores under ``rank``).
            precision: ``"fp32"`` (exact) or ``"bf16"``: the downward walk in bfloat16 (the forward pass, the
                ranking and the switches stay in the input's dtype); about 3 significant digits, for speed on CPUs
                with AVX-512 BF16 and on GPUs. ``maps`` are returned in the input's dtype either way.
            progress: called with the number of images finished after each chunk.

        Returns:
            :class:`Projection` with ``maps`` (B, top_n, C_in, H, W), ``channels`` (B, top_n),
            ``activations`` (B, top_n), ``layer`` and ``logits`` (B, num_classes) when the model has a classifier.

        Raises:
            ValueError: bad ``top_n``, ``layer``, ``mode``, ``rank``, ``method`` or input shape.
        """
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)}")
        if rank not in RANKS:
            raise ValueError(f"rank {rank!r}: use one of {', '.join(RANKS)}")
        if method not in METHODS:
            raise ValueError(f"method {method!r}: use one of {', '.join(METHODS)}")
        first_conv: nn.Conv2d = self.steps[self.conv_steps[0]].module
        if x.dim() != 4 or x.shape[1] != first_conv.in_channels:
            raise ValueError(
                f"input of shape {tuple(x.shape)}: expected (B, {first_conv.in_channels}, H, W) for this model"
            )
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        li = self.resolve_layer(layer)
        n_ch = self.layer_channels(li)
        if channels is not None:
            top_n = channels.shape[1]
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= n_ch:
            raise ValueError(f"top_n {top_n}: must be between 1 and {n_ch}, the number of filters of conv layer {li}")
        start = self._start_step(li)

        act, records, feats_out = self._forward(x, start, method != "deconvnet", self.classifier is not None)
        logits = self._logits(x, feats_out) if self.classifier is not None else None

        B, C, h, w = act.shape
        flat = act.reshape(B, C, h * w)
        score = flat.amax(2) if rank == "max" else flat.mean(2)
        if channels is None:
            activations, chans = torch.topk(score, top_n, dim=1)
        else:
            chans = channels.to(device=x.device, dtype=torch.long)
            if chans.shape[0] != B or chans.min() < 0 or chans.max() >= C:
                raise ValueError(f"channels: expected ({B}, top_n) indices in 0..{C - 1}")
            activations = score.gather(1, chans)

        maps = x.new_empty(B, top_n, x.shape[1], x.shape[2], x.shape[3])
        weights: dict[str, Tensor] = {}  # BatchNorm-folded weights, shared by all blocks of this call
        # blocks of (images, filters): whole images while a block holds top_n filters, else filter slices of one
        chunk = self.chunk_size or (DEFAULT_CHUNK_CUDA if x.is_cuda else DEFAULT_CHUNK_CPU)
        per_img = max(1, chunk // top_n)
        per_filter = min(top_n, chunk)
        for b0 in range(0, B, per_img):
            b1 = min(B, b0 + per_img)
            for k0 in range(0, top_n, per_filter):
                k1 = min(top_n, k0 + per_filter)
                sel = chans[b0:b1, k0:k1]  # (images, filters)
                a = flat[b0:b1].gather(1, sel.unsqueeze(2).expand(-1, -1, h * w))  # (images, filters, h*w)
                if mode == "max":
                    pos = a.argmax(2, keepdim=True)
                    a = torch.zeros_like(a).scatter_(2, pos, a.gather(2, pos))
                a = a.reshape(-1, h, w).to(PRECISIONS[precision] or x.dtype)
                g = self._walk_down(start, records, method, k1 - k0, (a, sel.reshape(-1)), slice(b0, b1), weights)
                maps[b0:b1, k0:k1] = g.view(b1 - b0, k1 - k0, *g.shape[1:])
            if progress is not None:
                progress(b1 - b0)
        return Projection(maps=maps, channels=chans, activations=activations, layer=li, logits=logits)


def _padding_of(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        # padding="same": PyTorch pads symmetrically when the total is even, which it is for odd kernels
        k, d = _pair(conv.kernel_size), _pair(conv.dilation)
        tot = [d[i] * (k[i] - 1) for i in range(2)]
        if any(t % 2 for t in tot):
            raise ValueError("padding='same' with an even kernel cannot be projected")
        return (tot[0] // 2, tot[1] // 2)
    return _pair(conv.padding)

