// Layouts of activation codes for convolutions with few input channels (the
// RGB stem, C = 3), interfaces: conv_kernels.h, quantize_kernels.h. No torch
// here.
//
// The implicit-GEMM kernels would pad C to 16 and load one tap at a time, so
// the stem ran at a tenth of cuDNN's speed. Two layouts avoid that:
//   - filter taps packed into channels (pack_taps_quantize, the default where
//     the sm90 kernels take the result): the input is quantized straight
//     into packed pixels whose channels hold the codes of `group` input rows
//     x S filter columns (the stem: 2 x 7 x 3 codes in 64 channels), and the
//     convolution becomes a short R' x 1 one whose kernel re-reads the packed
//     rows from L2 (53 MB for the stem);
//   - im2col (im2col_int8, after the quantization pass): the 7x7x3 = 147
//     taps of a pixel become one row of 160 columns, and the sm90 GEMM runs
//     the convolution as a 1x1 one (128 MB of rows for the stem).
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
#include "device_common.cuh"

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
// issuing the next: 124 us for the stem's 128 MB of rows on H100).
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

// Calls f(std::integral_constant<int, V>{}) for value == V in [1, kMax].
template <int kMax, int V = 1, typename F>
KernelStatus with_count(int value, const char* fn, F&& f) {
  if constexpr (V > kMax) {
    return KernelStatus::failure(std::string(fn) +
                                 ": invalid argument 'shape': " + std::to_string(value) +
                                 " is outside [1, " + std::to_string(kMax) + "]");
  } else {
    if (value == V) return f(std::integral_constant<int, V>{});
    return with_count<kMax, V + 1>(value, fn, std::forward<F>(f));
  }
}

// Filter taps packed into channels, quantized on the way (layout:
// conv_kernels.h TapPacking). A block makes `q_block` consecutive packed
// pixels of one packed row: it quantizes the input window they read (group
// rows x `window` columns x C channels, zero codes outside the image) once
// into shared memory, then each thread builds one fixed 16-byte chunk of a
// packed pixel (its 16 source offsets in the window computed once) for
// every kPackPixelsPerRound-th pixel and stores it with one 16-byte store:
// blocks have kChunks (the 16-byte chunks of a packed pixel) x 64 threads.
constexpr int kPackPixelsPerRound = 64;
constexpr int kPackMaxColumns = 128;
constexpr int kPackMaxChunks = kMaxPackedChannels / 16;
constexpr int kPackElementsPerThread = 8;
constexpr int kPackSlackBytes = 32;

// n / d for 0 <= n < 2^16 and 1 <= d < 2^16 with one multiply: magic =
// floor(2^32 / d) + 1 exceeds 2^32 / d by at most 1, so n * magic / 2^32
// exceeds n / d by less than 2^-16 <= 1 / d, too little to reach the next
// integer. (The window's flat indices are below kPackWindowBytes.)
struct SmallDivisor {
  uint64_t magic = 1;
  explicit SmallDivisor(int d) : magic((uint64_t(1) << 32) / uint64_t(d) + 1) {}
  __device__ int divide(int n) const { return static_cast<int>((uint64_t(n) * magic) >> 32); }
};
static_assert(kPackWindowBytes <= (1 << 16), "SmallDivisor needs indices below 2^16");

struct PackArgs {
  Tensor4dView x;
  const float* bias_a;
  const float* scale_a;
  float eps;
  int bits;
  ConvShape g;  // the convolution on x, c = C
  TapPacking t;
  int q_blocks, q_block, window;
  int row_stride;                       // shared bytes per window row (see PackBlock::align)
  SmallDivisor row_elements, channels;  // window * C, C
  int8_t* out;                          // [N, t.rows, Q, t.cols]
};

// Input columns the packed pixels q0 .. q0 + q_block - 1 read.
int pack_window(const ConvShape& g, int q_block) {
  return (q_block - 1) * g.stride_w + (g.s - 1) * g.dil_w + 1;
}

