// CUDA glue of max_pool_codes (checks and output: pool_codes.cpp; kernel:
// kernels/pool_codes_cuda.cu), on PyTorch's current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_glue.h"
#include "kernels/pool_codes_kernels.h"
#include "q4conv.h"

namespace q4conv {
namespace {

// The kernel's view of a checked pool on codes (N, C, H, W).
PoolShape pool_shape(const at::Tensor& codes, const MaxPoolParams& params) {
  PoolShape shape;
  shape.n = codes.size(0);
  shape.c = codes.size(1);
  shape.h = codes.size(2);
  shape.w = codes.size(3);
  shape.p = params.out_h;
  shape.q = params.out_w;
  for (int a = 0; a < 2; ++a) {  // check_max_pool_codes bounds each by INT_MAX
    shape.kernel[a] = static_cast<int>(params.kernel[a]);
    shape.stride[a] = static_cast<int>(params.stride[a]);
    shape.padding[a] = static_cast<int>(params.padding[a]);
    shape.dilation[a] = static_cast<int>(params.dilation[a]);
  }
  return shape;
}

}  // namespace

at::Tensor cuda_max_pool_codes(const at::Tensor& codes, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool ceil_mode) {
  const MaxPoolParams params =
      check_max_pool_codes(codes, kernel_size, stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor out = max_pool_codes_output(codes, params);
  if (out.numel() == 0) return out;
  // The kernel reads and writes dense NHWC: deploy's codes and output already are (no copy).
  const at::Tensor in = codes.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor nhwc = nhwc_buffer(out);
  check_status(
      max_pool_codes_nhwc(in.const_data_ptr<int8_t>(), pool_shape(in, params),
                          nhwc.mutable_data_ptr<int8_t>(), at::cuda::getCurrentCUDAStream()),
      "max-pool of codes");
  if (!nhwc.is_same(out)) out.copy_(nhwc);
  return out;
}

}  // namespace q4conv
