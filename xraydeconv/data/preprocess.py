"""Decoding and letterboxing shared by every data set and by ``load_image``.

One pipeline for every input: decode to a float32 (H, W) array in [0, 1] (8/16-bit grayscale,
RGB -> luminance, DICOM through :mod:`xraydeconv.data.formats.dicom`), resize the longest side to the
input size with an antialiased bilinear filter, pad centred with black, then quantise to uint8.
The uint8 step happens on every path (cached or not) so that training, caching and projection
all see exactly the same pixels.

Bit depth: a film is scaled by the depth it actually uses, not by the one its file can store. 8-bit films
are divided by 255. Integer films wider than 8 bits (16-bit PNG/TIFF, 32-bit TIFF) are divided by
``2**k - 1``, where ``k`` is the PNG ``sBIT`` depth when the file has that chunk and its values fit in it,
else the smallest ``k >= 8`` whose ``2**k - 1`` holds the film's maximum: 12-bit data stored in 16 bits
loads like its 8-bit twin. Float films already in [0, 1] are used as they are; others are mapped linearly
from their own range [min, max] onto [0, 1] (as are integer films with negative values). A film with NaN or
infinite values is an error. Films scaled by another depth than their file's are counted as ``rescaled``.

Size: an image of more than ``max_pixels`` pixels (default Pillow's decompression-bomb limit,
``DEFAULT_MAX_PIXELS``) is refused from its header, before anything is decoded.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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

# Pillow's own limit, as it stands when this module is imported; --max-pixels replaces it for our reads
DEFAULT_MAX_PIXELS: int = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
# the size check below replaces Pillow's warning, which would otherwise add a second line to our error
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def is_dicom(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES


def check_max_pixels(max_pixels: int) -> int:
    """``max_pixels`` when it is a positive integer; lets Pillow open images up to that size."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise UserError(f"--max-pixels {max_pixels!r}: must be a positive number of pixels")
    # Pillow refuses twice its own limit at open; a larger limit asked for here is the user's explicit choice
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)
    return int(max_pixels)


def open_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image lazily (header only); UserError naming it when unreadable or over ``max_pixels`` pixels."""
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Image.DecompressionBombError:
        raise UserError(f"{path}: more pixels than Pillow's limit; raise --max-pixels if the file is genuine") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise UserError(f"{path}: {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} (--max-pixels); "
                        "raise it if the file is genuine")
    return img


def png_significant_bits(path: Path) -> int | None:
    """The gray depth of a PNG's ``sBIT`` chunk, read from the chunk headers before the pixel data; else None."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND"):
                    return None
                if kind == b"sBIT":
                    data = f.read(length)
                    return data[0] if data and 1 <= data[0] <= 16 else None
                f.seek(length + 4, 1)  # the data and its CRC
    except OSError:
        return None


