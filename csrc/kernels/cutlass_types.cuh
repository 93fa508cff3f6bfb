// CUTLASS element type of each q4conv output type, shared by the sm80 and
// sm90 kernels (one kernel instantiation per output type).
#pragma once

#include "cutlass/bfloat16.h"
#include "cutlass/half.h"
#include "kernels/conv_kernels.h"

namespace q4conv {

template <OutType T>
struct OutElement;
template <>
struct OutElement<OutType::kFloat32> {
  using type = float;
};
template <>
struct OutElement<OutType::kFloat16> {
  using type = cutlass::half_t;
};
template <>
struct OutElement<OutType::kBFloat16> {
  using type = cutlass::bfloat16_t;
};

}  // namespace q4conv
