"""The sparse deconvnet step kernel (relu_scatter_conv_transpose2d) against PyTorch's own unpool + ReLU + conv."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xraydeconv import ops

pytestmark = pytest.mark.skipif(not ops.has_kernel("relu_scatter_conv_transpose2d", "cpu"),
                                reason="xraydeconv._C is not built")


def _reference(g, switches, weight, pool, padding, out_size, group):
    """g (P, C, h, w), switches (B, C, h, w), weight (C, Cout, kH, kW) as the conv's weight."""
    x = F.relu(g)
    if switches is not None:
        sw = switches.repeat_interleave(group, 0)
        size = (g.shape[2] * pool[0], g.shape[3] * pool[1])
        x = ops.native_switch_unpool2d(x, sw, pool, pool, 0, size)
    kH, kW = weight.shape[-2:]
    out_pad = [out_size[d] - (x.shape[2 + d] - 1 + (kH, kW)[d] - 2 * padding[d]) for d in range(2)]
    return F.conv_transpose2d(x, weight, None, 1, padding, out_pad)


def _kernel(g, switches, weight, pool, padding, out_size, group):
    sw = None if switches is None else switches.permute(0, 2, 3, 1).contiguous()
    out = torch.ops.xraydeconv.relu_scatter_conv_transpose2d(
        g.permute(0, 2, 3, 1).contiguous(), sw, weight.permute(0, 2, 3, 1).contiguous(), list(pool), list(padding),
        list(out_size), group)
    return out.permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    "P,group,C,Cout,k,pad,h,pool",
    [
        (6, 3, 32, 16, 3, 1, 9, (2, 2)),  # the 3x3 fast path after an unpool, odd sizes
        (4, 4, 16, 32, 3, 1, 8, None),  # ReLU only
        (2, 1, 16, 1, 3, 1, 10, None),  # narrow output: the gathering path
        (3, 1, 32, 3, 3, 0, 7, None),  # narrow, no padding
        (4, 2, 12, 24, 3, 1, 6, (2, 2)),  # Cout not a multiple of 16: generic loop
        (2, 2, 8, 8, 5, 2, 7, (3, 3)),  # 5x5 kernel, 3x3 pooling windows
        (2, 1, 16, 16, 3, 1, 5, (2, 3)),  # non-square windows
    ],
)
def test_kernel_equals_unpool_relu_conv_transpose(P, group, C, Cout, k, pad, h, pool):
    gen = torch.Generator().manual_seed(P * 7 + C)
    g = torch.randn(P, C, h, h + 1, generator=gen)
    weight = torch.randn(C, Cout, k, k, generator=gen)
    sw = None
    H, W = h, h + 1
    if pool is not None:
        sw = torch.randint(0, pool[0] * pool[1], (P // group, C, h, h + 1), generator=gen, dtype=torch.uint8)
        H, W = h * pool[0], (h + 1) * pool[1]
    out_size = (H + k - 1 - 2 * pad, W + k - 1 - 2 * pad)
    ref = _reference(g, sw, weight, pool or (1, 1), (pad, pad), out_size, group)
    got = _kernel(g, sw, weight, pool or (1, 1), (pad, pad), out_size, group)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_kernel_rejects_bad_arguments():
    op = torch.ops.xraydeconv.relu_scatter_conv_transpose2d
    g = torch.rand(2, 4, 4, 8)
    w = torch.rand(8, 3, 3, 16)
    with pytest.raises(ValueError, match="g must be float32"):
        op(g.double(), None, w.double(), [1, 1], [1, 1], [4, 4], 1)
    with pytest.raises(ValueError, match="weight has 4 filters"):
        op(g, None, torch.rand(4, 3, 3, 16), [1, 1], [1, 1], [4, 4], 1)
    with pytest.raises(ValueError, match="group must be a positive divisor"):
        op(g, None, w, [1, 1], [1, 1], [4, 4], 3)
    with pytest.raises(ValueError, match="switches must be uint8"):
        op(g, torch.zeros(2, 4, 4, 8), w, [2, 2], [1, 1], [8, 8], 1)


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
@pytest.mark.parametrize("mode", ["map", "max"])
def test_sparse_and_dense_paths_agree(method, mode, monkeypatch):
    """Guided backprop takes the sparse scatter too, after a dense unpooling and the forward ReLU's mask."""
    from xraydeconv.explain import deconvnet as module
    from xraydeconv.explain.deconvnet import DeconvNet
    from xraydeconv.training.models import build

    torch.manual_seed(0)
    model = build("deeper", num_classes=24, input_size=64).eval()
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    calls = []
    scatter = module.scatter_conv_transpose
    monkeypatch.setattr(module, "scatter_conv_transpose", lambda *a: calls.append(1) or scatter(*a))
    a = DeconvNet(model, sparse=True).project(x, top_n=6, method=method, mode=mode)
    assert calls, "the sparse path was not taken"
    calls.clear()
    b = DeconvNet(model, sparse=False).project(x, top_n=6, method=method, mode=mode)
    assert not calls
    assert torch.equal(a.channels, b.channels)
    assert b.maps.norm() > 0
    assert ((a.maps - b.maps).norm() / b.maps.norm()).item() <= 1e-5
