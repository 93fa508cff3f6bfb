// The convolution ops' bodies (conv_packed, conv_train, and the plan's
// queries): argument checks, then whatever the plan (plan.h) says runs. The
// same bodies serve the CPU and CUDA dispatch keys: the plan, not the body,
// tells the paths apart.
#include <array>
#include <utility>

#include "q4conv.h"

namespace q4conv {

void check_x_rank(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.dim(), "-D with shape ",
              x.sizes());
}

namespace {
// A convolution's x has C >= 1 channels (zero channels would reach ATen's
// convolution, whose empty output the epilogue cannot view).
void check_x_channels(const at::Tensor& x) {
  TORCH_CHECK(x.size(1) >= 1, "x must have at least one channel (N, C >= 1, H, W), got shape ",
              x.sizes());
}
}  // namespace

void check_activation_quantizer(const at::Tensor& x, const at::Tensor& bias_a,
                                const at::Tensor& scale_a) {
  TORCH_CHECK(at::isFloatingType(bias_a.scalar_type()) && at::isFloatingType(scale_a.scalar_type()),
              "bias_a and scale_a must be floating point, got ", bias_a.scalar_type(), " and ",
              scale_a.scalar_type());
  TORCH_CHECK(bias_a.dim() == 1 && bias_a.size(0) == x.size(1), "bias_a must have shape [",
              x.size(1), "] (x's channels), got ", bias_a.sizes());
  TORCH_CHECK(scale_a.numel() == 1, "scale_a must hold one value, got ", scale_a.numel());
  check_on_device("bias_a", bias_a, x);
  check_on_device("scale_a", scale_a, x);
}

void check_conv_inputs(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& scale_a,
                       const at::Tensor& scale_w, const std::optional<at::Tensor>& bias,
                       int64_t out_channels, int64_t bits) {
  check_bits(bits);
  check_x_rank(x);
  check_x_channels(x);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(is_float_activation(dtype), "x must be float32, float16 or bfloat16, got ", dtype);
  check_activation_quantizer(x, bias_a, scale_a);
  TORCH_CHECK(scale_w.numel() == 1 || scale_w.numel() == out_channels,
              "scale_w must hold 1 value or one per output channel (", out_channels, "), got ",
              scale_w.numel());
  check_on_device("scale_w", scale_w, x);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_channels, "bias must have shape [",
                out_channels, "] (out_channels), got ", bias->sizes());
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), "bias must be floating point, got ",
                bias->scalar_type());
    check_on_device("bias", *bias, x);
  }
}

namespace {

// The plan for an op's `backend` argument, as a profiler span.
std::shared_ptr<const ConvPlan> plan_traced(const at::Tensor& x, int64_t out_channels, int64_t r,
                                            int64_t s, const ConvParams& params,
                                            const std::string& backend) {
  Q4CONV_HOST_SPAN("q4conv::plan");
  return plan_conv(x, out_channels, r, s, params, parse_backend(backend));
}

// Ops the bodies call through the dispatcher (find_op, at x's device key):
// the fallback path runs on CPU and CUDA tensors alike.
using QuantizePackOp = at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t);
using QuantizeActivationOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        double, int64_t);
using OutputAlphaOp = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double);

at::Tensor alpha_of(const at::Tensor& scale_a, const at::Tensor& scale_w, int64_t out_channels,
                    double eps) {
  static const auto op = find_op<OutputAlphaOp>("q4conv::output_alpha");
  return op.call(scale_a, scale_w, out_channels, eps);
}

// The exact fallback: activation codes, weight codes, ATen convolution.
at::Tensor fallback_forward(const at::Tensor& x, const at::Tensor& bias_a,
                            const at::Tensor& scale_a, const at::Tensor& qweight,
                            const at::Tensor& alpha, const std::optional<at::Tensor>& bias,
                            const ConvParams& params) {
  static const auto quantize = find_op<QuantizeActivationOp>("q4conv::quantize_activation");
  const at::Tensor act_codes = quantize.call(x, bias_a, scale_a, params.eps, params.bits);
  const at::Tensor w_codes = unpack(qweight, x.size(1)).permute({0, 2, 3, 1});
  return fallback_conv(act_codes, w_codes, alpha, bias, params, x.scalar_type());
}

