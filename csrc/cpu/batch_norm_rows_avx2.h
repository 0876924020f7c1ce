// AVX2 + FMA rows of csrc/cpu/batch_norm_relu.cpp for float32 with C a multiple of 8: the operations of torch's
// vectorised batch_norm kernels, lane by lane (every lane is one channel, so the vector width does not change a
// value). The plain loops there compile to scalar code for the pooled rows and to slow mixed-width code elsewhere.
// Only called from functions compiled with XD_TARGET_AVX2, after torch said its kernels use FMA.
#pragma once

#include "cpu_common.h"

#if XD_MULTIVERSION
#include <immintrin.h>

#include <cstring>

namespace xraydeconv {
namespace cpu {
namespace bn_avx2 {

#define XD_TARGET_AVX2_ONLY __attribute__((target("avx2,fma")))

// relu(fma(x, alpha, beta)): max(0, y) keeps NaN and -0 as torch's clamp_min does (max returns its second operand
// for those).
XD_TARGET_AVX2_ONLY inline __m256 bn_relu8(__m256 x, const float* alpha, const float* beta) {
  return _mm256_max_ps(_mm256_setzero_ps(), _mm256_fmadd_ps(x, _mm256_loadu_ps(alpha), _mm256_loadu_ps(beta)));
}

XD_TARGET_AVX2_ONLY inline void forward_row(const float* x, const float* ab, int64_t C, float* out) {
  for (int64_t c = 0; c < C; c += 8) _mm256_storeu_ps(out + c, bn_relu8(_mm256_loadu_ps(x + c), ab + c, ab + C + c));
}

// Byte j of bytes_of(bits): 1 where bit j of the 8-bit `bits` is set, else 0 (a table: pdep is microcoded on some
// AMD cores).
struct ByteTable {
  uint64_t v[256];
  constexpr ByteTable() : v() {
    for (int b = 0; b < 256; ++b) {
      for (int j = 0; j < 8; ++j) v[b] |= static_cast<uint64_t>((b >> j) & 1) << (8 * j);
    }
  }
};
inline constexpr ByteTable kBytes{};
inline uint64_t bytes_of(unsigned bits) { return kBytes.v[bits & 0xFF]; }

// One 2x2 window per channel: the first maximum in row-major order, a later NaN only over a non-NaN (beats()); x at
// that position goes to xs.
XD_TARGET_AVX2_ONLY inline void pool_cell(const float* const* win, const float* ab, int64_t C, float* out,
                                          uint8_t* sw, float* xs) {
  for (int64_t c = 0; c < C; c += 8) {
    __m256 xm = _mm256_loadu_ps(win[0] + c);
    __m256 m = bn_relu8(xm, ab + c, ab + C + c);
    uint64_t s = 0;
    for (int k = 1; k < 4; ++k) {
      const __m256 xk = _mm256_loadu_ps(win[k] + c);
      const __m256 v = bn_relu8(xk, ab + c, ab + C + c);
      const __m256 first_nan = _mm256_and_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q), _mm256_cmp_ps(m, m, _CMP_ORD_Q));
      const __m256 win_k = _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), first_nan);
      m = _mm256_blendv_ps(m, v, win_k);
      xm = _mm256_blendv_ps(xm, xk, win_k);
      const uint64_t set = bytes_of(static_cast<unsigned>(_mm256_movemask_ps(win_k))) * 0xFF;
      s = (s & ~set) | (set & (0x0101010101010101ULL * static_cast<uint64_t>(k)));
    }
    _mm256_storeu_ps(out + c, m);
    _mm256_storeu_ps(xs + c, xm);
    std::memcpy(sw + c, &s, 8);
  }
}

// ReLU's mask on a full-size gradient row: grad where fma(x, alpha, beta) > 0 or NaN, else +0.
XD_TARGET_AVX2_ONLY inline void dense_grad_row(const float* x, const float* grad, const float* ab, int64_t C,
                                               float* g) {
  for (int64_t c = 0; c < C; c += 8) {
    const __m256 y = _mm256_fmadd_ps(_mm256_loadu_ps(x + c), _mm256_loadu_ps(ab + c), _mm256_loadu_ps(ab + C + c));
    const __m256 off = _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_LE_OQ);
    _mm256_storeu_ps(g + c, _mm256_andnot_ps(off, _mm256_loadu_ps(grad + c)));
  }
}

