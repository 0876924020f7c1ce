"""The sparse deconvnet step ``relu_scatter_conv_transpose2d`` against the dense ops, and its dispatcher registration.

Reference: ``F.conv_transpose2d(relu(unpool(g)))`` with the same weights, the unpooling done by the native twin
``native_switch_unpool2d``. The op is a CPU float32 kernel with no gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xraydeconv import ops

OP = "relu_scatter_conv_transpose2d"
pytestmark = pytest.mark.skipif(not ops.has_kernel(OP, "cpu"), reason="xraydeconv._C is not built")

xop = torch.ops.xraydeconv.relu_scatter_conv_transpose2d


def _case(P, group, C, Cout, k, pad, h, w, pool, extra=(0, 0), seed=0):
    """NCHW inputs of one case: g (P, C, h, w), switches (P / group, C, h, w) or None, weight (C, Cout, k, k).

    The switches come from pooling a random (P / group, C, U, V) tensor, U = h * pool + extra rows (floor mode
    leaves them uncovered); the conv's input plane is what a stride-1 conv with this padding maps onto U x V.
    """
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(P, C, h, w, generator=gen)
    weight = torch.randn(C, Cout, k, k, generator=gen)
    if pool is None:
        sw, size = None, (h, w)
    else:
        size = (h * pool[0] + extra[0], w * pool[1] + extra[1])
        _, sw = ops.switch_pool2d(torch.randn(P // group, C, *size, generator=gen), pool)
    out_size = (size[0] + k - 1 - 2 * pad, size[1] + k - 1 - 2 * pad)
    return g, sw, weight, out_size, size


def _dense(g, sw, weight, pool, pad, size, group):
    x = F.relu(g)
    if sw is not None:
        x = ops.native_switch_unpool2d(x, sw.repeat_interleave(group, 0), pool, pool, 0, size)
    return F.conv_transpose2d(x, weight, None, 1, pad)


def _sparse(g, sw, weight, pool, pad, out_size, group):
    hwc = None if sw is None else sw.permute(0, 2, 3, 1)  # permuted views: the wrapper copies them
    out = ops.relu_scatter_conv_transpose2d(
        g.permute(0, 2, 3, 1), hwc, weight.permute(0, 2, 3, 1), pool or 1, pad, out_size, group
    )
    return out.permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    "P, group, C, Cout, k, pad, h, w, pool, extra",
    [
        (6, 3, 32, 16, 3, 1, 9, 10, (2, 2), (0, 0)),  # 2x2 windows, 3x3 kernel: the 4x4 register-tile path
        (2, 1, 32, 32, 3, 1, 7, 8, (2, 2), (1, 1)),  # odd unpooled size (floor pooling left a row and column)
        (4, 2, 16, 32, 3, 0, 6, 5, (2, 2), (0, 1)),  # 3x3 fast path without padding
        (4, 4, 16, 32, 3, 1, 8, 9, None, (0, 0)),  # ReLU only, 3x3 fast path
        (2, 1, 16, 1, 3, 1, 10, 11, None, (0, 0)),  # one output channel: the gathering path
        (3, 1, 32, 3, 3, 0, 7, 8, None, (0, 0)),  # narrow, no padding
        (4, 2, 12, 24, 3, 1, 6, 7, (2, 2), (0, 0)),  # Cout not a multiple of 16: the generic loop
        (2, 2, 8, 8, 5, 2, 7, 6, (3, 3), (2, 0)),  # 5x5 kernel, 3x3 windows, compile-time Cout = 8
        (2, 1, 16, 16, 3, 1, 5, 6, (2, 3), (1, 2)),  # non-square windows
        (1, 1, 5, 64, 1, 0, 4, 4, (2, 2), (0, 0)),  # 1x1 kernel, Cout = 64
        (3, 3, 7, 5, 3, 1, 6, 4, None, (0, 0)),  # odd channel counts, group = P
    ],
)
def test_equals_dense_unpool_relu_conv_transpose(P, group, C, Cout, k, pad, h, w, pool, extra):
    g, sw, weight, out_size, size = _case(P, group, C, Cout, k, pad, h, w, pool, extra, seed=P * 7 + C)
    ref = _dense(g, sw, weight, pool, pad, size, group)
    got = _sparse(g, sw, weight, pool, pad, out_size, group)
    assert got.shape == ref.shape == (P, Cout, *out_size)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_non_positive_values_add_nothing():
    g, sw, weight, out_size, size = _case(2, 1, 16, 16, 3, 1, 6, 6, (2, 2))
    g = -g.abs()
    g[0, 3, 2, 2] = float("nan")  # NaN is not positive either: the rectification drops it
    got = _sparse(g, sw, weight, (2, 2), 1, out_size, 1)
    assert torch.equal(got, torch.zeros_like(got))


def test_switches_are_shared_by_the_signals_of_a_group():
    # signal p is unpooled with the switches of image p // group: group copies of one signal give equal outputs
    g, sw, weight, out_size, _ = _case(1, 1, 16, 16, 3, 1, 5, 5, (2, 2))
    out = _sparse(g.repeat(3, 1, 1, 1), sw, weight, (2, 2), 1, out_size, 3)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


# ---------------------------------------------------------------------------------------------------------------
# Dispatcher registration: fake kernel, schema, autograd (none: the op is inference-only)


def _hwc(g, sw, weight):
    sw = None if sw is None else sw.permute(0, 2, 3, 1).contiguous()
    return g.permute(0, 2, 3, 1).contiguous(), sw, weight.permute(0, 2, 3, 1).contiguous()


def _opcheck_samples():
    samples = []
    for case, pool, pad, group in [
        ((4, 2, 16, 32, 3, 1, 5, 6, (2, 2)), [2, 2], [1, 1], 2),
        ((2, 1, 16, 1, 3, 1, 6, 6, None), [1, 1], [1, 1], 1),
        ((2, 2, 8, 12, 5, 2, 4, 3, (3, 3)), [3, 3], [2, 2], 2),
    ]:
        g, sw, weight, out_size, _ = _case(*case)
        samples.append((*_hwc(g, sw, weight), pool, pad, list(out_size), group))
    return samples


@pytest.mark.parametrize("sample", range(3))
def test_opcheck(sample):
    args = _opcheck_samples()[sample]
    torch.library.opcheck(xop.default, args)


@pytest.mark.parametrize("sample", range(3))
def test_opcheck_autograd_registration_with_inputs_that_require_grad(sample):
    g, sw, weight, *rest = _opcheck_samples()[sample]
    args = (g.requires_grad_(True), sw, weight.requires_grad_(True), *rest)
    # the autograd kernel is registered (and only raises on backward), so the aot test cannot trace a backward
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(xop.default, args, test_utils=checks)


def test_backward_says_the_op_is_inference_only():
    g, sw, weight, *rest = _opcheck_samples()[0]
    out = xop(g.requires_grad_(True), sw, weight, *rest)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


def test_fake_tensor_shape_and_torch_compile():
    g, sw, weight, out_size, _ = _case(2, 1, 16, 16, 3, 1, 5, 6, (2, 2))
    args = _hwc(g, sw, weight)

    def f(g, sw, weight):
        return ops.relu_scatter_conv_transpose2d(g, sw, weight, 2, 1, out_size) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), f(*args), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Bad arguments: a ValueError naming the argument, from the wrapper and from the op alike


def _good():
    g, sw, weight, out_size, _ = _case(2, 1, 8, 16, 3, 1, 4, 4, (2, 2))
    g, sw, weight = _hwc(g, sw, weight)
    return {"g": g, "switches": sw, "weight": weight, "pool_kernel": [2, 2], "padding": [1, 1],
            "output_size": list(out_size), "group": 1}


BAD = {
    "g dtype": ({"g": lambda a: a["g"].double()}, "g and weight must be float32|g must be float32"),
    "weight dtype": ({"weight": lambda a: a["weight"].half()}, "must be float32"),
    "g dims": ({"g": lambda a: a["g"][0]}, "g must be .*4-D"),
    "weight dims": ({"weight": lambda a: a["weight"][0]}, "weight must be .*4-D"),
    "weight filters": ({"weight": lambda a: a["weight"][:4].contiguous()}, "weight has 4 filters but g has 8"),
    "group not a divisor": ({"group": lambda a: 3}, "group must be a positive divisor of P = 2, got 3"),
    "group zero": ({"group": lambda a: 0}, "group must be a positive divisor"),
    "switches dtype": ({"switches": lambda a: a["switches"].long()}, "switches must be .*uint8"),
    "switches shape": ({"switches": lambda a: a["switches"][:, :2].contiguous()}, r"switches must be .*\(P / group"),
    "pool_kernel": ({"pool_kernel": lambda a: [0, 2]}, "pool_kernel must be positive"),
    "padding": ({"padding": lambda a: [-1, 1]}, "padding must be non-negative"),
    "output_size": ({"output_size": lambda a: [0, 8]}, "output_size must be positive"),
    "output_size too small": ({"output_size": lambda a: [4, 4]}, r"output_size \(?\[?4, 4.* too small"),
}


@pytest.mark.parametrize("call", ["wrapper", "op"])
@pytest.mark.parametrize("bad", list(BAD))
def test_bad_argument_is_a_value_error_naming_it(bad, call):
    args = _good()
    changes, message = BAD[bad]
    for name, make in changes.items():
        args[name] = make(args)
    fn = ops.relu_scatter_conv_transpose2d if call == "wrapper" else xop
    with pytest.raises(ValueError, match=message):
        fn(*args.values())


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("pool_kernel", [2], "pool_kernel must be"),
        ("padding", [1, 1, 1], "padding must be"),
        ("output_size", [8], "output_size must be"),
    ],
)
def test_op_rejects_lists_that_are_not_pairs(name, value, message):
    args = _good()
    args[name] = value
    with pytest.raises(ValueError, match=message):
        xop(*args.values())


def test_op_rejects_non_contiguous_tensors():
    args = _good()
    g = args["g"]
    with pytest.raises(ValueError, match="g must be a contiguous"):
        xop(g.transpose(1, 2), *list(args.values())[1:])
    # the wrapper copies a permuted view instead
    ref = ops.relu_scatter_conv_transpose2d(*args.values())
    args["g"] = g.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(ops.relu_scatter_conv_transpose2d(*args.values()), ref)
