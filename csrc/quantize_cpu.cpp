// Quantization on the CPU (weight quantize+pack, unpack, activation codes,
// the epilogue scales) and the argument checks the CPU and CUDA kernels of
// these ops share. The CUDA kernels are in cuda_quantize.cpp; both use quant.h.
#include <ATen/Parallel.h>

#include "q4conv.h"
#include "quant.h"

namespace q4conv {
namespace {

// Per-output-channel effective scale as floats: scale_w is a scalar or [K].
std::vector<float> weight_scales(const at::Tensor& scale_w, int64_t out_channels, double eps) {
  const at::Tensor values = scale_w.detach().to(at::kCPU, at::kFloat).contiguous();
  std::vector<float> scales(out_channels);
  for (int64_t k = 0; k < out_channels; ++k) {
    const float raw =
        values.numel() == 1 ? values.data_ptr<float>()[0] : values.data_ptr<float>()[k];
    scales[k] = effective_scale(raw, static_cast<float>(eps));
  }
  return scales;
}

void check_weight_scale(const at::Tensor& weight, const at::Tensor& scale_w) {
  TORCH_CHECK(scale_w.numel() == 1 || scale_w.numel() == weight.size(0),
              "scale_w must hold 1 value or one per output channel (", weight.size(0), "), got ",
              scale_w.numel());
  TORCH_CHECK(at::isFloatingType(scale_w.scalar_type()), "scale_w must be floating point, got ",
              scale_w.scalar_type());
  TORCH_CHECK(scale_w.device() == weight.device(), "scale_w must be on the weight's device (",
              weight.device(), "), got ", scale_w.device());
}

}  // namespace

at::Tensor cpu_quantize_pack(const at::Tensor& weight, const at::Tensor& scale_w, double eps,
                             int64_t bits) {
  check_weight_args(weight, scale_w, eps, bits);
  const int64_t k_out = weight.size(0), channels = weight.size(1);
  const int64_t taps = weight.size(2) * weight.size(3);
  const int64_t packed_c = (channels + 1) / 2;
  // KRSC float copy so channels are innermost, as in the packed layout.
  const at::Tensor krsc = weight.detach().to(at::kFloat).permute({0, 2, 3, 1}).contiguous();
  const std::vector<float> scales = weight_scales(scale_w, k_out, eps);
  at::Tensor packed = at::empty({k_out, weight.size(2), weight.size(3), packed_c},
                                weight.options().dtype(at::kByte));
  const float* src = krsc.data_ptr<float>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  const int b = static_cast<int>(bits);
  at::parallel_for(0, k_out * taps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float scale = scales[row / taps];
      const float* in = src + row * channels;
      for (int64_t c = 0; c < packed_c; ++c) {
        const int8_t even = quantize_value(in[2 * c], scale, b);
        const int8_t odd = 2 * c + 1 < channels ? quantize_value(in[2 * c + 1], scale, b) : 0;
        dst[row * packed_c + c] = pack_int4_pair(even, odd);
      }
    }
  });
  return packed;
}

void check_bits(int64_t bits) {
  // Codes are packed two per byte and the CUDA kernels are int4/int8 MMAs on
  // values in [-8, 7]: only 4 bits is supported by every backend.
  TORCH_CHECK(bits == 4,
              "bits (a_bit / w_bit) must be 4: every q4conv backend packs 4-bit codes, got ", bits);
}

void check_weight_args(const at::Tensor& weight, const at::Tensor& scale_w, double eps,
                       int64_t bits) {
  check_defined({{"weight", &weight}, {"scale_w", &scale_w}});
  check_bits(bits);
  check_eps(eps);
  TORCH_CHECK(weight.dim() == 4, "weight must be 4-D (K, C, R, S), got ", weight.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), "weight must be floating point, got ",
              weight.scalar_type());
  check_weight_scale(weight, scale_w);
}

void check_qweight_layout(const at::Tensor& qweight, int64_t in_channels) {
  TORCH_CHECK(in_channels >= 1, "in_channels must be >= 1, got ", in_channels);
  TORCH_CHECK(qweight.dim() == 4 && qweight.scalar_type() == at::kByte,
              "qweight must be a 4-D uint8 tensor (K, R, S, ceil(C/2)), got ", qweight.dim(), "-D ",
              qweight.scalar_type());
  TORCH_CHECK(qweight.size(3) == (in_channels + 1) / 2, "qweight's last dimension must be ceil(",
              in_channels, "/2) = ", (in_channels + 1) / 2, " for in_channels=", in_channels,
              ", got ", qweight.size(3), " (wrong in_channels?)");
}

