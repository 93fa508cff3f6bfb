// What every CUDA glue file shares: tensors as the torch-free kernels see
// them (raw views, element and output types) and kernel failures turned into
// Python exceptions.
#pragma once

#include <ATen/ATen.h>

#include "kernels/conv_kernels.h"
#include "kernels/quantize_kernels.h"

namespace q4conv {

// The kernels' element type of a float32 / float16 / bfloat16 tensor; any
// other dtype is an error naming the argument `name`.
inline InType kernel_in_type(at::ScalarType dtype, const char* name) {
  switch (dtype) {
    case at::kFloat:
      return InType::kFloat32;
    case at::kHalf:
      return InType::kFloat16;
    case at::kBFloat16:
      return InType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", dtype);
  }
}

// A 4-D tensor as (data, element type, sizes, strides in elements).
inline Tensor4dView kernel_view(const at::Tensor& t, const char* name) {
  Tensor4dView view;
  view.data = t.data_ptr();
  view.type = kernel_in_type(t.scalar_type(), name);
  for (int i = 0; i < 4; ++i) {
    view.size[i] = t.size(i);
    view.stride[i] = t.stride(i);
  }
  return view;
}

// t as dense fp32 memory, for kernels that read raw fp32 pointers (scales,
// shifts, biases): t itself when it already is one, with no dispatcher call
// (this runs several times per call of a small layer, whose time is host
// bound).
inline at::Tensor fp32_dense(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t;
  return t.to(at::kFloat).contiguous();
}

// The kernels' output type for a float32 / float16 / bfloat16 result.
inline OutType out_type(at::ScalarType dtype) {
  switch (kernel_in_type(dtype, "x")) {
    case InType::kFloat16:
      return OutType::kFloat16;
    case InType::kBFloat16:
      return OutType::kBFloat16;
    default:
      return OutType::kFloat32;
  }
}

// A kernel's failure as a Python exception naming `what`.
inline void check_status(const KernelStatus& status, const char* what) {
  TORCH_CHECK(status.ok, "q4conv: ", what, " failed: ", status.message);
}

// ---- shared by the CUDA glue files -----------------------------------------
// Activation codes of x into `codes` (NHWC [N, H, W, c_pad] int8, or
// [N, H, W, c_pad / 2] packed int4), on the current stream. bias / scale are
// fp32 on x's device (scale: one value, read by the kernel, no host sync).
void quantize_activation_into(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& scale,
                              double eps, int64_t bits, int64_t c_pad, bool packed_int4,
                              const at::Tensor& codes);
// qweight's codes as KRSC with channels padded to c_pad: int8, or packed int4.
at::Tensor cuda_unpack_krsc(const at::Tensor& qweight, int64_t in_channels, int64_t c_pad,
                            bool packed_int4);
// The im2col weight rows [K, 1, 1, cols] (what kernel_weight caches) as the
// packed-taps convolution `conv` reads them (made per call).
at::Tensor packed_taps_weight(const at::Tensor& im2col_rows, const ConvShape& conv);

}  // namespace q4conv
