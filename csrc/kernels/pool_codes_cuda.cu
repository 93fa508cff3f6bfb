// CUDA max-pool on int8 activation codes (interface: pool_codes_kernels.h).
// No torch here.
//
// The deployed model's max-pools between a layer writing codes and their
// readers (ResNet's stem: conv -> BN -> ReLU -> max-pool(3, 2, 1)) run on
// the int8 codes: rounding is monotonic, so the max of codes is the code of
// the max, and a pool of int8 reads a quarter of the bytes of the float16
// round trip it replaces (codes.half() -> max_pool2d -> .to(int8)) in one
// launch instead of three.
//
// One thread per (output pixel, kG consecutive channels), consecutive threads
// on consecutive channel groups of one pixel, so a warp's loads of one window
// position are contiguous runs of channels:
//   * kG = 16: C % 16 == 0, both pointers 16-byte aligned: one 16-byte load
//     per window position, __vmaxs4 on its four words of four signed bytes;
//   * kG = 4: C % 4 == 0, 4-byte aligned: one 32-bit word, one __vmaxs4;
//   * kG = 1: scalar, any C and alignment.
// Flat indices are unravelled in 32-bit arithmetic where both tensors have
// fewer than 2^31 elements (the divisions are most of the kernel's
// arithmetic), in 64-bit otherwise; pointer offsets are always 64-bit.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "pool_codes_kernels.h"

namespace q4conv {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride beyond this

// kG channels of one pixel as one load moves them, and their max.
template <int kG>
struct CodeGroup;

template <>
struct CodeGroup<16> {
  using Raw = uint4;
  static __device__ __forceinline__ Raw lowest() {
    return make_uint4(0x80808080u, 0x80808080u, 0x80808080u, 0x80808080u);
  }
  static __device__ __forceinline__ Raw max(Raw a, Raw b) {
    return make_uint4(__vmaxs4(a.x, b.x), __vmaxs4(a.y, b.y), __vmaxs4(a.z, b.z),
                      __vmaxs4(a.w, b.w));
  }
};

template <>
struct CodeGroup<4> {
  using Raw = unsigned int;
  static __device__ __forceinline__ Raw lowest() { return 0x80808080u; }
  static __device__ __forceinline__ Raw max(Raw a, Raw b) { return __vmaxs4(a, b); }
};

template <>
struct CodeGroup<1> {
  using Raw = signed char;
  static __device__ __forceinline__ Raw lowest() { return SCHAR_MIN; }
  static __device__ __forceinline__ Raw max(Raw a, Raw b) { return a > b ? a : b; }
};

// The max over one window of channel group `g` of pixel (n, y, x);
// padding positions are skipped (they never win: -inf in max_pool2d).
template <int kG>
__device__ __forceinline__ typename CodeGroup<kG>::Raw window_max(const int8_t* __restrict__ in,
                                                                  const PoolShape& s, int64_t n,
                                                                  int64_t y, int64_t x, int64_t g) {
  using Group = CodeGroup<kG>;
  using Raw = typename Group::Raw;
  const int64_t y0 = y * s.stride[0] - s.padding[0], x0 = x * s.stride[1] - s.padding[1];
  const int8_t* image = in + n * s.h * s.w * s.c + g * kG;
  Raw m = Group::lowest();
  for (int i = 0; i < s.kernel[0]; ++i) {
    const int64_t yy = y0 + int64_t(i) * s.dilation[0];
    if (yy < 0 || yy >= s.h) continue;
    const int8_t* row = image + yy * s.w * s.c;
    for (int j = 0; j < s.kernel[1]; ++j) {
      const int64_t xx = x0 + int64_t(j) * s.dilation[1];
      if (xx < 0 || xx >= s.w) continue;
      m = Group::max(m, __ldg(reinterpret_cast<const Raw*>(row + xx * s.c)));
    }
  }
  return m;
}

template <int kG, typename Index>
__global__ void __launch_bounds__(kThreads)
    max_pool_codes_kernel(const int8_t* __restrict__ in, PoolShape s, int8_t* __restrict__ out) {
  using Raw = typename CodeGroup<kG>::Raw;
  const Index groups = static_cast<Index>(s.c / kG);
  const Index p = static_cast<Index>(s.p), q = static_cast<Index>(s.q);
  const Index total = static_cast<Index>(s.n * s.p * s.q * (s.c / kG));
  for (Index i = Index(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += Index(gridDim.x) * blockDim.x) {
    const Index g = i % groups;
    const Index pixel = i / groups;  // flat (n, y, x) of the output
    const Index x = pixel % q;
    const Index t = pixel / q;
    const Raw m = window_max<kG>(in, s, int64_t(t / p), int64_t(t % p), int64_t(x), int64_t(g));
    *reinterpret_cast<Raw*>(out + int64_t(pixel) * s.c + int64_t(g) * kG) = m;
  }
}

bool aligned(const void* ptr, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) & (bytes - 1)) == 0;
}

template <int kG, typename Index>
KernelStatus launch(const int8_t* in, const PoolShape& s, int8_t* out, cudaStream_t stream) {
  const int64_t threads = s.n * s.p * s.q * (s.c / kG);
  const int64_t blocks = std::min((threads + kThreads - 1) / kThreads, kMaxBlocks);
  max_pool_codes_kernel<kG, Index>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(in, s, out);
  return launch_status("max_pool_codes_nhwc");
}

// 32-bit index arithmetic where both tensors have fewer than 2^31 elements.
template <int kG>
KernelStatus launch_indexed(const int8_t* in, const PoolShape& s, int8_t* out,
                            cudaStream_t stream) {
  const bool small = s.n * s.h * s.w * s.c <= INT_MAX && s.n * s.p * s.q * s.c <= INT_MAX;
  return small ? launch<kG, uint32_t>(in, s, out, stream) : launch<kG, int64_t>(in, s, out, stream);
}

bool valid(const PoolShape& s) {
  for (int a = 0; a < 2; ++a) {
    if (s.kernel[a] < 1 || s.stride[a] < 1 || s.dilation[a] < 1 || s.padding[a] < 0 ||
        s.padding[a] > s.kernel[a] / 2)
      return false;
  }
  return s.n >= 0 && s.h >= 1 && s.w >= 1 && s.c >= 1 && s.p >= 0 && s.q >= 0;
}

}  // namespace

KernelStatus max_pool_codes_nhwc(const int8_t* in, const PoolShape& shape, int8_t* out,
                                 cudaStream_t stream) {
  if (!valid(shape))
    return KernelStatus::failure("max_pool_codes_nhwc: invalid pool shape or arguments");
  if (shape.n == 0 || shape.p == 0 || shape.q == 0) return KernelStatus::success();
  if (in == nullptr || out == nullptr)
    return KernelStatus::failure("max_pool_codes_nhwc: null input or output pointer");
  if (shape.c % 16 == 0 && aligned(in, 16) && aligned(out, 16))
    return launch_indexed<16>(in, shape, out, stream);
  if (shape.c % 4 == 0 && aligned(in, 4) && aligned(out, 4))
    return launch_indexed<4>(in, shape, out, stream);
  return launch_indexed<1>(in, shape, out, stream);
}

}  // namespace q4conv
