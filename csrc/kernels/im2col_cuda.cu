// Layouts of int8 activation codes for convolutions with few input channels
// (the RGB stem, C = 3), interface: conv_kernels.h. No torch here.
//
// The implicit-GEMM kernels would pad C to 16 and load one tap at a time, so
// the stem ran at a tenth of cuDNN's speed. Two layouts avoid that:
//   - filter columns packed into channels (pack_taps_int8, the default where
//     the sm90 kernels take the result): the 7 x 3 codes a filter row reads
//     become 32 channels of one pixel, and the convolution an R x 1 one whose
//     kernel reads each packed row R times from L2 (51 MB for the stem);
//   - im2col (im2col_int8): the 7x7x3 = 147 taps of a pixel become one row
//     of 160 columns, and the sm90 GEMM runs the convolution as a 1x1 one
//     (128 MB of rows for the stem).
//
// im2col:
// A block builds `rows` consecutive GEMM rows in shared memory (zero-filled,
// so padding taps and tail columns stay zero), then writes them out with
// 16-byte stores: the block's rows are contiguous in the output. Threads map
// x -> filter tap (fixed per thread, so r, s are computed once) and y -> row;
// the row's (n, h0, w0) are computed once per row in a first phase.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "conv_kernels.h"

namespace q4conv {
namespace {

constexpr int kTapThreads = 64;
constexpr int kRowThreads = 4;
constexpr int kMaxRows = 64;
constexpr int kMaxTileBytes = 40 * 1024;  // + 1 KB static: under the 48 KB default
// The im2col path serves C < 16 (dispatch_cuda.cpp uses_im2col).
constexpr int kMaxIm2colChannels = 15;

struct RowOrigin {
  int64_t pixel0;  // element offset of image n in act
  int h0, w0;      // input position of tap (0, 0)
};

// kC: the channel count (g.c) as a constant, so each tap's copy is kC
// independent byte loads and the row loop unrolls: the loads of several rows
// are in flight at once (the runtime-C loop waited for one row's loads before
// issuing the next: 124 us for the stem's 128 MB of rows on H100, NOTES.md
// session 4).
template <int kC>
__global__ void __launch_bounds__(kTapThreads* kRowThreads)
    im2col_int8_kernel(const int8_t* __restrict__ act, ConvShape g, int cols, int rows_per_block,
                       int64_t total_rows, int8_t* __restrict__ out) {
  extern __shared__ __align__(16) int8_t tile[];  // [rows][cols]
  __shared__ RowOrigin origin[kMaxRows];
  const int64_t m0 = int64_t(blockIdx.x) * rows_per_block;
  const int64_t left = total_rows - m0;
  const int rows = left < rows_per_block ? static_cast<int>(left) : rows_per_block;
  const int tid = threadIdx.y * kTapThreads + threadIdx.x;
  const int threads = kTapThreads * kRowThreads;

  uint4* tile4 = reinterpret_cast<uint4*>(tile);
  for (int i = tid; i < rows * cols / 16; i += threads) tile4[i] = make_uint4(0, 0, 0, 0);
  for (int row = tid; row < rows; row += threads) {
    const int64_t m = m0 + row;
    const int64_t pq = int64_t(g.p) * g.q;
    const int64_t n = m / pq;
    const int pix = static_cast<int>(m - n * pq);
    const int p = pix / g.q, q = pix - (pix / g.q) * g.q;
    origin[row] = {n * g.h * g.w * g.c, p * g.stride_h - g.pad_h, q * g.stride_w - g.pad_w};
  }
  __syncthreads();

  const int taps = g.r * g.s;
  for (int tap = threadIdx.x; tap < taps; tap += kTapThreads) {
    const int r = tap / g.s, s = tap - (tap / g.s) * g.s;
#pragma unroll 4
    for (int row = threadIdx.y; row < rows; row += kRowThreads) {
      const RowOrigin o = origin[row];
      const int h = o.h0 + r * g.dil_h, w = o.w0 + s * g.dil_w;
      if (h < 0 || h >= g.h || w < 0 || w >= g.w) continue;  // padding: zero codes
      const int8_t* src = act + o.pixel0 + (int64_t(h) * g.w + w) * kC;
      int8_t* dst = tile + row * cols + tap * kC;
#pragma unroll
      for (int c = 0; c < kC; ++c) dst[c] = src[c];
    }
  }
  __syncthreads();

  uint4* out4 = reinterpret_cast<uint4*>(out + m0 * cols);
  for (int i = tid; i < rows * cols / 16; i += threads) out4[i] = tile4[i];
}

// Calls f(std::integral_constant<int, C>{}) for c = C in [1, kMaxIm2colChannels].
template <int C = 1, typename F>
KernelStatus with_channels(int c, F&& f) {
  if constexpr (C > kMaxIm2colChannels) {
    return KernelStatus::failure("im2col_int8: invalid argument 'shape': C = " + std::to_string(c) +
                                 " is outside [1, " + std::to_string(kMaxIm2colChannels) + "]");
  } else {
    if (c == C) return f(std::integral_constant<int, C>{});
    return with_channels<C + 1>(c, std::forward<F>(f));
  }
}

// Filter columns packed into channels: out[n, y, q, (s, c)] = act[n, y,
// q * stride_w - pad_w + s * dil_w, c] (zero outside the row and past S * C
// columns), so a convolution with few channels becomes an R x 1 one over
// [N, H, Q, cols] with the implicit-GEMM kernels, which read the rows R times
// from L2 instead of a materialized [N*P*Q, R*S*C] im2col matrix. One thread
// per (n, y, q) builds its cols bytes 16 at a time in registers.
constexpr int kPackThreads = 256;

template <int kC>
__global__ void __launch_bounds__(kPackThreads)
    pack_taps_int8_kernel(const int8_t* __restrict__ act, ConvShape g, int cols, int64_t total,
                          int8_t* __restrict__ out) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= total) return;
  const int64_t row = t / g.q;  // n * H + y
  const int q = static_cast<int>(t - row * g.q);
  const int8_t* src = act + row * g.w * kC;
  const int w0 = q * g.stride_w - g.pad_w, taps = g.s * kC;
  uint4* dst = reinterpret_cast<uint4*>(out + t * cols);
  for (int chunk = 0; chunk < cols / 16; ++chunk) {
    uint32_t words[4] = {0, 0, 0, 0};
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      const int j = chunk * 16 + b;
      const int s = j / kC, c = j - s * kC;
      const int w = w0 + s * g.dil_w;
      const uint32_t code =
          j < taps && w >= 0 && w < g.w ? static_cast<uint8_t>(src[w * kC + c]) : 0u;
      words[b / 4] |= code << (8 * (b % 4));
    }
    dst[chunk] = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

}  // namespace

