// Training-mode BatchNorm followed by ReLU, and optionally by a 2x2/s2 max pool, on channels-last float32/float64
// maps: the layers conv -> BatchNorm -> ReLU (-> pool) of a CNN's training step, in fewer passes over memory.
//
// The values are torch's bit for bit. The batch statistics and the running-stat update are torch's own
// (at::batch_norm_update_stats) or, for float32 under its vectorised kernels, its operations with the sums held in
// registers; everything else repeats torch's channels-last CPU kernels operation for operation,
// with a fused multiply-add wherever torch's vectorised (AVX2, AVX-512) build has one and nowhere in its baseline
// build: y = fma(x, alpha, beta) with alpha = invstd * weight and beta = fma(-mean, alpha, bias); ReLU as
// clamp_min; the backward's sum(g) and dotp = fma(x - mean, g, dotp) in per-thread buffers over the row chunks
// at::parallel_for hands torch, added across threads in double; grad_x = fma(-(x - mean), k, g - sum / N) * invstd
// * weight. What changes is the traffic:
// - forward: the ReLU is applied as y is written (no second pass over it); with the pool, y is never written at all,
//   only the pooled values and their switches;
// - backward: ReLU's mask is applied as the gradient is read (recomputed from x), and with the pool the full-size
//   gradient is never materialised: each row's gradient is rebuilt from the pooled gradient and the switches as
//   grad_x needs it. The pooled forward also keeps x at the switches (a quarter of x), the only positions with a
//   nonzero gradient, so the sums read that instead of x: torch's other terms are exact zeros, and each channel's
//   remaining terms are added in torch's order.
#pragma GCC optimize("fp-contract=off")  // only the explicit fused multiply-adds below, where torch has them

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Version.h>
#include <ATen/ops/batch_norm_update_stats.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/native_batch_norm_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "batch_norm_rows_avx2.h"
#include "cpu_common.h"

namespace xraydeconv {
namespace cpu {
namespace {

using at::Tensor;

void check_input(const Tensor& x, const Tensor& weight, const Tensor& bias, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be (N, C, H, W), got ", x.dim(), " dimensions");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  // torch itself takes its contiguous (NCHW) kernel, with another summation order, for a map that is both
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous(), op,
              ": x must be channels_last (and not also NCHW-contiguous)");
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 1, op, ": expected more than 1 value per channel when training");
  for (const Tensor* t : {&weight, &bias}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1) && t->is_contiguous() &&
                    t->scalar_type() == x.scalar_type(),
                op, ": weight and bias must be contiguous (C,) tensors of x's dtype");
  }
}

// 1 / sqrt(var + eps) of the batch's (biased) variance, as torch's training-mode batch_norm saves it.
Tensor inverse_std(const Tensor& var, double eps) {
  Tensor invstd = at::empty_like(var);
  AT_DISPATCH_FLOATING_TYPES(var.scalar_type(), "inverse_std", [&] {
    const scalar_t* v = var.data_ptr<scalar_t>();
    scalar_t* out = invstd.data_ptr<scalar_t>();
    for (int64_t c = 0; c < var.numel(); ++c) {
      const double vd = v[c];  // torch's InvStd transform, in double
      out[c] = (vd != 0 || eps != 0) ? static_cast<scalar_t>(1.0 / std::sqrt(vd + eps)) : scalar_t(0);
    }
  });
  return invstd;
}

template <typename T>
XD_ALWAYS_INLINE T relu(T y) {
  return y < T(0) ? T(0) : y;  // clamp_min(y, 0): -0 and NaN pass through as torch's relu_ leaves them
}

// a * b + c rounded once (F: torch's vectorised kernels) or twice (its baseline kernels).
template <bool F, typename T>
XD_ALWAYS_INLINE T madd(T a, T b, T c) {
  if constexpr (F) {
    return std::fma(a, b, c);
  } else {
    return a * b + c;
  }
}

// The width of torch's CPU vectors in this process: 64 bytes (AVX-512 kernels), 32 (AVX2), 0 (baseline or not x86).
inline int64_t torch_vector_bytes() {
#if defined(__x86_64__)
  static const int64_t bytes = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX512" ? int64_t(64) : cap == "AVX2" ? int64_t(32) : int64_t(0);
  }();
  return bytes;
#else
  return 0;
#endif
}

inline bool torch_uses_fma() { return torch_vector_bytes() > 0; }

