"""Landmark sets: the reader of landmark_sets.json, the masks of a set, and the phantoms' discriminative set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xraydeconv.data import open_dataset
from xraydeconv.data.classes import CLASS_NAMES
from xraydeconv.data.landmarks import (
    ALL_SET,
    LANDMARK_SETS_FILE,
    landmark_set_masks,
    read_landmark_sets,
    set_mask_files,
)
from xraydeconv.data.phantoms import CLASS_LANDMARKS, LANDMARK_SETS, SET_LANDMARKS, generate, render_landmark_sets
from xraydeconv.data.phantoms.anatomy import REGIONS, arm, leg, pelvis_bones
from xraydeconv.data.phantoms.shapes import Canvas, Pose
from xraydeconv.data.phantoms.views import VIEWS, set_keys
from xraydeconv.data.preprocess import Letterbox
from xraydeconv.errors import UserError
from xraydeconv.metrics import landmark_union, pointing_game

NAMES = {"knee": ["patella", "joint-space"], "hand": ["phalanges"]}


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


# --- the reader ---------------------------------------------------------------------------------------------------


def test_without_the_file_there_is_only_the_set_all(tmp_path):
    assert read_landmark_sets(tmp_path, NAMES) == {"all": NAMES}
    assert read_landmark_sets(None, NAMES) == {"all": NAMES}


def test_the_file_adds_sets_and_may_restate_all(tmp_path):
    (tmp_path / LANDMARK_SETS_FILE).write_text(json.dumps({"discriminative": {"knee": ["patella"]}}))
    assert read_landmark_sets(tmp_path, NAMES) == {"all": NAMES, "discriminative": {"knee": ["patella"], "hand": []}}
    (tmp_path / LANDMARK_SETS_FILE).write_text(json.dumps({"all": {"knee": ["patella"], "hand": ["phalanges"]},
                                                          "wide": {"hand": ["phalanges", "carpals"]}}))
    assert read_landmark_sets(tmp_path, NAMES) == {"all": {"knee": ["patella"], "hand": ["phalanges"]},
                                                   "wide": {"knee": [], "hand": ["phalanges", "carpals"]}}


@pytest.mark.parametrize("text, why", [
    ("{not json", "not a readable JSON file"),
    ("[1, 2]", "expected a JSON object"),
    ('{"../up": {}}', "set name '../up'"),
    ('{"": {}}', "set name ''"),
    ('{"d": ["knee"]}', "set 'd' must map class names"),
    ('{"d": {"elbow": ["olecranon"]}}', "class\\(es\\) elbow not in the data set"),
    ('{"d": {"knee": "patella"}}', "set 'd', class 'knee' must be a list of landmark names"),
    ('{"d": {"knee": ["a/b"]}}', "must be a list of landmark names"),
    ('{"d": {"knee": ["patella", "patella"]}}', "names a landmark twice"),
])
def test_bad_files_are_user_errors_naming_the_file(tmp_path, text, why):
    (tmp_path / LANDMARK_SETS_FILE).write_text(text)
    with pytest.raises(UserError, match=f"^{tmp_path / LANDMARK_SETS_FILE}: .*{why}"):
        read_landmark_sets(tmp_path, NAMES)


# --- masks of a set -----------------------------------------------------------------------------------------------


@pytest.fixture
def folder_with_sets(tmp_path) -> Path:
    """A 2-class ImageFolder with 20x40 films, one "all" mask and one mask of the set "deciding" per film."""
    root = tmp_path / "data"
    for split in ("train", "test"):
        for c in NAMES:
            img = _png(root / split / c / "a.png", np.full((20, 40), 100))
            lm = img.with_name("a.landmarks")
            _png(lm / f"{NAMES[c][0]}.png", np.pad(np.full((20, 10), 255), ((0, 0), (0, 30))))
            _png(lm / "deciding" / "tip.png", np.pad(np.full((5, 8), 255), ((15, 0), (32, 0))))
    (root / LANDMARK_SETS_FILE).write_text(json.dumps({"deciding": {"knee": ["tip"], "hand": ["tip"]}}))
    return root


def test_mask_files_of_a_set(folder_with_sets):
    img = folder_with_sets / "test" / "knee" / "a.png"
    assert set_mask_files(img, ALL_SET) == {"patella": img.with_name("a.landmarks") / "patella.png"}
    assert set_mask_files(img, "deciding") == {"tip": img.with_name("a.landmarks") / "deciding" / "tip.png"}
    assert set_mask_files(img, "other") == {}


def test_masks_of_a_set_are_letterboxed_like_the_image(folder_with_sets):
    ds = open_dataset(folder_with_sets, "test", input_size=32, cache=False)
    i = [r.label for r in ds.records].index(ds.class_names.index("knee"))
    full = np.zeros((20, 40), bool)
    full[15:, 32:] = True
    got = landmark_set_masks(ds, i, "deciding")
    assert list(got) == ["tip"]
    np.testing.assert_array_equal(got["tip"], Letterbox.fit(20, 40, 32).apply_mask(full))
    assert got["tip"].sum() == 4 * 6  # 5x8 pixels at a scale of 0.8 (nearest neighbour)
    all_masks = landmark_set_masks(ds, i, ALL_SET)
    assert list(all_masks) == ["patella"]
    np.testing.assert_array_equal(all_masks["patella"], ds.landmark_masks(i)["patella"])


def test_masks_of_a_set_refuse_undeclared_sets_and_landmarks(folder_with_sets):
    ds = open_dataset(folder_with_sets, "test", input_size=32, cache=False)
    with pytest.raises(UserError, match="landmark set 'nope': not declared in .*landmark_sets.json.*all, deciding"):
        landmark_set_masks(ds, 0, "nope")
    (folder_with_sets / LANDMARK_SETS_FILE).write_text(json.dumps({"deciding": {"knee": ["tip"]}}))
    hand = [r.label for r in ds.records].index(ds.class_names.index("hand"))
    with pytest.raises(UserError, match=r"hand/a.landmarks/deciding/tip.png: landmark 'tip' is not in set 'deciding' "
                                        r"for class hand \(declared: none\)"):
        landmark_set_masks(ds, hand, "deciding")


# --- the phantoms' discriminative set -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_split(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("sets") / "tree", per_class=0, test_per_class=15, size=64, seed=3,
                    splits=("test",), workers=1, progress=False)


def test_phantom_tree_declares_both_sets(test_split):
    declared = json.loads((test_split / LANDMARK_SETS_FILE).read_text())
    assert list(declared) == list(LANDMARK_SETS) == ["all", "discriminative"]
    assert declared == SET_LANDMARKS
    assert declared["all"] == json.loads((test_split / "dataset.json").read_text())["landmarks"] == CLASS_LANDMARKS
    ds = open_dataset(test_split, "test", input_size=64, cache=False)
    assert read_landmark_sets(ds.root, ds.landmark_names) == declared
    for c in CLASS_NAMES:
        assert 1 <= len(declared["discriminative"][c]) <= 3, c
        assert "marker" not in declared["discriminative"][c]


def test_every_film_has_masks_of_its_discriminative_landmarks(test_split):
    ds = open_dataset(test_split, "test", input_size=64, cache=False)
    sets = read_landmark_sets(ds.root, ds.landmark_names)
    complete = {c: 0 for c in CLASS_NAMES}
    for i, rec in enumerate(ds.records):
        cls = ds.class_names[rec.label]
        masks = landmark_set_masks(ds, i, "discriminative", sets)
        assert masks, f"{rec.path}: no discriminative mask"
        assert set(masks) <= set(sets["discriminative"][cls])
        complete[cls] += len(masks) == len(sets["discriminative"][cls])
    # pose and collimation cut a small structure off now and then (the odontoid at the top of a neck film)
    assert min(complete.values()) >= 8, complete


# structures of the discriminative set that no landmark of the set "all" names for the class
NOT_IN_ALL = {("whole-body", "knees"), ("upper-leg", "trochanters"), ("foot", "sesamoids"), ("ankle", "calcaneus")}


def _canvas(class_name: str, seed: int) -> Canvas:
    """The class's anatomy drawn with one mask per structure key, at the view's pose (no film, no collimation)."""
    view = VIEWS[class_name]
    keys = {k: k for s in LANDMARK_SETS for k in set_keys(view, s)}
    cv = Canvas(Pose(96, scale=view.zoom, angle=view.angle, ox=view.origin[0], oy=view.origin[1]), keep=keys)
    rng = np.random.default_rng(seed)
    for region in view.draw:
        name, _, side = region.partition(":")
        if name in ("arm", "leg"):
            (arm if name == "arm" else leg)(cv, rng, int(side))
        elif name == "pelvis" and side:
            pelvis_bones(cv, rng, sides=(int(side),))
        else:
            REGIONS[name](cv, rng)
    return cv


def _union(cv: Canvas, keys: dict[str, str], name: str) -> np.ndarray:
    out = np.zeros((cv.size, cv.size), bool)
    for k, n in keys.items():
        if n == name and k in cv.masks:
            out |= cv.masks[k]
    return out


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_discriminative_masks_lie_inside_the_anatomy(class_name):
    cv = _canvas(class_name, seed=5)
    view = VIEWS[class_name]
    named = np.zeros((cv.size, cv.size), bool)
    for name in CLASS_LANDMARKS[class_name]:
        named |= _union(cv, view.landmarks, name)
    for name in SET_LANDMARKS["discriminative"][class_name]:
        mask = _union(cv, view.discriminative, name)
        assert mask.sum() >= 3, f"{class_name}/{name}: not drawn at the view's pose"
        if (class_name, name) in NOT_IN_ALL:
            assert not (mask & named).all()  # a structure of its own ...
            assert (cv.att[mask] > 0).all(), f"{class_name}/{name}: outside the body"  # ... of bone in the body
        else:  # the same structure as a landmark of "all", or a part of one (the thumb of the phalanges)
            assert not (mask & ~named).any(), f"{class_name}/{name}: outside the class's named landmarks"


def test_rendering_the_sets_keeps_the_film_and_the_all_masks():
    from xraydeconv.data.phantoms import render_phantom

    for class_name, bias in (("hand", None), ("cervical-spine", "marker"), ("foot", None)):
        image, sets = render_landmark_sets(class_name, np.random.default_rng(9), 64, bias=bias)
        image2, masks = render_phantom(class_name, np.random.default_rng(9), 64, bias=bias)
        np.testing.assert_array_equal(image, image2)
        assert list(sets) == ["all", "discriminative"] and list(sets["all"]) == list(masks)
        for name in masks:
            np.testing.assert_array_equal(sets["all"][name], masks[name])
        assert ("marker" in sets["all"]) == (bias == "marker") and "marker" not in sets["discriminative"]


# --- the film-brightness baseline ---------------------------------------------------------------------------------


def _film_points_at(film: np.ndarray, mask: np.ndarray) -> float:
    """Independent pointing game of the film used as its own heat map: is a brightest pixel inside the mask?"""
    if film.max() == film.min():
        return 0.0
    return float(mask[film == film.max()].any())


def test_film_baseline_points_far_less_often_at_the_discriminative_landmarks(test_split):
    ds = open_dataset(test_split, "test", input_size=64, cache=False)
    sets = read_landmark_sets(ds.root, ds.landmark_names)
    scores: dict[str, list[float]] = {s: [] for s in sets}
    for i in range(len(ds)):
        film = ds[i][0][0].numpy()
        for s in sets:
            union = landmark_union(landmark_set_masks(ds, i, s, sets), film.shape)
            pg = float(pointing_game(film[None], union[None])[0])
            assert pg == _film_points_at(film, union)
            scores[s].append(pg)
    all_pg, disc_pg = np.mean(scores["all"]), np.mean(scores["discriminative"])
    assert len(scores["all"]) == len(ds) == 24 * 15
    # 360 films at 64 px (seed 3): the film points at one of the class's landmarks in 74.7 % of the films,
    # at one of its discriminative landmarks in 32.5 %
    assert round(100 * all_pg, 1) == pytest.approx(74.7)
    assert round(100 * disc_pg, 1) == pytest.approx(32.5)
