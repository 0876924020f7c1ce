"""``FusedSequential``: an ``nn.Sequential`` that runs each ``nn.ReLU`` followed by a ``SwitchMaxPool2d`` as one op,
and its other in-place ReLUs with a gradient that is masked in place.

``max_pool2d(relu(x))`` only ever reads ``relu(x)`` at the window maxima, so the fused kernel
(:func:`xraydeconv.ops.switch_relu_pool2d`) never writes the ReLU's full-size output, and in the backward pass ReLU's
mask is applied to the pooled gradient instead of the full-size one. An ``nn.ReLU(inplace=True)`` followed by
anything else runs as :func:`xraydeconv.ops.relu_`, whose backward masks the incoming gradient in place instead of
writing a fresh one. Values, switches and gradients are those of the modules run one after the other (tested bit for
bit), and the module list, its names and its state dict are those of an ``nn.Sequential``, so checkpoints and the
deconvnet's layer walk are unchanged.

A layer runs as its own module whenever the change could be observed or could be slower: a hook on the module (or
the pool) or a global module hook (attribution libraries hook ReLUs), an input that is not a tensor (tracing),
``torch.compile`` for the in-place ReLU (a mutating custom op), or where ``backend`` (for ReLUs) or the pool's own
backend says native: ``"auto"`` follows the benchmark-derived dispatch table of :mod:`xraydeconv.ops.pool_dispatch`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from xraydeconv.ops.kernels import has_kernel
from xraydeconv.ops.pool_dispatch import relu_is_faster
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
        backend: how the ReLUs that are not fused with a pool run: ``"auto"`` (``xraydeconv.ops.relu_`` where the
            dispatch table measured it at least as fast as ``torch.relu_``), ``"kernel"`` (always, when a gradient
            is needed) or ``"native"`` (as their own modules). A ReLU -> pool pair follows the pool's backend.
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
            pool = mods[i + 1] if i + 1 < len(mods) else None
            if type(m) is nn.ReLU and isinstance(pool, SwitchMaxPool2d) and self._fuses(m, pool, x):
                x = pool.relu_forward(x)
                i += 2
                continue
            x = torch.ops.xraydeconv.relu_(x) if type(m) is nn.ReLU and self._masks_in_place(m, x) else m(x)
            i += 1
        return x

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
