// Device helpers shared by the q4conv CUDA kernels (included by .cu files
// only): vector packs, fixed-order reductions and the
// LSQ straight-through terms. No torch here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../quant.h"
#include "element_types.cuh"
#include "lsq_kernels.h"
#include "quantize_kernels.h"

namespace q4conv {
namespace device {

constexpr int kWarp = 32;

// V consecutive elements moved by one load / store instruction (the caller
// guarantees V * sizeof(T) alignment).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T e[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* __restrict__ src) {
  return *reinterpret_cast<const Pack<T, V>*>(src);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* __restrict__ dst, const Pack<T, V>& value) {
  *reinterpret_cast<Pack<T, V>*>(dst) = value;
}

// ---- fixed-order reductions (deterministic: no atomics) -------------------------
// Lane 0 gets the warp's sum, always in the same order.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1)
    v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a block of kThreads threads (thread = linear thread index);
// valid in thread 0. warp_sums: kThreads / kWarp floats of shared memory.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v, int thread, float* warp_sums) {
  v = warp_sum(v);
  if (thread % kWarp == 0) warp_sums[thread / kWarp] = v;
  __syncthreads();
  float total = 0.0f;
  if (thread == 0) {
#pragma unroll
    for (int w = 0; w < kThreads / kWarp; ++w) total += warp_sums[w];
  }
  return total;
}

// ---- programmatic dependent launch ------------------------------------------------
// Lets the next kernel in the stream, when launched with programmatic
// dependent launch (the sm90 GEMM after the activation pass), start its CTAs
// once every block of this grid has begun; that kernel still waits for this
// grid to complete before it reads our output (griddepcontrol.wait). No-op
// before sm_90 and for kernels launched normally.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ---- indexing --------------------------------------------------------------------
// Coordinates (i0, i1, i2, i3) of flat index i in a row-major array of the
// given sizes (i3 fastest).
struct Index4 {
  int64_t i[4];
};

// 32-bit division when the index and sizes fit (a 64-bit division is a long
// instruction sequence; weight kernels unravel every element and were
// instruction bound on it).
__device__ __forceinline__ Index4 unravel(int64_t flat, const int64_t (&size)[4]) {
  Index4 at;
  const bool narrow =
      flat <= UINT32_MAX && size[1] <= UINT32_MAX && size[2] <= UINT32_MAX && size[3] <= UINT32_MAX;
  if (narrow) {
    uint32_t rest = static_cast<uint32_t>(flat);
#pragma unroll
    for (int d = 3; d > 0; --d) {
      const uint32_t extent = static_cast<uint32_t>(size[d]);
      at.i[d] = rest % extent;
      rest /= extent;
    }
    at.i[0] = rest;
    return at;
  }
  for (int d = 3; d > 0; --d) {
    at.i[d] = flat % size[d];
    flat /= size[d];
  }
  at.i[0] = flat;
  return at;
}

__device__ __forceinline__ int64_t offset_of(const int64_t (&stride)[4], const Index4& at) {
  return at.i[0] * stride[0] + at.i[1] * stride[1] + at.i[2] * stride[2] + at.i[3] * stride[3];
}

// ---- LSQ straight-through terms (same operations as backward.cpp's ATen path) ----
// unit: quant.h's code_unit(s), what the backward's codes are written in.
struct LsqScale {
  float s, inv, lo, hi, unit;
};

__device__ __forceinline__ LsqScale lsq_scale(float raw_scale, float eps, int bits) {
  const float s = effective_scale(raw_scale, eps);
  return {s, 1.0f / s, static_cast<float>(qmin(bits)), static_cast<float>(qmax(bits)),
          code_unit(s)};
}

// d value = g * inside and the d scale term g * residual of one element.
struct Terms {
  float dvalue, residual;
};

// value = x + bias (LSQ+ shift; bias 0 for weights), ratio = value / s (IEEE
// fp32, as ATen's division), inside = Qn <= ratio <= Qp, residual = code -
// ratio inside the range and code outside.
__device__ __forceinline__ Terms lsq_terms(float x, float bias, float g, const LsqScale& s,
                                           int bits) {
  const float shifted = x + bias;
  const float ratio = shifted / s.s;
  const float code = static_cast<float>(quantize_value(shifted, s.s, bits));  // NaN -> 0
  const bool inside = ratio >= s.lo && ratio <= s.hi;                         // false for NaN
  // g * float(inside), not a select: 0 * Inf stays NaN, as in ATen.
  return {g * static_cast<float>(inside), g * (inside ? code - ratio : code)};
}

// ---- LSQ weight codes (lsq_weight_codes; also carried by the activation-codes
// launch, lsq_cuda.cu) --------------------------------------------------------------
struct WeightCodesArgs {
  const void* w;
  void* out;
  int64_t size[4], in_stride[4], out_stride[4];  // (K, C, R, S)
  const float* scale;
  bool per_channel, scaled;
  float eps;
  int bits;
};

// Flat (k, c, r, s) elements begin, begin + step, ... of the weight codes:
// quantize_value(w, s_w[k]), times s_w[k] when scaled, else times
// code_unit(s_w) (the backward's code unit, quant.h).
template <typename TW, typename TO>
__device__ __forceinline__ void weight_codes_range(const WeightCodesArgs& a, int64_t begin,
                                                   int64_t step) {
  const TW* w = static_cast<const TW*>(a.w);
  TO* out = static_cast<TO*>(a.out);
  const int64_t total = a.size[0] * a.size[1] * a.size[2] * a.size[3];
  for (int64_t i = begin; i < total; i += step) {
    const Index4 at = unravel(i, a.size);
    const float scale = effective_scale(a.scale[a.per_channel ? at.i[0] : 0], a.eps);
    const float code =
        static_cast<float>(quantize_value(to_float(w[offset_of(a.in_stride, at)]), scale, a.bits));
    out[offset_of(a.out_stride, at)] = from_float<TO>(code * (a.scaled ? scale : code_unit(scale)));
  }
}

