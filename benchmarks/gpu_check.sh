#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and a CUDA build of torch (no internet needed), build
# the CUDA extension, run the CUDA tests and print the benchmark tables, in a few minutes.
#
#   bash benchmarks/gpu_check.sh
#
# Sections: 0 machine, 1 build (sm_90 by default), 2 tests, 3 kernel timings, `xraydeconv bench` and its --suite
# (every pool layer of the nets, fwd+bwd, with the ReLU fused, and each net's training step),
# 4 projection report (if benchmarks/projection_report.py exists), 5 images/s of `project` on CUDA at 256 px
# (benchmarks/bench_project_throughput.py; with 2 GPUs also 2 torchrun processes on NCCL), then a summary. Logs and JSON go to
# $OUT when it is set (else to a temporary folder, printed at the end). Exits non-zero when the build
# or the tests fail, after printing everything it got.
#
# Environment: PYTHON (python3), TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (16),
# GPU_CHECK_PYTEST_ARGS (-x), GPU_CHECK_SKIP_BUILD=1 to reuse an extension built before,
# GPU_CHECK_SKIP_PROJECTION=1 to leave out section 4, GPU_CHECK_SKIP_PROJECT=1 section 5, GPU_CHECK_KEEP_COMPILER=1 to build with $CXX / c++
# instead of /usr/bin/g++.
set -u
cd "$(dirname "$0")/.." || exit 2

PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
PYTEST_ARGS=${GPU_CHECK_PYTEST_ARGS:--x}
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/xraydeconv-gpu-check.XXXXXX")

build_status="not run"
test_status="not run"
bench_status="not run"
kernel_status="not run"
projection_status="not run"
project_status="not run"
suite_status="not run"
started=$(date +%s)

section() { printf '\n===== %s =====\n' "$*"; }

finish() {
  section "summary"
  echo "build:              $build_status"
  echo "tests:              $test_status"
  echo "kernel timings:     $kernel_status"
  echo "xraydeconv bench:   $bench_status"
  echo "suite (nets, steps): $suite_status"
  echo "projection report:  $projection_status"
  echo "project throughput: $project_status"
  echo "total:              $(($(date +%s) - started)) s"
  if [ -f "$LOGS/kernel_table.txt" ]; then
    echo
    cat "$LOGS/kernel_table.txt"
  fi
}

