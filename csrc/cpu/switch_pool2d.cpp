// CPU max pooling with uint8 switches (the position of the maximum inside its window).
//
// NCHW: one task per range of output rows. Windows whose columns lie inside the input run a loop
// specialised at compile time for 2x2/s2 and 3x3/s2 (vectorised over output columns; in a border row
// it visits only the window rows inside the input); the few windows clipped at the left or right
// edge go through the generic scalar path.
// NHWC: one task per range of output pixels, vectorised over channels.
// switch_relu_pool2d pools relu(x): each task pools its range of x, then rewrites the windows whose maximum is
// not positive while they are still in cache (see relu_range).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../switch_pool_checks.h"
#include "avx512_rows.h"
#include "cpu_common.h"

namespace xraydeconv {
namespace cpu {
namespace {

template <typename T>
struct PoolArgs {
  const T* x;
  T* out;
  uint8_t* sw;
  int64_t planes, H, W, OH, OW;
  PoolGeometry g;
};

// One window clipped to the input: the first valid position is the starting maximum.
template <typename T>
XD_ALWAYS_INLINE void pool_clipped(const T* plane, int64_t H, int64_t W, const PoolGeometry& g, int64_t oh,
                                   int64_t ow, T* out, uint8_t* sw) {
  using A = acc_t<T>;
  const int64_t h0 = oh * g.sH - g.pH, w0 = ow * g.sW - g.pW;
  const int64_t hs = h0 > 0 ? h0 : 0, ws = w0 > 0 ? w0 : 0;
  const int64_t he = h0 + g.kH < H ? h0 + g.kH : H, we = w0 + g.kW < W ? w0 + g.kW : W;
  int64_t bh = hs, bw = ws;
  A m = static_cast<A>(plane[hs * W + ws]);
  for (int64_t ih = hs; ih < he; ++ih) {
    for (int64_t iw = ws; iw < we; ++iw) {
      const A v = static_cast<A>(plane[ih * W + iw]);
      if (beats(v, m)) {
        m = v;
        bh = ih;
        bw = iw;
      }
    }
  }
  *out = plane[bh * W + bw];
  *sw = static_cast<uint8_t>((bh - h0) * g.kW + (bw - w0));
}

// n windows of one output row whose columns lie inside the input; only window rows
// [kh0, kh0 + nkh) do (all of them except at a top or bottom border). `in` points at window row kh0
// of the first window. KH..SW are compile-time constants for the specialised paths, 0 for the
// generic one (read from g).
template <typename T, int KH, int KW, int SH, int SW>
XD_ALWAYS_INLINE void pool_span(const T* XD_RESTRICT in, int64_t W, int64_t n, const PoolGeometry& g, int64_t kh0,
                                int64_t nkh, T* XD_RESTRICT out, uint8_t* XD_RESTRICT sw) {
  using A = acc_t<T>;
  const int64_t kH = KH ? KH : g.kH, kW = KW ? KW : g.kW, sW = SW ? SW : g.sW;
  for (int64_t j = 0; j < n; ++j) {
    const T* p = in + j * sW;
    A m = static_cast<A>(p[0]);
    uint8_t s = static_cast<uint8_t>(kh0 * kW);
#pragma GCC unroll 16
    for (int64_t kh = 0; kh < kH; ++kh) {
      if (kh >= nkh) break;
#pragma GCC unroll 16
      for (int64_t kw = 0; kw < kW; ++kw) {
        if (kh == 0 && kw == 0) continue;
        const A v = static_cast<A>(p[kh * W + kw]);
        const bool b = beats(v, m);
        m = b ? v : m;
        s = b ? static_cast<uint8_t>((kh0 + kh) * kW + kw) : s;
      }
    }
    out[j] = static_cast<T>(m);
    sw[j] = s;
  }
}

// kAvx512: called from the AVX-512 variant, which has hand-vectorised float 2x2/s2 and 3x3/s2 rows.
template <typename T, int KH, int KW, int SH, int SW, bool kAvx512 = false>
XD_ALWAYS_INLINE void pool_nchw_rows(const PoolArgs<T>& a, int64_t begin, int64_t end) {
  const PoolGeometry& g = a.g;
  const int64_t H = a.H, W = a.W, OH = a.OH, OW = a.OW;
  // output columns whose window lies fully inside the input
  const int64_t ow_lo = (g.pW + g.sW - 1) / g.sW;
  int64_t ow_hi = W + g.pW - g.kW >= 0 ? (W + g.pW - g.kW) / g.sW + 1 : 0;
  ow_hi = ow_hi < OW ? ow_hi : OW;
  if (ow_hi < ow_lo) ow_hi = ow_lo;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t plane = r / OH, oh = r - plane * OH;
    const T* xp = a.x + plane * H * W;
    T* op = a.out + r * OW;
    uint8_t* sp = a.sw + r * OW;
    // window rows inside the input: all of them except in a border row (padding, ceil_mode)
    const int64_t h0 = oh * g.sH - g.pH;
    const int64_t hs = h0 > 0 ? h0 : 0, he = h0 + g.kH < H ? h0 + g.kH : H;
    const int64_t kh0 = hs - h0, nkh = he - hs;
    for (int64_t ow = 0; ow < ow_lo && ow < OW; ++ow) pool_clipped(xp, H, W, g, oh, ow, op + ow, sp + ow);
    const T* in = xp + hs * W + ow_lo * g.sW - g.pW;
#if XD_MULTIVERSION
    if constexpr (kAvx512 && std::is_same_v<T, float> && (KW == 2 || KW == 3) && SW == 2) {
      pool_span_s2_f32<KH, KW>(in, W, ow_hi - ow_lo, kh0, nkh, op + ow_lo, sp + ow_lo);
    } else {
      pool_span<T, KH, KW, SH, SW>(in, W, ow_hi - ow_lo, g, kh0, nkh, op + ow_lo, sp + ow_lo);
    }
#else
    pool_span<T, KH, KW, SH, SW>(in, W, ow_hi - ow_lo, g, kh0, nkh, op + ow_lo, sp + ow_lo);
#endif
    for (int64_t ow = ow_hi; ow < OW; ++ow) pool_clipped(xp, H, W, g, oh, ow, op + ow, sp + ow);
  }
}

// Larger windows, channels-last, one output pixel, channels [c0, c0 + CB): the running maxima and
// switches of the block stay in registers while the window's positions stream past (CB == 0: any
// width `cb`).
template <typename T, int CB>
XD_ALWAYS_INLINE void pool_nhwc_block(const T* base, int64_t W, int64_t C, int64_t c0, int64_t cb, int64_t hs,
                                      int64_t he, int64_t ws, int64_t we, int64_t h0, int64_t w0, int64_t kW,
                                      T* XD_RESTRICT o, uint8_t* XD_RESTRICT s) {
  using A = acc_t<T>;
  constexpr int64_t kMax = CB ? CB : 64;
  const int64_t n = CB ? CB : cb;
  A m[kMax];
  uint8_t sw[kMax];
  const T* XD_RESTRICT first = base + (hs * W + ws) * C + c0;
  const uint8_t first_pos = static_cast<uint8_t>((hs - h0) * kW + (ws - w0));
  for (int64_t c = 0; c < n; ++c) {
    m[c] = static_cast<A>(first[c]);
    sw[c] = first_pos;
  }
  for (int64_t ih = hs; ih < he; ++ih) {
    for (int64_t iw = ws; iw < we; ++iw) {
      if (ih == hs && iw == ws) continue;
      const uint8_t pos = static_cast<uint8_t>((ih - h0) * kW + (iw - w0));
      const T* XD_RESTRICT p = base + (ih * W + iw) * C + c0;
      for (int64_t c = 0; c < n; ++c) {
        const A v = static_cast<A>(p[c]);
        const bool b = beats(v, m[c]);
        m[c] = b ? v : m[c];
        sw[c] = b ? pos : sw[c];
      }
    }
  }
  for (int64_t c = 0; c < n; ++c) {
    o[c] = static_cast<T>(m[c]);
    s[c] = sw[c];
  }
}

// Small windows (2x2): each window position streams all C channels through the output pixel, which
// stays in L1; long contiguous runs suit the prefetchers best (measured 1.2-1.5x faster than
// register blocking for 2x2, 2-3x slower for 3x3).
template <typename T>
XD_ALWAYS_INLINE void pool_nhwc_pixel_streaming(const T* base, int64_t W, int64_t C, int64_t hs, int64_t he,
                                                int64_t ws, int64_t we, int64_t h0, int64_t w0, int64_t kW,
                                                T* XD_RESTRICT o, uint8_t* XD_RESTRICT s) {
  using A = acc_t<T>;
  const T* first = base + (hs * W + ws) * C;
  for (int64_t c = 0; c < C; ++c) o[c] = first[c];
  std::memset(s, static_cast<int>((hs - h0) * kW + (ws - w0)), static_cast<size_t>(C));
  for (int64_t ih = hs; ih < he; ++ih) {
    for (int64_t iw = ws; iw < we; ++iw) {
      if (ih == hs && iw == ws) continue;
      const uint8_t pos = static_cast<uint8_t>((ih - h0) * kW + (iw - w0));
      const T* XD_RESTRICT p = base + (ih * W + iw) * C;
      for (int64_t c = 0; c < C; ++c) {
        const A v = static_cast<A>(p[c]);
        const bool b = beats(v, static_cast<A>(o[c]));
        o[c] = b ? p[c] : o[c];
        s[c] = b ? pos : s[c];
      }
    }
  }
}

// Channels-last: one output pixel is a run of C values, so the loops over C vectorise directly.
template <typename T>
XD_ALWAYS_INLINE void pool_nhwc_pixels(const PoolArgs<T>& a, int64_t C, int64_t begin, int64_t end) {
  const PoolGeometry& g = a.g;
  const bool streaming = g.window() <= 4;
  const int64_t H = a.H, W = a.W, OH = a.OH, OW = a.OW;
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t n = idx / (OH * OW), rem = idx - n * OH * OW, oh = rem / OW, ow = rem - oh * OW;
    const int64_t h0 = oh * g.sH - g.pH, w0 = ow * g.sW - g.pW;
    const int64_t hs = h0 > 0 ? h0 : 0, ws = w0 > 0 ? w0 : 0;
    const int64_t he = h0 + g.kH < H ? h0 + g.kH : H, we = w0 + g.kW < W ? w0 + g.kW : W;
    const T* base = a.x + n * H * W * C;
    T* o = a.out + idx * C;
    uint8_t* s = a.sw + idx * C;
    if (streaming) {
      pool_nhwc_pixel_streaming(base, W, C, hs, he, ws, we, h0, w0, g.kW, o, s);
      continue;
    }
    // 64 channels fill whole AVX-512 registers for the float maxima and the uint8 switches alike
    int64_t c0 = 0;
    for (; c0 + 64 <= C; c0 += 64)
      pool_nhwc_block<T, 64>(base, W, C, c0, 64, hs, he, ws, we, h0, w0, g.kW, o + c0, s + c0);
    for (; c0 + 16 <= C; c0 += 16)
      pool_nhwc_block<T, 16>(base, W, C, c0, 16, hs, he, ws, we, h0, w0, g.kW, o + c0, s + c0);
    for (; c0 < C; c0 += 64) {
      const int64_t cb = C - c0 < 64 ? C - c0 : 64;
      pool_nhwc_block<T, 0>(base, W, C, c0, cb, hs, he, ws, we, h0, w0, g.kW, o + c0, s + c0);
    }
  }
}

// 2x2/s2 windows inside the input, channels-last, C = CT a compile-time count (4 to 128): one task per range
// of output rows, every output pixel reduced from its four input pixels with CT-wide vectors and its maxima
// and switches written once. The per-pixel path above spends more on index arithmetic, the runtime loop over
// C and re-reading its output than on the data when C is small (3-4x slower than native at C = 8, 16).
// RELU: pool relu(x), applying it as each value is loaded (relu keeps NaN and -0, as torch.relu does).
template <typename T, int CT, bool RELU>
XD_ALWAYS_INLINE void pool_nhwc_2x2_rows(const PoolArgs<T>& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  const auto load = [](T v) {
    const A f = static_cast<A>(v);
    return RELU && f < A(0) ? A(0) : f;
  };
  const int64_t H = a.H, W = a.W, OH = a.OH, OW = a.OW;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / OH, oh = r - n * OH;
    const T* XD_RESTRICT r0 = a.x + ((n * H + 2 * oh) * W) * CT;
    const T* XD_RESTRICT r1 = r0 + W * CT;
    T* XD_RESTRICT o = a.out + r * OW * CT;
    uint8_t* XD_RESTRICT s = a.sw + r * OW * CT;
    for (int64_t ow = 0; ow < OW; ++ow) {
      const T* XD_RESTRICT p00 = r0 + 2 * ow * CT;
      const T* XD_RESTRICT p10 = r1 + 2 * ow * CT;
#pragma GCC unroll 32
      for (int c = 0; c < CT; ++c) {
        A m = load(p00[c]);
        uint8_t sv = 0;
        const A v1 = load(p00[CT + c]), v2 = load(p10[c]), v3 = load(p10[CT + c]);
        bool b = beats(v1, m);
        m = b ? v1 : m;
        sv = b ? 1 : sv;
        b = beats(v2, m);
        m = b ? v2 : m;
        sv = b ? 2 : sv;
        b = beats(v3, m);
        m = b ? v3 : m;
        sv = b ? 3 : sv;
        o[ow * CT + c] = static_cast<T>(m);
        s[ow * CT + c] = sv;
      }
    }
  }
}

