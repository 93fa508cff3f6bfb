// torch.autocast for the q4conv ops, registered at the AutocastCPU and
// AutocastCUDA dispatch keys (as ATen's own wrappers in autocast_mode.cpp):
// a q4conv layer under autocast runs in the autocast dtype, with no cast of
// its own in Python.
//
// Policy: only the activation x is cast, to autocast's lower-precision dtype
// (fp16 or bf16, whatever the region asks for). The parameters (float weight,
// bias_a, scale_a, scale_w, bias) stay as they are: the ops take fp32 master
// parameters with a half-precision x, and the quantization arithmetic is
// fp32 anyway (SPEC section 3). The output has x's (cast) dtype. The cast
// runs above the Autograd key, so it is recorded: x's gradient flows back
// through it in x's own dtype. Outside autocast these kernels never run.
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "q4conv.h"

namespace q4conv {
namespace {

using c10::DeviceType;

// Everything below this guard runs as without autocast: the redispatched op
// and the ATen ops inside its body (only this device's key, as ATen does).
template <DeviceType device>
struct BelowAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{
      at::autocast::get_autocast_dispatch_key_from_device_type(device)};
};

// x in autocast's dtype where autocast would cast it (a floating, non-double
// tensor of this device); cached_cast reuses one cast of a leaf x that
// requires grad within the region, as for ATen ops.
template <DeviceType device>
at::Tensor autocast_activation(const at::Tensor& x) {
  return at::autocast::cached_cast(at::autocast::get_lower_precision_fp_from_device_type(device), x,
                                   device);
}

// A tensor with the dtype, sizes and strides autocast_activation would give,
// without copying x: the plan queries read x's metadata only, and should
// plan what conv_packed / conv_train will run (the layer's eval cache picks
// its weight layout from selected_backend; explain reports the plan).
template <DeviceType device>
at::Tensor autocast_activation_like(const at::Tensor& x) {
  const auto dtype = at::autocast::get_lower_precision_fp_from_device_type(device);
  if (!at::autocast::is_eligible(x, device) || x.scalar_type() == dtype) return x;
  return at::empty_like(x, x.options().dtype(dtype));
}

template <DeviceType device>
at::Tensor conv_train_autocast(const at::Tensor& x, const at::Tensor& bias_a,
                               const at::Tensor& scale_a, const at::Tensor& weight,
                               const at::Tensor& scale_w, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, double eps, int64_t bits,
                               const std::string& backend) {
  BelowAutocast<device> below;
  static const auto op = find_op<decltype(conv_train)>("q4conv::conv_train");
  return op.call(autocast_activation<device>(x), bias_a, scale_a, weight, scale_w, bias, stride,
                 padding, dilation, eps, bits, backend);
}

template <DeviceType device>
at::Tensor conv_packed_autocast(const at::Tensor& x, const at::Tensor& bias_a,
                                const at::Tensor& scale_a, const at::Tensor& qweight,
                                const at::Tensor& scale_w, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, double eps, int64_t bits, bool relu,
                                const std::string& backend,
                                const std::optional<at::Tensor>& kernel_weight,
                                const std::optional<at::Tensor>& alpha) {
  BelowAutocast<device> below;
  static const auto op = find_op<decltype(conv_packed)>("q4conv::conv_packed");
  return op.call(autocast_activation<device>(x), bias_a, scale_a, qweight, scale_w, bias, stride,
                 padding, dilation, eps, bits, relu, backend, kernel_weight, alpha);
}

// conv_fused (the deployed model's op): float x is cast as conv_packed's, and a
// float output takes the autocast dtype too, also where x is int8 codes
// (which autocast leaves alone) and out_dtype names the activations' dtype:
// the unfused model's convolution would have produced the autocast dtype
// there. The residual is not cast (the op adds it in fp32, exactly); codes
// out are int8 either way.
template <DeviceType device>
at::Tensor conv_fused_autocast(const at::Tensor& x, const at::Tensor& bias_a,
                               const at::Tensor& scale_a, const at::Tensor& qweight,
                               const at::Tensor& alpha, const std::optional<at::Tensor>& shift,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, double eps, int64_t bits,
                               const std::optional<at::Tensor>& residual, bool relu,
                               const std::optional<at::Tensor>& out_bias_a,
                               const std::optional<at::Tensor>& out_scale_a, double out_eps,
                               std::optional<at::ScalarType> out_dtype, const std::string& backend,
                               const std::optional<at::Tensor>& kernel_weight) {
  BelowAutocast<device> below;
  static const auto op = find_op<decltype(conv_fused)>("q4conv::conv_fused");
  if (out_dtype.has_value() && at::isFloatingType(*out_dtype))
    out_dtype = at::autocast::get_lower_precision_fp_from_device_type(device);
  return op.call(autocast_activation<device>(x), bias_a, scale_a, qweight, alpha, shift, stride,
                 padding, dilation, eps, bits, residual, relu, out_bias_a, out_scale_a, out_eps,
                 out_dtype, backend, kernel_weight);
}

// No cast: the backward's inputs are what the forward saw. The engine runs a
// backward with the autocast state of its caller (loss.backward() inside the
// region), and the gradients must not depend on it.
template <DeviceType device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_train_backward_autocast(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& bias_a, const at::Tensor& scale_a,
                             const at::Tensor& weight, const at::Tensor& scale_w, bool has_bias,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, double eps, int64_t bits) {
  BelowAutocast<device> below;
  static const auto op = find_op<decltype(conv_train_backward)>("q4conv::conv_train_backward");
  return op.call(grad_out, x, bias_a, scale_a, weight, scale_w, has_bias, stride, padding, dilation,
                 eps, bits);
}

template <DeviceType device>
std::string selected_backend_autocast(const at::Tensor& x, int64_t out_channels,
                                      at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                      const std::string& backend) {
  BelowAutocast<device> below;
  static const auto op = find_op<decltype(selected_backend)>("q4conv::selected_backend");
  return op.call(autocast_activation_like<device>(x), out_channels, kernel_size, stride, padding,
                 dilation, backend);
}

template <DeviceType device>
std::string plan_autocast(const at::Tensor& x, int64_t out_channels, at::IntArrayRef kernel_size,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                          const std::string& backend, c10::ScalarType weight_dtype) {
  BelowAutocast<device> below;
  static const auto op = find_op<decltype(plan)>("q4conv::plan");
  return op.call(autocast_activation_like<device>(x), out_channels, kernel_size, stride, padding,
                 dilation, backend, weight_dtype);
}

template <DeviceType device>
void register_autocast(torch::Library& m) {
  m.impl("conv_train", &conv_train_autocast<device>);
  m.impl("conv_packed", &conv_packed_autocast<device>);
  m.impl("conv_fused", &conv_fused_autocast<device>);
  m.impl("conv_train_backward", &conv_train_backward_autocast<device>);
  m.impl("selected_backend", &selected_backend_autocast<device>);
  m.impl("plan", &plan_autocast<device>);
}

}  // namespace

// The other ops fall through autocast (PyTorch's fallthrough kernel at these
// keys): quantize_activation and quantize_pack produce integer codes, and
// quantizing the fp32 value directly is the more exact of the two.
TORCH_LIBRARY_IMPL(q4conv, AutocastCPU, m) { register_autocast<DeviceType::CPU>(m); }

TORCH_LIBRARY_IMPL(q4conv, AutocastCUDA, m) { register_autocast<DeviceType::CUDA>(m); }

}  // namespace q4conv
