// The q4conv operators' CUDA kernels, registered at the CUDA dispatch key.
#include <torch/library.h>

#include "q4conv.h"

namespace q4conv {

void register_device_generic_ops(torch::Library& m);

namespace {

at::Tensor quantize_pack_cuda(const at::Tensor& weight, const at::Tensor& scale_w, double eps,
                              int64_t bits) {
  check_weight_args(weight, scale_w, bits);
  return cuda_quantize_pack(weight, scale_w, eps, bits);
}

at::Tensor quantize_activation_cuda(const at::Tensor& x, const at::Tensor& bias_a,
                                    const at::Tensor& scale_a, double eps, int64_t bits) {
  check_activation_args(x, bias_a, scale_a, bits);
  return cuda_quantize_activation(x, bias_a, scale_a, eps, bits);
}

at::Tensor output_alpha_cuda(const at::Tensor& scale_a, const at::Tensor& scale_w,
                             int64_t out_channels, double eps) {
  check_alpha_args(scale_a, scale_w, out_channels, eps);
  return cuda_output_alpha(scale_a, scale_w, out_channels, eps);
}

at::Tensor kernel_weight_cuda(const at::Tensor& qweight, int64_t in_channels,
                              const std::string& backend) {
  check_qweight_layout(qweight, in_channels);
  return cuda_kernel_weight(qweight, in_channels, parse_backend(backend));
}

}  // namespace

TORCH_LIBRARY_IMPL(q4conv, CUDA, m) {
  register_device_generic_ops(m);
  m.impl("quantize_pack", &quantize_pack_cuda);
  m.impl("quantize_activation", &quantize_activation_cuda);
  m.impl("output_alpha", &output_alpha_cuda);
  m.impl("kernel_weight", &kernel_weight_cuda);
}

}  // namespace q4conv
