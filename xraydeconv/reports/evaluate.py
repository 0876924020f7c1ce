"""Evaluation of a trained checkpoint: accuracy, confusion, what the misclassified images were looked at, and
how well the projected heat maps agree with radiological landmarks.

For every image that has landmark masks, the top-n filters of the last conv layer are projected with the
deconvnet; the per-filter heat maps and their combination (``xraydeconv.reports.render``: the mean of the normalised
per-filter magnitudes, exactly the map the gallery shows) are scored with :mod:`xraydeconv.metrics` against

- the union of the image's landmarks ("a landmark of the true class": the masks lying beside an image are
  those of its own class), overall and per class, for the combined map and for each filter;
- every landmark on its own;
- the ``marker`` mask separately: the planted shortcut of ``xraydeconv data phantoms --bias marker``, which is
  never a radiological landmark and is left out of the union.

``methods`` scores other attribution methods (:mod:`xraydeconv.explain.methods`) on the same images and
landmark sets, each beside the film itself used as the map (:mod:`xraydeconv.reports.comparison`); ``sanity`` adds
the model-parameter randomisation test of those methods on the first films (:mod:`xraydeconv.reports.randomisation`).

With ``occlusion=True`` each landmark (and their union) is also hidden in turn (:mod:`xraydeconv.explain.occlusion`)
to measure what the class probability and the top filters lose.

Everything is built in a temporary folder beside ``out`` and moved into place at the end, so a failed run
(bad masks, wrong checkpoint) leaves nothing half-written.

Under ``torchrun`` every process takes every ``world_size``-th batch (so each batch holds the films it holds in one
process). A first pass classifies them, so that every process knows which films are drawn and their folder names
(:class:`Picks`: the first misclassified ones of the run, the first examples); the second pass projects, scores
and draws, and rank 0 merges the per-film results of every batch in the run's order: the report is that of one
process.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from xraydeconv import metrics
from xraydeconv.device import resolve_device
from xraydeconv.errors import UserError, error_message
from xraydeconv.explain.occlusion import occlude_landmarks
from xraydeconv.io import check_output_folder, write_json
from xraydeconv.reports.comparison import (
    MethodComparison,
    comparison_markdown,
    landmark_stats,
    parse_methods,
    score_rows,
)
from xraydeconv.reports.numbers import pct, ratio
from xraydeconv.reports.pages import write_index
from xraydeconv.training.distributed import DistInfo

if TYPE_CHECKING:
    from xraydeconv.reports.pipeline import CheckpointLike

__all__ = ["EvalOptions", "LandmarkAgreement", "Picks", "evaluate", "has_landmarks", "resolve_data", "render_markdown"]

REPORT_JSON, REPORT_MD, CONFUSION_PNG, MISCLASSIFIED_DIR = "report.json", "report.md", "confusion.png", "misclassified"
EXAMPLES_DIR, INDEX_HTML = "examples", "index.html"
MARKER = "marker"
UNION = "all landmarks"
SANITY_SEED = 42  # of the layers' re-initialisation in the randomisation test (Quantus's default)


@dataclass
class EvalOptions:
    """Settings of one evaluation run (also stored in the report)."""

    split: str = "test"
    top_n: int = 25
    occlusion: bool = False
    batch_size: int = 16
    max_misclassified: int = 24
    tolerance: int = 0  # pointing-game tolerance in pixels
    precision: str = "fp32"  # of the deconvnet's downward pass
    device: str = "cpu"
    landmarks: bool = True  # False: accuracy and misclassified projections only
    limit: int | None = None  # only the first N images of the split
    examples: int = 4  # correctly classified images drawn with their projections (of those projected anyway)
    max_pixels: int | None = None  # refuse larger images (None: Pillow's decompression-bomb limit)
    class_map: str | None = None  # IRMA: the prefix,class grouping; other data: data class,checkpoint class renames
    methods: tuple[str, ...] = ("deconvnet",)  # compared on the landmarks; the film is always added
    sanity: bool = False  # the model-parameter randomisation test of ``methods``
    sanity_images: int = 4  # films of the randomisation test (the first with landmarks)


# --- inputs ---------------------------------------------------------------------------------------------------


def resolve_data(ckpt, data: str | os.PathLike | None) -> Path:
    """The data folder to evaluate on: ``data``, else the one the checkpoint was trained on (phantoms when none)."""
    if data is not None:
        p = Path(data)
        if not p.is_dir():
            raise UserError(f"{p}: data directory does not exist")
        return p
    cfg = ckpt.config or {}
    if "factory" in cfg:
        raise UserError(f"--model-factory {cfg['factory']}: give --data DIR (the data the model was trained on "
                        "are not known)")
    if cfg.get("data"):
        p = Path(cfg["data"])
        if not p.is_dir():
            raise UserError(f"{p}: the checkpoint's training data is gone; pass --data DIR")
        return p
    from xraydeconv.data.phantoms import ensure_phantoms

    return ensure_phantoms(
        per_class=int(cfg.get("phantoms_per_class", 200)),
        size=int(cfg.get("input_size", ckpt.input_size)),
        seed=int(cfg.get("phantom_seed", 0)),
    )


def _check_landmarks(ds, i: int, masks: dict[str, np.ndarray]) -> None:
    """UserError for a mask naming a landmark its class does not have (when the data set declares them)."""
    rec = ds.records[i]
    cls = ds.class_names[rec.label]
    known = set(ds.landmark_names.get(cls, ()))
    if not known:
        return
    for name in masks:
        if name != MARKER and name not in known:
            where = rec.landmarks.get(name)
            if where is None and name in getattr(rec, "boxes", {}):
                where = rec.boxes[name][0].source
            raise UserError(
                f"{where or rec.path}: unknown landmark {name!r} for class {cls} "
                f"(known: {', '.join(sorted(known))})"
            )


# --- landmark agreement ---------------------------------------------------------------------------------------


def zhang_tolerance(size: int) -> int:
    """The pointing-game tolerance of Zhang et al. (15 px on 224 px images) scaled to an image side ``size``."""
    return max(1, round(15 * size / 224))


@dataclass
class LandmarkAgreement:
    """Accumulates metric scores batch by batch; :meth:`result` gives the tables of the report."""

    class_names: list[str]
    tolerance: int = 0
    _labels: list[int] = field(default_factory=list)
    _union: list[np.ndarray] = field(default_factory=list)  # (4,) per image: pg, rm, rr, area of the combined map
    _filters: list[np.ndarray] = field(default_factory=list)  # (3,) per image: mean over filters of pg, rm, rr
    _filter_hits: list[np.ndarray] = field(default_factory=list)  # (N,) per image: pointing game of each filter
    _marker: list[np.ndarray] = field(default_factory=list)  # (4,) per image with a marker: the combined map
    _named: dict[str, list[np.ndarray]] = field(default_factory=dict)
    _baseline: list[np.ndarray] = field(default_factory=list)  # (4,) per image: the image itself as heat map
    # pointing game with Zhang et al.'s tolerance (15 px at 224 px, scaled to the image): combined map, baseline
    _tolerant: list[float] = field(default_factory=list)
    _tolerant_base: list[float] = field(default_factory=list)
    _tolerant_px: int = 0

    def add(
        self,
        labels: Sequence[int],
        filter_heats: torch.Tensor,
        combined: torch.Tensor,
        masks: list[dict],
        images: torch.Tensor | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Score one batch.

        Args:
            labels: (B,) true labels.
            filter_heats: (B, N, H, W) per-filter heat maps.
            combined: (B, H, W) the combined top-n heat map.
            masks: per image, landmark name -> bool (H, W); images without masks are skipped.
            images: (B, H, W) the inputs, scored as heat maps themselves: the baseline of a "map" that only
                follows bright bone, which a net's maps must beat to show more than where the body is.
        Returns:
            The rows (:func:`~xraydeconv.reports.comparison.score_rows`) of ``combined`` and of ``images`` on the
            union (``"all"``) and on the ``marker`` where scored, for :meth:`MethodComparison.add`'s ``scored``.
        """
        size = tuple(combined.shape[-2:])
        scored: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] = ({}, {})
        keep = [b for b, m in enumerate(masks) if any(n != MARKER for n in m)]
        if keep:
            union = np.stack([metrics.landmark_union(masks[b], size, exclude=(MARKER,)) for b in keep])
            comb = combined[keep]
            scored[0]["all"] = score_rows(comb, union, tolerance=self.tolerance)
            self._tolerant_px = zhang_tolerance(size[0])
            self._tolerant.extend(metrics.pointing_game(comb, union, tolerance=self._tolerant_px))
            filt = filter_heats[keep]
            fpg = metrics.pointing_game(filt, union, tolerance=self.tolerance)
            frm = metrics.relevance_mass(filt, union)
            frr = metrics.relevance_rank(filt, union)
            if images is not None:
                scored[1]["all"] = score_rows(images[keep], union, tolerance=self.tolerance)
                self._tolerant_base.extend(metrics.pointing_game(images[keep], union, tolerance=self._tolerant_px))
                self._baseline.extend(scored[1]["all"])
            self._labels.extend(int(labels[b]) for b in keep)
            self._union.extend(scored[0]["all"])
            with np.errstate(invalid="ignore"):
                self._filters.extend(np.stack([np.nanmean(fpg, 1), np.nanmean(frm, 1), np.nanmean(frr, 1)], axis=1))
            self._filter_hits.extend(fpg)
        marker = self._add_named(labels, combined, masks)
        if marker is not None:
            scored[0][MARKER] = marker
        return scored

    def _add_named(self, labels: Sequence[int], combined: torch.Tensor, masks: list[dict]) -> np.ndarray | None:
        """Score each landmark on its own, and the marker, batched per name; the marker's rows (None: none)."""
        by_name: dict[str, list[int]] = {}
        for b, m in enumerate(masks):
            for n in m:
                key = MARKER if n == MARKER else f"{self.class_names[int(labels[b])]}/{n}"
                by_name.setdefault(key, []).append(b)
        marker = None
        for key, idx in by_name.items():
            name = MARKER if key == MARKER else key.split("/", 1)[1]
            rows = score_rows(combined[idx], np.stack([masks[b][name] for b in idx]), tolerance=self.tolerance)
            if key == MARKER:
                self._marker.extend(rows)
                marker = rows
            else:
                self._named.setdefault(key, []).extend(rows)
        return marker

    def extend(self, other: LandmarkAgreement) -> None:
        """Append the scores of ``other``, an accumulator of the images that come after this one's in the run (a
        sharded run merges its batches in the run's order, so the tables are those of one process)."""
        for name in ("_labels", "_union", "_filters", "_filter_hits", "_marker", "_baseline", "_tolerant",
                     "_tolerant_base"):
            getattr(self, name).extend(getattr(other, name))
        for key, rows in other._named.items():
            self._named.setdefault(key, []).extend(rows)
        self._tolerant_px = other._tolerant_px or self._tolerant_px

    def result(self) -> dict | None:
        """The landmark tables (None when no image had landmark masks)."""
        if not self._labels and not self._marker:
            return None
        out: dict = {"tolerance": self.tolerance}
        if self._labels:
            u = np.stack(self._union)
            f = np.stack(self._filters)
            lab = np.array(self._labels)
            out["overall"] = landmark_stats(u)
            out["tolerant_px"] = self._tolerant_px
            out["overall"]["pointing_game_tolerant"] = metrics.nanmean(np.array(self._tolerant))
            out["per_filter"] = {
                "pointing_game": float(np.nanmean(f[:, 0])),
                "relevance_mass": float(np.nanmean(f[:, 1])),
                "relevance_rank": float(np.nanmean(f[:, 2])),
                # images where at least one of the top-n filters points at a landmark
                "any_filter_hits": float(np.mean([np.nansum(h) > 0 for h in self._filter_hits])),
                "n": int(len(f)),
            }
            if self._baseline:
                r = np.stack(self._baseline)
                out["baseline_image"] = landmark_stats(r)
                out["baseline_image"]["pointing_game_tolerant"] = metrics.nanmean(np.array(self._tolerant_base))
            out["per_class"] = {}
            for c, name in enumerate(self.class_names):
                sel = lab == c
                if sel.any():
                    out["per_class"][name] = landmark_stats(u[sel])
        out["per_landmark"] = {key: landmark_stats(np.stack(self._named[key])) for key in sorted(self._named)}
        out["marker"] = landmark_stats(np.stack(self._marker)) if self._marker else None
        return out


