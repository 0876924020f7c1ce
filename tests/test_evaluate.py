"""`xraydeconv evaluate` end to end on tiny phantoms and hand-made folders, including every kind of bad input."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xraydeconv.data.classes import CLASS_NAMES
from xraydeconv.errors import UserError
from xraydeconv.reports.evaluate import MARKER, EvalOptions, LandmarkAgreement, evaluate, render_markdown
from xraydeconv.training.checkpoint import save_checkpoint
from xraydeconv.training.models import build

SIZE = 64


def _checkpoint(path: Path, class_names, model="shallow", seed=0) -> Path:
    torch.manual_seed(seed)
    m = build(model, num_classes=len(class_names), input_size=SIZE).eval()
    save_checkpoint(path, m, model_name=model, class_names=list(class_names), input_size=SIZE,
                    config={"input_size": SIZE}, epoch=1)
    return path


@pytest.fixture
def phantoms(marker_phantoms) -> Path:
    return marker_phantoms


@pytest.fixture(scope="module")
def ckpt24(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ck") / "shallow.pt", CLASS_NAMES)


def _folder_tree(root: Path, phantoms: Path, classes=("hand", "knee"), n=2) -> Path:
    """A plain ImageFolder copy of a few phantom classes, masks included (no dataset.json)."""
    for c in classes:
        src = phantoms / "test" / c
        dst = root / "test" / c
        dst.mkdir(parents=True)
        for p in sorted(src.glob("*.png"))[:n]:
            shutil.copy(p, dst / p.name)
            shutil.copytree(src / f"{p.stem}.landmarks", dst / f"{p.stem}.landmarks")
    return root


def _scores_recomputed(ckpt_path: Path, data: Path, split: str, n: int, top_n: int) -> tuple[dict, float]:
    """The combined-map landmark scores of the first ``n`` images, straight from the library's pieces, and the
    mean area share of their marker masks."""
    from xraydeconv import metrics
    from xraydeconv.data import open_dataset
    from xraydeconv.explain.deconvnet import DeconvNet
    from xraydeconv.reports import render
    from xraydeconv.training.checkpoint import load_checkpoint

    ck = load_checkpoint(ckpt_path)
    ds = open_dataset(data, split=split, input_size=ck.input_size)
    x = torch.stack([ds[i][0] for i in range(n)])
    masks = [ds.landmark_masks(i) for i in range(n)]
    union = np.stack([metrics.landmark_union(m, (SIZE, SIZE), exclude=(MARKER,)) for m in masks])
    combined = render.heatmap(DeconvNet(ck.model).project(x, top_n=top_n).maps)
    marker_area = float(np.mean([m[MARKER].mean() for m in masks]))
    return metrics.score_landmarks(combined, union).summary(), marker_area


def test_report_on_phantoms(phantoms, ckpt24, tmp_path):
    out = tmp_path / "ev"
    opts = EvalOptions(split="val", top_n=4, batch_size=5, limit=12, max_misclassified=3, occlusion=True)
    rep = evaluate(ckpt24, out, data=phantoms, options=opts, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "examples", "index.html", "misclassified",
                                                      "report.json", "report.md"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["accuracy"] == pytest.approx(rep["accuracy"])
    conf = np.array(rep["confusion"])
    assert conf.sum() == 12 and rep["misclassified_count"] == 12 - np.trace(conf)
    assert rep["accuracy"] == pytest.approx(np.trace(conf) / 12)
    assert len(rep["misclassified"]) == min(3, rep["misclassified_count"])
    for m in rep["misclassified"]:
        folder = out / m["folder"]
        assert (folder / "overlay.png").is_file() and (folder / "grid.png").is_file()
        man = json.loads((folder / "manifest.json").read_text())
        assert man["true_class"] == m["true"] and man["predicted_class"] == m["predicted"] != m["true"]
        assert len(man["channels"]) == 4
    assert (out / "misclassified" / "index.html").is_file()
    # correctly classified examples, one per class, among the images projected anyway
    examples = json.loads((out / "examples" / "gallery.json").read_text())
    assert len(examples) == min(4, 12 - rep["misclassified_count"])
    assert all(r["manifest"]["true_class"] == r["manifest"]["predicted_class"] for r in examples)
    assert len({r["manifest"]["true_class"] for r in examples}) == len(examples)
    page = (out / "index.html").read_text()
    assert page.index("<img") < page.index("Landmark agreement")  # the page opens on pictures
    assert page.count('<div class="card') == len(rep["misclassified"]) + len(examples)

    lm = rep["landmarks"]
    assert lm["overall"]["n"] == 12 and lm["baseline_image"]["n"] == 12
    expected, marker_area = _scores_recomputed(ckpt24, phantoms, "val", 12, top_n=4)
    for key in ("pointing_game", "relevance_mass", "relevance_rank", "area_share"):
        assert lm["overall"][key] == pytest.approx(expected[key], rel=1e-9), key
    # validation images of the biased phantoms carry the marker, reported apart from the landmarks
    assert lm["marker"]["n"] == 12 and lm["marker"]["area_share"] == pytest.approx(marker_area)
    assert not any(k.endswith("/marker") for k in lm["per_landmark"])
    assert set(lm["per_class"]) <= set(CLASS_NAMES)
    assert {"all landmarks", MARKER} <= set(rep["occlusion"])
    md = (out / "report.md").read_text()
    assert "## Landmark agreement" in md and "**marker**" in md and "## Occlusion sensitivity" in md
    assert "combined top-4 map" in md


def test_clean_test_split_has_no_marker_and_tolerance_helps(phantoms, ckpt24, tmp_path):
    base = EvalOptions(split="test", top_n=3, limit=8, max_misclassified=0)
    r0 = evaluate(ckpt24, tmp_path / "a", data=phantoms, options=base, progress=False)
    r1 = evaluate(ckpt24, tmp_path / "b", data=phantoms, options=EvalOptions(**{**vars(base), "tolerance": 8}),
                  progress=False)
    assert r0["landmarks"]["marker"] is None
    o0 = r0["landmarks"]["overall"]
    assert r1["landmarks"]["overall"]["pointing_game"] >= o0["pointing_game"]
    assert r0["landmarks"]["tolerant_px"] == 4  # 15 px at 224 px, scaled to 64 px
    assert o0["pointing_game_tolerant"] >= o0["pointing_game"]
    assert r0["misclassified"] == [] and r0["occlusion"] is None


def test_agreement_accumulator_knows_the_answer():
    acc = LandmarkAgreement(["a", "b"])
    masks = []
    heats = torch.zeros(2, 3, 8, 8)
    for _ in range(2):
        lm = np.zeros((8, 8), bool)
        lm[:2, :2] = True
        mk = np.zeros((8, 8), bool)
        mk[6:, 6:] = True
        masks.append({"bone": lm, MARKER: mk})
    heats[0, :, 0, 0] = 1.0  # image 0 looks at the landmark with every filter
    heats[1, :, 7, 7] = 1.0  # image 1 looks at the marker
    images = torch.zeros(2, 8, 8)
    images[:, 6:, 6:] = 1.0  # a bright marker, dark landmarks: the brightness baseline points at the marker
    acc.add([0, 1], heats, heats.mean(1), masks, images=images)
    res = acc.result()
    assert res["baseline_image"]["pointing_game"] == 0.0 and res["baseline_image"]["relevance_mass"] == 0.0
    assert res["overall"]["pointing_game"] == 0.5 and res["overall"]["area_share"] == pytest.approx(4 / 64)
    assert res["per_class"]["a"]["relevance_mass"] == 1.0 and res["per_class"]["b"]["relevance_mass"] == 0.0
    assert res["marker"]["pointing_game"] == 0.5 and res["marker"]["relevance_mass"] == 0.5
    assert res["per_filter"]["pointing_game"] == 0.5 and res["per_filter"]["any_filter_hits"] == 0.5
    assert set(res["per_landmark"]) == {"a/bone", "b/bone"}
    assert LandmarkAgreement(["a"]).result() is None


def test_markdown_without_landmarks(tmp_path, phantoms):
    root = tmp_path / "plain"
    for c in ("hand", "knee"):
        (root / "test" / c).mkdir(parents=True)
        for p in sorted((phantoms / "test" / c).glob("*.png")):
            shutil.copy(p, root / "test" / c / p.name)
    ck = _checkpoint(tmp_path / "two.pt", ["hand", "knee"])
    rep = evaluate(ck, tmp_path / "ev", data=root, options=EvalOptions(top_n=2), progress=False)
    assert rep["landmarks"] is None
    assert "No landmark masks" in render_markdown(rep)


# --- bad input: one line, non-zero exit, nothing written -------------------------------------------------------


def _run_cli(args, capsys):
    from xraydeconv.cli.main import main

    old = sys.argv
    sys.argv = ["xraydeconv", "evaluate", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = old
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


def _assert_refused(args, out: Path, capsys, *needles):
    code, err = _run_cli([*args, "--out", out, "--quiet"], capsys)
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:")
    for n in needles:
        assert n in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}") and p.suffix != ".lock"]


def test_classes_differ(tmp_path, phantoms, capsys):
    root = _folder_tree(tmp_path / "data", phantoms)
    ck = _checkpoint(tmp_path / "other.pt", ["hand", "skull"])
    _assert_refused(["--checkpoint", ck, "--data", root], tmp_path / "ev", capsys, "other.pt",
                    "1 of its 2 classes are not among the 2 classes", "(not in the checkpoint: knee)")


def test_mask_of_the_wrong_size(tmp_path, phantoms, capsys):
    root = _folder_tree(tmp_path / "data", phantoms)
    bad = sorted((root / "test" / "knee").glob("*.landmarks"))[1] / "patella.png"
    Image.fromarray(np.zeros((SIZE // 2, SIZE), np.uint8)).save(bad)
    ck = _checkpoint(tmp_path / "two.pt", ["hand", "knee"])
    _assert_refused(["--checkpoint", ck, "--data", root], tmp_path / "ev", capsys, str(bad), "mask is")


def test_mask_for_an_unknown_landmark(tmp_path, phantoms, capsys):
    root = _folder_tree(tmp_path / "data", phantoms)
    meta = {"format": "imagefolder", "classes": ["hand", "knee"],
            "landmarks": {"hand": ["phalanges", "metacarpals", "carpal-bones"],
                          "knee": ["patella", "joint-space", "femoral-condyles", "tibial-plateau"]}}
    # only the landmark names matter here; keep whatever the phantoms call their knee landmarks
    knee_names = sorted({p.stem for p in (root / "test" / "knee").glob("*.landmarks/*.png")})
    meta["landmarks"]["knee"] = knee_names
    (root / "dataset.json").write_text(json.dumps(meta))
    folder = sorted((root / "test" / "hand").glob("*.landmarks"))[0]
    bogus = folder / "sella.png"
    shutil.copy(folder / "phalanges.png", bogus)
    ck = _checkpoint(tmp_path / "two.pt", ["hand", "knee"])
    _assert_refused(["--checkpoint", ck, "--data", root], tmp_path / "ev", capsys, str(bogus), "unknown landmark")


def test_box_csv_with_bad_rows(tmp_path, phantoms, capsys):
    root = _folder_tree(tmp_path / "data", phantoms)
    img = sorted((root / "test" / "hand").glob("*.png"))[0]
    ck = _checkpoint(tmp_path / "two.pt", ["hand", "knee"])
    csv = root / "test" / "landmarks.csv"
    csv.write_text(f"image,landmark,x0,y0,x1,y1\nhand/{img.name},phalanges,1,2,10,20\nhand/{img.name},phalanges,5,x,9,9\n")
    _assert_refused(["--checkpoint", ck, "--data", root], tmp_path / "ev", capsys, "landmarks.csv:3")
    csv.write_text(f"image,landmark,x0,y0,x1,y1\nhand/{img.name},phalanges,10,2,5,20\n")
    _assert_refused(["--checkpoint", ck, "--data", root], tmp_path / "ev", capsys, "landmarks.csv:2")
    # a good box is read and scored
    csv.write_text(f"image,landmark,x0,y0,x1,y1\nhand/{img.name},phalanges,0,0,32,32\n")
    rep = evaluate(ck, tmp_path / "ok", data=root, options=EvalOptions(top_n=2), progress=False)
    assert rep["landmarks"]["overall"]["n"] == 4


def test_not_a_checkpoint_and_existing_out(tmp_path, phantoms, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    _assert_refused(["--checkpoint", junk, "--data", phantoms], tmp_path / "ev", capsys, "junk.pt")
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run_cli(["--checkpoint", junk, "--data", phantoms, "--out", out], capsys)
    assert code != 0 and "not empty" in err and (out / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="--top-n"):
        evaluate(junk, tmp_path / "x", data=phantoms, options=EvalOptions(top_n=0))


def test_unwritable_out_is_one_line(tmp_path, phantoms, ckpt24, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = _run_cli(["--checkpoint", ckpt24, "--data", phantoms, "--limit", "1", "--quiet",
                          "--out", blocker / "ev"], capsys)
    assert code != 0 and len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert str(blocker) in err
