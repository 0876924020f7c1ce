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

// The fast path for 3x3 kernels and Cout a multiple of 16: per input pixel the positive values are listed
// first (by switch, so all values of a list land on the same unpooled position), then each list is reduced
// into 9 register accumulators of 16 output channels, and only those are added to memory. Accumulating in
// registers matters: a plain axpy per value re-reads and re-writes the same 9 output vectors for every
// channel of the pixel, a chain of store-to-load dependencies that runs several times slower.
// 16 floats: one AVX-512 register in the AVX-512 variant, split by the compiler in the narrower ones.
typedef float vec16 __attribute__((vector_size(64)));

XD_ALWAYS_INLINE vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

XD_ALWAYS_INLINE void store16(float* p, vec16 v) { std::memcpy(p, &v, sizeof(v)); }

// Adds the listed values of one switch position (SY, SX) of a 2x2 window into the 4x4 block of accumulators.
template <int SY, int SX>
XD_ALWAYS_INLINE void accumulate_2x2(vec16 (&acc)[16], const int32_t* XD_RESTRICT ci, const float* XD_RESTRICT cv,
                                     int64_t n, const float* XD_RESTRICT wt, int64_t Cout, int64_t o0) {
  for (int64_t q = 0; q < n; ++q) {
    const float v = cv[q];
    const float* XD_RESTRICT wc = wt + static_cast<int64_t>(ci[q]) * 9 * Cout + o0;
#pragma GCC unroll 3
    for (int ky = 0; ky < 3; ++ky) {
#pragma GCC unroll 3
      for (int kx = 0; kx < 3; ++kx) acc[(SY + ky) * 4 + SX + kx] += v * load16(wc + (ky * 3 + kx) * Cout);
    }
  }
}

