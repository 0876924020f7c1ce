"""The sparse deconvnet step: (tiled unpool ->) ReLU -> transposed conv, as one scatter over positive values.

``relu_scatter_conv_transpose2d`` reads a channels-last signal and only touches its positive values, so the
top-n projections of a deconvnet (mostly zeros after rectification) cost what their support costs. It is a CPU,
float32, inference-only kernel: it has no gradient (a backward through it raises a RuntimeError), and
:mod:`xraydeconv.explain.deconvnet` falls back to PyTorch's dense ops elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor

from xraydeconv.ops import extension
from xraydeconv.ops.geometry import int_pair
from xraydeconv.ops.kernels import require_kernels

__all__ = ["relu_scatter_conv_transpose2d", "relu_scatter_conv_transpose2d_pair"]

OP = "relu_scatter_conv_transpose2d"
PAIR_OP = "relu_scatter_conv_transpose2d_pair"


def _check_tensors(g: Tensor, switches: Tensor | None, weight: Tensor, group: int, op: str = OP) -> None:
    if g.dim() != 4:
        raise ValueError(f"{op}: g must be 4-D (P, h, w, C), got {g.dim()}-D")
    if weight.dim() != 4:
        raise ValueError(f"{op}: weight must be 4-D (C, kH, kW, C_out), got {weight.dim()}-D")
    if g.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f"{op}: g and weight must be float32, got {g.dtype} and {weight.dtype}")
    if weight.shape[0] != g.shape[3]:
        raise ValueError(f"{op}: weight has {weight.shape[0]} filters but g has {g.shape[3]} channels")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or g.shape[0] % group:
        raise ValueError(f"{op}: group must be a positive divisor of P = {g.shape[0]}, got {group!r}")
    if switches is None:
        return
    expected = (g.shape[0] // group, *g.shape[1:])
    if switches.dtype != torch.uint8 or tuple(switches.shape) != expected:
        raise ValueError(f"{op}: switches must be uint8 of shape (P / group, h, w, C) = {expected}, got "
                         f"{switches.dtype} {tuple(switches.shape)}")


def _check_args(g: Tensor, switches: Tensor | None, weight: Tensor, pool_kernel, padding, output_size,
                group: int, op: str = OP, size_name: str = "output_size") -> None:
    """The C++ kernel's checks, with the same messages, for the wrapper and the fake kernel."""
    _check_tensors(g, switches, weight, group, op)
    if min(padding) < 0:
        raise ValueError(f"{op}: padding must be non-negative, got {tuple(padding)}")
    if min(output_size) <= 0:
        raise ValueError(f"{op}: {size_name} must be positive, got {tuple(output_size)}")
    if switches is None:
        return
    if min(pool_kernel) < 1 or pool_kernel[0] * pool_kernel[1] > 256:
        raise ValueError(f"{op}: pool_kernel must be positive with at most 256 positions, got {tuple(pool_kernel)}")
    kh, kw = weight.shape[1], weight.shape[2]
    unpooled = (g.shape[1] * pool_kernel[0], g.shape[2] * pool_kernel[1])
    if unpooled[0] > output_size[0] + kh - 1 or unpooled[1] > output_size[1] + kw - 1:
        raise ValueError(f"{op}: {size_name} {tuple(output_size)} is too small for the unpooled signal of size "
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


def _check_pair(g: Tensor, switches: Tensor | None, weight: Tensor, weight2: Tensor, pool_kernel, padding, padding2,
                mid_size, output_size, group: int) -> None:
    """The C++ kernel's checks of the pair, with the same messages."""
    _check_args(g, switches, weight, pool_kernel, padding, mid_size, group, PAIR_OP, "mid_size")
    if weight2.dim() != 4 or weight2.dtype != torch.float32:
        raise ValueError(f"{PAIR_OP}: weight2 must be a float32 4-D (C_mid, kH, kW, C_out) tensor, got "
                         f"{weight2.dtype} {tuple(weight2.shape)}")
    if min(padding2) < 0:
        raise ValueError(f"{PAIR_OP}: padding2 must be a non-negative pair, got {tuple(padding2)}")
    if min(output_size) <= 0:
        raise ValueError(f"{PAIR_OP}: output_size must be a positive pair, got {tuple(output_size)}")
    cmid = weight.shape[3]
    if weight2.shape[0] != cmid:
        raise ValueError(f"{PAIR_OP}: weight2 has {weight2.shape[0]} filters but weight has {cmid} output channels")
    h, w = g.shape[1:3]
    reach = (2 * h + 1, 2 * w + 1) if switches is not None else (h + 2 - padding[0], w + 2 - padding[1])
    pooled_ok = switches is None or (tuple(pool_kernel) == (2, 2) and tuple(padding) == (1, 1))
    if (weight.shape[1:3] != (3, 3) or cmid % 16 or not pooled_ok or mid_size[0] > reach[0]
            or mid_size[1] > reach[1]):
        raise ValueError(f"{PAIR_OP}: the first step must be a 3x3 kernel into a multiple of 16 channels, without "
                         "unpooling or with 2x2 windows and padding 1, and mid_size within its reach")
    k2, cout2 = tuple(weight2.shape[1:3]), weight2.shape[3]
    reach2 = (mid_size[0] + 2 - padding2[0], mid_size[1] + 2 - padding2[1])
    sliding2 = k2 == (3, 3) and cout2 % 16 == 0 and output_size[0] <= reach2[0] and output_size[1] <= reach2[1]
    if cout2 > 4 and not sliding2:
        raise ValueError(f"{PAIR_OP}: the second step must have at most 4 output channels, or be a 3x3 kernel into a "
                         f"multiple of 16 channels with output_size within its reach, got {tuple(weight2.shape)} and "
                         f"output_size {tuple(output_size)}")


def relu_scatter_conv_transpose2d_pair(
    g: Tensor,
    switches: Tensor | None,
    weight: Tensor,
    weight2: Tensor,
    pool_kernel: int | Sequence[int],
    padding: int | Sequence[int],
    padding2: int | Sequence[int],
    mid_size: Sequence[int],
    output_size: Sequence[int],
    group: int = 1,
) -> Tensor:
    """Two deconvnet steps in one pass: ``relu_scatter_conv_transpose2d`` with ``weight``, then again with
    ``weight2`` (no unpooling), without materialising the (P, *mid_size, C_mid) plane in between (its rows go round
    a small ring that the second step reads as soon as they are final).

    Both steps must be 3x3 kernels into a multiple of 16 channels (the first without unpooling or with 2x2 windows
    and padding 1, the second within its reach), or the second step one into at most 4 channels (the transposed
    first conv): the stages of a VGG-style net. The result equals the two single steps bit for bit.

    Args:
        g, switches, weight, pool_kernel, padding, group: the first step, as in
            :func:`relu_scatter_conv_transpose2d`; ``weight`` (C, 3, 3, C_mid).
        weight2: (C_mid, kH, kW, C_out) float32, the second step's weight.
        padding2: (pH, pW), the second conv's zero padding.
        mid_size: (MH, MW), the first step's output plane (the second conv's output).
        output_size: (OH, OW), the second step's output plane.

    Returns:
        (P, OH, OW, C_out) float32, channels-last.
    """
    pk, pad = int_pair(pool_kernel, "pool_kernel"), int_pair(padding, "padding")
    pad2, mid = int_pair(padding2, "padding2"), int_pair(mid_size, "mid_size")
    size = int_pair(output_size, "output_size")
    _check_pair(g, switches, weight, weight2, pk, pad, pad2, mid, size, group)
    require_kernels(g, PAIR_OP)
    sw = None if switches is None else switches.contiguous()
    return torch.ops.xraydeconv.relu_scatter_conv_transpose2d_pair(
        g.contiguous(), sw, weight.contiguous(), weight2.contiguous(), pk, pad, pad2, mid, size, group
    )


def _fake_pair(g: Tensor, switches: Tensor | None, weight: Tensor, weight2: Tensor, pool_kernel, padding, padding2,
               mid_size, output_size, group: int) -> Tensor:
    _check_pair(g, switches, weight, weight2, pool_kernel, padding, padding2, mid_size, output_size, group)
    return g.new_empty((g.shape[0], output_size[0], output_size[1], weight2.shape[3]))


def _fake(g: Tensor, switches: Tensor | None, weight: Tensor, pool_kernel, padding, output_size, group: int) -> Tensor:
    _check_args(g, switches, weight, pool_kernel, padding, output_size, group)
    return g.new_empty((g.shape[0], output_size[0], output_size[1], weight.shape[3]))


def _no_gradient(ctx, grad_out: Tensor, op: str = OP):
    raise RuntimeError(
        f"{op} is inference-only and has no gradient; for training, unpool with switch_unpool2d and use "
        "F.relu and F.conv_transpose2d"
    )


def _setup(ctx, inputs, output) -> None:
    pass


if extension.load():
    torch.library.register_fake(f"xraydeconv::{OP}")(_fake)
    # an explicit autograd kernel, so that a backward through the op fails with a clear message instead of
    # PyTorch's generic "no autograd kernel" warning
    torch.library.register_autograd(f"xraydeconv::{OP}", _no_gradient, setup_context=_setup)
    torch.library.register_fake(f"xraydeconv::{PAIR_OP}")(_fake_pair)
    torch.library.register_autograd(f"xraydeconv::{PAIR_OP}", partial(_no_gradient, op=PAIR_OP), setup_context=_setup)
