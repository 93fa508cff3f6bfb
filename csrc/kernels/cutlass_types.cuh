// CUTLASS element type of each q4conv output type, shared by the sm80 and
// sm90 kernels (one kernel instantiation per output type): the CUDA element
// of the table in element_types.cuh, as CUTLASS names it.
#pragma once

#include "cutlass/bfloat16.h"
#include "cutlass/half.h"
#include "kernels/element_types.cuh"

namespace q4conv {

// CUTLASS's type for a CUDA element type (itself where CUTLASS uses it as is).
template <typename T>
struct CutlassElement {
  using type = T;
};
template <>
struct CutlassElement<__half> {
  using type = cutlass::half_t;
};
template <>
struct CutlassElement<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};

template <OutType T>
struct OutElement {
  using type = typename CutlassElement<out_element_t<T>>::type;
};

}  // namespace q4conv
