"""Switch-pooling kernels vs PyTorch's own max pooling, with pytest-benchmark.

    .venv/bin/python -m pytest benchmarks/bench_ops.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Each group holds the kernel and the native side of one operation at one shape, layout and thread count
(float32, 2x2/s2). "out" variants write into preallocated buffers and time the kernels alone; the others
include allocating (and page-faulting) their outputs. ``xraydeconv bench`` prints the same comparison as a
ratio table measured interleaved in one process.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xraydeconv import ops

pytestmark = pytest.mark.skipif(not ops.has_kernels("cpu"), reason="xraydeconv._C is not built")

SHAPES = [(32, 64, 128, 128), (8, 256, 32, 32), (1, 64, 256, 256)]
K, S, P, D = [2, 2], [2, 2], [0, 0], [1, 1]


@pytest.fixture(params=SHAPES, ids=lambda s: "x".join(map(str, s)), scope="module")
def shape(request):
    return request.param


@pytest.fixture(params=["nchw", "channels_last"])
def x(request, shape):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return t.contiguous(memory_format=torch.channels_last) if request.param == "channels_last" else t


def _group(benchmark, op: str, x: torch.Tensor, threads: int) -> None:
    layout = "channels_last" if ops._memory_format(x) == torch.channels_last else "nchw"
    benchmark.group = f"{op} {'x'.join(map(str, x.shape))} {layout} {threads}t"


@pytest.mark.parametrize("side", ["kernel", "native"])
def test_pool(benchmark, x, threads, side):
    _group(benchmark, "pool", x, threads)
    if side == "kernel":
        benchmark(ops.switch_pool2d, x, K, S)
    else:
        benchmark(F.max_pool2d, x, K, S, return_indices=True)


@pytest.mark.parametrize("side", ["kernel", "native"])
def test_pool_out(benchmark, x, threads, side):
    _group(benchmark, "pool out=", x, threads)
    out, sw = ops.switch_pool2d(x, K, S)
    if side == "kernel":
        benchmark(torch.ops.xraydeconv.switch_pool2d_out, x, K, S, P, False, out, sw)
    else:
        idx = torch.empty(out.shape, dtype=torch.int64).contiguous(memory_format=ops._memory_format(out))
        benchmark(torch.ops.aten.max_pool2d_with_indices.out, x, K, S, P, D, False, out=out, indices=idx)


@pytest.mark.parametrize("side", ["kernel", "native"])
def test_pool_forward_backward(benchmark, x, threads, side):
    _group(benchmark, "pool fwd+bwd", x, threads)
    xg = x.detach().clone().requires_grad_(True)
    grad = torch.randn_like(F.max_pool2d(x, K, S))
    if side == "kernel":
        benchmark(lambda: torch.autograd.grad(ops.switch_pool2d(xg, K, S)[0], xg, grad))
    else:
        benchmark(lambda: torch.autograd.grad(F.max_pool2d(xg, K, S), xg, grad))


@pytest.mark.parametrize("side", ["kernel", "native"])
def test_unpool(benchmark, x, threads, side):
    _group(benchmark, "unpool", x, threads)
    size = list(x.shape[-2:])
    if side == "kernel":
        out, sw = ops.switch_pool2d(x, K, S)
        benchmark(torch.ops.xraydeconv.switch_unpool2d, out, sw, K, S, P, size)
    else:
        out, idx = F.max_pool2d(x, K, S, return_indices=True)
        benchmark(F.max_unpool2d, out, idx, K, S, output_size=size)


@pytest.mark.parametrize("side", ["kernel", "native"])
def test_unpool_out(benchmark, x, threads, side):
    _group(benchmark, "unpool out=", x, threads)
    buf = torch.empty_like(x)
    if side == "kernel":
        out, sw = ops.switch_pool2d(x, K, S)
        benchmark(torch.ops.xraydeconv.switch_unpool2d_out, out, sw, K, S, P, buf)
    else:
        out, idx = F.max_pool2d(x, K, S, return_indices=True)
        benchmark(torch.ops.aten.max_unpool2d.out, out, idx, list(x.shape[-2:]), out=buf)


@pytest.mark.parametrize("side", ["kernel", "native"])
def test_pool_backward(benchmark, x, threads, side):
    _group(benchmark, "pool bwd", x, threads)
    size = list(x.shape[-2:])
    if side == "kernel":
        out, sw = ops.switch_pool2d(x, K, S)
        benchmark(torch.ops.xraydeconv.switch_unpool2d, torch.randn_like(out), sw, K, S, P, size)
    else:
        out, idx = F.max_pool2d(x, K, S, return_indices=True)
        grad = torch.randn_like(out)
        benchmark(torch.ops.aten.max_pool2d_with_indices_backward, grad, x, K, S, P, D, False, idx)
