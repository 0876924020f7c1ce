"""The network of any ``nn.Module`` CNN as a graph of adjoint steps, read with ``torch.fx``.

:class:`Graph` classifies each node of the traced forward into the kinds the walk down knows (conv, BatchNorm,
ReLU, max / average pooling, addition, channel concatenation, identity), folds each BatchNorm into the conv it
follows, names the layers a projection can start from (qualified module names) and runs the forward pass,
recording what the walk needs. Nodes that only run after the start layer (the head: flatten, linear, ...) are
run as the model runs them. The walk itself is in :mod:`xraydeconv.explain.graph_deconvnet`.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from xraydeconv.explain.adjoint import PoolRecord, bn_forward, is_switch_pool, pair, pool_forward
from xraydeconv.explain.common import HEAD_MODULES, IDENTITY_MODULES

__all__ = ["Graph", "GraphRecords", "Op", "UntraceableModel", "trace"]

_RELU_FNS = (F.relu, torch.relu, torch.relu_, F.relu_)
_ADD_FNS = (operator.add, operator.iadd, torch.add)
_CAT_FNS = (torch.cat, torch.concat)
_MAXPOOL_FNS = (F.max_pool2d, torch.max_pool2d)
_AVGPOOL_FNS = (F.avg_pool2d, F.adaptive_avg_pool2d, torch._C._nn.avg_pool2d, torch._C._nn.adaptive_avg_pool2d)
_IDENTITY_FNS = (F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout)
_IDENTITY_METHODS = ("contiguous",)
# the kinds a projection can walk down through
WALKABLE = ("input", "conv", "bn", "relu", "maxpool", "avgpool", "add", "cat", "identity")


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping our switch-pooling modules whole (their forward calls the ops directly)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_switch_pool(m) or super().is_leaf_module(m, qualname)


class UntraceableModel(ValueError):
    """torch.fx cannot trace the model's forward."""


def _concrete_args(model: nn.Module) -> dict[str, object]:
    """The forward's arguments after the image, fixed at their defaults (``forward(x, return_features=False)``)."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    out = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise ValueError(f"{type(model).__name__}: its forward takes {p.name!r} besides the image; "
                             "give it a default or wrap the model")
        out[p.name] = p.default
    return out


def trace(model: nn.Module) -> fx.GraphModule:
    """The model's forward as a ``GraphModule`` sharing the model's parameters and buffers; arguments after the
    image keep their defaults.

    Raises:
        UntraceableModel: the forward cannot be traced symbolically (data-dependent control flow, ...), with the
            tracer's reason.
        ValueError: the forward takes more than the image, without defaults.
    """
    concrete = _concrete_args(model)
    try:
        graph = _Tracer().trace(model, concrete_args=concrete or None)
    except Exception as e:  # noqa: BLE001 -- fx raises whatever the model's code raises on a Proxy
        raise UntraceableModel(
            f"{type(model).__name__}: torch.fx cannot trace its forward ({type(e).__name__}: {e}); "
            "see docs/own-models.md"
        ) from e
    return fx.GraphModule(model, graph)


@dataclass
class Op:
    """One node of the forward, as the walk sees it."""

    kind: str  # one of WALKABLE, or "fused" (a conv whose BatchNorm step stands for it), "const" (a forward
    # argument after the image), "attr", "output", "other"
    node: fx.Node
    inputs: list[fx.Node]  # the tensor inputs a signal is sent back to
    place: str  # where the node is, for messages: "layer1.0.conv1 (Conv2d)", "add (operator.add)"
    module: nn.Module | None = None  # the conv (also for a folded BatchNorm), BatchNorm, pool or avg-pool module
    bn: nn.BatchNorm2d | None = None  # the BatchNorm folded into this conv
    conv_node: fx.Node | None = None  # the conv node of a conv step (the node itself, or the one a BN folds)
    run: Callable[..., Tensor] | None = None  # avgpool: the forward as a function of its input


@dataclass
class GraphRecords:
    """What the forward pass leaves behind, keyed by node: the start layer's output and what each step needs."""

    start_act: Tensor | None = None  # (B, C, h, w)
    output: object = None  # the model's output
    conv_inputs: dict[fx.Node, tuple[int, int]] = field(default_factory=dict)  # keyed by the conv node
    pools: dict[fx.Node, PoolRecord] = field(default_factory=dict)
    relu_masks: dict[fx.Node, Tensor] = field(default_factory=dict)  # bool (B, C, h, w) ReLU output > 0
    avg_inputs: dict[fx.Node, torch.Size] = field(default_factory=dict)  # (B, C, H, W) of each avg pool's input
    cat_sizes: dict[fx.Node, list[int]] = field(default_factory=dict)  # channels of each concatenated input


