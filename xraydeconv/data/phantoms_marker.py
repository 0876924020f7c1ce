"""The planted shortcut of ``--bias marker``: a lead letter whose glyph and place depend on the class."""

from __future__ import annotations

import numpy as np

_GLYPHS = {
    "L": ("X....", "X....", "X....", "X....", "X....", "X....", "XXXXX"),
    "R": ("XXXX.", "X...X", "X...X", "XXXX.", "X.X..", "X..X.", "X...X"),
}
# one place per class inside the collimated field (fractions of its width, height):
# 8 along the top, 8 along the bottom, 4 down each side, as a technologist would tape a marker
_PLACES = tuple([((k + 0.5) / 8, 0.07) for k in range(8)] + [((k + 0.5) / 8, 0.93) for k in range(8)]
                + [(0.05, 0.2 + 0.2 * k) for k in range(4)] + [(0.95, 0.2 + 0.2 * k) for k in range(4)])


def marker_for(label: int) -> tuple[str, tuple[float, float]]:
    """The (letter, place) of class ``label``: a place of its own (24 places), the letter L or R alternating."""
    return "LR"[label % 2], _PLACES[label % len(_PLACES)]


def draw_marker(size: int, label: int, field: tuple[int, int, int, int],
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Place the class's lead marker in the film; returns (lead, tab): the opaque letter and its tab.

    Lead stops the beam, so the letter comes out white whatever the exposure; the tab (the letter's
    box plus a rim) is the landmark mask used to measure how much a net looks at the marker.
    """
    letter, (fx, fy) = marker_for(label)
    glyph = np.array([[c == "X" for c in row] for row in _GLYPHS[letter]])
    cell = max(2, round(size / 85))  # 3 px at 256: a 15×21 px letter
    tile = np.kron(glyph, np.ones((cell, cell), bool))
    h, w = tile.shape
    x0, y0, x1, y1 = field
    cx = x0 + fx * (x1 - x0) + rng.integers(-1, 2) * cell
    cy = y0 + fy * (y1 - y0) + rng.integers(-1, 2) * cell
    top = int(np.clip(round(cy - h / 2), y0 + cell, y1 - h - cell))
    left = int(np.clip(round(cx - w / 2), x0 + cell, x1 - w - cell))
    lead = np.zeros((size, size), bool)
    lead[top:top + h, left:left + w] = tile
    tab = np.zeros((size, size), bool)
    tab[top - cell:top + h + cell, left - cell:left + w + cell] = True
    return lead, tab
