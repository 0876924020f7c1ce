// Geometry and argument checks shared by the CPU and CUDA switch-pooling kernels.
// Dependency-light on purpose (ATen core + c10 only) so every backend can include it cheaply.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <vector>

namespace xraydeconv {

// Window geometry of one 2-D pooling (dilation is always 1).
struct PoolGeometry {
  int64_t kH, kW, sH, sW, pH, pW;
  int64_t window() const { return kH * kW; }
  // Stride smaller than the window in some direction: one input pixel can belong to several windows.
  bool overlapping() const { return sH < kH || sW < kW; }
};

// Output length of a pooling along one axis, the same formula as ATen's pooling_output_shape.
inline int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, bool ceil_mode) {
  const int64_t num = in + 2 * p - (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  // floor division that rounds towards -inf (num may be negative for tiny inputs)
  int64_t out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;
  // the last window must start inside the input or the left padding
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

// Tensors of 4 dims stored channels-last (and not also plain contiguous) run the NHWC kernels and
// give NHWC outputs; everything else is NCHW. ops.py's fake implementations use the same rule.
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat memory_format_of(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline int64_t pair_at(c10::IntArrayRef v, const char* op, const char* what, size_t i) {
  TORCH_CHECK_VALUE(v.size() == 1 || v.size() == 2, op, ": ", what, " must have one or two values, got ", v.size());
  return v.size() == 1 ? v[0] : v[i];
}

// Validates kernel_size / stride / padding (stride empty = kernel_size, as in max_pool2d).
inline PoolGeometry make_geometry(const char* op, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                  c10::IntArrayRef padding) {
  PoolGeometry g{};
  g.kH = pair_at(kernel_size, op, "kernel_size", 0);
  g.kW = pair_at(kernel_size, op, "kernel_size", 1);
  if (stride.empty()) {
    g.sH = g.kH;
    g.sW = g.kW;
  } else {
    g.sH = pair_at(stride, op, "stride", 0);
    g.sW = pair_at(stride, op, "stride", 1);
  }
  g.pH = pair_at(padding, op, "padding", 0);
  g.pW = pair_at(padding, op, "padding", 1);
  TORCH_CHECK_VALUE(g.kH > 0 && g.kW > 0, op, ": kernel_size must be positive, got (", g.kH, ", ", g.kW, ")");
  TORCH_CHECK_VALUE(g.kH * g.kW <= 255, op, ": a ", g.kH, "x", g.kW,
                    " window has more than 255 positions; uint8 switches hold at most 255 (use a smaller kernel)");
  TORCH_CHECK_VALUE(g.sH > 0 && g.sW > 0, op, ": stride must be positive, got (", g.sH, ", ", g.sW, ")");
  TORCH_CHECK_VALUE(g.pH >= 0 && g.pW >= 0, op, ": padding must be non-negative, got (", g.pH, ", ", g.pW, ")");
  TORCH_CHECK_VALUE(g.pH <= g.kH / 2 && g.pW <= g.kW / 2, op, ": padding (", g.pH, ", ", g.pW,
                    ") must be at most half of kernel_size (", g.kH, ", ", g.kW, ")");
  return g;
}

inline void check_spatial_dims(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 3 || t.dim() == 4, op, ": ", name, " must be 3-D (C, H, W) or 4-D (N, C, H, W), got ",
                    t.dim(), "-D with shape ", t.sizes());
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
                    " must be float32, float64, float16 or bfloat16, got ", st);
}

// Checks the pooling input and returns the pooled (OH, OW).
inline std::pair<int64_t, int64_t> check_pool_input(const char* op, const at::Tensor& x, const PoolGeometry& g,
                                                    bool ceil_mode) {
  check_spatial_dims(op, "input", x);
  check_floating(op, "input", x);
  const int64_t H = x.size(-2), W = x.size(-1);
  const int64_t OH = pooled_size(H, g.kH, g.sH, g.pH, ceil_mode);
  const int64_t OW = pooled_size(W, g.kW, g.sW, g.pW, ceil_mode);
  TORCH_CHECK_VALUE(OH > 0 && OW > 0, op, ": input of spatial size (", H, ", ", W, ") is too small for a ", g.kH,
                    "x", g.kW, " window with padding (", g.pH, ", ", g.pW, "): the output would be (", OH, ", ", OW,
                    ")");
  return {OH, OW};
}

// Checks that `switches` can index a pooled tensor `pooled` (same shape, uint8, same device).
inline void check_switches(const char* op, const at::Tensor& pooled, const at::Tensor& switches) {
  TORCH_CHECK_VALUE(switches.scalar_type() == at::kByte, op, ": switches must be uint8, got ",
                    switches.scalar_type());
  TORCH_CHECK(switches.device() == pooled.device(), op, ": switches are on ", switches.device(),
              " but the pooled tensor is on ", pooled.device());
  TORCH_CHECK_VALUE(switches.sizes() == pooled.sizes(), op, ": switches have shape ", switches.sizes(),
                    " but the pooled tensor has shape ", pooled.sizes());
}

// The input size (H, W) must pool to exactly (OH, OW) with this geometry (floor or ceil mode).
inline void check_unpooled_size(const char* op, int64_t H, int64_t W, int64_t OH, int64_t OW, const PoolGeometry& g) {
  TORCH_CHECK_VALUE(H > 0 && W > 0, op, ": output_size must be positive, got (", H, ", ", W, ")");
  const bool h_ok = pooled_size(H, g.kH, g.sH, g.pH, false) == OH || pooled_size(H, g.kH, g.sH, g.pH, true) == OH;
  const bool w_ok = pooled_size(W, g.kW, g.sW, g.pW, false) == OW || pooled_size(W, g.kW, g.sW, g.pW, true) == OW;
  TORCH_CHECK_VALUE(h_ok && w_ok, op, ": output_size (", H, ", ", W, ") does not pool to the switches' size (", OH,
                    ", ", OW, ") with kernel (", g.kH, ", ", g.kW, "), stride (", g.sH, ", ", g.sW, "), padding (",
                    g.pH, ", ", g.pW, ")");
}

// Is switch s of window (oh, ow) a position of the window that lies inside the H x W input?
inline bool switch_ok(int s, int64_t oh, int64_t ow, int64_t H, int64_t W, const PoolGeometry& g) {
  if (s >= g.window()) return false;
  const int64_t ih = oh * g.sH - g.pH + s / g.kW, iw = ow * g.sW - g.pW + s % g.kW;
  return ih >= 0 && ih < H && iw >= 0 && iw < W;
}

// Throws a ValueError naming the first bad switch of `sw` (4-D, on the CPU, any strides); returns
// when every switch is valid.
inline void report_bad_switch(const char* op, const at::Tensor& sw, int64_t H, int64_t W, const PoolGeometry& g) {
  const uint8_t* p = sw.const_data_ptr<uint8_t>();
  const auto st = sw.strides();
  for (int64_t n = 0; n < sw.size(0); ++n)
    for (int64_t c = 0; c < sw.size(1); ++c)
      for (int64_t oh = 0; oh < sw.size(2); ++oh)
        for (int64_t ow = 0; ow < sw.size(3); ++ow) {
          const int s = p[n * st[0] + c * st[1] + oh * st[2] + ow * st[3]];
          if (switch_ok(s, oh, ow, H, W, g)) continue;
          TORCH_CHECK_VALUE(s < g.window(), op, ": switch value ", s, " at (", n, ", ", c, ", ", oh, ", ", ow,
                            ") is outside its ", g.kH, "x", g.kW, " window (valid: 0..", g.window() - 1, ")");
          TORCH_CHECK_VALUE(false, op, ": switch value ", s, " at (", n, ", ", c, ", ", oh, ", ", ow,
                            ") points outside the ", H, "x", W, " input (into the padding)");
        }
}

// A 3-D (C, H, W) tensor viewed as a batch of one; the kernels see 4-D tensors only.
inline at::Tensor as4d(const at::Tensor& t) { return t.dim() == 3 ? t.unsqueeze(0) : t; }

// `t`'s shape with the last two (spatial) sizes replaced by (H, W): the shape of a pooled or unpooled output.
inline std::vector<int64_t> with_spatial_size(const at::Tensor& t, int64_t H, int64_t W) {
  std::vector<int64_t> shape = t.sizes().vec();
  shape[shape.size() - 2] = H;
  shape[shape.size() - 1] = W;
  return shape;
}

// The backend's own device check of an input, called where the CUDA binding checks for CUDA tensors;
// the CPU binding passes this no-op (its dispatch key already implies CPU tensors).
struct NoDeviceCheck {
  void operator()(const char*, const char*, const at::Tensor&) const {}
};

// Checks the arguments of switch_pool2d_out and returns the memory format the kernel runs in.
template <typename DeviceCheck = NoDeviceCheck>
inline at::MemoryFormat check_pool_out(const char* op, const at::Tensor& x, const PoolGeometry& g, bool ceil_mode,
                                       const at::Tensor& out, const at::Tensor& sw,
                                       DeviceCheck check_device = DeviceCheck{}) {
  const auto [OH, OW] = check_pool_input(op, x, g, ceil_mode);
  check_device(op, "input", x);
  const at::MemoryFormat fmt = memory_format_of(x);
  const std::vector<int64_t> shape = with_spatial_size(x, OH, OW);
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(shape) && out.scalar_type() == x.scalar_type(), op,
                    ": out must have shape ", at::IntArrayRef(shape), " and dtype ", x.scalar_type(), ", got ",
                    out.sizes(), " ", out.scalar_type());
  TORCH_CHECK(out.device() == x.device() && sw.device() == x.device(), op, ": out and switches must be on ",
              x.device());
  check_switches(op, out, sw);
  TORCH_CHECK_VALUE(out.is_contiguous(fmt) && sw.is_contiguous(fmt), op,
                    ": out and switches must be contiguous in the input's memory format (", fmt, ")");
  return fmt;
}

