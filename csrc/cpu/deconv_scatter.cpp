// One deconvnet step as a sparse scatter: (unpool with switches ->) ReLU -> transposed conv, stride 1.
//
// In a deconvnet the transposed conv below an unpooling sees only one non-zero in each pooling window,
// and the rectification zeroes about half of the rest; a dense GEMM multiplies all those zeros (the
// switch differs per channel, so no dense layout skips them). Here every positive input value adds
// its filter taps, weight[c, ky, kx, :], to the channels-last output pixels it reaches: the work is
// proportional to the non-zeros, and the inner loop is a contiguous axpy over the output channels.
//
// Layouts (all contiguous): g (P, h, w, C) channels-last signal; switches (B, h, w, C) uint8 or
// undefined (no unpooling), projection p uses switches[p / group]; weight (C, kH, kW, Cout) = the
// conv weight transposed to "filter, tap, input channel"; output (P, OH, OW, Cout).
//
// relu_scatter_conv_transpose2d_pair runs two such steps in one pass, the second without unpooling (a sliding
// 3x3 scatter, or a gathering one into at most 4 channels: the transposed first conv), without materialising the
// plane between them (pair_range).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu_common.h"

#if XD_MULTIVERSION
#include <immintrin.h>
#endif

namespace xraydeconv {
namespace cpu {
namespace {

struct ScatterArgs {
  const float* g;
  const uint8_t* sw;  // nullptr: no unpooling
  const float* wt;
  float* out;
  int64_t h, w, C, kH, kW, Cout, OH, OW, padH, padW, pkH, pkW, group;
  const float* wg = nullptr;  // weight as (Cout, kH, kW, C) for the gathering path, else nullptr
  // Row r of an output (input) plane is row r & mask: all ones for a whole plane, R - 1 for a ring of R rows
  // (the intermediate of relu_scatter_conv_transpose2d_pair). Only the sliding and gathering paths use them.
  int64_t out_mask = -1, in_mask = -1;
};

// The projections [begin, end). COUT > 0 fixes the output channel count at compile time so that the axpy
// becomes a few full-width vector FMAs; 0 is the generic loop.
template <int COUT>
XD_ALWAYS_INLINE void scatter_range(const ScatterArgs& a, int64_t begin, int64_t end) {
  const int64_t h = a.h, w = a.w, C = a.C, kH = a.kH, kW = a.kW, OH = a.OH, OW = a.OW;
  const int64_t padH = a.padH, padW = a.padW, pkH = a.pkH, pkW = a.pkW;
  const int64_t Cout = COUT > 0 ? COUT : a.Cout;
  const int64_t plane_in = h * w * C, plane_out = OH * OW * Cout;
  const float* XD_RESTRICT wt = a.wt;
  for (int64_t p = begin; p < end; ++p) {
    const float* XD_RESTRICT gp = a.g + p * plane_in;
    const uint8_t* XD_RESTRICT sp = a.sw ? a.sw + (p / a.group) * plane_in : nullptr;
    float* XD_RESTRICT op = a.out + p * plane_out;
    for (int64_t i = 0; i < h; ++i) {
      for (int64_t j = 0; j < w; ++j) {
        const int64_t base = (i * w + j) * C;
        for (int64_t c = 0; c < C; ++c) {
          const float v = gp[base + c];
          if (!(v > 0.f)) continue;  // the deconvnet's rectification: zeros, negatives (and NaN) add nothing
          int64_t Y = i, X = j;
          if (sp) {
            const int64_t s = sp[base + c];
            Y = i * pkH + s / pkW;
            X = j * pkW + s % pkW;
          }
          const int64_t ky0 = std::max<int64_t>(0, padH - Y), ky1 = std::min<int64_t>(kH, OH + padH - Y);
          const int64_t kx0 = std::max<int64_t>(0, padW - X), kx1 = std::min<int64_t>(kW, OW + padW - X);
          for (int64_t ky = ky0; ky < ky1; ++ky) {
            float* XD_RESTRICT orow = op + ((Y + ky - padH) * OW + (X - padW)) * Cout;
            const float* XD_RESTRICT wrow = wt + (c * kH + ky) * kW * Cout;
            for (int64_t kx = kx0; kx < kx1; ++kx) {
              float* XD_RESTRICT o = orow + kx * Cout;
              const float* XD_RESTRICT wk = wrow + kx * Cout;
              if constexpr (COUT > 0) {
#pragma GCC unroll 16
                for (int k = 0; k < COUT; ++k) o[k] += v * wk[k];
              } else {
                for (int64_t k = 0; k < Cout; ++k) o[k] += v * wk[k];
              }
            }
          }
        }
      }
    }
  }
}

// The fast path for 3x3 kernels and Cout a multiple of 16. Each input row is first listed: per pixel (and per
// switch position under a pooling) the positive values with their filters' weight offsets, branch-free (the
// signs are as good as random: a branch per value would mispredict half the time). The lists are then reduced
// into register accumulators of 16 output channels, a 3x3 block (4x4 for 2x2 windows, whose four switch
// positions share one block) that slides along the row: when it moves on, its left column is final for this
// row and goes to memory. Accumulating in registers matters: a plain axpy per value re-reads and re-writes the
// same 9 output vectors for every channel of the pixel, a chain of store-to-load dependencies that runs several
// times slower. An output row's first write is a plain store, so the output is never zero-filled.
// 16 floats: one AVX-512 register in the AVX-512 variant, split by the compiler in the narrower ones.
typedef float vec16 __attribute__((vector_size(64)));

XD_ALWAYS_INLINE vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

XD_ALWAYS_INLINE void store16(float* p, vec16 v) { std::memcpy(p, &v, sizeof(v)); }

// The positive values of one input row: list (j, s, b) (pixel j, switch position s, s = 0 without pooling, and
// channel block b: channels [b * blk, (b + 1) * blk)) is entries [begin[k], begin[k + 1]), k = (j * npos + s) *
// nblk + b, of (weight offset c * step, value). Each channel lands in one list at most; the 16 spare entries take
// the full-width stores of the AVX-512 lister. The blocks keep the weights a pass reads in L1: blk = 32 channels
// of a 3x3 kernel into 16 outputs is 18 KB (the whole weight of a 128-channel layer, read for every value, ran at
// half the speed from L2).
struct RowLists {
  int64_t blk, nblk;
  std::vector<int32_t> off;
  std::vector<float> val;
  std::vector<int64_t> begin;
  RowLists(int64_t w, int64_t C, int64_t npos, int64_t block = 32)
      : blk(block), nblk((C + block - 1) / block), off(w * C + 16), val(w * C + 16), begin(w * npos * nblk + 1) {}
};

XD_ALWAYS_INLINE void list_row_scalar(const float* XD_RESTRICT gp, const uint8_t* XD_RESTRICT sp, int64_t w,
                                      int64_t C, int64_t npos, int32_t step, RowLists& L) {
  int32_t* XD_RESTRICT off = L.off.data();
  float* XD_RESTRICT val = L.val.data();
  int64_t m = 0, k = 0;
  for (int64_t j = 0; j < w; ++j) {
    for (int64_t s = 0; s < npos; ++s) {
      for (int64_t c = 0; c < C; ++c) {
        if (c % L.blk == 0) L.begin[k++] = m;
        const float v = gp[j * C + c];
        off[m] = static_cast<int32_t>(c) * step;
        val[m] = v;
        // the deconvnet's rectification: zeros, negatives (and NaN) add nothing
        m += (v > 0.f) & (!sp || sp[j * C + c] == s);
      }
    }
  }
  L.begin[k] = m;
}

#if XD_MULTIVERSION
#define XD_AVX512_ONLY __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// The same lists, 16 channels at a time: a mask of the positive lanes (and of the switch), compressed into place.
// The register form of vcompressps with a plain store: the memory form is microcoded and slow on some CPUs.
XD_AVX512_ONLY inline void list_row_avx512(const float* XD_RESTRICT gp, const uint8_t* XD_RESTRICT sp, int64_t w,
                                           int64_t C, int64_t npos, int32_t step, RowLists& L) {
  int32_t* XD_RESTRICT off = L.off.data();
  float* XD_RESTRICT val = L.val.data();
  const __m512i first = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(step));
  const __m512i next = _mm512_set1_epi32(16 * step);
  const __m512 zero = _mm512_setzero_ps();
  int64_t m = 0, b = 0;
  for (int64_t j = 0; j < w; ++j) {
    for (int64_t s = 0; s < npos; ++s) {
      __m512i offs = first;
      for (int64_t c0 = 0; c0 < C; c0 += 16, offs = _mm512_add_epi32(offs, next)) {
        if (c0 % L.blk == 0) L.begin[b++] = m;
        const __mmask16 lanes = C - c0 >= 16 ? static_cast<__mmask16>(0xFFFF)
                                             : static_cast<__mmask16>((1u << (C - c0)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(lanes, gp + j * C + c0);
        __mmask16 k = _mm512_mask_cmp_ps_mask(lanes, v, zero, _CMP_GT_OQ);  // NaN: not positive
        if (sp) {
          const __m128i sw = _mm_maskz_loadu_epi8(lanes, sp + j * C + c0);
          k = _mm_mask_cmpeq_epi8_mask(k, sw, _mm_set1_epi8(static_cast<char>(s)));
        }
        _mm512_storeu_ps(val + m, _mm512_maskz_compress_ps(k, v));
        _mm512_storeu_si512(off + m, _mm512_maskz_compress_epi32(k, offs));
        m += __builtin_popcount(k);
      }
    }
  }
  L.begin[b] = m;
}
#endif

template <bool V512>
XD_ALWAYS_INLINE void list_row(const float* gp, const uint8_t* sp, int64_t w, int64_t C, int64_t npos, int32_t step,
                               RowLists& L) {
#if XD_MULTIVERSION
  if constexpr (V512) return list_row_avx512(gp, sp, w, C, npos, step, L);
#endif
  list_row_scalar(gp, sp, w, C, npos, step, L);
}

// Output pixel (oy, ox), channels [o0, o0 + 16): its first write stores, the later ones add.
XD_ALWAYS_INLINE void flush16(float* op, int64_t oy, int64_t ox, const ScatterArgs& a, int64_t o0, bool first,
                              vec16 v) {
  if (oy < 0 || oy >= a.OH || ox < 0 || ox >= a.OW) return;
  float* o = op + ((oy & a.out_mask) * a.OW + ox) * a.Cout + o0;
  store16(o, first ? v : load16(o) + v);
}

// The R output rows a sliding block writes, at channel o0: each row's start (nullptr outside the plane) and
// whether this pass writes it first. Column ox of row r then needs no bounds check inside the plane.
template <int R>
struct BlockRows {
  float* row[R];
  bool first[R];
  BlockRows(const ScatterArgs& a, float* op, int64_t oy0, int64_t o0, const bool (&first_write)[R]) {
    for (int r = 0; r < R; ++r) {
      const int64_t oy = oy0 + r;
      row[r] = oy >= 0 && oy < a.OH ? op + (oy & a.out_mask) * a.OW * a.Cout + o0 : nullptr;
      first[r] = first_write[r];
    }
  }
  XD_ALWAYS_INLINE void put(int r, int64_t ox, int64_t Cout, vec16 v) const {
    if (row[r] == nullptr) return;
    float* o = row[r] + ox * Cout;
    store16(o, first[r] ? v : load16(o) + v);
  }
};

// Input row i through a 3x3 kernel, no unpooling, channels [o0, o0 + 16), the values of channel blocks
// [b0, b1). Output row i - padH + ky is first written by this input row when ky == 2 (or i == 0): the rows above
// were reached by the input rows above; and by its first channel block.
XD_ALWAYS_INLINE void scatter_row_3x3(const ScatterArgs& a, const RowLists& L, int64_t i, float* op, int64_t o0,
                                      int64_t b0, int64_t b1) {
  const int64_t w = a.w, Cout = a.Cout;
  const int32_t* XD_RESTRICT off = L.off.data();
  const float* XD_RESTRICT val = L.val.data();
  const float* XD_RESTRICT wt = a.wt + o0;
  const bool first[3] = {b0 == 0 && i == 0, b0 == 0 && i == 0, b0 == 0};
  const BlockRows<3> rows(a, op, i - a.padH, o0, first);
  vec16 acc[9];
  for (int t = 0; t < 9; ++t) acc[t] = vec16{};
  for (int64_t j = 0; j < w + 2; ++j) {  // two more steps flush the last two columns
    if (j < w) {
      for (int64_t q = L.begin[j * L.nblk + b0]; q < L.begin[j * L.nblk + b1]; ++q) {
        const float v = val[q];
        const float* XD_RESTRICT wc = wt + off[q];
#pragma GCC unroll 9
        for (int t = 0; t < 9; ++t) acc[t] += v * load16(wc + t * Cout);
      }
    }
    const int64_t ox = j - a.padW;
    for (int ky = 0; ky < 3; ++ky) {
      if (ox >= 0 && ox < a.OW) rows.put(ky, ox, Cout, acc[ky * 3]);
      acc[ky * 3] = acc[ky * 3 + 1];
      acc[ky * 3 + 1] = acc[ky * 3 + 2];
      acc[ky * 3 + 2] = vec16{};
    }
  }
}

// Adds the list of one switch position (SY, SX) of a 2x2 window into the 4x4 block of accumulators.
template <int SY, int SX>
XD_ALWAYS_INLINE void accumulate_2x2(vec16 (&acc)[16], const RowLists& L, int64_t q0, int64_t q1,
                                     const float* XD_RESTRICT wt, int64_t Cout) {
  for (int64_t q = q0; q < q1; ++q) {
    const float v = L.val[q];
    const float* XD_RESTRICT wc = wt + L.off[q];
#pragma GCC unroll 3
    for (int ky = 0; ky < 3; ++ky) {
#pragma GCC unroll 3
      for (int kx = 0; kx < 3; ++kx) acc[(SY + ky) * 4 + SX + kx] += v * load16(wc + (ky * 3 + kx) * Cout);
    }
  }
}

// Window row i of a 2x2 unpooling through a 3x3 kernel with padding 1, channels [o0, o0 + 16), the values of
// channel blocks [b0, b1): window j reaches the 4x4 output block at (2i - 1, 2j - 1); its two lower rows are
// first written here (by the first block), the two upper ones were written by window row i - 1 (except in row 0).
XD_ALWAYS_INLINE void scatter_row_2x2(const ScatterArgs& a, const RowLists& L, int64_t i, float* op, int64_t o0,
                                      int64_t b0, int64_t b1) {
  const int64_t w = a.w, Cout = a.Cout;
  const float* XD_RESTRICT wt = a.wt + o0;
  const bool first[4] = {b0 == 0 && i == 0, b0 == 0 && i == 0, b0 == 0, b0 == 0};
  const BlockRows<4> rows(a, op, 2 * i - 1, o0, first);
  vec16 acc[16];
  for (int t = 0; t < 16; ++t) acc[t] = vec16{};
  for (int64_t j = 0; j <= w; ++j) {  // one more step flushes the last two columns
    if (j < w) {
      const int64_t* b = L.begin.data() + 4 * j * L.nblk;
      const int64_t n = L.nblk;
      accumulate_2x2<0, 0>(acc, L, b[b0], b[b1], wt, Cout);
      accumulate_2x2<0, 1>(acc, L, b[n + b0], b[n + b1], wt, Cout);
      accumulate_2x2<1, 0>(acc, L, b[2 * n + b0], b[2 * n + b1], wt, Cout);
      accumulate_2x2<1, 1>(acc, L, b[3 * n + b0], b[3 * n + b1], wt, Cout);
    }
    const int64_t ox = 2 * j - 1;
    const bool inside = ox >= 0 && ox + 1 < a.OW;
    for (int r = 0; r < 4; ++r) {
      if (inside) {
        rows.put(r, ox, Cout, acc[r * 4]);
        rows.put(r, ox + 1, Cout, acc[r * 4 + 1]);
      } else {
        if (ox >= 0 && ox < a.OW) rows.put(r, ox, Cout, acc[r * 4]);
        if (ox + 1 < a.OW) rows.put(r, ox + 1, Cout, acc[r * 4 + 1]);
      }
      acc[r * 4] = acc[r * 4 + 2];
      acc[r * 4 + 1] = acc[r * 4 + 3];
      acc[r * 4 + 2] = acc[r * 4 + 3] = vec16{};
    }
  }
}

// All output channels of input row i (listed in L): one pass per channel block, or a single pass over all blocks
// when the row holds so few values (the top layer's signal, one channel of many) that the passes would cost more.
XD_ALWAYS_INLINE void scatter_row(const ScatterArgs& a, const RowLists& L, int64_t i, float* op) {
  const bool blocked = L.begin.back() >= 2 * a.w * L.nblk;
  for (int64_t o0 = 0; o0 < a.Cout; o0 += 16) {
    for (int64_t b = 0; b < L.nblk; b = blocked ? b + 1 : L.nblk) {
      const int64_t b1 = blocked ? b + 1 : L.nblk;
      if (a.sw) scatter_row_2x2(a, L, i, op, o0, b, b1);
      else scatter_row_3x3(a, L, i, op, o0, b, b1);
    }
  }
}

// 3x3 kernel, Cout % 16 == 0, no unpooling or 2x2 windows with padding 1 (see sliding_covers for the output
// pixels this writes; the caller zero-fills the output when some are left over).
template <bool V512>
XD_ALWAYS_INLINE void scatter_range_sliding(const ScatterArgs& a, int64_t begin, int64_t end) {
  const int64_t h = a.h, w = a.w, C = a.C, Cout = a.Cout;
  const int64_t npos = a.sw ? 4 : 1;
  const int64_t plane_in = h * w * C, plane_out = a.OH * a.OW * Cout;
  RowLists L(w, C, npos);
  for (int64_t p = begin; p < end; ++p) {
    const float* gp = a.g + p * plane_in;
    const uint8_t* sp = a.sw ? a.sw + (p / a.group) * plane_in : nullptr;
    float* op = a.out + p * plane_out;
    for (int64_t i = 0; i < h; ++i) {
      list_row<V512>(gp + i * w * C, sp ? sp + i * w * C : nullptr, w, C, npos, static_cast<int32_t>(9 * Cout), L);
      scatter_row(a, L, i, op);
    }
  }
}

// Other windows under a 3x3 kernel: per input pixel and switch position, the listed values go into a 3x3 block of
// register accumulators added to the output, whose rows are zeroed just ahead of the scatter.
XD_ALWAYS_INLINE void scatter_range_3x3_pooled(const ScatterArgs& a, int64_t begin, int64_t end) {
  constexpr int V = 16;
  const int64_t h = a.h, w = a.w, C = a.C, OH = a.OH, OW = a.OW, Cout = a.Cout;
  const int64_t padH = a.padH, padW = a.padW, pkH = a.pkH, pkW = a.pkW;
  const int64_t npos = pkH * pkW;
  const int64_t plane_in = h * w * C, plane_out = OH * OW * Cout;
  RowLists L(1, C, npos, C);
  for (int64_t p = begin; p < end; ++p) {
    const float* XD_RESTRICT gp = a.g + p * plane_in;
    const uint8_t* XD_RESTRICT sp = a.sw + (p / a.group) * plane_in;
    float* XD_RESTRICT op = a.out + p * plane_out;
    int64_t zeroed = 0;
    for (int64_t i = 0; i < h; ++i) {
      // the last output row input row i reaches is i * pkH + pkH + 1 - padH
      const int64_t upto = std::min(OH, i * pkH + pkH + 2 - padH);
      if (upto > zeroed) {
        std::memset(op + zeroed * OW * Cout, 0, sizeof(float) * (upto - zeroed) * OW * Cout);
        zeroed = upto;
      }
      for (int64_t j = 0; j < w; ++j) {
        list_row_scalar(gp + (i * w + j) * C, sp + (i * w + j) * C, 1, C, npos, static_cast<int32_t>(9 * Cout), L);
        for (int64_t s = 0; s < npos; ++s) {
          const int64_t q0 = L.begin[s], q1 = L.begin[s + 1];
          if (q0 == q1) continue;
          const int64_t Y = i * pkH + s / pkW, X = j * pkW + s % pkW;
          for (int64_t o0 = 0; o0 < Cout; o0 += V) {
            vec16 acc[9];
            for (int t = 0; t < 9; ++t) acc[t] = vec16{};
            for (int64_t q = q0; q < q1; ++q) {
              const float v = L.val[q];
              const float* XD_RESTRICT wc = a.wt + L.off[q] + o0;
#pragma GCC unroll 9
              for (int t = 0; t < 9; ++t) acc[t] += v * load16(wc + t * Cout);
            }
            for (int t = 0; t < 9; ++t) flush16(op, Y + t / 3 - padH, X + t % 3 - padW, a, o0, false, acc[t]);
          }
        }
      }
    }
    if (zeroed < OH) std::memset(op + zeroed * OW * Cout, 0, sizeof(float) * (OH - zeroed) * OW * Cout);
  }
}

// Few output channels (the transposed first conv, into the image's 1-3 channels) and no unpooling: gathering
// is better than scattering there. Each output value is a dot product over the rectified channels-last input
// vectors of its kH x kW neighbours, 16 channels per vector, with one horizontal sum at the end; the dense
// transposed conv of oneDNN vectorises poorly with a single output channel.
XD_ALWAYS_INLINE float gather_pixel(const ScatterArgs& a, const float* XD_RESTRICT gp, int64_t oy, int64_t ox,
                                    int64_t co) {
  const int64_t h = a.h, w = a.w, C = a.C, kH = a.kH, kW = a.kW;
  const vec16 zero{};
  vec16 acc{};
  for (int64_t ky = 0; ky < kH; ++ky) {
    const int64_t iy = oy + a.padH - ky;
    if (iy < 0 || iy >= h) continue;
    for (int64_t kx = 0; kx < kW; ++kx) {
      const int64_t ix = ox + a.padW - kx;
      if (ix < 0 || ix >= w) continue;
      const float* XD_RESTRICT gv = gp + ((iy & a.in_mask) * w + ix) * C;
      const float* XD_RESTRICT wv = a.wg + ((co * kH + ky) * kW + kx) * C;
      for (int64_t c0 = 0; c0 < C; c0 += 16) {
        vec16 v = load16(gv + c0);
        v = v > zero ? v : zero;  // the deconvnet's rectification
        acc += v * load16(wv + c0);
      }
    }
  }
  float sum = 0.f;
  for (int k = 0; k < 16; ++k) sum += acc[k];
  return sum;
}

#if XD_MULTIVERSION
// Lane k: the sum of the 16 lanes of a[4 * (k % 4) + k / 4] (a reduction tree of 15 shuffle pairs).
XD_AVX512_ONLY inline __m512 sum16_transposed(const __m512 (&a)[16]) {
  __m512 s[8], t[4], u[2];
  for (int m = 0; m < 8; ++m)
    s[m] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], 0xEE));
  for (int n = 0; n < 4; ++n)
    t[n] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * n], s[2 * n + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * n], s[2 * n + 1], 0xDD));
  for (int m = 0; m < 2; ++m)
    u[m] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * m], t[2 * m + 1], 0x44), _mm512_shuffle_ps(t[2 * m], t[2 * m + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xDD));
}

