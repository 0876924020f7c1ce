"""Max pooling with uint8 "switches" and its exact adjoint, as dispatcher ops and in pure PyTorch.

The switches of a pooled value are the position of the maximum inside its window, ``row * kW + col``
(one byte per pooled value instead of the eight of ``max_pool2d``'s int64 indices). Three ops use them:

- :func:`switch_pool2d` -- max pooling that also returns the switches;
- :func:`switch_unpool2d` -- the exact adjoint of the selection: every input position receives the sum
  of the pooled values whose switch points at it (``max_unpool2d`` for tiling windows, max-pool's
  gradient for overlapping ones);
- :func:`switch_gather2d` -- read a tensor at the switch positions (the adjoint of unpooling).

They run the compiled kernels of ``xraydeconv._C`` (``torch.ops.xraydeconv.*``, with fake tensors and
autograd registered here so they work under ``torch.compile``). ``native_*`` are pure-PyTorch twins with
identical semantics built on ``F.max_pool2d(..., return_indices=True)`` / ``F.max_unpool2d``, and
:func:`switches_to_indices` / :func:`indices_to_switches` convert between the two representations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from xraydeconv import _extension

__all__ = [
    "has_kernels",
    "pool_output_size",
    "switch_pool2d",
    "switch_pool2d_out",
    "switch_unpool2d",
    "switch_unpool2d_out",
    "switch_gather2d",
    "switches_to_indices",
    "indices_to_switches",
    "native_switch_pool2d",
    "native_switch_unpool2d",
    "native_switch_gather2d",
]

IntPair = int | Sequence[int]


def _pair(value: IntPair, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    vals = tuple(int(v) for v in value)
    if len(vals) == 1:
        return (vals[0], vals[0])
    if len(vals) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return vals  # type: ignore[return-value]


def _geometry(
    kernel_size: IntPair, stride: IntPair | None, padding: IntPair
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    k = _pair(kernel_size, "kernel_size")
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _pair(stride, "stride")
    p = _pair(padding, "padding")
    if min(k) <= 0 or min(s) <= 0 or min(p) < 0:
        raise ValueError(f"kernel_size {k} and stride {s} must be positive and padding {p} non-negative")
    if k[0] * k[1] > 255:
        raise ValueError(f"a {k[0]}x{k[1]} window has more than 255 positions; uint8 switches hold at most 255")
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"padding {p} must be at most half of kernel_size {k}")
    return k, s, p


def _pooled_size(size, k: int, s: int, p: int, ceil_mode: bool):
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
    k, s, p = _geometry(kernel_size, stride, padding)
    h, w = input_size[-2], input_size[-1]
    return _pooled_size(h, k[0], s[0], p[0], ceil_mode), _pooled_size(w, k[1], s[1], p[1], ceil_mode)


def _memory_format(t: Tensor) -> torch.memory_format:
    # the rule of csrc/switch_pool_checks.h: NHWC only when 4-D, channels-last and not also contiguous
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _kernel_devices() -> dict[str, bool]:
    if not _extension.load():
        return {}
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {dev: has("xraydeconv::switch_pool2d", key) for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


# fixed once the extension is loaded; a plain dict so that torch.compile reads it as a constant
_KERNELS: dict[str, bool] = _kernel_devices()


def has_kernels(device: str | torch.device = "cpu") -> bool:
    """True when ``xraydeconv._C`` is built and has kernels for ``device`` ("cpu" or "cuda")."""
    dev = device if isinstance(device, str) else device.type
    return _KERNELS.get(dev.split(":")[0], False)


def _require(t: Tensor) -> None:
    if torch.compiler.is_compiling():
        return
    _extension.require()
    if not has_kernels(t.device):
        raise RuntimeError(
            f"xraydeconv._C has no {t.device.type} kernels in this build (CUDA kernels are compiled only when "
            "nvcc is found at build time, or with FORCE_CUDA=1); rebuild it, or use backend='native'"
        )


# ---------------------------------------------------------------------------------------------------------------
# The kernel ops


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
    _require(x)
    k, s, p = _geometry(kernel_size, stride, padding)
    return torch.ops.xraydeconv.switch_pool2d(x, k, s, p, ceil_mode)


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
    _require(x)
    k, s, p = _geometry(kernel_size, stride, padding)
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
    _require(y)
    k, s, p = _geometry(kernel_size, stride, padding)
    size = _unpooled_size(y, k, s, p, output_size)
    return torch.ops.xraydeconv.switch_unpool2d(y, switches, k, s, p, size)


def switch_unpool2d_out(
    y: Tensor,
    switches: Tensor,
    out: Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
) -> Tensor:
    """:func:`switch_unpool2d` into a preallocated ``out`` (its (H, W) is the output size)."""
    _require(y)
    k, s, p = _geometry(kernel_size, stride, padding)
    torch.ops.xraydeconv.switch_unpool2d_out(y, switches, k, s, p, out)
    return out


def switch_gather2d(
    x: Tensor, switches: Tensor, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0
) -> Tensor:
    """Read ``x`` (..., H, W) at the switch positions: a tensor shaped like ``switches`` (..., OH, OW).

    ``switch_gather2d(x, switch_pool2d(x, ...)[1], ...)`` equals the pooled values.
    """
    _require(x)
    k, s, p = _geometry(kernel_size, stride, padding)
    return torch.ops.xraydeconv.switch_gather2d(x, switches, k, s, p)


def _unpooled_size(y: Tensor, k, s, p, output_size: Sequence[int] | None) -> tuple[int, int]:
    """The (H, W) to unpool to: ``output_size``'s last two values, or the smallest size that pools to y's."""
    if output_size is not None:
        return _pair(tuple(output_size)[-2:], "output_size")
    return (
        (y.shape[-2] - 1) * s[0] - 2 * p[0] + k[0],
        (y.shape[-1] - 1) * s[1] - 2 * p[1] + k[1],
    )


# ---------------------------------------------------------------------------------------------------------------
# Fake tensors and autograd for the dispatcher ops (registered once the extension is loaded)


def _check_spatial(t: Tensor, op: str, name: str) -> None:
    if t.dim() not in (3, 4):
        raise ValueError(f"{op}: {name} must be 3-D (C, H, W) or 4-D (N, C, H, W), got {t.dim()}-D")


def _pool_fake(x: Tensor, kernel_size, stride, padding, ceil_mode):
    _check_spatial(x, "switch_pool2d", "input")
    k, s, p = _geometry(kernel_size, stride, padding)
    oh = _pooled_size(x.shape[-2], k[0], s[0], p[0], ceil_mode)
    ow = _pooled_size(x.shape[-1], k[1], s[1], p[1], ceil_mode)
    shape = (*x.shape[:-2], oh, ow)
    fmt = _memory_format(x)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    sw = torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=fmt)
    return out, sw


def _unpool_fake(y: Tensor, switches: Tensor, kernel_size, stride, padding, output_size):
    _check_spatial(y, "switch_unpool2d", "y")
    shape = (*y.shape[:-2], output_size[0], output_size[1])
    return torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=_memory_format(y))


def _gather_fake(x: Tensor, switches: Tensor, kernel_size, stride, padding):
    _check_spatial(x, "switch_gather2d", "x")
    return torch.empty(switches.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


def _pool_setup(ctx, inputs, output) -> None:
    x, kernel_size, stride, padding, _ = inputs
    ctx.geometry = (kernel_size, stride, padding)
    ctx.input_size = (x.shape[-2], x.shape[-1])
    ctx.save_for_backward(output[1])
    ctx.set_materialize_grads(False)  # the switches never get a gradient: don't build zeros for it


def _pool_backward(ctx, grad_out: Tensor | None, _grad_switches: Tensor | None):
    if grad_out is None:
        return None, None, None, None, None
    (sw,) = ctx.saved_tensors
    k, s, p = ctx.geometry
    grad_x = torch.ops.xraydeconv.switch_unpool2d(grad_out, sw, k, s, p, ctx.input_size)
    return grad_x, None, None, None, None


def _unpool_setup(ctx, inputs, output) -> None:
    _, sw, kernel_size, stride, padding, _ = inputs
    ctx.geometry = (kernel_size, stride, padding)
    ctx.save_for_backward(sw)


def _unpool_backward(ctx, grad_out: Tensor):
    (sw,) = ctx.saved_tensors
    k, s, p = ctx.geometry
    return torch.ops.xraydeconv.switch_gather2d(grad_out, sw, k, s, p), None, None, None, None, None


def _gather_setup(ctx, inputs, output) -> None:
    x, sw, kernel_size, stride, padding = inputs
    ctx.geometry = (kernel_size, stride, padding)
    ctx.input_size = (x.shape[-2], x.shape[-1])
    ctx.save_for_backward(sw)


def _gather_backward(ctx, grad_out: Tensor):
    (sw,) = ctx.saved_tensors
    k, s, p = ctx.geometry
    grad_x = torch.ops.xraydeconv.switch_unpool2d(grad_out, sw, k, s, p, ctx.input_size)
    return grad_x, None, None, None, None


def _register() -> None:
    lib = "xraydeconv::"
    torch.library.register_fake(lib + "switch_pool2d")(_pool_fake)
    torch.library.register_fake(lib + "switch_unpool2d")(_unpool_fake)
    torch.library.register_fake(lib + "switch_gather2d")(_gather_fake)
    torch.library.register_fake(lib + "switch_pool2d_out")(lambda *args: None)
    torch.library.register_fake(lib + "switch_unpool2d_out")(lambda *args: None)
    torch.library.register_autograd(lib + "switch_pool2d", _pool_backward, setup_context=_pool_setup)
    torch.library.register_autograd(lib + "switch_unpool2d", _unpool_backward, setup_context=_unpool_setup)
    torch.library.register_autograd(lib + "switch_gather2d", _gather_backward, setup_context=_gather_setup)


if _extension.load():
    _register()


# ---------------------------------------------------------------------------------------------------------------
# Conversions and the pure-PyTorch twins


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
    k, s, p = _geometry(kernel_size, stride, padding)
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
    k, s, p = _geometry(kernel_size, stride, padding)
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
    k, s, p = _geometry(kernel_size, stride, padding)
    out, idx = F.max_pool2d(x, k, s, p, ceil_mode=ceil_mode, return_indices=True)
    return out, indices_to_switches(idx, k, s, p, x.shape[-2:])


def native_switch_unpool2d(
    y: Tensor,
    switches: Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    output_size: Sequence[int] | None = None,
) -> Tensor:
    """:func:`switch_unpool2d` on ``F.max_unpool2d`` (tiling windows) or a scatter-add (overlapping or padded)."""
    k, s, p = _geometry(kernel_size, stride, padding)
    size = _unpooled_size(y, k, s, p, output_size)
    pooled = (switches.shape[-2], switches.shape[-1])
    for ax in (0, 1):
        if pooled[ax] not in (_pooled_size(size[ax], k[ax], s[ax], p[ax], c) for c in (False, True)):
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
    k, s, p = _geometry(kernel_size, stride, padding)
    idx = switches_to_indices(switches, k, s, p, x.shape[-2:])
    flat = x.reshape(*x.shape[:-2], -1).gather(-1, idx.reshape(*idx.shape[:-2], -1))
    return flat.view(switches.shape)
