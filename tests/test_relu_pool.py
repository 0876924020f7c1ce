"""``switch_relu_pool2d``: max pooling of ``relu(x)`` in one op, against ReLU then pooling.

Values and switches must equal ``switch_pool2d(torch.relu(x))`` (and so ``F.max_pool2d(F.relu(x))``) everywhere,
ties, signed zeros and NaN included; the gradient must equal that of ``F.max_pool2d(F.relu(x))`` bit for bit.
Device-parametrised like tests/test_ops.py: the CUDA cases are skipped without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
import torch.nn.functional as F

from xraydeconv import ops
from xraydeconv.ops.geometry import memory_format

pytestmark = pytest.mark.skipif(not ops.has_kernels("cpu"), reason="xraydeconv._C is not built")

CUDA_REASON = None if torch.cuda.is_available() and ops.has_kernels("cuda") else "no CUDA device with the kernels"
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(CUDA_REASON is not None,
                                                                                         reason=CUDA_REASON or "")])]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
GEOMETRIES = [
    # (shape, kernel, stride, padding, ceil_mode)
    ((2, 16, 32, 32), (2, 2), (2, 2), (0, 0), False),  # the nets' 2x2/s2: vectorised paths
    ((3, 8, 16, 40), (2, 2), (2, 2), (0, 0), True),
    ((2, 5, 7, 9), (2, 2), (2, 2), (0, 0), True),  # clipped last windows
    ((2, 8, 33, 31), (3, 3), (2, 2), (1, 1), False),  # ResNet's stem pool: padding, overlapping windows
    ((1, 4, 14, 14), (3, 3), (2, 2), (1, 1), True),
    ((2, 4, 9, 12), (2, 3), (1, 2), (1, 1), True),  # asymmetric, first positions inside the padding differ
    ((1, 64, 6, 8), (2, 2), (2, 2), (0, 0), False),  # wide channels-last blocks
    ((4, 9, 12), (3, 3), (2, 2), (1, 1), False),  # C, H, W
]


def _input(shape, dtype, layout, values, seed, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if values == "ties":  # all-negative windows, +0 and -0 maxima, equal positive maxima
        x = torch.randint(-3, 2, shape, generator=g).double()
        x[torch.rand(shape, generator=g) < 0.3] = -0.0
    elif values == "nan":
        x[torch.rand(shape, generator=g) < 0.1] = float("nan")
    elif values == "negative":
        x = -x.abs()
    x = x.to(dtype).to(device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" and x.dim() == 4 else x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("values", ["normal", "ties", "nan", "negative"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}-k{g[1]}-s{g[2]}-p{g[3]}-{g[4]}")
def test_equals_relu_then_pool(geometry, dtype, layout, values, device):
    shape, k, s, p, ceil_mode = geometry
    seed = zlib.crc32(repr((geometry, dtype, layout, values)).encode())
    x = _input(shape, dtype, layout, values, seed, device)
    out, sw = ops.switch_relu_pool2d(x, k, s, p, ceil_mode)
    ref, ref_sw = ops.switch_pool2d(torch.relu(x), k, s, p, ceil_mode)
    assert _same(out, ref) and torch.equal(sw, ref_sw)
    assert out.dtype == x.dtype and out.is_contiguous(memory_format=memory_format(x))
    assert not bool((out < 0).any())
    if values != "nan":  # max_pool2d picks another NaN than the kernels (documented); elsewhere the positions agree
        native, idx = F.max_pool2d(torch.relu(x).float(), k, s, p, ceil_mode=ceil_mode, return_indices=True)
        assert torch.equal(out.float(), native)
        assert torch.equal(ops.switches_to_indices(sw, k, s, p, x.shape[-2:]), idx)
    twin_out, twin_sw = ops.native_switch_relu_pool2d(x, k, s, p, ceil_mode)
    assert _same(twin_out, out) and (values == "nan" or torch.equal(twin_sw, sw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("values", ["normal", "ties", "negative"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}-k{g[1]}-s{g[2]}-p{g[3]}-{g[4]}")
def test_gradient_equals_relu_then_max_pool(geometry, dtype, layout, values, device):
    shape, k, s, p, ceil_mode = geometry
    seed = zlib.crc32(repr((geometry, dtype, layout, values, "grad")).encode())
    x = _input(shape, dtype, layout, values, seed, device)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = ops.switch_relu_pool2d(a, k, s, p, ceil_mode)[0]
    ref = F.max_pool2d(F.relu(b), k, s, p, ceil_mode=ceil_mode)
    g = torch.randn(out.shape, dtype=dtype, device=device)
    (ga,) = torch.autograd.grad(out, a, g)
    (gb,) = torch.autograd.grad(ref, b, g)
    assert torch.equal(ga, gb)
    assert "SwitchReluPool2d" in out.grad_fn.name()


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_with_nan_follows_the_kernels_switches(device):
    x = _input((2, 3, 8, 10), torch.float32, "channels_last", "nan", 5, device)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = ops.switch_relu_pool2d(a, 2, 2)[0]
    ref = ops.switch_pool2d(torch.relu(b), 2, 2)[0]
    g = torch.randn(out.shape, device=device)
    assert _same(torch.autograd.grad(out, a, g)[0], torch.autograd.grad(ref, b, g)[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geometry", [((2, 2), (2, 2), (0, 0), False), ((3, 3), (2, 2), (1, 1), True)])
def test_gradcheck_and_opcheck(device, geometry):
    k, s, p, c = geometry
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64, device=device)
    x = (x + 0.05 * x.sign()).requires_grad_(True)  # away from the kink at 0

    def fused(t):
        return ops.switch_relu_pool2d(t, k, s, p, c)[0]

    assert torch.autograd.gradcheck(fused, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(fused, (x,), fast_mode=True)
    torch.library.opcheck(torch.ops.xraydeconv.switch_relu_pool2d.default, (x, list(k), list(s), list(p), c))


def test_torch_compile_fullgraph_traces_the_op():
    def f(x):
        out, sw = ops.switch_relu_pool2d(x * 2, 2, 2)
        return out.sum() + sw.float().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for shape in [(2, 3, 12, 12), (1, 4, 16, 10)]:
        x = torch.randn(shape, requires_grad=True)
        ref, got = f(x), compiled(x)
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(ref, x)[0])


def test_every_cpu_instruction_set_variant_and_thread_count():
    script = textwrap.dedent(
        """
        import torch
        from xraydeconv import ops
        torch.manual_seed(0)
        for shape in [(2, 16, 32, 32), (1, 5, 17, 71), (2, 8, 16, 34), (1, 128, 6, 8)]:
            for k, s, p, c in [(2, 2, 0, False), (2, 2, 0, True), (3, 2, 1, True)]:
                for cl in (False, True):
                    x = torch.randn(shape)
                    x[x < -1.0] = -0.0
                    x = x.contiguous(memory_format=torch.channels_last) if cl else x
                    out, sw = ops.switch_relu_pool2d(x, k, s, p, c)
                    ref, ref_sw = ops.switch_pool2d(torch.relu(x), k, s, p, c)
                    assert torch.equal(out, ref) and torch.equal(sw, ref_sw), (shape, k, s, p, c, cl)
        print("ok")
        """
    )
    for isa, threads in (("baseline", "1"), ("avx2", "1"), ("auto", "2")):
        env = {**os.environ, "XRAYDECONV_CPU_ISA": isa, "OMP_NUM_THREADS": threads}
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and run.stdout.strip() == "ok", f"{isa}: {run.stderr[-2000:]}"


def test_a_bad_input_is_the_pool_ops_error():
    with pytest.raises(ValueError, match="switch_relu_pool2d"):
        ops.switch_relu_pool2d(torch.zeros(2, 3), 2, 2)
    with pytest.raises((ValueError, RuntimeError), match="switch_relu_pool2d"):
        torch.ops.xraydeconv.switch_relu_pool2d(torch.zeros(1, 1, 4, 4), [0, 2], [2, 2], [0, 0], False)
