// Torch-free interface of the max-pool on int8 activation codes
// (pool_codes_cuda.cu), the kernel of torch.ops.q4conv.max_pool_codes
// (csrc/pool_codes.cpp has the op's checks and its CPU loop).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "conv_kernels.h"

namespace q4conv {

// A 2-D max-pool as torch.nn.functional.max_pool2d takes it, already checked
// (kernel, stride, dilation >= 1, 0 <= padding <= kernel / 2), with its
// output size (ceil_mode already applied: only p and q depend on it).
struct PoolShape {
  int64_t n = 0, h = 0, w = 0, c = 0;  // input (N, H, W, C)
  int64_t p = 0, q = 0;                // output height, width
  int kernel[2] = {1, 1};              // (height, width), as every array below
  int stride[2] = {1, 1};
  int padding[2] = {0, 0};
  int dilation[2] = {1, 1};
};

// out[n, y, x, c] = the largest in[n, y * stride[0] - padding[0] + i *
// dilation[0], x * stride[1] - padding[1] + j * dilation[1], c] over the
// window (i < kernel[0], j < kernel[1]) positions inside the input: padding
// never wins, and a window with no position inside the input (possible only
// with ceil_mode and a dilation wider than the input) gives -128, as
// max_pool2d does on int8. in: int8 NHWC dense [n, h, w, c]; out: int8 NHWC
// dense [n, p, q, c]. Exact for any int8 values (codes of any bit width).
KernelStatus max_pool_codes_nhwc(const int8_t* in, const PoolShape& shape, int8_t* out,
                                 cudaStream_t stream);

}  // namespace q4conv
