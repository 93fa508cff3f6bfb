// Internal header of the sm90 (Hopper, wgmma) int8 implicit-GEMM fprop.
//
// Included by every csrc/kernels/conv_sm90_int8*.cu file and by the
// standalone harness tests/cuda/sm90_int8_check.cu. Without
// Q4CONV_SM90_IMPL it only declares the per-configuration entry table; with it
// (the config .cu files) it also pulls in CUTLASS and defines the template
// that builds one kernel per (tile config, output type).
//
// GEMM view of the fprop (CUTLASS 3.x conv):  M = N*P*Q (output pixels),
// N = K (output channels), K = C*R*S (reduction). The epilogue is an EVT:
//   out = max(lower, alpha[k] * float(acc) + bias[k])   (lower = 0 or -inf)
// alpha and bias are per-output-channel = per GEMM column row-broadcasts; a
// null bias pointer makes Sm90RowBroadcast use its null_default 0, and relu /
// no-relu is a runtime LowerBound argument, so one kernel per output type
// covers all four epilogue variants.
#pragma once

#include "kernels/conv_kernels.h"

namespace q4conv {
namespace sm90 {

// One compiled tile configuration (all three output types).
struct Entry {
  const char* name;
  int tile_m, tile_n, tile_k;
  bool (*supports)(const ConvShape&, OutType);
  size_t (*workspace)(const ConvShape&, OutType);
  KernelStatus (*run)(const ConvShape&, const void*, const void*, const EpilogueArgs&, void*,
                      cudaStream_t);
  int (*smem_bytes)(OutType);  // dynamic shared memory per CTA
  int (*min_blocks)();         // CTAs per SM the kernel is built for
};

// Configurations, defined one per .cu file conv_sm90_int8_t<M>x<N>x<K>[e<E>].cu
// (compiled in parallel). "/2cta": built for two CTAs per SM; "e<E>":
// epilogue subtile 64 x E instead of CUTLASS's 64 x 32.
extern const Entry kCfg128x128x128;
extern const Entry kCfg128x128x128_e128;
extern const Entry kCfg128x64x128_2cta;
extern const Entry kCfg128x64x64_2cta_e64;
extern const Entry kCfg64x128x128_2cta;
extern const Entry kCfg64x128x64_2cta;
extern const Entry kCfg128x64x32_2cta_e64;
// 1x1 stride-1 convolutions as persistent GEMMs (conv_sm90_int8_g*.cu)
extern const Entry kGemm256x128x128_coop;
extern const Entry kGemm128x128x128_pp;
// Filtered convolutions on the persistent pingpong kernel (conv_sm90_int8_c*.cu)
extern const Entry kConv128x128x128_pp;

// Table and choice (conv_sm90_int8.cu).
int num_configs();
const Entry& config(int i);
// Index of the configuration sm90_int8_conv uses for this shape, or -1.
int pick_config(const ConvShape& shape, OutType out_type);

}  // namespace sm90
}  // namespace q4conv

#ifdef Q4CONV_SM90_IMPL

#include <cmath>
#include <cstring>
#include <atomic>
#include <mutex>
#include <string>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.hpp"
#include "cutlass/bfloat16.h"
#include "cutlass/half.h"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/epilogue/thread/activation.h"
#ifdef Q4CONV_SM90_GEMM
// Only in the GEMM configuration files: with these headers visible the conv
// kernel's GemmUniversal specialization becomes ambiguous.
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#endif

#include "kernels/cutlass_types.cuh"