// Shared bytes of the codes that window holds: group rows x columns x C.
int64_t pack_window_bytes(const ConvShape& g, const TapPacking& t, int q_block) {
  return int64_t(pack_window(g, q_block)) * t.group * g.c;
}

// Where a block's packed pixels start: packed row (n * rows + j), image n,
// the window's first input column x0 and the block's first output column q0.
// Window row i, element w (= column * C + c) lives at shared byte i *
// row_stride + align + w, with align = x0 * C mod 8: input elements whose row
// index is a multiple of 8 then land on 8-byte boundaries, so the vector path
// stores 8 codes at once.
struct PackBlock {
  int64_t packed_row, n;
  int j, q0, columns, x0, align;
};

__device__ __forceinline__ PackBlock pack_block(const PackArgs& a) {
  PackBlock b;
  const int q_block_index = static_cast<int>(blockIdx.x % a.q_blocks);
  b.packed_row = blockIdx.x / a.q_blocks;
  b.n = b.packed_row / a.t.rows;
  b.j = static_cast<int>(b.packed_row - b.n * a.t.rows);
  b.q0 = q_block_index * a.q_block;
  b.columns = min(a.q_block, a.g.q - b.q0);
  b.x0 = b.q0 * a.g.stride_w - a.g.pad_w;
  b.align = (b.x0 * a.g.c) & 7;
  return b;
}

// Phase 1, any strides: the window's codes, flat index e = (i * window +
// column) * C + c, kPackElementsPerThread elements per thread and round with
// every load issued before the first value is used. Values are quantized in
// groups (quantize_values_fast: one branch to the exact division per group;
// per value, the compiler evaluated the division's fast path for every
// element, a reciprocal and ~15 instructions).
template <typename T, int kThreads>
__device__ void quantize_window_any(const PackArgs& a, const PackBlock& blk, float s, float inv,
                                    int8_t* window_codes) {
  const ConvShape& g = a.g;
  const T* __restrict__ image = static_cast<const T*>(a.x.data) + blk.n * a.x.stride[0];
  const int row_elements = a.window * g.c, elements = a.t.group * row_elements;
  for (int base = 0; base < elements; base += kThreads * kPackElementsPerThread) {
    float value[kPackElementsPerThread];
    bool inside[kPackElementsPerThread];
#pragma unroll
    for (int k = 0; k < kPackElementsPerThread; ++k) {
      const int e = base + k * kThreads + threadIdx.x;
      const int i = a.row_elements.divide(e), in_row = e - i * row_elements;
      const int column = a.channels.divide(in_row), c = in_row - column * g.c;
      const int y = blk.j * a.t.group + i - g.pad_h, x = blk.x0 + column;
      inside[k] = e < elements && y >= 0 && y < g.h && x >= 0 && x < g.w;
      value[k] =
          inside[k]
              ? device::to_float(image[y * a.x.stride[2] + x * a.x.stride[3] + c * a.x.stride[1]]) +
                    a.bias_a[c]
              : 0.0f;
    }
    int8_t code[kPackElementsPerThread];
    quantize_values_fast(value, s, inv, a.bits, code);
#pragma unroll
    for (int k = 0; k < kPackElementsPerThread; ++k) {
      const int e = base + k * kThreads + threadIdx.x;
      if (e < elements) {
        const int i = a.row_elements.divide(e), in_row = e - i * row_elements;
        window_codes[i * a.row_stride + blk.align + in_row] = inside[k] ? code[k] : int8_t(0);
      }
    }
  }
}

