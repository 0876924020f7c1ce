"""Several attribution methods scored on the same films and landmarks, each beside the film itself.

A heat map that only follows bright bone already "points at" landmarks that lie on bone. The film used as its
own heat map (the ``film`` method of :mod:`xraydeconv.explain.methods`) is therefore a row of every table, and
every score is also given as its gain over that row: percentage points of pointing game, and the ratio of the
relevance mass over the area share (how much more the method concentrates on the landmarks than the film does).

Every method is scored against each landmark set of the data (``"all"``: every annotated landmark; the phantoms
also declare ``"discriminative"``: per class the landmarks that tell it apart from the classes it resembles, where
the film's pointing game is low), and against the planted ``marker`` of a biased phantom tree where there is one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from xraydeconv import metrics
from xraydeconv.errors import UserError
from xraydeconv.explain.methods import METHODS
from xraydeconv.reports.numbers import DASH, fixed, pct, pp, ratio

__all__ = ["FILM", "MARKER", "COMPARED", "MethodComparison", "landmark_stats", "score_rows", "parse_methods",
           "comparison_markdown"]

FILM = "film"
MARKER = "marker"
# what ``--methods all`` means: every method of the explain layer but the film, which is always added
COMPARED = tuple(m for m in METHODS if m != FILM)


def parse_methods(text: str | Sequence[str], flag: str = "--methods") -> tuple[str, ...]:
    """The methods of ``"deconvnet,guided"`` (or ``"all"``) in the given order, ``film`` last; UserError naming
    ``flag`` for an unknown or repeated one."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    if names == ["all"]:
        names = list(COMPARED)
    if not names or any(not n for n in names):
        raise UserError(f"{flag} {text!r}: give a comma-separated list of {', '.join(METHODS)} (or all)")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise UserError(f"{flag} {text!r}: unknown method {unknown[0]!r} (known: {', '.join(METHODS)}, or all)")
    if len(set(names)) != len(names):
        raise UserError(f"{flag} {text!r}: a method is named twice")
    return tuple(n for n in names if n != FILM) + (FILM,)


def landmark_stats(rows: np.ndarray) -> dict[str, float]:
    """Summary of (n, 4) per-image rows (pointing game, relevance mass, relevance rank, area share) with
    ``mass_over_area``, the relevance mass over its chance level."""
    s = metrics.LandmarkScores(*np.asarray(rows, dtype=np.float64).reshape(-1, 4).T).summary()
    s["mass_over_area"] = s["relevance_mass"] / s["area_share"] if s["area_share"] > 0 else float("nan")
    return s


def score_rows(maps: Tensor, masks: np.ndarray, tolerance: int = 0) -> np.ndarray:
    """(B, 4) per-image rows (pointing game, relevance mass, relevance rank, area share) of (B, H, W) ``maps``
    against (B, H, W) bool ``masks``: what :func:`landmark_stats` summarises."""
    sc = metrics.score_landmarks(maps, masks, tolerance=tolerance)
    return np.stack([sc.pointing_game, sc.relevance_mass, sc.relevance_rank, sc.area_share], axis=1)


