"""The pictures: legible heat on the film as it was given, the display transform, focus areas, and the pages in
a real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_dicom
from PIL import Image

from xraydeconv.data.preprocess import Letterbox
from xraydeconv.reports import display, views
from xraydeconv.reports.display import DisplaySettings
from xraydeconv.reports.film import Film, display_shape
from xraydeconv.reports.pipeline import ProjectSettings, project_checkpoint

SIZE = 64
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A deeper net trained briefly on 64 px phantoms, and its data."""
    from xraydeconv.data.phantoms import generate
    from xraydeconv.training.loop import TrainConfig, train

    base = tmp_path_factory.mktemp("pictures")
    data = generate(base / "ph", per_class=4, size=SIZE, seed=2, val_per_class=1, test_per_class=1, progress=False)
    cfg = TrainConfig(model="deeper", epochs=3, batch_size=16, lr=3e-3, input_size=SIZE, data=str(data),
                      checkpoint_every=0, seed=0, augment=False)
    train(cfg, base / "run", progress=False, log=lambda s: None)
    return {"base": base, "data": data, "ckpt": base / "run" / "best.pt"}


@pytest.fixture(scope="module")
def projected(trained) -> Path:
    out = trained["base"] / "proj"
    project_checkpoint(trained["ckpt"], out, data=trained["data"], limit=8, settings=ProjectSettings(top_n=8),
                       device="cpu", progress=False, compare=[trained["ckpt"]])
    return out


def _folders(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir())


def _film_part(folder: Path) -> tuple[np.ndarray, dict]:
    man = json.loads((folder / "manifest.json").read_text())
    top, left, h, w = man["overlay_film_box"]
    return np.asarray(Image.open(folder / "overlay.png").convert("RGB"))[top : top + h, left : left + w], man


def test_overlays_are_legibly_coloured(projected):
    shares = []
    for folder in _folders(projected):
        film, man = _film_part(folder)
        assert tuple(film.shape[:2]) == tuple(man["film"]["display"])
        shares.append(display.visible_share(film))
    assert all(0.05 <= s <= 0.60 for s in shares), shares


def test_cold_regions_are_the_plain_film(projected):
    for folder in _folders(projected)[:3]:
        overlay, man = _film_part(folder)
        settings = DisplaySettings(**{k: man["display"][k] for k in DisplaySettings().as_dict()})
        film = Film.load(man["input_file"], man["input_size"], settings.min_side, settings.max_side)
        heats = torch.from_numpy(np.load(folder / "maps.npy").astype(np.float32))
        h = views.Heats.make(film, heats, man["display"]["stride"], settings).combined()
        cold = h < settings.low - 0.05  # a margin for the float16 rounding of maps.npy
        assert 0.3 < cold.mean() < 0.97
        grey = display.film_rgb(film.pixels)
        assert np.array_equal(overlay[cold], np.repeat(grey[cold][:, None], 3, axis=1))


def test_every_view_and_page_is_written(projected):
    folder = _folders(projected)[0]
    man = json.loads((folder / "manifest.json").read_text())
    for name in ("overlay.png", "focus.png", "grid.png", "landmarks.png", "compare.png", "thumb.jpg", "index.html"):
        assert (folder / name).is_file() and name in man["files"], name
    assert len(man["filter_pictures"]) == 8 and all((folder / f).is_file() for f in man["filter_pictures"])
    assert [c["model"] for c in man["compare"]] == ["deeper", "deeper"]
    assert np.load(folder / "maps.npy").shape == (8, SIZE, SIZE)  # raw maps stay at network resolution


@pytest.mark.parametrize("kind", ["png", "dcm"])
def test_a_large_film_is_drawn_large(trained, tmp_path, kind):
    src = next((trained["data"] / "test" / "hand").glob("*.png"))
    big = tmp_path / "films" / f"big-hand.{kind}"
    big.parent.mkdir()
    film8 = Image.open(src).convert("L").resize((1100, 1500), Image.Resampling.BILINEAR)  # not square: letterboxed
    if kind == "png":
        film8.save(big)
    else:
        write_dicom(big, np.asarray(film8, dtype=np.uint16) * 16)
    for max_side, expect in ((1024, (1024, 751)), (300, (300, 220))):
        out = tmp_path / f"out{max_side}"
        settings = ProjectSettings(top_n=5, display=DisplaySettings(max_side=max_side, min_side=min(512, max_side)))
        project_checkpoint(trained["ckpt"], out, images=[big], settings=settings, device="cpu", progress=False)
        film, man = _film_part(out / "big-hand")
        assert film.shape[:2] == expect == display_shape(1500, 1100, min(512, max_side), max_side)
        assert man["film"]["original"] == [1500, 1100]
        assert 0.05 <= display.visible_share(film) <= 0.60


def test_film_geometry_maps_network_pixels_back():
    img = np.zeros((200, 100), np.float32)
    film = Film(img, SIZE, *[getattr(Letterbox.fit(200, 100, SIZE), k) for k in ("top", "left", "height",
                                                                                   "width")], (200, 100))
    assert (film.top, film.left, film.height, film.width) == (0, 16, 64, 32)
    heat = torch.zeros(SIZE, SIZE)
    heat[:, 16:32] = 1.0  # the left half of the film inside the letterbox
    on_film = film.heat(heat).numpy()
    assert on_film.shape == (200, 100)
    assert on_film[:, :48].min() > 0.99 and on_film[:, 52:].max() < 0.01