// 16 neighbouring outputs (oy, ox0 .. ox0 + 15) of channel co whose input neighbours all lie inside the row: 16
// dot products side by side, summed by one reduction tree instead of 16 horizontal sums. CC: the input channels
// when known at compile time (16: the 16 pixels are fixed offsets from one pointer), else 0.
template <int CC>
XD_AVX512_ONLY inline void gather_block16(const ScatterArgs& a, const float* XD_RESTRICT gp, int64_t oy, int64_t ox0,
                                          int64_t co, float* XD_RESTRICT out) {
  const int64_t w = a.w, C = CC > 0 ? CC : a.C, kH = a.kH, kW = a.kW;
  const __m512 zero = _mm512_setzero_ps();
  __m512 acc[16];
  for (int k = 0; k < 16; ++k) acc[k] = zero;
  for (int64_t ky = 0; ky < kH; ++ky) {
    const int64_t iy = oy + a.padH - ky;
    if (iy < 0 || iy >= a.h) continue;
    for (int64_t kx = 0; kx < kW; ++kx) {
      const float* XD_RESTRICT row = gp + ((iy & a.in_mask) * w + ox0 + a.padW - kx) * C;
      const float* XD_RESTRICT wv = a.wg + ((co * kH + ky) * kW + kx) * C;
      for (int64_t c0 = 0; c0 < C; c0 += 16) {
        const __m512 wk = _mm512_loadu_ps(wv + c0);
#pragma GCC unroll 16
        for (int k = 0; k < 16; ++k) {
          const __m512 v = _mm512_max_ps(_mm512_loadu_ps(row + k * C + c0), zero);  // the rectification
          const int slot = 4 * (k % 4) + k / 4;
          acc[slot] = _mm512_fmadd_ps(v, wk, acc[slot]);
        }
      }
    }
  }
  _mm512_storeu_ps(out, sum16_transposed(acc));
}
#endif

