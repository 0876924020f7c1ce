"""One memory-mappable store for the heat maps of an archive, instead of one ``maps.npy`` per film.

Layout (``<out>/maps/``)::

    part-00000.npy   float16 (films, top_n, S, S): the maps of one chunk of films, in the run's order
    part-00001.npy   ...
    index.json       {"format", "version", "dtype", "film_shape", "parts": [file, ...],
                      "films": [{"name", "folder", "part", "row"}, ...]}

Each part is a plain ``.npy`` file, so ``np.load(part, mmap_mode="r")`` maps it without reading it; a film's maps
are row ``row`` of part ``part``. A part is written under a temporary name and renamed when complete, so a part
that exists is whole. The maps are the ones a ``maps.npy`` holds: per-filter heat maps, each scaled to [0, 1]
(the scales are in the manifest, ``map_scale``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from xraydeconv.errors import UserError
from xraydeconv.io import write_json

__all__ = ["STORE_DIR", "INDEX", "PartWriter", "part_name", "write_index", "MapStore", "read_maps"]

STORE_DIR = "maps"
INDEX = "index.json"
FORMAT = "xraydeconv-mapstore"
VERSION = 1


def part_name(chunk: int) -> str:
    """The file of chunk ``chunk`` inside the store folder."""
    return f"part-{chunk:05d}.npy"


class PartWriter:
    """Writes the maps of one chunk of ``films`` films into ``<store>/part-<chunk>.npy``, in place of a temporary
    memory-mapped file that becomes the part on :meth:`close` (atomic rename)."""

    def __init__(self, store: Path, chunk: int, films: int) -> None:
        self.store, self.chunk, self.films = Path(store), chunk, films
        self.store.mkdir(exist_ok=True)
        self.path = self.store / part_name(chunk)
        # one process writes a chunk; a retry after a kill truncates the same temporary file instead of leaving it
        self.tmp = self.store / f".{part_name(chunk)}.tmp"
        self.array: np.memmap | None = None

    def put(self, row: int, maps: np.ndarray) -> dict:
        """Store the (top_n, S, S) float16 ``maps`` of the chunk's film ``row``; the manifest's ``maps`` entry."""
        if self.array is None:
            self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float16,
                                                   shape=(self.films, *maps.shape))
        self.array[row] = maps
        return {"store": f"{STORE_DIR}/{INDEX}", "part": f"{STORE_DIR}/{self.path.name}", "row": row}

    def close(self) -> None:
        """Make the part visible (nothing when no film was stored)."""
        if self.array is not None:
            self.array.flush()
            del self.array
            self.array = None
            os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.array = None
        self.tmp.unlink(missing_ok=True)


def write_index(store: Path, rows: list[dict]) -> Path:
    """``index.json`` over the films of ``rows`` (gallery rows, in order) whose manifests point into the store."""
    films, parts, shape = [], [], None
    for row in rows:
        entry = row["manifest"].get("maps") or {}
        if "part" not in entry:
            continue
        name = entry["part"].split("/", 1)[1]
        if not parts or parts[-1] != name:
            parts.append(name)
        shape = entry["shape"]
        films.append({"name": row["manifest"].get("input_name"), "folder": row["folder"], "part": len(parts) - 1,
                      "row": entry["row"]})
    return write_json({"format": FORMAT, "version": VERSION, "dtype": "float16", "film_shape": shape,
                       "parts": parts, "films": films}, Path(store) / INDEX)


class MapStore:
    """Read a map store: ``MapStore(out)`` or ``MapStore(out / "maps")``.

    ``store[k]`` is film ``k``'s (top_n, S, S) float16 maps, memory-mapped (read-only); ``store.find(name)`` the
    position of a film by its input name or folder name.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        root = Path(root)
        self.root = root / STORE_DIR if (root / STORE_DIR / INDEX).is_file() else root
        index = self.root / INDEX
        try:
            self.index = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{index}: not a readable map store index: {exc}") from None
        if self.index.get("format") != FORMAT:
            raise UserError(f"{index}: not a map store index (format {self.index.get('format')!r})")
        self.films: list[dict] = self.index["films"]
        self._parts: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.films)

    def part(self, k: int) -> np.ndarray:
        """Part ``k``: (films, top_n, S, S) float16, memory-mapped."""
        if k not in self._parts:
            self._parts[k] = np.load(self.root / self.index["parts"][k], mmap_mode="r")
        return self._parts[k]

    def __getitem__(self, k: int) -> np.ndarray:
        f = self.films[k]
        return self.part(f["part"])[f["row"]]

    def find(self, name: str) -> int:
        """The position of the film with input name or folder ``name``; UserError when the store has none."""
        for k, f in enumerate(self.films):
            if name in (f["name"], f["folder"]):
                return k
        raise UserError(f"{name}: no such film in the map store {self.root}")


def read_maps(out: str | os.PathLike, film: str | int) -> np.ndarray:
    """The (top_n, S, S) float16 maps of one film of a ``project`` output, whichever way they were kept.

    ``film`` is its position in the gallery, its input name (``hand/0.png``) or its folder name. Reads the map
    store when the output has one, else the film's ``maps.npy``; UserError when the film or its maps are absent.
    """
    out = Path(out)
    if (out / STORE_DIR / INDEX).is_file():
        store = MapStore(out)
        return np.asarray(store[film if isinstance(film, int) else store.find(film)])
    try:
        rows = json.loads((out / "gallery.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{out}: not a project output (gallery.json: {exc})") from None
    if isinstance(film, int):
        row = rows[film]
    else:
        row = next((r for r in rows if film in (r["folder"], r["manifest"].get("input_name"))), None)
        if row is None:
            raise UserError(f"{film}: no such film in {out}")
    if row["folder"] is None or not (out / row["folder"] / "maps.npy").is_file():
        raise UserError(f"{film}: {out} kept no maps of it (--maps none)")
    return np.load(out / row["folder"] / "maps.npy")