#if XD_MULTIVERSION
template <typename T, int CT, bool RELU>
XD_TARGET_AVX512 void pool_nhwc_2x2_rows_avx512(const PoolArgs<T>& a, int64_t b, int64_t e) {
  pool_nhwc_2x2_rows<T, CT, RELU>(a, b, e);
}
template <typename T, int CT, bool RELU>
XD_TARGET_AVX2 void pool_nhwc_2x2_rows_avx2(const PoolArgs<T>& a, int64_t b, int64_t e) {
  pool_nhwc_2x2_rows<T, CT, RELU>(a, b, e);
}
#endif

template <typename T, int CT, bool RELU>
void pool_nhwc_2x2_rows_any(const PoolArgs<T>& a, int64_t b, int64_t e) {
#if XD_MULTIVERSION
  if (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    switch (cpu_isa()) {
      case Isa::Avx512:
        return pool_nhwc_2x2_rows_avx512<T, CT, RELU>(a, b, e);
      case Isa::Avx2:
        return pool_nhwc_2x2_rows_avx2<T, CT, RELU>(a, b, e);
      default:
        break;
    }
  }
#endif
  pool_nhwc_2x2_rows<T, CT, RELU>(a, b, e);
}

template <typename T, bool RELU>
auto small_c_2x2_rows(int64_t C) -> void (*)(const PoolArgs<T>&, int64_t, int64_t) {
  switch (C) {
    case 4: return pool_nhwc_2x2_rows_any<T, 4, RELU>;
    case 8: return pool_nhwc_2x2_rows_any<T, 8, RELU>;
    case 16: return pool_nhwc_2x2_rows_any<T, 16, RELU>;
    case 32: return pool_nhwc_2x2_rows_any<T, 32, RELU>;
    case 64: return pool_nhwc_2x2_rows_any<T, 64, RELU>;
    case 128: return pool_nhwc_2x2_rows_any<T, 128, RELU>;
    default: return nullptr;
  }
}

