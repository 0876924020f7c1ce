"""Every pool layer shape of the nets, kernel vs native, with pytest-benchmark.

    .venv/bin/python -m pytest benchmarks/bench_pool_shapes.py --benchmark-group-by=group \\
        --benchmark-columns=median,iqr,rounds

The shapes are the inputs of every ``SwitchMaxPool2d`` of shallow, deeper and deeper-aug at 128 and 256 px,
batch 1 and 32 (float32, 2x2/s2), in NCHW and channels-last, forward and forward+backward, alone and with the
ReLU in front fused (``bench.PASSES``), at 1 and 2 threads
(benchmarks/conftest.py). Each group holds the kernel and the native side of one case. ``xraydeconv bench
--suite`` measures the same pairs interleaved in one process and derives ``auto``'s dispatch table from them.
"""

from __future__ import annotations

import pytest
import torch

from xraydeconv import ops
from xraydeconv.reports import bench

pytestmark = pytest.mark.skipif(not ops.has_kernels("cpu"), reason="xraydeconv._C is not built")

SHAPES = list(bench.net_pool_shapes())


@pytest.mark.parametrize("side", ["kernel", "native"])
@pytest.mark.parametrize("passes", bench.PASSES)
@pytest.mark.parametrize("layout", bench.LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pool(benchmark, threads, shape, layout, passes, side):
    benchmark.group = f"pool {passes} {'x'.join(map(str, shape))} {layout} {threads}t"
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    kernel_fn, native_fn = bench.pool_fns(x, passes)
    benchmark(kernel_fn if side == "kernel" else native_fn)
