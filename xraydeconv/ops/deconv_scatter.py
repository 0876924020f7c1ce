"""The sparse deconvnet step: (tiled unpool ->) ReLU -> transposed conv, as one scatter over positive values.

``relu_scatter_conv_transpose2d`` reads a channels-last signal and only touches its positive values, so the
top-n projections of a deconvnet (mostly zeros after rectification) cost what their support costs. It is a CPU,
float32, inference-only kernel: it has no gradient (a backward through it raises a RuntimeError), and
:mod:`xraydeconv.explain.deconvnet` falls back to PyTorch's dense ops elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from xraydeconv.ops import extension
from xraydeconv.ops.geometry import int_pair
from xraydeconv.ops.kernels import require_kernels

__all__ = ["relu_scatter_conv_transpose2d"]

OP = "relu_scatter_conv_transpose2d"


def _check_tensors(g: Tensor, switches: Tensor | None, weight: Tensor, group: int) -> None:
    if g.dim() != 4:
        raise ValueError(f"{OP}: g must be 4-D (P, h, w, C), got {g.dim()}-D")
    if weight.dim() != 4:
        raise ValueError(f"{OP}: weight must be 4-D (C, kH, kW, C_out), got {weight.dim()}-D")
    if g.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f"{OP}: g and weight must be float32, got {g.dtype} and {weight.dtype}")
    if weight.shape[0] != g.shape[3]:
        raise ValueError(f"{OP}: weight has {weight.shape[0]} filters but g has {g.shape[3]} channels")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or g.shape[0] % group:
        raise ValueError(f"{OP}: group must be a positive divisor of P = {g.shape[0]}, got {group!r}")
    if switches is None:
        return
    expected = (g.shape[0] // group, *g.shape[1:])
    if switches.dtype != torch.uint8 or tuple(switches.shape) != expected:
        raise ValueError(f"{OP}: switches must be uint8 of shape (P / group, h, w, C) = {expected}, got "
                         f"{switches.dtype} {tuple(switches.shape)}")


def _check_args(g: Tensor, switches: Tensor | None, weight: Tensor, pool_kernel, padding, output_size,
                group: int) -> None:
    """The C++ kernel's checks, with the same messages, for the wrapper and the fake kernel."""
    _check_tensors(g, switches, weight, group)
    if min(padding) < 0:
        raise ValueError(f"{OP}: padding must be non-negative, got {tuple(padding)}")
    if min(output_size) <= 0:
        raise ValueError(f"{OP}: output_size must be positive, got {tuple(output_size)}")
    if switches is None:
        return
    if min(pool_kernel) < 1 or pool_kernel[0] * pool_kernel[1] > 256:
        raise ValueError(f"{OP}: pool_kernel must be positive with at most 256 positions, got {tuple(pool_kernel)}")
    kh, kw = weight.shape[1], weight.shape[2]
    unpooled = (g.shape[1] * pool_kernel[0], g.shape[2] * pool_kernel[1])
    if unpooled[0] > output_size[0] + kh - 1 or unpooled[1] > output_size[1] + kw - 1:
        raise ValueError(f"{OP}: output_size {tuple(output_size)} is too small for the unpooled signal of size "
                         f"{unpooled}")


def relu_scatter_conv_transpose2d(
    g: Tensor,
    switches: Tensor | None,
    weight: Tensor,
    pool_kernel: int | Sequence[int],
    padding: int | Sequence[int],
    output_size: Sequence[int],
    group: int = 1,
) -> Tensor:
    """``conv_transpose2d(relu(unpool(g)))`` for a stride-1 conv, computed from the positive values of ``g`` only.

    Args:
        g: (P, h, w, C) float32, channels-last signals (P = images * group).
        switches: None (no unpooling), or uint8 (P / group, h, w, C) switches of a tiling max pool with window
            ``pool_kernel``; signal ``p`` is unpooled with the switches of image ``p // group``.
        weight: (C, kH, kW, C_out) float32, the conv's weight permuted to filters-first channels-last.
        pool_kernel: (pkH, pkW), the pooling window (ignored without switches).
        padding: (pH, pW), the conv's zero padding.
        output_size: (OH, OW) of the conv's input plane.
        group: how many signals share one image's switches.

    Returns:
        (P, OH, OW, C_out) float32, channels-last.
    """
    pk, pad = int_pair(pool_kernel, "pool_kernel"), int_pair(padding, "padding")
    size = int_pair(output_size, "output_size")
    _check_args(g, switches, weight, pk, pad, size, group)
    require_kernels(g, OP)
    # the kernel reads raw (P, h, w, C) rows: a permuted view is copied once here, a contiguous tensor is not
    sw = None if switches is None else switches.contiguous()
    return torch.ops.xraydeconv.relu_scatter_conv_transpose2d(g.contiguous(), sw, weight.contiguous(), pk, pad,
                                                              size, group)


def _fake(g: Tensor, switches: Tensor | None, weight: Tensor, pool_kernel, padding, output_size, group: int) -> Tensor:
    _check_args(g, switches, weight, pool_kernel, padding, output_size, group)
    return g.new_empty((g.shape[0], output_size[0], output_size[1], weight.shape[3]))


def _no_gradient(ctx, grad_out: Tensor):
    raise RuntimeError(
        f"{OP} is inference-only and has no gradient; for training, unpool with switch_unpool2d and use "
        "F.relu and F.conv_transpose2d"
    )


def _setup(ctx, inputs, output) -> None:
    pass


if extension.load():
    torch.library.register_fake(f"xraydeconv::{OP}")(_fake)
    # an explicit autograd kernel, so that a backward through the op fails with a clear message instead of
    # PyTorch's generic "no autograd kernel" warning
    torch.library.register_autograd(f"xraydeconv::{OP}", _no_gradient, setup_context=_setup)