main() {

# ---------------------------------------------------------------------------------------------
section "0. machine"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader ||
    echo "nvidia-smi failed"
else
  echo "nvidia-smi not found"
fi
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing the wheels in .whl/ into /tmp/site"
  if "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "warning: installing .whl/*.whl failed"
  fi
fi
if ! "$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 1)"; then
  echo "error: $PY has no CUDA torch or sees no GPU"
  build_status="skipped (no CUDA torch / GPU)"
  finish
  return 1
fi
command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -1

# ---------------------------------------------------------------------------------------------
section "1. build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = "1" ]; then
  build_status="skipped (GPU_CHECK_SKIP_BUILD=1)"
else
  # A toolchain whose libstdc++ differs from the one the Python process loads (seen: /opt/gcc on the
  # lent H100 image) builds an extension that crashes formatting numbers into error messages: prefer
  # the system compiler, which matches, and fall back to the default one if it cannot build.
  default_cxx=${CXX:-c++}
  if [ "${GPU_CHECK_KEEP_COMPILER:-0}" != "1" ] && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
    export CXX=/usr/bin/g++ CC=/usr/bin/gcc
  fi
  echo "C++ compiler: ${CXX:-c++} ($("${CXX:-c++}" --version 2>/dev/null | head -1)); default was $default_cxx"
  t0=$(date +%s)
  if timeout 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . >"$LOGS/build.log" 2>&1; then
    build_status="ok in $(($(date +%s) - t0)) s with ${CXX:-c++}"
  elif [ "${CXX:-c++}" != "$default_cxx" ]; then
    echo "build with $CXX failed; retrying with $default_cxx"
    mv "$LOGS/build.log" "$LOGS/build-system-compiler.log"
    if [ "$default_cxx" = "c++" ]; then unset CXX CC; else export CXX=$default_cxx; unset CC; fi
    if timeout 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . >"$LOGS/build.log" 2>&1; then
      build_status="ok in $(($(date +%s) - t0)) s with $default_cxx"
    else
      build_status="FAILED after $(($(date +%s) - t0)) s"
    fi
  else
    build_status="FAILED after $(($(date +%s) - t0)) s"
  fi
  grep -E "error:|ptxas (error|warning)" "$LOGS/build.log" | head -20
  echo "build: $build_status"
  if [[ $build_status == FAILED* ]]; then
    tail -60 "$LOGS/build.log"
    finish
    return 1
  fi
fi
if ! "$PY" - <<'EOF'; then
import torch
from xraydeconv.ops import extension as _extension
_extension.require()
ok = torch._C._dispatch_has_kernel_for_dispatch_key("xraydeconv::switch_pool2d", "CUDA")
print("xraydeconv._C loaded; CUDA kernels registered:", ok)
raise SystemExit(0 if ok else 1)
EOF
  build_status="$build_status, but the CUDA kernels are not registered"
  finish
  return 1
fi
# An argument error whose message holds numbers must come back as a ValueError, not a crash.
"$PY" - <<'EOF'
import torch
from xraydeconv.ops import extension as _extension
_extension.require()
try:
    torch.ops.xraydeconv.switch_pool2d(torch.zeros(1, 1, 1, 4, 4, device="cuda"), [2, 2], [2, 2], [0, 0], False)
except ValueError as exc:
    print("error messages ok:", str(exc).splitlines()[0][:100])
EOF
rc=$?
if [ "$rc" -ne 0 ]; then
  echo "error: formatting an error message crashed the extension (exit $rc): it was built with a C++ toolchain"
  echo "whose libstdc++ differs from the one loaded at run time; rebuild with the system compiler"
  echo "(CXX=/usr/bin/g++ CC=/usr/bin/gcc) or put that toolchain's libstdc++ first on LD_LIBRARY_PATH"
  build_status="$build_status, but error messages crash (libstdc++ mismatch, exit $rc)"
fi

# ---------------------------------------------------------------------------------------------
section "2. tests"
shopt -s nullglob
test_files=(tests/test_ops*.py tests/test_deconv_scatter.py tests/test_nn.py)
t0=$(date +%s)
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of options
timeout 240 "$PY" -m pytest -q -p no:cacheprovider $PYTEST_ARGS -rs "${test_files[@]}" 2>&1 | tee "$LOGS/pytest.log" |
  grep -vE "^\s*$" | tail -60
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 0 ]; then
  test_status="ok in $(($(date +%s) - t0)) s ($(tail -1 "$LOGS/pytest.log"))"
elif [ "$rc" -eq 124 ]; then
  test_status="TIMED OUT after 240 s"
else
  test_status="FAILED (exit $rc: $(tail -1 "$LOGS/pytest.log"))"
fi

# ---------------------------------------------------------------------------------------------
section "3a. kernel timings (CUDA events over CUDA-graph replays; median)"
if timeout 150 "$PY" - "$LOGS" <<'EOF'; then
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from xraydeconv.ops import extension as _extension

_extension.require()
xops = torch.ops.xraydeconv
logs = sys.argv[1]
dev = torch.device("cuda")
torch.backends.cudnn.benchmark = False


def graph_ms(fn, calls=20, replays=7):
    """Median kernel time of fn() per call: `calls` calls captured in one CUDA graph, replayed."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    del g
    return statistics.median(times)


def safe(timer, fn):
    """timer(fn), or NaN (with the reason printed) when that call cannot be timed."""
    try:
        return timer(fn)
    except Exception as exc:  # noqa: BLE001 - report and keep timing the other rows
        print(f"  could not time: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        torch.cuda.synchronize()
        return float("nan")


def call_ms(fn, calls=20, reps=5):
    """Median time per eager call (allocation, dispatch and any host sync included)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def copy_bandwidth():
    """GB/s of a 128 MiB device-to-device copy_, counting bytes read and written."""
    src = torch.randn(32 * 2**20, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / graph_ms(lambda: dst.copy_(src)) / 1e6


copy_gbs = copy_bandwidth()
print(f"device: {torch.cuda.get_device_name(0)} | torch {torch.__version__} | copy_ (128 MiB copied) {copy_gbs:.0f} GB/s")

rows = []
CASES = [
    ("fp32 NCHW 2x2/s2", (32, 64, 128, 128), torch.float32, False, 2, 2, 0),
    ("fp32 NHWC 2x2/s2", (32, 64, 128, 128), torch.float32, True, 2, 2, 0),
    ("bf16 NCHW 2x2/s2", (32, 64, 128, 128), torch.bfloat16, False, 2, 2, 0),
    ("fp32 NCHW 3x3/s2/p1", (32, 64, 128, 128), torch.float32, False, 3, 2, 1),
    ("fp32 NHWC 3x3/s2/p1", (32, 64, 128, 128), torch.float32, True, 3, 2, 1),
    ("fp32 NCHW 2x2/s2 small", (8, 256, 32, 32), torch.float32, False, 2, 2, 0),
]
def measure(name, shape, dtype, cl, k, s, p):
    x = torch.randn(shape, device=dev, dtype=dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    K, S, P = [k, k], [s, s], [p, p]
    H, W = shape[-2:]
    out, sw = xops.switch_pool2d(x, K, S, P, False)
    ref, idx = F.max_pool2d(x, k, s, p, return_indices=True)
    if not torch.equal(out, ref):
        print(f"  WARNING {name}: switch_pool2d values differ from max_pool2d")
    o2, s2 = torch.empty_like(out), torch.empty_like(sw)
    no, ni = torch.empty_like(ref), torch.empty_like(idx)
    y = torch.randn_like(out)
    un = torch.empty_like(x)
    esz = x.element_size()
    # pool and unpool move the same bytes: the input-size tensor, the pooled values and the switches
    nbytes = x.numel() * esz + out.numel() * (esz + 1)
    overlapping = s < k

    def add(op, ours_graph, native_graph, ours_call, native_call, native_name):
        gbs = nbytes / ours_graph / 1e6
        rows.append(
            dict(case=name, op=op, native=native_name, ours_ms=ours_graph, native_ms=native_graph,
                 speedup=native_graph / ours_graph, ours_gbs=gbs, copy_fraction=gbs / copy_gbs,
                 ours_call_ms=ours_call, native_call_ms=native_call)
        )

    add(
        "pool",
        safe(graph_ms, lambda: xops.switch_pool2d_out(x, K, S, P, False, o2, s2)),
        safe(graph_ms, lambda: torch.ops.aten.max_pool2d_with_indices.out(x, K, S, P, [1, 1], False, out=no, indices=ni)),
        safe(call_ms, lambda: xops.switch_pool2d(x, K, S, P, False)),
        safe(call_ms, lambda: F.max_pool2d(x, k, s, p, return_indices=True)),
        "max_pool2d(return_indices)",
    )
    ours_un_graph = safe(graph_ms, lambda: xops.switch_unpool2d_out(y, sw, K, S, P, un))
    ours_un_call = safe(call_ms, lambda: xops.switch_unpool2d(y, sw, K, S, P, [H, W]))
    if not overlapping:
        add(
            "unpool", ours_un_graph,
            safe(graph_ms, lambda: F.max_unpool2d(y, idx, k, s, p, output_size=[H, W])),
            ours_un_call,
            safe(call_ms, lambda: F.max_unpool2d(y, idx, k, s, p, output_size=[H, W])),
            "max_unpool2d",
        )
    bwd = torch.ops.aten.max_pool2d_with_indices_backward
    add(
        "unpool", ours_un_graph,
        safe(graph_ms, lambda: bwd(y, x, K, S, P, [1, 1], False, idx)),
        ours_un_call,
        safe(call_ms, lambda: bwd(y, x, K, S, P, [1, 1], False, idx)),
        "max_pool2d backward",
    )


for case in CASES:
    measure(*case)
    torch.cuda.empty_cache()

lines = [
    f"kernel timings on {torch.cuda.get_device_name(0)}, torch {torch.__version__}; copy_ {copy_gbs:.0f} GB/s",
    "kernel ms: CUDA-graph replay of the _out / out= calls (no allocation, no validation sync);",
    "call ms: eager allocating calls (ours: unpool syncs once per call to check its switches)",
    f"{'case':24s} {'op':6s} {'vs native':27s} {'ours ms':>8s} {'native':>8s} {'speedup':>7s} {'GB/s':>6s} "
    f"{'%copy':>6s} {'call ms':>8s} {'native':>8s}",
]
for r in rows:
    lines.append(
        f"{r['case']:24s} {r['op']:6s} {r['native']:27s} {r['ours_ms']:8.4f} {r['native_ms']:8.4f} "
        f"{r['speedup']:6.2f}x {r['ours_gbs']:6.0f} {100 * r['copy_fraction']:5.0f}% "
        f"{r['ours_call_ms']:8.4f} {r['native_call_ms']:8.4f}"
    )
table = "\n".join(lines)
print(table)
with open(f"{logs}/kernel_table.txt", "w") as fh:
    fh.write(table + "\n")
with open(f"{logs}/kernel_bench.json", "w") as fh:
    json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, copy_gbs=copy_gbs, rows=rows),
              fh, indent=1)
EOF
  kernel_status="ok"
else
  kernel_status="FAILED (exit $?)"
fi

section "3b. xraydeconv bench --device cuda"
if "$PY" -m xraydeconv.cli.main bench --help >/dev/null 2>&1; then
  timeout 150 "$PY" -m xraydeconv.cli.main bench --device cuda --json "$LOGS/bench.json" 2>&1 | tee "$LOGS/bench.txt"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then bench_status="ok"; else bench_status="FAILED (exit $rc)"; fi
else
  bench_status="skipped (the bench command is not available)"
  echo "$bench_status"
fi

section "3c. what the nets run on CUDA: xraydeconv bench --suite --device cuda"
# every pool layer shape of the nets (both layouts, fwd and fwd+bwd, alone and with the ReLU fused) and each
# net's training step with the kernels, auto and native pooling, in one table; the CUDA classes of the dispatch
# table go to $LOGS/dispatch_cuda.py (merged with the CPU ones) for a later commit
if "$PY" -m xraydeconv.cli.main bench --help >/dev/null 2>&1; then
  cp xraydeconv/ops/pool_dispatch_table.py "$LOGS/dispatch_cuda.py"
  timeout 300 "$PY" -m xraydeconv.cli.main bench --suite --device cuda --repeats 9 --json "$LOGS/suite_cuda.json" \
    --write-dispatch "$LOGS/dispatch_cuda.py" 2>&1 | tee "$LOGS/suite_cuda.txt"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then suite_status="ok"; else suite_status="FAILED (exit $rc)"; fi
else
  suite_status="skipped (the bench command is not available)"
  echo "$suite_status"
fi

# ---------------------------------------------------------------------------------------------
section "4. projection report"
if [ "${GPU_CHECK_SKIP_PROJECTION:-0}" = "1" ]; then
  projection_status="skipped (GPU_CHECK_SKIP_PROJECTION=1)"
  echo "$projection_status"
elif [ -f benchmarks/projection_report.py ]; then
  timeout 120 "$PY" benchmarks/projection_report.py --device cuda 2>&1 | tee "$LOGS/projection.txt"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then projection_status="ok"; else projection_status="FAILED (exit $rc)"; fi
else
  projection_status="skipped (benchmarks/projection_report.py not found)"
  echo "$projection_status"
fi

# ---------------------------------------------------------------------------------------------
section "5. project throughput on CUDA, and project under torchrun with NCCL"
if [ "${GPU_CHECK_SKIP_PROJECT:-0}" = "1" ]; then
  project_status="skipped (GPU_CHECK_SKIP_PROJECT=1)"
  echo "$project_status"
else
  gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  # 2 processes (NCCL, one GPU each) where there are 2 GPUs; a bare 1-process run otherwise
  procs=1; [ "$gpus" -ge 2 ] && procs=1,2
  timeout 300 "$PY" benchmarks/bench_project_throughput.py --device cuda --size 256 --films 64 --batch-size 32 \
    --repeat 1 --procs "$procs" --kinds archive,pictures 2>&1 | tee "$LOGS/project_throughput.txt"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then project_status="ok (processes: $procs)"; else project_status="FAILED (exit $rc)"; fi
fi

finish
[[ $build_status == ok* || $build_status == skipped* ]] && [[ $test_status == ok* ]]
}

main 2>&1 | tee "$LOGS/gpu_check.log"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  for f in gpu_check.log build.log build-system-compiler.log pytest.log kernel_bench.json bench.json bench.txt \
    projection.txt project_throughput.txt; do
    if [ -f "$LOGS/$f" ]; then cp "$LOGS/$f" "$OUT/"; fi
  done
  echo "logs copied to \$OUT"
else
  echo "logs in $LOGS"
fi
exit "$rc"
