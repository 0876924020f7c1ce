"""CUDA kernels of the switch-pooling ops against PyTorch's own max pooling, on the GPU.

Skipped (with the reason) without an NVIDIA GPU or when ``xraydeconv._C`` was built without CUDA.
References: ``F.max_pool2d(..., return_indices=True)`` for values and positions, an index_add in
float64 for the adjoint (unpool), ``torch.gather`` for the gather.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xraydeconv import ops
from xraydeconv.ops import extension as _extension


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not _extension.load():
        return "xraydeconv._C is not built"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("xraydeconv::switch_pool2d", "CUDA"):
        return "xraydeconv._C was built without CUDA kernels (torch without CUDA or no nvcc at build time)"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

xops = torch.ops.xraydeconv
DEV = "cuda"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------
# Helpers


def _pairs(k, s, p):
    k = (k, k) if isinstance(k, int) else tuple(k)
    s = k if s is None else ((s, s) if isinstance(s, int) else tuple(s))
    p = (p, p) if isinstance(p, int) else tuple(p)
    return list(k), list(s), list(p)


def switch_indices(sw: torch.Tensor, k, s, p, W: int) -> torch.Tensor:
    """Native flat (h * W + w) indices of the switch positions."""
    OH, OW = sw.shape[-2:]
    sw = sw.long()
    oh = torch.arange(OH, device=sw.device).view(OH, 1)
    ow = torch.arange(OW, device=sw.device).view(1, OW)
    h = oh * s[0] - p[0] + sw // k[1]
    w = ow * s[1] - p[1] + sw % k[1]
    return h * W + w


def make_input(shape, dtype, fmt: str, values: str, gen: torch.Generator) -> torch.Tensor:
    """Random input of `shape` in memory format `fmt` ("contiguous", "channels_last", "strided")."""
    if values == "ties":  # few distinct values: many ties inside a window
        x = torch.randint(-2, 3, shape, generator=gen).to(dtype)
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if values == "nan":
        x[torch.rand(shape, generator=gen) < 0.08] = float("nan")
    x = x.to(DEV)
    if fmt == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif fmt == "strided":  # a view with gaps between rows
        wide = torch.zeros(*shape[:-1], shape[-1] + 3, dtype=dtype, device=DEV)
        wide[..., 1 : 1 + shape[-1]] = x
        x = wide[..., 1 : 1 + shape[-1]]
        assert not x.is_contiguous()
    return x


def first_nan_indices(x: torch.Tensor, k, s, p, ceil_mode: bool) -> torch.Tensor:
    """For each window: the flat index of its first NaN in row-major order (garbage where there is none)."""
    H, W = x.shape[-2:]
    pos = torch.arange(H * W, device=x.device, dtype=torch.float64).view(H, W)
    z = torch.where(torch.isnan(x), 1e9 - pos, torch.full_like(pos, -1.0)).to(torch.float64)
    _, idx = F.max_pool2d(z, k, s, p, ceil_mode=ceil_mode, return_indices=True)
    return idx


def check_all(x: torch.Tensor, k, s, p, ceil_mode: bool) -> None:
    """switch_pool2d, switch_unpool2d(_out), switch_pool2d_out and switch_gather2d on x against references."""
    k, s, p = _pairs(k, s, p)
    H, W = x.shape[-2:]
    out, sw = xops.switch_pool2d(x, k, s, p, ceil_mode)
    ref, ref_idx = F.max_pool2d(x, k, s, p, ceil_mode=ceil_mode, return_indices=True)

    # shapes, dtypes, memory format kept
    assert out.shape == ref.shape and sw.shape == ref.shape
    assert out.dtype == x.dtype and sw.dtype == torch.uint8 and out.device == x.device
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert sw.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous() and sw.is_contiguous()

    # values: identical (NaN where native has NaN)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)

    # positions: identical to native's indices in NaN-free windows; the first NaN elsewhere
    idx = switch_indices(sw, k, s, p, W)
    has_nan = F.max_pool2d(torch.isnan(x).to(torch.float32), k, s, p, ceil_mode=ceil_mode) > 0
    expected = torch.where(has_nan, first_nan_indices(x, k, s, p, ceil_mode), ref_idx)
    assert torch.equal(idx, expected), "switches differ from max_pool2d's indices"
    assert int(sw.max()) < k[0] * k[1]

    # the CPU kernels agree (positions compared in NaN-free windows)
    cpu_out, cpu_sw = xops.switch_pool2d(x.cpu(), k, s, p, ceil_mode)
    torch.testing.assert_close(cpu_out, out.cpu(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.where(has_nan.cpu(), 0, cpu_sw.long()), torch.where(has_nan, 0, sw.long()).cpu())

    # switch_pool2d_out into poisoned buffers: every element written
    out2 = torch.full_like(out, float("nan"))  # keeps out's memory format
    sw2 = torch.full_like(sw, 250)
    xops.switch_pool2d_out(x, k, s, p, ceil_mode, out2, sw2)
    torch.testing.assert_close(out2, out, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(sw2, sw)

    # unpool: exact adjoint of the selection (float64 index_add reference)
    y = torch.randn(out.shape, dtype=torch.float64, device=DEV).to(x.dtype)
    if x.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous():
        y = y.contiguous(memory_format=torch.channels_last)
    planes = y.reshape(-1, y.shape[-2] * y.shape[-1]).double()
    ref_un = torch.zeros(planes.shape[0], H * W, dtype=torch.float64, device=DEV)
    ref_un.scatter_add_(1, idx.reshape(planes.shape[0], -1), planes)
    ref_un = ref_un.view(*x.shape[:-2], H, W).to(x.dtype)
    un = xops.switch_unpool2d(y, sw, k, s, p, [H, W])
    assert un.shape == x.shape and un.dtype == x.dtype
    overlapping = s[0] < k[0] or s[1] < k[1]
    if overlapping:
        torch.testing.assert_close(un, ref_un)
    else:
        assert torch.equal(un, ref_un)
        # and equals native max_unpool2d where native can express it (4-D, NaN-free indices are the same)
        if not bool(has_nan.any()) and x.dim() == 4:
            nat = F.max_unpool2d(y, ref_idx, k, s, p, output_size=[H, W])
            assert torch.equal(un, nat)
    # into a poisoned buffer
    un2 = torch.full_like(un, float("nan"))
    xops.switch_unpool2d_out(y, sw, k, s, p, un2)
    assert torch.equal(un2, un)

    # gather: x read at the switches
    g = xops.switch_gather2d(x, sw, k, s, p)
    ref_g = x.reshape(-1, H * W).gather(1, idx.reshape(-1, idx.shape[-2] * idx.shape[-1])).view(sw.shape)
    torch.testing.assert_close(g, ref_g, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Equality with native over geometries, dtypes, memory formats, ties and NaN

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


@pytest.mark.parametrize("values", ["randn", "ties", "nan"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}-k{c[1]}-s{c[2]}-p{c[3]}-{'ceil' if c[4] else 'floor'}")
def test_matches_native(cfg, dtype, fmt, values):
    shape, k, s, p, ceil_mode = cfg
    if fmt == "channels_last" and len(shape) == 3:
        pytest.skip("channels_last needs 4 dims")
    gen = torch.Generator().manual_seed(zlib.crc32(repr((cfg, dtype, fmt, values)).encode()))
    x = make_input(shape, dtype, fmt, values, gen)
    check_all(x, k, s, p, ceil_mode)


def test_channels_last_small_channel_counts():
    # C not a multiple of the channel vector (4 floats / 8 halves): generic NHWC kernels
    gen = torch.Generator().manual_seed(1)
    for C in (1, 3, 6, 12):
        for dtype in (torch.float32, torch.float16):
            check_all(make_input((2, C, 12, 12), dtype, "channels_last", "randn", gen), 2, 2, 0, False)


def test_misaligned_views_take_the_generic_path():
    # a view starting one element into its storage cannot use 16-byte loads
    base = torch.randn(2 * 8 * 16 * 16 + 1, device=DEV)
    x = base[1:].view(2, 8, 16, 16)
    check_all(x, 2, 2, 0, False)


def test_denormals_win_over_zero():
    # the build uses --use_fast_math (flush-to-zero): the kernels must still order denormals
    tiny = torch.finfo(torch.float32).tiny / 4  # a float32 denormal
    x = torch.zeros(1, 1, 4, 4, device=DEV)
    x[0, 0, 1, 1] = tiny
    x[0, 0, 2, 3] = -tiny
    x[0, 0, 3, 2] = 0.0
    out, sw = xops.switch_pool2d(x, [2, 2], [2, 2], [0, 0], False)
    assert out[0, 0, 0, 0].item() == tiny and sw[0, 0, 0, 0].item() == 3
    assert sw[0, 0, 1, 1].item() == 0  # -tiny < 0 == 0: the first zero stays
    un = xops.switch_unpool2d(out, sw, [2, 2], [2, 2], [0, 0], [4, 4])
    assert un[0, 0, 1, 1].item() == tiny


def test_negative_zero_ties_keep_the_first():
    x = torch.tensor([[[[-0.0, 0.0], [0.0, -0.0]]]], device=DEV)
    _, sw = xops.switch_pool2d(x, [2, 2], [2, 2], [0, 0], False)
    assert sw.item() == 0


def test_infinities():
    x = torch.full((1, 1, 4, 4), float("-inf"), device=DEV)
    x[0, 0, 3, 3] = float("inf")
    out, sw = xops.switch_pool2d(x, [2, 2], [2, 2], [0, 0], False)
    assert out[0, 0, 0, 0].item() == float("-inf") and sw[0, 0, 0, 0].item() == 0
    assert out[0, 0, 1, 1].item() == float("inf") and sw[0, 0, 1, 1].item() == 3


def test_empty_batch():
    x = torch.randn(0, 3, 8, 8, device=DEV)
    out, sw = xops.switch_pool2d(x, [2, 2], [2, 2], [0, 0], False)
    assert out.shape == (0, 3, 4, 4) and sw.shape == (0, 3, 4, 4)
    un = xops.switch_unpool2d(out, sw, [2, 2], [2, 2], [0, 0], [8, 8])
    assert un.shape == (0, 3, 8, 8)


@st.composite
def pool_cases(draw):
    kH, kW = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sH, sW = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    pH, pW = draw(st.integers(0, kH // 2)), draw(st.integers(0, kW // 2))
    H = draw(st.integers(max(1, kH - 2 * pH), 24))
    W = draw(st.integers(max(1, kW - 2 * pW), 24))
    N, C = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    ceil_mode = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    fmt = draw(st.sampled_from(["contiguous", "channels_last", "strided"]))
    values = draw(st.sampled_from(["randn", "ties", "nan"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return (N, C, H, W), (kH, kW), (sH, sW), (pH, pW), ceil_mode, dtype, fmt, values, seed


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(pool_cases())
def test_property_random_geometry(case):
    shape, k, s, p, ceil_mode, dtype, fmt, values, seed = case
    x = make_input(shape, dtype, fmt, values, torch.Generator().manual_seed(seed))
    check_all(x, k, s, p, ceil_mode)


def test_64bit_indexing():
    # more than 2^31 elements: the kernels switch to 64-bit index arithmetic; the planes at both ends
    # are compared with native pooling run on just those planes
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    k = [2, 2]
    for channels_last in (False, True):
        x = torch.randn(2**31 // (4 * 128 * 128) + 1, 4, 128, 128, device=DEV, dtype=torch.bfloat16)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        assert x.numel() > 2**31
        out, sw = xops.switch_pool2d(x, k, k, [0, 0], False)
        un = xops.switch_unpool2d(out, sw, k, k, [0, 0], [128, 128])
        for part in (slice(0, 2), slice(-2, None)):
            ref, ref_idx = F.max_pool2d(x[part], 2, 2, return_indices=True)
            assert torch.equal(out[part], ref)
            assert torch.equal(switch_indices(sw[part], k, k, [0, 0], 128), ref_idx)
            assert torch.equal(un[part], F.max_unpool2d(ref, ref_idx, 2, 2))
        del x, out, sw, un
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Determinism and streams


@pytest.mark.parametrize("channels_last", [False, True])
def test_unpool_is_deterministic_with_overlapping_windows(channels_last):
    x = torch.randn(8, 64, 65, 65, device=DEV)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out, sw = xops.switch_pool2d(x, [3, 3], [2, 2], [1, 1], False)
    y = torch.randn_like(out)
    first = xops.switch_unpool2d(y, sw, [3, 3], [2, 2], [1, 1], [65, 65])
    for _ in range(3):
        again = xops.switch_unpool2d(y, sw, [3, 3], [2, 2], [1, 1], [65, 65])
        # bitwise: compare the raw 32-bit patterns
        assert torch.equal(first.contiguous().view(torch.int32), again.contiguous().view(torch.int32))


def test_runs_on_the_current_stream():
    src = torch.randn(16, 64, 128, 128, device=DEV)
    ref_out, ref_sw = xops.switch_pool2d(src, [2, 2], [2, 2], [0, 0], False)
    ref_un = xops.switch_unpool2d(ref_out, ref_sw, [2, 2], [2, 2], [0, 0], [128, 128])
    x = torch.zeros_like(src)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        # the copy lands only after the sleep: an op on another stream would read zeros
        torch.cuda._sleep(50_000_000)
        x.copy_(src)
        out, sw = xops.switch_pool2d(x, [2, 2], [2, 2], [0, 0], False)
        un = xops.switch_unpool2d(out, sw, [2, 2], [2, 2], [0, 0], [128, 128])
        g = xops.switch_gather2d(x, sw, [2, 2], [2, 2], [0, 0])
    side.synchronize()
    assert torch.equal(out, ref_out) and torch.equal(sw, ref_sw)
    assert torch.equal(un, ref_un)
    assert torch.equal(g, ref_out)


def test_non_default_device_index():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = torch.randn(2, 3, 8, 8, device="cuda:1")
    out, sw = xops.switch_pool2d(x, [2, 2], [2, 2], [0, 0], False)
    assert out.device == x.device and sw.device == x.device
    assert torch.equal(out, F.max_pool2d(x, 2))


# ---------------------------------------------------------------------------------------------
# Errors


def _pooled(k=2, s=2, p=0, shape=(2, 3, 8, 8)):
    x = torch.randn(shape, device=DEV)
    return (x, *xops.switch_pool2d(x, [k, k], [s, s], [p, p], False))


def test_switch_outside_its_window_is_an_error():
    x, out, sw = _pooled()
    bad = sw.clone()
    bad[1, 2, 3, 1] = 4
    with pytest.raises(ValueError, match=r"switch value 4 at \(1, 2, 3, 1\) is outside its 2x2 window"):
        xops.switch_unpool2d(out, bad, [2, 2], [2, 2], [0, 0], [8, 8])
    with pytest.raises(ValueError, match="outside its 2x2 window"):
        xops.switch_gather2d(x, bad, [2, 2], [2, 2], [0, 0])
    # the device is still usable and the flag does not leak into the next call
    assert torch.equal(xops.switch_gather2d(x, sw, [2, 2], [2, 2], [0, 0]), out)


def test_switch_into_the_padding_is_an_error():
    x, out, sw = _pooled(k=3, s=2, p=1)
    bad = sw.clone()
    bad[0, 0, 0, 0] = 0  # the top-left window starts at (-1, -1): position 0 is padding
    with pytest.raises(ValueError, match="into the padding"):
        xops.switch_unpool2d(out, bad, [3, 3], [2, 2], [1, 1], [8, 8])
    with pytest.raises(ValueError, match="into the padding"):
        xops.switch_gather2d(x, bad, [3, 3], [2, 2], [1, 1])
    # channels_last and the generic kernels flag it too
    bad_cl = bad.contiguous(memory_format=torch.channels_last)
    out_cl = out.contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="into the padding"):
        xops.switch_unpool2d(out_cl, bad_cl, [3, 3], [2, 2], [1, 1], [8, 8])


def test_bad_switch_in_vectorised_channels_last_path():
    x = torch.randn(2, 16, 8, 8, device=DEV).contiguous(memory_format=torch.channels_last)
    out, sw = xops.switch_pool2d(x, [2, 2], [2, 2], [0, 0], False)
    bad = sw.clone()
    bad[1, 15, 3, 3] = 9
    with pytest.raises(ValueError, match="switch value 9"):
        xops.switch_unpool2d(out, bad, [2, 2], [2, 2], [0, 0], [8, 8])


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda x, out, sw: (out, sw.long()), ValueError, "must be uint8"),
        (lambda x, out, sw: (out, sw[:, :, :3]), ValueError, "shape"),
        (lambda x, out, sw: (out, sw.cpu()), RuntimeError, "cpu"),
        (lambda x, out, sw: (out.cpu(), sw), RuntimeError, "cpu"),
    ],
    ids=["dtype", "shape", "switches-on-cpu", "y-on-cpu"],
)
def test_bad_switch_arguments(make, exc, match):
    x, out, sw = _pooled()
    y, s = make(x, out, sw)
    with pytest.raises(exc, match=match):
        xops.switch_unpool2d(y, s, [2, 2], [2, 2], [0, 0], [8, 8])


def test_gather_mixed_devices():
    x, out, sw = _pooled()
    with pytest.raises(RuntimeError, match="cpu"):
        xops.switch_gather2d(x, sw.cpu(), [2, 2], [2, 2], [0, 0])
    with pytest.raises(RuntimeError, match="cpu"):
        xops.switch_gather2d(x.cpu(), sw, [2, 2], [2, 2], [0, 0])


def test_out_buffers_on_another_device():
    x, out, sw = _pooled()
    with pytest.raises(RuntimeError):
        xops.switch_pool2d_out(x, [2, 2], [2, 2], [0, 0], False, out.cpu(), sw)
    with pytest.raises(RuntimeError):
        xops.switch_unpool2d_out(out, sw, [2, 2], [2, 2], [0, 0], torch.empty(2, 3, 8, 8))


def test_bad_pool_arguments():
    x = torch.randn(2, 3, 8, 8, device=DEV)
    with pytest.raises(ValueError, match="more than 255 positions"):
        xops.switch_pool2d(x, [16, 16], [16, 16], [0, 0], False)
    with pytest.raises(ValueError, match="float32, float64, float16 or bfloat16"):
        xops.switch_pool2d(x.to(torch.int32), [2, 2], [2, 2], [0, 0], False)
    with pytest.raises(ValueError, match="3-D"):
        xops.switch_pool2d(x.unsqueeze(0), [2, 2], [2, 2], [0, 0], False)
    with pytest.raises(ValueError, match="at most half"):
        xops.switch_pool2d(x, [2, 2], [2, 2], [2, 2], False)
    with pytest.raises(ValueError, match="too small"):
        xops.switch_pool2d(x[..., :1, :1], [3, 3], [1, 1], [0, 0], False)


def test_inconsistent_output_size():
    x, out, sw = _pooled()
    with pytest.raises(ValueError, match="does not pool to"):
        xops.switch_unpool2d(out, sw, [2, 2], [2, 2], [0, 0], [12, 12])
    with pytest.raises(ValueError, match="does not pool to"):
        xops.switch_gather2d(torch.randn(2, 3, 12, 12, device=DEV), sw, [2, 2], [2, 2], [0, 0])


# ---------------------------------------------------------------------------------------------
# opcheck (with the fake tensors and autograd registered by xraydeconv.ops)


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last):
    x = torch.randn(2, 8, 12, 12, device=DEV, requires_grad=True)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    args = ([3, 3], [2, 2], [1, 1])
    torch.library.opcheck(xops.switch_pool2d.default, (x, *args, False))
    out, sw = xops.switch_pool2d(x.detach(), *args, False)
    y = torch.randn_like(out).requires_grad_()
    torch.library.opcheck(xops.switch_unpool2d.default, (y, sw, *args, [12, 12]))
    torch.library.opcheck(xops.switch_gather2d.default, (x, sw, *args))
    o, s = torch.empty_like(out), torch.empty_like(sw)
    torch.library.opcheck(xops.switch_pool2d_out.default, (x.detach(), *args, False, o, s))
    torch.library.opcheck(xops.switch_unpool2d_out.default, (y.detach(), sw, *args, torch.empty_like(x.detach())))


def test_python_face_on_cuda():
    x = torch.randn(2, 4, 10, 10, device=DEV, dtype=torch.float64, requires_grad=True)
    out, sw = ops.switch_pool2d(x, 3, 2, 1)
    assert out.is_cuda and sw.dtype == torch.uint8
    torch.autograd.gradcheck(lambda t: ops.switch_pool2d(t, 3, 2, 1)[0], (x,))
    y = torch.randn_like(out, requires_grad=True)
    torch.autograd.gradcheck(lambda t: ops.switch_unpool2d(t, sw, 3, 2, 1, output_size=(10, 10)), (y,))
