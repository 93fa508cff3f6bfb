// Shared parts of the sm90 int8 kernel families (conv_sm90_int8_implicit.cuh,
// conv_sm90_int8_gemm.cuh, conv_sm90_int8_persistent.cuh): the epilogue EVT,
// the cache of launch parameters, the conv problem and shape limits, the
// device's SM count, and the table entry of a compiled configuration.
// Self-contained; included only by the configuration .cu files (through a
// family header), so no other translation unit sees CUTLASS.
//
// GEMM view of the fprop (CUTLASS 3.x conv):  M = N*P*Q (output pixels),
// N = K (output channels), K = C*R*S (reduction). The epilogue is an EVT:
//   out = max(lower, alpha[k] * float(acc) + bias[k])   (lower = 0 or -inf)
// alpha and bias are per-output-channel = per GEMM column row-broadcasts; a
// null bias pointer makes Sm90RowBroadcast use its null_default 0, and relu /
// no-relu is a runtime LowerBound argument, so one kernel per output type
// covers all four epilogue variants.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.hpp"
#include "cutlass/bfloat16.h"
#include "cutlass/half.h"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/epilogue/thread/activation.h"

#include "kernels/conv_kernels.h"
#include "kernels/conv_sm90_int8.cuh"
#include "kernels/cutlass_types.cuh"

namespace q4conv {
namespace sm90 {

inline const char* status_name(cutlass::Status s) { return cutlassGetStatusString(s); }

// The current device and its SM count (current_sm_count: queried once per
// device), which size the persistent kernels' grid.
inline cutlass::KernelHardwareInfo current_hw_info() {
  cutlass::KernelHardwareInfo hw;
  hw.sm_count = current_sm_count(&hw.device_id);
  return hw;
}

// Host set-up (can_implement, TMA descriptor encoding, smem attribute)
// costs ~10 us, as much as a small layer's kernel: the Params of earlier
// calls are cached, keyed on everything they depend on (geometry, device,
// every pointer, relu). A hit only launches. A network's steady state repeats
// the same pointers call after call (the caching allocator hands out the same
// blocks in the same order), so the cache holds every layer of a network: a
// ring of 16 slots shared by ResNet-50's 53 convolutions missed on every
// call. Self provides build_args(shape, act, wt, epilogue, Arguments&, std::string& why).
struct CacheKey {
  ConvShape s;
  int device, relu;
  int unused;  // makes the 4 bytes before the pointers a member: a key has no padding
  const void *act, *wt, *out, *ws;
  const float *alpha, *bias;
};
static_assert(std::has_unique_object_representations_v<CacheKey>,
              "CacheKey is hashed and compared as bytes: it must have no padding");

// Keys are compared and hashed as bytes (cached_run zeroes a key before
// filling it).
struct CacheKeyHash {
  size_t operator()(const CacheKey& key) const noexcept {
    const auto* bytes = reinterpret_cast<const unsigned char*>(&key);
    uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (size_t i = 0; i < sizeof key; ++i) h = (h ^ bytes[i]) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};
struct CacheKeyEqual {
  bool operator()(const CacheKey& a, const CacheKey& b) const noexcept {
    return std::memcmp(&a, &b, sizeof a) == 0;
  }
};
// Bounds the cache when pointers never repeat (a long run of new shapes or
// batches): past this many entries it starts over.
constexpr size_t kMaxCachedParams = 1024;

template <class Self, class Op, class OpKernel>
KernelStatus cached_run(const ConvShape& s, const void* act, const void* wt, const EpilogueArgs& e,
                        void* workspace, cudaStream_t stream) {
  using Params = typename Op::Params;
  static std::mutex mu;
  static std::unordered_map<CacheKey, Params, CacheKeyHash, CacheKeyEqual> cache;

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
    const auto found = cache.find(key);
    if (found != cache.end()) {
      params = found->second;
      hit = true;
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
      if (cache.size() >= kMaxCachedParams) cache.clear();
      cache.insert_or_assign(key, params);
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

// The table entry's functions of one configuration: Family<Config, OT> is
// the kernel of output type OT, each entry point dispatches to the kernel of
// the run-time output type (Sm90Int8OutTypes, conv_kernels.h).
template <template <class, OutType> class Family, class Config>
struct EntryPoints {
  template <class Tag>
  using K = Family<Config, Tag::value>;

  static bool supports(const ConvShape& s, OutType t) {
    return with_out_type<Sm90Int8OutTypes>(
        t, [&](auto out) { return K<decltype(out)>::supports(s); }, [] { return false; });
  }
  static size_t workspace(const ConvShape& s, OutType t) {
    return with_out_type<Sm90Int8OutTypes>(
        t, [&](auto out) { return K<decltype(out)>::workspace(s); }, [] { return size_t(0); });
  }
  static KernelStatus run(const ConvShape& s, const void* a, const void* w, const EpilogueArgs& e,
                          void* ws, cudaStream_t st) {
    return with_out_type<Sm90Int8OutTypes>(
        e.out_type, [&](auto out) { return K<decltype(out)>::run(s, a, w, e, ws, st); },
        [] { return KernelStatus::failure("sm90_int8_conv: unsupported out_type"); });
  }
  static int smem(OutType t) {
    return with_out_type<Sm90Int8OutTypes>(
        t, [&](auto out) { return K<decltype(out)>::smem_bytes(); }, [] { return 0; });
  }
  static int min_blocks() { return Config::kMinBlocks; }
};

// The table entry of configuration Config of kernel family Family (the .cu
// file of the configuration defines its extern Entry with it).
template <template <class, OutType> class Family, class Config>
constexpr Entry entry_of() {
  using Fns = EntryPoints<Family, Config>;
  return Entry{Config::kName,   Config::kTileM, Config::kTileN, Config::kTileK,  &Fns::supports,
               &Fns::workspace, &Fns::run,      &Fns::smem,     &Fns::min_blocks};
}

}  // namespace sm90
}  // namespace q4conv
