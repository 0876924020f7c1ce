"""Bad inputs and faults of `project` and `evaluate`: what a careless user or an adversary gives them."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from xraydeconv.errors import UserError
from xraydeconv.reports.evaluate import EvalOptions, evaluate
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

    old = sys.argv
    sys.argv = ["xraydeconv", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = old
    return exc.value.code, capsys.readouterr().err.strip()


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
