"""From attenuation to film: exposure, detector blur, tone, heel effect, quantum noise, collimation."""

from __future__ import annotations

import numpy as np
from PIL import Image


def binomial_blur(img: np.ndarray, passes: int = 1) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur, ``passes`` times, edges replicated (a cheap Gaussian, σ ≈ 0.7 px per pass)."""
    for _ in range(passes):
        p = np.pad(img, 1, mode="edge")
        img = (p[:, :-2] + 2.0 * p[:, 1:-1] + p[:, 2:]) * 0.25
        img = (img[:-2] + 2.0 * img[1:-1] + img[2:]) * 0.25
    return img


def _texture(rng: np.random.Generator, size: int, cell: int, amplitude: float) -> np.ndarray:
    """Smooth random field: Gaussian noise on a grid of ``cell``-pixel cells, bicubically upsampled."""
    n = max(2, -(-size // cell))
    coarse = Image.fromarray(rng.standard_normal((n, n)).astype(np.float32) * amplitude, mode="F")
    return np.asarray(coarse.resize((size, size), Image.BICUBIC))


def sample_field(rng: np.random.Generator, size: int) -> tuple[int, int, int, int]:
    """Collimated field (x0, y0, x1, y1) in pixels: a third of films are open, the rest coned in per side."""
    if rng.random() < 0.35:
        return 0, 0, size, size
    m = rng.uniform(0.0, 0.14, 4) * size
    return int(m[0]), int(m[1]), size - int(m[2]), size - int(m[3])


def develop(att: np.ndarray, rng: np.random.Generator, field: tuple[int, int, int, int],
            bone: float = 1.0, opaque: np.ndarray | None = None) -> np.ndarray:
    """Turn the summed μ·thickness into an 8-bit-ready film in [0, 1] (bright = attenuating).

    The exposure is set from the mean attenuation of the body, as an automatic exposure control
    would, then varied; ``bone`` > 1 is a bone technique that pushes soft tissue down. Pixels in
    ``opaque`` (a lead marker) are fully attenuated.
    """
    size = att.shape[0]
    # tissue is not homogeneous: a mottled, band-limited texture (vessels, trabeculae, bowel content)
    att = np.maximum(att, 0.0) * (1.0 + _texture(rng, size, 16, 0.05) + _texture(rng, size, 4, 0.03))
    body = att > 0.05 * float(att.max() or 1.0)
    ref = float(att[body].mean()) if body.any() else 1.0
    k = rng.uniform(0.6, 1.3) / ref
    img = 1.0 - np.exp(-k * att)
    if bone != 1.0:
        lo = 0.22 * (bone - 1.0)
        img = np.clip((img - lo) / (1.0 - lo), 0.0, 1.0)
    img = binomial_blur(img.astype(np.float32), passes=max(1, round(rng.uniform(0.5, 3.0) * size / 256)))
    img = img ** float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    if opaque is not None:  # lead edges are sharp: the marker sits on top of the detector blur
        img[opaque] = rng.uniform(0.93, 1.0)
    # heel effect: a gentle exposure gradient along a random direction
    a = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    img = img * (1.0 + rng.uniform(0.0, 0.08) * (np.cos(a) * ramp[None, :] + np.sin(a) * ramp[:, None]))
    x0, y0, x1, y1 = field
    if (x0, y0, x1, y1) != (0, 0, size, size):
        outside = np.ones((size, size), np.float32)
        outside[y0:y1, x0:x1] = 0.0
        outside = binomial_blur(outside, 1)
        level = rng.uniform(0.78, 0.95) if rng.random() < 0.5 else rng.uniform(0.0, 0.08)
        img = img * (1.0 - outside) + level * outside
    sigma = rng.uniform(0.01, 0.06)
    img = img + sigma * np.sqrt(np.clip(img, 0.0, 1.0) + 0.03) * rng.standard_normal((size, size), np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)
