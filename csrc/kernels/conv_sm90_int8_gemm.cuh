// sm90 int8 fprop of 1x1, stride-1, unpadded convolutions as persistent
// GEMMs (CUTLASS GemmUniversal, TMA warp-specialized cooperative or pingpong
// schedule) on the NHWC / KRSC buffers. Configurations: conv_sm90_int8_g*.cu.
// Not in the same translation unit as conv_sm90_int8_implicit.cuh (see there).
#pragma once

// After the common header: CUTLASS's conv and GEMM builders need cute and
// convnd_problem_shape.hpp included before them.
#include "kernels/conv_sm90_int8_common.cuh"

#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

namespace q4conv {
namespace sm90 {

// Consumer warp groups of a persistent GEMM: cooperative (two on one 2*64-row
// tile) or pingpong (one tile each, one's epilogue overlapping the other's
// mainloop).
enum class GemmSchedule { kCooperative, kPingpong };

// A configuration of this family: a struct with these fields (the
// conv_sm90_int8_g*.cu files each define one).
struct GemmConfig {
  static constexpr const char* kName = "";
  static constexpr int kTileM = 128, kTileN = 128, kTileK = 128;  // CTA tile
  static constexpr GemmSchedule kSchedule = GemmSchedule::kPingpong;
  static constexpr int kMinBlocks = 1;  // one CTA per SM (persistent grid)
};

// 1x1, stride-1, unpadded convolutions are plain GEMMs on the NHWC tensors:
// D[n*h*w, k] = A[n*h*w, c] * W[k, c]^T. For those the persistent GEMM
// kernels apply (the conv kernel has no persistent schedule on sm90): two
// consumer warp groups (cooperative: one 2*64-row tile; pingpong: one tile
// each, so one group's epilogue overlaps the other's mainloop), grid sized to
// the SM count.
template <class Config, OutType OT>
struct GemmKernel {
  static constexpr int TM = Config::kTileM, TN = Config::kTileN, TK = Config::kTileK;
  static constexpr bool kCooperative = Config::kSchedule == GemmSchedule::kCooperative;
  // The sm90 GEMM kernels wait for their producer grid before reading global
  // memory when built with CUTLASS_ENABLE_GDC_FOR_SM90 (CMakeLists.txt).
  static constexpr bool kProgrammaticLaunch = true;
  using TileShape = cute::Shape<cute::Int<TM>, cute::Int<TN>, cute::Int<TK>>;
  using Epilogue = EpilogueOf<OT, TileShape>;
  using ElementOut = typename Epilogue::ElementOut;
  using ElementC = typename Epilogue::ElementC;  // the residual (fused output types), or void
  static constexpr int kAlignOut = Epilogue::kAlignOut;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using MainSchedule =
      cute::conditional_t<kCooperative, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                          cutlass::gemm::KernelTmaWarpSpecializedPingpong>;
  using EpiSchedule =
      cute::conditional_t<kCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative,
                          cutlass::epilogue::TmaWarpSpecialized>;
  using Fusion = typename Epilogue::Fusion;
  using EpiTile =
      cute::conditional_t<kCooperative, cutlass::epilogue::collective::EpilogueTileAuto,
                          typename Epilogue::template WarpSpecializedTile<Config::kMinBlocks>>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape, EpiTile,
      int32_t, float, ElementC, cutlass::layout::RowMajor, Epilogue::kAlignC, ElementOut,
      cutlass::layout::RowMajor, kAlignOut, EpiSchedule, Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor, 16,
      int8_t, cutlass::layout::ColumnMajor, 16, int32_t, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainSchedule>::CollectiveOp;

  using OpKernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>,
                                                        CollectiveMainloop, CollectiveEpilogue>;
  using Op = cutlass::gemm::device::GemmUniversalAdapter<OpKernel>;
  using Arguments = typename Op::Arguments;

  static bool basic_ok(const ConvShape& s) {
    if (s.n <= 0 || s.h <= 0 || s.w <= 0 || s.c <= 0 || s.k <= 0) return false;
    if (s.r != 1 || s.s != 1 || s.stride_h != 1 || s.stride_w != 1 || s.pad_h != 0 || s.pad_w != 0)
      return false;
    if (s.p != s.h || s.q != s.w) return false;
    if (s.c % kSm90ChannelAlign != 0 || s.k % kAlignOut != 0) return false;
    long long m = 1LL * s.n * s.h * s.w;
    if (m >= (1LL << 31) || m * s.c >= (1LL << 40) || m * s.k >= (1LL << 40)) return false;
    return true;
  }

  static Arguments make_args(const ConvShape& s, const void* act, const void* wt,
                             const EpilogueArgs* e) {
    int m = s.n * s.h * s.w, n = s.k, k = s.c;
    using StrideA = typename OpKernel::StrideA;
    using StrideB = typename OpKernel::StrideB;
    using StrideD = typename OpKernel::StrideD;
    StrideA sa{};
    cute::get<0>(sa) = static_cast<int64_t>(k);
    StrideB sb{};
    cute::get<0>(sb) = static_cast<int64_t>(k);
    StrideD sd{};
    cute::get<0>(sd) = static_cast<int64_t>(n);
    const cutlass::KernelHardwareInfo hw = current_hw_info();
    Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<const int8_t*>(act), sa, static_cast<const int8_t*>(wt), sb},
        {{}, Epilogue::residual(e), sd, e ? static_cast<ElementOut*>(e->out) : nullptr, sd},
        hw};
    Epilogue::set(args.epilogue.thread, e);
    return args;
  }

  static bool supports(const ConvShape& s) {
    if (!basic_ok(s)) return false;
    Arguments args = make_args(s, nullptr, nullptr, nullptr);
    return Op::can_implement(args) == cutlass::Status::kSuccess;
  }
  static size_t workspace(const ConvShape& s) {
    if (!basic_ok(s)) return 0;
    Arguments args = make_args(s, nullptr, nullptr, nullptr);
    return Op::get_workspace_size(args);
  }
  static bool build_args(const ConvShape& s, const void* act, const void* wt, const EpilogueArgs& e,
                         Arguments& args, std::string&) {
    args = make_args(s, act, wt, &e);
    return true;
  }
  static KernelStatus run(const ConvShape& s, const void* act, const void* wt,
                          const EpilogueArgs& e, void* workspace, cudaStream_t stream) {
    if (!basic_ok(s))
      return KernelStatus::failure("sm90_int8_conv: unsupported shape for the 1x1 GEMM path");
    return cached_run<GemmKernel, Op, OpKernel>(s, act, wt, e, workspace, stream);
  }
  static int smem_bytes() { return static_cast<int>(OpKernel::SharedStorageSize); }
};

}  // namespace sm90
}  // namespace q4conv
