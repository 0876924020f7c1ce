"""The index.html gallery and the per-image folders, checked in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from xraydeconv.reports.gallery import gallery_html, write_gallery
from xraydeconv.reports.pipeline import unique_folder, write_image_folder

CHROMIUM = "/usr/bin/chromium"

# name, true class, predicted class, probability
IMAGES = [
    ("b_hand.png", "hand", "skull", 0.61),
    ("a_knee.png", "knee", "knee", 0.97),
    ("c_chest.png", "chest", "chest", 0.42),
    ("d_foot.png", "foot", "ankle", 0.88),
]


def _make_run(root: Path) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows, taken = [], set()
    for name, true, pred, prob in IMAGES:
        folder = unique_folder(Path(name).stem, taken)
        maps = torch.randn(6, 1, 48, 48, generator=gen)
        man = write_image_folder(
            root / folder,
            torch.rand(1, 48, 48, generator=gen),
            maps,
            torch.arange(6) * 3,
            torch.linspace(5, 1, 6),
            {"input_name": name, "true_class": true, "predicted_class": pred, "predicted_probability": prob},
        )
        rows.append({"folder": folder, "manifest": man, "maps": maps})
    write_gallery(root, [{"folder": r["folder"], "manifest": r["manifest"]} for r in rows])
    return rows


def test_image_folder_contents(tmp_path):
    rows = _make_run(tmp_path)
    folder = tmp_path / rows[0]["folder"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(rows[0]["manifest"]["files"])
    maps = np.load(folder / "maps.npy")
    assert maps.shape == (6, 48, 48) and maps.dtype == np.float16
    raw = rows[0]["maps"].sum(1).abs()  # (6, 48, 48): the magnitude of each filter's projection
    scale = raw.flatten(1).amax(1)
    np.testing.assert_allclose(maps, (raw / scale[:, None, None]).half().numpy())
    man = json.loads((folder / "manifest.json").read_text())
    assert man["channels"] == [0, 3, 6, 9, 12, 15]
    assert man["filters"][0] == {"rank": 1, "channel": 0, "activation": 5.0}
    np.testing.assert_allclose(man["map_scale"], scale.numpy(), rtol=1e-6)
    assert not list(tmp_path.rglob("*.tmp"))


def test_unique_folder_names():
    taken: set[str] = set()
    assert [unique_folder(s, taken) for s in ("img", "img", "IMG", "a b/../c", "")] == [
        "img", "img-2", "IMG-3", "a_b_.._c", "image"]


def test_html_flags_misclassified_and_escapes():
    rows = [{"folder": "x", "manifest": {"input_name": "<script>", "true_class": "hand", "predicted_class": "skull",
                                          "predicted_probability": 0.5, "channels": [1, 2]}}]
    page = gallery_html(rows)
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    assert 'data-misclassified="1"' in page and 'class="card misclassified"' in page
    assert 'data-misclassified-count="1"' in page


def _dump_dom(url: str, tmp_path: Path) -> str:
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--allow-file-access-from-files", "--virtual-time-budget=3000",
           "--dump-dom", url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def _card_names(dom: str, visible_only: bool = False) -> list[str]:
    names = []
    for m in re.finditer(r'<div class="card[^"]*"([^>]*)>', dom):
        attrs = m.group(1)
        if visible_only and "display: none" in attrs:
            continue
        names.append(re.search(r'data-name="([^"]*)"', attrs).group(1))
    return names


@pytest.mark.browser
@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="chromium not installed (apt-get install chromium)")
def test_gallery_in_headless_chromium(tmp_path):
    _make_run(tmp_path)
    url = (tmp_path / "index.html").as_uri()

    dom = _dump_dom(url, tmp_path)
    assert _card_names(dom) == ["a_knee.png", "b_hand.png", "c_chest.png", "d_foot.png"]  # default: by name
    assert 'data-images-loaded="4"' in dom and 'data-images-broken="0"' in dom  # every thumbnail loaded
    assert "4 of 4 images" in dom  # the script ran
    assert dom.count('class="card misclassified"') == 2

    dom = _dump_dom(url + "#sort=confidence", tmp_path)
    assert 'data-sort="confidence"' in dom
    assert _card_names(dom) == ["a_knee.png", "d_foot.png", "b_hand.png", "c_chest.png"]

    dom = _dump_dom(url + "#sort=misclassified&misclassified", tmp_path)
    assert _card_names(dom)[:2] == ["b_hand.png", "d_foot.png"]
    assert _card_names(dom, visible_only=True) == ["b_hand.png", "d_foot.png"]
    assert "2 of 4 images" in dom
