"""Where ``SwitchMaxPool2d(backend="auto")`` and ``FusedSequential``'s ReLUs run the kernels: a table measured by
the benchmark suite.

The kernels are not faster than ``F.max_pool2d`` at every shape, so ``auto`` asks :data:`TABLE` (in
:mod:`xraydeconv.ops.pool_dispatch_table`, written by ``xraydeconv bench --suite --write-dispatch``). A key is a
shape class: device type, layout, dtype, window geometry, channels, (H, W), one image or a batch, whether a
ReLU is fused in front, and whether a backward follows; its value is True where every measured thread count had
the kernel at least as fast as native. A class the table does not hold runs native: ``auto`` never guesses.

A ReLU that is not fused with a pool has its own classes (:func:`relu_class`): ``xraydeconv.ops.relu_``, whose
backward masks the incoming gradient in place, against ``torch.relu_``; only with a backward, since the forward is
torch's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xraydeconv.ops.geometry import memory_format
from xraydeconv.ops.pool_dispatch_table import TABLE

__all__ = ["TABLE", "shape_class", "kernel_is_faster", "relu_class", "relu_is_faster"]


def shape_class(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    backward: bool,
    relu: bool = False,
) -> str:
    """The dispatch key of pooling ``x`` (N, C, H, W) or (C, H, W) with this window; the table's key format.

    ``relu``: the key of the fused ReLU and pool (``switch_relu_pool2d`` against ``F.relu`` then ``F.max_pool2d``).
    """
    geometry = f"k{kernel_size[0]}x{kernel_size[1]}s{stride[0]}x{stride[1]}p{padding[0]}x{padding[1]}"
    return _key(x, geometry, f"{'relu+' if relu else ''}{'fwd+bwd' if backward else 'fwd'}")


def relu_class(x: Tensor) -> str:
    """The dispatch key of ``xraydeconv.ops.relu_`` on ``x`` (N, C, H, W) or (C, H, W), with a backward to come."""
    return _key(x, "relu_", "fwd+bwd")


def bn_relu_class(x: Tensor, pool: bool) -> str:
    """The dispatch key of ``xraydeconv.ops.batch_norm_relu`` (``pool``: ``batch_norm_relu_pool2d``) on ``x``
    (N, C, H, W), with a backward to come."""
    return _key(x, "bn_relu_pool" if pool else "bn_relu", "fwd+bwd")


def _key(x: Tensor, op: str, passes: str) -> str:
    layout = "channels_last" if memory_format(x) == torch.channels_last else "nchw"
    n = x.shape[0] if x.dim() == 4 else 1
    dtype = str(x.dtype).removeprefix("torch.")
    return (f"{x.device.type}/{layout}/{dtype}/{op}/C{x.shape[-3]}/{x.shape[-2]}x{x.shape[-1]}/"
            f"{'N1' if n == 1 else 'batch'}/{passes}")


def kernel_is_faster(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    backward: bool,
    relu: bool = False,
) -> bool:
    """True where the table measured the kernels at least as fast as native for ``x``'s shape class."""
    return TABLE.get(shape_class(x, kernel_size, stride, padding, backward, relu), False)


def relu_is_faster(x: Tensor) -> bool:
    """True where the table measured ``xraydeconv.ops.relu_`` with its backward at least as fast as ``torch.relu_``
    for ``x``'s shape class (only a 3-D or 4-D ``x`` has one)."""
    return x.dim() in (3, 4) and TABLE.get(relu_class(x), False)


def bn_relu_is_faster(x: Tensor, pool: bool) -> bool:
    """True where the table measured the fused BatchNorm + ReLU (+ pool) with its backward at least as fast as
    PyTorch's modules for ``x``'s shape class."""
    return x.dim() == 4 and TABLE.get(bn_relu_class(x, pool), False)
