// Fused LSQ / LSQ+ activation kernels of the training backward (interface:
// lsq_kernels.h). No torch here.
//
// The codes come from ../quant.h (quantize_value_fast / quantize_value, which
// are bit-identical), so they equal the forward's codes. Do not build this
// file with fast-math: the ratio is an IEEE fp32 division and rintf rounds
// half to even.
//
// Paths, chosen per call from the sizes, strides and pointer alignment:
//   codes, dense (x and out both dense NCHW or both dense channels_last): the
//     tensor is a flat array whose element i has channel (i / inner) % C
//     (inner = H*W or 1); each thread converts V consecutive elements with one
//     vector load and store (16 bytes when the pointers allow) and walks the
//     channel from the first element instead of dividing per element.
//   codes, channels contiguous (channels_last, pixels at any strides, e.g. the
//     stride grid of a strided 1x1 convolution): a thread converts V
//     channels of one pixel, its offsets from the pixel's (n, h, w).
//   codes, strided: one thread per element, offsets from the strides.
//   backward, channels_last (C > 1): the tensor is a [pixels, C] matrix;
//     a block of 256 threads is bdx channel groups (V channels each) x bdy
//     pixel rows, each thread keeps V per-channel sums in registers over its
//     rows; the block then sums its columns in shared memory in a fixed order.
//     Dense, or channels contiguous with each tensor's pixels at its own
//     strides (offsets from the pixel's (n, h, w)).
//   backward, NCHW planes (dense with vectors, or any strides with V = 1): one
//     warp per chunk of kChunk elements of one (n, c) plane, reduced with a
//     fixed shuffle tree.
// Each block or warp writes its own slot of the partial-sum workspace, and
// the caller sums the slots (ATen), so the result does not depend on
// scheduling: no float atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <numeric>
#include <string>
#include <type_traits>

#include "../quant.h"
#include "device_common.cuh"
#include "lsq_kernels.h"

