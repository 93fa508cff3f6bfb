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
#include "../quant.h"

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
  int out_bits, out_eps_bits;  // the fused codes epilogue's width and eps (as bits)
  int unused;  // makes the 4 bytes before the pointers a member: a key has no padding
  const void *act, *wt, *out, *ws, *residual;
  const float *alpha, *bias, *out_bias, *out_scale;
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
  if (e.out_type == OutType::kFusedCodes8 && (!e.out_bias || !e.out_scale))
    return KernelStatus::failure("sm90_int8_conv: codes out needs out_bias and out_scale");
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
  if (is_fused_out_type(e.out_type)) {
    key.residual = e.residual;
    key.out_bias = e.out_bias;
    key.out_scale = e.out_scale;
    key.out_bits = e.out_bits;
    std::memcpy(&key.out_eps_bits, &e.out_eps, sizeof key.out_eps_bits);
  }

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

// conv_fused's exact epilogue (conv_epilogue.cpp is the reference, bit for bit):
//   v    = fp32(alpha[col] * acc) + shift[col]    two roundings: __fmul_rn is never
//                                                 contracted with the add into an FMA
//   v    = beta * residual + v                    beta = 1 with a residual, else 0: CUTLASS
//                                                 then skips the residual's load (its
//                                                 SrcFetch specialization); fma(1, r, v) = r + v
//   v    = ReLU(v), NaN kept (as at::relu)
//   out  = fp16(v), or the consumer's codes quantize_value(v + out_bias[col],
//          max(out_scale, out_eps)) (quant.h)
template <class T>
struct MulRn {
  template <int N>
  CUTLASS_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& a,
                                                     cutlass::Array<float, N> const& b) const {
    cutlass::Array<float, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = __fmul_rn(a[i], b[i]);
    return out;
  }
};

// ReLU that keeps NaN (x < 0 is false for NaN), as at::relu.
CUTLASS_DEVICE float relu_keep_nan(float x) { return x < 0.0f ? 0.0f : x; }

// Arguments of the last epilogue node: one type for every instantiation
// (CUTLASS reads them from Fn<float> and passes them to Fn<Array<float, N>>).
struct ReluArgs {
  int relu = 0;
};
struct ReluCodesArgs {
  int relu = 0;
  int bits = 4;
  float eps = 0.0f;
};

template <class T>
struct ReluKeepNan {
  using Arguments = ReluArgs;
  template <int N>
  CUTLASS_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& v,
                                                     Arguments const& args) const {
    cutlass::Array<float, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = args.relu ? relu_keep_nan(v[i]) : v[i];
    return out;
  }
};

template <class T>
struct ReluToCodes {
  using Arguments = ReluCodesArgs;
  template <int N>
  CUTLASS_DEVICE cutlass::Array<int8_t, N> operator()(cutlass::Array<float, N> const& v,
                                                      cutlass::Array<float, N> const& out_bias,
                                                      cutlass::Array<float, N> const& out_scale,
                                                      Arguments const& args) const {
    // The scale is one value broadcast to every element: quantize_activation's
    // s = max(scale, eps) and 1 / s (IEEE division), once per fragment.
    const float scale = effective_scale(out_scale[0], args.eps);
    const float inv_scale = 1.0f / scale;
    float value[N];
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) value[i] = (args.relu ? relu_keep_nan(v[i]) : v[i]) + out_bias[i];
    int8_t code[N];
    quantize_values_fast<N>(value, scale, inv_scale, args.bits, code);
    cutlass::Array<int8_t, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = code[i];
    return out;
  }
};

template <class TileShape, class ElementOut, class ElementResidual>
struct ExactEpilogueFusion {
  static constexpr auto RN = cutlass::FloatRoundStyle::round_to_nearest;
  static constexpr bool kCodes = std::is_same_v<ElementOut, int8_t>;
  using BcastStride = cute::Stride<cute::_0, cute::_1, int64_t>;
  template <template <class> class Fn, class Out = float>
  using Compute = cutlass::epilogue::fusion::Sm90Compute<Fn, Out, float, RN>;
  using Row =
      cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, BcastStride, 4>;
  using Scalar = cutlass::epilogue::fusion::Sm90ScalarBroadcast<float>;
  using Product = cutlass::epilogue::fusion::Sm90EVT<Compute<MulRn>, Row,
                                                     cutlass::epilogue::fusion::Sm90AccFetch>;
  using Shifted = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::plus>, Product, Row>;
  using WithResidual =
      cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::homogeneous_multiply_add>, Scalar,
                                         cutlass::epilogue::fusion::Sm90SrcFetch<ElementResidual>,
                                         Shifted>;
  using type = cute::conditional_t<
      kCodes,
      cutlass::epilogue::fusion::Sm90EVT<Compute<ReluToCodes, int8_t>, WithResidual, Row, Scalar>,
      cutlass::epilogue::fusion::Sm90EVT<Compute<ReluKeepNan, ElementOut>, WithResidual>>;