@dataclass
class _OcclusionTally:
    class_names: list[str]
    rows: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)

    def add(self, labels: Sequence[int], res) -> None:
        for j, name in enumerate(res.names):
            for b in range(len(labels)):
                if np.isnan(res.prob_drop[b, j]):
                    continue
                key = name if name in (MARKER, UNION) else f"{self.class_names[int(labels[b])]}/{name}"
                self.rows.setdefault(key, []).append(
                    (float(res.prob_drop[b, j]), float(res.filter_drop[b, j]), float(res.area_share[b, j]))
                )

    def extend(self, other: _OcclusionTally) -> None:
        for key, rows in other.rows.items():
            self.rows.setdefault(key, []).extend(rows)

    def result(self) -> dict | None:
        if not self.rows:
            return None
        out = {}
        for key in sorted(self.rows, key=lambda k: (k not in (UNION, MARKER), k)):
            r = np.array(self.rows[key], dtype=np.float64)
            fd = r[:, 1]
            out[key] = {
                "prob_drop": float(r[:, 0].mean()),
                "filter_drop": float(np.nanmean(fd)) if (~np.isnan(fd)).any() else float("nan"),
                "area_share": float(r[:, 2].mean()),
                "n": int(len(r)),
            }
        return out


# --- the run --------------------------------------------------------------------------------------------------


