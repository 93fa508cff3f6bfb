// Element types of the kernels' floating-point inputs and of their outputs,
// and the one dispatch from a run-time type to a compile-time one. Torch-free
// and CUDA-free, so the host glue sees the enums; the device side of the
// table (element types, conversions, stores) is element_types.cuh.
//
// Adding an output type: its OutType value here (and in AllOutTypes), its
// OutTraits entry in element_types.cuh, and the type in the list of every
// kernel family that produces it (conv_kernels.h, quantize_kernels.h).
#pragma once

namespace q4conv {

// Output of a convolution's epilogue: its element and which epilogue makes it.
//   kFloat32 / kFloat16 / kBFloat16: conv_packed's epilogue,
//       act(alpha[k] * acc + bias[k]) (one fused multiply-add), in that type;
//   kFusedFloat16 / kFusedCodes8: conv_fused's exact epilogue (conv_epilogue.cpp),
//       v = fp32(alpha[k] * acc) + shift[k] (two roundings) [+ fp16 residual] [ReLU],
//       out as fp16, or as the consumer's int8 activation codes
//       clamp(rint((v + out_bias[k]) / max(out_scale, out_eps))).
enum class OutType { kFloat32, kFloat16, kBFloat16, kFusedFloat16, kFusedCodes8 };

// Whether an output type runs conv_fused's exact epilogue (with a residual).
constexpr bool is_fused_out_type(OutType t) {
  return t == OutType::kFusedFloat16 || t == OutType::kFusedCodes8;
}
// Element of a floating-point input tensor (activations, weights, gradients).
enum class InType { kFloat32, kFloat16, kBFloat16 };

// A run-time type value as a compile-time one: what the with_* helpers pass
// to their callback (a generic lambda reads decltype(tag)::value).
template <auto V>
struct TypeTag {
  static constexpr auto value = V;
};

// A set of types (OutType or InType values): the types a kernel family is
// compiled for.
template <auto... Vs>
struct TypeList {
  template <class Enum>
  static constexpr bool contains(Enum t) {
    return ((t == Vs) || ...);
  }
};

using AllOutTypes = TypeList<OutType::kFloat32, OutType::kFloat16, OutType::kBFloat16,
                             OutType::kFusedFloat16, OutType::kFusedCodes8>;
using AllInTypes = TypeList<InType::kFloat32, InType::kFloat16, InType::kBFloat16>;

namespace detail {
template <auto First, auto... Rest, class Enum, class F, class Otherwise>
decltype(auto) dispatch_type(Enum t, F& f, Otherwise& otherwise) {
  if (t == First) return f(TypeTag<First>{});
  if constexpr (sizeof...(Rest) > 0)
    return dispatch_type<Rest...>(t, f, otherwise);
  else
    return otherwise();
}

template <class List>
struct Dispatch;
template <auto... Vs>
struct Dispatch<TypeList<Vs...>> {
  template <class Enum, class F, class Otherwise>
  static decltype(auto) run(Enum t, F& f, Otherwise& otherwise) {
    return dispatch_type<Vs...>(t, f, otherwise);
  }
};
}  // namespace detail

// Calls f(TypeTag<t>{}) for the run-time output type t if List holds it,
// otherwise(): a family dispatches over the types it is compiled for, so an
// output type it lacks is an error, not an instantiation.
template <class List = AllOutTypes, class F, class Otherwise>
decltype(auto) with_out_type(OutType t, F&& f, Otherwise&& otherwise) {
  return detail::Dispatch<List>::run(t, f, otherwise);
}

// The same for input element types.
template <class List = AllInTypes, class F, class Otherwise>
decltype(auto) with_in_type(InType t, F&& f, Otherwise&& otherwise) {
  return detail::Dispatch<List>::run(t, f, otherwise);
}

}  // namespace q4conv
