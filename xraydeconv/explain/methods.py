"""Attribution methods behind one verb: ``heat_maps(model, x, method) -> (B, H, W)`` raw heat maps.

Every method answers "which pixels matter?" in its own sense, and all of them return a non-negative map at the
input's resolution, so the landmark metrics and the randomisation test (:mod:`xraydeconv.metrics.sanity`) can
compare them on the same images:

=====================  ==============================================================================================
``deconvnet``          the top-n filters of the layer projected with the deconvnet (``mode="map"``), combined as the
                       evaluation combines them: ``|sum over channels|`` of each projection, normalised per filter,
                       averaged, renormalised to [0, 1]
``deconvnet-max``      the same with ``mode="max"``: only each filter's strongest activation is projected
``guided``             the same walk with guided backprop's rule at each ReLU
``gradient``           the same walk with the plain gradient's rule (forward ReLU masks only)
``saliency``           ``max over channels |d logit_t / d x|`` (Simonyan et al. 2014)
``gradient-x-input``   ``|sum over channels (d logit_t / d x) * x|``
``gradcam``            Grad-CAM (Selvaraju et al. 2017) at the projected layer, bilinearly upsampled to the input
``occlusion``          the drop of the target-class probability when a square patch is set to the film's mean
                       (positive part, each pixel averaged over the patches covering it)
``film``               the image itself (mean over channels): the brightness baseline every method must beat
=====================  ==============================================================================================

``logit_t`` is the target class's logit: the predicted class unless ``target`` is given. The model should be in
eval mode (BatchNorm running statistics, no dropout); no parameter's ``.grad`` is touched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xraydeconv.explain.common import activation_after_conv
from xraydeconv.explain.deconvnet import DeconvNet, sequential_features
from xraydeconv.explain.occlusion import default_layer, occlusion_map

__all__ = ["METHODS", "PROJECTED", "combine_filter_maps", "explainer", "filter_heatmaps", "gradcam_layer",
           "heat_maps", "normalise"]

METHODS = ("deconvnet", "deconvnet-max", "guided", "gradient", "saliency", "gradient-x-input", "gradcam",
           "occlusion", "film")

# method -> (DeconvNet.project's method, its mode; None: the ``mode`` option, "map" by default)
PROJECTED = {"deconvnet": ("deconvnet", None), "deconvnet-max": ("deconvnet", "max"),
             "guided": ("guided", None), "gradient": ("gradient", None)}

_OPTIONS = {
    **{m: {"mode", "rank", "precision", "deconvnet"} for m in PROJECTED},
    "deconvnet-max": {"rank", "precision", "deconvnet"},
    "saliency": set(), "gradient-x-input": set(), "gradcam": set(), "film": set(),
    "occlusion": {"patch", "stride", "fill", "batch_size"},
}

Target = int | Sequence[int] | Tensor | None


def normalise(maps: Tensor, dims: int = 2) -> Tensor:
    """Scale each map (the last ``dims`` dims) to [0, 1] by its maximum; all-zero maps stay zero."""
    peak = maps.flatten(-dims).amax(-1).clamp_min(torch.finfo(maps.dtype).tiny)
    return maps / peak.view(*peak.shape, *([1] * dims))


def filter_heatmaps(maps: Tensor) -> Tensor:
    """Per-filter heat maps: (B, top_n, C_in, H, W) projections (or (top_n, C_in, H, W)) -> (B, top_n, H, W)
    float32 (or (top_n, H, W)), ``|sum over C_in|`` normalised per filter to [0, 1]."""
    return normalise(maps.float().sum(-3).abs())


def combine_filter_maps(maps: Tensor, top: int | None = None) -> Tensor:
    """The combined heat map of top-n projections, as the evaluation scores it.

    Args:
        maps: (B, top_n, C_in, H, W) projections (``Projection.maps``), strongest filter first; or (B, top_n, H, W)
            per-filter heat maps (:func:`filter_heatmaps`).
        top: combine only the ``top`` strongest filters (default: all).
    Returns:
        (B, H, W) float32 in [0, 1]: the mean of the per-filter normalised heat maps, renormalised.
    """
    heats = filter_heatmaps(maps) if maps.dim() == 5 else maps.float()
    if top is not None:
        heats = heats[:, :top]
    return normalise(heats.mean(1))


def _given_targets(target: int | Sequence[int] | Tensor, n: int, device: torch.device) -> Tensor:
    """(n,) int64: ``target`` broadcast to a batch of ``n``."""
    t = torch.as_tensor(target, dtype=torch.long, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"target: {t.numel()} classes for {n} images")
    return t


def _targets(logits: Tensor, target: Target) -> Tensor:
    """(B,) int64 target classes: ``target`` broadcast to the batch, or the predicted classes of (B, K) ``logits``."""
    if target is None:
        return logits.detach().argmax(1)
    return _given_targets(target, logits.shape[0], logits.device)


def _target_logits(logits: Tensor, target: Target) -> Tensor:
    """The sum over the batch of each image's target logit: its gradient is each image's own."""
    return logits.gather(1, _targets(logits, target)[:, None]).sum()


def _input_gradient(model: nn.Module, x: Tensor, target: Target) -> Tensor:
    """(B, C, H, W) ``d logit_t / d x`` in float32 (each image's own target logit)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_target_logits(model(xg), target), xg)
    return grad.float()


def gradcam_layer(model: nn.Module, layer: int | str | None = None) -> nn.Module:
    """The module whose output Grad-CAM weighs: the layer the deconvnet projects from.

    Args:
        model: any CNN.
        layer: None (the deconvnet's default layer), a conv-layer index or a conv's name of a net with Sequential
            ``features`` (the ReLU after that conv, where the projection starts; the conv itself when no ReLU
            follows it), or any module's qualified name (``"layer3"``).
    Returns:
        The module; ValueError when ``layer`` names none.
    """
    if layer is None:
        return default_layer(model)
    features = sequential_features(model)
    if features is not None:
        dn = DeconvNet(model)
        try:
            index = dn.resolve_layer(layer)
        except ValueError:
            index = None
        if index is not None:
            return activation_after_conv(features, index)
    if isinstance(layer, int):
        layer = DeconvNet(model).layer_name(layer)
    try:
        return model.get_submodule(layer)
    except AttributeError as e:
        raise ValueError(f"layer {layer!r}: no such module in the model") from e


def gradcam(model: nn.Module, x: Tensor, layer: int | str | None = None, target: Target = None) -> Tensor:
    """Grad-CAM: ``ReLU(sum_k alpha_k A_k)`` with ``alpha_k`` the spatial mean of ``d logit_t / d A_k``.

    Args:
        model: any CNN; x: (B, C, H, W); layer: see :func:`gradcam_layer`; target: see :func:`heat_maps`.
    Returns:
        (B, H, W) float32, the (B, h, w) map of the layer upsampled bilinearly (``align_corners=False``).
    """
    module = gradcam_layer(model, layer)
    seen: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))
            if not seen or seen[-1].dim() != 4:
                raise ValueError(f"layer {layer!r}: its output is not a (B, K, h, w) feature map")
            acts = seen[-1]  # the last call: a module run twice per forward is weighed at its last use
            (grad,) = torch.autograd.grad(_target_logits(logits, target), acts)
    finally:
        handle.remove()
    alpha = grad.float().mean((2, 3), keepdim=True)
    cam = F.relu((alpha * acts.detach().float()).sum(1, keepdim=True))
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def _projected(model: nn.Module, x: Tensor, method: str, layer, top_n: int, options: dict) -> Tensor:
    walk, mode = PROJECTED[method]
    dn = options.get("deconvnet") or DeconvNet(model)
    if dn.model is not model:
        raise ValueError("deconvnet: a DeconvNet over another model")
    p = dn.project(x, top_n=top_n, layer=layer, mode=mode or options.get("mode", "map"),
                   rank=options.get("rank", "max"), method=walk, precision=options.get("precision", "fp32"))
    # the evaluation combines on the CPU: the same reductions in the same order give the same bits
    return combine_filter_maps(p.maps.cpu()).to(x.device)


