// CUDA switch-pooling kernels: raw pointers in, a cudaError_t out, launched on the caller's stream.
//
// Only CUDA headers are included so that `nvcc -c switch_pool_kernels.cu` compiles without torch;
// the ATen binding (switch_pool_cuda.cpp) checks arguments, allocates and calls these launchers.
//
// Semantics (the same as the CPU kernels and F.max_pool2d(..., return_indices=True)):
//   switch_pool2d    out = max over each window, switches = uint8 row * kW + col of the first
//                    maximum in row-major window order; a NaN wins (the first NaN of the window).
//   switch_unpool2d  out[h, w] = sum of y over the windows whose switch points at (h, w): the exact
//                    adjoint of the selection; a gather per output pixel, every element written once.
//   switch_gather2d  out = x read at the switch positions (the adjoint of switch_unpool2d).
// Both readers of switches set *bad_switch = 1 (and read nothing out of bounds) when a switch points
// outside its window or into the padding; the caller zeroes the flag first and inspects it afterwards.
// bad_switch may be null to skip the report (e.g. while a CUDA graph is being captured).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace xraydeconv {
namespace cuda {

enum class Layout : int {
  NCHW = 0,  // plain contiguous (C, H, W tensors are N = 1)
  NHWC = 1,  // channels_last
};

// Sizes of one pooling: the input (N, C, H, W), the pooled output (OH, OW) and the window.
struct PoolShape {
  int64_t N, C, H, W, OH, OW;
  int kH, kW, sH, sW, pH, pW;
};

// T is float, double, __half or __nv_bfloat16 (explicitly instantiated in switch_pool_kernels.cu).
template <typename T>
cudaError_t launch_switch_pool2d(const T* x, T* out, uint8_t* switches, const PoolShape& s, Layout layout,
                                 cudaStream_t stream);

// switch_pool2d of relu(x): the pooling above, then the windows whose maximum is not positive take value 0 and
// the switch of their first position inside the input (exactly max_pool2d(relu(x)) and its switches).
template <typename T>
cudaError_t launch_switch_relu_pool2d(const T* x, T* out, uint8_t* switches, const PoolShape& s, Layout layout,
                                      cudaStream_t stream);

template <typename T>
cudaError_t launch_switch_unpool2d(const T* y, const uint8_t* switches, T* out, const PoolShape& s, Layout layout,
                                   int* bad_switch, cudaStream_t stream);

template <typename T>
cudaError_t launch_switch_gather2d(const T* x, const uint8_t* switches, T* out, const PoolShape& s, Layout layout,
                                   int* bad_switch, cudaStream_t stream);

}  // namespace cuda
}  // namespace xraydeconv
