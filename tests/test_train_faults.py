"""Training faults end in one error line and leave the last good state: divergence, tiny runs, shared --out."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from xraydeconv.cli.main import cli
from xraydeconv.errors import UserError
from xraydeconv.io import output_lock
from xraydeconv.training.checkpoint import load_checkpoint
from xraydeconv.training.loop import TrainConfig, train, warmup_fraction

TINY = dict(model="shallow", input_size=32, epochs=2, batch_size=4, threads=1, checkpoint_every=0, device="cpu")


pytestmark = pytest.mark.usefixtures("keep_threads")


def _quiet(s: str) -> None:
    pass


@pytest.mark.parametrize("total", range(1, 61))
def test_one_cycle_schedule_runs_every_length(total: int) -> None:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=total, pct_start=warmup_fraction(total))
    for _ in range(total):
        opt.step()
        sched.step()
    # only the length that made OneCycleLR divide by zero gets another warm-up: every other run keeps its numbers
    assert warmup_fraction(total) == (0.4 if total == 5 else 0.2)


def test_one_epoch_of_batch_16_on_72_films(tmp_path: Path, tiny_imagefolder) -> None:
    data = tiny_imagefolder(tmp_path / "data", per_split=(24, 2, 2))
    cfg = TrainConfig(**{**TINY, "epochs": 1, "batch_size": 16}, data=str(data))
    metrics = train(cfg, tmp_path / "run", progress=False, log=_quiet)
    assert metrics["num_images"]["train"] == 72 and len(metrics["history"]) == 1
    assert load_checkpoint(tmp_path / "run" / "last.pt").step == 5  # ceil(72 / 16) steps


def test_small_irma_set_trains(tmp_path: Path) -> None:
    from test_data_split import make_small_irma

    root = make_small_irma(tmp_path / "clef")
    lines: list[str] = []
    cfg = TrainConfig(**{**TINY, "epochs": 1, "batch_size": 16}, data=str(root))
    metrics = train(cfg, tmp_path / "run", progress=False, log=lines.append)
    assert metrics["num_images"] == {"train": 65, "val": 7, "test": None} and metrics["test_split"] == "val"
    assert sum(map(sum, metrics["confusion"])) == 7


def test_divergence_stops_with_one_line_exit_2_and_keeps_the_last_good_snapshot(tmp_path: Path,
                                                                                 tiny_imagefolder) -> None:
    data = tiny_imagefolder(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "--model", "shallow", "--data", str(data), "--input-size", "32", "--epochs", "2",
            "--batch-size", "4", "--threads", "1", "--quiet", "--device", "cpu", "--lr", "1e6",
            "--checkpoint-every", "1", "--out", str(out)]
    r = subprocess.run([sys.executable, "-m", "xraydeconv.cli.main", *args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: training diverged at epoch 1, step ")
    assert "kept resume.pt from before (try a lower --lr)" in lines[0]
    kept = load_checkpoint(out / "resume.pt")  # finite: a snapshot is never written from diverged weights
    assert kept.epoch == 0 and 1 <= kept.step < 6
    assert sorted(p.name for p in out.iterdir()) == ["resume.pt"]


def test_a_run_that_fails_before_writing_leaves_no_out(tmp_path: Path, tiny_imagefolder) -> None:
    data = tiny_imagefolder(tmp_path / "data")
    out = tmp_path / "run"
    with pytest.raises(UserError, match="training diverged at epoch 1.*no snapshot had been written yet"):
        train(TrainConfig(**TINY, data=str(data), lr=1e6), out, progress=False, log=_quiet)
    assert not out.exists()


def test_single_class_warns_that_accuracy_means_nothing(tmp_path: Path, tiny_imagefolder) -> None:
    data = tiny_imagefolder(tmp_path / "data")
    for split in ("train", "val", "test"):
        for c in ("middle", "right"):
            for p in (data / split / c).iterdir():
                p.unlink()
            (data / split / c).rmdir()
    lines: list[str] = []
    train(TrainConfig(**{**TINY, "epochs": 1}, data=str(data)), tmp_path / "run", progress=False, log=lines.append)
    assert f"warning: {data} holds a single class (left): every prediction is right by construction, so accuracy " \
           "means nothing" in lines


def test_second_run_into_a_locked_out_is_refused_and_touches_nothing(tmp_path: Path, tiny_imagefolder) -> None:
    data = tiny_imagefolder(tmp_path / "data")
    out = tmp_path / "run"
    train(TrainConfig(**{**TINY, "epochs": 1}, data=str(data)), out, progress=False, log=_quiet)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with output_lock(out):  # what a run still writing into out holds
        with pytest.raises(UserError, match=f"{out}: another xraydeconv run is writing it now"):
            train(TrainConfig(**{**TINY, "epochs": 2}, data=str(data)), out, resume=True, progress=False, log=_quiet)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_out_inside_or_around_data_is_refused(tmp_path: Path, tiny_imagefolder) -> None:
    data = tiny_imagefolder(tmp_path / "data")
    for out in (data / "run", data, tmp_path):
        r = CliRunner().invoke(cli, ["train", "--quiet", "--model", "shallow", "--data", str(data),
                                     "--out", str(out)])
        assert isinstance(r.exception, UserError) and f"overlaps the input --data {data}" in str(r.exception)
    assert not (data / "run").exists()


def test_two_train_processes_into_one_out_the_second_gets_one_error(tmp_path: Path, tiny_imagefolder) -> None:
    data = tiny_imagefolder(tmp_path / "data")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "xraydeconv.cli.main", "train", "--model", "shallow", "--data", str(data),
            "--input-size", "32", "--batch-size", "4", "--threads", "1", "--quiet", "--device", "cpu",
            "--checkpoint-every", "0", "--out", str(out)]
    first = subprocess.Popen([*args, "--epochs", "500"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not out.is_dir() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # out appears once the first run holds the lock and has opened the data
        assert out.is_dir(), first.stderr.read().decode() if first.poll() is not None else "no --out after 120 s"
        second = subprocess.run([*args, "--epochs", "1"], capture_output=True, text=True, timeout=120)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [f"error: {out}: another xraydeconv run is writing it now; "
                                                  "wait for it or choose another output"]