def test_display_transform_steps():
    assert display.smoothing_sigma(8) == 4.0 and display.smoothing_sigma(1) == 0.5
    x = torch.zeros(1, 33, 33)
    x[0, 16, 16] = 1.0
    s = display.smooth(x, 2.0)
    assert s.sum().item() == pytest.approx(1.0, abs=1e-5)  # a normalised kernel, far from the border
    g = torch.exp(-torch.tensor(1.0) / 8)  # one pixel away, sigma 2
    assert (s[0, 16, 17] / s[0, 16, 16]).item() == pytest.approx(g.item(), rel=1e-4)
    m = torch.rand(2, 20, 20)
    hi = torch.quantile(m.flatten(1), 0.9, dim=1)[:, None, None]
    lo = torch.quantile(m.flatten(1), 0.5, dim=1)[:, None, None]
    np.testing.assert_allclose(display.robust_normalise(m, 90), ((m - lo) / (hi - lo)).clamp(0, 1), rtol=1e-5,
                               atol=1e-6)
    assert (display.robust_normalise(m) > 0).float().mean() <= 0.5  # the median is the floor
    st = DisplaySettings(low=0.2, high=0.6, alpha=0.8)
    np.testing.assert_allclose(display.opacity(np.array([0.0, 0.2, 0.4, 0.6, 1.0]), st), [0, 0, 0.4, 0.8, 0.8],
                               atol=1e-6)


def test_blend_leaves_cold_film_untouched_and_colours_hot_parts():
    film = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    h = np.zeros((64, 64), np.float32)
    h[:, 32:] = 1.0
    rgb = display.blend(film, h, DisplaySettings())
    grey = display.film_rgb(film)
    assert np.array_equal(rgb[:, :32], np.repeat(grey[:, :32, None], 3, axis=2))
    assert display.visible_share(rgb) == pytest.approx(0.5)


def test_focus_region_is_the_smallest_region_with_half_the_heat():
    heat = torch.tensor([[4.0, 3.0, 0.0], [2.0, 1.0, 0.0]])
    region = display.focus_region(heat, 0.5)  # total 10: 4 + 3 reach half, 4 alone does not
    assert region.tolist() == [[True, True, False], [False, False, False]]
    assert not display.focus_region(torch.zeros(3, 3)).any()


def test_two_filters_with_different_maps_get_different_focus_areas():
    heats = torch.zeros(2, SIZE, SIZE)
    heats[0, 10:20, 10:20] = 1.0
    heats[1, 40:50, 30:60] = 1.0
    film = Film.from_input(torch.rand(1, SIZE, SIZE))
    hs = views.Heats.make(film, heats, 4, DisplaySettings())
    a, b = hs.focus(0), hs.focus(1)
    assert a.any() and b.any() and not (a & b).any()
    ys, xs = np.nonzero(a)
    scale = film.shape[0] / SIZE
    assert 10 * scale <= ys.mean() <= 20 * scale and 10 * scale <= xs.mean() <= 20 * scale


def test_focus_areas_differ_between_real_filters(projected):
    man = json.loads((_folders(projected)[0] / "manifest.json").read_text())
    settings = DisplaySettings(**{k: man["display"][k] for k in DisplaySettings().as_dict()})
    heats = torch.from_numpy(np.load(_folders(projected)[0] / "maps.npy").astype(np.float32))
    hs = views.Heats.make(Film.from_input(torch.zeros(1, SIZE, SIZE)), heats, man["display"]["stride"], settings)
    regions = {hs.focus(k).tobytes() for k in range(5)}
    assert len(regions) >= 2


def test_layer_stride_of_the_deeper_net():
    from xraydeconv.training.models import build

    model = build("deeper", num_classes=3, input_size=SIZE)
    assert display.layer_stride(model, "features.24", SIZE) == 8  # three 2x2 pools before it
    assert display.layer_stride(model, "features.0", SIZE) == 1


def test_misclassified_caption_names_both_classes():
    lines = views.caption_lines({"model": "deeper", "layer_module": "features.24", "top_n": 25,
                                 "predicted_class": "skull", "predicted_probability": 0.71, "true_class": "hand",
                                 "true_probability": 0.12})
    assert lines[0][0] == "deeper · deconvnet · layer features.24 · top-25"
    assert lines[1] == ("MISCLASSIFIED: predicted skull 71.0 % · true hand 12.0 %", views.RED)


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files", "--virtual-time-budget=3000",
           *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


@pytest.mark.browser
@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="chromium not installed (apt-get install chromium)")
def test_pages_open_on_heat_in_headless_chromium(projected, tmp_path):
    rows = json.loads((projected / "gallery.json").read_text())
    folder = projected / rows[1]["folder"]
    for page in (projected / "index.html", folder / "index.html"):
        shot = tmp_path / f"{page.parent.name}.png"
        _chromium(["--window-size=1280,800", f"--screenshot={shot}", page.as_uri()], tmp_path)
        rgb = np.asarray(Image.open(shot).convert("RGB"))
        assert rgb.shape[:2] == (800, 1280)
        assert display.visible_share(rgb) >= 0.05, page  # the first screen shows heat
    dom = _chromium(["--dump-dom", (folder / "index.html").as_uri()], tmp_path).stdout
    n_images = 8 + len([f for f in ("overlay.png", "focus.png", "landmarks.png") if (folder / f).is_file()])
    assert f'data-images-loaded="{n_images}"' in dom and 'data-images-broken="0"' in dom
    dom3 = _chromium(["--dump-dom", (folder / "index.html").as_uri() + "#filter=3"], tmp_path).stdout
    assert 'data-enlarged="3"' in dom3 and 'id="big" alt="enlarged filter" src="filters/03.jpg"' in dom3
    assert 'data-enlarged="0"' in dom  # nothing enlarged without the link
    assert f'id="prev" href="../{rows[0]["folder"]}/index.html"' in dom
    assert f'id="next" href="../{rows[2]["folder"]}/index.html"' in dom