// alpha = invstd * weight and beta = bias - mean * alpha per channel: [alpha | beta], 2C values, from (C,) tensors.
template <typename T>
std::vector<T> affine(const Tensor& mean_t, const Tensor& invstd_t, const Tensor& weight_t, const Tensor& bias_t) {
  const T *mean = mean_t.data_ptr<T>(), *invstd = invstd_t.data_ptr<T>();
  const T *weight = weight_t.data_ptr<T>(), *bias = bias_t.data_ptr<T>();
  const int64_t C = mean_t.numel();
  const bool f = torch_uses_fma();
  std::vector<T> ab(2 * C);
  for (int64_t c = 0; c < C; ++c) {
    ab[c] = invstd[c] * weight[c];
    ab[C + c] = f ? std::fma(-mean[c], ab[c], bias[c]) : bias[c] - mean[c] * ab[c];
  }
  return ab;
}

// torch reports AVX2 or AVX-512 kernels only on CPUs with AVX2 and FMA, which is all run_fma asks for.
#if XD_MULTIVERSION
#define XD_TARGET_FMA __attribute__((target("avx2,fma")))
#else
#define XD_TARGET_FMA
#endif

// Each loop is a job whose run<F>(begin, end) handles a range of rows; run_fma compiles it with FMA instructions.
template <typename Job>
XD_TARGET_FMA void run_fma(const Job& job, int64_t b, int64_t e) {
  job.template run<true>(b, e);
}
template <typename Job>
void run_plain(const Job& job, int64_t b, int64_t e) {
  job.template run<false>(b, e);
}
template <typename Job>
void parallel_rows(int64_t n, int64_t grain, const Job& job) {
  const bool f = torch_uses_fma();
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { f ? run_fma(job, b, e) : run_plain(job, b, e); });
}

// The AVX2 rows (batch_norm_rows_avx2.h) take float32 in the FMA variant when C is a multiple of 8.
template <typename T, bool F>
constexpr bool kRows8 = XD_MULTIVERSION && F && std::is_same_v<T, float>;

template <typename T>
struct ForwardJob {
  const T* x;
  T* out;
  const T* ab;  // [alpha | beta]
  int64_t C;
  template <bool F>
  XD_ALWAYS_INLINE void run(int64_t b, int64_t e) const {
#if XD_MULTIVERSION
    if constexpr (kRows8<T, F>) {
      if (C % 8 == 0) return bn_avx2::forward_rows(x, ab, C, b, e, out);
    }
#endif
    for (int64_t i = b; i < e; ++i) {
      const T* XD_RESTRICT xi = x + i * C;
      T* XD_RESTRICT oi = out + i * C;
      for (int64_t c = 0; c < C; ++c) oi[c] = relu(madd<F>(xi[c], ab[c], ab[C + c]));
    }
  }
};

// 2x2/s2 windows (floor mode) of one pooled row r = (n, oh) per step: relu(y) at the four positions, the first
// maximum in row-major order (NaN as in switch_pool2d), its switch kh * 2 + kw, and x there.
template <typename T>
struct PoolJob {
  const T* x;
  T* out;
  uint8_t* sw;
  T* xs;
  const T* ab;
  int64_t H, W, C;
  template <bool F>
  XD_ALWAYS_INLINE void run(int64_t b, int64_t e) const {
    const int64_t OH = H / 2, OW = W / 2;
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      for (int64_t ow = 0; ow < OW; ++ow) {
        const T* XD_RESTRICT p0 = x + ((n * H + 2 * oh) * W + 2 * ow) * C;
        const T* XD_RESTRICT p1 = p0 + C;
        const T* XD_RESTRICT p2 = p0 + W * C;
        const T* XD_RESTRICT p3 = p2 + C;
        T* XD_RESTRICT o = out + (r * OW + ow) * C;
        uint8_t* XD_RESTRICT s = sw + (r * OW + ow) * C;
        T* XD_RESTRICT xo = xs + (r * OW + ow) * C;
#if XD_MULTIVERSION
        if constexpr (kRows8<T, F>) {
          if (C % 8 == 0) {
            const float* win[4] = {p0, p1, p2, p3};
            bn_avx2::pool_cell(win, ab, C, o, s, xo);
            continue;
          }
        }
#endif
        for (int64_t c = 0; c < C; ++c) {
          const T al = ab[c], be = ab[C + c];
          T m = relu(madd<F>(p0[c], al, be));
          int32_t best = 0;
          const T v1 = relu(madd<F>(p1[c], al, be));
          const bool b1 = beats(v1, m);
          m = b1 ? v1 : m;
          best = b1 ? 1 : best;
          const T v2 = relu(madd<F>(p2[c], al, be));
          const bool b2 = beats(v2, m);
          m = b2 ? v2 : m;
          best = b2 ? 2 : best;
          const T v3 = relu(madd<F>(p3[c], al, be));
          const bool b3 = beats(v3, m);
          m = b3 ? v3 : m;
          best = b3 ? 3 : best;
          o[c] = m;
          s[c] = static_cast<uint8_t>(best);
          xo[c] = (best == 0 ? p0 : best == 1 ? p1 : best == 2 ? p2 : p3)[c];
        }
      }
    }
  }
};