namespace q4conv {
namespace {

constexpr int kThreads = 256;
using device::kWarp;
constexpr int kWarps = kThreads / kWarp;
constexpr int64_t kMaxBlocks = int64_t(1) << 16;  // codes kernels grid-stride beyond this
constexpr int64_t kChunk = 1024;                  // plane elements per warp (multiple of 8)
constexpr int kMaxRowsPerThread = 16;             // channels_last backward
constexpr int64_t kTargetBlocks = 2048;           // enough to fill an H100 several times
constexpr int64_t kMaxWeightBlocks = 1024;        // weight codes riding on a codes launch

using device::block_sum;
using device::from_float;
using device::invalid;
using device::load_pack;
using device::lsq_terms;
using device::Pack;
using device::store_pack;
using device::to_float;
using device::warp_sum;
using device::with_type;
using ActScale = device::LsqScale;

__device__ __forceinline__ ActScale act_scale(const float* scale, float eps, int bits) {
  return device::lsq_scale(*scale, eps, bits);
}

// The code of x in the backward's code unit (quant.h's code_unit), as every
// codes kernel below writes it.
__device__ __forceinline__ float code_of(float x, float bias, const ActScale& s, int bits) {
  return static_cast<float>(quantize_value_fast(x + bias, s.s, s.inv, bits)) * s.unit;
}

struct Strides4 {
  int64_t s[4];
};

__device__ __forceinline__ int64_t offset_of(const Strides4& st, int64_t n, int64_t c, int64_t h,
                                             int64_t w) {
  return n * st.s[0] + c * st.s[1] + h * st.s[2] + w * st.s[3];
}

struct ActParams {
  const float* bias;
  const float* scale;
  float eps;
  int bits;
};

// ---- codes -------------------------------------------------------------------
// Dense layouts as a flat array: element i has channel (i / inner) % channels.
template <typename Idx>
struct Flat {
  Idx total, inner, channels;
};

template <typename Idx>
__device__ __forceinline__ void next_element(const Flat<Idx>& f, Idx& r, Idx& c) {
  if (++r == f.inner) {
    r = 0;
    if (++c == f.channels) c = 0;
  }
}

// Blocks [act_blocks, gridDim.x) of a codes launch write the fp32 weights'
// codes (`weights`, a WeightCodesJob riding on it); true for those blocks.
template <typename T>
__device__ __forceinline__ bool weight_codes_rider(unsigned act_blocks,
                                                   const device::WeightCodesArgs& weights) {
  if (blockIdx.x < act_blocks) return false;
  device::weight_codes_range<float, T>(weights,
                                       int64_t(blockIdx.x - act_blocks) * blockDim.x + threadIdx.x,
                                       int64_t(gridDim.x - act_blocks) * blockDim.x);
  return true;
}

// V shifted values as codes of element type T (quant.h's fast path), in the
// code unit.
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> code_pack(const float (&shifted)[V], const ActScale& s,
                                                int bits) {
  int8_t q[V];
  quantize_values_fast(shifted, s.s, s.inv, bits, q);
  Pack<T, V> codes;
#pragma unroll
  for (int j = 0; j < V; ++j) codes.e[j] = from_float<T>(static_cast<float>(q[j]) * s.unit);
  return codes;
}

// Blocks [0, act_blocks) convert x; the blocks after them, if any, write the
// fp32 weights' codes (`weights`, a WeightCodesJob riding on this launch).
template <typename T, int V, typename Idx>
__global__ void __launch_bounds__(kThreads)
    codes_dense_kernel(const T* __restrict__ x, T* __restrict__ out, Flat<Idx> f, ActParams p,
                       unsigned act_blocks, device::WeightCodesArgs weights) {
  if (weight_codes_rider<T>(act_blocks, weights)) return;
  const ActScale s = act_scale(p.scale, p.eps, p.bits);
  const Idx step = Idx(act_blocks) * blockDim.x * V;
  for (Idx i = (Idx(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < f.total; i += step) {
    const Idx q = i / f.inner;
    Idx r = i - q * f.inner, c = q % f.channels;
    if (i + V <= f.total) {
      const Pack<T, V> in = load_pack<T, V>(x + i);
      float shifted[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        shifted[j] = to_float(in.e[j]) + p.bias[c];
        next_element(f, r, c);
      }
      store_pack<T, V>(out + i, code_pack<T, V>(shifted, s, p.bits));
    } else {
      for (Idx j = i; j < f.total; ++j) {
        out[j] = from_float<T>(code_of(to_float(x[j]), p.bias[c], s, p.bits));
        next_element(f, r, c);
      }
    }
  }
}

struct Shape4 {
  int64_t n, c, h, w;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    codes_strided_kernel(const T* __restrict__ x, T* __restrict__ out, Shape4 sh, Strides4 xs,
                         Strides4 os, ActParams p) {
  const ActScale s = act_scale(p.scale, p.eps, p.bits);
  const int64_t size[4] = {sh.n, sh.c, sh.h, sh.w};
  const int64_t total = sh.n * sh.c * sh.h * sh.w;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const device::Index4 at = device::unravel(i, size);
    const float v = to_float(x[device::offset_of(xs.s, at)]);
    out[device::offset_of(os.s, at)] = from_float<T>(code_of(v, p.bias[at.i[1]], s, p.bits));
  }
}

// Where the pixels of a channels-contiguous tensor are: element (n, c, h, w)
// is at n * n_stride + h * h_stride + w * w_stride + c.
struct PixelStrides {
  int64_t n = 0, h = 0, w = 0;
};

// Pixel `pix` of an (N, H, W) grid (row-major) in a tensor with these
// strides. 32-bit division (the host keeps these paths to fewer than 2^31
// elements): the codes kernel divides for every 16 bytes.
__device__ __forceinline__ int64_t pixel_offset(const PixelStrides& st, uint32_t pix,
                                                uint32_t h_size, uint32_t w_size) {
  const uint32_t hw = h_size * w_size;
  const uint32_t n = pix / hw;
  const uint32_t rest = pix - n * hw;
  const uint32_t h = rest / w_size;
  return n * st.n + h * st.h + int64_t(rest - h * w_size) * st.w;
}

struct PixelGrid {
  uint32_t pixels, channels, h, w;  // pixels = N * H * W; pixels * C < 2^31
  PixelStrides x, out;
};

// Channels-contiguous x and out (C % V == 0, every pixel stride a multiple of
// V): thread i converts channels [(i % (C / V)) * V, + V) of pixel i / (C /
// V). Blocks [act_blocks, gridDim.x) write the weight codes, as above.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    codes_pixels_kernel(const T* __restrict__ x, T* __restrict__ out, PixelGrid g, ActParams p,
                        unsigned act_blocks, device::WeightCodesArgs weights) {
  if (weight_codes_rider<T>(act_blocks, weights)) return;
  const ActScale s = act_scale(p.scale, p.eps, p.bits);
  const uint32_t groups = g.channels / V;
  const uint32_t total = g.pixels * groups;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += act_blocks * blockDim.x) {
    const uint32_t pix = i / groups;
    const uint32_t c = (i - pix * groups) * V;
    const Pack<T, V> in = load_pack<T, V>(x + pixel_offset(g.x, pix, g.h, g.w) + c);
    float shifted[V];
#pragma unroll
    for (int j = 0; j < V; ++j) shifted[j] = to_float(in.e[j]) + p.bias[c + j];
    store_pack<T, V>(out + pixel_offset(g.out, pix, g.h, g.w) + c,
                     code_pack<T, V>(shifted, s, p.bits));
  }
}

// ---- backward: channels_last ----------------------------------------------------
struct PostParams {
  ActParams act;
  const float* grad_scale;  // raw per-tensor s_w (max with eps applied), or nullptr: 1
};

// What the activation gradient is multiplied by: s_w / code_unit(s_w), the
// weight codes having been written in their code unit (quant.h), or 1.
__device__ __forceinline__ float grad_multiplier(const PostParams& p) {
  if (p.grad_scale == nullptr) return 1.0f;
  const float s_w = effective_scale(*p.grad_scale, p.act.eps);
  return s_w / code_unit(s_w);
}

// pixels x channels matrix; a block covers rows [blockIdx.x * chunk, + chunk)
// (chunk = blockDim.y * rows_per_thread) and channels
// [blockIdx.y * blockDim.x * V, + blockDim.x * V). V > 1 only when C % V == 0.
struct ClGeometry {
  int64_t pixels, channels;
  int rows_per_thread;
  // kPixelStrided: the (H, W) of the pixel grid and each tensor's pixel strides.
  int64_t h = 1, w = 1;
  PixelStrides x, grad, dx;
};

// dx may be grad itself (the backward writes the activation gradient over the
// convolution's, one buffer fewer): every element is read and then written by
// the same thread at the same offset, so grad and dx carry no __restrict__.
// Blocks with blockIdx.x >= act_blocks_x run the fp32 weights' backward
// (`weights`, riding on this launch): output channel
// (blockIdx.x - act_blocks_x) * gridDim.y + blockIdx.y each.
template <typename T, int V, bool kPixelStrided>
__global__ void __launch_bounds__(kThreads)
    backward_cl_kernel(const T* __restrict__ x, const T* grad, T* dx, ClGeometry geo, PostParams p,
                       float* __restrict__ bias_partials, float* __restrict__ residual_partials,
                       unsigned act_blocks_x, device::WeightBackwardArgs weights) {
  __shared__ float column[kThreads * V];  // [blockDim.y][blockDim.x * V]
  __shared__ float warp_sums[kWarps];
  if (blockIdx.x >= act_blocks_x) {
    const int64_t k = int64_t(blockIdx.x - act_blocks_x) * gridDim.y + blockIdx.y;
    if (k < weights.size[0])  // uniform over the block: the row's block sum syncs
      device::weight_backward_row<kThreads, float, T>(
          weights, k, threadIdx.y * blockDim.x + threadIdx.x, warp_sums);
    return;
  }
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int cols = blockDim.x * V;
  const int64_t c0 = int64_t(blockIdx.y) * cols + int64_t(tx) * V;
  const int64_t chunk = int64_t(blockDim.y) * geo.rows_per_thread;
  const ActScale s = act_scale(p.act.scale, p.act.eps, p.act.bits);
  const float gs = grad_multiplier(p);

  float acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.0f;
  float residual = 0.0f;
  if (c0 < geo.channels) {
    float bias[V];
#pragma unroll
    for (int j = 0; j < V; ++j) bias[j] = p.act.bias[c0 + j];
    for (int k = 0; k < geo.rows_per_thread; ++k) {
      const int64_t pix = int64_t(blockIdx.x) * chunk + ty + int64_t(k) * blockDim.y;
      if (pix >= geo.pixels) break;
      int64_t at = pix * geo.channels + c0, at_grad = at, at_dx = at;
      if constexpr (kPixelStrided) {
        const auto p32 = uint32_t(pix), h32 = uint32_t(geo.h), w32 = uint32_t(geo.w);
        at = pixel_offset(geo.x, p32, h32, w32) + c0;
        at_grad = pixel_offset(geo.grad, p32, h32, w32) + c0;
        at_dx = pixel_offset(geo.dx, p32, h32, w32) + c0;
      }
      const Pack<T, V> xv = load_pack<T, V>(x + at);
      const Pack<T, V> gv = load_pack<T, V>(grad + at_grad);
      Pack<T, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const device::Terms t =
            lsq_terms(to_float(xv.e[j]), bias[j], to_float(gv.e[j]) * gs, s, p.act.bits);
        out.e[j] = from_float<T>(t.dvalue);
        acc[j] += t.dvalue;
        residual += t.residual;
      }
      store_pack<T, V>(dx + at_dx, out);
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) column[ty * cols + tx * V + j] = acc[j];
  const int thread = ty * blockDim.x + tx;
  const float block_residual = block_sum<kThreads>(residual, thread, warp_sums);  // syncs the block
  if (thread == 0) residual_partials[int64_t(blockIdx.x) * gridDim.y + blockIdx.y] = block_residual;
  if (thread < cols) {
    const int64_t c = int64_t(blockIdx.y) * cols + thread;
    if (c < geo.channels) {
      float sum = 0.0f;
      for (int r = 0; r < static_cast<int>(blockDim.y); ++r) sum += column[r * cols + thread];
      bias_partials[int64_t(blockIdx.x) * geo.channels + c] = sum;
    }
  }
}

// ---- backward: NCHW planes ---------------------------------------------------------
// Work item = (n, c, chunk of kChunk plane elements); dense: the (n, c) plane
// starts at (n * C + c) * H * W in every tensor; strided: offsets from the
// strides (V = 1).
struct PlaneGeometry {
  Shape4 shape;
  int64_t chunks, items;
  Strides4 x, grad, dx;
};

template <typename T, int V, bool kStrided>
__global__ void __launch_bounds__(kThreads)
    backward_plane_kernel(const T* __restrict__ x, const T* grad, T* dx, PlaneGeometry g,
                          PostParams p, float* __restrict__ bias_partials,
                          float* __restrict__ residual_partials) {
  const int64_t item = int64_t(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (item >= g.items) return;  // whole warps: the shuffles below stay full
  const int64_t chunk = item % g.chunks;
  const int64_t plane = item / g.chunks;
  const int64_t c = plane % g.shape.c;
  const int64_t n = plane / g.shape.c;
  const int64_t hw = g.shape.h * g.shape.w;
  const int64_t begin = chunk * kChunk;
  const int64_t end = begin + kChunk < hw ? begin + kChunk : hw;
  const ActScale s = act_scale(p.act.scale, p.act.eps, p.act.bits);
  const float gs = grad_multiplier(p);
  const float bias = p.act.bias[c];

  float acc = 0.0f, residual = 0.0f;
  for (int64_t i = begin + int64_t(lane) * V; i < end; i += int64_t(kWarp) * V) {
    if constexpr (kStrided) {
      const int64_t h = i / g.shape.w, w = i % g.shape.w;
      const float gv = to_float(grad[offset_of(g.grad, n, c, h, w)]) * gs;
      const device::Terms t =
          lsq_terms(to_float(x[offset_of(g.x, n, c, h, w)]), bias, gv, s, p.act.bits);
      dx[offset_of(g.dx, n, c, h, w)] = from_float<T>(t.dvalue);
      acc += t.dvalue;
      residual += t.residual;
    } else {
      const int64_t at = plane * hw + i;  // hw % V == 0: the pack stays in the plane
      const Pack<T, V> xv = load_pack<T, V>(x + at);
      const Pack<T, V> gv = load_pack<T, V>(grad + at);
      Pack<T, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const device::Terms t =
            lsq_terms(to_float(xv.e[j]), bias, to_float(gv.e[j]) * gs, s, p.act.bits);
        out.e[j] = from_float<T>(t.dvalue);
        acc += t.dvalue;
        residual += t.residual;
      }
      store_pack<T, V>(dx + at, out);
    }
  }
  acc = warp_sum(acc);
  residual = warp_sum(residual);
  if (lane == 0) {
    bias_partials[(n * g.chunks + chunk) * g.shape.c + c] = acc;
    residual_partials[item] = residual;
  }
}

// ---- host side ------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t numel(const Tensor4dView& v) { return v.size[0] * v.size[1] * v.size[2] * v.size[3]; }

// Dense in the layout whose strides are `expect`; the strides of size-1 dims
// do not matter (PyTorch leaves them arbitrary).
bool dense_as(const int64_t (&size)[4], const int64_t (&stride)[4], const int64_t (&expect)[4]) {
  for (int d = 0; d < 4; ++d)
    if (size[d] > 1 && stride[d] != expect[d]) return false;
  return true;
}

bool dense_nchw(const int64_t (&size)[4], const int64_t (&stride)[4]) {
  const int64_t c = size[1], h = size[2], w = size[3];
  const int64_t expect[4] = {c * h * w, h * w, w, 1};
  return dense_as(size, stride, expect);
}

bool dense_nhwc(const int64_t (&size)[4], const int64_t (&stride)[4]) {
  const int64_t c = size[1], h = size[2], w = size[3];
  const int64_t expect[4] = {h * w * c, 1, w * c, c};
  return dense_as(size, stride, expect);
}

// The pixel-strided paths index pixels and (pixel, vector) pairs in 32 bits.
constexpr int64_t kMaxPixelStridedElements = int64_t(1) << 31;

// Channels adjacent (stride 1, C > 1) and pixels at any strides.
bool channels_contiguous(const int64_t (&size)[4], const int64_t (&stride)[4]) {
  return size[1] > 1 && stride[1] == 1;
}

PixelStrides pixel_strides(const int64_t (&stride)[4]) { return {stride[0], stride[2], stride[3]}; }

// What every pixel offset of these strides is a multiple of, with C: the
// vector width must divide it (strides of size-1 dims do not matter).
int64_t pixel_alignment(const int64_t (&size)[4], const int64_t (&stride)[4], int64_t of) {
  for (int d : {0, 2, 3})
    if (size[d] > 1) of = std::gcd(of, stride[d]);
  return of;
}

bool aligned(const void* ptr, size_t bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) % bytes) == 0;
}

