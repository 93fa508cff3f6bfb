// CUDA glue of the fused LSQ activation backward (kernels/lsq_cuda.cu):
// checks the tensors, allocates outputs and the partial-sum workspace on
// PyTorch's allocator, launches on the current stream and sums the partials
// with ATen (deterministic, no host sync: the scales stay on the device).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_views.h"
#include "kernels/lsq_kernels.h"
#include "q4conv.h"

namespace q4conv {
namespace {

Tensor4dOut lsq_out(at::Tensor& t) {
  Tensor4dOut out;
  out.data = t.data_ptr();
  for (int i = 0; i < 4; ++i) out.stride[i] = t.stride(i);
  return out;
}

void check_on_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on x's device (", x.device(), "), got ",
              t.device());
}

// bias_a as fp32 [C] and scale_a as one fp32 value, both on x's device.
std::pair<at::Tensor, at::Tensor> activation_params(const at::Tensor& x, const at::Tensor& bias_a,
                                                    const at::Tensor& scale_a) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "x must be a 4-D CUDA tensor, got ", x.dim(), "-D on ",
              x.device());
  TORCH_CHECK(bias_a.dim() == 1 && bias_a.size(0) == x.size(1), "bias_a must have shape [",
              x.size(1), "] (x's channels), got ", bias_a.sizes());
  TORCH_CHECK(scale_a.numel() == 1, "scale_a must hold one value, got ", scale_a.numel());
  check_on_device(bias_a, x, "bias_a");
  check_on_device(scale_a, x, "scale_a");
  return {bias_a.detach().to(at::kFloat).contiguous(),
          scale_a.detach().to(at::kFloat).reshape({1}).contiguous()};
}

// Dense in x's suggested memory format, as the ATen path's outputs.
at::Tensor empty_like_x(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(x.suggest_memory_format()));
}

void check_status(const KernelStatus& status, const char* what) {
  TORCH_CHECK(status.ok, "q4conv: ", what, " failed: ", status.message);
}

}  // namespace

at::Tensor cuda_lsq_activation_codes(const at::Tensor& x, const at::Tensor& bias_a,
                                     const at::Tensor& scale_a, double eps, int64_t bits) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [bias, scale] = activation_params(x, bias_a, scale_a);
  at::Tensor codes = empty_like_x(x);
  if (codes.numel() == 0) return codes;
  check_status(
      lsq_activation_codes(kernel_view(x, "x"), bias.data_ptr<float>(), scale.data_ptr<float>(),
                           static_cast<float>(eps), static_cast<int>(bits), lsq_out(codes),
                           at::cuda::getCurrentCUDAStream()),
      "LSQ activation codes");
  return codes;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_lsq_activation_backward(
    const at::Tensor& grad_act, const at::Tensor& x, const at::Tensor& bias_a,
    const at::Tensor& scale_a, const std::optional<at::Tensor>& grad_scale, double eps,
    int64_t bits) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [bias, scale] = activation_params(x, bias_a, scale_a);
  TORCH_CHECK(grad_act.sizes() == x.sizes() && grad_act.scalar_type() == x.scalar_type(),
              "grad_act must have x's shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ",
              grad_act.sizes(), " ", grad_act.scalar_type());
  check_on_device(grad_act, x, "grad_act");
  at::Tensor multiplier;
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->numel() == 1 && grad_scale->scalar_type() == at::kFloat,
                "grad_scale must be one float32 value, got ", grad_scale->numel(), " values of ",
                grad_scale->scalar_type());
    check_on_device(*grad_scale, x, "grad_scale");
    multiplier = grad_scale->reshape({1}).contiguous();
  }

  at::Tensor dx = empty_like_x(x);
  LsqActBackward args;
  args.x = kernel_view(x, "x");
  args.grad = kernel_view(grad_act, "grad_act");
  args.dx = lsq_out(dx);
  args.bias_a = bias.data_ptr<float>();
  args.scale_a = scale.data_ptr<float>();
  args.grad_scale = multiplier.defined() ? multiplier.data_ptr<float>() : nullptr;
  args.eps = static_cast<float>(eps);
  args.bits = static_cast<int>(bits);

  const LsqWorkspace ws = lsq_activation_backward_workspace(args);
  const auto f32 = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor bias_partials = at::empty({ws.bias_rows, x.size(1)}, f32);
  at::Tensor residual_partials = at::empty({ws.residual_parts}, f32);
  check_status(lsq_activation_backward(args, bias_partials.data_ptr<float>(),
                                       residual_partials.data_ptr<float>(),
                                       at::cuda::getCurrentCUDAStream()),
               "LSQ activation backward");
  return {dx, at::sum(bias_partials, 0), at::sum(residual_partials)};
}

}  // namespace q4conv
