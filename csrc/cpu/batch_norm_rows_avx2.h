// AVX2 + FMA rows of csrc/cpu/batch_norm_relu.cpp for float32 with C a multiple of 8: the operations of torch's
// vectorised batch_norm kernels, lane by lane (every lane is one channel, so the vector width does not change a
// value). The plain loops there compile to scalar code for the pooled rows and to slow mixed-width code elsewhere.
// Only called from functions compiled with XD_TARGET_AVX2, after torch said its kernels use FMA.
#pragma once

#include "cpu_common.h"

#if XD_MULTIVERSION
#include <immintrin.h>

#include <algorithm>
#include <type_traits>

namespace xraydeconv {
namespace cpu {
namespace bn_avx2 {

#define XD_TARGET_AVX2_ONLY __attribute__((target("avx2,fma")))

// relu(fma(x, alpha, beta)): max(0, y) keeps NaN and -0 as torch's clamp_min does (max returns its second operand
// for those).
XD_TARGET_AVX2_ONLY inline __m256 bn_relu8(__m256 x, const float* alpha, const float* beta) {
  return _mm256_max_ps(_mm256_setzero_ps(), _mm256_fmadd_ps(x, _mm256_loadu_ps(alpha), _mm256_loadu_ps(beta)));
}

// relu(fma(x, alpha, beta)) of rows [b, e).
XD_TARGET_AVX2_ONLY inline void forward_rows(const float* x, const float* ab, int64_t C, int64_t b, int64_t e,
                                             float* out) {
  for (int64_t i = b * C; i < e * C; i += C) {
    for (int64_t c = 0; c < C; c += 8) {
      _mm256_storeu_ps(out + i + c, bn_relu8(_mm256_loadu_ps(x + i + c), ab + c, ab + C + c));
    }
  }
}

// The 8 int32 lanes of v (each 0..3) as 8 bytes at p.
XD_TARGET_AVX2_ONLY inline void store_bytes8(__m256i v, uint8_t* p) {
  const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w16, w16));
}

// One 2x2 window per channel: the first maximum in row-major order, a later NaN only over a non-NaN (beats()); x at
// that position goes to xs.
XD_TARGET_AVX2_ONLY inline void pool_cell(const float* const* win, const float* ab, int64_t C, float* out,
                                          uint8_t* sw, float* xs) {
  for (int64_t c = 0; c < C; c += 8) {
    __m256 xm = _mm256_loadu_ps(win[0] + c);
    __m256 m = bn_relu8(xm, ab + c, ab + C + c);
    __m256 best = _mm256_setzero_ps();  // the switch, as int32 lanes
    for (int k = 1; k < 4; ++k) {
      const __m256 xk = _mm256_loadu_ps(win[k] + c);
      const __m256 v = bn_relu8(xk, ab + c, ab + C + c);
      const __m256 first_nan = _mm256_and_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q), _mm256_cmp_ps(m, m, _CMP_ORD_Q));
      const __m256 win_k = _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), first_nan);
      m = _mm256_blendv_ps(m, v, win_k);
      xm = _mm256_blendv_ps(xm, xk, win_k);
      best = _mm256_blendv_ps(best, _mm256_castsi256_ps(_mm256_set1_epi32(k)), win_k);
    }
    _mm256_storeu_ps(out + c, m);
    _mm256_storeu_ps(xs + c, xm);
    store_bytes8(_mm256_castps_si256(best), sw + c);
  }
}

// ReLU's mask on the gradient: grad where fma(x, alpha, beta) > 0 or NaN, else +0.
XD_TARGET_AVX2_ONLY inline __m256 relu_grad8(__m256 x, __m256 alpha, __m256 beta, __m256 grad) {
  const __m256 off = _mm256_cmp_ps(_mm256_fmadd_ps(x, alpha, beta), _mm256_setzero_ps(), _CMP_LE_OQ);
  return _mm256_andnot_ps(off, grad);
}