// Output row oy of one projection (gp its input plane, op its output plane).
template <bool V512>
XD_ALWAYS_INLINE void gather_row(const ScatterArgs& a, const float* XD_RESTRICT gp, float* XD_RESTRICT op, int64_t oy) {
  const int64_t OW = a.OW, Cout = a.Cout;
  // outputs whose kW input neighbours all lie inside the row: ox + padW - (kW - 1) >= 0, ox + padW < w
  const int64_t lo = std::min(OW, std::max<int64_t>(0, a.kW - 1 - a.padW));
  const int64_t hi = std::max(lo, std::min(OW, a.w - a.padW));
  for (int64_t co = 0; co < Cout; ++co) {
    float* XD_RESTRICT orow = op + oy * OW * Cout + co;
    int64_t ox = 0;
    if constexpr (V512) {
#if XD_MULTIVERSION
      for (; ox < lo; ++ox) orow[ox * Cout] = gather_pixel(a, gp, oy, ox, co);
      float sums[16];
      for (; ox + 16 <= hi; ox += 16) {
        if (a.C == 16) gather_block16<16>(a, gp, oy, ox, co, sums);
        else gather_block16<0>(a, gp, oy, ox, co, sums);
        for (int k = 0; k < 16; ++k) orow[(ox + k) * Cout] = sums[k];
      }
#endif
    }
    for (; ox < OW; ++ox) orow[ox * Cout] = gather_pixel(a, gp, oy, ox, co);
  }
}

