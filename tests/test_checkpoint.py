"""Checkpoints: round trip, weights-only loading, RNG states, atomic writes, and one-line errors for bad files."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from xraydeconv.errors import UserError
from xraydeconv.training import checkpoint as ckpt
from xraydeconv.training.checkpoint import load_checkpoint, read_checkpoint, rng_state, save_checkpoint, set_rng_state
from xraydeconv.training.models import build

CLASSES = [f"class-{i}" for i in range(5)]


def _save(path: Path, name: str = "deeper", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build(name, num_classes=len(CLASSES), input_size=64)
    model(torch.rand(2, 1, 64, 64))  # moves the BatchNorm running stats away from their defaults
    save_checkpoint(path, model, model_name=name, class_names=CLASSES, input_size=64,
                    config={"lr": 0.01, "seed": 3}, epoch=4, step=40, metrics={"val_acc": 0.5}, **kw)
    return model.eval()


@pytest.mark.parametrize("name", ["shallow", "deeper-aug"])
def test_round_trip_rebuilds_the_same_model(tmp_path: Path, name: str) -> None:
    path = tmp_path / "run" / "best.pt"
    model = _save(path, name)
    c = load_checkpoint(path)
    assert (c.model_name, c.class_names, c.input_size, c.epoch, c.step) == (name, CLASSES, 64, 4, 40)
    assert c.config == {"lr": 0.01, "seed": 3} and c.metrics == {"val_acc": 0.5}
    assert c.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not c.model.training
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(c.model(x), model(x), rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(c.model.state_dict()[k], v), k


def test_file_loads_with_weights_only_and_holds_the_contract_fields(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    opt_state = {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    _save(path, training={"optimizer": opt_state, "rng": rng_state(), "augment": torch.Generator().get_state()})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "xraydeconv-checkpoint" and raw["version"] == 1
    assert raw["model_kwargs"] == {"num_classes": 5, "in_channels": 1, "input_size": 64}
    assert raw["training"]["optimizer"]["param_groups"][0]["lr"] == 0.1
    assert set(raw["training"]["rng"]) >= {"torch", "numpy", "python"}


def test_rng_states_round_trip_through_a_file(tmp_path: Path) -> None:
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = rng_state()
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    path = tmp_path / "c.pt"
    _save(path, training={"rng": state})
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(read_checkpoint(path)[0]["training"]["rng"])
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope.pt: no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")


def test_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("hello, I am text\n")
    with pytest.raises(UserError, match="notes.pt: not a readable torch checkpoint"):
        load_checkpoint(path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    _save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="best.pt: not a readable torch checkpoint") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_torch_file_that_is_not_ours(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(UserError, match="other.pt: not an xraydeconv checkpoint"):
        load_checkpoint(path)
    torch.save(build("shallow").state_dict(), path)  # a bare state_dict is not a checkpoint either
    with pytest.raises(UserError, match="not an xraydeconv checkpoint"):
        load_checkpoint(path)


def test_unknown_model_and_mismatched_weights(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    _save(path)
    raw = torch.load(path, weights_only=True)
    torch.save({**raw, "model_name": "resnet50"}, path)
    with pytest.raises(UserError, match="c.pt: unknown model 'resnet50'"):
        load_checkpoint(path)
    torch.save({**raw, "model_name": "shallow"}, path)
    with pytest.raises(UserError, match="c.pt: weights do not fit model 'shallow'"):
        load_checkpoint(path)
    torch.save({**raw, "version": 7}, path)
    with pytest.raises(UserError, match="version 7"):
        load_checkpoint(path)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    _save(path)
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(UserError, match=f"{path}: could not be written: disk full"):
        _save(path, "shallow")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]


def test_huge_junk_file_is_refused_after_reading_its_first_bytes(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "junk.pt"
    with open(path, "wb") as f:  # 6 GiB, sparse: nothing is written but the first bytes
        f.write(b"\x00junk")
        f.truncate(6 * 2**30)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("the whole file was read"))
    with pytest.raises(UserError, match=r"junk.pt: not a readable torch checkpoint \(not the zip archive") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"class_names": CLASSES[:3]}, "3 class names for a model with 5 outputs"),
        ({"class_names": "class-0"}, "class_names must be a list of names, got str"),
        ({"model_kwargs": {"num_classes": 5, "in_channels": "one", "input_size": 64}}, "model settings"),
        ({"model_kwargs": {"num_classes": 5, "depth": 50}}, "model settings"),
        ({"model_kwargs": [5, 1, 64]}, "model settings"),
        ({"input_size": -64}, "input_size must be a positive integer, got -64"),
        ({"state_dict": "weights"}, "state_dict must map parameter names to tensors"),
    ],
)
def test_hand_edited_checkpoint_is_one_line_error(tmp_path: Path, edit: dict, message: str) -> None:
    path = tmp_path / "edited.pt"
    _save(path)
    raw = torch.load(path, weights_only=True)
    torch.save({**raw, **edit}, path)
    with pytest.raises(UserError, match=f"edited.pt: {message}") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_checkpoint_with_non_finite_weights_is_refused(tmp_path: Path, bad: float) -> None:
    path = tmp_path / "diverged.pt"
    _save(path)
    raw = torch.load(path, weights_only=True)
    name = next(k for k, v in raw["state_dict"].items() if v.is_floating_point())
    raw["state_dict"][name].view(-1)[0] = bad
    torch.save(raw, path)
    with pytest.raises(UserError, match=f"diverged.pt: 1 weight tensors hold NaN or infinity \\(e.g. {name}\\)"):
        load_checkpoint(path)
    assert ckpt.non_finite_weights(raw["state_dict"]) == [name]