// Widest power-of-two vector (<= 16 bytes) that divides `multiple_of` and to
// which every pointer is aligned.
int pick_vec(InType type, int64_t multiple_of, const void* a, const void* b, const void* c) {
  const size_t bytes = element_bytes(type);
  for (int v = static_cast<int>(16 / bytes); v > 1; v /= 2) {
    const size_t vb = bytes * v;
    if (multiple_of % v == 0 && aligned(a, vb) && aligned(b, vb) && aligned(c, vb)) return v;
  }
  return 1;
}

// Calls f(std::integral_constant<int, V>) for vec = V; V = 8 only for 2-byte T.
template <typename T, typename F>
KernelStatus with_vec(int vec, F&& f) {
  if constexpr (sizeof(T) == 2) {
    if (vec == 8) return f(std::integral_constant<int, 8>{});
  }
  if (vec == 4) return f(std::integral_constant<int, 4>{});
  if (vec == 2) return f(std::integral_constant<int, 2>{});
  return f(std::integral_constant<int, 1>{});
}

Strides4 strides_of(const int64_t (&stride)[4]) {
  return {{stride[0], stride[1], stride[2], stride[3]}};
}

Shape4 shape_of(const Tensor4dView& v) { return {v.size[0], v.size[1], v.size[2], v.size[3]}; }

