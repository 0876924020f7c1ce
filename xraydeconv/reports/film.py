"""The film as it was given: the original image at its own resolution, and the way back from the network's
letterboxed square onto it.

Every image reaches the network letterboxed (:class:`xraydeconv.data.preprocess.Letterbox`): resized so that its
longest side fills the input square, padded centred with black. A :class:`Film` holds the original film scaled
for display (longest side between ``min_side`` and ``max_side``) and the letterbox geometry, so that a heat map or
a landmark mask at network resolution is cropped to the film and resized onto it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = ["Film", "display_shape"]


def display_shape(h: int, w: int, min_side: int = 512, max_side: int = 1024) -> tuple[int, int]:
    """(height, width) of an (h, w) film drawn with its longest side clamped to [min_side, max_side]."""
    side = min(max(max(h, w), min_side), max_side)
    scale = side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


@dataclass
class Film:
    """A film for display.

    Attributes:
        pixels: (H, W) float32 in [0, 1], the film at display resolution.
        size: the side of the network's input square.
        top, left, height, width: where the film lies inside that square (the letterbox).
        original: (height, width) of the film file (the network input's size when there is no file).
    """

    pixels: np.ndarray
    size: int
    top: int
    left: int
    height: int
    width: int
    original: tuple[int, int]

    @classmethod
    def load(cls, path: str | os.PathLike, input_size: int, min_side: int = 512, max_side: int = 1024,
             max_pixels: int | None = None) -> Film:
        """Decode an image file (PNG, JPEG, DICOM, as the data sets do) and scale it for display; ``max_pixels`` is
        the run's ``--max-pixels`` (None: Pillow's limit), so a film the run admitted is drawn too."""
        from xraydeconv.data.preprocess import DEFAULT_MAX_PIXELS, Letterbox, decode_image

        arr = decode_image(path, max_pixels or DEFAULT_MAX_PIXELS)
        box = Letterbox.fit(*arr.shape, input_size)
        shape = display_shape(*arr.shape, min_side, max_side)
        img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), mode="F")
        pixels = np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)
        return cls(np.clip(pixels, 0, 1), input_size, box.top, box.left, box.height, box.width, tuple(arr.shape))

    @classmethod
    def from_input(cls, image: Tensor, min_side: int = 512, max_side: int = 1024) -> Film:
        """The network's input itself (C, S, S) in [0, 1] as the film, when the original file is not at hand."""
        a = image.detach().float().cpu()
        a = a.mean(0) if a.dim() == 3 else a
        s = a.shape[-1]
        shape = display_shape(*a.shape, min_side, max_side)
        pixels = F.interpolate(a[None, None], size=shape, mode="bilinear", align_corners=False)[0, 0]
        return cls(pixels.clamp(0, 1).numpy(), s, 0, 0, a.shape[0], a.shape[1], tuple(a.shape))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixels.shape)

    def resized(self, side: int) -> Film:
        """The same film with its longest side drawn at ``side`` pixels."""
        shape = display_shape(*self.shape, side, side)
        t = torch.from_numpy(self.pixels)[None, None]
        pixels = F.interpolate(t, size=shape, mode="bilinear", align_corners=False, antialias=side < max(self.shape))
        return Film(pixels[0, 0].clamp(0, 1).numpy(), self.size, self.top, self.left, self.height, self.width,
                    self.original)

    def crop(self, maps: Tensor) -> Tensor:
        """(..., S, S) maps at network resolution -> (..., height, width): the part that covers the film."""
        return maps[..., self.top : self.top + self.height, self.left : self.left + self.width]

    def heat(self, maps: Tensor) -> Tensor:
        """(..., S, S) maps -> (..., H, W) float32 on the film at display resolution (bilinear)."""
        return self.fit(self.crop(maps))

    def fit(self, cropped: Tensor) -> Tensor:
        """(..., height, width) maps already cropped to the film -> (..., H, W) float32 at display resolution."""
        m = cropped.float()
        lead = m.shape[:-2]
        out = F.interpolate(m.reshape(-1, 1, *m.shape[-2:]), size=self.shape, mode="bilinear", align_corners=False)
        return out.reshape(*lead, *self.shape)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """A bool (S, S) mask at network resolution -> bool (H, W) on the film (bilinear, then halfway)."""
        return self.heat(torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))).numpy() >= 0.5
