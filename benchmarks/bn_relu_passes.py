"""The passes of the fused BatchNorm + ReLU (+ pool) ops alone, at the BatchNorm inputs of ``deeper`` (128 px,
batch 32, channels-last): torch's batch statistics, the forward (statistics included), the backward's sums alone
(no grad_x) and the whole backward, with a read (``sum``) and a copy (``clone``) of x for scale. Medians in ms.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/bn_relu_passes.py --threads 1 --repeats 21

The backward without a pool is the allocating op here (a training step writes grad_x over the gradient).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import torch  # noqa: E402  (after OMP_WAIT_POLICY)

import xraydeconv.ops  # noqa: E402,F401  (registers the ops)
from xraydeconv.training.models import DEEPER_WIDTHS  # noqa: E402


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _row(shape: tuple[int, int, int, int], pool: bool, repeats: int) -> list[float]:
    op = torch.ops.xraydeconv
    c = shape[1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.1
    rm, rv = torch.zeros(c), torch.ones(c)
    if pool:
        fwd = lambda: op.batch_norm_relu_pool2d(x, w, b, rm, rv, 0.1, 1e-5)  # noqa: E731
        out, sw, xs, mean, invstd = fwd()
    else:
        fwd = lambda: op.batch_norm_relu(x, w, b, rm, rv, 0.1, 1e-5)  # noqa: E731
        (out, mean, invstd), sw, xs = fwd(), None, None
    g = torch.randn(out.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    return [
        _median_ms(lambda: torch.batch_norm_update_stats(x, rm, rv, 0.1), repeats),
        _median_ms(fwd, repeats),
        _median_ms(lambda: op.batch_norm_relu_backward(g, x, w, b, mean, invstd, sw, xs, [False, True, True]),
                   repeats),
        _median_ms(lambda: op.batch_norm_relu_backward(g, x, w, b, mean, invstd, sw, xs, [True, True, True]),
                   repeats),
        _median_ms(lambda: x.sum((0, 2, 3)), repeats),
        _median_ms(x.clone, repeats),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, median ms of {args.repeats}")
    print(f"{'input':<16} {'pool':>4} {'stats':>7} {'forward':>8} {'bwd sums':>9} {'backward':>9} {'sum':>6} "
          f"{'clone':>6}")
    px = 128
    for width in DEEPER_WIDTHS:
        for pool in (False, True):
            t = _row((32, width, px, px), pool, args.repeats)
            print(f"{f'32x{width}x{px}x{px}':<16} {'yes' if pool else 'no':>4} {t[0]:>7.2f} {t[1]:>8.2f} "
                  f"{t[2]:>9.2f} {t[3]:>9.2f} {t[4]:>6.2f} {t[5]:>6.2f}")
        px //= 2


if __name__ == "__main__":
    main()