def _unit_range(arr: np.ndarray, path: Path) -> np.ndarray:
    """Map ``arr`` linearly from its own [min, max] onto [0, 1] (a flat film becomes black)."""
    if not np.isfinite(arr).all():
        raise UserError(f"{path}: holds NaN or infinite pixel values")
    lo, hi = float(arr.min()), float(arr.max())
    if hi == lo:
        return np.zeros_like(arr, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _used_depth(top: float, significant: int | None) -> int:
    """Bits a non-negative integer film uses: ``sBIT`` when its values fit, else the smallest k >= 8 holding ``top``."""
    if significant is not None and top <= 2**significant - 1:
        return significant
    return max(8, int(top).bit_length())


class Film(NamedTuple):
    """A decoded film: ``pixels`` float32 (H, W) in [0, 1], and whether it was scaled by another depth than its
    file stores (``rescaled``)."""

    pixels: np.ndarray
    rescaled: bool


def _pil_to_unit(img: Image.Image, path: Path) -> Film:
    """Convert any PIL mode to one float32 channel in [0, 1], scaled by the bit depth the film uses."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float32)
        if arr.size and arr.min() < 0:
            return Film(_unit_range(arr.astype(np.float64), path), True)
        # PNG gives 16-bit grayscale as "I" in some Pillow versions: the data are 16 bits wide
        stored = 16 if mode != "I" or img.format == "PNG" else 32
        significant = png_significant_bits(path) if img.format == "PNG" else None
        bits = _used_depth(float(arr.max()) if arr.size else 0.0, significant)
        return Film(arr / float(2**bits - 1), bits < stored)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if arr.size and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1:
            return Film(arr.copy(), False)
        return Film(_unit_range(arr.astype(np.float64), path), True)
    if mode in ("LA", "La"):
        img = img.getchannel(0)
    elif mode != "L":
        try:
            # ITU-R 601-2 luma for colour; palette images go through their palette
            img = img.convert("L")
        except ValueError:
            raise UserError(f"{path}: unsupported image mode {mode}") from None
    return Film(np.asarray(img, dtype=np.float32) / 255.0, False)


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


def decode_film(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Film:
    """Decode one PNG/JPEG/TIFF/DICOM file to a float32 (H, W) array in [0, 1] (see the module's bit-depth rule).

    JPEG EXIF orientation is applied, so coordinates refer to the image as displayed (PNG eXIf is ignored).
    Raises ``UserError`` naming the file when it is not a readable image or has more than ``max_pixels`` pixels.
    """
    path = Path(path)
    if is_dicom(path):
        from xraydeconv.data.formats.dicom import decode_dicom

        return Film(decode_dicom(path), False)
    img = open_image(path, max_pixels)
    try:
        with img:
            img.load()
            if _has_orientation(img):
                img = ImageOps.exif_transpose(img)
            film = _pil_to_unit(img, path)
    except UserError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"{path}: not a readable image (truncated or corrupt: {exc})") from None
    if film.pixels.ndim != 2 or film.pixels.size == 0:
        raise UserError(f"{path}: not a 2-D image (shape {film.pixels.shape})")
    return film


def decode_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`decode_film`'s pixels: float32 (H, W) in [0, 1]."""
    return decode_film(path, max_pixels).pixels


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image as displayed, read from its header without decoding the pixels."""
    path = Path(path)
    if is_dicom(path):
        from xraydeconv.data.formats.dicom import dicom_size

        return dicom_size(path)
    img = open_image(path, max_pixels=2**62)  # the header only: nothing is decoded
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


def preprocess_film(path: Path, input_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, bool]:
    """Decode, check and letterbox one image file: uint8 (input_size, input_size) and whether it was rescaled."""
    film = decode_film(path, max_pixels)
    arr = film.pixels
    check_size(path, *arr.shape, input_size)
    boxed = Letterbox.fit(*arr.shape, input_size).apply(arr)
    return np.rint(boxed * 255.0).astype(np.uint8), film.rescaled


def preprocess(path: Path, input_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode, check and letterbox one image file to a uint8 (input_size, input_size) array."""
    return preprocess_film(path, input_size, max_pixels)[0]


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (S, S) -> FloatTensor [1, S, S] in [0, 1]."""
    out = arr.astype(np.float32)
    out /= 255.0
    return torch.from_numpy(out).unsqueeze(0)


def check_input_size(input_size: int) -> int:
    if isinstance(input_size, bool) or not isinstance(input_size, (int, np.integer)) or input_size < 8:
        raise UserError(f"input_size: must be an integer of at least 8, got {input_size!r}")
    return int(input_size)


def load_image(path: str | Path, input_size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Load one image exactly as the data sets do: FloatTensor [1, input_size, input_size] in [0, 1].

    Grayscale (8 or 16 bit), RGB (to luminance), JPEG or DICOM; aspect kept, padded centred with black.
    Raises ``UserError`` naming the file when it is missing, not a readable image, far smaller than
    ``input_size`` (longest side below input_size / 8) or larger than ``max_pixels``.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not an image file")
    return to_tensor(preprocess(path, check_input_size(input_size), check_max_pixels(max_pixels)))
