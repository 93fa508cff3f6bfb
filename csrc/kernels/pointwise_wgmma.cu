// Fused activation quantization + int8 wgmma GEMM for dense 1x1 stride-1
// convolutions on sm_90a (quantize_kernels.h, pointwise_wgmma_conv).
//
// Why: on the large-C 1x1 layers the separate quantization pass alone takes
// about cuDNN's whole time (it reads the fp16 input and writes int8 codes
// that the GEMM then reads again), and the mma.sync fused kernel
// (pointwise_fused.cu) cannot hold their weights. Here the codes live only
// in shared memory:
//   - one thread streams fp16 / bf16 input tiles [BM pixels x 64 channels]
//     and int8 weight tiles [BN x 64] into shared memory with TMA (128- and
//     64-byte swizzles, a ring of full / empty mbarriers);
//   - the CTA's warpgroups (BN / 128 of them) quantize each input tile
//     (bias_a added, quant.h's arithmetic, so the codes equal the separate
//     pass's bit for bit) into one of two code tiles in the wgmma's K-major
//     layout, then multiply it with their 128 channels of the weight tile by
//     wgmma m64n128k32 from shared memory while they quantize the next tile.
//     (Register-sourced wgmma would skip the code tile, but ptxas serializes
//     every wgmma whose register operands come out of the quantization's
//     fallback branch, C7513: 2-3x slower, measured.)
//   - the epilogue out = act(alpha[n] * acc + bias[n]) goes through a padded
//     shared-memory tile and leaves as whole 16-byte row pieces.
// Each input tile is read once per BN-wide slice of K (BN = 256 where K %
// 256 == 0, else 128).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/device_kernel.h>

#include "kernels/device_common.cuh"
#include "kernels/quantize_kernels.h"
#include "quant.h"

namespace q4conv {
namespace {

using namespace cute;
using device::store_pair;
using device::to_float;

constexpr int kBK = 64;             // channels per pipeline stage
constexpr int kBNPerGroup = 128;    // output channels per consumer warpgroup
constexpr int kMaxChannels = 2048;  // bias_a kept in shared memory
// 16-bit inputs only: the TMA input tiles are 128-byte rows of 64 channels.
using WgmmaInTypes = TypeList<InType::kFloat16, InType::kBFloat16>;

// A CTA has kGroups consumer warpgroups side by side along N (128 output
// channels each; all multiply the same code tiles): a 64 x 128 (kGroups = 1)
// or 64 x 256 (kGroups = 2) output tile. A 128 x 256 tile (two warpgroups
// along M as well, one CTA per SM) measured slower than 64 x 256 on every
// 1x1 layer with K % 256 == 0.
template <int kGroups>
struct CtaShape {
  static constexpr int kBM = 64;
  static constexpr int kBN = kBNPerGroup * kGroups;
  static constexpr int kThreads = 128 * kGroups;
  // Registers: 128 (64 accumulators) fit two 256-thread or three 128-thread
  // CTAs per SM; ptxas's own bound from a minimum-blocks launch bound is
  // lower (96 for the earlier 288-thread CTA, with local memory).
  static constexpr int kMaxRegisters = 128;
  // Ring depth: 4 stages of 24 KB (64 x 256: two CTAs per SM), 3 of 16 KB
  // (64 x 128: three CTAs per SM).
  static constexpr int kStages = kGroups == 1 ? 3 : 4;
  // Quantization: kPerRow threads per pixel, kCols channels each.
  static constexpr int kPerRow = kThreads / kBM;
  static constexpr int kCols = kBK / kPerRow;
};

template <typename T>
struct CuteType;
template <>
struct CuteType<__half> {
  using type = cute::half_t;
};
template <>
struct CuteType<__nv_bfloat16> {
  using type = cute::bfloat16_t;
};

// Shared-memory layouts of one CTA: input tiles [64 x 64] fp16 / bf16 (128-byte
// rows, 128-byte swizzle) and weight tiles [BN x 64] int8 (64-byte rows,
// 64-byte swizzle), kStages of each; two code tiles [64 x 64] int8 that the
// consumers write and the wgmma reads (the wgmma's K-major layout). The MMA:
// one wgmma m64n128k32 atom per consumer warpgroup, side by side along N.
template <typename T, int kGroups>
struct Layouts {
  using S = CtaShape<kGroups>;
  using In = typename CuteType<T>::type;
  using SmemA = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<In>{},
                                       Shape<Int<S::kBM>, _64, Int<S::kStages>>{}));
  using SmemB = decltype(tile_to_shape(GMMA::Layout_K_SW64_Atom<int8_t>{},
                                       Shape<Int<S::kBN>, _64, Int<S::kStages>>{}));
  using SmemCodes =
      decltype(tile_to_shape(GMMA::Layout_K_SW64_Atom<int8_t>{}, Shape<Int<S::kBM>, _64, _2>{}));
  using TiledMma = decltype(make_tiled_mma(SM90::GMMA::MMA_64x128x32_S32S8S8_SS_TN{},
                                           Layout<Shape<_1, Int<kGroups>, _1>>{}));
};