@dataclass
class _Setup:
    """What a run evaluates: the checkpoint, its net, the data set and the manifest fields of its pictures."""

    ckpt: object
    dn: object
    ds: object
    root: Path
    device: torch.device
    classes: list[str]
    n: int
    base: dict
    stride: int
    label_map: list[int]  # the checkpoint's index of each class of the data set
    layer: int | str  # the projected layer
    sets: dict[str, dict[str, list[str]]]  # landmark set -> class -> landmark names


def _check_options(opt: EvalOptions) -> None:
    for name, value in (("--top-n", opt.top_n), ("--batch-size", opt.batch_size), ("--limit", opt.limit)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value}: must be at least 1")
    for name, value in (("--max-misclassified", opt.max_misclassified), ("--tolerance", opt.tolerance)):
        if value < 0:
            raise UserError(f"{name} {value}: must be at least 0")
    opt.methods = parse_methods(opt.methods)
    if opt.sanity_images < 1:
        raise UserError(f"--sanity-images {opt.sanity_images}: must be at least 1")
    if opt.sanity and not opt.landmarks:
        raise UserError("--sanity: the randomisation test runs on the films with landmarks; drop --no-landmarks")
    if opt.max_pixels is not None:
        from xraydeconv.data.preprocess import check_max_pixels

        check_max_pixels(opt.max_pixels)


def _open(checkpoint: CheckpointLike, out: Path, data: str | os.PathLike | None, opt: EvalOptions,
          dist: DistInfo) -> _Setup:
    """Load the checkpoint and the data set and check that they fit together; UserError otherwise. ``dist``: this
    process of a torchrun job (its GPU is ``cuda:<local rank>``)."""
    from xraydeconv.explain.deconvnet import DeconvNet
    from xraydeconv.reports.pipeline import (
        Net,
        ProjectSettings,
        check_classes,
        manifest_base,
        model_input,
        open_data,
    )
    from xraydeconv.training.checkpoint import load_checkpoint

    dev = resolve_device(opt.device, dist.local_rank, dist.world_size)
    if isinstance(checkpoint, (str, os.PathLike)):
        ckpt = load_checkpoint(checkpoint, map_location=dev)
    else:
        ckpt = checkpoint
        ckpt.model.to(dev)
    if opt.tolerance > ckpt.input_size:  # the masks are padded by it: 10^5 px would ask for 160 GB
        raise UserError(f"--tolerance {opt.tolerance}: larger than the {ckpt.input_size}-pixel input of "
                        f"{ckpt.model_name}; at most {ckpt.input_size}")
    root = resolve_data(ckpt, data)
    inputs = [("--data", root)] + ([("--class-map", opt.class_map)] if opt.class_map else [])
    check_output_folder(out, True, inputs=inputs)  # data taken from the checkpoint: not known before
    limit = {} if opt.max_pixels is None else {"max_pixels": opt.max_pixels}
    ds, renames = open_data(root, opt.split, ckpt.input_size, opt.class_map, **limit)
    label_map = check_classes(model_input(checkpoint)[1], ckpt.class_names, root, ds.class_names, renames)
    if len(ds) == 0:
        raise UserError(f"{root}: the {opt.split} split has no images")
    dn = DeconvNet(ckpt.model)
    layer = dn.resolve_layer(None)  # the last conv of a Sequential, the last feature map of any other model
    n_filters = dn.layer_channels(layer)
    if opt.top_n > n_filters:
        what = "the last conv layer" if isinstance(layer, int) else f"layer {layer}"
        raise UserError(f"--top-n {opt.top_n}: {what} of {ckpt.model_name} has only {n_filters} filters")
    ckpt.model.eval()
    settings = ProjectSettings(top_n=opt.top_n, precision=opt.precision)
    net = Net.make(dn, manifest_base(checkpoint, ckpt, dn, layer, settings), ckpt.class_names)
    n = len(ds) if opt.limit is None else min(opt.limit, len(ds))
    from xraydeconv.data.landmarks import read_landmark_sets

    sets = read_landmark_sets(root, ds.landmark_names) if opt.landmarks else {"all": {}}
    return _Setup(ckpt, dn, ds, root, dev, list(ckpt.class_names), n, net.base, net.stride, label_map, layer, sets)


