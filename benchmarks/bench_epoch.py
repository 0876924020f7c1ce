"""Epoch wall time of ``xraydeconv train`` against (steps x step time), and the data time per batch.

    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/bench_epoch.py [--steps 20] [--rounds 3] [--threads 1 2]

As ``train`` runs by default (demo preset: 128 px phantoms, batch 32, channels-last, AdamW, one-cycle), for
``deeper`` and ``deeper-aug``, with the loop's own ``Trainer``:

* data: loading, moving and augmenting one batch alone (``Trainer.epoch_batches`` without the background thread);
* steps: ``--steps`` calls of ``Trainer.compute_step`` (forward, loss, backward, optimizer, schedule, the loss
  read back) on batches already in memory; the first step of the run (oneDNN warm-up) is not counted;
* epoch: ``Trainer.train_epoch`` over the last ``--steps`` steps of an epoch (the others skipped as a resume
  skips them), with the next batch prepared on a background thread (``prefetch``) and without (``serial``);
* end: ``Trainer.end_epoch`` after it (validation on 192 images, ``best.pt`` and ``last.pt``), as a share of a
  whole epoch's steps.

On a shared machine the load drifts, so each round times the steps and both epochs back to back (alternating
their order) and the table gives medians over the rounds; ratio is epoch / steps of the same round, CPU ratio
the same with the process's CPU time (what the epoch costs beyond its steps, whatever else the machine runs).
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


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def step_times(trainer: Trainer, batches: list, n: int) -> tuple[list[float], float]:
    """Wall seconds of each of ``n`` steps, and the process CPU seconds of all of them."""
    trainer.ddp_model.train()
    times, cpu = [], time.process_time()
    for x, y, _ in batches[:n]:
        t = time.perf_counter()
        torch.stack(trainer.compute_step(x, y)).tolist()  # the loop reads both numbers back every step
        times.append(time.perf_counter() - t)
    return times, time.process_time() - cpu


def epoch_time(trainer: Trainer, steps: int, background: bool) -> tuple[float, float, float]:
    """Wall and CPU seconds of ``train_epoch`` over the last ``steps`` steps of epoch 1, and wall seconds of the
    ``end_epoch`` after it."""
    trainer.background = background
    trainer.state.epoch, trainer.state.step_in_epoch = 0, trainer.steps_per_epoch - steps
    t0, c0 = clock()
    trainer.train_epoch()
    t1, c1 = clock()
    trainer.end_epoch()
    return t1 - t0, c1 - c0, time.perf_counter() - t1


def measure(model: str, threads: int, steps: int, rounds: int, out: Path) -> dict:
    torch.set_num_threads(threads)
    cfg = TrainConfig.demo(model, device="cpu", threads=threads)
    cfg.epochs = max(cfg.epochs, 3 * rounds + 1)  # room in the one-cycle schedule for every timed step
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
    r = {k: [] for k in ("step", "steps", "steps_cpu", "prefetch", "serial", "serial_cpu", "end")}
    load = [os.getloadavg()[0]]
    for k in range(rounds):
        per_step, cpu = step_times(trainer, batches, steps)
        r["step"] += per_step
        r["steps"].append(sum(per_step))
        r["steps_cpu"].append(cpu)
        for background in (True, False) if k % 2 == 0 else (False, True):
            wall, cpu, end = epoch_time(trainer, steps, background)
            r["prefetch" if background else "serial"].append(wall)
            if not background:
                r["serial_cpu"].append(cpu)
            r["end"].append(end)
    load.append(os.getloadavg()[0])
    med = statistics.median

    def ratio(a: str, b: str) -> float:
        return med(x / y for x, y in zip(r[a], r[b]))

    return {"model": model, "threads": threads, "steps": steps, "step": med(r["step"]), "data": med(data),
            "ideal": med(r["steps"]), "end": med(r["end"]) / (trainer.steps_per_epoch * med(r["step"])),
            "load": "-".join(f"{v:.1f}" for v in load), "serial": (med(r["serial"]), ratio("serial", "steps")),
            "prefetch": (med(r["prefetch"]), ratio("prefetch", "steps")), "cpu": ratio("serial_cpu", "steps_cpu")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["deeper", "deeper-aug"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=10, help="steps timed per round (an epoch of the demo set has 30)")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, {os.cpu_count()} CPUs")
    print("| model | threads | steps | data/batch (ms) | step (s) | steps x step (s) | epoch serial (s) | ratio "
          "| CPU ratio | epoch prefetch (s) | ratio | end of epoch | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            for model in args.models:
                r = measure(model, threads, args.steps, args.rounds, Path(tmp) / f"{model}-{threads}")
                print(f"| {model} | {threads} | {r['steps']} | {1e3 * r['data']:.1f} | {r['step']:.3f} | "
                      f"{r['ideal']:.1f} | {r['serial'][0]:.1f} | {r['serial'][1]:.3f} | {r['cpu']:.3f} | "
                      f"{r['prefetch'][0]:.1f} | {r['prefetch'][1]:.3f} | +{100 * r['end']:.1f} % | {r['load']} |",
                      flush=True)


if __name__ == "__main__":
    main()
