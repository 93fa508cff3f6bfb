// sm90 int8 fprop of filtered convolutions (3x3 ...) on CUTLASS's persistent
// pingpong GEMM kernel with the conv collective's im2col TMA mainloop
// (PersistentConvMainloop). Configurations: conv_sm90_int8_c*.cu.
// Not in the same translation unit as conv_sm90_int8_implicit.cuh (see there).
#pragma once

// After the common header: CUTLASS's conv and GEMM builders need cute and
// convnd_problem_shape.hpp included before them.
#include "kernels/conv_sm90_int8_common.cuh"

#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

namespace q4conv {
namespace sm90 {

// A configuration of this family: a struct with these fields (the
// conv_sm90_int8_c*.cu files each define one).
struct PersistentConvConfig {
  static constexpr const char* kName = "";
  static constexpr int kTileM = 128, kTileN = 128, kTileK = 128;  // CTA tile
  static constexpr int kMinBlocks = 1;  // one CTA per SM (persistent grid)
};

// Convolutions with filters (3x3 ...) on CUTLASS's persistent pingpong GEMM
// kernel, with the conv collective's im2col TMA mainloop: CUTLASS 4.2 builds
// sm90 convs only on the non-persistent, one-consumer kernel (its conv
// dispatch policy static_asserts the persistent schedules out), which leaves
// each CTA's epilogue exposed and tiles in waves. The pingpong kernel takes a
// GEMM problem, so this mainloop adapter
//   - keeps the conv problem in its Arguments (the TMA descriptors are built
//     from it) and gives the kernel the collective's own linearized MNKL
//     shape, the one the non-persistent kernel uses too;
//   - names the pingpong schedule in its DispatchPolicy (GemmUniversal picks
//     the kernel by it) and GEMM-form strides for the kernel's rank checks
//     (the collective's own code keeps using its conv strides);
//   - adds a unit batch mode to the tiled B tensor (the kernel reads the
//     batch extent from its mode 4; the conv collective's tensors have none)
//     and drops it again before the collective's load.
template <class Base>
struct PersistentConvMainloop : Base {
  struct DispatchPolicy : Base::DispatchPolicy {
    using Schedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  };
  // (M, N, K, L) as the collective linearizes it (M = N*P*Q, K = (C, S, R)),
  // with a run-time L as the GEMM epilogue's TMA types expect.
  using LinearShape = decltype(Base::get_problem_shape_MNKL(ConvProblem{}));
  using ProblemShapeMNKL =
      cute::tuple<int, int, cute::remove_cvref_t<decltype(cute::get<2>(LinearShape{}))>, int>;
  static ProblemShapeMNKL problem_shape_mnkl(ConvProblem const& problem) {
    const auto linear = Base::get_problem_shape_MNKL(problem);
    return {int(cute::get<0>(linear)), int(cute::get<1>(linear)), cute::get<2>(linear), 1};
  }
  using StrideA = cute::Stride<int64_t, cute::_1, int64_t>;
  using StrideB = cute::Stride<int64_t, cute::_1, int64_t>;
  static constexpr int NumProducerThreadEvents = 1;
  struct Arguments {
    typename Base::Arguments conv{};
    ConvProblem problem{};
  };
  using Params = typename Base::Params;

  template <class Shape>
  static Params to_underlying_arguments(Shape const&, Arguments const& args, void* workspace) {
    return Base::to_underlying_arguments(args.problem, args.conv, workspace);
  }
  template <class Shape>
  static bool can_implement(Shape const&, Arguments const& args) {
    return Base::can_implement(args.problem, args.conv);
  }

  // B's tiled TMA tensor (BLK_N, BLK_K, n, k) with a unit mode appended.
  template <class T>
  static CUTLASS_DEVICE auto with_unit_mode(T const& t) {
    return cute::make_tensor(
        t.data(),
        cute::append(t.layout(), cute::make_layout(cute::_1{}, cute::stride<2>(t.layout()))));
  }
  template <class T>
  static CUTLASS_DEVICE auto without_unit_mode(T const& t) {
    return cute::make_tensor(t.data(), cute::take<0, 4>(t.layout()));
  }

  template <class ProblemShape>
  CUTLASS_DEVICE auto load_init(ProblemShape const& shape, Params const& params) {
    auto inputs = Base::load_init(shape, params);
    return cute::make_tuple(cute::get<0>(inputs), with_unit_mode(cute::get<1>(inputs)));
  }

