"""The adjoint steps of xraydeconv.explain.adjoint against PyTorch's own transposed conv."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xraydeconv.explain.adjoint import conv_transpose_phases, pad_of, phase_weight, phases_ok


@pytest.mark.parametrize(
    "cin,k,stride,padding,size",
    [(3, 7, 2, 3, (224, 224)),  # torchvision's ResNet stem
     (1, 7, 2, 3, (45, 49)),  # odd sizes
     (1, 5, 2, 2, (33, 30)),
     (2, 3, 2, 0, (17, 20)),  # no padding
     (3, 4, 4, 0, (32, 32)),  # ViT-style patchify, kernel == stride
     (1, 3, 3, 1, (31, 29)),
     (1, (5, 3), 2, (2, 1), (27, 26))],  # non-square kernel and padding
)
def test_phases_equal_the_transposed_conv(cin, k, stride, padding, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, 8, k, stride, padding, bias=False)
    assert phases_ok(conv)
    x = torch.rand(1, cin, *size)
    h, w = conv(x).shape[-2:]
    g = torch.randn(3, 8, h, w)
    out_pad = [size[d] - ((g.shape[2 + d] - 1) * stride - 2 * pad_of(conv)[d] + conv.kernel_size[d]) for d in range(2)]
    ref = F.conv_transpose2d(g, conv.weight, None, stride, pad_of(conv), out_pad)
    got = conv_transpose_phases(g, phase_weight(conv.weight, stride, pad_of(conv)), stride, size)
    assert got.shape == ref.shape == (3, cin, *size)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_phases_only_for_strided_convs_out_of_the_image():
    assert not phases_ok(nn.Conv2d(3, 8, 3, 1))  # stride 1
    assert not phases_ok(nn.Conv2d(16, 8, 3, 2))  # into 16 channels: oneDNN's own transposed conv is faster
    assert not phases_ok(nn.Conv2d(3, 8, 3, (2, 1)))  # unequal strides
    assert not phases_ok(nn.Conv2d(3, 8, 3, 2, dilation=2))
