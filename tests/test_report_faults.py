"""Bad inputs and faults of `project` and `evaluate`: what a careless user or an adversary gives them."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from xraydeconv.errors import UserError
from xraydeconv.reports.evaluate import EvalOptions, evaluate, render_markdown
from xraydeconv.training.checkpoint import save_checkpoint
from xraydeconv.training.models import build

SIZE = 64


def _checkpoint(path: Path, class_names, seed=0) -> Path:
    torch.manual_seed(seed)
    m = build("shallow", num_classes=len(class_names), input_size=SIZE).eval()
    save_checkpoint(path, m, model_name="shallow", class_names=list(class_names), input_size=SIZE,
                    config={"input_size": SIZE}, epoch=1)
    return path


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from xraydeconv.data.phantoms import generate

    return generate(tmp_path_factory.mktemp("ph") / "ph", per_class=1, size=SIZE, seed=3, bias="marker",
                    splits=("test",), progress=False)


def _tree(root: Path, phantoms: Path, landmarks=("hand",), classes=("hand", "knee")) -> Path:
    """An ImageFolder copy of a few phantom classes; empty landmark masks for classes not in ``landmarks``."""
    for c in classes:
        src, dst = phantoms / "test" / c, root / "test" / c
        dst.mkdir(parents=True)
        for p in sorted(src.glob("*.png")):
            shutil.copy(p, dst / p.name)
            shutil.copytree(src / f"{p.stem}.landmarks", dst / f"{p.stem}.landmarks")
            if c not in landmarks:  # masks without a pixel: the film's landmark scores are undefined (NaN)
                for m in (dst / f"{p.stem}.landmarks").glob("*.png"):
                    Image.new("L", Image.open(m).size).save(m)
    return root


def _strict(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_report_json_has_no_bare_nan(tmp_path, phantoms):
    root = _tree(tmp_path / "data", phantoms)
    ck = _checkpoint(tmp_path / "two.pt", ["hand", "knee"])
    rep = evaluate(ck, tmp_path / "ev", data=root, options=EvalOptions(top_n=2), progress=False)
    text = (tmp_path / "ev" / "report.json").read_text()
    knee = rep["landmarks"]["per_class"]["knee"]
    assert knee["pointing_game"] != knee["pointing_game"]  # NaN in memory: the knee masks are empty
    on_disk = _strict(text)
    assert on_disk["landmarks"]["per_class"]["knee"]["pointing_game"] is None
    assert on_disk["landmarks"]["per_class"]["hand"]["pointing_game"] == rep["landmarks"]["per_class"]["hand"][
        "pointing_game"]


def _cli(args, capsys) -> tuple[int, str]:
    import sys

    from xraydeconv.cli.main import main

    old, code = sys.argv, 0
    sys.argv = ["xraydeconv", *(str(a) if isinstance(a, int) else os.fsdecode(a) for a in args)]
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = old
    return code, capsys.readouterr().err.strip()


def test_tolerance_bounded_by_the_input_size(tmp_path, phantoms, capsys):
    root = _tree(tmp_path / "data", phantoms)
    ck = _checkpoint(tmp_path / "two.pt", ["hand", "knee"])
    out = tmp_path / "ev"
    code, err = _cli(["evaluate", "--checkpoint", ck, "--data", root, "--out", out, "--tolerance", 100000,
                      "--quiet"], capsys)
    assert code == 2
    assert err == f"error: --tolerance 100000: larger than the {SIZE}-pixel input of shallow; at most {SIZE}"
    assert not out.exists()
    with pytest.raises(UserError, match="--tolerance 65"):
        evaluate(ck, out, data=root, options=EvalOptions(top_n=2, tolerance=SIZE + 1), progress=False)
    rep = evaluate(ck, out, data=root, options=EvalOptions(top_n=2, tolerance=SIZE), progress=False)
    assert rep["landmarks"]["tolerance"] == SIZE
    assert rep["landmarks"]["per_class"]["hand"]["pointing_game"] == 1.0  # the grown mask covers the film


def _odd_names(root: Path, phantoms: Path, names: dict[str, bytes]) -> Path:
    """A plain ImageFolder with one film of each class of ``names`` saved under that (raw, bytes) file name."""
    for c, raw in names.items():
        folder = root / "test" / c
        folder.mkdir(parents=True)
        src = sorted((phantoms / "test" / c).glob("*.png"))[0]
        with open(os.path.join(os.fsencode(folder), raw), "wb") as f:
            f.write(src.read_bytes())
    return root


def _pages(out: Path) -> list[Path]:
    return sorted(out.rglob("*.html"))


def test_file_names_that_are_not_utf8(tmp_path, phantoms, capsys):
    root = _odd_names(tmp_path / "data", phantoms, {"hand": b"\xff.png", "knee": b"caf\xe9.png"})
    ck = _checkpoint(tmp_path / "two.pt", ["hand", "knee"])
    ev, pr = tmp_path / "ev", tmp_path / "pr"
    code, err = _cli(["evaluate", "--checkpoint", ck, "--data", root, "--out", ev, "--top-n", 2, "--quiet"], capsys)
    assert code == 0, err
    code, err = _cli(["project", "--checkpoint", ck, "--data", root, "--out", pr, "--top-n", 2, "--quiet"], capsys)
    assert code == 0, err
    for page in _pages(ev) + _pages(pr):
        page.read_text(encoding="utf-8")  # every page is valid UTF-8
    manifests = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(pr.rglob("manifest.json"))]
    names = {m["input_name"] for m in manifests if "input_name" in m}
    assert names == {"hand/\\xff.png", "knee/caf\\xe9.png"}
    index = (pr / "index.html").read_text(encoding="utf-8")
    assert "hand/\\xff.png" in index and "knee/caf\\xe9.png" in index
    report = _strict((ev / "report.json").read_text(encoding="utf-8"))
    assert len(report["misclassified"]) == report["misclassified_count"]
    assert {m["image"] for m in report["misclassified"]} <= {str(root / "test" / "hand" / "\\xff.png"),
                                                              str(root / "test" / "knee" / "caf\\xe9.png")}


def test_gallery_page_with_a_raw_surrogate_name(tmp_path):
    from xraydeconv.reports.gallery import utf8_text, write_gallery

    raw = os.fsdecode(b"\xff.png")  # how Python holds a name that is not UTF-8
    assert utf8_text(f"a/{raw}") == "a/\ufffd.png"
    assert utf8_text("café.png") == "café.png"
    (tmp_path / "img").mkdir()
    write_gallery(tmp_path, [{"folder": "img", "manifest": {"input_name": raw, "top_filters": []}}])
    assert "\ufffd.png" in (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "\ufffd.png" in (tmp_path / "img" / "index.html").read_text(encoding="utf-8")


def test_images_named_like_the_gallery_files(tmp_path, phantoms, capsys):
    from xraydeconv.reports.pipeline import unique_folder

    taken: set[str] = set()
    assert [unique_folder(s, taken) for s in ("index.html", "INDEX.HTML", "gallery.json")] == [
        "index.html-2", "INDEX.HTML-3", "gallery.json-2"]
    src = sorted((phantoms / "test" / "hand").glob("*.png"))[0]
    images = [tmp_path / "index.html.png", tmp_path / "gallery.json.png"]
    for p in images:
        shutil.copy(src, p)
    ck = _checkpoint(tmp_path / "two.pt", ["hand", "knee"])
    out = tmp_path / "pr"
    code, err = _cli(["project", "--checkpoint", ck, "--images", images[0], "--images", images[1], "--out", out,
                      "--top-n", 2, "--quiet"], capsys)
    assert code == 0, err
    rows = json.loads((out / "gallery.json").read_text(encoding="utf-8"))
    assert [r["folder"] for r in rows] == ["index.html-2", "gallery.json-2"]
    index = (out / "index.html").read_text(encoding="utf-8")
    for r in rows:
        assert f'href="{r["folder"]}/index.html"' in index
        assert (out / r["folder"] / "index.html").is_file()


def test_max_pixels(tmp_path, phantoms, capsys):
    root = _tree(tmp_path / "data", phantoms, landmarks=("hand", "knee"))
    ck = _checkpoint(tmp_path / "two.pt", ["hand", "knee"])
    film = sorted((root / "test" / "hand").glob("*.png"))[0]
    small = SIZE * SIZE - 1
    runs = {"evaluate": ["--data", root], "project": ["--images", film]}
    for cmd, given in runs.items():
        out = tmp_path / f"{cmd}-small"
        code, err = _cli([cmd, "--checkpoint", ck, *given, "--out", out, "--top-n", 2, "--max-pixels", small,
                          "--quiet"], capsys)
        assert code == 2, err
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and "--max-pixels" in err, err
        assert f"{SIZE}x{SIZE} = {SIZE * SIZE:,} pixels, over the limit of {small:,}" in err, err
        assert not out.exists()
        code, err = _cli([cmd, "--checkpoint", ck, *given, "--out", tmp_path / f"{cmd}-0", "--max-pixels", 0,
                          "--quiet"], capsys)
        assert (code, err) == (2, "error: --max-pixels 0: must be a positive number of pixels")
        out = tmp_path / f"{cmd}-fits"
        code, err = _cli([cmd, "--checkpoint", ck, *given, "--out", out, "--top-n", 2, "--max-pixels", SIZE * SIZE,
                          "--quiet"], capsys)
        assert code == 0, err
        assert (out / "index.html").is_file()
    report = json.loads((tmp_path / "evaluate-fits" / "report.json").read_text())
    assert report["options"]["max_pixels"] == SIZE * SIZE


def test_test_set_with_some_of_the_checkpoint_classes(tmp_path, phantoms):
    from xraydeconv.data import open_dataset

    root = _tree(tmp_path / "data", phantoms, landmarks=("hand", "knee"))
    names = ["skull", "knee", "hand"]  # another order, and a class the test set lacks
    torch.manual_seed(0)
    m = build("shallow", num_classes=3, input_size=SIZE).eval()
    last = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias[0] += 1e4  # every film is called a skull: predictions into an absent class
    ck = tmp_path / "three.pt"
    save_checkpoint(ck, m, model_name="shallow", class_names=names, input_size=SIZE, config={"input_size": SIZE},
                    epoch=1)
    rep = evaluate(ck, tmp_path / "ev", data=root, options=EvalOptions(top_n=2), progress=False)
    ds = open_dataset(root, split="test", input_size=SIZE)
    truth = [names.index(ds.class_names[r.label]) for r in ds.records]
    expected = [[0] * 3 for _ in names]
    for t in truth:
        expected[t][0] += 1
    assert rep["class_names"] == names
    assert rep["classes_present"] == ["knee", "hand"]
    assert rep["confusion"] == expected
    assert rep["accuracy"] == 0.0 and rep["misclassified_count"] == len(truth) == 4
    assert sorted(rep["per_class_accuracy"]) == ["hand", "knee"]
    assert {m["predicted"] for m in rep["misclassified"]} == {"skull"}
    assert {m["true"] for m in rep["misclassified"]} == {"hand", "knee"}
    assert "The data hold 2 of the checkpoint's 3 classes (knee, hand)" in render_markdown(rep)


def test_class_map_renames_the_data_classes(tmp_path, phantoms, capsys):
    root = _tree(tmp_path / "data", phantoms, landmarks=("hand", "knee"))
    (root / "test" / "hand").rename(root / "test" / "hand-pa")  # the archive calls it otherwise
    names = ["skull", "knee", "hand"]
    torch.manual_seed(0)
    m = build("shallow", num_classes=3, input_size=SIZE).eval()
    ck = tmp_path / "three.pt"
    save_checkpoint(ck, m, model_name="shallow", class_names=names, input_size=SIZE, config={"input_size": SIZE},
                    epoch=1)
    code, err = _cli(["evaluate", "--checkpoint", str(ck), "--data", str(root), "--top-n", "2",
                      "--out", str(tmp_path / "ev0")], capsys)
    assert code == 2 and "(not in the checkpoint: hand-pa)" in err and not (tmp_path / "ev0").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("hand-pa\n")
    code, err = _cli(["evaluate", "--checkpoint", str(ck), "--data", str(root), "--class-map", str(bad),
                      "--out", str(tmp_path / "ev1")], capsys)
    assert code == 2 and err.strip() == f"error: {bad}:1: expected 'data class,checkpoint class', got 'hand-pa'"
    good = tmp_path / "map.csv"
    good.write_text("hand-pa,hand\n")
    rep = evaluate(ck, tmp_path / "ev", data=root, options=EvalOptions(top_n=2, class_map=str(good)),
                   progress=False)
    assert sorted(rep["classes_present"]) == ["hand", "knee"]
    with torch.no_grad():
        from xraydeconv.data import open_dataset

        ds = open_dataset(root, split="test", input_size=SIZE)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        pred = m(x).argmax(1).tolist()
    truth = [names.index({"hand-pa": "hand"}.get(ds.class_names[r.label], ds.class_names[r.label]))
             for r in ds.records]
    assert rep["accuracy"] == sum(p == t for p, t in zip(pred, truth)) / len(truth)


def test_project_maps_the_data_classes_like_evaluate(tmp_path, phantoms, capsys):
    root = _tree(tmp_path / "data", phantoms, landmarks=("hand", "knee"))
    (root / "test" / "hand").rename(root / "test" / "hand-pa")
    ck = tmp_path / "three.pt"
    torch.manual_seed(0)
    save_checkpoint(ck, build("shallow", num_classes=3, input_size=SIZE).eval(), model_name="shallow",
                    class_names=["skull", "knee", "hand"], input_size=SIZE, config={"input_size": SIZE}, epoch=1)
    args = ["project", "--checkpoint", str(ck), "--data", str(root), "--top-n", "2", "--limit", "2"]
    code, err = _cli([*args, "--out", str(tmp_path / "p0")], capsys)
    assert code == 2 and "(not in the checkpoint: hand-pa)" in err and not (tmp_path / "p0").exists()
    good = tmp_path / "map.csv"
    good.write_text("hand-pa,hand\n")
    code, err = _cli([*args, "--class-map", str(good), "--out", str(tmp_path / "p1")], capsys)
    assert code == 0, err
    manifests = [json.loads(p.read_text()) for p in sorted((tmp_path / "p1").glob("*/manifest.json"))]
    assert [m["true_class"] for m in manifests] == ["hand", "hand"]
    code, err = _cli(["project", "--checkpoint", str(ck), "--images", str(next(root.rglob("*.png"))),
                      "--class-map", str(good), "--out", str(tmp_path / "p2")], capsys)
    assert code == 2 and "only with --data" in err


def test_a_film_admitted_by_max_pixels_is_drawn_too(tmp_path):
    from xraydeconv.data.preprocess import DEFAULT_MAX_PIXELS
    from xraydeconv.reports.film import Film

    path = tmp_path / "wide.png"
    Image.new("L", (3, 2), 200).save(path)
    old = Image.MAX_IMAGE_PIXELS
    try:  # a limit below this tiny film stands in for a film above Pillow's default
        with pytest.raises(UserError, match="over the limit of 5"):
            Film.load(path, 16, max_pixels=5)
        film = Film.load(path, 16, max_pixels=6)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    assert film.original == (2, 3) and DEFAULT_MAX_PIXELS > 6
