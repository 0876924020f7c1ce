"""Landmark masks: ``<stem>.landmarks/<name>.png`` files beside an image and ``landmarks.csv`` boxes.

A mask file is any image of exactly the image's size; non-zero pixels are inside the landmark.
A box file ``landmarks.csv`` (header ``image,landmark,x0,y0,x1,y1``) lies in a split folder or the
data set root; ``image`` is the image's path relative to that folder (or its bare file name when
that is unambiguous) and the box covers pixels ``x0 <= x < x1``, ``y0 <= y < y1`` in the original
image's coordinates (as displayed). Rows naming an existing image of another split are skipped,
so one file at the root can serve every split. Both kinds are letterboxed exactly like the image.

Landmark sets: a data set may declare several sets of landmarks in ``landmark_sets.json`` at its root,
``{"<set>": {"<class>": ["<landmark>", ...]}}``. The set ``"all"`` is the masks above (every annotated
landmark); any other set's masks are ``<stem>.landmarks/<set>/<name>.png`` (the phantoms declare
``"discriminative"``: per class the landmarks that tell it apart from the classes it resembles). A data set
without the file has the one set ``"all"``, the landmark names it declares or has beside its images.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from xraydeconv.data.csvfile import read_rows
from xraydeconv.data.jsonfile import read_json_object
from xraydeconv.data.preprocess import Letterbox, image_size
from xraydeconv.errors import UserError

if TYPE_CHECKING:
    from xraydeconv.data.dataset import XrayDataset

MASK_FOLDER_SUFFIX = ".landmarks"
BOX_FILE = "landmarks.csv"
BOX_HEADER = ("image", "landmark", "x0", "y0", "x1", "y1")
LANDMARK_SETS_FILE = "landmark_sets.json"
ALL_SET = "all"
_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a set's masks live in a folder of its name


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


# --- landmark sets ---------------------------------------------------------------------------------------------


def _check_names(path: Path, where: str, names: object) -> list[str]:
    if not isinstance(names, list) or not all(isinstance(n, str) and n and "/" not in n and "\\" not in n
                                              for n in names):
        raise UserError(f"{path}: {where} must be a list of landmark names")
    if len(set(names)) != len(names):
        raise UserError(f"{path}: {where} names a landmark twice")
    return list(names)


def read_landmark_sets(root: str | Path | None, landmark_names: Mapping[str, Sequence[str]],
                       ) -> dict[str, dict[str, list[str]]]:
    """Landmark set -> class -> landmark names, from ``root/landmark_sets.json``.

    ``landmark_names`` (class -> names: ``XrayDataset.landmark_names``) gives the classes and the set ``"all"``
    when the file does not declare it; without the file (or without ``root``) the result is just
    ``{"all": landmark_names}``. Classes a set leaves out have no landmarks in it. Raises ``UserError`` naming
    the file for unreadable JSON, a bad set name (letters, digits, ``-``, ``_``), an unknown class or a
    malformed list.
    """
    sets: dict[str, dict[str, list[str]]] = {ALL_SET: {c: list(v) for c, v in landmark_names.items()}}
    path = Path(root) / LANDMARK_SETS_FILE if root is not None else None
    if path is None or not path.is_file():
        return sets
    raw = read_json_object(path, "a JSON object mapping set names to {class: [landmarks]}")
    for name, per_class in raw.items():
        if not _SET_NAME.fullmatch(name):
            raise UserError(f"{path}: set name {name!r}: use letters, digits, '-' and '_' only")
        if not isinstance(per_class, dict):
            raise UserError(f"{path}: set {name!r} must map class names to lists of landmark names")
        unknown = sorted(set(per_class) - set(landmark_names))
        if unknown:
            raise UserError(f"{path}: set {name!r} names class(es) {', '.join(unknown)} not in the data set")
        sets[name] = {c: _check_names(path, f"set {name!r}, class {c!r}", per_class.get(c, []))
                      for c in landmark_names}
    return sets


def set_mask_files(image: Path, landmark_set: str = ALL_SET) -> dict[str, Path]:
    """Landmark name -> mask file of one set beside ``image``: ``<stem>.landmarks/`` for ``"all"``, else
    ``<stem>.landmarks/<set>/`` (empty if none)."""
    if landmark_set == ALL_SET:
        return mask_files(image)
    folder = image.with_name(image.stem + MASK_FOLDER_SUFFIX) / landmark_set
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() == ".png" and not p.name.startswith(".")}


def landmark_set_masks(ds: XrayDataset, i: int, landmark_set: str = ALL_SET,
                       sets: Mapping[str, Mapping[str, Sequence[str]]] | None = None) -> dict[str, np.ndarray]:
    """Landmark name -> bool (S, S) mask of image ``i`` of ``ds`` in one landmark set, letterboxed like the image.

    ``"all"`` is ``ds.landmark_masks(i)`` (mask files and boxes, and the ``marker`` of a biased phantom tree);
    another set reads ``<stem>.landmarks/<set>/*.png`` (boxes belong to ``"all"`` only). ``sets``: the result of
    :func:`read_landmark_sets` for ``ds`` (read from ``ds.root`` when None; pass it to read the file once).
    Raises ``UserError`` for a set the data set does not declare, a mask of a landmark the set does not list
    for the image's class (naming the file), or a mask of the wrong size.
    """
    if landmark_set == ALL_SET:
        return ds.landmark_masks(i)
    sets = read_landmark_sets(ds.root, ds.landmark_names) if sets is None else sets
    if landmark_set not in sets:
        where = ds.root / LANDMARK_SETS_FILE if ds.root is not None else LANDMARK_SETS_FILE
        raise UserError(f"landmark set {landmark_set!r}: not declared in {where} (sets: {', '.join(sets)})")
    rec = ds.records[i]
    cls = ds.class_names[rec.label]
    known = set(sets[landmark_set].get(cls, ()))
    files = set_mask_files(rec.path, landmark_set)
    for name, path in files.items():
        if name not in known:
            raise UserError(f"{path}: landmark {name!r} is not in set {landmark_set!r} for class {cls} "
                            f"(declared: {', '.join(sorted(known)) or 'none'})")
    if not files:
        return {}
    size = image_size(rec.path)
    geometry = Letterbox.fit(*size, ds.input_size)
    return {name: geometry.apply_mask(read_mask(path, size)) for name, path in files.items()}
