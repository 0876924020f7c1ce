// Autograd of the switch ops, for every backend (the Autograd dispatch key): pool's backward is unpool,
// unpool's is gather, gather's is unpool; relu-pool's is ReLU's threshold_backward on the pooled gradient, then
// unpool. Each backward calls the ops through the dispatcher again, so any
// order of derivatives works, and torch.compile traces them like any other op.
//
// Also the in-place ReLU (relu_), whose forward is torch's relu_ for every backend and whose backward masks the
// incoming gradient in place when it is the only holder of that gradient; and BatchNorm + ReLU (+ pool), whose
// backward is the batch_norm_relu_backward op.
//
// In C++ rather than Python (torch.library.register_autograd) because the Python layer cost about 50 us per
// call on each of forward and backward: as much as the pooling itself on the one-image feature maps the
// projection and batch-1 inference run.
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <vector>

namespace xraydeconv {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using PoolFn = std::tuple<Tensor, Tensor>(const Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, bool);
using UnpoolFn = Tensor(const Tensor&, const Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                        c10::IntArrayRef);
using GatherFn = Tensor(const Tensor&, const Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef);

template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

Tensor unpool(const Tensor& y, const Tensor& sw, c10::IntArrayRef k, c10::IntArrayRef s, c10::IntArrayRef p,
              c10::IntArrayRef size) {
  static const auto op = op_handle<UnpoolFn>("xraydeconv::switch_unpool2d");
  return op.call(y, sw, k, s, p, size);
}

Tensor gather(const Tensor& x, const Tensor& sw, c10::IntArrayRef k, c10::IntArrayRef s, c10::IntArrayRef p) {
  static const auto op = op_handle<GatherFn>("xraydeconv::switch_gather2d");
  return op.call(x, sw, k, s, p);
}

// The (H, W) of a tensor; symbolic sizes (torch.compile with dynamic shapes) are specialised, as the int[2]
// output_size of the schema needs.
std::vector<int64_t> spatial_size(const Tensor& t) {
  return {t.sym_size(-2).guard_int(__FILE__, __LINE__), t.sym_size(-1).guard_int(__FILE__, __LINE__)};
}

void save_geometry(AutogradContext* ctx, c10::IntArrayRef k, c10::IntArrayRef s, c10::IntArrayRef p) {
  ctx->saved_data["k"] = k.vec();
  ctx->saved_data["s"] = s.vec();
  ctx->saved_data["p"] = p.vec();
}

struct Geometry {
  std::vector<int64_t> k, s, p;
};

Geometry saved_geometry(AutogradContext* ctx) {
  return {ctx->saved_data["k"].toIntVector(), ctx->saved_data["s"].toIntVector(), ctx->saved_data["p"].toIntVector()};
}

// The forward of both pooling functions: runs `op` below autograd and saves the switches (and, with keep_out,
// the pooled output) with the geometry and the input's (H, W).
variable_list pool_forward(AutogradContext* ctx, const c10::TypedOperatorHandle<PoolFn>& op, const Tensor& x,
                           c10::IntArrayRef k, c10::IntArrayRef s, c10::IntArrayRef p, bool ceil_mode, bool keep_out) {
  at::AutoDispatchBelowADInplaceOrView below;
  auto [out, sw] = op.call(x, k, s, p, ceil_mode);
  save_geometry(ctx, k, s, p);
  ctx->saved_data["size"] = spatial_size(x);
  ctx->save_for_backward(keep_out ? variable_list{sw, out} : variable_list{sw});
  ctx->mark_non_differentiable({sw});
  ctx->set_materialize_grads(false);  // the switches never get a gradient: don't build zeros for it
  return {out, sw};
}

// The backward of both: unpool the pooled gradient (for relu-pool, first zeroed where ReLU's output, the pooled
// value, is not positive: ReLU's own backward, on a quarter of the input's size for 2x2 windows).
variable_list pool_backward(AutogradContext* ctx, const variable_list& grads, bool relu) {
  if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  const variable_list saved = ctx->get_saved_variables();
  const Geometry g = saved_geometry(ctx);
  const std::vector<int64_t> size = ctx->saved_data["size"].toIntVector();
  const Tensor y = relu ? at::threshold_backward(grads[0], saved[1], 0) : grads[0];
  return {unpool(y, saved[0], g.k, g.s, g.p, size), Tensor(), Tensor(), Tensor(), Tensor()};
}

class SwitchPool2d : public torch::autograd::Function<SwitchPool2d> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, c10::IntArrayRef k, c10::IntArrayRef s,
                               c10::IntArrayRef p, bool ceil_mode) {
    static const auto op = op_handle<PoolFn>("xraydeconv::switch_pool2d");
    return pool_forward(ctx, op, x, k, s, p, ceil_mode, false);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) { return pool_backward(ctx, grads, false); }
};

// max_pool2d(relu(x)): relu(x) is only ever read at the switches, where it equals the pooled output, so ReLU's
// backward runs on the pooled gradient and unpooling writes the input's gradient once.
class SwitchReluPool2d : public torch::autograd::Function<SwitchReluPool2d> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, c10::IntArrayRef k, c10::IntArrayRef s,
                               c10::IntArrayRef p, bool ceil_mode) {
    static const auto op = op_handle<PoolFn>("xraydeconv::switch_relu_pool2d");
    return pool_forward(ctx, op, x, k, s, p, ceil_mode, true);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) { return pool_backward(ctx, grads, true); }
};