KernelStatus pack_taps_int8(const ConvShape& shape, const int8_t* act, int cols, int8_t* out,
                            cudaStream_t stream) {
  const int64_t taps_cols = int64_t(shape.s) * shape.c;
  if (cols <= 0 || cols % 16 != 0 || cols < taps_cols)
    return KernelStatus::failure(
        "pack_taps_int8: invalid argument 'cols': " + std::to_string(cols) +
        " (must be a multiple of 16, >= S*C = " + std::to_string(taps_cols) + ")");
  const int64_t total = int64_t(shape.n) * shape.h * shape.q;
  if (total == 0) return KernelStatus::success();
  if (act == nullptr || out == nullptr)
    return KernelStatus::failure("pack_taps_int8: invalid argument 'act'/'out': null pointer");
  const int64_t blocks = (total + kPackThreads - 1) / kPackThreads;
  if (blocks > INT32_MAX) return KernelStatus::failure("pack_taps_int8: too many rows");
  const auto launch = [&](auto channels) {
    pack_taps_int8_kernel<decltype(channels)::value>
        <<<static_cast<unsigned>(blocks), kPackThreads, 0, stream>>>(act, shape, cols, total, out);
    return launch_status("pack_taps_int8");
  };
  return with_channels(shape.c, launch);
}

int im2col_rows_per_block(int cols) {
  if (cols <= 0 || cols % 16 != 0) return 0;
  const int rows = kMaxTileBytes / cols;
  return rows < kMaxRows ? rows : kMaxRows;
}

KernelStatus im2col_int8(const ConvShape& shape, const int8_t* act, int cols, int8_t* out,
                         cudaStream_t stream) {
  const int64_t taps_cols = int64_t(shape.r) * shape.s * shape.c;
  const int rows_per_block = im2col_rows_per_block(cols);
  if (rows_per_block == 0 || cols < taps_cols)
    return KernelStatus::failure(
        "im2col_int8: invalid argument 'cols': " + std::to_string(cols) +
        " (must be a multiple of 16, >= R*S*C = " + std::to_string(taps_cols) + " and <= 40960)");
  const int64_t total_rows = int64_t(shape.n) * shape.p * shape.q;
  if (total_rows == 0) return KernelStatus::success();
  if (act == nullptr || out == nullptr)
    return KernelStatus::failure("im2col_int8: invalid argument 'act'/'out': null pointer");
  const int64_t blocks = (total_rows + rows_per_block - 1) / rows_per_block;
  if (blocks > INT32_MAX) return KernelStatus::failure("im2col_int8: too many rows");
  const size_t smem = size_t(rows_per_block) * cols;
  const auto launch = [&](auto channels) {
    im2col_int8_kernel<decltype(channels)::value>
        <<<static_cast<unsigned>(blocks), dim3(kTapThreads, kRowThreads), smem, stream>>>(
            act, shape, cols, rows_per_block, total_rows, out);
    return launch_status("im2col_int8");
  };
  return with_channels(shape.c, launch);
}

}  // namespace q4conv
