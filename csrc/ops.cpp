// Registration of the q4conv operators with PyTorch's dispatcher (schemas
// and CPU kernels; CUDA kernels in ops_cuda.cpp, autograd in autograd.cpp,
// fake kernels in python/q4conv/_ops.py), as pytorch/extension-cpp does.
#include <torch/library.h>

#include "q4conv.h"

namespace q4conv {
namespace {

at::Tensor kernel_weight_cpu(const at::Tensor& qweight, int64_t /*in_channels*/,
                             const std::string& backend) {
  TORCH_CHECK(false, "kernel_weight needs qweight on a CUDA device (backend '", backend, "'), got ",
              qweight.device());
}

}  // namespace

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
  // Inference only (no autograd formula): the deployed model's convolution.
  m.def(
      "conv_fused(Tensor x, Tensor bias_a, Tensor scale_a, Tensor qweight, Tensor alpha, "
      "Tensor? shift, int[2] stride, int[2] padding, int[2] dilation, float eps, int bits, "
      "Tensor? residual, bool relu, Tensor? out_bias_a, Tensor? out_scale_a, float out_eps, "
      "ScalarType? out_dtype, str backend=\"auto\", Tensor? kernel_weight=None) -> Tensor");
  // deploy: a max-pool between a layer writing codes and its readers, on the codes
  // (torch.nn.functional.max_pool2d's arguments and semantics; int8 in and out).
  m.def(
      "max_pool_codes(Tensor codes, int[2] kernel_size, int[2] stride=[], int[2] padding=0, "
      "int[2] dilation=1, bool ceil_mode=False) -> Tensor");
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
  // Queries of the plan (not tensor ops: no fake kernels).
  m.def(
      "selected_backend(Tensor x, int out_channels, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, str backend) -> str");
  m.def(
      "plan(Tensor x, int out_channels, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, str backend, ScalarType weight_dtype) -> str");
  // No tensor arguments: one kernel for every device.
  m.def(
      "kernel_weight_sizes(int out_channels, int in_channels, int[2] kernel_size, str backend) -> "
      "int[]",
      &kernel_weight_sizes);
  m.def("set_tuning(str name, int value) -> int", &set_tuning);
  m.def("tuning() -> str", &describe_tuning);
  m.def("sm90_configs() -> str[]", &sm90_config_names);
}

// Ops whose body serves every device: the plan inside tells the paths apart.
#define Q4CONV_REGISTER_DEVICE_GENERIC(m)              \
  m.impl("unpack", &unpack);                           \
  m.impl("conv_packed", &conv_packed);                 \
  m.impl("conv_fused", &conv_fused);                   \
  m.impl("conv_train", &conv_train);                   \
  m.impl("conv_train_backward", &conv_train_backward); \
  m.impl("selected_backend", &selected_backend);       \
  m.impl("plan", &plan);

TORCH_LIBRARY_IMPL(q4conv, CPU, m) {
  Q4CONV_REGISTER_DEVICE_GENERIC(m)
  m.impl("quantize_pack", &cpu_quantize_pack);
  m.impl("quantize_activation", &cpu_quantize_activation);
  m.impl("output_alpha", &cpu_output_alpha);
  m.impl("kernel_weight", &kernel_weight_cpu);
  m.impl("max_pool_codes", &cpu_max_pool_codes);
}

void register_device_generic_ops(torch::Library& m) { Q4CONV_REGISTER_DEVICE_GENERIC(m) }

}  // namespace q4conv