KernelStatus check_common(const char* fn, const Tensor4dView& x, const float* bias_a,
                          const float* scale_a, int bits) {
  for (int d = 0; d < 4; ++d)
    if (x.size[d] < 0) return invalid(fn, "x", "negative size[" + std::to_string(d) + "]");
  if (!AllInTypes::contains(x.type)) return invalid(fn, "x", "unsupported element type");
  if (bits < 2 || bits > 8)
    return invalid(fn, "bits", "must be in [2, 8], got " + std::to_string(bits));
  if (numel(x) == 0) return KernelStatus::success();
  if (x.data == nullptr) return invalid(fn, "x", "null data pointer");
  if (bias_a == nullptr) return invalid(fn, "bias_a", "null pointer");
  if (scale_a == nullptr) return invalid(fn, "scale_a", "null pointer");
  return KernelStatus::success();
}

// ---- codes launch ------------------------------------------------------------------
// The blocks a riding weight-codes job gets (0 without one); its arguments
// go to `w`.
int64_t rider_blocks(const device::WeightCodesArgs* weights, device::WeightCodesArgs& w) {
  if (weights == nullptr) return 0;
  w = *weights;
  const int64_t total = w.size[0] * w.size[1] * w.size[2] * w.size[3];
  return std::min(ceil_div(total, int64_t(kThreads)), kMaxWeightBlocks);
}