// NB vectors (8 NB channels from channel c) of each per-channel constant.
template <int NB>
struct Lanes {
  __m256 v[NB];
  XD_TARGET_AVX2_ONLY XD_ALWAYS_INLINE void load(const float* p) {
    for (int k = 0; k < NB; ++k) v[k] = _mm256_loadu_ps(p + 8 * k);
  }
  XD_TARGET_AVX2_ONLY XD_ALWAYS_INLINE void store(float* p) const {
    for (int k = 0; k < NB; ++k) _mm256_storeu_ps(p + 8 * k, v[k]);
  }
};

// The backward's sums walk row ranges in tiles of about kTileFloats values and, within a tile, one block of
// channels at a time with that block's sums held in registers; each channel still sees its rows in order, so every
// sum is the one the row-at-a-time loop gives.
constexpr int64_t kTileFloats = 1024;
inline int64_t tile_rows(int64_t C) { return C >= kTileFloats ? 1 : kTileFloats / C; }

// f(std::integral_constant<int, NB>{}, c) for the blocks of 32, 16 and 8 channels (NB = 4, 2, 1 vectors) that cover
// C, a multiple of 8.
template <typename F>
XD_TARGET_AVX2_ONLY XD_ALWAYS_INLINE void channel_blocks(int64_t C, F&& f) {
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) f(std::integral_constant<int, 4>{}, c);
  for (; c + 16 <= C; c += 16) f(std::integral_constant<int, 2>{}, c);
  for (; c < C; c += 8) f(std::integral_constant<int, 1>{}, c);
}

// The backward's sums of one block over rows [b, e): g = ReLU-masked grad, sum += g, dotp = fma(x - mean, g, dotp).
template <int NB>
XD_TARGET_AVX2_ONLY inline void dense_sums_block(const float* x, const float* grad, const float* ab,
                                                 const float* mean, int64_t C, int64_t c, int64_t b, int64_t e,
                                                 float* sum, float* dotp) {
  Lanes<NB> s, d, al, be, mu;
  s.load(sum + c), d.load(dotp + c), al.load(ab + c), be.load(ab + C + c), mu.load(mean + c);
  for (int64_t i = b; i < e; ++i) {
    for (int k = 0; k < NB; ++k) {
      const __m256 xv = _mm256_loadu_ps(x + i * C + c + 8 * k);
      const __m256 g = relu_grad8(xv, al.v[k], be.v[k], _mm256_loadu_ps(grad + i * C + c + 8 * k));
      s.v[k] = _mm256_add_ps(s.v[k], g);
      d.v[k] = _mm256_fmadd_ps(_mm256_sub_ps(xv, mu.v[k]), g, d.v[k]);
    }
  }
  s.store(sum + c), d.store(dotp + c);
}

// The sums over rows [b, e) of a full-size gradient (C a multiple of 8).
XD_TARGET_AVX2_ONLY inline void dense_sums(const float* x, const float* grad, const float* ab, const float* mean,
                                           int64_t C, int64_t b, int64_t e, float* sum, float* dotp) {
  for (int64_t t = b; t < e; t += tile_rows(C)) {
    const int64_t te = std::min(e, t + tile_rows(C));
    channel_blocks(C, [&](auto nb, int64_t c) {
      dense_sums_block<decltype(nb)::value>(x, grad, ab, mean, C, c, t, te, sum, dotp);
    });
  }
}

// The batch statistics' sums of one block over rows [b, e), as torch's channels-last kernel adds them: sum += x,
// or with the mean (VAR) sum = fma(x - mean, x - mean, sum), its vectorised `y + (x - mean) * (x - mean)`.
template <int NB, bool VAR>
XD_TARGET_AVX2_ONLY inline void stats_block(const float* x, const float* mean, int64_t C, int64_t c, int64_t b,
                                            int64_t e, float* sum) {
  Lanes<NB> s, mu;
  s.load(sum + c);
  if constexpr (VAR) mu.load(mean + c);
  for (int64_t i = b; i < e; ++i) {
    for (int k = 0; k < NB; ++k) {
      const __m256 xv = _mm256_loadu_ps(x + i * C + c + 8 * k);
      if constexpr (VAR) {
        const __m256 d = _mm256_sub_ps(xv, mu.v[k]);
        s.v[k] = _mm256_fmadd_ps(d, d, s.v[k]);
      } else {
        s.v[k] = _mm256_add_ps(xv, s.v[k]);
      }
    }
  }
  s.store(sum + c);
}