template <bool V512>
XD_ALWAYS_INLINE void gather_range_narrow(const ScatterArgs& a, int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    for (int64_t oy = 0; oy < a.OH; ++oy) gather_row<V512>(a, a.g + p * a.h * a.w * a.C, a.out + p * a.OH * a.OW * a.Cout, oy);
  }
}

// 2x2 windows under a 3x3 kernel with padding 1 (the sliding 4x4 block), or no unpooling (the sliding 3x3 block).
XD_ALWAYS_INLINE bool sliding_ok(const ScatterArgs& a) {
  if (!(a.kH == 3 && a.kW == 3 && a.Cout % 16 == 0)) return false;
  return !a.sw || (a.pkH == 2 && a.pkW == 2 && a.padH == 1 && a.padW == 1);
}

// The sliding blocks write every output pixel up to the reach of the input; a larger output_size leaves the rest.
bool sliding_covers(const ScatterArgs& a) {
  if (a.sw) return a.OH <= 2 * a.h + 1 && a.OW <= 2 * a.w + 1;
  return a.OH <= a.h + 2 - a.padH && a.OW <= a.w + 2 - a.padW;
}

template <bool V512>
XD_ALWAYS_INLINE void scatter_dispatch(const ScatterArgs& a, int64_t b, int64_t e) {
  if (a.wg != nullptr) return gather_range_narrow<V512>(a, b, e);
  if (sliding_ok(a)) return scatter_range_sliding<V512>(a, b, e);
  if (a.kH == 3 && a.kW == 3 && a.Cout % 16 == 0) return scatter_range_3x3_pooled(a, b, e);
  switch (a.Cout) {
    case 8: return scatter_range<8>(a, b, e);
    case 16: return scatter_range<16>(a, b, e);
    case 32: return scatter_range<32>(a, b, e);
    case 64: return scatter_range<64>(a, b, e);
    default: return scatter_range<0>(a, b, e);
  }
}

