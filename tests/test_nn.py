"""SwitchMaxPool2d as a drop-in for nn.MaxPool2d, on both backends, eagerly and under torch.compile."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xraydeconv import ops
from xraydeconv.nn import SwitchMaxPool2d
from xraydeconv.ops import pool_dispatch
from xraydeconv.reports import bench

pytestmark = pytest.mark.skipif(not ops.has_kernels("cpu"), reason="xraydeconv._C is not built")

_CUDA_OK = torch.cuda.is_available() and ops.has_kernels("cuda")
_CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not _CUDA_OK, reason="needs a GPU and the CUDA kernels")]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=_CUDA_MARKS)]

GEOMETRIES = [
    {"kernel_size": 2},
    {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
    {"kernel_size": (2, 3), "stride": (1, 2), "padding": (1, 0)},
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["kernel", "native", "auto"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_same_forward_and_gradient_as_max_pool(device, backend, geometry):
    ours = SwitchMaxPool2d(**geometry, backend=backend)
    ref = nn.MaxPool2d(**geometry)
    x = torch.randn(2, 3, 11, 14, device=device, requires_grad=True)
    out, expected = ours(x), ref(x)
    assert torch.equal(out, expected)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, g)
    (grad_ref,) = torch.autograd.grad(expected, x, g)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_backends_give_the_same_switches_and_unpool(device, geometry):
    x = torch.randn(2, 4, 12, 13, device=device)
    kernel = SwitchMaxPool2d(**geometry, backend="kernel")
    native = SwitchMaxPool2d(**geometry, backend="native")
    (out_k, sw_k), (out_n, sw_n) = kernel.forward_with_switches(x), native.forward_with_switches(x)
    assert torch.equal(out_k, out_n) and torch.equal(sw_k, sw_n) and sw_k.dtype == torch.uint8
    torch.testing.assert_close(kernel.unpool(out_k, sw_k, x.shape[-2:]), native.unpool(out_n, sw_n, x.shape[-2:]))
    # each unpooled maximum sits where it came from, once per window that chose it
    back = kernel.unpool(out_k, sw_k, x.shape[-2:])
    chosen = kernel.unpool(torch.ones_like(out_k), sw_k, x.shape[-2:])
    torch.testing.assert_close(back, x * chosen)
    assert int(chosen.sum()) == out_k.numel()


def test_attributes_are_pairs_and_repr_reads_well():
    m = SwitchMaxPool2d(3, padding=1, ceil_mode=True)
    assert m.kernel_size == (3, 3) and m.stride == (3, 3) and m.padding == (1, 1) and m.ceil_mode
    assert "kernel_size=(3, 3)" in repr(m) and "backend='auto'" in repr(m)
    assert list(m.state_dict()) == []
    assert copy.deepcopy(m).kernel_size == (3, 3)


def test_auto_follows_the_dispatch_table(monkeypatch):
    pool = SwitchMaxPool2d(2)
    x = torch.zeros(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    fwd = "cpu/channels_last/float32/k2x2s2x2p0x0/C8/6x6/batch/fwd"
    assert pool_dispatch.shape_class(x, (2, 2), (2, 2), (0, 0), False) == fwd
    monkeypatch.setitem(pool_dispatch.TABLE, fwd, True)
    assert pool.uses_kernel(x)
    monkeypatch.setitem(pool_dispatch.TABLE, fwd, False)
    assert not pool.uses_kernel(x)
    # a gradient to come selects the forward+backward class, which the table does not hold: native
    assert not pool.uses_kernel(x.requires_grad_(True))
    monkeypatch.setitem(pool_dispatch.TABLE, fwd.replace("/fwd", "/fwd+bwd"), True)
    assert pool.uses_kernel(x)
    with torch.no_grad():
        assert not pool.uses_kernel(x)
    # another layout, dtype, batch or window is another class: never guessed
    assert not pool.uses_kernel(x.detach().contiguous())
    assert not pool.uses_kernel(x.detach().double())
    assert not pool.uses_kernel(x.detach()[:1])
    assert not SwitchMaxPool2d(3, 2, 1).uses_kernel(x)


def test_auto_on_a_kernel_class_pools_like_max_pool(monkeypatch):
    x = torch.randn(3, 8, 10, 12).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    for backward in (False, True):
        monkeypatch.setitem(pool_dispatch.TABLE, pool_dispatch.shape_class(x, (2, 2), (2, 2), (0, 0), backward), True)
    pool = SwitchMaxPool2d(2)
    assert pool.uses_kernel(x)
    out, expected = pool(x), F.max_pool2d(x, 2)
    assert torch.equal(out, expected) and out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(expected, x, g)[0])
    with torch.no_grad():
        assert torch.equal(pool(x), expected)


def test_explicit_backends_ignore_the_table(monkeypatch):
    x = torch.zeros(1, 1, 2, 2)
    monkeypatch.setitem(pool_dispatch.TABLE, pool_dispatch.shape_class(x, (2, 2), (2, 2), (0, 0), False), False)
    assert SwitchMaxPool2d(2, backend="kernel").uses_kernel(x)
    assert not SwitchMaxPool2d(2, backend="native").uses_kernel(x)


def test_the_shipped_table_only_names_measured_pool_classes():
    # every key is a 2x2/s2 class of the nets' pool layers, or a class of their unfused ReLUs (relu_, with a
    # backward) or of their BatchNorm + ReLU (+ pool) chains, as `xraydeconv bench --suite` writes them
    relus = bns = 0
    for key, value in pool_dispatch.TABLE.items():
        device, layout, dtype, op, c, hw, batch, passes = key.split("/")
        assert (device, dtype) == ("cpu", "float32") and isinstance(value, bool)
        assert layout in ("nchw", "channels_last") and batch in ("N1", "batch")
        assert (op, passes in bench.PASSES) == ("k2x2s2x2p0x0", True) or (
            op in ("relu_", "bn_relu", "bn_relu_pool") and passes == "fwd+bwd")
        relus += op == "relu_"
        bns += op.startswith("bn_relu")
        assert layout == "channels_last" or not op.startswith("bn_relu")
    assert relus == 2 * len(bench.net_relu_shapes())
    assert bns == len(bench.net_bn_relu_shapes(False)) + len(bench.net_bn_relu_shapes(True))


def test_from_max_pool():
    m = SwitchMaxPool2d.from_max_pool(nn.MaxPool2d(3, 2, 1, ceil_mode=True), backend="native")
    assert (m.kernel_size, m.stride, m.padding, m.ceil_mode, m.backend) == ((3, 3), (2, 2), (1, 1), True, "native")
    with pytest.raises(ValueError, match="dilation"):
        SwitchMaxPool2d.from_max_pool(nn.MaxPool2d(2, dilation=2))


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        SwitchMaxPool2d(2, backend="cudnn")
    with pytest.raises(ValueError, match="255"):
        SwitchMaxPool2d(16)
    with pytest.raises(ValueError, match="half"):
        SwitchMaxPool2d(2, padding=2)


def test_kernel_backend_without_extension_says_how_to_build():
    # a fresh interpreter where `import xraydeconv._C` fails, as in a source tree that was not built
    script = (
        "import sys; sys.modules['xraydeconv._C'] = None\n"
        "from xraydeconv.nn import SwitchMaxPool2d\n"
        "assert SwitchMaxPool2d(2).uses_kernel(__import__('torch').zeros(1, 1, 2, 2)) is False\n"
        "SwitchMaxPool2d(2, backend='kernel')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "RuntimeError" in run.stderr
    assert "pip install --no-build-isolation -e ." in run.stderr


def _small_net(backend: str) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        SwitchMaxPool2d(2, backend=backend),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        SwitchMaxPool2d(3, 2, 1, ceil_mode=True, backend=backend),
    )


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_on_a_module(compile_backend):
    net = _small_net("kernel")
    x = torch.randn(2, 1, 16, 18, requires_grad=True)
    ref = net(x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend=compile_backend)
    got = compiled(x)
    (g_got,) = torch.autograd.grad(got.sum(), x)
    # inductor may reorder the convolutions' sums (1e-7 differences); the pooling itself is exact
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-4)
