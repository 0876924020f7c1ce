"""Modules for models: ``SwitchMaxPool2d``, the drop-in ``nn.MaxPool2d`` that can hand out its switches, and
``FusedSequential``, the ``nn.Sequential`` that runs a ReLU followed by a ``SwitchMaxPool2d`` (and in training a
BatchNorm2d -> ReLU (-> pool) chain) as one kernel.

They live in :mod:`xraydeconv.ops.switch_max_pool` and :mod:`xraydeconv.ops.fused_sequential`; this is their
public address.
"""

from xraydeconv.ops.fused_sequential import FusedSequential
from xraydeconv.ops.switch_max_pool import BACKENDS, SwitchMaxPool2d

__all__ = ["BACKENDS", "FusedSequential", "SwitchMaxPool2d"]