def _fn_name(fn) -> str:
    mod = getattr(fn, "__module__", None) or ""
    return f"{mod}.{getattr(fn, '__name__', repr(fn))}".lstrip(".")


def _node_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


# --- what each node is ------------------------------------------------------------------------------------------


def _module_op(node: fx.Node, m: nn.Module) -> Op:
    place = f"{node.target} ({type(m).__name__})"
    x = _node_inputs(node)[:1]
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            return Op("other", node, x, f"{place} with padding_mode={m.padding_mode!r}")
        return Op("conv", node, x, place, module=m, conv_node=node)
    if isinstance(m, nn.BatchNorm2d):
        if m.running_mean is None or m.running_var is None:
            return Op("other", node, x, f"{place} without running statistics")
        return Op("bn", node, x, place, module=m)
    if isinstance(m, nn.ReLU):
        return Op("relu", node, x, place)
    if is_switch_pool(m) or isinstance(m, nn.MaxPool2d):
        if isinstance(m, nn.MaxPool2d) and (pair(m.dilation) != (1, 1) or m.return_indices):
            return Op("other", node, x, f"{place} with dilation or return_indices")
        return Op("maxpool", node, x, place, module=m)
    if isinstance(m, nn.AvgPool2d | nn.AdaptiveAvgPool2d):
        return Op("avgpool", node, x, place, module=m, run=m)
    if isinstance(m, IDENTITY_MODULES):
        return Op("identity", node, x, place)
    return Op("other", node, x, place, module=m)


def _function_op(node: fx.Node) -> Op:
    fn = node.target
    place = f"{node.name} ({_fn_name(fn)})"
    x = _node_inputs(node)[:1]
    if fn in _RELU_FNS:
        return Op("relu", node, x, place)
    if fn in _ADD_FNS and _arg(node, 2, "alpha", 1) == 1 and len(node.args) == 2:
        return Op("add", node, [a for a in node.args if isinstance(a, fx.Node)], place)
    if fn in _CAT_FNS and _arg(node, 1, "dim", 0) in (1, -3):
        return Op("cat", node, list(node.args[0]), place)
    if fn in _MAXPOOL_FNS:
        ks = _arg(node, 1, "kernel_size")
        pool = nn.MaxPool2d(ks, _arg(node, 2, "stride") or ks, _arg(node, 3, "padding", 0),
                            _arg(node, 4, "dilation", 1), ceil_mode=_arg(node, 5, "ceil_mode", False))
        if pair(pool.dilation) != (1, 1) or _arg(node, 6, "return_indices", False):
            return Op("other", node, x, f"{place} with dilation or return_indices")
        return Op("maxpool", node, x, place, module=pool)
    if fn in _AVGPOOL_FNS:
        rest, kwargs = node.args[1:], dict(node.kwargs)
        return Op("avgpool", node, x, place, run=lambda t: fn(t, *rest, **kwargs))
    if fn in _IDENTITY_FNS:
        return Op("identity", node, x, place)
    return Op("other", node, x, place)


def _method_op(node: fx.Node) -> Op:
    place = f"{node.name} (Tensor.{node.target})"
    x = _node_inputs(node)[:1]
    if node.target in ("relu", "relu_"):
        return Op("relu", node, x, place)
    if node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs:
        return Op("add", node, [a for a in node.args if isinstance(a, fx.Node)], place)
    if node.target in _IDENTITY_METHODS:
        return Op("identity", node, x, place)
    return Op("other", node, x, place)


def _op_of(node: fx.Node, modules: dict[str, nn.Module]) -> Op:
    if node.op == "placeholder":
        return Op("input", node, [], f"input {node.name}")
    if node.op == "call_module":
        return _module_op(node, modules[node.target])
    if node.op == "call_function":
        return _function_op(node)
    if node.op == "call_method":
        return _method_op(node)
    return Op("attr" if node.op == "get_attr" else "output", node, [], node.name)


