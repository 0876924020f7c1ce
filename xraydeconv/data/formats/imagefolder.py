"""One folder per class (PNG, JPEG or DICOM files), with optional split folders and landmark masks.

Layouts: ``root/<split>/<class>/...`` when any of ``train``, ``val`` (or ``valid``), ``test`` exists
(a split without its folder is carved out of ``train``), else ``root/<class>/...`` with all three
splits carved. Files are found at any depth below a class folder. The synthetic phantom tree
(``dataset.json`` + ``<split>/<class>/<id>.png`` + ``<id>.landmarks/<name>.png``) is read by this
reader like any other ImageFolder data set.

Class order: ``dataset.json["classes"]`` when present, else ``CLASS_NAMES`` order when every folder
is one of the 24 classes, else sorted folder names.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from xraydeconv.data.classes import CLASS_NAMES
from xraydeconv.data.jsonfile import read_json_object
from xraydeconv.data.landmarks import BOX_FILE, MASK_FOLDER_SUFFIX, mask_files, read_boxes
from xraydeconv.data.preprocess import SUFFIXES, is_dicom
from xraydeconv.data.record import Record
from xraydeconv.data.report import LoadReport
from xraydeconv.data.split import carve, describe_carving
from xraydeconv.errors import UserError

META_FILE = "dataset.json"
PHANTOM_FORMAT = "xraydeconv-phantoms"
SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "val": ("val", "valid", "validation"),
    "test": ("test",),
}


def read_meta(root: Path) -> dict:
    """``root/dataset.json`` as a dict (empty when absent); errors name the file."""
    path = root / META_FILE
    if not path.is_file():
        return {}
    meta = read_json_object(path)
    classes = meta.get("classes")
    if classes is not None and (
        not isinstance(classes, list)
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise UserError(f'{path}: "classes" must be a list of distinct non-empty names')
    marks = meta.get("landmarks")
    if marks is not None and (
        not isinstance(marks, dict)
        or not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in marks.values())
    ):
        raise UserError(f'{path}: "landmarks" must map class names to lists of landmark names')
    return meta


def _subdirs(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(MASK_FOLDER_SUFFIX)
    )


def _images_below(folder: Path, skipped: Counter[str]) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not d.endswith(MASK_FOLDER_SUFFIX))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            if f.lower().endswith(SUFFIXES):
                found.append(Path(dirpath) / f)
            else:
                skipped[Path(f).suffix.lower() or f] += 1
    return found


def split_folders(root: Path) -> dict[str, Path]:
    """Split name -> folder for the split folders present in ``root``."""
    out: dict[str, Path] = {}
    for split, names in SPLIT_FOLDERS.items():
        for name in names:
            if (root / name).is_dir():
                out[split] = root / name
                break
    return out


def class_order(root: Path, folders: list[str], meta: dict) -> list[str]:
    if meta.get("classes"):
        names = list(meta["classes"])
        unknown = sorted(set(folders) - set(names))
        if unknown:
            raise UserError(f'{root / META_FILE}: class folder(s) {", ".join(unknown)} not listed in "classes"')
        return names
    if set(folders) <= set(CLASS_NAMES):
        return [c for c in CLASS_NAMES if c in folders]
    return sorted(folders)


def _landmark_names(meta: dict, class_names: list[str], records: list[Record]) -> dict[str, list[str]]:
    """Landmark names per class: from ``dataset.json`` when it lists them, else those found beside the images."""
    if isinstance(meta.get("landmarks"), dict):
        return {c: list(meta["landmarks"].get(c, [])) for c in class_names}
    found: dict[str, set[str]] = {c: set() for c in class_names}
    for r in records:
        found[class_names[r.label]].update(r.landmarks, r.boxes)
    return {c: sorted(v) for c, v in found.items()}


def read_imagefolder(
    root: Path,
    split: str,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[list[Record], list[str], dict[str, list[str]], LoadReport]:
    """Records of one split, class names, landmark names per class and the report."""
    meta = read_meta(root)
    present = split_folders(root)
    if present and "train" not in present and split not in present:
        raise UserError(f"{root}: has split folders ({', '.join(p.name for p in present.values())}) but no {split}/")
    bases = list(present.values()) if present else [root]
    folder_names = sorted({d.name for b in bases for d in _subdirs(b)})
    if not folder_names:
        raise UserError(f"{root}: no class folders (expected {'<split>/' if present else ''}<class>/<image> files)")
    class_names = class_order(root, folder_names, meta)
    label_of = {c: i for i, c in enumerate(class_names)}

    missing = {s: val_fraction if s == "val" else test_fraction for s in ("val", "test") if s not in present}
    if split in present and not (split == "train" and missing):
        source, carved = present[split], None
    else:  # the split, or what train gives up to the missing splits, is carved out of train
        source, carved = present.get("train", root), missing
    records: list[Record] = []
    skipped: Counter[str] = Counter()
    for cdir in _subdirs(source):
        for path in _images_below(cdir, skipped):
            records.append(Record(path, label_of[cdir.name], mask_files(path)))
    if not records:
        raise UserError(f"{source}: no images ({', '.join(SUFFIXES)}) in its class folders")
    by_path = {r.path: r for r in records}
    for csv_dir in dict.fromkeys([source, root]):
        if (csv_dir / BOX_FILE).is_file():
            for path, boxes in read_boxes(csv_dir / BOX_FILE, list(by_path)).items():
                for name, items in boxes.items():
                    by_path[path].boxes.setdefault(name, []).extend(items)

    landmark_names = _landmark_names(meta, class_names, records)
    carving = ""
    if carved is not None:
        labels = [r.label for r in records]
        assignment = carve(labels, carved, seed)
        records = [r for r, s in zip(records, assignment) if s == split]
        carving = describe_carving(labels, assignment, len(class_names))

    if meta.get("format") == PHANTOM_FORMAT:
        fmt = "phantoms"
    elif all(is_dicom(r.path) for r in records):
        fmt = "dicom"
    else:
        fmt = "imagefolder"
    report = LoadReport(fmt, root, split, skipped=dict(skipped.most_common()), carved=carving)
    return records, class_names, landmark_names, report
