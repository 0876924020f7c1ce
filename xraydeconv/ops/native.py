"""Pure-PyTorch twins of the switch ops, and conversions between switches and ``max_pool2d``'s indices.

The twins have the kernels' exact semantics and are what ``backend="native"`` runs; the tests hold the two
paths equal. They are the declared API twins of :mod:`xraydeconv.ops.switch_pool`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from xraydeconv.ops.geometry import IntPair, pool_geometry, pooled_size, unpooled_size

__all__ = ["switches_to_indices", "indices_to_switches", "native_switch_pool2d", "native_switch_relu_pool2d",
           "native_switch_unpool2d", "native_switch_gather2d"]


def _window_origins(out_h: int, out_w: int, s, p, device: torch.device) -> tuple[Tensor, Tensor]:
    h0 = (torch.arange(out_h, device=device) * s[0] - p[0]).view(out_h, 1)
    w0 = (torch.arange(out_w, device=device) * s[1] - p[1]).view(1, out_w)
    return h0, w0


def switches_to_indices(
    switches: Tensor,
    kernel_size: IntPair,
    stride: IntPair | None,
    padding: IntPair,
    input_size: Sequence[int],
) -> Tensor:
    """Native flat int64 indices (``ih * W + iw``, as returned by ``max_pool2d``) of the switch positions.

    Raises ValueError when a switch lies outside its window or outside the (H, W) input.
    """
    k, s, p = pool_geometry(kernel_size, stride, padding)
    if switches.dtype != torch.uint8:
        raise ValueError(f"switches must be uint8, got {switches.dtype}")
    h, w = int(input_size[-2]), int(input_size[-1])
    h0, w0 = _window_origins(switches.shape[-2], switches.shape[-1], s, p, switches.device)
    sw = switches.long()
    ih = h0 + sw // k[1]
    iw = w0 + sw % k[1]
    bad = (sw >= k[0] * k[1]) | (ih < 0) | (ih >= h) | (iw < 0) | (iw >= w)
    if bool(bad.any()):
        raise ValueError(f"switches point outside their {k[0]}x{k[1]} windows or the {h}x{w} input")
    return ih * w + iw


def indices_to_switches(
    indices: Tensor,
    kernel_size: IntPair,
    stride: IntPair | None,
    padding: IntPair,
    input_size: Sequence[int],
) -> Tensor:
    """uint8 switches (``row * kW + col`` inside each window) from ``max_pool2d``'s flat int64 indices.

    Raises ValueError when an index is not inside its window.
    """
    k, s, p = pool_geometry(kernel_size, stride, padding)
    w = int(input_size[-1])
    h0, w0 = _window_origins(indices.shape[-2], indices.shape[-1], s, p, indices.device)
    kh = indices // w - h0
    kw = indices % w - w0
    bad = (kh < 0) | (kh >= k[0]) | (kw < 0) | (kw >= k[1])
    if bool(bad.any()):
        raise ValueError(f"indices are not inside their {k[0]}x{k[1]} windows")
    return (kh * k[1] + kw).to(torch.uint8)


def native_switch_pool2d(
    x: Tensor, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0, ceil_mode: bool = False
) -> tuple[Tensor, Tensor]:
    """:func:`switch_pool2d` on ``F.max_pool2d(..., return_indices=True)`` (same values and switches)."""
    k, s, p = pool_geometry(kernel_size, stride, padding)
    out, idx = F.max_pool2d(x, k, s, p, ceil_mode=ceil_mode, return_indices=True)
    return out, indices_to_switches(idx, k, s, p, x.shape[-2:])


def native_switch_relu_pool2d(
    x: Tensor, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0, ceil_mode: bool = False
) -> tuple[Tensor, Tensor]:
    """:func:`switch_relu_pool2d` as ``F.relu`` then :func:`native_switch_pool2d` (same values and switches)."""
    return native_switch_pool2d(F.relu(x), kernel_size, stride, padding, ceil_mode)


def native_switch_unpool2d(
    y: Tensor,
    switches: Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    output_size: Sequence[int] | None = None,
) -> Tensor:
    """:func:`switch_unpool2d` on ``F.max_unpool2d`` (tiling windows) or a scatter-add (overlapping or padded)."""
    k, s, p = pool_geometry(kernel_size, stride, padding)
    size = unpooled_size(y, k, s, p, output_size)
    pooled = (switches.shape[-2], switches.shape[-1])
    for ax in (0, 1):
        if pooled[ax] not in (pooled_size(size[ax], k[ax], s[ax], p[ax], c) for c in (False, True)):
            raise ValueError(f"output_size {size} does not pool to the switches' size {pooled}")
    idx = switches_to_indices(switches, k, s, p, size)
    if s[0] >= k[0] and s[1] >= k[1] and p == (0, 0):
        return F.max_unpool2d(y, idx, k, s, p, output_size=size)
    flat = y.new_zeros((*y.shape[:-2], size[0] * size[1]))
    out = flat.scatter_add(-1, idx.reshape(*idx.shape[:-2], -1), y.reshape(*y.shape[:-2], -1))
    return out.view(*y.shape[:-2], size[0], size[1])


def native_switch_gather2d(
    x: Tensor, switches: Tensor, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0
) -> Tensor:
    """:func:`switch_gather2d` on ``Tensor.gather`` with the native indices."""
    k, s, p = pool_geometry(kernel_size, stride, padding)
    idx = switches_to_indices(switches, k, s, p, x.shape[-2:])
    flat = x.reshape(*x.shape[:-2], -1).gather(-1, idx.reshape(*idx.shape[:-2], -1))
    return flat.view(switches.shape)
