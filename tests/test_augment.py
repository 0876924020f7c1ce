"""Batched augmentation: reproducible from its generator, range-preserving, and each transform does its job."""

from __future__ import annotations

import pytest
import torch

from xraydeconv.training.augment import AugmentConfig, augment_batch

IDENTITY = AugmentConfig(rotation_deg=0, scale=(1, 1), translate=0, flip_p=0, gamma=(1, 1), contrast=(1, 1),
                         noise_std=0)


def _square(size: int = 64, half: int = 8, center: tuple[int, int] = (32, 32)) -> torch.Tensor:
    img = torch.zeros(1, 1, size, size)
    cy, cx = center
    img[..., cy - half : cy + half, cx - half : cx + half] = 1.0
    return img


def test_shape_dtype_range_and_device_preserved() -> None:
    x = torch.rand(6, 1, 48, 40, dtype=torch.float64)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)


def test_same_generator_state_gives_same_batch_and_state_can_be_checkpointed() -> None:
    x = torch.rand(4, 1, 32, 32)
    g = torch.Generator().manual_seed(123)
    saved = g.get_state()
    a = augment_batch(x, g)
    a2 = augment_batch(x, g)
    g.set_state(saved)
    b = augment_batch(x, g)
    assert torch.equal(a, b)
    assert not torch.equal(a, a2), "the generator advances between calls"


def test_each_image_gets_its_own_transform() -> None:
    x = _square().repeat(8, 1, 1, 1)
    out = augment_batch(x, torch.Generator().manual_seed(1))
    assert len({round(float(o.sum()), 3) for o in out}) == 8


def test_identity_ranges_leave_the_image_alone() -> None:
    x = torch.rand(3, 1, 33, 35)
    out = augment_batch(x, torch.Generator().manual_seed(0), IDENTITY)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_flip_mirrors_left_right() -> None:
    x = _square(center=(20, 16))
    cfg = AugmentConfig(**{**IDENTITY.to_dict(), "flip_p": 1.0})
    out = augment_batch(x, torch.Generator().manual_seed(0), cfg)
    torch.testing.assert_close(out, x.flip(-1), atol=1e-5, rtol=0)


def test_zoom_enlarges_and_translation_moves() -> None:
    x = _square()
    zoom = AugmentConfig(**{**IDENTITY.to_dict(), "scale": (1.5, 1.5)})
    assert augment_batch(x, torch.Generator(), zoom).sum() > 1.8 * x.sum()
    shift = AugmentConfig(**{**IDENTITY.to_dict(), "translate": 0.2})
    out = augment_batch(x.repeat(16, 1, 1, 1), torch.Generator().manual_seed(0), shift)
    cols = torch.arange(64.0)
    cx = (out.sum(dim=(1, 2)) * cols).sum(-1) / out.sum(dim=(1, 2, 3))
    assert (cx - 31.5).abs().max() > 3 and (cx - 31.5).abs().max() <= 0.2 * 64 + 1


def test_rotation_keeps_area_but_changes_pixels() -> None:
    x = _square(half=10)
    rot = AugmentConfig(**{**IDENTITY.to_dict(), "rotation_deg": 40.0})
    out = augment_batch(x.repeat(4, 1, 1, 1), torch.Generator().manual_seed(3), rot)
    for o in out:
        assert abs(float(o.sum()) - float(x.sum())) < 0.05 * float(x.sum())
    assert not torch.allclose(out[0], x[0], atol=0.1)


def test_intensity_transforms_change_values_not_geometry() -> None:
    x = torch.linspace(0, 1, 32 * 32).view(1, 1, 32, 32).repeat(4, 1, 1, 1)
    cfg = AugmentConfig(**{**IDENTITY.to_dict(), "gamma": (0.5, 2.0), "contrast": (0.7, 1.3)})
    out = augment_batch(x, torch.Generator().manual_seed(0), cfg)
    assert not torch.allclose(out, x, atol=1e-3)
    # monotone intensity maps keep the pixel order of a ramp
    flat = out.flatten(1)
    assert (flat[:, 1:] >= flat[:, :-1] - 1e-6).all()
    # the noise is sigma * N(0, 1) with sigma drawn in [0, noise_std]: doubling noise_std doubles it exactly
    flat = torch.full((2, 1, 32, 32), 0.5)
    half, full = (augment_batch(flat, torch.Generator().manual_seed(0),
                                AugmentConfig(**{**IDENTITY.to_dict(), "noise_std": std})) - 0.5 for std in (0.1, 0.2))
    unclamped = full.abs() < 0.5
    assert unclamped.float().mean() > 0.9 and not torch.equal(full, torch.zeros_like(full))
    torch.testing.assert_close(full[unclamped], 2 * half[unclamped], atol=1e-6, rtol=0)


def test_rejects_non_batched_input() -> None:
    with pytest.raises(ValueError):
        augment_batch(torch.rand(1, 32, 32), torch.Generator())