// The gradient reaching the BatchNorm's output, one row (C values) at a time: ReLU's mask applied to the incoming
// full-size gradient, with the mask recomputed from x (threshold_backward(grad, relu(y), 0) keeps grad where y > 0
// or y is NaN).
template <typename T>
struct DenseRows {
  const T* grad;
  const T* x;
  const T* ab;
  int64_t C;
  struct Cursor {};
  Cursor cursor(int64_t) const { return {}; }
  XD_ALWAYS_INLINE void advance(Cursor&) const {}
  template <bool F>
  XD_ALWAYS_INLINE void fill(const Cursor&, int64_t i, T* XD_RESTRICT g) const {
    const T* xi = x + i * C;
    const T* gi = grad + i * C;
    for (int64_t c = 0; c < C; ++c) g[c] = madd<F>(xi[c], ab[c], ab[C + c]) <= T(0) ? T(0) : gi[c];
  }
#if XD_MULTIVERSION
  // grad_x of rows [b, e) (float32, C a multiple of 8, FMA).
  XD_TARGET_FMA void input_avx2(const T*, int64_t b, int64_t e, const bn_avx2::InputConsts& q, T* gx) const {
    bn_avx2::dense_input(x, grad, q, C, b, e, gx);
  }
#endif
};

// ... rebuilt from the pooled gradient: the pooled gradient at its switch position where ReLU kept the pooled value
// (recomputed from x at the switch), 0 elsewhere (and in the rows and columns a floor-mode pool drops).
template <typename T>
struct PooledRows {
  const T* grad;
  const uint8_t* sw;
  const T* xs;
  const T* ab;
  int64_t H, W, C, OH, OW;
  // the pooled gradient of element j (channel c) where the switch is a or b, else +0; + 0 as torch's pool
  // backward adds it into zeros (a -0 gradient arrives as +0)
  template <bool F>
  XD_ALWAYS_INLINE T masked(int64_t j, int64_t c, int a, int b) const {
    const bool here = sw[j] == a || sw[j] == b;
    return here && !(madd<F>(xs[j], ab[c], ab[C + c]) <= T(0)) ? grad[j] + T(0) : T(0);
  }
  struct Cursor {
    int64_t n, h, w;
  };
  // fn(n, h, w0, w1) for the pieces of full-size rows (n, h), columns [w0, w1), that rows [b, e) cover, in order.
  template <typename Fn>
  XD_ALWAYS_INLINE void segments(int64_t b, int64_t e, Fn&& fn) const {
    for (int64_t i = b; i < e;) {
      const int64_t w0 = i % W, w1 = std::min(W, w0 + (e - i));
      fn(i / (W * H), (i / W) % H, w0, w1);
      i += w1 - w0;
    }
  }
  Cursor cursor(int64_t i) const { return {i / (W * H), (i / W) % H, i % W}; }
  XD_ALWAYS_INLINE void advance(Cursor& k) const {
    if (++k.w < W) return;
    k.w = 0;
    if (++k.h < H) return;
    k.h = 0;
    ++k.n;
  }
  template <bool F>
  XD_ALWAYS_INLINE void fill(const Cursor& k, int64_t, T* XD_RESTRICT g) const {
    const int64_t n = k.n, h = k.h, w = k.w;
    if (h >= 2 * OH || w >= 2 * OW) {
      for (int64_t c = 0; c < C; ++c) g[c] = T(0);
      return;
    }
    const uint8_t pos = static_cast<uint8_t>((h & 1) * 2 + (w & 1));
    const int64_t j = ((n * OH + h / 2) * OW + w / 2) * C;
    for (int64_t c = 0; c < C; ++c) g[c] = masked<F>(j + c, c, pos, -1);
  }
#if XD_MULTIVERSION
  // Pooled row (n, oh) from window 0.
  bn_avx2::PooledRow pooled_row(int64_t n, int64_t oh) const {
    const int64_t j = (n * OH + oh) * OW * C;
    return {grad + j, sw + j, xs + j};
  }
  // grad_x of rows [b, e) (float32, C a multiple of 8, FMA), a full-size row's columns at a time.
  XD_TARGET_FMA void input_avx2(const T* x, int64_t b, int64_t e, const bn_avx2::InputConsts& q, T* gx) const {
    segments(b, e, [&](int64_t n, int64_t h, int64_t w0, int64_t w1) {
      const int64_t row = (n * H + h) * W * C;
      const bool pooled = h < 2 * OH;
      bn_avx2::pooled_input(pooled_row(n, pooled ? h / 2 : 0), pooled, OW, static_cast<int>(h & 1) * 2, x + row, q,
                            C, w0, w1, gx + row);
    });
  }
#endif
};

