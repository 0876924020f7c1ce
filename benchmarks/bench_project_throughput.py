"""Images per second of ``xraydeconv project`` on the CPU, with one process and with two under ``torchrun``.

    OMP_WAIT_POLICY=passive python benchmarks/bench_project_throughput.py --size 256 --films 24 --repeat 3

Makes phantom films at ``--size`` px (test split) and a ``deeper`` net at that input size (seeded random weights:
the speed of a projection does not depend on what the net learned), then runs the command line end to end,
configurations interleaved in each round, and prints the median wall time and images/s of each:

* ``pictures``: the default output (every picture, ``maps.npy`` per film, gallery);
* ``archive``: ``--pictures none --maps store`` (manifests, one map store, gallery): the projection itself;

each with 1 process (all cores as threads) and 2 processes (``torchrun --standalone``, the cores shared out;
with ``--device cuda`` one GPU per process and NCCL).
Wall times include starting Python and torch (``startup``: a run of one film, archive mode, is printed too).
``--compression DIR`` instead measures how well the maps of a ``project --maps store`` output compress.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch loads, here and in every run it starts

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ARCHIVE = ["--pictures", "none", "--maps", "store"]


def prepare(root: Path, size: int, films: int) -> tuple[Path, Path]:
    """Phantom films and a checkpoint at ``size`` px under ``root``."""
    from xraydeconv.data.classes import CLASS_NAMES
    from xraydeconv.data.phantoms import generate
    from xraydeconv.training import checkpoint, models

    per_class = -(-films // len(CLASS_NAMES))
    data = generate(root / "ph", per_class=per_class, size=size, seed=0, splits=("test",), progress=False)
    torch.manual_seed(0)
    model = models.build("deeper", num_classes=len(CLASS_NAMES), input_size=size).eval()
    checkpoint.save_checkpoint(root / "net.pt", model, model_name="deeper", class_names=list(CLASS_NAMES),
                               input_size=size, config={}, epoch=0)
    return data, root / "net.pt"


def run_once(cmd: list[str], out: Path, procs: int, threads: int) -> float:
    """Seconds of one ``project`` run (``procs`` processes of ``threads`` threads each)."""
    shutil.rmtree(out, ignore_errors=True)
    launcher = [sys.executable, "-m", "xraydeconv.cli.main"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
        "-m", "xraydeconv.cli.main"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    r = subprocess.run([*launcher, *cmd, "--threads", str(threads), "--out", str(out)], env=env,
                       capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"run failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return seconds


def throughput(args: argparse.Namespace) -> None:
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, ckpt = prepare(root, args.size, args.films)
        base = ["project", "--checkpoint", str(ckpt), "--data", str(data), "--device", args.device, "--quiet",
                "--batch-size", str(args.batch_size)]
        films = ["--limit", str(args.films)]
        configs = {}
        kinds = {"pictures": [], "archive": ARCHIVE}
        for kind in args.kinds.split(","):
            extra = kinds[kind]
            for procs in [int(v) for v in args.procs.split(",")]:
                configs[f"{kind}, {procs} process{'es' if procs > 1 else ''}"] = (
                    [*base, *films, *extra], procs, max(1, cores // procs))
        configs["startup (1 film, archive, 1 process)"] = ([*base, "--limit", "1", *ARCHIVE], 1, cores)
        times: dict[str, list[float]] = {k: [] for k in configs}
        for _ in range(args.repeat):
            for name, (cmd, procs, threads) in configs.items():
                times[name].append(run_once(cmd, root / "out", procs, threads))
    print(f"torch {torch.__version__}, device {args.device}, {cores} cores, OMP_WAIT_POLICY="
          f"{os.environ['OMP_WAIT_POLICY']}, {args.films} films at {args.size} px, top-25, batch {args.batch_size}, "
          f"median of {args.repeat}")
    print("| run | processes x threads | wall (median) | images/s |\n|---|---|---:|---:|")
    for name, (_, procs, threads) in configs.items():
        med = statistics.median(times[name])
        n = 1 if name.startswith("startup") else args.films
        print(f"| {name} | {procs} x {threads} | {med:.1f} s | {n / med:.2f} |")


def compression(out: Path) -> None:
    """Bytes of the maps of a ``--maps store`` output: raw float16, zlib, np.savez_compressed, zero share."""
    from xraydeconv.reports.mapstore import MapStore

    store = MapStore(out)
    maps = np.stack([np.asarray(store[k]) for k in range(len(store))])
    raw = maps.nbytes
    z = sum(len(zlib.compress(m.tobytes(), 6)) for m in maps)
    with tempfile.TemporaryDirectory() as tmp:
        np.savez_compressed(Path(tmp) / "maps.npz", maps=maps)
        npz = (Path(tmp) / "maps.npz").stat().st_size
    n = len(store)
    print(f"{n} films, maps {tuple(maps.shape[1:])} float16: {raw / n / 1024:.0f} KiB per film raw; zlib (per film, "
          f"level 6) {z / n / 1024:.0f} KiB ({raw / z:.2f}x); np.savez_compressed (all) {npz / n / 1024:.0f} KiB per "
          f"film ({raw / npz:.2f}x); exact zeros {100 * float((maps == 0).mean()):.1f} %, below 1/256 "
          f"{100 * float((maps < 1 / 256).mean()):.1f} %")
    print(json.dumps({"films": n, "raw_bytes": raw, "zlib_bytes": z, "npz_bytes": npz}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--films", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process under torchrun: NCCL)")
    ap.add_argument("--procs", default="1,2", help="process counts to run, comma-separated")
    ap.add_argument("--kinds", default="pictures,archive", help="pictures and/or archive, comma-separated")
    ap.add_argument("--compression", type=Path, default=None, metavar="DIR",
                    help="measure the maps of this `project --maps store` output instead")
    args = ap.parse_args()
    if args.compression:
        compression(args.compression)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
