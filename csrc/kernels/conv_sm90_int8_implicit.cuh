// sm90 int8 fprop on CUTLASS's implicit-GEMM conv kernel
// (ConvUniversal, KernelImplicitTmaWarpSpecializedSm90): one producer warp
// group loads im2col tiles by TMA, one consumer warp group runs wgmma and the
// epilogue; not persistent (tiles run in waves). Configurations:
// conv_sm90_int8_t*.cu.
//
// Keep the GEMM kernel headers (cutlass/gemm/kernel/gemm_universal.hpp,
// conv_sm90_int8_gemm.cuh, conv_sm90_int8_persistent.cuh) out of a
// translation unit that instantiates this family: with them visible the conv
// kernel's GemmUniversal specialization becomes ambiguous. Hence one family
// per configuration file.
#pragma once

// After the common header: CUTLASS's conv and GEMM builders need cute and
// convnd_problem_shape.hpp included before them.
#include "kernels/conv_sm90_int8_common.cuh"

#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"

namespace q4conv {
namespace sm90 {

// A configuration of this family: a struct with these fields (the
// conv_sm90_int8_t*.cu files each define one).
struct ImplicitConvConfig {
  static constexpr const char* kName = "";                        // as the table and plans show it
  static constexpr int kTileM = 128, kTileN = 128, kTileK = 128;  // CTA tile
  static constexpr int kClusterM = 1;                             // CTAs of a cluster along M
  static constexpr int kMinBlocks = 1;  // CTAs per SM the kernel is built for
  static constexpr int kStages = 0;     // pipeline stages; 0: as many as fit
  static constexpr int kEpilogueN = 0;  // epilogue subtile 64 x kEpilogueN; 0: CUTLASS's (64 x 32)
};

// Kernel wrapper that only changes the launch bounds' min-blocks, so that a
// small tile can run two CTAs per SM (the compiler then keeps <= 128
// registers per thread). Everything else is inherited.
template <class Base, int MinBlocks>
struct MinBlocksKernel : Base {
  static constexpr uint32_t MinBlocksPerMultiprocessor = MinBlocks;
};

// The kernel of configuration Config (ImplicitConvConfig's fields) for
// output type OT.
template <class Config, OutType OT>
struct ImplicitConvKernel {
  static constexpr int TM = Config::kTileM, TN = Config::kTileN, TK = Config::kTileK;
  static constexpr int CM = Config::kClusterM, MinBlocks = Config::kMinBlocks;
  static constexpr int Stages = Config::kStages, EpiN = Config::kEpilogueN;
  // Launched normally. (CUTLASS's sm90 conv kernel is its
  // KernelTmaWarpSpecialized GEMM underneath and does wait for its producer
  // grid when built with CUTLASS_ENABLE_GDC_FOR_SM90, but launching it with
  // programmatic dependent launch measured no gain, -0.9..+0.7 us per 3x3
  // layer on H100; its adapter has no such launch option either.)
  static constexpr bool kProgrammaticLaunch = false;

  using TileShape = cute::Shape<cute::Int<TM>, cute::Int<TN>, cute::Shape<cute::Int<TK>>>;
  using Epilogue = EpilogueOf<OT, TileShape>;
  using ElementOut = typename Epilogue::ElementOut;
  using ElementC = typename Epilogue::ElementC;  // the residual (fused output types), or void
  static constexpr int kAlignOut = Epilogue::kAlignOut;
  using ClusterShape = cute::Shape<cute::Int<CM>, cute::_1, cute::_1>;
  using EpiTile = typename Epilogue::template WarpSpecializedTile<
      MinBlocks, cute::conditional_t<EpiN == 0, cutlass::epilogue::collective::EpilogueTileAuto,
                                     cute::Shape<cute::Int<(TM < 64 ? TM : 64)>,
                                                 cute::Int<(EpiN > 0 ? EpiN : 32)>>>>;
  using Fusion = typename Epilogue::Fusion;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape, EpiTile,
      int32_t, float, ElementC, cutlass::layout::TensorNHWC, Epilogue::kAlignC, ElementOut,
      cutlass::layout::TensorNHWC, kAlignOut, cutlass::epilogue::TmaWarpSpecialized,
      Fusion>::CollectiveOp;