template <typename T, typename Idx>
KernelStatus launch_codes_dense(const Tensor4dView& x, T* out, int64_t inner, const ActParams& p,
                                const device::WeightCodesArgs* weights, cudaStream_t stream) {
  const T* in = static_cast<const T*>(x.data);
  const Flat<Idx> f{static_cast<Idx>(numel(x)), static_cast<Idx>(inner),
                    static_cast<Idx>(x.size[1])};
  device::WeightCodesArgs w{};
  const int64_t weight_blocks = rider_blocks(weights, w);
  // Any vector width the pointers allow: the kernel converts a ragged tail
  // element by element. (Asking for widths that divide 1, as before, always
  // gave scalar loads: 0.9-1.0 TB/s on H100.)
  constexpr int64_t kAnyLength = 8;
  return with_vec<T>(pick_vec(x.type, kAnyLength, in, out, out), [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    const int64_t blocks = std::min(ceil_div(numel(x), int64_t(kThreads) * V), kMaxBlocks);
    codes_dense_kernel<T, V, Idx>
        <<<static_cast<unsigned>(blocks + weight_blocks), kThreads, 0, stream>>>(
            in, out, f, p, static_cast<unsigned>(blocks), w);
    return launch_status("lsq_activation_codes");
  });
}

template <typename T>
KernelStatus launch_codes_pixels(const Tensor4dView& x, const Tensor4dOut& out, const ActParams& p,
                                 const device::WeightCodesArgs* weights, cudaStream_t stream) {
  const T* in = static_cast<const T*>(x.data);
  T* o = static_cast<T*>(out.data);
  const int64_t c = x.size[1];
  const PixelGrid g{uint32_t(x.size[0] * x.size[2] * x.size[3]),
                    uint32_t(c),
                    uint32_t(x.size[2]),
                    uint32_t(x.size[3]),
                    pixel_strides(x.stride),
                    pixel_strides(out.stride)};
  device::WeightCodesArgs w{};
  const int64_t weight_blocks = rider_blocks(weights, w);
  const int64_t multiple =
      pixel_alignment(x.size, out.stride, pixel_alignment(x.size, x.stride, c));
  return with_vec<T>(pick_vec(x.type, multiple, in, o, o), [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    const int64_t blocks =
        std::min(ceil_div(int64_t(g.pixels) * (c / V), int64_t(kThreads)), kMaxBlocks);
    codes_pixels_kernel<T, V>
        <<<static_cast<unsigned>(blocks + weight_blocks), kThreads, 0, stream>>>(
            in, o, g, p, static_cast<unsigned>(blocks), w);
    return launch_status("lsq_activation_codes");
  });
}