// The pooled gradient of channels c..c+7 where `here` and ReLU kept the pooled value (fma(xs, alpha, beta) > 0 or
// NaN: the value at the switch), else +0; + 0 as torch's pool backward adds it into zeros (-0 arrives as +0).
XD_TARGET_AVX2_ONLY inline __m256 pooled_grad8(const float* grad, const float* xs, const float* ab, int64_t C,
                                               int64_t c, __m256 here) {
  const __m256 y = _mm256_fmadd_ps(_mm256_loadu_ps(xs + c), _mm256_loadu_ps(ab + c), _mm256_loadu_ps(ab + C + c));
  const __m256 off = _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_LE_OQ);
  const __m256 g = _mm256_add_ps(_mm256_loadu_ps(grad + c), _mm256_setzero_ps());
  return _mm256_and_ps(_mm256_andnot_ps(off, here), g);
}

// Lanes whose switch (8 bytes at sw) is `a` or `b` (-1: none).
XD_TARGET_AVX2_ONLY inline __m256 switch_is8(const uint8_t* sw, __m256i a, __m256i b) {
  const __m256i s = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sw)));
  return _mm256_castsi256_ps(_mm256_or_si256(_mm256_cmpeq_epi32(s, a), _mm256_cmpeq_epi32(s, b)));
}

// A full-size gradient row rebuilt from the pooled one: the masked pooled gradient where the switch is `pos`, else
// +0.
XD_TARGET_AVX2_ONLY inline void pooled_grad_row(const float* grad, const uint8_t* sw, const float* xs,
                                                const float* ab, int pos, int64_t C, float* g) {
  const __m256i want = _mm256_set1_epi32(pos), none = _mm256_set1_epi32(-1);
  for (int64_t c = 0; c < C; c += 8) {
    _mm256_storeu_ps(g + c, pooled_grad8(grad, xs, ab, C, c, switch_is8(sw + c, want, none)));
  }
}

// One window's terms of one full-size row to the backward sums: g, the masked pooled gradient where the switch is
// `a` or `b` (the window's positions in that row and chunk), else +0; sum += g; dotp = fma(xs - mean, g, dotp).
XD_TARGET_AVX2_ONLY inline void window_sums(const float* grad, const uint8_t* sw, const float* xs, const float* ab,
                                            const float* mean, int a, int b, int64_t C, float* sum, float* dotp) {
  const __m256i av = _mm256_set1_epi32(a), bv = _mm256_set1_epi32(b);
  for (int64_t c = 0; c < C; c += 8) {
    const __m256 gv = pooled_grad8(grad, xs, ab, C, c, switch_is8(sw + c, av, bv));
    _mm256_storeu_ps(sum + c, _mm256_add_ps(_mm256_loadu_ps(sum + c), gv));
    const __m256 xm = _mm256_sub_ps(_mm256_loadu_ps(xs + c), _mm256_loadu_ps(mean + c));
    _mm256_storeu_ps(dotp + c, _mm256_fmadd_ps(xm, gv, _mm256_loadu_ps(dotp + c)));
  }
}

// sum += g; dotp = fma(x - mean, g, dotp).
XD_TARGET_AVX2_ONLY inline void sums_row(const float* g, const float* x, const float* mean, int64_t C, float* sum,
                                         float* dotp) {
  for (int64_t c = 0; c < C; c += 8) {
    const __m256 gv = _mm256_loadu_ps(g + c);
    _mm256_storeu_ps(sum + c, _mm256_add_ps(_mm256_loadu_ps(sum + c), gv));
    const __m256 xm = _mm256_sub_ps(_mm256_loadu_ps(x + c), _mm256_loadu_ps(mean + c));
    _mm256_storeu_ps(dotp + c, _mm256_fmadd_ps(xm, gv, _mm256_loadu_ps(dotp + c)));
  }
}

// grad_x = fma(-(x - mean), k, g - gm) * invstd * weight.
XD_TARGET_AVX2_ONLY inline void input_row(const float* g, const float* x, const float* mean, const float* k,
                                          const float* gm, const float* invstd, const float* weight, int64_t C,
                                          float* out) {
  for (int64_t c = 0; c < C; c += 8) {
    const __m256 xm = _mm256_sub_ps(_mm256_loadu_ps(x + c), _mm256_loadu_ps(mean + c));
    const __m256 t = _mm256_fnmadd_ps(xm, _mm256_loadu_ps(k + c),
                                      _mm256_sub_ps(_mm256_loadu_ps(g + c), _mm256_loadu_ps(gm + c)));
    _mm256_storeu_ps(out + c,
                     _mm256_mul_ps(_mm256_mul_ps(t, _mm256_loadu_ps(invstd + c)), _mm256_loadu_ps(weight + c)));
  }
}

}  // namespace bn_avx2
}  // namespace cpu
}  // namespace xraydeconv
#endif
