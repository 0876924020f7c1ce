"""The deconvnet (and guided backprop, gradient) of any ``nn.Module`` CNN, walking its ``torch.fx`` graph down.

Each signal goes down the graph in reverse forward order; a node's signal is the sum of what its users sent it
(the identity branch of a residual block and the block's convs both send to the block's input; a concatenation
splits its signal by channels). The steps are the adjoints of :mod:`xraydeconv.explain.adjoint`: unpooling with
the recorded switches, the ReLU rule of the method, transposed convs with BatchNorm folded in, BatchNorm's scale,
average pooling's adjoint. On the CPU in fp32 with ``method="deconvnet"``, a transposed conv whose signal is known
to be rectified (it just passed a ReLU, possibly through additions, concatenations or unpoolings) and is sparse
runs as the sparse scatter of ``xraydeconv._C``, and a tiled max pool over a ReLU over a conv as one fused
scatter; dense signals go through oneDNN's transposed convs, a strided conv out of the image through its phases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from xraydeconv.explain.adjoint import (
    FoldedWeights,
    WalkBlock,
    bn_scale,
    conv_transpose,
    conv_transpose_phases,
    has_scatter_kernel,
    non_overlapping,
    phases_ok,
    scatter_conv_transpose,
    scatter_ok,
    unpool,
)
from xraydeconv.explain.common import (
    DEFAULT_CHUNK_CPU,
    DEFAULT_CHUNK_CUDA,
    PRECISIONS,
    Projection,
    ProjectRequest,
    block_signals,
    blocks,
    check_top_n,
    select_filters,
)
from xraydeconv.explain.graph import Graph, GraphRecords, Op

__all__ = ["GraphDeconvNet"]


@dataclass
class _Walk(WalkBlock):
    """A block going down the graph (see :class:`WalkBlock`)."""

    grads: dict[fx.Node, Tensor] = field(default_factory=dict)  # (P, C, h, w) the signal arriving at each node
    nonneg: dict[fx.Node, bool] = field(default_factory=dict)  # that signal is known to be >= 0

    def send(self, node: fx.Node, g: Tensor, nonneg: bool) -> None:
        if node in self.grads:
            self.grads[node] = self.grads[node] + g
            self.nonneg[node] = self.nonneg[node] and nonneg
        else:
            self.grads[node] = g
            self.nonneg[node] = nonneg


class GraphDeconvNet:
    """Deconvnet over the ``torch.fx`` graph of ``model``; see :class:`xraydeconv.explain.DeconvNet`.

    Layers are named by qualified module name (``"layer4"``, ``"layer4.1.relu@1"`` for a module's second call,
    ``"features.denseblock4"``) or graph node name (``"relu"`` for a functional ReLU outside any module), or counted
    as conv layers (an int: that conv's ReLU output, as for a Sequential). The default is the last feature map
    before global pooling.
    """

    def __init__(self, model: nn.Module, chunk_size: int | None = None, sparse: bool = True) -> None:
        self.model = model
        self.graph = Graph(model)
        self.chunk_size = None if chunk_size is None else max(1, int(chunk_size))
        self.sparse = sparse

    # ---- layers ----
    @property
    def num_layers(self) -> int:
        """Number of conv layers (calls of a Conv2d in the forward)."""
        return len(self.graph.convs)

    def start_node(self, layer: int | str | None) -> fx.Node:
        """The node whose output ``layer`` is (None: the default layer)."""
        if layer is None:
            return self.graph.default_start()
        if isinstance(layer, str):
            return self.graph.node_named(layer)
        n = self.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise ValueError(f"layer {layer}: out of range, the model has {n} conv layers (use {-n}..{n - 1})")
        return self.graph.conv_start(layer % n)

    def resolve_layer(self, layer: int | str | None) -> str:
        """The name of ``layer`` (see the class), checked: the walk down from it knows every operation."""
        node = self.start_node(layer)
        self.graph.ancestors(node)
        return layer if isinstance(layer, str) else self.graph.name_of(node)

    def layer_channels(self, layer: int | str | None = None) -> int:
        """Number of filters (channels) of the layer's output."""
        return self.graph.channels(self.start_node(layer))

    @torch.no_grad()
    def project(self, x: Tensor, **options) -> Projection:
        """As :meth:`xraydeconv.explain.DeconvNet.project`; ``logits`` is the model's output when it is (B, K)."""
        r = ProjectRequest(**options)
        top_n, layer, mode, rank, method, channels, precision, progress = (
            r.top_n, r.layer, r.mode, r.rank, r.method, r.channels, r.precision, r.progress)
        if x.dim() != 4 or x.shape[1] != self.graph.in_channels:
            raise ValueError(f"input of shape {tuple(x.shape)}: expected (B, {self.graph.in_channels}, H, W) "
                             "for this model")
        start = self.start_node(layer)
        name = layer if isinstance(layer, str) else self.graph.name_of(start)
        order = self.graph.ancestors(start)
        top_n = check_top_n(top_n, channels, self.graph.channels(start), f"layer {name!r}")
        rec = self.graph.forward(x, start, set(order), masks=method != "deconvnet")
        activations, chans = select_filters(rec.start_act, rank, top_n, channels)
        B = x.shape[0]
        maps = x.new_empty(B, top_n, x.shape[1], x.shape[2], x.shape[3])
        weights = FoldedWeights()
        chunk = self.chunk_size or (DEFAULT_CHUNK_CUDA if x.is_cuda else DEFAULT_CHUNK_CPU)
        for imgs, filters, done in blocks(B, top_n, chunk):
            sel = chans[imgs, filters]
            a = block_signals(rec.start_act, sel, imgs, mode).to(PRECISIONS[precision] or x.dtype)
            sparse = method == "deconvnet" and self.sparse and has_scatter_kernel(a)
            walk = _Walk(method, sel.shape[1], imgs, weights, sparse)
            g = self._walk_down(order, rec, walk, a, sel.reshape(-1))
            maps[imgs, filters] = g.view(*sel.shape, *g.shape[1:])
            if progress is not None and done:
                progress(imgs.stop - imgs.start)
        out = rec.output
        logits = out if isinstance(out, Tensor) and out.dim() == 2 and out.shape[0] == B else None
        return Projection(maps=maps, channels=chans, activations=activations, layer=self.graph.conv_index(start),
                          logits=logits, layer_name=name)

    # ---- the walk down ----
    def _walk_down(self, order: list[fx.Node], rec: GraphRecords, walk: _Walk, a: Tensor, chans: Tensor) -> Tensor:
        """Send the start signals ``a`` (P, h, w) of channels ``chans`` (P,) down to the input: (P, C_in, H, W)."""
        start = order[0]
        P, h, w = a.shape
        signal = a.new_zeros(P, rec.start_act.shape[1], h, w)
        signal[torch.arange(P, device=a.device), chans] = a
        walk.send(start, signal, self.graph.ops[start].kind == "relu")
        for node in order:
            g = walk.grads.pop(node, None)
            if g is None:
                continue
            op = self.graph.ops[node]
            if op.kind == "input":
                return g
            self._step(op, g, walk.nonneg.pop(node), rec, walk)
        raise ValueError(f"layer {self.graph.name_of(start)!r} does not depend on the input")

    def _step(self, op: Op, g: Tensor, nonneg: bool, rec: GraphRecords, walk: _Walk) -> None:
        kind = op.kind
        if kind in ("conv", "fused"):
            self._conv_step(op, g, nonneg, rec, walk)
        elif kind == "relu":
            self._relu_step(op, g, rec, walk)
        elif kind == "maxpool":
            self._unpool_step(op, g, nonneg, rec, walk)
        elif kind == "bn":
            walk.send(op.inputs[0], g * bn_scale(op.module).to(g.dtype).view(1, -1, 1, 1), False)
        elif kind == "avgpool":
            walk.send(op.inputs[0], _linear_adjoint(op.run, g, rec.avg_inputs[op.node]), nonneg)
        elif kind == "cat":
            for n, part in zip(op.inputs, g.split(rec.cat_sizes[op.node], 1), strict=True):
                walk.send(n, part, nonneg)
        else:  # add, identity: every input gets the whole signal
            for n in op.inputs:
                walk.send(n, g, nonneg)

    def _conv_step(self, op: Op, g: Tensor, nonneg: bool, rec: GraphRecords, walk: _Walk) -> None:
        conv: nn.Conv2d = op.module
        bn = op.bn if op.kind == "conv" else None  # a fused conv as the start layer: before its BatchNorm
        in_size = rec.conv_inputs[op.conv_node]
        if walk.sparse and nonneg and scatter_ok(conv, False) and (conv.in_channels <= 4 or _sparse_enough(g)):
            wt = walk.weights.hwc(op.node.name, conv, bn, g.dtype)
            walk.send(op.inputs[0], scatter_conv_transpose(g, None, conv, wt, in_size, walk.group), False)
        elif phases_ok(conv):
            phases = walk.weights.phases(op.node.name, conv, bn, g.dtype)
            walk.send(op.inputs[0], conv_transpose_phases(g, phases, conv.stride[0], in_size), False)
        else:
            w = walk.weights.weight(op.node.name, conv, bn, g.dtype)
            channels_last = g.shape[-2] * g.shape[-1] >= CHANNELS_LAST_MIN_PIXELS
            walk.send(op.inputs[0], conv_transpose(g, conv, w, in_size, channels_last), False)

    def _relu_step(self, op: Op, g: Tensor, rec: GraphRecords, walk: _Walk) -> None:
        if walk.method == "deconvnet":
            walk.send(op.inputs[0], F.relu(g), True)
            return
        mask = rec.relu_masks[op.node][walk.img_slice].unsqueeze(1)
        g = g.unflatten(0, (-1, walk.group)) * mask
        walk.send(op.inputs[0], (F.relu(g) if walk.method == "guided" else g).flatten(0, 1), walk.method == "guided")

    def _unpool_step(self, op: Op, g: Tensor, nonneg: bool, rec: GraphRecords, walk: _Walk) -> None:
        sub = rec.pools[op.node].images(walk.img_slice)
        chain = self._pool_relu_conv(op) if walk.sparse else None
        if chain is not None and sub.switches is not None and non_overlapping(sub, g.shape[-2:]):
            # tiled unpool -> ReLU -> transposed conv as one sparse scatter over the positive values
            conv = chain
            wt = walk.weights.hwc(conv.node.name, conv.module, conv.bn, g.dtype)
            out = scatter_conv_transpose(g, sub, conv.module, wt, rec.conv_inputs[conv.conv_node], walk.group)
            walk.send(conv.inputs[0], out, False)
            return
        walk.send(op.inputs[0], unpool(g, sub, walk.group), nonneg)

    def _pool_relu_conv(self, pool: Op) -> Op | None:
        """The conv step below ``pool`` when pool <- ReLU <- conv is a chain (each node used only by the next one)
        that the sparse scatter runs well, else None."""
        relu = self.graph.ops[pool.inputs[0]]
        if relu.kind != "relu" or len(relu.node.users) != 1:
            return None
        conv = self.graph.ops[relu.inputs[0]]
        if conv.kind != "conv" or len(conv.node.users) != 1 or not scatter_ok(conv.module, True):
            return None
        return conv


# The sparse scatter of a signal that did not just come out of an unpooling beats oneDNN's transposed conv only when
# few of its values are positive (docs/projection.md, "Any model"); the first steps below the start layer, where
# one channel per signal is non-zero, are far below this.
SCATTER_MAX_DENSITY = 0.1
# Dense transposed convs of planes with fewer pixels than this run in NCHW, larger ones channels-last (the faster
# layout of oneDNN for each, docs/projection.md, "Any model").
CHANNELS_LAST_MIN_PIXELS = 28 * 28


def _sparse_enough(g: Tensor) -> bool:
    return int(torch.count_nonzero(g > 0)) <= SCATTER_MAX_DENSITY * g.numel()


def _linear_adjoint(run: Callable[[Tensor], Tensor], g: Tensor, in_shape: torch.Size) -> Tensor:
    """The adjoint of the linear map ``run`` (an average pooling) applied to ``g``: its gradient at any input."""
    z = torch.zeros((g.shape[0], *in_shape[1:]), dtype=g.dtype, device=g.device, requires_grad=True)
    with torch.enable_grad():
        out = run(z)
    return torch.autograd.grad(out, z, g)[0]
