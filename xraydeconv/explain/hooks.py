"""The deconvnet of a model ``torch.fx`` cannot trace (data-dependent control flow, ...): autograd with hooks.

Each block of (image, filter) pairs runs the model on its images repeated once per filter, with every ``nn.ReLU``
module's backward replaced by the method's rule (through forward hooks), and one backward from the layer's
output. This is exact, and batched, but it pays a forward pass per projection and, like Captum, it cannot see a
ReLU written as a function (``F.relu``): there the plain gradient passes. The graph walk
(:mod:`xraydeconv.explain.graph_deconvnet`) has neither limit; this path only runs where it cannot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xraydeconv.explain.common import (
    DEFAULT_CHUNK_CPU,
    DEFAULT_CHUNK_CUDA,
    HEAD_MODULES,
    Projection,
    ProjectRequest,
    blocks,
    check_top_n,
    select_filters,
)

__all__ = ["HookDeconvNet"]



class _Rule(torch.autograd.Function):
    """ReLU forward; backward by the method: rectify (deconvnet), rectify and mask (guided)."""

    @staticmethod
    def forward(ctx, x: Tensor, guided: bool) -> Tensor:
        out = x.clamp(min=0)
        ctx.save_for_backward(out if guided else None)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        (out,) = ctx.saved_tensors
        g = F.relu(g)
        return (g if out is None else g * (out > 0)), None


class _Stop(Exception):
    """Raised by the layer's hook: nothing after the layer is needed."""


