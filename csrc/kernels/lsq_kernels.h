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

// Activation codes for the backward convolutions:
// out[n,c,h,w] = quantize_value(x + bias_a[c], max(*scale_a, eps), bits) as a
// float of x's element type (codes are integers, exact in fp16 and bf16).
// bias_a: fp32 [C] on the device; scale_a: ONE fp32 value on the device (read
// by the kernel, so no host sync). Any strides; fast when x and out are both
// dense NCHW or both dense channels_last.
KernelStatus lsq_activation_codes(const Tensor4dView& x, const float* bias_a, const float* scale_a,
                                  float eps, int bits, const Tensor4dOut& out, cudaStream_t stream);

// Inputs of the fused activation backward. With s = max(*scale_a, eps),
// ratio = (x + bias_a[c]) / s (IEEE fp32), code as above, inside = Qn <= ratio
// <= Qp, g = grad * (*grad_scale or 1):
//   dx = g * inside (x's element type),
//   bias partials: sums of g * inside per channel,
//   residual partials: sums of g * (inside ? code - ratio : code).
struct LsqActBackward {
  Tensor4dView x;                     // activation (N, C, H, W)
  Tensor4dView grad;                  // d loss / d x_q, x's sizes and element type
  Tensor4dOut dx;                     // output, x's sizes and element type
  const float* bias_a = nullptr;      // device, fp32 [C]
  const float* scale_a = nullptr;     // device, ONE fp32 value
  const float* grad_scale = nullptr;  // device, ONE fp32 value (s_w), or nullptr for 1
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
KernelStatus lsq_activation_backward(const LsqActBackward& args, float* bias_partials,
                                     float* residual_partials, cudaStream_t stream);

}  // namespace q4conv