void scatter_baseline(const ScatterArgs& a, int64_t b, int64_t e) { scatter_dispatch<false>(a, b, e); }
#if XD_MULTIVERSION
XD_TARGET_AVX2 void scatter_avx2(const ScatterArgs& a, int64_t b, int64_t e) { scatter_dispatch<false>(a, b, e); }
XD_TARGET_AVX512 void scatter_avx512(const ScatterArgs& a, int64_t b, int64_t e) { scatter_dispatch<true>(a, b, e); }
#endif

// Two steps in one pass: the first step's output rows go round a ring of R rows that the second step reads as soon
// as they are final (a gathering step: the output rows they complete; a sliding scatter: lists them and scatters),
// so the intermediate plane never leaves the cache, nor is it allocated: a fresh 4 MB plane per projection cost as
// much in page faults as the scatter into it.
template <bool V512>
XD_ALWAYS_INLINE void pair_range(const ScatterArgs& a, const ScatterArgs& b, int64_t begin, int64_t end) {
  std::vector<float> ring((b.in_mask + 1) * a.OW * a.Cout);
  ScatterArgs first = a, second = b;
  first.out = ring.data();
  second.g = ring.data();
  RowLists L(a.w, a.C, a.sw ? 4 : 1), L2(b.wg ? 1 : b.w, b.C, 1);
  const int64_t plane_in = a.h * a.w * a.C;
  for (int64_t p = begin; p < end; ++p) {
    const float* gp = a.g + p * plane_in;
    const uint8_t* sp = a.sw ? a.sw + (p / a.group) * plane_in : nullptr;
    second.out = b.out + p * b.OH * b.OW * b.Cout;
    int64_t next = 0;  // the next row of the second step: an output row (gathering), an input row (scatter)
    for (int64_t i = 0; i < a.h; ++i) {
      list_row<V512>(gp + i * a.w * a.C, sp ? sp + i * a.w * a.C : nullptr, a.w, a.C, a.sw ? 4 : 1,
                     static_cast<int32_t>(9 * a.Cout), L);
      scatter_row(first, L, i, ring.data());
      // intermediate rows [0, final) take nothing from the input rows still to come
      const int64_t final = i + 1 == a.h ? a.OH : a.sw ? 2 * i + 1 : i - a.padH + 1;
      if (b.wg) {
        while (next < b.OH && std::min(next + b.padH, a.OH - 1) < final) {
          gather_row<V512>(second, ring.data(), second.out, next++);
        }
      } else {
        for (; next < final; ++next) {
          list_row<V512>(ring.data() + (next & b.in_mask) * b.w * b.C, nullptr, b.w, b.C, 1,
                         static_cast<int32_t>(9 * b.Cout), L2);
          scatter_row(second, L2, next, second.out);
        }
      }
    }
  }
}

