"""The Python face of the kernels of ``xraydeconv._C``.

- :mod:`~xraydeconv.ops.switch_pool`: max pooling with uint8 switches (also fused with a preceding ReLU), its exact
  adjoint (unpool) and the gather, with fake kernels and autograd;
- :mod:`~xraydeconv.ops.deconv_scatter`: the sparse deconvnet step ``relu_scatter_conv_transpose2d`` and its
  two-step form ``relu_scatter_conv_transpose2d_pair`` (a stage's two transposed convs in one pass);
- :mod:`~xraydeconv.ops.relu`: ``relu_``, torch's in-place ReLU whose backward masks the incoming gradient in place;
- :mod:`~xraydeconv.ops.batch_norm_relu`: training-mode BatchNorm + ReLU (+ 2x2 max pool) in one op, torch's bits;
- :mod:`~xraydeconv.ops.native`: pure-PyTorch twins with identical semantics, and switch/index conversions;
- :mod:`~xraydeconv.ops.kernels`: ``has_kernel(op, device)``;
- :mod:`~xraydeconv.ops.switch_max_pool`: ``SwitchMaxPool2d``, the ``nn.MaxPool2d`` that hands out switches;
- :mod:`~xraydeconv.ops.fused_sequential`: ``FusedSequential``, an ``nn.Sequential`` that runs each ReLU followed
  by a ``SwitchMaxPool2d`` as one fused op, and its other in-place ReLUs as ``relu_``.
"""

from xraydeconv.ops.batch_norm_relu import batch_norm_relu, batch_norm_relu_pool2d
from xraydeconv.ops.deconv_scatter import relu_scatter_conv_transpose2d, relu_scatter_conv_transpose2d_pair
from xraydeconv.ops.geometry import pool_output_size
from xraydeconv.ops.kernels import OPS, has_kernel, has_kernels
from xraydeconv.ops.native import (
    indices_to_switches,
    native_switch_gather2d,
    native_switch_pool2d,
    native_switch_relu_pool2d,
    native_switch_unpool2d,
    switches_to_indices,
)
from xraydeconv.ops.relu import relu_
from xraydeconv.ops.switch_pool import (
    switch_gather2d,
    switch_pool2d,
    switch_pool2d_out,
    switch_relu_pool2d,
    switch_unpool2d,
    switch_unpool2d_out,
)

__all__ = [
    "OPS",
    "has_kernel",
    "has_kernels",
    "pool_output_size",
    "switch_pool2d",
    "switch_pool2d_out",
    "switch_relu_pool2d",
    "switch_unpool2d",
    "switch_unpool2d_out",
    "switch_gather2d",
    "relu_scatter_conv_transpose2d",
    "relu_scatter_conv_transpose2d_pair",
    "relu_",
    "batch_norm_relu",
    "batch_norm_relu_pool2d",
    "switches_to_indices",
    "indices_to_switches",
    "native_switch_pool2d",
    "native_switch_relu_pool2d",
    "native_switch_unpool2d",
    "native_switch_gather2d",
]