at::Tensor empty_output(const at::Tensor& x, int64_t out_channels, int64_t p, int64_t q) {
  return at::empty({x.size(0), out_channels, p, q},
                   x.options().memory_format(x.suggest_memory_format()));
}

}  // namespace

at::Tensor in_x_format(const at::Tensor& y, const at::Tensor& x) {
  const auto format = x.suggest_memory_format();
  return y.is_contiguous(format) ? y : y.contiguous(format);
}

void check_qweight(const at::Tensor& qweight, const at::Tensor& x) {
  check_x_rank(x);
  check_x_channels(x);
  check_qweight_layout(qweight, x.size(1));
  check_on_device("qweight", qweight, x);
}

at::Tensor conv_packed(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& scale_a,
                       const at::Tensor& qweight, const at::Tensor& scale_w,
                       const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, double eps, int64_t bits,
                       bool relu, const std::string& backend,
                       const std::optional<at::Tensor>& kernel_weight,
                       const std::optional<at::Tensor>& alpha) {
  const ConvParams params = make_params(stride, padding, dilation, eps, bits, relu);
  check_qweight(qweight, x);
  check_conv_inputs(x, bias_a, scale_a, scale_w, bias, qweight.size(0), bits);
  if (alpha.has_value()) {
    TORCH_CHECK(alpha->scalar_type() == at::kFloat && alpha->dim() == 1 &&
                    alpha->size(0) == qweight.size(0) && alpha->is_contiguous() &&
                    alpha->device() == x.device(),
                "alpha must be a contiguous float32 tensor [", qweight.size(0), "] on ", x.device(),
                " (s_a * s_w per output channel)");
  }
  const int64_t k_out = qweight.size(0), r = qweight.size(1), s = qweight.size(2);
  const auto [p, q] = output_hw(x.size(2), x.size(3), r, s, params);
  if (x.size(0) == 0) return empty_output(x, k_out, p, q);
  const auto plan = plan_traced(x, k_out, r, s, params, backend);
  const at::Tensor scales =
      alpha.has_value() ? *alpha : alpha_of(scale_a, scale_w, k_out, params.eps);
  if (plan->backend == Backend::kFallback)
    return in_x_format(fallback_forward(x, bias_a, scale_a, qweight, scales, bias, params), x);
  const at::Tensor wgt =
      cuda_packed_kernel_weight(qweight, kernel_weight, x.size(1), plan->backend);
  return cuda_conv(*plan, x, bias_a, scale_a, wgt, scales, bias, params);
}

at::Tensor conv_train(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& scale_a,
                      const at::Tensor& weight, const at::Tensor& scale_w,
                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, double eps, int64_t bits,
                      const std::string& backend) {
  const ConvParams params = make_params(stride, padding, dilation, eps, bits, false);
  TORCH_CHECK(weight.dim() == 4, "weight must be 4-D (K, C, R, S), got ", weight.dim(), "-D");
  check_conv_inputs(x, bias_a, scale_a, scale_w, bias, weight.size(0), bits);
  TORCH_CHECK(weight.size(1) == x.size(1), "x must have ", weight.size(1),
              " channels (the weight's in_channels), got ", x.size(1));
  check_on_device("weight", weight, x);
  const int64_t k_out = weight.size(0), r = weight.size(2), s = weight.size(3);
  const auto [p, q] = output_hw(x.size(2), x.size(3), r, s, params);
  if (x.size(0) == 0) return empty_output(x, k_out, p, q);
  const auto plan = plan_traced(x, k_out, r, s, params, backend);
  if (plan->backend == Backend::kFallback) {
    static const auto pack = find_op<QuantizePackOp>("q4conv::quantize_pack");
    const at::Tensor qweight = pack.call(weight, scale_w, eps, bits);
    const at::Tensor alpha = alpha_of(scale_a, scale_w, k_out, eps);
    return in_x_format(fallback_forward(x, bias_a, scale_a, qweight, alpha, bias, params), x);
  }
  // CUDA backends quantize the float weights straight into their layout and
  // compute alpha in the same launch.
  TrainKernelWeight prepared;
  {
    Q4CONV_HOST_SPAN("q4conv::train_weight_prep");
    prepared = cuda_train_kernel_weight(weight, scale_a, scale_w, eps, bits, plan->backend);
  }
  return cuda_conv(*plan, x, bias_a, scale_a, prepared.weight, prepared.alpha, bias, params);
}

