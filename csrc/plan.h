// The one place that plans a convolution: which backend, which path (the
// kernels and passes that run), the geometry those kernels see and the
// kernel configuration. Forward (training and inference), backward, the
// layer's weight cache and q4conv.explain() all ask it; nothing else
// re-derives these choices. Plans are cached per (device, x's shape, strides,
// dtype and alignment, filter shape, stride / padding / dilation, requested
// backend, tuning switches), so a repeated call does no planning work.
#pragma once

#include <array>
#include <memory>
#include <optional>
#include <string>

#include "geometry.h"
#include "kernels/element_types.h"
#include "tuning.h"

#ifdef Q4CONV_WITH_CUDA
#include "kernels/conv_kernels.h"
#endif

namespace q4conv {

// Backends of the integer convolution.
enum class Backend { kAuto, kFallback, kSm80Int4, kSm90Int8 };
Backend parse_backend(const std::string& name);
const char* backend_name(Backend backend);

// How the integer convolution runs.
enum class Path {
  kFallback,    // ATen float convolution on integer codes (exact; CPU and uncovered shapes)
  kPassGemm,    // quantization pass to NHWC codes, then the backend's implicit GEMM
  kIm2col,      // sm90, few channels: codes, their im2col rows, the GEMM
  kPackedTaps,  // sm90, few channels: x quantized into packed filter taps, a taps x 1 conv
  kFusedMma,    // sm90, dense 1x1: quantization inside an int8 mma.sync GEMM
  kFusedWgmma,  // sm90, dense 1x1: quantization inside a TMA + int8 wgmma GEMM
};
const char* path_name(Path path);

// Channel multiples the CUDA backends store codes in (conv_kernels.h's
// kSm80ChannelAlign / kSm90ChannelAlign; plan_cuda.cpp asserts they agree).
constexpr int64_t kSm80Channels = 32;
constexpr int64_t kSm90Channels = 16;

struct ConvPlan {
  Backend backend = Backend::kFallback;
  Path path = Path::kFallback;
  int64_t out_h = 0, out_w = 0;  // of the convolution
  // A 1x1 unpadded convolution with stride > 1 reads only x's stride grid:
  // the kernels then see that view, at stride 1 (forward and backward alike).
  bool stride_grid = false;
  int64_t c_pad = 0;   // channels of the stored activation codes
  std::string config;  // kernel configuration (tile shape / fused layout)
  int sm_count = 0;    // of x's device (0 on CPU)
  // What the kernels' epilogue writes: conv_packed's float type of x, or a
  // fused output type (conv_fused: exact epilogue, residual, codes out).
  OutType out_type = OutType::kFloat32;
  bool codes_in = false;  // x is int8 activation codes: the kernels read them, no pass
#ifdef Q4CONV_WITH_CUDA
  ConvShape shape;  // what the kernel runs (the GEMM's for im2col, taps x 1 for packed taps)
  ConvShape conv;   // the convolution's own geometry on the stored codes
#endif
};

// The training backward's path: the CUDA LSQ kernels around cuDNN's
// convolution_backward, or the ATen formulation (CPU, float64, empty).
struct BackwardPlan {
  bool cuda_kernels = false;
  bool stride_grid = false;  // see ConvPlan::stride_grid; needs channels-adjacent x
};

// The plan for convolving x (N, C, H, W) with out_channels filters of r x s.
// Checks the geometry (output_hw); a forced backend that cannot run is an
// error naming it. fused_out: conv_fused's request (a fused output type, x
// float or int8 codes); none for conv_packed (x's float type out).
std::shared_ptr<const ConvPlan> plan_conv(const at::Tensor& x, int64_t out_channels, int64_t r,
                                          int64_t s, const ConvParams& params, Backend requested,
                                          std::optional<OutType> fused_out = std::nullopt);
BackwardPlan plan_backward(const at::Tensor& x, at::IntArrayRef weight_sizes,
                           at::ScalarType weight_dtype, bool weight_on_cuda,
                           const ConvParams& params);
inline BackwardPlan plan_backward(const at::Tensor& x, const at::Tensor& weight,
                                  const ConvParams& params) {
  return plan_backward(x, weight.sizes(), weight.scalar_type(), weight.is_cuda(), params);
}
// "key=value" lines of both plans (q4conv.explain parses them).
std::string describe_plan(const ConvPlan& plan, const BackwardPlan& backward);

// The params of the convolution the kernels run: `params` with stride and
// dilation 1 on a stride grid.
ConvParams kernel_params(const ConvPlan& plan, const ConvParams& params);
// The stride grid of an NCHW-indexed tensor (x, or dx): every stride-th
// pixel, as a view (no copy).
at::Tensor stride_grid_view(const at::Tensor& t, const int64_t (&stride)[2]);

// The layout of the weights a CUDA backend reads (what kernel_weight makes
// and the layer caches; the fake kernel in _ops.py mirrors this rule):
// sm80_int4 packed int4 KRSC, C padded to 32; sm90_int8 int8 KRSC, C padded
// to 16, or for C < 16 one im2col row of R*S*C codes per filter, padded to 16.
struct KernelWeightLayout {
  std::array<int64_t, 4> sizes{};
  bool packed_int4 = false;  // two codes per byte (uint8), else int8
  bool im2col_rows = false;  // [K, 1, 1, round_up(R*S*C, 16)]
};
KernelWeightLayout kernel_weight_layout(Backend backend, int64_t out_channels, int64_t channels,
                                        int64_t r, int64_t s);

// Planning of the CUDA backends (plan_cuda.cpp; an error in CPU-only builds).
void plan_cuda(ConvPlan& plan, const at::Tensor& x, int64_t out_channels, int64_t r, int64_t s,
               const ConvParams& params, Backend requested, const Tuning& tuning,
               std::optional<OutType> fused_out);
std::string describe_cuda_geometry(const ConvPlan& plan);

}  // namespace q4conv
