"""Synthetic phantoms: rendering, landmarks, determinism, the tree on disk, the marker bias, the cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xraydeconv.data.classes import CLASS_NAMES
from xraydeconv.data.phantoms import (
    CLASS_LANDMARKS,
    GENERATOR,
    default_cache_dir,
    ensure_phantoms,
    generate,
    render_phantom,
    split_counts,
)
from xraydeconv.data.phantoms.marker import marker_for
from xraydeconv.data.phantoms.views import VIEWS
from xraydeconv.errors import UserError


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("ph") / "tree", per_class=3, size=64, seed=7, workers=1,
                    progress=False)


def test_views_cover_the_24_classes_in_label_order_with_at_least_two_landmarks():
    assert tuple(VIEWS) == CLASS_NAMES
    assert tuple(CLASS_LANDMARKS) == CLASS_NAMES
    for name, landmarks in CLASS_LANDMARKS.items():
        assert len(landmarks) >= 2, name
        assert len(set(landmarks)) == len(landmarks), name
        assert "marker" not in landmarks


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_render_every_class(class_name):
    rng = np.random.default_rng(3)
    image, masks = render_phantom(class_name, rng, 96)
    assert image.shape == (96, 96) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image.std() > 0.05, "a film, not a flat field"
    assert set(masks) <= set(CLASS_LANDMARKS[class_name])
    assert len(masks) >= 2, f"{class_name}: landmarks {sorted(masks)}"
    for name, mask in masks.items():
        assert mask.shape == (96, 96) and mask.dtype == bool
        assert mask.any(), name
        assert mask.mean() < 0.9, f"{name} covers the whole film"


def test_landmarks_present_in_most_films():
    # pose and collimation may cut a structure off now and then, but the class's anatomy stays in view
    rng = np.random.default_rng(11)
    for class_name in CLASS_NAMES:
        complete = sum(len(render_phantom(class_name, rng, 96)[1]) == len(CLASS_LANDMARKS[class_name])
                       for _ in range(6))
        assert complete >= 4, class_name


def test_bone_attenuates_more_than_soft_tissue_and_the_film_shows_it():
    from xraydeconv.data.phantoms.anatomy import arm
    from xraydeconv.data.phantoms.film import develop
    from xraydeconv.data.phantoms.shapes import Canvas, Pose

    view = VIEWS["hand"]
    canvas = Canvas(Pose(128, scale=view.zoom, angle=180, ox=view.origin[0], oy=view.origin[1]), keep=view.landmarks)
    arm(canvas, np.random.default_rng(0), -1)
    bone = canvas.masks["metacarpals"] | canvas.masks["phalanges"]
    soft = (canvas.att > 0) & ~bone & ~canvas.masks["carpal-bones"]
    assert canvas.att[bone].mean() > 1.5 * canvas.att[soft].mean()
    film = develop(canvas.att, np.random.default_rng(1), (0, 0, 128, 128))
    assert film[bone].mean() > film[soft].mean() + 0.1 > film[canvas.att == 0].mean() + 0.2


def test_render_is_a_function_of_the_rng_state():
    a, ma = render_phantom("knee", np.random.default_rng(42), 64)
    b, mb = render_phantom("knee", np.random.default_rng(42), 64)
    c, _ = render_phantom("knee", np.random.default_rng(43), 64)
    assert np.array_equal(a, b) and ma.keys() == mb.keys()
    assert all(np.array_equal(ma[k], mb[k]) for k in ma)
    assert not np.array_equal(a, c)


def test_films_vary_within_a_class():
    rng = np.random.default_rng(5)
    films = np.stack([render_phantom("chest", rng, 64)[0] for _ in range(6)])
    assert films.std(axis=0).mean() > 0.05


def test_render_rejects_unknown_class_and_bias():
    with pytest.raises(UserError, match="not one of the 24"):
        render_phantom("tail", np.random.default_rng(0), 64)
    with pytest.raises(UserError, match="bias"):
        render_phantom("hand", np.random.default_rng(0), 64, bias="ruler")


def test_marker_bias_draws_a_small_bright_class_specific_marker():
    from xraydeconv.data.phantoms.marker import _GLYPHS

    letters = [marker_for(label)[0] for label in range(len(CLASS_NAMES))]
    places = [marker_for(label)[1] for label in range(len(CLASS_NAMES))]
    assert len(set(letters)) == len(set(places)) == len(CLASS_NAMES)
    assert all(len(g) == 7 and all(len(row) == 5 for row in g) for g in _GLYPHS.values())
    assert len({g for g in _GLYPHS.values()}) == len(_GLYPHS), "every letter looks different"
    image, masks = render_phantom("hand", np.random.default_rng(1), 128, bias="marker")
    marker = masks["marker"]
    assert 0 < marker.sum() < 0.03 * marker.size
    assert image[marker].max() > 0.9


def test_tree_layout_and_manifest(small_tree):
    meta = json.loads((small_tree / "dataset.json").read_text())
    assert meta == {
        "format": "xraydeconv-phantoms", "version": 1, "generator": GENERATOR, "classes": list(CLASS_NAMES),
        "landmarks": {c: CLASS_LANDMARKS[c] for c in CLASS_NAMES}, "size": 64, "seed": 7,
        "per_class": {"train": 3, "val": 2, "test": 2}, "bias": None,
    }
    for split, n in meta["per_class"].items():
        for class_name in CLASS_NAMES:
            folder = small_tree / split / class_name
            images = sorted(p.name for p in folder.glob("*.png"))
            assert images == [f"{i:06d}.png" for i in range(n)]
            for name in images:
                with Image.open(folder / name) as im:
                    assert im.mode == "L" and im.size == (64, 64)
                masks = sorted((folder / name.replace(".png", ".landmarks")).glob("*.png"))
                assert masks, f"{split}/{class_name}/{name} has no landmark masks"
                for mask_path in masks:
                    assert mask_path.stem in meta["landmarks"][class_name]
                    with Image.open(mask_path) as im:
                        assert im.mode == "L" and im.size == (64, 64)
                        values = np.unique(np.asarray(im))
                    assert set(values.tolist()) <= {0, 255} and 255 in values
    # only the output lock (an empty file, see xraydeconv.io.output_lock) stays beside the tree
    hidden = [p.name for p in small_tree.parent.iterdir() if p.name.startswith(".")]
    assert hidden == [f".{small_tree.name}.lock"], "temporary folder left behind"


def test_same_seed_gives_byte_identical_trees_whatever_the_workers(tmp_path, small_tree):
    again = generate(tmp_path / "again", per_class=3, size=64, seed=7, workers=2, progress=False)
    assert _tree_digest(again) == _tree_digest(small_tree)
    other = generate(tmp_path / "other", per_class=3, size=64, seed=8, splits=("test",), progress=False)
    assert _tree_digest(other)["test/hand/000000.png"] != _tree_digest(small_tree)["test/hand/000000.png"]


def test_bias_marker_only_in_train_and_val(tmp_path, small_tree):
    biased = generate(tmp_path / "biased", per_class=3, size=64, seed=7, bias="marker", progress=False)
    assert json.loads((biased / "dataset.json").read_text())["bias"] == "marker"
    for split in ("train", "val"):
        for class_name in CLASS_NAMES:
            for image in (biased / split / class_name).glob("*.png"):
                assert (image.with_suffix(".landmarks") / "marker.png").is_file()
    assert not list(biased.glob("test/*/*.landmarks/marker.png"))
    # the test split is the clean one: identical to the test split of the unbiased tree
    clean, dirty = _tree_digest(small_tree), _tree_digest(biased)
    assert {k: v for k, v in dirty.items() if k.startswith("test/")} == \
        {k: v for k, v in clean.items() if k.startswith("test/")}


def test_refuses_non_empty_out_unless_forced(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        generate(out, per_class=1, size=32, splits=("test",), progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    generate(out, per_class=1, size=32, splits=("test",), force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "dataset.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".busy.lock", "busy"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"size": 8}, "size"), ({"size": 4096}, "size"), ({"per_class": -1}, "train"),
    ({"test_per_class": -2}, "test"), ({"bias": "ruler"}, "bias"), ({"splits": ("train", "holdout")}, "split"),
    ({"seed": -1}, "seed"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        generate(tmp_path / "x", **{"per_class": 1, "progress": False, **kwargs})
    assert not (tmp_path / "x").exists()


def test_split_counts():
    assert split_counts(200) == {"train": 200, "val": 40, "test": 40}
    assert split_counts(3) == {"train": 3, "val": 2, "test": 2}
    assert split_counts(10, 1, 0, splits=("train", "val")) == {"train": 10, "val": 1, "test": 0}


def test_ensure_phantoms_reuses_identical_tree_and_regenerates_other(tmp_path, monkeypatch):
    monkeypatch.setenv("XRAYDECONV_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir(5, 32, 1, "marker") == tmp_path / "cache" / "phantoms-32-5-1-marker"
    path = ensure_phantoms(per_class=2, size=32, seed=1, splits=("test",), progress=False)
    assert path == tmp_path / "cache" / "phantoms-32-2-1"
    stamp = (path / "dataset.json").stat().st_mtime_ns
    assert ensure_phantoms(per_class=2, size=32, seed=1, splits=("test",), progress=False) == path
    assert (path / "dataset.json").stat().st_mtime_ns == stamp
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert left == [".phantoms-32-2-1.lock", "phantoms-32-2-1"], "nothing but the lock left beside the tree"
    ensure_phantoms(path, per_class=2, size=32, seed=1, splits=("test",), test_per_class=3, progress=False)
    assert len(list((path / "test" / "hand").glob("*.png"))) == 3
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("not a data set")
    with pytest.raises(UserError, match="not a phantom data set"):
        ensure_phantoms(stranger, per_class=1, size=32, progress=False)


def test_ensure_phantoms_regenerates_a_tree_drawn_by_other_generator_code(tmp_path):
    path = ensure_phantoms(tmp_path / "tree", per_class=1, size=32, seed=3, splits=("test",), progress=False)
    meta_file = path / "dataset.json"
    meta = json.loads(meta_file.read_text())
    assert meta["generator"] == GENERATOR
    meta["generator"] = "0" * 16  # as if written by an older release of the generator
    meta_file.write_text(json.dumps(meta))
    ensure_phantoms(path, per_class=1, size=32, seed=3, splits=("test",), progress=False)
    assert json.loads(meta_file.read_text())["generator"] == GENERATOR


def _ensure_in_child(root: str, queue, barrier) -> None:
    barrier.wait(timeout=60)  # all start together, so they really race
    try:
        queue.put(str(ensure_phantoms(root, per_class=4, size=32, seed=2, splits=("test",), test_per_class=8,
                                      workers=1, progress=False)))
    except Exception as exc:  # the parent reports it
        queue.put(repr(exc))


def test_ensure_phantoms_is_safe_when_processes_race(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue, barrier = ctx.Queue(), ctx.Barrier(3)
    root = tmp_path / "shared"
    procs = [ctx.Process(target=_ensure_in_child, args=(str(root), queue, barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert results == [str(root)] * 3
    assert len(list(root.glob("test/*/*.png"))) == 24 * 8


def test_tree_gets_the_permissions_of_any_new_folder(small_tree):
    import stat

    probe = small_tree.parent / "probe"
    probe.mkdir()
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.rmdir()
    assert stat.S_IMODE(small_tree.stat().st_mode) == mode


def test_films_and_landmark_masks_keep_their_pixels(tmp_path):
    # `make demo` reproduces its tables bit for bit only while the generator draws the same pixels: the digest of
    # one test film per class at 64 px and of its landmark masks (decoded pixels, so the PNG encoder does not
    # matter) pins them. It was the same before the discriminative landmark set was added. A deliberate change of
    # the films must update this digest and the numbers in README.md.
    root = generate(tmp_path / "pin", per_class=0, test_per_class=1, size=64, seed=0, splits=("test",), workers=1,
                    progress=False)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        rel = path.relative_to(root)
        if len(rel.parts) > 4:  # the masks of another landmark set: <id>.landmarks/<set>/<name>.png
            continue
        with Image.open(path) as im:
            digest.update(rel.as_posix().encode() + b"\0" + np.asarray(im).tobytes())
    assert digest.hexdigest() == "0fe15ac7141eb8ab682bd14ffd74d38a7eda6babd26b4635dd627e2e24c7cc3d"
