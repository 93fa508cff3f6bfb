// CUDA quantization kernels (interface: quantize_kernels.h). No torch here.
//
// Every code is computed by the functions of ../quant.h (quantize_values_fast,
// quantize_value_fast, quantize_value, pack_int4_pair, unpack_int4,
// effective_scale), so the codes are bit-identical to the CPU path. Do not
// build this file with fast-math: quant.h divides (IEEE fp32 division) and
// relies on round-half-to-even.
//
// Activation / weight quantization paths, the first that fits is taken:
//   * channels_last, int8 out, C % 8 == 0, no channel padding: 8-channel
//     vectors, 4 per thread, 32-bit index math (dense, or the every-other-
//     pixel view of a strided 1x1 convolution).
//   * dense channels_last, int8 out, any C, no channel padding: a flat array,
//     8 consecutive elements per thread across channels (the RGB stem).
//   * channels_last (stride[1] == 1, C > 1): one thread per (pixel, group of
//     16 channels); 16-byte vector loads when the group is inside C and its
//     address is 16-byte aligned, 16-byte (int8) / 8-byte (int4) stores when
//     the output group is inside c_pad and aligned; scalar otherwise.
//   * NCHW with planes under 32 pixels (weights K x C x R x S): one thread
//     per (n, output byte) walking the plane.
//   * NCHW (the H*W plane of each (n, c) is contiguous): 32 pixels x 32
//     channels shared-memory tile transpose; reads coalesced along W, writes
//     coalesced along C.
//   * generic strided: one thread per output byte.
// Weight launches can also write the epilogue scales alpha (AlphaOut), and
// every kernel lets a programmatically launched GEMM after it start early.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>

#include "../quant.h"
#include "device_common.cuh"
#include "quantize_kernels.h"

namespace q4conv {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride beyond this

using device::to_float;

// Parameters shared by the activation and weight kernels. The weight path is
// the int4 activation path with no bias and (optionally) a scale per n = k.
struct QParams {
  int64_t n, c, h, w;      // sizes
  int64_t s0, s1, s2, s3;  // strides, elements
  const float* bias;       // [C] on the device, or nullptr (no bias)
  const float* scale;      // device: 1 value, or [N] when scale_per_n
  bool scale_per_n;
  float eps;
  int bits;
  int c_pad;
  AlphaOut alpha;  // weights only: alpha[n] also written (quantize_kernels.h)
};

// The effective scale and its reciprocal (quantize_value_fast multiplies).
struct Scale {
  float s, inv;
};

__device__ __forceinline__ Scale eff_scale(const QParams& p, int64_t n) {
  const float s = effective_scale(p.scale[p.scale_per_n ? n : 0], p.eps);
  return {s, 1.0f / s};
}

// Epilogue scale of output channel k: max(*scale_a, eps) * max(scale_w[k or
// 0], eps) (output_alpha_fp32, AlphaOut).
__device__ __forceinline__ float output_alpha(const float* scale_a, const float* scale_w,
                                              bool per_channel, int64_t k, float eps) {
  return effective_scale(*scale_a, eps) * effective_scale(scale_w[per_channel ? k : 0], eps);
}

// What every quantization kernel does first: the first block writes alpha[n]
// for every n when asked to (QParams::alpha, weights only), and every block
// lets a programmatically launched GEMM after this grid start early.
__device__ __forceinline__ void begin_quantize_kernel(const QParams& p) {
  device::allow_dependent_launch();
  if (p.alpha.alpha == nullptr || blockIdx.x != 0 || blockIdx.y != 0) return;
  const int threads = blockDim.x * blockDim.y;
  for (int64_t n = threadIdx.y * blockDim.x + threadIdx.x; n < p.n; n += threads)
    p.alpha.alpha[n] = output_alpha(p.alpha.scale_a, p.scale, p.scale_per_n, n, p.eps);
}

// Code of channel c from an already loaded value; channels >= C are zero.
// Bit-identical to quantize_activation / quantize_value (see quant.h).
__device__ __forceinline__ int8_t code_of(const QParams& p, float v, int64_t c, Scale s) {
  if (c >= p.c) return 0;
  const float shifted = p.bias != nullptr ? v + p.bias[c] : v;
  return quantize_value_fast(shifted, s.s, s.inv, p.bits);
}

// Loads channel c (only when c < C) of the pixel at element offset `base`.
template <typename T>
__device__ __forceinline__ int8_t load_code(const T* __restrict__ x, const QParams& p, int64_t base,
                                            int64_t c, Scale s) {
  if (c >= p.c) return 0;
  return code_of(p, to_float(x[base + c * p.s1]), c, s);
}

__host__ __device__ __forceinline__ bool aligned(const void* ptr, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) & (bytes - 1)) == 0;
}

