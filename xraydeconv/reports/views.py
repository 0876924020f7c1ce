"""The pictures of one projected image, drawn on the film as it was given (poster Fig. 1 to 5).

- :func:`overlay_view` (Fig. 3): the combined heat of the top-n filters over the film, with a colour bar and the
  method, layer, top-n and prediction written above it;
- :func:`focus_view` (Fig. 1): the focus areas of the top-5 filters outlined on the film, one colour each;
- :func:`filter_tiles` and :func:`grid_view` (Fig. 4): every filter's heat and focus area on its own tile,
  captioned with its channel and activation;
- :func:`landmark_view` (Fig. 2): the film, its landmark outlines, and the heat with the outlines;
- :func:`compare_view` (Fig. 3, several nets): the heat of several checkpoints on the same film.

A misclassified film (Fig. 5) gets its true and predicted class with their probabilities in red above each view.
All heat goes through the display transform of :mod:`xraydeconv.reports.display`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from xraydeconv.reports import display, render
from xraydeconv.reports.display import DisplaySettings
from xraydeconv.reports.film import Film

__all__ = ["Heats", "caption_lines", "overlay_view", "focus_view", "filter_tiles", "grid_view", "landmark_view",
           "compare_view", "outline_colours"]

RED, BLACK, WHITE = (190, 0, 0), (0, 0, 0), (255, 255, 255)


@dataclass
class Heats:
    """One image's per-filter heat maps through the display transform, with the film they are drawn on.

    Attributes:
        film: the film at display resolution.
        filters: (n, h, w) per-filter maps at network resolution, smoothed, cropped to the film (the letterbox
            padding left out) and robustly normalised to [0, 1]; display only.
        combined_map: (h, w) the same for the mean of all n filters (the combined map).
        settings: the display transform.
    """

    film: Film
    filters: Tensor
    combined_map: Tensor
    settings: DisplaySettings

    @classmethod
    def make(cls, film: Film, heats: Tensor, stride: int, settings: DisplaySettings) -> Heats:
        """From raw per-filter heat maps (n, S, S) of a layer whose activations are ``stride`` pixels apart."""
        smoothed = film.crop(display.smooth(heats, display.smoothing_sigma(stride)))
        return cls(film, display.robust_normalise(smoothed, settings.percentile, settings.floor),
                   display.robust_normalise(smoothed.mean(0), settings.percentile, settings.floor), settings)

    def combined(self, film: Film | None = None) -> np.ndarray:
        """The normalised mean map of all the filters on ``film`` (default: this one)."""
        return (film or self.film).fit(self.combined_map).numpy()

    def singles(self, film: Film | None = None) -> np.ndarray:
        """(n, H, W) every filter's normalised map on ``film`` (default: this one)."""
        return (film or self.film).fit(self.filters).numpy()

    def focus(self, k: int, film: Film | None = None) -> np.ndarray:
        """Filter ``k``'s focus area on ``film``: the smallest region of its own map holding ``focus_share`` of
        the heat that falls on the film. bool (H, W)."""
        region = display.focus_region(self.filters[k], self.settings.focus_share).float()
        return (film or self.film).fit(region).numpy() >= 0.5


def caption_lines(meta: dict) -> list[tuple[str, tuple[int, int, int]]]:
    """The text written above a picture: model, method, layer, top-n; then prediction and truth (red when wrong)."""
    head = " · ".join(str(v) for v in (meta.get("model"), meta.get("method", "deconvnet"),
                                       f"layer {meta.get('layer_module', meta.get('layer', '?'))}",
                                       f"top-{meta.get('top_n', '?')}") if v)
    lines = [(head, BLACK)]
    pred, true = meta.get("predicted_class"), meta.get("true_class")
    if pred is not None:
        text = f"predicted {pred} {100 * meta.get('predicted_probability', 0):.1f} %"
        if true is not None:
            tp = meta.get("true_probability")
            text += f" · true {true}" + ("" if tp is None else f" {100 * tp:.1f} %")
        wrong = true is not None and true != pred
        lines.append(("MISCLASSIFIED: " + text if wrong else text, RED if wrong else BLACK))
    elif true is not None:
        lines.append((f"true {true}", BLACK))
    return lines


