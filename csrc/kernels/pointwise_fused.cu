// Fused activation quantization + int8 tensor-core GEMM for dense 1x1
// stride-1 convolutions (interface: conv_kernels.h). No torch, no CUTLASS.
//
// Why: on H100 the separate quantization pass (fp16 read, int8 write, then
// the GEMM reads the codes again) cost as much as cuDNN's whole convolution
// on every 1x1 layer whose input is larger than its output (NOTES.md). Here
// the GEMM's A operand is loaded as fp16/bf16/fp32 from the channels_last
// input, quantized in registers with quant.h's arithmetic (bit-identical to
// the separate pass) and stored to shared memory as int8, so the input is read
// once at 2 (or 4) bytes per element, as cuDNN reads it.
//
// Tile: kBM = 128 rows (pixels) x BN output channels x kBK = 64 channels per
// step, 256 threads = 8 warps (kWarpsM x kWarpsN); mma.sync m16n8k32 s8 with
// int32 accumulators (sm_80+; on sm_90 it runs at about half the wgmma rate,
// which the memory-bound layers this serves do not reach). Two shared-memory
// stages; the next step's global loads are issued before the current step's
// MMAs. Shared rows are padded to 80 bytes so the fragment reads of the 8
// rows of a quad hit 32 distinct banks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../quant.h"
#include "quantize_kernels.h"

namespace q4conv {
namespace {

constexpr int kBM = 128;
constexpr int kBK = 64;
constexpr int kRowBytes = kBK + 16;  // padded shared row
constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct OutCvt;
template <>
struct OutCvt<float> {
  static __device__ __forceinline__ void store2(float* dst, float a, float b) {
    *reinterpret_cast<float2*>(dst) = make_float2(a, b);
  }
};
template <>
struct OutCvt<__half> {
  static __device__ __forceinline__ void store2(__half* dst, float a, float b) {
    *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
  }
};
template <>
struct OutCvt<__nv_bfloat16> {
  static __device__ __forceinline__ void store2(__nv_bfloat16* dst, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
  }
};

__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 8 consecutive input elements (16 bytes of fp16/bf16, 32 of fp32) held in
// registers: a union, not a pointer cast, so they stay out of local memory.
template <typename T>
union Chunk8 {
  uint4 raw[sizeof(T) / 2];
  T e[8];
};

// Per thread and step: kAChunks chunks of 8 channels of A (consecutive lanes
// read consecutive 16 bytes: 8 lanes per 64-channel row) and BN / 64 chunks of
// 16 bytes of B.
constexpr int kAChunks = kBM * kBK / 8 / kThreads;

struct Params {
  const void* x;
  const int8_t* weight;  // [k, c] int8
  const float* bias_a;   // [c]
  const float* scale_a;  // 1 value
  float eps;
  int bits;
  int64_t m;  // rows = pixels
  int c, k;
  EpilogueArgs epi;
};

// Two blocks per SM (<= 128 registers per thread): one block's quantization
// and loads overlap the other's MMAs.
template <typename T, int BN, int kWarpsM>
__global__ void __launch_bounds__(kThreads, 2) pointwise_fused_kernel(const Params p) {
  constexpr int kWarpsN = 8 / kWarpsM;
  constexpr int kWarpRows = kBM / kWarpsM;  // rows per warp
  constexpr int kWarpCols = BN / kWarpsN;   // cols per warp
  constexpr int kMT = kWarpRows / 16;       // m16 tiles per warp
  constexpr int kNT = kWarpCols / 8;        // n8 tiles per warp
  constexpr int kBRowsPerThread = BN / 64;  // 4 threads x 16 B per 64-byte weight row
  __shared__ __align__(16) int8_t a_tile[2][kBM * kRowBytes];
  __shared__ __align__(16) int8_t b_tile[2][BN * kRowBytes];

  const T* x = static_cast<const T*>(p.x);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t m0 = int64_t(blockIdx.x) * kBM;
  const int n0 = blockIdx.y * BN;
  const float scale = effective_scale(*p.scale_a, p.eps);
  const float inv_scale = 1.0f / scale;

  // This thread's share of the loads: A chunk tid + kThreads * i is row
  // (chunk / 8), channels (chunk % 8) * 8 ...; B rows b_row + 64 * i, bytes
  // b_part * 16 ... of the step's 64.
  const int a_part = tid & 7;
  const int b_row = tid >> 2, b_part = tid & 3;
  const int8_t* b_src = p.weight + int64_t(n0 + b_row) * p.c + b_part * 16;

  Chunk8<T> a_regs[kAChunks];
  uint4 b_regs[kBRowsPerThread];
  auto load_step = [&](int k0) {
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) {
      const int row = (tid >> 3) + i * (kThreads / 8);
      const bool valid = m0 + row < p.m;
      const uint4* src = reinterpret_cast<const uint4*>(x + (m0 + row) * p.c + k0 + a_part * 8);
#pragma unroll
      for (int v = 0; v < int(sizeof(T)) / 2; ++v)
        a_regs[i].raw[v] = valid ? __ldcs(src + v) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < kBRowsPerThread; ++i)
      b_regs[i] = __ldg(reinterpret_cast<const uint4*>(b_src + int64_t(64 * i) * p.c + k0));
  };
  // Quantizes the loaded A values into stage `stage` (rows past m get codes
  // of zeros; their outputs are never stored).
  auto store_step = [&](int stage, int k0) {
    const float4* bias4 = reinterpret_cast<const float4*>(p.bias_a + k0 + a_part * 8);
    const float4 b0 = __ldg(bias4), b1 = __ldg(bias4 + 1);
    const float bias[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) {
      const int row = (tid >> 3) + i * (kThreads / 8);
      union {
        uint2 raw;
        int8_t q[8];
      } codes;
#pragma unroll
      for (int j = 0; j < 8; ++j)
        codes.q[j] =
            quantize_value_fast(to_float(a_regs[i].e[j]) + bias[j], scale, inv_scale, p.bits);
      *reinterpret_cast<uint2*>(&a_tile[stage][row * kRowBytes + a_part * 8]) = codes.raw;
    }
#pragma unroll
    for (int i = 0; i < kBRowsPerThread; ++i)
      *reinterpret_cast<uint4*>(&b_tile[stage][(b_row + 64 * i) * kRowBytes + b_part * 16]) =
          b_regs[i];
  };

