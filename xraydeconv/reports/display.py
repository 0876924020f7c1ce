"""The display transform: how a raw heat map becomes colour on a film. For pictures only, never for metrics.

A deconvnet heat map is peaky: the unpooling switches put the signal on scattered single pixels, so a map
normalised by its maximum is near zero almost everywhere, and an overlay whose opacity follows it shows a plain
film. The transform, step by step (docs/pictures.md shows each step):

1. **smoothing** with a Gaussian of ``sigma = stride / 2`` pixels (network resolution), where ``stride`` is the
   spacing of the layer's activations in input pixels: the map then shows the detail the layer can resolve, not
   the pattern of the switches;
2. **back onto the film**: the letterboxed square is cropped to the film and resized to the film's display size
   (:class:`xraydeconv.reports.film.Film`);
3. **robust normalisation**: ``(map - median) / (p98 - median)``, clipped to [0, 1]: a high percentile instead of
   the single maximum, so that one hot pixel cannot make the rest of the map look cold, and the median as the
   floor, so that a broad map does not colour the whole film (at most half of it can be coloured);
4. **opacity curve**: a smoothstep from ``low`` (transparent: the film shows unchanged) to ``high`` (opacity
   ``alpha``); the hot part is coloured clearly, cold areas stay plain film;
5. **colour**: a perceptually uniform colormap (``plasma`` by default: no black and no grey at any level, so
   colour never passes for film).

The raw maps (``maps.npy``, every metric) are left untouched.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DisplaySettings", "DEFAULT_CMAP", "smoothing_sigma", "smooth", "robust_normalise", "opacity", "colour",
           "blend", "focus_region", "outline", "visible_share", "layer_stride"]

DEFAULT_CMAP = "plasma"


@dataclass(frozen=True)
class DisplaySettings:
    """The knobs of the display transform (stored in each manifest as ``display``)."""

    cmap: str = DEFAULT_CMAP
    percentile: float = 98.0  # robust normalisation: this percentile of the smoothed map becomes 1 ...
    floor: float = 50.0  # ... and this one 0
    low: float = 0.2  # opacity curve: transparent below ``low`` ...
    high: float = 0.6  # ... full ``alpha`` above ``high``
    alpha: float = 0.8
    max_side: int = 1024  # the film's longest side is drawn at most this large ...
    min_side: int = 512  # ... and at least this large (small films are enlarged for legibility)
    focus_share: float = 0.5  # a filter's focus area: the smallest region holding this share of its heat

    def as_dict(self) -> dict:
        return asdict(self)


def smoothing_sigma(stride: int) -> float:
    """Gaussian sigma in network pixels for a layer whose activations are ``stride`` input pixels apart."""
    return max(0.5, stride / 2)


def smooth(heat: Tensor, sigma: float) -> Tensor:
    """Gaussian smoothing of (..., H, W) maps (reflect padding), same shape, float32."""
    h = heat.float()
    if sigma <= 0:
        return h
    r = max(1, math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    shape = h.shape
    flat = h.reshape(-1, 1, *shape[-2:])
    pad_h, pad_w = min(r, shape[-2] - 1), min(r, shape[-1] - 1)
    flat = F.pad(flat, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    flat = F.conv2d(flat, k[r - pad_w : r + pad_w + 1].view(1, 1, 1, -1))
    flat = F.conv2d(flat, k[r - pad_h : r + pad_h + 1].view(1, 1, -1, 1))
    return flat.reshape(shape)


def robust_normalise(heat: Tensor, percentile: float = 98.0, floor: float = 50.0) -> Tensor:
    """(..., H, W) -> [0, 1]: ``(map - f) / (p - f)`` clipped, with ``p`` the ``percentile`` and ``f`` the ``floor``
    percentile (the median by default) of each map; a map whose ``p`` equals ``f`` uses its maximum for ``p``."""
    flat = heat.float().flatten(-2).clamp_min(0)
    q = torch.quantile(flat, torch.tensor([floor / 100, percentile / 100]), dim=-1, keepdim=True)
    lo, hi = q[0], q[1]
    hi = torch.where(hi > lo, hi, flat.amax(-1, keepdim=True))
    span = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    return ((flat - lo) / span).clamp(0, 1).reshape(heat.shape)


def opacity(h: np.ndarray, settings: DisplaySettings) -> np.ndarray:
    """Opacity of the colour at normalised heat ``h``: 0 up to ``low``, a smoothstep to ``alpha`` at ``high``."""
    t = np.clip((h - settings.low) / (settings.high - settings.low), 0.0, 1.0)
    return (settings.alpha * t * t * (3 - 2 * t)).astype(np.float32)


def colour(h: np.ndarray, cmap: str) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) float32 RGB in [0, 1] through a matplotlib colormap (its 256
    entries, looked up)."""
    from xraydeconv.reports.render import colormap

    lut = colormap(cmap)(np.linspace(0.0, 1.0, 256))[:, :3].astype(np.float32)
    return lut[(np.clip(h, 0.0, 1.0) * 255.0 + 0.5).astype(np.intp)]


