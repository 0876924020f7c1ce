"""The model-parameter randomisation test of an evaluation: for each compared method, how much its maps change
when the net's layers are re-initialised (:mod:`xraydeconv.metrics.sanity`), as data and as two figures.

- ``sanity.png``: the standard figure of Adebayo et al. (2018), one row per method, the trained net's map of one
  film and then the maps as the layers are randomised from the output down (cascading);
- ``sanity_curves.png``: the mean Spearman rank correlation per randomised layer, cascading and independent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from xraydeconv.explain.methods import explainer
from xraydeconv.metrics.sanity import ORDERS, SIMILARITIES, RandomisationResult, model_randomisation_test
from xraydeconv.reports.numbers import fixed

__all__ = ["SANITY_PNG", "SANITY_CURVES_PNG", "run_randomisation", "randomisation_summary", "plot_sanity_maps",
           "plot_sanity_curves", "sanity_markdown"]

SANITY_PNG, SANITY_CURVES_PNG = "sanity.png", "sanity_curves.png"


def run_randomisation(model: nn.Module, x: Tensor, y: Sequence[int], methods: Sequence[str],
                      options: Mapping[str, dict], seed: int = 42,
                      orders: Sequence[str] = ORDERS) -> dict[str, dict[str, RandomisationResult]]:
    """Method -> order -> the randomisation test of ``methods`` on the films ``x`` (K, C, H, W).

    ``options``: per method, :func:`xraydeconv.explain.methods.heat_maps`' keywords (layer, top_n, occlusion's
    patch...); the gradient methods, Grad-CAM and occlusion explain the true classes ``y``. The maps of the first
    film are kept for :func:`plot_sanity_maps`.
    """
    target = torch.as_tensor(list(y), device=x.device)
    out: dict[str, dict[str, RandomisationResult]] = {}
    for method in methods:
        explain = explainer(method, target=target, **options.get(method, {}))  # methods without a class ignore it
        out[method] = {order: model_randomisation_test(model, explain, x, order=order, seed=seed, keep_maps=1)
                       for order in orders}
    return out


def randomisation_summary(results: Mapping[str, Mapping[str, RandomisationResult]]) -> dict:
    """JSON-able summary: per method and order the per-layer means of each similarity, and ``final``: the
    similarities after the cascade has randomised every layer."""
    out: dict = {}
    for method, by_order in results.items():
        entry: dict = {order: res.summary() for order, res in by_order.items()}
        cascade = entry.get("cascading")
        entry["final"] = cascade[-1] if cascade else None
        out[method] = entry
    return out


def _norm(m: Tensor) -> np.ndarray:
    """|map| scaled by its 99th percentile and clipped: peaky maps stay visible (display only)."""
    a = m.abs().float().numpy()
    top = float(np.percentile(a, 99))
    top = top if top > 0 else float(a.max())
    return np.clip(a / top, 0, 1) if top > 0 else a


def plot_sanity_maps(results: Mapping[str, Mapping[str, RandomisationResult]], film: Tensor, path: Path,
                     tile: float = 1.1) -> None:
    """``sanity.png``: per method (rows) the film's map of the trained net, then after each cascading step.

    ``film``: (H, W) the film the maps are of, drawn in the first column.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in results if results[m].get("cascading") is not None]
    layers = results[methods[0]]["cascading"].layers
    cols = 2 + len(layers)
    fig, axes = plt.subplots(len(methods), cols, figsize=(tile * cols, tile * len(methods) + 0.6), squeeze=False)
    for r, method in enumerate(methods):
        res = results[method]["cascading"]
        panels = [film.float().numpy()] + [_norm(res.maps[k, 0]) for k in range(res.maps.shape[0])]
        for c, ax in enumerate(axes[r]):
            ax.imshow(panels[c], cmap="gray" if c == 0 else "inferno", vmin=0, vmax=1 if c else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("film" if c == 0 else "trained" if c == 1 else layers[c - 2], fontsize=6, rotation=45)
        axes[r][0].set_ylabel(method, fontsize=7)
    fig.suptitle("Maps as the layers are re-initialised, output side first (cascading); each map scaled to its "
                 "99th percentile", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sanity_curves(summary: Mapping[str, dict], path: Path) -> None:
    """``sanity_curves.png``: mean Spearman correlation with the trained net's maps per randomised layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orders = [o for o in ORDERS if any(o in s for s in summary.values())]
    fig, axes = plt.subplots(1, len(orders), figsize=(5.5 * len(orders), 3.6), squeeze=False, sharey=True)
    low = np.nanmin([np.nan if r.get("spearman") is None else r["spearman"]
                     for s in summary.values() for o in orders for r in (s.get(o) or [])] + [0.0])
    for ax, order in zip(axes[0], orders):
        for method, s in summary.items():
            rows = s.get(order) or []
            vals = [np.nan if r.get("spearman") is None else r["spearman"] for r in rows]
            ax.plot(range(1, len(vals) + 1), vals, marker="o", ms=3, label=method)
        names = [r["layer"] for r in next(s[order] for s in summary.values() if s.get(order))]
        ax.set_xticks(range(1, len(names) + 1), names, rotation=60, ha="right", fontsize=6)
        ax.set_ylim(min(-0.2, low - 0.05), 1.05)
        ax.axhline(0, color="#888", lw=0.5)
        ax.set_title(f"{order}: layer re-initialised", fontsize=9)
        ax.set_ylabel("Spearman with the trained net's map", fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sanity_markdown(summary: Mapping[str, dict] | None, images: int) -> list[str]:
    """Markdown lines: per method the similarities after the top layer and after every layer is randomised."""
    if not summary:
        return []
    lines = ["", "## Sanity check: model-parameter randomisation", "",
             f"The maps of {images} films by the trained net against those of the net with its layers re-initialised "
             "from the output down (Adebayo et al. 2018). Near 1: the map hardly depends on the weights. "
             f"Figures: [{SANITY_PNG}]({SANITY_PNG}), [{SANITY_CURVES_PNG}]({SANITY_CURVES_PNG}).", "",
             "| Method | " + " | ".join(f"{k}, top layer" for k in SIMILARITIES) + " | "
             + " | ".join(f"{k}, all layers" for k in SIMILARITIES) + " |",
             "|---|" + "---:|" * (2 * len(SIMILARITIES))]
    for method, s in summary.items():
        first = (s.get("cascading") or [{}])[0]
        final = s.get("final") or {}
        lines.append(f"| {method} | " + " | ".join(fixed(first.get(k)) for k in SIMILARITIES) + " | "
                     + " | ".join(fixed(final.get(k)) for k in SIMILARITIES) + " |")
    return lines