void pair_baseline(const ScatterArgs& a, const ScatterArgs& b, int64_t s, int64_t e) { pair_range<false>(a, b, s, e); }
#if XD_MULTIVERSION
XD_TARGET_AVX2 void pair_avx2(const ScatterArgs& a, const ScatterArgs& b, int64_t s, int64_t e) {
  pair_range<false>(a, b, s, e);
}
XD_TARGET_AVX512 void pair_avx512(const ScatterArgs& a, const ScatterArgs& b, int64_t s, int64_t e) {
  pair_range<true>(a, b, s, e);
}
#endif

constexpr const char* kScatterOp = "relu_scatter_conv_transpose2d";
constexpr const char* kPairOp = "relu_scatter_conv_transpose2d_pair";

// Argument checks: ValueError naming the argument (RuntimeError only for tensors on another device, as the
// other ops do). Returns the kernel arguments with every pointer but `out` (and `wg`) set.
ScatterArgs check_scatter_args(const at::Tensor& g, const std::optional<at::Tensor>& switches,
                               const at::Tensor& weight, at::IntArrayRef pool_kernel, at::IntArrayRef padding,
                               at::IntArrayRef output_size, int64_t group, const char* kOp = kScatterOp,
                               const char* size_name = "output_size") {
  TORCH_CHECK(g.device().is_cpu() && weight.device().is_cpu(), kOp, ": g and weight must be CPU tensors, got ",
              g.device(), " and ", weight.device());
  TORCH_CHECK_VALUE(g.scalar_type() == at::kFloat, kOp, ": g must be float32, got ", g.scalar_type());
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat, kOp, ": weight must be float32, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(g.dim() == 4 && g.is_contiguous(), kOp, ": g must be a contiguous 4-D (P, h, w, C) tensor, got ",
                    g.dim(), "-D", g.is_contiguous() ? "" : " non-contiguous", " with shape ", g.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.is_contiguous(), kOp,
                    ": weight must be a contiguous 4-D (C, kH, kW, C_out) tensor, got ", weight.dim(), "-D",
                    weight.is_contiguous() ? "" : " non-contiguous", " with shape ", weight.sizes());
  TORCH_CHECK_VALUE(pool_kernel.size() == 2, kOp, ": pool_kernel must be (pkH, pkW), got ", pool_kernel);
  TORCH_CHECK_VALUE(padding.size() == 2, kOp, ": padding must be (pH, pW), got ", padding);
  TORCH_CHECK_VALUE(output_size.size() == 2, kOp, ": ", size_name, " must be (OH, OW), got ", output_size);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, kOp, ": padding must be non-negative, got ", padding);
  TORCH_CHECK_VALUE(output_size[0] > 0 && output_size[1] > 0, kOp, ": ", size_name, " must be positive, got ",
                    output_size);
  const int64_t P = g.size(0), h = g.size(1), w = g.size(2), C = g.size(3);
  TORCH_CHECK_VALUE(weight.size(0) == C, kOp, ": weight has ", weight.size(0), " filters but g has ", C,
                    " channels");
  TORCH_CHECK_VALUE(group >= 1 && P % group == 0, kOp, ": group must be a positive divisor of P = ", P, ", got ",
                    group);
  ScatterArgs a{g.data_ptr<float>(), nullptr, weight.data_ptr<float>(), nullptr, h, w, C,
                weight.size(1), weight.size(2), weight.size(3), output_size[0], output_size[1], padding[0],
                padding[1], 1, 1, group};
  if (!switches.has_value() || !switches->defined()) return a;
  const at::Tensor& sw = *switches;
  TORCH_CHECK(sw.device().is_cpu(), kOp, ": switches must be a CPU tensor, got ", sw.device());
  TORCH_CHECK_VALUE(sw.scalar_type() == at::kByte, kOp, ": switches must be uint8, got ", sw.scalar_type());
  TORCH_CHECK_VALUE(sw.dim() == 4 && sw.is_contiguous() && sw.size(0) * group == P && sw.size(1) == h &&
                        sw.size(2) == w && sw.size(3) == C,
                    kOp, ": switches must be contiguous of shape (P / group, h, w, C) = (", P / group, ", ", h, ", ",
                    w, ", ", C, "), got ", sw.sizes(), sw.is_contiguous() ? "" : " non-contiguous");
  a.sw = sw.data_ptr<uint8_t>();
  a.pkH = pool_kernel[0];
  a.pkW = pool_kernel[1];
  TORCH_CHECK_VALUE(a.pkH >= 1 && a.pkW >= 1 && a.pkH * a.pkW <= 256, kOp,
                    ": pool_kernel must be positive with at most 256 positions, got ", pool_kernel);
  // every unpooled position must lie inside the unpooled plane the conv reads
  TORCH_CHECK_VALUE(h * a.pkH <= a.OH + a.kH - 1 && w * a.pkW <= a.OW + a.kW - 1, kOp, ": ", size_name, " ",
                    output_size, " is too small for the unpooled signal of size (", h * a.pkH, ", ", w * a.pkW, ")");
  return a;
}

