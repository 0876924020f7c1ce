// CPU gather at the switches: out[n, c, oh, ow] = x[n, c, oh*sH - pH + s / kW, ow*sW - pW + s % kW].
// The adjoint of switch_unpool2d; autograd uses it for the pooled values' and the unpool input's gradients.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../switch_pool_checks.h"
#include "cpu_common.h"
#include "switch_validate.h"

namespace xraydeconv {
namespace cpu {
namespace {

template <typename T>
struct GatherArgs {
  const T* x;
  const uint8_t* sw;
  T* out;
  int64_t H, W, OH, OW;
  PoolGeometry g;
};

// NCHW; KW is a compile-time constant on the 2x2 path so the division by kW is a shift.
template <typename T, int KW>
XD_ALWAYS_INLINE void gather_rows(const GatherArgs<T>& a, int64_t begin, int64_t end) {
  const PoolGeometry& g = a.g;
  const int64_t H = a.H, W = a.W, OH = a.OH, OW = a.OW;
  const int64_t kW = KW ? KW : g.kW;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t plane = r / OH, oh = r - plane * OH;
    const T* XD_RESTRICT xp = a.x + plane * H * W + (oh * g.sH - g.pH) * W - g.pW;
    const uint8_t* XD_RESTRICT sr = a.sw + r * OW;
    T* XD_RESTRICT o = a.out + r * OW;
    for (int64_t ow = 0; ow < OW; ++ow) {
      const int64_t s = sr[ow], kh = s / kW, kw = s - kh * kW;
      o[ow] = xp[kh * W + ow * g.sW + kw];
    }
  }
}

template <typename T>
XD_ALWAYS_INLINE void gather_pixels(const GatherArgs<T>& a, int64_t C, int64_t begin, int64_t end) {
  const PoolGeometry& g = a.g;
  const int64_t H = a.H, W = a.W, OH = a.OH, OW = a.OW;
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t n = idx / (OH * OW), rem = idx - n * OH * OW, oh = rem / OW, ow = rem - oh * OW;
    const T* XD_RESTRICT xp = a.x + ((n * H + oh * g.sH - g.pH) * W + ow * g.sW - g.pW) * C;
    const uint8_t* XD_RESTRICT sr = a.sw + idx * C;
    T* XD_RESTRICT o = a.out + idx * C;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t s = sr[c], kh = s / g.kW, kw = s - kh * g.kW;
      o[c] = xp[(kh * W + kw) * C + c];
    }
  }
}

at::Tensor switch_gather2d_cpu(const at::Tensor& x, const at::Tensor& sw, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "switch_gather2d";
  const PoolGeometry g = make_geometry(op, kernel_size, stride, padding);
  check_gather_args(op, x, sw, g);
  const int64_t H = x.size(-2), W = x.size(-1);
  const at::MemoryFormat fmt = memory_format_of(x);
  at::Tensor out = at::empty(sw.sizes(), x.options().memory_format(fmt));
  const at::Tensor xc = as4d(x).contiguous(fmt);
  const at::Tensor sc = as4d(sw).contiguous(fmt);
  validate_switches(op, sc, H, W, g);
  if (out.numel() == 0) return out;
  const at::Tensor o4 = as4d(out);
  const int64_t N = xc.size(0), C = xc.size(1), OH = sc.size(2), OW = sc.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "switch_gather2d", [&] {
    const GatherArgs<scalar_t> a{xc.const_data_ptr<scalar_t>(), sc.const_data_ptr<uint8_t>(),
                                 o4.mutable_data_ptr<scalar_t>(), H, W, OH, OW, g};
    if (fmt == at::MemoryFormat::ChannelsLast) {
      at::parallel_for(0, N * OH * OW, grain_rows(C),
                       [&](int64_t b, int64_t e) { gather_pixels<scalar_t>(a, C, b, e); });
    } else {
      const int64_t rows = N * C * OH, grain = grain_rows(OW);
      if (g.kW == 2) {
        at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { gather_rows<scalar_t, 2>(a, b, e); });
      } else {
        at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { gather_rows<scalar_t, 0>(a, b, e); });
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace xraydeconv

TORCH_LIBRARY_IMPL(xraydeconv, CPU, m) { m.impl("switch_gather2d", &xraydeconv::cpu::switch_gather2d_cpu); }