// The small-C 2x2/s2 row kernel for this call (of relu(x) with `relu`), or nullptr when it does not apply
// (another geometry, a window clipped by ceil_mode, or a channel count without a specialisation).
template <typename T>
auto small_c_2x2_kernel(const PoolArgs<T>& a, int64_t C, bool relu) -> void (*)(const PoolArgs<T>&, int64_t, int64_t) {
  const PoolGeometry& g = a.g;
  const bool tiles = g.kH == 2 && g.kW == 2 && g.sH == 2 && g.sW == 2 && g.pH == 0 && g.pW == 0;
  if (!tiles || 2 * a.OH > a.H || 2 * a.OW > a.W) return nullptr;
  return relu ? small_c_2x2_rows<T, true>(C) : small_c_2x2_rows<T, false>(C);
}

#if XD_MULTIVERSION
template <typename T, int KH, int KW, int SH, int SW>
XD_TARGET_AVX512 void pool_nchw_rows_avx512(const PoolArgs<T>& a, int64_t b, int64_t e) {
  pool_nchw_rows<T, KH, KW, SH, SW, true>(a, b, e);
}
template <typename T, int KH, int KW, int SH, int SW>
XD_TARGET_AVX2 void pool_nchw_rows_avx2(const PoolArgs<T>& a, int64_t b, int64_t e) {
  pool_nchw_rows<T, KH, KW, SH, SW>(a, b, e);
}
template <typename T>
XD_TARGET_AVX512 void pool_nhwc_pixels_avx512(const PoolArgs<T>& a, int64_t C, int64_t b, int64_t e) {
  pool_nhwc_pixels<T>(a, C, b, e);
}
template <typename T>
XD_TARGET_AVX2 void pool_nhwc_pixels_avx2(const PoolArgs<T>& a, int64_t C, int64_t b, int64_t e) {
  pool_nhwc_pixels<T>(a, C, b, e);
}
#endif

