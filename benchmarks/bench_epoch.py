"""Epoch wall time of ``xraydeconv train`` against (steps x step time), and the data time per batch.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/bench_epoch.py [--steps 30] [--threads 1 2]

As ``train`` runs by default (demo preset: 128 px phantoms, batch 32, channels-last, AdamW, one-cycle), for
``deeper`` and ``deeper-aug``, with the loop's own ``Trainer``:

* data: loading, moving and augmenting one batch alone (``Trainer.epoch_batches`` without the background thread);
* step: ``Trainer.compute_step`` (forward, loss, backward, optimizer, schedule) on batches already in memory,
  timed before and after the epochs; the first step (oneDNN warm-up) is not counted;
* epoch: ``Trainer.train_epoch`` over the last ``--steps`` steps of epoch 1 (skipped as a resume skips them),
  with the next batch prepared on a background thread (``prefetch``) and without (``serial``);
  ``+val`` is the validation and snapshots of ``Trainer.end_epoch`` after it.

The ratio is epoch / (steps x median step); 1.00 means the epoch costs nothing beyond its steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import torch  # noqa: E402

from xraydeconv.training.distributed import DistInfo  # noqa: E402
from xraydeconv.training.loop import TrainConfig, Trainer, open_splits  # noqa: E402


def step_times(trainer: Trainer, batches: list, n: int) -> list[float]:
    trainer.ddp_model.train()
    times = []
    for x, y, _ in batches[:n]:
        t = time.perf_counter()
        torch.stack(trainer.compute_step(x, y)).tolist()  # the loop reads both numbers back every step
        times.append(time.perf_counter() - t)
    return times


def epoch_time(trainer: Trainer, steps: int, background: bool) -> tuple[float, float]:
    """Seconds of ``train_epoch`` over its last ``steps`` steps, and of the ``end_epoch`` after it."""
    trainer.background = background
    trainer.state.step_in_epoch = trainer.steps_per_epoch - steps
    t0 = time.perf_counter()
    trainer.train_epoch()
    t1 = time.perf_counter()
    trainer.end_epoch()
    return t1 - t0, time.perf_counter() - t1


def measure(model: str, threads: int, steps: int, out: Path) -> dict:
    torch.set_num_threads(threads)
    cfg = TrainConfig.demo(model, device="cpu", threads=threads)
    splits = open_splits(cfg, log=lambda s: None, preload=True)
    trainer = Trainer(cfg, out, splits, DistInfo(), torch.device("cpu"), log=lambda s: None, progress=False)
    trainer.start()
    steps = min(steps, trainer.steps_per_epoch)
    data, batches, t = [], [], time.perf_counter()
    for b in trainer.epoch_batches(0, background=False):
        data.append(time.perf_counter() - t)
        batches.append(b)
        t = time.perf_counter()
    step_times(trainer, batches, 1)  # warm-up
    per_step = step_times(trainer, batches, 10)
    epochs = {}
    for background in (True, False):
        epochs[background] = epoch_time(trainer, steps, background)
        trainer.state.epoch = 0  # the same epoch's batches again
    per_step += step_times(trainer, batches, 10)
    step = statistics.median(per_step)
    return {"model": model, "threads": threads, "steps": steps, "step": step, "data": statistics.median(data),
            "epochs": epochs, "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["deeper", "deeper-aug"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=30, help="steps per timed epoch (an epoch of the demo set has 30)")
    args = ap.parse_args()
    print("| model | threads | steps | steps x step (s) | mode | epoch (s) | ratio | +val (s) | data/batch (ms) "
          "| step (s) | load |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            for model in args.models:
                r = measure(model, threads, args.steps, Path(tmp) / f"{model}-{threads}")
                ideal = r["steps"] * r["step"]
                for background, (train_s, end_s) in r["epochs"].items():
                    print(f"| {model} | {threads} | {r['steps']} | {ideal:.1f} | "
                          f"{'prefetch' if background else 'serial'} | {train_s:.1f} | {train_s / ideal:.3f} | "
                          f"{end_s:.1f} | {1e3 * r['data']:.1f} | {r['step']:.3f} | {r['load']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