// Launches the activation codes; `weights` (fp32 weight codes) ride along on
// the dense and channels-contiguous paths, which return true in `carried`.
template <typename T>
KernelStatus launch_codes(const Tensor4dView& x, const Tensor4dOut& out, const ActParams& p,
                          const device::WeightCodesArgs* weights, bool& carried,
                          cudaStream_t stream) {
  T* o = static_cast<T*>(out.data);
  const int64_t total = numel(x);
  const bool nchw = dense_nchw(x.size, x.stride) && dense_nchw(x.size, out.stride);
  const bool nhwc = dense_nhwc(x.size, x.stride) && dense_nhwc(x.size, out.stride);
  if (nchw || nhwc) {
    const int64_t inner = nchw ? x.size[2] * x.size[3] : 1;
    carried = weights != nullptr;
    // 32-bit index math while i + grid stride cannot wrap (stride <= 2^27).
    if (total < (int64_t(1) << 31))
      return launch_codes_dense<T, uint32_t>(x, o, inner, p, weights, stream);
    return launch_codes_dense<T, int64_t>(x, o, inner, p, weights, stream);
  }
  if (channels_contiguous(x.size, x.stride) && channels_contiguous(x.size, out.stride) &&
      total < kMaxPixelStridedElements) {
    carried = weights != nullptr;
    return launch_codes_pixels<T>(x, out, p, weights, stream);
  }
  const int64_t blocks = std::min(ceil_div(total, kThreads), kMaxBlocks);
  codes_strided_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(x.data), o, shape_of(x), strides_of(x.stride), strides_of(out.stride),
      p);
  return launch_status("lsq_activation_codes");
}

// ---- backward plan and launch -------------------------------------------------------
enum class PostPath { kChannelsLast, kPixelStrided, kPlanes, kStridedPlanes };

// The paths of backward_cl_kernel (pixels x channels).
bool channels_last_path(PostPath path) {
  return path == PostPath::kChannelsLast || path == PostPath::kPixelStrided;
}

struct PostPlan {
  PostPath path = PostPath::kPlanes;
  int vec = 1;
  // channels_last
  int bdx = 32, bdy = 8, rows = 1;
  int64_t pixel_chunks = 0, channel_tiles = 0;
  // planes
  int64_t chunks = 0, items = 0;
  LsqWorkspace workspace;
};

// dense: all three tensors dense channels_last; otherwise channels
// contiguous with pixels at their own strides.
PostPlan plan_channels_last(const LsqActBackward& a, bool dense) {
  PostPlan plan;
  plan.path = dense ? PostPath::kChannelsLast : PostPath::kPixelStrided;
  const int64_t c = a.x.size[1];
  const int64_t pixels = a.x.size[0] * a.x.size[2] * a.x.size[3];
  // (For dense tensors every pixel stride is a multiple of C.)
  int64_t multiple = pixel_alignment(a.x.size, a.x.stride, c);
  multiple = pixel_alignment(a.x.size, a.grad.stride, multiple);
  multiple = pixel_alignment(a.x.size, a.dx.stride, multiple);
  plan.vec = pick_vec(a.x.type, multiple, a.x.data, a.grad.data, a.dx.data);
  // As many lanes across the channels as there are channel groups (up to a
  // warp), the rest of the block across pixels, so small C wastes few lanes.
  const int64_t groups = ceil_div(c, plan.vec);
  plan.bdx = 1;
  while (plan.bdx < kWarp && plan.bdx < groups) plan.bdx *= 2;
  plan.bdy = kThreads / plan.bdx;
  plan.channel_tiles = ceil_div(c, int64_t(plan.bdx) * plan.vec);
  // Enough blocks to fill the GPU, as few partial rows as that allows.
  const int64_t rows = ceil_div(pixels * plan.channel_tiles, int64_t(plan.bdy) * kTargetBlocks);
  plan.rows = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxRowsPerThread, rows)));
  plan.pixel_chunks = ceil_div(pixels, int64_t(plan.bdy) * plan.rows);
  plan.workspace = {plan.pixel_chunks, plan.pixel_chunks * plan.channel_tiles};
  return plan;
}

