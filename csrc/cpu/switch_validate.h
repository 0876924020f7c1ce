// Validation of caller-provided switches before unpool / gather use them as addresses: every switch
// must name a position inside its window, and for windows clipped by padding or ceil_mode a position
// inside the input. Fully interior windows only need s < kH*kW, checked with one vectorised max.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../switch_pool_checks.h"
#include "cpu_common.h"

namespace xraydeconv {
namespace cpu {

// sw: 4-D uint8, contiguous in its own memory format. (H, W): the unpooled size.
inline void validate_switches(const char* op, const at::Tensor& sw, int64_t H, int64_t W, const PoolGeometry& g) {
  const int64_t numel = sw.numel();
  if (numel == 0) return;
  const uint8_t* p = sw.const_data_ptr<uint8_t>();
  std::atomic<bool> bad{false};
  const uint8_t limit = static_cast<uint8_t>(g.window());
  at::parallel_for(0, numel, 1 << 16, [&](int64_t b, int64_t e) {
    uint8_t mx = 0;
    for (int64_t i = b; i < e; ++i) mx = std::max(mx, p[i]);
    if (mx >= limit) bad = true;
  });
  // windows clipped by padding or ceil_mode: check the position against the input
  const int64_t N = sw.size(0), C = sw.size(1), OH = sw.size(2), OW = sw.size(3);
  const auto st = sw.strides();
  auto clipped_h = [&](int64_t oh) { return oh * g.sH - g.pH < 0 || oh * g.sH - g.pH + g.kH > H; };
  auto clipped_w = [&](int64_t ow) { return ow * g.sW - g.pW < 0 || ow * g.sW - g.pW + g.kW > W; };
  std::vector<int64_t> border_cols;
  for (int64_t ow = 0; ow < OW; ++ow)
    if (clipped_w(ow)) border_cols.push_back(ow);
  at::parallel_for(0, N * OH, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / OH, oh = r - n * OH;
      const bool row_clipped = clipped_h(oh);
      if (!row_clipped && border_cols.empty()) continue;
      for (int64_t c = 0; c < C; ++c) {
        const uint8_t* q = p + n * st[0] + c * st[1] + oh * st[2];
        if (row_clipped) {
          for (int64_t ow = 0; ow < OW; ++ow)
            if (!switch_ok(q[ow * st[3]], oh, ow, H, W, g)) bad = true;
        } else {
          for (int64_t ow : border_cols)
            if (!switch_ok(q[ow * st[3]], oh, ow, H, W, g)) bad = true;
        }
      }
    }
  });
  if (bad) report_bad_switch(op, sw, H, W, g);
}

}  // namespace cpu
}  // namespace xraydeconv