// kV consecutive elements (kV * sizeof(T) bytes, a multiple of 16) from a
// 16-byte aligned address.
template <typename T, int kV>
__device__ __forceinline__ void load_vec(const T* __restrict__ src, float (&v)[kV]) {
  constexpr int kLoads = kV * static_cast<int>(sizeof(T)) / 16;  // uint4s
  constexpr int kPer = kV / kLoads;
  const uint4* src4 = reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int k = 0; k < kLoads; ++k) {
    union {
      uint4 raw;
      T e[kPer];
    } u;
    u.raw = __ldcs(src4 + k);  // read once: stream past L1 / evict first
#pragma unroll
    for (int j = 0; j < kPer; ++j) v[k * kPer + j] = to_float(u.e[j]);
  }
}

// ---- generic strided path: one thread per output byte ---------------------
template <typename T, bool kInt4>
__global__ void __launch_bounds__(kThreads)
    quantize_generic_kernel(const T* __restrict__ x, QParams p, uint8_t* __restrict__ out) {
  begin_quantize_kernel(p);
  const int64_t row = kInt4 ? p.c_pad / 2 : p.c_pad;  // output bytes per pixel
  const int64_t total = p.n * p.h * p.w * row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i % row;
    const int64_t pix = i / row;
    const int64_t wi = pix % p.w;
    const int64_t t = pix / p.w;
    const int64_t hi = t % p.h;
    const int64_t ni = t / p.h;
    const Scale s = eff_scale(p, ni);
    const int64_t base = ni * p.s0 + hi * p.s2 + wi * p.s3;
    if (kInt4) {
      const int8_t even = load_code(x, p, base, 2 * b, s);
      const int8_t odd = load_code(x, p, base, 2 * b + 1, s);
      out[i] = pack_int4_pair(even, odd);
    } else {
      out[i] = static_cast<uint8_t>(load_code(x, p, base, b, s));
    }
  }
}

// ---- channels_last path: one thread per (pixel, 16 channels) ---------------
template <typename T, bool kInt4>
__global__ void __launch_bounds__(kThreads)
    quantize_cl_kernel(const T* __restrict__ x, QParams p, uint8_t* __restrict__ out) {
  begin_quantize_kernel(p);
  constexpr int G = 16;
  const int64_t groups = (p.c_pad + G - 1) / G;
  const int64_t row = kInt4 ? p.c_pad / 2 : p.c_pad;
  const int64_t total = p.n * p.h * p.w * groups;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = i % groups;
    const int64_t pix = i / groups;
    const int64_t wi = pix % p.w;
    const int64_t t = pix / p.w;
    const int64_t hi = t % p.h;
    const int64_t ni = t / p.h;
    const Scale s = eff_scale(p, ni);
    const int64_t c0 = g * G;
    int8_t q[G];
    if (c0 < p.c) {
      const T* src = x + (ni * p.s0 + hi * p.s2 + wi * p.s3) + c0;  // stride[1] == 1
      float v[G];
      if (c0 + G <= p.c && aligned(src, 16)) {
        load_vec<T, 16>(src, v);
      } else {
#pragma unroll
        for (int j = 0; j < G; ++j) v[j] = (c0 + j < p.c) ? to_float(src[j]) : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < G; ++j) q[j] = code_of(p, v[j], c0 + j, s);
    } else {
#pragma unroll
      for (int j = 0; j < G; ++j) q[j] = 0;
    }
    const bool full = c0 + G <= p.c_pad;
    if (kInt4) {
      uint8_t* dst = out + pix * row + c0 / 2;
      union {
        uint2 raw;
        uint8_t b[G / 2];
      } u;
#pragma unroll
      for (int j = 0; j < G / 2; ++j) u.b[j] = pack_int4_pair(q[2 * j], q[2 * j + 1]);
      if (full && aligned(dst, 8)) {
        *reinterpret_cast<uint2*>(dst) = u.raw;
      } else {
#pragma unroll
        for (int j = 0; j < G / 2; ++j)
          if (c0 + 2 * j < p.c_pad) dst[j] = u.b[j];
      }
    } else {
      uint8_t* dst = out + pix * row + c0;
      union {
        uint4 raw;
        int8_t b[G];
      } u;
#pragma unroll
      for (int j = 0; j < G; ++j) u.b[j] = q[j];
      if (full && aligned(dst, 16)) {
        *reinterpret_cast<uint4*>(dst) = u.raw;
      } else {
#pragma unroll
        for (int j = 0; j < G; ++j)
          if (c0 + j < p.c_pad) dst[j] = static_cast<uint8_t>(u.b[j]);
      }
    }
  }
}

