"""``FusedSequential``: an ``nn.Sequential`` that runs each ``nn.ReLU`` followed by a ``SwitchMaxPool2d`` as one op.

``max_pool2d(relu(x))`` only ever reads ``relu(x)`` at the window maxima, so the fused kernel
(:func:`xraydeconv.ops.switch_relu_pool2d`) never writes the ReLU's full-size output, and in the backward pass ReLU's
mask is applied to the pooled gradient instead of the full-size one. Values, switches and gradients are those of
the two modules run one after the other (tested bit for bit), and the module list, its names and its state dict are
those of an ``nn.Sequential``, so checkpoints and the deconvnet's layer walk are unchanged.

A pair runs unfused, module by module, whenever fusing could be observed or could be slower: a hook on either
module or a global module hook (attribution libraries hook ReLUs), an input that is not a tensor (tracing), or a
pool whose ``uses_kernel(x, relu=True)`` is False (``backend="native"``, or ``"auto"`` where the benchmark-derived
dispatch table did not measure the fused kernels at least as fast as ``F.relu`` then ``F.max_pool2d``).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from xraydeconv.ops.switch_max_pool import SwitchMaxPool2d

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
    """``nn.Sequential`` whose ``ReLU -> SwitchMaxPool2d`` pairs run as one fused kernel where that is unobservable
    and measured faster; (B, C, H, W) in, the same output as ``nn.Sequential`` out."""

    def forward(self, x: Tensor) -> Tensor:
        mods = list(self._modules.values())
        i = 0
        while i < len(mods):
            m = mods[i]
            pool = mods[i + 1] if i + 1 < len(mods) else None
            if type(m) is nn.ReLU and isinstance(pool, SwitchMaxPool2d) and self._fuses(m, pool, x):
                x = pool.relu_forward(x)
                i += 2
            else:
                x = m(x)
                i += 1
        return x

    @staticmethod
    def _fuses(relu: nn.Module, pool: SwitchMaxPool2d, x: object) -> bool:
        if not isinstance(x, Tensor) or hooked(relu) or hooked(pool):
            return False
        return pool.uses_kernel(x, relu=True)
