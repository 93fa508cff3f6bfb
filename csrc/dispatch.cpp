// The one place that decides which backend runs a convolution, plus the
// argument checks and the scale arithmetic every backend shares.
#include <array>
#include <utility>

#include "q4conv.h"

#ifdef Q4CONV_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace q4conv {

ConvParams make_params(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       double eps, int64_t bits, bool relu) {
  TORCH_CHECK(stride.size() == 2, "stride must have 2 values, got ", stride.size());
  TORCH_CHECK(padding.size() == 2, "padding must have 2 values, got ", padding.size());
  TORCH_CHECK(dilation.size() == 2, "dilation must have 2 values, got ", dilation.size());
  ConvParams params;
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(stride[i] >= 1, "stride must be >= 1, got ", stride);
    TORCH_CHECK(padding[i] >= 0, "padding must be >= 0, got ", padding);
    TORCH_CHECK(dilation[i] >= 1, "dilation must be >= 1, got ", dilation);
    params.stride[i] = stride[i];
    params.padding[i] = padding[i];
    params.dilation[i] = dilation[i];
  }
  TORCH_CHECK(eps > 0, "eps must be > 0, got ", eps);
  params.eps = eps;
  params.bits = bits;
  params.relu = relu;
  return params;
}

std::pair<int64_t, int64_t> output_hw(int64_t h, int64_t w, int64_t r, int64_t s,
                                      const ConvParams& params) {
  const int64_t extent_h = params.dilation[0] * (r - 1) + 1;
  const int64_t extent_w = params.dilation[1] * (s - 1) + 1;
  const int64_t padded_h = h + 2 * params.padding[0];
  const int64_t padded_w = w + 2 * params.padding[1];
  TORCH_CHECK(extent_h <= padded_h && extent_w <= padded_w, "kernel size (", extent_h, ", ",
              extent_w, ") after dilation is larger than the padded input (", padded_h, ", ",
              padded_w, ")");
  return {(padded_h - extent_h) / params.stride[0] + 1,
          (padded_w - extent_w) / params.stride[1] + 1};
}

Backend parse_backend(const std::string& name) {
  if (name == "auto") return Backend::kAuto;
  if (name == "fallback") return Backend::kFallback;
  if (name == "sm80_int4") return Backend::kSm80Int4;
  if (name == "sm90_int8") return Backend::kSm90Int8;
  TORCH_CHECK(false, "backend must be one of 'auto', 'fallback', 'sm80_int4', 'sm90_int8', got '",
              name, "'");
}

const char* backend_name(Backend backend) {
  switch (backend) {
    case Backend::kAuto:
      return "auto";
    case Backend::kFallback:
      return "fallback";
    case Backend::kSm80Int4:
      return "sm80_int4";
    case Backend::kSm90Int8:
      return "sm90_int8";
  }
  return "unknown";
}

void check_x_rank(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.dim(), "-D with shape ",
              x.sizes());
}

void check_conv_inputs(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& scale_a,
                       const at::Tensor& scale_w, const std::optional<at::Tensor>& bias,
                       int64_t out_channels, int64_t bits) {
  check_bits(bits);
  check_x_rank(x);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(bias_a.dim() == 1 && bias_a.size(0) == x.size(1), "bias_a must have shape [",
              x.size(1), "] (x's channels), got ", bias_a.sizes());
  TORCH_CHECK(scale_a.numel() == 1, "scale_a must hold one value, got ", scale_a.numel());
  TORCH_CHECK(scale_w.numel() == 1 || scale_w.numel() == out_channels,
              "scale_w must hold 1 value or one per output channel (", out_channels, "), got ",
              scale_w.numel());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"bias_a", &bias_a},
                                {"scale_a", &scale_a},
                                {"scale_w", &scale_w}}) {
    TORCH_CHECK(t->device() == x.device(), name, " must be on x's device (", x.device(), "), got ",
                t->device());
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_channels, "bias must have shape [",
                out_channels, "] (out_channels), got ", bias->sizes());
    TORCH_CHECK(bias->device() == x.device(), "bias must be on x's device (", x.device(), "), got ",
                bias->device());
  }
}