def blend(film: np.ndarray, h: np.ndarray, settings: DisplaySettings) -> np.ndarray:
    """Colour the normalised heat ``h`` (H, W) over the grey ``film`` (H, W) in [0, 1]: (H, W, 3) uint8.

    Where the opacity is 0 the result is the film's own grey, bit for bit (:func:`film_rgb`).
    """
    base = np.repeat(film_rgb(film)[..., None], 3, axis=2).astype(np.float32)
    a = opacity(h, settings)[..., None]
    out = base * (1 - a) + colour(h, settings.cmap) * 255.0 * a
    out = (out + 0.5).astype(np.uint8)
    cold = a[..., 0] == 0
    out[cold] = base[cold].astype(np.uint8)
    return out


def film_rgb(film: np.ndarray) -> np.ndarray:
    """(H, W) film in [0, 1] -> (H, W) uint8 grey."""
    return (np.clip(film, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def focus_region(heat: Tensor, share: float = 0.5) -> Tensor:
    """The smallest set of pixels holding ``share`` of the heat of each map: bool (..., H, W).

    Pixels are taken hottest first until their sum reaches ``share`` of the map's total; a map without heat
    has an empty region.
    """
    flat = heat.float().flatten(-2).clamp_min(0)
    values, order = flat.sort(dim=-1, descending=True)
    cum = values.cumsum(-1)
    total = cum[..., -1:]
    take = (cum - values) < share * total  # pixels needed before the share is reached
    take &= total > 0
    mask = torch.zeros_like(take)
    mask.scatter_(-1, order, take)
    return mask.reshape(heat.shape)


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The boundary of a bool (H, W) mask, ``width`` pixels thick inside it: bool (H, W)."""
    inner = np.asarray(mask, dtype=bool)
    m = inner
    for _ in range(width):  # erode by one pixel (4-neighbourhood; outside the picture counts as outside)
        p = np.pad(inner, 1)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def visible_share(rgb: np.ndarray, threshold: int = 48) -> float:
    """The share of pixels of an (H, W, 3) uint8 picture that carry visible colour: RGB channel spread above
    ``threshold`` (a grey film has spread 0)."""
    a = rgb.astype(np.int16)
    return float(((a.max(-1) - a.min(-1)) > threshold).mean())


def layer_stride(model: torch.nn.Module, module_name: str, input_size: int, in_channels: int = 1) -> int:
    """How many input pixels apart the activations of ``module_name`` are (input size / its output size)."""
    module = model.get_submodule(module_name)
    seen: list[int] = []
    hook = module.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    param = next(model.parameters(), None)
    x = torch.zeros(1, in_channels, input_size, input_size,
                    device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None else None)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        hook.remove()
        model.train(was_training)
    return max(1, round(input_size / seen[0])) if seen else 1
