"""Exact resume: a run SIGKILLed mid-epoch (or mid-write) and continued with --resume ends with the same weights.

Each run is a separate ``xraydeconv train`` process on a tiny ImageFolder, one thread, deterministic algorithms.
The killed runs load a small driver that SIGKILLs its own process at a chosen optimizer step or checkpoint
rename, so the kill lands at a known place without touching the training code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xraydeconv.training.checkpoint import read_checkpoint

DRIVER = r'''
import os, signal, sys
import torch
kind, at = sys.argv[1], int(sys.argv[2])
calls = [0]
def wrap(fn, after):
    def inner(*args, **kwargs):
        calls[0] += 1
        if not after and calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        out = fn(*args, **kwargs)
        if after and calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return inner
if kind == "step":  # right after the optimizer step, before the scheduler step and any snapshot
    torch.optim.AdamW.step = wrap(torch.optim.AdamW.step, after=True)
else:  # a snapshot's temp file is written and synced but not yet renamed into place
    os.replace = wrap(os.replace, after=False)
sys.argv = ["xraydeconv"] + sys.argv[3:]
from xraydeconv.cli.main import main
main()
'''


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    env.pop("WORLD_SIZE", None)
    return env


def _args(data: Path, out: Path) -> list[str]:
    # 24 training images in batches of 4: 6 steps per epoch, a resume.pt every 2 steps
    return ["train", "--model", "deeper-aug", "--data", str(data), "--input-size", "32", "--epochs", "2",
            "--batch-size", "4", "--checkpoint-every", "2", "--seed", "3", "--threads", "1", "--deterministic",
            "--quiet", "--out", str(out)]


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xraydeconv.cli.main", *args], env=_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_imagefolder) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    data = tiny_imagefolder(root / "data")
    out = root / "uninterrupted"
    r = _cli(_args(data, out))
    assert r.returncode == 0, r.stderr
    return data, out


def _assert_same_run(a: Path, b: Path) -> None:
    ra, _ = read_checkpoint(a / "last.pt")
    rb, _ = read_checkpoint(b / "last.pt")
    assert ra["step"] == rb["step"] == 12
    assert ra["state_dict"].keys() == rb["state_dict"].keys()
    for k in ra["state_dict"]:
        assert torch.equal(ra["state_dict"][k], rb["state_dict"][k]), k
    ha, hb = (json.loads((d / "metrics.json").read_text())["history"] for d in (a, b))
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(ha) == strip(hb)
    ba, _ = read_checkpoint(a / "best.pt")
    bb, _ = read_checkpoint(b / "best.pt")
    assert all(torch.equal(ba["state_dict"][k], bb["state_dict"][k]) for k in ba["state_dict"])


@pytest.mark.parametrize(
    "kind, at, expect",
    [
        ("step", 9, "resume.pt"),  # epoch 2, step 3: one step after the mid-epoch snapshot at step 2
        ("replace", 4, "resume.pt"),  # renaming epoch 1's last.pt into place (after 2 resume.pt and best.pt)
        ("step", 1, None),  # before the first snapshot: resume has nothing and starts over
    ],
)
def test_sigkill_then_resume_reaches_the_same_weights(reference, tmp_path: Path, kind: str, at: int, expect) -> None:
    data, ref_out = reference
    out = tmp_path / "killed"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    r = subprocess.run([sys.executable, str(driver), kind, str(at), *_args(data, out)], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (out / "metrics.json").exists()
    if expect:
        assert (out / expect).exists()
    if kind == "replace":
        assert not (out / "last.pt").exists() and list(out.glob(".last.pt.*.tmp"))
    if kind == "step" and expect:  # a killed run is not overwritten by accident
        again = _cli(_args(data, out))
        assert again.returncode == 2 and "--resume" in again.stderr
    r = _cli([*_args(data, out), "--resume"])
    assert r.returncode == 0, r.stderr
    _assert_same_run(ref_out, out)
    assert not (out / "resume.pt").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
