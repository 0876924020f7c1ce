"""Landmark masks: ``<stem>.landmarks/<name>.png`` files beside an image and ``landmarks.csv`` boxes.

A mask file is any image of exactly the image's size; non-zero pixels are inside the landmark.
A box file ``landmarks.csv`` (header ``image,landmark,x0,y0,x1,y1``) lies in a split folder or the
data set root; ``image`` is the image's path relative to that folder (or its bare file name when
that is unambiguous) and the box covers pixels ``x0 <= x < x1``, ``y0 <= y < y1`` in the original
image's coordinates (as displayed). Rows naming an existing image of another split are skipped,
so one file at the root can serve every split. Both kinds are letterboxed exactly like the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from xraydeconv.data.csvfile import read_rows
from xraydeconv.errors import UserError

MASK_FOLDER_SUFFIX = ".landmarks"
BOX_FILE = "landmarks.csv"
BOX_HEADER = ("image", "landmark", "x0", "y0", "x1", "y1")


@dataclass(frozen=True)
class Box:
    """A landmark box in original pixel coordinates (half-open), remembered with where it was read."""

    x0: float
    y0: float
    x1: float
    y1: float
    source: str  # "file:line", for errors found once the image size is known


def mask_files(image: Path) -> dict[str, Path]:
    """Landmark name -> mask file, from the ``<stem>.landmarks/`` folder beside ``image`` (empty if none)."""
    folder = image.with_name(image.stem + MASK_FOLDER_SUFFIX)
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() == ".png" and not p.name.startswith(".")}


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Read one mask file as bool (H, W); it must have the image's (height, width)."""
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img.convert("L") if img.mode not in ("1", "L", "I;16", "I") else img)
    except FileNotFoundError:
        raise UserError(f"{path}: no such mask file") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable mask image ({exc.__class__.__name__})") from None
    if arr.shape != tuple(size):
        raise UserError(f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} pixels but its image is {size[1]}x{size[0]}")
    return arr > 0


def box_mask(box: Box, size: tuple[int, int]) -> np.ndarray:
    """Rasterise a box onto a bool (H, W) grid, checking it lies inside the image."""
    h, w = size
    if box.x1 > w or box.y1 > h:
        raise UserError(f"{box.source}: box ({box.x0}, {box.y0}, {box.x1}, {box.y1}) exceeds the {w}x{h} image")
    out = np.zeros((h, w), dtype=bool)
    out[math.floor(box.y0) : math.ceil(box.y1), math.floor(box.x0) : math.ceil(box.x1)] = True
    return out


def read_boxes(csv_path: Path, images: list[Path]) -> dict[Path, dict[str, list[Box]]]:
    """Parse a ``landmarks.csv`` beside ``images`` into image -> landmark -> boxes.

    Raises ``UserError`` naming the file and line for a bad header, bad numbers, an empty box,
    or an image that is not part of the data set.
    """
    base = csv_path.parent
    by_rel = {p.relative_to(base).as_posix(): p for p in images if p.is_relative_to(base)}
    by_name: dict[str, list[Path]] = {}
    for p in by_rel.values():
        by_name.setdefault(p.name, []).append(p)
    out: dict[Path, dict[str, list[Box]]] = {}
    lines = read_rows(csv_path, what="landmark box file")
    first = next(lines, None)
    if first is None or tuple(c.strip().lower() for c in first[1]) != BOX_HEADER:
        raise UserError(f"{csv_path}:1: header must be {','.join(BOX_HEADER)}")
    for line, row in lines:
        where = f"{csv_path}:{line}"
        if len(row) != len(BOX_HEADER):
            raise UserError(f"{where}: expected {len(BOX_HEADER)} fields, got {len(row)}")
        image, name = row[0].strip(), row[1].strip()
        if not name:
            raise UserError(f"{where}: empty landmark name")
        try:
            x0, y0, x1, y1 = (float(c) for c in row[2:])
        except ValueError:
            raise UserError(f"{where}: coordinates must be numbers, got {','.join(row[2:])}") from None
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or min(x0, y0) < 0 or x1 <= x0 or y1 <= y0:
            raise UserError(f"{where}: need 0 <= x0 < x1 and 0 <= y0 < y1, got {x0},{y0},{x1},{y1}")
        target = by_rel.get(image.replace("\\", "/"))
        if target is None:
            named = by_name.get(image, [])
            if len(named) > 1:
                raise UserError(f"{where}: image name {image} is ambiguous, give its path relative to {base}")
            if not named:
                if (base / image).is_file():
                    continue  # an image of another split, for a file kept at the root
                raise UserError(f"{where}: image {image} is not in the data set below {base}")
            target = named[0]
        out.setdefault(target, {}).setdefault(name, []).append(Box(x0, y0, x1, y1, where))
    return out