def has_landmarks(ds, i: int, landmarks: bool = True) -> bool:
    """Whether film ``i`` of ``ds`` has landmark masks or boxes (``ds.landmark_masks(i)`` is not empty), read from
    its record without loading them."""
    rec = ds.records[i]
    return landmarks and (bool(rec.landmarks) or any(getattr(rec, "boxes", {}).values()))


@dataclass
class Picks:
    """The films of a run that are drawn or re-used, decided film by film in the run's order, so that a sharded
    run picks (and names) what one process picks: the first ``max_misclassified`` misclassified films, up to
    ``examples`` correctly classified films with landmarks (a class at most once), and the first ``sanity_images``
    films with landmarks for the randomisation test (0: none)."""

    classes: list[str]
    max_misclassified: int
    examples: int
    sanity_images: int
    misclassified: dict[int, str] = field(default_factory=dict)  # film -> its folder in misclassified/
    example: dict[int, str] = field(default_factory=dict)  # film -> its folder in examples/
    sanity: list[int] = field(default_factory=list)
    _taken: tuple[set[str], set[str]] = field(default_factory=lambda: (set(), set()))
    _seen: set[str] = field(default_factory=set)

    def add(self, i: int, label: int, predicted: int, masked: bool, stem: str) -> None:
        """Film ``i`` (the next one of the run): its true and predicted class, whether it has landmarks, the stem
        of its file."""
        from xraydeconv.reports.pipeline import unique_folder

        cls = self.classes[label]
        if predicted != label:
            if len(self.misclassified) < self.max_misclassified:
                stem = f"{cls}-as-{self.classes[predicted]}-{stem}"
                self.misclassified[i] = unique_folder(stem, self._taken[0])
        elif masked and len(self.example) < self.examples and cls not in self._seen:
            self._seen.add(cls)
            self.example[i] = unique_folder(f"{cls}-{stem}", self._taken[1])
        if masked and len(self.sanity) < self.sanity_images:
            self.sanity.append(i)


@dataclass
class _Results:
    """What batches give: the tallies and, per film in the run's order, its truth, prediction and drawn folders.
    A sharded run gives one per batch and merges them in the run's order (:meth:`extend`)."""

    agreement: LandmarkAgreement
    comparison: MethodComparison
    occlusion: _OcclusionTally
    labels: list[int] = field(default_factory=list)
    predicted: list[int] = field(default_factory=list)
    misclassified: list[dict] = field(default_factory=list)  # the report's records of the drawn ones
    drawn: list[dict] = field(default_factory=list)  # gallery rows of misclassified/
    examples: list[dict] = field(default_factory=list)  # gallery rows of examples/
    t_project: float = 0.0

    def extend(self, other: _Results) -> None:
        self.agreement.extend(other.agreement)
        self.comparison.extend(other.comparison)
        self.occlusion.extend(other.occlusion)
        for name in ("labels", "predicted", "misclassified", "drawn", "examples"):
            getattr(self, name).extend(getattr(other, name))
        self.t_project += other.t_project

    def confusion(self, k: int) -> np.ndarray:
        """(k, k) int64: row the true class, column the predicted one."""
        out = np.zeros((k, k), dtype=np.int64)
        for t, p in zip(self.labels, self.predicted):
            out[t, p] += 1
        return out


