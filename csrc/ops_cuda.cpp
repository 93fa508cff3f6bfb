// The q4conv operators' CUDA kernels, registered at the CUDA dispatch key.
#include <torch/library.h>

#include "q4conv.h"

namespace q4conv {

void register_device_generic_ops(torch::Library& m);

namespace {

at::Tensor kernel_weight_cuda(const at::Tensor& qweight, int64_t in_channels,
                              const std::string& backend) {
  check_qweight_layout(qweight, in_channels);
  return cuda_kernel_weight(qweight, in_channels, parse_backend(backend));
}

}  // namespace

TORCH_LIBRARY_IMPL(q4conv, CUDA, m) {
  register_device_generic_ops(m);
  m.impl("quantize_pack", &cuda_quantize_pack);
  m.impl("quantize_activation", &cuda_quantize_activation);
  m.impl("output_alpha", &cuda_output_alpha);
  m.impl("kernel_weight", &kernel_weight_cuda);
  m.impl("max_pool_codes", &cuda_max_pool_codes);
}

}  // namespace q4conv