  template <class ThreadArgs>
  static void set(ThreadArgs& t, const EpilogueArgs* e) {
    const float beta = (e && e->residual) ? 1.0f : 0.0f;
    [[maybe_unused]] const int relu = (e && e->relu) ? 1 : 0;
    // { beta, residual, { { alpha, acc, mul }, shift, add }, fma }
    typename WithResidual::Arguments residual_args{
        {{beta}, {nullptr}, {}},
        {},
        {{{e ? e->alpha : nullptr, 1.0f, {}}, {}, {}}, {e ? e->bias : nullptr, 0.0f, {}}, {}},
        {}};
    if constexpr (kCodes) {
      // { v, out_bias, out_scale, { relu, bits, eps } }
      t = {residual_args,
           {e ? e->out_bias : nullptr, 0.0f, {}},
           {{1.0f}, {e ? e->out_scale : nullptr}, {}},
           {relu, e ? e->out_bits : 4, e ? e->out_eps : 0.0f}};
    } else {
      t = {residual_args, {relu}};
    }
  }
};

// The epilogue of output type OT: conv_packed's (EpilogueFusion, no source
// tensor C) or conv_fused's exact one (fp16 residual as C). What the three
// families take from it: the output and residual elements and alignments,
// the fusion, its arguments and the residual pointer.
template <OutType OT, class TileShape>
struct EpilogueOf {
  static constexpr bool kFused = is_fused_out_type(OT);
  static constexpr bool kCodes = OT == OutType::kFusedCodes8;
  using ElementOut = typename OutElement<OT>::type;
  // The epilogue subtile of the non-cooperative (pingpong / warp-specialized)
  // schedules. CUTLASS's automatic choice gives an 8-bit output 64 x 64 (32
  // values per thread), at which the codes epilogue (three broadcasts and the
  // quantization) spills: ncu on an H100, 1x1 C64 K256 56x56 on the 128x128
  // pingpong GEMM, 240k local-memory requests and 5 mainloop stages against
  // fp16 out's none and 6. 64 x 32 (16 values) spills nothing at one CTA per
  // SM (168 registers), 64 x 16 at two (128 registers), per ptxas. The
  // cooperative schedule's automatic 128 x 32 is 16 values already.
  template <int kMinBlocks, class Otherwise = cutlass::epilogue::collective::EpilogueTileAuto>
  using WarpSpecializedTile =
      cute::conditional_t<kCodes, cute::Shape<cute::_64, cute::Int<(kMinBlocks > 1 ? 16 : 32)>>,
                          Otherwise>;
  using ElementC = cute::conditional_t<kFused, cutlass::half_t, void>;
  static constexpr int kAlignOut = 128 / cutlass::sizeof_bits<ElementOut>::value;
  static constexpr int kAlignC = kFused ? 128 / 16 : kAlignOut;
  using Fusion =
      cute::conditional_t<kFused,
                          typename ExactEpilogueFusion<TileShape, ElementOut, ElementC>::type,
                          typename EpilogueFusion<TileShape, ElementOut>::type>;

  template <class ThreadArgs>
  static void set(ThreadArgs& t, const EpilogueArgs* e) {
    if constexpr (kFused)
      ExactEpilogueFusion<TileShape, ElementOut, ElementC>::set(t, e);
    else
      EpilogueFusion<TileShape, ElementOut>::set(t, e);
  }
  // Without a residual C is never loaded (beta 0), but its TMA descriptor is
  // still encoded: it gets the output's address (valid and aligned) rather
  // than a null one.
  static const ElementC* residual(const EpilogueArgs* e) {
    if constexpr (kFused) {
      if (!e) return nullptr;
      return static_cast<const ElementC*>(e->residual ? e->residual : e->out);
    } else {
      return nullptr;
    }
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
