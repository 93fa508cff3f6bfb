// Kernel weight layouts (plan.h's kernel_weight_layout rule): the packed
// qweight re-laid for a backend (what the layer caches), the float weights
// quantized straight into that layout for training, and the per-call
// packed-taps rows of few-channel convolutions.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_glue.h"
#include "q4conv.h"

namespace q4conv {
namespace {

// int8 KRSC codes [K, R, S, C] as the im2col GEMM reads them: int8
// [K, 1, 1, cols], row k = the (r, s, c)-ordered codes of filter k,
// zero-padded to cols.
at::Tensor im2col_rows(const at::Tensor& krsc, int64_t cols) {
  const int64_t k_out = krsc.size(0), row = krsc.size(1) * krsc.size(2) * krsc.size(3);
  return at::constant_pad_nd(krsc.reshape({k_out, row}), {0, cols - row})
      .reshape({k_out, 1, 1, cols})
      .contiguous();
}

// The im2col weight rows [K, 1, 1, cols] (what kernel_weight caches) as the
// packed-taps convolution reads them: [K, taps, 1, cols], channel i * slot +
// s * C + c of tap t holding filter row t * group + i (zero past R and in
// each slot's tail). Made per call (a copy of K*R*S*C bytes): the layout the
// layer caches does not depend on x, whose geometry picks the path.
}  // namespace

at::Tensor packed_taps_weight(const at::Tensor& im2col_rows, const ConvShape& conv) {
  const TapPacking t = tap_packing(conv);
  const int64_t k_out = im2col_rows.size(0), row = int64_t(conv.s) * conv.c;
  const at::Tensor filter_rows =
      im2col_rows.reshape({k_out, -1}).narrow(1, 0, conv.r * row).reshape({k_out, conv.r, row});
  const int64_t padded_rows = int64_t(t.taps) * t.group;
  return at::constant_pad_nd(filter_rows, {0, t.slot - row, 0, padded_rows - conv.r})
      .reshape({k_out, t.taps, 1, t.cols})
      .contiguous();
}

at::Tensor cuda_kernel_weight(const at::Tensor& qweight, int64_t in_channels, Backend backend) {
  const KernelWeightLayout layout =
      kernel_weight_layout(backend, qweight.size(0), in_channels, qweight.size(1), qweight.size(2));
  if (layout.im2col_rows)
    return im2col_rows(cuda_unpack_krsc(qweight, in_channels, in_channels, false), layout.sizes[3]);
  const int64_t c_pad = layout.packed_int4 ? layout.sizes[3] * 2 : layout.sizes[3];
  return cuda_unpack_krsc(qweight, in_channels, c_pad, layout.packed_int4);
}

namespace {

// True when `cached` has exactly the layout `backend` reads for qweight.
bool matches_layout(const at::Tensor& cached, const at::Tensor& qweight, int64_t in_channels,
                    Backend backend) {
  const KernelWeightLayout layout =
      kernel_weight_layout(backend, qweight.size(0), in_channels, qweight.size(1), qweight.size(2));
  return cached.defined() && cached.device() == qweight.device() && cached.dim() == 4 &&
         cached.is_contiguous() &&
         cached.scalar_type() == (layout.packed_int4 ? at::kByte : at::kChar) &&
         cached.sizes() == at::IntArrayRef(layout.sizes);
}

}  // namespace

at::Tensor cuda_packed_kernel_weight(const at::Tensor& qweight,
                                     const std::optional<at::Tensor>& cached, int64_t in_channels,
                                     Backend backend) {
  if (cached.has_value() && matches_layout(*cached, qweight, in_channels, backend)) return *cached;
  return cuda_kernel_weight(qweight, in_channels, backend);
}

TrainKernelWeight cuda_train_kernel_weight(const at::Tensor& weight, const at::Tensor& scale_a,
                                           const at::Tensor& scale_w, double eps, int64_t bits,
                                           Backend backend) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor source = weight.scalar_type() == at::kDouble ? weight.to(at::kFloat) : weight;
  const at::Tensor scale = fp32_dense(scale_w);
  const int64_t k_out = weight.size(0), channels = weight.size(1);
  const int64_t r = weight.size(2), s = weight.size(3);
  const KernelWeightLayout layout = kernel_weight_layout(backend, k_out, channels, r, s);
  const bool per_channel = scale.numel() > 1;
  const float e = static_cast<float>(eps);
  const int b = static_cast<int>(bits);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor4dView view = kernel_view(source, "weight");
  TrainKernelWeight out;
  const bool quantizes = k_out * channels * r * s > 0;
  at::Tensor s_a;
  AlphaOut alpha;
  if (!quantizes) {
    out.alpha = cuda_output_alpha(scale_a, scale_w, k_out, eps);  // no launch to ride on
  } else {
    TORCH_CHECK(scale_a.device() == weight.device(), "scale_a must be on the weight's device (",
                weight.device(), "), got ", scale_a.device());
    out.alpha = at::empty({k_out}, weight.options().dtype(at::kFloat));
    s_a = fp32_dense(scale_a);
    alpha = {s_a.data_ptr<float>(), out.alpha.data_ptr<float>()};
  }
  if (layout.packed_int4) {
    out.weight = at::empty(layout.sizes, weight.options().dtype(at::kByte));
    if (quantizes)
      check_status(quantize_pack_weight_int4(view, scale.data_ptr<float>(), per_channel, e, b,
                                             static_cast<int>(out.weight.size(3) * 2),
                                             out.weight.data_ptr<uint8_t>(), stream, alpha),
                   "weight quantization");
    return out;
  }
  // The im2col layout is made from unpadded KRSC codes.
  const bool im2col = layout.im2col_rows;
  const std::array<int64_t, 4> sizes =
      im2col ? std::array<int64_t, 4>{k_out, r, s, channels} : layout.sizes;
  at::Tensor codes = at::empty(sizes, weight.options().dtype(at::kChar));
  if (quantizes)
    check_status(quantize_weight_int8_krsc(view, scale.data_ptr<float>(), per_channel, e, b,
                                           static_cast<int>(sizes[3]), codes.data_ptr<int8_t>(),
                                           stream, alpha),
                 "weight quantization");
  out.weight = im2col ? im2col_rows(codes, layout.sizes[3]) : codes;
  return out;
}

}  // namespace q4conv
