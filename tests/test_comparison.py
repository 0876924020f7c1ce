"""`evaluate --methods ... --sanity`: the method table, its film baseline and gains, the landmark sets, and the
randomisation test with its controls."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from xraydeconv.data.classes import CLASS_NAMES
from xraydeconv.errors import UserError
from xraydeconv.explain.methods import explainer
from xraydeconv.metrics.sanity import model_randomisation_test
from xraydeconv.reports.comparison import COMPARED, FILM, MethodComparison, parse_methods, score_rows
from xraydeconv.reports.evaluate import EvalOptions, evaluate
from xraydeconv.reports.randomisation import randomisation_summary, run_randomisation
from xraydeconv.training.checkpoint import save_checkpoint
from xraydeconv.training.models import build

SIZE = 64


@pytest.fixture
def phantoms(marker_phantoms) -> Path:
    return marker_phantoms


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    m = build("shallow", num_classes=len(CLASS_NAMES), input_size=SIZE).eval()
    path = tmp_path_factory.mktemp("ck") / "shallow.pt"
    save_checkpoint(path, m, model_name="shallow", class_names=list(CLASS_NAMES), input_size=SIZE,
                    config={"input_size": SIZE}, epoch=1)
    return path


def test_parse_methods():
    assert parse_methods("guided,deconvnet") == ("guided", "deconvnet", FILM)
    assert parse_methods("film,gradcam") == ("gradcam", FILM)
    assert parse_methods("all") == COMPARED + (FILM,)
    assert FILM not in COMPARED and "occlusion" in COMPARED
    for bad, why in (("guided,nope", "unknown method 'nope'"), ("guided,guided", "named twice"),
                     ("", "comma-separated"), ("guided,", "comma-separated")):
        with pytest.raises(UserError, match=why):
            parse_methods(bad)


def test_comparison_by_hand():
    """Four 4x4 films: the method's hottest pixel lies on the landmark in 3, the film's in 1."""
    masks = [{"a": np.zeros((4, 4), bool)} for _ in range(4)]
    for m in masks:
        m["a"][0, 0] = True
    disc = [{"d": np.zeros((4, 4), bool)} for _ in range(4)]
    for m in disc:
        m["d"][3, 3] = True
    masks[0]["marker"] = np.zeros((4, 4), bool)
    masks[0]["marker"][3, 3] = True
    method = torch.zeros(4, 4, 4)
    method[:3, 0, 0] = 1.0
    method[3, 3, 3] = 1.0
    film = torch.zeros(4, 4, 4)
    film[0, 0, 0] = 1.0
    film[1:, 3, 3] = 1.0
    comp = MethodComparison(("deconvnet", FILM), ("all", "discriminative"))
    comp.add("deconvnet", method, {"all": masks, "discriminative": disc}, seconds=2.0)
    comp.add(FILM, film, {"all": masks, "discriminative": disc})
    table = comp.result()
    d, f = table["rows"]["deconvnet"], table["rows"][FILM]
    assert d["all"]["pointing_game"] == 0.75 and f["all"]["pointing_game"] == 0.25
    assert d["all"]["pointing_game_gain"] == pytest.approx(0.5) and f["all"]["pointing_game_gain"] == 0.0
    assert d["discriminative"]["pointing_game"] == 0.25 and f["discriminative"]["pointing_game"] == 0.75
    assert d["discriminative"]["pointing_game_gain"] == pytest.approx(-0.5)
    assert d["marker"]["n"] == 1 and d["marker"]["pointing_game"] == 0.0 and f["marker"]["pointing_game"] == 0.0
    # all the heat on one pixel: relevance mass is the pointing game, the area share 1/16
    assert d["all"]["mass_over_area"] == pytest.approx(0.75 * 16)
    assert d["all"]["mass_gain"] == pytest.approx(3.0)
    assert d["seconds_per_image"] == 0.5
    # rows scored already by the caller are taken as they are, the other sets scored here
    union = np.stack([m["a"] for m in masks])
    again = MethodComparison(("deconvnet", FILM), ("all", "discriminative"))
    again.add("deconvnet", method, {"all": masks, "discriminative": disc}, seconds=2.0,
              scored={"all": score_rows(method, union), "marker": score_rows(method[:1], masks[0]["marker"][None])})
    again.add(FILM, film, {"all": masks, "discriminative": disc}, scored={"all": score_rows(film, union)})
    assert json.dumps(again.result()) == json.dumps(table)  # NaN gains too
    fake = MethodComparison(("deconvnet", FILM))
    fake.add("deconvnet", method, {"all": masks}, scored={"all": np.tile([1.0, 0.5, 0.5, 0.25], (4, 1))})
    assert fake.result()["rows"]["deconvnet"]["all"]["pointing_game"] == 1.0
    assert fake.result()["rows"]["deconvnet"]["marker"]["n"] == 1  # not given: scored


def test_randomisation_controls_and_summary():
    """The film is a perfect positive control (similarity 1 after every step); the gradient's maps drop."""
    torch.manual_seed(0)
    model = build("shallow", num_classes=24, input_size=SIZE).eval()
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    res = run_randomisation(model, x, [0, 1, 2], ["gradient", FILM], {"gradient": {"top_n": 3}})
    s = randomisation_summary(res)
    assert [r["spearman"] for r in s[FILM]["cascading"]] == [1.0] * 4
    assert s[FILM]["final"]["ssim"] == pytest.approx(1.0) and s[FILM]["final"]["topk"] == 1.0
    assert s["gradient"]["final"]["spearman"] < 0.5
    direct = model_randomisation_test(model, explainer("gradient", top_n=3), x, order="independent")
    assert s["gradient"]["independent"] == direct.summary()
    assert res["gradient"]["cascading"].maps.shape == (5, 1, SIZE, SIZE)  # trained + 4 layers, first film


