"""The switch-pooling ops against PyTorch's own max pooling: values, switches, adjoint, autograd, errors.

Device-parametrised: every test that can runs on the CPU and on CUDA; the CUDA cases are skipped (with the
reason) without a GPU or when ``xraydeconv._C`` was built without CUDA kernels. References:
``F.max_pool2d(..., return_indices=True)`` for values and positions, a float64 scatter-add for the adjoint
(unpool), the pooled values for the gather.
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xraydeconv import ops
from xraydeconv.ops.geometry import memory_format

pytestmark = pytest.mark.skipif(not ops.has_kernels("cpu"), reason="xraydeconv._C is not built")

xops = torch.ops.xraydeconv


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not ops.has_kernels("cuda"):
        return "xraydeconv._C was built without CUDA kernels (torch without CUDA or no nvcc at build time)"
    return None


CUDA_REASON = _cuda_skip_reason()
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(CUDA_REASON is not None, reason=CUDA_REASON or "")]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA_MARKS)]
cuda_only = pytest.mark.parametrize("device", [pytest.param("cuda", id="cuda", marks=CUDA_MARKS)])

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------------------------
# References


def _first_nan_indices(x: torch.Tensor, k, s, p, ceil_mode) -> torch.Tensor:
    """For each window: the flat index of its first NaN in row-major order (garbage where there is none)."""
    h, w = x.shape[-2:]
    pos = torch.arange(h * w, device=x.device, dtype=torch.float64).view(h, w)
    z = torch.where(torch.isnan(x), 1e9 - pos, torch.full_like(pos, -1.0))
    return F.max_pool2d(z, k, s, p, ceil_mode=ceil_mode, return_indices=True)[1]


def _reference_unpool(y: torch.Tensor, sw: torch.Tensor, k, s, p, size) -> torch.Tensor:
    """The adjoint by definition: float64 scatter-add of y at the switch positions."""
    idx = ops.switches_to_indices(sw, k, s, p, size)
    flat = torch.zeros((*y.shape[:-2], size[0] * size[1]), dtype=torch.float64, device=y.device)
    flat.scatter_add_(-1, idx.reshape(*idx.shape[:-2], -1), y.double().reshape(*y.shape[:-2], -1))
    return flat.view(*y.shape[:-2], *size)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-contiguous view: every other column of a wider tensor
        wide = torch.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def _tol(dtype: torch.dtype) -> dict:
    return {
        torch.float16: {"rtol": 2e-3, "atol": 2e-3},
        torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
    }.get(dtype, {"rtol": 1e-6, "atol": 1e-6})


def _pairs(k, s, p):
    k = (k, k) if isinstance(k, int) else tuple(k)
    s = k if s is None else ((s, s) if isinstance(s, int) else tuple(s))
    p = (p, p) if isinstance(p, int) else tuple(p)
    return k, s, p


def _check_pool(x: torch.Tensor, k, s, p, ceil_mode: bool):
    """switch_pool2d and switch_pool2d_out against F.max_pool2d; returns (out, switches, their flat indices)."""
    out, sw = ops.switch_pool2d(x, k, s, p, ceil_mode)
    ref, idx = F.max_pool2d(x, k, s, p, ceil_mode=ceil_mode, return_indices=True)
    assert out.shape == ref.shape and sw.shape == ref.shape and sw.dtype == torch.uint8
    assert out.dtype == x.dtype and out.device == x.device
    fmt = torch.channels_last if memory_format(x) == torch.channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and sw.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    # positions agree in every window without NaN; with NaN, the switch names the window's first NaN
    has_nan = F.max_pool2d(x.isnan().double(), k, s, p, ceil_mode=ceil_mode) > 0
    mine = ops.switches_to_indices(sw, k, s, p, x.shape[-2:])
    assert torch.equal(mine, torch.where(has_nan, _first_nan_indices(x, k, s, p, ceil_mode), idx))
    assert int(sw.max()) < k[0] * k[1] if sw.numel() else True
    if x.device.type != "cpu":  # the CPU kernels agree
        cpu_out, cpu_sw = ops.switch_pool2d(x.cpu(), k, s, p, ceil_mode)
        torch.testing.assert_close(cpu_out, out.cpu(), rtol=0, atol=0, equal_nan=True)
        assert torch.equal(cpu_sw, sw.cpu())
    # into poisoned buffers: every element written
    out2, sw2 = torch.full_like(out, float("nan")), torch.full_like(sw, 250)
    ops.switch_pool2d_out(x, out2, sw2, k, s, p, ceil_mode)
    torch.testing.assert_close(out2, out, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(sw2, sw)
    return out, sw, idx, has_nan


def _check_unpool(x, out, sw, idx, has_nan, k, s, p, ceil_mode: bool) -> None:
    """switch_unpool2d(_out) against the scatter-add definition, max_unpool2d and max-pool's gradient."""
    y = torch.randn(out.shape, dtype=torch.float64, device=x.device).to(x.dtype)
    y = y.contiguous(memory_format=torch.channels_last) if memory_format(out) == torch.channels_last else y
    size = tuple(x.shape[-2:])
    un = ops.switch_unpool2d(y, sw, k, s, p, size)
    assert un.shape == x.shape and un.dtype == x.dtype
    ref_un = _reference_unpool(y, sw, k, s, p, size)
    if s[0] < k[0] or s[1] < k[1]:  # overlapping windows sum several values
        torch.testing.assert_close(un.double(), ref_un, **_tol(x.dtype))
    else:
        assert torch.equal(un, ref_un.to(x.dtype))
        if not bool(has_nan.any()) and x.dim() == 4 and x.numel():
            assert torch.equal(un, F.max_unpool2d(y, idx, k, s, p, output_size=size))
    # y in the other layout than the switches, and into a poisoned buffer
    torch.testing.assert_close(ops.switch_unpool2d(y.contiguous(), sw, k, s, p, size), un, rtol=0, atol=0)
    un2 = torch.full_like(un, float("nan"))
    ops.switch_unpool2d_out(y, sw, un2, k, s, p)
    assert torch.equal(un2, un)
    if not bool(has_nan.any()):
        x64 = x.double().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.max_pool2d(x64, k, s, p, ceil_mode=ceil_mode), x64, y.double())
        torch.testing.assert_close(un.double(), grad, **_tol(x.dtype))