def _occlusion(model: nn.Module, x: Tensor, target: Target, options: dict) -> Tensor:
    if target is None:  # the predicted classes: one forward pass; given classes need none
        with torch.no_grad():
            t = model(x).argmax(1).cpu()
    else:
        t = _given_targets(target, x.shape[0], torch.device("cpu"))
    if x.device.type == "cpu":  # the many forward passes run faster on channels-last weights; the caller's net stays
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    occ = occlusion_map(model, x, t, patch=options.get("patch", 32), stride=options.get("stride", 16),
                        layer=False, fill=options.get("fill", "mean"), batch_size=options.get("batch_size", 64))
    return occ.to_image().clamp_min(0).to(x.device)


def heat_maps(
    model: nn.Module,
    x: Tensor,
    method: str,
    layer: int | str | None = None,
    top_n: int = 25,
    target: Target = None,
    **options,
) -> Tensor:
    """Raw heat maps of ``x`` under ``model`` by one of :data:`METHODS` (see the module's table).

    Args:
        model: any CNN classifier returning (B, K) logits, in eval mode.
        x: (B, C, H, W) input images (the model's dtype and device).
        method: one of :data:`METHODS`.
        layer: the layer of the projections and of Grad-CAM (as in :meth:`DeconvNet.project`; None: the last conv
            of a Sequential net, the last feature map before global pooling of any other model).
        top_n: filters projected per image (the deconvnet methods).
        target: class(es) whose logit the gradient methods, Grad-CAM and occlusion explain: an int, (B,) ints, or
            None for each image's predicted class.
        options: ``mode`` (``"map"``/``"max"``, the projected methods but ``deconvnet-max``), ``rank``,
            ``precision``, ``deconvnet`` (a :class:`DeconvNet` over ``model`` to reuse); occlusion's ``patch``
            (32), ``stride`` (16), ``fill`` (``"mean"``) and ``batch_size`` (64).
    Returns:
        (B, H, W) float32 non-negative maps on x's device (not normalised, except the projected methods' [0, 1]).
    Raises:
        ValueError: unknown method or option, bad layer, target or input.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r}: use one of {', '.join(METHODS)}")
    unknown = sorted(set(options) - _OPTIONS[method])
    if unknown:
        raise ValueError(f"{method}: unknown option(s) {', '.join(unknown)}")
    if x.dim() != 4:
        raise ValueError(f"input of shape {tuple(x.shape)}: expected (B, C, H, W)")
    if method in PROJECTED:
        return _projected(model, x, method, layer, top_n, options)
    if method == "film":
        return x.detach().float().mean(1)
    if method == "saliency":
        return _input_gradient(model, x, target).abs().amax(1)
    if method == "gradient-x-input":
        return (_input_gradient(model, x, target) * x.detach().float()).sum(1).abs()
    if method == "gradcam":
        return gradcam(model, x, layer, target)
    return _occlusion(model, x, target, options)


def explainer(method: str, **kw) -> Callable[[nn.Module, Tensor], Tensor]:
    """``explain(model, x) -> (B, H, W)`` for :func:`xraydeconv.metrics.sanity.model_randomisation_test`.

    ``kw`` are :func:`heat_maps`'s keywords (``layer``, ``top_n``, ``target``, options), checked now.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r}: use one of {', '.join(METHODS)}")
    if "deconvnet" in kw:
        raise ValueError("deconvnet: the randomised copies are other models; an explainer builds its own")
    unknown = sorted(set(kw) - _OPTIONS[method] - {"layer", "top_n", "target"})
    if unknown:
        raise ValueError(f"{method}: unknown option(s) {', '.join(unknown)}")

    # The randomisation test changes one model copy in place, step after step; a DeconvNet reads the weights at
    # each projection, so the one built (and, for a graph model, traced) for that copy serves every step.
    built: dict[str, tuple[nn.Module, DeconvNet]] = {}

    def explain(model: nn.Module, x: Tensor) -> Tensor:
        if method not in PROJECTED:
            return heat_maps(model, x, method, **kw)
        if "dn" not in built or built["dn"][0] is not model:
            built["dn"] = (model, DeconvNet(model))
        return heat_maps(model, x, method, **kw, deconvnet=built["dn"][1])

    explain.__name__ = f"explain_{method.replace('-', '_')}"
    return explain
