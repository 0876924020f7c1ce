"""Heat maps from deconvnet projections (raw, for metrics and pictures alike), and the layout of pictures.

A projection is a signed reconstruction of the input pattern a filter responds to; its sign says which
polarity of the pattern (bright or dark edge) drives the filter, not whether a region matters. A heat map is
therefore the **magnitude** of the channel-summed projection, ``|sum_c maps[:, :, c]|``, normalised per filter
to [0, 1]. The combined map of the top-n filters is the mean of their normalised heat maps, renormalised to
[0, 1], so that every selected filter has the same say however large its reconstruction is. The rule is
defined once, in :mod:`xraydeconv.explain.methods` (``filter_heatmaps``, ``combine_filter_maps`` = ``heatmap``).

Colours come from matplotlib's colormaps (only ``matplotlib.colormaps``; pyplot is never imported), pictures
are composed with PIL and written atomically. What a heat map looks like on a film is
:mod:`xraydeconv.reports.display` and :mod:`xraydeconv.reports.views`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from xraydeconv.explain.methods import combine_filter_maps, filter_heatmaps, normalise
from xraydeconv.io import write_atomically

# the heat-map rule is the evaluation's (one definition, in explain.methods); its names here serve the pictures
heatmap = combine_filter_maps

__all__ = ["filter_heatmaps", "heatmap", "normalise", "colormap", "font", "side_by_side", "focus_grid_tiles",
           "save_png"]


def colormap(name: str):
    """The matplotlib colormap called ``name``; ValueError when there is none."""
    import matplotlib  # the colormap registry only: importing it does not start a GUI backend

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"colormap {name!r}: not a matplotlib colormap") from None


def font(size: int) -> ImageFont.ImageFont:
    """PIL's built-in font at ``size`` pixels (one bitmap size on old Pillow)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _labelled(tile: np.ndarray, label: str, size: int) -> Image.Image:
    im = Image.fromarray(tile)
    if label:
        band = max(12, size)
        out = Image.new("RGB", (im.width, im.height + band + 4), (255, 255, 255))
        out.paste(im, (0, band + 4))
        ImageDraw.Draw(out).text((3, 2), label, fill=(0, 0, 0), font=font(size))
        return out
    return im


def side_by_side(tiles: Sequence[np.ndarray], labels: Sequence[str] | None = None, gap: int = 6) -> np.ndarray:
    """Tiles (H, W, 3) uint8 of equal height placed in a row with a caption above each (Fig. 2/3 style)."""
    return focus_grid_tiles(tiles, labels, cols=len(tiles), gap=gap)


def focus_grid_tiles(
    tiles: Sequence[np.ndarray], labels: Sequence[str] | None = None, cols: int = 5, gap: int = 6
) -> np.ndarray:
    """Lay out (H, W, 3) uint8 tiles in a grid, each with an optional caption; returns (H', W', 3) uint8."""
    if not tiles:
        raise ValueError("no tiles to lay out")
    labels = list(labels) if labels is not None else [""] * len(tiles)
    size = max(11, tiles[0].shape[0] // 14)
    ims = [_labelled(t, lab, size) for t, lab in zip(tiles, labels)]
    tw, th = max(i.width for i in ims), max(i.height for i in ims)
    cols = max(1, min(cols, len(ims)))
    rows = (len(ims) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tw + (cols + 1) * gap, rows * th + (rows + 1) * gap), (255, 255, 255))
    for k, im in enumerate(ims):
        r, c = divmod(k, cols)
        sheet.paste(im, (gap + c * (tw + gap), gap + r * (th + gap)))
    return np.asarray(sheet)


def save_png(rgb: np.ndarray, path: str | os.PathLike, compress_level: int = 1) -> Path:
    """Write an (H, W, 3) uint8 array as PNG atomically (a temp file in the same folder, then ``os.replace``).

    ``compress_level`` 1 (zlib's fastest) by default: heat-map pictures compress poorly at any level, and PNG
    encoding is the slowest step of ``xraydeconv project`` after the projection itself (docs/pictures.md).
    """
    return write_atomically(
        path, lambda f: Image.fromarray(np.ascontiguousarray(rgb)).save(f, format="PNG", compress_level=compress_level)
    )
