"""Landmark agreement of heat maps: pointing game, relevance mass and relevance rank accuracy.

The definitions are those of Quantus (localisation metrics), with its array layout:
``a_batch`` holds the heat maps (B, H, W) — or (B, N, H, W) for N maps per image, e.g. one per
projected filter — and ``s_batch`` the binary landmark masks (B, H, W), which broadcast over N.
Every function returns one score per map, as float64 numpy arrays of shape (B,) or (B, N);
an image without landmark pixels scores NaN (as in Quantus), so that ``np.nanmean`` skips it.

- pointing game (Zhang et al. 2018): 1 when a maximal pixel of the map lies inside the mask
  (dilated by ``tolerance`` pixels), else 0;
- relevance mass accuracy (Arras et al. 2022): positive relevance inside the mask / all positive relevance;
- relevance rank accuracy (Arras et al. 2022): of the K = |mask| highest pixels, the fraction inside the mask;
- area share: |mask| / (H * W), the relevance mass a map spread uniformly would get — the chance level
  against which a relevance mass is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = np.ndarray | torch.Tensor

__all__ = [
    "pointing_game",
    "relevance_mass",
    "relevance_rank",
    "area_share",
    "landmark_union",
    "LandmarkScores",
    "score_landmarks",
    "per_class",
    "nanmean",
]


def _tensor(x: ArrayLike) -> torch.Tensor:
    return x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _masks(s_batch: ArrayLike) -> torch.Tensor:
    s = _tensor(s_batch)
    if s.dim() == 4 and s.shape[1] == 1:  # Quantus keeps a channel axis on masks
        s = s[:, 0]
    if s.dim() != 3:
        raise ValueError(f"s_batch: expected masks of shape (B, H, W), got {tuple(s.shape)}")
    return s.bool()


def _as_tensors(a_batch: ArrayLike, s_batch: ArrayLike) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Check shapes; return maps (B, N, H, W) float, masks (B, 1, H, W) bool and whether the maps came as (B, H, W)."""
    a = _tensor(a_batch)
    s = _masks(s_batch)
    if a.dim() not in (3, 4):
        raise ValueError(f"a_batch: expected heat maps of shape (B, H, W) or (B, N, H, W), got {tuple(a.shape)}")
    if a.shape[0] != s.shape[0] or a.shape[-2:] != s.shape[-2:]:
        raise ValueError(
            f"a_batch {tuple(a.shape)} and s_batch {tuple(s.shape)} disagree: need the same batch size and (H, W)"
        )
    was_3d = a.dim() == 3
    if was_3d:
        a = a[:, None]
    return a.float(), s[:, None], was_3d


def _squeeze(x: torch.Tensor, was_3d: bool) -> np.ndarray:
    out = x.double().cpu().numpy()
    return out[:, 0] if was_3d else out


