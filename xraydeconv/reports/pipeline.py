"""The one projection pipeline of ``project``, ``evaluate`` and ``demo``: project a batch of images, write one folder
per image (pictures, ``maps.npy``, ``manifest.json``), then the gallery over the folders.

Layout of a folder (named after the image stem, made unique with ``-2``, ``-3`` ...)::

    overlay.png    original | combined top-n heat map over it (poster Fig. 2/3)
    focus.png      original | top-5 focus | top-n focus (poster Fig. 1/4)
    grid.png       each filter's heat map over the image, captioned with channel and activation
    thumb.png      a thumbnail for the gallery
    maps.npy       float16 (top_n, H, W): per-filter heat maps |sum_c projection|, each normalised to [0, 1]
                   (the maximum |value| of each raw map is kept as ``map_scale`` in the manifest)
    manifest.json  checkpoint hash, model, layer, filters, prediction, truth, versions, settings
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from xraydeconv.errors import UserError
from xraydeconv.io import building_folder, check_output_folder, write_atomically, write_json
from xraydeconv.reports import render
from xraydeconv.reports.gallery import write_gallery

if TYPE_CHECKING:
    from xraydeconv.explain.deconvnet import DeconvNet, Projection
    from xraydeconv.training.checkpoint import Checkpoint

__all__ = [
    "MANIFEST_VERSION", "ProjectSettings", "ImageSource", "FolderWriter", "unique_folder", "write_image_folder",
    "manifest_base", "prediction_fields", "layer_module_name", "project_into", "project_checkpoint",
]

MANIFEST_VERSION = 1
FOLDER_FILES = ("overlay.png", "focus.png", "grid.png", "thumb.png", "maps.npy", "manifest.json")


@dataclass(frozen=True)
class ProjectSettings:
    """How each image is projected (``DeconvNet.project`` arguments) and drawn."""

    top_n: int = 25
    layer: int | str = -1
    mode: str = "map"
    rank: str = "max"
    method: str = "deconvnet"
    precision: str = "fp32"
    batch_size: int = 4
    cmap: str = render.DEFAULT_CMAP


# --- the images of a run ----------------------------------------------------------------------------------------


@dataclass
class ImageSource:
    """The images of a run: source file, gallery name, folder stem and true label (None: unknown) of each.

    ``load(i)`` gives image ``i`` as the model's input, (C_in, S, S) in [0, 1].
    """

    paths: list[Path]
    names: list[str]
    stems: list[str]
    labels: list[int | None]
    class_names: list[str] | None
    load: Callable[[int], Tensor]

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], input_size: int) -> ImageSource:
        """Image files, all decoded up front so that a bad file fails the run before any output is made."""
        from xraydeconv.data import load_image

        paths = [Path(p) for p in paths]
        for p in paths:
            if not p.exists():
                raise UserError(f"{p}: no such file")
        tensors = [load_image(p, input_size) for p in paths]
        return cls(paths, [p.name for p in paths], [p.stem for p in paths], [None] * len(paths), None,
                   tensors.__getitem__)

    @classmethod
    def from_dataset(cls, ds, indices: Sequence[int]) -> ImageSource:
        """Images ``indices`` of an ``XrayDataset``, named ``<true class>/<file>``."""
        indices = list(indices)
        recs = [ds.records[i] for i in indices]
        classes = [ds.class_names[int(r.label)] for r in recs]
        return cls([r.path for r in recs], [f"{c}/{r.path.name}" for c, r in zip(classes, recs)],
                   [f"{c}-{r.path.stem}" for c, r in zip(classes, recs)], [int(r.label) for r in recs],
                   list(ds.class_names), lambda i: ds[indices[i]][0])

    def __len__(self) -> int:
        return len(self.paths)

    def true_class(self, i: int) -> str | None:
        label = self.labels[i]
        return None if label is None else self.class_names[label]

    def batches(self, batch_size: int) -> Iterator[tuple[list[int], Tensor]]:
        """``(indices, (b, C_in, S, S) images)`` in order."""
        for b0 in range(0, len(self), batch_size):
            idx = list(range(b0, min(len(self), b0 + batch_size)))
            yield idx, torch.stack([self.load(i) for i in idx])


# --- manifests ----------------------------------------------------------------------------------------------------


def layer_module_name(dn: DeconvNet, layer: int) -> str:
    """The qualified module name of conv layer ``layer`` (a non-negative index) of ``dn``'s model."""
    return dn.steps[dn.conv_steps[layer]].name


