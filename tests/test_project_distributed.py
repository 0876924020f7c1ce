"""`xraydeconv project` under torchrun (2 CPU processes, gloo): the output of one process, bit for bit; a killed
process leaves no output and --resume finishes its run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xraydeconv.data.classes import CLASS_NAMES
from xraydeconv.training import checkpoint, models

SIZE = 32
ARGS = ["project", "--top-n", "4", "--batch-size", "2", "--chunk", "2", "--device", "cpu", "--quiet"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    return env


def _one(args: list[str], out: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "xraydeconv.cli.main", *args, "--out", str(out)], env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def _torchrun(args: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "xraydeconv.cli.main", *args, "--out", str(out)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[list[str], Path]:
    """The arguments of a small run over 8 phantom films, and its one-process output."""
    from xraydeconv.data.phantoms import generate

    root = tmp_path_factory.mktemp("pd")
    data = generate(root / "ph", per_class=1, size=SIZE, seed=3, splits=("test",), progress=False)
    torch.manual_seed(0)
    model = models.build("deeper", num_classes=len(CLASS_NAMES), input_size=SIZE).eval()
    checkpoint.save_checkpoint(root / "net.pt", model, model_name="deeper", class_names=list(CLASS_NAMES),
                               input_size=SIZE, config={}, epoch=1)
    args = [*ARGS, "--checkpoint", str(root / "net.pt"), "--data", str(data), "--limit", "8"]
    _one(args, root / "one")
    return args, root / "one"


def test_two_processes_write_what_one_process_writes(run, tmp_path):
    args, one = run
    p = _torchrun(args, tmp_path / "ddp")
    _, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-3000:]
    want, got = _files(one), _files(tmp_path / "ddp")
    assert len([k for k in want if k.endswith("maps.npy")]) == 8
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []  # maps.npy, manifests, pictures, gallery: byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ddp.lock", "ddp"]


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids + [g for k in kids for g in _children(k)]


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _children(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes through /proc")
def test_a_killed_process_leaves_no_output_and_resume_finishes_the_run(run, tmp_path):
    args, one = run
    out = tmp_path / "ddp"
    records = tmp_path / ".ddp.partial" / ".chunks"
    p = _torchrun(args, out)
    try:
        deadline = time.monotonic() + 120
        while not (records.is_dir() and any(records.iterdir())):
            assert p.poll() is None and time.monotonic() < deadline, "the run ended before its first chunk"
            time.sleep(0.01)
        victim = _rank_pid(p.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    assert not out.exists(), "a run with a killed process must not look finished"
    finished = sorted(records.iterdir())
    assert 1 <= len(finished) < 4 and not (tmp_path / ".ddp.partial" / "index.html").exists()
    _one([*args, "--resume"], out)  # one process finishes what two began
    assert _files(out) == _files(one)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ddp.lock", "ddp"]


def test_a_bad_film_met_by_the_second_process_is_one_line_from_the_first(run, tmp_path):
    """The second process meets the broken film (chunk 1 is its): the run stops at once with the one-process
    message, and does not wait for a barrier the failed process never reaches."""
    import shutil

    from xraydeconv.data import open_dataset

    args, _ = run
    data = Path(args[args.index("--data") + 1])
    copy = shutil.copytree(data, tmp_path / "ph")
    bad = open_dataset(copy, split="test", input_size=SIZE).records[2].path  # chunk 1 = films 2 and 3
    bad.write_bytes(bad.read_bytes()[:40])
    broken = [*args[: args.index("--data") + 1], str(copy), *args[args.index("--data") + 2:]]
    p = _torchrun(broken, tmp_path / "ddp")
    _, err = p.communicate(timeout=180)
    assert p.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(bad) in lines[0], err[-3000:]
    assert not (tmp_path / "ddp").exists()
