"""``XrayDataset`` and ``open_dataset``: one face for every supported data set format."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from xraydeconv.data import preprocess as _pre
from xraydeconv.data.cache import DecodedCache
from xraydeconv.data.formats.imagefolder import read_imagefolder
from xraydeconv.data.formats.irma import ClassMap, is_irma, read_irma
from xraydeconv.data.formats.mura import locate as locate_mura
from xraydeconv.data.formats.mura import read_mura
from xraydeconv.data.landmarks import box_mask, read_mask
from xraydeconv.data.record import Record
from xraydeconv.data.report import LoadReport
from xraydeconv.data.split import check_fraction
from xraydeconv.errors import UserError

SPLITS: tuple[str, ...] = ("train", "val", "test")


class _Preprocess:
    """Picklable ``path -> (uint8 (S, S), rescaled)`` for the cache (DataLoader workers may be spawned)."""

    def __init__(self, input_size: int, max_pixels: int) -> None:
        self.input_size = input_size
        self.max_pixels = max_pixels

    def __call__(self, path: Path) -> tuple[np.ndarray, bool]:
        # looked up through the module so that the decoder can be swapped (and counted) in tests
        return _pre.preprocess_film(path, self.input_size, self.max_pixels)


class XrayDataset(Dataset):
    """Labelled X-ray images, letterboxed to ``input_size`` and decoded once.

    ``ds[i] -> (FloatTensor[1, S, S] in [0, 1], int label)``. Attributes: ``class_names``,
    ``input_size``, ``records`` (:class:`Record`), ``labels`` (LongTensor), ``landmark_names``
    (class -> landmark names), ``format``, ``split``, ``root`` and ``report`` (:class:`LoadReport`).
    """

    def __init__(
        self,
        records: Sequence[Record],
        class_names: Sequence[str],
        input_size: int = 256,
        *,
        landmark_names: Mapping[str, Sequence[str]] | None = None,
        cache: bool = True,
        cache_dir: str | Path | None = None,
        format: str = "imagefolder",
        split: str = "train",
        root: str | Path | None = None,
        report: LoadReport | None = None,
        max_pixels: int = _pre.DEFAULT_MAX_PIXELS,
    ) -> None:
        self.records: list[Record] = list(records)
        self.class_names: list[str] = list(class_names)
        self.input_size = _pre.check_input_size(input_size)
        self.max_pixels = _pre.check_max_pixels(max_pixels)  # larger images are refused
        self.landmark_names: dict[str, list[str]] = {
            c: list((landmark_names or {}).get(c, [])) for c in self.class_names
        }
        self.format = format
        self.split = split
        self.root = Path(root) if root is not None else None
        self.labels = torch.tensor([r.label for r in self.records], dtype=torch.long)
        self.report = report if report is not None else LoadReport(format, self.root or Path("."), split)
        self._cache = DecodedCache(
            [r.path for r in self.records],
            self.input_size,
            _Preprocess(self.input_size, self.max_pixels),
            enabled=cache,
            cache_dir=cache_dir,
            name=f"{format}-{split}",
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i %= len(self)
        return _pre.to_tensor(self._cache[i]), self.records[i].label

    @property
    def cached(self) -> int:
        """How many images are already decoded and cached."""
        return self._cache.filled

    def preload(self, workers: int | None = None, progress: bool = True) -> int:
        """Decode every image not cached yet, on ``workers`` threads (default: the CPU count), with a
        progress bar on stderr; returns how many were decoded. A no-op once everything is cached.

        Pillow and pydicom release the GIL while decoding, so threads use several cores without
        copying the data set into worker processes.
        """
        if not self._cache.enabled:
            return 0
        todo = self._cache.missing()
        if not todo:
            self.report.rescaled = self._cache.noted
            return 0
        workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        bar = tqdm(total=len(todo), desc=f"decoding {self.format} {self.split}", unit="img", disable=not progress)
        with bar, ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(self._cache.__getitem__, todo):
                bar.update()
        self.report.rescaled = self._cache.noted
        return len(todo)

    @property
    def rescaled(self) -> int:
        """How many of the films decoded so far were scaled by the bit depth they use rather than the one their
        file stores (all of them after :meth:`preload`); also kept in ``report.rescaled`` by ``preload``."""
        return self._cache.noted

    @property
    def cache_file(self) -> Path | None:
        """The on-disk cache file (``cache_dir`` given), else None."""
        return self._cache.file

    def landmark_masks(self, i: int) -> dict[str, np.ndarray]:
        """Landmark name -> bool (S, S) mask, letterboxed exactly like image ``i`` (empty dict if none).

        Mask files must have the image's size (``UserError`` naming the mask otherwise); boxes of the
        same landmark are merged with its mask.
        """
        rec = self.records[i]
        if not rec.landmarks and not rec.boxes:
            return {}
        size = _pre.image_size(rec.path)
        full: dict[str, np.ndarray] = {}
        for name, path in rec.landmarks.items():
            full[name] = read_mask(path, size)
        for name, boxes in rec.boxes.items():
            for box in boxes:
                m = box_mask(box, size)
                full[name] = full[name] | m if name in full else m
        geometry = _pre.Letterbox.fit(*size, self.input_size)
        return {name: geometry.apply_mask(m) for name, m in full.items()}

    def class_counts(self) -> dict[str, int]:
        counts = Counter(int(y) for y in self.labels)
        return {c: counts.get(i, 0) for i, c in enumerate(self.class_names)}

    def __repr__(self) -> str:
        return (
            f"XrayDataset(format={self.format!r}, split={self.split!r}, images={len(self)}, "
            f"classes={len(self.class_names)}, input_size={self.input_size}, root={str(self.root)!r})"
        )


def detect_format(root: Path) -> str:
    """``"imageclef2009"``, ``"mura"`` or ``"imagefolder"`` (which also covers DICOM folders and phantoms)."""
    if is_irma(root):
        return "imageclef2009"
    if locate_mura(root) is not None:
        return "mura"
    # label files one level down would otherwise make their image folders look like classes
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if is_irma(sub):
            raise UserError(f"{root}: the ImageCLEF 2009 label files are in {sub}; give that folder")
    return "imagefolder"


def open_dataset(
    root: str | Path,
    split: str = "train",
    input_size: int = 256,
    class_map: ClassMap | str | Path | Mapping[str, str] | None = None,
    cache: bool = True,
    val_fraction: float = 0.1,
    seed: int = 0,
    *,
    test_fraction: float = 0.1,
    cache_dir: str | Path | None = None,
    max_pixels: int = _pre.DEFAULT_MAX_PIXELS,
) -> XrayDataset:
    """Open one split of the data set in ``root``, detecting its format.

    Formats: ImageCLEF 2009 / IRMA (a root holding ``ImageCLEFmed2009_train_codes.02.csv`` and/or
    ``ImageCLEFmed2009_test_codes.03.csv``), MURA (``train/`` and ``valid/`` with ``XR_<PART>`` folders,
    or the folder holding ``MURA-v1.1``), and ImageFolder (``[<split>/]<class>/<files>``, PNG/JPEG/DICOM,
    including the synthetic phantom tree). ``split`` is ``"train"``, ``"val"`` or ``"test"``; a split the
    format does not ship is carved deterministically (by ``seed``) from train: ``val_fraction`` of it for
    val, and for flat ImageFolder trees ``test_fraction`` for test.

    ``class_map`` (IRMA only): a ``prefix,class`` CSV path or a dict replacing the default 24-class grouping.
    ``cache``: decode every image once and keep it in shared memory; ``cache_dir``: keep it in one
    memory-mapped ``.npy`` per split there instead, reused by later runs. ``max_pixels``: larger images are
    refused when they are read (a decompression-bomb guard; default Pillow's limit).
    The loader's counts (images left out, missing, ...) are in ``ds.report`` and logged to
    ``logging.getLogger("xraydeconv.data")`` (WARNING when anything was left out).
    """
    root = Path(root).expanduser()
    if split not in SPLITS:
        raise UserError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
    input_size = _pre.check_input_size(input_size)
    max_pixels = _pre.check_max_pixels(max_pixels)
    val_fraction = check_fraction("val_fraction", val_fraction)
    test_fraction = check_fraction("test_fraction", test_fraction)
    if not root.exists():
        raise UserError(f"{root}: no such data set folder")
    if not root.is_dir():
        raise UserError(f"{root}: not a folder (a data set is a folder of images or of ImageCLEF/MURA files)")
    fmt = detect_format(root)
    if class_map is not None and fmt != "imageclef2009":
        raise UserError(f"class map: applies to ImageCLEF 2009 / IRMA data only, but {root} is {fmt}")
    records, class_names, landmark_names, report = _read_records(root, fmt, split, class_map, val_fraction,
                                                                 test_fraction, seed)
    if not records:
        raise UserError(
            f"{root}: the {split} split is empty (val_fraction={val_fraction}, test_fraction={test_fraction})"
        )
    report.images = len(records)
    counts = Counter(r.label for r in records)
    report.per_class = {c: counts.get(i, 0) for i, c in enumerate(class_names)}
    report.log()
    return XrayDataset(records, class_names, input_size, landmark_names=landmark_names, cache=cache,
                       cache_dir=cache_dir, format=report.format, split=split, root=root, report=report,
                       max_pixels=max_pixels)


def _read_records(
    root: Path,
    fmt: str,
    split: str,
    class_map: ClassMap | str | Path | Mapping[str, str] | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[list[Record], list[str], dict[str, list[str]], LoadReport]:
    """Records, class names, landmark names per class and the report of one split, read by the format's reader."""
    if fmt == "imageclef2009":
        records, class_names, report = read_irma(root, split, class_map, val_fraction, seed)
        found: dict[str, set[str]] = {}
        for r in records:
            found.setdefault(class_names[r.label], set()).update(r.landmarks)
        return records, class_names, {c: sorted(v) for c, v in found.items()}, report
    if fmt == "mura":
        mura_root = locate_mura(root)
        assert mura_root is not None
        records, class_names, report = read_mura(mura_root, split, val_fraction, seed)
        return records, class_names, {}, report
    return read_imagefolder(root, split, val_fraction, test_fraction, seed)
