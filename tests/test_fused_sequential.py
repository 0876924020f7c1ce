"""``FusedSequential``: ReLU + SwitchMaxPool2d pairs run as one kernel, unobservably.

The fused model must give the outputs and gradients of the same modules run one by one, bit for bit; keep
``nn.Sequential``'s names, state dict and slicing; and fall back to the modules whenever a hook could see the
difference or the dispatch table has no measurement for the fused op.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from xraydeconv import ops
from xraydeconv.nn import FusedSequential, SwitchMaxPool2d
from xraydeconv.ops import pool_dispatch
from xraydeconv.training.models import build

pytestmark = pytest.mark.skipif(not ops.has_kernels("cpu"), reason="xraydeconv._C is not built")


def _stack(backend: str, cls=FusedSequential) -> nn.Sequential:
    torch.manual_seed(0)
    return cls(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
               SwitchMaxPool2d(2, backend=backend), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
               SwitchMaxPool2d(3, 2, 1, backend=backend), nn.ReLU())


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def _fused_ops(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The names of the autograd nodes of ``model(x)`` that are fused relu-pool nodes."""
    seen, todo, names = set(), [model(x).grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names += [fn.name()] if "SwitchReluPool2d" in fn.name() else []
        todo += [f for f, _ in fn.next_functions]
    return names


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fused_equals_the_modules_one_by_one(layout):
    x = torch.randn(4, 1, 20, 22).contiguous(memory_format=layout)
    fused, plain = _stack("kernel"), _stack("kernel", nn.Sequential)
    assert len(_fused_ops(fused, x)) == 2 and _fused_ops(plain, x) == []
    out_f, grads_f = _run(fused, x)
    out_p, grads_p = _run(plain, x)
    assert torch.equal(out_f, out_p) and all(torch.equal(a, b) for a, b in zip(grads_f, grads_p))
    out_n, grads_n = _run(_stack("native"), x)  # native pooling: the same numbers again
    assert torch.equal(out_f, out_n) and all(torch.equal(a, b) for a, b in zip(grads_f, grads_n))


def test_a_hook_on_either_module_or_a_global_hook_unfuses_the_pair():
    x = torch.randn(2, 1, 16, 16)
    model = _stack("kernel")
    calls = []
    handle = model[2].register_forward_hook(lambda m, i, o: calls.append("relu"))
    assert len(_fused_ops(model, x)) == 1 and calls == ["relu"]  # the second pair still fuses
    handle.remove()
    handle = model[3].register_full_backward_hook(lambda m, gi, go: None)
    assert len(_fused_ops(model, x)) == 1
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert _fused_ops(model, x) == []
    finally:
        handle.remove()
    assert len(_fused_ops(model, x)) == 2


def test_auto_fuses_only_where_the_table_measured_the_fused_op(monkeypatch):
    x = torch.randn(2, 1, 16, 16).requires_grad_(True)
    model = _stack("auto")
    first_pool_input = torch.empty(2, 8, 16, 16)
    key = pool_dispatch.shape_class(first_pool_input, (2, 2), (2, 2), (0, 0), backward=True, relu=True)
    assert key == "cpu/nchw/float32/k2x2s2x2p0x0/C8/16x16/batch/relu+fwd+bwd"
    monkeypatch.setattr(pool_dispatch, "TABLE", {})
    assert _fused_ops(model, x) == []
    monkeypatch.setattr(pool_dispatch, "TABLE", {key: True})
    assert len(_fused_ops(model, x)) == 1
    monkeypatch.setattr(pool_dispatch, "TABLE", {key: False})
    assert _fused_ops(model, x) == []


def test_state_dict_names_slicing_and_the_nets():
    fused, plain = _stack("kernel"), _stack("kernel", nn.Sequential)
    assert list(fused.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(fused.state_dict())
    head = fused[:4]
    assert isinstance(head, FusedSequential) and len(head) == 4
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(head(x), F.max_pool2d(F.relu(fused[1](fused[0](x))), 2))
    for name in ("shallow", "deeper"):
        net = build(name, input_size=32, pool_backend="kernel")
        assert isinstance(net.features, FusedSequential)
        assert len(_fused_ops(net, torch.randn(2, 1, 32, 32))) == (3 if name == "shallow" else 4)


def test_a_pool_without_a_relu_before_it_and_a_relu_last_run_as_modules():
    model = FusedSequential(nn.Conv2d(1, 2, 1), SwitchMaxPool2d(2, backend="kernel"), nn.ReLU())
    x = torch.randn(1, 1, 4, 4)
    assert _fused_ops(model, x) == []
    assert torch.equal(model(x), F.relu(F.max_pool2d(model[0](x), 2)))


# ---------------------------------------------------------------------------------------------------------------
# In-place ReLUs that are not fused with a pool: xraydeconv.ops.relu_, whose backward masks the gradient in place


def _relu_nodes(model: nn.Module, x: torch.Tensor) -> int:
    """How many autograd nodes of ``model(x)`` are xraydeconv's in-place ReLU."""
    seen, todo, n = set(), [model(x).grad_fn], 0
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        n += "::Relu>" in fn.name()
        todo += [f for f, _ in fn.next_functions]
    return n


def _relu_stack(backend: str, inplace: bool = True) -> FusedSequential:
    torch.manual_seed(0)
    return FusedSequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=inplace),
                           nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
                           SwitchMaxPool2d(2, backend="kernel"), backend=backend)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_an_unfused_in_place_relu_masks_its_gradient_in_place_with_the_same_numbers(layout):
    x = torch.randn(4, 1, 20, 22).contiguous(memory_format=layout)
    model, native = _relu_stack("kernel"), _relu_stack("native")
    assert _relu_nodes(model, x) == 1 and _relu_nodes(native, x) == 0
    out_k, grads_k = _run(model, x)
    out_n, grads_n = _run(native, x)
    assert torch.equal(out_k, out_n) and all(torch.equal(a, b) for a, b in zip(grads_k, grads_n))