def _with_caption(rgb: np.ndarray, lines: Sequence[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    size = max(12, min(24, rgb.shape[0] // 24, rgb.shape[1] // 28))
    band = len(lines) * (size + 4) + 6
    im = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + band), WHITE)
    im.paste(Image.fromarray(rgb), (0, band))
    draw = ImageDraw.Draw(im)
    for k, (text, fill) in enumerate(lines):
        draw.text((4, 3 + k * (size + 4)), text, fill=fill, font=render.font(size))
    return np.asarray(im)


def _colour_bar(height: int, settings: DisplaySettings) -> np.ndarray:
    """A vertical bar: the colours of the heat from cold (bottom) to hot (top), each at the opacity it is drawn
    with over a mid-grey film, labelled."""
    size = max(11, min(20, height // 30))
    w = 3 * size + 26
    v = np.linspace(1.0, 0.0, height - 2 * size - 8, dtype=np.float32)[:, None].repeat(size, 1)
    bar = display.blend(np.full(v.shape, 0.5, np.float32), v, settings)
    im = Image.new("RGB", (w, height), WHITE)
    im.paste(Image.fromarray(bar), (4, size + 4))
    draw = ImageDraw.Draw(im)
    draw.text((2, 1), "heat", fill=BLACK, font=render.font(size))
    for frac, label in ((1.0, f"p{settings.percentile:g}"), (settings.low, "film")):
        y = size + 4 + round((1 - frac) * (v.shape[0] - 1))
        draw.line([(4 + size, y), (8 + size, y)], fill=BLACK)
        draw.text((10 + size, y - size // 2), label, fill=BLACK, font=render.font(size))
    return np.asarray(im)


def overlay_view(heats: Heats, meta: dict) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Fig. 3: the combined heat over the film, captioned, with a colour bar.

    Returns:
        (H', W', 3) uint8 and the box (top, left, height, width) of the film inside it.
    """
    rgb = display.blend(heats.film.pixels, heats.combined(), heats.settings)
    bar = _colour_bar(rgb.shape[0], heats.settings)
    body = np.concatenate([rgb, np.full((rgb.shape[0], 6, 3), 255, np.uint8), bar], axis=1)
    lines = caption_lines(meta)
    out = _with_caption(body, lines)
    return out, (out.shape[0] - rgb.shape[0], 0, rgb.shape[0], rgb.shape[1])


def outline_colours(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct, saturated outline colours (matplotlib's tab10, cycled)."""
    cmap = render.colormap("tab10")
    return [tuple(int(255 * c) for c in cmap(k % 10)[:3]) for k in range(n)]


def _draw_outline(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], width: int) -> None:
    edge = display.outline(mask, width)
    rgb[edge] = colour


def focus_view(heats: Heats, channels: Sequence[int], activations: Sequence[float], meta: dict,
               top: int = 5) -> np.ndarray:
    """Fig. 1: the focus areas of the ``top`` strongest filters outlined on the film, with a legend."""
    film = heats.film
    rgb = np.repeat(display.film_rgb(film.pixels)[..., None], 3, axis=2)
    n = min(top, len(channels))
    colours = outline_colours(n)
    width = max(2, max(film.shape) // 256)
    for k in reversed(range(n)):  # the strongest filter drawn last, on top
        _draw_outline(rgb, heats.focus(k), colours[k], width)
    size = max(12, min(24, film.shape[0] // 24))
    legend = Image.new("RGB", (16 * size, rgb.shape[0]), WHITE)
    draw = ImageDraw.Draw(legend)
    draw.text((4, 4), f"focus areas ({100 * heats.settings.focus_share:g} % of the heat)", fill=BLACK,
              font=render.font(size))
    for k in range(n):
        y = 4 + (k + 1) * (size + 8)
        draw.rectangle([4, y, 4 + size, y + size], outline=colours[k], width=3)
        draw.text((12 + size, y), f"#{k + 1} ch {int(channels[k])} a={float(activations[k]):.3g}", fill=BLACK,
                  font=render.font(size))
    body = np.concatenate([rgb, np.asarray(legend)], axis=1)
    return _with_caption(body, caption_lines({**meta, "top_n": n}))


def filter_tiles(heats: Heats, side: int = 224) -> list[np.ndarray]:
    """Each filter's heat over the film at ``side`` px (longest side), its focus area outlined in white."""
    small = heats.film.resized(side)
    tiles = []
    for k, h in enumerate(heats.singles(small)):
        rgb = display.blend(small.pixels, h, heats.settings)
        _draw_outline(rgb, heats.focus(k, small), WHITE, 1)
        tiles.append(rgb)
    return tiles


def grid_view(tiles: Sequence[np.ndarray], channels: Sequence[int], activations: Sequence[float], meta: dict,
              cols: int = 5) -> np.ndarray:
    """Fig. 4: the filter tiles in a grid, each captioned ``#rank ch <channel> a=<activation>``."""
    labels = [f"#{k + 1} ch {int(c)} a={float(a):.3g}" for k, (c, a) in enumerate(zip(channels, activations))]
    return _with_caption(render.focus_grid_tiles(tiles, labels, cols=cols), caption_lines(meta))


def landmark_view(heats: Heats, masks: dict[str, np.ndarray], meta: dict, side: int = 384) -> np.ndarray:
    """Fig. 2: film | film with its landmark outlines | heat with the outlines (masks (S, S) at network
    resolution, mapped onto the film)."""
    film = heats.film.resized(side)
    grey = np.repeat(display.film_rgb(film.pixels)[..., None], 3, axis=2)
    marked, hot = grey.copy(), display.blend(film.pixels, heats.combined(film=film), heats.settings)
    names = sorted(masks)
    colours = outline_colours(len(names))
    for name, colour in zip(names, colours):
        m = film.mask(masks[name])
        _draw_outline(marked, m, colour, 2)
        _draw_outline(hot, m, colour, 2)
    labels = ["film", "landmarks", f"heat, top-{meta.get('top_n', '?')}, and landmarks"]
    legend = [(f"landmark outline: {name}", colour) for name, colour in zip(names, colours)]
    return _with_caption(render.side_by_side([grey, marked, hot], labels), caption_lines(meta) + legend)


def compare_view(film: Film, heats: Sequence[Heats], metas: Sequence[dict]) -> np.ndarray:
    """Fig. 3 for several nets: the film, then each net's combined heat on it, captioned with its prediction."""
    grey = np.repeat(display.film_rgb(film.pixels)[..., None], 3, axis=2)
    tiles, labels = [grey], ["film"]
    for h, m in zip(heats, metas):
        tiles.append(display.blend(film.pixels, h.combined(film=film), h.settings))
        pred = m.get("predicted_class")
        labels.append(f"{m.get('model')}: {pred} {100 * m.get('predicted_probability', 0):.0f} %" if pred
                      else str(m.get("model")))
    return render.side_by_side(tiles, labels)