template <typename T, int KH, int KW, int SH, int SW>
void pool_nchw_rows_any(const PoolArgs<T>& a, int64_t b, int64_t e) {
#if XD_MULTIVERSION
  // reduced-precision types convert through float in scalar code: no ISA variants for them
  if (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    switch (cpu_isa()) {
      case Isa::Avx512:
        return pool_nchw_rows_avx512<T, KH, KW, SH, SW>(a, b, e);
      case Isa::Avx2:
        return pool_nchw_rows_avx2<T, KH, KW, SH, SW>(a, b, e);
      default:
        break;
    }
  }
#endif
  pool_nchw_rows<T, KH, KW, SH, SW>(a, b, e);
}

template <typename T>
void pool_nhwc_pixels_any(const PoolArgs<T>& a, int64_t C, int64_t b, int64_t e) {
#if XD_MULTIVERSION
  if (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    switch (cpu_isa()) {
      case Isa::Avx512:
        return pool_nhwc_pixels_avx512<T>(a, C, b, e);
      case Isa::Avx2:
        return pool_nhwc_pixels_avx2<T>(a, C, b, e);
      default:
        break;
    }
  }
#endif
  pool_nhwc_pixels<T>(a, C, b, e);
}

// Turns pooled x into pooled relu(x) for output pixels [pb, pe) (cpp values each: 1 in NCHW, C in NHWC). In a
// window whose maximum is not positive every relu value is zero, so the first position inside the input wins,
// as it does in max_pool2d(relu(x)); a NaN maximum stays. A zero maximum becomes +0 (relu keeps -0).
// Without padding every window's first position is switch 0: one flat pass in two vectorisable loops (a value
// that is 0 after the first loop was not positive before it).
template <typename T>
XD_ALWAYS_INLINE void relu_flat(T* XD_RESTRICT o, uint8_t* XD_RESTRICT s, int64_t n) {
  using A = acc_t<T>;
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<A>(o[i]) <= A(0) ? static_cast<T>(0) : o[i];
  for (int64_t i = 0; i < n; ++i) s[i] = static_cast<A>(o[i]) == A(0) ? uint8_t{0} : s[i];
}

