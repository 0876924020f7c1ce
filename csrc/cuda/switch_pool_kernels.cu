// CUDA switch-pooling kernels (see switch_pool_kernels.cuh for the contract).
//
// All kernels are memory bound, so they are written for bandwidth:
//   * the common 2x2/stride-2 window on exactly tiled inputs has its own kernels that move 16 bytes
//     per load: NCHW threads own V adjacent outputs of a row and read 2V inputs of each of the two
//     input rows as one vector; NHWC threads own 16 bytes of channels of one output pixel, so a warp
//     reads contiguous channels (coalesced) from the four pixels of the window;
//   * every other geometry (any window, stride, padding, ceil_mode) runs a generic one-element-per-
//     thread kernel whose fastest-moving thread index follows the memory order of the layout;
//   * grid-stride loops over 32-bit indices with multiply-shift division when everything fits,
//     64-bit indices (plain division) otherwise;
//   * unpooling is a gather per output pixel over the windows that can cover it: deterministic, no
//     atomics, no zero fill, every output element written exactly once.
// Maxima are found on an integer image of each value (sign-magnitude bits folded to two's
// complement): it orders exactly like the floating-point comparison, is immune to the flush-to-zero
// of --use_fast_math (denormals must still win over zero, as in F.max_pool2d), and gives NaN the
// largest key so that the first NaN of a window wins and a later one never replaces it.
#include "switch_pool_kernels.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>

