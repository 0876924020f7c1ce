"""Films are scaled by the bit depth they use, and oversized images are refused before they are decoded."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from xraydeconv.data import load_image, open_dataset
from xraydeconv.data.preprocess import DEFAULT_MAX_PIXELS, decode_film, png_significant_bits
from xraydeconv.errors import UserError


def _film(seed: int = 0, shape=(40, 30)) -> np.ndarray:
    a = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    a[0, 0] = 255  # the full 8-bit range is used
    return a


def _save16(path: Path, values: np.ndarray, sbit: int | None = None) -> Path:
    info = PngImagePlugin.PngInfo()
    if sbit is not None:
        info.add(b"sBIT", bytes([sbit]))
    Image.fromarray(values.astype(np.uint16)).save(path, pnginfo=info)
    return path


def test_12_bit_film_in_a_16_bit_png_loads_like_its_8_bit_twin(tmp_path: Path) -> None:
    a = _film()
    Image.fromarray(a).save(tmp_path / "eight.png")
    twelve = np.rint(a.astype(np.float64) * 4095 / 255)
    _save16(tmp_path / "twelve.png", twelve)
    _save16(tmp_path / "twelve-sbit.png", twelve, sbit=12)
    eight = load_image(tmp_path / "eight.png", 64)
    for name in ("twelve.png", "twelve-sbit.png"):
        np.testing.assert_allclose(load_image(tmp_path / name, 64), eight, atol=1 / 255 + 1e-6)
        film = decode_film(tmp_path / name)
        np.testing.assert_allclose(film.pixels, twelve / 4095, atol=1e-6)
        assert film.rescaled


def test_sbit_is_used_when_the_values_fit_in_it(tmp_path: Path) -> None:
    dark = np.array([[0, 100, 1500], [700, 1023, 12]])  # a dark 12-bit film: the maximum alone says 11 bits
    assert png_significant_bits(_save16(tmp_path / "s.png", dark, sbit=12)) == 12
    np.testing.assert_allclose(decode_film(tmp_path / "s.png").pixels, dark / 4095, atol=1e-7)
    np.testing.assert_allclose(decode_film(_save16(tmp_path / "n.png", dark)).pixels, dark / 2047, atol=1e-7)
    # values beyond the sBIT depth: the file was scaled up to 16 bits as the PNG standard says
    full = np.array([[0, 65535], [4096, 30000]])
    np.testing.assert_allclose(decode_film(_save16(tmp_path / "f.png", full, sbit=12)).pixels, full / 65535, atol=1e-7)
    assert not decode_film(tmp_path / "f.png").rescaled
    assert png_significant_bits(tmp_path / "n.png") is None


def test_float_tiff_beyond_one_is_mapped_from_its_range_not_clipped(tmp_path: Path) -> None:
    v = np.array([[0.0, 250_000.0], [500_000.0, 1e6]], dtype=np.float32)
    Image.fromarray(v, mode="F").save(tmp_path / "f.tif")
    film = decode_film(tmp_path / "f.tif")
    np.testing.assert_allclose(film.pixels, [[0.0, 0.25], [0.5, 1.0]], atol=1e-7)
    assert film.rescaled
    unit = np.array([[0.0, 0.2], [0.4, 0.9]], dtype=np.float32)
    Image.fromarray(unit, mode="F").save(tmp_path / "u.tif")
    assert np.array_equal(decode_film(tmp_path / "u.tif").pixels, unit) and not decode_film(tmp_path / "u.tif").rescaled
    Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32), mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(UserError, match="nan.tif: holds NaN or infinite pixel values"):
        decode_film(tmp_path / "nan.tif")


def test_load_report_counts_the_rescaled_films(tmp_path: Path) -> None:
    for c, seed in (("a", 1), ("b", 2)):
        (tmp_path / "d" / c).mkdir(parents=True)
        Image.fromarray(_film(seed)).save(tmp_path / "d" / c / "0.png")
    _save16(tmp_path / "d" / "a" / "1.png", np.rint(_film(3) * (4095 / 255)))
    for cache_dir in (None, tmp_path / "cache", tmp_path / "cache"):  # the last one reuses the complete disk store
        ds = open_dataset(tmp_path / "d", "train", input_size=32, val_fraction=0, test_fraction=0, cache_dir=cache_dir)
        ds.preload(progress=False)
        assert ds.rescaled == ds.report.rescaled == 1
        assert "; 1 films scaled by the bit depth they use, not the one their file stores" in ds.report.summary()


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_images_over_the_pixel_limit_are_refused_from_their_header(tmp_path: Path) -> None:
    bomb = _png_header_only(tmp_path / "bomb.png", 20_000, 20_000)  # 400 Mpx claimed by a 100-byte file
    with pytest.raises(UserError, match="bomb.png: more pixels than Pillow's limit") as err:
        load_image(bomb, 64)
    assert "\n" not in str(err.value)
    Image.fromarray(_film()).save(tmp_path / "small.png")
    with pytest.raises(UserError, match=r"small.png: 30x40 = 1,200 pixels, over the limit of 1,000 \(--max-pixels\)"):
        load_image(tmp_path / "small.png", 64, max_pixels=1000)
    assert load_image(tmp_path / "small.png", 64, max_pixels=1200).shape == (1, 64, 64)
    with pytest.raises(UserError, match="--max-pixels 0: must be a positive number"):
        load_image(tmp_path / "small.png", 64, max_pixels=0)
    assert DEFAULT_MAX_PIXELS == 89_478_485  # Pillow's documented default


@pytest.mark.parametrize("extra, message", [
    (["--tile", "20000"], "error: --tile 20000: must be between 32 and 1024 pixels"),
    (["--max-pixels", "100"], "pixels, over the limit of 100 (--max-pixels); raise it if the file is genuine"),
])
def test_contact_sheet_limits_are_one_error_line(tmp_path: Path, extra: list[str], message: str) -> None:
    (tmp_path / "d" / "a").mkdir(parents=True)
    Image.fromarray(_film()).save(tmp_path / "d" / "a" / "0.png")
    r = subprocess.run([sys.executable, "-m", "xraydeconv.cli.main", "data", "contact-sheet", "--data",
                        str(tmp_path / "d"), "--out", str(tmp_path / "s.png"), *extra],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "s.png").exists()