@dataclass
class MethodComparison:
    """Accumulates, batch by batch, the landmark scores of every method on every landmark set.

    Attributes:
        methods: the compared methods, ``film`` among them.
        sets: the landmark sets scored, ``"all"`` first.
        tolerance: pointing-game tolerance in pixels.
    """

    methods: tuple[str, ...]
    sets: tuple[str, ...] = ("all",)
    tolerance: int = 0
    _scores: dict[tuple[str, str], list[np.ndarray]] = field(default_factory=dict)
    _seconds: dict[str, float] = field(default_factory=dict)
    _images: dict[str, int] = field(default_factory=dict)

    def add(self, method: str, maps: Tensor, masks: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
            seconds: float = 0.0, scored: Mapping[str, np.ndarray] | None = None) -> None:
        """Score one batch of one method.

        Args:
            method: one of :attr:`methods`.
            maps: (B, H, W) heat maps (CPU).
            masks: landmark set -> per image, landmark name -> bool (H, W); the ``marker`` is read from ``"all"``.
            seconds: what computing ``maps`` took, for the time per image.
            scored: set (or ``marker``) -> the :func:`score_rows` of ``maps`` on it, scored already by the caller
                (with this tolerance, over the images of the set that have landmarks); not scored again.
        """
        size, scored = tuple(maps.shape[-2:]), scored or {}
        for name in self.sets:
            per_image = masks.get(name, [])
            keep = [b for b, m in enumerate(per_image) if any(n != MARKER for n in m)]
            if keep:
                rows = scored.get(name)
                if rows is None:
                    union = np.stack([metrics.landmark_union(per_image[b], size, exclude=(MARKER,)) for b in keep])
                    rows = score_rows(maps[keep], union, self.tolerance)
                self._scores.setdefault((method, name), []).extend(rows)
        marked = [b for b, m in enumerate(masks.get("all", [])) if MARKER in m]
        if marked:
            rows = scored.get(MARKER)
            if rows is None:
                rows = score_rows(maps[marked], np.stack([masks["all"][b][MARKER] for b in marked]), self.tolerance)
            self._scores.setdefault((method, MARKER), []).extend(rows)
        self._seconds[method] = self._seconds.get(method, 0.0) + seconds
        self._images[method] = self._images.get(method, 0) + len(maps)

    def extend(self, other: MethodComparison) -> None:
        """Append the scores of ``other``, an accumulator of later images of the same run (a sharded run merges its
        batches in the run's order, so the table is that of one process)."""
        for key, rows in other._scores.items():
            self._scores.setdefault(key, []).extend(rows)
        for method, seconds in other._seconds.items():
            self._seconds[method] = self._seconds.get(method, 0.0) + seconds
        for method, n in other._images.items():
            self._images[method] = self._images.get(method, 0) + n

    def _stats(self, method: str, name: str) -> dict | None:
        rows = self._scores.get((method, name))
        return landmark_stats(np.stack(rows)) if rows else None

    def result(self, sanity: Mapping[str, dict] | None = None) -> dict | None:
        """The comparison table as data (None when no image had landmarks): per method and set its scores, their
        gain over the film, the marker's scores, seconds per image and, with ``sanity`` (the randomisation
        summary per method), the similarity of its maps after the whole net was randomised."""
        if not self._scores:
            return None
        rows, films = {}, {name: self._stats(FILM, name) for name in (*self.sets, MARKER)}
        for method in self.methods:
            row: dict = {"seconds_per_image": self._seconds.get(method, 0.0) / max(1, self._images.get(method, 0))}
            for name, film in films.items():
                s = self._stats(method, name)
                if s is not None and film is not None:
                    s["pointing_game_gain"] = s["pointing_game"] - film["pointing_game"]
                    s["mass_gain"] = (s["mass_over_area"] / film["mass_over_area"]
                                      if film["mass_over_area"] > 0 else float("nan"))
                row[name] = s
            if sanity and method in sanity:
                row["randomised"] = sanity[method].get("final")
            rows[method] = row
        return {"methods": list(self.methods), "sets": list(self.sets), "baseline": FILM,
                "tolerance": self.tolerance, "rows": rows}


def _cells(s: dict | None, gains: bool) -> list[str]:
    if s is None:
        return [DASH, DASH] if gains else [DASH]
    return [pct(s["pointing_game"]), pp(s.get("pointing_game_gain"))] if gains else [pct(s["pointing_game"])]


def comparison_markdown(table: dict | None, top_n: int) -> list[str]:
    """The comparison as Markdown lines (a heading, a caption and the table)."""
    if not table:
        return []
    sets = table["sets"]
    has_marker = any(r.get(MARKER) for r in table["rows"].values())
    has_sanity = any("randomised" in r for r in table["rows"].values())
    head = ["Method"]
    for name in sets:
        head += [f"Pointing game ({name})", "vs film"]
    head += ["Mass / area (all)", "vs film"] + (["Marker pointing game"] if has_marker else [])
    head += (["Rank corr. after randomisation"] if has_sanity else []) + ["s / image"]
    lines = ["", "## Methods compared", "",
             f"Each method's map of the same films (the deconvnet methods: top-{top_n} filters of the projected "
             "layer; the others explain the true class), scored against each landmark set. *vs film*: the gain "
             "over the film itself used as the map (pp: percentage points; ×: ratio of mass / area). *Rank corr. "
             "after randomisation*: Spearman correlation of the maps of the trained net and of the net with every "
             "layer re-initialised (1: the map does not depend on the weights).", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for method in table["methods"]:
        r = table["rows"][method]
        cells = [f"**{method}**" if method == FILM else method]
        for name in sets:
            cells += _cells(r.get(name), True)
        a = r.get("all")
        cells += [ratio(a["mass_over_area"]) if a else DASH, ratio(a.get("mass_gain")) if a else DASH]
        if has_marker:
            cells += _cells(r.get(MARKER), False)
        if has_sanity:
            cells.append(fixed((r.get("randomised") or {}).get("spearman")))  # None: constant maps
        cells.append(fixed(r["seconds_per_image"], 3))
        lines.append("| " + " | ".join(cells) + " |")
    return lines
