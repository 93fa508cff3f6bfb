// CPU-only builds: the CUDA glue's entry points raise. The plan never picks a
// CUDA backend for CPU tensors, and CUDA tensors find no q4conv kernel at
// the CUDA dispatch key, so these are reached only by a bug.
#include "q4conv.h"

namespace q4conv {
namespace {

[[noreturn]] void no_cuda(const char* what) {
  TORCH_CHECK(false, "q4conv was built without CUDA: ", what, " needs the CUDA kernels");
}

}  // namespace

at::Tensor cuda_quantize_activation(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                    int64_t) {
  no_cuda("quantize_activation");
}
at::Tensor cuda_quantize_pack(const at::Tensor&, const at::Tensor&, double, int64_t) {
  no_cuda("quantize_pack");
}
at::Tensor cuda_output_alpha(const at::Tensor&, const at::Tensor&, int64_t, double) {
  no_cuda("output_alpha");
}
at::Tensor cuda_kernel_weight(const at::Tensor&, int64_t, Backend) { no_cuda("kernel_weight"); }
at::Tensor cuda_packed_kernel_weight(const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                                     Backend) {
  no_cuda("kernel_weight");
}
TrainKernelWeight cuda_train_kernel_weight(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           double, int64_t, Backend) {
  no_cuda("conv_train");
}
at::Tensor cuda_conv(const ConvPlan&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                     const ConvParams&) {
  no_cuda("the convolution");
}
at::Tensor cuda_conv_fused(const ConvPlan&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const ConvParams&, const FusedEpilogue&) {
  no_cuda("the fused convolution");
}
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cuda_conv_train_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, bool, const ConvParams&,
                         const BackwardPlan&) {
  no_cuda("conv_train_backward");
}
at::Tensor cuda_max_pool_codes(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                               at::IntArrayRef, bool) {
  no_cuda("max_pool_codes");
}
void plan_cuda(ConvPlan&, const at::Tensor&, int64_t, int64_t, int64_t, const ConvParams&, Backend,
               const Tuning&, std::optional<OutType>) {
  no_cuda("planning a CUDA convolution");
}
std::string describe_cuda_geometry(const ConvPlan&) { return ""; }
void apply_kernel_tuning(const Tuning&) {}
std::vector<std::string> sm90_config_names() { return {}; }

}  // namespace q4conv
