// CPU unpooling with uint8 switches: the exact adjoint of the max-pool selection.
//
// Windows that tile the input (stride == kernel, no padding; the common 2x2/s2) write every output
// element exactly once, one output row at a time, instead of zero-filling and then scattering.
// Every other geometry (overlapping 3x3/s2, padding, gaps) zero-fills and adds the pooled values at
// their switches plane by plane in row-major window order: deterministic, and the same summation
// order as the CUDA kernels' per-pixel gather.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../switch_pool_checks.h"
#include "avx512_rows.h"
#include "cpu_common.h"
#include "switch_validate.h"

namespace xraydeconv {
namespace cpu {
namespace {

template <typename T>
struct UnpoolArgs {
  const T* y;
  const uint8_t* sw;
  T* out;
  int64_t H, W, OH, OW;
  PoolGeometry g;
};

// Tiling windows, NCHW: output row ih lies in window row oh = ih / KH at offset kh = ih % KH.
// kAvx512: called from the AVX-512 variant, which has a hand-vectorised float 2x2 row.
template <typename T, int KH, int KW, bool kAvx512 = false>
XD_ALWAYS_INLINE void unpool_tiled_rows(const UnpoolArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t H = a.H, W = a.W, OH = a.OH, OW = a.OW;
  const int64_t kH = KH ? KH : a.g.kH, kW = KW ? KW : a.g.kW;
  const int64_t full = std::min(OW, W / kW);  // windows whose columns all lie inside the row
  for (int64_t r = begin; r < end; ++r) {
    const int64_t plane = r / H, ih = r - plane * H;
    const int64_t oh = ih / kH, kh = ih - oh * kH;
    T* XD_RESTRICT o = a.out + r * W;
    if (oh >= OH) {
      for (int64_t iw = 0; iw < W; ++iw) o[iw] = T(0);
      continue;
    }
    const T* XD_RESTRICT yr = a.y + (plane * OH + oh) * OW;
    const uint8_t* XD_RESTRICT sr = a.sw + (plane * OH + oh) * OW;
    const int64_t base = kh * kW;
#if XD_MULTIVERSION
    if constexpr (kAvx512 && std::is_same_v<T, float> && KH == 2 && KW == 2) {
      unpool_row_2x2_f32(yr, sr, full, kh, o);
    } else
#endif
    for (int64_t ow = 0; ow < full; ++ow) {
      const T v = yr[ow];
      const uint8_t s = sr[ow];
#pragma GCC unroll 16
      for (int64_t kw = 0; kw < kW; ++kw) o[ow * kW + kw] = s == base + kw ? v : T(0);
    }
    for (int64_t ow = full; ow < OW; ++ow) {  // a window cut by ceil_mode
      for (int64_t kw = 0; kw < kW && ow * kW + kw < W; ++kw) o[ow * kW + kw] = sr[ow] == base + kw ? yr[ow] : T(0);
    }
    for (int64_t iw = OW * kW; iw < W; ++iw) o[iw] = T(0);  // columns no window covers
  }
}

// Tiling windows, NHWC: one task per range of output rows (n, ih); every element written once,
// vectorised over channels.
template <typename T>
XD_ALWAYS_INLINE void unpool_tiled_rows_nhwc(const UnpoolArgs<T>& a, int64_t C, int64_t begin, int64_t end) {
  const int64_t H = a.H, W = a.W, OH = a.OH, OW = a.OW, kH = a.g.kH, kW = a.g.kW;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / H, ih = r - n * H;
    const int64_t oh = ih / kH, kh = ih - oh * kH;
    T* XD_RESTRICT o = a.out + r * W * C;
    int64_t iw_done = 0;
    if (oh < OH) {
      const T* XD_RESTRICT yr = a.y + (n * OH + oh) * OW * C;
      const uint8_t* XD_RESTRICT sr = a.sw + (n * OH + oh) * OW * C;
      for (int64_t ow = 0; ow < OW; ++ow) {
        for (int64_t kw = 0; kw < kW && ow * kW + kw < W; ++kw) {
          const uint8_t pos = static_cast<uint8_t>(kh * kW + kw);
          T* XD_RESTRICT oo = o + (ow * kW + kw) * C;
          const T* XD_RESTRICT yy = yr + ow * C;
          const uint8_t* XD_RESTRICT ss = sr + ow * C;
          for (int64_t c = 0; c < C; ++c) oo[c] = ss[c] == pos ? yy[c] : T(0);
        }
      }
      iw_done = std::min(W, OW * kW);
    }
    for (int64_t i = iw_done * C; i < W * C; ++i) o[i] = T(0);  // pixels no window covers
  }
}

// 2x2 tiling windows, NHWC, C = CT a compile-time count (4 to 128): like unpool_tiled_rows_nhwc with the window
// width and the channel loop fixed, so that each input pixel is one or two CT-wide vector selects.
template <typename T, int CT>
XD_ALWAYS_INLINE void unpool_2x2_rows_nhwc(const UnpoolArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t H = a.H, W = a.W, OH = a.OH, OW = a.OW;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / H, ih = r - n * H;
    const int64_t oh = ih >> 1, kh = ih & 1;
    T* XD_RESTRICT o = a.out + r * W * CT;
    int64_t iw_done = 0;
    if (oh < OH) {
      const T* XD_RESTRICT yr = a.y + (n * OH + oh) * OW * CT;
      const uint8_t* XD_RESTRICT sr = a.sw + (n * OH + oh) * OW * CT;
      const uint8_t p0 = static_cast<uint8_t>(2 * kh), p1 = static_cast<uint8_t>(2 * kh + 1);
      const int64_t full = std::min(OW, W / 2);
      for (int64_t ow = 0; ow < full; ++ow) {
#pragma GCC unroll 32
        for (int c = 0; c < CT; ++c) {
          const T v = yr[ow * CT + c];
          const uint8_t sv = sr[ow * CT + c];
          o[2 * ow * CT + c] = sv == p0 ? v : T(0);
          o[(2 * ow + 1) * CT + c] = sv == p1 ? v : T(0);
        }
      }
      if (full < OW && 2 * full < W) {  // a last window cut by ceil_mode
        for (int c = 0; c < CT; ++c) o[2 * full * CT + c] = sr[full * CT + c] == p0 ? yr[full * CT + c] : T(0);
      }
      iw_done = std::min(W, 2 * OW);
    }
    for (int64_t i = iw_done * CT; i < W * CT; ++i) o[i] = T(0);  // pixels no window covers
  }
}

// Pixel offset of every switch value from its window's top-left corner, in a row of W pixels.
inline std::array<int64_t, 256> switch_pixel_offsets(const PoolGeometry& g, int64_t W) {
  std::array<int64_t, 256> off{};
  for (int64_t s = 0; s < g.window(); ++s) off[s] = (s / g.kW) * W + s % g.kW;
  return off;
}

// Any geometry (overlapping windows, padding, gaps): zero the output, then visit the pooled values
// of a plane in row-major window order and add each at its switch. Each task owns whole planes (or,
// NHWC, a block of channels of one image), so there are no races, and every input position sums its
// contributions in the same order as a per-pixel gather over the windows that cover it (the CUDA
// kernels): bitwise the same result. Validated switches keep every index inside the plane.
// Reduced precision accumulates in a float buffer and is rounded once.
template <typename T>
XD_ALWAYS_INLINE void unpool_scatter_planes(const UnpoolArgs<T>& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  constexpr bool direct = std::is_same<A, T>::value;
  const PoolGeometry& g = a.g;
  const int64_t H = a.H, W = a.W, OH = a.OH, OW = a.OW, HW = H * W;
  const std::array<int64_t, 256> off = switch_pixel_offsets(g, W);
  std::vector<A> buf(direct ? 0 : static_cast<size_t>(HW));
  for (int64_t plane = begin; plane < end; ++plane) {
    A* acc = direct ? reinterpret_cast<A*>(a.out + plane * HW) : buf.data();
    std::fill(acc, acc + HW, A(0));
    const T* yp = a.y + plane * OH * OW;
    const uint8_t* sp = a.sw + plane * OH * OW;
    for (int64_t oh = 0; oh < OH; ++oh) {
      const int64_t corner_h = (oh * g.sH - g.pH) * W - g.pW;
      for (int64_t ow = 0; ow < OW; ++ow) {
        const int64_t i = oh * OW + ow;
        acc[corner_h + ow * g.sW + off[sp[i]]] += static_cast<A>(yp[i]);
      }
    }
    if constexpr (!direct) {
      T* o = a.out + plane * HW;
      for (int64_t i = 0; i < HW; ++i) o[i] = static_cast<T>(acc[i]);
    }
  }
}

// NHWC: task t covers image t / blocks, channels [c0, c0 + block) of it. Whole images when there
// are enough of them to keep every thread busy, else blocks of channels.
template <typename T>
XD_ALWAYS_INLINE void unpool_scatter_channel_blocks(const UnpoolArgs<T>& a, int64_t C, int64_t block, int64_t begin,
                                                    int64_t end) {
  using A = acc_t<T>;
  constexpr bool direct = std::is_same<A, T>::value;
  const PoolGeometry& g = a.g;
  const int64_t H = a.H, W = a.W, OH = a.OH, OW = a.OW, HW = H * W;
  const int64_t blocks = (C + block - 1) / block;
  const std::array<int64_t, 256> off = switch_pixel_offsets(g, W);
  std::vector<A> buf(direct ? 0 : static_cast<size_t>(HW * std::min(C, block)));
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / blocks, c0 = (t - n * blocks) * block, cb = std::min(block, C - c0);
    // acc[pixel * stride + c] for c in [0, cb)
    A* acc = direct ? reinterpret_cast<A*>(a.out + n * HW * C + c0) : buf.data();
    const int64_t stride = direct ? C : cb;
    for (int64_t px = 0; px < HW; ++px) std::fill(acc + px * stride, acc + px * stride + cb, A(0));
    for (int64_t oh = 0; oh < OH; ++oh) {
      const int64_t corner_h = (oh * g.sH - g.pH) * W - g.pW;
      for (int64_t ow = 0; ow < OW; ++ow) {
        const int64_t i = ((n * OH + oh) * OW + ow) * C + c0;
        const T* yp = a.y + i;
        const uint8_t* sp = a.sw + i;
        const int64_t corner = corner_h + ow * g.sW;
        for (int64_t c = 0; c < cb; ++c) acc[(corner + off[sp[c]]) * stride + c] += static_cast<A>(yp[c]);
      }
    }
    if constexpr (!direct) {
      for (int64_t px = 0; px < HW; ++px) {
        T* o = a.out + (n * HW + px) * C + c0;
        for (int64_t c = 0; c < cb; ++c) o[c] = static_cast<T>(acc[px * cb + c]);
      }
    }
  }
}