// Phase 1, dense channels_last rows (x.stride: c 1, w C, h W * C; rows
// 16-byte aligned): a window row is a contiguous run of the input row, so
// each thread loads whole 16-byte vectors and the window index is the row
// index shifted by x0 * C; the channel is counted, not divided. (The flat
// path's per-element index arithmetic made the stem's packing instruction
// bound: 118 us on H100, SM throughput 82%.)
template <typename T, int kThreads>
__device__ void quantize_window_rows(const PackArgs& a, const PackBlock& blk, float s, float inv,
                                     const float* bias, int8_t* window_codes) {
  constexpr int kV = 16 / sizeof(T);
  const ConvShape& g = a.g;
  const int row_elements = a.window * g.c, row_len = g.w * g.c, shift = blk.x0 * g.c;
  // The input row's elements in the window: [lo, hi), empty (lo == hi) where
  // the window lies wholly in the padding (a column block of a wide padding).
  const int lo = min(max(shift, 0), shift + row_elements);
  const int hi = max(min(shift + row_elements, row_len), lo);
  // Padding: whole rows outside the image, and the columns left and right of
  // it (the window elements below lo - shift and from hi - shift on).
  for (int i = 0; i < a.t.group; ++i) {
    const int y = blk.j * a.t.group + i - g.pad_h;
    int8_t* row_codes = window_codes + i * a.row_stride + blk.align;
    const bool row_inside = y >= 0 && y < g.h;
    const int left = row_inside ? lo - shift : row_elements;
    const int right = row_inside ? row_elements - (hi - shift) : 0;
    for (int e = threadIdx.x; e < left + right; e += kThreads)
      row_codes[e < left ? e : e - left + (hi - shift)] = 0;
  }
  const int v_lo = lo / kV, vectors = hi > lo ? (hi + kV - 1) / kV - v_lo : 0;
  const T* __restrict__ image = static_cast<const T*>(a.x.data) + blk.n * a.x.stride[0];
  for (int t = threadIdx.x; t < a.t.group * vectors; t += kThreads) {
    const int i = t / vectors, v = v_lo + t - i * vectors;
    const int y = blk.j * a.t.group + i - g.pad_h;
    if (y < 0 || y >= g.h) continue;
    const device::Pack<T, kV> pack = device::load_pack<T, kV>(image + y * a.x.stride[2] + v * kV);
    int8_t* row_codes = window_codes + i * a.row_stride + blk.align - shift;
    float value[kV];
    int c = (v * kV) % g.c;
#pragma unroll
    for (int k = 0; k < kV; ++k) {
      value[k] = device::to_float(pack.e[k]) + bias[c];
      c = c + 1 == g.c ? 0 : c + 1;
    }
    int8_t code[kV];
    quantize_values_fast(value, s, inv, a.bits, code);
    if (v * kV >= lo && v * kV + kV <= hi) {  // the whole vector: one aligned store
      uint32_t word[kV / 4];
#pragma unroll
      for (int k = 0; k < kV; ++k) {
        const uint32_t byte = static_cast<uint8_t>(code[k]);
        word[k / 4] = (k % 4 == 0 ? 0u : word[k / 4]) | byte << (8 * (k % 4));
      }
      if constexpr (kV == 8)
        *reinterpret_cast<uint2*>(row_codes + v * kV) = make_uint2(word[0], word[1]);
      else
        *reinterpret_cast<uint32_t*>(row_codes + v * kV) = word[0];
    } else {
#pragma unroll
      for (int k = 0; k < kV; ++k) {
        const int e = v * kV + k;
        if (e >= lo && e < hi) row_codes[e] = code[k];
      }
    }
  }
}

