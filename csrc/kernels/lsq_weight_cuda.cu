// Weight side of the LSQ training backward and the final scale-gradient
// reductions (interface: lsq_kernels.h). No torch here.
//
// Why: the weight side was about 20 ATen calls per training step (casts,
// clamps, divisions, masks, sums), each a launch and host work that made a
// small layer's step host bound. Weights are small (at most a few million
// elements), so these kernels favour few launches over bandwidth: one thread
// per element for the codes, one block per output channel for the backward
// (its row sum is then final, per channel or summed by the finishing kernel),
// and one finishing launch for d bias_a, d scale_a and d scale_w. The codes
// and the backward (device_common.cuh) usually ride on the activation side's
// launches (lsq_cuda.cu); the kernels here serve the other cases.
// Sums run in a fixed order (no atomics), so gradients are deterministic.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../quant.h"
#include "device_common.cuh"
#include "lsq_kernels.h"

namespace q4conv {
namespace {

using device::from_float;
using device::invalid;
using device::to_float;
using device::with_type;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 16;

struct Dims {
  int64_t k, c, r, s;
};

// ---- codes for the backward convolutions ------------------------------------------
template <typename TW, typename TO>
__global__ void __launch_bounds__(kThreads) weight_codes_kernel(const device::WeightCodesArgs a) {
  device::weight_codes_range<TW, TO>(a, blockIdx.x * int64_t(blockDim.x) + threadIdx.x,
                                     int64_t(gridDim.x) * blockDim.x);
}

// ---- weight backward: one block per output channel ----------------------------------
template <typename TW, typename TG>
__global__ void __launch_bounds__(kThreads)
    weight_backward_kernel(const device::WeightBackwardArgs a) {
  __shared__ float warp_sums[kThreads / device::kWarp];
  device::weight_backward_row<kThreads, TW, TG>(a, blockIdx.x, threadIdx.x, warp_sums);
}

// d loss / d scale from its summed residual terms: times the LSQ factor, and
// zero where max(scale, eps) picked eps (backward.cpp's finish_scale_grad).
__device__ __forceinline__ float scale_grad(float summed, float factor, float raw_scale,
                                            float eps) {
  return summed * factor * (raw_scale >= eps ? 1.0f : 0.0f);
}

// ---- finishing: block b sums the d bias_a columns [b * kFinishX, + kFinishX),
// block 0 also produces d scale_a and d scale_w ----------------------------------------
// A block is kFinishX channels (coalesced, one per lane) x kFinishY row groups:
// thread (x, y) sums rows y, y + kFinishY, ... of its channel, then one thread
// per channel adds the kFinishY group sums in order. Fixed order either way;
// many rows in flight at once (one thread per channel walking all rows was
// 15-110 us per step on H100).
constexpr int kFinishX = device::kWarp;
constexpr int kFinishY = 32;
constexpr int kFinishThreads = kFinishX * kFinishY;

__global__ void __launch_bounds__(kFinishThreads) finish_kernel(const LsqFinish a) {
  __shared__ float group_sums[kFinishY][kFinishX + 1];
  __shared__ float warp_sums[kFinishThreads / device::kWarp];
  const int tx = threadIdx.x % kFinishX, ty = threadIdx.x / kFinishX;
  const int64_t c = int64_t(blockIdx.x) * kFinishX + tx;
  float sum = 0.0f;
  if (c < a.channels) {
#pragma unroll 8
    for (int64_t row = ty; row < a.bias_rows; row += kFinishY)
      sum += a.bias_partials[row * a.channels + c];
  }
  group_sums[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && c < a.channels) {
    float total = 0.0f;
#pragma unroll
    for (int y = 0; y < kFinishY; ++y) total += group_sums[y][tx];
    a.dbias_a[c] = total;
  }
  if (blockIdx.x != 0) return;  // whole block: block_sum below stays uniform

  const int thread = threadIdx.x;
  float act = 0.0f;
  for (int64_t i = thread; i < a.act_parts; i += kFinishThreads) act += a.act_residual[i];
  act = device::block_sum<kFinishThreads>(act, thread, warp_sums);
  if (thread == 0) *a.dscale_a = scale_grad(act, a.act_factor, *a.scale_a, a.eps);
  __syncthreads();  // warp_sums is reused
  if (a.per_channel) {
    for (int64_t k = thread; k < a.out_channels; k += kFinishThreads)
      a.dscale_w[k] = scale_grad(a.row_sums[k], a.weight_factor, a.scale_w[k], a.eps);
    return;
  }
  float wsum = 0.0f;
  for (int64_t k = thread; k < a.out_channels; k += kFinishThreads) wsum += a.row_sums[k];
  wsum = device::block_sum<kFinishThreads>(wsum, thread, warp_sums);
  if (thread == 0) *a.dscale_w = scale_grad(wsum, a.weight_factor, *a.scale_w, a.eps);
}

// ---- host side ------------------------------------------------------------------------
Dims dims_of(const Tensor4dView& w) { return {w.size[0], w.size[1], w.size[2], w.size[3]}; }

int64_t numel(const Dims& d) { return d.k * d.c * d.r * d.s; }

KernelStatus check_weight(const char* fn, const Tensor4dView& w, const float* scale_w, int bits) {
  for (int i = 0; i < 4; ++i)
    if (w.size[i] < 0) return invalid(fn, "w", "negative size[" + std::to_string(i) + "]");
  if (bits < 2 || bits > 8)
    return invalid(fn, "bits", "must be in [2, 8], got " + std::to_string(bits));
  if (numel(dims_of(w)) == 0) return KernelStatus::success();
  if (w.data == nullptr) return invalid(fn, "w", "null data pointer");
  if (scale_w == nullptr) return invalid(fn, "scale_w", "null pointer");
  return KernelStatus::success();
}

unsigned grid_for(int64_t work) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min((work + kThreads - 1) / kThreads, kMaxBlocks)));
}

}  // namespace

