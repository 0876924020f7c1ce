"""Max pooling with uint8 "switches" and its exact adjoint, as dispatcher ops and in pure PyTorch.

The switches of a pooled value are the position of the maximum inside its window, ``row * kW + col``
(one byte per pooled value instead of the eight of ``max_pool2d``'s int64 indices). Four ops use them:

- :func:`switch_pool2d` -- max pooling that also returns the switches;
- :func:`switch_relu_pool2d` -- the same of ``relu(x)`` in one pass (a ReLU followed by a max pool, fused);
- :func:`switch_unpool2d` -- the exact adjoint of the selection: every input position receives the sum
  of the pooled values whose switch points at it (``max_unpool2d`` for tiling windows, max-pool's
  gradient for overlapping ones);
- :func:`switch_gather2d` -- read a tensor at the switch positions (the adjoint of unpooling).

They run the compiled kernels of ``xraydeconv._C`` (``torch.ops.xraydeconv.*``, with fake tensors registered
here and autograd in C++, so they differentiate and work under ``torch.compile``). ``native_*`` are pure-PyTorch
twins with identical semantics built on ``F.max_pool2d(..., return_indices=True)`` / ``F.max_unpool2d``, and
:func:`switches_to_indices` / :func:`indices_to_switches` convert between the two representations.

Declared API twins: :func:`switch_pool2d`, :func:`switch_relu_pool2d`, :func:`switch_unpool2d` and
:func:`switch_gather2d` here and ``native_switch_pool2d``, ``native_switch_relu_pool2d``, ``native_switch_unpool2d``
and ``native_switch_gather2d`` in
:mod:`xraydeconv.ops.native` take the same arguments in the same order and return the same values; their
signatures and docstrings mirror each other on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from xraydeconv.ops import extension
from xraydeconv.ops.geometry import (
    IntPair,
    check_spatial,
    memory_format,
    pool_geometry,
    pooled_size,
    unpooled_size,
)
from xraydeconv.ops.kernels import require_kernels

__all__ = ["switch_pool2d", "switch_relu_pool2d", "switch_pool2d_out", "switch_unpool2d", "switch_unpool2d_out",
           "switch_gather2d"]


# ---------------------------------------------------------------------------------------------------------------
# The kernel ops


def _kernel_geometry(t: Tensor, kernel_size: IntPair, stride: IntPair | None, padding: IntPair):
    """The checked ``(k, s, p)`` pairs of a call on ``t``, after making sure its device has the kernels."""
    require_kernels(t)
    return pool_geometry(kernel_size, stride, padding)


def switch_pool2d(
    x: Tensor, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0, ceil_mode: bool = False
) -> tuple[Tensor, Tensor]:
    """Max pooling that also returns the switches.

    Args:
        x: (N, C, H, W) or (C, H, W), float32/float64/float16/bfloat16, contiguous or channels_last.
        kernel_size, stride, padding, ceil_mode: as in ``F.max_pool2d`` (stride defaults to kernel_size;
            no dilation); the window may have at most 255 positions.

    Returns:
        ``(out, switches)``: ``out`` (..., OH, OW) identical to ``F.max_pool2d`` (NaN propagates), in x's
        memory format; ``switches`` uint8 of the same shape, ``row * kW + col`` of the maximum in its
        window (the first maximum in row-major order on ties).
    """
    k, s, p = _kernel_geometry(x, kernel_size, stride, padding)
    return torch.ops.xraydeconv.switch_pool2d(x, k, s, p, ceil_mode)


def switch_relu_pool2d(
    x: Tensor, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0, ceil_mode: bool = False
) -> tuple[Tensor, Tensor]:
    """:func:`switch_pool2d` of ``relu(x)`` without writing ``relu(x)``: a ReLU followed by a max pool, fused.

    Args and returns as :func:`switch_pool2d`. ``out`` and ``switches`` equal ``switch_pool2d(torch.relu(x))``
    (a zero maximum is +0), and the gradient equals that of ``F.max_pool2d(torch.relu(x))``: ReLU's backward
    runs on the pooled gradient, then unpooling writes the input's gradient once.
    """
    k, s, p = _kernel_geometry(x, kernel_size, stride, padding)
    return torch.ops.xraydeconv.switch_relu_pool2d(x, k, s, p, ceil_mode)


def switch_pool2d_out(
    x: Tensor,
    out: Tensor,
    switches: Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`switch_pool2d` into preallocated ``out`` and ``switches`` (contiguous in x's memory format)."""
    k, s, p = _kernel_geometry(x, kernel_size, stride, padding)
    torch.ops.xraydeconv.switch_pool2d_out(x, k, s, p, ceil_mode, out, switches)
    return out, switches