  static constexpr int kEpiSmem =
      static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage));
  // With MinBlocks CTAs per SM each CTA gets 1/MinBlocks of the 227 KiB
  // (less 1 KiB reserved per extra CTA): carve the rest out as well.
  static constexpr int kSmemCap = 232448;
  static constexpr int kCarveout =
      kEpiSmem + (MinBlocks > 1 ? kSmemCap - kSmemCap / MinBlocks + 2048 : 0);
  using StageCountType =
      cute::conditional_t<Stages == 0, cutlass::conv::collective::StageCountAutoCarveout<kCarveout>,
                          cutlass::conv::collective::StageCount<(Stages > 0 ? Stages : 1)>>;

  using CollectiveMainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, int8_t,
      cutlass::layout::TensorNHWC, 16, int8_t, cutlass::layout::TensorNHWC, 16, int32_t, TileShape,
      ClusterShape, StageCountType,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;

  using ProblemShape = ConvProblem;
  using BaseKernel =
      cutlass::conv::kernel::ConvUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using ConvKernel =
      cute::conditional_t<MinBlocks == 1, BaseKernel, MinBlocksKernel<BaseKernel, MinBlocks>>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<ConvKernel>;
  using Arguments = typename Conv::Arguments;
  using StrideD = typename ConvKernel::StrideD;

  static bool make_problem(const ConvShape& s, ProblemShape& out) {
    return make_conv_problem(s, out);
  }

  static Arguments make_args(const ProblemShape& ps, const ConvShape& s, const void* act,
                             const void* wt, const EpilogueArgs* e) {
    StrideD dD{};
    // M mode of the output is (Q, P, N): NHWC strides k, q*k, p*q*k
    cute::get<0, 0>(dD) = static_cast<int64_t>(s.k);
    cute::get<0, 1>(dD) = static_cast<int64_t>(s.q) * s.k;
    cute::get<0, 2>(dD) = static_cast<int64_t>(s.p) * s.q * s.k;
    Arguments args{
        ps,
        {static_cast<const int8_t*>(act), static_cast<const int8_t*>(wt)},
        {{}, Epilogue::residual(e), dD, e ? static_cast<ElementOut*>(e->out) : nullptr, dD}};
    Epilogue::set(args.epilogue.thread, e);
    return args;
  }

  static bool basic_ok(const ConvShape& s) { return conv_basic_ok(s, kAlignOut); }

  static bool supports(const ConvShape& s) {
    if (!basic_ok(s)) return false;
    ProblemShape ps;
    if (!make_problem(s, ps)) return false;
    Arguments args = make_args(ps, s, nullptr, nullptr, nullptr);
    return Conv::can_implement(args) == cutlass::Status::kSuccess;
  }

  static size_t workspace(const ConvShape& s) {
    ProblemShape ps;
    if (!basic_ok(s) || !make_problem(s, ps)) return 0;
    Arguments args = make_args(ps, s, nullptr, nullptr, nullptr);
    return Conv::get_workspace_size(args);
  }

  // Arguments for a real call (false + message when the geometry is off).
  static bool build_args(const ConvShape& s, const void* act, const void* wt, const EpilogueArgs& e,
                         Arguments& args, std::string& why) {
    ProblemShape ps;
    if (!make_problem(s, ps)) {
      why = "p/q do not match the padding";
      return false;
    }
    args = make_args(ps, s, act, wt, &e);
    return true;
  }

  static KernelStatus run(const ConvShape& s, const void* act, const void* wt,
                          const EpilogueArgs& e, void* workspace, cudaStream_t stream) {
    if (!basic_ok(s)) return KernelStatus::failure("sm90_int8_conv: unsupported shape");
    return cached_run<ImplicitConvKernel, Conv, ConvKernel>(s, act, wt, e, workspace, stream);
  }

  static int smem_bytes() { return static_cast<int>(ConvKernel::SharedStorageSize); }
};

}  // namespace sm90
}  // namespace q4conv
