// CPU unpooling with uint8 switches: the exact adjoint of the max-pool selection.
//
// Windows that tile the input (stride == kernel, no padding; the common 2x2/s2) write every output
// element exactly once, one output row at a time, instead of zero-filling and then scattering.
// Every other geometry (overlapping 3x3/s2, padding, gaps) gathers per input pixel over the windows
// that cover it, summing in row-major window order: deterministic, and the same order as CUDA.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

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
  int64_t planes, H, W, OH, OW;
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

// Range of window indices covering input coordinate i along one axis (empty when lo > hi).
XD_ALWAYS_INLINE void covering(int64_t i, int64_t k, int64_t s, int64_t p, int64_t n_out, int64_t& lo, int64_t& hi) {
  const int64_t u = i + p;
  lo = u - k + 1 > 0 ? (u - k + s) / s : 0;
  hi = std::min(n_out - 1, u / s);
}

// Any geometry, NCHW: each input pixel sums the pooled values whose switch points at it.
template <typename T>
XD_ALWAYS_INLINE void unpool_gather_rows(const UnpoolArgs<T>& a, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  const PoolGeometry& g = a.g;
  const int64_t H = a.H, W = a.W, OH = a.OH, OW = a.OW;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t plane = r / H, ih = r - plane * H;
    int64_t oh_lo, oh_hi;
    covering(ih, g.kH, g.sH, g.pH, OH, oh_lo, oh_hi);
    T* o = a.out + r * W;
    for (int64_t iw = 0; iw < W; ++iw) {
      int64_t ow_lo, ow_hi;
      covering(iw, g.kW, g.sW, g.pW, OW, ow_lo, ow_hi);
      A acc = A(0);
      for (int64_t oh = oh_lo; oh <= oh_hi; ++oh) {
        const int64_t kh = ih + g.pH - oh * g.sH;
        const int64_t off = (plane * OH + oh) * OW;
        for (int64_t ow = ow_lo; ow <= ow_hi; ++ow) {
          const int64_t pos = kh * g.kW + (iw + g.pW - ow * g.sW);
          if (a.sw[off + ow] == pos) acc += static_cast<A>(a.y[off + ow]);
        }
      }
      o[iw] = static_cast<T>(acc);
    }
  }
}

// Any geometry, NHWC: per input pixel, a run of C channels summed over the covering windows.
template <typename T>
XD_ALWAYS_INLINE void unpool_gather_pixels(const UnpoolArgs<T>& a, int64_t C, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  const PoolGeometry& g = a.g;
  const int64_t H = a.H, W = a.W, OH = a.OH, OW = a.OW;
  std::vector<A> acc(static_cast<size_t>(C));
  A* XD_RESTRICT ac = acc.data();
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t n = idx / (H * W), rem = idx - n * H * W, ih = rem / W, iw = rem - ih * W;
    int64_t oh_lo, oh_hi, ow_lo, ow_hi;
    covering(ih, g.kH, g.sH, g.pH, OH, oh_lo, oh_hi);
    covering(iw, g.kW, g.sW, g.pW, OW, ow_lo, ow_hi);
    for (int64_t c = 0; c < C; ++c) ac[c] = A(0);
    for (int64_t oh = oh_lo; oh <= oh_hi; ++oh) {
      for (int64_t ow = ow_lo; ow <= ow_hi; ++ow) {
        const uint8_t pos = static_cast<uint8_t>((ih + g.pH - oh * g.sH) * g.kW + (iw + g.pW - ow * g.sW));
        const int64_t off = ((n * OH + oh) * OW + ow) * C;
        const T* XD_RESTRICT yr = a.y + off;
        const uint8_t* XD_RESTRICT sr = a.sw + off;
        for (int64_t c = 0; c < C; ++c) ac[c] += sr[c] == pos ? static_cast<A>(yr[c]) : A(0);
      }
    }
    T* XD_RESTRICT o = a.out + idx * C;
    for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(ac[c]);
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
template <typename T>
XD_TARGET_AVX512 void unpool_gather_pixels_avx512(const UnpoolArgs<T>& a, int64_t C, int64_t b, int64_t e) {
  unpool_gather_pixels<T>(a, C, b, e);
}
template <typename T>
XD_TARGET_AVX2 void unpool_gather_pixels_avx2(const UnpoolArgs<T>& a, int64_t C, int64_t b, int64_t e) {
  unpool_gather_pixels<T>(a, C, b, e);
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

template <typename T>
void unpool_gather_pixels_any(const UnpoolArgs<T>& a, int64_t C, int64_t b, int64_t e) {
#if XD_MULTIVERSION
  if (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    switch (cpu_isa()) {
      case Isa::Avx512:
        return unpool_gather_pixels_avx512<T>(a, C, b, e);
      case Isa::Avx2:
        return unpool_gather_pixels_avx2<T>(a, C, b, e);
      default:
        break;
    }
  }
#endif
  unpool_gather_pixels<T>(a, C, b, e);
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
    UnpoolArgs<scalar_t> a{yc.const_data_ptr<scalar_t>(), sc.const_data_ptr<uint8_t>(),
                           out4.mutable_data_ptr<scalar_t>(), 0, H, W, OH, OW, g};
    const bool tiled = g.sH == g.kH && g.sW == g.kW && g.pH == 0 && g.pW == 0;
    if (fmt == at::MemoryFormat::ChannelsLast) {
      a.planes = N;
      if (tiled) {
        at::parallel_for(0, N * H, grain_rows(W * C),
                         [&](int64_t b, int64_t e) { unpool_tiled_rows_nhwc_any<scalar_t>(a, C, b, e); });
      } else {
        at::parallel_for(0, N * H * W, grain_rows(2 * C),
                         [&](int64_t b, int64_t e) { unpool_gather_pixels_any<scalar_t>(a, C, b, e); });
      }
      return;
    }
    a.planes = N * C;
    const int64_t rows = N * C * H, grain = grain_rows(W);
    if (tiled && g.kH == 2 && g.kW == 2) {
      at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { unpool_tiled_rows_any<scalar_t, 2, 2>(a, b, e); });
    } else if (tiled) {
      at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { unpool_tiled_rows_any<scalar_t, 0, 0>(a, b, e); });
    } else {
      at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { unpool_gather_rows<scalar_t>(a, b, e); });
    }
  });
}

