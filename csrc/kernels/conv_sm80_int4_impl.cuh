// Internal header of the CUTLASS 2.x sm80 int4 implicit-GEMM fprop backend
// (conv_sm80_int4*.cu). Not part of the public kernel interface: only the
// conv_sm80_int4*.cu translation units include it.
//
// Design
// ------
// Mainloop: cutlass::conv::kernel::DefaultConv2dFprop, int4b_t NHWC x int4b_t
// KRSC -> int32, OpClassTensorOp, Sm80, 128x128x128 / 64x64x128 / 16x8x64,
// 3 stages, IteratorAlgorithm::kOptimized, 128-bit (32 x int4) operand access.
//
// Epilogue: the "with broadcast" conv kernel
// (DefaultConv2dFpropWithBroadcast / EpilogueWithBroadcast) gives the thread
// functor one broadcast value per output column (= output channel k). The
// broadcast element is AlphaBias {alpha[k], bias[k]} (8 bytes), packed by a
// tiny kernel into the workspace, so a single broadcast vector carries both
// per-channel operands. The functor PerChannelAffineOp computes, per element,
//   z = fadd_rn(fmul_rn(alpha[k], float(acc)), bias[k])   (no FMA contraction)
//   z = relu ? (z < 0 ? 0 : z) : z
// and converts z to the output type with round-to-nearest-even. The source
// tensor C is never read (is_source_needed() == false) and the auxiliary T
// tensor is never stored (kStoreT == false).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cutlass/array.h"
#include "cutlass/numeric_types.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/convolution.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_fprop_with_broadcast.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cutlass/layout/tensor.h"

#include "kernels/conv_kernels.h"

#include "kernels/cutlass_types.cuh"

namespace q4conv {
namespace sm80_int4_detail {

// One broadcast element: the per-channel scale and bias of output channel k.
struct alignas(8) AlphaBias {
  float alpha;
  float bias;

  AlphaBias() = default;
  // Needed by cutlass::Array::clear() / fill(T(0)) inside the epilogue.
  CUTLASS_HOST_DEVICE explicit AlphaBias(float v) : alpha(v), bias(v) {}
  CUTLASS_HOST_DEVICE AlphaBias(float a, float b) : alpha(a), bias(b) {}
};

// Thread-level epilogue functor with the concept of
// cutlass::epilogue::threadblock::EpilogueWithBroadcast::OutputOp
// (cf. cutlass::epilogue::thread::LinearCombinationBiasElementwise).
template <typename ElementOutput_, int Count>
class PerChannelAffineOp {
 public:
  using ElementOutput = ElementOutput_;
  using ElementD = ElementOutput;
  using ElementC = ElementOutput;
  using ElementAccumulator = int32_t;
  using ElementCompute = AlphaBias;  // type of the broadcast fragment
  using ElementScalar = float;
  using ElementZ = ElementOutput;
  using ElementT = ElementOutput;
  using ElementVector = AlphaBias;
  static int const kElementsPerAccess = Count;
  static int const kCount = Count;

  static bool const kIsSingleSource = true;
  static bool const kIsHeavy = false;
  static bool const kStoreZ = true;
  static bool const kStoreT = false;

  using FragmentAccumulator = cutlass::Array<ElementAccumulator, kElementsPerAccess>;
  using FragmentCompute = cutlass::Array<ElementCompute, kElementsPerAccess>;
  using FragmentC = cutlass::Array<ElementC, kElementsPerAccess>;
  using FragmentZ = cutlass::Array<ElementZ, kElementsPerAccess>;
  using FragmentT = cutlass::Array<ElementT, kElementsPerAccess>;
  using FragmentSource = FragmentC;
  using FragmentOutput = FragmentZ;

  struct Params {
    int relu = 0;
    CUTLASS_HOST_DEVICE Params() {}
    CUTLASS_HOST_DEVICE explicit Params(bool relu_) : relu(relu_ ? 1 : 0) {}
  };

 private:
  int relu_;

 public:
  CUTLASS_HOST_DEVICE explicit PerChannelAffineOp(Params const& params) : relu_(params.relu) {}

  CUTLASS_HOST_DEVICE bool is_source_needed() const { return false; }

