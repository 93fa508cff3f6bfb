// Torch-free interface of the fused LSQ / LSQ+ activation kernels of the
// training backward (lsq_cuda.cu). They replace the element-wise ATen passes
// over x of backward.cpp with two passes: one that writes the integer codes
// the backward convolutions read, one that applies the straight-through mask
// to their result and produces the partial sums of d bias_a and d scale_a.
// Arithmetic comes from ../quant.h, so the codes equal the forward's.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "quantize_kernels.h"

namespace q4conv {

// Where an output tensor of x's sizes and element type lives.
struct Tensor4dOut {
  void* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};  // in elements, (N, C, H, W) order
};

// The weight codes (lsq_weight_codes below, of x's element type) to write in
// the same launch as the activation codes: the backward's two code passes
// then cost one launch (the step is host bound on small layers).
struct WeightCodesJob {
  Tensor4dView w;                  // (K, C, R, S) as N, C, H, W
  const float* scale_w = nullptr;  // as lsq_weight_codes
  bool per_channel = false, scaled = false;
  Tensor4dOut out;  // element type: x's
};

// Activation codes for the backward convolutions:
// out[n,c,h,w] = quantize_value(x + bias_a[c], s_a, bits) * code_unit(s_a),
// s_a = max(*scale_a, eps), as a float of x's element type (integers times a
// power of two, quant.h's code_unit: exact in fp16 and bf16).
// bias_a: fp32 [C] on the device; scale_a: ONE fp32 value on the device (read
// by the kernel, so no host sync). Any strides; fast when x and out are both
// dense NCHW, or both have adjacent channels (channels_last, pixels at any
// strides: e.g. x's stride grid of a strided 1x1 convolution).
// With `weights`, also those weight codes: in the same launch on those fast
// paths when the weights are fp32, otherwise in a second one.
KernelStatus lsq_activation_codes(const Tensor4dView& x, const float* bias_a, const float* scale_a,
                                  float eps, int bits, const Tensor4dOut& out, cudaStream_t stream,
                                  const WeightCodesJob* weights = nullptr);

// Inputs of the fused activation backward. With s = max(*scale_a, eps),
// ratio = (x + bias_a[c]) / s (IEEE fp32), code as above, inside = Qn <= ratio
// <= Qp, g = grad * (grad_scale ? max(*grad_scale, eps) : 1):
//   dx = g * inside (x's element type),
//   bias partials: sums of g * inside per channel,
//   residual partials: sums of g * (inside ? code - ratio : code).
struct LsqActBackward {
  Tensor4dView x;                     // activation (N, C, H, W)
  Tensor4dView grad;                  // d loss / d x_q, x's sizes and element type
  Tensor4dOut dx;                     // output, x's sizes and element type; may be grad
                                      // itself (same data and strides: in place)
  const float* bias_a = nullptr;      // device, fp32 [C]
  const float* scale_a = nullptr;     // device, ONE fp32 value
  const float* grad_scale = nullptr;  // device, ONE fp32 value (raw s_w), or nullptr for 1
  float eps = 1e-5f;
  int bits = 4;
};

// Partial-sum workspace: bias_rows x C floats (row-major) and
// residual_parts floats. Every entry is written by lsq_activation_backward
// (no zeroing needed); summing the bias rows (dim 0) gives d bias_a before
// any cast, summing the residual parts gives d scale_a before the LSQ factor.
// The split depends only on the shapes, strides and pointer alignment, so the
// sums are deterministic (no atomics).
struct LsqWorkspace {
  int64_t bias_rows = 0;
  int64_t residual_parts = 0;
};
LsqWorkspace lsq_activation_backward_workspace(const LsqActBackward& args);
// With `weights`, also lsq_weight_backward(*weights, row_sums) (declared
// below): in the same launch for channels_last x and fp32 weights, otherwise
// in a second one.
struct LsqWeightBackward;
KernelStatus lsq_activation_backward(const LsqActBackward& args, float* bias_partials,
                                     float* residual_partials, cudaStream_t stream,
                                     const LsqWeightBackward* weights = nullptr,
                                     float* row_sums = nullptr);

// ---- weight side and finishing (lsq_weight_cuda.cu) ------------------------------
// Weights (K, C, R, S) are seen as 4-D views with N = K, H = R, W = S, any
// strides; scale_w is fp32 on the device, [K] values when per_channel, else
// ONE value; s_w[k] = max(scale_w[k or 0], eps).

// Weight codes for the backward convolutions, of element type out_type:
// out[k,c,r,s] = quantize_value(w, s_w[k], bits), times s_w[k] when scaled
// (a per-channel s_w cannot be applied after the convolution over k).
KernelStatus lsq_weight_codes(const Tensor4dView& w, const float* scale_w, bool per_channel,
                              bool scaled, float eps, int bits, InType out_type,
                              const Tensor4dOut& out, cudaStream_t stream);
// The argument checks of lsq_weight_codes (also for weight codes riding on
// lsq_activation_codes's launch).
KernelStatus lsq_weight_codes_check(const WeightCodesJob& job, int bits);

// Weight backward: with g = grad * max(*scale_a, eps) (grad = d loss / d
// (codes of w), from the weight-gradient convolution), ratio = w / s_w[k]:
//   dw = g * inside (w's element type),
//   row_sums[k] = sum over (c, r, s) of g * residual, in a fixed order.
struct LsqWeightBackward {
  Tensor4dView w;
  Tensor4dView grad;  // w's sizes, any float element type
  Tensor4dOut dw;     // w's sizes and element type
  const float* scale_w = nullptr;
  bool per_channel = false;
  const float* scale_a = nullptr;  // device, ONE fp32 value (raw s_a)
  float eps = 1e-5f;
  int bits = 4;
};
// The argument checks of lsq_weight_backward (also for a weight backward
// riding on lsq_activation_backward's launch).
KernelStatus lsq_weight_backward_check(const LsqWeightBackward& args, const float* row_sums);
KernelStatus lsq_weight_backward(const LsqWeightBackward& args, float* row_sums,
                                 cudaStream_t stream);

// The small reductions that end the backward, in one launch (fixed order):
//   dbias_a[c] = sum over rows of bias_partials[row, c],
//   dscale_a = act_factor * sum(act_residual) * (scale_a >= eps),
//   dscale_w[k] = weight_factor * row_sums[k] * (scale_w[k] >= eps) per
//   channel, or dscale_w[0] = weight_factor * sum(row_sums) * (scale_w >= eps).
// The factors are the LSQ gradient scales 1 / sqrt(numel * Qp).
struct LsqFinish {
  const float* bias_partials = nullptr;  // [bias_rows, channels]
  int64_t bias_rows = 0, channels = 0;
  const float* act_residual = nullptr;  // [act_parts]
  int64_t act_parts = 0;
  const float* row_sums = nullptr;  // [out_channels]
  int64_t out_channels = 0;
  const float* scale_a = nullptr;  // ONE raw value
  const float* scale_w = nullptr;  // raw, [out_channels] per channel or ONE value
  bool per_channel = false;
  float eps = 1e-5f;
  float act_factor = 0.0f, weight_factor = 0.0f;
  float* dbias_a = nullptr;   // [channels]
  float* dscale_a = nullptr;  // [1]
  float* dscale_w = nullptr;  // [out_channels] per channel, else [1]
};
KernelStatus lsq_finish_scale_grads(const LsqFinish& args, cudaStream_t stream);

}  // namespace q4conv
