"""Kernel vs native ratio report for the switch-pooling ops (the engine of ``xraydeconv bench``).

Both sides run interleaved in one process (kernel, native, ``copy_`` of the same bytes, round after
round), so machine noise hits them alike; medians are reported. Every operation is measured twice:
the allocating call (what a model pays, page faults of fresh outputs included) and the kernel alone
writing into preallocated buffers (``*_out`` ops against native ``out=`` variants).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from xraydeconv import ops

FULL_SHAPES: tuple[tuple[int, int, int, int], ...] = ((32, 64, 128, 128), (8, 256, 32, 32), (1, 64, 256, 256))
QUICK_SHAPES: tuple[tuple[int, int, int, int], ...] = ((8, 64, 128, 128), (8, 256, 32, 32), (1, 64, 128, 128))
LAYOUTS = ("nchw", "channels_last")
MiB = 2**20


@dataclass
class Row:
    """One operation at one shape, layout and thread count: medians in ms and derived figures."""

    op: str
    shape: tuple[int, ...]
    layout: str
    threads: int
    kernel_ms: float
    native_ms: float
    copy_ms: float  # copy_ of as many bytes as the kernel side moves, into an existing buffer
    kernel_bytes: int
    native_bytes: int
    switch_bytes: int
    index_bytes: int

    @property
    def speedup(self) -> float:
        return self.native_ms / self.kernel_ms

    @property
    def kernel_gbs(self) -> float:
        return self.kernel_bytes / self.kernel_ms / 1e6

    @property
    def native_gbs(self) -> float:
        return self.native_bytes / self.native_ms / 1e6

    @property
    def copy_fraction(self) -> float:
        """Kernel bandwidth as a fraction of ``copy_`` bandwidth for the same bytes."""
        return self.copy_ms / self.kernel_ms

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(
            speedup=self.speedup,
            kernel_gbs=self.kernel_gbs,
            native_gbs=self.native_gbs,
            copy_fraction=self.copy_fraction,
        )
        return d


@dataclass
class Report:
    machine: dict
    repeats: int
    rows: list[Row] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"machine": self.machine, "repeats": self.repeats, "rows": [r.as_dict() for r in self.rows]}


def machine_info(device: str) -> dict:
    """CPU model, instruction sets, torch version and (on CUDA) the GPU name."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info["cpu"] = model
    info["cpu_cores"] = os.cpu_count()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        isa = "avx512"
    elif {"avx2", "fma", "bmi2"} <= flags:
        isa = "avx2"
    else:
        isa = "baseline"
    cap = os.environ.get("XRAYDECONV_CPU_ISA")
    info["kernel_isa"] = isa if cap is None else f"{isa} (capped by XRAYDECONV_CPU_ISA={cap})"
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed_cuda(fn: Callable[[], object]) -> float:
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)

        return timed_cuda

    def timed_cpu(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return timed_cpu


def time_samples(
    fns: dict[str, Callable[[], object]], repeats: int, device: str = "cpu", min_sample_ms: float = 0.0
) -> dict[str, list[float]]:
    """ms per call of each function in each round, calling them round-robin ``repeats`` times after two warm-up
    rounds. A function faster than ``min_sample_ms`` is called that many times in a row per sample (the timer's
    and the scheduler's noise would swamp a single call of a few microseconds)."""
    timed = _timer(device)
    for fn in fns.values():
        fn()
    # the second warm-up round also sizes the runs of calls
    number = {name: max(1, math.ceil(min_sample_ms / max(timed(fn), 1e-3))) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            n = number[name]
            samples[name].append(timed(fn if n == 1 else lambda fn=fn, n=n: [fn() for _ in range(n)]) / n)
    return samples


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: str = "cpu") -> dict[str, float]:
    """Median ms of each function, calling them round-robin ``repeats`` times after two warm-up rounds."""
    return {name: statistics.median(v) for name, v in time_samples(fns, repeats, device).items()}


def paired_speedup(native: Sequence[float], other: Sequence[float]) -> float:
    """Median over rounds of native ms / other ms: each round's two calls ran back to back, so a burst of load
    from other work slows both and cancels out of the ratio."""
    return statistics.median(n / o for n, o in zip(native, other))


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def op_cases(x: torch.Tensor) -> Iterator[tuple[str, Callable[[], object], Callable[[], object], int, int]]:
    """(op, kernel call, native call, kernel bytes moved, native bytes moved) for one input, 2x2/s2 pooling."""
    k, s, p, d = [2, 2], [2, 2], [0, 0], [1, 1]
    size = list(x.shape[-2:])
    out, sw = ops.switch_pool2d(x, k, s)
    ref, idx = F.max_pool2d(x, k, s, return_indices=True)
    out_buf, sw_buf = torch.empty_like(out), torch.empty_like(sw)
    ref_buf, idx_buf = torch.empty_like(ref), torch.empty_like(idx)
    unpool_buf = torch.empty_like(x)
    # CUDA's max_unpool2d.out only writes contiguous outputs
    native_unpool_buf = unpool_buf
    if x.device.type != "cpu":
        native_unpool_buf = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad = torch.randn_like(out)
    xg = x.detach().clone().requires_grad_(True)
    pool_k, pool_n = _nbytes(x, out, sw), _nbytes(x, ref, idx)
    un_k, un_n = _nbytes(out, sw, x), _nbytes(ref, idx, x)

    yield "pool", lambda: ops.switch_pool2d(x, k, s), lambda: F.max_pool2d(x, k, s, return_indices=True), pool_k, pool_n
    yield (
        "pool out=",
        lambda: torch.ops.xraydeconv.switch_pool2d_out(x, k, s, p, False, out_buf, sw_buf),
        lambda: torch.ops.aten.max_pool2d_with_indices.out(x, k, s, p, d, False, out=ref_buf, indices=idx_buf),
        pool_k,
        pool_n,
    )

    def fwd_bwd_kernel() -> object:
        return torch.autograd.grad(ops.switch_pool2d(xg, k, s)[0], xg, grad)

    def fwd_bwd_native() -> object:
        return torch.autograd.grad(F.max_pool2d(xg, k, s), xg, grad)

    yield "pool fwd+bwd", fwd_bwd_kernel, fwd_bwd_native, pool_k + _nbytes(grad, sw, x), pool_n + _nbytes(grad, idx, x)
    yield (
        "pool bwd",
        lambda: torch.ops.xraydeconv.switch_unpool2d(grad, sw, k, s, p, size),
        lambda: torch.ops.aten.max_pool2d_with_indices_backward(grad, x, k, s, p, d, False, idx),
        un_k,
        un_n,
    )
    yield (
        "unpool",
        lambda: torch.ops.xraydeconv.switch_unpool2d(out, sw, k, s, p, size),
        lambda: F.max_unpool2d(ref, idx, k, s, output_size=size),
        un_k,
        un_n,
    )
    yield (
        "unpool out=",
        lambda: torch.ops.xraydeconv.switch_unpool2d_out(out, sw, k, s, p, unpool_buf),
        lambda: torch.ops.aten.max_unpool2d.out(ref, idx, size, out=native_unpool_buf),
        un_k,
        un_n,
    )


def _input(shape, layout: str, device: str, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, device=device, generator=gen)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _measure(kernel_fn, native_fn, copy_bytes: int, repeats: int, device: str) -> dict[str, float]:
    """Interleaved medians of the kernel, native and a ``copy_`` of ``copy_bytes`` bytes."""
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return time_interleaved({"kernel": kernel_fn, "native": native_fn, "copy": lambda: dst.copy_(src)}, repeats, device)


def _shape_rows(x: torch.Tensor, layout: str, n_threads: int, repeats: int, progress) -> Iterator[Row]:
    """One row per operation of :func:`op_cases` on ``x``."""
    shape = tuple(x.shape)
    pooled = shape[0] * shape[1] * (shape[2] // 2) * (shape[3] // 2)
    for op, kernel_fn, native_fn, k_bytes, n_bytes in op_cases(x):
        if progress is not None:
            progress(f"{op} {shape} {layout} {n_threads}t")
        med = _measure(kernel_fn, native_fn, k_bytes // 2, repeats, x.device.type)
        yield Row(op=op, shape=shape, layout=layout, threads=n_threads, kernel_ms=med["kernel"],
                  native_ms=med["native"], copy_ms=med["copy"], kernel_bytes=k_bytes, native_bytes=n_bytes,
                  switch_bytes=pooled, index_bytes=8 * pooled)


def require_kernels_for(device: str) -> None:
    """RuntimeError unless the build has the switch-pooling kernels for ``device``."""
    if not ops.has_kernels(device):
        raise RuntimeError(f"xraydeconv._C has no {device} kernels in this build")


def run_report(
    device: str = "cpu",
    threads: Sequence[int] | None = None,
    repeats: int = 15,
    quick: bool = False,
    shapes: Sequence[tuple[int, int, int, int]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Measure every (shape, layout, thread count, op) and return the rows.

    Args:
        device: "cpu" or "cuda" (CUDA times with events, synchronising around each call).
        threads: CPU thread counts to run at (``torch.set_num_threads``); default: the current count.
        repeats: timed rounds per measurement (the median is kept).
        quick: smaller shapes, for a first look in a few seconds.
        shapes: explicit (N, C, H, W) shapes instead of the defaults.
        progress: called with a short label before each measurement.
    """
    require_kernels_for(device)
    report = Report(machine=machine_info(device), repeats=repeats)
    gen = torch.Generator(device=device).manual_seed(0)
    with thread_counts(threads) as counts:
        for n_threads in counts():
            for shape in shapes or (QUICK_SHAPES if quick else FULL_SHAPES):
                for layout in LAYOUTS:
                    x = _input(shape, layout, device, gen)
                    report.rows.extend(_shape_rows(x, layout, n_threads, repeats, progress))
                    del x
    return report


@contextlib.contextmanager
def thread_counts(threads: Sequence[int] | None):
    """Yields a generator factory that sets each thread count in turn; the count in force is restored after."""
    before = torch.get_num_threads()

    def each() -> Iterator[int]:
        for n in threads or [before]:
            torch.set_num_threads(n)
            yield n

    try:
        yield each
    finally:
        torch.set_num_threads(before)


def format_report(report: Report) -> str:
    """The ratio table as plain text (one line per row, machine header first)."""
    m = report.machine
    lines = [
        f"machine: {m.get('cpu')} ({m.get('cpu_cores')} cores, kernels: {m.get('kernel_isa')})"
        + (f", GPU: {m['gpu']}" if "gpu" in m else ""),
        f"torch {m.get('torch')}, device {m.get('device')}, OMP_WAIT_POLICY={m.get('omp_wait_policy')}, "
        f"median of {report.repeats} interleaved rounds; 2x2/s2 max pooling, float32",
        "speed-up = native ms / kernel ms; copy_ = kernel bandwidth as a fraction of copy_ of the same bytes",
        "",
    ]
    header = (
        f"{'op':<13} {'shape':<18} {'layout':<13} {'thr':>3} {'kernel ms':>10} {'native ms':>10} {'speed-up':>8} "
        f"{'kern GB/s':>9} {'nat GB/s':>9} {'copy_':>6} {'switch MiB':>10} {'index MiB':>9}"
    )
    lines += [header, "-" * len(header)]
    for r in report.rows:
        lines.append(
            f"{r.op:<13} {'x'.join(map(str, r.shape)):<18} {r.layout:<13} {r.threads:>3} {r.kernel_ms:>10.2f} "
            f"{r.native_ms:>10.2f} {r.speedup:>7.2f}x {r.kernel_gbs:>9.1f} {r.native_gbs:>9.1f} "
            f"{r.copy_fraction:>5.0%} {r.switch_bytes / MiB:>10.1f} {r.index_bytes / MiB:>9.1f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The suite: every pool layer of the nets, and their training step, kernel vs native


SUITE_SIZES = (128, 256)
SUITE_BATCHES = (1, 32)
# "relu+": a ReLU in front of the pool, fused (switch_relu_pool2d) against F.relu_ then F.max_pool2d
PASSES = ("fwd", "fwd+bwd", "relu+fwd", "relu+fwd+bwd")
# a ReLU not fused with a pool: xraydeconv.ops.relu_ (gradient masked in place) against torch.relu_, with a backward
RELU_PASS = "relu_ fwd+bwd"
# the fused training-mode BatchNorm + ReLU, without and with the 2x2 pool after it (channels-last only)
BN_PASSES = {False: "bn+relu fwd+bwd", True: "bn+relu+pool fwd+bwd"}
# each net's training step, kernel and auto against native
TRAIN_PASS = "train step"
# every pass the suite can measure, the names its --passes takes
SUITE_PASSES = (*(f"pool {p}" for p in PASSES), RELU_PASS, *BN_PASSES.values(), TRAIN_PASS)
# Each call once per round, as a model calls each layer once between other ops. Runs of the same call in a tight
# loop (time_samples' min_sample_ms) leave the allocator and the caches in a state a model never sees; they moved
# one-image fwd+bwd ratios by up to 4x either way.
MIN_SAMPLE_MS = 0.0
# `train`'s defaults: 128 px, batch 32, channels-last
TRAIN_PX = 128
TRAIN_BATCH = 32


@dataclass
class SuiteRow:
    """One pool layer shape (or a whole training step) timed with the kernels and with native pooling."""

    what: str  # "pool <one of PASSES>", RELU_PASS, one of BN_PASSES or "<TRAIN_PASS> <net> <kernel|auto>"
    shape: tuple[int, ...]
    layout: str
    threads: int
    kernel_ms: float  # median
    native_ms: float  # median
    speedup: float  # median over rounds of native ms / kernel ms (paired_speedup)
    nets: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def net_pool_shapes(sizes: Sequence[int] = SUITE_SIZES, batches: Sequence[int] = SUITE_BATCHES) -> dict:
    """{(N, C, H, W): "net, net"} for every pooling layer input of every net in ``MODEL_NAMES``."""
    from xraydeconv.nn import SwitchMaxPool2d

    return _net_input_shapes(lambda model: [m for m in model.modules() if isinstance(m, SwitchMaxPool2d)], sizes,
                             batches)


def net_relu_shapes(sizes: Sequence[int] = SUITE_SIZES, batches: Sequence[int] = SUITE_BATCHES) -> dict:
    """{(N, C, H, W): "net, net"} for every ReLU input of the nets that is not fused with a pool (a ReLU followed by
    anything but a ``SwitchMaxPool2d``): where ``FusedSequential`` may run ``xraydeconv.ops.relu_``."""
    from xraydeconv.nn import SwitchMaxPool2d

    def unfused_relus(model: torch.nn.Module) -> list[torch.nn.Module]:
        found = []
        for seq in model.modules():
            mods = list(seq.children()) if isinstance(seq, torch.nn.Sequential) else []
            found += [m for m, nxt in zip(mods, [*mods[1:], None])
                      if type(m) is torch.nn.ReLU and not isinstance(nxt, SwitchMaxPool2d)]
        return found

    return _net_input_shapes(unfused_relus, sizes, batches)


def net_bn_relu_shapes(pool: bool, sizes: Sequence[int] = SUITE_SIZES,
                       batches: Sequence[int] = SUITE_BATCHES) -> dict:
    """{(N, C, H, W): "net, net"} for every BatchNorm2d input of the nets followed by a ReLU and then (``pool``) a
    ``SwitchMaxPool2d`` or (not ``pool``) anything else: where ``FusedSequential`` may run
    ``xraydeconv.ops.batch_norm_relu_pool2d`` or ``batch_norm_relu``."""
    from xraydeconv.nn import SwitchMaxPool2d

    def chains(model: torch.nn.Module) -> list[torch.nn.Module]:
        found = []
        for seq in model.modules():
            mods = list(seq.children()) if isinstance(seq, torch.nn.Sequential) else []
            found += [bn for bn, relu, nxt in zip(mods, mods[1:], [*mods[2:], None])
                      if type(bn) is torch.nn.BatchNorm2d and type(relu) is torch.nn.ReLU
                      and isinstance(nxt, SwitchMaxPool2d) == pool]
        return found

    return _net_input_shapes(chains, sizes, batches)


def _net_input_shapes(select: Callable[[torch.nn.Module], list[torch.nn.Module]], sizes: Sequence[int],
                      batches: Sequence[int]) -> dict:
    """{(N, C, H, W): "net, net"}: the input shapes of the modules ``select(model)`` picks, over the nets and sizes."""
    from xraydeconv.training.models import MODEL_NAMES, build

    found: dict[tuple[int, int, int], list[str]] = {}
    for name in MODEL_NAMES:
        for px in sizes:
            model = build(name, input_size=px, pool_backend="native").eval()
            seen: list[tuple[int, int, int]] = []
            hooks = [m.register_forward_hook(lambda m, i, o, seen=seen: seen.append(tuple(i[0].shape[1:])))
                     for m in select(model)]
            with torch.no_grad():
                model(torch.zeros(1, 1, px, px))
            for h in hooks:
                h.remove()
            for chw in seen:
                found.setdefault(chw, [])
                if name not in found[chw]:
                    found[chw].append(name)
    return {(n, *chw): ", ".join(nets) for n in batches for chw, nets in sorted(found.items())}


def pool_fns(x: torch.Tensor, passes: str) -> tuple[Callable[[], object], Callable[[], object]]:
    """(kernel, native) calls of a 2x2/s2 pooling of ``x`` for one of :data:`PASSES`: forward alone or with the
    gradient, of ``x`` or (``relu+``) of ``relu(x)``.

    The kernel side calls the op the way ``SwitchMaxPool2d(backend="auto")`` does (no Python wrapper). With a ReLU,
    both sides start from a fresh copy of ``x`` (a model's ReLU runs in place on the fresh output of the layer
    before it): native applies ``relu_`` to it and pools, the kernel pools it with the fused op.
    """
    relu, backward = passes.startswith("relu+"), passes.endswith("bwd")
    op = torch.ops.xraydeconv.switch_relu_pool2d if relu else torch.ops.xraydeconv.switch_pool2d
    geometry = ((2, 2), (2, 2), (0, 0), False)
    xg = x.detach().clone().requires_grad_(backward)

    def kernel_out() -> torch.Tensor:
        return op(xg.clone() if relu else xg, *geometry)[0]

    def native_out() -> torch.Tensor:
        return F.max_pool2d(torch.relu_(xg.clone()) if relu else xg, 2, 2)

    if not backward:
        return kernel_out, native_out
    grad = torch.randn_like(F.max_pool2d(x, 2, 2))
    return (lambda: torch.autograd.grad(kernel_out(), xg, grad)), (lambda: torch.autograd.grad(native_out(), xg, grad))


def relu_fns(x: torch.Tensor) -> tuple[Callable[[], object], Callable[[], object]]:
    """(kernel, native) calls of a ReLU of ``x`` in a network's position, forward and backward: a fresh copy of ``x``
    (the output of the layer before), ReLU in place (``xraydeconv.ops.relu_`` or ``torch.relu_``), then ``* 2``, whose
    backward hands the ReLU a fresh gradient that nothing else holds, as a conv's backward does."""
    op = torch.ops.xraydeconv.relu_
    xg = x.detach().clone().requires_grad_(True)
    grad = torch.randn_like(x)

    def kernel_fn() -> object:
        return torch.autograd.grad(op(xg.clone()) * 2.0, xg, grad)

    def native_fn() -> object:
        return torch.autograd.grad(torch.relu_(xg.clone()) * 2.0, xg, grad)

    return kernel_fn, native_fn


def bn_relu_fns(x: torch.Tensor, pool: bool) -> tuple[Callable[[], object], Callable[[], object]]:
    """(kernel, native) calls of a training-mode BatchNorm then ReLU (then, with ``pool``, a 2x2/s2 max pool) of ``x``,
    forward and backward into x, weight and bias: ``xraydeconv.ops.batch_norm_relu`` (``batch_norm_relu_pool2d``)
    against ``F.batch_norm``, ``torch.relu_`` (and ``F.max_pool2d``); then ``* 2``, whose backward hands the op a fresh
    gradient that nothing else holds, as a conv's backward does (``batch_norm_relu`` then writes grad_x over it)."""
    c = x.shape[1]
    xg = x.detach().clone().requires_grad_(True)
    w, b = (torch.randn(c, device=x.device).requires_grad_(True) for _ in range(2))
    stats = (torch.zeros(c, device=x.device), torch.ones(c, device=x.device))
    op = torch.ops.xraydeconv.batch_norm_relu_pool2d if pool else torch.ops.xraydeconv.batch_norm_relu
    grad = torch.randn_like(F.max_pool2d(x, 2, 2) if pool else x)

    def kernel_fn() -> object:
        return torch.autograd.grad(op(xg, w, b, *stats, 0.1, 1e-5)[0] * 2.0, (xg, w, b), grad)

    def native_fn() -> object:
        y = torch.relu_(F.batch_norm(xg, *stats, w, b, True, 0.1, 1e-5))
        return torch.autograd.grad((F.max_pool2d(y, 2, 2) if pool else y) * 2.0, (xg, w, b), grad)

    return kernel_fn, native_fn


def _suite_groups(sizes: Sequence[int], batches: Sequence[int], device: str,
                  passes: Collection[str] | None = None) -> list:
    """(shape, nets, layouts, [(label, make (kernel, native) calls from the input)]) per shape: every pool layer
    input in its four passes, every unfused ReLU input, and on the CPU every BatchNorm + ReLU (+ pool) input; only
    the ``passes`` named, if given."""
    groups = [(shape, nets, LAYOUTS, [(f"pool {p}", partial(pool_fns, passes=p)) for p in PASSES])
              for shape, nets in net_pool_shapes(sizes, batches).items()]
    groups += [(shape, nets, LAYOUTS, [(RELU_PASS, relu_fns)])
               for shape, nets in net_relu_shapes(sizes, batches).items()]
    if device == "cpu":  # the BatchNorm ops are CPU kernels, for channels-last maps
        for pool, label in BN_PASSES.items():
            groups += [(shape, nets, ("channels_last",), [(label, partial(bn_relu_fns, pool=pool))])
                       for shape, nets in net_bn_relu_shapes(pool, sizes, batches).items()]
    if passes is not None:
        groups = [(shape, nets, layouts, [p for p in plist if p[0] in passes])
                  for shape, nets, layouts, plist in groups]
    return [g for g in groups if g[3]]


def run_pool_suite(
    threads: Sequence[int] | None = None,
    repeats: int = 7,
    sizes: Sequence[int] = SUITE_SIZES,
    batches: Sequence[int] = SUITE_BATCHES,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
    passes: Collection[str] | None = None,
) -> list[SuiteRow]:
    """Every pool layer shape of the nets, both layouts, forward and forward+backward, with and without a fused
    ReLU in front (:data:`PASSES`); then every unfused ReLU shape, forward+backward (:data:`RELU_PASS`); on the CPU
    every BatchNorm + ReLU (+ pool) shape, channels-last, forward+backward (:data:`BN_PASSES`); float32, on
    ``device`` ("cpu" or "cuda"; CUDA times with events). ``passes``: only these labels (of :data:`SUITE_PASSES`)."""
    require_kernels_for(device)
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    groups = _suite_groups(sizes, batches, device, passes)  # one input per shape and layout
    with thread_counts(threads) as counts:
        for n_threads in counts():
            for shape, nets, layouts, shape_passes in groups:
                for layout in layouts:
                    x = _input(shape, layout, device, gen)
                    for label, make in shape_passes:
                        if progress is not None:
                            progress(f"{label} {shape} {layout} {n_threads}t")
                        t = time_samples(dict(zip(("kernel", "native"), make(x))), repeats, device,
                                         min_sample_ms=MIN_SAMPLE_MS)
                        rows.append(SuiteRow(label, shape, layout, n_threads, statistics.median(t["kernel"]),
                                             statistics.median(t["native"]), paired_speedup(t["native"], t["kernel"]),
                                             nets))
    return rows


def train_step_fn(name: str, backend: str, px: int, x: torch.Tensor, y: torch.Tensor,
                  edit: Callable[[torch.nn.Module], None] | None = None) -> Callable[[], object]:
    """One AdamW step of ``name`` with ``backend`` pooling, channels-last, as ``train`` runs it by default;
    ``edit`` may change the freshly built model first (a benchmark swapping out a layer kind)."""
    from xraydeconv.training.models import build

    torch.manual_seed(0)
    model = build(name, input_size=px, pool_backend=backend).train()
    if edit is not None:
        edit(model)
    model = model.to(x.device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> object:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def run_train_steps(
    nets: Sequence[str] = ("shallow", "deeper", "deeper-aug"),
    threads: Sequence[int] | None = None,
    repeats: int = 7,
    px: int | None = None,
    batch: int | None = None,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> list[SuiteRow]:
    """The training step of each net with ``pool_backend="kernel"`` and ``"auto"`` vs ``"native"`` (channels-last,
    AdamW), interleaved; ``auto`` follows :data:`xraydeconv.ops.pool_dispatch.TABLE` as it stands.

    ``px`` and ``batch`` default to :data:`TRAIN_PX` and :data:`TRAIN_BATCH`; ``device`` is "cpu" or "cuda".
    """
    require_kernels_for(device)
    px, batch = px or TRAIN_PX, batch or TRAIN_BATCH
    rows = []
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, px, px, generator=gen).contiguous(memory_format=torch.channels_last).to(device)
    y = torch.randint(0, 24, (batch,), generator=gen).to(device)
    with thread_counts(threads) as counts:
        for n_threads in counts():
            for name in nets:
                if progress is not None:
                    progress(f"train step {name} {n_threads}t")
                fns = {side: train_step_fn(name, side, px, x, y) for side in ("kernel", "auto", "native")}
                t = time_samples(fns, repeats, device)
                for side in ("kernel", "auto"):
                    rows.append(SuiteRow(f"{TRAIN_PASS} {name} {side}", tuple(x.shape), "channels_last", n_threads,
                                         statistics.median(t[side]), statistics.median(t["native"]),
                                         paired_speedup(t["native"], t[side]), name))
    return rows


def format_suite(rows: Sequence[SuiteRow], machine: dict, repeats: int) -> str:
    """The suite's table: one line per row with its speed-up (native ms / kernel ms)."""
    gpu = f", GPU: {machine['gpu']}" if machine.get("gpu") else ""
    lines = [
        f"machine: {machine.get('cpu')} ({machine.get('cpu_cores')} cores, kernels: {machine.get('kernel_isa')}){gpu}, "
        f"torch {machine.get('torch')}, OMP_WAIT_POLICY={machine.get('omp_wait_policy')}",
        f"median of {repeats} interleaved rounds; 2x2/s2 max pooling, float32; speed-up: median over the rounds "
        "of native ms / kernel ms",
        "",
    ]
    header = (f"{'what':<28} {'shape':<16} {'layout':<13} {'thr':>3} {'kernel ms':>10} {'native ms':>10} "
              f"{'speed-up':>8}  nets")
    lines += [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.what:<28} {'x'.join(map(str, r.shape)):<16} {r.layout:<13} {r.threads:>3} {r.kernel_ms:>10.2f} "
            f"{r.native_ms:>10.2f} {r.speedup:>7.2f}x  {r.nets}"
        )
    return "\n".join(lines)


def dispatch_table(rows: Sequence[SuiteRow], device: str = "cpu") -> dict[str, bool]:
    """The ``auto`` dispatch table of ``device``'s rows: a pool (unfused ReLU, BatchNorm + ReLU) shape class is True
    when the kernel was at least as fast at every thread count measured."""
    from xraydeconv.ops.pool_dispatch import bn_relu_class, relu_class, shape_class

    table: dict[str, bool] = {}
    for r in rows:
        if not (r.what.startswith("pool ") or r.what == RELU_PASS or r.what in BN_PASSES.values()):
            continue
        fmt = torch.channels_last if r.layout == "channels_last" else torch.contiguous_format
        x = torch.empty(r.shape, memory_format=fmt, device=device)  # never written: shape, layout and dtype count
        passes = r.what.removeprefix("pool ")
        if r.what in BN_PASSES.values():
            key = bn_relu_class(x, r.what == BN_PASSES[True])
        elif r.what == RELU_PASS:
            key = relu_class(x)
        else:
            key = shape_class(x, (2, 2), (2, 2), (0, 0), passes.endswith("bwd"), passes.startswith("relu+"))
        table[key] = table.get(key, True) and r.speedup >= 1.0
    return dict(sorted(table.items()))


def dispatch_module_text(table: dict[str, bool], command: str) -> str:
    """The source of :mod:`xraydeconv.ops.pool_dispatch_table` holding ``table``."""
    body = "".join(f"    {k!r}: {v},\n" for k, v in table.items())
    return (
        f'"""The auto dispatch table of SwitchMaxPool2d; generated, do not edit. Regenerate with\n\n    {command}\n\n'
        "Keys: see :func:`xraydeconv.ops.pool_dispatch.shape_class`. True: the kernels measured at least as fast as "
        'native.\n"""\n\nTABLE: dict[str, bool] = {\n' + body + "}\n"
    )
