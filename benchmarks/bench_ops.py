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

from xraydeconv import ops
from xraydeconv.ops.geometry import memory_format
from xraydeconv.reports import bench

pytestmark = pytest.mark.skipif(not ops.has_kernels("cpu"), reason="xraydeconv._C is not built")

OPS = ["pool", "pool out=", "pool fwd+bwd", "pool bwd", "unpool", "unpool out="]


@pytest.fixture(params=bench.FULL_SHAPES, ids=lambda s: "x".join(map(str, s)), scope="module")
def shape(request):
    return request.param


@pytest.fixture(params=["nchw", "channels_last"])
def x(request, shape):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return t.contiguous(memory_format=torch.channels_last) if request.param == "channels_last" else t


@pytest.mark.parametrize("side", ["kernel", "native"])
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, x, threads, op, side):
    layout = "channels_last" if memory_format(x) == torch.channels_last else "nchw"
    benchmark.group = f"{op} {'x'.join(map(str, x.shape))} {layout} {threads}t"
    # the same calls (and preallocated buffers) as `xraydeconv bench`
    kernel_fn, native_fn = next((k, n) for name, k, n, _, _ in bench.op_cases(x) if name == op)
    benchmark(kernel_fn if side == "kernel" else native_fn)