namespace q4conv {
namespace sm90 {

inline const char* status_name(cutlass::Status s) { return cutlassGetStatusString(s); }

// Kernel wrapper that only changes the launch bounds' min-blocks, so that a
// small tile can run two CTAs per SM (the compiler then keeps <= 128
// registers per thread). Everything else is inherited.
template <class Base, int MinBlocks>
struct MinBlocksKernel : Base {
  static constexpr uint32_t MinBlocksPerMultiprocessor = MinBlocks;
};

// Host set-up (can_implement, TMA descriptor encoding, smem attribute)
// costs ~10 us, as much as a small layer's kernel: the Params of recent
// calls are cached, keyed on everything they depend on (geometry, device,
// every pointer, relu). A hit only launches. Self provides
// build_args(shape, act, wt, epilogue, Arguments&, std::string& why).
struct CacheKey {
  ConvShape s;
  int device, relu;
  const void *act, *wt, *out, *ws;
  const float *alpha, *bias;
};

template <class Self, class Op, class OpKernel>
KernelStatus cached_run(const ConvShape& s, const void* act, const void* wt, const EpilogueArgs& e,
                        void* workspace, cudaStream_t stream) {
  using Params = typename Op::Params;
  struct Slot {
    bool used = false;
    CacheKey key;
    Params params;
  };
  constexpr int kSlots = 16;
  static std::mutex mu;
  static Slot slots[kSlots];
  static int next = 0;

  if (!e.alpha || !e.out || !act || !wt)
    return KernelStatus::failure("sm90_int8_conv: null pointer argument");
  CacheKey key;
  std::memset(&key, 0, sizeof key);
  key.s = s;
  cudaError_t ce = cudaGetDevice(&key.device);
  if (ce != cudaSuccess)
    return KernelStatus::failure(std::string("sm90_int8_conv: cudaGetDevice: ") +
                                 cudaGetErrorString(ce));
  key.relu = e.relu ? 1 : 0;
  key.act = act;
  key.wt = wt;
  key.out = e.out;
  key.ws = workspace;
  key.alpha = e.alpha;
  key.bias = e.bias;

  Params params;
  bool hit = false;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (int i = 0; i < kSlots; ++i)
      if (slots[i].used && std::memcmp(&slots[i].key, &key, sizeof key) == 0) {
        params = slots[i].params;
        hit = true;
        break;
      }
  }
  if (!hit) {
    typename Op::Arguments args;
    std::string why;
    if (!Self::build_args(s, act, wt, e, args, why))
      return KernelStatus::failure("sm90_int8_conv: " + why);
    cutlass::Status st = Op::can_implement(args);
    if (st != cutlass::Status::kSuccess)
      return KernelStatus::failure(std::string("sm90_int8_conv: can_implement: ") +
                                   status_name(st));
    size_t need = Op::get_workspace_size(args);
    if (need > 0 && workspace == nullptr)
      return KernelStatus::failure("sm90_int8_conv: workspace required but null");
    st = OpKernel::initialize_workspace(args, workspace, stream);
    if (st != cutlass::Status::kSuccess)
      return KernelStatus::failure(std::string("sm90_int8_conv: initialize_workspace: ") +
                                   status_name(st));
    params = OpKernel::to_underlying_arguments(args, workspace);
    // Raised once per device (a cache miss happens whenever a pointer
    // changes, e.g. every training step).
    static std::atomic<int> smem_raised[kMaxDevices];
    const int smem = OpKernel::SharedStorageSize;
    if (smem >= (48 << 10)) {
      ce = raise_smem_limit(reinterpret_cast<const void*>(cutlass::device_kernel<OpKernel>), smem,
                            false, smem_raised);
      if (ce != cudaSuccess) {
        cudaGetLastError();
        return KernelStatus::failure(std::string("sm90_int8_conv: cudaFuncSetAttribute(smem=") +
                                     std::to_string(smem) + "): " + cudaGetErrorString(ce));
      }
    }
    if (need == 0) {  // a workspace would need initialize_workspace on every call
      std::lock_guard<std::mutex> lock(mu);
      int i = next;
      next = (i + 1) % kSlots;
      slots[i].used = true;
      std::memcpy(&slots[i].key, &key, sizeof key);  // padding bytes too
      slots[i].params = params;
    }
  }
  // Self::kProgrammaticLaunch: launched with programmatic dependent launch,
  // so its CTAs start (prologue, barrier and TMA descriptor setup) while the
  // activation pass before it drains; the kernel waits for the pass's
  // results itself (griddepcontrol.wait, CUTLASS_ENABLE_GDC_FOR_SM90).
  cutlass::Status st;
  if constexpr (Self::kProgrammaticLaunch)
    st = Op::run(params, stream, nullptr, /*launch_with_pdl=*/true);
  else
    st = Op::run(params, stream);
  ce = cudaGetLastError();
  if (st != cutlass::Status::kSuccess)
    return KernelStatus::failure(
        std::string("sm90_int8_conv: run: ") + status_name(st) +
        (ce != cudaSuccess ? std::string(" / ") + cudaGetErrorString(ce) : ""));
  if (ce != cudaSuccess)
    return KernelStatus::failure(std::string("sm90_int8_conv: launch: ") + cudaGetErrorString(ce));
  return KernelStatus::success();
}

// Epilogue EVT, shared by the conv and GEMM kernels:
//   out = LowerBound(alpha[col] * acc + bias[col], lower)
template <class TileShape, class ElementOut>
struct EpilogueFusion {
  static constexpr auto RN = cutlass::FloatRoundStyle::round_to_nearest;
  using BcastStride = cute::Stride<cute::_0, cute::_1, int64_t>;
  using Alpha =
      cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, BcastStride, 4>;
  using Bias =
      cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, BcastStride, 4>;
  using Fma = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, float, float, RN>,
      Alpha, cutlass::epilogue::fusion::Sm90AccFetch, Bias>;
  using type = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::epilogue::thread::LowerBound, ElementOut,
                                             float, RN>,
      Fma>;

