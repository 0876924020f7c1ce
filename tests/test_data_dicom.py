"""DICOM decoding: Modality LUT, window / VOI LUT, MONOCHROME1 inversion, optional pydicom."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

from xraydeconv.data import load_image, open_dataset
from xraydeconv.data.preprocess import decode_image, image_size
from xraydeconv.errors import UserError

pydicom = pytest.importorskip("pydicom")
from conftest import RAMP, write_dicom  # noqa: E402


def test_monochrome2_without_window_uses_the_value_range(tmp_path):
    out = decode_image(write_dicom(tmp_path / "a.dcm"))
    assert out.dtype == np.float32 and out.shape == (8, 8)
    np.testing.assert_allclose(out, RAMP / 4032.0, atol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
    m2 = decode_image(write_dicom(tmp_path / "m2.dcm"))
    m1 = decode_image(write_dicom(tmp_path / "m1.dcm", photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m1[0, 0] == 1.0 and m1[-1, -1] == 0.0  # low stored values are bright in MONOCHROME1


def test_window_is_applied(tmp_path):
    # window centre 2048, width 1024: values <= 1536 black, > 2560 white, linear between
    out = decode_image(write_dicom(tmp_path / "w.dcm", window=(2048, 1024)))
    flat, ramp = out.ravel(), RAMP.ravel()
    assert (flat[ramp <= 1536] == 0).all() and (flat[ramp > 2560] == 1).all()
    mid = (ramp > 1536) & (ramp <= 2560)
    expect = ((ramp[mid] - 2047.5) / 1023 + 0.5).clip(0, 1)  # DICOM LINEAR window (PS3.3 C.11.2.1.2.1)
    np.testing.assert_allclose(flat[mid], expect, atol=1e-6)
    inv = decode_image(write_dicom(tmp_path / "w1.dcm", photometric="MONOCHROME1", window=(2048, 1024)))
    np.testing.assert_allclose(inv, 1.0 - out, atol=1e-6)


def test_rescale_comes_before_the_window(tmp_path):
    # stored s -> 2 s - 1000 ; a window around 1000 in rescaled units selects stored values near 1000
    out = decode_image(write_dicom(tmp_path / "r.dcm", rescale=(2, -1000), window=(1000, 400)))
    flat, ramp = out.ravel(), RAMP.ravel()
    value = 2.0 * ramp - 1000
    assert (flat[value <= 800] == 0).all() and (flat[value > 1200] == 1).all()
    between = (value > 800) & (value <= 1200)
    assert between.any() and ((flat[between] > 0) & (flat[between] < 1)).all()


def test_voi_lut_sequence_is_applied(tmp_path):
    lut = np.zeros(4096, dtype=np.uint8)
    lut[2048:] = 255  # a hard threshold at 2048
    out = decode_image(write_dicom(tmp_path / "v.dcm", voi_lut=lut))
    np.testing.assert_array_equal(out, (RAMP >= 2048).astype(np.float32))


def test_dicom_folder_is_an_imagefolder(tmp_path):
    for c in ("hand", "knee"):
        for i in range(2):
            write_dicom(tmp_path / "dcm" / c / f"{i}.dcm", pixels=np.tile(RAMP, (5, 5)))
    ds = open_dataset(tmp_path / "dcm", input_size=40, val_fraction=0.0, test_fraction=0.0)
    assert ds.format == "dicom" and ds.class_names == ["hand", "knee"] and len(ds) == 4
    assert image_size(ds.records[0].path) == (40, 40)
    x, _ = ds[0]
    assert x.shape == (1, 40, 40) and float(x.max()) == 1.0 and float(x.min()) == 0.0
    assert load_image(ds.records[0].path, 40).shape == (1, 40, 40)


def test_not_a_dicom_file_names_it(tmp_path):
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match="x.dcm: not a readable DICOM file"):
        decode_image(bad)


def test_missing_pydicom_says_how_to_install(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "a.dcm")
    real_import = builtins.__import__

    def no_pydicom(name, *args, **kwargs):
        if name == "pydicom" or name.startswith("pydicom."):
            raise ImportError("No module named 'pydicom'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pydicom)
    with pytest.raises(UserError, match=r"pip install xraydeconv\[dicom\]"):
        decode_image(path)


def test_multiframe_gives_the_first_frame_and_rgb_its_luminance(tmp_path):
    frames = np.stack([RAMP, RAMP[::-1]])
    path = write_dicom(tmp_path / "mf.dcm", pixels=RAMP)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 2
    ds.PixelData = frames.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    np.testing.assert_allclose(decode_image(path), RAMP / 4032.0, atol=1e-6)

    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 1] = 255  # pure green
    ds = pydicom.dcmread(write_dicom(tmp_path / "c.dcm"))
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = rgb.tobytes()
    ds.save_as(tmp_path / "c.dcm", enforce_file_format=True)
    np.testing.assert_allclose(decode_image(tmp_path / "c.dcm"), 0.587, atol=1e-3)
