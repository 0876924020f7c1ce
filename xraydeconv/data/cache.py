"""Decode-once cache of letterboxed uint8 images, in shared memory or in one memory-mapped .npy file.

Both stores are ``MAP_SHARED`` mappings, so images decoded by DataLoader worker processes (forked)
land in the same pages the parent and the other workers read: the second epoch decodes nothing
even with ``num_workers > 0``. At 256x256 an image costs 64 KiB (12,677 ImageCLEF training images:
~800 MiB), and pages are only committed when an image is first stored.

The on-disk store is keyed by a hash of the file list (path, size, mtime), the input size and the
preprocessing version. It is filled in ``<key>.partial.npy`` (with a flag file saying which rows are
valid, so an interrupted run resumes) and renamed to ``<key>.npy`` once every row is filled, so a
file under the final name is always complete; a later run maps it read-only and decodes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from xraydeconv.errors import UserError

log = logging.getLogger("xraydeconv.data")

# bump when decoding/letterboxing changes so that stale disk caches are not reused
PREPROCESS_VERSION = 2  # 2: films scaled by the bit depth they use

# path -> (uint8 (S, S) image, whether the decoder had to note something about it: a rescaled film)
Loader = Callable[[Path], tuple[np.ndarray, bool]]


def cache_key(paths: Sequence[Path], input_size: int) -> str:
    """Hex digest of (preprocessing version, input size, each file's path, byte size and mtime)."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": PREPROCESS_VERSION, "size": input_size, "n": len(paths)}).encode())
    for p in paths:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"\n{os.fspath(p)}\t{stamp}".encode())
    return h.hexdigest()


