"""The one projection pipeline of ``project``, ``evaluate`` and ``demo``: project a batch of images, write one folder
per image (pictures, ``maps.npy``, ``manifest.json``), then the gallery over the folders.

Layout of a folder (named after the image stem, made unique with ``-2``, ``-3`` ...); every picture is drawn on
the film as it was given (:mod:`xraydeconv.reports.film`) through the display transform
(:mod:`xraydeconv.reports.display`)::

    overlay.png    the combined heat of the top-n filters over the film, colour bar, caption (poster Fig. 3)
    focus.png      the focus areas of the top-5 filters outlined on the film (Fig. 1)
    grid.png       every filter's heat and focus area, captioned with channel and activation (Fig. 4)
    landmarks.png  film | landmark outlines | heat with the outlines, when the image has masks (Fig. 2)
    filters/       one JPEG per filter (NN.jpg, rank order), for the image's page
    thumb.jpg      the overlay, small, for the gallery card
    index.html     the image's page (written with the gallery)
    maps.npy       float16 (top_n, H, W) at network resolution: per-filter heat maps |sum_c projection|, each
                   normalised to [0, 1] (the maximum |value| of each raw map is kept as ``map_scale``); no display
                   transform touches them
    manifest.json  checkpoint hash, model, layer, filters, prediction, truth, versions, settings
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from xraydeconv.errors import UserError
from xraydeconv.io import building_folder, check_output_folder, write_atomically, write_json
from xraydeconv.prefetch import prefetched
from xraydeconv.reports import display, render, views
from xraydeconv.reports.display import DisplaySettings
from xraydeconv.reports.film import Film
from xraydeconv.reports.gallery import write_gallery
from xraydeconv.reports.mapstore import STORE_DIR

if TYPE_CHECKING:
    from xraydeconv.explain.deconvnet import DeconvNet, Projection
    from xraydeconv.reports.shard import ArchiveOptions
    from xraydeconv.training.checkpoint import Checkpoint

    # a checkpoint file of ``xraydeconv train``, or a model already loaded (a user's own, ``load_user_model``)
    CheckpointLike = str | os.PathLike | Checkpoint

__all__ = [
    "MANIFEST_VERSION", "ProjectSettings", "ImageSource", "unique_folder", "write_image_folder",
    "manifest_base", "prediction_fields", "layer_stride", "model_input", "project_into", "project_checkpoint",
    "check_settings", "Net", "open_net", "is_user_model", "printable_name", "FilmKeep", "project_batch",
    "batch_ranges", "prefetched_batches",
]

MANIFEST_VERSION = 1
FILTERS_DIR = "filters"


@dataclass(frozen=True)
class ProjectSettings:
    """How each image is projected (``DeconvNet.project`` arguments) and drawn."""

    top_n: int = 25
    layer: int | str | None = None  # None: the net's default layer (the last conv of a Sequential)
    mode: str = "map"
    rank: str = "max"
    method: str = "deconvnet"
    precision: str = "fp32"
    batch_size: int = 4
    display: DisplaySettings = DisplaySettings()


# --- the images of a run ----------------------------------------------------------------------------------------


def printable_name(path: str | os.PathLike) -> str:
    """``path`` as text that can always be written as UTF-8: a file name's bytes that are not UTF-8 (which Python
    keeps as lone surrogates) become ``\\xNN`` escapes, so ``b"\\xff.png"`` reads ``\\xff.png``; any other name
    is unchanged."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


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
    masks: Callable[[int], dict[str, np.ndarray]] | None = None
    max_pixels: int | None = None  # the run's --max-pixels, for the redraw of the film

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], input_size: int, max_pixels: int | None = None
                   ) -> ImageSource:
        """Image files, all decoded up front so that a bad file fails the run before any output is made; images
        of more than ``max_pixels`` pixels (None: Pillow's limit) are refused."""
        from xraydeconv.data import load_image
        from xraydeconv.data.preprocess import DEFAULT_MAX_PIXELS

        paths = [Path(p) for p in paths]
        for p in paths:
            if not p.exists():
                raise UserError(f"{p}: no such file")
        tensors = [load_image(p, input_size, max_pixels or DEFAULT_MAX_PIXELS) for p in paths]
        return cls(paths, [printable_name(p.name) for p in paths], [p.stem for p in paths], [None] * len(paths),
                   None, tensors.__getitem__, max_pixels=max_pixels)

    @classmethod
    def from_dataset(cls, ds, indices: Sequence[int], renames: dict[str, str] | None = None) -> ImageSource:
        """Images ``indices`` of an ``XrayDataset``, named ``<true class>/<file>``; ``renames`` maps the data's
        class names to the checkpoint's."""
        indices = list(indices)
        recs = [ds.records[i] for i in indices]
        names = [(renames or {}).get(c, c) for c in ds.class_names]
        classes = [names[int(r.label)] for r in recs]
        return cls([r.path for r in recs], [f"{c}/{printable_name(r.path.name)}" for c, r in zip(classes, recs)],
                   [f"{c}-{r.path.stem}" for c, r in zip(classes, recs)], [int(r.label) for r in recs],
                   names, lambda i: ds[indices[i]][0], lambda i: ds.landmark_masks(indices[i]),
                   ds.max_pixels)

    def __len__(self) -> int:
        return len(self.paths)

    def true_class(self, i: int) -> str | None:
        label = self.labels[i]
        return None if label is None else self.class_names[label]

    def film(self, i: int, input_size: int, settings: DisplaySettings) -> Film:
        """Image ``i`` as it was given, scaled for display."""
        return Film.load(self.paths[i], input_size, settings.min_side, settings.max_side, self.max_pixels)

    def batches(self, batch_size: int) -> Iterator[tuple[list[int], Tensor]]:
        """``(indices, (b, C_in, S, S) images)`` in order, the next batch loading while the caller works."""
        return prefetched_batches(self, batch_ranges(range(len(self)), batch_size))


