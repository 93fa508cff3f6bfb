// Torch-free interface of the CUDA convolution kernels. Each backend lives in
// its own .cu file and sees only raw device pointers, so the heavy CUTLASS
// translation units compile without the PyTorch headers and can be tested on
// their own. dispatch.cpp owns the torch side (allocation, checks, choice).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

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

enum class OutType { kFloat32, kFloat16, kBFloat16 };

// Epilogue: out[n,p,q,k] = act(alpha[k] * acc[n,p,q,k] + (bias ? bias[k] : 0)),
// act = ReLU when relu, converted to out_type.
struct EpilogueArgs {
  const float* alpha = nullptr;  // device, [k]: s_a * s_w[k]
  const float* bias = nullptr;   // device, [k], or nullptr
  bool relu = false;
  OutType out_type = OutType::kFloat32;
  void* out = nullptr;  // device, NHWC [n,p,q,k] contiguous, out_type elements
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
bool sm80_int4_supports(const ConvShape& shape, OutType out_type);
size_t sm80_int4_workspace_bytes(const ConvShape& shape, OutType out_type);
KernelStatus sm80_int4_conv(const ConvShape& shape, const void* act, const void* weight,
                            const EpilogueArgs& epilogue, void* workspace, cudaStream_t stream);

// ---- CUTLASS 3.x sm90 int8 implicit-GEMM fprop (conv_sm90_int8.cu) ---------
// act: int8 NHWC [n,h,w,c]; weight: int8 KRSC [k,r,s,c]; codes in [-8, 7].
// Requires c % kSm90ChannelAlign == 0 (the caller pads with zero codes).
constexpr int kSm90ChannelAlign = 16;
bool sm90_int8_supports(const ConvShape& shape, OutType out_type);
size_t sm90_int8_workspace_bytes(const ConvShape& shape, OutType out_type);
KernelStatus sm90_int8_conv(const ConvShape& shape, const void* act, const void* weight,
                            const EpilogueArgs& epilogue, void* workspace, cudaStream_t stream);

// ---- im2col of int8 codes (im2col_cuda.cu) ----------------------------------
// For convolutions with few input channels (the RGB stem), which the sm90
// backend runs as a GEMM: row m = (n, p, q) of out [n*p*q, cols] holds, at
// column (r * S + s) * C + c, the code act[n, h, w, c] under filter tap (r, s)
// (h = p*stride_h - pad_h + r*dil_h, likewise w); taps in the padding and
// columns >= R*S*C are zero. act: int8 NHWC [n, h, w, c] with c = shape.c.
// cols must be a multiple of 16 with im2col_rows_per_block(cols) > 0.
int im2col_rows_per_block(int cols);
// Few channels, filter columns packed into channels: out [n, h, q, cols]
// holds at column s * C + c the code act[n, y, q * stride_w - pad_w + s *
// dil_w, c] (zero outside the row; columns >= S*C zero), so the convolution
// runs as an R x 1 one (stride_h, pad_h, dil_h) over C = cols channels.
// shape: the convolution's geometry on act (c = C < 16); cols a multiple of
// 16 and >= S*C.
KernelStatus pack_taps_int8(const ConvShape& shape, const int8_t* act, int cols, int8_t* out,
                            cudaStream_t stream);
KernelStatus im2col_int8(const ConvShape& shape, const int8_t* act, int cols, int8_t* out,
                         cudaStream_t stream);

}  // namespace q4conv