template <typename T, int kGroups>
struct alignas(1024) SharedStorage {
  using L = Layouts<T, kGroups>;
  cute::array_aligned<typename L::In, cosize_v<typename L::SmemA>, 1024> a;
  cute::array_aligned<int8_t, cosize_v<typename L::SmemB>, 1024> b;
  cute::array_aligned<int8_t, cosize_v<typename L::SmemCodes>, 1024> codes;
  float bias_a[kMaxChannels];
  uint64_t full[CtaShape<kGroups>::kStages];
  uint64_t empty[CtaShape<kGroups>::kStages];
};

struct Params {
  int m = 0, c = 0, k = 0;  // pixels, input channels, output channels
  const float* bias_a = nullptr;
  const float* scale_a = nullptr;
  float eps = 0.0f;
  int bits = 4;
  EpilogueArgs epi;
};

// Padded staging pitch of the epilogue tile: 16 bytes past a whole row puts
// the 8 rows of one accumulator store on distinct banks.
template <typename OutT, int BN>
constexpr int staging_pitch() {
  return BN * int(sizeof(OutT)) + 16;
}

__device__ __forceinline__ uint32_t pack_codes(const int8_t* q) {
  return uint32_t(uint8_t(q[0])) | (uint32_t(uint8_t(q[1])) << 8) |
         (uint32_t(uint8_t(q[2])) << 16) | (uint32_t(uint8_t(q[3])) << 24);
}

// 16 consecutive channels of one pixel: two 16-byte input chunks plus
// bias_a, quantized into one 16-byte code chunk, bit for bit the separate
// pass's codes. fast_code for all 16 and one test; in a group that fails it,
// only the values that fail fast_code take quantize_value (the exact
// division). fp16 inputs repeat a few values thousands of times, so for some
// scales a near-tie value is common: redoing all 16 values of a failed group
// made this kernel's time a lottery over scale_a (C1024->K256 14x14: 22.6 and
// 28.2 us in two processes). The fallback's inverse scale goes through an
// opaque move so that the compiler recomputes fast_code there instead of
// keeping a per-value flag mask from the fast path (quant.h's
// quantize_values_fast: two more instructions per value, and spills here).
template <typename T>
__device__ __forceinline__ void quantize16(const char* lo, const char* hi, const float* bias,
                                           float scale, float inv_scale, int bits, char* codes) {
  const uint4 raw[2] = {*reinterpret_cast<const uint4*>(lo), *reinterpret_cast<const uint4*>(hi)};
  const T* e = reinterpret_cast<const T*>(raw);
  float v[16];
#pragma unroll
  for (int i = 0; i < 16; i += 4) {
    const float4 b = *reinterpret_cast<const float4*>(bias + i);
    v[i] = to_float(e[i]) + b.x;
    v[i + 1] = to_float(e[i + 1]) + b.y;
    v[i + 2] = to_float(e[i + 2]) + b.z;
    v[i + 3] = to_float(e[i + 3]) + b.w;
  }
  int8_t q[16];
  bool fast = true;
#pragma unroll
  for (int i = 0; i < 16; ++i) fast &= fast_code(v[i], inv_scale, bits, q[i]);
  if (!fast) {
    float inv_again;
    asm volatile("mov.b32 %0, %1;" : "=f"(inv_again) : "f"(inv_scale));
    for (int i = 0; i < 16; ++i) q[i] = quantize_value_fast(v[i], scale, inv_again, bits);
  }
  *reinterpret_cast<uint4*>(codes) =
      make_uint4(pack_codes(q), pack_codes(q + 4), pack_codes(q + 8), pack_codes(q + 12));
}