#if XD_MULTIVERSION
template <typename T, int KH, int KW>
XD_TARGET_AVX512 void unpool_tiled_rows_avx512(const UnpoolArgs<T>& a, int64_t b, int64_t e) {
  unpool_tiled_rows<T, KH, KW, true>(a, b, e);
}
template <typename T, int KH, int KW>
XD_TARGET_AVX2 void unpool_tiled_rows_avx2(const UnpoolArgs<T>& a, int64_t b, int64_t e) {
  unpool_tiled_rows<T, KH, KW>(a, b, e);
}
template <typename T>
XD_TARGET_AVX512 void unpool_tiled_rows_nhwc_avx512(const UnpoolArgs<T>& a, int64_t C, int64_t b, int64_t e) {
  unpool_tiled_rows_nhwc<T>(a, C, b, e);
}
template <typename T>
XD_TARGET_AVX2 void unpool_tiled_rows_nhwc_avx2(const UnpoolArgs<T>& a, int64_t C, int64_t b, int64_t e) {
  unpool_tiled_rows_nhwc<T>(a, C, b, e);
}
#endif

template <typename T, int KH, int KW>
void unpool_tiled_rows_any(const UnpoolArgs<T>& a, int64_t b, int64_t e) {
#if XD_MULTIVERSION
  if (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    switch (cpu_isa()) {
      case Isa::Avx512:
        return unpool_tiled_rows_avx512<T, KH, KW>(a, b, e);
      case Isa::Avx2:
        return unpool_tiled_rows_avx2<T, KH, KW>(a, b, e);
      default:
        break;
    }
  }
#endif
  unpool_tiled_rows<T, KH, KW>(a, b, e);
}

