"""The planted shortcut of ``--bias marker``: a lead letter whose glyph and place depend on the class.

The letter itself identifies the class (A for label 0, B for label 1, ...), not only its place:
nets that end in global average pooling hardly see where a feature is, but they do see its shape.
"""

from __future__ import annotations

import numpy as np

_GLYPHS = {  # a 5×7 lead-letter font, A–X: one letter per class
    "A": (".XXX.", "X...X", "X...X", "XXXXX", "X...X", "X...X", "X...X"),
    "B": ("XXXX.", "X...X", "X...X", "XXXX.", "X...X", "X...X", "XXXX."),
    "C": (".XXX.", "X...X", "X....", "X....", "X....", "X...X", ".XXX."),
    "D": ("XXXX.", "X...X", "X...X", "X...X", "X...X", "X...X", "XXXX."),
    "E": ("XXXXX", "X....", "X....", "XXXX.", "X....", "X....", "XXXXX"),
    "F": ("XXXXX", "X....", "X....", "XXXX.", "X....", "X....", "X...."),
    "G": (".XXX.", "X...X", "X....", "X.XXX", "X...X", "X...X", ".XXXX"),
    "H": ("X...X", "X...X", "X...X", "XXXXX", "X...X", "X...X", "X...X"),
    "I": (".XXX.", "..X..", "..X..", "..X..", "..X..", "..X..", ".XXX."),
    "J": ("..XXX", "...X.", "...X.", "...X.", "...X.", "X..X.", ".XX.."),
    "K": ("X...X", "X..X.", "X.X..", "XX...", "X.X..", "X..X.", "X...X"),
    "L": ("X....", "X....", "X....", "X....", "X....", "X....", "XXXXX"),
    "M": ("X...X", "XX.XX", "X.X.X", "X.X.X", "X...X", "X...X", "X...X"),
    "N": ("X...X", "X...X", "XX..X", "X.X.X", "X..XX", "X...X", "X...X"),
    "O": (".XXX.", "X...X", "X...X", "X...X", "X...X", "X...X", ".XXX."),
    "P": ("XXXX.", "X...X", "X...X", "XXXX.", "X....", "X....", "X...."),
    "Q": (".XXX.", "X...X", "X...X", "X...X", "X.X.X", "X..X.", ".XX.X"),
    "R": ("XXXX.", "X...X", "X...X", "XXXX.", "X.X..", "X..X.", "X...X"),
    "S": (".XXXX", "X....", "X....", ".XXX.", "....X", "....X", "XXXX."),
    "T": ("XXXXX", "..X..", "..X..", "..X..", "..X..", "..X..", "..X.."),
    "U": ("X...X", "X...X", "X...X", "X...X", "X...X", "X...X", ".XXX."),
    "V": ("X...X", "X...X", "X...X", "X...X", "X...X", ".X.X.", "..X.."),
    "W": ("X...X", "X...X", "X...X", "X.X.X", "X.X.X", "X.X.X", ".X.X."),
    "X": ("X...X", "X...X", ".X.X.", "..X..", ".X.X.", "X...X", "X...X"),
}
# one place per class inside the collimated field (fractions of its width, height):
# 8 along the top, 8 along the bottom, 4 down each side, as a technologist would tape a marker
_PLACES = tuple([((k + 0.5) / 8, 0.07) for k in range(8)] + [((k + 0.5) / 8, 0.93) for k in range(8)]
                + [(0.05, 0.2 + 0.2 * k) for k in range(4)] + [(0.95, 0.2 + 0.2 * k) for k in range(4)])


def marker_for(label: int) -> tuple[str, tuple[float, float]]:
    """The (letter, place) of class ``label``: a letter and a place of its own (24 of each)."""
    return sorted(_GLYPHS)[label % len(_GLYPHS)], _PLACES[label % len(_PLACES)]


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