class HookDeconvNet:
    """Deconvnet over a model through autograd and module hooks; see :class:`xraydeconv.explain.DeconvNet`.

    Layers are module names (as in ``named_modules``) or ints counting the ``Conv2d`` modules in registration
    order (the projection then starts at the conv's own output); the default is the output of the last module
    that finishes before the first global pooling, flatten or linear module is called.
    """

    def __init__(self, model: nn.Module, chunk_size: int | None = None) -> None:
        self.model = model
        self.chunk_size = None if chunk_size is None else max(1, int(chunk_size))
        self.modules = dict(model.named_modules())
        self.convs = [n for n, m in self.modules.items() if isinstance(m, nn.Conv2d)]
        if not self.convs:
            raise ValueError(f"{type(model).__name__} has no Conv2d layer: nothing to project")
        self.in_channels: int = self.modules[self.convs[0]].in_channels
        self._default: str | None = None

    @property
    def num_layers(self) -> int:
        return len(self.convs)

    def resolve_layer(self, layer: int | str | None) -> str:
        """The module name of ``layer``. The default is found by running the model once: on the first input
        projected, or before that on a 224 x 224 probe with the channels of the first Conv2d registered."""
        if layer is None:
            if self._default is None:
                probe = torch.zeros(1, self.in_channels, 224, 224, dtype=self._dtype(), device=self._device())
                self._default = self._find_default(probe)
            return self._default
        if isinstance(layer, str):
            if layer not in self.modules or layer == "":
                raise ValueError(f"layer {layer!r}: no such module in the model")
            return layer
        n = self.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise ValueError(f"layer {layer}: out of range, the model has {n} conv layers (use {-n}..{n - 1})")
        return self.convs[layer % n]

    def layer_channels(self, layer: int | str | None = None) -> int:
        """The channels of the last Conv2d or BatchNorm2d inside the layer's module (``project`` checks the real
        count)."""
        name = self.resolve_layer(layer)
        inner = [m for m in self.modules[name].modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
        if not inner:
            raise ValueError(f"layer {name!r}: no Conv2d or BatchNorm2d inside, its channels are unknown")
        last = inner[-1]
        return last.out_channels if isinstance(last, nn.Conv2d) else last.num_features

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _find_default(self, x: Tensor) -> str:
        finished: list[tuple[str, Tensor]] = []
        head: list[str] = []

        def pre(name: str) -> Callable:
            return lambda m, i: head.append(name) if isinstance(m, HEAD_MODULES) and not head else None

        def post(name: str) -> Callable:
            return lambda m, i, o: finished.append((name, o)) if not head and isinstance(o, Tensor) else None

        hooks = [m.register_forward_pre_hook(pre(n)) for n, m in self.modules.items() if n]
        hooks += [m.register_forward_hook(post(n)) for n, m in self.modules.items() if n]
        try:
            with torch.no_grad(), _eval(self.model):
                self.model(x)
        finally:
            for h in hooks:
                h.remove()
        maps = [n for n, o in finished if o.dim() == 4]
        if not maps:
            raise ValueError(f"{type(self.model).__name__}: no module outputs a feature map before its head")
        return maps[-1]

    def _run(self, x: Tensor, module: nn.Module, stop: bool) -> tuple[object, Tensor]:
        """Run the model on ``x``: (its output, or None when stopped after ``module``; ``module``'s output)."""
        store: dict[str, Tensor] = {}

        def keep(m: nn.Module, i: object, o: Tensor) -> None:
            store["act"] = o
            if stop:
                raise _Stop

        hook = module.register_forward_hook(keep)
        try:
            out = self.model(x)
        except _Stop:
            out = None
        finally:
            hook.remove()
        if "act" not in store:
            raise ValueError(f"layer module {type(module).__name__} is not called by the model's forward")
        return out, store["act"]

    def project(self, x: Tensor, **options) -> Projection:
        """As :meth:`xraydeconv.explain.DeconvNet.project`; ``precision`` must be ``"fp32"`` here."""
        r = ProjectRequest(**options)
        top_n, layer, mode, rank, method, channels, precision, progress = (
            r.top_n, r.layer, r.mode, r.rank, r.method, r.channels, r.precision, r.progress)
        if precision != "fp32":
            raise ValueError(f"precision {precision!r}: this model is projected through hooks, in fp32 only")
        if x.dim() != 4:
            raise ValueError(f"input of shape {tuple(x.shape)}: expected (B, C, H, W)")
        if layer is None and self._default is None:
            self._default = self._find_default(x[:1])
        name = self.resolve_layer(layer)
        module = self.modules[name]
        with torch.no_grad(), _eval(self.model):
            out, act = self._run(x, module, stop=False)
        if not isinstance(act, Tensor) or act.dim() != 4:
            raise ValueError(f"layer {name!r}: its output is not a (B, C, h, w) feature map")
        top_n = check_top_n(top_n, channels, act.shape[1], f"layer {name!r}")
        activations, chans = select_filters(act, rank, top_n, channels)
        B = x.shape[0]
        maps = x.new_empty(B, top_n, *x.shape[1:])
        chunk = self.chunk_size or (DEFAULT_CHUNK_CUDA if x.is_cuda else DEFAULT_CHUNK_CPU)
        for imgs, filters, done in blocks(B, top_n, chunk):
            sel = chans[imgs, filters]
            g = self._block(x[imgs], module, sel, mode, method)
            maps[imgs, filters] = g.view(*sel.shape, *g.shape[1:])
            if progress is not None and done:
                progress(imgs.stop - imgs.start)
        logits = out if isinstance(out, Tensor) and out.dim() == 2 and out.shape[0] == B else None
        return Projection(maps=maps, channels=chans, activations=activations,
                          layer=self.convs.index(name) if name in self.convs else -1, logits=logits, layer_name=name)

    def _block(self, x: Tensor, module: nn.Module, sel: Tensor, mode: str, method: str) -> Tensor:
        """(images * filters, C_in, H, W): the images repeated once per filter of ``sel`` (images, filters)."""
        xs = x.repeat_interleave(sel.shape[1], 0).detach().requires_grad_(True)
        with torch.enable_grad(), _eval(self.model), _relu_rules(self.model, method):
            _, act = self._run(xs, module, stop=True)
            o = act[torch.arange(xs.shape[0], device=x.device), sel.reshape(-1)].flatten(1)  # (P, h*w)
            if mode == "max":  # the first maximum only, as the selector o[c, i, j] * a[c, i, j]
                pos = o.detach().argmax(1, keepdim=True)
                target = (o.gather(1, pos) * o.detach().gather(1, pos)).sum()
            else:
                target = (o * o.detach()).sum()
            (g,) = torch.autograd.grad(target, xs)
        return g


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _relu_rules(model: nn.Module, method: str) -> Iterator[None]:
    """Every ``nn.ReLU`` module's backward by ``method`` (the plain gradient needs nothing), run out of place."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)] if method != "gradient" else []
    inplace = [m.inplace for m in relus]
    guided = method == "guided"
    hooks = [m.register_forward_hook(lambda m, i, o: _Rule.apply(i[0], guided)) for m in relus]
    try:
        for m in relus:  # the hook recomputes the output from the input, which must not have been overwritten
            m.inplace = False
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, flag in zip(relus, inplace, strict=True):
            m.inplace = flag
