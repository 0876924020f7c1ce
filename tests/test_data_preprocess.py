"""Decoding and letterboxing shared by every data set and by load_image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from xraydeconv.data import load_image
from xraydeconv.data.preprocess import Letterbox, decode_image, image_size, preprocess
from xraydeconv.errors import UserError


def test_8bit_grayscale_is_scaled_by_255(tmp_path):
    a = np.array([[0, 51, 255], [102, 204, 0]], dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "g.png")
    out = decode_image(tmp_path / "g.png")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, a / 255.0, atol=1e-6)


def test_16bit_png_is_scaled_by_its_bit_depth_not_255(tmp_path):
    a = np.array([[0, 1000, 65535], [32768, 300, 12]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = decode_image(tmp_path / "g16.png")
    np.testing.assert_allclose(out, a / 65535.0, atol=1e-6)


def test_rgb_and_palette_become_luminance(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[1] = 200
    Image.fromarray(rgb).save(tmp_path / "c.png")
    out = decode_image(tmp_path / "c.png")
    assert out.shape == (2, 3)
    # ITU-R 601-2 luma weights
    np.testing.assert_allclose(out[0], [0.299, 0.587, 0.114], atol=2 / 255)
    np.testing.assert_allclose(out[1], 200 / 255, atol=1 / 255)
    Image.fromarray(rgb).quantize(colors=8).save(tmp_path / "p.png")
    np.testing.assert_allclose(decode_image(tmp_path / "p.png")[1], 200 / 255, atol=2 / 255)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "a.png")
    np.testing.assert_allclose(decode_image(tmp_path / "a.png"), out, atol=1 / 255)


def test_jpeg_decodes_with_exif_orientation(tmp_path):
    a = np.zeros((20, 40), dtype=np.uint8)
    a[:, :20] = 255  # left half bright
    img = Image.fromarray(a)
    img.save(tmp_path / "plain.jpg", quality=95)
    np.testing.assert_allclose(decode_image(tmp_path / "plain.jpg"), a / 255.0, atol=0.08)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", quality=95, exif=exif)
    out = decode_image(tmp_path / "rot.jpg")
    assert out.shape == (40, 20) and image_size(tmp_path / "rot.jpg") == (40, 20)
    assert out[:20].mean() > 0.9 and out[20:].mean() < 0.1  # the bright half is now on top


def test_letterbox_keeps_aspect_and_pads_centred_black(tmp_path):
    a = np.full((50, 100), 255, dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "wide.png")
    out = preprocess(tmp_path / "wide.png", 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    rows = np.flatnonzero(out.max(axis=1))
    assert (rows[0], rows[-1]) == (16, 47)  # 32 rows of image, 16 black rows above and below
    assert out[16:48].min() == 255 and out[:16].max() == 0 and out[48:].max() == 0
    geom = Letterbox.fit(50, 100, 64)
    assert (geom.height, geom.width, geom.top, geom.left) == (32, 64, 16, 0)
    tall = Letterbox.fit(99, 33, 64)
    assert (tall.height, tall.width, tall.top, tall.left) == (64, 21, 0, 21)


def test_letterbox_downscale_is_antialiased():
    # a one-pixel checkerboard averages to mid grey when shrunk 4x; point sampling would keep 0/1
    board = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)
    out = Letterbox.fit(64, 64, 16).apply(board)
    np.testing.assert_allclose(out, 0.5, atol=0.05)


def test_masks_get_the_image_geometry():
    geom = Letterbox.fit(40, 80, 32)
    mask = np.zeros((40, 80), dtype=bool)
    mask[:, :40] = True  # left half
    out = geom.apply_mask(mask)
    assert out.dtype == bool and out.shape == (32, 32)
    assert out[8:24, :16].all() and not out[8:24, 16:].any()
    assert not out[:8].any() and not out[24:].any()


def test_load_image_returns_one_channel_float_tensor(tmp_path):
    a = (np.arange(30 * 20) % 256).astype(np.uint8).reshape(30, 20)
    Image.fromarray(a).save(tmp_path / "x.png")
    t = load_image(tmp_path / "x.png", input_size=32)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (1, 32, 32)
    assert 0.0 <= t.min() and t.max() <= 1.0
    # the same pixels as the data set path: uint8 quantisation then / 255
    np.testing.assert_array_equal(t[0].numpy(), preprocess(tmp_path / "x.png", 32) / np.float32(255.0))


def test_not_an_image_is_a_user_error_naming_the_file(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a PNG")
    with pytest.raises(UserError, match="notes.png: not a readable image"):
        load_image(bad, 64)
    with pytest.raises(UserError, match="missing.png: no such file"):
        load_image(tmp_path / "missing.png", 64)
    with pytest.raises(UserError, match="is a folder"):
        load_image(tmp_path, 64)


def test_truncated_png_is_a_user_error(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="t.png"):
        load_image(tmp_path / "t.png", 64)


def test_image_far_smaller_than_the_input_is_refused(tmp_path):
    Image.fromarray(np.zeros((20, 31), dtype=np.uint8)).save(tmp_path / "thumb.png")
    with pytest.raises(UserError, match=r"thumb.png: image is 31x20 pixels, far smaller than the input size 256"):
        load_image(tmp_path / "thumb.png", 256)
    assert load_image(tmp_path / "thumb.png", 248).shape == (1, 248, 248)  # 31 * 8 = 248: still accepted


def test_bad_input_size_is_refused(tmp_path):
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(UserError, match="input_size"):
        load_image(tmp_path / "x.png", 0)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 3000), w=st.integers(1, 3000), size=st.integers(8, 512))
def test_letterbox_geometry_properties(h, w, size):
    g = Letterbox.fit(h, w, size)
    assert max(g.height, g.width) == size and min(g.height, g.width) >= 1
    assert g.top == (size - g.height) // 2 and g.left == (size - g.width) // 2
    # aspect kept to within rounding of one pixel on the short side
    scale = size / max(h, w)
    assert abs(g.height - h * scale) <= 0.5 + 1e-9 or g.height == 1
    assert abs(g.width - w * scale) <= 0.5 + 1e-9 or g.width == 1


@settings(max_examples=25, deadline=None)
@given(h=st.integers(4, 120), w=st.integers(4, 120), size=st.integers(8, 64))
def test_full_mask_covers_exactly_the_image_area(h, w, size):
    g = Letterbox.fit(h, w, size)
    image = g.apply(np.ones((h, w), dtype=np.float32))
    mask = g.apply_mask(np.ones((h, w), dtype=bool))
    np.testing.assert_array_equal(mask, image > 0.5)
    assert mask.sum() == g.height * g.width
