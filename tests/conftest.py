"""Shared test helpers: small data sets built on the fly (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_tiny_imagefolder(root: Path, per_split=(8, 3, 3), size: int = 32, seed: int = 0) -> Path:
    """Three learnable classes (a bright bar on the left, middle or right) as train/val/test PNG folders."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val", "test"), per_split):
        for k, c in enumerate(("left", "middle", "right")):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.uniform(0, 60, (size, size))
                x0 = 2 + k * (size // 3)
                img[size // 3 : 2 * size // 3, x0 : x0 + size // 4] += 150
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_imagefolder():
    """The :func:`make_tiny_imagefolder` builder, for tests that need their own small ImageFolder data set."""
    return make_tiny_imagefolder
