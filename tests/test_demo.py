"""`xraydeconv demo --quick` end to end: every step runs, every promised file is there, a rerun reuses the work."""

import json
import re

import pytest
from conftest import run_cli

from xraydeconv.training.models import MODEL_NAMES


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_quick_demo(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setenv("XRAYDECONV_CACHE", str(cache))
    out = tmp_path / "demo"
    code, stdout, err = run_cli(["demo", "--quick", "--top-n", "4", "--out", out, "--quiet"], capsys)
    assert code == 0, err

    # Table 1 and the landmark table are printed, and where to look
    assert "| Shallow CNN (`shallow`) |" in stdout and "Deeper CNN + data augmentation" in stdout
    assert "Pointing game (top-4)" in stdout
    assert f"Open {(out / 'index.html').absolute()}" in stdout

    assert sorted(p for p in cache.iterdir() if p.suffix != ".lock") == [cache / "phantoms-32-2-0",
                                                                         cache / "phantoms-32-2-0-marker"]
    for name in MODEL_NAMES:
        assert (out / name / "best.pt").is_file()
        ev = json.loads((out / "eval" / name / "report.json").read_text())
        assert ev["data"]["split"] == "test" and ev["data"]["images"] == 48
        assert ev["landmarks"]["overall"]["n"] == 48
        gallery = out / "gallery" / name
        assert (gallery / "index.html").is_file()
        folders = [p for p in gallery.iterdir() if p.is_dir()]
        assert len(folders) == 24  # one test image per class
        man = json.loads((folders[0] / "manifest.json").read_text())
        assert man["top_n"] == 4 and man["model"] == name

    rows = json.loads((out / "table1.json").read_text())["rows"]
    assert [r["model"] for r in rows] == list(MODEL_NAMES)
    lm = json.loads((out / "landmarks.json").read_text())
    assert set(lm["models"]) == set(MODEL_NAMES)
    for name, m in lm["models"].items():
        ev = json.loads((out / "eval" / name / "report.json").read_text())
        assert m["landmarks"] == ev["landmarks"] and m["accuracy"] == ev["accuracy"]
    # the same test films and masks for every net: the landmarks' area share cannot differ
    assert len({m["landmarks"]["overall"]["area_share"] for m in lm["models"].values()}) == 1
    table = (out / "landmarks.md").read_text()
    assert table.count("\n") == 3 + len(MODEL_NAMES) and "the image itself (no net)" in table

    # every net's methods, beside the film, with the randomisation test; the table lists them all
    methods = (out / "methods.md").read_text()
    for name in MODEL_NAMES:
        ev = json.loads((out / "eval" / name / "report.json").read_text())
        assert ev["methods"]["methods"] == ["deconvnet", "guided", "gradient", "gradcam", "occlusion", "film"]
        assert ev["sanity"]["methods"]["film"]["final"]["spearman"] == 1.0
        assert (out / "eval" / name / "sanity.png").is_file()
        assert lm["models"][name]["methods"] == ev["methods"]
        assert methods.count(f"| `{name}` |") == 6
    assert methods in stdout and "| `deeper-aug` | occlusion |" in methods

    # the planted shortcut: biased validation films carry the marker, and every method is scored on it
    val = json.loads((out / "shortcut" / "eval-val" / "report.json").read_text())
    assert val["data"]["split"] == "val" and val["landmarks"]["marker"]["n"] == 48
    assert all(r["marker"]["n"] == 48 for r in val["methods"]["rows"].values())
    assert lm["shortcut"]["val"]["accuracy"] == val["accuracy"]
    assert "Pointing game on the marker" in (out / "shortcut.md").read_text()

    # every relative link and picture of the front page points at a file that exists; it opens on pictures
    page = (out / "index.html").read_text()
    links = re.findall(r"""(?:href|src)=["']([^"']+)["']""", page)
    assert len(links) >= 6 * len(MODEL_NAMES)
    for link in links:
        assert (out / link).is_file(), link
    first_picture = page.index("<img")
    assert first_picture < page.index("Table 1")

    # a second run reuses the trained nets
    stamp = {n: (out / n / "best.pt").stat().st_mtime_ns for n in MODEL_NAMES}
    code, stdout, err = run_cli(["demo", "--quick", "--top-n", "4", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert {n: (out / n / "best.pt").stat().st_mtime_ns for n in MODEL_NAMES} == stamp

    # other settings in the same folder are refused, in one line
    code, _, err = run_cli(["demo", "--quick", "--top-n", "5", "--out", out, "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "other settings" in err and "top_n=4" in err


def test_demo_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_cli(["demo", "--quick", "--out", tmp_path], capsys)
    assert code == 2 and "holds no demo run" in err
    code, _, err = run_cli(["demo", "--quick", "--top-n", "0", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "--top-n" in err and not (tmp_path / "x").exists()


def test_demo_help_reads_like_a_manual(capsys):
    code, stdout, _ = run_cli(["demo", "--help"], capsys)
    assert code == 0
    for word in ("--quick", "--full", "Table 1", "index.html", "gallery/<model>/", "runs/demo"):
        assert word in stdout