KernelStatus lsq_weight_codes_check(const WeightCodesJob& job, int bits) {
  const char* fn = "lsq_weight_codes";
  KernelStatus st = check_weight(fn, job.w, job.scale_w, bits);
  if (!st.ok || numel(dims_of(job.w)) == 0) return st;
  if (job.out.data == nullptr) return invalid(fn, "out", "null data pointer");
  return KernelStatus::success();
}

KernelStatus lsq_weight_codes(const Tensor4dView& w, const float* scale_w, bool per_channel,
                              bool scaled, float eps, int bits, InType out_type,
                              const Tensor4dOut& out, cudaStream_t stream) {
  const WeightCodesJob job{w, scale_w, per_channel, scaled, out};
  KernelStatus st = lsq_weight_codes_check(job, bits);
  const Dims d = dims_of(w);
  if (!st.ok || numel(d) == 0) return st;
  const device::WeightCodesArgs a = device::weight_codes_args(job, eps, bits);
  return with_type(w.type, [&](auto* w_tag) {
    using TW = std::remove_pointer_t<decltype(w_tag)>;
    return with_type(out_type, [&](auto* o_tag) {
      using TO = std::remove_pointer_t<decltype(o_tag)>;
      weight_codes_kernel<TW, TO><<<grid_for(numel(d)), kThreads, 0, stream>>>(a);
      return launch_status("lsq_weight_codes");
    });
  });
}

KernelStatus lsq_weight_backward_check(const LsqWeightBackward& a, const float* row_sums) {
  const char* fn = "lsq_weight_backward";
  KernelStatus st = check_weight(fn, a.w, a.scale_w, a.bits);
  const Dims d = dims_of(a.w);
  if (!st.ok || numel(d) == 0) return st;
  for (int i = 0; i < 4; ++i)
    if (a.grad.size[i] != a.w.size[i]) return invalid(fn, "grad", "sizes differ from w's");
  if (a.grad.data == nullptr) return invalid(fn, "grad", "null data pointer");
  if (a.dw.data == nullptr) return invalid(fn, "dw", "null data pointer");
  if (a.scale_a == nullptr) return invalid(fn, "scale_a", "null pointer");
  if (row_sums == nullptr) return invalid(fn, "row_sums", "null pointer");
  if (d.k > INT32_MAX) return invalid(fn, "w", "too many output channels for one grid");
  return KernelStatus::success();
}

KernelStatus lsq_weight_backward(const LsqWeightBackward& a, float* row_sums, cudaStream_t stream) {
  const char* fn = "lsq_weight_backward";
  KernelStatus st = lsq_weight_backward_check(a, row_sums);
  const Dims d = dims_of(a.w);
  if (!st.ok || numel(d) == 0) return st;
  const device::WeightBackwardArgs args = device::weight_backward_args(a, row_sums);
  return with_type(a.w.type, [&](auto* w_tag) {
    using TW = std::remove_pointer_t<decltype(w_tag)>;
    return with_type(a.grad.type, [&](auto* g_tag) {
      using TG = std::remove_pointer_t<decltype(g_tag)>;
      weight_backward_kernel<TW, TG><<<static_cast<unsigned>(d.k), kThreads, 0, stream>>>(args);
      return launch_status(fn);
    });
  });
}

KernelStatus lsq_finish_scale_grads(const LsqFinish& a, cudaStream_t stream) {
  const char* fn = "lsq_finish_scale_grads";
  if (a.bias_rows < 0 || a.channels < 0 || a.act_parts < 0 || a.out_channels < 0)
    return invalid(fn, "args", "negative count");
  if (a.scale_a == nullptr || a.scale_w == nullptr) return invalid(fn, "scale", "null pointer");
  if (a.dbias_a == nullptr && a.channels > 0) return invalid(fn, "dbias_a", "null pointer");
  if (a.bias_partials == nullptr && a.bias_rows * a.channels > 0)
    return invalid(fn, "bias_partials", "null pointer");
  if (a.act_residual == nullptr && a.act_parts > 0)
    return invalid(fn, "act_residual", "null pointer");
  if (a.row_sums == nullptr && a.out_channels > 0) return invalid(fn, "row_sums", "null pointer");
  if (a.dscale_a == nullptr || a.dscale_w == nullptr) return invalid(fn, "dscale", "null pointer");
  const int64_t blocks = std::max<int64_t>(1, (a.channels + kFinishX - 1) / kFinishX);
  if (blocks > INT32_MAX) return invalid(fn, "channels", "too many for one grid");
  finish_kernel<<<static_cast<unsigned>(blocks), kFinishThreads, 0, stream>>>(a);
  return launch_status(fn);
}

}  // namespace q4conv