template <typename T, typename OutT, int kGroups, class TmaA, class TmaB>
__global__ void __launch_bounds__(CtaShape<kGroups>::kThreads)
    __maxnreg__(CtaShape<kGroups>::kMaxRegisters)
        pointwise_wgmma_kernel(const Params p, CUTLASS_GRID_CONSTANT const TmaA tma_a,
                               CUTLASS_GRID_CONSTANT const TmaB tma_b) {
  using S = CtaShape<kGroups>;
  using L = Layouts<T, kGroups>;
  using Storage = SharedStorage<T, kGroups>;
  constexpr int kStages = S::kStages, kBM = S::kBM, kBN = S::kBN, kThreads = S::kThreads;
  extern __shared__ __align__(1024) char smem_raw[];
  Storage& smem = *reinterpret_cast<Storage*>(smem_raw);
  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const int n_block = blockIdx.x, m_block = blockIdx.y;
  const int k_tiles = p.c / kBK;

  using FullBarrier = cutlass::arch::ClusterTransactionBarrier;
  using EmptyBarrier = cutlass::arch::ClusterBarrier;
  if (thread == 0) {
    for (int s = 0; s < kStages; ++s) {
      FullBarrier::init(&smem.full[s], 1);
      EmptyBarrier::init(&smem.empty[s], kThreads / 32);
    }
    cutlass::arch::fence_barrier_init();
  }
  for (int i = thread; i < p.c; i += kThreads) smem.bias_a[i] = __ldg(p.bias_a + i);
  __syncthreads();

  Tensor sA = make_tensor(make_smem_ptr(smem.a.data()), typename L::SmemA{});  // (64, 64, S)
  Tensor sB = make_tensor(make_smem_ptr(smem.b.data()), typename L::SmemB{});  // (BN, 64, S)
  Tensor sCodes =
      make_tensor(make_smem_ptr(smem.codes.data()), typename L::SmemCodes{});  // (64, 64, 2)

  // Thread 0 streams the k tiles of this CTA's input rows and weight slice
  // through the ring: the first kStages here, tile kt + kStages - 1 once
  // every warp has released tile kt - 1 (in the loop). (A producer warp of
  // its own measured slower: 30.4 vs 22.6 us on C1024->K256 14x14; its CTA
  // of 9 warps fit only 112 registers per thread and used local memory.)
  Tensor mA = tma_a.get_tma_tensor(make_shape(p.m, p.c));
  Tensor mB = tma_b.get_tma_tensor(make_shape(p.k, p.c));
  Tensor gA = local_tile(mA, Shape<Int<kBM>, _64>{}, make_coord(m_block, _));  // (BM,64,k)
  Tensor gB = local_tile(mB, Shape<Int<kBN>, _64>{}, make_coord(n_block, _));  // (BN,64,k)
  // (global k tiles, ring stages) of each operand.
  const auto tma_tiles_a =
      tma_partition(tma_a, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sA), group_modes<0, 2>(gA));
  const auto tma_tiles_b =
      tma_partition(tma_b, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sB), group_modes<0, 2>(gB));
  const auto load_tile = [&](int kt) {
    constexpr int kTxBytes = kBM * kBK * int(sizeof(T)) + kBN * kBK;
    const int s = kt % kStages;
    FullBarrier::arrive_and_expect_tx(&smem.full[s], kTxBytes);
    copy(tma_a.with(smem.full[s]), get<0>(tma_tiles_a)(_, kt), get<1>(tma_tiles_a)(_, s));
    copy(tma_b.with(smem.full[s]), get<0>(tma_tiles_b)(_, kt), get<1>(tma_tiles_b)(_, s));
  };
  if (thread == 0)
    for (int kt = 0; kt < kStages && kt < k_tiles; ++kt) load_tile(kt);

  // Thread t quantizes pixel t / kPerRow, channels (t % kPerRow) * kCols ...
  // of each input tile, 16 at a time: 16-byte chunks in and out
  // (conflict-free for both swizzles).
  const int my_row = thread / S::kPerRow, my_col = (thread % S::kPerRow) * S::kCols;
  constexpr int kCalls = S::kCols / 16;
  const char* a_base = reinterpret_cast<const char*>(smem.a.data());
  char* codes_base = reinterpret_cast<char*>(smem.codes.data());
  uint32_t in_offset[2 * kCalls], code_offset[kCalls];