// ---- LSQ weight backward, one output channel per block (lsq_weight_backward;
// also carried by the activation-backward launch, lsq_cuda.cu) ----------------------
struct WeightBackwardArgs {
  const void* w;
  const void* grad;
  void* dw;
  int64_t size[4], w_stride[4], grad_stride[4], dw_stride[4];  // (K, C, R, S)
  const float* scale_w;
  bool per_channel;
  const float* scale_a;
  float eps;
  int bits;
  float* row_sums;
};

// Output channel k: dw[k] = g * inside and row_sums[k] = the fixed-order sum
// of g * residual, with g = grad * s_a / code_unit(s_a), s_a = max(*scale_a,
// eps): grad is the weight-gradient convolution of the activation codes in
// their code unit (both factors exact powers of two apart, so g rounds as
// grad * s_a of the bare codes did). Every thread of the
// block calls it (it syncs); thread: linear index in a block of kThreads;
// warp_sums: kThreads / kWarp floats of shared memory.
template <int kThreads, typename TW, typename TG>
__device__ __forceinline__ void weight_backward_row(const WeightBackwardArgs& a, int64_t k,
                                                    int thread, float* warp_sums) {
  const TW* w = static_cast<const TW*>(a.w);
  const TG* grad = static_cast<const TG*>(a.grad);
  TW* dw = static_cast<TW*>(a.dw);
  const LsqScale s = lsq_scale(a.scale_w[a.per_channel ? k : 0], a.eps, a.bits);
  const float s_a = effective_scale(*a.scale_a, a.eps);
  const float grad_factor = s_a / code_unit(s_a);
  const int64_t row_size[4] = {1, a.size[1], a.size[2], a.size[3]};
  const int64_t row = a.size[1] * a.size[2] * a.size[3];
  float residual = 0.0f;
  for (int64_t e = thread; e < row; e += kThreads) {
    Index4 at = unravel(e, row_size);
    at.i[0] = k;
    const float g = to_float(grad[offset_of(a.grad_stride, at)]) * grad_factor;
    const Terms t = lsq_terms(to_float(w[offset_of(a.w_stride, at)]), 0.0f, g, s, a.bits);
    dw[offset_of(a.dw_stride, at)] = from_float<TW>(t.dvalue);
    residual += t.residual;
  }
  const float total = block_sum<kThreads>(residual, thread, warp_sums);
  if (thread == 0) a.row_sums[k] = total;
}

// ---- host side ------------------------------------------------------------------
inline KernelStatus invalid(const char* fn, const char* arg, const std::string& why) {
  return KernelStatus::failure(std::string(fn) + ": invalid argument '" + arg + "': " + why);
}

// The pointer arguments of the fused 1x1 kernels (pointwise_fused.cu,
// pointwise_wgmma.cu): all set, and x, weight and out 16-byte aligned (both
// load and store whole 16-byte pieces).
inline KernelStatus check_pointwise_pointers(const char* fn, const void* x, const int8_t* weight,
                                             const float* bias_a, const float* scale_a,
                                             const EpilogueArgs& epilogue) {
  if (x == nullptr || weight == nullptr || bias_a == nullptr || scale_a == nullptr ||
      epilogue.alpha == nullptr || epilogue.out == nullptr)
    return KernelStatus::failure(std::string(fn) + ": null pointer argument");
  if (((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(weight) |
        reinterpret_cast<uintptr_t>(epilogue.out)) &
       15) != 0)
    return KernelStatus::failure(std::string(fn) + ": x, weight and out must be 16-byte aligned");
  return KernelStatus::success();
}

// The kernel arguments of a WeightCodesJob (lsq_kernels.h).
inline WeightCodesArgs weight_codes_args(const WeightCodesJob& job, float eps, int bits) {
  WeightCodesArgs args{job.w.data,  job.out.data,    {},         {},  {},
                       job.scale_w, job.per_channel, job.scaled, eps, bits};
  for (int d = 0; d < 4; ++d) {
    args.size[d] = job.w.size[d];
    args.in_stride[d] = job.w.stride[d];
    args.out_stride[d] = job.out.stride[d];
  }
  return args;
}

// The kernel arguments of an LsqWeightBackward (lsq_kernels.h).
inline WeightBackwardArgs weight_backward_args(const LsqWeightBackward& a, float* row_sums) {
  WeightBackwardArgs args{a.w.data,  a.grad.data,   a.dw.data, {},    {},     {},      {},
                          a.scale_w, a.per_channel, a.scale_a, a.eps, a.bits, row_sums};
  for (int d = 0; d < 4; ++d) {
    args.size[d] = a.w.size[d];
    args.w_stride[d] = a.w.stride[d];
    args.grad_stride[d] = a.grad.stride[d];
    args.dw_stride[d] = a.dw.stride[d];
  }
  return args;
}

// Calls f with a null pointer of the element type `type` stands for.
template <typename F>
KernelStatus with_type(InType type, F&& f) {
  return with_in_type(
      type, [&](auto tag) { return f(static_cast<in_element_of<decltype(tag)>*>(nullptr)); },
      [] { return KernelStatus::failure("unsupported element type"); });
}

}  // namespace device
}  // namespace q4conv
