"""One labelled image of a data set, with where its landmark annotations are."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from xraydeconv.data.landmarks import Box


@dataclass
class Record:
    """An image file, its label (index into the data set's ``class_names``) and its landmarks.

    ``landmarks`` maps a landmark name to its mask file; ``boxes`` holds landmarks given as boxes in a
    ``landmarks.csv``; ``meta`` carries format-specific strings (IRMA code, MURA patient and study).
    """

    path: Path
    label: int
    landmarks: dict[str, Path] = field(default_factory=dict)
    boxes: dict[str, list[Box]] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