XD_ALWAYS_INLINE void scatter_range_3x3(const ScatterArgs& a, int64_t begin, int64_t end) {
  constexpr int V = 16;
  const int64_t h = a.h, w = a.w, C = a.C, OH = a.OH, OW = a.OW, Cout = a.Cout;
  const int64_t padH = a.padH, padW = a.padW, pkH = a.pkH, pkW = a.pkW;
  const int64_t npos = a.sw ? pkH * pkW : 1;
  const int64_t plane_in = h * w * C, plane_out = OH * OW * Cout;
  const float* XD_RESTRICT wt = a.wt;
  std::vector<int32_t> idx(npos * C);
  std::vector<float> val(npos * C);
  std::vector<int64_t> cnt(npos);
  const bool tiles2x2 = a.sw != nullptr && pkH == 2 && pkW == 2 && padH == 1 && padW == 1;
  for (int64_t p = begin; p < end; ++p) {
    const float* XD_RESTRICT gp = a.g + p * plane_in;
    const uint8_t* XD_RESTRICT sp = a.sw ? a.sw + (p / a.group) * plane_in : nullptr;
    float* XD_RESTRICT op = a.out + p * plane_out;
    // The output is zeroed a few rows ahead of the scatter instead of all at once beforehand: the rows an input
    // row adds into are then still in cache when it does, and the plane is never swept by a separate memset.
    int64_t zeroed = 0;
    const int64_t reach = (sp ? pkH - 1 : 0) + 2 - padH;  // last output row an input row i reaches: i*pkH + reach
    for (int64_t i = 0; i < h; ++i) {
      const int64_t upto = std::min(OH, (sp ? i * pkH : i) + reach + 1);
      if (upto > zeroed) {
        std::memset(op + zeroed * OW * Cout, 0, sizeof(float) * (upto - zeroed) * OW * Cout);
        zeroed = upto;
      }
      for (int64_t j = 0; j < w; ++j) {
        const int64_t base = (i * w + j) * C;
        // branch-free listing (the signs are as good as random: a branch per value would mispredict half the
        // time), one pass per switch value so that each count stays in a register
        for (int64_t s = 0; s < npos; ++s) {
          int32_t* XD_RESTRICT li = idx.data() + s * C;
          float* XD_RESTRICT lv = val.data() + s * C;
          int64_t m = 0;
          for (int64_t c = 0; c < C; ++c) {
            const float v = gp[base + c];
            li[m] = static_cast<int32_t>(c);
            lv[m] = v;
            // the deconvnet's rectification: zeros, negatives (and NaN) add nothing
            m += (v > 0.f) & (!sp || sp[base + c] == s);
          }
          cnt[s] = m;
        }
        if (tiles2x2) {
          // 2x2 windows, 3x3 kernel, padding 1: all four switch positions of this window land in the 4x4 output
          // block at (2i - 1, 2j - 1); one set of 16 register accumulators serves them all, flushed once
          if (cnt[0] + cnt[1] + cnt[2] + cnt[3] == 0) continue;
          for (int64_t o0 = 0; o0 < Cout; o0 += V) {
            vec16 acc[16];
            for (int t = 0; t < 16; ++t) acc[t] = vec16{};
            accumulate_2x2<0, 0>(acc, idx.data(), val.data(), cnt[0], wt, Cout, o0);
            accumulate_2x2<0, 1>(acc, idx.data() + C, val.data() + C, cnt[1], wt, Cout, o0);
            accumulate_2x2<1, 0>(acc, idx.data() + 2 * C, val.data() + 2 * C, cnt[2], wt, Cout, o0);
            accumulate_2x2<1, 1>(acc, idx.data() + 3 * C, val.data() + 3 * C, cnt[3], wt, Cout, o0);
            for (int r = 0; r < 4; ++r) {
              const int64_t oy = 2 * i - 1 + r;
              if (oy < 0 || oy >= OH) continue;
              for (int c = 0; c < 4; ++c) {
                const int64_t ox = 2 * j - 1 + c;
                if (ox < 0 || ox >= OW) continue;
                float* o = op + (oy * OW + ox) * Cout + o0;
                store16(o, load16(o) + acc[r * 4 + c]);
              }
            }
          }
          continue;
        }
        for (int64_t s = 0; s < npos; ++s) {
          const int64_t n = cnt[s];
          if (n == 0) continue;
          const int64_t Y = sp ? i * pkH + s / pkW : i, X = sp ? j * pkW + s % pkW : j;
          const int32_t* XD_RESTRICT ci = idx.data() + s * C;
          const float* XD_RESTRICT cv = val.data() + s * C;
          for (int64_t o0 = 0; o0 < Cout; o0 += V) {
            vec16 acc[9];
            for (int t = 0; t < 9; ++t) acc[t] = vec16{};
            for (int64_t q = 0; q < n; ++q) {
              const float v = cv[q];
              const float* XD_RESTRICT wc = wt + static_cast<int64_t>(ci[q]) * 9 * Cout + o0;
#pragma GCC unroll 9
              for (int t = 0; t < 9; ++t) acc[t] += v * load16(wc + t * Cout);
            }
            for (int ky = 0; ky < 3; ++ky) {
              const int64_t oy = Y + ky - padH;
              if (oy < 0 || oy >= OH) continue;
              for (int kx = 0; kx < 3; ++kx) {
                const int64_t ox = X + kx - padW;
                if (ox < 0 || ox >= OW) continue;
                float* o = op + (oy * OW + ox) * Cout + o0;
                store16(o, load16(o) + acc[ky * 3 + kx]);
              }
            }
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
XD_ALWAYS_INLINE void gather_range_narrow(const ScatterArgs& a, const float* wg, int64_t begin, int64_t end) {
  const int64_t h = a.h, w = a.w, C = a.C, kH = a.kH, kW = a.kW, OH = a.OH, OW = a.OW, Cout = a.Cout;
  const int64_t padH = a.padH, padW = a.padW;
  const vec16 zero{};
  for (int64_t p = begin; p < end; ++p) {
    const float* XD_RESTRICT gp = a.g + p * h * w * C;
    float* XD_RESTRICT op = a.out + p * OH * OW * Cout;
    for (int64_t oy = 0; oy < OH; ++oy) {
      for (int64_t ox = 0; ox < OW; ++ox) {
        for (int64_t co = 0; co < Cout; ++co) {
          vec16 acc{};
          for (int64_t ky = 0; ky < kH; ++ky) {
            const int64_t iy = oy + padH - ky;
            if (iy < 0 || iy >= h) continue;
            for (int64_t kx = 0; kx < kW; ++kx) {
              const int64_t ix = ox + padW - kx;
              if (ix < 0 || ix >= w) continue;
              const float* XD_RESTRICT gv = gp + (iy * w + ix) * C;
              const float* XD_RESTRICT wv = wg + ((co * kH + ky) * kW + kx) * C;
              for (int64_t c0 = 0; c0 < C; c0 += 16) {
                vec16 v = load16(gv + c0);
                v = v > zero ? v : zero;  // the deconvnet's rectification
                acc += v * load16(wv + c0);
              }
            }
          }
          float sum = 0.f;
          for (int k = 0; k < 16; ++k) sum += acc[k];
          op[(oy * OW + ox) * Cout + co] = sum;
        }
      }
    }
  }
}

XD_ALWAYS_INLINE void scatter_dispatch(const ScatterArgs& a, int64_t b, int64_t e) {
  if (a.wg != nullptr) return gather_range_narrow(a, a.wg, b, e);
  if (a.kH == 3 && a.kW == 3 && a.Cout % 16 == 0) return scatter_range_3x3(a, b, e);
  switch (a.Cout) {
    case 8: return scatter_range<8>(a, b, e);
    case 16: return scatter_range<16>(a, b, e);
    case 32: return scatter_range<32>(a, b, e);
    case 64: return scatter_range<64>(a, b, e);
    default: return scatter_range<0>(a, b, e);
  }
}

void scatter_baseline(const ScatterArgs& a, int64_t b, int64_t e) { scatter_dispatch(a, b, e); }
#if XD_MULTIVERSION
XD_TARGET_AVX2 void scatter_avx2(const ScatterArgs& a, int64_t b, int64_t e) { scatter_dispatch(a, b, e); }
XD_TARGET_AVX512 void scatter_avx512(const ScatterArgs& a, int64_t b, int64_t e) { scatter_dispatch(a, b, e); }
#endif

constexpr const char* kOp = "relu_scatter_conv_transpose2d";

// Argument checks: ValueError naming the argument (RuntimeError only for tensors on another device, as the
// other ops do). Returns the kernel arguments with every pointer but `out` (and `wg`) set.
ScatterArgs check_scatter_args(const at::Tensor& g, const std::optional<at::Tensor>& switches,
                               const at::Tensor& weight, at::IntArrayRef pool_kernel, at::IntArrayRef padding,
                               at::IntArrayRef output_size, int64_t group) {
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
  TORCH_CHECK_VALUE(output_size.size() == 2, kOp, ": output_size must be (OH, OW), got ", output_size);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, kOp, ": padding must be non-negative, got ", padding);
  TORCH_CHECK_VALUE(output_size[0] > 0 && output_size[1] > 0, kOp, ": output_size must be positive, got ",
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
  TORCH_CHECK_VALUE(h * a.pkH <= a.OH + a.kH - 1 && w * a.pkW <= a.OW + a.kW - 1, kOp, ": output_size ",
                    output_size, " is too small for the unpooled signal of size (", h * a.pkH, ", ", w * a.pkW, ")");
  return a;
}

at::Tensor relu_scatter_conv_transpose2d(const at::Tensor& g, const std::optional<at::Tensor>& switches,
                                          const at::Tensor& weight, at::IntArrayRef pool_kernel,
                                          at::IntArrayRef padding, at::IntArrayRef output_size, int64_t group) {
  ScatterArgs a = check_scatter_args(g, switches, weight, pool_kernel, padding, output_size, group);
  const int64_t P = g.size(0), C = a.C;
  at::Tensor wg;
  const bool gather = !a.sw && a.Cout <= 4 && C % 16 == 0;
  if (gather) {
    wg = weight.permute({3, 1, 2, 0}).contiguous();
    a.wg = wg.data_ptr<float>();
  }
  // the gathering path writes every output value and the 3x3 scatter zeroes its rows as it goes; the generic
  // scatter adds into zeros
  const bool self_zeroing = gather || (a.kH == 3 && a.kW == 3 && a.Cout % 16 == 0);
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

}  // namespace

TORCH_LIBRARY_IMPL(xraydeconv, CPU, m) {
  m.impl("relu_scatter_conv_transpose2d", &relu_scatter_conv_transpose2d);
}

}  // namespace cpu
}  // namespace xraydeconv
