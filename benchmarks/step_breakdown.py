"""Where a training step's time goes: the step of a net (``train``'s default: 128 px, batch 32, channels-last, AdamW)
per op under torch's profiler, and the step with every BatchNorm2d of ``features`` replaced by ``nn.Identity``,
interleaved with the real one, which bounds what any BatchNorm kernel could save.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/step_breakdown.py --net deeper --threads 2 --backend auto

Freed memory is kept for reuse, as ``train`` does, so that page faults do not blur the split.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import torch  # noqa: E402  (after OMP_WAIT_POLICY)
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from xraydeconv.reports.bench import TRAIN_BATCH, TRAIN_PX, train_step_fn  # noqa: E402
from xraydeconv.training.allocator import keep_freed_memory  # noqa: E402


def batch_norm_as_identity(model: torch.nn.Module) -> None:
    """Replace each BatchNorm2d of ``model.features`` with ``nn.Identity``."""
    for i, m in enumerate(model.features):
        if isinstance(m, torch.nn.BatchNorm2d):
            model.features[i] = torch.nn.Identity()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="deeper")
    parser.add_argument("--backend", default="auto", choices=("auto", "kernel", "native"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rows", type=int, default=20, help="profiler rows to print")
    args = parser.parse_args()
    print(keep_freed_memory())
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(TRAIN_BATCH, 1, TRAIN_PX, TRAIN_PX, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 24, (TRAIN_BATCH,), generator=gen)
    steps = {"with BatchNorm": train_step_fn(args.net, args.backend, TRAIN_PX, x, y),
             "BatchNorm as Identity": train_step_fn(args.net, args.backend, TRAIN_PX, x, y, batch_norm_as_identity)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():
        fn()
        fn()
    for _ in range(args.repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    print(f"{args.net} step, {args.backend} pooling, {torch.get_num_threads()} threads, {args.repeats} rounds:")
    for name, ts in times.items():
        print(f"  {name:<22} median {statistics.median(ts):7.1f} ms")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(5):
            steps["with BatchNorm"]()
    print("per op and input shape, 5 steps:")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                                             max_name_column_width=34, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
