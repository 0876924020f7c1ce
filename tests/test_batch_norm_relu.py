"""``batch_norm_relu`` and ``batch_norm_relu_pool2d``: torch's training-mode BatchNorm, ReLU and max pool, bit for bit
(values, switches, running stats and the gradients of x, weight and bias), and ``FusedSequential`` running them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from xraydeconv import ops
from xraydeconv.nn import FusedSequential, SwitchMaxPool2d
from xraydeconv.ops import batch_norm_relu, batch_norm_relu_pool2d
from xraydeconv.ops.batch_norm_relu import fuses_exactly

pytestmark = pytest.mark.skipif(not ops.has_kernel("batch_norm_relu", "cpu"), reason="xraydeconv._C is not built")

CL = torch.channels_last


def _bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (so -0 differs from +0 and NaN payloads count), in any layout."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = {torch.float32: torch.int32, torch.float64: torch.int64, torch.uint8: torch.uint8}[a.dtype]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def _case(shape, dtype, seed=0, special=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 0.5
    if special:  # exact zeros of both signs, and a channel that is constant (variance 0)
        x.view(-1)[::7], x.view(-1)[1::11] = 0.0, -0.0
        x[:, 1] = 2.0
    c = shape[1]
    w, b = torch.randn(c, generator=gen, dtype=dtype), torch.randn(c, generator=gen, dtype=dtype)
    b[0] = 0.0
    stats = (torch.randn(c, generator=gen, dtype=dtype), torch.rand(c, generator=gen, dtype=dtype) + 0.5)
    return x.to(dtype).contiguous(memory_format=CL), w, b, stats


def _run(fused: bool, pool: bool, x, w, b, stats, momentum=0.1, grad_layout=CL, grad_sign=None):
    """(out, [switches], grads of x, w, b, running mean, running var) through the op or through torch;
    ``grad_sign``: a gradient of signed zeros of that sign instead of a random one."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    rm, rv = (s.clone() for s in stats)
    if fused:
        out = (batch_norm_relu_pool2d if pool else batch_norm_relu)(x, w, b, rm, rv, momentum, 1e-5)
    else:
        y = F.relu(F.batch_norm(x, rm, rv, w, b, True, momentum, 1e-5), inplace=True)
        out = (F.max_pool2d(y, 2), ops.switch_pool2d(y.detach(), 2)[1]) if pool else y
    y = out[0] if pool else out
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
    if grad_sign is not None:
        grad = torch.zeros_like(grad) * grad_sign
    y.backward(grad.contiguous(memory_format=grad_layout))
    extra = [out[1]] if pool else []
    return [y.detach(), *extra, x.grad, w.grad, b.grad, rm, rv]