// Phase 2, dil_w == 1: a slot's S * C codes are one contiguous run of the
// window row, so a 16-byte chunk is 5 aligned 32-bit shared loads shifted
// into place (funnel shifts) and masked past the run. The window buffer has
// kPackSlackBytes of slack: a run of one byte still loads 20.
template <int kChunks>
__device__ void pack_chunks_contiguous(const PackArgs& a, const PackBlock& blk,
                                       const int8_t* window_codes) {
  const ConvShape& g = a.g;
  const int chunk = threadIdx.x % kChunks;
  const int i = chunk * 16 / a.t.slot, offset = chunk * 16 - i * a.t.slot;
  const int valid = min(max(g.s * g.c - offset, 0), 16);
  uint32_t mask[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int bytes = min(max(valid - 4 * k, 0), 4);
    mask[k] = bytes == 4 ? 0xFFFFFFFFu : (1u << (8 * bytes)) - 1u;
  }
  const int run0 = i * a.row_stride + blk.align + offset;
  uint4* out = reinterpret_cast<uint4*>(a.out + (blk.packed_row * g.q + blk.q0) * a.t.cols) + chunk;
  for (int pixel = threadIdx.x / kChunks; pixel < blk.columns; pixel += kPackPixelsPerRound) {
    uint32_t word[4] = {0, 0, 0, 0};
    if (valid > 0) {
      const int start = run0 + pixel * g.stride_w * g.c;
      const uint32_t* src = reinterpret_cast<const uint32_t*>(window_codes) + (start >> 2);
      const int bits = (start & 3) * 8;
      uint32_t raw[5];
#pragma unroll
      for (int k = 0; k < 5; ++k) raw[k] = src[k];
#pragma unroll
      for (int k = 0; k < 4; ++k) word[k] = __funnelshift_r(raw[k], raw[k + 1], bits) & mask[k];
    }
    out[pixel * kChunks] = make_uint4(word[0], word[1], word[2], word[3]);
  }
}

// Phase 2, any dil_w: byte by byte from each byte's offset in the window.
template <int kChunks>
__device__ void pack_chunks_bytes(const PackArgs& a, const PackBlock& blk,
                                  const int8_t* window_codes) {
  const ConvShape& g = a.g;
  const int chunk = threadIdx.x % kChunks;
  int source[16];  // offset of each byte's code in the window, -1: zero
#pragma unroll
  for (int b = 0; b < 16; ++b) {
    const int column = chunk * 16 + b;
    const int i = column / a.t.slot, within = column - i * a.t.slot;
    const int tap = within / g.c, c = within - tap * g.c;
    source[b] = tap < g.s ? i * a.row_stride + tap * g.dil_w * g.c + c : -1;
  }
  uint4* out = reinterpret_cast<uint4*>(a.out + (blk.packed_row * g.q + blk.q0) * a.t.cols) + chunk;
  for (int pixel = threadIdx.x / kChunks; pixel < blk.columns; pixel += kPackPixelsPerRound) {
    const int8_t* codes = window_codes + blk.align + pixel * g.stride_w * g.c;
    uint32_t words[4] = {0, 0, 0, 0};
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      const uint32_t code = source[b] >= 0 ? static_cast<uint8_t>(codes[source[b]]) : 0u;
      words[b / 4] |= code << (8 * (b % 4));
    }
    out[pixel * kChunks] = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

template <typename T, int kChunks, bool kRows>
__global__ void __launch_bounds__(kChunks* kPackPixelsPerRound)
    pack_taps_quantize_kernel(PackArgs a) {
  constexpr int kThreads = kChunks * kPackPixelsPerRound;
  extern __shared__ __align__(16) int8_t window_codes[];  // [group][row_stride] + slack
  __shared__ float bias[kMaxIm2colChannels];              // bias_a, read once per element
  const PackBlock blk = pack_block(a);
  const float s = effective_scale(*a.scale_a, a.eps), inv = 1.0f / s;
  if constexpr (kRows) {
    if (threadIdx.x < a.g.c) bias[threadIdx.x] = a.bias_a[threadIdx.x];
    __syncthreads();
    quantize_window_rows<T, kThreads>(a, blk, s, inv, bias, window_codes);
  } else {
    quantize_window_any<T, kThreads>(a, blk, s, inv, window_codes);
  }
  __syncthreads();
  if (a.g.dil_w == 1)
    pack_chunks_contiguous<kChunks>(a, blk, window_codes);
  else
    pack_chunks_bytes<kChunks>(a, blk, window_codes);
}

// True where quantize_window_rows can read x: dense channels_last rows whose
// starts are 16-byte aligned.
bool dense_aligned_rows(const Tensor4dView& x, size_t element_bytes) {
  const int64_t channels = x.size[1], width = x.size[3];
  const auto aligned = [&](int64_t elements) { return (elements * element_bytes) % 16 == 0; };
  return x.stride[1] == 1 && x.stride[3] == channels && x.stride[2] == width * channels &&
         aligned(x.stride[2]) && aligned(x.stride[0]) &&
         reinterpret_cast<uintptr_t>(x.data) % 16 == 0;
}

}  // namespace

