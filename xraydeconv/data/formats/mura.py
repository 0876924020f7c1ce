"""MURA (musculoskeletal radiographs): ``{train,valid}/XR_<PART>/patient*/study*/image*.png``.

The classes are MURA's seven body parts, named like ours where we have the part
(``XR_HUMERUS`` -> ``upper-arm``). ``XR_FINGER`` stays its own class ``finger``: MURA separates
finger views from hand views and merging them would make the task easier than the data says.
``valid/`` is the test split (MURA's test set is not public); val is carved out of ``train/`` by
patient, so no patient has images on both sides. Each record's ``meta`` keeps the patient, the
study and MURA's abnormality label (``positive``/``negative`` from the study folder name).
"""

from __future__ import annotations

import os
from pathlib import Path

from xraydeconv.data.landmarks import mask_files
from xraydeconv.data.record import Record
from xraydeconv.data.report import LoadReport
from xraydeconv.data.split import carve, describe_carving
from xraydeconv.errors import UserError

PARTS: dict[str, str] = {
    "XR_ELBOW": "elbow",
    "XR_FINGER": "finger",
    "XR_FOREARM": "forearm",
    "XR_HAND": "hand",
    "XR_HUMERUS": "upper-arm",
    "XR_SHOULDER": "shoulder",
    "XR_WRIST": "wrist",
}
SPLIT_FOLDER = {"train": "train", "val": "train", "test": "valid"}
RELEASE_FOLDER = "MURA-v1.1"


def _part_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.upper().startswith("XR_"))


def locate(root: Path) -> Path | None:
    """The MURA root (the folder holding train/ and valid/) at or just below ``root``, else None."""
    for cand in (root, root / RELEASE_FOLDER):
        if _part_dirs(cand / "train") or _part_dirs(cand / "valid"):
            return cand
    return None


def class_names_for(root: Path) -> list[str]:
    """MURA's seven parts, plus any other ``XR_*`` folder found (lower-cased), in a fixed order."""
    extra = sorted({p.name.upper() for s in ("train", "valid") for p in _part_dirs(root / s)} - set(PARTS))
    return list(PARTS.values()) + [e[3:].lower() for e in extra]


def read_mura(
    root: Path, split: str, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Record], list[str], LoadReport]:
    """Records of one split, class names and the report (``root`` as returned by :func:`locate`)."""
    class_names = class_names_for(root)
    label_of = {part: i for i, part in enumerate(PARTS)}
    for i, name in enumerate(class_names[len(PARTS) :], start=len(PARTS)):
        label_of["XR_" + name.upper()] = i
    folder = root / SPLIT_FOLDER[split]
    if not folder.is_dir():
        raise UserError(f"{folder}: missing; MURA's {split} split is read from it")
    records: list[Record] = []
    for pdir in _part_dirs(folder):
        label = label_of[pdir.name.upper()]
        for dirpath, dirnames, filenames in os.walk(pdir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                # MURA archives carry macOS "._image1.png" resource forks: skip hidden files
                if name.startswith(".") or not name.lower().endswith((".png", ".jpg", ".jpeg")):
                    continue
                path = Path(dirpath) / name
                rel = path.relative_to(pdir).parts
                study = rel[1] if len(rel) > 2 else ""
                meta = {
                    "patient": rel[0] if len(rel) > 1 else "",
                    "study": study,
                    "abnormal": study.rsplit("_", 1)[-1] if "_" in study else "",
                }
                records.append(Record(path, label, mask_files(path), meta=meta))
    if not records:
        raise UserError(f"{folder}: no images below its XR_<PART> folders")
    report = LoadReport("mura", root, split)
    if split != "test":
        labels = [r.label for r in records]
        assignment = carve(labels, {"val": val_fraction}, seed, groups=[r.meta["patient"] for r in records])
        records = [r for r, s in zip(records, assignment) if s == split]
        report.carved = describe_carving(labels, assignment, len(class_names)) + " (whole patients)"
    return records, class_names, report
