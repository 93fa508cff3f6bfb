// Torch-free interface of the CUDA quantization kernels (quantize_cuda.cu).
// Arithmetic comes from ../quant.h, so codes match the CPU path bit for bit.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "conv_kernels.h"

namespace q4conv {

// A 4-D tensor view (N, C, H, W) with arbitrary element strides, so NCHW,
// channels_last and other strided inputs are read in place.
struct Tensor4dView {
  const void* data = nullptr;
  InType type = InType::kFloat32;
  int64_t size[4] = {0, 0, 0, 0};    // N, C, H, W
  int64_t stride[4] = {0, 0, 0, 0};  // in elements
};

// Activation codes, one fused pass: code = quantize_activation(x, bias_a[c],
// max(*scale_a, eps), bits), written NHWC with c_pad >= C channels (channels
// C..c_pad-1 are zero codes). scale_a points to ONE fp32 value on the device
// (so no host sync is needed); bias_a is fp32 [C] on the device.
// int8 variant: out is int8 [N,H,W,c_pad]. int4 variant: out is packed bytes
// [N,H,W,c_pad/2] (c_pad even), nibble order of quant.h pack_int4_pair.
KernelStatus quantize_activation_int8_nhwc(const Tensor4dView& x, const float* bias_a,
                                           const float* scale_a, float eps, int bits, int c_pad,
                                           int8_t* out, cudaStream_t stream);
KernelStatus quantize_activation_int4_nhwc(const Tensor4dView& x, const float* bias_a,
                                           const float* scale_a, float eps, int bits, int c_pad,
                                           uint8_t* out, cudaStream_t stream);

// Few input channels: the activation codes (as quantize_activation_int8_nhwc
// makes them) written straight in the packed-taps layout of conv_kernels.h
// (TapPacking): out int8 [N, t.rows, Q, t.cols] with t = tap_packing(conv);
// conv is the convolution's geometry on x (c = C). Each input value is read
// and quantized once per block; no NHWC codes tensor is written.
KernelStatus pack_taps_quantize(const Tensor4dView& x, const float* bias_a, const float* scale_a,
                                float eps, int bits, const ConvShape& conv, int8_t* out,
                                cudaStream_t stream);

// Optional by-product of a weight quantization launch: the epilogue scales
// alpha[k] = max(*scale_a, eps) * max(scale_w[per_channel ? k : 0], eps),
// fp32 [K] (what output_alpha_fp32 computes), written by the same launch so a
// training forward saves one launch. Both null: not computed.
struct AlphaOut {
  const float* scale_a = nullptr;
  float* alpha = nullptr;
};

// Weight codes: w is (K, C, R, S) viewed through Tensor4dView (N=K, H=R, W=S);
// scale_w points to fp32 on the device, per_channel ? [K] values : 1 value.
// Writes packed int4 KRSC [K,R,S,c_pad/2] (c_pad even, >= C, zero codes pad).
KernelStatus quantize_pack_weight_int4(const Tensor4dView& w, const float* scale_w,
                                       bool per_channel, float eps, int bits, int c_pad,
                                       uint8_t* out, cudaStream_t stream, AlphaOut alpha = {});

// Weight codes straight into the sm90 kernel's layout: int8 KRSC
// [K,R,S,c_pad] (c_pad >= C, zero codes pad); same codes as
// quantize_pack_weight_int4 followed by unpack_int4_to_int8.
KernelStatus quantize_weight_int8_krsc(const Tensor4dView& w, const float* scale_w,
                                       bool per_channel, float eps, int bits, int c_pad,
                                       int8_t* out, cudaStream_t stream, AlphaOut alpha = {});

// Epilogue scales alpha[k] = max(*scale_a, eps) * max(scale_w[per_channel ?
// k : 0], eps), fp32 [out_channels] on the device; one small launch instead of
// the clamp / multiply / expand ATen calls.
KernelStatus output_alpha_fp32(const float* scale_a, const float* scale_w, bool per_channel,
                               float eps, int out_channels, float* alpha, cudaStream_t stream);

// Re-lays packed int4 codes [rows, c_in/2] (c_in = stored channel count, even)
// as int8 [rows, c_out] (c_out >= logical channels) or as packed int4
// [rows, c_out/2], zero-filling channels >= channels. rows = K*R*S.
KernelStatus unpack_int4_to_int8(const uint8_t* packed, int64_t rows, int c_in, int channels,
                                 int c_out, int8_t* out, cudaStream_t stream);
KernelStatus repack_int4(const uint8_t* packed, int64_t rows, int c_in, int channels, int c_out,
                         uint8_t* out, cudaStream_t stream);

// Fused quantization + GEMM for a dense 1x1 stride-1 convolution
// (pointwise_fused.cu): x is channels_last [pixels, channels] (16-byte
// aligned, no padding), codes = quantize_activation(x, bias_a[c],
// max(*scale_a, eps), bits), bit-identical to the separate pass, made in
// shared memory and never written out; weight int8 [out_channels, channels];
// out = epilogue (NHWC [pixels, out_channels], 16-byte aligned). Needs
// channels % 64 == 0, channels <= 1024, out_channels % 64 == 0, and K
// covered by one block or a cluster of 2, 4 or 8 (pointwise_fused_supports).
// A block keeps the weights of all K output channels (where they and a row
// block's codes fit) or of one 64- or 128-channel slice of them;
// pointwise_fused_layout says which: one block making `passes` passes over
// its codes (cluster == 1), or clusters of `cluster` blocks (passes == 1).
struct PointwiseFusedLayout {
  int passes, cluster;
};
// Output types the kernel is compiled for (one instantiation each).
using PointwiseFusedOutTypes = TypeList<OutType::kFloat32, OutType::kFloat16, OutType::kBFloat16>;
constexpr bool pointwise_fused_supports_out_type(OutType t) {
  return PointwiseFusedOutTypes::contains(t);
}
bool pointwise_fused_supports(InType x_type, int64_t pixels, int channels, int out_channels);
PointwiseFusedLayout pointwise_fused_layout(InType x_type, int channels, int out_channels);
KernelStatus pointwise_fused_conv(const void* x, InType x_type, int64_t pixels, int channels,
                                  const float* bias_a, const float* scale_a, float eps, int bits,
                                  const int8_t* weight, int out_channels,
                                  const EpilogueArgs& epilogue, cudaStream_t stream);

// Fused quantization + int8 wgmma GEMM for a dense 1x1 stride-1 convolution
// (pointwise_wgmma.cu, sm_90a): same arguments, codes and epilogue as
// pointwise_fused_conv. One thread streams [64 pixels x 64 channels] input
// tiles and [BN x 64] weight tiles with TMA; the CTA's warpgroups quantize
// each input tile into a shared-memory code tile and multiply it by wgmma,
// BN = 256 (two warpgroups) where K % 256 == 0, else 128, one CTA per (64
// pixels, BN channels). Needs fp16 / bf16 x, channels % 64 == 0, channels <=
// 2048, out_channels % 128 == 0. Dispatch (dispatch_cuda.cpp) takes it where
// it measured faster: K = 256, C >= 512, a wave of row blocks.
using PointwiseWgmmaOutTypes = TypeList<OutType::kFloat32, OutType::kFloat16, OutType::kBFloat16>;
constexpr bool pointwise_wgmma_supports_out_type(OutType t) {
  return PointwiseWgmmaOutTypes::contains(t);
}
bool pointwise_wgmma_supports(InType x_type, int64_t pixels, int channels, int out_channels);
KernelStatus pointwise_wgmma_conv(const void* x, InType x_type, int64_t pixels, int channels,
                                  const float* bias_a, const float* scale_a, float eps, int bits,
                                  const int8_t* weight, int out_channels,
                                  const EpilogueArgs& epilogue, cudaStream_t stream);

}  // namespace q4conv