// ---- channels_last, int8 out, 8-channel vectors ----------------------------
// The common inference case (sm90 backend): C % 8 == 0, c_pad == C, channel
// stride 1, other strides multiples of 8 elements: dense NHWC (kDense: the
// output index is the input index) or the every-other-pixel view a strided
// 1x1 convolution reads. A block quantizes kThreads * kVecsPerThread vectors
// of 8 channels, each thread issuing its kVecsPerThread 16-byte loads before
// any arithmetic; index math is 32-bit. Measured reason: the
// generic channels_last kernel moved only 1.0-1.8 TB/s, bound by 64-bit index
// arithmetic and one load in flight per thread, not by DRAM. 16-channel
// vectors (two 16-byte fp16 loads, one 16-byte store) measured 10-40% slower
// on H100.
constexpr int kVec = 8;
constexpr int kVecsPerThread = 4;
constexpr int64_t kVecTile = int64_t(kThreads) * kVecsPerThread;

// Element offset of pixel `pix` (flat n, h, w index) in a strided x.
__device__ __forceinline__ int64_t pixel_offset(const QParams& p, uint32_t pix) {
  const uint32_t w = static_cast<uint32_t>(p.w), h = static_cast<uint32_t>(p.h);
  const uint32_t wi = pix % w, t = pix / w;
  return int64_t(t / h) * p.s0 + int64_t(t % h) * p.s2 + int64_t(wi) * p.s3;
}

// The codes of kVec shifted values (quantize_values_fast) as one 8-byte store
// to an 8-byte aligned dst.
__device__ __forceinline__ void store_codes8(const float (&shifted)[kVec], Scale s, int bits,
                                             int8_t* dst) {
  union {
    uint2 raw;
    int8_t q[kVec];
  } u;
  quantize_values_fast(shifted, s.s, s.inv, bits, u.q);
  *reinterpret_cast<uint2*>(dst) = u.raw;
}

// The loaded vectors stay raw (uint4) until their turn to be converted: half
// the registers of float copies (40 instead of 52 for fp16 input: 6 blocks per
// SM instead of 4), so more loads in flight per SM (C256->K128 56x56 pass
// 64.6 -> 57.3 us on H100). Forcing 8 blocks (32
// registers, a small spill) measured no better.
template <typename T, bool kDense>
__global__ void __launch_bounds__(kThreads)
    quantize_vec8_int8_kernel(const T* __restrict__ x, QParams p, uint32_t vecs,
                              int8_t* __restrict__ out) {
  constexpr int kUnits = kVec * static_cast<int>(sizeof(T)) / 16;  // uint4s per vector
  begin_quantize_kernel(p);
  const uint32_t vecs_per_pixel = static_cast<uint32_t>(p.c) / kVec;
  const uint32_t first = blockIdx.x * uint32_t(kVecTile) + threadIdx.x;
  uint4 raw[kVecsPerThread][kUnits];
#pragma unroll
  for (int j = 0; j < kVecsPerThread; ++j) {
    const uint32_t v = first + j * kThreads;
    if (v >= vecs) break;
    const uint32_t pix = v / vecs_per_pixel;
    const uint32_t c0 = (v - pix * vecs_per_pixel) * kVec;
    const uint4* src = reinterpret_cast<const uint4*>(kDense ? x + int64_t(v) * kVec
                                                             : x + pixel_offset(p, pix) + c0);
#pragma unroll
    for (int u = 0; u < kUnits; ++u) raw[j][u] = __ldcs(src + u);  // read once: evict first
  }
  const Scale s = eff_scale(p, 0);
#pragma unroll
  for (int j = 0; j < kVecsPerThread; ++j) {
    const uint32_t v = first + j * kThreads;
    if (v >= vecs) break;
    const uint32_t c0 = (v % vecs_per_pixel) * kVec;
    float bias[kVec] = {};
    if (p.bias != nullptr) {
      const float4 b0 = __ldg(reinterpret_cast<const float4*>(p.bias + c0));
      const float4 b1 = __ldg(reinterpret_cast<const float4*>(p.bias + c0) + 1);
      bias[0] = b0.x, bias[1] = b0.y, bias[2] = b0.z, bias[3] = b0.w;
      bias[4] = b1.x, bias[5] = b1.y, bias[6] = b1.z, bias[7] = b1.w;
    }
    union {
      uint4 units[kUnits];
      T e[kVec];
    } in;
#pragma unroll
    for (int u = 0; u < kUnits; ++u) in.units[u] = raw[j][u];
    float shifted[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) shifted[k] = to_float(in.e[k]) + bias[k];
    store_codes8(shifted, s, p.bits, out + int64_t(v) * kVec);
  }
}

