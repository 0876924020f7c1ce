"""``xraydeconv data phantoms`` and ``xraydeconv data contact-sheet`` from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from xraydeconv.cli.main import cli


def _xraydeconv(*args: str) -> subprocess.CompletedProcess:
    """Run the real console entry point, so exit codes and the one-line error are what users see."""
    return subprocess.run([sys.executable, "-c", "from xraydeconv.cli.main import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "phantoms"
    result = CliRunner().invoke(cli, ["data", "phantoms", "--out", str(out), "--per-class", "2", "--size", "48",
                                      "--workers", "1", "--seed", "3", "--bias", "marker"])
    assert result.exit_code == 0, result.output
    assert "wrote 144 films of 24 classes" in result.output
    return out


def test_phantoms_command_writes_the_tree(tree):
    meta = json.loads((tree / "dataset.json").read_text())
    assert meta["size"] == 48 and meta["seed"] == 3 and meta["bias"] == "marker"
    assert meta["per_class"] == {"train": 2, "val": 2, "test": 2}
    assert len(list(tree.glob("*/*/*.png"))) == 24 * 6


def test_help_reads_like_a_manual():
    result = CliRunner().invoke(cli, ["data", "phantoms", "--help"])
    assert result.exit_code == 0
    for word in ("OUTPUT", "BIAS", "EXAMPLES", "--per-class", "--bias", "--force", "landmarks"):
        assert word in result.output
    result = CliRunner().invoke(cli, ["data", "contact-sheet", "--help"])
    assert result.exit_code == 0 and "--per-class" in result.output


@pytest.mark.parametrize("args", [
    ["--size", "8"], ["--size", "banana"], ["--per-class", "-3"], ["--test-per-class", "-1"],
    ["--bias", "ruler"], ["--splits", "train,holdout"],
])
def test_phantoms_bad_arguments_exit_2_without_traceback(tmp_path, args):
    result = _xraydeconv("data", "phantoms", "--out", str(tmp_path / "x"), *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_phantoms_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    result = _xraydeconv("data", "phantoms", "--out", str(tmp_path), "--per-class", "1", "--size", "32")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "not empty" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_contact_sheet_of_a_phantom_tree(tree, tmp_path):
    out = tmp_path / "sheet.png"
    result = CliRunner().invoke(cli, ["data", "contact-sheet", "--data", str(tree), "--out", str(out),
                                      "--per-class", "2", "--tile", "48", "--columns", "6"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        sheet = np.asarray(im.convert("RGB"))
    assert sheet.shape[1] > 6 * 2 * 48 and sheet.shape[0] > 4 * 48
    # landmark outlines are drawn in colour over the grayscale films
    assert (np.ptp(sheet.astype(int), axis=2) > 60).sum() > 500
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]


def test_contact_sheet_of_a_plain_image_folder(tmp_path):
    for name in ("cats", "dogs"):
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        Image.fromarray(np.full((40, 60), 120, np.uint8)).save(folder / "a.png")
    mask_dir = tmp_path / "data" / "dogs" / "a.landmarks"
    mask_dir.mkdir()
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(mask_dir / "nose.png")
    out = tmp_path / "sheet.png"
    result = CliRunner().invoke(cli, ["data", "contact-sheet", "--data", str(tmp_path / "data"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert np.ptp(np.asarray(im.convert("RGB")).astype(int), axis=2).max() > 60


def test_contact_sheet_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _xraydeconv("data", "contact-sheet", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "s.png"))
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert "no class folders" in result.stderr
    result = _xraydeconv("data", "contact-sheet", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "s.png"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "s.png").exists()