#if XD_MULTIVERSION
template <typename T>
XD_TARGET_AVX512 void relu_flat_avx512(T* o, uint8_t* s, int64_t n) {
  relu_flat<T>(o, s, n);
}
template <typename T>
XD_TARGET_AVX2 void relu_flat_avx2(T* o, uint8_t* s, int64_t n) {
  relu_flat<T>(o, s, n);
}
#endif

template <typename T>
void relu_flat_any(T* o, uint8_t* s, int64_t n) {
#if XD_MULTIVERSION
  if (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    switch (cpu_isa()) {
      case Isa::Avx512:
        return relu_flat_avx512<T>(o, s, n);
      case Isa::Avx2:
        return relu_flat_avx2<T>(o, s, n);
      default:
        break;
    }
  }
#endif
  relu_flat<T>(o, s, n);
}

template <typename T>
void relu_range(const PoolArgs<T>& a, int64_t cpp, int64_t pb, int64_t pe) {
  const PoolGeometry& g = a.g;
  if (g.pH == 0 && g.pW == 0) return relu_flat_any(a.out + pb * cpp, a.sw + pb * cpp, (pe - pb) * cpp);
  for (int64_t p = pb; p < pe;) {
    const int64_t row = p / a.OW, oh = row % a.OH, ow0 = p - row * a.OW;
    const int64_t ow1 = ow0 + (pe - p) < a.OW ? ow0 + (pe - p) : a.OW;
    const int64_t first_h = (oh * g.sH < g.pH ? g.pH - oh * g.sH : 0) * g.kW;
    for (int64_t ow = ow0; ow < ow1; ++ow) {
      const uint8_t first = static_cast<uint8_t>(first_h + (ow * g.sW < g.pW ? g.pW - ow * g.sW : 0));
      T* XD_RESTRICT o = a.out + (row * a.OW + ow) * cpp;
      uint8_t* XD_RESTRICT s = a.sw + (row * a.OW + ow) * cpp;
      for (int64_t c = 0; c < cpp; ++c) {
        const bool zero = static_cast<acc_t<T>>(o[c]) <= 0;
        o[c] = zero ? static_cast<T>(0) : o[c];
        s[c] = zero ? first : s[c];
      }
    }
    p += ow1 - ow0;
  }
}

