"""``xraydeconv train``: outputs of a run, data sharding, --all / Table 1, DDP with torchrun, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from xraydeconv.cli.main import cli
from xraydeconv.errors import UserError
from xraydeconv.training import distributed
from xraydeconv.training.checkpoint import load_checkpoint, read_checkpoint
from xraydeconv.training.loop import TrainConfig, train

TINY = dict(input_size=32, epochs=2, batch_size=4, threads=1, checkpoint_every=0)


pytestmark = pytest.mark.usefixtures("keep_threads")


def _invoke(args: list[str]):
    return CliRunner().invoke(cli, ["train", "--quiet", *args], catch_exceptions=True)


def test_a_run_writes_checkpoints_metrics_and_pictures(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = TrainConfig(model="deeper", data=str(tiny_data), **{**TINY, "epochs": 3})
    metrics = train(cfg, out, progress=False, log=lambda s: None)
    assert {p.name for p in out.iterdir()} == {"last.pt", "best.pt", "metrics.json", "curves.png", "confusion.png"}
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    assert metrics["best_val_acc"] == max(h["val_acc"] for h in metrics["history"])
    assert set(metrics["per_class_acc"]) == {"left", "middle", "right"}
    assert sum(map(sum, metrics["confusion"])) == 9 and metrics["test_split"] == "test"
    seconds = [h["seconds"] for h in metrics["history"]]
    assert metrics["timings"]["train_seconds"] == sum(seconds)
    assert metrics["timings"]["seconds_per_epoch"] == sum(seconds) / 3
    assert metrics["params"] == sum(p.numel() for p in load_checkpoint(out / "best.pt").model.parameters())
    for name in ("last.pt", "best.pt"):
        c = load_checkpoint(out / name)
        assert (c.model_name, c.class_names, c.input_size) == ("deeper", ["left", "middle", "right"], 32)
        assert c.config["epochs"] == 3 and c.config["data"] == str(tiny_data)
    assert load_checkpoint(out / "last.pt").epoch == 3
    assert load_checkpoint(out / "best.pt").epoch == metrics["best_epoch"]
    for png in ("curves.png", "confusion.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_resnet18_trains_and_its_checkpoint_loads(tiny_data: Path, tmp_path: Path) -> None:
    r = _invoke(["--model", "resnet18", "--data", str(tiny_data), "--input-size", "32", "--epochs", "1",
                 "--batch-size", "8", "--threads", "1", "--out", str(tmp_path / "r18")])
    assert r.exit_code == 0, r.output
    c = load_checkpoint(tmp_path / "r18" / "best.pt")
    assert (c.model_name, c.class_names) == ("resnet18", ["left", "middle", "right"])
    assert c.model.fc.out_features == 3 and c.model.conv1.in_channels == 1


def test_same_seed_same_weights_other_seed_other_weights(tiny_data: Path, tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        train(TrainConfig(model="deeper-aug", data=str(tiny_data), seed=seed, **{**TINY, "epochs": 1}), tmp_path / name,
              progress=False, log=lambda s: None)
        runs[name] = read_checkpoint(tmp_path / name / "last.pt")[0]["state_dict"]
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


@pytest.mark.parametrize("n, world, batch", [(24, 1, 4), (25, 2, 4), (7, 3, 6), (10, 4, 8)])
def test_shards_cover_each_epoch_once_and_depend_only_on_seed_and_epoch(n: int, world: int, batch: int) -> None:
    infos = [distributed.DistInfo(r, world, r) for r in range(world)]
    shards = [distributed.epoch_batches(n, batch, seed=5, epoch=2, info=i) for i in infos]
    assert len({len(s) for s in shards}) == 1, "every rank takes the same number of steps"
    assert all(b for s in shards for b in s), "no rank ever gets an empty batch"
    seen = sorted(i for s in shards for b in s for i in b)
    padded = -(-n // world) * world
    assert len(seen) == padded and set(seen) == set(range(n))
    assert shards == [distributed.epoch_batches(n, batch, seed=5, epoch=2, info=i) for i in infos]
    assert shards != [distributed.epoch_batches(n, batch, seed=5, epoch=3, info=i) for i in infos]
    evals = [distributed.eval_shard(n, i) for i in infos]
    assert sorted(sum(evals, [])) == list(range(n))


def test_all_writes_table1(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "all"
    r = _invoke(["--all", "--data", str(tiny_data), "--input-size", "32", "--epochs", "1", "--batch-size", "8",
                 "--threads", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    table = json.loads((out / "table1.json").read_text())
    assert [row["model"] for row in table["rows"]] == ["shallow", "deeper", "deeper-aug"]
    assert [row["poster_acc"] for row in table["rows"]] == [0.711, 0.9036, 0.9562]
    assert [row["augmented"] for row in table["rows"]] == [False, False, True]
    md = (out / "table1.md").read_text()
    assert "| Deeper CNN + data augmentation (`deeper-aug`) |" in md and "95.62 %" in md
    for name in ("shallow", "deeper", "deeper-aug"):
        assert (out / name / "best.pt").is_file() and (out / name / "metrics.json").is_file()
        assert f"{100 * json.loads((out / name / 'metrics.json').read_text())['test_acc']:.2f} %" in md


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "resnet"], "--model 'resnet': unknown"),
        (["--model", "deeper", "--epochs", "0"], "--epochs 0: must be at least 1"),
        (["--model", "deeper", "--data", "/no/such/dir"], "/no/such/dir: data directory does not exist"),
        (["--model", "deeper", "--all"], "give exactly one of them"),
        (["--model", "deeper", "--lr", "-1"], "--lr -1.0: must be a positive number"),
        (["--model", "deeper", "--weight-decay", "nan"], "--weight-decay nan: must be a number >= 0"),
        (["--model", "deeper", "--workers", "-1"], "--workers -1: must be >= 0"),
        (["--model", "deeper", "--threads", "-1"], "--threads -1: must be between 1 and 4 per core"),
        (["--model", "deeper", "--threads", "100000"], "--threads 100000: must be between 1 and 4 per core"),
        (["--model", "deeper", "--max-pixels", "0"], "--max-pixels 0: must be a positive number of pixels"),
    ],
)
def test_bad_input_is_a_one_line_user_error_and_writes_nothing(tmp_path: Path, args, message) -> None:
    out = tmp_path / "out"
    r = _invoke([*args, "--out", str(out)])
    assert isinstance(r.exception, UserError), r.output
    assert message in str(r.exception) and "\n" not in str(r.exception)
    assert not out.exists()


def test_resume_refuses_another_model_classes_or_options(tmp_path: Path, tiny_imagefolder) -> None:
    out = tmp_path / "run"
    data = tiny_imagefolder(tmp_path / "data")  # its own copy: renamed below
    train(TrainConfig(model="shallow", data=str(data), **{**TINY, "epochs": 1}), out, progress=False,
          log=lambda s: None)
    before = (out / "last.pt").read_bytes()
    r = _invoke(["--model", "deeper", "--data", str(data), "--resume", "--out", str(out)])
    assert isinstance(r.exception, UserError) and "trains 'shallow', not 'deeper'" in str(r.exception)
    r = _invoke(["--model", "shallow", "--epochs", "5", "--resume", "--out", str(out)])
    assert isinstance(r.exception, UserError) and "--epochs 5 contradicts it" in str(r.exception)
    r = _invoke(["--model", "shallow", "--per-class", "5", "--resume", "--out", str(out)])
    assert isinstance(r.exception, UserError) and "--per-class 5 contradicts it" in str(r.exception)
    for split in ("train", "val", "test"):  # the data set changed under the run
        (data / split / "middle").rename(data / split / "centre")
    with pytest.raises(UserError, match="trained on other classes"):
        train(TrainConfig(model="shallow", **TINY), out, resume=True, progress=False, log=lambda s: None)
    assert (out / "last.pt").read_bytes() == before
    r = _invoke(["--model", "shallow", "--data", str(data), "--out", str(out)])
    assert isinstance(r.exception, UserError) and "pass --resume" in str(r.exception)


def test_cli_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "xraydeconv.cli.main", "train", "--model", "deeper", "--epochs", "0",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --epochs 0: must be at least 1"]


def test_torchrun_two_processes_match_one_process(tiny_data: Path, tmp_path: Path) -> None:
    """shallow has no BatchNorm and no dropout, so 2 ranks x 2 images average to the same step as 1 x 4."""
    args = ["train", "--model", "shallow", "--data", str(tiny_data), "--input-size", "32", "--epochs", "2",
            "--batch-size", "4", "--threads", "1", "--quiet", "--lr", "0.01", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "xraydeconv.cli.main", *args, "--out", str(tmp_path / "ddp")],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("wrote ") == 1, "only rank 0 reports and writes"
    r1 = _invoke([*args[1:], "--out", str(tmp_path / "one")])
    assert r1.exit_code == 0, r1.output
    ddp, _ = read_checkpoint(tmp_path / "ddp" / "last.pt")
    one, _ = read_checkpoint(tmp_path / "one" / "last.pt")
    assert ddp["training"]["world_size"] == 2 and len(ddp["training"]["ranks"]) == 2
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["world_size"] == 2
    for k in one["state_dict"]:
        torch.testing.assert_close(ddp["state_dict"][k], one["state_dict"][k], rtol=1e-4, atol=1e-5)


def test_the_cli_keeps_freed_memory_unless_told_to_return_it(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    from xraydeconv.training import allocator

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("keep") or "kept")
    common = ["--model", "shallow", "--data", str(tiny_data), "--input-size", "32", "--epochs", "1",
              "--batch-size", "4", "--threads", "1"]
    assert _invoke([*common, "--out", str(tmp_path / "a")]).exit_code == 0 and calls == ["keep"]
    assert _invoke([*common, "--out", str(tmp_path / "b"), "--return-memory"]).exit_code == 0 and calls == ["keep"]