// ---- dense channels_last, int8 out, any C: a flat array ---------------------
// With c_pad == C the codes are x's dense NHWC elements in the same order, and
// element i has channel i % C: each thread quantizes 8 consecutive elements
// (16-byte loads) walking the channel instead of dividing per element. For
// C % 8 != 0, chiefly the RGB stem (C = 3), where the channels_last path's
// 16-channel groups left 13 of every 16 codes empty: 72 us for a 64 x 3 x 224
// x 224 fp16 input on H100.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_flat_int8_kernel(const T* __restrict__ x, QParams p, uint32_t total,
                              int8_t* __restrict__ out) {
  begin_quantize_kernel(p);
  const Scale s = eff_scale(p, 0);
  const uint32_t channels = static_cast<uint32_t>(p.c);
  const uint32_t step = gridDim.x * uint32_t(kThreads) * kVec;
  for (uint32_t i = (blockIdx.x * uint32_t(kThreads) + threadIdx.x) * kVec; i < total; i += step) {
    uint32_t c = i % channels;
    if (i + kVec <= total) {
      float v[kVec];
      load_vec<T, kVec>(x + i, v);
      float shifted[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        shifted[k] = p.bias != nullptr ? v[k] + p.bias[c] : v[k];
        c = c + 1 == channels ? 0 : c + 1;
      }
      store_codes8(shifted, s, p.bits, out + i);
    } else {
      for (uint32_t j = i; j < total; ++j) {
        out[j] = code_of(p, to_float(x[j]), c, s);
        c = c + 1 == channels ? 0 : c + 1;
      }
    }
  }
}

// True when quantize_flat_int8_kernel can take the call (see its comment).
template <typename T>
bool flat_path_ok(const T* x, const QParams& p, const void* out) {
  const bool dense_nhwc = p.s1 == 1 && p.s3 == p.c && p.s2 == p.w * p.c && p.s0 == p.h * p.w * p.c;
  return !p.scale_per_n && p.c > 0 && p.c_pad == p.c && dense_nhwc &&
         p.n * p.h * p.w * p.c <= INT_MAX - 2 * kVec * kThreads && aligned(x, 16) &&
         aligned(out, 8);
}

// True when quantize_vec8_int8_kernel can take the call (see its comment).
template <typename T>
bool vec8_path_ok(const T* x, const QParams& p, const void* out) {
  const auto mult8 = [](int64_t v) { return v % kVec == 0; };
  return !p.scale_per_n && p.c > 0 && mult8(p.c) && p.c_pad == p.c && p.s1 == 1 && mult8(p.s0) &&
         mult8(p.s2) && mult8(p.s3) && p.n * p.h * p.w * p.c / kVec <= INT_MAX && aligned(x, 16) &&
         aligned(out, 8) && (p.bias == nullptr || aligned(p.bias, 16));
}