class SwitchUnpool2d : public torch::autograd::Function<SwitchUnpool2d> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& y, const Tensor& sw, c10::IntArrayRef k,
                        c10::IntArrayRef s, c10::IntArrayRef p, c10::IntArrayRef size) {
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor out = unpool(y, sw, k, s, p, size);
    save_geometry(ctx, k, s, p);
    ctx->save_for_backward({sw});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor sw = ctx->get_saved_variables()[0];
    const Geometry g = saved_geometry(ctx);
    return {gather(grads[0], sw, g.k, g.s, g.p), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

class SwitchGather2d : public torch::autograd::Function<SwitchGather2d> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& sw, c10::IntArrayRef k,
                        c10::IntArrayRef s, c10::IntArrayRef p) {
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor out = gather(x, sw, k, s, p);
    save_geometry(ctx, k, s, p);
    ctx->saved_data["size"] = spatial_size(x);
    ctx->save_for_backward({sw});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor sw = ctx->get_saved_variables()[0];
    const Geometry g = saved_geometry(ctx);
    const std::vector<int64_t> size = ctx->saved_data["size"].toIntVector();
    return {unpool(grads[0], sw, g.k, g.s, g.p, size), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// While a custom function's backward runs, the engine's node keeps its own list of the incoming gradients besides
// the one handed to backward: a gradient held by nothing else has this use count. A gradient that also flows to
// another node (an addition hands the same tensor to both of its inputs), that a hook or retain_grad kept, that the
// caller passed to backward(), or that shares its storage with a view, has more references.
constexpr size_t kSoleGradientUses = 2;

// Whether ReLU's mask may be applied to `g` in place: nothing else can see it, it is a plain dense tensor (no
// subclass, no tracing, no expanded strides) and no graph of the backward itself is being recorded.
bool may_mask_in_place(const Tensor& g, const Tensor& out) {
  return g.defined() && g.use_count() == kSoleGradientUses && g.storage().use_count() == 1 &&
         !at::GradMode::is_enabled() && !g.requires_grad() && !at::isTensorSubclassLike(g) &&
         g.is_non_overlapping_and_dense() && g.sizes() == out.sizes() && g.dtype() == out.dtype();
}

// relu_(x): in place, as torch.relu_ (which also saves its output for the backward). Natively the backward writes
// a fresh full-size gradient; here the incoming one is masked in place when may_mask_in_place allows, which saves
// that allocation (and the page faults of a large one). The values are threshold_backward's either way.
class Relu : public torch::autograd::Function<Relu> {
 public:
  static Tensor forward(AutogradContext* ctx, Tensor x) {
    {
      at::AutoDispatchBelowADInplaceOrView below;
      at::relu_(x);
    }
    ctx->mark_dirty({x});
    ctx->save_for_backward({x});
    return x;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor out = ctx->get_saved_variables()[0];
    Tensor g = std::move(grads[0]);
    if (may_mask_in_place(g, out)) return {at::threshold_backward_outf(g, out, 0, g)};
    return {at::threshold_backward(g, out, 0)};
  }
};

std::tuple<Tensor, Tensor> switch_pool2d_autograd(const Tensor& x, c10::IntArrayRef k, c10::IntArrayRef s,
                                                  c10::IntArrayRef p, bool ceil_mode) {
  variable_list r = SwitchPool2d::apply(x, k, s, p, ceil_mode);
  return {r[0], r[1]};
}

std::tuple<Tensor, Tensor> switch_relu_pool2d_autograd(const Tensor& x, c10::IntArrayRef k, c10::IntArrayRef s,
                                                       c10::IntArrayRef p, bool ceil_mode) {
  variable_list r = SwitchReluPool2d::apply(x, k, s, p, ceil_mode);
  return {r[0], r[1]};
}

Tensor switch_unpool2d_autograd(const Tensor& y, const Tensor& sw, c10::IntArrayRef k, c10::IntArrayRef s,
                                c10::IntArrayRef p, c10::IntArrayRef size) {
  return SwitchUnpool2d::apply(y, sw, k, s, p, size);
}

Tensor switch_gather2d_autograd(const Tensor& x, const Tensor& sw, c10::IntArrayRef k, c10::IntArrayRef s,
                                c10::IntArrayRef p) {
  return SwitchGather2d::apply(x, sw, k, s, p);
}

using BnReluFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, Tensor&, Tensor&,
                                                    double, double);
using BnReluPoolFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                        Tensor&, Tensor&, double, double);
using BnReluBackwardFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                            const Tensor&, const Tensor&, const Tensor&,
                                                            const std::optional<Tensor>&,
                                                            const std::optional<Tensor>&, std::array<bool, 3>);

using BnReluBackwardInplaceFn = std::tuple<Tensor, Tensor>(Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                            const Tensor&, const Tensor&, std::array<bool, 2>);