// The statistics' sums over rows [b, e) (C a multiple of 8): of x, or (mean not null) of (x - mean)^2.
XD_TARGET_AVX2_ONLY inline void stats_sums(const float* x, const float* mean, int64_t C, int64_t b, int64_t e,
                                           float* sum) {
  for (int64_t t = b; t < e; t += tile_rows(C)) {
    const int64_t te = std::min(e, t + tile_rows(C));
    channel_blocks(C, [&](auto nb, int64_t c) {
      constexpr int NB = decltype(nb)::value;
      mean ? stats_block<NB, true>(x, mean, C, c, t, te, sum) : stats_block<NB, false>(x, mean, C, c, t, te, sum);
    });
  }
}

// grad_x's per-channel constants: fma(-(x - mean), k, g - gm) * invstd * weight, and ReLU's alpha and beta.
struct InputConsts {
  const float *ab, *mean, *k, *gm, *invstd, *weight;
};

// grad_x of channels c..c+7 from x and the masked gradient g there.
XD_TARGET_AVX2_ONLY XD_ALWAYS_INLINE __m256 grad_x8(const InputConsts& q, int64_t c, __m256 x, __m256 g) {
  const __m256 t = _mm256_fnmadd_ps(_mm256_sub_ps(x, _mm256_loadu_ps(q.mean + c)), _mm256_loadu_ps(q.k + c),
                                    _mm256_sub_ps(g, _mm256_loadu_ps(q.gm + c)));
  return _mm256_mul_ps(_mm256_mul_ps(t, _mm256_loadu_ps(q.invstd + c)), _mm256_loadu_ps(q.weight + c));
}

// grad_x over rows [b, e) from a full-size gradient; out may be grad (each value is read before it is written).
XD_TARGET_AVX2_ONLY inline void dense_input(const float* x, const float* grad, const InputConsts& q, int64_t C,
                                            int64_t b, int64_t e, float* out) {
  for (int64_t i = b * C; i < e * C; i += C) {
    for (int64_t c = 0; c < C; c += 8) {
      const __m256 xv = _mm256_loadu_ps(x + i + c);
      const __m256 g = relu_grad8(xv, _mm256_loadu_ps(q.ab + c), _mm256_loadu_ps(q.ab + C + c),
                                  _mm256_loadu_ps(grad + i + c));
      _mm256_storeu_ps(out + i + c, grad_x8(q, c, xv, g));
    }
  }
}

// The masked pooled gradient of 8 channels where `here`, else +0; + 0 as torch's pool backward adds it into zeros
// (-0 arrives as +0).
XD_TARGET_AVX2_ONLY inline __m256 pooled_grad8(__m256 grad, __m256 xs, __m256 alpha, __m256 beta, __m256 here) {
  return _mm256_and_ps(here, relu_grad8(xs, alpha, beta, _mm256_add_ps(grad, _mm256_setzero_ps())));
}

// Lanes whose switch (8 bytes at sw) is `a` or `b` (-1: none).
XD_TARGET_AVX2_ONLY inline __m256 switch_is8(const uint8_t* sw, __m256i a, __m256i b) {
  const __m256i s = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sw)));
  return _mm256_castsi256_ps(_mm256_or_si256(_mm256_cmpeq_epi32(s, a), _mm256_cmpeq_epi32(s, b)));
}

// A pooled row of the 2x2 pool: its gradient, switches and x at the switches, from window 0, C channels each.
struct PooledRow {
  const float* grad;
  const uint8_t* sw;
  const float* xs;
};

// Window pw's term to one block's sums: g, the masked pooled gradient where its switch is `a` or `b` (-1: none),
// sum += g, dotp = fma(xs - mean, g, dotp).
template <int NB>
XD_TARGET_AVX2_ONLY XD_ALWAYS_INLINE void window_sums(const PooledRow& p, int64_t j, const Lanes<NB>& al,
                                                      const Lanes<NB>& be, const Lanes<NB>& mu, __m256i a, __m256i b,
                                                      Lanes<NB>& s, Lanes<NB>& d) {
  for (int k = 0; k < NB; ++k) {
    const __m256 xs = _mm256_loadu_ps(p.xs + j + 8 * k);
    const __m256 g =
        pooled_grad8(_mm256_loadu_ps(p.grad + j + 8 * k), xs, al.v[k], be.v[k], switch_is8(p.sw + j + 8 * k, a, b));
    s.v[k] = _mm256_add_ps(s.v[k], g);
    d.v[k] = _mm256_fmadd_ps(_mm256_sub_ps(xs, mu.v[k]), g, d.v[k]);
  }
}

