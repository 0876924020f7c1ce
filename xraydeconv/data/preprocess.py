"""Decoding and letterboxing shared by every data set and by ``load_image``.

One pipeline for every input: decode to a float32 (H, W) array in [0, 1] (8/16-bit grayscale,
RGB -> luminance, DICOM through :mod:`xraydeconv.data.formats.dicom`), resize the longest side to the
input size with an antialiased bilinear filter, pad centred with black, then quantise to uint8.
The uint8 step happens on every path (cached or not) so that training, caching and projection
all see exactly the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from xraydeconv.errors import UserError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
SUFFIXES: tuple[str, ...] = IMAGE_SUFFIXES + DICOM_SUFFIXES

# An image whose longest side is below input_size / MIN_SCALE_DIVISOR would be blown up from a
# handful of pixels: almost certainly a thumbnail or the wrong file.
MIN_SCALE_DIVISOR = 8

_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def is_dicom(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES


def _open_pil(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
    return img


def _pil_to_unit(img: Image.Image, path: Path) -> np.ndarray:
    """Convert any PIL mode to one float32 channel in [0, 1], scaled by the mode's bit depth."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img, dtype=np.float32) / 65535.0
    if mode == "I":
        # PNG gives 16-bit grayscale as "I" in some Pillow versions: the data are 16 bits wide.
        return np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)
    if mode == "F":
        return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    if mode in ("LA", "La"):
        img = img.getchannel(0)
    elif mode != "L":
        try:
            # ITU-R 601-2 luma for colour; palette images go through their palette
            img = img.convert("L")
        except ValueError:
            raise UserError(f"{path}: unsupported image mode {mode}") from None
    return np.asarray(img, dtype=np.float32) / 255.0


def _orientation(img: Image.Image) -> int | None:
    # Only JPEGs carry orientation in practice; asking a PNG for EXIF makes Pillow read the whole
    # file looking for a trailing eXIf chunk, which would double the decode time.
    if img.format not in ("JPEG", "MPO"):
        return None
    try:
        return img.getexif().get(_EXIF_ORIENTATION)
    except (OSError, ValueError, SyntaxError):
        return None


def _has_orientation(img: Image.Image) -> bool:
    return _orientation(img) not in (None, 1)


def decode_image(path: Path) -> np.ndarray:
    """Decode one PNG/JPEG/DICOM file to a float32 (H, W) array in [0, 1].

    JPEG EXIF orientation is applied, so coordinates refer to the image as displayed (PNG eXIf is ignored).
    Raises ``UserError`` naming the file when it is not a readable image.
    """
    path = Path(path)
    if is_dicom(path):
        from xraydeconv.data.formats.dicom import decode_dicom

        return decode_dicom(path)
    img = _open_pil(path)
    try:
        with img:
            img.load()
            if _has_orientation(img):
                img = ImageOps.exif_transpose(img)
            arr = _pil_to_unit(img, path)
    except UserError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"{path}: not a readable image (truncated or corrupt: {exc})") from None
    if arr.ndim != 2 or arr.size == 0:
        raise UserError(f"{path}: not a 2-D image (shape {arr.shape})")
    return arr


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image as displayed, read from its header without decoding the pixels."""
    path = Path(path)
    if is_dicom(path):
        from xraydeconv.data.formats.dicom import dicom_size

        return dicom_size(path)
    img = _open_pil(path)
    with img:
        w, h = img.size
        swap = _orientation(img) in _SWAPPING_ORIENTATIONS
    return (w, h) if swap else (h, w)


@dataclass(frozen=True)
class Letterbox:
    """Where an (H, W) image lands inside the (size, size) square: scaled to (height, width) at (top, left)."""

    size: int
    height: int
    width: int
    top: int
    left: int

    @classmethod
    def fit(cls, h: int, w: int, size: int) -> Letterbox:
        scale = size / max(h, w)
        nh = min(size, max(1, round(h * scale)))
        nw = min(size, max(1, round(w * scale)))
        return cls(size, nh, nw, (size - nh) // 2, (size - nw) // 2)

    def apply(self, arr: np.ndarray) -> np.ndarray:
        """Letterbox a float image: antialiased bilinear resize, black padding. Returns float32 (size, size)."""
        out = np.zeros((self.size, self.size), dtype=np.float32)
        resized = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), mode="F").resize(
            (self.width, self.height), Image.Resampling.BILINEAR
        )
        out[self.top : self.top + self.height, self.left : self.left + self.width] = np.asarray(resized)
        return np.clip(out, 0.0, 1.0, out=out)

    def apply_mask(self, mask: np.ndarray) -> np.ndarray:
        """Letterbox a boolean mask with the same geometry (nearest neighbour). Returns bool (size, size)."""
        out = np.zeros((self.size, self.size), dtype=bool)
        resized = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8) * 255, mode="L").resize(
            (self.width, self.height), Image.Resampling.NEAREST
        )
        out[self.top : self.top + self.height, self.left : self.left + self.width] = np.asarray(resized) > 127
        return out


def check_size(path: Path, h: int, w: int, input_size: int) -> None:
    if max(h, w) * MIN_SCALE_DIVISOR < input_size:
        raise UserError(
            f"{path}: image is {w}x{h} pixels, far smaller than the input size {input_size} "
            f"(longest side must be at least {-(-input_size // MIN_SCALE_DIVISOR)})"
        )


def preprocess(path: Path, input_size: int) -> np.ndarray:
    """Decode, check and letterbox one image file to a uint8 (input_size, input_size) array."""
    arr = decode_image(path)
    check_size(path, *arr.shape, input_size)
    boxed = Letterbox.fit(*arr.shape, input_size).apply(arr)
    return np.rint(boxed * 255.0).astype(np.uint8)


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (S, S) -> FloatTensor [1, S, S] in [0, 1]."""
    out = arr.astype(np.float32)
    out /= 255.0
    return torch.from_numpy(out).unsqueeze(0)


def check_input_size(input_size: int) -> int:
    if isinstance(input_size, bool) or not isinstance(input_size, (int, np.integer)) or input_size < 8:
        raise UserError(f"input_size: must be an integer of at least 8, got {input_size!r}")
    return int(input_size)


def load_image(path: str | Path, input_size: int = 256) -> torch.Tensor:
    """Load one image exactly as the data sets do: FloatTensor [1, input_size, input_size] in [0, 1].

    Grayscale (8 or 16 bit), RGB (to luminance), JPEG or DICOM; aspect kept, padded centred with black.
    Raises ``UserError`` naming the file when it is missing, not a readable image, or far smaller than
    ``input_size`` (longest side below input_size / 8).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not an image file")
    return to_tensor(preprocess(path, check_input_size(input_size)))
