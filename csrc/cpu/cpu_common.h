// Helpers shared by the CPU switch-pooling kernels: accumulation types, runtime ISA dispatch and
// the work split for at::parallel_for.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__)
#define XD_ALWAYS_INLINE inline __attribute__((always_inline))
#define XD_RESTRICT __restrict__
#else
#define XD_ALWAYS_INLINE inline
#define XD_RESTRICT
#endif

// The wheel must run on any x86-64, so the hot loops are compiled three times (baseline, AVX2,
// AVX-512) from the same plain C++ and one is picked at run time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define XD_MULTIVERSION 1
#define XD_TARGET_AVX2 __attribute__((target("avx2,fma,bmi2")))
#define XD_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2,prefer-vector-width=512")))
#else
#define XD_MULTIVERSION 0
#endif

namespace xraydeconv {
namespace cpu {

// Reduced-precision values are compared and summed in float.
template <typename T>
struct Acc {
  using type = T;
};
template <>
struct Acc<c10::Half> {
  using type = float;
};
template <>
struct Acc<c10::BFloat16> {
  using type = float;
};
template <typename T>
using acc_t = typename Acc<T>::type;

enum class Isa { Baseline, Avx2, Avx512 };

// The widest instruction set this CPU offers; XRAYDECONV_CPU_ISA=baseline|avx2|avx512 caps it
// (read once; used by the tests to cover every variant).
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::Baseline;
#if XD_MULTIVERSION
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2")) {
      best = Isa::Avx2;
    }
    if (best == Isa::Avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      best = Isa::Avx512;
    }
#endif
    const char* cap = std::getenv("XRAYDECONV_CPU_ISA");
    if (cap != nullptr) {
      if (std::strcmp(cap, "baseline") == 0) best = Isa::Baseline;
      if (std::strcmp(cap, "avx2") == 0 && best == Isa::Avx512) best = Isa::Avx2;
    }
    return best;
  }();
  return isa;
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::Avx512 ? "avx512" : isa == Isa::Avx2 ? "avx2" : "baseline";
}

// NaN propagates like max_pool2d: the first NaN of a window replaces the running maximum and then
// stays (max_pool2d on CPU keeps the last NaN instead; the first one is what the CUDA kernels pick,
// so both backends give the same switches everywhere).
template <typename A>
XD_ALWAYS_INLINE bool beats(A v, A m) {
  return v > m || (v != v && m == m);
}

// Rows per parallel task so that each task handles roughly 128k elements. Waking a second OpenMP thread
// (OMP_WAIT_POLICY=passive: it sleeps between regions) costs tens of microseconds, as much as pooling a
// one-image feature map: with 16k-element tasks those ran slower at 2 threads than at 1 and than native.
inline int64_t grain_rows(int64_t row_len) {
  const int64_t g = 131072 / (row_len > 0 ? row_len : 1);
  return g > 0 ? g : 1;
}

}  // namespace cpu
}  // namespace xraydeconv
