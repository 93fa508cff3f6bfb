// CUDA glue of the quantization ops: activation codes, weight packing and
// re-layout, and the epilogue scales, on PyTorch's current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_glue.h"
#include "q4conv.h"

namespace q4conv {

void quantize_activation_into(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& scale,
                              double eps, int64_t bits, int64_t c_pad, bool packed_int4,
                              const at::Tensor& codes) {
  if (codes.numel() == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor4dView view = kernel_view(x, "x");
  const int pad = static_cast<int>(c_pad), b = static_cast<int>(bits);
  const float e = static_cast<float>(eps);
  const KernelStatus status =
      packed_int4
          ? quantize_activation_int4_nhwc(view, bias.data_ptr<float>(), scale.data_ptr<float>(), e,
                                          b, pad, codes.data_ptr<uint8_t>(), stream)
          : quantize_activation_int8_nhwc(view, bias.data_ptr<float>(), scale.data_ptr<float>(), e,
                                          b, pad, codes.data_ptr<int8_t>(), stream);
  check_status(status, "activation quantization");
}

at::Tensor cuda_quantize_activation(const at::Tensor& x, const at::Tensor& bias_a,
                                    const at::Tensor& scale_a, double eps, int64_t bits) {
  check_activation_args(x, bias_a, scale_a, eps, bits);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor codes =
      at::empty({x.size(0), x.size(2), x.size(3), x.size(1)}, x.options().dtype(at::kChar));
  quantize_activation_into(x, fp32_dense(bias_a), fp32_dense(scale_a), eps, bits, x.size(1), false,
                           codes);
  return codes;
}

at::Tensor cuda_quantize_pack(const at::Tensor& weight, const at::Tensor& scale_w, double eps,
                              int64_t bits) {
  check_weight_args(weight, scale_w, eps, bits);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor source = weight.scalar_type() == at::kDouble ? weight.to(at::kFloat) : weight;
  const at::Tensor scale = fp32_dense(scale_w);
  const int64_t c_pad = round_up(weight.size(1), 2);
  at::Tensor packed = at::empty({weight.size(0), weight.size(2), weight.size(3), c_pad / 2},
                                weight.options().dtype(at::kByte));
  if (packed.numel() == 0) return packed;
  check_status(
      quantize_pack_weight_int4(kernel_view(source.detach(), "weight"), scale.data_ptr<float>(),
                                scale.numel() > 1, static_cast<float>(eps), static_cast<int>(bits),
                                static_cast<int>(c_pad), packed.data_ptr<uint8_t>(),
                                at::cuda::getCurrentCUDAStream()),
      "weight quantization");
  return packed;
}

at::Tensor cuda_unpack_krsc(const at::Tensor& qweight, int64_t in_channels, int64_t c_pad,
                            bool packed_int4) {
  const c10::cuda::CUDAGuard guard(qweight.device());
  const at::Tensor source = qweight.contiguous();
  const int64_t rows = qweight.size(0) * qweight.size(1) * qweight.size(2);
  const int c_in = static_cast<int>(qweight.size(3) * 2);
  at::Tensor out = at::empty(
      {qweight.size(0), qweight.size(1), qweight.size(2), packed_int4 ? c_pad / 2 : c_pad},
      qweight.options().dtype(packed_int4 ? at::kByte : at::kChar));
  if (out.numel() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int channels = static_cast<int>(in_channels), pad = static_cast<int>(c_pad);
  const KernelStatus status =
      packed_int4 ? repack_int4(source.data_ptr<uint8_t>(), rows, c_in, channels, pad,
                                out.data_ptr<uint8_t>(), stream)
                  : unpack_int4_to_int8(source.data_ptr<uint8_t>(), rows, c_in, channels, pad,
                                        out.data_ptr<int8_t>(), stream);
  check_status(status, "weight re-layout");
  return out;
}

at::Tensor cuda_output_alpha(const at::Tensor& scale_a, const at::Tensor& scale_w,
                             int64_t out_channels, double eps) {
  check_alpha_args(scale_a, scale_w, out_channels, eps);
  const c10::cuda::CUDAGuard guard(scale_a.device());
  const at::Tensor s_a = fp32_dense(scale_a);
  const at::Tensor s_w = fp32_dense(scale_w);
  at::Tensor alpha = at::empty({out_channels}, scale_a.options().dtype(at::kFloat));
  check_status(output_alpha_fp32(s_a.data_ptr<float>(), s_w.data_ptr<float>(), s_w.numel() > 1,
                                 static_cast<float>(eps), static_cast<int>(out_channels),
                                 alpha.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
               "output alpha");
  return alpha;
}

}  // namespace q4conv
