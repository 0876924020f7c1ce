"""Modules for models: ``SwitchMaxPool2d``, the drop-in ``nn.MaxPool2d`` that can hand out its switches.

It lives in :mod:`xraydeconv.ops.switch_max_pool`; this is its public address.
"""

from xraydeconv.ops.switch_max_pool import BACKENDS, SwitchMaxPool2d

__all__ = ["BACKENDS", "SwitchMaxPool2d"]