at::Tensor relu_scatter_conv_transpose2d(const at::Tensor& g, const std::optional<at::Tensor>& switches,
                                          const at::Tensor& weight, at::IntArrayRef pool_kernel,
                                          at::IntArrayRef padding, at::IntArrayRef output_size, int64_t group) {
  ScatterArgs a = check_scatter_args(g, switches, weight, pool_kernel, padding, output_size, group);
  const int64_t P = g.size(0), C = a.C;
  const char* kOp = kScatterOp;
  at::Tensor wg;
  const bool gather = !a.sw && a.Cout <= 4 && C % 16 == 0;
  if (gather) {
    wg = weight.permute({3, 1, 2, 0}).contiguous();
    a.wg = wg.data_ptr<float>();
  }
  // the gathering path writes every output value, the sliding blocks every one they reach and the pooled 3x3
  // scatter zeroes its rows as it goes; the generic scatter adds into zeros
  const bool self_zeroing = gather || (sliding_ok(a) ? sliding_covers(a) : a.kH == 3 && a.kW == 3 && a.Cout % 16 == 0);
  at::Tensor out = self_zeroing ? at::empty({P, a.OH, a.OW, a.Cout}, g.options())
                                : at::zeros({P, a.OH, a.OW, a.Cout}, g.options());
  a.out = out.data_ptr<float>();
  auto fn = scatter_baseline;
#if XD_MULTIVERSION
  const Isa isa = cpu_isa();
  if (isa == Isa::Avx512) fn = scatter_avx512;
  else if (isa == Isa::Avx2) fn = scatter_avx2;
#endif
  // one projection per task: each writes only its own output plane, so no two threads touch the same memory
  at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) { fn(a, b, e); });
  return out;
}