// ---- NCHW with small planes (weights: K x C x R x S) ---------------------------
// One thread per (n, output byte column): it walks the plane's h * w pixels
// (consecutive elements of its channel, so a warp's loads share cache lines)
// and writes one byte per pixel (consecutive threads, consecutive bytes). For
// planes smaller than a transpose tile (3x3 and 1x1 filters), where the tile
// path left most lanes idle: 22 us for a 512 x 512 x 3 x 3 weight on H100.
template <typename T, bool kInt4>
__global__ void __launch_bounds__(kThreads)
    quantize_small_planes_kernel(const T* __restrict__ x, QParams p, uint8_t* __restrict__ out) {
  begin_quantize_kernel(p);
  const uint32_t row = static_cast<uint32_t>(kInt4 ? p.c_pad / 2 : p.c_pad);
  const uint32_t plane = static_cast<uint32_t>(p.h * p.w);
  const uint32_t items = static_cast<uint32_t>(p.n) * row;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < items; i += gridDim.x * blockDim.x) {
    const uint32_t b = i % row, ni = i / row;
    const Scale s = eff_scale(p, ni);
    const int64_t base = int64_t(ni) * p.s0;
    uint8_t* dst = out + int64_t(ni) * plane * row + b;
    for (uint32_t pix = 0; pix < plane; ++pix) {
      if (kInt4) {
        dst[int64_t(pix) * row] = pack_int4_pair(load_code(x, p, base + pix, 2 * b, s),
                                                 load_code(x, p, base + pix, 2 * b + 1, s));
      } else {
        dst[int64_t(pix) * row] = static_cast<uint8_t>(load_code(x, p, base + pix, b, s));
      }
    }
  }
}

// ---- NCHW path: shared-memory tile transpose -------------------------------
// Block (32, 8): tile of kTileP pixels x kTileC channels of one n. The pixel
// offset inside the (n, c) plane is the flat index h * W + w (checked by the
// caller). blockIdx.x = n * ptiles + pixel tile, blockIdx.y = channel tile.
constexpr int kTileP = 32;
constexpr int kTileC = 32;
constexpr int kTileRows = 8;

template <typename T, bool kInt4>
__global__ void __launch_bounds__(kTileP* kTileRows)
    quantize_nchw_kernel(const T* __restrict__ x, QParams p, uint8_t* __restrict__ out,
                         int64_t ptiles) {
  begin_quantize_kernel(p);
  // [pixel][channel]; row pitch 36 bytes (odd number of words): the column
  // writes of the read phase hit distinct banks.
  __shared__ __align__(4) int8_t tile[kTileP][kTileC + 4];
  const int64_t hw = p.h * p.w;
  const int64_t ni = blockIdx.x / ptiles;
  const int64_t p0 = (blockIdx.x % ptiles) * kTileP;
  const int64_t c0 = int64_t(blockIdx.y) * kTileC;
  const Scale s = eff_scale(p, ni);
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;

  {
    const int64_t pix = p0 + tx;
    const T* plane = x + ni * p.s0 + pix;
#pragma unroll
    for (int k = 0; k < kTileC / kTileRows; ++k) {
      const int cl = ty + k * kTileRows;
      const int64_t c = c0 + cl;
      int8_t q = 0;
      if (pix < hw && c < p.c) q = code_of(p, to_float(plane[c * p.s1]), c, s);
      tile[tx][cl] = q;
    }
  }
  __syncthreads();

  // Write: thread -> (pixel, 4 consecutive channels).
  const int t = ty * kTileP + tx;
  const int lp = t / (kTileC / 4);
  const int chunk = t % (kTileC / 4);
  const int64_t pix = p0 + lp;
  const int64_t c = c0 + 4 * chunk;
  if (pix >= hw || c >= p.c_pad) return;
  union {
    uint32_t raw;
    int8_t q[4];
  } u;
  u.raw = *reinterpret_cast<const uint32_t*>(&tile[lp][4 * chunk]);
  const int64_t opix = ni * hw + pix;
  const bool full = c + 4 <= p.c_pad;
  if (kInt4) {
    uint8_t* dst = out + opix * (p.c_pad / 2) + c / 2;
    const uint8_t b0 = pack_int4_pair(u.q[0], u.q[1]);
    const uint8_t b1 = pack_int4_pair(u.q[2], u.q[3]);
    if (full && aligned(dst, 2)) {
      *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(b0 | (b1 << 8));
    } else {
      dst[0] = b0;                       // c < c_pad and c_pad even: c + 1 < c_pad
      if (c + 2 < p.c_pad) dst[1] = b1;  // then c + 3 < c_pad as well
    }
  } else {
    uint8_t* dst = out + opix * p.c_pad + c;
    if (full && aligned(dst, 4)) {
      *reinterpret_cast<uint32_t*>(dst) = u.raw;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (c + j < p.c_pad) dst[j] = static_cast<uint8_t>(u.q[j]);
    }
  }
}

// ---- unpack / repack --------------------------------------------------------
__device__ __forceinline__ int8_t packed_code(const uint8_t* __restrict__ packed, int64_t r,
                                              int c_in, int channels, int64_t c) {
  if (c >= channels) return 0;
  return unpack_int4(packed[r * (c_in / 2) + c / 2], (c & 1) != 0);
}

