"""ImageCLEF 2009 medical annotation data (IRMA codes): label files, code parsing, class grouping.

Layout: a root folder holding ``ImageCLEFmed2009_train_codes.02.csv`` (train and val) and/or
``ImageCLEFmed2009_test_codes.03.csv`` (test), with the PNGs anywhere below it (ids zero-padded or
not, folders nested any depth). The label files are ``;``-separated with ``\\N`` for missing values.
The code used per row is ``08_irma_code`` (the 2009 task's full code), falling back to
``07_irma_code``, ``06_irma_code`` and ``irma_code`` when it is missing.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from xraydeconv.data.csvfile import read_rows
from xraydeconv.data.landmarks import mask_files
from xraydeconv.data.record import Record
from xraydeconv.data.report import LoadReport
from xraydeconv.data.split import carve, describe_carving
from xraydeconv.errors import UserError

TRAIN_FILE = "ImageCLEFmed2009_train_codes.02.csv"
TEST_FILE = "ImageCLEFmed2009_test_codes.03.csv"
CODE_COLUMNS: tuple[str, ...] = ("08_irma_code", "07_irma_code", "06_irma_code", "irma_code")
MISSING = "\\N"
DEFAULT_CLASS_MAP = "irma_classes.csv"

_AXIS = re.compile(r"[0-9a-z]+")
_PREFIX = re.compile(r"[0-9a-z]{1,3}")


@dataclass(frozen=True)
class IrmaCode:
    """An IRMA code ``TTTT-DDD-AAA-BBB``: technique, direction, anatomy, biosystem (hierarchical digits)."""

    technique: str
    direction: str
    anatomy: str
    biosystem: str

    @classmethod
    def parse(cls, text: str) -> IrmaCode:
        """Parse ``"1121-127-700-500"``; raises ``ValueError`` when it is not four axes of 4, 3, 3, 3 characters."""
        parts = text.strip().lower().split("-")
        if [len(p) for p in parts] != [4, 3, 3, 3] or not all(_AXIS.fullmatch(p) for p in parts):
            raise ValueError(f"not an IRMA code: {text!r}")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.technique}-{self.direction}-{self.anatomy}-{self.biosystem}"


class ClassMap:
    """Anatomy-code prefix -> class name; the longest matching prefix wins.

    Classes are numbered in the order they first appear. ``ClassMap.default()`` is the 24-class
    grouping shipped in ``xraydeconv/resources/irma_classes.csv``; ``ClassMap.load(path)`` reads a
    user's file of the same format (CSV ``prefix,class``, optional header, ``#`` comments).
    """

    def __init__(self, prefixes: Mapping[str, str], source: str = "<class map>") -> None:
        self.source = source
        self.prefixes: dict[str, str] = {}
        names: list[str] = []
        for prefix, name in prefixes.items():
            prefix, name = str(prefix).strip().lower(), str(name).strip()
            self._check(prefix, name, source)
            if prefix in self.prefixes:
                raise UserError(f"{source}: duplicate prefix {prefix}")
            self.prefixes[prefix] = name
            if name not in names:
                names.append(name)
        if not names:
            raise UserError(f"{source}: the class map is empty")
        self.class_names: list[str] = names
        self._index = {n: i for i, n in enumerate(names)}

    @staticmethod
    def _check(prefix: str, name: str, where: str) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise UserError(f"{where}: bad prefix {prefix!r} (1 to 3 characters of 0-9 and a-z)")
        if not name:
            raise UserError(f"{where}: empty class name for prefix {prefix}")

    @classmethod
    def load(cls, path: str | Path) -> ClassMap:
        """Read a ``prefix,class`` CSV; errors name the file and row."""
        return cls._parse(read_rows(Path(path), what="class map file"), str(path))

    @classmethod
    def _parse(cls, rows: Iterable[tuple[int, list[str]]], source: str) -> ClassMap:
        entries: dict[str, str] = {}
        for line, row in rows:
            where = f"{source}: row {line}"
            if row[0].lstrip().startswith("#") or [c.strip().lower() for c in row] == ["prefix", "class"]:
                continue
            if len(row) == 1:
                row = [row[0], ""]  # "5," : the class is empty
            if len(row) != 2:
                raise UserError(f"{where}: expected 2 fields prefix,class, got {len(row)}")
            prefix, name = row[0].strip().lower(), row[1].strip()
            cls._check(prefix, name, where)
            if prefix in entries:
                raise UserError(f"{where}: duplicate prefix {prefix}")
            entries[prefix] = name
        return cls(entries, source)

    @classmethod
    def default(cls) -> ClassMap:
        """The shipped 24-class grouping (class order = ``CLASS_NAMES``)."""
        with resources.as_file(resources.files("xraydeconv") / "resources" / DEFAULT_CLASS_MAP) as path:
            return cls._parse(read_rows(path, what="class map file"), f"xraydeconv/resources/{DEFAULT_CLASS_MAP}")

    @classmethod
    def coerce(cls, value: ClassMap | str | Path | Mapping[str, str] | None) -> ClassMap:
        if value is None:
            return cls.default()
        if isinstance(value, ClassMap):
            return value
        if isinstance(value, Mapping):
            return cls(value)
        return cls.load(value)

    def classify(self, anatomy: str) -> int | None:
        """Label of a 3-character anatomy code, or None when no prefix matches."""
        for n in range(len(anatomy), 0, -1):
            name = self.prefixes.get(anatomy[:n])
            if name is not None:
                return self._index[name]
        return None


@dataclass(frozen=True)
class LabelRow:
    line: int
    image_id: str
    code: str | None  # None: every code column was missing
    fallback: bool  # the 2009 column was missing and an older one was used


def read_label_file(path: Path) -> list[LabelRow]:
    """Parse one ImageCLEF 2009 label file; errors name the file and line."""
    rows: list[LabelRow] = []
    lines = read_rows(path, delimiter=";", what="label file")
    first = next(lines, None)
    header = [c.strip() for c in first[1]] if first else []
    if "image_id" not in header:
        raise UserError(f"{path}:1: not an ImageCLEF 2009 label file (no image_id column in the header)")
    columns = [header.index(c) for c in CODE_COLUMNS if c in header]
    if not columns:
        raise UserError(f"{path}:1: no IRMA code column ({', '.join(CODE_COLUMNS)}) in the header")
    id_col = header.index("image_id")
    for line, row in lines:
        if len(row) > len(header):
            raise UserError(f"{path}:{line}: expected {len(header)} fields, got {len(row)}")
        row += [""] * (len(header) - len(row))  # empty trailing fields were dropped: missing values
        image_id = row[id_col].strip()
        if not image_id or image_id == MISSING:
            raise UserError(f"{path}:{line}: empty image_id")
        code, fallback = None, False
        for rank, col in enumerate(columns):
            value = row[col].strip()
            if value and value != MISSING:
                code, fallback = value, rank > 0 or header[columns[0]] != CODE_COLUMNS[0]
                break
        rows.append(LabelRow(line, image_id, code, fallback))
    return rows


def _id_key(text: str) -> str:
    return text.lstrip("0") or "0"


def index_images(root: Path) -> dict[str, list[Path]]:
    """All ``*.png`` below ``root`` (any depth, hidden folders skipped) by id without zero padding."""
    index: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(".png") and not name.startswith("."):
                index.setdefault(_id_key(name[:-4]), []).append(Path(dirpath) / name)
    return index


def _pick(image_id: str, candidates: list[Path]) -> Path:
    # the exact spelling of the id first, then the shallowest copy
    return min(candidates, key=lambda p: (p.stem != image_id, len(p.parts), str(p)))


def is_irma(root: Path) -> bool:
    return (root / TRAIN_FILE).is_file() or (root / TEST_FILE).is_file()


def read_irma(
    root: Path,
    split: str,
    class_map: ClassMap | str | Path | Mapping[str, str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[list[Record], list[str], LoadReport]:
    """Records of one split (val is carved per class from the train file), the class names and the report."""
    cmap = ClassMap.coerce(class_map)
    label_file = root / (TEST_FILE if split == "test" else TRAIN_FILE)
    if not label_file.is_file():
        raise UserError(f"{label_file}: missing; the {split} split of ImageCLEF 2009 is read from it")
    report = LoadReport("imageclef2009", root, split)
    rows = read_label_file(label_file)
    index = index_images(root)
    report.rows = len(rows)
    left_out: Counter[str] = Counter()
    malformed: Counter[str] = Counter()
    records: list[Record] = []
    for row in rows:
        if row.code is None:
            report.no_code += 1
            continue
        report.fallback_codes += row.fallback
        try:
            code = IrmaCode.parse(row.code)
        except ValueError:
            malformed[row.code] += 1
            continue
        label = cmap.classify(code.anatomy)
        if label is None:
            left_out[str(code)] += 1
            continue
        candidates = index.get(_id_key(row.image_id))
        if not candidates:
            report.missing_images += 1
            if len(report.missing_examples) < 5:
                report.missing_examples.append(row.image_id)
            continue
        if len(candidates) > 1 and len({os.path.realpath(p) for p in candidates}) > 1:
            report.duplicates += 1
        path = _pick(row.image_id, candidates)
        records.append(Record(path, label, mask_files(path), meta={"image_id": row.image_id, "irma_code": str(code)}))
    report.left_out = dict(left_out.most_common())
    report.malformed = dict(malformed.most_common())
    if split != "test":
        labels = [r.label for r in records]
        assignment = carve(labels, {"val": val_fraction}, seed)
        records = [r for r, s in zip(records, assignment) if s == split]
        report.carved = describe_carving(labels, assignment, len(cmap.class_names))
    return records, list(cmap.class_names), report