def check_against_native(x: torch.Tensor, k, s=None, p=0, ceil_mode: bool = False) -> None:
    """Values, switches, out variants, unpool and gather of the kernels against F.max_pool2d on the same input."""
    k, s, p = _pairs(k, s, p)
    out, sw, idx, has_nan = _check_pool(x, k, s, p, ceil_mode)
    _check_unpool(x, out, sw, idx, has_nan, k, s, p, ceil_mode)
    # gather reads the pooled values back
    torch.testing.assert_close(ops.switch_gather2d(x, sw, k, s, p), out, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# Equality with native: random cases, a grid of geometries, dtypes, layouts, ties and NaN, and corner values


@st.composite
def pooling_case(draw):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    ceil_mode = draw(st.booleans())
    h = draw(st.integers(max(1, kh - 2 * ph), 24))
    w = draw(st.integers(max(1, kw - 2 * pw), 24))
    batch = draw(st.sampled_from([None, 1, 2, 3]))
    c = draw(st.integers(1, 9))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "strided"]))
    values = draw(st.sampled_from(["normal", "ties", "nan", "inf"]))
    seed = draw(st.integers(0, 2**31 - 1))
    shape = (c, h, w) if batch is None else (batch, c, h, w)
    return shape, (kh, kw), (sh, sw), (ph, pw), ceil_mode, dtype, layout, values, seed


def _make(shape, dtype, layout, values, seed, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if values == "ties":  # few distinct values: many equal maxima per window
        x = torch.randint(-2, 3, shape, generator=g).double()
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    if values in ("nan", "inf"):
        spots = torch.rand(shape, generator=g) < 0.1
        x[spots] = float("nan") if values == "nan" else float("-inf")
    return _layout(x.to(dtype).to(device), layout)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=pooling_case())
def test_matches_native_on_random_cases(device, case):
    shape, k, s, p, ceil_mode, dtype, layout, values, seed = case
    check_against_native(_make(shape, dtype, layout, values, seed, device), k, s, p, ceil_mode)


