"""Reading the small JSON files of a data set (``dataset.json``, ``landmark_sets.json``) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from xraydeconv.errors import UserError


def read_json_object(path: Path, expected: str = "a JSON object") -> dict:
    """The JSON object in ``path``; UserError naming the file when it is unreadable or not an object.

    ``expected`` describes the object in the error, e.g. "a JSON object mapping set names to …".
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected {expected}")
    return data
