"""Pooling geometry shared by the kernel ops, their fake kernels and the native twins.

``pool_geometry`` normalises and checks (kernel_size, stride, padding) with ValueError messages that name the
argument; the size helpers follow ATen's ``pooling_output_shape`` so that both paths agree to the element.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["IntPair", "int_pair", "pool_geometry", "pooled_size", "pool_output_size", "unpooled_size",
           "memory_format", "check_spatial"]

IntPair = int | Sequence[int]


def int_pair(value: IntPair, name: str) -> tuple[int, int]:
    """``value`` as an (int, int) pair; ValueError naming ``name`` when it is neither an int nor one or two ints."""
    if isinstance(value, int):
        return (value, value)
    vals = tuple(int(v) for v in value)
    if len(vals) == 1:
        return (vals[0], vals[0])
    if len(vals) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return vals  # type: ignore[return-value]


def pool_geometry(
    kernel_size: IntPair, stride: IntPair | None, padding: IntPair
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``(k, s, p)`` pairs of a pooling window (stride defaults to the window); ValueError on a bad window."""
    k = int_pair(kernel_size, "kernel_size")
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else int_pair(stride, "stride")
    p = int_pair(padding, "padding")
    if min(k) <= 0 or min(s) <= 0 or min(p) < 0:
        raise ValueError(f"kernel_size {k} and stride {s} must be positive and padding {p} non-negative")
    if k[0] * k[1] > 255:
        raise ValueError(f"a {k[0]}x{k[1]} window has more than 255 positions; uint8 switches hold at most 255")
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"padding {p} must be at most half of kernel_size {k}")
    return k, s, p


def pooled_size(size, k: int, s: int, p: int, ceil_mode: bool):
    """Pooled length of one axis of ``size``."""
    # ATen's pooling_output_shape (dilation 1); works on SymInts under torch.compile
    out = (size + 2 * p - (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out = out - 1
    return out


def pool_output_size(
    input_size: Sequence[int],
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
) -> tuple[int, int]:
    """(OH, OW) of pooling an (H, W) input, exactly as ``F.max_pool2d`` computes it."""
    k, s, p = pool_geometry(kernel_size, stride, padding)
    h, w = input_size[-2], input_size[-1]
    return pooled_size(h, k[0], s[0], p[0], ceil_mode), pooled_size(w, k[1], s[1], p[1], ceil_mode)


def memory_format(t: Tensor) -> torch.memory_format:
    """The memory format the ops give their outputs for input ``t``."""
    # the rule of csrc/switch_pool_checks.h: NHWC only when 4-D, channels-last and not also contiguous
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def check_spatial(t: Tensor, op: str, name: str) -> None:
    """ValueError unless ``t`` is (C, H, W) or (N, C, H, W)."""
    if t.dim() not in (3, 4):
        raise ValueError(f"{op}: {name} must be 3-D (C, H, W) or 4-D (N, C, H, W), got {t.dim()}-D")


def unpooled_size(y: Tensor, k, s, p, output_size: Sequence[int] | None) -> tuple[int, int]:
    """The (H, W) to unpool to: ``output_size``'s last two values, or the smallest size that pools to y's."""
    if output_size is not None:
        return int_pair(tuple(output_size)[-2:], "output_size")
    return (
        (y.shape[-2] - 1) * s[0] - 2 * p[0] + k[0],
        (y.shape[-1] - 1) * s[1] - 2 * p[1] + k[1],
    )