def manifest_base(checkpoint: str | os.PathLike, ckpt: Checkpoint, dn: DeconvNet, layer: int,
                  settings: ProjectSettings) -> dict:
    """The manifest fields shared by every image of a run: checkpoint, model, layer, settings, versions."""
    import xraydeconv

    return {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": ckpt.sha256,
        "model": ckpt.model_name,
        "epoch": ckpt.epoch,
        "layer": layer,
        "layer_module": layer_module_name(dn, layer),
        "top_n": settings.top_n,
        "mode": settings.mode,
        "rank": settings.rank,
        "method": settings.method,
        "precision": settings.precision,
        "input_size": ckpt.input_size,
        "xraydeconv_version": xraydeconv.__version__,
        "torch_version": torch.__version__,
    }


def prediction_fields(probs: Tensor | None, class_names: Sequence[str], true_class: str | None,
                      top_k: int = 3) -> dict:
    """The manifest fields of one image's prediction.

    Args:
        probs: (num_classes,) class probabilities, or None for a model without a classifier.
        true_class: the image's true class name, None when unknown.
    Returns:
        ``true_class``, and with ``probs``: ``predicted_class``, ``predicted_probability``, ``top_classes`` (the
        ``top_k`` most probable) and, when the class is known, ``true_probability`` (None for a class the model
        does not have).
    """
    out: dict = {"true_class": true_class}
    if probs is None:
        return out
    k = int(probs.argmax())
    out["predicted_class"] = class_names[k]
    out["predicted_probability"] = float(probs[k])
    values, ids = probs.topk(min(top_k, probs.shape[0]))
    out["top_classes"] = [{"class": class_names[int(c)], "probability": float(v)} for v, c in zip(values, ids)]
    if true_class is not None:
        out["true_probability"] = float(probs[class_names.index(true_class)]) if true_class in class_names else None
    return out


# --- one folder per image ---------------------------------------------------------------------------------------


