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
        (2, 1, 16, 1, 3, 1, 5, 40, None, (0, 0)),  # gathering, rows wide enough for blocks of 16 outputs
        (1, 1, 32, 2, 3, 1, 6, 37, None, (0, 0)),  # gathering blocks over two 16-channel vectors, 2 outputs
        (2, 1, 80, 32, 3, 1, 5, 7, None, (0, 0)),  # 3 channel blocks (32, 32, 16) of the sliding 3x3 block
        (2, 2, 80, 16, 3, 1, 4, 5, (2, 2), (1, 1)),  # the same under 2x2 windows, odd unpooled size
        (2, 1, 16, 16, 3, 2, 6, 7, None, (0, 0)),  # sliding 3x3 block, padding 2 (a smaller output)
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


@pytest.mark.parametrize("pool", [None, (2, 2)])
def test_sparse_rows_take_one_pass_over_the_channel_blocks(pool):
    # few positive values per row: the sliding block makes one pass over all blocks instead of one per block
    g, sw, weight, out_size, size = _case(2, 1, 96, 32, 3, 1, 6, 7, pool, seed=3)
    g = g - 2.5
    ref = _dense(g, sw, weight, pool, 1, size, 1)
    got = _sparse(g, sw, weight, pool, 1, out_size, 1)
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_output_larger_than_the_reach_is_zero_there():
    # output_size beyond what the input reaches: the sliding block leaves those pixels, the op zero-fills them
    g, _, weight, _, _ = _case(2, 1, 16, 16, 3, 1, 5, 6, None)
    got = ops.relu_scatter_conv_transpose2d(g.permute(0, 2, 3, 1), None, weight.permute(0, 2, 3, 1), 1, 1, (9, 10))
    full = F.conv_transpose2d(F.relu(g), weight)  # no padding: output rows -1 .. 5, columns -1 .. 6
    ref = F.pad(full[:, :, 1:, 1:], (0, 10 - 7, 0, 9 - 6))  # what padding 1 keeps, then zeros out to (9, 10)
    torch.testing.assert_close(got.permute(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:, 6:], torch.zeros_like(got[:, 6:])) and got[:, 5].abs().max() > 0


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


# ---------------------------------------------------------------------------------------------------------------
# The pair: two steps in one pass, the second a gathering one (the transposed first conv)

PAIR = "relu_scatter_conv_transpose2d_pair"
pair_skip = pytest.mark.skipif(not ops.has_kernel(PAIR), reason=f"xraydeconv._C has no {PAIR}")


def _pair_case(P, group, C, Cmid, Cout, h, w, pool, extra, pad2, k2, seed=0):
    """Channels-last inputs of the pair, and its two steps run one after the other as the reference."""
    g, sw, weight, mid, size = _case(P, group, C, Cmid, 3, 1, h, w, pool, extra, seed)
    weight2 = torch.randn(Cmid, Cout, k2, k2, generator=torch.Generator().manual_seed(seed + 1))
    out_size = (mid[0] + k2 - 1 - 2 * pad2, mid[1] + k2 - 1 - 2 * pad2)
    first = _sparse(g, sw, weight, pool, 1, mid, group)
    ref = _sparse(first, None, weight2, None, pad2, out_size, 1)
    g, sw, weight = _hwc(g, sw, weight)
    args = (g, sw, weight, weight2.permute(0, 2, 3, 1).contiguous(), list(pool or (1, 1)), [1, 1], [pad2, pad2],
            list(mid), list(out_size), group)
    return args, ref


PAIR_CASES = [
    (5, 5, 16, 16, 1, 12, 40, (2, 2), (0, 0), 1, 3),  # the deeper net's last two steps: 2x2 unpool, 16 -> 16 -> 1
    (3, 1, 16, 32, 2, 7, 21, (2, 2), (1, 1), 1, 3),  # odd unpooled size, two output channels
    (2, 2, 80, 16, 3, 9, 38, None, (0, 0), 0, 3),  # no unpooling, three channel blocks, no padding below
    (2, 1, 16, 16, 4, 5, 19, (2, 2), (1, 0), 2, 5),  # 5x5 second kernel
    (3, 3, 32, 32, 16, 6, 9, (2, 2), (1, 1), 1, 3),  # a 3x3 second step into 16 channels: the sliding scatter
    (2, 1, 64, 48, 32, 7, 6, None, (0, 0), 1, 3),  # both steps without unpooling, channel blocks in both
    (2, 2, 32, 16, 16, 5, 7, (2, 2), (0, 0), 0, 3),  # sliding second step without padding: a larger output
]