  template <class TensorA, class TensorB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, typename Base::MainloopPipeline pipeline,
                           typename Base::PipelineState state,
                           cute::tuple<TensorA, TensorB> const& inputs, BlockCoord const& blk_coord,
                           KTileIterator k_tile_iter, int k_tile_count, int thread_idx,
                           uint32_t block_rank_in_cluster,
                           typename Base::TensorStorage& shared_tensors) {
    Base::load(params, pipeline, state,
               cute::make_tuple(cute::get<0>(inputs), without_unit_mode(cute::get<1>(inputs))),
               blk_coord, k_tile_iter, k_tile_count, thread_idx, block_rank_in_cluster,
               shared_tensors);
  }
};

// The kernel of configuration Config (PersistentConvConfig's fields) for
// output type OT.
template <class Config, OutType OT>
struct PersistentConvKernel {
  static constexpr int TM = Config::kTileM, TN = Config::kTileN, TK = Config::kTileK;
  // The persistent GEMM kernel waits for its producer grid (the activation
  // pass) itself: launched with programmatic dependent launch.
  static constexpr bool kProgrammaticLaunch = true;
  using TileShape = cute::Shape<cute::Int<TM>, cute::Int<TN>, cute::Shape<cute::Int<TK>>>;
  using Epilogue = EpilogueOf<OT, TileShape>;
  using ElementOut = typename Epilogue::ElementOut;
  using ElementC = typename Epilogue::ElementC;  // the residual (fused output types), or void
  static constexpr int kAlignOut = Epilogue::kAlignOut;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using Fusion = typename Epilogue::Fusion;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      typename Epilogue::template WarpSpecializedTile<1>, int32_t, float, ElementC,
      cutlass::layout::RowMajor, Epilogue::kAlignC, ElementOut, cutlass::layout::RowMajor,
      kAlignOut, cutlass::epilogue::TmaWarpSpecialized, Fusion>::CollectiveOp;

  // The pingpong kernel's own storage (pipelines, order barrier, scheduler)
  // besides the epilogue's, carved out before the stages are counted.
  static constexpr int kCarveout =
      static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage)) + 1024;
  using ConvMainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, int8_t,
      cutlass::layout::TensorNHWC, 16, int8_t, cutlass::layout::TensorNHWC, 16, int32_t, TileShape,
      ClusterShape, cutlass::conv::collective::StageCountAutoCarveout<kCarveout>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;
  using CollectiveMainloop = PersistentConvMainloop<ConvMainloop>;
  using ProblemShape = typename CollectiveMainloop::ProblemShapeMNKL;
  using OpKernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Op = cutlass::gemm::device::GemmUniversalAdapter<OpKernel>;
  using Arguments = typename Op::Arguments;
  static_assert(OpKernel::SharedStorageSize <= 232448, "fits the opt-in shared memory");

  static bool basic_ok(const ConvShape& s) {
    // 1x1 stride-1 convolutions have their own GEMM configurations.
    return conv_basic_ok(s, kAlignOut) && !is_pointwise_gemm(s);
  }

  static bool make_args(const ConvShape& s, const void* act, const void* wt, const EpilogueArgs* e,
                        Arguments& args) {
    ConvProblem problem;
    if (!make_conv_problem(s, problem)) return false;
    using StrideD = typename OpKernel::StrideD;
    StrideD sd{};
    cute::get<0>(sd) = static_cast<int64_t>(s.k);
    const cutlass::KernelHardwareInfo hw = current_hw_info();
    typename CollectiveMainloop::Arguments mainloop;
    mainloop.conv = {static_cast<const int8_t*>(act), static_cast<const int8_t*>(wt)};
    mainloop.problem = problem;
    args = Arguments{
        cutlass::gemm::GemmUniversalMode::kGemm,
        CollectiveMainloop::problem_shape_mnkl(problem),
        mainloop,
        {{}, Epilogue::residual(e), sd, e ? static_cast<ElementOut*>(e->out) : nullptr, sd},
        hw};
    Epilogue::set(args.epilogue.thread, e);
    return true;
  }

  static bool supports(const ConvShape& s) {
    Arguments args;
    if (!basic_ok(s) || !make_args(s, nullptr, nullptr, nullptr, args)) return false;
    return Op::can_implement(args) == cutlass::Status::kSuccess;
  }
  static size_t workspace(const ConvShape& s) {
    Arguments args;
    if (!basic_ok(s) || !make_args(s, nullptr, nullptr, nullptr, args)) return 0;
    return Op::get_workspace_size(args);
  }
  static bool build_args(const ConvShape& s, const void* act, const void* wt, const EpilogueArgs& e,
                         Arguments& args, std::string& why) {
    if (make_args(s, act, wt, &e, args)) return true;
    why = "p/q do not match the padding";
    return false;
  }
  static KernelStatus run(const ConvShape& s, const void* act, const void* wt,
                          const EpilogueArgs& e, void* workspace, cudaStream_t stream) {
    if (!basic_ok(s))
      return KernelStatus::failure("sm90_int8_conv: unsupported shape for the persistent conv");
    return cached_run<PersistentConvKernel, Op, OpKernel>(s, act, wt, e, workspace, stream);
  }
  static int smem_bytes() { return static_cast<int>(OpKernel::SharedStorageSize); }
};

}  // namespace sm90
}  // namespace q4conv
