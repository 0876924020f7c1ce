"""DICOM decoding with pydicom (optional extra): Modality LUT, VOI LUT or window, MONOCHROME1 inverted.

The result is what a radiologist's viewer shows by default, scaled to [0, 1]:
stored values -> Modality LUT (rescale slope/intercept) -> the first VOI LUT of the VOI LUT
sequence, else the first Window Center/Width (pydicom's ``apply_voi`` / ``apply_windowing``) ->
normalised by the output range of that transform (for a LUT, the span of its table) ->
inverted when the image is MONOCHROME1 (high values displayed dark).
Without any VOI information the min..max of the modality values is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xraydeconv.errors import UserError

_INSTALL_HINT = "reading DICOM needs pydicom: pip install xraydeconv[dicom]"


def _pydicom() -> Any:
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401  (pydicom >= 3 helpers; 2.x has pixel_data_handlers)
    except ImportError:
        raise UserError(_INSTALL_HINT) from None
    return pydicom


def _read(path: Path, pixels: bool) -> Any:
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as exc:  # pydicom raises a zoo of types for foreign or truncated files
        raise UserError(f"{path}: not a readable DICOM file ({exc.__class__.__name__}: {exc})") from None


def dicom_size(path: Path) -> tuple[int, int]:
    """(rows, columns) from the header, without reading the pixel data."""
    ds = _read(path, pixels=False)
    try:
        return int(ds.Rows), int(ds.Columns)
    except AttributeError:
        raise UserError(f"{path}: DICOM file has no image (Rows/Columns missing)") from None


def _window_range(ds: Any, apply_windowing: Any) -> tuple[float, float]:
    # pydicom's windowing output range depends on bits stored, signedness and rescale; probing
    # it with extreme inputs keeps us consistent with whatever the helper does.
    probe = apply_windowing(np.array([-1e30, 1e30]), ds)
    return float(probe[0]), float(probe[1])


def _apply_voi_lut(values: np.ndarray, ds: Any, apply_voi: Any) -> tuple[np.ndarray, float, float]:
    """The first VOI LUT, and the span of its table (some devices declare more bits than the table uses)."""
    item = ds.VOILUTSequence[0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    if bits == 8:
        # pydicom 3.0 indexes an 8-bit table through a uint8 array, wrapping inputs above 255; a 16-bit
        # entry width holds the same values and indexes correctly
        item.LUTDescriptor = [entries, first, 16]
    if not np.issubdtype(values.dtype, np.integer):
        values = np.rint(values).astype(np.int64)
    table = apply_voi(np.arange(first, first + (entries or 2**16), dtype=np.int64), ds).astype(np.float64)
    return apply_voi(values, ds).astype(np.float64), float(table.min()), float(table.max())


def decode_dicom(path: Path) -> np.ndarray:
    """Decode a DICOM image to float32 (H, W) in [0, 1], as displayed (see the module docstring).

    Multi-frame files give their first frame; colour files (RGB/YBR) give their luminance.
    """
    path = Path(path)
    ds = _read(path, pixels=True)
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    if "PixelData" not in ds:
        raise UserError(f"{path}: DICOM file holds no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise UserError(
            f"{path}: cannot decode the DICOM pixel data ({exc.__class__.__name__}: {exc}); compressed "
            "transfer syntaxes need pylibjpeg or gdcm installed"
        ) from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if samples == 3:
        # pydicom converts YBR to RGB when decoding; luminance as for RGB PNGs (ITU-R 601-2)
        rgb = arr.astype(np.float64)
        lum = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        top = float(2 ** int(ds.get("BitsStored", 8)) - 1)
        return np.clip(lum / top, 0.0, 1.0).astype(np.float32)
    if arr.ndim != 2:
        raise UserError(f"{path}: unsupported DICOM pixel layout (shape {arr.shape})")

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        values = apply_modality_lut(arr, ds)
        if ds.get("VOILUTSequence"):
            out, lo, hi = _apply_voi_lut(values, ds, apply_voi)
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            out = apply_windowing(values, ds)
            lo, hi = _window_range(ds, apply_windowing)
        else:
            out = np.asarray(values, dtype=np.float64)
            lo, hi = float(out.min()), float(out.max())
    except (ValueError, NotImplementedError, AttributeError, TypeError, IndexError) as exc:
        raise UserError(f"{path}: cannot apply the DICOM value transforms ({exc})") from None
    span = hi - lo
    unit = (out - lo) / span if span > 0 else np.zeros_like(out)
    unit = np.clip(unit, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return unit.astype(np.float32)
