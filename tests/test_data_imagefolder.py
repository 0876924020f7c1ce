"""ImageFolder trees (incl. the phantom layout): splits, class order, landmark masks and box files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from xraydeconv.data import Record, XrayDataset, open_dataset
from xraydeconv.data.classes import CLASS_NAMES
from xraydeconv.data.phantoms import generate
from xraydeconv.errors import UserError


def _png(path, shape=(20, 40), value=200):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)
    return path


def _mask(path, shape, box):
    m = np.zeros(shape, dtype=np.uint8)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path)


@pytest.fixture
def phantom_tree(tmp_path):
    """The layout the phantom generator writes: dataset.json, split/class/id.png, id.landmarks/name.png."""
    root = tmp_path / "phantoms"
    classes = ["knee", "hand", "skull"]  # deliberately not sorted and not CLASS_NAMES order
    meta = {
        "format": "xraydeconv-phantoms",
        "version": 1,
        "classes": classes,
        "landmarks": {"knee": ["patella", "joint-space"], "hand": ["phalanges"], "skull": []},
        "size": 32,
        "seed": 0,
        "per_class": {"train": 2, "val": 1, "test": 1},
        "bias": None,
    }
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps(meta))
    for split, n in meta["per_class"].items():
        for c in classes:
            for i in range(n):
                img = _png(root / split / c / f"{i:05d}.png", shape=(32, 32), value=60 + 40 * classes.index(c))
                for name in meta["landmarks"][c]:
                    _mask(img.with_name(f"{i:05d}.landmarks") / f"{name}.png", (32, 32), (0, 16, 0, 8))
    return root


def test_phantom_tree_is_read_with_its_class_order_and_masks(phantom_tree):
    ds = open_dataset(phantom_tree, "train", input_size=32)
    assert ds.format == "phantoms" and ds.class_names == ["knee", "hand", "skull"]
    assert len(ds) == 6 and sorted(ds.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert ds.landmark_names == {"knee": ["patella", "joint-space"], "hand": ["phalanges"], "skull": []}
    knee = next(i for i, r in enumerate(ds.records) if r.label == 0)
    masks = ds.landmark_masks(knee)
    assert set(masks) == {"patella", "joint-space"}
    m = masks["patella"]
    assert m.dtype == bool and m.shape == (32, 32) and m.sum() == 16 * 8 and m[:16, :8].all()
    skull = next(i for i, r in enumerate(ds.records) if r.label == 2)
    assert ds.landmark_masks(skull) == {}
    for split, n in (("val", 3), ("test", 3)):
        assert len(open_dataset(phantom_tree, split, input_size=32)) == n
    x, y = ds[knee]
    assert x.shape == (1, 32, 32) and y == 0 and abs(float(x.mean()) - 60 / 255) < 1e-6


def test_phantom_generator_output_is_readable(tmp_path):
    root = generate(
        tmp_path / "ph", per_class=1, size=64, seed=1, splits=("train",), workers=1, progress=False
    )
    ds = open_dataset(root, "train", input_size=64)
    assert ds.format == "phantoms" and ds.class_names == list(CLASS_NAMES) and len(ds) == 24
    with_masks = [i for i in range(len(ds)) if ds.records[i].landmarks]
    assert with_masks, "the phantom tree carries landmark masks"
    for i in with_masks:
        masks = ds.landmark_masks(i)
        assert set(masks) <= set(ds.landmark_names[ds.class_names[ds.records[i].label]])
        for name, m in masks.items():
            assert m.shape == (64, 64) and m.dtype == bool, name


def test_landmark_masks_are_letterboxed_like_the_image(tmp_path):
    root = tmp_path / "data"
    img = _png(root / "hand" / "a.png", shape=(20, 40))
    _mask(root / "hand" / "a.landmarks" / "carpals.png", (20, 40), (0, 20, 0, 20))  # left half
    _png(root / "knee" / "b.png")
    ds = open_dataset(root, "train", input_size=40, val_fraction=0.0, test_fraction=0.0)
    assert ds.class_names == ["hand", "knee"]  # CLASS_NAMES order
    i = [r.path for r in ds.records].index(img)
    m = ds.landmark_masks(i)["carpals"]
    x = ds[i][0][0].numpy()
    assert m[10:30, :20].all() and not m[:10].any() and not m[30:].any() and not m[:, 20:].any()
    assert (x[m] > 0).all()  # the mask lies on the image, not on the padding
    assert ds.landmark_names == {"hand": ["carpals"], "knee": []}


def test_mask_of_the_wrong_size_names_the_mask(tmp_path):
    root = tmp_path / "data"
    _png(root / "hand" / "a.png", shape=(20, 40))
    _mask(root / "hand" / "a.landmarks" / "carpals.png", (20, 20), (0, 5, 0, 5))
    ds = open_dataset(root, input_size=40, val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(UserError, match=r"carpals.png: mask is 20x20 pixels but its image is 40x20"):
        ds.landmark_masks(0)


def test_box_csv_becomes_masks_and_merges_with_mask_files(tmp_path):
    root = tmp_path / "data"
    _png(root / "train" / "knee" / "k1.png", shape=(40, 40))
    _png(root / "train" / "knee" / "k2.png", shape=(40, 40))
    _png(root / "test" / "knee" / "k3.png", shape=(40, 40))
    _mask(root / "train" / "knee" / "k1.landmarks" / "patella.png", (40, 40), (0, 4, 0, 4))
    (root / "train" / "landmarks.csv").write_text(
        "image,landmark,x0,y0,x1,y1\nknee/k1.png,patella,10,10,20,20\nk2.png,joint-space,0,20,40,22.5\n"
    )
    (root / "landmarks.csv").write_text("image,landmark,x0,y0,x1,y1\ntest/knee/k3.png,patella,0,0,40,40\n")
    ds = open_dataset(root, "train", input_size=40, val_fraction=0.0)
    assert ds.landmark_names == {"knee": ["joint-space", "patella"]}
    k1 = ds.landmark_masks(0)
    assert set(k1) == {"patella"} and k1["patella"].sum() == 16 + 100
    assert k1["patella"][10:20, 10:20].all() and k1["patella"][:4, :4].all()
    k2 = ds.landmark_masks(1)["joint-space"]
    assert k2[20:23].all() and k2.sum() == 3 * 40  # y1 = 22.5 covers row 22
    test = open_dataset(root, "test", input_size=40)
    assert test.landmark_masks(0)["patella"].all()


@pytest.mark.parametrize(
    "rows, message",
    [
        ("image,label,x0,y0,x1,y1\n", r"landmarks.csv:1: header must be"),
        ("image,landmark,x0,y0,x1,y1\nk1.png,patella,1,2,three,4\n", r"landmarks.csv:2: coordinates must be numbers"),
        ("image,landmark,x0,y0,x1,y1\nk1.png,patella,1,2,3\n", r"landmarks.csv:2: expected 6 fields"),
        ("image,landmark,x0,y0,x1,y1\n\nk1.png,patella,5,2,3,4\n", r"landmarks.csv:3: need 0 <= x0 < x1"),
        ("image,landmark,x0,y0,x1,y1\nnope.png,patella,1,2,3,4\n", r"landmarks.csv:2: image nope.png is not in"),
        ("image,landmark,x0,y0,x1,y1\nk1.png,,1,2,3,4\n", r"landmarks.csv:2: empty landmark name"),
    ],
)
def test_bad_box_rows_name_file_and_line(tmp_path, rows, message):
    root = tmp_path / "data"
    _png(root / "knee" / "k1.png", shape=(40, 40))
    (root / "landmarks.csv").write_text(rows)
    with pytest.raises(UserError, match=message):
        open_dataset(root, input_size=40, val_fraction=0.0, test_fraction=0.0)


def test_box_outside_the_image_is_reported_with_its_line(tmp_path):
    root = tmp_path / "data"
    _png(root / "knee" / "k1.png", shape=(40, 40))
    (root / "landmarks.csv").write_text("image,landmark,x0,y0,x1,y1\nknee/k1.png,patella,30,30,41,35\n")
    ds = open_dataset(root, input_size=40, val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(UserError, match=r"landmarks.csv:2: box .* exceeds the 40x40 image"):
        ds.landmark_masks(0)


def test_flat_tree_is_carved_into_disjoint_deterministic_splits(tmp_path):
    root = tmp_path / "flat"
    for c in ("zebra", "apple"):
        for i in range(20):
            _png(root / c / "sub" / f"{i}.png")  # found at any depth
    (root / "apple" / "README.txt").write_text("ignored")
    (root / "apple" / ".hidden.png").write_text("ignored")
    parts = {s: open_dataset(root, s, input_size=40, val_fraction=0.1, test_fraction=0.2, seed=7) for s in
             ("train", "val", "test")}  # fmt: skip
    assert parts["train"].class_names == ["apple", "zebra"]  # sorted: not all among CLASS_NAMES
    assert parts["train"].report.skipped == {".txt": 1}  # counted, not silently dropped
    assert "ignored 1 files that are not images (.txt: 1)" in parts["train"].report.summary()
    sets = {s: {r.path for r in ds.records} for s, ds in parts.items()}
    assert [len(sets[s]) for s in ("train", "val", "test")] == [28, 4, 8]
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    again = open_dataset(root, "val", input_size=40, val_fraction=0.1, test_fraction=0.2, seed=7)
    assert [r.path for r in again.records] == [r.path for r in parts["val"].records]


def test_missing_split_folder_is_carved_from_train(tmp_path):
    root = tmp_path / "data"
    for i in range(10):
        _png(root / "train" / "hand" / f"{i}.png")
        _png(root / "test" / "hand" / f"t{i}.png")
    val = open_dataset(root, "val", input_size=40, val_fraction=0.2)
    train = open_dataset(root, "train", input_size=40, val_fraction=0.2)
    test = open_dataset(root, "test", input_size=40, val_fraction=0.2)
    assert (len(train), len(val), len(test)) == (8, 2, 10)
    assert all(r.path.parent.parent.name == "train" for r in val.records)


def test_dataset_json_must_list_every_class_folder(tmp_path):
    root = tmp_path / "data"
    _png(root / "hand" / "a.png")
    _png(root / "foot" / "b.png")
    (root / "dataset.json").write_text(json.dumps({"classes": ["hand"]}))
    with pytest.raises(UserError, match=r"dataset.json: class folder\(s\) foot not listed"):
        open_dataset(root)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(UserError, match="dataset.json: not a readable JSON file"):
        open_dataset(root)


def test_empty_or_missing_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such data set folder"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no class folders"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "noimg" / "hand").mkdir(parents=True)
    (tmp_path / "noimg" / "hand" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        open_dataset(tmp_path / "noimg")
    _png(tmp_path / "one" / "hand" / "a.png")
    with pytest.raises(UserError, match="the val split is empty"):
        open_dataset(tmp_path / "one", "val")
    with pytest.raises(UserError, match="split: must be one of"):
        open_dataset(tmp_path / "one", "validation")
    with pytest.raises(UserError, match="val_fraction"):
        open_dataset(tmp_path / "one", val_fraction=1.5)


def test_unreadable_image_in_the_tree_is_named_when_read(tmp_path):
    root = tmp_path / "data"
    (root / "hand").mkdir(parents=True)
    (root / "hand" / "broken.png").write_bytes(b"\x89PNG not really")
    ds = open_dataset(root, input_size=40, val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(UserError, match=r"broken.png: not a readable image"):
        ds[0]


def test_xraydataset_from_records(tmp_path):
    a = _png(tmp_path / "a.png", shape=(16, 16), value=255)
    ds = XrayDataset([Record(a, 1)], ["x", "y"], input_size=16, cache=False)
    x, y = ds[0]
    assert y == 1 and float(x.min()) == 1.0 and ds.labels.tolist() == [1]
    assert ds.landmark_names == {"x": [], "y": []} and ds.landmark_masks(0) == {}
    with pytest.raises(IndexError):
        ds[1]


def test_tiff_and_bmp_files_are_images_too(tmp_path):
    root = tmp_path / "data"
    (root / "knee").mkdir(parents=True)
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(root / "knee" / "a.tif")
    Image.fromarray(np.full((20, 20), 51, dtype=np.uint8)).save(root / "knee" / "b.bmp")
    ds = open_dataset(root, input_size=20, val_fraction=0.0, test_fraction=0.0)
    assert [r.path.suffix for r in ds.records] == [".tif", ".bmp"] and not ds.report.skipped
    assert float(ds[0][0].max()) == pytest.approx(round(40000 / 65535 * 255) / 255)  # 16-bit TIFF by bit depth
    assert float(ds[1][0].max()) == pytest.approx(51 / 255)