#pragma unroll
  for (int i = 0; i < 2 * kCalls; ++i)
    in_offset[i] = uint32_t(reinterpret_cast<const char*>(&sA(my_row, my_col + 8 * i, 0)) - a_base);
#pragma unroll
  for (int i = 0; i < kCalls; ++i)
    code_offset[i] =
        uint32_t(reinterpret_cast<const char*>(&sCodes(my_row, my_col + 16 * i, 0)) - codes_base);
  constexpr int kStageBytesA = kBM * kBK * int(sizeof(T));
  constexpr int kCodeTileBytes = kBM * kBK;

  typename L::TiledMma mma;
  ThrMMA thr_mma = mma.get_thread_slice(thread);
  Tensor tCrA = thr_mma.make_fragment_A(thr_mma.partition_A(sCodes));  // (V, 1, 2, 2) descriptors
  Tensor tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(sB));      // (V, 1, 2, S) descriptors
  Tensor accum = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});  // this thread's 64x128
  clear(accum);
  mma.accumulate_ = GMMA::ScaleOut::One;

  const float scale = effective_scale(*p.scale_a, p.eps);
  const float inv_scale = 1.0f / scale;

  for (int kt = 0; kt < k_tiles; ++kt) {
    const int s = kt % kStages, buffer = kt % 2;
    FullBarrier::wait(&smem.full[s], (kt / kStages) & 1);
    // Codes of tile kt into code buffer kt % 2, whose last reader, the wgmma
    // of tile kt - 2, finished before tile kt - 1's release below.
    const char* tile = a_base + s * kStageBytesA;
    char* codes = codes_base + buffer * kCodeTileBytes;
    const float* bias = smem.bias_a + kt * kBK + my_col;
#pragma unroll
    for (int i = 0; i < kCalls; ++i)
      quantize16<T>(tile + in_offset[2 * i], tile + in_offset[2 * i + 1], bias + 16 * i, scale,
                    inv_scale, p.bits, codes + code_offset[i]);
    // The wgmma reads the codes through the async proxy, after every thread
    // has written its part.
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
    warpgroup_arrive();
#pragma unroll
    for (int kb = 0; kb < 2; ++kb)
      cute::gemm(mma, tCrA(_, _, kb, buffer), tCrB(_, _, kb, s), accum);
    warpgroup_commit_batch();
    // Tile kt - 1's wgmma is done: its weight stage and code buffer are free
    // (its input stage was read before the barrier above).
    warpgroup_wait<1>();
    if (kt > 0) {
      __syncwarp();
      const int freed = (kt - 1) % kStages;
      if (lane == 0) EmptyBarrier::arrive(&smem.empty[freed]);
      if (thread == 0 && kt - 1 + kStages < k_tiles) {
        EmptyBarrier::wait(&smem.empty[freed], ((kt - 1) / kStages) & 1);
        load_tile(kt - 1 + kStages);
      }
    }
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(accum);

  // Epilogue: every thread is past its last read of the ring and the code
  // tiles, so the input / weight / code tiles (contiguous) become the
  // staging tile. Accumulator i of a thread is (row 16 w + lane / 4 + 8 ((i
  // / 2) % 2), column 128 g + 8 (i / 4) + 2 (lane % 4) + i % 2) of the CTA
  // tile (GMMA::CLayout_64x128; g = the thread's warpgroup, w = its warp
  // there).
  __syncthreads();
  constexpr int kPitch = staging_pitch<OutT, kBN>();
  char* staging = reinterpret_cast<char*>(smem.a.data());
  const float lower = p.epi.relu ? 0.0f : -INFINITY;
  const int n0 = n_block * kBN;
  const int row0 = (warp % 4) * 16 + lane / 4;
  const int col0 = (warp / 4) * kBNPerGroup + (lane % 4) * 2;
  const float* alpha = p.epi.alpha + n0;
  const float* bias = p.epi.bias;
#pragma unroll
  for (int j = 0; j < kBNPerGroup / 8; ++j) {
    const int col = col0 + j * 8;
    const float2 al = __ldg(reinterpret_cast<const float2*>(alpha + col));
    const float2 bi = bias != nullptr ? __ldg(reinterpret_cast<const float2*>(bias + n0 + col))
                                      : make_float2(0.0f, 0.0f);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float v0 = fmaxf(al.x * float(accum(4 * j + 2 * h)) + bi.x, lower);
      const float v1 = fmaxf(al.y * float(accum(4 * j + 2 * h + 1)) + bi.y, lower);
      store_pair<OutT>(staging + (row0 + 8 * h) * kPitch + col * int(sizeof(OutT)), v0, v1);
    }
  }
  __syncthreads();
  constexpr int kChunks = kBN * int(sizeof(OutT)) / 16;  // 16-byte pieces per row
  OutT* out = static_cast<OutT*>(p.epi.out);
  for (int i = thread; i < kBM * kChunks; i += kThreads) {
    const int row = i / kChunks, chunk = i % kChunks;
    const int64_t m = int64_t(m_block) * kBM + row;
    if (m >= p.m) break;  // rows grow with i
    const uint4 v = *reinterpret_cast<const uint4*>(staging + row * kPitch + chunk * 16);
    char* dst = reinterpret_cast<char*>(out + m * p.k + n0) + chunk * 16;
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "r"(v.x), "r"(v.y),
                 "r"(v.z), "r"(v.w)
                 : "memory");
  }
}

