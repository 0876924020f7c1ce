// The one schema file: every xraydeconv dispatcher op is declared here. Kernels register their
// implementations per backend in csrc/cpu and csrc/cuda (TORCH_LIBRARY_IMPL), and the Python side
// (xraydeconv/ops/) adds fake tensors and autograd.
#include <Python.h>
#include <torch/library.h>

// Importing xraydeconv._C from Python runs the static registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(xraydeconv, m) {
  // Max pooling that also returns the "switches": the uint8 position (row * kW + col) of the maximum
  // inside its window, same shape as the output.
  m.def("switch_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode) -> (Tensor, Tensor)");
  // The same into caller-provided buffers (for benchmarking the kernel without page faults).
  m.def(
      "switch_pool2d_out(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, "
      "Tensor(a!) out, Tensor(b!) switches) -> ()");
  // switch_pool2d of relu(x) in one pass: the pooled values and switches of max_pool2d(relu(x)), without
  // writing relu(x) (a ReLU followed by a max pool, fused).
  m.def("switch_relu_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode) -> (Tensor, Tensor)");
  // Exact adjoint of the selection: every input position receives the sum of the pooled values whose
  // switch points at it. output_size is the (H, W) of the pooling input.
  m.def(
      "switch_unpool2d(Tensor y, Tensor switches, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] output_size) -> Tensor");
  m.def(
      "switch_unpool2d_out(Tensor y, Tensor switches, int[2] kernel_size, int[2] stride, int[2] padding, "
      "Tensor(a!) out) -> ()");
  // Read x at the switch positions: the adjoint of switch_unpool2d (its gradient w.r.t. y).
  m.def("switch_gather2d(Tensor x, Tensor switches, int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor");
  // ReLU in place, as torch.relu_. Its autograd (csrc/autograd.cpp) applies ReLU's mask to the incoming gradient in
  // place when nothing else holds that gradient, instead of writing a fresh full-size one.
  m.def("relu_(Tensor(a!) x) -> Tensor(a!)");
  // Training-mode BatchNorm (batch statistics; running_mean and running_var updated in place, as torch's batch_norm
  // does) then ReLU, in one pass over the normalised values (csrc/cpu/batch_norm_relu.cpp): relu(batch_norm(x)) and
  // the batch mean and 1 / sqrt(var + eps) its backward needs. Values are torch's bit for bit.
  m.def(
      "batch_norm_relu(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running_mean, Tensor(b!) running_var, "
      "float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  // The same followed by a 2x2/s2 max pool, without writing the full-size map: pooled values, their switches, x at
  // the switches (for the backward), mean, invstd.
  m.def(
      "batch_norm_relu_pool2d(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running_mean, Tensor(b!) running_var, "
      "float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The gradients (x, weight, bias) of either: grad of the full-size output, or of the pooled one with the
  // switches and x at the switches (both None for batch_norm_relu).
  m.def(
      "batch_norm_relu_backward(Tensor grad, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor invstd, "
      "Tensor? switches, Tensor? x_at_switches, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // batch_norm_relu's backward with grad_x written over grad (laid out as x): the gradients of weight and bias.
  m.def(
      "batch_norm_relu_backward_(Tensor(a!) grad, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor invstd, "
      "bool[2] output_mask) -> (Tensor, Tensor)");
  // A deconvnet step as a sparse scatter (csrc/cpu/deconv_scatter.cpp): optional unpooling, ReLU, stride-1 transposed conv.
  m.def("relu_scatter_conv_transpose2d(Tensor g, Tensor? switches, Tensor weight, int[2] pool_kernel, int[2] padding, int[2] output_size, int group) -> Tensor");
  // Two deconvnet steps in one pass, the second into at most 4 channels (the transposed first conv), so that the
  // intermediate plane between them is never materialised.
  m.def("relu_scatter_conv_transpose2d_pair(Tensor g, Tensor? switches, Tensor weight, Tensor weight2, int[2] pool_kernel, int[2] padding, int[2] padding2, int[2] mid_size, int[2] output_size, int group) -> Tensor");
}
