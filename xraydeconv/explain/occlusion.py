"""Occlusion sensitivity (Zeiler & Fergus 2014, §4.2): what does the net lose when a region is hidden?

A second, model-agnostic answer to the question the deconvnet answers: occlude a region (each
landmark, or a square patch slid over the image), run the net again, and measure

- the drop of the true-class probability (softmax of the logits the model returns), and
- the relative drop of the top-n filters' activations at one layer (the channels ranked by their
  maximal activation on the clean image, read through a forward hook; by default the ReLU after the
  last conv layer of ``model.features``, i.e. the layer the deconvnet projects from).

All occluded copies are run in batches; nothing here needs the deconvnet's walk or the switch-pooling ops (only its
graph reading, to find the default layer of a model without ``features``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from xraydeconv.explain.common import activation_after_conv
from xraydeconv.explain.graph import Graph

__all__ = ["default_layer", "LandmarkOcclusion", "occlude_landmarks", "OcclusionMap", "occlusion_map"]

Fill = str | float


def default_layer(model: nn.Module) -> nn.Module:
    """The module whose output the top filters are read from: the layer the deconvnet projects from by default.

    For a model with ``features``: the ReLU after the last conv of ``model.features`` (the last Conv2d when no
    ReLU follows it). For any other model: the module whose output is the last feature map before global pooling
    (``layer4`` of a ResNet), read from its ``torch.fx`` graph. Raises ValueError when there is no such module
    (no conv, an untraceable forward, or a default layer made by a function rather than a module).
    """
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or not any(isinstance(m, nn.Conv2d) for m in features):
        return _graph_default_layer(model)
    return activation_after_conv(features, -1)


def _graph_default_layer(model: nn.Module) -> nn.Module:
    graph = Graph(model)  # ValueError: untraceable, no conv
    node = graph.default_start()
    name = graph.name_of(node)
    if graph.module_outputs.get(name) is not node:
        raise ValueError(f"the default layer {name!r} is not a module: pass the layer to read activations from")
    return model.get_submodule(name)


def _fill_values(images: torch.Tensor, fill: Fill) -> torch.Tensor:
    """One fill value per image and channel, shape (B, C, 1, 1)."""
    if isinstance(fill, int | float):
        return torch.full((images.shape[0], images.shape[1], 1, 1), float(fill), dtype=images.dtype)
    if fill == "mean":  # Zeiler & Fergus occlude with a grey square: the image's mean
        return images.mean(dim=(2, 3), keepdim=True)
    if fill == "background":  # the median of the 1-pixel border, i.e. what lies around the body part
        border = torch.cat(
            [images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0], images[..., 1:-1, -1]], dim=-1
        )
        return border.median(dim=-1).values[..., None, None]
    if fill == "zero":
        return torch.zeros((images.shape[0], images.shape[1], 1, 1), dtype=images.dtype)
    raise ValueError(f"fill: expected 'mean', 'background', 'zero' or a number, got {fill!r}")


class _Probe:
    """Runs the model in eval mode and returns (probabilities (B, K), channel maxima (B, C) or None)."""

    def __init__(self, model: nn.Module, layer: nn.Module | None):
        self.model = model
        self.layer = layer
        self._act: torch.Tensor | None = None

    def _hook(self, _m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        self._act = out.detach().amax(dim=(2, 3)) if out.dim() == 4 else out.detach()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        handle = self.layer.register_forward_hook(self._hook) if self.layer is not None else None
        was_training = self.model.training
        self.model.eval()  # dropout off, batch-norm running statistics: occluded copies must not change them
        try:
            device = next(self.model.parameters(), torch.empty(0)).device
            logits = self.model(x.to(device))
        finally:
            self.model.train(was_training)
            if handle is not None:
                handle.remove()
        act, self._act = self._act, None
        return torch.softmax(logits.float(), dim=1).cpu(), (act.float().cpu() if act is not None else None)


def _resolve_layer(model: nn.Module, layer: nn.Module | None | bool) -> nn.Module | None:
    if layer is False:
        return None
    if layer is None or layer is True:
        try:
            return default_layer(model)
        except ValueError:
            return None
    return layer


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _filter_drop(clean: torch.Tensor, occluded: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Mean over the chosen channels of (clean - occluded) / clean; channels with no clean activation are skipped."""
    c = clean.gather(1, channels)
    o = occluded.gather(1, channels)
    ok = c > 0
    rel = torch.where(ok, (c - o) / c.clamp(min=1e-12), torch.zeros_like(c))
    return rel.sum(1) / ok.sum(1).clamp(min=1)