namespace {

std::shared_ptr<const ConvPlan> plan_query(const at::Tensor& x, int64_t out_channels,
                                           at::IntArrayRef kernel_size, const ConvParams& params,
                                           const std::string& backend) {
  check_x_rank(x);
  TORCH_CHECK(kernel_size.size() == 2, "kernel_size must have 2 values, got ", kernel_size.size());
  TORCH_CHECK(out_channels >= 1, "out_channels must be >= 1, got ", out_channels);
  // int8 x: activation codes, which only conv_fused reads (its plan for codes in).
  const std::optional<OutType> fused_out =
      x.scalar_type() == at::kChar ? std::optional<OutType>(OutType::kFusedFloat16) : std::nullopt;
  return plan_conv(x, out_channels, kernel_size[0], kernel_size[1], params, parse_backend(backend),
                   fused_out);
}

}  // namespace

std::string selected_backend(const at::Tensor& x, int64_t out_channels, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, const std::string& backend) {
  const ConvParams params = make_params(stride, padding, dilation, 1e-5, 4, false);
  return backend_name(plan_query(x, out_channels, kernel_size, params, backend)->backend);
}

std::string plan(const at::Tensor& x, int64_t out_channels, at::IntArrayRef kernel_size,
                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                 const std::string& backend, c10::ScalarType weight_dtype) {
  const ConvParams params = make_params(stride, padding, dilation, 1e-5, 4, false);
  const auto forward = plan_query(x, out_channels, kernel_size, params, backend);
  const std::array<int64_t, 4> weight_sizes{out_channels, x.size(1), kernel_size[0],
                                            kernel_size[1]};
  return describe_plan(*forward, plan_backward(x, weight_sizes, weight_dtype, x.is_cuda(), params));
}

std::vector<int64_t> kernel_weight_sizes(int64_t out_channels, int64_t in_channels,
                                         at::IntArrayRef kernel_size, const std::string& backend) {
  TORCH_CHECK(kernel_size.size() == 2, "kernel_size must have 2 values, got ", kernel_size.size());
  TORCH_CHECK(out_channels >= 1 && in_channels >= 1, "out_channels and in_channels must be >= 1, ",
              "got ", out_channels, " and ", in_channels);
  TORCH_CHECK(kernel_size[0] >= 1 && kernel_size[1] >= 1, "kernel_size must be >= 1, got ",
              kernel_size);
  int64_t taps = 0, elements = 0;  // the layouts' sizes multiply these
  TORCH_CHECK(!__builtin_mul_overflow(kernel_size[0], kernel_size[1], &taps) &&
                  !__builtin_mul_overflow(taps, in_channels, &elements) &&
                  !__builtin_mul_overflow(elements, out_channels, &elements),
              "out_channels * in_channels * kernel_size overflows int64 (", out_channels, ", ",
              in_channels, ", ", kernel_size, ")");
  const auto layout = kernel_weight_layout(parse_backend(backend), out_channels, in_channels,
                                           kernel_size[0], kernel_size[1]);
  return {layout.sizes.begin(), layout.sizes.end()};
}

}  // namespace q4conv
