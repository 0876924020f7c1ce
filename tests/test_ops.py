"""The switch-pooling ops against PyTorch's own max pooling: values, switches, adjoint, autograd, errors.

Device-parametrised: CPU always, CUDA when a GPU is present and ``xraydeconv._C`` has CUDA kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xraydeconv import ops
from xraydeconv.ops import extension as _extension

pytestmark = pytest.mark.skipif(not ops.has_kernels("cpu"), reason="xraydeconv._C is not built")

xops = torch.ops.xraydeconv

DEVICES = [pytest.param("cpu", id="cpu")]
if torch.cuda.is_available() and ops.has_kernels("cuda"):
    DEVICES.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))
DEVICE_NAMES = ["cpu"] + (["cuda"] if len(DEVICES) > 1 else [])

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------------------------
# References


def _nan_windows(x: torch.Tensor, k, s, p, ceil_mode) -> torch.Tensor:
    """True for every pooled position whose window holds a NaN."""
    return F.max_pool2d(x.isnan().double(), k, s, p, ceil_mode=ceil_mode) > 0


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


def check_against_native(x: torch.Tensor, k, s, p, ceil_mode: bool) -> None:
    """Values, switches, unpool and gather of the kernels against F.max_pool2d on the same input."""
    out, sw = ops.switch_pool2d(x, k, s, p, ceil_mode)
    ref, idx = F.max_pool2d(x, k, s, p, ceil_mode=ceil_mode, return_indices=True)
    assert out.shape == ref.shape and sw.shape == ref.shape and sw.dtype == torch.uint8
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    # positions agree in every window without NaN; with NaN, the switch names the window's first NaN
    clean = ~_nan_windows(x, k, s, p, ceil_mode)
    mine = ops.switches_to_indices(sw, k, s, p, x.shape[-2:])
    assert torch.equal(mine[clean], idx[clean])
    if not bool(clean.all()):
        _, first_nan = F.max_pool2d(x.isnan().double(), k, s, p, ceil_mode=ceil_mode, return_indices=True)
        assert torch.equal(mine[~clean], first_nan[~clean])
    # the adjoint: unpool equals the scatter-add definition, and max-pool's gradient where no NaN
    y = torch.randn(out.shape, dtype=torch.float64, device=x.device).to(x.dtype)
    size = tuple(x.shape[-2:])
    un = ops.switch_unpool2d(y, sw, k, s, p, size)
    assert un.shape == x.shape and un.dtype == x.dtype
    torch.testing.assert_close(un.double(), _reference_unpool(y, sw, k, s, p, size), **_tol(x.dtype))
    if bool(clean.all()):
        x64 = x.double().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.max_pool2d(x64, k, s, p, ceil_mode=ceil_mode), x64, y.double())
        torch.testing.assert_close(un.double(), grad, **_tol(x.dtype))
    # gather reads the pooled values back
    torch.testing.assert_close(ops.switch_gather2d(x, sw, k, s, p), out, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# Property tests


@st.composite
def pooling_case(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    ceil_mode = draw(st.booleans())
    h = draw(st.integers(max(1, kh - 2 * ph), 19))
    w = draw(st.integers(max(1, kw - 2 * pw), 19))
    batch = draw(st.sampled_from([None, 1, 2, 3]))
    c = draw(st.integers(1, 5))
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
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=pooling_case())
def test_matches_native_on_random_cases(device, case):
    shape, k, s, p, ceil_mode, dtype, layout, values, seed = case
    x = _make(shape, dtype, layout, values, seed, device)
    check_against_native(x, k, s, p, ceil_mode)


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
@pytest.mark.parametrize("dtype", DTYPES)
def test_realistic_feature_map(device, dtype):
    x = torch.randn(2, 64, 64, 64, dtype=dtype, device=device)
    check_against_native(x, 2, 2, 0, False)
    check_against_native(x.contiguous(memory_format=torch.channels_last), 3, 2, 1, False)


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


def test_every_cpu_instruction_set_variant():
    # the hot loops are compiled for baseline x86-64, AVX2 and AVX-512 and picked at run time
    script = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        from xraydeconv import ops
        torch.manual_seed(0)
        for shape in [(2, 3, 32, 32), (1, 5, 17, 71), (2, 3, 8, 130)]:
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


def test_default_output_size_and_empty_batches():
    x = torch.randn(1, 2, 8, 8)
    out, sw = ops.switch_pool2d(x, 2)
    assert ops.switch_unpool2d(out, sw, 2).shape == x.shape
    empty = torch.randn(0, 3, 8, 8)
    e_out, e_sw = ops.switch_pool2d(empty, 2)
    assert e_out.shape == (0, 3, 4, 4) and e_sw.shape == (0, 3, 4, 4)
    assert ops.switch_unpool2d(e_out, e_sw, 2, output_size=(8, 8)).shape == (0, 3, 8, 8)


# ---------------------------------------------------------------------------------------------------------------
# Dispatcher registration, autograd, torch.compile


def _opcheck_samples(device):
    x = torch.randn(2, 3, 9, 10, device=device)
    cases = []
    for xin, (k, s, p, c) in [
        (x, (2, 2, 0, False)),
        (x.contiguous(memory_format=torch.channels_last), (3, 2, 1, True)),
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
@pytest.mark.parametrize("geometry", [(2, 2, 0, False), (3, 2, 1, True), (2, 1, 0, False)])
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
# Bad arguments: a clear ValueError / RuntimeError, never a crash


def test_window_larger_than_255_positions():
    x = torch.randn(1, 1, 20, 20)
    with pytest.raises(ValueError, match="255"):
        ops.switch_pool2d(x, 16)
    with pytest.raises(ValueError, match="255"):
        xops.switch_pool2d(x, [16, 16], [16, 16], [0, 0], False)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.int32, torch.bool])
def test_integer_input(dtype):
    with pytest.raises(ValueError, match="float"):
        xops.switch_pool2d(torch.zeros(1, 2, 4, 4, dtype=dtype), [2, 2], [2, 2], [0, 0], False)


def test_wrong_number_of_dims():
    with pytest.raises(ValueError, match="5-D"):
        xops.switch_pool2d(torch.zeros(1, 1, 2, 4, 4), [2, 2], [2, 2], [0, 0], False)
    with pytest.raises(ValueError, match="2-D"):
        xops.switch_pool2d(torch.zeros(4, 4), [2, 2], [2, 2], [0, 0], False)


def test_bad_geometry():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="half"):
        xops.switch_pool2d(x, [2, 2], [2, 2], [2, 2], False)
    with pytest.raises(ValueError, match="positive"):
        xops.switch_pool2d(x, [2, 2], [0, 0], [0, 0], False)
    with pytest.raises(ValueError, match="too small"):
        xops.switch_pool2d(torch.randn(1, 1, 2, 2), [3, 3], [1, 1], [0, 0], False)


def _pooled(k=2, s=2, p=0):
    x = torch.randn(1, 2, 6, 6)
    out, sw = ops.switch_pool2d(x, k, s, p)
    return x, out, sw


def test_switches_of_the_wrong_shape_or_dtype():
    _, out, sw = _pooled()
    with pytest.raises(ValueError, match="shape"):
        xops.switch_unpool2d(out, sw[:, :, :2], [2, 2], [2, 2], [0, 0], [6, 6])
    with pytest.raises(ValueError, match="uint8"):
        xops.switch_unpool2d(out, sw.long(), [2, 2], [2, 2], [0, 0], [6, 6])
    with pytest.raises(ValueError, match="uint8"):
        xops.switch_gather2d(torch.randn(1, 2, 6, 6), sw.int(), [2, 2], [2, 2], [0, 0])
    with pytest.raises(ValueError, match="do not match"):
        xops.switch_gather2d(torch.randn(1, 3, 6, 6), sw, [2, 2], [2, 2], [0, 0])


@pytest.mark.cuda
@pytest.mark.skipif(len(DEVICES) < 2, reason="needs CUDA kernels and a GPU")
def test_switches_on_another_device():
    _, out, sw = _pooled()
    with pytest.raises(RuntimeError, match="cuda"):
        xops.switch_unpool2d(out.cuda(), sw, [2, 2], [2, 2], [0, 0], [6, 6])


def test_switch_value_outside_its_window():
    x, out, sw = _pooled()
    bad = sw.clone()
    bad[0, 1, 2, 1] = 4
    for call in (
        lambda: xops.switch_unpool2d(out, bad, [2, 2], [2, 2], [0, 0], [6, 6]),
        lambda: xops.switch_unpool2d_out(out, bad, [2, 2], [2, 2], [0, 0], torch.empty_like(x)),
        lambda: xops.switch_gather2d(x, bad, [2, 2], [2, 2], [0, 0]),
    ):
        with pytest.raises(ValueError, match=r"switch value 4 at \(0, 1, 2, 1\) is outside its 2x2 window"):
            call()
    bad[0, 1, 2, 1] = 255
    with pytest.raises(ValueError, match="outside"):
        xops.switch_unpool2d(out.contiguous(memory_format=torch.channels_last), bad, [2, 2], [2, 2], [0, 0], [6, 6])
    with pytest.raises(ValueError, match="outside"):
        ops.switches_to_indices(bad, 2, 2, 0, (6, 6))


def test_switch_pointing_into_the_padding():
    x, out, sw = _pooled(3, 2, 1)
    bad = sw.clone()
    bad[0, 0, 0, 0] = 0  # row -1, col -1 of the padded input
    with pytest.raises(ValueError, match="padding"):
        xops.switch_unpool2d(out, bad, [3, 3], [2, 2], [1, 1], [6, 6])
    with pytest.raises(ValueError, match="padding"):
        xops.switch_gather2d(x, bad, [3, 3], [2, 2], [1, 1])


def test_output_size_inconsistent_with_the_geometry():
    _, out, sw = _pooled()
    with pytest.raises(ValueError, match="does not pool"):
        xops.switch_unpool2d(out, sw, [2, 2], [2, 2], [0, 0], [12, 12])
    with pytest.raises(ValueError, match="does not pool"):
        xops.switch_unpool2d_out(out, sw, [2, 2], [2, 2], [0, 0], torch.empty(1, 2, 3, 3))
    with pytest.raises(ValueError, match="does not pool"):
        ops.native_switch_unpool2d(out, sw, 2, 2, 0, (12, 12))
    # both sizes that pool to 3 with floor mode are fine
    assert ops.switch_unpool2d(out, sw, 2, 2, 0, (7, 7)).shape == (1, 2, 7, 7)


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_extension, "_loaded", False)
    monkeypatch.setattr(_extension, "_error", "No module named 'xraydeconv._C'")
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        ops.switch_pool2d(torch.randn(1, 1, 4, 4), 2)
