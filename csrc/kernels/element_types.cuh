// Device side of the element-type table (element_types.h): the CUDA element
// type of each OutType / InType, the fp32 <-> element conversions, and the
// epilogue stores of the fused 1x1 kernels (fp32 epilogue values -> output
// elements). Included by .cu files only; no CUTLASS (cutlass_types.cuh maps
// these element types to CUTLASS's).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "element_types.h"

namespace q4conv {

// ---- the table --------------------------------------------------------------------
template <OutType T>
struct OutTraits;
template <>
struct OutTraits<OutType::kFloat32> {
  using type = float;
};
template <>
struct OutTraits<OutType::kFloat16> {
  using type = __half;
};
template <>
struct OutTraits<OutType::kBFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct OutTraits<OutType::kFusedFloat16> {
  using type = __half;
};
template <>
struct OutTraits<OutType::kFusedCodes8> {
  using type = int8_t;
};

template <InType T>
struct InTraits;
template <>
struct InTraits<InType::kFloat32> {
  using type = float;
};
template <>
struct InTraits<InType::kFloat16> {
  using type = __half;
};
template <>
struct InTraits<InType::kBFloat16> {
  using type = __nv_bfloat16;
};

// The CUDA element type of an OutType / InType value, or of a with_*_type tag.
template <OutType T>
using out_element_t = typename OutTraits<T>::type;
template <InType T>
using in_element_t = typename InTraits<T>::type;
template <class Tag>
using out_element_of = out_element_t<Tag::value>;
template <class Tag>
using in_element_of = in_element_t<Tag::value>;

// Bytes of one element; 0 for a value outside the enum.
inline size_t element_bytes(InType t) {
  return with_in_type(
      t, [](auto in) { return sizeof(in_element_of<decltype(in)>); }, [] { return size_t(0); });
}
inline size_t element_bytes(OutType t) {
  return with_out_type(
      t, [](auto out) { return sizeof(out_element_of<decltype(out)>); }, [] { return size_t(0); });
}

// ---- conversions --------------------------------------------------------------------
namespace device {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even, as ATen's fp32 -> fp16 / bf16 conversion.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- epilogue stores (fp32 epilogue values -> output elements) -----------------------
// The bits of a pair of 16-bit values (__half2 / __nv_bfloat162).
template <typename Pair>
__device__ __forceinline__ uint32_t pair_bits(const Pair& pair) {
  uint32_t bits;
  memcpy(&bits, &pair, 4);
  return bits;
}

// Output elements packed into whole 32-bit words / 16-byte chunks
// (pointwise_fused.cu's tile stores): fp32 by 16-byte chunks of 4 channels,
// fp16 / bf16 by words of 2 channels, both rounded to nearest even.
template <typename OutT>
struct OutCvt;
template <>
struct OutCvt<float> {
  static constexpr int kChannels = 4;  // per 16-byte chunk
  static __device__ __forceinline__ uint4 chunk(const float (&v)[4]) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                      __float_as_uint(v[3]));
  }
};
template <>
struct OutCvt<__half> {
  static __device__ __forceinline__ uint32_t word(float a, float b) {
    return pair_bits(__floats2half2_rn(a, b));
  }
};
template <>
struct OutCvt<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t word(float a, float b) {
    return pair_bits(__floats2bfloat162_rn(a, b));
  }
};

// Two adjacent output elements (v0, v1) at dst (pointwise_wgmma.cu's
// staging tile): one 8-byte store for fp32, one 4-byte store otherwise.
template <typename OutT>
__device__ __forceinline__ void store_pair(char* dst, float v0, float v1) {
  if constexpr (std::is_same_v<OutT, float>) {
    *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
  } else {
    OutT pair[2] = {from_float<OutT>(v0), from_float<OutT>(v1)};
    *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(pair);
  }
}

}  // namespace device
}  // namespace q4conv