CONFIGS = [
    # (shape, kernel, stride, padding, ceil_mode)
    ((2, 16, 32, 32), 2, 2, 0, False),  # vectorised 2x2 paths (NCHW rows, NHWC channels)
    ((3, 24, 16, 40), 2, 2, 0, True),  # exact tiling in ceil mode: still the vectorised path
    ((1, 3, 15, 17), 2, 2, 0, False),  # odd sizes: generic path, uncovered last row/column
    ((2, 5, 7, 9), 2, 2, 0, True),  # ceil_mode: clipped last windows
    ((2, 8, 33, 31), 3, 2, 1, False),  # overlapping windows with padding
    ((1, 4, 14, 14), 3, 2, 0, True),
    ((2, 3, 10, 11), 3, 3, 1, False),
    ((2, 4, 9, 12), (2, 3), (1, 2), (1, 1), False),  # asymmetric
    ((2, 3, 5, 5), 1, 1, 0, False),
    ((1, 2, 40, 41), (15, 17), (5, 6), (7, 8), True),  # 255 positions, the most a uint8 switch holds
    ((16, 20, 20), 2, 2, 0, False),  # C, H, W
    ((4, 9, 12), 3, 2, 1, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("values", ["normal", "ties", "nan"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}-k{c[1]}-s{c[2]}-p{c[3]}-{'ceil' if c[4] else 'floor'}")
def test_matches_native_on_a_grid(cfg, dtype, layout, values, device):
    shape, k, s, p, ceil_mode = cfg
    if layout == "channels_last" and len(shape) == 3:
        pytest.skip("channels_last needs 4 dims")
    seed = zlib.crc32(repr((cfg, dtype, layout, values)).encode())
    check_against_native(_make(shape, dtype, layout, values, seed, device), k, s, p, ceil_mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("geometry", [(2, 2, 0, False), (2, 2, 0, True), (3, 2, 0, False), (3, 2, 1, True)])
def test_every_row_length_of_the_fast_paths(device, layout, geometry):
    # the vectorised rows have 16/32/64-wide bodies and masked or scalar tails: cover widths 1..70
    k, s, p, ceil_mode = geometry
    for w in range(max(1, k - 2 * p), 71):
        x = _layout(torch.randn(2, 3, 5, w, dtype=torch.float64).float().to(device), layout)
        check_against_native(x, k, s, p, ceil_mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3, 4, 6, 8, 12, 16, 24, 32, 40, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_channels_last_channel_counts(device, channels, dtype):
    # C below, at and between the channel vector widths: every channels-last kernel and its tails
    gen = torch.Generator().manual_seed(channels)
    x = torch.randn(2, channels, 12, 14, generator=gen).to(dtype).to(device)
    for geometry in [(2, 2, 0, False), (2, 2, 0, True), (3, 2, 1, False)]:
        check_against_native(x.contiguous(memory_format=torch.channels_last), *geometry)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_realistic_feature_map(device, dtype):
    x = torch.randn(2, 64, 64, 64, dtype=dtype, device=device)
    check_against_native(x, 2, 2, 0, False)
    check_against_native(x.contiguous(memory_format=torch.channels_last), 3, 2, 1, False)


@pytest.mark.parametrize("device", DEVICES)
def test_misaligned_views_take_the_generic_path(device):
    # a view starting one element into its storage cannot use aligned vector loads
    base = torch.randn(2 * 8 * 16 * 16 + 1, device=device)
    check_against_native(base[1:].view(2, 8, 16, 16), 2, 2, 0, False)


@pytest.mark.parametrize("device", DEVICES)
def test_denormals_win_over_zero(device):
    # the CUDA build uses --use_fast_math (flush-to-zero): the kernels must still order denormals
    tiny = torch.finfo(torch.float32).tiny / 4  # a float32 denormal
    x = torch.zeros(1, 1, 4, 4, device=device)
    x[0, 0, 1, 1] = tiny
    x[0, 0, 2, 3] = -tiny
    out, sw = ops.switch_pool2d(x, 2)
    assert out[0, 0, 0, 0].item() == tiny and sw[0, 0, 0, 0].item() == 3
    assert sw[0, 0, 1, 1].item() == 0  # -tiny < 0 == 0: the first zero stays
    assert ops.switch_unpool2d(out, sw, 2, output_size=(4, 4))[0, 0, 1, 1].item() == tiny


@pytest.mark.parametrize("device", DEVICES)
def test_negative_zero_ties_keep_the_first(device):
    x = torch.tensor([[[[-0.0, 0.0], [0.0, -0.0]]]], device=device)
    assert ops.switch_pool2d(x, 2)[1].item() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_infinities(device):
    x = torch.full((1, 1, 4, 4), float("-inf"), device=device)
    x[0, 0, 3, 3] = float("inf")
    out, sw = ops.switch_pool2d(x, 2)
    assert out[0, 0, 0, 0].item() == float("-inf") and sw[0, 0, 0, 0].item() == 0
    assert out[0, 0, 1, 1].item() == float("inf") and sw[0, 0, 1, 1].item() == 3


@pytest.mark.parametrize("device", DEVICES)
def test_results_do_not_depend_on_thread_count(device):
    x = torch.randn(4, 16, 33, 47, device=device)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.switch_pool2d(x, 3, 2, 1, True)
        u1 = ops.switch_unpool2d(one[0], one[1], 3, 2, 1, x.shape[-2:])
        torch.set_num_threads(2)
        two = ops.switch_pool2d(x, 3, 2, 1, True)
        u2 = ops.switch_unpool2d(two[0], two[1], 3, 2, 1, x.shape[-2:])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]) and torch.equal(u1, u2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_unpool_is_deterministic_with_overlapping_windows(device, channels_last):
    # on the GPU, large enough for many blocks to add into the same pixels
    n, c, size = (8, 64, 65) if device == "cuda" else (4, 32, 33)
    x = torch.randn(n, c, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out, sw = ops.switch_pool2d(x, 3, 2, 1)
    y = torch.randn_like(out)
    first = ops.switch_unpool2d(y, sw, 3, 2, 1, (size, size))
    for _ in range(3):
        again = ops.switch_unpool2d(y, sw, 3, 2, 1, (size, size))
        # bitwise: compare the raw 32-bit patterns
        assert torch.equal(first.contiguous().view(torch.int32), again.contiguous().view(torch.int32))


def test_every_cpu_instruction_set_variant():
    # the hot loops are compiled for baseline x86-64, AVX2 and AVX-512 and picked at run time
    script = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        from xraydeconv import ops
        torch.manual_seed(0)
        for shape in [(2, 3, 32, 32), (1, 5, 17, 71), (2, 3, 8, 130), (2, 8, 16, 34), (1, 16, 12, 66), (1, 128, 6, 8)]:
            for k, s, p, c in [(2, 2, 0, False), (2, 2, 0, True), (3, 2, 1, True), (3, 3, 0, False)]:
                for cl in (False, True):
                    x = torch.randn(shape)
                    x[0, 0, 0, :3] = float("nan")
                    if cl:
                        x = x.contiguous(memory_format=torch.channels_last)
                    out, sw = ops.switch_pool2d(x, k, s, p, c)
                    ref, idx = F.max_pool2d(x, k, s, p, ceil_mode=c, return_indices=True)
                    assert torch.equal(out.nan_to_num(7.0), ref.nan_to_num(7.0))
                    clean = F.max_pool2d(x.isnan().float(), k, s, p, ceil_mode=c) == 0
                    mine = ops.switches_to_indices(sw, k, s, p, x.shape[-2:])
                    assert torch.equal(mine[clean], idx[clean])
                    _, first_nan = F.max_pool2d(x.isnan().float(), k, s, p, ceil_mode=c, return_indices=True)
                    assert torch.equal(mine[~clean], first_nan[~clean])
                    y = torch.randn(out.shape)
                    un = ops.switch_unpool2d(y, sw, k, s, p, x.shape[-2:])
                    ref_un = ops.native_switch_unpool2d(y, sw, k, s, p, x.shape[-2:])
                    assert torch.allclose(un, ref_un, atol=1e-6), (shape, k, s, p, c, cl)
                    assert torch.equal(ops.switch_gather2d(x, sw, k, s, p).nan_to_num(7.0), out.nan_to_num(7.0))
        print("ok")
        """
    )
    for isa in ("baseline", "avx2"):
        env = {**os.environ, "XRAYDECONV_CPU_ISA": isa, "OMP_NUM_THREADS": "1"}
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and run.stdout.strip() == "ok", f"{isa}: {run.stderr[-2000:]}"


@cuda_only
def test_64bit_indexing(device):
    # more than 2^31 elements: the kernels switch to 64-bit index arithmetic; the planes at both ends
    # are compared with native pooling run on just those planes
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    for channels_last in (False, True):
        x = torch.randn(2**31 // (4 * 128 * 128) + 1, 4, 128, 128, device=device, dtype=torch.bfloat16)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        assert x.numel() > 2**31
        out, sw = ops.switch_pool2d(x, 2)
        un = ops.switch_unpool2d(out, sw, 2, output_size=(128, 128))
        for part in (slice(0, 2), slice(-2, None)):
            ref, ref_idx = F.max_pool2d(x[part], 2, 2, return_indices=True)
            assert torch.equal(out[part], ref)
            assert torch.equal(ops.switches_to_indices(sw[part], 2, 2, 0, (128, 128)), ref_idx)
            assert torch.equal(un[part], F.max_unpool2d(ref, ref_idx, 2, 2))
        del x, out, sw, un
        torch.cuda.empty_cache()


@cuda_only
def test_runs_on_the_current_stream(device):
    src = torch.randn(16, 64, 128, 128, device=device)
    ref_out, ref_sw = ops.switch_pool2d(src, 2)
    ref_un = ops.switch_unpool2d(ref_out, ref_sw, 2, output_size=(128, 128))
    x = torch.zeros_like(src)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        # the copy lands only after the sleep: an op on another stream would read zeros
        torch.cuda._sleep(50_000_000)
        x.copy_(src)
        out, sw = ops.switch_pool2d(x, 2)
        un = ops.switch_unpool2d(out, sw, 2, output_size=(128, 128))
        g = ops.switch_gather2d(x, sw, 2)
    side.synchronize()
    assert torch.equal(out, ref_out) and torch.equal(sw, ref_sw)
    assert torch.equal(un, ref_un)
    assert torch.equal(g, ref_out)


@cuda_only
def test_non_default_device_index(device):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = torch.randn(2, 3, 8, 8, device="cuda:1")
    out, sw = ops.switch_pool2d(x, 2)
    assert out.device == x.device and sw.device == x.device
    assert torch.equal(out, F.max_pool2d(x, 2))


# ---------------------------------------------------------------------------------------------------------------
# Conversions and the native twins


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geometry", [(2, 2, 0, False), (3, 2, 1, True), (3, 1, 1, False), (2, 3, 0, True)])
def test_native_twins_agree_with_the_kernels(device, geometry):
    k, s, p, ceil_mode = geometry
    x = torch.randn(2, 4, 13, 11, dtype=torch.float64, device=device)
    out, sw = ops.switch_pool2d(x, k, s, p, ceil_mode)
    n_out, n_sw = ops.native_switch_pool2d(x, k, s, p, ceil_mode)
    assert torch.equal(out, n_out) and torch.equal(sw, n_sw)
    y = torch.randn_like(out)
    torch.testing.assert_close(
        ops.switch_unpool2d(y, sw, k, s, p, x.shape[-2:]), ops.native_switch_unpool2d(y, sw, k, s, p, x.shape[-2:])
    )
    assert torch.equal(ops.switch_gather2d(x, sw, k, s, p), ops.native_switch_gather2d(x, sw, k, s, p))
    idx = ops.switches_to_indices(sw, k, s, p, x.shape[-2:])
    assert idx.dtype == torch.int64
    assert torch.equal(ops.indices_to_switches(idx, k, s, p, x.shape[-2:]), sw)


def test_switches_take_one_byte_per_output():
    x = torch.randn(2, 8, 32, 32)
    _, sw = ops.switch_pool2d(x, 2, 2)
    _, idx = F.max_pool2d(x, 2, 2, return_indices=True)
    assert sw.element_size() * sw.numel() * 8 == idx.element_size() * idx.numel()


@pytest.mark.parametrize("device", DEVICES)
def test_memory_format_follows_the_input(device):
    x = torch.randn(2, 8, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    out, sw = ops.switch_pool2d(x, 2, 2)
    assert out.is_contiguous(memory_format=torch.channels_last) and sw.is_contiguous(memory_format=torch.channels_last)
    un = ops.switch_unpool2d(out, sw, 2, 2, 0, (16, 16))
    assert un.is_contiguous(memory_format=torch.channels_last)
    out3, sw3 = ops.switch_pool2d(torch.randn(8, 16, 16, device=device), 2)
    assert out3.shape == (8, 8, 8) and sw3.shape == (8, 8, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_out_variants_write_into_the_given_buffers(device):
    x = torch.randn(2, 3, 10, 12, device=device)
    out = torch.full((2, 3, 5, 6), 99.0, device=device)
    sw = torch.full((2, 3, 5, 6), 99, dtype=torch.uint8, device=device)
    ops.switch_pool2d_out(x, out, sw, 2)
    ref, ref_sw = ops.switch_pool2d(x, 2)
    assert torch.equal(out, ref) and torch.equal(sw, ref_sw)
    un = torch.full_like(x, 99.0)
    ops.switch_unpool2d_out(ref, ref_sw, un, 2)
    assert torch.equal(un, ops.switch_unpool2d(ref, ref_sw, 2, output_size=(10, 12)))
    with pytest.raises(ValueError, match="out must have shape"):
        ops.switch_pool2d_out(x, out[:, :, :4], sw[:, :, :4], 2)


@pytest.mark.parametrize("device", DEVICES)
def test_default_output_size_and_empty_batches(device):
    x = torch.randn(1, 2, 8, 8, device=device)
    out, sw = ops.switch_pool2d(x, 2)
    assert ops.switch_unpool2d(out, sw, 2).shape == x.shape
    empty = torch.randn(0, 3, 8, 8, device=device)
    e_out, e_sw = ops.switch_pool2d(empty, 2)
    assert e_out.shape == (0, 3, 4, 4) and e_sw.shape == (0, 3, 4, 4)
    assert ops.switch_unpool2d(e_out, e_sw, 2, output_size=(8, 8)).shape == (0, 3, 8, 8)


# ---------------------------------------------------------------------------------------------------------------
# Which kernels the build has


def test_has_kernel_answers_for_every_op_and_device():
    for op in ops.OPS:
        assert ops.has_kernel(op, "cpu") and ops.has_kernel(op, torch.device("cpu"))
        assert ops.has_kernel(op, "meta") is False
        assert ops.has_kernel(op, "cuda:0") == ops.has_kernel(op, torch.device("cuda", 0)) == ops.has_kernel(op, "cuda")
    # the sparse deconvnet step is a CPU kernel only; the pooling family has CUDA kernels when built with nvcc
    assert not ops.has_kernel("relu_scatter_conv_transpose2d", "cuda")
    assert not ops.has_kernel("relu_scatter_conv_transpose2d_pair", "cuda")
    assert not ops.has_kernel("batch_norm_relu", "cuda") and not ops.has_kernel("batch_norm_relu_pool2d", "cuda")
    pooling = {ops.has_kernel(op, "cuda") for op in ("switch_pool2d", "switch_unpool2d", "switch_gather2d")}
    assert pooling == {ops.has_kernels("cuda")}
    assert ops.has_kernels("cpu")
    assert ops.has_kernel("relu_", "cuda")  # torch's relu_ forward, registered once for every backend


def test_has_kernel_rejects_an_unknown_op():
    with pytest.raises(ValueError, match="op 'max_pool2d': use one of switch_pool2d"):
        ops.has_kernel("max_pool2d")


def test_a_missing_kernel_says_so():
    with pytest.raises(RuntimeError, match="no meta kernel of relu_scatter_conv_transpose2d"):
        ops.relu_scatter_conv_transpose2d(
            torch.zeros(1, 2, 2, 4, device="meta"), None, torch.zeros(4, 1, 1, 4, device="meta"), 1, 0, (2, 2)
        )


def _without_extension(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter where ``import xraydeconv._C`` fails, as in a tree that was not built."""
    script = "import sys\nsys.modules['xraydeconv._C'] = None\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_missing_extension_says_how_to_build():
    run = _without_extension(
        """
        import torch
        from xraydeconv import ops
        assert not any(ops.has_kernel(op, dev) for op in ops.OPS for dev in ("cpu", "cuda"))
        try:
            ops.switch_pool2d(torch.randn(1, 1, 4, 4), 2)
        except RuntimeError as e:
            print(e)
        """
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "pip install --no-build-isolation -e ." in run.stdout and "xraydeconv._C" in run.stdout


# ---------------------------------------------------------------------------------------------------------------
# Dispatcher registration, autograd, torch.compile


def _opcheck_samples(device):
    x = torch.randn(2, 3, 9, 10, device=device)
    x8 = torch.randn(2, 8, 12, 12, device=device)
    cases = []
    for xin, (k, s, p, c) in [
        (x, (2, 2, 0, False)),
        (x.contiguous(memory_format=torch.channels_last), (3, 2, 1, True)),
        (x8.contiguous(memory_format=torch.channels_last), (3, 2, 1, False)),
        (x8, (3, 2, 1, False)),
        (x[0], (2, 1, 1, False)),
    ]:
        kk, ss, pp = [k, k], [s, s], [p, p]
        out, sw = xops.switch_pool2d(xin, kk, ss, pp, c)
        size = list(xin.shape[-2:])
        cases.append((xops.switch_pool2d.default, (xin.detach().requires_grad_(True), kk, ss, pp, c)))
        cases.append(
            (xops.switch_pool2d_out.default, (xin, kk, ss, pp, c, torch.empty_like(out), torch.empty_like(sw)))
        )
        cases.append((xops.switch_unpool2d.default, (out.detach().requires_grad_(True), sw, kk, ss, pp, size)))
        cases.append((xops.switch_unpool2d_out.default, (out, sw, kk, ss, pp, torch.empty_like(xin))))
        cases.append((xops.switch_gather2d.default, (xin.detach().requires_grad_(True), sw, kk, ss, pp)))
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geometry", [(2, 2, 0, False), (3, 2, 1, True), (3, 2, 1, False), (2, 1, 0, False)])
def test_gradcheck_in_float64(device, geometry):
    k, s, p, c = geometry
    x = torch.randn(1, 2, 5, 7, dtype=torch.float64, device=device, requires_grad=True)
    _, sw = ops.switch_pool2d(x.detach(), k, s, p, c)
    y = torch.randn(sw.shape, dtype=torch.float64, device=device, requires_grad=True)

    def pool(t):
        return ops.switch_pool2d(t, k, s, p, c)[0]

    def unpool(t):
        return ops.switch_unpool2d(t, sw, k, s, p, x.shape[-2:])

    def gather(t):
        return ops.switch_gather2d(t, sw, k, s, p)

    for fn, arg in ((pool, x), (unpool, y), (gather, x)):
        assert torch.autograd.gradcheck(fn, (arg,), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (arg,), fast_mode=True)


def test_torch_compile_fullgraph_traces_the_ops():
    def f(x):
        out, sw = ops.switch_pool2d(x * 2, 3, 2, 1, True)
        return ops.switch_unpool2d(torch.relu(out), sw, 3, 2, 1, x.shape[-2:]).sum() + out.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for shape in [(2, 3, 11, 12), (1, 4, 16, 9)]:
        x = torch.randn(shape, requires_grad=True)
        ref = f(x)
        (g_ref,) = torch.autograd.grad(ref, x)
        got = compiled(x)
        (g_got,) = torch.autograd.grad(got, x)
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(g_got, g_ref)


# ---------------------------------------------------------------------------------------------------------------
# Bad arguments: a clear ValueError (RuntimeError for tensors on different devices), never a crash


@pytest.mark.parametrize("device", DEVICES)
def test_window_larger_than_255_positions(device):
    x = torch.randn(1, 1, 20, 20, device=device)
    with pytest.raises(ValueError, match="255"):
        ops.switch_pool2d(x, 16)
    with pytest.raises(ValueError, match="more than 255 positions"):
        xops.switch_pool2d(x, [16, 16], [16, 16], [0, 0], False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.int32, torch.bool])
def test_integer_input(device, dtype):
    with pytest.raises(ValueError, match="float32, float64, float16 or bfloat16"):
        xops.switch_pool2d(torch.zeros(1, 2, 4, 4, dtype=dtype, device=device), [2, 2], [2, 2], [0, 0], False)


@pytest.mark.parametrize("device", DEVICES)
def test_wrong_number_of_dims(device):
    with pytest.raises(ValueError, match="5-D"):
        xops.switch_pool2d(torch.zeros(1, 1, 2, 4, 4, device=device), [2, 2], [2, 2], [0, 0], False)
    with pytest.raises(ValueError, match="2-D"):
        xops.switch_pool2d(torch.zeros(4, 4, device=device), [2, 2], [2, 2], [0, 0], False)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_geometry(device):
    x = torch.randn(1, 1, 4, 4, device=device)
    with pytest.raises(ValueError, match="at most half"):
        xops.switch_pool2d(x, [2, 2], [2, 2], [2, 2], False)
    with pytest.raises(ValueError, match="positive"):
        xops.switch_pool2d(x, [2, 2], [0, 0], [0, 0], False)
    with pytest.raises(ValueError, match="too small"):
        xops.switch_pool2d(torch.randn(1, 1, 2, 2, device=device), [3, 3], [1, 1], [0, 0], False)


def _pooled(k=2, s=2, p=0, device="cpu", shape=(1, 2, 6, 6)):
    x = torch.randn(shape, device=device)
    out, sw = ops.switch_pool2d(x, k, s, p)
    return x, out, sw


@pytest.mark.parametrize("device", DEVICES)
def test_switches_of_the_wrong_shape_or_dtype(device):
    _, out, sw = _pooled(device=device)
    with pytest.raises(ValueError, match="shape"):
        xops.switch_unpool2d(out, sw[:, :, :2], [2, 2], [2, 2], [0, 0], [6, 6])
    with pytest.raises(ValueError, match="must be uint8"):
        xops.switch_unpool2d(out, sw.long(), [2, 2], [2, 2], [0, 0], [6, 6])
    with pytest.raises(ValueError, match="uint8"):
        xops.switch_gather2d(torch.randn(1, 2, 6, 6, device=device), sw.int(), [2, 2], [2, 2], [0, 0])
    with pytest.raises(ValueError, match="do not match"):
        xops.switch_gather2d(torch.randn(1, 3, 6, 6, device=device), sw, [2, 2], [2, 2], [0, 0])


@cuda_only
def test_tensors_on_different_devices(device):
    x, out, sw = _pooled(device=device)
    for call in (
        lambda: xops.switch_unpool2d(out, sw.cpu(), [2, 2], [2, 2], [0, 0], [6, 6]),
        lambda: xops.switch_unpool2d(out.cpu(), sw, [2, 2], [2, 2], [0, 0], [6, 6]),
        lambda: xops.switch_gather2d(x, sw.cpu(), [2, 2], [2, 2], [0, 0]),
        lambda: xops.switch_gather2d(x.cpu(), sw, [2, 2], [2, 2], [0, 0]),
    ):
        with pytest.raises(RuntimeError, match="cpu"):
            call()
    with pytest.raises(RuntimeError):
        xops.switch_pool2d_out(x, [2, 2], [2, 2], [0, 0], False, out.cpu(), sw)
    with pytest.raises(RuntimeError):
        xops.switch_unpool2d_out(out, sw, [2, 2], [2, 2], [0, 0], torch.empty(1, 2, 6, 6))


@pytest.mark.parametrize("device", DEVICES)
def test_switch_value_outside_its_window(device):
    x, out, sw = _pooled(device=device)
    bad = sw.clone()
    bad[0, 1, 2, 1] = 4
    for call in (
        lambda: xops.switch_unpool2d(out, bad, [2, 2], [2, 2], [0, 0], [6, 6]),
        lambda: xops.switch_unpool2d_out(out, bad, [2, 2], [2, 2], [0, 0], torch.empty_like(x)),
        lambda: xops.switch_gather2d(x, bad, [2, 2], [2, 2], [0, 0]),
    ):
        with pytest.raises(ValueError, match=r"switch value 4 at \(0, 1, 2, 1\) is outside its 2x2 window"):
            call()
    # the device is still usable and the error does not leak into the next call
    assert torch.equal(xops.switch_gather2d(x, sw, [2, 2], [2, 2], [0, 0]), out)
    bad[0, 1, 2, 1] = 255
    with pytest.raises(ValueError, match="outside"):
        xops.switch_unpool2d(out.contiguous(memory_format=torch.channels_last), bad, [2, 2], [2, 2], [0, 0], [6, 6])
    with pytest.raises(ValueError, match="outside"):
        ops.switches_to_indices(bad, 2, 2, 0, (6, 6))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_switch_in_the_vectorised_channels_last_path(device):
    x = torch.randn(2, 16, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    out, sw = ops.switch_pool2d(x, 2)
    bad = sw.clone()
    bad[1, 15, 3, 3] = 9
    with pytest.raises(ValueError, match="switch value 9"):
        xops.switch_unpool2d(out, bad, [2, 2], [2, 2], [0, 0], [8, 8])


@pytest.mark.parametrize("device", DEVICES)
def test_switch_pointing_into_the_padding(device):
    x, out, sw = _pooled(3, 2, 1, device=device)
    bad = sw.clone()
    bad[0, 0, 0, 0] = 0  # row -1, col -1 of the padded input
    with pytest.raises(ValueError, match="into the padding"):
        xops.switch_unpool2d(out, bad, [3, 3], [2, 2], [1, 1], [6, 6])
    with pytest.raises(ValueError, match="into the padding"):
        xops.switch_gather2d(x, bad, [3, 3], [2, 2], [1, 1])
    # channels_last and the generic kernels flag it too
    out_cl, bad_cl = (t.contiguous(memory_format=torch.channels_last) for t in (out, bad))
    with pytest.raises(ValueError, match="into the padding"):
        xops.switch_unpool2d(out_cl, bad_cl, [3, 3], [2, 2], [1, 1], [6, 6])


@pytest.mark.parametrize("device", DEVICES)
def test_output_size_inconsistent_with_the_geometry(device):
    _, out, sw = _pooled(device=device)
    with pytest.raises(ValueError, match="does not pool"):
        xops.switch_unpool2d(out, sw, [2, 2], [2, 2], [0, 0], [12, 12])
    with pytest.raises(ValueError, match="does not pool"):
        xops.switch_unpool2d_out(out, sw, [2, 2], [2, 2], [0, 0], torch.empty(1, 2, 3, 3, device=device))
    with pytest.raises(ValueError, match="does not pool"):
        xops.switch_gather2d(torch.randn(1, 2, 12, 12, device=device), sw, [2, 2], [2, 2], [0, 0])
    with pytest.raises(ValueError, match="does not pool"):
        ops.native_switch_unpool2d(out, sw, 2, 2, 0, (12, 12))
    # both sizes that pool to 3 with floor mode are fine
    assert ops.switch_unpool2d(out, sw, 2, 2, 0, (7, 7)).shape == (1, 2, 7, 7)