template <typename T>
void pool_nchw(const PoolArgs<T>& a, bool relu) {
  const PoolGeometry& g = a.g;
  const int64_t rows = a.planes * a.OH;
  auto run = [&](auto rows_fn) {
    at::parallel_for(0, rows, grain_rows(a.OW * g.kH * g.kW / 2 + a.OW), [&](int64_t b, int64_t e) {
      rows_fn(a, b, e);
      if (relu) relu_range(a, 1, b * a.OW, e * a.OW);
    });
  };
  if (g.kH == 2 && g.kW == 2 && g.sH == 2 && g.sW == 2) {
    run(pool_nchw_rows_any<T, 2, 2, 2, 2>);
  } else if (g.kH == 3 && g.kW == 3 && g.sH == 2 && g.sW == 2) {
    run(pool_nchw_rows_any<T, 3, 3, 2, 2>);
  } else {
    run(pool_nchw_rows_any<T, 0, 0, 0, 0>);
  }
}

template <typename T>
void pool_nhwc(const PoolArgs<T>& a, int64_t C, bool relu) {
  if (const auto rows_fn = small_c_2x2_kernel(a, C, relu)) {
    at::parallel_for(0, a.planes * a.OH, grain_rows(a.OW * C * 5), [&](int64_t b, int64_t e) { rows_fn(a, b, e); });
    return;
  }
  const int64_t pixels = a.planes * a.OH * a.OW;  // planes = N here
  at::parallel_for(0, pixels, grain_rows(C * a.g.kH * a.g.kW / 2 + C), [&](int64_t b, int64_t e) {
    pool_nhwc_pixels_any<T>(a, C, b, e);
    if (relu) relu_range(a, C, b, e);
  });
}

