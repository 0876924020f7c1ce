"""What a loader found, used and left out, so that nothing is dropped silently."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("xraydeconv.data")


@dataclass
class LoadReport:
    """Counts from opening one split of a data set (``ds.report``).

    For ImageCLEF/IRMA the code counts refer to the whole label file the split was read from
    (train and val share the train file): ``left_out`` maps each IRMA code that matched no class to its
    number of rows, ``malformed`` each unparsable code, ``no_code`` counts rows with every code column
    ``\\N``, ``fallback_codes`` rows whose 2009 code was missing so an older column was used,
    ``missing_images`` rows whose image file was not found (``missing_examples`` lists a few ids) and
    ``duplicates`` ids found at several paths (the shallowest was used). For folder formats ``skipped``
    counts the files below the class folders that are not images, by suffix. ``carved`` says what a split
    the format does not ship got when it was carved out of train (``xraydeconv.data.split.carve``), and
    ``rescaled`` how many films decoded so far use fewer bits than their file stores and were scaled by the
    depth they use (see ``xraydeconv.data.preprocess``).
    """

    format: str
    root: Path
    split: str
    images: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    left_out: dict[str, int] = field(default_factory=dict)
    malformed: dict[str, int] = field(default_factory=dict)
    no_code: int = 0
    fallback_codes: int = 0
    missing_images: int = 0
    missing_examples: list[str] = field(default_factory=list)
    duplicates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    carved: str = ""
    rescaled: int = 0

    @property
    def left_out_rows(self) -> int:
        return sum(self.left_out.values())

    def left_out_by_anatomy(self) -> dict[str, int]:
        """Left-out rows per 3-character anatomy code (the third axis of the IRMA code)."""
        counts: Counter[str] = Counter()
        for code, n in self.left_out.items():
            parts = code.split("-")
            counts[parts[2] if len(parts) == 4 else code] += n
        return dict(counts.most_common())

    def summary(self) -> str:
        """One line for logs and the command line."""
        text = f"{self.format} {self.root} [{self.split}]: {self.images} images in {len(self.per_class)} classes"
        if self.rows:
            text += f" (from {self.rows} label rows"
            if self.fallback_codes:
                text += f", {self.fallback_codes} with an older code column"
            text += ")"
        if self.left_out:
            anat = ", ".join(f"{a}: {n}" for a, n in self.left_out_by_anatomy().items())
            text += (
                f"; left out {self.left_out_rows} rows whose {len(self.left_out)} codes match no class (anatomy {anat})"
            )
        if self.malformed:
            text += f"; left out {sum(self.malformed.values())} rows with malformed codes ({', '.join(self.malformed)})"
        if self.no_code:
            text += f"; left out {self.no_code} rows without any code"
        if self.missing_images:
            text += f"; {self.missing_images} images not found (e.g. {', '.join(self.missing_examples)})"
        if self.skipped:
            kinds = ", ".join(f"{k}: {n}" for k, n in self.skipped.items())
            text += f"; ignored {sum(self.skipped.values())} files that are not images ({kinds})"
        if self.carved:
            text += f"; carved by largest remainders: {self.carved}"
        if self.rescaled:
            text += f"; {self.rescaled} films scaled by the bit depth they use, not the one their file stores"
        if self.duplicates:
            text += f"; {self.duplicates} ids found at several paths (used the shallowest)"
        return text

    def log(self) -> None:
        dropped = self.left_out or self.malformed or self.no_code or self.missing_images or self.skipped
        log.log(logging.WARNING if dropped else logging.INFO, "%s", self.summary())
