"""Zeiler & Fergus deconvnet: project the most activated filters of a conv layer back into the input.

The parallel network is read from the live modules of ``model.features`` (or a plain ``nn.Sequential``) as a
list of steps; any other model is read as a graph (:mod:`xraydeconv.explain.graph_deconvnet`, or through hooks
where ``torch.fx`` cannot trace it, :mod:`xraydeconv.explain.hooks`). Nothing is copied, BatchNorm is folded
into the preceding conv's weight on every call, so a model that is still being trained is always projected with
its current weights.

Going down from the chosen layer, each step is the adjoint of the forward step: unpool with the
max-pool switches recorded in the forward pass, rectify, and apply the transposed conv with the same
(BatchNorm-folded) weights and no bias. With ``mode="map"`` this is exactly Captum's
``NeuronDeconvolution`` with the selector ``(o[:, c] * o[:, c].detach()).sum((1, 2))``; guided backprop
and the plain gradient are the same walk with a different rule at each ReLU.

Speed: all top-n projections of an image go down as one batch (in blocks), and on the CPU in fp32 each
"unpool -> ReLU -> transposed conv" is one call of the sparse kernel ``xraydeconv::relu_scatter_conv_transpose2d``
(``csrc/cpu/deconv_scatter.cpp``), which only touches the positive values; the two transposed convs of a stage
run as one call (``relu_scatter_conv_transpose2d_pair``), so the plane between them is never allocated;
elsewhere PyTorch's own ops run, channels-last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xraydeconv.explain.adjoint import (
    FoldedWeights,
    PoolRecord,
    WalkBlock,
    bn_forward,
    bn_scale,
    conv_transpose,
    conv_transpose_single,
    has_scatter_kernel,
    is_switch_pool,
    non_overlapping,
    pair,
    pair_ok,
    pool_forward,
    scatter_conv_transpose,
    scatter_ok,
    scatter_pair_conv_transpose,
    unpool,
)
from xraydeconv.explain.common import (
    DEFAULT_CHUNK_CPU,
    DEFAULT_CHUNK_CUDA,
    IDENTITY_MODULES,
    METHODS,
    MODES,
    PRECISIONS,
    RANKS,
    Projection,
    ProjectRequest,
    block_signals,
    blocks,
    check_top_n,
    select_filters,
)
from xraydeconv.explain.graph import UntraceableModel
from xraydeconv.explain.graph_deconvnet import GraphDeconvNet
from xraydeconv.explain.hooks import HookDeconvNet

__all__ = ["DeconvNet", "Projection", "MODES", "RANKS", "METHODS"]

# --- the parallel network -------------------------------------------------------------------------------



@dataclass
class _Step:
    kind: str  # "conv" | "bn" | "relu" | "pool" | "skip" | "other"
    module: nn.Module
    name: str
    bn: nn.BatchNorm2d | None = None  # the BatchNorm folded into this conv
    conv_index: int = -1


def sequential_features(model: nn.Module) -> nn.Sequential | None:
    """The Sequential the fast step-list walk runs on: ``model`` itself or its ``.features``, provided every conv
    in it is a direct child (so its children are the network's steps); None for any other model."""
    feats = model if isinstance(model, nn.Sequential) else getattr(model, "features", None)
    if not isinstance(feats, nn.Sequential):
        return None
    for child in feats.children():
        if not isinstance(child, nn.Conv2d) and any(isinstance(m, nn.Conv2d) for m in child.modules()):
            return None
    return feats


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
        elif isinstance(m, nn.MaxPool2d) or is_switch_pool(m):
            if isinstance(m, nn.MaxPool2d) and pair(m.dilation) != (1, 1):
                raise ValueError(f"{full}: dilated max pooling cannot be unpooled with switches")
            steps.append(_Step("pool", m, full))
        elif isinstance(m, IDENTITY_MODULES):
            steps.append(_Step("skip", m, full))
        else:
            steps.append(_Step("other", m, full))
    return steps


# --- what the forward pass leaves behind, and the state of a walk down ---------------------------------------


@dataclass
class _ForwardRecords:
    """The forward pass up to the start step, keyed by step index: what each adjoint step needs."""

    start_act: Tensor  # (B, C, h, w) the start step's output
    features_out: Tensor  # the output of the last step run (the features' output when it ran them all)
    conv_inputs: dict[int, tuple[int, int]] = field(default_factory=dict)  # (H, W) of each conv's input
    pools: dict[int, PoolRecord] = field(default_factory=dict)
    relu_masks: dict[int, Tensor] = field(default_factory=dict)  # bool (B, C, h, w) ReLU output > 0 (guided/gradient)


@dataclass
class _Walk(WalkBlock):
    """A block going down the step list (see :class:`WalkBlock`)."""

    first: tuple[Tensor, Tensor]  # (P, h, w) the kept activation maps, (P,) their channels (one each)
    g: Tensor | None = None  # (P, C, h, w) the signal, once the first transposed conv has run
    rectified: bool = False  # the deconvnet ReLU below a tiled unpool was already applied to the pooled signal


class DeconvNet:
    """Zeiler & Fergus deconvnet over a CNN's conv layers, sharing the model's weights.

    Args:
        model: any CNN. An ``nn.Sequential`` of Conv2d / BatchNorm2d / ReLU / MaxPool2d / SwitchMaxPool2d (Dropout
            and Identity are skipped), or a model holding one as ``.features`` (a ``.classifier`` then gives the
            logits), is walked as a list of steps; any other model through its ``torch.fx`` graph (``engine``
            ``"graph"``), or with autograd hooks where its forward cannot be traced (``"hooks"``); see
            docs/own-models.md.
        chunk_size: at most this many (image, filter) projections are computed at once (default: 5 on the CPU,
            256 on a GPU).
        sparse: on the CPU in fp32 with ``method="deconvnet"``, run each "unpool -> ReLU -> transposed conv" (and
            "ReLU -> transposed conv") as one sparse scatter over the positive values (``xraydeconv._C``); with
            ``"guided"`` the same scatter after a dense unpooling and the forward ReLU's mask; the dense path
            (PyTorch's own ops) is used otherwise, or everywhere with ``sparse=False``.

    Example::

        dn = DeconvNet(model)
        p = dn.project(x, top_n=25)        # x: (B, 1, 256, 256)
        p.maps.shape                       # (B, 25, 1, 256, 256)
        dn.project(x, layer="layer3")      # a ResNet's module, by its qualified name
    """

    def __init__(self, model: nn.Module, chunk_size: int | None = None, sparse: bool = True) -> None:
        self.model = model
        self.chunk_size = None if chunk_size is None else max(1, int(chunk_size))
        self.sparse = sparse
        self._head: Callable[[Tensor], Tensor] | None = None
        features = sequential_features(model)
        # any other model: its torch.fx graph, or autograd with hooks where fx cannot trace it (the Sequential
        # steps below then stay empty)
        self.graph: GraphDeconvNet | HookDeconvNet | None = None
        self.engine = "sequential"
        if features is None:
            try:
                self.graph, self.engine = GraphDeconvNet(model, chunk_size, sparse), "graph"
            except UntraceableModel:
                self.graph, self.engine = HookDeconvNet(model, chunk_size), "hooks"
        self.features = features
        self.steps = [] if features is None else _plan(features, "features." if features is not model else "")
        self.conv_steps = [i for i, s in enumerate(self.steps) if s.kind == "conv"]
        if features is not None and not self.conv_steps:
            raise ValueError("the model has no Conv2d layer in its features: nothing to project")
        self.classifier = getattr(model, "classifier", None) if features not in (None, model) else None

    # ---- layers ----
    @property
    def num_layers(self) -> int:
        """Number of conv layers (valid ``layer`` indices are ``-num_layers .. num_layers - 1``)."""
        return self.graph.num_layers if self.graph is not None else len(self.conv_steps)

    def layer_channels(self, layer: int | str | None = None) -> int:
        """Number of filters (output channels) of a layer (None: the default layer)."""
        if self.graph is not None:
            return self.graph.layer_channels(layer)
        return self.steps[self.conv_steps[self.resolve_layer(layer)]].module.out_channels

    def layer_name(self, layer: int | str | None = None) -> str:
        """The name :class:`Projection` records for ``layer``: a Sequential's conv module (``"features.21"``), else
        the qualified name of the module whose output the projection starts from (``"layer4"``)."""
        if self.graph is not None:
            return self.graph.resolve_layer(layer)
        return self.steps[self.conv_steps[self.resolve_layer(layer)]].name

    def resolve_layer(self, layer: int | str | None) -> int | str:
        """Check ``layer`` and turn it into a non-negative conv index (a Sequential) or a layer name (a graph).

        ``layer`` is None (the default: the last conv of a Sequential, the last feature map before global pooling
        of any other model), an int counting conv layers (negative from the end), or a str naming a module as in
        ``named_modules``: for a Sequential (``"features.12"`` or ``"12"``) a Conv2d or the BatchNorm/ReLU after
        one; for any other model any module (or graph node) whose output is a feature map.
        """
        if self.graph is not None:
            return self.graph.resolve_layer(layer)
        layer = -1 if layer is None else layer
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
    def _forward(self, x: Tensor, start: int, guided: bool, need_all: bool) -> _ForwardRecords:
        """Run the steps up to ``start`` (all of them with ``need_all``), keeping what the walk down needs."""
        rec = _ForwardRecords(start_act=x, features_out=x)
        h = x
        last = len(self.steps) - 1 if need_all else start
        for i, s in enumerate(self.steps[: last + 1]):
            if s.kind == "conv":
                rec.conv_inputs[i] = (h.shape[-2], h.shape[-1])
                h = s.module(h)
                if s.bn is not None:
                    h = bn_forward(s.bn, h)
            elif s.kind == "bn":
                h = bn_forward(s.module, h)
            elif s.kind == "relu":
                h = F.relu(h)
                if guided and i < start:
                    rec.relu_masks[i] = h > 0
            elif s.kind == "pool":
                if i < start:
                    h, rec.pools[i] = pool_forward(s.module, h)
                else:
                    h = s.module(h)
            elif s.kind == "other":
                if i <= start:
                    raise ValueError(f"{s.name}: cannot project through a {type(s.module).__name__}")
                h = s.module(h)
            if i == start:
                rec.start_act = h
        rec.features_out = h
        return rec

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
    def _walk_down(self, start: int, rec: _ForwardRecords, walk: _Walk) -> Tensor:
        """Walk from step ``start`` down to the input: (P, C_in, H, W) for the block's signals ``walk.first``."""
        i = start
        while i >= 0:
            if walk.sparse and walk.g is not None:
                below = self._sparse_scatter_step(i, rec, walk)
                if below is not None:
                    i = below
                    continue
            if walk.g is None:
                self._step_above_first_conv(i, start, rec, walk)
            else:
                self._dense_step(i, rec, walk)
            i -= 1
        return walk.g

    def _sparse_scatter_step(self, i: int, rec: _ForwardRecords, walk: _Walk) -> int | None:
        """(tiled unpool ->) ReLU -> transposed conv from step ``i`` as one sparse scatter over the positive values.

        Returns the index of the step below the conv, or None when steps ``i``... do not form such a chain.
        """
        pool = rec.pools[i] if self.steps[i].kind == "pool" else None
        j = i - 1 if pool is not None else i
        # guided backprop masks the signal with the forward ReLU below the pooling: unpool densely, mask, scatter
        fused = pool is not None and walk.method == "deconvnet"
        tiled = not fused or (pool.switches is not None and non_overlapping(pool, walk.g.shape[-2:]))
        if not (j >= 1 and tiled and self.steps[j].kind == "relu" and self._scatter_ok(j - 1, fused)):
            return None
        conv = self.steps[j - 1]
        wt = walk.weights.hwc(conv.name, conv.module, conv.bn, walk.g.dtype)
        if pool is not None and not fused:
            walk.g = unpool(walk.g, pool.images(walk.img_slice), walk.group)
        if walk.method == "guided":  # relu(g * mask): the kernel rectifies what the forward ReLU let through
            mask = rec.relu_masks[j][walk.img_slice].unsqueeze(1)
            walk.g = (walk.g.unflatten(0, (-1, walk.group)) * mask).flatten(0, 1)
        sub = pool.images(walk.img_slice, hwc=True) if fused else None
        below = self._pair_below(j - 1, rec, walk, sub)
        if below is not None:
            return below
        walk.g = scatter_conv_transpose(walk.g, sub, conv.module, wt, rec.conv_inputs[j - 1], walk.group)
        return j - 2

    def _pair_below(self, k: int, rec: _ForwardRecords, walk: _Walk, sub: PoolRecord | None) -> int | None:
        """The scatter through conv step ``k`` and, when a ReLU and a conv the pair kernel takes follow (see
        :func:`pair_ok`), through that one too in one pass; returns the index of the step below them, or None."""
        if walk.method != "deconvnet" or k < 2 or [s.kind for s in self.steps[k - 2 : k]] != ["conv", "relu"]:
            return None
        conv, conv2 = self.steps[k], self.steps[k - 2]
        sizes = (rec.conv_inputs[k], rec.conv_inputs[k - 2])
        if not pair_ok(walk.g, sub, conv.module, conv2.module, sizes):
            return None
        dtype = walk.g.dtype
        wts = (walk.weights.hwc(conv.name, conv.module, conv.bn, dtype), walk.weights.hwc(conv2.name, conv2.module,
                                                                                        conv2.bn, dtype))
        walk.g = scatter_pair_conv_transpose(walk.g, sub, (conv.module, conv2.module), wts, sizes, walk.group)
        return k - 3

    def _scatter_ok(self, i: int, pooled: bool) -> bool:
        s = self.steps[i]
        return s.kind == "conv" and scatter_ok(s.module, pooled)

    def _step_above_first_conv(self, i: int, start: int, rec: _ForwardRecords, walk: _Walk) -> None:
        """Steps from ``start`` down to the first conv, where each signal is non-zero in one channel only."""
        s = self.steps[i]
        a, chans = walk.first
        if s.kind == "bn":  # an unfoldable BatchNorm between the conv and its ReLU
            walk.first = (a * bn_scale(s.module).to(a.dtype)[chans].view(-1, 1, 1), chans)
        elif s.kind == "conv" and walk.sparse and self.steps[start].kind == "relu" and self._scatter_ok(i, False):
            # the scatter skips the zero channels
            P, h, w = a.shape
            src = a.new_zeros(P, h, w, s.module.out_channels)
            src[torch.arange(P, device=a.device), :, :, chans] = a
            wt = walk.weights.hwc(s.name, s.module, s.bn, a.dtype)
            walk.g = scatter_conv_transpose(src.permute(0, 3, 1, 2), None, s.module, wt, rec.conv_inputs[i], walk.group)
        elif s.kind == "conv":
            w = walk.weights.weight(s.name, s.module, s.bn, a.dtype).index_select(0, chans)
            walk.g = conv_transpose_single(a, s.module, w, rec.conv_inputs[i])

    def _dense_step(self, i: int, rec: _ForwardRecords, walk: _Walk) -> None:
        """The adjoint of step ``i`` with PyTorch's own ops."""
        s = self.steps[i]
        if s.kind == "conv":
            w = walk.weights.weight(s.name, s.module, s.bn, walk.g.dtype)
            walk.g = conv_transpose(walk.g, s.module, w, rec.conv_inputs[i])
        elif s.kind == "relu":
            self._dense_relu(i, rec, walk)
        elif s.kind == "pool":
            self._dense_unpool(i, rec, walk)
        elif s.kind == "bn":
            walk.g = walk.g * bn_scale(s.module).to(walk.g.dtype).view(1, -1, 1, 1)

    def _dense_relu(self, i: int, rec: _ForwardRecords, walk: _Walk) -> None:
        if walk.method == "deconvnet":
            if not walk.rectified:
                walk.g = F.relu_(walk.g)
        else:
            mask = rec.relu_masks[i][walk.img_slice].unsqueeze(1)
            g = walk.g.unflatten(0, (-1, walk.group)) * mask
            walk.g = (F.relu_(g) if walk.method == "guided" else g).flatten(0, 1)
        walk.rectified = False

    def _dense_unpool(self, i: int, rec: _ForwardRecords, walk: _Walk) -> None:
        sub = rec.pools[i].images(walk.img_slice)
        below = self.steps[i - 1].kind if i > 0 else None
        if walk.method == "deconvnet" and below == "relu" and non_overlapping(sub, walk.g.shape[-2:]):
            # ReLU commutes with a tiled unpooling (it only moves values): rectify the 4x smaller signal
            walk.g = F.relu(walk.g)
            walk.rectified = True
        walk.g = unpool(walk.g, sub, walk.group)

    @torch.no_grad()
    def project(
        self,
        x: Tensor,
        top_n: int = 25,
        layer: int | str | None = None,
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
            layer: conv-layer index (``-1`` = last conv; the projection starts at that conv's ReLU output, at the
                conv/BatchNorm output when no ReLU follows it), a module name (see :meth:`resolve_layer`), or None:
                the last conv of a Sequential, the last feature map before global pooling of any other model.
            mode: ``"map"``: the filter's whole activation map; ``"max"``: its first strongest activation only.
            rank: order the filters by the ``"max"`` or the ``"mean"`` of their activation maps.
            method: ``"deconvnet"`` (rectify the signal at each ReLU), ``"guided"`` (guided backprop: also mask by
                the forward ReLU) or ``"gradient"`` (plain gradient: forward mask only).
            channels: optional (B, top_n) int64 filter indices to project instead of the ranked top ones.
            precision: ``"fp32"`` (exact) or ``"bf16"``: the walk down in bfloat16 (the forward pass, ranking and
                switches stay in the input's dtype; ``maps`` too); about 3 significant digits.
            progress: called with the number of images finished after each chunk.
        Returns:
            :class:`Projection` (``maps`` (B, top_n, C_in, H, W), ``channels``, ``activations``, ``layer``, ``logits``).
        Raises:
            ValueError: bad ``top_n``, ``layer``, ``mode``, ``rank``, ``method`` or input shape.
        """
        request = ProjectRequest(top_n, layer, mode, rank, method, channels, precision, progress)
        if self.graph is not None:
            return self.graph.project(x, **vars(request))
        self._check_input(x)
        li = self.resolve_layer(layer)
        top_n = check_top_n(top_n, channels, self.layer_channels(li), f"conv layer {li}")
        start = self._start_step(li)

        rec = self._forward(x, start, method != "deconvnet", self.classifier is not None)
        logits = self._logits(x, rec.features_out) if self.classifier is not None else None
        activations, chans = select_filters(rec.start_act, rank, top_n, channels)

        B = x.shape[0]
        maps = x.new_empty(B, top_n, x.shape[1], x.shape[2], x.shape[3])
        weights = FoldedWeights()  # shared by all blocks of this call
        chunk = self.chunk_size or (DEFAULT_CHUNK_CUDA if x.is_cuda else DEFAULT_CHUNK_CPU)
        for imgs, filters, done in blocks(B, top_n, chunk):
            sel = chans[imgs, filters]  # (images, filters)
            a = block_signals(rec.start_act, sel, imgs, mode).to(PRECISIONS[precision] or x.dtype)
            sparse = method in ("deconvnet", "guided") and self.sparse and has_scatter_kernel(a)
            walk = _Walk(method, sel.shape[1], imgs, weights, sparse, (a, sel.reshape(-1)))
            g = self._walk_down(start, rec, walk)
            maps[imgs, filters] = g.view(*sel.shape, *g.shape[1:])
            if progress is not None and done:
                progress(imgs.stop - imgs.start)
        return Projection(maps=maps, channels=chans, activations=activations, layer=li, logits=logits,
                          layer_name=self.steps[self.conv_steps[li]].name)

    def _check_input(self, x: Tensor) -> None:
        first_conv: nn.Conv2d = self.steps[self.conv_steps[0]].module
        if x.dim() != 4 or x.shape[1] != first_conv.in_channels:
            raise ValueError(
                f"input of shape {tuple(x.shape)}: expected (B, {first_conv.in_channels}, H, W) for this model"
            )
