// Hand-vectorised AVX-512 rows for the common float32 NCHW windows (2x2/s2, 3x3/s2). The compiler's own
// vectorisation of the plain loops needs rows of 64+ outputs and falls back to branchy scalar code
// below that (a 32x32 feature map ran 30x slower); masked loads and stores handle the last step of
// a row, plain ones the rest (masked stores used throughout made the speed depend 2.5x on the
// buffers' addresses: they cannot forward to later loads that falsely alias them).
// Only compiled into functions that carry XD_TARGET_AVX512 and only called after cpu_isa() said so.
#pragma once

#include "cpu_common.h"

#if XD_MULTIVERSION
#include <immintrin.h>

namespace xraydeconv {
namespace cpu {

#define XD_TARGET_AVX512_ONLY __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// Lanes [0, rem) of a 16-lane vector, and of the two 16-lane halves of a 32-float span.
XD_TARGET_AVX512_ONLY inline void tail_masks(int64_t rem, __mmask16& k, __mmask16& lo, __mmask16& hi) {
  k = lo = hi = 0xFFFF;
  if (rem < 16) {
    k = static_cast<__mmask16>((1u << rem) - 1);
    lo = rem >= 8 ? 0xFFFF : static_cast<__mmask16>((1u << (2 * rem)) - 1);
    hi = rem > 8 ? static_cast<__mmask16>((1u << (2 * (rem - 8))) - 1) : 0;
  }
}

// Lanes [0, count) of the first / second 16-float half of a 32-float load (count <= 32).
XD_TARGET_AVX512_ONLY inline __mmask16 first_half(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}
XD_TARGET_AVX512_ONLY inline __mmask16 second_half(int64_t count) {
  return count >= 32 ? static_cast<__mmask16>(0xFFFF)
                     : count > 16 ? static_cast<__mmask16>((1u << (count - 16)) - 1) : static_cast<__mmask16>(0);
}

// n pooled outputs of one row for a KHxKW window with column stride 2 (KW = 2 or 3), of which only
// window rows [kh0, kh0 + nkh) lie inside the input: `in` is window row kh0 of the first window, W
// the input row length. 16 outputs per step; the last step is masked, so no load or store leaves
// the row.
template <int KH, int KW>
XD_TARGET_AVX512_ONLY inline void pool_span_s2_f32(const float* in, int64_t W, int64_t n, int64_t kh0, int64_t nkh,
                                                    float* out, uint8_t* sw) {
  static_assert(KW == 2 || KW == 3, "column stride 2 with 2- or 3-wide windows");
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t rem = n - j < 16 ? n - j : 16;
    const __mmask16 k = first_half(rem);
    // columns 2j .. 2j + 2 rem - 1 (first two window columns), 2j + 2 .. 2j + 2 rem (third)
    const __mmask16 lo = first_half(2 * rem), hi = second_half(2 * rem);
    const __mmask16 lo3 = first_half(2 * rem - 1), hi3 = second_half(2 * rem - 1);
    __m512 m = _mm512_setzero_ps();
    __m128i s = _mm_set1_epi8(static_cast<char>(kh0 * KW));
#pragma GCC unroll 3
    for (int kh = 0; kh < KH; ++kh) {
      if (kh >= nkh) break;
      const float* row = in + kh * W + 2 * j;
      // plain loads and stores except in the masked last step: masked stores do not forward to
      // later loads, which turned false address aliasing into 2-3x slowdowns on some buffers
      const __m512 a0 = rem == 16 ? _mm512_loadu_ps(row) : _mm512_maskz_loadu_ps(lo, row);
      const __m512 a1 = rem == 16 ? _mm512_loadu_ps(row + 16) : _mm512_maskz_loadu_ps(hi, row + 16);
      __m512 cand[3];
      cand[0] = _mm512_permutex2var_ps(a0, even, a1);
      cand[1] = _mm512_permutex2var_ps(a0, odd, a1);
      if (KW == 3) {
        const __m512 b0 = _mm512_maskz_loadu_ps(lo3, row + 2), b1 = _mm512_maskz_loadu_ps(hi3, row + 18);
        cand[2] = _mm512_permutex2var_ps(b0, even, b1);
      }
#pragma GCC unroll 3
      for (int kw = 0; kw < KW; ++kw) {
        if (kh == 0 && kw == 0) {
          m = cand[0];
          continue;
        }
        // row-major window order: a later position wins when strictly greater, or when it is the first NaN
        const __mmask16 first_nan =
            _mm512_cmp_ps_mask(cand[kw], cand[kw], _CMP_UNORD_Q) & _mm512_cmp_ps_mask(m, m, _CMP_ORD_Q);
        const __mmask16 win = _mm512_cmp_ps_mask(cand[kw], m, _CMP_GT_OQ) | first_nan;
        m = _mm512_mask_mov_ps(m, win, cand[kw]);
        s = _mm_mask_mov_epi8(s, win, _mm_set1_epi8(static_cast<char>((kh0 + kh) * KW + kw)));
      }
    }
    if (rem == 16) {
      _mm512_storeu_ps(out + j, m);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(sw + j), s);
    } else {
      _mm512_mask_storeu_ps(out + j, k, m);
      _mm_mask_storeu_epi8(sw + j, k, s);
    }
  }
}

// One output row of width 2n of a tiling 2x2 unpool: window row offset kh, n pooled values/switches.
XD_TARGET_AVX512_ONLY inline void unpool_row_2x2_f32(const float* y, const uint8_t* sw, int64_t n, int64_t kh,
                                                      float* out) {
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i left = _mm512_set1_epi32(static_cast<int>(2 * kh));
  const __m512i right = _mm512_set1_epi32(static_cast<int>(2 * kh + 1));
  for (int64_t j = 0; j < n; j += 16) {
    __mmask16 k, lo, hi;
    tail_masks(n - j, k, lo, hi);
    const bool full = n - j >= 16;  // plain loads and stores except in the masked last step
    const __m512 v = full ? _mm512_loadu_ps(y + j) : _mm512_maskz_loadu_ps(k, y + j);
    const __m128i s8 =
        full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(sw + j)) : _mm_maskz_loadu_epi8(k, sw + j);
    const __m512i s = _mm512_cvtepu8_epi32(s8);
    const __m512 ve = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(s, left), v);
    const __m512 vo = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(s, right), v);
    const __m512 out_lo = _mm512_permutex2var_ps(ve, lo_idx, vo), out_hi = _mm512_permutex2var_ps(ve, hi_idx, vo);
    if (full) {
      _mm512_storeu_ps(out + 2 * j, out_lo);
      _mm512_storeu_ps(out + 2 * j + 16, out_hi);
    } else {
      _mm512_mask_storeu_ps(out + 2 * j, lo, out_lo);
      _mm512_mask_storeu_ps(out + 2 * j + 16, hi, out_hi);
    }
  }
}

}  // namespace cpu
}  // namespace xraydeconv
#endif