class _Tally:
    """Runs the batches of one evaluation: classifies, projects, scores and occludes them, and draws the picked
    films into the output."""

    def __init__(self, setup: _Setup, opt: EvalOptions, tmp: Path) -> None:
        from xraydeconv.reports.display import DisplaySettings

        self.setup, self.opt = setup, opt
        self.dirs = {"misclassified": tmp / MISCLASSIFIED_DIR, "examples": tmp / EXAMPLES_DIR}
        self.display = DisplaySettings()
        self.sets = ("all",) + tuple(k for k in setup.sets if k != "all")
        self.picks = Picks(setup.classes, opt.max_misclassified, opt.examples, opt.sanity_images if opt.sanity else 0)

    def new_results(self) -> _Results:
        classes, opt = self.setup.classes, self.opt
        return _Results(LandmarkAgreement(classes, tolerance=opt.tolerance),
                        MethodComparison(opt.methods, self.sets, opt.tolerance), _OcclusionTally(classes))

    def load(self, idx: list[int]) -> tuple[Tensor, list[int]]:
        """(B, C, S, S) the films ``idx`` on the run's device and their true classes (the checkpoint's indices)."""
        s = self.setup
        x = torch.stack([s.ds[i][0] for i in idx]).to(s.device)
        return x, [s.label_map[int(s.ds.records[i].label)] for i in idx]

    def classify(self, x: Tensor) -> Tensor:
        """(B, K) class probabilities on the CPU."""
        with torch.no_grad():
            return torch.softmax(self.setup.ckpt.model(x).float(), dim=1).cpu()

    def pick(self, idx: list[int], y: list[int], predicted: list[int]) -> None:
        """Tell :attr:`picks` about films ``idx``, the next ones of the run."""
        ds = self.setup.ds
        for i, t, p in zip(idx, y, predicted):
            self.picks.add(i, t, p, has_landmarks(ds, i, self.opt.landmarks), ds.records[i].path.stem)

    def batch(self, idx: list[int], into: _Results, probs: Tensor | None = None) -> None:
        """Classify, project, score and occlude the films ``idx`` into ``into``. ``probs``: their class
        probabilities when known already (then :attr:`picks` knows them too)."""
        s, opt = self.setup, self.opt
        x, y = self.load(idx)
        known = probs is not None
        probs = probs if known else self.classify(x)
        pred = probs.argmax(1).tolist()
        if not known:
            self.pick(idx, y, pred)
        masks = [s.ds.landmark_masks(i) if opt.landmarks else {} for i in idx]
        for i, m in zip(idx, masks):
            _check_landmarks(s.ds, i, m)
        into.labels += y
        into.predicted += pred
        wrong = [j for j in range(len(idx)) if pred[j] != y[j]]
        show = [j for j in wrong if idx[j] in self.picks.misclassified]
        need = sorted(set(show) | {j for j, m in enumerate(masks) if m})
        if need:
            self._project(idx, x, y, probs, masks, need, show, into)
        if opt.occlusion and any(masks):
            self._occlude(x, y, masks, into)

    def _project(self, idx, x, y, probs, masks, need: list[int], show: list[int], into: _Results) -> None:
        """Project images ``need`` of the batch; score those with masks, draw those in ``show`` and the picked
        correctly classified examples."""
        from xraydeconv.reports import render

        tp = time.perf_counter()
        p = self.setup.dn.project(x[need], top_n=self.opt.top_n, precision=self.opt.precision)
        t_project = time.perf_counter() - tp
        into.t_project += t_project
        heats = render.filter_heatmaps(p.maps.cpu())
        combined = render.heatmap(heats)
        pos = {j: r for r, j in enumerate(need)}
        with_masks = [j for j in need if masks[j]]
        if with_masks:
            rows = [pos[j] for j in with_masks]
            images = x[with_masks].float().mean(1).cpu()
            scored = into.agreement.add([y[j] for j in with_masks], heats[rows], combined[rows],
                                        [masks[j] for j in with_masks], images=images)
            known = {"deconvnet": (combined[rows], t_project * len(rows) / len(need), scored[0]),
                     "film": (images, 0.0, scored[1])}
            self._compare(x[with_masks], [y[j] for j in with_masks], [masks[j] for j in with_masks],
                          [idx[j] for j in with_masks], known, into.comparison)
        for j in show:
            self._save_misclassified(idx[j], x[j], p, pos[j], probs[j], y[j], masks[j], into)
        for j in need:
            if idx[j] in self.picks.example:
                into.examples.append(self._save("examples", self.picks.example[idx[j]], idx[j], x[j], p, pos[j],
                                                probs[j], y[j], masks[j]))

    def method_options(self, method: str, main: bool = True) -> dict:
        """``heat_maps`` keywords of ``method`` in this evaluation (``main``: for the evaluated net itself)."""
        from xraydeconv.explain.methods import PROJECTED

        opt, s = self.opt, self.setup
        if method == "occlusion":  # a 5 x 5 grid of patches a quarter of the side wide, whatever the input size
            patch = max(1, s.ckpt.input_size // 4)
            return {"patch": patch, "stride": max(1, (s.ckpt.input_size - patch) // 4), "batch_size": 64}
        if method in PROJECTED:
            kw = {"layer": s.layer, "top_n": opt.top_n, "precision": opt.precision}
            return {**kw, "deconvnet": s.dn} if main else kw
        return {"layer": s.layer} if method == "gradcam" else {}

    def _compare(self, x: Tensor, y: list[int], masks: list[dict], idx: list[int], known: dict,
                 into: MethodComparison) -> None:
        """Score every compared method on images ``idx`` (all with landmarks): ``known`` maps a method to maps
        already computed, their seconds and their rows scored already (``MethodComparison.add``'s ``scored``); the
        others are computed here."""
        from xraydeconv.data.landmarks import landmark_set_masks
        from xraydeconv.explain.methods import heat_maps

        s = self.setup
        by_set = {"all": masks, **{name: [landmark_set_masks(s.ds, i, name, s.sets) for i in idx]
                                   for name in into.sets if name != "all"}}
        target = torch.tensor(y, device=x.device)
        for method in self.opt.methods:
            if method in known:
                maps, seconds, scored = known[method]
            else:
                t0 = time.perf_counter()
                maps = heat_maps(s.ckpt.model, x, method, target=target, **self.method_options(method)).float().cpu()
                seconds, scored = time.perf_counter() - t0, None
            into.add(method, maps, by_set, seconds, scored=scored)

    def _save(self, kind: str, folder: str, i: int, image: Tensor, p, row: int, probs: Tensor, label: int,
              masks: dict[str, np.ndarray]) -> dict:
        """Draw film ``i`` (row ``row`` of the projection ``p``) into ``folder`` of ``kind``; its gallery row."""
        from xraydeconv.reports.film import Film
        from xraydeconv.reports.pipeline import prediction_fields, printable_name, write_image_folder

        s, settings = self.setup, self.display
        path = s.ds.records[i].path
        fields = {"input_file": printable_name(path), "input_name": f"{s.classes[label]}/{printable_name(path.name)}",
                  **prediction_fields(probs, s.classes, s.classes[label])}
        film = Film.load(path, s.ckpt.input_size, settings.min_side, settings.max_side, s.ds.max_pixels)
        man = write_image_folder(self.dirs[kind] / folder, image.cpu(), p.maps[row].cpu(), p.channels[row].cpu(),
                                 p.activations[row].cpu(), {**s.base, **fields}, film=film, masks=masks,
                                 stride=s.stride, settings=settings)
        return {"folder": folder, "manifest": man}

    def _save_misclassified(self, i: int, image: Tensor, p, row: int, probs: Tensor, label: int,
                            masks: dict[str, np.ndarray], into: _Results) -> None:
        from xraydeconv.reports.pipeline import printable_name

        r = self._save("misclassified", self.picks.misclassified[i], i, image, p, row, probs, label, masks)
        into.drawn.append(r)
        fields = r["manifest"]
        into.misclassified.append({
            "image": printable_name(self.setup.ds.records[i].path), "true": self.setup.classes[label],
            "predicted": self.setup.classes[int(probs.argmax())], "probability": fields["predicted_probability"],
            "true_probability": fields["true_probability"], "folder": f"{MISCLASSIFIED_DIR}/{r['folder']}",
        })

    def _occlude(self, x: Tensor, y: list[int], masks: list[dict], into: _Results) -> None:
        js = [j for j, m in enumerate(masks) if m]
        occ_masks = []
        for j in js:
            mm = dict(masks[j])
            if any(nm != MARKER for nm in mm):
                mm[UNION] = metrics.landmark_union(masks[j], tuple(x.shape[-2:]), exclude=(MARKER,))
            occ_masks.append(mm)
        res = occlude_landmarks(self.setup.ckpt.model, x[js].cpu(), occ_masks, [y[j] for j in js],
                                top_n=self.opt.top_n, batch_size=max(8, self.opt.batch_size))
        into.occlusion.add([y[j] for j in js], res)


def _report(checkpoint: CheckpointLike, setup: _Setup, opt: EvalOptions, res: _Results, picks: Picks, t0: float,
            sanity: tuple[dict, float] | None = None) -> dict:
    """The content of ``report.json`` (``sanity``: the randomisation summary per method and its seconds, when
    run)."""
    import xraydeconv

    ckpt, classes = setup.ckpt, setup.classes
    confusion = res.confusion(len(classes))
    own = {"factory": setup.base["factory"]} if "factory" in setup.base else {}
    counts = np.bincount(np.array(res.labels, dtype=np.int64), minlength=len(classes))
    accuracy = metrics.per_class([float(t == p) for t, p in zip(res.labels, res.predicted)], res.labels, classes)
    summary = None if sanity is None else sanity[0]
    return {
        "checkpoint": {"path": setup.base["checkpoint"], "sha256": ckpt.sha256, "model": ckpt.model_name,
                       "epoch": ckpt.epoch, "input_size": ckpt.input_size, **own},
        "data": {"root": str(setup.root), "format": getattr(setup.ds, "format", None), "split": opt.split,
                 "images": setup.n},
        "options": asdict(opt),
        "class_names": classes,
        "classes_present": [classes[k] for k in sorted(set(setup.label_map))],
        "accuracy": float(np.trace(confusion) / max(1, confusion.sum())),
        "misclassified_count": int(confusion.sum() - np.trace(confusion)),
        "per_class_accuracy": {name: {"accuracy": a, "n": int(counts[classes.index(name)])}
                               for name, a in accuracy.items()},
        "confusion": confusion.tolist(),
        "misclassified": res.misclassified,
        "landmarks": res.agreement.result(),
        "methods": res.comparison.result(summary),
        "sanity": None if sanity is None else {"images": len(picks.sanity), "seed": SANITY_SEED,
                                               "seconds": sanity[1], "methods": summary},
        "occlusion": res.occlusion.result() if opt.occlusion else None,
        "timing": {"seconds": time.perf_counter() - t0, "projection_seconds": res.t_project,
                   "threads": torch.get_num_threads(), "device": str(setup.device),
                   "machine": platform.processor() or platform.machine()},
        "versions": {"xraydeconv": xraydeconv.__version__, "torch": torch.__version__},
        "files": {"markdown": REPORT_MD, "confusion": CONFUSION_PNG, "index": INDEX_HTML,
                  "misclassified_gallery": f"{MISCLASSIFIED_DIR}/index.html",
                  "examples_gallery": f"{EXAMPLES_DIR}/index.html"},
    }


def _randomisation(tmp: Path, setup: _Setup, tally: _Tally) -> tuple[dict, float] | None:
    """Run the randomisation test of the compared methods on the picked films, draw its figures into ``tmp`` and
    return its summary and seconds (None when no film had landmarks)."""
    from xraydeconv.reports.randomisation import (
        SANITY_CURVES_PNG,
        SANITY_PNG,
        plot_sanity_curves,
        plot_sanity_maps,
        randomisation_summary,
        run_randomisation,
    )

    films = tally.picks.sanity
    if not films:
        return None
    x, y = tally.load(films)
    methods = tally.opt.methods
    options = {m: tally.method_options(m, main=False) for m in methods}
    t0 = time.perf_counter()
    results = run_randomisation(setup.ckpt.model, x, y, methods, options, seed=SANITY_SEED)
    seconds = time.perf_counter() - t0
    summary = randomisation_summary(results)
    plot_sanity_maps(results, x[0].float().mean(0).cpu(), tmp / SANITY_PNG)
    plot_sanity_curves(summary, tmp / SANITY_CURVES_PNG)
    return summary, seconds


def _write_report(tmp: Path, report: dict, setup: _Setup, opt: EvalOptions, res: _Results, t0: float) -> None:
    from xraydeconv.reports.gallery import write_gallery
    from xraydeconv.training.plots import plot_confusion

    name = setup.ckpt.model_name
    plot_confusion(np.array(report["confusion"], dtype=np.int64), setup.classes, tmp / CONFUSION_PNG,
                   title=f"{name} on {opt.split}: {100 * report['accuracy']:.1f} %")
    write_gallery(tmp / MISCLASSIFIED_DIR, res.drawn, title=f"misclassified by {name}",
                  info={"model": name, "split": opt.split, "shown": len(res.drawn),
                        "misclassified": report["misclassified_count"]})
    write_gallery(tmp / EXAMPLES_DIR, res.examples, title=f"correctly classified by {name}",
                  info={"model": name, "split": opt.split})
    report["timing"]["seconds"] = time.perf_counter() - t0
    write_json(report, tmp / REPORT_JSON)  # strict JSON: NaN scores are written as null
    write_index(tmp / INDEX_HTML, report, res.drawn, res.examples)
    (tmp / REPORT_MD).write_text(render_markdown(report), encoding="utf-8")  # tmp is moved into place whole


# --- one process, or one rank of a torchrun job ---------------------------------------------------------------


def _bar(tally: _Tally, total: int, what: str, dist: DistInfo, progress: bool):
    from tqdm import tqdm

    share = f" (rank 0 of {dist.world_size}, its share)" if dist.enabled else ""
    return tqdm(total=total, desc=f"{what} {tally.setup.ckpt.model_name}{share}", unit="img", file=sys.stderr,
                disable=not (progress and dist.is_main))


def _classify_shard(tally: _Tally, batches: list[list[int]], mine: list[int], dist: DistInfo,
                    progress: bool) -> dict[int, Tensor]:
    """First pass of a sharded run: classify this rank's batches, then tell :attr:`_Tally.picks` every film of
    the run (gathered from all ranks) in order. Returns this rank's (B, K) probabilities per batch."""
    from xraydeconv.training import distributed

    probs: dict[int, Tensor] = {}
    films: list[tuple[int, int, int]] = []
    error = None
    with _bar(tally, sum(len(batches[k]) for k in mine), "classifying", dist, progress) as bar:
        for k in mine:
            try:
                x, y = tally.load(batches[k])
            except (UserError, OSError) as exc:  # told to every rank below, so none waits for the others
                error = (k, error_message(exc))
                break
            probs[k] = tally.classify(x)
            films += zip(batches[k], y, probs[k].argmax(1).tolist())
            bar.update(len(batches[k]))
    gathered = distributed.all_gather_objects((error, films), dist)
    distributed.raise_first([e for e, _ in gathered], dist)
    every = sorted(f for _, part in gathered for f in part)
    tally.pick([i for i, _, _ in every], [t for _, t, _ in every], [p for _, _, p in every])
    return probs


def _evaluate_shard(tally: _Tally, batches: list[list[int]], dist: DistInfo, progress: bool) -> _Results | None:
    """Run this rank's share of the batches (every ``world_size``-th, from its rank); rank 0 gets the results of
    every batch merged in the run's order, the other ranks None."""
    from xraydeconv.training import distributed

    mine = distributed.eval_shard(len(batches), dist)
    probs = _classify_shard(tally, batches, mine, dist, progress)
    done: list[tuple[int, _Results]] = []
    error = None
    with _bar(tally, sum(len(batches[k]) for k in mine), "evaluating", dist, progress) as bar:
        for k in mine:
            res = tally.new_results()
            try:
                tally.batch(batches[k], res, probs[k])
            except (UserError, OSError) as exc:
                error = (k, error_message(exc))
                break
            done.append((k, res))
            bar.update(len(batches[k]))
    distributed.raise_first(distributed.all_gather_objects(error, dist), dist)
    parts = distributed.gather_objects(done, dist)
    if parts is None:
        return None
    merged = tally.new_results()
    for _, res in sorted((d for part in parts for d in part), key=lambda d: d[0]):
        merged.extend(res)
    return merged


def _run(tmp: Path, checkpoint: CheckpointLike, setup: _Setup, opt: EvalOptions, dist: DistInfo, t0: float,
         progress: bool) -> dict:
    """Evaluate into the build folder ``tmp``; the report on rank 0, ``{}`` on the others."""
    for sub in (MISCLASSIFIED_DIR, EXAMPLES_DIR):
        (tmp / sub).mkdir(exist_ok=True)
    from xraydeconv.reports.pipeline import batch_ranges

    tally = _Tally(setup, opt, tmp)
    batches = [list(r) for r in batch_ranges(range(setup.n), opt.batch_size)]
    if dist.enabled:
        res = _evaluate_shard(tally, batches, dist, progress)
        if res is None:
            return {}
    else:  # one process: the picks are made batch by batch, with nothing classified twice
        res = tally.new_results()
        with _bar(tally, setup.n, "evaluating", dist, progress) as bar:
            for idx in batches:
                tally.batch(idx, res)
                bar.update(len(idx))
    sanity = _randomisation(tmp, setup, tally) if opt.sanity else None
    report = _report(checkpoint, setup, opt, res, tally.picks, t0, sanity)
    _write_report(tmp, report, setup, opt, res, t0)
    return report


def evaluate(
    checkpoint: CheckpointLike,
    out: str | os.PathLike,
    data: str | os.PathLike | None = None,
    options: EvalOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = None,
) -> dict:
    """Evaluate ``checkpoint`` (a checkpoint file, or a loaded ``Checkpoint`` such as a user's model from
    ``load_user_model``, which needs ``data``) on a split of ``data`` and write ``report.json``, ``report.md``,
    ``confusion.png`` and ``misclassified/`` (projection folders + ``index.html``) into ``out``.

    Under ``torchrun`` (gloo on CPU, NCCL on CUDA) every process evaluates every ``world_size``-th batch and draws
    its picked films into the one build folder; rank 0 merges the per-film results in the run's order and writes
    the report, which is that of one process (docs/large-archives.md). ``threads``: CPU threads (default: as set,
    or the cores divided among a ``torchrun`` job's local processes).

    Returns:
        The report (the content of ``report.json``); ``{}`` on ranks other than 0.
    Raises:
        UserError: unreadable checkpoint, missing data, classes that differ, bad masks or box files, bad options.
    """
    from xraydeconv.reports.pipeline import model_input
    from xraydeconv.reports.shard import shared_building_folder
    from xraydeconv.training import distributed

    opt = options or EvalOptions()
    _check_options(opt)
    dist = distributed.from_env()
    distributed.set_threads(threads, dist)
    inputs = [model_input(checkpoint)] + ([("--data", data)] if data is not None else [])
    out = check_output_folder(out, overwrite, inputs=inputs)
    t0 = time.perf_counter()
    setup = _open(checkpoint, out, data, opt, dist)
    distributed.init(dist, setup.device)
    try:
        with shared_building_folder(out, overwrite, dist) as tmp:
            return _run(tmp, checkpoint, setup, opt, dist, t0, progress)
    finally:
        distributed.shutdown(dist)


# --- Markdown ---------------------------------------------------------------------------------------------------


def agreement_row(label: str, s: dict) -> str:
    """One Markdown table row: pointing game (strict, tolerant), relevance mass, rank, area share, mass / area, n."""
    return (
        f"| {label} | {pct(s['pointing_game'])} | {pct(s.get('pointing_game_tolerant'))} "
        f"| {pct(s['relevance_mass'])} | {pct(s['relevance_rank'])} "
        f"| {pct(s['area_share'])} | {ratio(s.get('mass_over_area'))} | {s['n']} |"
    )


AGREEMENT_HEADER = (
    "| | Pointing game | Pointing game ± tol. | Relevance mass | Relevance rank | Area share | Mass / area | Images |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)


def _md_head(report: dict) -> list[str]:
    ck, d = report["checkpoint"], report["data"]
    lines = [
        f"# Evaluation of `{ck['model']}` (epoch {ck['epoch']})",
        "",
        f"Checkpoint `{ck['path']}` (sha256 `{ck['sha256'][:12]}…`), data `{d['root']}`, {d['split']} split, "
        f"{d['images']} images, input {ck['input_size']}×{ck['input_size']}.",
        "",
        f"**Accuracy: {pct(report['accuracy'])}** ({report['misclassified_count']} misclassified). "
        f"Confusion matrix: [{CONFUSION_PNG}]({CONFUSION_PNG}).",
        *_md_present(report),
        "",
        "## Per-class accuracy",
        "",
        "| Class | Accuracy | Images |",
        "|---|---:|---:|",
    ]
    return lines + [f"| {name} | {pct(r['accuracy'])} | {r['n']} |"
                    for name, r in report["per_class_accuracy"].items()]


def _md_present(report: dict) -> list[str]:
    present, known = report.get("classes_present", report["class_names"]), report["class_names"]
    if len(present) == len(known):
        return []
    return ["", f"The data hold {len(present)} of the checkpoint's {len(known)} classes ({', '.join(present)}); "
                "a film called one of the others counts as misclassified."]


def _md_landmarks(lm: dict | None, top_n: int) -> list[str]:
    lines = ["", "## Landmark agreement", ""]
    if lm is None:
        return lines + ["No landmark masks in this split: nothing to score."]
    tol = f", pointing-game tolerance {lm['tolerance']} px" if lm["tolerance"] else ""
    lines += [
        f"Heat maps of the top-{top_n} filters of the last conv layer (deconvnet projections) against the "
        f"union of each image's landmarks{tol}. *± tol.*: a hit within {lm.get('tolerant_px', 0)} px "
        "(Zhang et al.'s 15 px at 224 px, scaled). Chance level of the relevance mass is the area share; "
        "*mass / area* above 1 means the map concentrates on the landmarks.",
        "",
        AGREEMENT_HEADER,
    ]
    if "overall" in lm:
        lines.append(agreement_row(f"combined top-{top_n} map", lm["overall"]))
        pf = lm["per_filter"]
        lines.append(
            f"| single filter (mean of {top_n}) | {pct(pf['pointing_game'])} | | {pct(pf['relevance_mass'])} "
            f"| {pct(pf['relevance_rank'])} | | | {pf['n']} |"
        )
    if lm.get("baseline_image"):
        lines.append(agreement_row("baseline: the image itself as heat map", lm["baseline_image"]))
    if lm.get("marker"):
        lines.append(agreement_row("**marker** (planted shortcut)", lm["marker"]))
    if lm.get("per_class"):
        lines += ["", "### Per class (combined map vs the union of the class's landmarks)", "", AGREEMENT_HEADER]
        lines += [agreement_row(c, s) for c, s in lm["per_class"].items()]
    if lm.get("per_landmark"):
        lines += ["", "### Per landmark (combined map)", "", AGREEMENT_HEADER]
        lines += [agreement_row(c, s) for c, s in lm["per_landmark"].items()]
    return lines


def _md_occlusion(occ: dict | None, top_n: int) -> list[str]:
    if not occ:
        return []
    lines = [
        "",
        "## Occlusion sensitivity",
        "",
        "Each landmark filled with the image's mean in turn: the drop of the true-class probability and the "
        f"mean relative drop of the top-{top_n} filters' maximal activation.",
        "",
        "| Occluded | Probability drop | Filter activation drop | Area share | Images |",
        "|---|---:|---:|---:|---:|",
    ]
    return lines + [f"| {key} | {pct(r['prob_drop'])} | {pct(r['filter_drop'])} | {pct(r['area_share'])} "
                    f"| {r['n']} |" for key, r in occ.items()]


def _md_misclassified(report: dict, top_n: int) -> list[str]:
    mis = report["misclassified"]
    lines = ["", "## Misclassified images", ""]
    if not mis:
        return lines + ["None."]
    lines.append(f"Top-{top_n} projections of each (gallery: [{MISCLASSIFIED_DIR}/index.html]"
                 f"({MISCLASSIFIED_DIR}/index.html)); {len(mis)} of {report['misclassified_count']} shown.")
    lines += ["", "| Image | True | Predicted | Probability | Projection |", "|---|---|---|---:|---|"]
    return lines + [f"| {Path(r['image']).name} | {r['true']} | {r['predicted']} | {pct(r['probability'])} "
                    f"| [overlay]({r['folder']}/overlay.png) · [grid]({r['folder']}/grid.png) |" for r in mis]


def render_markdown(report: dict) -> str:
    """``report.md``: the report's tables for people."""
    top_n = report["options"]["top_n"]
    t = report["timing"]
    from xraydeconv.reports.randomisation import sanity_markdown

    sanity = report.get("sanity") or {}
    lines = (_md_head(report) + _md_landmarks(report.get("landmarks"), top_n)
             + comparison_markdown(report.get("methods"), top_n)
             + sanity_markdown(sanity.get("methods"), sanity.get("images", 0))
             + _md_occlusion(report.get("occlusion"), top_n) + _md_misclassified(report, top_n))
    lines += ["", f"Took {t['seconds']:.1f} s ({t['projection_seconds']:.1f} s projecting) on {t['device']}, "
              f"{t['threads']} threads, torch {report['versions']['torch']}."]
    return "\n".join(lines) + "\n"