// This thread's rows of the (2, threads, C) sums buffer, added to in a private copy (neighbouring threads' rows share
// cache lines) that goes back when the chunk is done; the additions are the same.
template <typename T>
struct ThreadSums {
  T* out;
  int nt;
  int64_t C;
  std::vector<T> v;  // [sum | dotp]
  ThreadSums(T* buf, int threads, int64_t channels) : nt(threads), C(channels), v(2 * channels) {
    const int tid = at::get_thread_num();
    TORCH_CHECK(tid < nt, "batch_norm_relu_backward: thread ", tid, " of ", nt);
    out = buf + tid * C;
    std::copy(out, out + C, v.begin());
    std::copy(out + nt * C, out + (nt + 1) * C, v.begin() + C);
  }
  ~ThreadSums() {
    std::copy(v.begin(), v.begin() + C, out);
    std::copy(v.begin() + C, v.end(), out + nt * C);
  }
  T* sum() { return v.data(); }
  T* dotp() { return v.data() + C; }
};

// sum(g) and sum((x - mean) * g) per channel into this thread's buffer rows, as torch's channels-last backward adds
// them over at::parallel_for's chunks of rows (grain 1, as torch asks).
template <typename T>
struct DenseSumsJob {
  const DenseRows<T>& rows;
  const T* x;
  const T* mean;
  T* buf;  // (2, threads, C)
  int nt;
  int64_t C;
  template <bool F>
  XD_ALWAYS_INLINE void run(int64_t b, int64_t e) const {
    ThreadSums<T> sums(buf, nt, C);
    T* XD_RESTRICT s = sums.sum();
    T* XD_RESTRICT d = sums.dotp();
#if XD_MULTIVERSION
    if constexpr (kRows8<T, F>) {
      if (C % 8 == 0) return bn_avx2::dense_sums(x, rows.grad, rows.ab, mean, C, b, e, s, d);
    }
#endif
    std::vector<T> g(C);
    for (int64_t i = b; i < e; ++i) {
      rows.template fill<F>({}, i, g.data());
      const T* xi = x + i * C;
      for (int64_t c = 0; c < C; ++c) {
        s[c] = s[c] + g[c];
        d[c] = madd<F>(xi[c] - mean[c], g[c], d[c]);
      }
    }
  }
};

// The same sums from the pooled gradient and x at the switches: a chunk's full-size rows go by, and each channel's
// term of a row comes from the one window of that row whose switch sits there, so the terms keep torch's order;
// the rest of torch's terms are exact zeros (+0 added to a sum that is never -0).
template <typename T>
struct PooledSumsJob {
  const PooledRows<T>& rows;
  const T* mean;
  T* buf;  // (2, threads, C)
  int nt;
  int64_t C;
  // the terms of full-size row (n, h), columns [w0, w1)
  template <bool F>
  XD_ALWAYS_INLINE void segment(int64_t n, int64_t h, int64_t w0, int64_t w1, T* XD_RESTRICT s,
                                T* XD_RESTRICT d) const {
    const PooledRows<T>& p = rows;
    if (h >= 2 * p.OH) return;
    const int64_t end = std::min(w1, 2 * p.OW);
    const int dh = static_cast<int>(h & 1) * 2;
#if XD_MULTIVERSION
    if constexpr (kRows8<T, F>) {
      if (C % 8 == 0) return bn_avx2::pooled_sums(p.pooled_row(n, h / 2), p.ab, mean, C, dh, w0, end, s, d);
    }
#endif
    for (int64_t pw = w0 / 2; 2 * pw < end; ++pw) {
      const int a = 2 * pw >= w0 ? dh : -1, b = 2 * pw + 1 < end ? dh + 1 : -1;
      const int64_t j = ((n * p.OH + h / 2) * p.OW + pw) * C;
      for (int64_t c = 0; c < C; ++c) {
        const T g = p.template masked<F>(j + c, c, a, b);
        s[c] = s[c] + g;
        d[c] = madd<F>(p.xs[j + c] - mean[c], g, d[c]);
      }
    }
  }
  template <bool F>
  XD_ALWAYS_INLINE void run(int64_t b, int64_t e) const {
    ThreadSums<T> sums(buf, nt, C);
    rows.segments(b, e, [&](int64_t n, int64_t h, int64_t w0, int64_t w1) {
      segment<F>(n, h, w0, w1, sums.sum(), sums.dotp());
    });
  }
};

