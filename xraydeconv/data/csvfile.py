"""Reading the small CSV files users bring (label files, class maps, box files) with one-line errors."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

from xraydeconv.errors import UserError


def read_rows(path: Path, delimiter: str = ",", what: str = "file") -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, fields)`` for each non-blank row; trailing empty fields are dropped.

    A missing or unreadable file, text that is not UTF-8 (a BOM is fine) or broken quoting raise
    ``UserError`` naming the file (and line).
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        for row in reader:
            # spreadsheets often write a trailing delimiter: "a;b;" is the same row as "a;b"
            while row and not row[-1].strip():
                row.pop()
            if row:
                yield reader.line_num, row
    except csv.Error as exc:
        raise UserError(f"{path}:{reader.line_num}: {exc}") from None