def _fold_batchnorms(ops: dict[fx.Node, Op]) -> None:
    """A BatchNorm whose input is a conv used by nothing else becomes that conv's step (conv + BN, folded)."""
    for op in ops.values():
        if op.kind != "bn" or not op.inputs:
            continue
        conv = ops[op.inputs[0]]
        if conv.kind == "conv" and conv.bn is None and len(conv.node.users) == 1:
            op.kind, op.bn, op.module, op.conv_node, op.inputs = "conv", op.module, conv.module, conv.node, conv.inputs
            conv.kind = "fused"


_HEAD_FNS = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten, torch.mean, torch.amax, torch.sum, F.linear)
_HEAD_METHODS = ("mean", "amax", "max", "sum", "flatten", "view", "reshape")


def _is_head(node: fx.Node, op: Op) -> bool:
    """``node`` starts the head: global pooling, flattening or reshaping, a linear layer."""
    if node.op == "call_module":
        return isinstance(op.module, HEAD_MODULES)
    if node.op == "call_function":
        return node.target in _HEAD_FNS
    return node.op == "call_method" and node.target in _HEAD_METHODS


def _module_outputs(nodes: list[fx.Node]) -> dict[str, fx.Node]:
    """Qualified module name (``"layer1.0.relu@1"`` for a module's second call) -> the last node of its forward."""
    out: dict[str, fx.Node] = {}
    for node in nodes:
        for key in node.meta.get("nn_module_stack", {}):
            out[key] = node
    return out


# --- the graph ------------------------------------------------------------------------------------------------