// One block's terms of full-size row h's columns [w0, end) (w0 < end <= 2 OW) to the sums, windows in order: each
// window's positions in this row (kh = h % 2) that lie in the range.
template <int NB>
XD_TARGET_AVX2_ONLY inline void pooled_sums_block(const PooledRow& p, const float* ab, const float* mean, int64_t C,
                                                  int64_t c, int dh, int64_t w0, int64_t end, float* sum,
                                                  float* dotp) {
  Lanes<NB> s, d, al, be, mu;
  s.load(sum + c), d.load(dotp + c), al.load(ab + c), be.load(ab + C + c), mu.load(mean + c);
  const __m256i none = _mm256_set1_epi32(-1), left = _mm256_set1_epi32(dh), right = _mm256_set1_epi32(dh + 1);
  int64_t pw = w0 / 2;
  if (w0 % 2 == 1) {  // the window's left column belongs to the previous chunk
    window_sums<NB>(p, pw * C + c, al, be, mu, none, right, s, d);
    ++pw;
  }
  for (; 2 * pw + 1 < end; ++pw) window_sums<NB>(p, pw * C + c, al, be, mu, left, right, s, d);
  if (2 * pw < end) window_sums<NB>(p, pw * C + c, al, be, mu, left, none, s, d);  // right column: next chunk's
  s.store(sum + c), d.store(dotp + c);
}

// The terms of full-size row h's columns [w0, end) to the sums (end <= 2 OW).
XD_TARGET_AVX2_ONLY inline void pooled_sums(const PooledRow& p, const float* ab, const float* mean, int64_t C, int dh,
                                            int64_t w0, int64_t end, float* sum, float* dotp) {
  if (w0 >= end) return;
  channel_blocks(C, [&](auto nb, int64_t c) {
    pooled_sums_block<decltype(nb)::value>(p, ab, mean, C, c, dh, w0, end, sum, dotp);
  });
}

// grad_x of full-size row h's columns [w0, w1): the pooled gradient enters at the switches (pooled columns below
// pooled_w, as many as the pool has), elsewhere g = +0. x and out point at the row's column 0.
XD_TARGET_AVX2_ONLY inline void pooled_input(const PooledRow& p, bool pooled_row, int64_t pooled_w, int dh,
                                             const float* x, const InputConsts& q, int64_t C, int64_t w0, int64_t w1,
                                             float* out) {
  const int64_t wp = pooled_row ? std::min(w1, 2 * pooled_w) : w0;  // columns [w0, wp) have a window
  const __m256i none = _mm256_set1_epi32(-1);
  const __m256i at[2] = {_mm256_set1_epi32(dh), _mm256_set1_epi32(dh + 1)};
  int64_t w = w0;
  for (; w < wp; ++w) {
    const int64_t j = (w / 2) * C;
    for (int64_t c = 0; c < C; c += 8) {
      const __m256 g = pooled_grad8(_mm256_loadu_ps(p.grad + j + c), _mm256_loadu_ps(p.xs + j + c),
                                    _mm256_loadu_ps(q.ab + c), _mm256_loadu_ps(q.ab + C + c),
                                    switch_is8(p.sw + j + c, at[w & 1], none));
      _mm256_storeu_ps(out + w * C + c, grad_x8(q, c, _mm256_loadu_ps(x + w * C + c), g));
    }
  }
  for (; w < w1; ++w) {
    for (int64_t c = 0; c < C; c += 8) {
      _mm256_storeu_ps(out + w * C + c, grad_x8(q, c, _mm256_loadu_ps(x + w * C + c), _mm256_setzero_ps()));
    }
  }
}

}  // namespace bn_avx2
}  // namespace cpu
}  // namespace xraydeconv
#endif