# --- manifests ----------------------------------------------------------------------------------------------------


def is_user_model(checkpoint: CheckpointLike) -> bool:
    """True for a model built by a user's factory (:func:`~xraydeconv.training.user_model.load_user_model`)."""
    return not isinstance(checkpoint, (str, os.PathLike)) and "factory" in (checkpoint.config or {})


def model_input(checkpoint: CheckpointLike) -> tuple[str, Path]:
    """The option and file a run reads its model from, for ``check_output_folder(inputs=...)``."""
    if isinstance(checkpoint, (str, os.PathLike)):
        return "--checkpoint", Path(checkpoint)
    return ("--weights" if is_user_model(checkpoint) else "--checkpoint"), Path(checkpoint.path)


def layer_stride(dn: DeconvNet, name: str, input_size: int, in_channels: int) -> int:
    """Input pixels between the activations of layer ``name`` (``dn.layer_name``) of ``dn``'s model.

    A module's later call (``"layer1.0.relu@1"``) is measured at its first call; a graph node that is no module
    (``"add_3"``) in a ``torch.fx`` trace of the model; 1 where neither finds it.
    """
    module = name.split("@")[0]
    try:
        dn.model.get_submodule(module)
    except AttributeError:
        return _node_stride(dn.model, name, input_size, in_channels)
    return display.layer_stride(dn.model, module, input_size, in_channels)