template <typename T, typename OutT, int kGroups>
KernelStatus launch(const Params& p, const void* x, const int8_t* weight, cudaStream_t stream) {
  using S = CtaShape<kGroups>;
  using L = Layouts<T, kGroups>;
  using In = typename L::In;
  using Storage = SharedStorage<T, kGroups>;
  Tensor mA = make_tensor(make_gmem_ptr(static_cast<const In*>(x)), make_shape(p.m, p.c),
                          make_stride(p.c, _1{}));
  Tensor mB = make_tensor(make_gmem_ptr(weight), make_shape(p.k, p.c), make_stride(p.c, _1{}));
  auto tma_a =
      make_tma_atom(SM90_TMA_LOAD{}, mA, typename L::SmemA{}(_, _, 0), Shape<Int<S::kBM>, _64>{});
  auto tma_b =
      make_tma_atom(SM90_TMA_LOAD{}, mB, typename L::SmemB{}(_, _, 0), Shape<Int<S::kBN>, _64>{});
  const auto kernel = pointwise_wgmma_kernel<T, OutT, kGroups, decltype(tma_a), decltype(tma_b)>;
  constexpr int kSmem = int(sizeof(Storage));
  static_assert(staging_pitch<OutT, S::kBN>() * S::kBM <=
                    int(sizeof(Storage::a)) + int(sizeof(Storage::b)) + int(sizeof(Storage::codes)),
                "the epilogue tile fits the ring");
  static std::atomic<int> raised[kMaxDevices];
  cudaError_t err = raise_smem_limit(reinterpret_cast<const void*>(kernel), kSmem, true, raised);
  if (err != cudaSuccess)
    return KernelStatus::failure(std::string("pointwise_wgmma_conv: shared memory limit: ") +
                                 cudaGetErrorString(err));
  const dim3 grid(p.k / S::kBN, (p.m + S::kBM - 1) / S::kBM);
  kernel<<<grid, S::kThreads, kSmem, stream>>>(p, tma_a, tma_b);
  return launch_status("pointwise_wgmma_conv");
}

