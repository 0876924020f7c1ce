"""One training step of each net with the pooling kernels, with ``auto`` and with native pooling.

    .venv/bin/python -m pytest benchmarks/bench_train_step.py --benchmark-group-by=group \\
        --benchmark-columns=median,iqr,rounds

As ``train`` runs it by default: 128 px, batch 32, channels-last, AdamW, cross-entropy, at 1 and 2 threads
(benchmarks/conftest.py). ``xraydeconv bench --suite`` measures the same steps interleaved in one process.
"""

from __future__ import annotations

import pytest
import torch

from xraydeconv import ops
from xraydeconv.reports import bench
from xraydeconv.training.models import MODEL_NAMES

pytestmark = pytest.mark.skipif(not ops.has_kernels("cpu"), reason="xraydeconv._C is not built")


@pytest.mark.parametrize("backend", ["kernel", "auto", "native"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_train_step(benchmark, threads, name, backend):
    benchmark.group = f"train step {name} {threads}t"
    gen = torch.Generator().manual_seed(0)
    px, batch = bench.TRAIN_PX, bench.TRAIN_BATCH
    x = torch.rand(batch, 1, px, px, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 24, (batch,), generator=gen)
    benchmark.pedantic(bench.train_step_fn(name, backend, px, x, y), rounds=7, warmup_rounds=2)
