// conv_fused: the deployed model's convolution (SPEC section 8), with the
// whole epilogue of q4conv.deploy in one op: BatchNorm folded into alpha and
// shift, the residual add, ReLU, and activation codes in and out.
//
//   q_a  = x                                  where x is int8 codes (used as they are)
//        = clamp(rint((x + bias_a) / max(scale_a, eps)))   where x is float (SPEC 3)
//   acc  = conv(q_a, q_w)                     exact integer sum
//   v    = fp32(alpha[k] * acc) + shift[k]    two fp32 roundings (no fused multiply-add)
//   v    = v + fp32(residual)                 where a residual is given
//   v    = max(v, 0)                          where relu (NaN stays NaN)
//   out  = clamp(rint((v + out_bias_a[k]) / max(out_scale_a, out_eps)))   int8 codes,
//          where out_scale_a is given: the consumer's codes from the fp32 value v
//        = v rounded to out_dtype             otherwise
//
// On CUDA the plan (plan_conv with a fused output type) runs the kernels
// where it can: sm90 int8 GEMMs reading codes in (no pass) and writing codes
// or float16 with the residual in their epilogue (cuda_conv_fused). Every
// other case runs the exact arithmetic with ATen ops: the activation codes of
// q4conv::quantize_activation (quant.h, the one definition; on CUDA its
// kernel, bit-identical), the integer convolution of fallback_conv, the fp32
// epilogue above, and the output codes from q4conv::quantize_activation
// again. That arithmetic is the reference the kernels match bit for bit.
#include "q4conv.h"

namespace q4conv {
namespace {

using QuantizeActivationOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        double, int64_t);

// Argument checks (SPEC section 5); returns the float output dtype, or
// nullopt for codes out.
std::optional<at::ScalarType> check_fused_inputs(
    const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& scale_a,
    const at::Tensor& qweight, const at::Tensor& alpha, const std::optional<at::Tensor>& shift,
    int64_t bits, const std::optional<at::Tensor>& out_bias_a,
    const std::optional<at::Tensor>& out_scale_a, double out_eps,
    std::optional<at::ScalarType> out_dtype) {
  check_defined({{"x", &x},
                 {"bias_a", &bias_a},
                 {"scale_a", &scale_a},
                 {"qweight", &qweight},
                 {"alpha", &alpha}});
  check_bits(bits);
  check_qweight(qweight, x);
  const auto dtype = x.scalar_type();
  const bool codes_in = dtype == at::kChar;
  TORCH_CHECK(codes_in || is_float_activation(dtype),
              "x must be float32, float16 or bfloat16 (activations) or int8 (activation codes "
              "from q4conv), got ",
              dtype);
  const int64_t k = qweight.size(0);
  // bias_a / scale_a are x's quantizer: read for float x; for codes x (made
  // with them by the producer) only their shapes and device are checked.
  check_activation_quantizer(x, bias_a, scale_a);
  TORCH_CHECK(alpha.scalar_type() == at::kFloat && alpha.dim() == 1 && alpha.size(0) == k &&
                  alpha.is_contiguous(),
              "alpha must be a contiguous float32 tensor [", k,
              "] (s_a * s_w per output channel, times a folded BatchNorm's scale), got ",
              alpha.scalar_type(), " ", alpha.sizes());
  check_on_device("alpha", alpha, x);
  if (shift.has_value() && shift->defined()) {
    TORCH_CHECK(
        shift->dim() == 1 && shift->size(0) == k && is_float_activation(shift->scalar_type()),
        "shift must be a float32, float16 or bfloat16 tensor [", k, "] (out_channels), got ",
        shift->scalar_type(), " ", shift->sizes());
    check_on_device("shift", *shift, x);
  }
  const bool has_bias = out_bias_a.has_value() && out_bias_a->defined();
  const bool has_scale = out_scale_a.has_value() && out_scale_a->defined();
  TORCH_CHECK(has_bias == has_scale,
              "out_bias_a and out_scale_a must be given together (the consumer's activation "
              "quantizer, for codes out) or both be None, got ",
              has_bias ? "out_bias_a only" : "out_scale_a only");
  if (has_scale) {
    TORCH_CHECK(out_bias_a->dim() == 1 && out_bias_a->size(0) == k &&
                    at::isFloatingType(out_bias_a->scalar_type()),
                "out_bias_a must be a floating-point tensor [", k, "] (out_channels), got ",
                out_bias_a->scalar_type(), " ", out_bias_a->sizes());
    TORCH_CHECK(out_scale_a->numel() == 1 && at::isFloatingType(out_scale_a->scalar_type()),
                "out_scale_a must be a floating-point tensor holding one value, got ",
                out_scale_a->scalar_type(), " with ", out_scale_a->numel(), " values");
    check_on_device("out_bias_a", *out_bias_a, x);
    check_on_device("out_scale_a", *out_scale_a, x);
    check_eps(out_eps, "out_eps");
    TORCH_CHECK(!out_dtype.has_value() || *out_dtype == at::kChar,
                "out_dtype must be None or torch.int8 with codes out (out_scale_a given), got ",
                *out_dtype);
    return std::nullopt;
  }
  if (out_dtype.has_value()) {
    TORCH_CHECK(is_float_activation(*out_dtype),
                "out_dtype must be float32, float16 or bfloat16 for a float output (codes out "
                "needs out_bias_a and out_scale_a), got ",
                *out_dtype);
    return *out_dtype;
  }
  TORCH_CHECK(!codes_in,
              "out_dtype is required when x is int8 codes and the output is float (the codes do "
              "not say which float dtype the activations had)");
  return dtype;
}

void check_residual(const at::Tensor& residual, const at::Tensor& x,
                    std::array<int64_t, 4> out_sizes) {
  TORCH_CHECK(residual.sizes() == at::IntArrayRef(out_sizes),
              "residual must have the output's shape ", at::IntArrayRef(out_sizes), ", got ",
              residual.sizes());
  TORCH_CHECK(is_float_activation(residual.scalar_type()),
              "residual must be float32, float16 or bfloat16, got ", residual.scalar_type());
  check_on_device("residual", residual, x);
}

// (N, K, P, Q) int8 in channels_last memory: the layout of q4conv's codes.
at::Tensor empty_codes(const at::Tensor& x, std::array<int64_t, 4> sizes) {
  return at::empty(sizes,
                   x.options().dtype(at::kChar).memory_format(at::MemoryFormat::ChannelsLast));
}

// The fused output type the CUDA kernels would write for this call, or
// nullopt where only the ATen arithmetic can (their residual and float
// output are float16).
std::optional<OutType> kernel_out_type(std::optional<at::ScalarType> float_out,
                                       const std::optional<at::Tensor>& residual) {
  const bool residual_ok =
      !residual.has_value() || !residual->defined() || residual->scalar_type() == at::kHalf;
  if (!residual_ok) return std::nullopt;
  if (!float_out) return OutType::kFusedCodes8;
  if (*float_out == at::kHalf) return OutType::kFusedFloat16;
  return std::nullopt;
}

}  // namespace