  int acc[kMT][kNT][4] = {};
  const int warp_m = warp % kWarpsM, warp_n = warp / kWarpsM;
  const int g = lane >> 2, t4 = lane & 3;
  const int steps = p.c / kBK;

  load_step(0);
  store_step(0, 0);
  __syncthreads();
  for (int step = 0; step < steps; ++step) {
    const int stage = step & 1;
    if (step + 1 < steps) load_step((step + 1) * kBK);
    const int8_t* a_s = a_tile[stage];
    const int8_t* b_s = b_tile[stage];
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 32) {
      uint32_t a_frag[kMT][4], b_frag[kNT][2];
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
        const int r = warp_m * kWarpRows + i * 16 + g;
        const int8_t* base = a_s + r * kRowBytes + kk + t4 * 4;
        a_frag[i][0] = *reinterpret_cast<const uint32_t*>(base);
        a_frag[i][1] = *reinterpret_cast<const uint32_t*>(base + 8 * kRowBytes);
        a_frag[i][2] = *reinterpret_cast<const uint32_t*>(base + 16);
        a_frag[i][3] = *reinterpret_cast<const uint32_t*>(base + 8 * kRowBytes + 16);
      }
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const int n = warp_n * kWarpCols + j * 8 + g;
        const int8_t* base = b_s + n * kRowBytes + kk + t4 * 4;
        b_frag[j][0] = *reinterpret_cast<const uint32_t*>(base);
        b_frag[j][1] = *reinterpret_cast<const uint32_t*>(base + 16);
      }
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j) mma_s8(acc[i][j], a_frag[i], b_frag[j][0], b_frag[j][1]);
    }
    if (step + 1 < steps) store_step(stage ^ 1, (step + 1) * kBK);
    __syncthreads();
  }

  // Epilogue: out[m, n] = act(alpha[n] * acc + bias[n]), as the sm90 EVT.
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    const int n = n0 + warp_n * kWarpCols + j * 8 + t4 * 2;
    const float al0 = p.epi.alpha[n], al1 = p.epi.alpha[n + 1];
    const float bi0 = p.epi.bias != nullptr ? p.epi.bias[n] : 0.0f;
    const float bi1 = p.epi.bias != nullptr ? p.epi.bias[n + 1] : 0.0f;
    const float lower = p.epi.relu ? 0.0f : -INFINITY;
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t m = m0 + warp_m * kWarpRows + i * 16 + g + 8 * half;
        if (m >= p.m) continue;
        const float v0 = fmaxf(al0 * float(acc[i][j][2 * half]) + bi0, lower);
        const float v1 = fmaxf(al1 * float(acc[i][j][2 * half + 1]) + bi1, lower);
        const int64_t offset = m * p.k + n;
        switch (p.epi.out_type) {
          case OutType::kFloat32:
            OutCvt<float>::store2(static_cast<float*>(p.epi.out) + offset, v0, v1);
            break;
          case OutType::kFloat16:
            OutCvt<__half>::store2(static_cast<__half*>(p.epi.out) + offset, v0, v1);
            break;
          case OutType::kBFloat16:
            OutCvt<__nv_bfloat16>::store2(static_cast<__nv_bfloat16*>(p.epi.out) + offset, v0, v1);
            break;
        }
      }
    }
  }
}