// Checks y and its switches for an unpooling to the spatial size (H, W).
template <typename DeviceCheck = NoDeviceCheck>
inline void check_unpool_args(const char* op, const at::Tensor& y, const at::Tensor& sw, const PoolGeometry& g,
                              int64_t H, int64_t W, DeviceCheck check_device = DeviceCheck{}) {
  check_spatial_dims(op, "y", y);
  check_floating(op, "y", y);
  check_device(op, "y", y);
  check_switches(op, y, sw);
  check_unpooled_size(op, H, W, y.size(-2), y.size(-1), g);
}

// Checks the arguments of switch_unpool2d_out and returns the memory format the kernel runs in.
template <typename DeviceCheck = NoDeviceCheck>
inline at::MemoryFormat check_unpool_out(const char* op, const at::Tensor& y, const at::Tensor& sw,
                                         const PoolGeometry& g, const at::Tensor& out,
                                         DeviceCheck check_device = DeviceCheck{}) {
  TORCH_CHECK_VALUE(out.dim() == y.dim(), op, ": out must have as many dims as y (", y.dim(), "), got ", out.dim());
  check_unpool_args(op, y, sw, g, out.size(-2), out.size(-1), check_device);
  TORCH_CHECK(out.device() == y.device(), op, ": out is on ", out.device(), " but y is on ", y.device());
  TORCH_CHECK_VALUE(out.scalar_type() == y.scalar_type(), op, ": out must have dtype ", y.scalar_type(), ", got ",
                    out.scalar_type());
  TORCH_CHECK_VALUE(out.sizes().slice(0, out.dim() - 2) == y.sizes().slice(0, y.dim() - 2), op,
                    ": out has shape ", out.sizes(), " but y has shape ", y.sizes());
  const at::MemoryFormat fmt = memory_format_of(y);
  TORCH_CHECK_VALUE(out.is_contiguous(fmt), op, ": out must be contiguous in y's memory format (", fmt, ")");
  return fmt;
}

// Checks the arguments of switch_gather2d: x is the unpooled-size tensor, sw the switches of its pooling.
template <typename DeviceCheck = NoDeviceCheck>
inline void check_gather_args(const char* op, const at::Tensor& x, const at::Tensor& sw, const PoolGeometry& g,
                              DeviceCheck check_device = DeviceCheck{}) {
  check_spatial_dims(op, "x", x);
  check_floating(op, "x", x);
  check_device(op, "x", x);
  TORCH_CHECK_VALUE(sw.scalar_type() == at::kByte, op, ": switches must be uint8, got ", sw.scalar_type());
  TORCH_CHECK(sw.device() == x.device(), op, ": switches are on ", sw.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(sw.dim() == x.dim() && sw.sizes().slice(0, sw.dim() - 2) == x.sizes().slice(0, x.dim() - 2), op,
                    ": switches of shape ", sw.sizes(), " do not match x of shape ", x.sizes(),
                    " in their leading dims");
  check_unpooled_size(op, x.size(-2), x.size(-1), sw.size(-2), sw.size(-1), g);
}

}  // namespace xraydeconv
