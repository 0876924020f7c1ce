"""Batched augmentation for ``deeper-aug``, run on the training device with plain torch ops.

One random affine transform per image (rotation, isotropic scale, translation, optional left-right flip)
applied with a single ``affine_grid`` + ``grid_sample`` for the whole batch, then per-image intensity
changes that mimic exposure differences between radiographs: gamma, contrast about the image mean, and
additive Gaussian noise. All random numbers come from one CPU ``torch.Generator`` owned by the caller, so
the augmentation stream is reproducible, independent of the device, and can be checkpointed
(``generator.get_state()``) for exact resume.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms; each value is drawn uniformly per image.

    Attributes:
        rotation_deg: maximum absolute rotation in degrees.
        scale: (min, max) zoom factor (>1 enlarges the anatomy).
        translate: maximum shift as a fraction of the image side, in x and in y.
        flip_p: probability of a left-right flip (anatomy classes do not depend on laterality).
        gamma: (min, max) exponent applied to intensities in [0, 1].
        contrast: (min, max) factor applied about each image's mean.
        noise_std: maximum standard deviation of the additive Gaussian noise.
    """

    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.08
    flip_p: float = 0.5
    gamma: tuple[float, float] = (0.7, 1.4)
    contrast: tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.03

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def random_affine_matrices(n: int, cfg: AugmentConfig, generator: torch.Generator) -> Tensor:
    """(n, 2, 3) float64 matrices for ``F.affine_grid``, mapping output to input coordinates in [-1, 1]."""
    angle = _uniform(n, -cfg.rotation_deg, cfg.rotation_deg, generator) * (math.pi / 180.0)
    zoom = _uniform(n, cfg.scale[0], cfg.scale[1], generator)
    tx = _uniform(n, -cfg.translate, cfg.translate, generator) * 2.0  # fraction of the side -> [-1, 1] units
    ty = _uniform(n, -cfg.translate, cfg.translate, generator) * 2.0
    flip = torch.where(torch.rand(n, generator=generator, dtype=torch.float64) < cfg.flip_p, -1.0, 1.0)
    # affine_grid samples the input at theta @ (x_out, y_out, 1): zooming in means sampling a smaller region
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin
    theta[:, 0, 2] = tx
    theta[:, 1, 0] = sin * flip
    theta[:, 1, 1] = cos
    theta[:, 1, 2] = ty
    return theta


def augment_batch(images: Tensor, generator: torch.Generator, cfg: AugmentConfig | None = None) -> Tensor:
    """Randomly transform a batch of images in [0, 1].

    Args:
        images: (B, C, H, W) float tensor with values in [0, 1], on any device.
        generator: CPU generator that supplies every random number (advanced by the call).
        cfg: transform ranges; ``AugmentConfig()`` when None.
    Returns:
        (B, C, H, W) tensor of the same dtype and device, values clamped to [0, 1]. Pixels moved in from
        outside the image are 0 (the letterbox padding value).
    """
    if images.dim() != 4:
        raise ValueError(f"augment_batch expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    cfg = cfg or AugmentConfig()
    b = images.shape[0]
    device, dtype = images.device, images.dtype
    theta = random_affine_matrices(b, cfg, generator).to(device=device, dtype=dtype)
    # the per-image intensity parameters travel to the device as one tensor
    gamma, contrast, sigma = torch.stack([
        _uniform(b, cfg.gamma[0], cfg.gamma[1], generator),
        _uniform(b, cfg.contrast[0], cfg.contrast[1], generator),
        _uniform(b, 0.0, cfg.noise_std, generator),
    ]).to(device=device, dtype=dtype).view(3, b, 1, 1, 1)
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.clamp(0.0, 1.0).pow(gamma)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean
    out = out + sigma * noise
    return out.clamp(0.0, 1.0)