// Consumer warpgroups per CTA: two (64 x 256 tiles) where K % 256 == 0, else one.
int groups_for(int out_channels) { return out_channels % 256 == 0 ? 2 : 1; }

template <typename T, int kGroups>
KernelStatus launch_for_groups(const Params& p, const void* x, const int8_t* weight,
                               cudaStream_t stream) {
  return with_out_type<PointwiseWgmmaOutTypes>(
      p.epi.out_type,
      [&](auto out) {
        return launch<T, out_element_of<decltype(out)>, kGroups>(p, x, weight, stream);
      },
      [] { return KernelStatus::failure("pointwise_wgmma_conv: unsupported output type"); });
}

template <typename T>
KernelStatus launch_for_out(const Params& p, const void* x, const int8_t* weight,
                            cudaStream_t stream) {
  return groups_for(p.k) == 2 ? launch_for_groups<T, 2>(p, x, weight, stream)
                              : launch_for_groups<T, 1>(p, x, weight, stream);
}

}  // namespace

bool pointwise_wgmma_supports(InType x_type, int64_t pixels, int channels, int out_channels) {
  return WgmmaInTypes::contains(x_type) && pixels > 0 && pixels < (int64_t(1) << 31) &&
         channels > 0 && channels % kBK == 0 && channels <= kMaxChannels && out_channels > 0 &&
         out_channels % 128 == 0;
}

KernelStatus pointwise_wgmma_conv(const void* x, InType x_type, int64_t pixels, int channels,
                                  const float* bias_a, const float* scale_a, float eps, int bits,
                                  const int8_t* weight, int out_channels,
                                  const EpilogueArgs& epilogue, cudaStream_t stream) {
  if (!pointwise_wgmma_supports(x_type, pixels, channels, out_channels))
    return KernelStatus::failure(
        "pointwise_wgmma_conv: unsupported input (needs fp16 / bf16 x, C % 64 == 0, C <= 2048, "
        "K % 128 == 0)");
  const KernelStatus pointers = device::check_pointwise_pointers("pointwise_wgmma_conv", x, weight,
                                                                 bias_a, scale_a, epilogue);
  if (!pointers.ok) return pointers;
  Params p;
  p.m = int(pixels), p.c = channels, p.k = out_channels;
  p.bias_a = bias_a, p.scale_a = scale_a, p.eps = eps, p.bits = bits, p.epi = epilogue;
  return with_in_type<WgmmaInTypes>(
      x_type,
      [&](auto in) { return launch_for_out<in_element_of<decltype(in)>>(p, x, weight, stream); },
      [] { return KernelStatus::failure("pointwise_wgmma_conv: unsupported input type"); });
}

}  // namespace q4conv
