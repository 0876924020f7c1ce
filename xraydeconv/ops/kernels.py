"""Which compiled kernels this build has: the one place that asks the dispatcher.

``has_kernel(op, device)`` answers for one op and device type; ``has_kernels(device)`` for the switch-pooling
family. The answers are fixed once the extension is loaded, and are kept in plain dicts so that
``torch.compile`` reads them as constants.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xraydeconv.ops import extension

__all__ = ["OPS", "has_kernel", "has_kernels", "require_kernels"]

OPS = ("switch_pool2d", "switch_relu_pool2d", "switch_unpool2d", "switch_gather2d", "relu_scatter_conv_transpose2d",
       "relu_scatter_conv_transpose2d_pair", "relu_", "batch_norm_relu", "batch_norm_relu_pool2d")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _probe() -> dict[tuple[str, str], bool]:
    if not extension.load():
        return {}
    # "computed": relu_ is registered once for every backend (CompositeExplicitAutograd), the others per backend
    has = torch._C._dispatch_has_computed_kernel_for_dispatch_key
    return {(op, dev): has(f"xraydeconv::{op}", key) for op in OPS for dev, key in _DISPATCH_KEYS.items()}


_KERNELS: dict[tuple[str, str], bool] = _probe()


def _device_type(device: str | torch.device) -> str:
    return (device if isinstance(device, str) else device.type).split(":")[0]


def has_kernel(op: str, device: str | torch.device = "cpu") -> bool:
    """True when ``xraydeconv._C`` is built with a kernel of ``op`` (one of :data:`OPS`) for ``device``."""
    if op not in OPS:
        raise ValueError(f"op {op!r}: use one of {', '.join(OPS)}")
    return _KERNELS.get((op, _device_type(device)), False)


def has_kernels(device: str | torch.device = "cpu") -> bool:
    """True when the switch-pooling kernels are built for ``device`` ("cpu" or "cuda")."""
    return _KERNELS.get(("switch_pool2d", _device_type(device)), False)


def require_kernels(t: Tensor, op: str = "switch_pool2d") -> None:
    """RuntimeError with build instructions unless ``op`` has a kernel for ``t``'s device."""
    if torch.compiler.is_compiling():
        return
    extension.require()
    if not has_kernel(op, t.device):
        raise RuntimeError(
            f"xraydeconv._C has no {t.device.type} kernel of {op} in this build (CUDA kernels are compiled only "
            "when nvcc is found at build time, or with FORCE_CUDA=1); rebuild it, or use backend='native'"
        )