@dataclass
class LandmarkOcclusion:
    """Per image and landmark: what hiding the landmark costs. Arrays are NaN where an image lacks the landmark."""

    names: list[str]  # landmark names: the columns of the (B, L) arrays
    prob_clean: np.ndarray  # (B,) true-class probability of the clean image
    prob_drop: np.ndarray  # (B, L) clean minus occluded true-class probability
    filter_drop: np.ndarray  # (B, L) mean relative drop of the top-n filters' maximal activation (NaN without layer)
    area_share: np.ndarray  # (B, L) landmark area / image area
    channels: np.ndarray  # (B, top_n) the filters whose activations are followed (empty without layer)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per landmark name: mean probability drop, mean filter drop, mean area share and image count."""
        out = {}
        for j, name in enumerate(self.names):
            ok = ~np.isnan(self.prob_drop[:, j])
            if ok.any():
                fd = self.filter_drop[ok, j]
                out[name] = {
                    "prob_drop": float(self.prob_drop[ok, j].mean()),
                    "filter_drop": float(np.nanmean(fd)) if (~np.isnan(fd)).any() else float("nan"),
                    "area_share": float(self.area_share[ok, j].mean()),
                    "n": int(ok.sum()),
                }
        return out


def occlude_landmarks(
    model: nn.Module,
    images: torch.Tensor,
    masks: Sequence[Mapping[str, np.ndarray]],
    targets: Sequence[int] | torch.Tensor,
    layer: nn.Module | None | bool = None,
    top_n: int = 25,
    fill: Fill = "mean",
    batch_size: int = 32,
) -> LandmarkOcclusion:
    """Occlude each landmark of each image in turn and measure the drop of class score and top-filter activations.

    Args:
        model: any module mapping images (B, C, H, W) to logits (B, K); run in eval mode (its mode is restored).
        images: (B, C, H, W) float.
        masks: per image, landmark name -> bool mask (H, W); images may have different (or no) landmarks.
        targets: (B,) the class whose probability is followed (normally the true label).
        layer: module whose output (N, C', h, w) gives the filter activations; None = :func:`default_layer`
            when the model has ``features``; False = skip the filter measure.
        top_n: how many of the clean image's most activated filters to follow.
        fill: 'mean' (the image's mean, Zeiler & Fergus' grey square), 'background' (median of the border),
            'zero' or a number.
        batch_size: occluded copies per forward pass.
    """
    names = _check_landmark_args(images, masks, targets)
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    probe = _Probe(model, _resolve_layer(model, layer))
    images = images.detach().cpu().float()
    p_clean, a_clean, channels = _clean_pass(probe, images, targets, top_n, batch_size)
    b = images.shape[0]
    prob_drop = np.full((b, len(names)), np.nan)
    filter_drop = np.full((b, len(names)), np.nan)
    area = np.full((b, len(names)), np.nan)
    fills = _fill_values(images, fill)
    jobs = [(i, j) for i, m in enumerate(masks) for j, n in enumerate(names) if n in m and np.any(m[n])]
    for sl in _chunks(len(jobs), batch_size):
        batch = jobs[sl]
        idx = torch.tensor([i for i, _ in batch])
        x = images[idx]  # advanced indexing already copies
        for k, (i, j) in enumerate(batch):
            m = torch.from_numpy(np.asarray(masks[i][names[j]], dtype=bool))
            x[k][:, m] = fills[i, :, 0]
            area[i, j] = float(m.float().mean())
        p, a = probe(x)
        p_occ = p.gather(1, targets[idx, None])[:, 0]
        drop = (p_clean[idx] - p_occ).numpy()
        fdrop = _filter_drop(a_clean[idx], a, channels[idx]).numpy() if a_clean is not None else None
        for k, (i, j) in enumerate(batch):
            prob_drop[i, j] = drop[k]
            if fdrop is not None:
                filter_drop[i, j] = fdrop[k]
    return LandmarkOcclusion(
        names=names,
        prob_clean=p_clean.double().numpy(),
        prob_drop=prob_drop,
        filter_drop=filter_drop,
        area_share=area,
        channels=channels.numpy(),
    )


