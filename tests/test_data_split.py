"""Carving the splits a data set does not ship: largest remainders, so that small sets still get a val split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xraydeconv.data import open_dataset
from xraydeconv.data.classes import CLASS_NAMES
from xraydeconv.data.formats.irma import TRAIN_FILE
from xraydeconv.data.split import carve

HEADER = "image_id;irma_code;05_class;05_irma_code_submask;06_class;06_irma_code;07_irma_code;08_irma_code"
# one anatomy code (third IRMA axis) of each of the 24 default classes
ANATOMY = {
    "whole-body": "100", "facial-cranium": "210", "skull": "200", "cervical-spine": "310", "thoracic-spine": "320",
    "lumbar-spine": "330", "sacrum-coccyx": "340", "hand": "411", "wrist": "420", "forearm": "430", "elbow": "440",
    "upper-arm": "450", "shoulder": "463", "chest-bones": "510", "chest": "500", "breast": "600", "abdomen": "700",
    "pelvis": "800", "foot": "910", "ankle": "920", "lower-leg": "930", "knee": "940", "upper-leg": "950",
    "hip": "960",
}  # fmt: skip


def make_small_irma(root: Path, per_class: int = 3, size: int = 24) -> Path:
    """An ImageCLEF 2009 tree with ``per_class`` films of each of the 24 classes and no test file."""
    rows, n = [], "\\N"
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    for k, name in enumerate(CLASS_NAMES):
        for i in range(per_class):
            image_id = str(1000 + k * per_class + i)
            rows.append(f"{image_id};{n};{n};{n};{n};{n};{n};1121-120-{ANATOMY[name]}-700")
            img = rng.uniform(0, 40, (size, size))
            img[k % size, :] = 255  # a class-specific bright row
            Image.fromarray(img.astype(np.uint8)).save(root / "img" / f"{image_id}.png")
    (root / TRAIN_FILE).write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    return root


def test_small_irma_set_gets_a_val_split_by_largest_remainders(tmp_path: Path) -> None:
    root = make_small_irma(tmp_path / "clef")
    train = open_dataset(root, "train", input_size=32, cache=False)
    val = open_dataset(root, "val", input_size=32, cache=False)
    assert len(val) == round(72 * 0.1) == 7 and len(train) == 65
    assert not {r.path for r in train.records} & {r.path for r in val.records}
    assert all(n >= 2 for n in train.class_counts().values())  # every class keeps films for training
    assert sorted(Counter(val.class_counts().values()).items()) == [(0, 17), (1, 7)]
    assert val.report.carved == "val 7 of 72 images (7 of 24 classes)"
    assert "carved by largest remainders: val 7 of 72 images (7 of 24 classes)" in val.report.summary()


@pytest.mark.parametrize("sizes, frac", [([3] * 24, 0.1), ([5, 1, 1, 9], 0.25), ([2, 2, 2], 0.5), ([20, 20, 20], 0.2)])
def test_carve_totals_round_n_times_fraction_and_keeps_one_of_each_class(sizes: list[int], frac: float) -> None:
    labels = [y for y, n in enumerate(sizes) for _ in range(n)]
    out = carve(labels, {"val": frac}, seed=1)
    taken = Counter(y for y, s in zip(labels, out) if s == "val")
    room = sum(n - 1 for n in sizes)
    assert sum(taken.values()) == min(round(len(labels) * frac), room)
    for y, n in enumerate(sizes):
        assert taken[y] <= n - 1
        assert taken[y] in (int(n * frac), int(n * frac) + 1) or taken[y] == n - 1
    assert carve(labels, {"val": frac}, seed=1) == out


def test_two_carved_splits_share_the_room_and_each_gets_its_total() -> None:
    labels = [y for y in range(10) for _ in range(4)]
    out = carve(labels, {"val": 0.1, "test": 0.1}, seed=0)
    assert Counter(out) == {"train": 32, "val": 4, "test": 4}
    for y in range(10):
        assert sum(1 for lab, s in zip(labels, out) if lab == y and s == "train") >= 1