class Graph:
    """The traced forward of ``model``, classified for the walk down; shares the model's parameters.

    Raises:
        ValueError: the model cannot be traced.
    """

    def __init__(self, model: nn.Module) -> None:
        self.gm = trace(model)
        self.nodes: list[fx.Node] = list(self.gm.graph.nodes)
        modules = dict(self.gm.named_modules())
        self.ops: dict[fx.Node, Op] = {n: _op_of(n, modules) for n in self.nodes}
        for n in [n for n in self.nodes if n.op == "placeholder"][1:]:  # the forward's other arguments
            self.ops[n].kind = "const"
        _fold_batchnorms(self.ops)
        self.module_outputs = _module_outputs(self.nodes)
        self.by_name: dict[str, fx.Node] = {n.name: n for n in self.nodes}
        self.convs: list[fx.Node] = [n for n in self.nodes if self.ops[n].kind == "fused" or
                                     (self.ops[n].kind == "conv" and self.ops[n].conv_node is n)]
        if not self.convs:
            raise ValueError(f"{type(model).__name__} has no Conv2d layer: nothing to project")
        self.in_channels: int = self.ops[self.convs[0]].module.in_channels

    # ---- names ----
    def name_of(self, node: fx.Node) -> str:
        """The layer name of ``node``: the outermost module called once whose output it is, else the node's name."""
        names = [k for k, n in self.module_outputs.items() if n is node and "@" not in k and self._calls(k) == 1]
        return min(names, key=lambda k: (k.count("."), len(k))) if names else node.name

    def _calls(self, name: str) -> int:
        return sum(1 for k in self.module_outputs if k.split("@")[0] == name)

    def node_named(self, name: str) -> fx.Node:
        """The node whose output the layer ``name`` (a qualified module name or a graph node's name) is."""
        if name in self.module_outputs:
            calls = self._calls(name)
            if calls > 1:
                raise ValueError(f"layer {name!r}: the module is called {calls} times in the forward; name one call "
                                 f"as {name!r}@1 .. @{calls - 1} (the first is {name!r}) or the module around it")
            return self.module_outputs[name]
        if name in self.by_name and self.ops[self.by_name[name]].kind in WALKABLE:
            return self.by_name[name]
        raise ValueError(f"layer {name!r}: no such module or node in the model")

    def conv_start(self, index: int) -> fx.Node:
        """Where conv layer ``index`` starts a projection: its ReLU's output (BatchNorm in between), else its own."""
        node = self.convs[index]
        if self.ops[node].kind == "fused":
            node = next(iter(node.users))
        users = list(node.users)
        if len(users) == 1 and self.ops[users[0]].kind == "relu":
            return users[0]
        return node

    def conv_index(self, node: fx.Node) -> int:
        """The conv index whose start ``node`` is, or -1."""
        for i in range(len(self.convs)):
            if self.conv_start(i) is node or self.convs[i] is node:
                return i
        return -1

    def default_start(self) -> fx.Node:
        """The last feature map before global pooling: the input of the first node that pools globally, flattens or
        reshapes (adaptive pooling, mean, flatten, view, linear ...), else the last walkable node."""
        for node in self.nodes:
            if _is_head(node, self.ops[node]) and self.ops[node].inputs:
                return self.ops[node].inputs[0]
        return [n for n in self.nodes if self.ops[n].kind in WALKABLE][-1]

    def channels(self, node: fx.Node) -> int:
        """Channel count of ``node``'s output, read from the modules (no forward pass)."""
        op = self.ops[node]
        if op.kind in ("conv", "fused"):
            return op.module.out_channels
        if op.kind == "bn":
            return op.module.num_features
        if op.kind == "cat":
            return sum(self.channels(n) for n in op.inputs)
        if op.kind == "input" or not op.inputs:
            return self.in_channels
        return self.channels(op.inputs[0])

    # ---- the part of the graph a projection walks ----
    def ancestors(self, start: fx.Node) -> list[fx.Node]:
        """The nodes a signal from ``start`` reaches on its way down, ``start`` first, in reverse forward order.

        Raises:
            ValueError: one of them is an operation the walk does not know, named with its place in the model.
        """
        seen, todo = {start}, [start]
        while todo:
            op = self.ops[todo.pop()]
            if op.kind not in WALKABLE and not (op.kind == "fused" and op.node is start):
                raise ValueError(
                    f"layer {self.name_of(start)!r}: cannot project through {op.place}; the walk down knows convs, "
                    "BatchNorm, ReLU, max / average pooling, additions, concatenations, dropout and identity "
                    "(see docs/own-models.md)"
                )
            for n in op.inputs:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return [n for n in reversed(self.nodes) if n in seen]

    # ---- forward ----
    def forward(self, x: Tensor, start: fx.Node, walked: set[fx.Node], masks: bool) -> GraphRecords:
        """Run the whole forward on ``x`` (B, C, H, W) with eval semantics (BatchNorm's running statistics, no
        dropout, ReLUs out of place), recording for the ``walked`` nodes what their adjoints need (ReLU masks only
        with ``masks``)."""
        rec = GraphRecords()
        env: dict[fx.Node, object] = {}
        for node in self.nodes:
            if node.op == "output":
                rec.output = fx.node.map_arg(node.args[0], env.__getitem__)
                break
            env[node] = self._run(self.ops[node], x, env, rec, node in walked, masks)
            if node is start:
                rec.start_act = env[node]
        return rec

    def _run(self, op: Op, x: Tensor, env: dict, rec: GraphRecords, record: bool, masks: bool) -> object:
        node, kind = op.node, op.kind
        h = env[op.node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else None
        if kind == "input":
            return x
        if kind == "const":  # an argument after the image, fixed at its default when traced
            return node.args[0] if node.args else None
        if (kind == "conv" and op.conv_node is node) or kind == "fused":
            rec.conv_inputs[node] = (h.shape[-2], h.shape[-1])
            return op.module(h)
        if kind == "conv" or kind == "bn":  # a BatchNorm, folded into its conv's step or not
            return bn_forward(op.bn if kind == "conv" else op.module, h)
        if kind == "relu":
            out = F.relu(h)
            if record and masks:
                rec.relu_masks[node] = out > 0
            return out
        if kind == "maxpool":
            if not record:
                return op.module(h)
            out, rec.pools[node] = pool_forward(op.module, h)
            return out
        if kind == "avgpool":
            rec.avg_inputs[node] = h.shape
            return op.run(h)
        if kind == "add":
            a, b = fx.node.map_arg(node.args, env.__getitem__)
            return a + b
        if kind == "cat":
            parts = [env[n] for n in op.inputs]
            rec.cat_sizes[node] = [p.shape[1] for p in parts]
            return torch.cat(parts, 1)
        if kind == "identity":
            return h
        return self._run_as_model(node, env)

    def _run_as_model(self, node: fx.Node, env: dict) -> object:
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "get_attr":
            return operator.attrgetter(node.target)(self.gm)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)