// The second step of the pair: its arguments, checked against the first step's output (the intermediate).
ScatterArgs check_pair_args(const ScatterArgs& a, const at::Tensor& weight2, at::IntArrayRef padding2,
                            at::IntArrayRef output_size) {
  const char* kOp = kPairOp;
  TORCH_CHECK(weight2.device().is_cpu(), kOp, ": weight2 must be a CPU tensor, got ", weight2.device());
  TORCH_CHECK_VALUE(weight2.scalar_type() == at::kFloat, kOp, ": weight2 must be float32, got ", weight2.scalar_type());
  TORCH_CHECK_VALUE(weight2.dim() == 4 && weight2.is_contiguous(), kOp,
                    ": weight2 must be a contiguous 4-D (C_mid, kH, kW, C_out) tensor, got ", weight2.dim(), "-D",
                    weight2.is_contiguous() ? "" : " non-contiguous", " with shape ", weight2.sizes());
  TORCH_CHECK_VALUE(padding2.size() == 2 && padding2[0] >= 0 && padding2[1] >= 0, kOp,
                    ": padding2 must be a non-negative pair, got ", padding2);
  TORCH_CHECK_VALUE(output_size.size() == 2 && output_size[0] > 0 && output_size[1] > 0, kOp,
                    ": output_size must be a positive pair, got ", output_size);
  TORCH_CHECK_VALUE(weight2.size(0) == a.Cout, kOp, ": weight2 has ", weight2.size(0), " filters but weight has ",
                    a.Cout, " output channels");
  TORCH_CHECK_VALUE(sliding_ok(a) && sliding_covers(a), kOp,
                    ": the first step must be a 3x3 kernel into a multiple of 16 channels, without unpooling or with "
                    "2x2 windows and padding 1, and mid_size within its reach");
  ScatterArgs b{nullptr, nullptr, weight2.data_ptr<float>(), nullptr, a.OH, a.OW, a.Cout, weight2.size(1),
                weight2.size(2), weight2.size(3), output_size[0], output_size[1], padding2[0], padding2[1], 1, 1, 1};
  TORCH_CHECK_VALUE(b.Cout <= 4 || (sliding_ok(b) && sliding_covers(b)), kOp,
                    ": the second step must have at most 4 output channels, or be a 3x3 kernel into a multiple of 16 "
                    "channels with output_size within its reach, got ", weight2.sizes(), " and output_size ",
                    output_size);
  int64_t rows = 1;  // the ring: live rows span the second kernel's height and the 4 rows the first step writes
  while (rows < b.kH + 4) rows *= 2;
  b.in_mask = rows - 1;
  return b;
}

at::Tensor relu_scatter_conv_transpose2d_pair(const at::Tensor& g, const std::optional<at::Tensor>& switches,
                                               const at::Tensor& weight, const at::Tensor& weight2,
                                               at::IntArrayRef pool_kernel, at::IntArrayRef padding,
                                               at::IntArrayRef padding2, at::IntArrayRef mid_size,
                                               at::IntArrayRef output_size, int64_t group) {
  ScatterArgs a = check_scatter_args(g, switches, weight, pool_kernel, padding, mid_size, group, kPairOp, "mid_size");
  ScatterArgs b = check_pair_args(a, weight2, padding2, output_size);
  a.out_mask = b.in_mask;
  at::Tensor wg;
  if (b.Cout <= 4) {  // the gathering step
    wg = weight2.permute({3, 1, 2, 0}).contiguous();
    b.wg = wg.data_ptr<float>();
  }
  at::Tensor out = at::empty({g.size(0), b.OH, b.OW, b.Cout}, g.options());
  b.out = out.data_ptr<float>();
  auto fn = pair_baseline;
#if XD_MULTIVERSION
  const Isa isa = cpu_isa();
  if (isa == Isa::Avx512) fn = pair_avx512;
  else if (isa == Isa::Avx2) fn = pair_avx2;
#endif
  at::parallel_for(0, g.size(0), 1, [&](int64_t s, int64_t e) { fn(a, b, s, e); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(xraydeconv, CPU, m) {
  m.impl("relu_scatter_conv_transpose2d", &relu_scatter_conv_transpose2d);
  m.impl("relu_scatter_conv_transpose2d_pair", &relu_scatter_conv_transpose2d_pair);
}

}  // namespace cpu
}  // namespace xraydeconv
