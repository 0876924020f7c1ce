"""Deterministic train/val/test carving for formats that ship fewer splits than asked for."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xraydeconv.errors import UserError


def check_fraction(name: str, value: float) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise UserError(f"{name}: must be in [0, 1), got {value}")
    return float(value)


def carve(
    labels: Sequence[int],
    fractions: dict[str, float],
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> list[str]:
    """Assign every item to ``"train"`` or one of the ``fractions`` keys (e.g. ``{"val": 0.1}``).

    Without ``groups`` the carving is stratified: each class gives ``round(n * fraction)`` items to
    each split (keeping at least one for training). With ``groups`` (e.g. patient ids) whole groups are
    assigned, so one patient never lands on both sides; then the fractions count groups.
    The result depends only on the item order, labels, groups and ``seed``.
    """
    if sum(fractions.values()) >= 1.0:
        raise UserError(f"split fractions {fractions} leave nothing for training")
    rng = np.random.default_rng(seed)
    if groups is not None:
        unique = sorted(set(groups))
        order = rng.permutation(len(unique))
        chosen: dict[str, str] = {}
        start = 0
        for name, frac in fractions.items():
            k = round(len(unique) * frac)
            for j in order[start : start + k]:
                chosen[unique[j]] = name
            start += k
        return [chosen.get(g, "train") for g in groups]
    out = ["train"] * len(labels)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    for y in sorted(by_class):
        members = by_class[y]
        order = rng.permutation(len(members))
        start = 0
        for name, frac in fractions.items():
            k = min(round(len(members) * frac), max(0, len(members) - 1 - start))
            for j in order[start : start + k]:
                out[members[j]] = name
            start += k
    return out