  // Split-K is never used (split_k_slices == 1 always).
  CUTLASS_HOST_DEVICE void set_k_partition(int, int) {}

  // Source-needed overload: never taken (is_source_needed() is false), the
  // source fragment is ignored.
  CUTLASS_DEVICE void operator()(FragmentZ& frag_Z, FragmentT& frag_T,
                                 FragmentAccumulator const& AB, FragmentC const& /*frag_C*/,
                                 FragmentCompute const& V) const {
    (*this)(frag_Z, frag_T, AB, V);
  }

  CUTLASS_DEVICE void operator()(FragmentZ& frag_Z, FragmentT& /*frag_T*/,
                                 FragmentAccumulator const& AB, FragmentCompute const& V) const {
    cutlass::Array<float, kElementsPerAccess> result;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kElementsPerAccess; ++i) {
      // int32 -> fp32 round-to-nearest, then an IEEE multiply and an IEEE
      // add, each rounded (no FMA contraction), exactly as specified.
      float z = __fadd_rn(__fmul_rn(V[i].alpha, __int2float_rn(AB[i])), V[i].bias);
      if (relu_) z = z < 0.f ? 0.f : z;
      result[i] = z;
    }
    cutlass::NumericArrayConverter<ElementZ, float, kElementsPerAccess,
                                   cutlass::FloatRoundStyle::round_to_nearest>
        convert;
    frag_Z = convert(result);
  }
};

// Output vector width (elements per 128-bit access): k must be a multiple.
template <OutType T>
constexpr int kOutAlign = 128 / cutlass::sizeof_bits<typename OutElement<T>::type>::value;

// The same at run time; 0 for an output type the family is not built for.
inline int out_align(OutType t) {
  return with_out_type<Sm80Int4OutTypes>(
      t, [](auto out) { return kOutAlign<decltype(out)::value>; }, [] { return 0; });
}
// k fills whole output vectors of type t (false for an unsupported t).
inline bool whole_out_vectors(int k, OutType t) {
  const int align = out_align(t);
  return align > 0 && k % align == 0;
}

// The AlphaBias workspace is padded to a multiple of this many channels so
// vector loads of the broadcast fragment never leave it.
constexpr int kAlphaBiasPad = 128;

inline size_t alpha_bias_elems(int k) {
  return static_cast<size_t>((k + kAlphaBiasPad - 1) / kAlphaBiasPad) * kAlphaBiasPad;
}

inline cutlass::conv::Conv2dProblemSize to_problem(const ConvShape& s) {
  return cutlass::conv::Conv2dProblemSize(s.n, s.h, s.w, s.c, s.k, s.r, s.s, s.p, s.q, s.pad_h,
                                          s.pad_w, s.stride_h, s.stride_w, s.dil_h, s.dil_w,
                                          cutlass::conv::Mode::kCrossCorrelation,
                                          /*split_k_slices=*/1, /*groups=*/1);
}

// Per-output-type entry points, explicitly instantiated in
// conv_sm80_int4_{f32,f16,bf16}.cu.
template <OutType T>
cutlass::Status can_implement(const ConvShape& shape);

template <OutType T>
KernelStatus run(const ConvShape& shape, const void* act, const void* weight,
                 const AlphaBias* alpha_bias, bool relu, void* out, cudaStream_t stream);

#if defined(Q4CONV_SM80_INT4_DEFINE_KERNELS)

template <OutType T>
struct ConvConfig {
  using ElementOut = typename OutElement<T>::type;
  using EpilogueOp = PerChannelAffineOp<ElementOut, kOutAlign<T>>;

  using Kernel = typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
      cutlass::int4b_t, cutlass::layout::TensorNHWC,  // activations
      cutlass::int4b_t, cutlass::layout::TensorNHWC,  // filters (KRSC)
      ElementOut, cutlass::layout::TensorNHWC,        // output
      int32_t,                                        // accumulator
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<128, 128, 128>,  // threadblock
      cutlass::gemm::GemmShape<64, 64, 128>,    // warp
      cutlass::gemm::GemmShape<16, 8, 64>,      // mma instruction
      EpilogueOp, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>,
      /*Stages=*/3, cutlass::arch::OpMultiplyAddSaturate,
      cutlass::conv::IteratorAlgorithm::kOptimized, cutlass::conv::StrideSupport::kUnity,
      /*AlignmentA=*/32, /*AlignmentB=*/32>::Kernel;

