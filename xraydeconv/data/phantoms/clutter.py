"""Foreign bodies that appear on real films whatever the body part: ECG electrodes, buttons, wires.

They are drawn with the same probability for every class, so they carry no label information;
they only make "the brightest small thing" a poor guess for where the anatomy is.
"""

from __future__ import annotations

import numpy as np

from xraydeconv.data.phantoms.shapes import BONE, Canvas, Pose


def add_clutter(att: np.ndarray, rng: np.random.Generator, chance: float = 0.35) -> None:
    """With probability ``chance`` add 1–3 foreign bodies to ``att`` (in place), anywhere on the film."""
    if rng.random() >= chance:
        return
    canvas = Canvas(Pose(att.shape[0]))  # image units: the film spans [-1, 1]
    for _ in range(int(rng.integers(1, 4))):
        x, y = rng.uniform(-0.85, 0.85, 2)
        kind = rng.integers(3)
        if kind == 0:  # ECG electrode with its lead
            canvas.ellipsoid(x, y, 0.028, 0.028, 0.02, mu=BONE * 3)
            a = rng.uniform(0, 360)
            canvas.arc(x + rng.uniform(-0.4, 0.4), y + rng.uniform(-0.4, 0.4), rng.uniform(0.2, 0.6),
                       rng.uniform(0.2, 0.6), a, a + rng.uniform(40, 120), 0.005, mu=BONE * 2, taper=0.0)
        elif kind == 1:  # button
            canvas.arc(x, y, 0.022, 0.022, 0, 360, 0.006, mu=BONE * 3, taper=0.0)
        else:  # tube or wire crossing part of the film
            a = rng.uniform(0, 360)
            r = rng.uniform(0.4, 1.2)
            canvas.arc(x, y, r, r * rng.uniform(0.5, 1.0), a, a + rng.uniform(30, 90), rng.uniform(0.004, 0.012),
                       mu=BONE * 1.5, taper=0.0)
    att += canvas.att