template <typename T>
void launch(const Params& p, cudaStream_t stream) {
  const dim3 block(kThreads);
  const unsigned row_blocks = static_cast<unsigned>((p.m + kBM - 1) / kBM);
  // 128 output channels per block where K allows it (each block quantizes its
  // rows once per column block), else 64.
  if (p.k % 128 == 0) {
    pointwise_fused_kernel<T, 128, 2><<<dim3(row_blocks, p.k / 128), block, 0, stream>>>(p);
  } else {
    pointwise_fused_kernel<T, 64, 4><<<dim3(row_blocks, p.k / 64), block, 0, stream>>>(p);
  }
}

}  // namespace

bool pointwise_fused_supports(int64_t pixels, int channels, int out_channels) {
  return pixels > 0 && pixels / kBM < 0x7fffffff && channels % kBK == 0 && channels > 0 &&
         out_channels % 64 == 0 && out_channels > 0 && out_channels / 64 <= 65535;
}

KernelStatus pointwise_fused_conv(const void* x, InType x_type, int64_t pixels, int channels,
                                  const float* bias_a, const float* scale_a, float eps, int bits,
                                  const int8_t* weight, int out_channels,
                                  const EpilogueArgs& epilogue, cudaStream_t stream) {
  if (!pointwise_fused_supports(pixels, channels, out_channels))
    return KernelStatus::failure(
        "pointwise_fused_conv: unsupported shape (needs C % 64 == 0 and K % 64 == 0)");
  if (x == nullptr || weight == nullptr || scale_a == nullptr || epilogue.alpha == nullptr ||
      epilogue.out == nullptr)
    return KernelStatus::failure("pointwise_fused_conv: null pointer argument");
  if (bias_a == nullptr || ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(weight) |
                             reinterpret_cast<uintptr_t>(bias_a)) &
                            15) != 0)
    return KernelStatus::failure(
        "pointwise_fused_conv: x, weight and bias_a must be non-null and 16-byte aligned");
  Params p{x, weight, bias_a, scale_a, eps, bits, pixels, channels, out_channels, epilogue};
  switch (x_type) {
    case InType::kFloat32:
      launch<float>(p, stream);
      break;
    case InType::kFloat16:
      launch<__half>(p, stream);
      break;
    case InType::kBFloat16:
      launch<__nv_bfloat16>(p, stream);
      break;
  }
  return launch_status("pointwise_fused_conv");
}

}  // namespace q4conv
