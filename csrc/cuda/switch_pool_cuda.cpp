// ATen binding of the CUDA switch-pooling kernels: checks arguments (the same checks and messages as
// the CPU backend, from ../switch_pool_checks.h), allocates in the input's memory format, and calls
// the raw-pointer launchers of switch_pool_kernels.cu on the current stream of the input's device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <tuple>
#include <vector>

#include "../switch_pool_checks.h"
#include "switch_pool_kernels.cuh"

namespace xraydeconv {
namespace cuda {
namespace {

// A function object, so that it can also serve as the device check of the shared argument checks.
struct CheckCuda {
  void operator()(const char* op, const char* name, const at::Tensor& t) const {
    TORCH_CHECK(t.is_cuda(), op, ": ", name, " is on ", t.device(), "; all tensors must be on the same CUDA device");
  }
};
constexpr CheckCuda check_cuda{};

PoolShape shape_of(const at::Tensor& in4, int64_t OH, int64_t OW, const PoolGeometry& g) {
  return PoolShape{in4.size(0),
                   in4.size(1),
                   in4.size(2),
                   in4.size(3),
                   OH,
                   OW,
                   static_cast<int>(g.kH),
                   static_cast<int>(g.kW),
                   static_cast<int>(g.sH),
                   static_cast<int>(g.sW),
                   static_cast<int>(g.pH),
                   static_cast<int>(g.pW)};
}

Layout layout_of(at::MemoryFormat fmt) { return fmt == at::MemoryFormat::ChannelsLast ? Layout::NHWC : Layout::NCHW; }

// Calls f(type_tag) with the CUDA scalar type matching `st` (at::Half and __half share their bits).
template <typename F>
void dispatch_floating(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat:
      f(float{});
      return;
    case at::kDouble:
      f(double{});
      return;
    case at::kHalf:
      f(__half{});
      return;
    case at::kBFloat16:
      f(__nv_bfloat16{});
      return;
    default:
      TORCH_CHECK_VALUE(false, op, ": unsupported dtype ", st);
  }
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

// ---------------------------------------------------------------------------------------------
// Switch validation. The kernels raise a flag in device memory instead of reading out of bounds; it is
// read back after the launch (a 4-byte copy and a sync of the current stream), and only when it is
// raised are the switches copied to the host to name the first bad one in the error.

struct SwitchFlag {
  at::Tensor device_flag;  // int32 on the device, zeroed before the launch
  int* device = nullptr;   // null while the stream is captured into a CUDA graph
};

SwitchFlag new_flag(const at::Tensor& like, cudaStream_t stream) {
  SwitchFlag f;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  // no synchronisation is allowed while capturing: skip the report (the kernels stay memory-safe)
  if (capture != cudaStreamCaptureStatusNone) return f;
  f.device_flag = at::empty({1}, like.options().dtype(at::kInt));
  f.device = static_cast<int*>(f.device_flag.mutable_data_ptr());
  C10_CUDA_CHECK(cudaMemsetAsync(f.device, 0, sizeof(int), stream));
  return f;
}

void check_flag(const char* op, const SwitchFlag& f, const at::Tensor& sw4, int64_t H, int64_t W,
                const PoolGeometry& g, cudaStream_t stream) {
  if (f.device == nullptr) return;
  int bad = 0;
  C10_CUDA_CHECK(cudaMemcpyAsync(&bad, f.device, sizeof(int), cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (bad == 0) return;
  report_bad_switch(op, sw4.cpu(), H, W, g);
  TORCH_CHECK(false, op, ": the kernel flagged an invalid switch that the host cannot find");
}

// ---------------------------------------------------------------------------------------------
// Pool.

// x4 any layout; out4/sw4 4-D and contiguous in fmt.
void pool_into(const char* op, const at::Tensor& x4, const PoolGeometry& g, at::MemoryFormat fmt,
               const at::Tensor& out4, const at::Tensor& sw4, bool relu = false) {
  if (out4.numel() == 0) return;
  const at::Tensor xc = x4.contiguous(fmt);
  const PoolShape s = shape_of(xc, out4.size(2), out4.size(3), g);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_floating(xc.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const auto launch = relu ? launch_switch_relu_pool2d<T> : launch_switch_pool2d<T>;
    C10_CUDA_CHECK(launch(cptr<T>(xc), mptr<T>(out4), mptr<uint8_t>(sw4), s, layout_of(fmt), stream));
  });
}

std::tuple<at::Tensor, at::Tensor> pool_cuda(const char* op, const at::Tensor& x, at::IntArrayRef kernel_size,
                                             at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                                             bool relu) {
  const PoolGeometry g = make_geometry(op, kernel_size, stride, padding);
  const auto [OH, OW] = check_pool_input(op, x, g, ceil_mode);
  check_cuda(op, "input", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = memory_format_of(x);
  const std::vector<int64_t> shape = with_spatial_size(x, OH, OW);
  at::Tensor out = at::empty(shape, x.options().memory_format(fmt));
  at::Tensor sw = at::empty(shape, x.options().dtype(at::kByte).memory_format(fmt));
  pool_into(op, as4d(x), g, fmt, as4d(out), as4d(sw), relu);
  return {out, sw};
}

std::tuple<at::Tensor, at::Tensor> switch_pool2d_cuda(const at::Tensor& x, at::IntArrayRef kernel_size,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      bool ceil_mode) {
  return pool_cuda("switch_pool2d", x, kernel_size, stride, padding, ceil_mode, false);
}

std::tuple<at::Tensor, at::Tensor> switch_relu_pool2d_cuda(const at::Tensor& x, at::IntArrayRef kernel_size,
                                                           at::IntArrayRef stride, at::IntArrayRef padding,
                                                           bool ceil_mode) {
  return pool_cuda("switch_relu_pool2d", x, kernel_size, stride, padding, ceil_mode, true);
}

void switch_pool2d_out_cuda(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, bool ceil_mode, const at::Tensor& out, const at::Tensor& sw) {
  const char* op = "switch_pool2d_out";
  const PoolGeometry g = make_geometry(op, kernel_size, stride, padding);
  const at::MemoryFormat fmt = check_pool_out(op, x, g, ceil_mode, out, sw, check_cuda);
  const c10::cuda::CUDAGuard guard(x.device());
  pool_into(op, as4d(x), g, fmt, as4d(out), as4d(sw));
}

// ---------------------------------------------------------------------------------------------
// Unpool.

// y4/sw4 any layout; out4 4-D and contiguous in fmt.
void unpool_into(const char* op, const at::Tensor& y4, const at::Tensor& sw4, const PoolGeometry& g,
                 at::MemoryFormat fmt, const at::Tensor& out4) {
  if (out4.numel() == 0) return;
  const at::Tensor yc = y4.contiguous(fmt);
  const at::Tensor sc = sw4.contiguous(fmt);
  PoolShape s = shape_of(out4, yc.size(2), yc.size(3), g);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const SwitchFlag flag = new_flag(yc, stream);
  dispatch_floating(yc.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(launch_switch_unpool2d<T>(cptr<T>(yc), cptr<uint8_t>(sc), mptr<T>(out4), s, layout_of(fmt),
                                             flag.device, stream));
  });
  check_flag(op, flag, sc, s.H, s.W, g, stream);
}

at::Tensor switch_unpool2d_cuda(const at::Tensor& y, const at::Tensor& sw, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_size) {
  const char* op = "switch_unpool2d";
  const PoolGeometry g = make_geometry(op, kernel_size, stride, padding);
  TORCH_CHECK_VALUE(output_size.size() == 2, op, ": output_size must be (H, W), got ", output_size);
  check_unpool_args(op, y, sw, g, output_size[0], output_size[1], check_cuda);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::MemoryFormat fmt = memory_format_of(y);
  at::Tensor out = at::empty(with_spatial_size(y, output_size[0], output_size[1]), y.options().memory_format(fmt));
  unpool_into(op, as4d(y), as4d(sw), g, fmt, as4d(out));
  return out;
}

void switch_unpool2d_out_cuda(const at::Tensor& y, const at::Tensor& sw, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, const at::Tensor& out) {
  const char* op = "switch_unpool2d_out";
  const PoolGeometry g = make_geometry(op, kernel_size, stride, padding);
  const at::MemoryFormat fmt = check_unpool_out(op, y, sw, g, out, check_cuda);
  const c10::cuda::CUDAGuard guard(y.device());
  unpool_into(op, as4d(y), as4d(sw), g, fmt, as4d(out));
}

// ---------------------------------------------------------------------------------------------
// Gather.

at::Tensor switch_gather2d_cuda(const at::Tensor& x, const at::Tensor& sw, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "switch_gather2d";
  const PoolGeometry g = make_geometry(op, kernel_size, stride, padding);
  check_gather_args(op, x, sw, g, check_cuda);
  const int64_t H = x.size(-2), W = x.size(-1);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = memory_format_of(x);
  at::Tensor out = at::empty(sw.sizes(), x.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor xc = as4d(x).contiguous(fmt);
  const at::Tensor sc = as4d(sw).contiguous(fmt);
  const at::Tensor o4 = as4d(out);
  const PoolShape s = shape_of(xc, sc.size(2), sc.size(3), g);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const SwitchFlag flag = new_flag(xc, stream);
  dispatch_floating(xc.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(launch_switch_gather2d<T>(cptr<T>(xc), cptr<uint8_t>(sc), mptr<T>(o4), s, layout_of(fmt),
                                             flag.device, stream));
  });
  check_flag(op, flag, sc, H, W, g, stream);
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace xraydeconv

TORCH_LIBRARY_IMPL(xraydeconv, CUDA, m) {
  m.impl("switch_pool2d", &xraydeconv::cuda::switch_pool2d_cuda);
  m.impl("switch_pool2d_out", &xraydeconv::cuda::switch_pool2d_out_cuda);
  m.impl("switch_relu_pool2d", &xraydeconv::cuda::switch_relu_pool2d_cuda);
  m.impl("switch_unpool2d", &xraydeconv::cuda::switch_unpool2d_cuda);
  m.impl("switch_unpool2d_out", &xraydeconv::cuda::switch_unpool2d_out_cuda);
  m.impl("switch_gather2d", &xraydeconv::cuda::switch_gather2d_cuda);
}