def unique_folder(stem: str, taken: set[str]) -> str:
    """A folder name for ``stem``: safe characters only, suffixed ``-2``, ``-3`` ... until it is not in ``taken``."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    name, k = base, 2
    while name.lower() in taken:
        name = f"{base}-{k}"
        k += 1
    taken.add(name.lower())
    return name


def _write_pictures(folder: Path, image: Tensor, heats: Tensor, chans: list[int], acts: list[float], cmap: str,
                    grid_cols: int) -> None:
    """overlay.png, focus.png, grid.png and thumb.png of one image from its (top_n, H, W) heat maps."""
    n = heats.shape[0]
    combined = render.normalise(heats.mean(0))
    top5 = render.normalise(heats[:5].mean(0))
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
    im = Image.fromarray(over)
    im.thumbnail((160, 160))
    render.save_png(np.asarray(im), folder / "thumb.png")


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
    chans = [int(c) for c in channels.tolist()]
    acts = [float(a) for a in activations.tolist()]
    _write_pictures(folder, image, heats, chans, acts, cmap, grid_cols)
    write_atomically(folder / "maps.npy", lambda f: np.save(f, heats.to(torch.float16).cpu().numpy()))
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
            "files": list(FOLDER_FILES),
        }
    )
    write_json(out, folder / "manifest.json")
    return out


class FolderWriter:
    """Writes projected images into one folder each under ``root``, then the gallery over them.

    Args:
        root: the folder that receives the image folders and ``index.html``.
        base: the manifest fields shared by every image (:func:`manifest_base`).
    """

    def __init__(self, root: Path, base: dict, cmap: str = render.DEFAULT_CMAP) -> None:
        self.root, self.base, self.cmap = Path(root), base, cmap
        self.rows: list[dict] = []
        self.taken: set[str] = set()

    def add(self, stem: str, image: Tensor, projection: Projection, index: int, fields: dict) -> dict:
        """Write image ``index`` of a batch ``projection`` into a new folder named after ``stem``.

        Args:
            image: (C_in, H, W) the input the projection was made from.
            fields: the image's own manifest fields (input file, prediction, truth).
        Returns:
            The gallery row ``{"folder": name, "manifest": manifest as written}``.
        """
        folder = unique_folder(stem, self.taken)
        man = write_image_folder(self.root / folder, image.cpu(), projection.maps[index].cpu(),
                                 projection.channels[index].cpu(), projection.activations[index].cpu(),
                                 {**self.base, **fields}, cmap=self.cmap)
        row = {"folder": folder, "manifest": man}
        self.rows.append(row)
        return row

    def write_gallery(self, title: str, info: dict | None = None) -> Path:
        """``index.html`` and ``gallery.json`` over the folders written so far."""
        return write_gallery(self.root, self.rows, title=title, info=info)


# --- a whole run ------------------------------------------------------------------------------------------------


def project_into(out: Path, source: ImageSource, dn: DeconvNet, base: dict, class_names: Sequence[str],
                 settings: ProjectSettings, device: torch.device, title: str, info: dict, overwrite: bool = True,
                 progress: bool = True, desc: str = "projecting") -> list[dict]:
    """Project every image of ``source`` and write the folders and the gallery into ``out``.

    ``out`` is built beside itself and moved into place at the end. Returns the gallery rows.
    """
    from tqdm import tqdm

    with building_folder(out, overwrite) as tmp:
        writer = FolderWriter(tmp, base, settings.cmap)
        with tqdm(total=len(source), desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
            for idx, x in source.batches(settings.batch_size):
                p = dn.project(x.to(device), top_n=settings.top_n, layer=base["layer"], mode=settings.mode,
                               rank=settings.rank, method=settings.method, precision=settings.precision)
                probs = p.probs
                for j, i in enumerate(idx):
                    fields = {"input_file": str(source.paths[i]), "input_name": source.names[i],
                              **prediction_fields(None if probs is None else probs[j], class_names,
                                                  source.true_class(i))}
                    writer.add(source.stems[i], x[j], p, j, fields)
                bar.update(len(idx))
        writer.write_gallery(title, info)
    return writer.rows


def check_settings(dn: DeconvNet, settings: ProjectSettings) -> int:
    """The conv layer of ``settings`` as a non-negative index; UserError naming the option that is wrong."""
    try:
        layer = dn.resolve_layer(settings.layer)
    except ValueError as exc:
        raise UserError(f"--layer {exc}") from None
    n_ch = dn.layer_channels(layer)
    if settings.top_n > n_ch:
        raise UserError(f"--top-n {settings.top_n}: conv layer {layer} has only {n_ch} filters")
    try:
        render.colormap(settings.cmap)
    except ValueError:
        raise UserError(f"--cmap {settings.cmap}: not a matplotlib colormap") from None
    return layer


def project_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, images: Sequence[str | os.PathLike] = (),
                       data: str | os.PathLike | None = None, split: str = "test", limit: int | None = None,
                       settings: ProjectSettings | None = None, device: str = "auto", overwrite: bool = False,
                       progress: bool = True) -> list[dict]:
    """``xraydeconv project``: project ``images`` (files) or the first ``limit`` images of a split of ``data``.

    Returns the gallery rows (one per image). Raises UserError for bad options, inputs and output folders.
    """
    from xraydeconv.device import resolve_device
    from xraydeconv.explain.deconvnet import DeconvNet
    from xraydeconv.training.checkpoint import load_checkpoint

    settings = settings or ProjectSettings()
    inputs = [("--checkpoint", checkpoint)] + [("--images", p) for p in images]
    out = check_output_folder(out, overwrite, inputs=inputs + ([("--data", data)] if data is not None else []))
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, map_location=dev)
    dn = DeconvNet(ckpt.model)
    layer = check_settings(dn, settings)
    if images:
        source = ImageSource.from_files(images, ckpt.input_size)
    else:
        from xraydeconv.data import open_dataset

        ds = open_dataset(data, split=split, input_size=ckpt.input_size, cache=False)
        if len(ds) == 0:
            raise UserError(f"{data}: no images in the {split} split")
        source = ImageSource.from_dataset(ds, range(len(ds) if limit is None else min(limit, len(ds))))
    base = manifest_base(checkpoint, ckpt, dn, layer, settings)
    info = {"model": ckpt.model_name, "checkpoint": Path(checkpoint).name, "layer": base["layer_module"],
            "top-n": settings.top_n, "method": settings.method, "mode": settings.mode}
    return project_into(out, source, dn, base, ckpt.class_names, settings, dev,
                        title=f"xraydeconv projections: {ckpt.model_name}", info=info, overwrite=overwrite,
                        progress=progress)