def test_the_in_place_relu_only_runs_where_nothing_can_tell():
    x = torch.randn(2, 1, 8, 8)
    model = _relu_stack("kernel")
    assert _relu_nodes(model, x) == 1
    assert _relu_nodes(_relu_stack("kernel", inplace=False), x) == 0  # an out-of-place ReLU stays one
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:  # no gradient to come: torch's relu_
        assert torch.equal(model(x), _relu_stack("native")(x))
    assert not any(e.name == "xraydeconv::relu_" for e in prof.events())
    handle = model[2].register_forward_hook(lambda m, i, o: None)
    assert _relu_nodes(model, x) == 0
    handle.remove()
    head = model[:3]
    assert head.backend == "kernel" and _relu_nodes(head, x) == 1  # a slice keeps the backend
    with pytest.raises(ValueError, match="backend must be one of"):
        FusedSequential(nn.ReLU(), backend="fast")


def test_auto_runs_the_in_place_relu_only_where_the_table_measured_it(monkeypatch):
    x = torch.randn(2, 1, 16, 16)
    model = _relu_stack("auto")
    key = pool_dispatch.relu_class(torch.empty(2, 8, 16, 16))
    assert key == "cpu/nchw/float32/relu_/C8/16x16/batch/fwd+bwd"
    monkeypatch.setattr(pool_dispatch, "TABLE", {})
    assert _relu_nodes(model, x) == 0
    monkeypatch.setattr(pool_dispatch, "TABLE", {key: True})
    assert _relu_nodes(model, x) == 1
    monkeypatch.setattr(pool_dispatch, "TABLE", {key: False})
    assert _relu_nodes(model, x) == 0


def test_the_deeper_net_masks_its_four_unfused_relus_in_place():
    net = build("deeper", input_size=32, pool_backend="kernel")
    assert net.features.backend == "kernel"
    assert _relu_nodes(net, torch.randn(2, 1, 32, 32)) == 4
    assert _relu_nodes(build("deeper", input_size=32, pool_backend="native"), torch.randn(2, 1, 32, 32)) == 0