template <typename T>
DenseSumsJob<T> sums_job(const DenseRows<T>& rows, const T* x, const T* mean, T* buf, int nt, int64_t C) {
  return {rows, x, mean, buf, nt, C};
}
template <typename T>
PooledSumsJob<T> sums_job(const PooledRows<T>& rows, const T*, const T* mean, T* buf, int nt, int64_t C) {
  return {rows, mean, buf, nt, C};
}

// Each channel's thread rows of a (threads, C) buffer added in torch's accumulation type (double), as torch adds
// them.
template <typename T>
std::vector<at::acc_type<T, false>> thread_totals(const T* buf, int nt, int64_t C) {
  std::vector<at::acc_type<T, false>> out(C, 0);
  for (int64_t c = 0; c < C; ++c) {
    for (int t = 0; t < nt; ++t) out[c] += buf[t * C + c];
  }
  return out;
}

template <typename T, typename Rows>
void backward_sums(const Rows& rows, const T* x, const T* mean, int64_t N, int64_t C, T* sum, T* dotp) {
  const int nt = at::get_num_threads();
  std::vector<T> buf(2 * nt * C, T(0));
  parallel_rows(N, 1, sums_job<T>(rows, x, mean, buf.data(), nt, C));
  const auto s = thread_totals(buf.data(), nt, C), d = thread_totals(buf.data() + nt * C, nt, C);
  for (int64_t c = 0; c < C; ++c) {
    sum[c] = static_cast<T>(s[c]);
    dotp[c] = static_cast<T>(d[c]);
  }
}

// grad_x = (g - gm - (x - mean) * k) * invstd * weight, the subtraction of the product fused as torch's vectorised
// loop fuses it; its masked last step (the channels past the last whole vector) rounds the product separately.
template <typename T, typename Rows>
struct InputJob {
  const Rows& rows;
  const T* x;
  const T* mean;
  const T* invstd;
  const T* weight;
  const T* k;
  const T* gm;
  T* gx;
  int64_t C, whole;  // whole: the channels in whole vectors of torch's kernel
  template <bool F>
  XD_ALWAYS_INLINE void run(int64_t b, int64_t e) const {
#if XD_MULTIVERSION
    if constexpr (kRows8<T, F>) {
      if (C % 8 == 0 && whole == C) return rows.input_avx2(x, b, e, {rows.ab, mean, k, gm, invstd, weight}, gx);
    }
#endif
    std::vector<T> g(C);
    auto at = rows.cursor(b);
    for (int64_t i = b; i < e; ++i, rows.advance(at)) {
      rows.template fill<F>(at, i, g.data());
      const T* xi = x + i * C;
      T* o = gx + i * C;  // may be the incoming gradient's row, read (by fill) before it is written
      for (int64_t c = 0; c < whole; ++c) {
        o[c] = madd<F>(-(xi[c] - mean[c]), k[c], g[c] - gm[c]) * invstd[c] * weight[c];
      }
      for (int64_t c = whole; c < C; ++c) o[c] = (g[c] - gm[c] - (xi[c] - mean[c]) * k[c]) * invstd[c] * weight[c];
    }
  }
};

// k = dotp * invstd * invstd / N and gm = sum / N per channel, then grad_x row by row.
template <typename T, typename Rows>
void backward_input(const Rows& rows, const T* x, const T* mean, const T* invstd, const T* weight, const T* sum,
                    const T* dotp, int64_t N, int64_t C, T* gx) {
  std::vector<T> k(C), gm(C);
  for (int64_t c = 0; c < C; ++c) {
    k[c] = dotp[c] * invstd[c] * invstd[c] / static_cast<T>(N);
    gm[c] = sum[c] / static_cast<T>(N);
  }
  const int64_t lanes = torch_vector_bytes() / static_cast<int64_t>(sizeof(T));
  const int64_t whole = lanes > 0 ? C - C % lanes : C;
  parallel_rows(N, grain_rows(C),
                InputJob<T, Rows>{rows, x, mean, invstd, weight, k.data(), gm.data(), gx, C, whole});
}

