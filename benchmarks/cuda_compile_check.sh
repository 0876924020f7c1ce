#!/usr/bin/env bash
# Compile check of the CUDA sources on a machine without a GPU (CI runs it when nvcc exists).
#
#   1. nvcc compiles every csrc/cuda/*.cu for sm_80 and sm_90 with the flags of the real build
#      (setup.py + torch's BuildExtension) and prints ptxas's resource usage per kernel;
#      any compiler error or warning, or any register spill, fails the check.
#   2. When a Python with torch is found, g++ syntax-checks the ATen binding csrc/cuda/*.cpp
#      against torch's headers and the CUDA toolkit's (a CPU-only torch wheel lacks one generated
#      c10/cuda header; a stand-in is written to a temporary folder for the check).
#
# Usage: bash benchmarks/cuda_compile_check.sh      (env: NVCC, PYTHON, CXX)
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
CXX=${CXX:-g++}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "cuda_compile_check: $NVCC not found" >&2
  exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/xraydeconv-cuda-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The flags torch's BuildExtension adds for .cu files, plus setup.py's own.
nvcc_flags=(-std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr -Xcompiler -fPIC
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ -Werror all-warnings -Xptxas -v)

demangle() {
  if command -v c++filt >/dev/null 2>&1; then c++filt; else cat; fi
}

# One line per kernel from ptxas -v: registers, stack, spill stores/loads, name. Exit 1 on a spill.
summarise() {
  awk '
    /Compiling entry function/ { name = $0; sub(/.*entry function .?/, "", name); sub(/.? for .sm_[0-9]+.*/, "", name) }
    /bytes stack frame/ { stack = $1; stores = $5; loads = $9 }
    /Used [0-9]+ registers/ {
      regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
      printf "  regs %3d  stack %3d  spill %3d/%-3d  %s\n", regs, stack, stores, loads, name
      if (stores + loads > 0) spilled = 1
    }
    END { exit spilled }
  ' "$1"
}

status=0
shopt -s nullglob
cu_files=(csrc/cuda/*.cu)
if [ ${#cu_files[@]} -eq 0 ]; then
  echo "cuda_compile_check: no csrc/cuda/*.cu files" >&2
  exit 1
fi
echo "== nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
pids=()
logs=()
for src in "${cu_files[@]}"; do
  for arch in 80 90; do
    base=$(basename "$src" .cu)
    log="$work/$base.sm_$arch.log"
    "$NVCC" "${nvcc_flags[@]}" -gencode="arch=compute_$arch,code=sm_$arch" -c "$src" \
      -o "$work/$base.sm_$arch.o" >"$log" 2>&1 &
    pids+=("$!")
    logs+=("$log")
  done
done
for i in "${!pids[@]}"; do
  log=${logs[$i]}
  label=$(basename "$log" .log)
  if ! wait "${pids[$i]}"; then
    echo "FAIL $label: nvcc failed" >&2
    grep -v '^ptxas info' "$log" >&2 || true
    status=1
    continue
  fi
  if grep -v '^ptxas info' "$log" | grep -v '^ *[0-9]* bytes stack frame' | grep -q .; then
    echo "FAIL $label: compiler output besides the resource report:" >&2
    grep -v '^ptxas info' "$log" | grep -v '^ *[0-9]* bytes stack frame' >&2
    status=1
  fi
  n=$(grep -c 'Compiling entry function' "$log" || true)
  echo "== $label: $n kernels"
  if ! summarise "$log" | demangle | sed -e 's/xraydeconv::cuda::(anonymous namespace):://g' \
    -e 's/(.*//' -e 's/unsigned long/u64/g' -e 's/unsigned int/u32/g'; then
    echo "FAIL $label: register spills (see 'spill' above)" >&2
    status=1
  fi
done

cpp_files=(csrc/cuda/*.cpp)
if [ ${#cpp_files[@]} -gt 0 ]; then
  if includes=$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print(' '.join(include_paths()))" 2>/dev/null); then
    py_include=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
    cuda_include=$(dirname "$(dirname "$(command -v "$NVCC")")")/include
    [ -f "$cuda_include/cuda_runtime_api.h" ] || cuda_include=/usr/local/cuda/include
    inc=()
    missing_macros=1
    for p in $includes; do
      inc+=(-isystem "$p")
      [ -f "$p/c10/cuda/impl/cuda_cmake_macros.h" ] && missing_macros=0
    done
    if [ "$missing_macros" -eq 1 ]; then
      mkdir -p "$work/shim/c10/cuda/impl"
      printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$work/shim/c10/cuda/impl/cuda_cmake_macros.h"
      inc+=(-isystem "$work/shim")
      echo "== note: torch has no c10/cuda/impl/cuda_cmake_macros.h (CPU wheel); using a stand-in for the check"
    fi
    for src in "${cpp_files[@]}"; do
      if "$CXX" -std=c++17 -fsyntax-only -Wall -Wextra -Werror "${inc[@]}" -isystem "$py_include" \
        -isystem "$cuda_include" -DXRAYDECONV_WITH_CUDA "$src"; then
        echo "== $CXX -fsyntax-only $src: ok"
      else
        echo "FAIL $CXX -fsyntax-only $src" >&2
        status=1
      fi
    done
  else
    echo "== note: no torch in $PYTHON; skipped the syntax check of ${cpp_files[*]}"
  fi
fi

if [ "$status" -eq 0 ]; then echo "cuda_compile_check: ok"; else echo "cuda_compile_check: FAILED" >&2; fi
exit "$status"
