// Tensors as the torch-free CUDA kernels see them (raw views), shared by the
// CUDA glue files (dispatch_cuda.cpp, backward_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

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

}  // namespace q4conv
