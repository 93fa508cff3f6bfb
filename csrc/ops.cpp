// Registration of the q4conv operators with PyTorch's dispatcher. Schemas
// follow pytorch/extension-cpp; fake (meta) kernels and autograd formulas are
// registered from python/q4conv/_ops.py with torch.library.
#include <torch/library.h>

#include "q4conv.h"

namespace q4conv {
TORCH_LIBRARY(q4conv, m) {
  m.def("quantize_pack(Tensor weight, Tensor scale_w, float eps, int bits) -> Tensor");
  m.def("unpack(Tensor qweight, int in_channels) -> Tensor");
  m.def(
      "quantize_activation(Tensor x, Tensor bias_a, Tensor scale_a, float eps, int bits) -> "
      "Tensor");
  m.def(
      "conv_packed(Tensor x, Tensor bias_a, Tensor scale_a, Tensor qweight, Tensor scale_w, "
      "Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, float eps, int bits, "
      "bool relu, str backend, Tensor? kernel_weight=None, Tensor? alpha=None) -> Tensor");
  m.def("kernel_weight(Tensor qweight, int in_channels, str backend) -> Tensor");
  m.def("output_alpha(Tensor scale_a, Tensor scale_w, int out_channels, float eps) -> Tensor");
  m.def(
      "conv_train(Tensor x, Tensor bias_a, Tensor scale_a, Tensor weight, Tensor scale_w, "
      "Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, float eps, int bits, "
      "str backend) -> Tensor");
  m.def(
      "conv_train_backward(Tensor grad_out, Tensor x, Tensor bias_a, Tensor scale_a, "
      "Tensor weight, Tensor scale_w, bool has_bias, int[2] stride, int[2] padding, "
      "int[2] dilation, float eps, int bits) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Not a tensor op (no fake kernel needed): which backend would run.
  m.def(
      "selected_backend(Tensor x, int out_channels, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, str backend) -> str");
}

// The same functions serve CPU and CUDA: they branch to the CUDA kernels
// internally (dispatch.cpp decides for the convolution).
#define Q4CONV_REGISTER_IMPLS(m)                       \
  m.impl("quantize_pack", &quantize_pack);             \
  m.impl("unpack", &unpack);                           \
  m.impl("kernel_weight", &kernel_weight);             \
  m.impl("output_alpha", &output_alpha);               \
  m.impl("quantize_activation", &quantize_activation); \
  m.impl("conv_packed", &conv_packed);                 \
  m.impl("conv_train", &conv_train);                   \
  m.impl("conv_train_backward", &conv_train_backward); \
  m.impl("selected_backend", &selected_backend);

TORCH_LIBRARY_IMPL(q4conv, CPU, m){Q4CONV_REGISTER_IMPLS(m)}
#ifdef Q4CONV_WITH_CUDA
TORCH_LIBRARY_IMPL(q4conv, CUDA, m) {
  Q4CONV_REGISTER_IMPLS(m)
}
#endif

}  // namespace q4conv