struct BackwardArgs {
  const Tensor& x;
  const Tensor& weight;
  const Tensor& mean;
  const Tensor& invstd;
  std::array<bool, 3> mask;
  Tensor gx_into;  // where grad_x goes (the incoming gradient, each row read before it is written); undefined: new
};

template <typename T, typename Rows>
std::tuple<Tensor, Tensor, Tensor> backward(const Rows& rows, const BackwardArgs& a) {
  const int64_t C = a.x.size(1), N = a.x.numel() / C;
  Tensor sum = at::empty({C}, a.mean.options()), dotp = at::empty({C}, a.mean.options());
  const T* x = a.x.data_ptr<T>();
  const T* mean = a.mean.data_ptr<T>();
  const T* invstd = a.invstd.data_ptr<T>();
  backward_sums<T>(rows, x, mean, N, C, sum.data_ptr<T>(), dotp.data_ptr<T>());
  Tensor gx, gw, gb;
  if (a.mask[0]) {
    gx = a.gx_into.defined() ? a.gx_into : at::empty_like(a.x);
    backward_input<T>(rows, x, mean, invstd, a.weight.data_ptr<T>(), sum.data_ptr<T>(), dotp.data_ptr<T>(), N, C,
                      gx.data_ptr<T>());
  }
  if (a.mask[1]) {
    gw = at::empty({C}, a.mean.options());
    T* gwp = gw.data_ptr<T>();
    const T* dp = dotp.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) gwp[c] = dp[c] * invstd[c];
  }
  if (a.mask[2]) gb = sum;
  return {gx, gw, gb};
}

#if XD_MULTIVERSION
// torch's channels-last batch statistics' sums into this thread's row of a (threads, C) buffer over at::parallel_for's
// chunks of rows (grain 1) (float32, C a multiple of 8, FMA): of x, or of (x - mean)^2 when mean is given. The sums
// stay in registers over a tile of rows, so threads touch their neighbouring rows once per tile.
struct StatsJob {
  const float* x;
  const float* mean;
  float* buf;
  int nt;
  int64_t C;
  template <bool F>
  XD_ALWAYS_INLINE void run(int64_t b, int64_t e) const {
    const int tid = at::get_thread_num();
    TORCH_CHECK(tid < nt, "batch_norm_relu: thread ", tid, " of ", nt);
    if constexpr (kRows8<float, F>) {
      bn_avx2::stats_sums(x, mean, C, b, e, buf + tid * C);
    } else {
      TORCH_CHECK(false, "batch_norm_relu: the statistics' rows need FMA");
    }
  }
};

// torch.batch_norm_update_stats on a channels-last float32 map with more rows than threads: the mean, the biased
// variance and the running-stat update with torch's operations and rounding (mean = double total / N; var = var_sum
// / N in float; running stats in float, the unbiased variance's term in double).
std::tuple<Tensor, Tensor> update_stats_f32(const Tensor& x, const Tensor& running_mean, const Tensor& running_var,
                                            double momentum) {
  const int64_t C = x.size(1), N = x.numel() / C;
  const int nt = at::get_num_threads();
  std::vector<float> buf(nt * C, 0.0f);
  parallel_rows(N, 1, StatsJob{x.data_ptr<float>(), nullptr, buf.data(), nt, C});
  Tensor mean = at::empty({C}, x.options()), var = at::empty({C}, x.options());
  float* m = mean.data_ptr<float>();
  const std::vector<double> sum = thread_totals(buf.data(), nt, C);
  for (int64_t c = 0; c < C; ++c) m[c] = static_cast<float>(sum[c] / N);
  std::fill(buf.begin(), buf.end(), 0.0f);
  parallel_rows(N, 1, StatsJob{x.data_ptr<float>(), m, buf.data(), nt, C});
  const std::vector<double> var_total = thread_totals(buf.data(), nt, C);
  float *v = var.data_ptr<float>(), *rm = running_mean.data_ptr<float>(), *rv = running_var.data_ptr<float>();
  const float mo = static_cast<float>(momentum);
  for (int64_t c = 0; c < C; ++c) {
    const float var_sum = static_cast<float>(var_total[c]);
    v[c] = var_sum / N;
    rm[c] = mo * m[c] + (1 - mo) * rm[c];
    const double unbiased = var_sum / (N - 1);
    rv[c] = static_cast<float>(mo * unbiased + (1 - mo) * rv[c]);
  }
  return {mean, var};
}
#endif