class DecodedCache:
    """Row ``i`` holds ``load(paths[i])[0]`` (a uint8 (S, S) array), computed on first access only.

    ``cache_dir=None`` keeps the rows in anonymous shared memory (lost at exit); a folder keeps
    them in ``<cache_dir>/<name>-<size>-<hash>.npy``. ``enabled=False`` calls ``load`` every time.
    The flag byte of a row is 1 when it is filled, 2 when ``load`` also noted the image (see :attr:`noted`);
    a complete disk store keeps the flags beside it as ``<...>.flags``.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        input_size: int,
        load: Loader,
        *,
        enabled: bool = True,
        cache_dir: str | Path | None = None,
        name: str = "images",
    ) -> None:
        self.paths = list(paths)
        self.input_size = input_size
        self.load = load
        self.enabled = enabled or cache_dir is not None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.name = name
        self.file: Path | None = None
        self._data: np.ndarray | None = None
        self._filled: np.ndarray | None = None
        self._complete = False
        if self.enabled:
            self._open()

    def __len__(self) -> int:
        return len(self.paths)

    # -- storage -----------------------------------------------------------------------------------
    def _open(self) -> None:
        n, s = len(self.paths), self.input_size
        if self.cache_dir is None:
            # anonymous MAP_SHARED: lazily zero-filled, inherited by forked DataLoader workers
            try:
                buf = mmap.mmap(-1, max(1, n * s * s + n))
            except (OSError, ValueError, OverflowError):
                log.warning(
                    "%s: no room for an in-memory cache of %d images at %dx%d (%.1f GiB); decoding on every "
                    "access instead (a cache_dir keeps them on disk)",
                    self.name, n, s, s, n * s * s / 2**30,
                )  # fmt: skip
                self.enabled = False
                return
            self._data = np.frombuffer(buf, dtype=np.uint8, count=n * s * s).reshape(n, s, s)
            self._filled = np.frombuffer(buf, dtype=np.uint8, count=n, offset=n * s * s)
            return
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{self.cache_dir}: cannot create the cache folder ({exc.strerror})") from None
        stem = f"{self.name}-{s}-{cache_key(self.paths, s)[:20]}"
        self.file = self.cache_dir / f"{stem}.npy"
        self._partial = self.cache_dir / f"{stem}.partial.npy"
        self._flags = self.cache_dir / f"{stem}.partial.flags"
        self._notes = self.cache_dir / f"{stem}.flags"
        if self.file.exists():
            try:
                data = np.load(self.file, mmap_mode="r")
            except (OSError, ValueError):
                data = None
            if data is not None and data.shape == (n, s, s) and data.dtype == np.uint8:
                self._data, self._complete = data, True
                try:
                    self._filled = np.memmap(self._notes, dtype=np.uint8, mode="r")[:n]
                except (OSError, ValueError):
                    self._filled = None  # written before flags were kept: nothing noted is known
                return
        for _ in range(3):
            if self._open_partial(n, s):
                return
            self._create_partial(n, s)
        raise UserError(f"{self._partial}: cannot open the image cache (remove the file to rebuild it)")

    def _open_partial(self, n: int, s: int) -> bool:
        if not (self._partial.exists() and self._flags.exists()):
            return False
        try:
            data = np.load(self._partial, mmap_mode="r+")
            flags = np.memmap(self._flags, dtype=np.uint8, mode="r+")
        except (OSError, ValueError):
            data = flags = None
        if data is None or data.shape != (n, s, s) or data.dtype != np.uint8 or flags.shape[0] < n:
            # damaged: start again (the next attempt creates fresh files)
            for f in (self._partial, self._flags):
                f.unlink(missing_ok=True)
            return False
        self._data, self._filled = data, flags[:n]
        return True

    def _create_partial(self, n: int, s: int) -> None:
        """Create zeroed data + flag files under private names, then link them into place.

        Linking never replaces a file, so a process that already maps the shared store (another rank,
        another run) is never pulled from under; whichever pair lands first is used by everyone.
        """
        tag = f".{os.getpid()}.tmp"
        tmp_data, tmp_flags = Path(f"{self._partial}{tag}"), Path(f"{self._flags}{tag}")
        np.lib.format.open_memmap(tmp_data, mode="w+", dtype=np.uint8, shape=(n, s, s)).flush()
        np.memmap(tmp_flags, dtype=np.uint8, mode="w+", shape=(max(n, 1),)).flush()
        for tmp, final in ((tmp_flags, self._flags), (tmp_data, self._partial)):
            try:
                os.link(tmp, final)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                if not final.exists():
                    os.replace(tmp, final)
            tmp.unlink(missing_ok=True)

    def _finish(self) -> None:
        """Every row of the disk store is filled: publish it under its final name."""
        assert self.file is not None and isinstance(self._data, np.memmap)
        self._data.flush()
        try:
            os.replace(self._partial, self.file)
            os.replace(self._flags, self._notes)
        except FileNotFoundError:
            pass  # another process sharing this store published it first
        self._complete = True

    # -- access ------------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> np.ndarray:
        if not self.enabled:
            return self.load(self.paths[i])[0]
        assert self._data is not None
        if self._complete or self._filled[i]:
            return np.array(self._data[i])
        arr, noted = self.load(self.paths[i])
        self._data[i] = arr
        self._filled[i] = 2 if noted else 1  # written after the row, so a reader never sees a flagged half row
        if self.file is not None and self._filled.all():
            self._finish()
        return arr

    def missing(self) -> list[int]:
        """Rows not decoded yet (all rows when caching is off)."""
        if not self.enabled:
            return list(range(len(self)))
        if self._complete:
            return []
        return np.flatnonzero(self._filled == 0).tolist()

    @property
    def noted(self) -> int:
        """How many decoded rows ``load`` noted (rescaled films); 0 without a cache."""
        if not self.enabled or self._filled is None:
            return 0
        return int(np.count_nonzero(np.asarray(self._filled) == 2))

    @property
    def filled(self) -> int:
        """How many rows are already decoded."""
        if not self.enabled:
            return 0
        return len(self) if self._complete else int(np.count_nonzero(self._filled))

    # -- pickling (spawned DataLoader workers) ------------------------------------------------------
    def __getstate__(self) -> dict:
        # An anonymous mapping cannot cross a spawn; the disk store is simply reopened.
        state = self.__dict__.copy()
        state.update(_data=None, _filled=None, _complete=False)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.enabled:
            self._open()