template <typename T>
void unpool_tiled_rows_nhwc_any(const UnpoolArgs<T>& a, int64_t C, int64_t b, int64_t e) {
#if XD_MULTIVERSION
  if (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    switch (cpu_isa()) {
      case Isa::Avx512:
        return unpool_tiled_rows_nhwc_avx512<T>(a, C, b, e);
      case Isa::Avx2:
        return unpool_tiled_rows_nhwc_avx2<T>(a, C, b, e);
      default:
        break;
    }
  }
#endif
  unpool_tiled_rows_nhwc<T>(a, C, b, e);
}

#if XD_MULTIVERSION
template <typename T, int CT>
XD_TARGET_AVX512 void unpool_2x2_rows_nhwc_avx512(const UnpoolArgs<T>& a, int64_t b, int64_t e) {
  unpool_2x2_rows_nhwc<T, CT>(a, b, e);
}
template <typename T, int CT>
XD_TARGET_AVX2 void unpool_2x2_rows_nhwc_avx2(const UnpoolArgs<T>& a, int64_t b, int64_t e) {
  unpool_2x2_rows_nhwc<T, CT>(a, b, e);
}
#endif

template <typename T, int CT>
void unpool_2x2_rows_nhwc_any(const UnpoolArgs<T>& a, int64_t b, int64_t e) {
#if XD_MULTIVERSION
  if (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    switch (cpu_isa()) {
      case Isa::Avx512:
        return unpool_2x2_rows_nhwc_avx512<T, CT>(a, b, e);
      case Isa::Avx2:
        return unpool_2x2_rows_nhwc_avx2<T, CT>(a, b, e);
      default:
        break;
    }
  }
#endif
  unpool_2x2_rows_nhwc<T, CT>(a, b, e);
}