at::Tensor output_alpha(const at::Tensor& scale_a, const at::Tensor& scale_w, int64_t out_channels,
                        double eps) {
  TORCH_CHECK(scale_a.defined(), "scale_a must be a tensor, got None");
  TORCH_CHECK(scale_w.defined(), "scale_w must be a tensor, got None");
  TORCH_CHECK(out_channels >= 1, "out_channels must be >= 1, got ", out_channels);
  TORCH_CHECK(scale_a.numel() == 1, "scale_a must hold one value, got ", scale_a.numel());
  TORCH_CHECK(scale_w.numel() == 1 || scale_w.numel() == out_channels,
              "scale_w must hold 1 value or one per output channel (", out_channels, "), got ",
              scale_w.numel());
  TORCH_CHECK(scale_w.device() == scale_a.device(), "scale_w must be on scale_a's device (",
              scale_a.device(), "), got ", scale_w.device());
  TORCH_CHECK(eps > 0, "eps must be > 0, got ", eps);
#ifdef Q4CONV_WITH_CUDA
  if (scale_a.is_cuda()) return cuda_output_alpha(scale_a, scale_w, out_channels, eps);
#endif
  const at::Tensor s_a = at::clamp_min(scale_a.detach().to(at::kFloat).reshape({1}), eps);
  const at::Tensor s_w = at::clamp_min(scale_w.detach().to(at::kFloat).reshape({-1}), eps);
  return (s_a * s_w).expand({out_channels}).contiguous();
}

namespace {

Backend choose_backend(const at::Tensor& x, int64_t out_channels, int64_t r, int64_t s,
                       const ConvParams& params, Backend requested) {
  if (requested == Backend::kFallback) return Backend::kFallback;
  if (!x.is_cuda()) {
    TORCH_CHECK(requested == Backend::kAuto, "backend '", backend_name(requested),
                "' needs a CUDA input, got x on ", x.device());
    return Backend::kFallback;
  }
#ifdef Q4CONV_WITH_CUDA
  const auto dtype = x.scalar_type();
  if (requested != Backend::kAuto) {
    TORCH_CHECK(cuda_backend_supports(requested, x, out_channels, r, s, params, dtype), "backend '",
                backend_name(requested),
                "' cannot run this convolution on this device (not built for it, compute "
                "capability too low, or unsupported shape/alignment)");
    return requested;
  }
  // sm_90: int8 tensor cores on 4-bit values (native int4 MMA is emulated
  // there); inputs with few channels (the RGB stem) go through packed filter
  // taps or an im2col GEMM (dispatch_cuda.cpp). sm_80/86/89: the native
  // int4 kernel, except for very few input channels, which would be mostly
  // zero padding in its 32-channel tiles (the exact fallback is faster
  // there). Anything else: fallback.
  const int major = at::cuda::getDeviceProperties(x.device().index())->major;
  if (major == 9 && cuda_backend_supports(Backend::kSm90Int8, x, out_channels, r, s, params, dtype))
    return Backend::kSm90Int8;
  constexpr int64_t kMinInt4KernelChannels = 16;
  if (major == 8 && x.size(1) >= kMinInt4KernelChannels &&
      cuda_backend_supports(Backend::kSm80Int4, x, out_channels, r, s, params, dtype))
    return Backend::kSm80Int4;
  return Backend::kFallback;
#else
  TORCH_CHECK(false, "q4conv was built without CUDA; x is on ", x.device());
#endif
}

// choose_backend for an op's `backend` argument, as a profiler span.
Backend choose_backend_traced(const at::Tensor& x, int64_t out_channels, int64_t r, int64_t s,
                              const ConvParams& params, const std::string& backend) {
  Q4CONV_HOST_SPAN("q4conv::choose_backend");
  return choose_backend(x, out_channels, r, s, params, parse_backend(backend));
}

at::Tensor empty_output(const at::Tensor& x, int64_t out_channels, int64_t p, int64_t q) {
  return at::empty({x.size(0), out_channels, p, q},
                   x.options().memory_format(x.suggest_memory_format()));
}

// The integer convolution once the backend is chosen. kernel_weight: the
// weights in the backend's layout (CUDA backends); the fallback reads
// qweight. alpha = s_a * s_w per output channel.
at::Tensor run_conv(Backend backend, const at::Tensor& x, const at::Tensor& bias_a,
                    const at::Tensor& scale_a, const at::Tensor& qweight,
                    const at::Tensor& kernel_weight, const std::array<int64_t, 3>& krs,
                    const at::Tensor& alpha, const std::optional<at::Tensor>& bias,
                    const ConvParams& params) {
  at::Tensor y;
  if (backend == Backend::kFallback) {
    const at::Tensor act_codes = quantize_activation(x, bias_a, scale_a, params.eps, params.bits);
    const at::Tensor w_codes = unpack(qweight, x.size(1)).permute({0, 2, 3, 1});
    y = fallback_conv(act_codes, w_codes, alpha, bias, params, x.scalar_type());
  } else {
#ifdef Q4CONV_WITH_CUDA
    y = cuda_conv(backend, x, bias_a, scale_a, kernel_weight, krs, alpha, bias, params);
#endif
  }
  const auto format = x.suggest_memory_format();
  return y.is_contiguous(format) ? y : y.contiguous(format);  // no dispatcher call when it is
}

void check_qweight(const at::Tensor& qweight, const at::Tensor& x) {
  check_x_rank(x);
  check_qweight_layout(qweight, x.size(1));
  TORCH_CHECK(qweight.device() == x.device(), "qweight must be on x's device (", x.device(),
              "), got ", qweight.device());
}

}  // namespace

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
  const Backend chosen = choose_backend_traced(x, k_out, r, s, params, backend);
  const at::Tensor scales =
      alpha.has_value() ? *alpha : output_alpha(scale_a, scale_w, k_out, params.eps);
  at::Tensor wgt;
