"""``SwitchMaxPool2d``: a drop-in ``nn.MaxPool2d`` that can also hand out its switches.

A deconvnet needs, for every pooling layer, where each maximum came from. This module pools with the
uint8-switch kernels of :mod:`xraydeconv.ops.switch_pool` (``backend="kernel"``) or with PyTorch's own
``max_pool2d`` (``backend="native"``), so a whole pipeline can be run both ways and compared.
``"auto"`` pools with the kernels only where the benchmark-derived table of :mod:`xraydeconv.ops.pool_dispatch`
measured them at least as fast as native for the input's shape class, layout and dtype (forward alone, or
forward and backward when the input needs a gradient); it unpools with the kernels whenever they are built.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xraydeconv.ops import extension
from xraydeconv.ops.geometry import int_pair, pool_geometry
from xraydeconv.ops.kernels import has_kernels
from xraydeconv.ops.native import native_switch_pool2d, native_switch_unpool2d
from xraydeconv.ops.pool_dispatch import kernel_is_faster
from xraydeconv.ops.switch_pool import switch_pool2d, switch_relu_pool2d, switch_unpool2d

BACKENDS = ("auto", "kernel", "native")


def check_backend(backend: str) -> None:
    """ValueError unless ``backend`` is one of :data:`BACKENDS`; for ``"kernel"``, the extension must be built."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "kernel":
        extension.require()


class SwitchMaxPool2d(nn.Module):
    """2-D max pooling (no dilation) with optional access to the switches.

    Args:
        kernel_size: window size, an int or (kH, kW); at most 255 positions.
        stride: window step; defaults to ``kernel_size``.
        padding: implicit -inf padding on both sides, at most half the window.
        ceil_mode: use ceil instead of floor for the output size, as in ``nn.MaxPool2d``.
        backend: ``"kernel"`` (compiled ops; errors with build instructions if ``xraydeconv._C`` is
            missing), ``"native"`` (``F.max_pool2d``) or ``"auto"`` (the kernels where the measured dispatch
            table of :mod:`xraydeconv.ops.pool_dispatch` has them at least as fast, else native).

    Shapes: input (N, C, H, W) or (C, H, W); output (..., OH, OW) exactly as ``nn.MaxPool2d``.
    ``kernel_size``, ``stride`` and ``padding`` are stored as pairs.
    """

    def __init__(
        self,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        ceil_mode: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        k, s, p = pool_geometry(kernel_size, stride, padding)
        check_backend(backend)
        self.kernel_size: tuple[int, int] = k
        self.stride: tuple[int, int] = s
        self.padding: tuple[int, int] = p
        self.ceil_mode = bool(ceil_mode)
        self.backend = backend

    @classmethod
    def from_max_pool(cls, pool: nn.MaxPool2d, backend: str = "auto") -> SwitchMaxPool2d:
        """The equivalent of an existing ``nn.MaxPool2d`` (which must have dilation 1)."""
        if int_pair(pool.dilation, "dilation") != (1, 1):
            raise ValueError(f"SwitchMaxPool2d has no dilation; this MaxPool2d has dilation {pool.dilation}")
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, backend=backend)

    def uses_kernel(self, x: Tensor, relu: bool = False) -> bool:
        """Whether pooling ``x`` (``relu(x)`` with ``relu``, fused) runs the compiled kernels, else PyTorch's ops."""
        if self.backend != "auto":
            return self.backend == "kernel"
        if not has_kernels(x.device):
            return False
        backward = torch.is_grad_enabled() and x.requires_grad
        return kernel_is_faster(x, self.kernel_size, self.stride, self.padding, backward, relu)

    def relu_forward(self, x: Tensor) -> Tensor:
        """``self(relu(x))``: one fused kernel (``switch_relu_pool2d``) where :meth:`uses_kernel` says so, else
        ``F.relu`` then this pooling. Module hooks do not run."""
        if self.uses_kernel(x, relu=True):
            op = torch.ops.xraydeconv.switch_relu_pool2d if self.backend == "auto" else switch_relu_pool2d
            return op(x, self.kernel_size, self.stride, self.padding, self.ceil_mode)[0]
        return self.forward(F.relu(x))

    def forward(self, x: Tensor) -> Tensor:
        if self.uses_kernel(x):
            if self.backend == "auto":
                # the geometry was checked at construction and uses_kernel found the device's kernels: skip the
                # wrapper's checks, which cost as much as the op itself on a one-image feature map
                op = torch.ops.xraydeconv.switch_pool2d
                return op(x, self.kernel_size, self.stride, self.padding, self.ceil_mode)[0]
            return switch_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode)[0]
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, ceil_mode=self.ceil_mode)

    def forward_with_switches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(out, switches)``: the pooled tensor and the uint8 switches (``row * kW + col``), same shape."""
        if self.uses_kernel(x):
            return switch_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode)
        return native_switch_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode)

    def unpool(self, y: Tensor, switches: Tensor, output_size: Sequence[int]) -> Tensor:
        """Adjoint of this pooling: put ``y`` back at the switch positions of an (H, W) = ``output_size`` input."""
        if self.backend == "kernel" or (self.backend == "auto" and has_kernels(y.device)):
            return switch_unpool2d(y, switches, self.kernel_size, self.stride, self.padding, output_size)
        return native_switch_unpool2d(y, switches, self.kernel_size, self.stride, self.padding, output_size)

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"ceil_mode={self.ceil_mode}, backend={self.backend!r}"
        )
