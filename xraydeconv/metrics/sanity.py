"""Sanity checks for heat maps: the model-parameter randomisation test (Adebayo et al. 2018).

A heat map that explains the *network* must change when the network's weights are destroyed. The test
re-initialises the weights layer by layer, from the output down, and compares the maps of the randomised net
with those of the trained one:

- ``cascading``: the layers are randomised cumulatively (top layer, then top two, ...);
- ``independent``: one layer at a time, the others keep their trained weights.

The randomised layers, their order and their re-initialisation follow Quantus's ``MPRT`` (every module with
``reset_parameters``, output side first, ``torch.manual_seed(seed + 1)`` before each reset), so the Spearman
column equals Quantus's on the same maps. Three similarities are reported per image and layer:

- ``spearman``: rank correlation of the absolute maps (ties get their average rank, as in scipy);
- ``ssim``: the structural similarity of the two absolute maps as images (7x7 uniform window, K1 = 0.01,
  K2 = 0.03, sample covariance, data range of both maps together: scikit-image's defaults; Quantus instead
  applies SSIM to the flattened maps);
- ``topk``: the share of the ``top`` fraction of pixels of the trained map that stay in the randomised one's.

A map that does not depend on the weights (an edge detector, the film itself) keeps all three at 1.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ORDERS", "SIMILARITIES", "RandomisationResult", "randomisable_layers", "randomised_models",
           "spearman", "ssim", "topk_overlap", "model_randomisation_test"]

ORDERS = ("cascading", "independent")
SIMILARITIES = ("spearman", "ssim", "topk")


def randomisable_layers(model: nn.Module) -> list[str]:
    """Names of the modules the test re-initialises, output side first (those with ``reset_parameters``)."""
    return [name for name, m in model.named_modules() if hasattr(m, "reset_parameters")][::-1]


def _reset(module: nn.Module, seed: int) -> None:
    cuda = [p.device.index or 0 for p in module.parameters() if p.is_cuda][:1]
    with torch.random.fork_rng(devices=cuda):  # leave the caller's random state alone
        torch.manual_seed(seed + 1)
        module.reset_parameters()


def randomised_models(model: nn.Module, order: str = "cascading", seed: int = 42) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(layer name, model copy)`` with one more layer (cascading) or only that layer re-initialised.

    The same copy is yielded each time, changed in place: use it before asking for the next one.
    ``model`` itself is never changed.
    """
    if order not in ORDERS:
        raise ValueError(f"order {order!r}: use one of {', '.join(ORDERS)}")
    work = copy.deepcopy(model)
    trained = copy.deepcopy(work.state_dict())
    modules = dict(work.named_modules())
    for name in randomisable_layers(work):
        if order == "independent":
            work.load_state_dict(trained)
        _reset(modules[name], seed)
        yield name, work


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, tied values sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> np.ndarray:
    """(B,) Spearman rank correlation of ``|a[i]|`` and ``|b[i]|`` (any shape per image); NaN for a constant map."""
    a, b = (np.abs(np.asarray(torch.as_tensor(t).detach().cpu(), dtype=np.float64)) for t in (a, b))
    out = np.empty(a.shape[0])
    for i in range(a.shape[0]):
        ra, rb = _average_ranks(a[i].ravel()), _average_ranks(b[i].ravel())
        ra, rb = ra - ra.mean(), rb - rb.mean()
        den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
        out[i] = (ra * rb).sum() / den if den > 0 else np.nan
    return out


def ssim(a: Tensor, b: Tensor, win: int = 7) -> np.ndarray:
    """(B,) structural similarity of the absolute (B, H, W) maps ``a`` and ``b`` (scikit-image's defaults)."""
    x, y = (torch.as_tensor(t).detach().double().abs().unsqueeze(1) for t in (a, b))
    if min(x.shape[-2:]) < win:
        raise ValueError(f"ssim: maps of {tuple(x.shape[-2:])} are smaller than the {win}x{win} window")
    both = torch.cat([x, y], 1).flatten(1)
    rng = (both.amax(1) - both.amin(1)).view(-1, 1, 1, 1)
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    mean = lambda t: F.avg_pool2d(t, win, stride=1)  # noqa: E731  (only the windows inside the map)
    ux, uy = mean(x), mean(y)
    norm = win * win / (win * win - 1.0)  # sample covariance
    vx, vy = norm * (mean(x * x) - ux * ux), norm * (mean(y * y) - uy * uy)
    vxy = norm * (mean(x * y) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).cpu().numpy()


def topk_overlap(a: Tensor, b: Tensor, top: float = 0.1) -> np.ndarray:
    """(B,) share of the ``top`` fraction of pixels of ``|a[i]|`` that are also among those of ``|b[i]|``."""
    fa, fb = (torch.as_tensor(t).detach().abs().flatten(1) for t in (a, b))
    if not 0 < top <= 1:
        raise ValueError(f"top {top}: must be a fraction in (0, 1]")
    k = max(1, round(top * fa.shape[1]))
    ia, ib = fa.topk(k, dim=1).indices, fb.topk(k, dim=1).indices
    hit = torch.zeros_like(fa, dtype=torch.bool).scatter_(1, ia, True).gather(1, ib)
    return (hit.sum(1).double() / k).cpu().numpy()


@dataclass
class RandomisationResult:
    """Similarity of the trained net's maps to the randomised nets' maps.

    Attributes:
        order: ``"cascading"`` or ``"independent"``.
        layers: the randomised layers, output side first (one row each below).
        scores: similarity name -> (n_layers, B) float64.
        maps: the first images' maps, (1 + n_layers, n_kept, H, W): the trained net's, then after each step.
    """

    order: str
    layers: list[str]
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    maps: Tensor | None = None

    def summary(self) -> list[dict]:
        """One row per layer: its name and the mean (over images, NaN skipped) of each similarity."""
        rows = []
        for i, name in enumerate(self.layers):
            row: dict = {"layer": name}
            for key, v in self.scores.items():
                ok = ~np.isnan(v[i])
                row[key] = float(v[i][ok].mean()) if ok.any() else None
            rows.append(row)
        return rows


def model_randomisation_test(
    model: nn.Module,
    explain: Callable[[nn.Module, Tensor], Tensor],
    x: Tensor,
    order: str = "cascading",
    seed: int = 42,
    top: float = 0.1,
    keep_maps: int = 0,
) -> RandomisationResult:
    """Run the model-parameter randomisation test.

    Args:
        model: the trained network (left unchanged).
        explain: ``explain(model, x) -> (B, H, W)`` heat maps of ``x`` under ``model``.
        x: (B, C, H, W) inputs.
        order: ``"cascading"`` or ``"independent"``.
        seed: seed of the re-initialisation.
        top: the fraction of pixels of ``topk``.
        keep_maps: keep the maps of this many first images for the figure.
    Returns:
        :class:`RandomisationResult`.
    """
    trained = explain(model, x).detach().float()
    layers, rows, kept = [], {k: [] for k in SIMILARITIES}, [trained[:keep_maps].cpu()]
    for name, randomised in randomised_models(model, order, seed):
        maps = explain(randomised, x).detach().float()
        layers.append(name)
        rows["spearman"].append(spearman(trained, maps))
        rows["ssim"].append(ssim(trained, maps))
        rows["topk"].append(topk_overlap(trained, maps, top))
        kept.append(maps[:keep_maps].cpu())
    scores = {k: np.stack(v) if v else np.zeros((0, x.shape[0])) for k, v in rows.items()}
    return RandomisationResult(order, layers, scores, torch.stack(kept) if keep_maps else None)