namespace xraydeconv {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// At least 4 resident blocks (1024 threads) per multiprocessor: caps registers at 64. Without a
// minimum, ptxas aims at full occupancy (32 registers) and spills in the generic unpool kernels.
constexpr int kMinBlocks = 4;

// ---------------------------------------------------------------------------------------------
// Values: ordering keys, accumulation type, vectors.

__device__ __forceinline__ int32_t order_key(float v) {
  const int32_t i = __float_as_int(v);
  const int32_t mag = i & 0x7fffffff;
  if (mag > 0x7f800000) return INT32_MAX;  // NaN
  return i < 0 ? -mag : mag;               // -0 and +0 share key 0: the first of them stays
}

__device__ __forceinline__ int32_t order_key(__nv_bfloat16 v) {
  // bfloat16 is the upper half of a float
  return order_key(__int_as_float(static_cast<int32_t>(static_cast<uint32_t>(__bfloat16_as_ushort(v)) << 16)));
}

__device__ __forceinline__ int32_t order_key(__half v) {
  const int32_t b = __half_as_ushort(v);
  const int32_t mag = b & 0x7fff;
  if (mag > 0x7c00) return INT32_MAX;  // NaN
  return (b & 0x8000) ? -mag : mag;
}

__device__ __forceinline__ long long order_key(double v) {
  const long long i = __double_as_longlong(v);
  const long long mag = i & 0x7fffffffffffffffLL;
  if (mag > 0x7ff0000000000000LL) return LLONG_MAX;  // NaN
  return i < 0 ? -mag : mag;
}

template <typename T>
struct Acc {
  using type = float;  // float, __half and __nv_bfloat16 are summed in float
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type a);
template <>
__device__ __forceinline__ float from_acc<float>(float a) {
  return a;
}
template <>
__device__ __forceinline__ double from_acc<double>(double a) {
  return a;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float a) {
  return __float2half_rn(a);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float a) {
  return __float2bfloat16_rn(a);
}

template <typename T>
__device__ __forceinline__ T zero() {
  return from_acc<T>(typename Acc<T>::type(0));
}

// N values loaded or stored as one access (16 bytes at most).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// Running maximum of one window with its switch; the first candidate is the starting maximum.
template <typename T>
struct WindowMax {
  using Key = decltype(order_key(T()));
  T value;
  Key key;
  uint8_t pos;
  __device__ __forceinline__ WindowMax(T first, uint8_t first_pos)
      : value(first), key(order_key(first)), pos(first_pos) {}
  // Strictly greater only: on ties the earlier position (row-major) stays.
  __device__ __forceinline__ void offer(T v, uint8_t p) {
    const Key k = order_key(v);
    if (k > key) {
      value = v;
      key = k;
      pos = p;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Index arithmetic.

// n / d by multiply-high and shift (Granlund-Montgomery; exact for n, d < 2^(bits-1)): a hardware
// division per element would cost more instructions than the bytes it moves can hide, and 64-bit
// division is a called subroutine that makes ptxas spill.
struct Div32 {
  uint32_t d, m, s;
  explicit Div32(uint32_t divisor) : d(divisor), m(1), s(0) {
    while (s < 32 && (uint64_t{1} << s) < divisor) ++s;
    m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << s) - divisor)) / divisor + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> s; }
};

struct Div64 {
  uint64_t d, m;
  uint32_t s;
  explicit Div64(uint64_t divisor) : d(divisor), m(1), s(0) {
    using u128 = unsigned __int128;
    while (s < 64 && (u128{1} << s) < divisor) ++s;
    m = static_cast<uint64_t>(((u128{1} << 64) * ((u128{1} << s) - divisor)) / divisor + 1);
  }
  __device__ __forceinline__ uint64_t div(uint64_t n) const { return (__umul64hi(n, m) + n) >> s; }
};

template <typename I>
struct DivOf;
template <>
struct DivOf<uint32_t> {
  using type = Div32;
};
template <>
struct DivOf<uint64_t> {
  using type = Div64;
};
template <typename I>
using Div = typename DivOf<I>::type;

struct Window {
  int kH, kW, sH, sW, pH, pW;
  Div32 by_sH, by_sW, by_kW;  // the generic unpool and gather divide by these per element
};

#define XD_GRID_STRIDE(i, items)                                                           \
  for (I i = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; i < (items); \
       i += static_cast<I>(blockDim.x) * gridDim.x)

// Coordinates of flat element i of an NCHW tensor of width div_w.d and height div_h.d.
template <typename I>
struct NchwIndex {
  I plane;  // n * C + c
  int h, w;
};

template <typename I>
__device__ __forceinline__ NchwIndex<I> nchw_index(I i, const Div<I>& div_w, const Div<I>& div_h) {
  const I q = div_w.div(i);
  const I plane = div_h.div(q);
  return {plane, static_cast<int>(q - plane * div_h.d), static_cast<int>(i - q * div_w.d)};
}

// Coordinates of flat element i of an NHWC tensor of div_c.d channels, width div_w.d and height div_h.d.
template <typename I>
struct NhwcIndex {
  I n, c;
  int h, w;
};

template <typename I>
__device__ __forceinline__ NhwcIndex<I> nhwc_index(I i, const Div<I>& div_c, const Div<I>& div_w,
                                                   const Div<I>& div_h) {
  const I q = div_c.div(i);
  const I q2 = div_w.div(q);
  const I n = div_h.div(q2);
  return {n, i - q * div_c.d, static_cast<int>(q2 - n * div_h.d), static_cast<int>(q - q2 * div_w.d)};
}

// ---------------------------------------------------------------------------------------------
// Pooling.

// NCHW, 2x2 stride 2, H = 2*OH and W = 2*OW, W a multiple of 2V: one item = V outputs of a row.
template <typename T, typename I, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    pool_nchw_2x2(const T* __restrict__ x, T* __restrict__ out, uint8_t* __restrict__ sw, I items, Div<I> per_row,
                  I W, I OW) {
  XD_GRID_STRIDE(i, items) {
    const I r = per_row.div(i);  // output row over all planes; its input rows are 2r and 2r + 1
    const I j = i - r * per_row.d;
    const T* p = x + (I(2) * r) * W + I(2 * V) * j;
    const Vec<T, 2 * V> a = load_vec<T, 2 * V>(p);
    const Vec<T, 2 * V> b = load_vec<T, 2 * V>(p + W);
    Vec<T, V> o;
    Vec<uint8_t, V> s;
#pragma unroll
    for (int t = 0; t < V; ++t) {
      WindowMax<T> m(a.v[2 * t], 0);
      m.offer(a.v[2 * t + 1], 1);
      m.offer(b.v[2 * t], 2);
      m.offer(b.v[2 * t + 1], 3);
      o.v[t] = m.value;
      s.v[t] = m.pos;
    }
    const I q = r * OW + I(V) * j;
    store_vec<T, V>(out + q, o);
    store_vec<uint8_t, V>(sw + q, s);
  }
}

// NHWC, 2x2 stride 2, H = 2*OH and W = 2*OW, C a multiple of VC: one item = VC channels of a pixel.
template <typename T, typename I, int VC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    pool_nhwc_2x2(const T* __restrict__ x, T* __restrict__ out, uint8_t* __restrict__ sw, I items,
                  Div<I> per_pixel, Div<I> per_row, I C, I W) {
  XD_GRID_STRIDE(i, items) {
    const I pix = per_pixel.div(i);
    const I cv = i - pix * per_pixel.d;
    const I r = per_row.div(pix);  // n * OH + oh; the window's top row is 2r of the (n * H + h) rows
    const I ow = pix - r * per_row.d;
    const T* p = x + ((I(2) * r) * W + I(2) * ow) * C + I(VC) * cv;
    const Vec<T, VC> a = load_vec<T, VC>(p);
    const Vec<T, VC> b = load_vec<T, VC>(p + C);
    const Vec<T, VC> c = load_vec<T, VC>(p + W * C);
    const Vec<T, VC> d = load_vec<T, VC>(p + W * C + C);
    Vec<T, VC> o;
    Vec<uint8_t, VC> s;
#pragma unroll
    for (int t = 0; t < VC; ++t) {
      WindowMax<T> m(a.v[t], 0);
      m.offer(b.v[t], 1);
      m.offer(c.v[t], 2);
      m.offer(d.v[t], 3);
      o.v[t] = m.value;
      s.v[t] = m.pos;
    }
    const I q = pix * C + I(VC) * cv;
    store_vec<T, VC>(out + q, o);
    store_vec<uint8_t, VC>(sw + q, s);
  }
}

// Maximum of the window at (oh, ow), clipped to the input; p points at this plane's (NCHW) or this
// channel's (NHWC) pixel (0, 0), `stride` elements apart per pixel.
template <typename T, typename I>
__device__ __forceinline__ WindowMax<T> window_max(const T* p, int oh, int ow, int H, int W, const Window& g,
                                                   I stride) {
  const int h0 = oh * g.sH - g.pH, w0 = ow * g.sW - g.pW;
  const int hs = max(h0, 0), ws = max(w0, 0);
  const int he = min(h0 + g.kH, H), we = min(w0 + g.kW, W);
  WindowMax<T> m(p[(I(hs) * W + ws) * stride], static_cast<uint8_t>((hs - h0) * g.kW + (ws - w0)));
  for (int h = hs; h < he; ++h) {
    for (int w = ws; w < we; ++w) {
      m.offer(p[(I(h) * W + w) * stride], static_cast<uint8_t>((h - h0) * g.kW + (w - w0)));
    }
  }
  return m;
}

// Any window, NCHW: one thread per output element, consecutive threads along a row.
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    pool_nchw_any(const T* __restrict__ x, T* __restrict__ out, uint8_t* __restrict__ sw, I items, Div<I> div_ow,
                  Div<I> div_oh, int H, int W, Window g) {
  XD_GRID_STRIDE(i, items) {
    const NchwIndex<I> at = nchw_index(i, div_ow, div_oh);
    const WindowMax<T> m = window_max(x + at.plane * I(H) * I(W), at.h, at.w, H, W, g, I(1));
    out[i] = m.value;
    sw[i] = m.pos;
  }
}

// Any window, NHWC: one thread per output element, consecutive threads along the channels.
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    pool_nhwc_any(const T* __restrict__ x, T* __restrict__ out, uint8_t* __restrict__ sw, I items, Div<I> div_c,
                  Div<I> div_ow, Div<I> div_oh, int H, int W, Window g) {
  XD_GRID_STRIDE(i, items) {
    const NhwcIndex<I> at = nhwc_index(i, div_c, div_ow, div_oh);
    const I C = div_c.d;
    const WindowMax<T> m = window_max(x + at.n * I(H) * I(W) * C + at.c, at.h, at.w, H, W, g, C);
    out[i] = m.value;
    sw[i] = m.pos;
  }
}

// switch_relu_pool2d: pooled x becomes pooled relu(x). In a window whose maximum is not positive every relu value
// is zero, so its first position inside the input wins, as in max_pool2d(relu(x)); a NaN maximum stays.
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    relu_switches(T* __restrict__ out, uint8_t* __restrict__ sw, I items, Div<I> div_c, Div<I> div_ow, Div<I> div_oh,
                  bool nhwc, Window g) {
  XD_GRID_STRIDE(i, items) {
    if (!(to_acc(out[i]) <= 0)) continue;
    int h, w;
    if (nhwc) {
      const NhwcIndex<I> at = nhwc_index(i, div_c, div_ow, div_oh);
      h = at.h;
      w = at.w;
    } else {
      const NchwIndex<I> at = nchw_index(i, div_ow, div_oh);
      h = at.h;
      w = at.w;
    }
    const int fh = h * g.sH < g.pH ? g.pH - h * g.sH : 0, fw = w * g.sW < g.pW ? g.pW - w * g.sW : 0;
    out[i] = zero<T>();
    sw[i] = static_cast<uint8_t>(fh * g.kW + fw);
  }
}

// ---------------------------------------------------------------------------------------------
// Unpooling: out[h, w] = sum of y over the windows whose switch points at (h, w).

// NCHW, 2x2 stride 2 exact tiling: each output pixel lies in exactly one window, so a thread owns
// V windows of a pooled row and writes their 2 x 2V outputs as two vectors.
template <typename T, typename I, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    unpool_nchw_2x2(const T* __restrict__ y, const uint8_t* __restrict__ sw, T* __restrict__ out, I items,
                    Div<I> per_row, I W, I OW, int* __restrict__ bad) {
  XD_GRID_STRIDE(i, items) {
    const I r = per_row.div(i);
    const I j = i - r * per_row.d;
    const I q = r * OW + I(V) * j;
    const Vec<T, V> yv = load_vec<T, V>(y + q);
    const Vec<uint8_t, V> sv = load_vec<uint8_t, V>(sw + q);
    const T z = zero<T>();
    Vec<T, 2 * V> top, bottom;
    bool invalid = false;
#pragma unroll
    for (int t = 0; t < V; ++t) {
      const uint8_t s = sv.v[t];
      const T v = yv.v[t];
      top.v[2 * t] = s == 0 ? v : z;
      top.v[2 * t + 1] = s == 1 ? v : z;
      bottom.v[2 * t] = s == 2 ? v : z;
      bottom.v[2 * t + 1] = s == 3 ? v : z;
      invalid |= s > 3;
    }
    if (invalid && bad != nullptr) *bad = 1;
    T* p = out + (I(2) * r) * W + I(2 * V) * j;
    store_vec<T, 2 * V>(p, top);
    store_vec<T, 2 * V>(p + W, bottom);
  }
}

// NHWC, 2x2 stride 2 exact tiling: a thread owns VC channels of one window and writes its 4 pixels.
template <typename T, typename I, int VC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    unpool_nhwc_2x2(const T* __restrict__ y, const uint8_t* __restrict__ sw, T* __restrict__ out, I items,
                    Div<I> per_pixel, Div<I> per_row, I C, I W, int* __restrict__ bad) {
  XD_GRID_STRIDE(i, items) {
    const I pix = per_pixel.div(i);
    const I cv = i - pix * per_pixel.d;
    const I r = per_row.div(pix);
    const I ow = pix - r * per_row.d;
    const I q = pix * C + I(VC) * cv;
    const Vec<T, VC> yv = load_vec<T, VC>(y + q);
    const Vec<uint8_t, VC> sv = load_vec<uint8_t, VC>(sw + q);
    const T z = zero<T>();
    Vec<T, VC> a, b, c, d;
    bool invalid = false;
#pragma unroll
    for (int t = 0; t < VC; ++t) {
      const uint8_t s = sv.v[t];
      const T v = yv.v[t];
      a.v[t] = s == 0 ? v : z;
      b.v[t] = s == 1 ? v : z;
      c.v[t] = s == 2 ? v : z;
      d.v[t] = s == 3 ? v : z;
      invalid |= s > 3;
    }
    if (invalid && bad != nullptr) *bad = 1;
    T* p = out + ((I(2) * r) * W + I(2) * ow) * C + I(VC) * cv;
    store_vec<T, VC>(p, a);
    store_vec<T, VC>(p + C, b);
    store_vec<T, VC>(p + W * C, c);
    store_vec<T, VC>(p + W * C + C, d);
  }
}

// Range [lo, hi) of the windows along one axis that contain input coordinate `h`.
__device__ __forceinline__ void covering(int h, int k, const Div32& s, int p, int n_out, int& lo, int& hi) {
  const int ph = h + p;
  lo = ph < k ? 0 : static_cast<int>(s.div(static_cast<uint32_t>(ph - k))) + 1;
  hi = min(static_cast<int>(s.div(static_cast<uint32_t>(ph))) + 1, n_out);
}

// A switch is valid when it lies inside its window and inside the input (not in the padding).
__device__ __forceinline__ bool switch_valid(int s, int h0, int w0, int H, int W, const Window& g) {
  if (s >= g.kH * g.kW) return false;
  const int row = static_cast<int>(g.by_kW.div(static_cast<uint32_t>(s)));
  const int h = h0 + row, w = w0 + (s - row * g.kW);
  return h >= 0 && h < H && w >= 0 && w < W;
}

// Sum over the windows covering (h, w); yp/sp point at this plane's (NCHW) or this channel's (NHWC)
// pooled element (0, 0), `stride` elements apart per pooled pixel. Each window's switch is validated
// by the one thread that owns its first in-image pixel, so every switch is checked exactly once.
template <typename T, typename I>
__device__ __forceinline__ T gather_windows(int h, int w, int H, int W, int OH, int OW, const Window& g,
                                            const T* __restrict__ yp, const uint8_t* __restrict__ sp, I stride,
                                            int* bad) {
  int oh_lo, oh_hi, ow_lo, ow_hi;
  covering(h, g.kH, g.by_sH, g.pH, OH, oh_lo, oh_hi);
  covering(w, g.kW, g.by_sW, g.pW, OW, ow_lo, ow_hi);
  typename Acc<T>::type sum = 0;
  bool hit = false;
  bool invalid = false;
  for (int oh = oh_lo; oh < oh_hi; ++oh) {
    const int h0 = oh * g.sH - g.pH;
    const int dh = h - h0;
    for (int ow = ow_lo; ow < ow_hi; ++ow) {
      const int w0 = ow * g.sW - g.pW;
      const int dw = w - w0;
      const I k = (I(oh) * OW + ow) * stride;
      const int s = sp[k];
      if (s == dh * g.kW + dw) {
        // the first hit is copied, not added to 0, so a lone value keeps its bits (denormals, -0)
        const auto v = to_acc(yp[k]);
        sum = hit ? sum + v : v;
        hit = true;
      } else if (h == max(h0, 0) && w == max(w0, 0)) {
        invalid |= !switch_valid(s, h0, w0, H, W, g);
      }
    }
  }
  if (invalid && bad != nullptr) *bad = 1;
  return hit ? from_acc<T>(sum) : zero<T>();
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    unpool_nchw_any(const T* __restrict__ y, const uint8_t* __restrict__ sw, T* __restrict__ out, I items,
                    Div<I> div_w, Div<I> div_h, int OH, int OW, Window g, int* __restrict__ bad) {
  XD_GRID_STRIDE(i, items) {
    const NchwIndex<I> at = nchw_index(i, div_w, div_h);
    const I base = at.plane * I(OH) * I(OW);
    out[i] = gather_windows<T, I>(at.h, at.w, static_cast<int>(div_h.d), static_cast<int>(div_w.d), OH, OW, g, y + base,
                                  sw + base, I(1), bad);
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    unpool_nhwc_any(const T* __restrict__ y, const uint8_t* __restrict__ sw, T* __restrict__ out, I items,
                    Div<I> div_c, Div<I> div_w, Div<I> div_h, int OH, int OW, Window g, int* __restrict__ bad) {
  XD_GRID_STRIDE(i, items) {
    const NhwcIndex<I> at = nhwc_index(i, div_c, div_w, div_h);
    const I C = div_c.d;
    const I base = at.n * I(OH) * I(OW) * C + at.c;
    out[i] = gather_windows<T, I>(at.h, at.w, static_cast<int>(div_h.d), static_cast<int>(div_w.d), OH, OW, g, y + base,
                                  sw + base, C, bad);
  }
}

// ---------------------------------------------------------------------------------------------
// Gather: out = x at the switches.

template <typename T>
__device__ __forceinline__ T read_switch(const T* plane, int s, int oh, int ow, int H, int W, int64_t pixel_stride,
                                         const Window& g, int* bad) {
  const int h0 = oh * g.sH - g.pH, w0 = ow * g.sW - g.pW;
  if (!switch_valid(s, h0, w0, H, W, g)) {
    if (bad != nullptr) *bad = 1;
    return zero<T>();
  }
  const int row = static_cast<int>(g.by_kW.div(static_cast<uint32_t>(s)));
  const int h = h0 + row, w = w0 + (s - row * g.kW);
  return plane[(static_cast<int64_t>(h) * W + w) * pixel_stride];
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    gather_nchw_any(const T* __restrict__ x, const uint8_t* __restrict__ sw, T* __restrict__ out, I items,
                    Div<I> div_ow, Div<I> div_oh, int H, int W, Window g, int* __restrict__ bad) {
  XD_GRID_STRIDE(i, items) {
    const NchwIndex<I> at = nchw_index(i, div_ow, div_oh);
    out[i] = read_switch(x + at.plane * I(H) * I(W), sw[i], at.h, at.w, H, W, 1, g, bad);
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    gather_nhwc_any(const T* __restrict__ x, const uint8_t* __restrict__ sw, T* __restrict__ out, I items,
                    Div<I> div_c, Div<I> div_ow, Div<I> div_oh, int H, int W, Window g, int* __restrict__ bad) {
  XD_GRID_STRIDE(i, items) {
    const NhwcIndex<I> at = nhwc_index(i, div_c, div_ow, div_oh);
    const I C = div_c.d;
    out[i] = read_switch(x + at.n * I(H) * I(W) * C + at.c, sw[i], at.h, at.w, H, W, static_cast<int64_t>(C), g, bad);
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers.

int multiprocessors() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (dev >= 0 && dev < 64 && cached[dev] > 0) return cached[dev];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 1;
  if (dev >= 0 && dev < 64) cached[dev] = n;
  return n;
}

// Enough blocks to fill every multiprocessor several times over; the grid-stride loop covers the rest.
unsigned blocks_for(uint64_t items) {
  const uint64_t needed = (items + kThreads - 1) / kThreads;
  const uint64_t cap = static_cast<uint64_t>(multiprocessors()) * 16;
  return static_cast<unsigned>(std::max<uint64_t>(1, std::min(needed, cap)));
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

bool is_2x2_tiling(const PoolShape& s) {
  return s.kH == 2 && s.kW == 2 && s.sH == 2 && s.sW == 2 && s.pH == 0 && s.pW == 0 && s.H == 2 * s.OH &&
         s.W == 2 * s.OW;
}

Window window_of(const PoolShape& s) {
  return Window{s.kH, s.kW, s.sH, s.sW, s.pH, s.pW, Div32(s.sH), Div32(s.sW), Div32(s.kW)};
}

// Values per thread of the vectorised kernels: 16-byte input loads.
template <typename T>
constexpr int kRowVec = static_cast<int>(8 / sizeof(T));  // NCHW: outputs per thread (2 * kRowVec inputs per row)
template <typename T>
constexpr int kChanVec = static_cast<int>(16 / sizeof(T));  // NHWC: channels per thread

template <typename T, typename I>
void pool_impl(const T* x, T* out, uint8_t* sw, const PoolShape& s, Layout layout, cudaStream_t stream) {
  const Window g = window_of(s);
  const bool tiled = is_2x2_tiling(s);
  const I n_out = static_cast<I>(s.N * s.C * s.OH * s.OW);
  if (layout == Layout::NCHW) {
    constexpr int V = kRowVec<T>;
    if (tiled && s.W % (2 * V) == 0 && aligned(x, 16) && aligned(out, V * sizeof(T)) && aligned(sw, V)) {
      const I items = n_out / V;
      pool_nchw_2x2<T, I, V><<<blocks_for(items), kThreads, 0, stream>>>(
          x, out, sw, items, Div<I>(static_cast<I>(s.OW / V)), static_cast<I>(s.W), static_cast<I>(s.OW));
      return;
    }
    pool_nchw_any<T, I><<<blocks_for(n_out), kThreads, 0, stream>>>(
        x, out, sw, n_out, Div<I>(static_cast<I>(s.OW)), Div<I>(static_cast<I>(s.OH)), static_cast<int>(s.H),
        static_cast<int>(s.W), g);
    return;
  }
  constexpr int VC = kChanVec<T>;
  if (tiled && s.C % VC == 0 && aligned(x, 16) && aligned(out, 16) && aligned(sw, VC)) {
    const I items = n_out / VC;
    pool_nhwc_2x2<T, I, VC><<<blocks_for(items), kThreads, 0, stream>>>(
        x, out, sw, items, Div<I>(static_cast<I>(s.C / VC)), Div<I>(static_cast<I>(s.OW)), static_cast<I>(s.C),
        static_cast<I>(s.W));
    return;
  }
  pool_nhwc_any<T, I><<<blocks_for(n_out), kThreads, 0, stream>>>(
      x, out, sw, n_out, Div<I>(static_cast<I>(s.C)), Div<I>(static_cast<I>(s.OW)), Div<I>(static_cast<I>(s.OH)),
      static_cast<int>(s.H), static_cast<int>(s.W), g);
}

template <typename T, typename I>
void relu_impl(T* out, uint8_t* sw, const PoolShape& s, Layout layout, cudaStream_t stream) {
  const I n_out = static_cast<I>(s.N * s.C * s.OH * s.OW);
  const bool nhwc = layout == Layout::NHWC;
  relu_switches<T, I><<<blocks_for(n_out), kThreads, 0, stream>>>(
      out, sw, n_out, Div<I>(static_cast<I>(nhwc ? s.C : 1)), Div<I>(static_cast<I>(s.OW)),
      Div<I>(static_cast<I>(s.OH)), nhwc, window_of(s));
}

template <typename T, typename I>
void unpool_impl(const T* y, const uint8_t* sw, T* out, const PoolShape& s, Layout layout, int* bad,
                 cudaStream_t stream) {
  const Window g = window_of(s);
  const bool tiled = is_2x2_tiling(s);
  const I n_pooled = static_cast<I>(s.N * s.C * s.OH * s.OW);
  const I n_in = static_cast<I>(s.N * s.C * s.H * s.W);
  if (layout == Layout::NCHW) {
    constexpr int V = kRowVec<T>;
    if (tiled && s.W % (2 * V) == 0 && aligned(out, 16) && aligned(y, V * sizeof(T)) && aligned(sw, V)) {
      const I items = n_pooled / V;
      unpool_nchw_2x2<T, I, V><<<blocks_for(items), kThreads, 0, stream>>>(
          y, sw, out, items, Div<I>(static_cast<I>(s.OW / V)), static_cast<I>(s.W), static_cast<I>(s.OW), bad);
      return;
    }
    unpool_nchw_any<T, I><<<blocks_for(n_in), kThreads, 0, stream>>>(
        y, sw, out, n_in, Div<I>(static_cast<I>(s.W)), Div<I>(static_cast<I>(s.H)), static_cast<int>(s.OH),
        static_cast<int>(s.OW), g, bad);
    return;
  }
  constexpr int VC = kChanVec<T>;
  if (tiled && s.C % VC == 0 && aligned(out, 16) && aligned(y, 16) && aligned(sw, VC)) {
    const I items = n_pooled / VC;
    unpool_nhwc_2x2<T, I, VC><<<blocks_for(items), kThreads, 0, stream>>>(
        y, sw, out, items, Div<I>(static_cast<I>(s.C / VC)), Div<I>(static_cast<I>(s.OW)), static_cast<I>(s.C),
        static_cast<I>(s.W), bad);
    return;
  }
  unpool_nhwc_any<T, I><<<blocks_for(n_in), kThreads, 0, stream>>>(
      y, sw, out, n_in, Div<I>(static_cast<I>(s.C)), Div<I>(static_cast<I>(s.W)), Div<I>(static_cast<I>(s.H)),
      static_cast<int>(s.OH), static_cast<int>(s.OW), g, bad);
}

template <typename T, typename I>
void gather_impl(const T* x, const uint8_t* sw, T* out, const PoolShape& s, Layout layout, int* bad,
                 cudaStream_t stream) {
  const Window g = window_of(s);
  const I n_pooled = static_cast<I>(s.N * s.C * s.OH * s.OW);
  if (layout == Layout::NCHW) {
    gather_nchw_any<T, I><<<blocks_for(n_pooled), kThreads, 0, stream>>>(
        x, sw, out, n_pooled, Div<I>(static_cast<I>(s.OW)), Div<I>(static_cast<I>(s.OH)), static_cast<int>(s.H),
        static_cast<int>(s.W), g, bad);
    return;
  }
  gather_nhwc_any<T, I><<<blocks_for(n_pooled), kThreads, 0, stream>>>(
      x, sw, out, n_pooled, Div<I>(static_cast<I>(s.C)), Div<I>(static_cast<I>(s.OW)), Div<I>(static_cast<I>(s.OH)),
      static_cast<int>(s.H), static_cast<int>(s.W), g, bad);
}

// 32-bit indices (and multiply-shift division) whenever every element index fits in 31 bits.
bool fits_32bit(const PoolShape& s) {
  const int64_t n_in = s.N * s.C * s.H * s.W, n_out = s.N * s.C * s.OH * s.OW;
  return n_in <= INT32_MAX && n_out <= INT32_MAX;
}

bool empty(const PoolShape& s) { return s.N * s.C * s.OH * s.OW == 0 || s.H * s.W == 0; }

}  // namespace

template <typename T>
cudaError_t launch_switch_pool2d(const T* x, T* out, uint8_t* switches, const PoolShape& s, Layout layout,
                                 cudaStream_t stream) {
  if (empty(s)) return cudaSuccess;
  if (fits_32bit(s)) {
    pool_impl<T, uint32_t>(x, out, switches, s, layout, stream);
  } else {
    pool_impl<T, uint64_t>(x, out, switches, s, layout, stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_switch_relu_pool2d(const T* x, T* out, uint8_t* switches, const PoolShape& s, Layout layout,
                                      cudaStream_t stream) {
  if (empty(s)) return cudaSuccess;
  if (fits_32bit(s)) {
    pool_impl<T, uint32_t>(x, out, switches, s, layout, stream);
    relu_impl<T, uint32_t>(out, switches, s, layout, stream);
  } else {
    pool_impl<T, uint64_t>(x, out, switches, s, layout, stream);
    relu_impl<T, uint64_t>(out, switches, s, layout, stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_switch_unpool2d(const T* y, const uint8_t* switches, T* out, const PoolShape& s, Layout layout,
                                   int* bad_switch, cudaStream_t stream) {
  if (s.N * s.C * s.H * s.W == 0) return cudaSuccess;
  if (fits_32bit(s)) {
    unpool_impl<T, uint32_t>(y, switches, out, s, layout, bad_switch, stream);
  } else {
    unpool_impl<T, uint64_t>(y, switches, out, s, layout, bad_switch, stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_switch_gather2d(const T* x, const uint8_t* switches, T* out, const PoolShape& s, Layout layout,
                                   int* bad_switch, cudaStream_t stream) {
  if (empty(s)) return cudaSuccess;
  if (fits_32bit(s)) {
    gather_impl<T, uint32_t>(x, switches, out, s, layout, bad_switch, stream);
  } else {
    gather_impl<T, uint64_t>(x, switches, out, s, layout, bad_switch, stream);
  }
  return cudaGetLastError();
}

#define XD_INSTANTIATE(T)                                                                                      \
  template cudaError_t launch_switch_pool2d<T>(const T*, T*, uint8_t*, const PoolShape&, Layout, cudaStream_t); \
  template cudaError_t launch_switch_relu_pool2d<T>(const T*, T*, uint8_t*, const PoolShape&, Layout,           \
                                                    cudaStream_t);                                              \
  template cudaError_t launch_switch_unpool2d<T>(const T*, const uint8_t*, T*, const PoolShape&, Layout, int*,   \
                                                 cudaStream_t);                                                 \
  template cudaError_t launch_switch_gather2d<T>(const T*, const uint8_t*, T*, const PoolShape&, Layout, int*,   \
                                                 cudaStream_t);

XD_INSTANTIATE(float)
XD_INSTANTIATE(double)
XD_INSTANTIATE(__half)
XD_INSTANTIATE(__nv_bfloat16)

#undef XD_INSTANTIATE

}  // namespace cuda
}  // namespace xraydeconv
