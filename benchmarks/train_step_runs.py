"""The training step against native pooling, several times over: the step-to-step noise here (up to 15 % between
runs) is as large as the effect, so one run of ``xraydeconv bench --suite`` does not settle a 1.10x target.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/train_step_runs.py --nets deeper deeper-aug \\
        --threads 1 2 --runs 3 --repeats 21
    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/train_step_runs.py --solo --nets deeper --threads 1 2 --runs 6
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 OMP_WAIT_POLICY=passive \\
        .venv/bin/python benchmarks/train_step_runs.py --solo --nets deeper --threads 1 2 --runs 6

By default each run is :func:`xraydeconv.reports.bench.run_train_steps` (kernel, auto and native interleaved in
one process, median over the rounds of the per-round ratio). With ``--solo`` each side trains alone in its own
process, as ``train`` does, ``auto`` and native alternating, one pair of processes per run; a run's speed-up is
native's median step over auto's, and each process's medians per step (wall, user and system time, page faults from
``getrusage``) are printed as it ends. The two differ because most of a step's system time is page faults on freshly
mapped feature maps, and how many there are depends on glibc's heap, which the other side's allocations change
when they share a process. The glibc settings above keep freed memory for reuse, so that no step faults and the
ratio is that of the computation alone.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import torch  # noqa: E402  (after OMP_WAIT_POLICY)

from xraydeconv.reports import bench  # noqa: E402


def _interleaved(args) -> dict[tuple[str, int], tuple[list[float], list[float]]]:
    """{(row, threads): (speed-ups, native ms)} over ``args.runs`` interleaved runs."""
    out: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    for _ in range(args.runs):
        for r in bench.run_train_steps(args.nets, args.threads, args.repeats):
            ratios, native = out.setdefault((r.what, r.threads), ([], []))
            ratios.append(r.speedup)
            native.append(r.native_ms)
    return out


STEP_FIELDS = ("wall ms", "user ms", "sys ms", "page faults")


def _one_process(net: str, side: str, threads: int, repeats: int) -> dict[str, float]:
    """Medians per step of ``net`` with ``side`` pooling, trained alone in a fresh process: :data:`STEP_FIELDS`."""
    cmd = [sys.executable, __file__, "--one", net, side, str(threads), str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
    return dict(zip(STEP_FIELDS, map(float, out[-len(STEP_FIELDS):])))


def _solo(args) -> dict[tuple[str, int], tuple[list[float], list[float]]]:
    out: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    for run in range(args.runs):
        for threads in args.threads:
            for net in args.nets:
                order = ("auto", "native") if run % 2 == 0 else ("native", "auto")
                step = {side: _one_process(net, side, threads, args.repeats) for side in order}
                ratios, native = out.setdefault((f"train step {net} auto, alone", threads), ([], []))
                ratios.append(step["native"]["wall ms"] / step["auto"]["wall ms"])
                native.append(step["native"]["wall ms"])
                for side in order:
                    print(f"run {run + 1}: {net} {side} {threads}t, per step: "
                          + ", ".join(f"{k} {v:.0f}" for k, v in step[side].items()), flush=True)
    return out


def _run_one(net: str, side: str, threads: int, repeats: int) -> None:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(bench.TRAIN_BATCH, 1, bench.TRAIN_PX, bench.TRAIN_PX, generator=gen)
    y = torch.randint(0, 24, (bench.TRAIN_BATCH,), generator=gen)
    step = bench.train_step_fn(net, side, bench.TRAIN_PX, x.contiguous(memory_format=torch.channels_last), y)
    for _ in range(3):
        step()
    samples = []
    for _ in range(repeats):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        samples.append(((t1 - t0) * 1e3, (r1.ru_utime - r0.ru_utime) * 1e3, (r1.ru_stime - r0.ru_stime) * 1e3,
                        r1.ru_minflt - r0.ru_minflt))
    print(*(statistics.median(column) for column in zip(*samples)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", nargs="+", default=["deeper", "deeper-aug"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--runs", type=int, default=3, help="independent runs")
    ap.add_argument("--repeats", type=int, default=21, help="interleaved rounds (steps, with --solo) per run")
    ap.add_argument("--solo", action="store_true", help="each side alone in its own process")
    ap.add_argument("--one", nargs=4, metavar=("NET", "SIDE", "THREADS", "REPEATS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        net, side, threads, repeats = args.one
        _run_one(net, side, int(threads), int(repeats))
        return
    results = _solo(args) if args.solo else _interleaved(args)
    malloc = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_")) or "glibc defaults"
    print(f"torch {torch.__version__}, {malloc}, {'each side alone' if args.solo else 'interleaved'}")
    print(f"{'step':<30} {'thr':>3} {'native ms':>10}  speed-up of each run -> median")
    for (what, threads), (values, native) in results.items():
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"{what:<30} {threads:>3} {statistics.median(native):>10.0f}  {runs} -> {statistics.median(values):.2f}x")


if __name__ == "__main__":
    main()
