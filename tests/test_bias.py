"""The bias worked example at a tiny scale: a net trained on phantoms with a class-specific lead marker
(`--bias marker`, train and val only) loses accuracy on the clean test split, and its heat maps on the
biased validation images sit on the marker rather than on the anatomical landmarks."""

import shutil

import pytest

from xraydeconv.evaluate import EvalOptions, evaluate
from xraydeconv.train import TrainConfig, train

# two anatomically close classes at 32 px: the marker is the easiest cue there is
CLASSES = ("thoracic-spine", "lumbar-spine")


@pytest.fixture(scope="module")
def biased_run(tmp_path_factory):
    from xraydeconv.data.phantoms import generate

    base = tmp_path_factory.mktemp("bias")
    src = generate(base / "all", per_class=24, size=32, seed=1, bias="marker", val_per_class=12,
                   test_per_class=12, progress=False)
    root = base / "two"
    for split in ("train", "val", "test"):
        for c in CLASSES:
            shutil.copytree(src / split / c, root / split / c)
    cfg = TrainConfig(model="shallow", epochs=6, batch_size=8, lr=3e-3, input_size=32, data=str(root),
                      checkpoint_every=0, seed=0, augment=False)
    train(cfg, base / "run", progress=False, log=lambda s: None)
    opts = dict(top_n=8, max_misclassified=0)
    val = evaluate(base / "run" / "best.pt", base / "ev-val", data=root, options=EvalOptions(split="val", **opts),
                   progress=False)
    test = evaluate(base / "run" / "best.pt", base / "ev-test", data=root, options=EvalOptions(split="test", **opts),
                    progress=False)
    return val, test


def test_marker_only_in_the_biased_splits(biased_run):
    val, test = biased_run
    assert val["landmarks"]["marker"]["n"] == val["data"]["images"] == 24
    assert test["landmarks"]["marker"] is None


def test_accuracy_drops_on_the_clean_split(biased_run):
    val, test = biased_run
    # at this scale the net learns the anatomy too, so the drop is small; the documented 128 px run shows it large
    assert val["accuracy"] > test["accuracy"], (val["accuracy"], test["accuracy"])


def test_heat_sits_on_the_marker(biased_run):
    val, test = biased_run
    marker, landmarks = val["landmarks"]["marker"], val["landmarks"]["overall"]
    # the hottest pixel lands on the marker more often than on all the anatomical landmarks together
    assert marker["pointing_game"] > landmarks["pointing_game"]
    # and the marker receives more heat than its area would get from a uniform map
    assert marker["mass_over_area"] > 1.0