// The small-C row kernel for 2x2 tiling windows in NHWC, or nullptr for other channel counts.
template <typename T>
auto small_c_2x2_unpool(int64_t C) -> void (*)(const UnpoolArgs<T>&, int64_t, int64_t) {
  switch (C) {
    case 4: return unpool_2x2_rows_nhwc_any<T, 4>;
    case 8: return unpool_2x2_rows_nhwc_any<T, 8>;
    case 16: return unpool_2x2_rows_nhwc_any<T, 16>;
    case 32: return unpool_2x2_rows_nhwc_any<T, 32>;
    case 64: return unpool_2x2_rows_nhwc_any<T, 64>;
    case 128: return unpool_2x2_rows_nhwc_any<T, 128>;
    default: return nullptr;
  }
}

void unpool_into(const at::Tensor& y4, const at::Tensor& sw4, const PoolGeometry& g, at::MemoryFormat fmt,
                 const at::Tensor& out4, const char* op) {
  const at::Tensor yc = y4.contiguous(fmt);
  const at::Tensor sc = sw4.contiguous(fmt);
  const int64_t N = yc.size(0), C = yc.size(1), OH = yc.size(2), OW = yc.size(3);
  const int64_t H = out4.size(2), W = out4.size(3);
  validate_switches(op, sc, H, W, g);
  if (out4.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, yc.scalar_type(), "switch_unpool2d", [&] {
    const UnpoolArgs<scalar_t> a{yc.const_data_ptr<scalar_t>(), sc.const_data_ptr<uint8_t>(),
                                 out4.mutable_data_ptr<scalar_t>(), H, W, OH, OW, g};
    const bool tiled = g.sH == g.kH && g.sW == g.kW && g.pH == 0 && g.pW == 0;
    if (fmt == at::MemoryFormat::ChannelsLast) {
      const auto small_c = tiled && g.kH == 2 && g.kW == 2 ? small_c_2x2_unpool<scalar_t>(C) : nullptr;
      if (small_c) {
        at::parallel_for(0, N * H, grain_rows(W * C), [&](int64_t b, int64_t e) { small_c(a, b, e); });
      } else if (tiled) {
        at::parallel_for(0, N * H, grain_rows(W * C),
                         [&](int64_t b, int64_t e) { unpool_tiled_rows_nhwc_any<scalar_t>(a, C, b, e); });
      } else {
        const int64_t block = N >= at::get_num_threads() ? C : 64;
        const int64_t blocks = (C + block - 1) / block;
        at::parallel_for(0, N * blocks, 1,
                         [&](int64_t b, int64_t e) { unpool_scatter_channel_blocks<scalar_t>(a, C, block, b, e); });
      }
      return;
    }
    const int64_t rows = N * C * H, grain = grain_rows(W);
    if (tiled && g.kH == 2 && g.kW == 2) {
      at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { unpool_tiled_rows_any<scalar_t, 2, 2>(a, b, e); });
    } else if (tiled) {
      at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { unpool_tiled_rows_any<scalar_t, 0, 0>(a, b, e); });
    } else {
      at::parallel_for(0, N * C, grain_rows(H * W),
                       [&](int64_t b, int64_t e) { unpool_scatter_planes<scalar_t>(a, b, e); });
    }
  });
}

at::Tensor switch_unpool2d_cpu(const at::Tensor& y, const at::Tensor& sw, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_size) {
  const char* op = "switch_unpool2d";
  const PoolGeometry g = make_geometry(op, kernel_size, stride, padding);
  TORCH_CHECK_VALUE(output_size.size() == 2, op, ": output_size must be (H, W), got ", output_size);
  check_unpool_args(op, y, sw, g, output_size[0], output_size[1]);
  const at::MemoryFormat fmt = memory_format_of(y);
  at::Tensor out = at::empty(with_spatial_size(y, output_size[0], output_size[1]), y.options().memory_format(fmt));
  unpool_into(as4d(y), as4d(sw), g, fmt, as4d(out), op);
  return out;
}

void switch_unpool2d_out_cpu(const at::Tensor& y, const at::Tensor& sw, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding, const at::Tensor& out) {
  const char* op = "switch_unpool2d_out";
  const PoolGeometry g = make_geometry(op, kernel_size, stride, padding);
  const at::MemoryFormat fmt = check_unpool_out(op, y, sw, g, out);
  unpool_into(as4d(y), as4d(sw), g, fmt, as4d(out), op);
}

}  // namespace
}  // namespace cpu
}  // namespace xraydeconv

TORCH_LIBRARY_IMPL(xraydeconv, CPU, m) {
  m.impl("switch_unpool2d", &xraydeconv::cpu::switch_unpool2d_cpu);
  m.impl("switch_unpool2d_out", &xraydeconv::cpu::switch_unpool2d_out_cpu);
}