def _dilate(s: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow masks (B, 1, H, W) by a Euclidean disc of ``radius`` pixels."""
    if radius <= 0:
        return s
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disc = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).float()[None, None]
    return F.conv2d(s.float(), disc, padding=radius) > 0


def pointing_game(a_batch: ArrayLike, s_batch: ArrayLike, tolerance: int = 0) -> np.ndarray:
    """1.0 where a maximal pixel of the heat map lies inside the mask, 0.0 where not, NaN for an empty mask.

    Args:
        a_batch: heat maps (B, H, W) or (B, N, H, W).
        s_batch: bool masks (B, H, W) (or (B, 1, H, W)).
        tolerance: radius in pixels by which the mask is grown first (Zhang et al. use 15 at 224 px).
    Returns:
        (B,) or (B, N) float64. Ties count as a hit when any tied maximum is inside (as Quantus); a constant
        map points nowhere and is a miss.
    """
    a, s, was_3d = _as_tensors(a_batch, s_batch)
    s = _dilate(s, tolerance)
    flat = a.flatten(2)
    top = flat.amax(dim=2, keepdim=True)
    constant = top[..., 0] == flat.amin(dim=2)
    hit = ((flat == top) & s.flatten(2)).any(dim=2) & ~constant
    out = hit.double()
    out[(s.flatten(2).sum(2) == 0).expand_as(out)] = float("nan")
    return _squeeze(out, was_3d)


def relevance_mass(a_batch: ArrayLike, s_batch: ArrayLike) -> np.ndarray:
    """Positive relevance inside the mask / total positive relevance, in [0, 1].

    Args and returns as :func:`pointing_game`; NaN also where the map has no positive relevance.
    """
    a, s, was_3d = _as_tensors(a_batch, s_batch)
    pos = a.clamp(min=0).double()
    inside = (pos * s).sum(dim=(2, 3))
    total = pos.sum(dim=(2, 3))
    out = inside / total
    out[(total == 0) | (s.sum(dim=(2, 3)) == 0).expand_as(out)] = float("nan")
    return _squeeze(out, was_3d)


def relevance_rank(a_batch: ArrayLike, s_batch: ArrayLike) -> np.ndarray:
    """Of the K = |mask| highest-ranked pixels of each map, the fraction that lies inside the mask.

    Args and returns as :func:`pointing_game`. Ties among equal values are broken in row-major order.
    """
    a, s, was_3d = _as_tensors(a_batch, s_batch)
    b, n, h, w = a.shape
    flat = a.reshape(b * n, h * w)
    sflat = s.expand(b, n, h, w).reshape(b * n, h * w)
    k = sflat.sum(dim=1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    # ranks[i, p] = position of pixel p in the descending order of map i
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(h * w).expand(b * n, -1).contiguous())
    hits = (sflat & (ranks < k[:, None])).sum(dim=1)
    out = (hits.double() / k.double()).reshape(b, n)
    out[(k == 0).reshape(b, n)] = float("nan")
    return _squeeze(out, was_3d)


def area_share(s_batch: ArrayLike) -> np.ndarray:
    """|mask| / (H * W) per image: (B,) float64 (0 for an empty mask)."""
    s = _masks(s_batch)
    return (s.flatten(1).sum(1).double() / (s.shape[1] * s.shape[2])).numpy()


def landmark_union(masks: Mapping[str, np.ndarray], size: tuple[int, int], exclude: Sequence[str] = ()) -> np.ndarray:
    """The union of an image's landmark masks, leaving out the names in ``exclude``: bool (H, W)."""
    out = np.zeros(size, dtype=bool)
    for name, m in masks.items():
        if name in exclude:
            continue
        if m.shape != tuple(size):
            raise ValueError(f"landmark {name!r}: mask of shape {m.shape} does not match the image {tuple(size)}")
        out |= m.astype(bool)
    return out


@dataclass
class LandmarkScores:
    """All three metrics plus the area share for one family of masks (B images, optionally N maps each)."""

    pointing_game: np.ndarray
    relevance_mass: np.ndarray
    relevance_rank: np.ndarray
    area_share: np.ndarray  # (B,)

    def summary(self) -> dict[str, float]:
        """Mean of each metric over the images that have landmark pixels (NaN where none has), plus counts."""
        valid = self.area_share > 0
        return {
            "pointing_game": nanmean(self.pointing_game),
            "relevance_mass": nanmean(self.relevance_mass),
            "relevance_rank": nanmean(self.relevance_rank),
            "area_share": float(self.area_share[valid].mean()) if valid.any() else float("nan"),
            "n": int(valid.sum()),
        }


def nanmean(x: np.ndarray) -> float:
    """Mean of the non-NaN values of ``x``; NaN when there are none (without numpy's empty-slice warning)."""
    x = np.asarray(x, dtype=np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def score_landmarks(a_batch: ArrayLike, s_batch: ArrayLike, tolerance: int = 0) -> LandmarkScores:
    """Pointing game, relevance mass, relevance rank and area share in one call (see the module docstring)."""
    return LandmarkScores(
        pointing_game=pointing_game(a_batch, s_batch, tolerance=tolerance),
        relevance_mass=relevance_mass(a_batch, s_batch),
        relevance_rank=relevance_rank(a_batch, s_batch),
        area_share=area_share(s_batch),
    )


def per_class(values: ArrayLike, labels: ArrayLike, class_names: Sequence[str]) -> dict[str, float]:
    """NaN-skipping mean of per-image ``values`` (B,) or (B, N) for each class that occurs in ``labels`` (B,)."""
    v = np.asarray(values, dtype=np.float64)
    lab = np.asarray(labels)
    if v.shape[0] != lab.shape[0]:
        raise ValueError(f"values for {v.shape[0]} images but labels for {lab.shape[0]}")
    out: dict[str, float] = {}
    for c, name in enumerate(class_names):
        sel = lab == c
        if sel.any():
            out[name] = nanmean(v[sel])
    return out
