"""``xraydeconv.ops.relu_``: torch.relu_'s values and gradients, with the gradient masked in place only where nothing
else can see it.

Whether the in-place path ran is read from the profiler, which holds no tensor: the out= form of
``threshold_backward`` takes four arguments, the allocating form three.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from xraydeconv import ops

pytestmark = pytest.mark.skipif(not ops.has_kernel("relu_", "cpu"), reason="xraydeconv._C is not built")

relu_ = ops.relu_


def _special(shape, dtype, layout) -> torch.Tensor:
    """Random values with exact zeros of both signs, NaN and infinities mixed in."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    flat = x.view(-1)
    flat[::7], flat[1::11], flat[2::13], flat[3::17], flat[4::19] = 0.0, -0.0, float("nan"), float("inf"), -float("inf")
    return x.to(dtype).contiguous(memory_format=layout)


def _mask_calls(fn) -> list[int]:
    """The argument counts of the threshold_backward calls made while ``fn`` runs (4: in place, 3: allocating)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [len(e.input_shapes) for e in prof.events() if e.name == "aten::threshold_backward"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_values_are_torch_relu_in_place(dtype, layout):
    x = _special((3, 5, 7, 9), dtype, layout)
    expected = torch.relu_(x.clone())
    version = x._version
    out = relu_(x)
    assert out is x and x._version > version
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(out), torch.signbit(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gradient_is_torch_relu_s_and_masked_in_place(dtype, layout):
    x0 = _special((2, 4, 6, 10), dtype, layout).nan_to_num(0.0, 0.0, 0.0).requires_grad_(True)
    w = torch.randn(x0.shape, dtype=dtype)
    grads = []
    for fn in (relu_, torch.relu_):
        x0.grad = None
        y = fn(x0 * 1) * 3  # MulBackward hands the ReLU a fresh gradient that nothing else holds
        calls = _mask_calls(lambda y=y: (y * w).sum().backward())
        grads.append((x0.grad.clone(), calls))
    assert torch.equal(grads[0][0], grads[1][0])
    assert grads[0][1] == [4] and grads[1][1] == [3]


class _Pass(torch.autograd.Function):
    """Identity with a Python backward that hands its gradient on as it came."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


@pytest.mark.parametrize("order", ["relu_first", "relu_second"])
def test_a_gradient_shared_with_another_branch_is_not_masked(order):
    # an addition hands the same gradient tensor to both of its inputs: masking it would corrupt the other branch
    gen = torch.Generator().manual_seed(1)
    x0, x1 = (torch.randn(2, 3, 8, 8, generator=gen).requires_grad_(True) for _ in range(2))
    w = torch.randn(2, 3, 8, 8, generator=gen)
    results = []
    for fn in (relu_, torch.relu_):
        x0.grad = x1.grad = None
        r, other = fn(_Pass.apply(x0)), _Pass.apply(x1)
        s = r + other if order == "relu_first" else other + r
        calls = _mask_calls(lambda s=s: (s * w).sum().backward())
        results.append((x0.grad.clone(), x1.grad.clone(), calls))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][2] == [3]


def test_a_gradient_the_caller_hooks_or_retains_is_not_masked():
    x0 = torch.randn(2, 3, 8, 8).requires_grad_(True)
    g = torch.randn(2, 3, 8, 8)
    g_before = g.clone()
    r = relu_(x0 * 1)
    assert _mask_calls(lambda: r.backward(g)) == [3]  # the caller's own gradient
    assert torch.equal(g, g_before) and torch.equal(x0.grad, g * (r > 0))

    seen = []
    r = relu_(x0 * 1)
    r.register_hook(lambda grad: seen.append(grad))  # a hook that keeps the gradient the ReLU receives
    assert _mask_calls(lambda: (r * 2).sum().backward()) == [3]
    assert torch.equal(seen[0], torch.full_like(r, 2.0))

    r = relu_(x0 * 1)
    r.retain_grad()
    y = r * 2
    y.sum().backward()
    assert torch.equal(r.grad, torch.full_like(r, 2.0))


def test_create_graph_records_the_backward_and_second_derivatives_match():
    x = torch.randn(3, 4, 5, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: relu_(t * 1) * 3, (x,))
    assert torch.autograd.gradgradcheck(lambda t: relu_(t * 1).square(), (x,))
    second = []
    for fn in (relu_, torch.relu_):
        (g,) = torch.autograd.grad((fn(x * 1) * 3).square().sum(), x, create_graph=True)
        assert g.requires_grad
        second.append(torch.autograd.grad(g.sum(), x)[0])
    assert torch.equal(*second)


def test_errors_like_torch_relu_on_a_leaf_that_requires_grad():
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        relu_(x)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        torch.relu_(x)


def test_meta_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    meta = torch.empty(2, 3, 4, 5, device="meta").contiguous(memory_format=torch.channels_last)
    assert relu_(meta) is meta
    with FakeTensorMode():
        fake = torch.empty(2, 3, 4, 5)
        assert relu_(fake).shape == (2, 3, 4, 5)