__global__ void __launch_bounds__(kThreads)
    unpack_int4_to_int8_kernel(const uint8_t* __restrict__ packed, int64_t rows, int c_in,
                               int channels, int c_out, int8_t* __restrict__ out) {
  const int64_t total = rows * c_out;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / c_out;
    const int64_t c = i % c_out;
    out[i] = packed_code(packed, r, c_in, channels, c);
  }
}

__global__ void __launch_bounds__(kThreads)
    repack_int4_kernel(const uint8_t* __restrict__ packed, int64_t rows, int c_in, int channels,
                       int c_out, uint8_t* __restrict__ out) {
  const int64_t row = c_out / 2;
  const int64_t total = rows * row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / row;
    const int64_t b = i % row;
    out[i] = pack_int4_pair(packed_code(packed, r, c_in, channels, 2 * b),
                            packed_code(packed, r, c_in, channels, 2 * b + 1));
  }
}

__global__ void __launch_bounds__(kThreads)
    output_alpha_kernel(const float* __restrict__ scale_a, const float* __restrict__ scale_w,
                        bool per_channel, float eps, int out_channels, float* __restrict__ alpha) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k < out_channels) alpha[k] = output_alpha(scale_a, scale_w, per_channel, k, eps);
}

// ---- host side ----------------------------------------------------------------
int grid_for(int64_t work) {
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks < 1) blocks = 1;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return static_cast<int>(blocks);
}

std::string fail_prefix(const char* fn, const char* arg) {
  return std::string(fn) + ": invalid argument '" + arg + "': ";
}

KernelStatus validate_view(const char* fn, const char* name, const Tensor4dView& v) {
  for (int d = 0; d < 4; ++d) {
    if (v.size[d] < 0)
      return KernelStatus::failure(fail_prefix(fn, name) + "negative size[" + std::to_string(d) +
                                   "] = " + std::to_string(v.size[d]));
  }
  if (!AllInTypes::contains(v.type))
    return KernelStatus::failure(fail_prefix(fn, name) + "unsupported element type");
  return KernelStatus::success();
}

// Chooses the path and launches. p.n/c/h/w must be > 0 (except c, may be 0).
template <typename T, bool kInt4>
KernelStatus launch_quantize(const char* fn, const T* x, const QParams& p, uint8_t* out,
                             cudaStream_t stream) {
  if (!kInt4 && vec8_path_ok(x, p, out)) {
    const uint32_t vecs = static_cast<uint32_t>(p.n * p.h * p.w * p.c / kVec);
    const unsigned blocks = static_cast<unsigned>((vecs + kVecTile - 1) / kVecTile);
    const bool dense = p.s3 == p.c && p.s2 == p.w * p.c && p.s0 == p.h * p.w * p.c;
    int8_t* codes = reinterpret_cast<int8_t*>(out);
    if (dense)
      quantize_vec8_int8_kernel<T, true><<<blocks, kThreads, 0, stream>>>(x, p, vecs, codes);
    else
      quantize_vec8_int8_kernel<T, false><<<blocks, kThreads, 0, stream>>>(x, p, vecs, codes);
    return launch_status(fn);
  }
  const bool cl = p.c > 1 && p.s1 == 1;
  const bool nchw = (p.w == 1 || p.s3 == 1) && (p.h == 1 || p.s2 == p.w);
  if (!kInt4 && flat_path_ok(x, p, out)) {
    const int64_t total = p.n * p.h * p.w * p.c;
    quantize_flat_int8_kernel<T><<<grid_for((total + kVec - 1) / kVec), kThreads, 0, stream>>>(
        x, p, static_cast<uint32_t>(total), reinterpret_cast<int8_t*>(out));
    return launch_status(fn);
  }
  if (cl) {
    const int64_t groups = (p.c_pad + 15) / 16;
    quantize_cl_kernel<T, kInt4>
        <<<grid_for(p.n * p.h * p.w * groups), kThreads, 0, stream>>>(x, p, out);
    return launch_status(fn);
  }
  if (nchw && p.h * p.w < kTileP && p.n * (kInt4 ? p.c_pad / 2 : p.c_pad) <= INT_MAX) {
    quantize_small_planes_kernel<T, kInt4>
        <<<grid_for(p.n * (kInt4 ? p.c_pad / 2 : p.c_pad)), kThreads, 0, stream>>>(x, p, out);
    return launch_status(fn);
  }
  if (nchw) {
    const int64_t hw = p.h * p.w;
    const int64_t ptiles = (hw + kTileP - 1) / kTileP;
    const int64_t ctiles = (int64_t(p.c_pad) + kTileC - 1) / kTileC;
    if (ptiles * p.n <= INT_MAX && ctiles <= 65535 && ctiles >= 1) {
      const dim3 grid(static_cast<unsigned>(ptiles * p.n), static_cast<unsigned>(ctiles));
      const dim3 block(kTileP, kTileRows);
      quantize_nchw_kernel<T, kInt4><<<grid, block, 0, stream>>>(x, p, out, ptiles);
      return launch_status(fn);
    }
  }
  const int64_t row = kInt4 ? p.c_pad / 2 : p.c_pad;
  quantize_generic_kernel<T, kInt4>
      <<<grid_for(p.n * p.h * p.w * row), kThreads, 0, stream>>>(x, p, out);
  return launch_status(fn);
}