  template <class ThreadArgs>
  static void set(ThreadArgs& t, const EpilogueArgs* e) {
    float lower = (e && e->relu) ? 0.0f : -INFINITY;
    // { { alpha, acc, bias, fma }, lower_bound }
    t = {{{e ? e->alpha : nullptr, 1.0f, {}}, {}, {e ? e->bias : nullptr, 0.0f, {}}, {}}, {lower}};
  }
};

using ConvProblem = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, 2>;

// The CUTLASS problem of a ConvShape; false when the geometry does not map
// (the caller's p/q must equal what symmetric padding gives).
inline bool make_conv_problem(const ConvShape& s, ConvProblem& out) {
  int eff_r = (s.r - 1) * s.dil_h + 1, eff_s = (s.s - 1) * s.dil_w + 1;
  if (s.stride_h <= 0 || s.stride_w <= 0 || s.dil_h <= 0 || s.dil_w <= 0) return false;
  // upper padding: the least that still yields the caller's p, q
  int up_h = (s.p - 1) * s.stride_h + eff_r - s.h - s.pad_h;
  int up_w = (s.q - 1) * s.stride_w + eff_s - s.w - s.pad_w;
  if (up_h < 0) up_h = 0;
  if (up_w < 0) up_w = 0;
  if ((s.h + s.pad_h + up_h - eff_r) / s.stride_h + 1 != s.p) return false;
  if ((s.w + s.pad_w + up_w - eff_s) / s.stride_w + 1 != s.q) return false;
  out = ConvProblem(cutlass::conv::Mode::kCrossCorrelation, {s.n, s.h, s.w, s.c},
                    {s.k, s.r, s.s, s.c}, {s.pad_h, s.pad_w}, {up_h, up_w},
                    {s.stride_h, s.stride_w}, {s.dil_h, s.dil_w}, 1);
  return true;
}

// Shape limits every conv configuration shares: positive extents, 16-channel
// codes, 16-byte output rows (TMA store of D), 32-bit problem and TMA indices.
inline bool conv_basic_ok(const ConvShape& s, int align_out) {
  if (s.n <= 0 || s.h <= 0 || s.w <= 0 || s.c <= 0 || s.k <= 0 || s.r <= 0 || s.s <= 0 ||
      s.p <= 0 || s.q <= 0)
    return false;
  if (s.c % kSm90ChannelAlign != 0) return false;
  if (s.k % align_out != 0) return false;
  long long act = 1LL * s.n * s.h * s.w * s.c, out = 1LL * s.n * s.p * s.q * s.k;
  long long flt = 1LL * s.k * s.r * s.s * s.c;
  if (act >= (1LL << 31) || out >= (1LL << 31) || flt >= (1LL << 31)) return false;
  if (1LL * s.n * s.p * s.q >= (1LL << 31)) return false;
  return true;
}

// TM x TN x TK tile, cluster CM x 1, MinBlocks CTAs per SM, Stages pipeline
// stages (0 = as many as fit once the epilogue is carved out), epilogue
// subtile 64 x EpiN (0 = CUTLASS's choice, 64x32 for this schedule).
template <int TM, int TN, int TK, int CM, int MinBlocks, int Stages, int EpiN, OutType OT>
struct Kernel {
  // Launched normally. (CUTLASS's sm90 conv kernel is its
  // KernelTmaWarpSpecialized GEMM underneath and does wait for its producer
  // grid when built with CUTLASS_ENABLE_GDC_FOR_SM90, but launching it with
  // programmatic dependent launch measured -0.9..+0.7 us per 3x3 layer on
  // H100, NOTES.md session 4; its adapter has no such launch option either.)
  static constexpr bool kProgrammaticLaunch = false;
  using ElementOut = typename OutElement<OT>::type;
  static constexpr int kAlignOut = 128 / cutlass::sizeof_bits<ElementOut>::value;