bool pack_taps_fits(const ConvShape& conv, const TapPacking& t) {
  return pack_window_bytes(conv, t, 1) <= kPackWindowBytes;
}

KernelStatus pack_taps_quantize(const Tensor4dView& x, const float* bias_a, const float* scale_a,
                                float eps, int bits, const ConvShape& conv, int8_t* out,
                                cudaStream_t stream) {
  const char* fn = "pack_taps_quantize";
  const TapPacking t = tap_packing(conv);
  if (conv.c < 1 || conv.c > kMaxIm2colChannels || t.cols > kMaxPackedChannels)
    return device::invalid(fn, "conv",
                           "C = " + std::to_string(conv.c) + ", S = " + std::to_string(conv.s) +
                               " pack into " + std::to_string(t.cols) + " channels (at most " +
                               std::to_string(kMaxPackedChannels) + ")");
  if (!pack_taps_fits(conv, t))
    return device::invalid(
        fn, "conv",
        "one output column's input window exceeds " + std::to_string(kPackWindowBytes) + " bytes");
  const int64_t rows = int64_t(conv.n) * t.rows;
  if (rows == 0 || conv.q == 0) return KernelStatus::success();
  if (x.data == nullptr || bias_a == nullptr || scale_a == nullptr || out == nullptr)
    return device::invalid(fn, "x/bias_a/scale_a/out", "null pointer");
  int q_block = conv.q < kPackMaxColumns ? conv.q : kPackMaxColumns;
  while (q_block > 1 && pack_window_bytes(conv, t, q_block) > kPackWindowBytes) q_block /= 2;
  const int window = pack_window(conv, q_block);
  const int q_blocks = (conv.q + q_block - 1) / q_block;
  const PackArgs a{x,
                   bias_a,
                   scale_a,
                   eps,
                   bits,
                   conv,
                   t,
                   q_blocks,
                   q_block,
                   window,
                   (window * conv.c + 7 + 15) / 16 * 16,  // align + a window row, 16-byte rows
                   SmallDivisor(window * conv.c),
                   SmallDivisor(conv.c),
                   out};
  const int64_t blocks = rows * a.q_blocks;
  if (blocks > INT32_MAX) return device::invalid(fn, "conv", "too many packed rows");
  const size_t smem = size_t(a.row_stride) * t.group + kPackSlackBytes;
  const auto launch = [&](auto chunks) {
    constexpr int kChunks = decltype(chunks)::value;
    return device::with_type(x.type, [&](auto* type) {
      using T = std::remove_pointer_t<decltype(type)>;
      const unsigned threads = kChunks * kPackPixelsPerRound;
      if (dense_aligned_rows(x, sizeof(T)))
        pack_taps_quantize_kernel<T, kChunks, true>
            <<<static_cast<unsigned>(blocks), threads, smem, stream>>>(a);
      else
        pack_taps_quantize_kernel<T, kChunks, false>
            <<<static_cast<unsigned>(blocks), threads, smem, stream>>>(a);
      return launch_status(fn);
    });
  };
  return with_count<kPackMaxChunks>(t.cols / 16, "pack_taps_quantize", launch);
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
  return with_count<kMaxIm2colChannels>(shape.c, "im2col_int8", launch);
}

}  // namespace q4conv