// Runs the kernel from x (any layout) into out/switches, which must be 4-D and contiguous in `fmt`.
void pool_into(const at::Tensor& x4, const PoolGeometry& g, at::MemoryFormat fmt, const at::Tensor& out4,
               const at::Tensor& sw4, bool relu) {
  if (out4.numel() == 0) return;
  const at::Tensor xc = x4.contiguous(fmt);
  const int64_t N = xc.size(0), C = xc.size(1), H = xc.size(2), W = xc.size(3);
  const int64_t OH = out4.size(2), OW = out4.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "switch_pool2d", [&] {
    PoolArgs<scalar_t> a{xc.const_data_ptr<scalar_t>(), out4.mutable_data_ptr<scalar_t>(),
                         sw4.mutable_data_ptr<uint8_t>(), 0, H, W, OH, OW, g};
    if (fmt == at::MemoryFormat::ChannelsLast) {
      a.planes = N;
      pool_nhwc(a, C, relu);
    } else {
      a.planes = N * C;
      pool_nchw(a, relu);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pool_cpu(const char* op, const at::Tensor& x, at::IntArrayRef kernel_size,
                                            at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                                            bool relu) {
  const PoolGeometry g = make_geometry(op, kernel_size, stride, padding);
  const auto [OH, OW] = check_pool_input(op, x, g, ceil_mode);
  const at::MemoryFormat fmt = memory_format_of(x);
  const std::vector<int64_t> shape = with_spatial_size(x, OH, OW);
  at::Tensor out = at::empty(shape, x.options().memory_format(fmt));
  at::Tensor sw = at::empty(shape, x.options().dtype(at::kByte).memory_format(fmt));
  pool_into(as4d(x), g, fmt, as4d(out), as4d(sw), relu);
  return {out, sw};
}

std::tuple<at::Tensor, at::Tensor> switch_pool2d_cpu(const at::Tensor& x, at::IntArrayRef kernel_size,
                                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                                     bool ceil_mode) {
  return pool_cpu("switch_pool2d", x, kernel_size, stride, padding, ceil_mode, false);
}

std::tuple<at::Tensor, at::Tensor> switch_relu_pool2d_cpu(const at::Tensor& x, at::IntArrayRef kernel_size,
                                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                                          bool ceil_mode) {
  return pool_cpu("switch_relu_pool2d", x, kernel_size, stride, padding, ceil_mode, true);
}

void switch_pool2d_out_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, bool ceil_mode, const at::Tensor& out, const at::Tensor& sw) {
  const char* op = "switch_pool2d_out";
  const PoolGeometry g = make_geometry(op, kernel_size, stride, padding);
  const at::MemoryFormat fmt = check_pool_out(op, x, g, ceil_mode, out, sw);
  pool_into(as4d(x), g, fmt, as4d(out), as4d(sw), false);
}

}  // namespace
}  // namespace cpu
}  // namespace xraydeconv

TORCH_LIBRARY_IMPL(xraydeconv, CPU, m) {
  m.impl("switch_pool2d", &xraydeconv::cpu::switch_pool2d_cpu);
  m.impl("switch_pool2d_out", &xraydeconv::cpu::switch_pool2d_out_cpu);
  m.impl("switch_relu_pool2d", &xraydeconv::cpu::switch_relu_pool2d_cpu);
}