  using TileShape = cute::Shape<cute::Int<TM>, cute::Int<TN>, cute::Shape<cute::Int<TK>>>;
  using ClusterShape = cute::Shape<cute::Int<CM>, cute::_1, cute::_1>;
  using EpiTile = cute::conditional_t<
      EpiN == 0, cutlass::epilogue::collective::EpilogueTileAuto,
      cute::Shape<cute::Int<(TM < 64 ? TM : 64)>, cute::Int<(EpiN > 0 ? EpiN : 32)>>>;
  using Fusion = typename EpilogueFusion<TileShape, ElementOut>::type;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape, EpiTile,
      int32_t, float, void, cutlass::layout::TensorNHWC, kAlignOut, ElementOut,
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
    Arguments args{ps,
                   {static_cast<const int8_t*>(act), static_cast<const int8_t*>(wt)},
                   {{}, nullptr, dD, e ? static_cast<ElementOut*>(e->out) : nullptr, dD}};
    EpilogueFusion<TileShape, ElementOut>::set(args.epilogue.thread, e);
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
    return cached_run<Kernel, Conv, ConvKernel>(s, act, wt, e, workspace, stream);
  }

  static int smem_bytes() { return static_cast<int>(ConvKernel::SharedStorageSize); }
};

// Defines the table entry VAR of one compiled configuration whose per-type
// entry points are the struct FNS (the variadic part: it has commas).
#define Q4CONV_SM90_DEFINE_ENTRY(VAR, NAME, TM, TN, TK, ...) \
  namespace q4conv {                                         \
  namespace sm90 {                                           \
  using VAR##_fns = __VA_ARGS__;                             \
  const Entry VAR = {NAME,                                   \
                     TM,                                     \
                     TN,                                     \
                     TK,                                     \
                     &VAR##_fns::supports,                   \
                     &VAR##_fns::workspace,                  \
                     &VAR##_fns::run,                        \
                     &VAR##_fns::smem,                       \
                     &VAR##_fns::min_blocks};                \
  }                                                          \
  }

// Per-configuration entry points dispatching on the output type; KernelSet
// provides `template <OutType> using K` (the kernel of one output type).
template <class KernelSet, int MinBlocks>
struct OutTypeDispatch {
  template <OutType OT>
  using K = typename KernelSet::template K<OT>;

  static bool supports(const ConvShape& s, OutType t) {
    switch (t) {
      case OutType::kFloat32:
        return K<OutType::kFloat32>::supports(s);
      case OutType::kFloat16:
        return K<OutType::kFloat16>::supports(s);
      case OutType::kBFloat16:
        return K<OutType::kBFloat16>::supports(s);
    }
    return false;
  }
  static size_t workspace(const ConvShape& s, OutType t) {
    switch (t) {
      case OutType::kFloat32:
        return K<OutType::kFloat32>::workspace(s);
      case OutType::kFloat16:
        return K<OutType::kFloat16>::workspace(s);
      case OutType::kBFloat16:
        return K<OutType::kBFloat16>::workspace(s);
    }
    return 0;
  }
  static KernelStatus run(const ConvShape& s, const void* a, const void* w, const EpilogueArgs& e,
                          void* ws, cudaStream_t st) {
    switch (e.out_type) {
      case OutType::kFloat32:
        return K<OutType::kFloat32>::run(s, a, w, e, ws, st);
      case OutType::kFloat16:
        return K<OutType::kFloat16>::run(s, a, w, e, ws, st);
      case OutType::kBFloat16:
        return K<OutType::kBFloat16>::run(s, a, w, e, ws, st);
    }
    return KernelStatus::failure("sm90_int8_conv: bad out_type");
  }
  static int smem(OutType t) {
    switch (t) {
      case OutType::kFloat32:
        return K<OutType::kFloat32>::smem_bytes();
      case OutType::kFloat16:
        return K<OutType::kFloat16>::smem_bytes();
      case OutType::kBFloat16:
        return K<OutType::kBFloat16>::smem_bytes();
    }
    return 0;
  }
  static int min_blocks() { return MinBlocks; }
};

#ifdef Q4CONV_SM90_GEMM
// The current device and its SM count (queried once per device), which size
// the persistent kernels' grid.
inline cutlass::KernelHardwareInfo current_hw_info() {
  static int cached[64] = {0};
  cutlass::KernelHardwareInfo hw;
  int device = 0;
  cudaGetDevice(&device);
  hw.device_id = device;
  if (device < 0 || device >= 64) {
    hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  } else {
    if (cached[device] == 0)
      cached[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
    hw.sm_count = cached[device];
  }
  return hw;
}

// 1x1, stride-1, unpadded convolutions are plain GEMMs on the NHWC tensors:
// D[n*h*w, k] = A[n*h*w, c] * W[k, c]^T. For those the persistent GEMM
// kernels apply (the conv kernel has no persistent schedule on sm90): two
// consumer warp groups (cooperative: one 2*64-row tile; pingpong: one tile
// each, so one group's epilogue overlaps the other's mainloop), grid sized to
// the SM count. Schedule: 0 = cooperative, 1 = pingpong.
template <int TM, int TN, int TK, int Schedule, OutType OT>
struct GemmKernel {
  // The sm90 GEMM kernels wait for their producer grid before reading global
  // memory when built with CUTLASS_ENABLE_GDC_FOR_SM90 (CMakeLists.txt).
  static constexpr bool kProgrammaticLaunch = true;
  using ElementOut = typename OutElement<OT>::type;
  static constexpr int kAlignOut = 128 / cutlass::sizeof_bits<ElementOut>::value;
  using TileShape = cute::Shape<cute::Int<TM>, cute::Int<TN>, cute::Int<TK>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using MainSchedule =
      cute::conditional_t<Schedule == 0, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                          cutlass::gemm::KernelTmaWarpSpecializedPingpong>;
  using EpiSchedule =
      cute::conditional_t<Schedule == 0, cutlass::epilogue::TmaWarpSpecializedCooperative,
                          cutlass::epilogue::TmaWarpSpecialized>;
  using Fusion = typename EpilogueFusion<TileShape, ElementOut>::type;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void,
      cutlass::layout::RowMajor, kAlignOut, ElementOut, cutlass::layout::RowMajor, kAlignOut,
      EpiSchedule, Fusion>::CollectiveOp;

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
    Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                   {m, n, k, 1},
                   {static_cast<const int8_t*>(act), sa, static_cast<const int8_t*>(wt), sb},
                   {{}, nullptr, sd, e ? static_cast<ElementOut*>(e->out) : nullptr, sd},
                   hw};
    EpilogueFusion<TileShape, ElementOut>::set(args.epilogue.thread, e);
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

template <int TM, int TN, int TK, int Schedule>
struct GemmKernels {
  template <OutType OT>
  using K = GemmKernel<TM, TN, TK, Schedule, OT>;
};
template <int TM, int TN, int TK, int Schedule>
using GemmConfigFns = OutTypeDispatch<GemmKernels<TM, TN, TK, Schedule>, 1>;

#define Q4CONV_SM90_DEFINE_GEMM_CONFIG(VAR, NAME, TM, TN, TK, SCHED) \
  Q4CONV_SM90_DEFINE_ENTRY(VAR, NAME, TM, TN, TK, GemmConfigFns<TM, TN, TK, SCHED>)

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

template <int TM, int TN, int TK, OutType OT>
struct PersistentConvKernel {
  // The persistent GEMM kernel waits for its producer grid (the activation
  // pass) itself: launched with programmatic dependent launch.
  static constexpr bool kProgrammaticLaunch = true;
  using ElementOut = typename OutElement<OT>::type;
  static constexpr int kAlignOut = 128 / cutlass::sizeof_bits<ElementOut>::value;
  using TileShape = cute::Shape<cute::Int<TM>, cute::Int<TN>, cute::Shape<cute::Int<TK>>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using Fusion = typename EpilogueFusion<TileShape, ElementOut>::type;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void,
      cutlass::layout::RowMajor, kAlignOut, ElementOut, cutlass::layout::RowMajor, kAlignOut,
      cutlass::epilogue::TmaWarpSpecialized, Fusion>::CollectiveOp;

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
    args = Arguments{cutlass::gemm::GemmUniversalMode::kGemm,
                     CollectiveMainloop::problem_shape_mnkl(problem),
                     mainloop,
                     {{}, nullptr, sd, e ? static_cast<ElementOut*>(e->out) : nullptr, sd},
                     hw};
    EpilogueFusion<TileShape, ElementOut>::set(args.epilogue.thread, e);
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

template <int TM, int TN, int TK>
struct PersistentConvKernels {
  template <OutType OT>
  using K = PersistentConvKernel<TM, TN, TK, OT>;
};
#define Q4CONV_SM90_DEFINE_PERSISTENT_CONV_CONFIG(VAR, NAME, TM, TN, TK) \
  Q4CONV_SM90_DEFINE_ENTRY(VAR, NAME, TM, TN, TK,                        \
                           OutTypeDispatch<PersistentConvKernels<TM, TN, TK>, 1>)

#endif  // Q4CONV_SM90_GEMM

template <int TM, int TN, int TK, int CM, int MinBlocks, int Stages, int EpiN>
struct ConvKernels {
  template <OutType OT>
  using K = Kernel<TM, TN, TK, CM, MinBlocks, Stages, EpiN, OT>;
};
template <int TM, int TN, int TK, int CM, int MinBlocks, int Stages, int EpiN>
using ConfigFns = OutTypeDispatch<ConvKernels<TM, TN, TK, CM, MinBlocks, Stages, EpiN>, MinBlocks>;

#define Q4CONV_SM90_DEFINE_CONFIG(VAR, NAME, TM, TN, TK, CM, MINB, STAGES, EPIN) \
  Q4CONV_SM90_DEFINE_ENTRY(VAR, NAME, TM, TN, TK, ConfigFns<TM, TN, TK, CM, MINB, STAGES, EPIN>)

}  // namespace sm90
}  // namespace q4conv

#endif  // Q4CONV_SM90_IMPL
