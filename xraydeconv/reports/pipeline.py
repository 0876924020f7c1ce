"""Saved projections: one folder per image holding its pictures, heat maps and a manifest.

Layout of a folder (named after the image stem, made unique with ``-2``, ``-3`` ...)::

    overlay.png    original | combined top-n heat map over it (poster Fig. 2/3)
    focus.png      original | top-5 focus | top-n focus (poster Fig. 1/4)
    grid.png       each filter's heat map over the image, captioned with channel and activation
    maps.npy       float16 (top_n, H, W): per-filter heat maps |sum_c projection|, each normalised to [0, 1]
                   (the maximum |value| of each raw map is kept as ``map_scale`` in the manifest)
    manifest.json  checkpoint hash, model, layer, filters, prediction, truth, versions, settings
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from xraydeconv.reports import render

if TYPE_CHECKING:
    from xraydeconv.explain.deconvnet import Projection

__all__ = [
    "ImageResult", "unique_folder", "write_image_folder", "save_projection", "building_folder", "write_json",
    "read_manifest",
]

MANIFEST_VERSION = 1


@dataclass
class ImageResult:
    """Everything written for one projected image (also the row of the gallery)."""

    folder: str
    manifest: dict = field(default_factory=dict)


def unique_folder(stem: str, taken: set[str]) -> str:
    """A folder name for ``stem``: safe characters only, suffixed ``-2``, ``-3`` ... until it is not in ``taken``."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    name, k = base, 2
    while name.lower() in taken:
        name = f"{base}-{k}"
        k += 1
    taken.add(name.lower())
    return name


def write_json(obj: object, path: str | os.PathLike) -> Path:
    """Write JSON atomically (temp file in the same folder, then ``os.replace``)."""

    def dump(f: IO[str]) -> None:
        json.dump(obj, f, indent=1)
        f.write("\n")

    return render.write_atomically(path, dump, mode="w", encoding="utf-8")


def _save_npy(arr: np.ndarray, path: Path) -> None:
    render.write_atomically(path, lambda f: np.save(f, arr))


def write_image_folder(
    folder: Path,
    image: Tensor,
    maps: Tensor,
    channels: Tensor,
    activations: Tensor,
    manifest: dict,
    cmap: str = render.DEFAULT_CMAP,
    grid_cols: int = 5,
) -> dict:
    """Write the pictures, heat maps and manifest of one projected image into ``folder`` (created).

    Args:
        image: (C_in, H, W) the model's input in [0, 1].
        maps: (top_n, C_in, H, W) the projections of its filters, strongest first.
        channels, activations: (top_n,) filter ids and ranking scores.
        manifest: fields describing the run and the image; the filter list, map scales and file names are added.
    Returns:
        The manifest as written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    raw = maps.float().sum(1).abs()  # (top_n, H, W)
    scale = raw.flatten(1).amax(1)
    heats = render.normalise(raw)
    combined = render.normalise(heats.mean(0))
    top5 = render.normalise(heats[:5].mean(0))
    n = heats.shape[0]
    chans = [int(c) for c in channels.tolist()]
    acts = [float(a) for a in activations.tolist()]

    orig = render.to_rgb(image)
    over = render.overlay(image, combined, cmap)
    render.save_png(render.side_by_side([orig, over], ["input", f"top-{n} filters"]), folder / "overlay.png")
    render.save_png(
        render.side_by_side(
            [orig, render.overlay(image, top5, cmap), over], ["input", f"top-{min(5, n)} focus", f"top-{n} focus"]
        ),
        folder / "focus.png",
    )
    render.save_png(render.focus_grid(image, heats, chans, acts, cols=grid_cols, cmap=cmap), folder / "grid.png")
    # a small thumbnail for the gallery page
    im = Image.fromarray(over)
    im.thumbnail((160, 160))
    render.save_png(np.asarray(im), folder / "thumb.png")
    _save_npy(heats.to(torch.float16).cpu().numpy(), folder / "maps.npy")

    out = dict(manifest)
    out.update(
        {
            "manifest_version": MANIFEST_VERSION,
            "filters": [{"rank": k + 1, "channel": c, "activation": a} for k, (c, a) in enumerate(zip(chans, acts))],
            "channels": chans,
            "activations": acts,
            "map_scale": [float(v) for v in scale.tolist()],
            "maps": {"file": "maps.npy", "dtype": "float16", "shape": list(heats.shape),
                     "content": "per-filter |sum over input channels| of the projection, each divided by map_scale"},
            "files": ["overlay.png", "focus.png", "grid.png", "thumb.png", "maps.npy", "manifest.json"],
        }
    )
    write_json(out, folder / "manifest.json")
    return out


def save_projection(
    root: Path,
    stem: str,
    taken: set[str],
    image: Tensor,
    projection: Projection,
    index: int,
    manifest: dict,
    cmap: str = render.DEFAULT_CMAP,
) -> dict:
    """Write image ``index`` of a batch ``projection`` into a new folder of ``root`` named after ``stem``.

    Args:
        taken: folder names already used under ``root`` (lower case); the new one is added.
        image: (C_in, H, W) the input the projection was made from.
        manifest: fields describing the run and the image (see :func:`write_image_folder`).
    Returns:
        The gallery row ``{"folder": name, "manifest": manifest as written}``.
    """
    folder = unique_folder(stem, taken)
    man = write_image_folder(root / folder, image.cpu(), projection.maps[index].cpu(),
                             projection.channels[index].cpu(), projection.activations[index].cpu(), manifest, cmap=cmap)
    return {"folder": folder, "manifest": man}


@contextmanager
def building_folder(out: Path, overwrite: bool = True) -> Iterator[Path]:
    """A new temporary folder beside ``out`` to build the output in; it becomes ``out`` when the block succeeds.

    An existing ``out`` is replaced only once everything is written (with ``overwrite=False`` it must be empty:
    the caller checks that before the work starts). On any error the temporary folder is removed and ``out``
    is left untouched.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.absolute().parent))
    old = None
    try:
        yield tmp
        if out.exists():
            if overwrite:
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
            else:
                out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(folder: str | os.PathLike) -> dict:
    """Load ``manifest.json`` of a projected image folder."""
    with open(Path(folder) / "manifest.json", encoding="utf-8") as f:
        return json.load(f)