template <bool kInt4>
KernelStatus quantize_common(const char* fn, const char* xname, const Tensor4dView& x,
                             const float* bias, const char* scale_name, const float* scale,
                             bool scale_per_n, float eps, int bits, int c_pad, void* out,
                             cudaStream_t stream, AlphaOut alpha = {}) {
  KernelStatus st = validate_view(fn, xname, x);
  if (!st.ok) return st;
  const int max_bits = kInt4 ? 4 : 8;
  if (bits < 2 || bits > max_bits)
    return KernelStatus::failure(fail_prefix(fn, "bits") + "must be in [2, " +
                                 std::to_string(max_bits) + "], got " + std::to_string(bits));
  if (c_pad < x.size[1])
    return KernelStatus::failure(fail_prefix(fn, "c_pad") + "c_pad = " + std::to_string(c_pad) +
                                 " is smaller than C = " + std::to_string(x.size[1]));
  if (kInt4 && (c_pad % 2) != 0)
    return KernelStatus::failure(fail_prefix(fn, "c_pad") + "must be even for packed int4, got " +
                                 std::to_string(c_pad));
  const int64_t pixels = x.size[0] * x.size[2] * x.size[3];
  if (pixels == 0 || c_pad == 0) return KernelStatus::success();  // empty output
  if (out == nullptr) return KernelStatus::failure(fail_prefix(fn, "out") + "null pointer");
  if (scale == nullptr) return KernelStatus::failure(fail_prefix(fn, scale_name) + "null pointer");
  if (x.size[1] > 0 && x.data == nullptr)
    return KernelStatus::failure(fail_prefix(fn, xname) + "null data pointer");

  QParams p;
  p.n = x.size[0];
  p.c = x.size[1];
  p.h = x.size[2];
  p.w = x.size[3];
  p.s0 = x.stride[0];
  p.s1 = x.stride[1];
  p.s2 = x.stride[2];
  p.s3 = x.stride[3];
  p.bias = bias;
  p.scale = scale;
  p.scale_per_n = scale_per_n;
  p.eps = eps;
  p.bits = bits;
  p.c_pad = c_pad;
  p.alpha = alpha;
  if ((alpha.alpha == nullptr) != (alpha.scale_a == nullptr))
    return KernelStatus::failure(fail_prefix(fn, "alpha") + "alpha and scale_a must both be set");
  uint8_t* o = static_cast<uint8_t*>(out);
  return with_in_type(
      x.type,
      [&](auto in) {
        using T = in_element_of<decltype(in)>;
        return launch_quantize<T, kInt4>(fn, static_cast<const T*>(x.data), p, o, stream);
      },
      [&] { return KernelStatus::failure(fail_prefix(fn, xname) + "unsupported element type"); });
}

KernelStatus validate_relayout(const char* fn, const uint8_t* packed, int64_t rows, int c_in,
                               int channels, int c_out, const void* out, bool packed_out) {
  if (rows < 0)
    return KernelStatus::failure(fail_prefix(fn, "rows") + "negative: " + std::to_string(rows));
  if (c_in < 0 || (c_in % 2) != 0)
    return KernelStatus::failure(fail_prefix(fn, "c_in") + "must be even and >= 0, got " +
                                 std::to_string(c_in));
  if (channels < 0 || channels > c_in)
    return KernelStatus::failure(fail_prefix(fn, "channels") + "must be in [0, c_in = " +
                                 std::to_string(c_in) + "], got " + std::to_string(channels));
  if (c_out < channels)
    return KernelStatus::failure(fail_prefix(fn, "c_out") + "c_out = " + std::to_string(c_out) +
                                 " is smaller than channels = " + std::to_string(channels));
  if (packed_out && (c_out % 2) != 0)
    return KernelStatus::failure(fail_prefix(fn, "c_out") + "must be even for packed int4, got " +
                                 std::to_string(c_out));
  if (rows == 0 || c_out == 0) return KernelStatus::success();
  if (out == nullptr) return KernelStatus::failure(fail_prefix(fn, "out") + "null pointer");
  if (channels > 0 && packed == nullptr)
    return KernelStatus::failure(fail_prefix(fn, "packed") + "null pointer");
  return KernelStatus::success();
}

}  // namespace

