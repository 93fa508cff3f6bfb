// Exact fallback backend: integer codes through ATen's float convolution.
// Every partial sum of codes |q| <= 8 is an integer; the float convolution's
// error (including Winograd or FFT transforms some algorithms use) stays far
// below 0.5 in the ranges chosen below, so rounding the result recovers the
// exact int32 sum on any device.
#include "q4conv.h"

namespace q4conv {
namespace {

// Largest C*R*S for which the fp32 path is used: |acc| <= C*R*S*64 <= 2^20,
// so fp32's spacing there (2^-3) leaves room for algorithm error under 0.5.
constexpr int64_t kMaxFp32Taps = 16384;

at::Tensor apply_epilogue(const at::Tensor& acc, const at::Tensor& alpha,
                          const std::optional<at::Tensor>& bias, bool relu) {
  const int64_t k = acc.size(1);
  at::Tensor y = acc * alpha.view({1, k, 1, 1});
  if (bias.has_value() && bias->defined()) y = y + bias->to(at::kFloat).view({1, k, 1, 1});
  return relu ? at::relu(y) : y;
}

// A dense copy of t (NCHW sizes) converted to dtype, channels_last, except
// that a one-channel operand gets NCHW strides: ATen's CPU convolution
// (oneDNN) gives wrong results for some geometries (e.g. a 1x2 kernel at
// stride (1, 2) over 3 columns) when a one-channel operand carries
// channels_last strides, whose stride 1 on the size-1 channel dimension makes
// its layout ambiguous. A fresh tensor also settles the strides of every
// other size-1 dimension.
at::Tensor conv_operand(const at::Tensor& t, at::ScalarType dtype) {
  const auto format =
      t.size(1) == 1 ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  return at::empty(t.sizes(), t.options().dtype(dtype).memory_format(format)).copy_(t);
}

}  // namespace

at::Tensor fallback_conv(const at::Tensor& act_codes, const at::Tensor& w_codes,
                         const at::Tensor& alpha, const std::optional<at::Tensor>& bias,
                         const ConvParams& params, at::ScalarType out_dtype) {
  const int64_t taps = w_codes.size(1) * w_codes.size(2) * w_codes.size(3);
  const at::ScalarType compute = taps <= kMaxFp32Taps ? at::kFloat : at::kDouble;
  // NHWC / KRSC codes viewed as NCHW / KCRS tensors in channels_last memory.
  const at::Tensor input = conv_operand(act_codes.permute({0, 3, 1, 2}), compute);
  const at::Tensor filters = conv_operand(w_codes.permute({0, 3, 1, 2}), compute);
  at::Tensor acc =
      at::convolution(input, filters, std::nullopt, {params.stride[0], params.stride[1]},
                      {params.padding[0], params.padding[1]},
                      {params.dilation[0], params.dilation[1]}, false, {0, 0}, 1);
  acc = at::round(acc).to(at::kFloat);
  return apply_epilogue(acc, alpha, bias, params.relu)
      .to(out_dtype)
      .contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace q4conv
