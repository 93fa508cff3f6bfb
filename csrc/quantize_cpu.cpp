// Quantization ops: weight quantize+pack, unpack, activation codes. CPU loops
// here, CUDA kernels through dispatch_cuda.cpp; both use quant.h.
#include <ATen/Parallel.h>

#include <initializer_list>
#include <utility>

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
  TORCH_CHECK(scale_w.device() == weight.device(), "scale_w must be on the weight's device (",
              weight.device(), "), got ", scale_w.device());
}

// A None passed for a required tensor arrives as an undefined tensor: name
// the argument instead of failing on its (missing) device.
void check_defined(std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  for (const auto& [name, t] : tensors)
    TORCH_CHECK(t->defined(), name, " must be a tensor, got None");
}

at::Tensor cpu_quantize_pack(const at::Tensor& weight, const at::Tensor& scale_w, double eps,
                             int64_t bits) {
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

}  // namespace

void check_bits(int64_t bits) {
  // Codes are packed two per byte and the CUDA kernels are int4/int8 MMAs on
  // values in [-8, 7]: only 4 bits is supported by every backend.
  TORCH_CHECK(bits == 4,
              "bits (a_bit / w_bit) must be 4: every q4conv backend packs 4-bit codes, got ", bits);
}

at::Tensor quantize_pack(const at::Tensor& weight, const at::Tensor& scale_w, double eps,
                         int64_t bits) {
  check_defined({{"weight", &weight}, {"scale_w", &scale_w}});
  check_bits(bits);
  TORCH_CHECK(weight.dim() == 4, "weight must be 4-D (K, C, R, S), got ", weight.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), "weight must be floating point, got ",
              weight.scalar_type());
  check_weight_scale(weight, scale_w);
#ifdef Q4CONV_WITH_CUDA
  if (weight.is_cuda()) return cuda_quantize_pack(weight, scale_w, eps, bits);
#endif
  TORCH_CHECK(weight.is_cpu(), "weight on ", weight.device(), " needs q4conv built with CUDA");
  return cpu_quantize_pack(weight, scale_w, eps, bits);
}

void check_qweight_layout(const at::Tensor& qweight, int64_t in_channels) {
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

at::Tensor quantize_activation(const at::Tensor& x, const at::Tensor& bias_a,
                               const at::Tensor& scale_a, double eps, int64_t bits) {
  check_defined({{"x", &x}, {"bias_a", &bias_a}, {"scale_a", &scale_a}});
  check_bits(bits);
  check_x_rank(x);
  TORCH_CHECK(bias_a.dim() == 1 && bias_a.size(0) == x.size(1), "bias_a must have shape [",
              x.size(1), "] (in_channels), got ", bias_a.sizes());
  TORCH_CHECK(scale_a.numel() == 1, "scale_a must hold one value, got ", scale_a.numel());
  TORCH_CHECK(bias_a.device() == x.device() && scale_a.device() == x.device(),
              "bias_a and scale_a must be on x's device (", x.device(), ")");
#ifdef Q4CONV_WITH_CUDA
  if (x.is_cuda()) return cuda_quantize_activation(x, bias_a, scale_a, eps, bits, x.size(1), false);
#endif
  TORCH_CHECK(x.is_cpu(), "x on ", x.device(), " needs q4conv built with CUDA");
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

}  // namespace q4conv