// The batch's mean and 1 / sqrt(var + eps) as torch's training-mode batch_norm saves them; running stats updated.
// torch's own batch_norm_update_stats, or for float32 maps under its vectorised kernels the same operations with the
// sums held in registers (update_stats_f32).
std::tuple<Tensor, Tensor> batch_stats(const Tensor& x, const Tensor& running_mean, const Tensor& running_var,
                                       double momentum, double eps) {
#if XD_MULTIVERSION
  const int64_t C = x.size(1);
  const bool own = x.scalar_type() == at::kFloat && C % 8 == 0 && torch_uses_fma() &&
                   x.numel() / C > at::get_num_threads() && running_mean.scalar_type() == at::kFloat &&
                   running_var.scalar_type() == at::kFloat && running_mean.is_contiguous() &&
                   running_var.is_contiguous();
  if (own) {
    auto [mean, var] = update_stats_f32(x, running_mean, running_var, momentum);
    return {mean, inverse_std(var, eps)};
  }
#endif
  auto [mean, var] = at::batch_norm_update_stats(x, running_mean, running_var, momentum);
  return {mean, inverse_std(var, eps)};
}

// relu(x * alpha + beta) for the batch statistics (mean, invstd).
Tensor relu_output(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& mean,
                   const Tensor& invstd) {
  Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_relu", [&] {
    const auto ab = affine<scalar_t>(mean, invstd, weight, bias);
    parallel_rows(x.numel() / x.size(1), grain_rows(x.size(1)),
                  ForwardJob<scalar_t>{x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), ab.data(), x.size(1)});
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_relu_cpu(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                       Tensor& running_mean, Tensor& running_var, double momentum,
                                                       double eps) {
  check_input(x, weight, bias, "batch_norm_relu");
  auto [mean, invstd] = batch_stats(x, running_mean, running_var, momentum, eps);
  return {relu_output(x, weight, bias, mean, invstd), mean, invstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> batch_norm_relu_pool2d_cpu(const Tensor& x, const Tensor& weight,
                                                                              const Tensor& bias, Tensor& running_mean,
                                                                              Tensor& running_var, double momentum,
                                                                              double eps) {
  check_input(x, weight, bias, "batch_norm_relu_pool2d");
  auto [mean, invstd] = batch_stats(x, running_mean, running_var, momentum, eps);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto cl = at::MemoryFormat::ChannelsLast;
  Tensor out = at::empty({N, C, H / 2, W / 2}, x.options().memory_format(cl));
  Tensor sw = at::empty({N, C, H / 2, W / 2}, x.options().dtype(at::kByte).memory_format(cl));
  Tensor xs = at::empty_like(out);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_relu_pool2d", [&] {
    const auto ab = affine<scalar_t>(mean, invstd, weight, bias);
    parallel_rows(N * (H / 2), grain_rows(W * C * 2),
                  PoolJob<scalar_t>{x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), sw.data_ptr<uint8_t>(),
                                    xs.data_ptr<scalar_t>(), ab.data(), H, W, C});
  });
  return {out, sw, xs, mean, invstd};
}

// A gradient in another layout than x sends torch down its strided (per-channel) backward, with other sums: that
// case runs torch's own ops on the recomputed ReLU output.
std::tuple<Tensor, Tensor, Tensor> dense_fallback(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                                  const Tensor& bias, const Tensor& mean, const Tensor& invstd,
                                                  std::array<bool, 3> mask) {
  const Tensor g = at::threshold_backward(grad, relu_output(x, weight, bias, mean, invstd), 0);
  return at::native_batch_norm_backward(g, x, weight, Tensor(), Tensor(), mean, invstd, true, 0.0, mask);
}

// batch_norm_relu's backward for a gradient laid out as x.
std::tuple<Tensor, Tensor, Tensor> dense_backward(const Tensor& grad, const Tensor& bias, const BackwardArgs& a) {
  return AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "batch_norm_relu_backward", [&] {
    const auto ab = affine<scalar_t>(a.mean, a.invstd, a.weight, bias);
    const DenseRows<scalar_t> rows{grad.data_ptr<scalar_t>(), a.x.data_ptr<scalar_t>(), ab.data(), a.x.size(1)};
    return backward<scalar_t>(rows, a);
  });
}