at::Tensor unpack(const at::Tensor& qweight, int64_t in_channels) {
  check_defined({{"qweight", &qweight}});
  check_qweight_layout(qweight, in_channels);
  // Low nibble = even channel, high nibble = odd channel; sign-extend both.
  const at::Tensor bytes = qweight.to(at::kInt);
  const at::Tensor low = at::bitwise_and(bytes, 0x0F);
  const at::Tensor high = at::bitwise_right_shift(bytes, 4);
  at::Tensor codes = at::stack({low, high}, -1).flatten(-2, -1);
  codes = at::where(codes >= 8, codes - 16, codes).narrow(-1, 0, in_channels);
  return codes.to(at::kChar).permute({0, 3, 1, 2}).contiguous();
}

void check_activation_args(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& scale_a,
                           double eps, int64_t bits) {
  check_defined({{"x", &x}, {"bias_a", &bias_a}, {"scale_a", &scale_a}});
  check_bits(bits);
  check_eps(eps);
  check_x_rank(x);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ",
              x.scalar_type());
  check_activation_quantizer(x, bias_a, scale_a);
}

at::Tensor cpu_quantize_activation(const at::Tensor& x, const at::Tensor& bias_a,
                                   const at::Tensor& scale_a, double eps, int64_t bits) {
  check_activation_args(x, bias_a, scale_a, eps, bits);
  const int64_t channels = x.size(1);
  // fp32(x) is exact for fp16/bf16 inputs; NHWC so each row is one pixel.
  const at::Tensor nhwc = x.detach().to(at::kFloat).permute({0, 2, 3, 1}).contiguous();
  const at::Tensor bias = bias_a.detach().to(at::kFloat).contiguous();
  const float scale =
      effective_scale(scale_a.detach().to(at::kFloat).item<float>(), static_cast<float>(eps));
  at::Tensor codes = at::empty(nhwc.sizes(), x.options().dtype(at::kChar));
  const float* src = nhwc.data_ptr<float>();
  const float* shift = bias.data_ptr<float>();
  int8_t* dst = codes.data_ptr<int8_t>();
  const int b = static_cast<int>(bits);
  const int64_t rows = nhwc.numel() / std::max<int64_t>(channels, 1);
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * channels; i < end * channels; ++i) {
      dst[i] = quantize_activation(src[i], shift[i % channels], scale, b);
    }
  });
  return codes;
}

void check_alpha_args(const at::Tensor& scale_a, const at::Tensor& scale_w, int64_t out_channels,
                      double eps) {
  check_defined({{"scale_a", &scale_a}, {"scale_w", &scale_w}});
  TORCH_CHECK(out_channels >= 1, "out_channels must be >= 1, got ", out_channels);
  check_eps(eps);
  TORCH_CHECK(scale_a.numel() == 1, "scale_a must hold one value, got ", scale_a.numel());
  TORCH_CHECK(scale_w.numel() == 1 || scale_w.numel() == out_channels,
              "scale_w must hold 1 value or one per output channel (", out_channels, "), got ",
              scale_w.numel());
  TORCH_CHECK(scale_w.device() == scale_a.device(), "scale_w must be on scale_a's device (",
              scale_a.device(), "), got ", scale_w.device());
  TORCH_CHECK(
      at::isFloatingType(scale_a.scalar_type()) && at::isFloatingType(scale_w.scalar_type()),
      "scale_a and scale_w must be floating point, got ", scale_a.scalar_type(), " and ",
      scale_w.scalar_type());
}

at::Tensor cpu_output_alpha(const at::Tensor& scale_a, const at::Tensor& scale_w,
                            int64_t out_channels, double eps) {
  check_alpha_args(scale_a, scale_w, out_channels, eps);
  const at::Tensor s_a = at::clamp_min(scale_a.detach().to(at::kFloat).reshape({1}), eps);
  const at::Tensor s_w = at::clamp_min(scale_w.detach().to(at::kFloat).reshape({-1}), eps);
  return (s_a * s_w).expand({out_channels}).contiguous();
}

}  // namespace q4conv