@pair_skip
@pytest.mark.parametrize("case", range(len(PAIR_CASES)))
def test_pair_equals_the_two_steps_bit_for_bit(case):
    args, ref = _pair_case(*PAIR_CASES[case], seed=case)
    got = ops.deconv_scatter.relu_scatter_conv_transpose2d_pair(*args).permute(0, 3, 1, 2)
    assert ref.abs().max() > 0
    assert torch.equal(got, ref)


@pair_skip
def test_pair_opcheck_and_backward():
    args, _ = _pair_case(*PAIR_CASES[1])
    pair_op = getattr(torch.ops.xraydeconv, PAIR).default
    torch.library.opcheck(pair_op, args)
    g = args[0].clone().requires_grad_(True)
    out = pair_op(g, *args[1:])
    with pytest.raises(RuntimeError, match=f"{PAIR} is inference-only"):
        out.sum().backward()


PAIR_BAD = {
    "weight2 filters": (3, lambda a: a[3][:8].contiguous(), "weight2 has 8 filters but weight has 16"),
    "too many outputs": (3, lambda a: torch.rand(16, 3, 3, 5), r"at most 4 output channels, or .*16, 3, 3, 5"),
    "wide second 5x5": (3, lambda a: torch.rand(16, 5, 5, 16), "at most 4 output channels, or be a 3x3 kernel"),
    "first kernel": (2, lambda a: torch.rand(16, 5, 5, 16), "must be a 3x3 kernel"),
    "mid_size beyond reach": (7, lambda a: [a[7][0] + 2, a[7][1]], "mid_size within its reach"),
    "padding2": (6, lambda a: [-1, 1], "padding2 must be a non-negative pair"),
    "mid_size too small": (7, lambda a: [2, 2], r"mid_size .* too small"),
}


@pair_skip
@pytest.mark.parametrize("call", ["wrapper", "op"])
@pytest.mark.parametrize("bad", list(PAIR_BAD))
def test_pair_bad_argument_is_a_value_error_naming_it(bad, call):
    args, _ = _pair_case(2, 1, 16, 16, 1, 6, 7, (2, 2), (0, 0), 1, 3)
    index, make, message = PAIR_BAD[bad]
    args = list(args)
    args[index] = make(args)
    fn = ops.deconv_scatter.relu_scatter_conv_transpose2d_pair if call == "wrapper" else getattr(torch.ops.xraydeconv,
                                                                                                   PAIR)
    with pytest.raises(ValueError, match=message):
        fn(*args)


# ---------------------------------------------------------------------------------------------------------------
# Every instruction-set variant (the AVX-512 one lists with masked compresses and gathers 16 outputs at a time)

_ISA_SCRIPT = """
import torch, sys
sys.path.insert(0, {tests!r})
import test_deconv_scatter as t
worst = 0.0
for case in [(6, 3, 32, 16, 3, 1, 9, 10, (2, 2), (0, 0)), (2, 1, 80, 32, 3, 1, 5, 7, None, (0, 0)),
             (1, 1, 32, 2, 3, 1, 6, 37, None, (0, 0)), (2, 2, 80, 16, 3, 1, 4, 5, (2, 2), (1, 1))]:
    g, sw, w, out_size, size = t._case(*case)
    ref = t._dense(g, sw, w, case[8], case[5], size, case[1])
    got = t._sparse(g, sw, w, case[8], case[5], out_size, case[1])
    worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
for case in range(len(t.PAIR_CASES)):
    args, ref = t._pair_case(*t.PAIR_CASES[case], seed=case)
    got = t.ops.deconv_scatter.relu_scatter_conv_transpose2d_pair(*args).permute(0, 3, 1, 2)
    worst = max(worst, 0.0 if torch.equal(got, ref) else 1.0)
print(worst)
"""


@pair_skip
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_every_instruction_set_variant_agrees(isa):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = _ISA_SCRIPT.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "XRAYDECONV_CPU_ISA": isa, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-6
