"""The training step against native pooling, several times over: the step-to-step noise here (up to 15 % between
runs) is as large as the effect, so one run of ``xraydeconv bench --suite`` does not settle a 1.10x target.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/train_step_runs.py --nets deeper deeper-aug \\
        --threads 1 2 --runs 3 --repeats 15

Each run is :func:`xraydeconv.reports.bench.run_train_steps` (kernel, auto and native interleaved, median over the
rounds of the per-round ratio); the table lists every run's speed-up and their median.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from xraydeconv.reports import bench  # noqa: E402  (after OMP_WAIT_POLICY)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", nargs="+", default=["deeper", "deeper-aug"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--runs", type=int, default=3, help="independent runs")
    ap.add_argument("--repeats", type=int, default=15, help="interleaved rounds per run")
    args = ap.parse_args()
    ratios: dict[tuple[str, int], list[float]] = {}
    native: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.runs):
        for r in bench.run_train_steps(args.nets, args.threads, args.repeats):
            ratios.setdefault((r.what, r.threads), []).append(r.speedup)
            native.setdefault((r.what, r.threads), []).append(r.native_ms)
    print(f"{'step':<28} {'thr':>3} {'native ms':>10}  speed-up of each run -> median")
    for (what, threads), values in ratios.items():
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"{what:<28} {threads:>3} {statistics.median(native[what, threads]):>10.0f}  {runs} -> "
              f"{statistics.median(values):.2f}x")


if __name__ == "__main__":
    main()