PostPlan plan_planes(const LsqActBackward& a, bool strided) {
  PostPlan plan;
  plan.path = strided ? PostPath::kStridedPlanes : PostPath::kPlanes;
  const int64_t hw = a.x.size[2] * a.x.size[3];
  plan.vec = strided ? 1 : pick_vec(a.x.type, hw, a.x.data, a.grad.data, a.dx.data);
  plan.chunks = ceil_div(hw, kChunk);
  plan.items = a.x.size[0] * a.x.size[1] * plan.chunks;
  plan.workspace = {a.x.size[0] * plan.chunks, plan.items};
  return plan;
}

PostPlan plan_backward(const LsqActBackward& a) {
  if (numel(a.x) == 0) return PostPlan{};
  const auto& size = a.x.size;
  const bool nhwc = dense_nhwc(size, a.x.stride) && dense_nhwc(size, a.grad.stride) &&
                    dense_nhwc(size, a.dx.stride);
  if (nhwc && size[1] > 1) return plan_channels_last(a, true);
  if (channels_contiguous(size, a.x.stride) && channels_contiguous(size, a.grad.stride) &&
      channels_contiguous(size, a.dx.stride) && numel(a.x) < kMaxPixelStridedElements)
    return plan_channels_last(a, false);
  const bool nchw = dense_nchw(size, a.x.stride) && dense_nchw(size, a.grad.stride) &&
                    dense_nchw(size, a.dx.stride);
  return plan_planes(a, !nchw);
}

// Launches the activation backward; `weights` (an fp32 weight backward)
// ride along on the channels_last path, which sets `carried`.
template <typename T>
KernelStatus launch_backward(const LsqActBackward& a, const PostPlan& plan, float* bias_partials,
                             float* residual_partials, const device::WeightBackwardArgs* weights,
                             bool& carried, cudaStream_t stream) {
  const T* x = static_cast<const T*>(a.x.data);
  const T* grad = static_cast<const T*>(a.grad.data);
  T* dx = static_cast<T*>(a.dx.data);
  const PostParams p{{a.bias_a, a.scale_a, a.eps, a.bits}, a.grad_scale};
  if (channels_last_path(plan.path)) {
    ClGeometry geo{a.x.size[0] * a.x.size[2] * a.x.size[3], a.x.size[1], plan.rows};
    const bool pixel_strided = plan.path == PostPath::kPixelStrided;
    if (pixel_strided) {
      geo.h = a.x.size[2];
      geo.w = a.x.size[3];
      geo.x = pixel_strides(a.x.stride);
      geo.grad = pixel_strides(a.grad.stride);
      geo.dx = pixel_strides(a.dx.stride);
    }
    if (plan.pixel_chunks > INT_MAX || plan.channel_tiles > 65535)
      return invalid("lsq_activation_backward", "x", "too many pixels or channels for one grid");
    device::WeightBackwardArgs w{};
    int64_t weight_x = 0;  // extra blocks along x, each column of them gridDim.y channels
    if (weights != nullptr) {
      w = *weights;
      weight_x = ceil_div(w.size[0], plan.channel_tiles);
      carried = true;
    }
    if (plan.pixel_chunks + weight_x > INT_MAX)
      return invalid("lsq_activation_backward", "x", "too many pixels for one grid");
    const dim3 grid(static_cast<unsigned>(plan.pixel_chunks + weight_x),
                    static_cast<unsigned>(plan.channel_tiles));
    const dim3 block(plan.bdx, plan.bdy);
    return with_vec<T>(plan.vec, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const auto kernel =
          pixel_strided ? backward_cl_kernel<T, V, true> : backward_cl_kernel<T, V, false>;
      kernel<<<grid, block, 0, stream>>>(x, grad, dx, geo, p, bias_partials, residual_partials,
                                         static_cast<unsigned>(plan.pixel_chunks), w);
      return launch_status("lsq_activation_backward");
    });
  }
  const int64_t blocks = ceil_div(plan.items, kWarps);
  if (blocks > INT_MAX)
    return invalid("lsq_activation_backward", "x", "too many planes for one grid");
  const PlaneGeometry geo{shape_of(a.x),
                          plan.chunks,
                          plan.items,
                          strides_of(a.x.stride),
                          strides_of(a.grad.stride),
                          strides_of(a.dx.stride)};
  const unsigned grid = static_cast<unsigned>(blocks);
  if (plan.path == PostPath::kStridedPlanes) {
    backward_plane_kernel<T, 1, true>
        <<<grid, kThreads, 0, stream>>>(x, grad, dx, geo, p, bias_partials, residual_partials);
    return launch_status("lsq_activation_backward");
  }
  return with_vec<T>(plan.vec, [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    backward_plane_kernel<T, V, false>
        <<<grid, kThreads, 0, stream>>>(x, grad, dx, geo, p, bias_partials, residual_partials);
    return launch_status("lsq_activation_backward");
  });
}