at::Tensor as4d(const at::Tensor& t) { return t.dim() == 3 ? t.unsqueeze(0) : t; }

void check_unpool_args(const char* op, const at::Tensor& y, const at::Tensor& sw, const PoolGeometry& g, int64_t H,
                       int64_t W) {
  check_spatial_dims(op, "y", y);
  check_floating(op, "y", y);
  check_switches(op, y, sw);
  check_unpooled_size(op, H, W, y.size(-2), y.size(-1), g);
}

at::Tensor switch_unpool2d_cpu(const at::Tensor& y, const at::Tensor& sw, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_size) {
  const char* op = "switch_unpool2d";
  const PoolGeometry g = make_geometry(op, kernel_size, stride, padding);
  TORCH_CHECK_VALUE(output_size.size() == 2, op, ": output_size must be (H, W), got ", output_size);
  check_unpool_args(op, y, sw, g, output_size[0], output_size[1]);
  const at::MemoryFormat fmt = memory_format_of(y);
  std::vector<int64_t> shape = y.sizes().vec();
  shape[shape.size() - 2] = output_size[0];
  shape[shape.size() - 1] = output_size[1];
  at::Tensor out = at::empty(shape, y.options().memory_format(fmt));
  advise_huge_pages(out.data_ptr(), out.nbytes());
  unpool_into(as4d(y), as4d(sw), g, fmt, as4d(out), op);
  return out;
}

void switch_unpool2d_out_cpu(const at::Tensor& y, const at::Tensor& sw, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding, const at::Tensor& out) {
  const char* op = "switch_unpool2d_out";
  const PoolGeometry g = make_geometry(op, kernel_size, stride, padding);
  TORCH_CHECK_VALUE(out.dim() == y.dim(), op, ": out must have as many dims as y (", y.dim(), "), got ", out.dim());
  check_unpool_args(op, y, sw, g, out.size(-2), out.size(-1));
  TORCH_CHECK(out.device() == y.device(), op, ": out is on ", out.device(), " but y is on ", y.device());
  TORCH_CHECK_VALUE(out.scalar_type() == y.scalar_type(), op, ": out must have dtype ", y.scalar_type(), ", got ",
                    out.scalar_type());
  TORCH_CHECK_VALUE(out.sizes().slice(0, out.dim() - 2) == y.sizes().slice(0, y.dim() - 2), op,
                    ": out has shape ", out.sizes(), " but y has shape ", y.sizes());
  const at::MemoryFormat fmt = memory_format_of(y);
  TORCH_CHECK_VALUE(out.is_contiguous(fmt), op, ": out must be contiguous in y's memory format (", fmt, ")");
  unpool_into(as4d(y), as4d(sw), g, fmt, as4d(out), op);
}

}  // namespace
}  // namespace cpu
}  // namespace xraydeconv

TORCH_LIBRARY_IMPL(xraydeconv, CPU, m) {
  m.impl("switch_unpool2d", &xraydeconv::cpu::switch_unpool2d_cpu);
  m.impl("switch_unpool2d_out", &xraydeconv::cpu::switch_unpool2d_out_cpu);
}
