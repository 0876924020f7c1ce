"""Training-mode BatchNorm followed by ReLU (and by a 2x2 max pool) as one op: the conv -> BatchNorm -> ReLU (-> pool)
layers of a CNN's training step in fewer passes over memory.

Natively the step writes BatchNorm's output, rewrites it in ReLU, and reads it again in the pool; backwards it
writes ReLU's masked gradient (and before it the unpooled one) before BatchNorm's backward reads it twice. Here ReLU
is applied as BatchNorm's output is written, the pool reads x once and writes only the pooled values, switches and
x at the switches, and the backward rebuilds each row's masked gradient as it needs it; with the pool, the backward's
sums read x at the switches (where alone the gradient is nonzero) instead of all of x. The batch statistics and running
stats repeat ``torch.batch_norm_update_stats`` (float32 under torch's vectorised kernels; torch's own op otherwise),
the rest torch's channels-last CPU kernels, operation for operation, so values, running stats and gradients equal
``F.relu(F.batch_norm(...))`` (then ``F.max_pool2d``) bit for bit: tested over 1 and 2 threads, float32 and float64,
with torch's AVX-512, AVX2 and baseline kernels, for channel counts that are a multiple of 16 (torch's last partial
vector rounds differently in float64; :func:`fuses_exactly` says when).

CPU kernels only (``csrc/cpu/batch_norm_relu.cpp``), C++ autograd, fake tensors registered here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xraydeconv.ops import extension
from xraydeconv.ops.kernels import require_kernels

__all__ = ["batch_norm_relu", "batch_norm_relu_pool2d", "fuses_exactly"]

# torch's vector registers hold 16 float32 (AVX-512); every width it uses divides this channel count
EXACT_CHANNEL_MULTIPLE = 16


def fuses_exactly(x: Tensor) -> bool:
    """Whether the ops give ``x`` torch's bits: a channels-last (N, C, H, W) float32/float64 CPU map (not also
    NCHW-contiguous, where torch sums in another order) with C a multiple of 16 and more than one value per channel."""
    if x.device.type != "cpu" or x.dim() != 4 or x.dtype not in (torch.float32, torch.float64):
        return False
    if not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
        return False
    n, c, h, w = x.shape
    return c % EXACT_CHANNEL_MULTIPLE == 0 and n * h * w > 1


def batch_norm_relu(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                    momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training=True, momentum, eps))``.

    Args:
        x: (N, C, H, W) float32/float64 CPU, channels_last (see :func:`fuses_exactly`).
        weight, bias: (C,) of x's dtype; running_mean, running_var: (C,), updated in place as torch does.

    Returns:
        (N, C, H, W) channels_last; differentiable in x, weight and bias.
    """
    require_kernels(x, "batch_norm_relu")
    return torch.ops.xraydeconv.batch_norm_relu(x, weight, bias, running_mean, running_var, momentum, eps)[0]


def batch_norm_relu_pool2d(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                           momentum: float = 0.1, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """:func:`batch_norm_relu` followed by a 2x2/s2 max pool (floor mode), without writing the full-size map.

    Returns:
        ``(out, switches)``: (N, C, H // 2, W // 2) channels_last, equal to ``F.max_pool2d`` of
        :func:`batch_norm_relu`'s output, and the uint8 switches of :func:`xraydeconv.ops.switch_pool2d`.
    """
    require_kernels(x, "batch_norm_relu_pool2d")
    out, sw, _, _, _ = torch.ops.xraydeconv.batch_norm_relu_pool2d(x, weight, bias, running_mean, running_var,
                                                                   momentum, eps)
    return out, sw


def _stats_fake(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[1]), x.new_empty(x.shape[1])


def _bn_relu_fake(x, weight, bias, running_mean, running_var, momentum, eps):
    return (torch.empty_like(x, memory_format=torch.channels_last), *_stats_fake(x))


def _bn_relu_pool_fake(x, weight, bias, running_mean, running_var, momentum, eps):
    n, c, h, w = x.shape
    out = x.new_empty((n, c, h // 2, w // 2)).contiguous(memory_format=torch.channels_last)
    return out, torch.empty_like(out, dtype=torch.uint8), torch.empty_like(out), *_stats_fake(x)


def _bn_relu_backward_fake(grad, x, weight, bias, mean, invstd, switches, x_at_switches, output_mask):
    gx = torch.empty_like(x, memory_format=torch.channels_last)
    return tuple(t if wanted else None for t, wanted in zip((gx, torch.empty_like(weight), torch.empty_like(bias)),
                                                            output_mask))


def _bn_relu_backward_inplace_fake(grad, x, weight, bias, mean, invstd, output_mask):
    return tuple(torch.empty_like(t) if wanted else None for t, wanted in zip((weight, bias), output_mask))


def _register() -> None:
    lib = "xraydeconv::"
    torch.library.register_fake(lib + "batch_norm_relu")(_bn_relu_fake)
    torch.library.register_fake(lib + "batch_norm_relu_pool2d")(_bn_relu_pool_fake)
    torch.library.register_fake(lib + "batch_norm_relu_backward")(_bn_relu_backward_fake)
    torch.library.register_fake(lib + "batch_norm_relu_backward_")(_bn_relu_backward_inplace_fake)


if extension.load():
    _register()