KernelStatus check_backward(const char* fn, const LsqActBackward& a) {
  KernelStatus st = check_common(fn, a.x, a.bias_a, a.scale_a, a.bits);
  if (!st.ok) return st;
  if (a.grad.type != a.x.type) return invalid(fn, "grad", "element type differs from x's");
  for (int d = 0; d < 4; ++d)
    if (a.grad.size[d] != a.x.size[d]) return invalid(fn, "grad", "sizes differ from x's");
  if (numel(a.x) == 0) return KernelStatus::success();
  if (a.grad.data == nullptr) return invalid(fn, "grad", "null data pointer");
  if (a.dx.data == nullptr) return invalid(fn, "dx", "null data pointer");
  // In place only element for element: a dx over grad at other strides would
  // overwrite elements not yet read.
  if (a.dx.data == a.grad.data)
    for (int d = 0; d < 4; ++d)
      if (a.dx.stride[d] != a.grad.stride[d])
        return invalid(fn, "dx",
                       "is grad's memory at other strides (in place needs grad's strides)");
  return KernelStatus::success();
}

}  // namespace

KernelStatus lsq_activation_codes(const Tensor4dView& x, const float* bias_a, const float* scale_a,
                                  float eps, int bits, const Tensor4dOut& out, cudaStream_t stream,
                                  const WeightCodesJob* weights) {
  const char* fn = "lsq_activation_codes";
  KernelStatus st = check_common(fn, x, bias_a, scale_a, bits);
  if (!st.ok) return st;
  if (numel(x) > 0 && out.data == nullptr) return invalid(fn, "out", "null data pointer");
  // The weight job rides on the launch when its weights are fp32 and
  // non-empty.
  device::WeightCodesArgs w{};
  bool ride = false;
  if (weights != nullptr) {
    st = lsq_weight_codes_check(*weights, bits);
    if (!st.ok) return st;
    ride = numel(weights->w) > 0 && numel(x) > 0 && weights->w.type == InType::kFloat32;
    w = device::weight_codes_args(*weights, eps, bits);
  }
  bool carried = false;
  if (numel(x) > 0) {
    const ActParams p{bias_a, scale_a, eps, bits};
    st = with_type(x.type, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      return launch_codes<T>(x, out, p, ride ? &w : nullptr, carried, stream);
    });
    if (!st.ok) return st;
  }
  if (weights == nullptr || carried) return st;
  return lsq_weight_codes(weights->w, weights->scale_w, weights->per_channel, weights->scaled, eps,
                          bits, x.type, weights->out, stream);
}

LsqWorkspace lsq_activation_backward_workspace(const LsqActBackward& args) {
  return plan_backward(args).workspace;
}

KernelStatus lsq_activation_backward(const LsqActBackward& args, float* bias_partials,
                                     float* residual_partials, cudaStream_t stream,
                                     const LsqWeightBackward* weights, float* row_sums) {
  const char* fn = "lsq_activation_backward";
  KernelStatus st = check_backward(fn, args);
  if (!st.ok) return st;
  if (weights != nullptr) {
    st = lsq_weight_backward_check(*weights, row_sums);
    if (!st.ok) return st;
  }
  bool carried = false;
  if (numel(args.x) > 0) {
    if (bias_partials == nullptr) return invalid(fn, "bias_partials", "null pointer");
    if (residual_partials == nullptr) return invalid(fn, "residual_partials", "null pointer");
    const PostPlan plan = plan_backward(args);
    // The weight backward rides on the channels_last launch when its weights
    // are fp32 and its gradient has x's element type.
    const bool ride = weights != nullptr && channels_last_path(plan.path) &&
                      numel(weights->w) > 0 && weights->w.type == InType::kFloat32 &&
                      weights->grad.type == args.x.type;
    const device::WeightBackwardArgs w =
        ride ? device::weight_backward_args(*weights, row_sums) : device::WeightBackwardArgs{};
    st = with_type(args.x.type, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      return launch_backward<T>(args, plan, bias_partials, residual_partials, ride ? &w : nullptr,
                                carried, stream);
    });
    if (!st.ok) return st;
  }
  if (weights == nullptr || carried) return st;
  return lsq_weight_backward(*weights, row_sums, stream);
}

}  // namespace q4conv