  using Device = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;

  static typename Device::Arguments arguments(const ConvShape& s, const void* act,
                                              const void* weight, const AlphaBias* alpha_bias,
                                              bool relu, void* out) {
    using cutlass::layout::TensorNHWC;
    cutlass::conv::Conv2dProblemSize problem = to_problem(s);
    auto* a = reinterpret_cast<cutlass::int4b_t*>(const_cast<void*>(act));
    auto* b = reinterpret_cast<cutlass::int4b_t*>(const_cast<void*>(weight));
    auto* d = reinterpret_cast<ElementOut*>(out);
    cutlass::TensorRef<cutlass::int4b_t, TensorNHWC> ref_a(
        a, TensorNHWC::packed(cutlass::Tensor4DCoord(s.n, s.h, s.w, s.c)));
    cutlass::TensorRef<cutlass::int4b_t, TensorNHWC> ref_b(
        b, TensorNHWC::packed(cutlass::Tensor4DCoord(s.k, s.r, s.s, s.c)));
    cutlass::TensorRef<ElementOut, TensorNHWC> ref_d(
        d, TensorNHWC::packed(cutlass::Tensor4DCoord(s.n, s.p, s.q, s.k)));
    return typename Device::Arguments(
        problem, ref_a, ref_b, /*ref_C=*/ref_d, ref_d, typename EpilogueOp::Params(relu),
        cutlass::conv::SplitKMode::kSerial,
        /*ptr_Vector=*/const_cast<AlphaBias*>(alpha_bias), /*ptr_Tensor=*/nullptr,
        /*ldr=*/0, /*ldt=*/0);
  }
};

template <OutType T>
cutlass::Status can_implement(const ConvShape& shape) {
  using Config = ConvConfig<T>;
  // Pointers only matter to initialize(); can_implement reads the problem.
  auto args = Config::arguments(shape, nullptr, nullptr, nullptr, false, nullptr);
  return Config::Device::can_implement(args);
}

template <OutType T>
KernelStatus run(const ConvShape& shape, const void* act, const void* weight,
                 const AlphaBias* alpha_bias, bool relu, void* out, cudaStream_t stream) {
  using Config = ConvConfig<T>;
  auto args = Config::arguments(shape, act, weight, alpha_bias, relu, out);
  typename Config::Device op;
  cutlass::Status st = Config::Device::can_implement(args);
  if (st != cutlass::Status::kSuccess) {
    return KernelStatus::failure(std::string("sm80_int4_conv: can_implement: ") +
                                 cutlass::cutlassGetStatusString(st));
  }
  if (Config::Device::get_workspace_size(args) != 0) {
    return KernelStatus::failure("sm80_int4_conv: unexpected CUTLASS workspace requirement");
  }
  st = op.initialize(args, nullptr, stream);
  if (st != cutlass::Status::kSuccess) {
    cudaError_t e = cudaGetLastError();
    return KernelStatus::failure(
        std::string("sm80_int4_conv: initialize: ") + cutlass::cutlassGetStatusString(st) +
        (e != cudaSuccess ? std::string(" (") + cudaGetErrorString(e) + ")" : std::string()));
  }
  st = op.run(stream);
  if (st != cutlass::Status::kSuccess) {
    return KernelStatus::failure(std::string("sm80_int4_conv: run: ") +
                                 cutlass::cutlassGetStatusString(st) + " (kernel launch failed)");
  }
  return KernelStatus::success();
}

#define Q4CONV_SM80_INT4_INSTANTIATE(T)                                                            \
  template cutlass::Status can_implement<T>(const ConvShape&);                                     \
  template KernelStatus run<T>(const ConvShape&, const void*, const void*, const AlphaBias*, bool, \
                               void*, cudaStream_t);

#endif  // Q4CONV_SM80_INT4_DEFINE_KERNELS

}  // namespace sm80_int4_detail
}  // namespace q4conv