def _check_landmark_args(
    images: torch.Tensor, masks: Sequence[Mapping[str, np.ndarray]], targets: Sequence[int] | torch.Tensor
) -> list[str]:
    """ValueError on inconsistent shapes; the sorted landmark names of all images."""
    if images.dim() != 4:
        raise ValueError(f"images: expected (B, C, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    if len(masks) != b:
        raise ValueError(f"masks: {len(masks)} entries for {b} images")
    n_targets = torch.as_tensor(targets, dtype=torch.long).numel()
    if n_targets != b:
        raise ValueError(f"targets: {n_targets} labels for {b} images")
    for i, m in enumerate(masks):
        for n, mask in m.items():
            if tuple(mask.shape) != (h, w):
                raise ValueError(f"image {i}, landmark {n!r}: mask {tuple(mask.shape)} does not match image {(h, w)}")
    return sorted({n for m in masks for n in m})


def _clean_pass(
    probe: _Probe, images: torch.Tensor, targets: torch.Tensor, top_n: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The clean images' true-class probability (B,), channel maxima (B, C) or None, and top-n channels (B, n)."""
    prob_clean, act_clean = [], []
    for sl in _chunks(images.shape[0], batch_size):
        p, a = probe(images[sl])
        prob_clean.append(p.gather(1, targets[sl, None])[:, 0])
        act_clean.append(a)
    if act_clean[0] is None:
        return torch.cat(prob_clean), None, torch.empty((images.shape[0], 0), dtype=torch.long)
    a_clean = torch.cat(act_clean)
    return torch.cat(prob_clean), a_clean, a_clean.topk(min(top_n, a_clean.shape[1]), dim=1).indices


@dataclass
class OcclusionMap:
    """Sliding-patch sensitivity: one value per patch position (B, nY, nX), plus the patch geometry."""

    prob_drop: torch.Tensor  # (B, nY, nX) true-class probability lost when the patch at (y, x) is grey
    filter_drop: torch.Tensor | None  # (B, nY, nX) mean relative drop of the top-n filters (None without layer)
    ys: list[int]  # top rows of the patch positions
    xs: list[int]  # left columns of the patch positions
    patch: int
    size: tuple[int, int]

    def to_image(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """Spread (B, nY, nX) values back to (B, H, W): each pixel gets the mean over the patches covering it."""
        v = self.prob_drop if values is None else values
        h, w = self.size
        acc = torch.zeros(v.shape[0], h, w, dtype=torch.float64)
        cnt = torch.zeros(h, w, dtype=torch.float64)
        for a, y in enumerate(self.ys):
            for c, x in enumerate(self.xs):
                acc[:, y : y + self.patch, x : x + self.patch] += v[:, a, c, None, None].double()
                cnt[y : y + self.patch, x : x + self.patch] += 1
        return (acc / cnt.clamp(min=1)).float()


def _positions(n: int, patch: int, stride: int) -> list[int]:
    pos = list(range(0, n - patch + 1, stride))
    if pos[-1] != n - patch:  # cover the far edge too
        pos.append(n - patch)
    return pos


def occlusion_map(
    model: nn.Module,
    images: torch.Tensor,
    targets: Sequence[int] | torch.Tensor,
    patch: int = 32,
    stride: int = 16,
    layer: nn.Module | None | bool = None,
    top_n: int = 25,
    fill: Fill = "mean",
    batch_size: int = 64,
    progress: bool = False,
) -> OcclusionMap:
    """Slide a ``patch`` x ``patch`` occluder with ``stride`` over each image; map the class-probability drop.

    Args as :func:`occlude_landmarks`; ``progress`` shows a tqdm bar (stderr) over the forward passes.
    """
    if images.dim() != 4:
        raise ValueError(f"images: expected (B, C, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    if not 0 < patch <= min(h, w) or stride < 1:
        raise ValueError(f"patch {patch} / stride {stride}: need 0 < patch <= {min(h, w)} and stride >= 1")
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    if targets.numel() != b:
        raise ValueError(f"targets: {targets.numel()} labels for {b} images")
    probe = _Probe(model, _resolve_layer(model, layer))
    images = images.detach().cpu().float()
    fills = _fill_values(images, fill)
    ys, xs = _positions(h, patch, stride), _positions(w, patch, stride)

    p_clean, a_clean = probe(images)
    p_clean = p_clean.gather(1, targets[:, None])[:, 0]
    channels = a_clean.topk(min(top_n, a_clean.shape[1]), dim=1).indices if a_clean is not None else None

    jobs = [(i, y, x) for i in range(b) for y in ys for x in xs]
    drops = torch.empty(len(jobs))
    fdrops = torch.empty(len(jobs)) if channels is not None else None
    chunks = list(_chunks(len(jobs), batch_size))
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="occlusion", unit="batch", leave=False)
    for sl in chunks:
        batch = jobs[sl]
        idx = torch.tensor([i for i, _, _ in batch])
        x = images[idx]  # advanced indexing already copies
        for k, (i, y0, x0) in enumerate(batch):
            x[k, :, y0 : y0 + patch, x0 : x0 + patch] = fills[i]
        p, a = probe(x)
        drops[sl] = p_clean[idx] - p.gather(1, targets[idx, None])[:, 0]
        if fdrops is not None:
            fdrops[sl] = _filter_drop(a_clean[idx], a, channels[idx])
    shape = (b, len(ys), len(xs))
    return OcclusionMap(
        prob_drop=drops.reshape(shape),
        filter_drop=fdrops.reshape(shape) if fdrops is not None else None,
        ys=ys,
        xs=xs,
        patch=patch,
        size=(h, w),
    )