#ifdef Q4CONV_WITH_CUDA
  if (chosen != Backend::kFallback)
    wgt = cuda_packed_kernel_weight(qweight, kernel_weight, x.size(1), chosen);
#endif
  return run_conv(chosen, x, bias_a, scale_a, qweight, wgt, {k_out, r, s}, scales, bias, params);
}

at::Tensor kernel_weight(const at::Tensor& qweight, int64_t in_channels,
                         const std::string& backend) {
  check_qweight_layout(qweight, in_channels);
#ifdef Q4CONV_WITH_CUDA
  if (qweight.is_cuda()) return cuda_kernel_weight(qweight, in_channels, parse_backend(backend));
#endif
  TORCH_CHECK(false, "kernel_weight needs qweight on a CUDA device (backend '", backend, "'), got ",
              qweight.device());
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
  TORCH_CHECK(weight.device() == x.device(), "weight must be on x's device (", x.device(),
              "), got ", weight.device());
  const int64_t k_out = weight.size(0), r = weight.size(2), s = weight.size(3);
  const auto [p, q] = output_hw(x.size(2), x.size(3), r, s, params);
  if (x.size(0) == 0) return empty_output(x, k_out, p, q);
  const Backend chosen = choose_backend_traced(x, k_out, r, s, params, backend);
  at::Tensor alpha, qweight, wgt;
  {
    Q4CONV_HOST_SPAN("q4conv::train_weight_prep");
    // CUDA backends quantize the float weights straight into their layout
    // and compute alpha in the same launch; the fallback reads packed codes.
#ifdef Q4CONV_WITH_CUDA
    if (chosen != Backend::kFallback) {
      TrainKernelWeight prepared =
          cuda_train_kernel_weight(weight, scale_a, scale_w, eps, bits, chosen);
      wgt = std::move(prepared.weight);
      alpha = std::move(prepared.alpha);
    }
#endif
  }
  if (chosen == Backend::kFallback) {
    alpha = output_alpha(scale_a, scale_w, k_out, eps);
    qweight = quantize_pack(weight, scale_w, eps, bits);
  }
  return run_conv(chosen, x, bias_a, scale_a, qweight, wgt, {k_out, r, s}, alpha, bias, params);
}

std::string selected_backend(const at::Tensor& x, int64_t out_channels, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, const std::string& backend) {
  TORCH_CHECK(kernel_size.size() == 2, "kernel_size must have 2 values, got ", kernel_size.size());
  const ConvParams params = make_params(stride, padding, dilation, 1e-5, 4, false);
  return backend_name(choose_backend(x, out_channels, kernel_size[0], kernel_size[1], params,
                                     parse_backend(backend)));
}

}  // namespace q4conv
