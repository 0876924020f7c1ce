"""Deterministic train/val/test carving for formats that ship fewer splits than asked for."""

from __future__ import annotations

import math
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

    Without ``groups`` the carving is stratified by largest remainders: a split gets ``round(n * fraction)``
    items in all; each class first gives ``floor(n_class * fraction)``, and the rest go one each to the
    classes with the largest fractional parts (ties broken by ``seed``). Every class keeps at least one item
    for training, so a split may get fewer when the classes are tiny. With ``groups`` (e.g. patient ids)
    whole groups are assigned, so one patient never lands on both sides; then the fractions count groups.
    The result depends only on the item order, labels, groups and ``seed``.
    """
    if sum(fractions.values()) >= 1.0:
        raise UserError(f"split fractions {fractions} leave nothing for training")
    rng = np.random.default_rng(seed)
    if groups is not None:
        return _carve_groups(groups, fractions, rng)
    out = ["train"] * len(labels)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    classes = sorted(by_class)
    orders = {y: rng.permutation(len(by_class[y])) for y in classes}
    start = dict.fromkeys(classes, 0)
    for k, (name, frac) in enumerate(fractions.items()):
        room = {y: len(by_class[y]) - 1 - start[y] for y in classes}  # one item of each class stays in train
        quota = _largest_remainders({y: len(by_class[y]) * frac for y in classes}, round(len(labels) * frac), room,
                                    np.random.default_rng([seed, k]))
        for y in classes:
            for j in orders[y][start[y] : start[y] + quota[y]]:
                out[by_class[y][j]] = name
            start[y] += quota[y]
    return out


def _largest_remainders(exact: dict[int, float], total: int, room: dict[int, int],
                        rng: np.random.Generator) -> dict[int, int]:
    """Whole numbers near ``exact`` that add up to ``total`` (as far as ``room`` allows), by largest remainders."""
    quota = {y: max(0, min(math.floor(v), room[y])) for y, v in exact.items()}
    tie = dict(zip(exact, rng.permutation(len(exact)).tolist()))
    ranked = sorted(exact, key=lambda y: (-(exact[y] - math.floor(exact[y])), tie[y]))
    rest = total - sum(quota.values())
    while rest > 0:
        open_ = [y for y in ranked if quota[y] < room[y]]
        if not open_:
            break
        for y in open_[:rest]:
            quota[y] += 1
        rest -= min(rest, len(open_))
    return quota


def _carve_groups(groups: Sequence[str], fractions: dict[str, float], rng: np.random.Generator) -> list[str]:
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


def describe_carving(labels: Sequence[int], assignment: Sequence[str], num_classes: int) -> str:
    """One line for the load report: how many items (and of how many classes) each carved split got."""
    parts = []
    for name in sorted({s for s in assignment if s != "train"}):
        got = [y for y, s in zip(labels, assignment) if s == name]
        parts.append(f"{name} {len(got)} of {len(labels)} images ({len(set(got))} of {num_classes} classes)")
    return ", ".join(parts)
