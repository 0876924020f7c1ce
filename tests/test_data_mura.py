"""MURA: XR_<PART>/patient*/study*/image*.png under train/ and valid/."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xraydeconv.data import open_dataset
from xraydeconv.data.formats.mura import PARTS
from xraydeconv.errors import UserError


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10), 90, dtype=np.uint8)).save(path)


@pytest.fixture
def mura_root(tmp_path):
    rel = tmp_path / "download" / "MURA-v1.1"
    for p in range(10):
        for part in ("XR_HAND", "XR_FINGER", "XR_HUMERUS"):
            for s, outcome in ((1, "positive"), (2, "negative")):
                _png(rel / "train" / part / f"patient{p:05d}" / f"study{s}_{outcome}" / "image1.png")
        _png(rel / "train" / "XR_HAND" / f"patient{p:05d}" / "study1_positive" / "image2.png")
    _png(rel / "valid" / "XR_WRIST" / "patient11186" / "study1_negative" / "image1.png")
    _png(rel / "valid" / "XR_ELBOW" / "patient11187" / "study1_positive" / "image1.png")
    (rel / "train" / "XR_HAND" / "patient00000" / "study1_positive" / "._image1.png").write_bytes(b"\0\5\26\7")
    return tmp_path / "download"


def test_mura_classes_are_its_parts_with_our_names(mura_root):
    ds = open_dataset(mura_root, "train", input_size=16, val_fraction=0.2, seed=1)
    assert ds.format == "mura"
    assert ds.class_names == ["elbow", "finger", "forearm", "hand", "upper-arm", "shoulder", "wrist"]
    assert len(PARTS) == 7
    names = {ds.class_names[r.label] for r in ds.records}
    assert names == {"hand", "finger", "upper-arm"}
    rec = next(r for r in ds.records if r.path.name == "image2.png")
    assert rec.meta["abnormal"] == "positive" and rec.meta["study"] == "study1_positive"
    assert rec.meta["patient"].startswith("patient")
    assert all(not r.path.name.startswith(".") for r in ds.records)


def test_valid_is_the_test_split_and_val_is_carved_by_patient(mura_root):
    train = open_dataset(mura_root, "train", input_size=16, val_fraction=0.2, seed=1)
    val = open_dataset(mura_root, "val", input_size=16, val_fraction=0.2, seed=1)
    test = open_dataset(mura_root, "test", input_size=16)
    assert len(train) + len(val) == 70 and len(val) == 14  # 2 of 10 patients, 7 images each
    assert not {r.meta["patient"] for r in train.records} & {r.meta["patient"] for r in val.records}
    assert sorted(test.class_names[r.label] for r in test.records) == ["elbow", "wrist"]
    assert test.class_names == train.class_names
    x, y = test[0]
    assert x.shape == (1, 16, 16)


def test_mura_without_valid_folder_has_no_test_split(tmp_path):
    _png(tmp_path / "m" / "train" / "XR_HAND" / "patient1" / "study1_negative" / "image1.png")
    with pytest.raises(UserError, match="valid: missing"):
        open_dataset(tmp_path / "m", "test", input_size=16)
