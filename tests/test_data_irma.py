"""ImageCLEF 2009 / IRMA: label files, code parsing, the 24-class grouping and the user class map."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from xraydeconv.data import open_dataset
from xraydeconv.data.classes import CLASS_NAMES
from xraydeconv.data.formats.irma import TEST_FILE, TRAIN_FILE, ClassMap, IrmaCode, read_label_file
from xraydeconv.errors import UserError

HEADER = "image_id;irma_code;05_class;05_irma_code_submask;06_class;06_irma_code;07_irma_code;08_irma_code"


def _png(path, value=128, size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8)).save(path)


def _row(image_id, code08, irma=None, code07=None):
    n = "\\N"
    return f"{image_id};{irma or n};{n};{n};{n};{n};{code07 or n};{code08 or n}"


@pytest.fixture
def irma_root(tmp_path):
    """A few-pixel ImageCLEF tree: zero-padded, nested and plain file names, \\N values, codes 300/900."""
    root = tmp_path / "imageclef"
    rows = [
        _row("1001", "1121-120-200-700"),  # skull          (plain name)
        _row("1002", "1121-120-210-700"),  # facial cranium (zero-padded file)
        _row("1003", "1121-120-500-700"),  # chest          (nested twice)
        _row("1004", "1121-120-510-700"),  # chest bones
        _row("1005", "1121-120-421-700"),  # wrist (42 wins over 4)
        _row("1006", "1121-120-300-700"),  # spine, region unspecified -> left out
        _row("1007", "1121-120-900-700"),  # lower extremity, unspecified -> left out
        _row("1008", "1121-120-300-700"),  # left out again (same code)
        _row("1009", None, code07="1121-120-940-700"),  # 2009 code missing: falls back to 07 -> knee
        _row("1010", None),  # no code at all
        _row("1011", "1121-120-941-700"),  # knee, but the image is missing
        _row("1012", "11-12-94-7"),  # malformed code
        _row("1013", "1121-120-a10-700"),  # tissue: left out
    ]
    root.mkdir()
    (root / TRAIN_FILE).write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    test_rows = [_row("2001", "1121-120-460-700"), _row("2002", "1121-120-960-700")]
    (root / TEST_FILE).write_text(HEADER + "\n" + "\n".join(test_rows) + "\n")
    imgs = root / "ImageCLEFmed2009_train.02"
    _png(imgs / "1001.png", 10)
    _png(imgs / "0001002.png", 20)
    _png(imgs / "ImageCLEFmed2009_train.02" / "1003.png", 30)
    for i in (1004, 1005, 1006, 1007, 1008, 1009, 1010, 1012, 1013):
        _png(imgs / f"{i}.png")
    _png(root / "copies" / "deeper" / "0001004.png", 99)  # a second copy of 1004, spelled differently
    _png(root / "test" / "02001.png")
    _png(root / "test" / "deep" / "2002.png")
    return root


def test_default_grouping_has_the_24_classes_in_label_order():
    cmap = ClassMap.default()
    assert cmap.class_names == list(CLASS_NAMES)
    expect = {
        "100": "whole-body", "210": "facial-cranium", "200": "skull", "230": "skull", "310": "cervical-spine",
        "320": "thoracic-spine", "330": "lumbar-spine", "340": "sacrum-coccyx", "350": "sacrum-coccyx",
        "411": "hand", "420": "wrist", "430": "forearm", "440": "elbow", "450": "upper-arm", "463": "shoulder",
        "510": "chest-bones", "500": "chest", "520": "chest", "550": "chest", "600": "breast", "700": "abdomen",
        "800": "pelvis", "910": "foot", "920": "ankle", "930": "lower-leg", "940": "knee", "950": "upper-leg",
        "960": "hip",
    }  # fmt: skip
    for anatomy, name in expect.items():
        assert cmap.class_names[cmap.classify(anatomy)] == name, anatomy
    for anatomy in ("300", "400", "900", "a10", "000"):
        assert cmap.classify(anatomy) is None, anatomy


def test_irma_code_parsing():
    code = IrmaCode.parse(" 1121-127-700-500 ")
    assert (code.technique, code.direction, code.anatomy, code.biosystem) == ("1121", "127", "700", "500")
    assert str(code) == "1121-127-700-500"
    assert IrmaCode.parse("1123-211-A10-000").anatomy == "a10"
    for bad in ("1121-127-700", "1121-127-70-500", "1121_127_700_500", "1121-127-7*0-500", ""):
        with pytest.raises(ValueError):
            IrmaCode.parse(bad)


def test_train_split_counts_and_class_assignment(irma_root, caplog):
    with caplog.at_level(logging.INFO, logger="xraydeconv.data"):
        ds = open_dataset(irma_root, "train", input_size=16, val_fraction=0.0)
    assert ds.format == "imageclef2009" and ds.class_names == list(CLASS_NAMES)
    got = {r.meta["image_id"]: ds.class_names[r.label] for r in ds.records}
    assert got == {
        "1001": "skull",
        "1002": "facial-cranium",
        "1003": "chest",
        "1004": "chest-bones",
        "1005": "wrist",
        "1009": "knee",
    }
    by_id = {r.meta["image_id"]: r.path for r in ds.records}
    assert by_id["1002"].name == "0001002.png"
    assert (
        by_id["1003"].parent.name == "ImageCLEFmed2009_train.02"
        and by_id["1003"].parent.parent.name == by_id["1003"].parent.name
    )  # found in the twice-nested folder
    rep = ds.report
    assert rep.rows == 13 and rep.images == 6
    assert rep.left_out == {"1121-120-300-700": 2, "1121-120-900-700": 1, "1121-120-a10-700": 1}
    assert rep.left_out_by_anatomy() == {"300": 2, "900": 1, "a10": 1}
    assert rep.no_code == 1 and rep.fallback_codes == 1
    assert rep.malformed == {"11-12-94-7": 1}
    assert rep.missing_images == 1 and rep.missing_examples == ["1011"]
    assert rep.duplicates == 1 and by_id["1004"].name == "1004.png"  # the exact spelling wins
    # every row is accounted for
    assert rep.images + rep.left_out_rows + rep.no_code + sum(rep.malformed.values()) + rep.missing_images == rep.rows
    assert "left out 4 rows" in caplog.text and "300: 2" in caplog.text and "1 images not found" in caplog.text
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    # pixels come from the right files
    assert abs(float(ds[[r.meta["image_id"] for r in ds.records].index("1002")][0].max()) - 20 / 255) < 1e-6


def test_test_split_reads_the_test_file(irma_root):
    ds = open_dataset(irma_root, "test", input_size=16)
    assert sorted(ds.class_names[r.label] for r in ds.records) == ["hip", "shoulder"]
    assert len(ds) == 2 and ds.labels.tolist() == [r.label for r in ds.records]
    x, y = ds[0]
    assert x.shape == (1, 16, 16) and isinstance(y, int)


def test_val_is_carved_from_train_deterministically(tmp_path):
    root = tmp_path / "clef"
    codes = ["1121-120-200-700", "1121-120-500-700", "1121-120-940-700"]
    rows = [_row(str(3000 + i), codes[i % 3]) for i in range(60)]
    root.mkdir()
    (root / TRAIN_FILE).write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    for i in range(60):
        _png(root / "img" / f"{3000 + i}.png")
    train = open_dataset(root, "train", input_size=16, val_fraction=0.2, seed=3, cache=False)
    val = open_dataset(root, "val", input_size=16, val_fraction=0.2, seed=3, cache=False)
    again = open_dataset(root, "val", input_size=16, val_fraction=0.2, seed=3, cache=False)
    other = open_dataset(root, "val", input_size=16, val_fraction=0.2, seed=4, cache=False)
    tr = {r.path for r in train.records}
    va = [r.path for r in val.records]
    assert len(tr) == 48 and len(va) == 12 and not tr & set(va)
    assert va == [r.path for r in again.records]
    assert va != [r.path for r in other.records]
    assert val.class_counts()["skull"] == val.class_counts()["chest"] == val.class_counts()["knee"] == 4  # stratified
    with pytest.raises(UserError, match="test split of ImageCLEF 2009"):
        open_dataset(root, "test", input_size=16)


def test_class_map_file_replaces_the_default(irma_root, tmp_path):
    cmap = tmp_path / "map.csv"
    cmap.write_text("# coarse grouping\nprefix,class\n2,head\n5,thorax\n4,arm\n9,leg\n3,spine\n")
    ds = open_dataset(irma_root, "train", input_size=16, class_map=cmap, val_fraction=0.0)
    assert ds.class_names == ["head", "thorax", "arm", "leg", "spine"]
    got = {r.meta["image_id"]: ds.class_names[r.label] for r in ds.records}
    assert got["1001"] == got["1002"] == "head" and got["1003"] == got["1004"] == "thorax"
    assert got["1006"] == got["1008"] == "spine" and got["1007"] == "leg" and got["1005"] == "arm"
    assert ds.report.left_out == {"1121-120-a10-700": 1}
    # a dict works too
    ds2 = open_dataset(irma_root, "train", input_size=16, class_map={"5": "thorax"}, val_fraction=0.0)
    assert ds2.class_names == ["thorax"] and len(ds2) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("prefix,class\n2,head\n2,skull\n", r"map.csv: row 3: duplicate prefix 2"),
        ("2,head\n5,\n", r"map.csv: row 2: empty class name for prefix 5"),
        ("2,head\n5-1,chest\n", r"map.csv: row 2: bad prefix '5-1'"),
        ("2,head\n5123,chest\n", r"map.csv: row 2: bad prefix"),
        ("2,head,extra\n", r"map.csv: row 1: expected 2 fields"),
        ("# nothing\n", r"map.csv: the class map is empty"),
    ],
)
def test_bad_class_map_rows_are_one_line_user_errors(tmp_path, text, message):
    path = tmp_path / "map.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as err:
        ClassMap.load(path)
    assert "\n" not in str(err.value)


def test_class_map_is_refused_for_other_formats(tmp_path):
    _png(tmp_path / "data" / "hand" / "a.png")
    with pytest.raises(UserError, match="class map: applies to ImageCLEF"):
        open_dataset(tmp_path / "data", class_map={"4": "arm"})


def test_label_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / TRAIN_FILE
    bad.write_text(HEADER + "\n" + _row("1", "1121-120-200-700") + "\n" + _row("2", "x") + ";extra\n")
    with pytest.raises(UserError, match=rf"{TRAIN_FILE}:3: expected 8 fields, got 9"):
        read_label_file(bad)
    bad.write_bytes((HEADER + "\n1;caf\xe9\n").encode("latin-1"))
    with pytest.raises(UserError, match=rf"{TRAIN_FILE}: not UTF-8 text"):
        read_label_file(bad)
    # Windows line endings, a trailing ';' on every line and an empty trailing code are all fine
    bad.write_text(HEADER + ";\r\n" + _row("1", "1121-120-200-700") + ";\r\n2;1121-120-500-700;;;;;;\r\n")
    rows = read_label_file(bad)
    assert [(r.image_id, r.code, r.fallback) for r in rows] == [
        ("1", "1121-120-200-700", False),
        ("2", "1121-120-500-700", True),
    ]
    bad.write_text("id;code\n1;2\n")
    with pytest.raises(UserError, match="no image_id column"):
        read_label_file(bad)
    bad.write_text("image_id;irma_code\n1;1121-120-200-700\n")
    rows = read_label_file(bad)
    assert rows[0].code == "1121-120-200-700" and rows[0].fallback  # only the generic column exists


def test_pointing_one_level_too_high_says_where_the_label_files_are(irma_root):
    with pytest.raises(UserError, match=r"label files are in .*imageclef; give that folder"):
        open_dataset(irma_root.parent)