def _node_stride(model: torch.nn.Module, name: str, input_size: int, in_channels: int) -> int:
    """:func:`layer_stride` of the graph node ``name`` of a ``torch.fx`` trace of ``model`` (1: not found)."""
    import torch.fx

    seen: list[int] = []

    class Shapes(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            out = super().run_node(n)
            if n.name == name and torch.is_tensor(out) and out.dim() == 4:
                seen.append(out.shape[-1])
            return out

    param = next(model.parameters(), None)
    x = torch.zeros(1, in_channels, input_size, input_size, device=None if param is None else param.device,
                    dtype=None if param is None else param.dtype)
    was_training = model.training
    try:
        with torch.no_grad():
            Shapes(torch.fx.symbolic_trace(model.eval())).run(x)
    except Exception:  # a forward fx cannot trace on its own: the layer is still projected, drawn unsmoothed
        return 1
    finally:
        model.train(was_training)
    return max(1, round(input_size / seen[0])) if seen else 1


def manifest_base(checkpoint: CheckpointLike, ckpt: Checkpoint, dn: DeconvNet, layer: int | str,
                  settings: ProjectSettings) -> dict:
    """The manifest fields shared by every image of a run: checkpoint, model, layer, settings, versions.

    ``layer`` is ``dn.resolve_layer(...)``: a conv index for a Sequential, a layer name for any other model. For a
    user's model, ``checkpoint`` is its weights file and ``factory`` is added.
    """
    import xraydeconv

    own = {"factory": ckpt.config["factory"]} if is_user_model(ckpt) else {}
    return {
        "checkpoint": str(model_input(checkpoint)[1]) if not isinstance(checkpoint, (str, os.PathLike))
        else str(checkpoint),
        "checkpoint_sha256": ckpt.sha256,
        "model": ckpt.model_name,
        "epoch": ckpt.epoch,
        "layer": layer,
        "layer_module": dn.layer_name(layer),
        "top_n": settings.top_n,
        "mode": settings.mode,
        "rank": settings.rank,
        "method": settings.method,
        "precision": settings.precision,
        "input_size": ckpt.input_size,
        "xraydeconv_version": xraydeconv.__version__,
        "torch_version": torch.__version__,
        **own,
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


# beside the image folders (the gallery, its pages, the map store); no folder may take their name
GALLERY_FILES = frozenset({"index.html", "gallery.json", STORE_DIR})
_GALLERY_PAGE = re.compile(r"page-\d+\.html")


def unique_folder(stem: str, taken: set[str]) -> str:
    """A folder name for ``stem``: safe characters only, suffixed ``-2``, ``-3`` ... until it is neither in ``taken``
    nor the name of a gallery file (``index.html.png`` gets the folder ``index.html-2``)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    name, k = base, 2
    while name.lower() in taken or name.lower() in GALLERY_FILES or _GALLERY_PAGE.fullmatch(name.lower()):
        name = f"{base}-{k}"
        k += 1
    taken.add(name.lower())
    return name


def _write_pictures(folder: Path, heats: views.Heats, chans: list[int], acts: list[float], meta: dict,
                    masks: dict[str, np.ndarray] | None) -> dict:
    """Every picture of one image; returns the manifest fields that describe them."""
    over, box = views.overlay_view(heats, meta)
    render.save_png(over, folder / "overlay.png")
    render.save_png(views.focus_view(heats, chans, acts, meta), folder / "focus.png")
    tiles = views.filter_tiles(heats)
    render.save_png(views.grid_view(tiles, chans, acts, meta), folder / "grid.png")
    (folder / FILTERS_DIR).mkdir()
    names = [f"{FILTERS_DIR}/{k + 1:02d}.jpg" for k in range(len(tiles))]
    for name, tile in zip(names, tiles):
        _save_jpeg(tile, folder / name)
    files = ["overlay.png", "focus.png", "grid.png"]
    if masks:
        render.save_png(views.landmark_view(heats, masks, meta), folder / "landmarks.png")
        files.append("landmarks.png")
    thumb = Image.fromarray(over[box[0]:box[0] + box[2], box[1]:box[1] + box[3]])
    thumb.thumbnail((320, 320))
    _save_jpeg(np.asarray(thumb), folder / "thumb.jpg")
    film = heats.film
    files += ["thumb.jpg", FILTERS_DIR, "index.html", "maps.npy", "manifest.json"]
    return {"files": files, "filter_pictures": names,
            "overlay_film_box": list(box), "film": {"original": list(film.original), "display": list(film.shape),
                                                    "letterbox": [film.top, film.left, film.height, film.width]}}


def _save_jpeg(rgb: np.ndarray, path: Path) -> None:
    write_atomically(path, lambda f: Image.fromarray(rgb).save(f, format="JPEG", quality=88))


@dataclass(frozen=True)
class FilmKeep:
    """What one film keeps of its projection.

    ``pictures``: the pictures and thumbnail in its folder. ``maps``: ``"folder"`` (``maps.npy`` in its folder),
    ``"store"`` (handed to ``store``, which returns the manifest's ``maps`` entry) or ``"none"``. A film that keeps
    neither pictures nor a ``maps.npy`` gets no folder: its manifest lives only in the gallery's rows.
    """

    pictures: bool = True
    maps: str = "folder"
    store: Callable[[np.ndarray], dict] | None = None

    @property
    def has_folder(self) -> bool:
        return self.pictures or self.maps == "folder"


MAPS_CONTENT = "per-filter |sum over input channels| of the projection, each divided by map_scale"


def write_image_folder(
    folder: Path,
    image: Tensor,
    maps: Tensor,
    channels: Tensor,
    activations: Tensor,
    manifest: dict,
    film: Film | None = None,
    masks: dict[str, np.ndarray] | None = None,
    stride: int = 1,
    settings: DisplaySettings | None = None,
    extra: dict[str, np.ndarray] | None = None,
    keep: FilmKeep = FilmKeep(),
) -> dict:
    """Write the pictures, heat maps and manifest of one projected image into ``folder`` (created).

    Args:
        image: (C_in, S, S) the model's input in [0, 1].
        maps: (top_n, C_in, S, S) the projections of its filters, strongest first.
        channels, activations: (top_n,) filter ids and ranking scores.
        manifest: fields describing the run and the image; the filter list, map scales and file names are added.
        film: the film as it was given (default: the input itself).
        masks: landmark name -> bool (S, S) mask; gives ``landmarks.png``.
        stride: input pixels between the activations of the projected layer (sets the smoothing).
        extra: more pictures to write, file name -> (H, W, 3) uint8 (``compare.png``).
        keep: what to keep (default: everything); ``folder`` is not created when it keeps nothing there.
    Returns:
        The manifest as written.
    """
    settings = settings or DisplaySettings()
    raw = maps.float().sum(1).abs()  # (top_n, S, S)
    scale = raw.flatten(1).amax(1)
    heats = render.normalise(raw)
    chans = [int(c) for c in channels.tolist()]
    acts = [float(a) for a in activations.tolist()]
    if keep.has_folder:
        folder.mkdir(parents=True, exist_ok=True)
    pictures: dict = {"files": ["maps.npy", "manifest.json"] if keep.has_folder else []}
    if keep.pictures:
        film = film or Film.from_input(image, settings.min_side, settings.max_side)
        pictures = _write_pictures(folder, views.Heats.make(film, heats, stride, settings), chans, acts, manifest,
                                   masks)
        for name, rgb in (extra or {}).items():
            render.save_png(rgb, folder / name)
            pictures["files"].insert(0, name)
    maps_entry = _keep_maps(folder, heats, keep)
    if keep.maps != "folder":
        pictures["files"] = [f for f in pictures["files"] if f != "maps.npy"]
    out = {**manifest, "manifest_version": MANIFEST_VERSION,
           "filters": [{"rank": k + 1, "channel": c, "activation": a} for k, (c, a) in enumerate(zip(chans, acts))],
           "channels": chans, "activations": acts, "map_scale": [float(v) for v in scale.tolist()],
           "maps": maps_entry,
           "display": {**settings.as_dict(), "stride": stride, "sigma": display.smoothing_sigma(stride)}, **pictures}
    if keep.has_folder:
        write_json(out, folder / "manifest.json")
    return out


def _keep_maps(folder: Path, heats: Tensor, keep: FilmKeep) -> dict | None:
    """Write the (top_n, S, S) ``heats`` as float16 where ``keep`` says; the manifest's ``maps`` entry."""
    if keep.maps not in ("folder", "store"):
        return None
    half = heats.to(torch.float16).cpu().numpy()
    described = {"dtype": "float16", "shape": list(heats.shape), "content": MAPS_CONTENT}
    if keep.maps == "folder":
        write_atomically(folder / "maps.npy", lambda f: np.save(f, half))
        return {"file": "maps.npy", **described}
    return {**keep.store(half), **described}


# --- a whole run ------------------------------------------------------------------------------------------------


@dataclass
class Net:
    """A checkpoint ready to project: its model's deconvnet, manifest base, classes and layer stride."""

    dn: DeconvNet
    base: dict
    class_names: list[str]
    stride: int

    @classmethod
    def make(cls, dn: DeconvNet, base: dict, class_names: Sequence[str]) -> Net:
        first = next(m for m in dn.model.modules() if isinstance(m, torch.nn.Conv2d))
        stride = layer_stride(dn, base["layer_module"], base["input_size"], first.in_channels)
        return cls(dn, base, list(class_names), stride)

    def project(self, x: Tensor, settings: ProjectSettings, device: torch.device) -> Projection:
        return self.dn.project(x.to(device), top_n=settings.top_n, layer=self.base["layer"], mode=settings.mode,
                               rank=settings.rank, method=settings.method, precision=settings.precision)

    def write(self, folder: Path, image: Tensor, p: Projection, j: int, fields: dict, settings: DisplaySettings,
              film: Film | None = None, masks: dict[str, np.ndarray] | None = None,
              extra: dict[str, np.ndarray] | None = None, keep: FilmKeep = FilmKeep()) -> dict:
        """:func:`write_image_folder` for image ``j`` of the batch projection ``p`` (``image``: its (C_in, S, S)
        input; ``fields``: its own manifest fields); the manifest as written."""
        return write_image_folder(folder, image.cpu(), p.maps[j].cpu(), p.channels[j].cpu(), p.activations[j].cpu(),
                                  {**self.base, **fields}, film, masks, self.stride, settings, extra, keep)


def _compare_picture(film: Film, nets: Sequence[Net], projections: Sequence[Projection],
                     probs: Sequence[Tensor | None], j: int, settings: DisplaySettings
                     ) -> tuple[np.ndarray, list[dict]]:
    """compare.png of image ``j`` of a batch and the manifest entry of each net (``probs``: each net's
    (B, num_classes) :attr:`Projection.probs`)."""
    heats, metas = [], []
    for net, p, pr in zip(nets, projections, probs):
        h = render.filter_heatmaps(p.maps[j].cpu())
        heats.append(views.Heats.make(film, h, net.stride, settings))
        pred = prediction_fields(None if pr is None else pr[j], net.class_names, None)
        metas.append({"model": net.base["model"], "checkpoint": net.base["checkpoint"],
                      "checkpoint_sha256": net.base["checkpoint_sha256"], **pred})
    return views.compare_view(film, heats, metas), metas


def batch_ranges(films: range, size: int) -> list[range]:
    """``films`` cut into consecutive ranges of ``size`` (the last one shorter)."""
    return [range(a, min(films.stop, a + size)) for a in range(films.start, films.stop, size)]


def prefetched_batches(source: ImageSource, batches: Sequence[Sequence[int]]) -> Iterator[tuple[list[int], Tensor]]:
    """``(idx, x)`` for each batch of ``source``, x (b, C_in, S, S): the next batch is decoded and letterboxed on a
    background thread while the caller projects and draws the current one (decoders release the GIL)."""
    return prefetched(batches, lambda idx: (list(idx), torch.stack([source.load(i) for i in idx])))


def project_batch(source: ImageSource, idx: Sequence[int], x: Tensor, net: Net, settings: ProjectSettings,
                  device: torch.device, compare: Sequence[Net] = (), pictures: Callable[[int], bool] = lambda i: True
                  ) -> Iterator[tuple[int, Projection, dict, Film | None, dict | None, dict | None]]:
    """Project the images ``idx`` of ``source`` (``x``: (b, C_in, S, S)) through ``net`` and each ``compare`` net.

    Yields, per image in order, ``(j, projection of the batch (maps, channels and activations on the CPU), manifest
    fields, film, masks, extra pictures)``; the film, masks and ``compare.png`` are made only for images ``i`` with
    ``pictures(i)`` (else None).
    """
    ps = [n.project(x, settings, device) for n in (net, *compare)]
    probs = [p.probs for p in ps]  # a softmax over the batch each time it is read: once, not once per image
    # the images' maps leave the device together: one copy per batch, not three per image
    ps = [replace(p, maps=p.maps.cpu(), channels=p.channels.cpu(), activations=p.activations.cpu()) for p in ps]
    for j, i in enumerate(idx):
        fields = {"input_file": printable_name(source.paths[i]), "input_name": source.names[i],
                  **prediction_fields(None if probs[0] is None else probs[0][j], net.class_names,
                                      source.true_class(i))}
        film = masks = extra = None
        if pictures(i):
            film = source.film(i, net.base["input_size"], settings.display)
            masks = source.masks(i) if source.masks else None
            if compare:
                picture, fields["compare"] = _compare_picture(film, (net, *compare), ps, probs, j, settings.display)
                extra = {"compare.png": picture}
        yield j, ps[0], fields, film, masks, extra


def project_into(out: Path, source: ImageSource, net: Net, settings: ProjectSettings, device: torch.device,
                 title: str, info: dict, overwrite: bool = True, progress: bool = True, desc: str = "projecting",
                 compare: Sequence[Net] = ()) -> list[dict]:
    """Project every image of ``source`` and write the folders and the gallery into ``out``.

    With ``compare``, every folder also gets ``compare.png``: the heat of ``net`` and of each of these on the
    same film. ``out`` is built beside itself and moved into place at the end. Returns the gallery rows.
    """
    from tqdm import tqdm

    taken: set[str] = set()
    rows: list[dict] = []
    with building_folder(out, overwrite) as tmp:
        with tqdm(total=len(source), desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
            for idx, x in source.batches(settings.batch_size):
                for j, p, fields, film, masks, extra in project_batch(source, idx, x, net, settings, device, compare):
                    folder = unique_folder(source.stems[idx[j]], taken)
                    man = net.write(tmp / folder, x[j], p, j, fields, settings.display, film, masks, extra)
                    rows.append({"folder": folder, "manifest": man})
                bar.update(len(idx))
        write_gallery(tmp, rows, title=title, info=info)
    return rows


def check_settings(dn: DeconvNet, settings: ProjectSettings) -> int | str:
    """The layer of ``settings`` resolved (``dn.resolve_layer``: a non-negative conv index for a Sequential, a layer
    name for any other model); UserError naming the option that is wrong."""
    try:
        layer = dn.resolve_layer(settings.layer)
    except ValueError as exc:
        raise UserError(f"--layer {exc}") from None
    n_ch = dn.layer_channels(layer)
    if settings.top_n > n_ch:
        what = f"conv layer {layer}" if isinstance(layer, int) else f"layer {layer}"
        raise UserError(f"--top-n {settings.top_n}: {what} has only {n_ch} filters")
    try:
        render.colormap(settings.display.cmap)
    except ValueError:
        raise UserError(f"--cmap {settings.display.cmap}: not a matplotlib colormap") from None
    return layer


def project_checkpoint(checkpoint: CheckpointLike, out: str | os.PathLike, images: Sequence[str | os.PathLike] = (),
                       data: str | os.PathLike | None = None, split: str = "test", limit: int | None = None,
                       settings: ProjectSettings | None = None, device: str = "auto", overwrite: bool = False,
                       progress: bool = True, compare: Sequence[str | os.PathLike] = (),
                       max_pixels: int | None = None, class_map: str | os.PathLike | None = None,
                       archive: ArchiveOptions | None = None, threads: int | None = None) -> list[dict]:
    """``xraydeconv project``: project ``images`` (files) or the first ``limit`` images of a split of ``data``;
    images of more than ``max_pixels`` pixels (None: Pillow's decompression-bomb limit) are refused. The data's
    classes are matched to the checkpoint's by name, after the renames of ``class_map`` (see :func:`open_data`).

    ``checkpoint`` is a checkpoint file, or a loaded ``Checkpoint`` (a user's model from ``load_user_model``).
    ``archive``: what to keep, chunks and ``--resume`` (:class:`~xraydeconv.reports.shard.ArchiveOptions`). Under
    ``torchrun`` every process projects its share into the one output (gloo on CPU, NCCL on CUDA) and rank 0 writes
    the gallery. ``threads``: CPU threads (default: as set, or the cores divided among a ``torchrun`` job's local
    processes). Returns the gallery rows (one per image; ``[]`` on ranks other than 0). Raises UserError for bad
    options, inputs and output folders.
    """
    from xraydeconv.device import resolve_device
    from xraydeconv.reports.shard import ArchiveOptions, project_archive
    from xraydeconv.training import distributed

    settings = settings or ProjectSettings()
    archive = (archive or ArchiveOptions()).check()
    dist = distributed.from_env()
    distributed.set_threads(threads, dist)
    if max_pixels is not None:
        from xraydeconv.data.preprocess import check_max_pixels

        check_max_pixels(max_pixels)
    inputs = [model_input(checkpoint)] + [("--compare", c) for c in compare] + [("--images", p) for p in images]
    inputs += [(flag, path) for flag, path in (("--data", data), ("--class-map", class_map)) if path is not None]
    out = check_output_folder(out, overwrite, inputs=inputs)
    dev = resolve_device(device, dist.local_rank, dist.world_size)
    net, ckpt = open_net(checkpoint, settings, dev)
    others = [open_net(c, settings, dev)[0] for c in compare]
    for c, other in zip(compare, others):
        if other.base["input_size"] != ckpt.input_size:
            raise UserError(f"--compare {c}: input size {other.base['input_size']}, but --checkpoint has "
                            f"{ckpt.input_size}; compare nets trained at the same size")
    source = _source(checkpoint, ckpt, images, data, split, limit, max_pixels, class_map)
    info = {"model": ckpt.model_name, "checkpoint": Path(net.base["checkpoint"]).name,
            "layer": net.base["layer_module"], "top-n": settings.top_n, "method": settings.method,
            "mode": settings.mode}
    if others:
        info["compared with"] = ", ".join(f"{o.base['model']} ({Path(o.base['checkpoint']).name})" for o in others)
    distributed.init(dist, dev)
    try:
        return project_archive(out, source, net, settings, dev, title=f"xraydeconv projections: {ckpt.model_name}",
                               info=info, options=archive, overwrite=overwrite, progress=progress, compare=others,
                               dist=dist)
    finally:
        distributed.shutdown(dist)


def _source(checkpoint: CheckpointLike, ckpt: Checkpoint, images: Sequence[str | os.PathLike],
            data: str | os.PathLike | None, split: str, limit: int | None, max_pixels: int | None,
            class_map: str | os.PathLike | None) -> ImageSource:
    """The images of a ``project`` run: the files ``images``, or the first ``limit`` of a split of ``data``."""
    if images:
        return ImageSource.from_files(images, ckpt.input_size, max_pixels)
    limit_px = {} if max_pixels is None else {"max_pixels": max_pixels}
    ds, renames = open_data(data, split, ckpt.input_size, class_map, cache=False, **limit_px)
    check_classes(model_input(checkpoint)[1], ckpt.class_names, Path(data), ds.class_names, renames)
    if len(ds) == 0:
        raise UserError(f"{data}: no images in the {split} split")
    return ImageSource.from_dataset(ds, range(len(ds) if limit is None else min(limit, len(ds))), renames)


def check_classes(ckpt_path: str | os.PathLike, ckpt_classes: Sequence[str], data: Path,
                  ds_classes: Sequence[str], renames: dict[str, str] | None = None) -> list[int]:
    """The checkpoint's index of each of the data set's classes, matched by name after ``renames``: a test set
    may hold only some of the checkpoint's classes, in any order. UserError (one line) naming the data's classes
    that the checkpoint does not know."""
    renames = renames or {}
    a, b = list(ckpt_classes), [renames.get(c, c) for c in ds_classes]
    unknown = [c for c in b if c not in a]
    if unknown:
        names = f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        raise UserError(f"{data}: {len(unknown)} of its {len(b)} classes are not among the {len(a)} classes of "
                        f"the checkpoint {ckpt_path} (not in the checkpoint: {names})")
    return [a.index(c) for c in b]


def open_data(root: str | os.PathLike, split: str, input_size: int, class_map: str | os.PathLike | None = None,
              **kw) -> tuple:
    """``(XrayDataset, renames)``: a split of ``root`` and the class renames of ``--class-map`` (ImageCLEF 2009
    takes the map as its ``prefix,class`` grouping instead; ``kw`` go to ``open_dataset``)."""
    from xraydeconv.data import open_dataset
    from xraydeconv.data.classes import read_class_renames
    from xraydeconv.data.dataset import detect_format

    renames: dict[str, str] = {}
    if class_map is not None:
        if detect_format(Path(root)) == "imageclef2009":
            kw["class_map"] = class_map
        else:
            renames = read_class_renames(class_map)
    return open_dataset(root, split=split, input_size=input_size, **kw), renames


def open_net(checkpoint: CheckpointLike, settings: ProjectSettings, device: torch.device,
             flag: str = "--checkpoint") -> tuple[Net, Checkpoint]:
    """Load a checkpoint (or take a loaded one onto ``device``) for projection with ``settings`` (layer and top-n
    checked against its net)."""
    from xraydeconv.explain.deconvnet import DeconvNet
    from xraydeconv.training.checkpoint import load_checkpoint

    if isinstance(checkpoint, (str, os.PathLike)):
        ckpt = load_checkpoint(checkpoint, map_location=device)
    else:
        ckpt = checkpoint
        ckpt.model.to(device).eval()
    dn = DeconvNet(ckpt.model)
    layer = check_settings(dn, settings)
    return Net.make(dn, manifest_base(checkpoint, ckpt, dn, layer, settings), ckpt.class_names), ckpt
