"""The adjoint steps a deconvnet walk is made of: max pooling with switches and its unpooling, BatchNorm folding,
the transposed convs (dense, single-channel and the sparse scatter of ``xraydeconv._C``).

Shared by the Sequential walk (:mod:`xraydeconv.explain.deconvnet`) and the graph walk
(:mod:`xraydeconv.explain.graph`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xraydeconv import ops
from xraydeconv.ops.deconv_scatter import PAIR_OP, relu_scatter_conv_transpose2d_pair

__all__ = [
    "SPARSE_MIN_CHANNELS",
    "FoldedWeights",
    "WalkBlock",
    "PoolRecord",
    "bn_forward",
    "bn_scale",
    "conv_transpose",
    "conv_transpose_phases",
    "conv_transpose_single",
    "has_scatter_kernel",
    "is_switch_pool",
    "non_overlapping",
    "pad_of",
    "pair",
    "phase_weight",
    "phases_ok",
    "pair_ok",
    "pool_forward",
    "scatter_conv_transpose",
    "scatter_ok",
    "scatter_pair_conv_transpose",
    "unpool",
]

# Transposed convs into fewer channels than this stay dense (see scatter_ok).
SPARSE_MIN_CHANNELS = 8


def is_switch_pool(m: nn.Module) -> bool:
    """``m`` hands out switches itself (``SwitchMaxPool2d``), recognised by its interface so that the explain layer
    never imports the model side of the package."""
    return hasattr(m, "forward_with_switches") and hasattr(m, "kernel_size")


def pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def pad_of(conv: nn.Conv2d) -> tuple[int, int]:
    """The conv's zero padding as two ints (``padding="same"`` / ``"valid"`` resolved)."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        # padding="same": PyTorch pads symmetrically when the total is even, which it is for odd kernels
        k, d = pair(conv.kernel_size), pair(conv.dilation)
        tot = [d[i] * (k[i] - 1) for i in range(2)]
        if any(t % 2 for t in tot):
            raise ValueError("padding='same' with an even kernel cannot be projected")
        return (tot[0] // 2, tot[1] // 2)
    return pair(conv.padding)


# --- BatchNorm ------------------------------------------------------------------------------------------------


def bn_scale(bn: nn.BatchNorm2d) -> Tensor:
    """(C,) the per-channel factor of the BatchNorm's affine map in eval mode."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    return scale * bn.weight if bn.weight is not None else scale


def bn_forward(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    # Always the running statistics: projections use eval semantics even while the model trains.
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class FoldedWeights:
    """Each conv's weight with its BatchNorm folded in, made once per projection call rather than once per block,
    yet always from the model's current weights."""

    def __init__(self) -> None:
        self._cache: dict[str, object] = {}

    def weight(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype: torch.dtype) -> Tensor:
        """(C_out, C_in / groups, kH, kW) in ``dtype``."""
        w = self._cache.get(name)
        if w is None:
            w = conv.weight
            if bn is not None:
                w = w * bn_scale(bn).to(w.dtype).view(-1, 1, 1, 1)
            w = self._cache[name] = w.to(dtype)
        return w

    def phases(
        self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype: torch.dtype
    ) -> tuple[Tensor, tuple[int, int]]:
        """The weight split into stride x stride phases, for :func:`conv_transpose_phases`."""
        key = name + ":phases"
        if key not in self._cache:
            self._cache[key] = phase_weight(self.weight(name, conv, bn, dtype), pair(conv.stride)[0], pad_of(conv))
        return self._cache[key]

    def hwc(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype: torch.dtype) -> Tensor:
        """(C_out, kH, kW, C_in), the layout of the sparse scatter kernel."""
        key = name + ":hwc"
        if key not in self._cache:
            self._cache[key] = self.weight(name, conv, bn, dtype).permute(0, 2, 3, 1).contiguous()
        return self._cache[key]


# --- pooling with switches --------------------------------------------------------------------------------


@dataclass
class WalkBlock:
    """One block of signals going down a walk: ``group`` filters for each image of ``img_slice``."""

    method: str
    group: int
    img_slice: slice
    weights: FoldedWeights
    sparse: bool  # the sparse scatter steps may run


@dataclass
class PoolRecord:
    """What the forward pass of one max pool leaves behind for the unpooling."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    input_size: tuple[int, int]
    switches: Tensor | None = None  # uint8, same shape as the pooled output (xraydeconv.ops)
    indices: Tensor | None = None  # int64 flat indices into the input plane (torch's own max_pool2d)
    hwc: Tensor | None = field(default=None, repr=False)  # the switches (B, h, w, C) contiguous, once made

    def switches_hwc(self) -> Tensor:
        """(B, h, w, C) the switches channels-last and contiguous, as the sparse scatter reads them; made once per
        record, so that the blocks of one projection call share one copy."""
        if self.hwc is None:
            self.hwc = self.switches.permute(0, 2, 3, 1).contiguous()
        return self.hwc

    def images(self, img_slice: slice, hwc: bool = False) -> PoolRecord:
        """The record of the images ``img_slice`` only (with ``hwc``, also their slice of :meth:`switches_hwc`)."""
        return PoolRecord(
            self.kernel_size,
            self.stride,
            self.padding,
            self.input_size,
            None if self.switches is None else self.switches[img_slice],
            None if self.indices is None else self.indices[img_slice],
            self.switches_hwc()[img_slice] if hwc and self.switches is not None else None,
        )


def non_overlapping(rec: PoolRecord, pooled: tuple[int, int]) -> bool:
    """Windows tile the input without overlap or padding: each input pixel belongs to at most one window."""
    return (
        rec.stride == rec.kernel_size
        and rec.padding == (0, 0)
        and pooled[0] * rec.kernel_size[0] <= rec.input_size[0]
        and pooled[1] * rec.kernel_size[1] <= rec.input_size[1]
    )


def pool_forward(m: nn.Module, x: Tensor) -> tuple[Tensor, PoolRecord]:
    """Run the max pool ``m`` (``nn.MaxPool2d`` or a switch pool) on ``x`` and keep what its unpooling needs."""
    ks, st, pd = pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size), pair(m.padding)
    rec = PoolRecord(ks, st, pd, (x.shape[-2], x.shape[-1]))
    if is_switch_pool(m):
        out, rec.switches = m.forward_with_switches(x)
        return out, rec
    if ks[0] * ks[1] <= 255 and ops.has_kernels(x.device):
        out, rec.switches = ops.switch_pool2d(x, ks, st, pd, m.ceil_mode)
        return out, rec
    out, rec.indices = F.max_pool2d(x, ks, st, pd, 1, m.ceil_mode, return_indices=True)
    if non_overlapping(rec, out.shape[-2:]) and ks[0] * ks[1] <= 255:
        # switches (row * kW + col inside the window) from torch's flat indices, for the fast unpooling
        row, col = rec.indices.div(x.shape[-1], rounding_mode="floor"), rec.indices.remainder(x.shape[-1])
        rec.switches = (row.remainder(ks[0]) * ks[1] + col.remainder(ks[1])).to(torch.uint8)
    return out, rec


def _unpool_tiled(y: Tensor, rec: PoolRecord, group: int) -> Tensor:
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


def unpool(y: Tensor, rec: PoolRecord, group: int) -> Tensor:
    """Adjoint of the pooling selection for ``P = B * group`` signals (P, C, h, w) -> (P, C, H, W); image
    ``p // group`` gave the switches."""
    P, C, h, w = y.shape
    H, W = rec.input_size
    if rec.switches is not None and non_overlapping(rec, (h, w)):
        return _unpool_tiled(y, rec, group)
    if rec.indices is None:
        sw = rec.switches.repeat_interleave(group, dim=0) if group > 1 else rec.switches
        unpool_op = ops.switch_unpool2d if ops.has_kernels(y.device) else ops.native_switch_unpool2d
        return unpool_op(y.contiguous(), sw, rec.kernel_size, rec.stride, rec.padding, (H, W))
    idx = rec.indices.view(P // group, 1, C, h * w).expand(P // group, group, C, h * w)
    out = y.new_zeros(P // group, group, C, H * W)
    # scatter_add (not max_unpool2d's assignment) so that overlapping windows sum, as max-pool's gradient does
    out.scatter_add_(3, idx, y.reshape(P // group, group, C, h * w))
    return out.view(P, C, H, W)


# --- transposed convs -------------------------------------------------------------------------------------------


def has_scatter_kernel(t: Tensor) -> bool:
    """The sparse deconvnet step of xraydeconv._C can run on ``t`` (fp32 on the CPU, extension built)."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and ops.has_kernel("relu_scatter_conv_transpose2d")


def scatter_ok(conv: nn.Conv2d, pooled: bool) -> bool:
    """The sparse scatter beats the dense transposed conv of ``conv`` (after an unpooling when ``pooled``)."""
    if pair(conv.stride) != (1, 1) or pair(conv.dilation) != (1, 1) or conv.groups != 1:
        return False
    # wide outputs: scatter the positive values; the transposed first conv (1-4 image channels, no unpooling
    # below it): a gathering dot product over 16-channel vectors; in between the dense transposed conv wins
    narrow = not pooled and conv.in_channels <= 4 and conv.out_channels % 16 == 0
    return conv.in_channels >= SPARSE_MIN_CHANNELS or narrow


def _output_padding(conv: nn.Conv2d, k: tuple[int, int], out: tuple[int, int], in_size) -> tuple[int, int]:
    stride, pad, dil = pair(conv.stride), pad_of(conv), pair(conv.dilation)
    return tuple(in_size[d] - ((out[d] - 1) * stride[d] - 2 * pad[d] + dil[d] * (k[d] - 1) + 1) for d in range(2))


def conv_transpose(
    g: Tensor, conv: nn.Conv2d, w: Tensor, in_size: tuple[int, int], channels_last: bool = True
) -> Tensor:
    """Adjoint of ``conv`` (weight ``w``, no bias): (P, C_out, h, w) -> (P, C_in, H, W) with (H, W) = ``in_size``,
    run on ``g`` in channels-last or in NCHW layout."""
    k = (w.shape[-2], w.shape[-1])
    out_pad = _output_padding(conv, k, (g.shape[-2], g.shape[-1]), in_size)
    # oneDNN's transposed conv runs about twice as fast channels-last as NCHW on large planes with few channels,
    # and the other way round on small planes with many channels (docs/projection.md, "Any model")
    g = g.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return F.conv_transpose2d(g, w, None, pair(conv.stride), pad_of(conv), out_pad, conv.groups, pair(conv.dilation))


def conv_transpose_single(a: Tensor, conv: nn.Conv2d, w: Tensor, in_size: tuple[int, int]) -> Tensor:
    """Transposed conv of signals that are non-zero in one channel only: (P, h, w) with the (P, C_in, kH, kW)
    weights of each signal's filter -> (P, C_in, H, W).

    Only the selected filter's weights take part (a grouped conv with one group per projection) instead of a
    dense transposed conv that multiplies all the zero channels too.
    """
    P, h, wd = a.shape
    stride, pad, dil = pair(conv.stride), pad_of(conv), pair(conv.dilation)
    k = (w.shape[-2], w.shape[-1])
    out_pad = _output_padding(conv, k, (h, wd), in_size)
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


def phases_ok(conv: nn.Conv2d) -> bool:
    """The transposed conv of ``conv`` runs faster as its stride x stride phases (:func:`conv_transpose_phases`):
    a strided conv out of the image (at most 4 input channels), whose transposed conv oneDNN runs poorly."""
    s = pair(conv.stride)
    return s[0] == s[1] > 1 and pair(conv.dilation) == (1, 1) and conv.groups == 1 and conv.in_channels <= 4


def phase_weight(w: Tensor, stride: int, padding: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """Rearrange the weight (C_out, C_in, kH, kW) of a stride-``stride`` conv into the weight of one stride-1
    transposed conv producing all ``stride**2`` output phases as channels: (C_out, C_in * stride**2, mH, mW), and
    the offset (rows, cols) of phase position 0 in that conv's output."""
    C, Cin, kh, kw = w.shape
    taps, offsets = [], []
    for k, p in ((kh, padding[0]), (kw, padding[1])):
        # output y = s*a + r takes tap k = s*d + r + p from input i = a - d; d runs over d_min .. d_max
        d_min, d_max = -((p + stride - 1) // stride), (k - 1 - p) // stride
        taps.append(d_max - d_min + 1)
        offsets.append(-d_min)
    out = w.new_zeros(C, Cin, stride, stride, taps[0], taps[1])
    for r in range(stride):
        for j in range(taps[0]):
            ky = stride * (j - offsets[0]) + r + padding[0]
            if not 0 <= ky < kh:
                continue
            for c in range(stride):
                for m in range(taps[1]):
                    kx = stride * (m - offsets[1]) + c + padding[1]
                    if 0 <= kx < kw:
                        out[:, :, r, c, j, m] = w[:, :, ky, kx]
    return out.reshape(C, Cin * stride * stride, taps[0], taps[1]), (offsets[0], offsets[1])


def conv_transpose_phases(g: Tensor, phases: tuple[Tensor, tuple[int, int]], stride: int, in_size) -> Tensor:
    """The transposed conv of a strided conv as one stride-1 transposed conv into its ``stride**2`` output phases,
    interleaved by ``pixel_shuffle``: (P, C_out, h, w) -> (P, C_in, H, W) with (H, W) = ``in_size``."""
    w, (oy, ox) = phases
    H, W = in_size
    rows, cols = -(-H // stride), -(-W // stride)
    o = F.conv_transpose2d(g.contiguous(memory_format=torch.channels_last), w)
    o = F.pad(o, (0, max(0, ox + cols - o.shape[-1]), 0, max(0, oy + rows - o.shape[-2])))
    return F.pixel_shuffle(o[:, :, oy : oy + rows, ox : ox + cols], stride)[:, :, :H, :W]


def scatter_conv_transpose(
    g: Tensor, rec: PoolRecord | None, conv: nn.Conv2d, wt: Tensor, in_size: tuple[int, int], group: int
) -> Tensor:
    """``conv_transpose(relu(unpool(g)))`` as one sparse scatter over the positive values of ``g`` (P, C, h, w);
    ``rec`` (already cut to this block's images) is the tiled pooling to undo, or None; ``wt`` the
    (C_out, kH, kW, C_in) weight (:meth:`FoldedWeights.hwc`). Returns (P, C_in, H, W), channels-last."""
    src = g.permute(0, 2, 3, 1).contiguous()  # free when g is already channels-last
    sw = None if rec is None else rec.switches_hwc()
    pk = (1, 1) if rec is None else rec.kernel_size
    out = ops.relu_scatter_conv_transpose2d(src, sw, wt, pk, pad_of(conv), in_size, group)
    return out.permute(0, 3, 1, 2)


def _sliding(conv: nn.Conv2d) -> bool:
    return pair(conv.kernel_size) == (3, 3) and conv.in_channels % 16 == 0


def pair_ok(g: Tensor, rec: PoolRecord | None, conv: nn.Conv2d, conv2: nn.Conv2d,
            sizes: tuple[tuple[int, int], tuple[int, int]]) -> bool:
    """``scatter_conv_transpose`` through ``conv`` and then through ``conv2`` (input planes ``sizes``) can run as one
    pass (:func:`scatter_pair_conv_transpose`): ``conv`` a 3x3 stride-1 conv out of a multiple of 16 channels (under
    a 2x2 tiled pooling with padding 1, or none), ``conv2`` the same without pooling, or one :func:`scatter_ok`
    gathers (into at most 4 channels)."""
    if not (ops.has_kernel(PAIR_OP) and has_scatter_kernel(g) and scatter_ok(conv, rec is not None)
            and _sliding(conv)):
        return False
    if not scatter_ok(conv2, False) or conv2.out_channels != conv.in_channels:
        return False
    (mh, mw), (oh, ow) = sizes
    pad2 = pad_of(conv2)
    if conv2.in_channels > 4 and not (_sliding(conv2) and oh <= mh + 2 - pad2[0] and ow <= mw + 2 - pad2[1]):
        return False
    in_size = sizes[0]
    h, w = g.shape[-2:]
    if rec is None:
        pad = pad_of(conv)
        return in_size[0] <= h + 2 - pad[0] and in_size[1] <= w + 2 - pad[1]
    tiled = rec.switches is not None and rec.kernel_size == rec.stride == (2, 2) and non_overlapping(rec, (h, w))
    return tiled and pad_of(conv) == (1, 1) and in_size[0] <= 2 * h + 1 and in_size[1] <= 2 * w + 1


def scatter_pair_conv_transpose(
    g: Tensor, rec: PoolRecord | None, convs: tuple[nn.Conv2d, nn.Conv2d], wts: tuple[Tensor, Tensor],
    sizes: tuple[tuple[int, int], tuple[int, int]], group: int
) -> Tensor:
    """``scatter_conv_transpose`` through ``convs[0]`` and then ``convs[1]`` (weights ``wts``, input planes
    ``sizes``) in one pass that never materialises the plane in between (see :func:`pair_ok`): (P, C, h, w) ->
    (P, C_in of convs[1], H, W), channels-last."""
    src = g.permute(0, 2, 3, 1).contiguous()
    sw = None if rec is None else rec.switches_hwc()
    pk = (1, 1) if rec is None else rec.kernel_size
    pads = (pad_of(convs[0]), pad_of(convs[1]))
    out = relu_scatter_conv_transpose2d_pair(src, sw, wts[0], wts[1], pk, pads[0], pads[1], sizes[0], sizes[1], group)
    return out.permute(0, 3, 1, 2)
