"""``relu_``: ReLU in place whose backward masks the incoming gradient in place.

``torch.relu_`` saves its output, and its backward (``threshold_backward``) writes a fresh gradient the size of the
feature map. In a CNN that gradient replaces the one the next layer's backward has just written, which nothing else
holds; ``xraydeconv.ops.relu_`` applies ReLU's mask to that gradient in place instead, saving a full-size allocation
per ReLU (and the page faults of a large one). Where anything else could see the incoming gradient (another branch
of the graph, a hook, ``retain_grad``, the caller of ``backward``, a view of its storage) or the backward is itself
recorded (``create_graph=True``), it runs ``threshold_backward`` as torch does. Values and gradients are those of
``torch.relu_`` either way.

The forward is torch's ``relu_`` on every backend, meta (fake tensors) included; the autograd is C++
(``csrc/autograd.cpp``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from xraydeconv.ops import extension

__all__ = ["relu_"]

def relu_(x: Tensor) -> Tensor:
    """ReLU of ``x`` (any shape, floating point) in place; returns ``x``.

    As ``torch.relu_``, including its error on a leaf that requires grad. The gradient equals ``torch.relu_``'s bit
    for bit; it is computed in the incoming gradient's memory when nothing else holds that gradient.
    """
    extension.require()  # registered for every backend: only the extension itself can be missing
    return torch.ops.xraydeconv.relu_(x)