def switch_unpool2d(
    y: Tensor,
    switches: Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    output_size: Sequence[int] | None = None,
) -> Tensor:
    """Exact adjoint of the max-pool selection.

    Args:
        y: pooled-shaped tensor (N, C, OH, OW) or (C, OH, OW).
        switches: uint8, same shape as ``y`` (from :func:`switch_pool2d`).
        output_size: (H, W) of the pooling input; it must pool to (OH, OW) with this geometry.
            Defaults to the smallest such size, ``(OH - 1) * stride - 2 * padding + kernel_size``.

    Returns:
        (..., H, W) in y's memory format: each position holds the sum of the ``y`` values whose
        switch points at it, zero elsewhere.
    """
    k, s, p = _kernel_geometry(y, kernel_size, stride, padding)
    size = unpooled_size(y, k, s, p, output_size)
    return torch.ops.xraydeconv.switch_unpool2d(y, switches, k, s, p, size)


def switch_unpool2d_out(
    y: Tensor, switches: Tensor, out: Tensor, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0
) -> Tensor:
    """:func:`switch_unpool2d` into a preallocated ``out`` (its (H, W) is the output size)."""
    k, s, p = _kernel_geometry(y, kernel_size, stride, padding)
    torch.ops.xraydeconv.switch_unpool2d_out(y, switches, k, s, p, out)
    return out


def switch_gather2d(
    x: Tensor, switches: Tensor, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0
) -> Tensor:
    """Read ``x`` (..., H, W) at the switch positions: a tensor shaped like ``switches`` (..., OH, OW).

    ``switch_gather2d(x, switch_pool2d(x, ...)[1], ...)`` equals the pooled values.
    """
    k, s, p = _kernel_geometry(x, kernel_size, stride, padding)
    return torch.ops.xraydeconv.switch_gather2d(x, switches, k, s, p)


# ---------------------------------------------------------------------------------------------------------------
# Fake tensors for the dispatcher ops (registered once the extension is loaded); their autograd is C++
# (csrc/autograd.cpp): pool's backward is unpool (relu-pool's masks the pooled gradient first), unpool's is gather,
# gather's is unpool


def _pool_fake(x: Tensor, kernel_size, stride, padding, ceil_mode):
    check_spatial(x, "switch_pool2d", "input")
    k, s, p = pool_geometry(kernel_size, stride, padding)
    oh = pooled_size(x.shape[-2], k[0], s[0], p[0], ceil_mode)
    ow = pooled_size(x.shape[-1], k[1], s[1], p[1], ceil_mode)
    shape = (*x.shape[:-2], oh, ow)
    fmt = memory_format(x)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    sw = torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=fmt)
    return out, sw


def _unpool_fake(y: Tensor, switches: Tensor, kernel_size, stride, padding, output_size):
    check_spatial(y, "switch_unpool2d", "y")
    shape = (*y.shape[:-2], output_size[0], output_size[1])
    return torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=memory_format(y))


def _gather_fake(x: Tensor, switches: Tensor, kernel_size, stride, padding):
    check_spatial(x, "switch_gather2d", "x")
    return torch.empty(switches.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))


def _register() -> None:
    lib = "xraydeconv::"
    torch.library.register_fake(lib + "switch_pool2d")(_pool_fake)
    torch.library.register_fake(lib + "switch_relu_pool2d")(_pool_fake)
    torch.library.register_fake(lib + "switch_unpool2d")(_unpool_fake)
    torch.library.register_fake(lib + "switch_gather2d")(_gather_fake)
    torch.library.register_fake(lib + "switch_pool2d_out")(lambda *args: None)
    torch.library.register_fake(lib + "switch_unpool2d_out")(lambda *args: None)


if extension.load():
    _register()