KernelStatus quantize_activation_int8_nhwc(const Tensor4dView& x, const float* bias_a,
                                           const float* scale_a, float eps, int bits, int c_pad,
                                           int8_t* out, cudaStream_t stream) {
  return quantize_common<false>("quantize_activation_int8_nhwc", "x", x, bias_a, "scale_a", scale_a,
                                false, eps, bits, c_pad, out, stream);
}

KernelStatus quantize_activation_int4_nhwc(const Tensor4dView& x, const float* bias_a,
                                           const float* scale_a, float eps, int bits, int c_pad,
                                           uint8_t* out, cudaStream_t stream) {
  return quantize_common<true>("quantize_activation_int4_nhwc", "x", x, bias_a, "scale_a", scale_a,
                               false, eps, bits, c_pad, out, stream);
}

KernelStatus quantize_pack_weight_int4(const Tensor4dView& w, const float* scale_w,
                                       bool per_channel, float eps, int bits, int c_pad,
                                       uint8_t* out, cudaStream_t stream, AlphaOut alpha) {
  return quantize_common<true>("quantize_pack_weight_int4", "w", w, nullptr, "scale_w", scale_w,
                               per_channel, eps, bits, c_pad, out, stream, alpha);
}

KernelStatus quantize_weight_int8_krsc(const Tensor4dView& w, const float* scale_w,
                                       bool per_channel, float eps, int bits, int c_pad,
                                       int8_t* out, cudaStream_t stream, AlphaOut alpha) {
  return quantize_common<false>("quantize_weight_int8_krsc", "w", w, nullptr, "scale_w", scale_w,
                                per_channel, eps, bits, c_pad, out, stream, alpha);
}

KernelStatus output_alpha_fp32(const float* scale_a, const float* scale_w, bool per_channel,
                               float eps, int out_channels, float* alpha, cudaStream_t stream) {
  const char* fn = "output_alpha_fp32";
  if (out_channels < 0) return KernelStatus::failure(fail_prefix(fn, "out_channels") + "negative");
  if (out_channels == 0) return KernelStatus::success();
  if (scale_a == nullptr || scale_w == nullptr || alpha == nullptr)
    return KernelStatus::failure(fail_prefix(fn, "scale_a/scale_w/alpha") + "null pointer");
  output_alpha_kernel<<<grid_for(out_channels), kThreads, 0, stream>>>(
      scale_a, scale_w, per_channel, eps, out_channels, alpha);
  return launch_status(fn);
}

KernelStatus unpack_int4_to_int8(const uint8_t* packed, int64_t rows, int c_in, int channels,
                                 int c_out, int8_t* out, cudaStream_t stream) {
  const char* fn = "unpack_int4_to_int8";
  KernelStatus st = validate_relayout(fn, packed, rows, c_in, channels, c_out, out, false);
  if (!st.ok || rows == 0 || c_out == 0) return st;
  unpack_int4_to_int8_kernel<<<grid_for(rows * c_out), kThreads, 0, stream>>>(packed, rows, c_in,
                                                                              channels, c_out, out);
  return launch_status(fn);
}

KernelStatus repack_int4(const uint8_t* packed, int64_t rows, int c_in, int channels, int c_out,
                         uint8_t* out, cudaStream_t stream) {
  const char* fn = "repack_int4";
  KernelStatus st = validate_relayout(fn, packed, rows, c_in, channels, c_out, out, true);
  if (!st.ok || rows == 0 || c_out == 0) return st;
  repack_int4_kernel<<<grid_for(rows * (c_out / 2)), kThreads, 0, stream>>>(packed, rows, c_in,
                                                                            channels, c_out, out);
  return launch_status(fn);
}

}  // namespace q4conv
