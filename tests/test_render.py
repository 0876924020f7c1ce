"""Heat maps and pictures from projections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xraydeconv.reports import render


def test_filter_heatmaps_are_magnitudes_normalised_per_filter():
    maps = torch.zeros(2, 3, 2, 8, 8)
    maps[0, 0, 0, 1, 1] = -4.0  # a negative reconstruction is as strong as a positive one
    maps[0, 0, 1, 1, 1] = 1.0
    maps[0, 0, 0, 5, 5] = 1.5
    maps[0, 1, 0, 2, 2] = 0.001  # tiny filters still reach 1 after normalisation
    h = render.filter_heatmaps(maps)
    assert h.shape == (2, 3, 8, 8)
    assert h[0, 0, 1, 1] == pytest.approx(1.0)
    assert h[0, 0, 5, 5] == pytest.approx(0.5)
    assert h[0, 1, 2, 2] == pytest.approx(1.0)
    assert torch.equal(h[1], torch.zeros(3, 8, 8))  # all-zero maps stay zero, no NaN


def test_combined_heatmap_gives_each_filter_the_same_say():
    maps = torch.zeros(1, 2, 1, 4, 4)
    maps[0, 0, 0, 0, 0] = 100.0
    maps[0, 1, 0, 3, 3] = 1.0
    h = render.heatmap(maps)
    assert h.shape == (1, 4, 4)
    assert h[0, 0, 0] == pytest.approx(1.0) and h[0, 3, 3] == pytest.approx(1.0)
    assert render.heatmap(maps, top=1)[0, 3, 3] == 0


def test_colormap_is_matplotlibs_and_a_bad_name_is_a_clear_error():
    import matplotlib

    v = np.linspace(0, 1, 9)
    np.testing.assert_array_equal(render.colormap("viridis")(v), matplotlib.colormaps["viridis"](v))
    with pytest.raises(ValueError, match="colormap 'no-such-map'"):
        render.colormap("no-such-map")


def test_grid_and_side_by_side_layout(tmp_path):
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(7)]
    labels = [f"#{k + 1}" for k in range(7)]
    grid = render.focus_grid_tiles(tiles, labels, cols=5)
    one = render.focus_grid_tiles(tiles[:1], labels[:1])
    assert grid.shape[1] == 5 * (one.shape[1] - 12) + 6 * 6  # 5 columns of tiles and gaps
    # 2 rows of tiles, each under a 12 px caption band and 4 px of space, with 6 px gaps around
    assert grid.shape[0] == 2 * (32 + 12 + 4) + 3 * 6
    pair = render.side_by_side([tiles[0], tiles[1]], ["a", "b"])
    assert pair.shape[1] == 2 * 32 + 3 * 6
    p = render.save_png(pair, tmp_path / "pair.png")
    assert np.array_equal(np.asarray(Image.open(p)), pair)
    assert [f.name for f in tmp_path.iterdir()] == ["pair.png"]  # no temp file left behind


def test_importing_the_package_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, xraydeconv, xraydeconv.explain.deconvnet; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