at::Tensor conv_fused(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& scale_a,
                      const at::Tensor& qweight, const at::Tensor& alpha,
                      const std::optional<at::Tensor>& shift, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, double eps, int64_t bits,
                      const std::optional<at::Tensor>& residual, bool relu,
                      const std::optional<at::Tensor>& out_bias_a,
                      const std::optional<at::Tensor>& out_scale_a, double out_eps,
                      std::optional<at::ScalarType> out_dtype, const std::string& backend,
                      const std::optional<at::Tensor>& kernel_weight) {
  // relu stays out of params: fallback_conv would apply it before the residual add.
  const ConvParams params = make_params(stride, padding, dilation, eps, bits, false);
  const std::optional<at::ScalarType> float_out = check_fused_inputs(
      x, bias_a, scale_a, qweight, alpha, shift, bits, out_bias_a, out_scale_a, out_eps, out_dtype);
  const int64_t k_out = qweight.size(0), r = qweight.size(1), s = qweight.size(2);
  const auto [p, q] = output_hw(x.size(2), x.size(3), r, s, params);
  const std::array<int64_t, 4> out_sizes{x.size(0), k_out, p, q};
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) check_residual(*residual, x, out_sizes);
  if (x.size(0) == 0) {
    if (!float_out) return empty_codes(x, out_sizes);
    return at::empty(out_sizes,
                     x.options().dtype(*float_out).memory_format(x.suggest_memory_format()));
  }

  Q4CONV_HOST_SPAN("q4conv::conv_fused");
  // A forced kernel backend plans on every device (so a CPU input is an
  // error naming it, as in conv_packed); "auto" plans on CUDA only.
  const Backend requested = parse_backend(backend);
  if (requested != Backend::kFallback && (x.is_cuda() || requested != Backend::kAuto)) {
    const std::optional<OutType> kernel_out = kernel_out_type(float_out, residual);
    TORCH_CHECK(kernel_out.has_value() || requested == Backend::kAuto, "backend '", backend,
                "' runs conv_fused with a float16 output or codes out and a float16 residual "
                "only; use backend='auto' or 'fallback'");
    if (kernel_out.has_value()) {
      const auto plan = plan_conv(x, k_out, r, s, params, requested, kernel_out);
      if (plan->backend != Backend::kFallback) {
        const at::Tensor wgt =
            cuda_packed_kernel_weight(qweight, kernel_weight, x.size(1), plan->backend);
        FusedEpilogue fused{residual, relu, out_bias_a, out_scale_a, out_eps};
        return cuda_conv_fused(*plan, x, bias_a, scale_a, wgt, alpha, shift, params, fused);
      }
    }
  }
  static const auto quantize = find_op<QuantizeActivationOp>("q4conv::quantize_activation");
  // Activation codes as NHWC (N, H, W, C) int8: a view of codes x (no copy
  // when x is channels_last), else x quantized with its quantizer.
  const at::Tensor act_codes = x.scalar_type() == at::kChar
                                   ? x.permute({0, 2, 3, 1})
                                   : quantize.call(x, bias_a, scale_a, params.eps, params.bits);
  const at::Tensor w_codes = unpack(qweight, x.size(1)).permute({0, 2, 3, 1});
  // v = fp32(alpha * acc) + shift in fp32, (N, K, P, Q) channels_last.
  at::Tensor v = fallback_conv(act_codes, w_codes, alpha, shift, params, at::kFloat);
  if (has_residual) v = v + residual->to(at::kFloat);
  if (relu) v = at::relu(v);
  if (!float_out) {
    // The consumer's codes, (N, P, Q, K) from quantize_activation, seen as
    // (N, K, P, Q) in channels_last memory.
    return quantize.call(v, *out_bias_a, *out_scale_a, out_eps, params.bits).permute({0, 3, 1, 2});
  }
  return in_x_format(v.to(*float_out), x);
}

}  // namespace q4conv
