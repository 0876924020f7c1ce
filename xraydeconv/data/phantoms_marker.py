"""The planted shortcut of ``--bias marker``: a lead letter whose glyph and place depend on the class."""

from __future__ import annotations

import numpy as np

_GLYPHS = {
    "L": ("X....", "X....", "X....", "X....", "X....", "X....", "XXXXX"),
    "R": ("XXXX.", "X...X", "X...X", "XXXX.", "X.X..", "X..X.", "X...X"),
}
# places inside the collimated field (fractions of its width, height): 4 top, 4 bottom, 2 left, 2 right
_PLACES = ((0.1, 0.08), (0.37, 0.08), (0.63, 0.08), (0.9, 0.08), (0.1, 0.92), (0.37, 0.92), (0.63, 0.92),
           (0.9, 0.92), (0.06, 0.37), (0.06, 0.63), (0.94, 0.37), (0.94, 0.63))


def marker_for(label: int) -> tuple[str, tuple[float, float]]:
    """The (letter, place) of class ``label``: 12 places × 2 letters cover 24 classes one to one."""
    return "LR"[(label // len(_PLACES)) % 2], _PLACES[label % len(_PLACES)]


def draw_marker(size: int, label: int, field: tuple[int, int, int, int],
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Place the class's lead marker in the film; returns (lead, tab): the opaque letter and its tab.

    Lead stops the beam, so the letter comes out white whatever the exposure; the tab (the letter's
    box plus a rim) is the landmark mask used to measure how much a net looks at the marker.
    """
    letter, (fx, fy) = marker_for(label)
    glyph = np.array([[c == "X" for c in row] for row in _GLYPHS[letter]])
    cell = max(2, round(size / 128))
    tile = np.kron(glyph, np.ones((cell, cell), bool))
    h, w = tile.shape
    x0, y0, x1, y1 = field
    cx = x0 + fx * (x1 - x0) + rng.integers(-2, 3) * cell
    cy = y0 + fy * (y1 - y0) + rng.integers(-2, 3) * cell
    top = int(np.clip(round(cy - h / 2), y0 + cell, y1 - h - cell))
    left = int(np.clip(round(cx - w / 2), x0 + cell, x1 - w - cell))
    lead = np.zeros((size, size), bool)
    lead[top:top + h, left:left + w] = tile
    tab = np.zeros((size, size), bool)
    tab[top - cell:top + h + cell, left - cell:left + w + cell] = True
    return lead, tab
