"""xraydeconv.io and xraydeconv.device: atomic writes, output checks, locks, and the device resolver."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xraydeconv import io
from xraydeconv.device import resolve_device
from xraydeconv.errors import UserError


def test_write_atomically_writes_and_follows_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    old = os.umask(0o022)
    try:
        io.write_json({"x": [1, 2]}, target)
    finally:
        os.umask(old)
    assert json.loads(target.read_text()) == {"x": [1, 2]}
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left


def test_json_is_strict_nan_and_infinity_become_null(tmp_path: Path) -> None:
    io.write_json({"a": float("nan"), "b": [1.5, float("inf"), {"c": -float("inf")}], "d": (2, "x")}, tmp_path / "j")

    def refuse(name: str) -> None:
        raise ValueError(name)

    assert json.loads((tmp_path / "j").read_text(), parse_constant=refuse) == \
        {"a": None, "b": [1.5, None, {"c": None}], "d": [2, "x"]}


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    def boom(f) -> None:
        f.write("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        io.write_atomically(target, boom, mode="w")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("kind", ["fifo", "folder", "chardev"])
def test_never_replaces_a_device_a_fifo_or_a_folder(tmp_path: Path, kind: str) -> None:
    if kind == "fifo":
        target = tmp_path / "pipe"
        os.mkfifo(target)
    elif kind == "folder":
        target = tmp_path / "dir"
        target.mkdir()
    else:
        target = Path("/dev/null")
    before = target.stat()
    with pytest.raises(UserError, match="not a regular file|is a folder"):
        io.write_atomically(target, lambda f: f.write(b"x"))
    after = target.stat()
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)


def test_a_symlink_is_followed_and_kept(tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    io.write_atomically(link, lambda f: f.write("new"), mode="w")
    assert link.is_symlink() and real.read_text() == "new"


def test_write_into_a_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=str(tmp_path / "nope")):
        io.write_json({}, tmp_path / "nope" / "a.json")


def test_unwritable_folder_is_a_user_error_naming_the_path(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(UserError, match=str(ro / "a.json")):
        io.write_json({}, ro / "a.json")


def test_a_full_disk_is_a_user_error_naming_the_target(tmp_path: Path, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(UserError, match=rf"{tmp_path / 'a.json'}: could not be written: No space left"):
        io.write_json({}, tmp_path / "a.json")
    assert list(tmp_path.iterdir()) == []


def test_check_output_folder_refuses_overlap_with_inputs(tmp_path: Path) -> None:
    run = tmp_path / "run1"
    run.mkdir()
    (run / "best.pt").write_bytes(b"w")
    data = tmp_path / "data"
    data.mkdir()
    cases = [(run, ("--checkpoint", run / "best.pt")),      # out contains the input
             (data, ("--data", data)),                        # out is the input
             (data / "report", ("--data", data))]             # out lies inside the input
    for out, given in cases:
        with pytest.raises(UserError, match="overlaps the input"):
            io.check_output_folder(out, overwrite=True, inputs=[given])
    assert io.check_output_folder(tmp_path / "elsewhere", overwrite=False, inputs=[("--data", data)]) == \
        tmp_path / "elsewhere"


def test_check_output_folder_rules(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        io.check_output_folder(tmp_path / "file", overwrite=True)
    full = tmp_path / "full"
    full.mkdir()
    (full / "a").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        io.check_output_folder(full, overwrite=False)
    assert io.check_output_folder(full, overwrite=True) == full
    with pytest.raises(UserError, match="no such folder"):
        io.check_output_folder(tmp_path / "a" / "b", overwrite=False)


def test_building_folder_replaces_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), io.building_folder(out) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("fails halfway")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    with io.building_folder(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_a_built_folder_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with io.building_folder(tmp_path / "out") as tmp:
            io.write_json({}, tmp / "manifest.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "manifest.json").stat().st_mode) == 0o644


def test_building_folder_removes_builds_left_by_killed_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-abc123"
    stale.mkdir()
    (stale / "maps.npy").write_bytes(b"0" * 100)
    (tmp_path / ".out.old-999").mkdir()
    other = tmp_path / ".other.tmp-1"  # another output's build is not ours to remove
    other.mkdir()
    with io.building_folder(out) as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", ".out.lock", "out"]


_HOLD = """
import sys, time
from pathlib import Path
from xraydeconv import io
with io.building_folder(Path(sys.argv[1])) as tmp:
    print("holding", flush=True)
    time.sleep(30)
"""


def test_a_second_writer_is_refused_while_the_first_holds_the_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding"
        with pytest.raises(UserError, match="another xraydeconv run is writing it"), io.building_folder(out):
            pass
    finally:
        first.kill()
        first.wait()
    # the kernel dropped the killed run's lock; its half-built folder is removed by the next run
    assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())
    with io.building_folder(out) as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_sigterm_cleans_up_like_ctrl_c(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = "from xraydeconv.cli.main import _terminate; import signal; signal.signal(signal.SIGTERM, _terminate)\n"
    proc = subprocess.Popen([sys.executable, "-c", script + _HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "holding"
    proc.terminate()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 5
    while any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    for bad in ("gpu7", "mps", "meta", "cuda:x", "cpu:0"):  # torch accepts some of these; a run could not
        with pytest.raises(UserError, match="not a device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:1")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xraydeconv.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args", [["project", "--top-n", "x"], ["no-such-command"], ["train", "--bogus"]])
def test_option_errors_are_one_line_and_exit_2(args: list[str]) -> None:
    r = _cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
