"""The 24 anatomy classes, in label order, shared by the IRMA grouping and the synthetic phantoms; renames of
a data set's class names (``--class-map`` of ``project`` and ``evaluate``)."""

from __future__ import annotations

import os
from pathlib import Path

from xraydeconv.data.csvfile import read_rows
from xraydeconv.errors import UserError

CLASS_NAMES: tuple[str, ...] = (
    "whole-body",
    "facial-cranium",
    "skull",
    "cervical-spine",
    "thoracic-spine",
    "lumbar-spine",
    "sacrum-coccyx",
    "hand",
    "wrist",
    "forearm",
    "elbow",
    "upper-arm",
    "shoulder",
    "chest-bones",
    "chest",
    "breast",
    "abdomen",
    "pelvis",
    "foot",
    "ankle",
    "lower-leg",
    "knee",
    "upper-leg",
    "hip",
)


def read_class_renames(path: str | os.PathLike) -> dict[str, str]:
    """``data class -> checkpoint class`` from a CSV of ``data class,checkpoint class`` rows; classes not
    listed keep their names."""
    renames: dict[str, str] = {}
    for line, fields in read_rows(Path(path), what="class map"):
        if len(fields) != 2 or not all(f.strip() for f in fields):
            raise UserError(f"{path}:{line}: expected 'data class,checkpoint class', got {','.join(fields)!r}")
        renames[fields[0].strip()] = fields[1].strip()
    return renames