@pytest.mark.parametrize("pool", [False, True], ids=["bn_relu", "bn_relu_pool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2, 3])
# (3, 16, 5, 6): torch's 2 threads split a row inside a pool window, and a pool drops the last row; (1, 16, 4, 7):
# 3 threads split inside a window and at the column a pool drops
@pytest.mark.parametrize("shape", [(8, 16, 12, 10), (3, 32, 9, 7), (2, 128, 4, 4), (3, 16, 5, 6), (1, 16, 4, 7)])
def test_equals_torch_bit_for_bit(pool, dtype, threads, shape):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = _case(shape, dtype, special=True)
        got, want = _run(True, pool, *args), _run(False, pool, *args)
    finally:
        torch.set_num_threads(before)
    assert all(_bits(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("pool", [False, True], ids=["bn_relu", "bn_relu_pool"])
@pytest.mark.parametrize("threads", [1, 2])
def test_float32_blocks_of_8_and_16_channels_give_each_channel_the_same_bits(pool, threads):
    # The float32 kernels take channels 32, 16 and 8 at a time, and every lane is one channel: the first 24 channels
    # of a 48-channel map (one block of 32, one of 16) come out as a 24-channel map gives them (16, then 8), which
    # auto never fuses (torch's own sums differ past its last whole vector; the op's grad_x follows torch there).
    x, w, b, stats = _case((3, 48, 6, 5), torch.float32, special=True)
    grad = torch.randn(3, 48, 3 if pool else 6, 2 if pool else 5, generator=torch.Generator().manual_seed(9))

    def run(c):
        xc = x[:, :c].contiguous(memory_format=CL).requires_grad_()
        wc, bc = (t[:c].clone().requires_grad_() for t in (w, b))
        rm, rv = (s[:c].clone() for s in stats)
        out = (batch_norm_relu_pool2d if pool else batch_norm_relu)(xc, wc, bc, rm, rv, 0.1, 1e-5)
        y = out[0] if pool else out
        y.backward(grad[:, :c].contiguous(memory_format=CL))
        return [y.detach(), *([out[1]] if pool else []), xc.grad, wc.grad, bc.grad, rm, rv]

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        narrow, wide = run(24), run(48)
    finally:
        torch.set_num_threads(before)
    for i, (n, w_) in enumerate(zip(narrow, wide)):
        upto = 16 if n is narrow[-5] else 24  # grad_x past channel 16 rounds as torch's masked last vector does
        assert _bits(n[:, :upto] if n.dim() > 1 else n[:upto], w_[:, :upto] if w_.dim() > 1 else w_[:upto]), i


@pytest.mark.parametrize("pool", [False, True], ids=["bn_relu", "bn_relu_pool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_negative_zero_gradient_gives_torchs_bits(pool, dtype):
    # torch's pool backward adds the pooled gradient into zeros, so a -0 arrives as +0; the gradient of a constant
    # channel (variance 0) and of every other channel then carries that sign through grad_x
    args = _case((4, 16, 6, 6), dtype, special=True)
    got, want = (_run(fused, pool, *args, grad_sign=-1.0) for fused in (True, False))
    assert all(_bits(g, w) for g, w in zip(got, want))


def test_a_gradient_in_another_layout_takes_torchs_strided_backward():
    args = _case((4, 16, 6, 6), torch.float32)
    got, want = _run(True, False, *args, grad_layout=torch.contiguous_format), _run(False, False, *args)
    # torch sums an NCHW gradient in another order than a channels-last one: the op follows it there too
    assert all(_bits(g, w) for g, w in zip(got, _run(False, False, *args, grad_layout=torch.contiguous_format)))
    assert _bits(got[0], want[0])


def test_every_torch_cpu_capability_and_thread_count():
    # torch's AVX2 and AVX-512 kernels fuse multiply-adds and its baseline ones do not; the ops follow whichever runs
    script = (
        "import torch, sys; sys.path.insert(0, 'tests'); import test_batch_norm_relu as t\n"
        "for pool in (False, True):\n"
        "    for dtype in (torch.float32, torch.float64):\n"
        "        args = t._case((6, 16, 10, 8), dtype, special=True)\n"
        "        assert all(t._bits(g, w) for g, w in zip(t._run(True, pool, *args), t._run(False, pool, *args)))\n"
        "print(torch.backends.cpu.get_cpu_capability())"
    )
    for capability in ("default", "avx2", "avx512"):
        for threads in ("1", "2"):
            env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": threads}
            run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            assert run.returncode == 0, run.stderr[-2000:]


def test_fake_tensors_give_shapes_and_layouts():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 16, 9, 6).contiguous(memory_format=CL)
        w, b, rm, rv = (torch.empty(16) for _ in range(4))
        out, mean, invstd = torch.ops.xraydeconv.batch_norm_relu(x, w, b, rm, rv, 0.1, 1e-5)
        pooled, sw, xs, _, _ = torch.ops.xraydeconv.batch_norm_relu_pool2d(x, w, b, rm, rv, 0.1, 1e-5)
        pooled_grads = torch.ops.xraydeconv.batch_norm_relu_backward(pooled, x, w, b, mean, invstd, sw, xs,
                                                                     [True, True, True])
        inplace_grads = torch.ops.xraydeconv.batch_norm_relu_backward_(torch.empty_like(out), x, w, b, mean, invstd,
                                                                       [True, False])
        grads = torch.ops.xraydeconv.batch_norm_relu_backward(out, x, w, b, mean, invstd, None, None,
                                                              [True, False, True])
    assert grads[0].shape == x.shape and grads[1] is None and grads[2].shape == (16,)
    assert out.shape == x.shape and out.is_contiguous(memory_format=CL) and mean.shape == invstd.shape == (16,)
    assert pooled.shape == sw.shape == xs.shape == (2, 16, 4, 3) and sw.dtype == torch.uint8
    assert xs.dtype == x.dtype and xs.is_contiguous(memory_format=CL)
    assert pooled_grads[0].shape == x.shape and pooled_grads[1].shape == pooled_grads[2].shape == (16,)
    assert inplace_grads[0].shape == (16,) and inplace_grads[1] is None


def _backward_ops(fn) -> list[str]:
    """The names of the xraydeconv backward ops ``fn`` calls."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("xraydeconv::batch_norm_relu_backward")]


@pytest.mark.parametrize("threads", [1, 2])
def test_a_gradient_nothing_else_holds_becomes_grad_x_in_place(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = _case((3, 32, 9, 7), torch.float32, special=True)
        scale = torch.randn(3, 32, 9, 7, generator=torch.Generator().manual_seed(9)).contiguous(memory_format=CL)
        grads = {}
        for fused in (True, False):
            x, w, b = (t.detach().clone().requires_grad_() for t in args[:3])
            rm, rv = (s.clone() for s in args[3])
            if fused:
                y = batch_norm_relu(x, w, b, rm, rv)
            else:
                y = F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))
            # the product's backward hands over a fresh gradient that nothing else holds
            names = _backward_ops((y * scale).sum().backward)
            grads[fused] = (names, x.grad, w.grad, b.grad)
    finally:
        torch.set_num_threads(before)
    assert grads[True][0] == ["xraydeconv::batch_norm_relu_backward_"]
    assert all(_bits(a, b) for a, b in zip(grads[True][1:], grads[False][1:]))


def test_a_gradient_held_elsewhere_is_left_as_it_came():
    x, w, b, (rm, rv) = _case((2, 16, 6, 6), torch.float32)
    x.requires_grad_()
    y = batch_norm_relu(x, w, b, rm, rv)
    kept = []
    y.register_hook(kept.append)  # a hook that keeps the gradient it sees
    y.retain_grad()  # retain_grad keeps a copy
    scale = torch.randn(y.shape).contiguous(memory_format=CL)
    names = _backward_ops(lambda: (y * scale).sum().backward())
    assert names == ["xraydeconv::batch_norm_relu_backward"] and _bits(kept[0], scale) and _bits(y.grad, scale)
    # retain_grad alone keeps a copy, so the gradient itself may still become grad_x
    y = batch_norm_relu(x, w, b, rm, rv)
    y.retain_grad()
    names = _backward_ops(lambda: (y * scale).sum().backward())
    assert names == ["xraydeconv::batch_norm_relu_backward_"] and _bits(y.grad, scale)
    # a gradient the caller passes in is the caller's
    x.grad = None
    y = batch_norm_relu(x, w, b, rm, rv)
    g = scale.clone()
    assert _backward_ops(lambda: y.backward(g)) == ["xraydeconv::batch_norm_relu_backward"] and _bits(g, scale)


def test_the_in_place_backward_refuses_another_layout():
    x, w, b, (rm, rv) = _case((2, 16, 6, 6), torch.float32)
    _, mean, invstd = torch.ops.xraydeconv.batch_norm_relu(x, w, b, rm, rv, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="x's shape, strides and dtype"):
        torch.ops.xraydeconv.batch_norm_relu_backward_(torch.randn(2, 16, 6, 6), x, w, b, mean, invstd, [True, True])
    with pytest.raises(RuntimeError, match="share x's memory"):
        torch.ops.xraydeconv.batch_norm_relu_backward_(x, x, w, b, mean, invstd, [True, True])


@pytest.mark.parametrize("x, match", [
    (torch.randn(2, 16, 4, 4), "channels_last"),
    (torch.randn(2, 16, 4, 4, dtype=torch.float16).contiguous(memory_format=CL), "float32 or float64"),
    (torch.randn(1, 16, 1, 1).contiguous(memory_format=CL), "channels_last"),
])
def test_a_bad_input_is_an_error(x, match):
    c = x.shape[1]
    with pytest.raises(RuntimeError, match=match):
        batch_norm_relu(x, torch.ones(c, dtype=x.dtype), torch.zeros(c, dtype=x.dtype), torch.zeros(c), torch.ones(c))


def test_fuses_exactly_names_the_maps_torch_sums_in_the_channels_last_order():
    assert fuses_exactly(torch.randn(2, 32, 5, 5).contiguous(memory_format=CL))
    assert not fuses_exactly(torch.randn(2, 32, 5, 5))  # NCHW
    assert not fuses_exactly(torch.randn(2, 24, 5, 5).contiguous(memory_format=CL))  # C not a multiple of 16
    assert not fuses_exactly(torch.randn(2, 32, 5, 5, dtype=torch.float16).contiguous(memory_format=CL))


def _stage(momentum=0.1):
    torch.manual_seed(0)
    return [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16, momentum=momentum), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16, momentum=momentum), nn.ReLU(inplace=True),
            SwitchMaxPool2d(2, backend="native")]


def _fused_ops(model, x) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x).sum().backward()
    names = ("xraydeconv::batch_norm_relu", "xraydeconv::batch_norm_relu_pool2d")
    return sorted(e.name for e in prof.events() if e.name in names)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_sequential_trains_as_nn_sequential(momentum):
    x = torch.randn(4, 3, 12, 12).contiguous(memory_format=CL)
    mods = _stage(momentum)
    mods[-1] = SwitchMaxPool2d(2, backend="kernel")
    fused = FusedSequential(*mods, backend="kernel").to(memory_format=CL)
    plain = nn.Sequential(*_stage(momentum)).to(memory_format=CL)
    for _ in range(2):
        for m in (fused, plain):
            m(x).square().sum().backward()
    for (name, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        assert _bits(a, b) if a.is_floating_point() else torch.equal(a, b), name
    for a, b in zip(fused.parameters(), plain.parameters()):
        assert _bits(a.grad, b.grad)
    assert _fused_ops(fused, x) == ["xraydeconv::batch_norm_relu", "xraydeconv::batch_norm_relu_pool2d"]


def test_fused_sequential_runs_batchnorm_itself_where_fusing_would_show_or_differ():
    x = torch.randn(4, 3, 12, 12).contiguous(memory_format=CL)
    model = FusedSequential(*_stage(), backend="kernel").to(memory_format=CL)
    # the pool is native: each BatchNorm fuses with its ReLU only
    assert _fused_ops(model, x) == ["xraydeconv::batch_norm_relu", "xraydeconv::batch_norm_relu"]
    model.eval()
    assert _fused_ops(model, x) == []  # running statistics: torch's affine BatchNorm
    model.train()
    handle = model[1].register_forward_hook(lambda *a: None)
    assert _fused_ops(model, x) == ["xraydeconv::batch_norm_relu"]  # only the second, unhooked BatchNorm
    handle.remove()
    nchw = FusedSequential(*_stage(), backend="kernel")
    assert _fused_ops(nchw, x.contiguous()) == []  # NCHW: torch sums in another order
    assert _fused_ops(FusedSequential(*_stage(), backend="native").to(memory_format=CL), x) == []


def test_auto_fuses_only_where_the_table_measured_it(monkeypatch):
    from xraydeconv.ops import pool_dispatch

    x = torch.randn(4, 3, 12, 12).contiguous(memory_format=CL)
    model = FusedSequential(*_stage()).to(memory_format=CL)
    monkeypatch.setattr(pool_dispatch, "TABLE", {})
    assert _fused_ops(model, x) == []
    key = pool_dispatch.bn_relu_class(torch.empty(4, 16, 12, 12).contiguous(memory_format=CL), False)
    monkeypatch.setattr(pool_dispatch, "TABLE", {key: True})
    assert _fused_ops(model, x) == ["xraydeconv::batch_norm_relu", "xraydeconv::batch_norm_relu"]
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)  # a forward alone: the table measured forward+backward, so torch's modules run
    assert not any(e.name.startswith("xraydeconv::batch_norm") for e in prof.events())
