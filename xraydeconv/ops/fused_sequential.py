"""``FusedSequential``: an ``nn.Sequential`` that runs each ``nn.ReLU`` followed by a ``SwitchMaxPool2d`` as one op,
its other in-place ReLUs with a gradient that is masked in place, and in training each ``BatchNorm2d -> ReLU
(-> 2x2 pool)`` chain as one op.

``max_pool2d(relu(x))`` only ever reads ``relu(x)`` at the window maxima, so the fused kernel
(:func:`xraydeconv.ops.switch_relu_pool2d`) never writes the ReLU's full-size output, and in the backward pass ReLU's
mask is applied to the pooled gradient instead of the full-size one. An ``nn.ReLU(inplace=True)`` followed by
anything else runs as :func:`xraydeconv.ops.relu_`, whose backward masks the incoming gradient in place instead of
writing a fresh one. Values, switches and gradients are those of the modules run one after the other (tested bit for
bit), and the module list, its names and its state dict are those of an ``nn.Sequential``, so checkpoints and the
deconvnet's layer walk are unchanged.

A training-mode ``BatchNorm2d`` (batch statistics, running stats, affine) followed by an ``nn.ReLU`` runs as
:func:`xraydeconv.ops.batch_norm_relu`, or with a 2x2/s2 pool after them as
:func:`xraydeconv.ops.batch_norm_relu_pool2d`: torch's statistics, running stats and arithmetic, without writing
BatchNorm's full-size output (with the pool) or rewriting it (without), and with ReLU's mask applied as the backward
reads the gradient. Only maps that torch itself would sum in the channels-last order are fused
(:func:`xraydeconv.ops.batch_norm_relu.fuses_exactly`), so the values are torch's bit for bit.

A layer runs as its own module whenever the change could be observed or could be slower: a hook on the module (or
the pool) or a global module hook (attribution libraries hook ReLUs), an input that is not a tensor (tracing),
``torch.compile`` for the in-place ReLU (a mutating custom op), or where ``backend`` (for ReLUs) or the pool's own
backend says native: ``"auto"`` follows the benchmark-derived dispatch table of :mod:`xraydeconv.ops.pool_dispatch`.
A BatchNorm also runs as its own module in eval mode, without running stats or affine parameters, under
``torch.compile``, on a map that ``fuses_exactly`` rejects, and under ``"auto"`` in a forward pass without a
gradient to come (the table measures forward+backward).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from xraydeconv.ops.batch_norm_relu import fuses_exactly
from xraydeconv.ops.kernels import has_kernel
from xraydeconv.ops.pool_dispatch import bn_relu_is_faster, relu_is_faster
from xraydeconv.ops.switch_max_pool import SwitchMaxPool2d, check_backend

__all__ = ["FusedSequential"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# torch keeps global module hooks in these module-level dicts; no public call reports whether any is registered
_GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                      "_global_backward_pre_hooks")


def hooked(module: nn.Module) -> bool:
    """Whether a forward or backward hook (of ``module`` or a global one) would see this module run."""
    if any(getattr(torch_module, name, None) for name in _GLOBAL_HOOK_DICTS):
        return True
    return any(getattr(module, name, None) for name in _HOOK_DICTS)


class FusedSequential(nn.Sequential):
    """``nn.Sequential`` whose ``ReLU -> SwitchMaxPool2d`` pairs run as one fused kernel and whose other in-place
    ReLUs mask their gradient in place, where that is unobservable and measured faster; (B, C, H, W) in, the same
    output as ``nn.Sequential`` out.

    Args:
        *args: the modules, as for ``nn.Sequential`` (or one ``OrderedDict`` of them).
        backend: how the ReLUs that are not fused with a pool and the BatchNorm -> ReLU chains run: ``"auto"``
            (our ops where the dispatch table measured them at least as fast as torch's), ``"kernel"`` (always,
            where they apply) or ``"native"`` (as their own modules). A ReLU -> pool pair follows the pool's
            backend, and a chain includes its pool only when the pool's backend is not ``"native"``.
    """

    def __init__(self, *args: nn.Module, backend: str = "auto") -> None:
        super().__init__(*args)
        check_backend(backend)
        self.backend = backend

    def __getitem__(self, idx):
        item = super().__getitem__(idx)
        if isinstance(item, FusedSequential):  # a slice: nn.Sequential rebuilds it without our backend
            item.backend = self.backend
        return item

    def forward(self, x: Tensor) -> Tensor:
        mods = list(self._modules.values())
        i = 0
        while i < len(mods):
            m = mods[i]
            if type(m) is nn.BatchNorm2d:
                x, used = self._batch_norm_relu(mods[i:i + 3], x)
                if used:
                    i += used
                    continue
            pool = mods[i + 1] if i + 1 < len(mods) else None
            if type(m) is nn.ReLU and isinstance(pool, SwitchMaxPool2d) and self._fuses(m, pool, x):
                x = pool.relu_forward(x)
                i += 2
                continue
            x = torch.ops.xraydeconv.relu_(x) if type(m) is nn.ReLU and self._masks_in_place(m, x) else m(x)
            i += 1
        return x

    def _batch_norm_relu(self, mods: list[nn.Module], x: Tensor) -> tuple[Tensor, int]:
        """``mods[0]`` (a BatchNorm2d), the ReLU after it and a 2x2 pool after that as one op, when that is exact,
        unobserved and (``auto``) measured faster: (output, modules consumed), or (x, 0) to run them one by one."""
        bn, relu = mods[0], mods[1] if len(mods) > 1 else None
        pool = mods[2] if len(mods) > 2 and _is_2x2_pool(mods[2]) and mods[2].backend != "native" else None
        if type(relu) is not nn.ReLU or not self._bn_fuses(bn, relu, pool, x):
            return x, 0
        if self.backend == "auto":  # the table holds forward+backward classes: a forward alone stays native
            if not (torch.is_grad_enabled() and (x.requires_grad or bn.weight.requires_grad)):
                return x, 0
            if not bn_relu_is_faster(x, pool is not None):
                if pool is None or not bn_relu_is_faster(x, False):
                    return x, 0
                pool = None
        factor = bn_momentum(bn)
        args = (x, bn.weight, bn.bias, bn.running_mean, bn.running_var, factor, bn.eps)
        if pool is None:
            return torch.ops.xraydeconv.batch_norm_relu(*args)[0], 2
        return torch.ops.xraydeconv.batch_norm_relu_pool2d(*args)[0], 3

    def _bn_fuses(self, bn: nn.BatchNorm2d, relu: nn.ReLU, pool: nn.Module | None, x: object) -> bool:
        if self.backend == "native" or not isinstance(x, Tensor) or torch.compiler.is_compiling():
            return False
        if not (bn.training and bn.track_running_stats and bn.affine and bn.running_mean is not None):
            return False
        if any(hooked(m) for m in (bn, relu, pool) if m is not None):
            return False
        return fuses_exactly(x) and has_kernel("batch_norm_relu", x.device)

    @staticmethod
    def _fuses(relu: nn.Module, pool: SwitchMaxPool2d, x: object) -> bool:
        if not isinstance(x, Tensor) or hooked(relu) or hooked(pool):
            return False
        return pool.uses_kernel(x, relu=True)

    def _masks_in_place(self, relu: nn.ReLU, x: object) -> bool:
        """Whether ``relu`` runs as ``xraydeconv.ops.relu_``: in place anyway, a gradient to come, unobserved, and
        this backend (for ``auto``: the table) says so."""
        if self.backend == "native" or not relu.inplace or not isinstance(x, Tensor) or hooked(relu):
            return False
        if not (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
            return False
        if not has_kernel("relu_", x.device):
            return False
        return self.backend == "kernel" or relu_is_faster(x)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}" if self.backend != "auto" else ""


def _is_2x2_pool(m: nn.Module) -> bool:
    return isinstance(m, SwitchMaxPool2d) and m.kernel_size == (2, 2) and m.stride == (2, 2) and \
        m.padding == (0, 0) and not m.ceil_mode


def bn_momentum(bn: nn.BatchNorm2d) -> float:
    """Count the batch as ``nn.BatchNorm2d.forward`` does in training and return the running stats' update factor
    (``momentum``, or the cumulative average's ``1 / batches`` when momentum is None)."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum
