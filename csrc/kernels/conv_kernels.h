// Torch-free interface of the CUDA convolution kernels. Each backend lives in
// its own .cu file and sees only raw device pointers, so the heavy CUTLASS
// translation units compile without the PyTorch headers and can be tested on
// their own. dispatch.cpp owns the torch side (allocation, checks, choice).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "element_types.h"

namespace q4conv {

// Geometry of one forward convolution, in NHWC / KRSC terms.
struct ConvShape {
  int n = 0, h = 0, w = 0;  // input batch and spatial size
  int c = 0;                // input channels AS STORED (already padded)
  int k = 0;                // output channels
  int r = 0, s = 0;         // filter height, width
  int p = 0, q = 0;         // output height, width
  int pad_h = 0, pad_w = 0;
  int stride_h = 1, stride_w = 1;
  int dil_h = 1, dil_w = 1;
};

// A 1x1, stride-1, unpadded convolution: on the NHWC / KRSC buffers it is
// the GEMM out[n*h*w, k] = act[n*h*w, c] * weight[k, c]^T.
inline bool is_pointwise_gemm(const ConvShape& s) {
  return s.r == 1 && s.s == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_h == 0 && s.pad_w == 0;
}

// Epilogue: out[n,p,q,k] = act(alpha[k] * acc[n,p,q,k] + (bias ? bias[k] : 0)),
// act = ReLU when relu, converted to out_type; for the fused output types the
// exact epilogue of element_types.h (OutType) with the fields below.
struct EpilogueArgs {
  const float* alpha = nullptr;  // device, [k]: s_a * s_w[k]
  const float* bias = nullptr;   // device, [k], or nullptr
  bool relu = false;
  OutType out_type = OutType::kFloat32;
  void* out = nullptr;  // device, NHWC [n,p,q,k] contiguous, out_type elements
  // conv_fused's exact epilogue only (is_fused_out_type(out_type)); bias is its shift.
  const void* residual = nullptr;    // device, NHWC [n,p,q,k] fp16, 16-byte aligned, or nullptr
  const float* out_bias = nullptr;   // device, [k]: the consumer's bias_a (kFusedCodes8)
  const float* out_scale = nullptr;  // device, one value: the consumer's scale_a (kFusedCodes8)
  float out_eps = 0.0f;              // the consumer's eps (kFusedCodes8)
  int out_bits = 4;                  // code width (kFusedCodes8)
};

// Result of a backend call: ok, or a message naming what failed (a CUTLASS
// status or a CUDA error string). Never aborts.
struct KernelStatus {
  bool ok = true;
  std::string message;
  static KernelStatus success() { return {}; }
  static KernelStatus failure(std::string why) { return {false, std::move(why)}; }
};

// Status of the last kernel launch on this host thread: a failure naming
// `what` and the CUDA error, or success.
inline KernelStatus launch_status(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return KernelStatus::failure(std::string(what) + ": CUDA launch failed: " +
                                 cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  return KernelStatus::success();
}

// Raises `kernel`'s dynamic shared-memory limit to `bytes` on the current
// device (and, with max_carveout, asks for the largest shared-memory
// carveout), once per device and size: the setting is per function and per
// device, and setting it on every call costs host time. `raised` is the
// caller's record for this one kernel (a static array per kernel).
constexpr int kMaxDevices = 64;
inline cudaError_t raise_smem_limit(const void* kernel, int bytes, bool max_carveout,
                                    std::atomic<int> (&raised)[kMaxDevices]) {
  int device = -1;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool known = device >= 0 && device < kMaxDevices;
  if (known && raised[device].load() >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && max_carveout)
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               cudaSharedmemCarveoutMaxShared);
  if (err == cudaSuccess && known) raised[device].store(bytes);
  return err;
}

// ---- CUTLASS sm80 int4 implicit-GEMM fprop (conv_sm80_int4.cu) -------------
// act: packed int4 NHWC [n,h,w,c/2] bytes; weight: packed int4 KRSC
// [k,r,s,c/2] bytes; nibble order of cutlass::int4b_t (even channel low).
// Requires c % kSm80ChannelAlign == 0 (the caller pads with zero codes).
constexpr int kSm80ChannelAlign = 32;
// Output types the family is compiled for (one instantiation each).
using Sm80Int4OutTypes = TypeList<OutType::kFloat32, OutType::kFloat16, OutType::kBFloat16>;
constexpr bool sm80_int4_supports_out_type(OutType t) { return Sm80Int4OutTypes::contains(t); }
bool sm80_int4_supports(const ConvShape& shape, OutType out_type);
size_t sm80_int4_workspace_bytes(const ConvShape& shape, OutType out_type);
KernelStatus sm80_int4_conv(const ConvShape& shape, const void* act, const void* weight,
                            const EpilogueArgs& epilogue, void* workspace, cudaStream_t stream);

// ---- CUTLASS 3.x sm90 int8 implicit-GEMM fprop (conv_sm90_int8.cu) ---------
// act: int8 NHWC [n,h,w,c]; weight: int8 KRSC [k,r,s,c]; codes in [-8, 7].
// Requires c % kSm90ChannelAlign == 0 (the caller pads with zero codes).
constexpr int kSm90ChannelAlign = 16;
// Output types every sm90 configuration is compiled for (the fused ones with
// an fp16 residual only).
using Sm90Int8OutTypes = TypeList<OutType::kFloat32, OutType::kFloat16, OutType::kBFloat16,
                                  OutType::kFusedFloat16, OutType::kFusedCodes8>;
constexpr bool sm90_int8_supports_out_type(OutType t) { return Sm90Int8OutTypes::contains(t); }
bool sm90_int8_supports(const ConvShape& shape, OutType out_type);
size_t sm90_int8_workspace_bytes(const ConvShape& shape, OutType out_type);
KernelStatus sm90_int8_conv(const ConvShape& shape, const void* act, const void* weight,
                            const EpilogueArgs& epilogue, void* workspace, cudaStream_t stream);
// Name of the configuration sm90_int8_conv runs for this shape and output
// type on the current device (e.g. "conv128x128x128/pp"), "" if none: what a
// plan reports. Static storage; the choice is cached as sm90_int8_conv's.
const char* sm90_int8_config_name(const ConvShape& shape, OutType out_type);
// The compiled configurations' names, in table order (their indices).
std::vector<std::string> sm90_int8_config_names();
// Forces configuration `index` (of sm90_int8_config_names) wherever it takes
// the shape and output type, the rule elsewhere; -1 restores the rule. For
// benchmarks and tests (q4conv.tuning(sm90_config=...)); process-wide.
void sm90_int8_force_config(int index);

// ---- im2col of int8 codes (im2col_cuda.cu) ----------------------------------
// For convolutions with few input channels (the RGB stem), which the sm90
// backend runs as a GEMM: row m = (n, p, q) of out [n*p*q, cols] holds, at
// column (r * S + s) * C + c, the code act[n, h, w, c] under filter tap (r, s)
// (h = p*stride_h - pad_h + r*dil_h, likewise w); taps in the padding and
// columns >= R*S*C are zero. act: int8 NHWC [n, h, w, c] with c = shape.c.
// cols must be a multiple of 16 with im2col_rows_per_block(cols) > 0.
int im2col_rows_per_block(int cols);
// Few channels, filter taps packed into channels (pack_taps_quantize in
// quantize_kernels.h): packed row j of image n holds, for each output column
// q, the codes of `group` input rows y = j * group + i - pad_h (i < group)
// and S filter columns, at channel i * slot + s * C + c the code of x[n, c,
// y, q * stride_w - pad_w + s * dil_w] (zero outside the image and in each
// slot's tail). The convolution then runs as a `taps` x 1 one over
// [N, rows, Q, cols] (packed_taps_shape) on the implicit-GEMM kernels, which
// read each packed row `taps` times from L2 instead of a materialized
// [N*P*Q, R*S*C] im2col matrix.
//   - group = stride_h where dil_h == 1 and stride_h * slot <= 64: the
//     packed convolution has stride 1 and taps = ceil(R / stride_h) (the
//     stem: 2 rows x 7 columns x 3 channels in 64 channels, a 4 x 1
//     convolution: 64-byte rows for the kernel's TMA, 4 reduction steps of 64
//     instead of 7 of 32);
//   - group = 1 otherwise: taps = R with the convolution's stride_h, dil_h.
// Padding rows are packed as zero codes, so the packed convolution has no
// padding.
struct TapPacking {
  int group = 1;  // input rows per packed row
  int slot = 0;   // channels per input row: round_up(S * C, 16)
  int cols = 0;   // channels of a packed pixel: group * slot
  int taps = 0;   // filter height of the packed convolution
  int rows = 0;   // packed rows per image
};

// Packed pixels hold at most kMaxPackedChannels; rows are grouped only
// where the group fits kMaxGroupedChannels (the 64-deep tiles of the sm90
// kernels).
constexpr int kMaxPackedChannels = 128;
constexpr int kMaxGroupedChannels = 64;

inline TapPacking tap_packing(const ConvShape& g) {
  TapPacking t;
  t.slot = (g.s * g.c + 15) / 16 * 16;
  const bool grouped =
      g.dil_h == 1 && g.stride_h > 1 && int64_t(g.stride_h) * t.slot <= kMaxGroupedChannels;
  t.group = grouped ? g.stride_h : 1;
  t.cols = t.group * t.slot;
  t.taps = grouped ? (g.r + t.group - 1) / t.group : g.r;
  t.rows = grouped ? g.p + t.taps - 1 : g.h + 2 * g.pad_h;
  return t;
}

// pack_taps_quantize keeps a block's input window (group rows x the columns
// its packed pixels read x C) in shared memory: true where the window of one
// output column fits (im2col_cuda.cu).
constexpr int kPackWindowBytes = 32 * 1024;
bool pack_taps_fits(const ConvShape& conv, const TapPacking& t);

// The `taps` x 1 convolution over the packed rows that `conv` (geometry on
// x, c = the real C) becomes.
inline ConvShape packed_taps_shape(const ConvShape& conv, const TapPacking& t) {
  ConvShape packed = conv;
  packed.h = t.rows;
  packed.w = conv.q;
  packed.c = t.cols;
  packed.r = t.taps;
  packed.s = 1;
  packed.pad_h = packed.pad_w = 0;
  packed.stride_w = packed.dil_w = 1;
  if (t.group > 1) packed.stride_h = packed.dil_h = 1;
  return packed;
}

KernelStatus im2col_int8(const ConvShape& shape, const int8_t* act, int cols, int8_t* out,
                         cudaStream_t stream);

// ---- output layout (layout_cuda.cu) ------------------------------------------
// out [images, channels, pixels] = in [images, pixels, channels] (NHWC -> NCHW
// of a convolution's output); element_bytes 2 (fp16 / bf16) or 4 (fp32).
KernelStatus nhwc_to_nchw(const void* in, int element_bytes, int64_t images, int64_t pixels,
                          int64_t channels, void* out, cudaStream_t stream);

}  // namespace q4conv