def test_evaluate_methods_and_sanity(phantoms, ckpt, tmp_path, capsys):
    out = tmp_path / "ev"
    code, _, err = run_cli(["evaluate", "--checkpoint", ckpt, "--data", phantoms, "--split", "val", "--out", out,
                          "--methods", "deconvnet,guided,gradcam,occlusion", "--sanity", "--sanity-images", "2",
                          "--top-n", "4", "--limit", "6", "--max-misclassified", "1", "--quiet"], capsys)
    assert code == 0, err
    r = json.loads((out / "report.json").read_text())
    table, lm = r["methods"], r["landmarks"]
    assert table["methods"] == ["deconvnet", "guided", "gradcam", "occlusion", FILM]
    assert table["sets"] == ["all", "discriminative"]
    rows = table["rows"]
    # the deconvnet row scores the very map of the landmark table, the film row its baseline
    for key in ("pointing_game", "relevance_mass", "area_share", "n"):
        assert rows["deconvnet"]["all"][key] == lm["overall"][key]
        assert rows[FILM]["all"][key] == lm["baseline_image"][key]
        assert rows["guided"]["marker"][key] is not None
    for row in rows.values():
        assert row["all"]["pointing_game_gain"] == pytest.approx(
            row["all"]["pointing_game"] - rows[FILM]["all"]["pointing_game"])
        assert row["discriminative"]["n"] == 6 and row["marker"]["n"] == lm["marker"]["n"]
    sanity = r["sanity"]
    assert sanity["images"] == 2 and set(sanity["methods"]) == set(table["methods"])
    assert sanity["methods"][FILM]["final"]["spearman"] == 1.0 and rows[FILM]["randomised"]["spearman"] == 1.0
    layers = [row["layer"] for row in sanity["methods"]["guided"]["cascading"]]
    assert layers == ["classifier.3", "features.6", "features.3", "features.0"]
    for name in ("sanity.png", "sanity_curves.png"):
        assert (out / name).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "## Methods compared" in md and "| occlusion |" in md and "## Sanity check" in md
    assert "Methods compared" in (out / "index.html").read_text()


@pytest.mark.parametrize("args, message", [
    (["--methods", "deconvnet,frobnicate"], "error: --methods 'deconvnet,frobnicate': unknown method 'frobnicate'"),
    (["--sanity-images", "0"], "error: --sanity-images 0: must be at least 1"),
    (["--sanity", "--no-landmarks"], "error: --sanity: the randomisation test runs on the films with landmarks"),
])
def test_bad_method_options_are_one_line(phantoms, ckpt, tmp_path, capsys, args, message):
    out = tmp_path / "ev"
    code, _, err = run_cli(["evaluate", "--checkpoint", ckpt, "--data", phantoms, "--out", out, *args], capsys)
    assert code == 2 and err.strip().startswith(message) and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_default_evaluation_compares_deconvnet_with_the_film(phantoms, ckpt, tmp_path):
    r = evaluate(ckpt, tmp_path / "ev", phantoms, EvalOptions(top_n=4, limit=4, examples=0), progress=False)
    assert r["methods"]["methods"] == ["deconvnet", FILM] and r["sanity"] is None


def test_explainer_reuses_its_deconvnet_across_in_place_changes(monkeypatch):
    """The randomisation test changes one copy in place: the explainer builds one DeconvNet for it, and its maps
    still follow the changed weights exactly."""
    from xraydeconv.explain import methods

    torch.manual_seed(0)
    model = build("deeper", num_classes=24, input_size=SIZE).eval()
    x = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    built = []
    real = methods.DeconvNet
    monkeypatch.setattr(methods, "DeconvNet", lambda m: built.append(m) or real(m))
    explain = explainer("guided", top_n=3)
    before = explain(model, x)
    with torch.no_grad():
        model.features[0].weight.mul_(-1.5)  # in place, as reset_parameters and load_state_dict do
    after = explain(model, x)
    assert built == [model]
    assert torch.equal(after, methods.heat_maps(model, x, "guided", top_n=3))  # a fresh DeconvNet
    assert not torch.equal(before, after)
    other = build("deeper", num_classes=24, input_size=SIZE).eval()
    explain(other, x)
    assert len(built) == 3 and built[2] is other
