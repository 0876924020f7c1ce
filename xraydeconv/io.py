"""Writing outputs safely: atomic files, folders built beside their target, and the output-folder check.

Everything the package writes goes through here, so that a reader never sees a half-written file, a failed run
leaves the previous output untouched, and an output never replaces something that is not a regular file.
"""

from __future__ import annotations

import fcntl
import glob
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from xraydeconv.errors import UserError

__all__ = ["write_atomically", "atomic_write_bytes", "write_json", "strict_json", "building_folder",
           "check_output_folder", "check_output_file", "move_into_place", "output_lock", "remove_stale_builds"]


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` as a Path when it may be written as a regular file: absent, or a regular file.

    Raises UserError for a folder, a device, a FIFO or a socket, and when its folder does not exist.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise UserError(f"{path}: is {kind}; the {what} is written only to a regular file or a new path")
    if not path.absolute().parent.is_dir():
        raise UserError(f"{path.absolute().parent}: no such folder for the {what}")
    return path


def write_atomically(
    path: str | os.PathLike,
    write: Callable[[IO], object],
    mode: str = "wb",
    encoding: str | None = None,
    durable: bool = False,
) -> Path:
    """Call ``write`` on a temp file in ``path``'s folder, then ``os.replace`` it onto ``path``.

    A reader never sees a half-written file; on any error the temp file is removed and ``path`` is untouched.
    With ``durable=True`` the file and the rename are fsynced (checkpoints: a crash must not bring back the old
    file). The temp file gets the permissions a plain ``open`` would give (mkstemp makes it private).
    """
    path = _link_target(check_output_file(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"{path}: cannot write here: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"{path}: could not be written: {exc.strerror or exc}") from None
        raise
    if durable:
        _fsync_folder(path.parent)
    return path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _link_target(path: Path) -> Path:
    """Where a write to ``path`` lands: a symlink is followed, so the link stays and its target is replaced."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` durably (fsync, rename, fsync of the folder), creating the folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda f: f.write(data), durable=True)


def strict_json(obj: object) -> object:
    """``obj`` with every NaN or infinite float (numpy's too) replaced by None, so that it is valid JSON (``null``);
    numpy floats become Python floats."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(obj: object, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented, strict JSON atomically: NaN and infinities become ``null``."""

    def dump(f: IO[str]) -> None:
        json.dump(strict_json(obj), f, indent=1, allow_nan=False)
        f.write("\n")

    return write_atomically(path, dump, mode="w", encoding="utf-8")


def check_output_folder(
    out: str | os.PathLike,
    overwrite: bool,
    flag: str = "--out",
    inputs: Iterable[tuple[str, str | os.PathLike]] = (),
) -> Path:
    """``out`` as a Path when a command may build its output there; UserError otherwise.

    It must be absent or a folder, empty unless ``overwrite``, and its parent must exist. ``inputs`` are the
    command's inputs as ``(flag, path)``: ``out`` may not be, contain, or lie inside any of them, since
    replacing ``out`` would delete or rewrite that input.
    """
    out = Path(out)
    for name, path in inputs:
        if _overlaps(out, Path(path)):
            raise UserError(f"{flag} {out}: overlaps the input {name} {path}; choose an output folder apart from it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: exists and is not empty (use --overwrite to replace it)")
    if not out.absolute().parent.exists():
        raise UserError(f"{out.absolute().parent}: no such folder for {flag}")
    return out


def _overlaps(out: Path, given: Path) -> bool:
    a, b = out.resolve(), given.resolve()
    return a == b or a in b.parents or b in a.parents


@contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the output ``out`` for the block; UserError at once if another run holds it.

    The lock is ``flock`` on a hidden file beside ``out`` (``.<name>.lock``), released by the kernel when the
    process ends however it ends, so a killed run never leaves a stale lock. The lock file itself stays.
    """
    out = Path(out)
    lock = out.absolute().parent / f".{out.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise UserError(f"{out}: cannot lock it: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{out}: another xraydeconv run is writing it now; wait for it or choose another "
                            "output") from None
        yield out
    finally:
        os.close(fd)


def remove_stale_builds(out: Path) -> None:
    """Remove the temporary siblings (``.<name>.tmp-*``, ``.<name>.old-*``) left by runs that were killed.

    Call it only while holding :func:`output_lock` on ``out``: then no live run is building them.
    """
    parent, name = out.absolute().parent, glob.escape(out.name)
    for kind in ("tmp", "old"):
        for stale in parent.glob(f".{name}.{kind}-*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


@contextmanager
def building_folder(out: Path, overwrite: bool = True) -> Iterator[Path]:
    """A new temporary folder beside ``out`` to build the output in; it becomes ``out`` when the block succeeds.

    The block runs under :func:`output_lock`, so two runs never build the same output unknowingly, and builds
    left by killed runs are removed first. An existing ``out`` is replaced only once everything is written
    (with ``overwrite=False`` it must be empty: the caller checks that before the work starts). On any error,
    Ctrl-C or SIGTERM included, the temporary folder is removed and ``out`` is left untouched.
    """
    with output_lock(out):
        remove_stale_builds(out)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.absolute().parent))
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the output is meant to be shared
        except OSError as exc:
            raise UserError(f"{out}: cannot create the output beside it: {exc.strerror or exc}") from None
        try:
            yield tmp
            move_into_place(tmp, out, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder ``tmp`` to ``out``. An existing ``out`` is renamed aside first and removed once
    ``tmp`` took its place (``overwrite``); without ``overwrite`` it must be an empty folder."""
    old = None
    if out.exists():
        if overwrite:
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