// The gradients of x, weight and bias of a BatchNorm + ReLU (+ pool) node; saved: x, weight, bias, mean, invstd
// (then switches and x at the switches). Without the pool, grad_x is written over a gradient nothing else holds.
variable_list batch_norm_relu_backward(AutogradContext* ctx, Tensor grad) {
  static const auto op = op_handle<BnReluBackwardFn>("xraydeconv::batch_norm_relu_backward");
  static const auto op_ = op_handle<BnReluBackwardInplaceFn>("xraydeconv::batch_norm_relu_backward_");
  const variable_list s = ctx->get_saved_variables();
  variable_list out(8);  // x, weight, bias; none for the running stats, momentum, eps, pool
  if (!grad.defined()) return out;
  const bool into_grad = s.size() == 5 && ctx->needs_input_grad(0) && may_mask_in_place(grad, s[0]) &&
                         grad.strides() == s[0].strides();
  if (into_grad) {
    const std::array<bool, 2> wb{ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    auto [gw, gb] = op_.call(grad, s[0], s[1], s[2], s[3], s[4], wb);
    out[0] = std::move(grad);
    out[1] = gw;
    out[2] = gb;
    return out;
  }
  std::optional<Tensor> sw, xs;
  if (s.size() == 7) {
    sw = s[5];
    xs = s[6];
  }
  const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
  auto [gx, gw, gb] = op.call(grad, s[0], s[1], s[2], s[3], s[4], sw, xs, mask);
  out[0] = gx;
  out[1] = gw;
  out[2] = gb;
  return out;
}

// Saves what batch_norm_relu_backward reads; the statistics (and switches) get no gradient.
variable_list bn_relu_outputs(AutogradContext* ctx, variable_list outputs, const variable_list& saved,
                              const variable_list& no_grad) {
  ctx->save_for_backward(saved);
  ctx->mark_non_differentiable(no_grad);
  ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined: no zeros are built
  return outputs;
}

// Both ops: `pool` picks batch_norm_relu_pool2d (outputs out, switches, x at the switches, mean, invstd) over
// batch_norm_relu (out, mean, invstd).
class BatchNormRelu : public torch::autograd::Function<BatchNormRelu> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const Tensor& b, Tensor rm,
                               Tensor rv, double momentum, double eps, bool pool) {
    at::AutoDispatchBelowADInplaceOrView below;
    if (pool) {
      static const auto op = op_handle<BnReluPoolFn>("xraydeconv::batch_norm_relu_pool2d");
      auto [out, sw, xs, mean, invstd] = op.call(x, w, b, rm, rv, momentum, eps);
      return bn_relu_outputs(ctx, {out, sw, xs, mean, invstd}, {x, w, b, mean, invstd, sw, xs}, {sw, xs, mean, invstd});
    }
    static const auto op = op_handle<BnReluFn>("xraydeconv::batch_norm_relu");
    auto [out, mean, invstd] = op.call(x, w, b, rm, rv, momentum, eps);
    return bn_relu_outputs(ctx, {out, mean, invstd}, {x, w, b, mean, invstd}, {mean, invstd});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return batch_norm_relu_backward(ctx, std::move(grads[0]));
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_relu_autograd(const Tensor& x, const Tensor& w, const Tensor& b,
                                                            Tensor& rm, Tensor& rv, double momentum, double eps) {
  variable_list r = BatchNormRelu::apply(x, w, b, rm, rv, momentum, eps, false);
  return {r[0], r[1], r[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> batch_norm_relu_pool2d_autograd(const Tensor& x, const Tensor& w,
                                                                                   const Tensor& b, Tensor& rm,
                                                                                   Tensor& rv, double momentum,
                                                                                   double eps) {
  variable_list r = BatchNormRelu::apply(x, w, b, rm, rv, momentum, eps, true);
  return {r[0], r[1], r[2], r[3], r[4]};
}

// The output is x itself, its history rebased onto the Relu node.
Tensor& relu_autograd(Tensor& x) {
  Relu::apply(x);
  return x;
}

Tensor& relu_forward(Tensor& x) { return at::relu_(x); }

}  // namespace
}  // namespace xraydeconv

TORCH_LIBRARY_IMPL(xraydeconv, Autograd, m) {
  m.impl("switch_pool2d", &xraydeconv::switch_pool2d_autograd);
  m.impl("switch_relu_pool2d", &xraydeconv::switch_relu_pool2d_autograd);
  m.impl("switch_unpool2d", &xraydeconv::switch_unpool2d_autograd);
  m.impl("switch_gather2d", &xraydeconv::switch_gather2d_autograd);
  m.impl("relu_", &xraydeconv::relu_autograd);
  m.impl("batch_norm_relu", &xraydeconv::batch_norm_relu_autograd);
  m.impl("batch_norm_relu_pool2d", &xraydeconv::batch_norm_relu_pool2d_autograd);
}

// relu_'s forward is torch's own for every backend (CPU, CUDA, meta for fake tensors): only its backward differs.
TORCH_LIBRARY_IMPL(xraydeconv, CompositeExplicitAutograd, m) { m.impl("relu_", &xraydeconv::relu_forward); }