void check_stats(const Tensor& x, const Tensor& mean, const Tensor& invstd, const char* op) {
  for (const Tensor* t : {&mean, &invstd}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1) && t->is_contiguous() && t->scalar_type() == x.scalar_type(),
                op, ": mean and invstd must be contiguous (C,) tensors of x's dtype");
  }
}

void check_pooled(const Tensor& t, const Tensor& x, const char* what) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == x.size(0) && t.size(1) == x.size(1) && t.size(2) == x.size(2) / 2 &&
                  t.size(3) == x.size(3) / 2,
              "batch_norm_relu_backward: ", what, " must be the (N, C, H / 2, W / 2) of the 2x2 pool of x, got ",
              t.sizes());
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_relu_backward_cpu(const Tensor& grad, const Tensor& x,
                                                                const Tensor& weight, const Tensor& bias,
                                                                const Tensor& mean, const Tensor& invstd,
                                                                const std::optional<Tensor>& switches,
                                                                const std::optional<Tensor>& x_at_switches,
                                                                std::array<bool, 3> mask) {
  check_input(x, weight, bias, "batch_norm_relu_backward");
  check_stats(x, mean, invstd, "batch_norm_relu_backward");
  TORCH_CHECK(switches.has_value() == x_at_switches.has_value(),
              "batch_norm_relu_backward: give both switches and x_at_switches");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "batch_norm_relu_backward: grad must have x's dtype");
  const BackwardArgs args{x, weight, mean, invstd, mask, Tensor()};
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  if (!switches.has_value()) {
    TORCH_CHECK(grad.sizes() == x.sizes(), "batch_norm_relu_backward: grad must have x's shape");
    if (grad.strides() != x.strides()) return dense_fallback(grad, x, weight, bias, mean, invstd, mask);
    return dense_backward(grad, bias, args);
  }
  const auto cl = at::MemoryFormat::ChannelsLast;
  check_pooled(grad, x, "grad");
  check_pooled(*switches, x, "switches");
  check_pooled(*x_at_switches, x, "x_at_switches");
  TORCH_CHECK(switches->scalar_type() == at::kByte && x_at_switches->scalar_type() == x.scalar_type(),
              "batch_norm_relu_backward: switches must be uint8 and x_at_switches of x's dtype");
  const Tensor g = grad.contiguous(cl), sw = switches->contiguous(cl), xs = x_at_switches->contiguous(cl);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_relu_backward", [&] {
    const auto ab = affine<scalar_t>(mean, invstd, weight, bias);
    const PooledRows<scalar_t> rows{g.data_ptr<scalar_t>(), sw.data_ptr<uint8_t>(), xs.data_ptr<scalar_t>(),
                                    ab.data(), H, W, C, H / 2, W / 2};
    return backward<scalar_t>(rows, args);
  });
}

// batch_norm_relu's backward with grad_x written over grad, which must be laid out as x: saves a full-size
// allocation and its first touch when nothing else holds the gradient (the autograd checks that).
std::tuple<Tensor, Tensor> batch_norm_relu_backward_inplace_cpu(Tensor& grad, const Tensor& x, const Tensor& weight,
                                                                const Tensor& bias, const Tensor& mean,
                                                                const Tensor& invstd, std::array<bool, 2> mask) {
  check_input(x, weight, bias, "batch_norm_relu_backward_");
  check_stats(x, mean, invstd, "batch_norm_relu_backward_");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.strides() == x.strides() && grad.scalar_type() == x.scalar_type(),
              "batch_norm_relu_backward_: grad must have x's shape, strides and dtype");
  TORCH_CHECK(!grad.is_same(x) && !grad.is_alias_of(x), "batch_norm_relu_backward_: grad must not share x's memory");
  auto [gx, gw, gb] = dense_backward(grad, bias, {x, weight, mean, invstd, {true, mask[0], mask[1]}, grad});
  return {gw, gb};
}

}  // namespace
}  // namespace cpu
}  // namespace xraydeconv

TORCH_LIBRARY_IMPL(xraydeconv, CPU, m) {
  m.impl("batch_norm_relu", &xraydeconv::cpu::batch_norm_relu_cpu);
  m.impl("batch_norm_relu_pool2d", &xraydeconv::cpu::batch_norm_relu_pool2d_cpu);
  m.impl("batch_norm_relu_backward", &xraydeconv::cpu::batch_norm_relu_backward_cpu);
  m.impl("batch_norm_relu_backward_", &xraydeconv::cpu::batch_norm_relu_backward_inplace_cpu);
}
