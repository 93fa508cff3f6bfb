// Fused activation quantization + int8 tensor-core GEMM for dense 1x1
// stride-1 convolutions (interface: quantize_kernels.h). No torch, no CUTLASS.
//
// Why: a 1x1 layer is memory bound (fp16 in, fp16 out). The separate
// quantization pass reads the fp16 input, writes int8 codes and the GEMM reads
// them again; here the input is read once, at 2 (or 4) bytes per element, as
// cuDNN reads it, and the codes never leave shared memory.
//
// "A-stationary" blocks: a block owns kBM pixel rows and a range of output
// channels (all K unless the grid is split along K to fill the machine).
//   1. It reads its fp16/bf16/fp32 rows [kBM x C] (one contiguous range of a
//      channels_last tensor) with 16-byte loads, 16 in flight per thread,
//      quantizes them with quant.h's arithmetic (bit-identical to the separate
//      pass) and keeps the int8 codes of the whole row block in shared memory.
//   2. It loops over its output channels in column blocks of BN and over C in
//      steps of 64, streaming int8 weight tiles [BN x 64] (L2 resident: every
//      block reads the same weights) through a kStages-deep cp.async ring that
//      runs across column blocks, so weight latency never drains the pipe. The
//      first stages are issued before step 1 and land while it runs.
//   3. mma.sync m16n8k32 s8 (sm_80+; about half the wgmma rate on sm_90, which
//      these memory-bound layers do not reach), fragments through ldmatrix, and
//      after the last step of each column block the epilogue of the sm90 EVT
//      (fp32 alpha[k] * acc + bias[k], optional ReLU, convert, NHWC store).
// Every input element is thus loaded and quantized once per block; with K
// split s ways it is quantized s times (s = 1 on the large layers).
//
// Measured (H100, NOTES.md session 3): bit-identical to the pass + GEMM, but
// faster than it only for K = 64 (C64->K64 and C256->K64 at 56x56); elsewhere
// 1.04-2.1x slower. ncu: 25% occupancy (128 registers), 0.3-0.45 instructions
// issued per scheduler and cycle, DRAM at 30-36% of peak: the quantization
// (~10 instructions per element) and the phases of the two blocks per SM do
// not overlap enough.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../quant.h"
#include "quantize_kernels.h"

namespace q4conv {
namespace {

constexpr int kThreads = 256;  // 8 warps: 2 along M x 4 along N
constexpr int kWarpsM = 2, kWarpsN = 4;
constexpr int kStepK = 64;          // channels per weight stage (64-byte rows, swizzled)
constexpr int kStages = 4;          // weight ring depth
constexpr int kBurst = 16;          // 16-byte input loads in flight per thread
constexpr int kMaxChannels = 2048;  // kBM = 64 rows of 2048 codes: 130 KB

// Rows per block and the L2 prefetch default, as measured on H100 (NOTES.md,
// session 3): C in (64, 256]: 64 rows with the prefetch (8-23% faster than
// 128 rows without it on the four such ResNet-50 layers); C = 64 and C = 512:
// 128 rows without (64 rows with the prefetch was 14% and 10% slower on
// C64->K64 and C512->K256); C > 512: 64 rows (the int8 row block must stay
// <= ~66 KB for two blocks per SM), no prefetch.
constexpr int block_rows(int channels) {
  return channels > 64 && channels <= 256 ? 64 : (channels <= 512 ? 128 : 64);
}
constexpr bool prefetch_by_default(int channels) { return channels > 64 && channels <= 256; }

// Epilogue staging per warp: 8 rows of its int32 accumulators, rows padded
// to kCols + 8 words (stride 8 or 24 mod 32 banks: the 64-bit fragment
// stores of 4 rows by 4 lanes hit distinct banks).
template <int BN>
__host__ __device__ constexpr int staging_words() {
  return 8 * (BN / kWarpsN + 8);
}

template <int BN>
size_t smem_bytes_for(int channels, int block_rows) {
  return size_t(block_rows) * (channels + 16) + size_t(kStages) * BN * kStepK +
         size_t(kThreads / 32) * staging_words<BN>() * 4;
}

// Weight rows are 64 bytes (4 chunks of 16) without padding; chunk `part` of
// row `row` is stored at chunk part ^ ((row >> 1) & 3), so the 8 rows of an
// ldmatrix phase (same logical chunk) fall on 8 distinct 16-byte bank groups.
__device__ __forceinline__ int w_offset(int row, int part) {
  return row * kStepK + ((part ^ ((row >> 1) & 3)) << 4);
}

struct Params {
  const void* x;         // [m, c] channels_last input
  const int8_t* weight;  // [k, c] int8 codes
  const float* bias_a;   // [c]
  const float* scale_a;  // 1 value
  float eps;
  int bits;
  int64_t m;  // rows = pixels
  int c, k;
  uint32_t c_magic;        // ceil(2^32 / c): e / c as __umulhi(e, c_magic) for e * c < 2^32
  int splits;              // column ranges per row block (grid = row blocks * splits)
  int col_blocks_per_cta;  // BN-wide column blocks per block
  int staging_offset;      // bytes from the shared base to the epilogue staging
  int prefetch_rows;       // L2 prefetch distance in row blocks (0: none)
  bool vector_epilogue;    // alpha (and bias) 16-byte aligned: read as float4
  EpilogueArgs epi;
};

__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}

__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes of input as floats: 8 fp16/bf16 or 4 fp32 values.
template <typename T>
struct Unit;
template <>
struct Unit<float> {
  static constexpr int kElems = 4;
  static __device__ __forceinline__ void to_float(const uint4& u, float* f) {
    f[0] = __uint_as_float(u.x), f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z), f[3] = __uint_as_float(u.w);
  }
};
template <>
struct Unit<__half> {
  static constexpr int kElems = 8;
  static __device__ __forceinline__ void to_float(const uint4& u, float* f) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &w[i], 4);
      const float2 v = __half22float2(h);
      f[2 * i] = v.x, f[2 * i + 1] = v.y;
    }
  }
};
template <>
struct Unit<__nv_bfloat16> {
  static constexpr int kElems = 8;
  static __device__ __forceinline__ void to_float(const uint4& u, float* f) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32.
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

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

// Loads kN consecutive floats at src (16-byte aligned when vec).
template <int kN>
__device__ __forceinline__ void load_floats(float (&dst)[kN], const float* src, bool vec) {
  if (vec) {
#pragma unroll
    for (int v = 0; v < kN; v += 4) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(src + v));
      dst[v] = f.x, dst[v + 1] = f.y, dst[v + 2] = f.z, dst[v + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int v = 0; v < kN; ++v) dst[v] = __ldg(src + v);
  }
}

// out[m, n] = act(alpha[n] * acc + bias[n]) for this warp's accumulators of
// the column block starting at n0 (as the sm90 EVT: fp32 FMA, then convert).
// Each 8-row half of an m16 tile goes through the warp's staging buffer as
// int32 fragments; then lane (r, q) = (lane / 4, lane % 4) takes row r,
// channels q * kCPL ... + kCPL - 1 (the same channels for every row, so its
// alpha and bias are 2 or 4 vector loads), and 4 lanes store a row's whole
// 32- or 64-byte segment: L2 sees full sectors.
template <typename OutT, int kMT, int kNT>
__device__ __forceinline__ void store_tile(const Params& p, const int (&acc)[kMT][kNT][4],
                                           int64_t row0, int n0, int* stage) {
  constexpr int kCols = kNT * 8;
  constexpr int kPitch = kCols + 8;  // words
  constexpr int kCPL = kCols / 4;    // channels per lane: 8 or 4
  const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int r = lane >> 2, n = n0 + (lane & 3) * kCPL;
  const float lower = p.epi.relu ? 0.0f : -INFINITY;
  OutT* out = static_cast<OutT*>(p.epi.out) + n;
#pragma unroll
  for (int i = 0; i < kMT; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int j = 0; j < kNT; ++j)
        *reinterpret_cast<int2*>(stage + g * kPitch + j * 8 + t4 * 2) =
            make_int2(acc[i][j][2 * half], acc[i][j][2 * half + 1]);
      __syncwarp();
      int v[kCPL];
#pragma unroll
      for (int c = 0; c < kCPL; c += 4)
        *reinterpret_cast<int4*>(v + c) =
            *reinterpret_cast<const int4*>(stage + r * kPitch + (lane & 3) * kCPL + c);
      __syncwarp();  // the next half's fragments overwrite the buffer
      const int64_t m = row0 + i * 16 + half * 8 + r;
      if (m < p.m) {
        float al[kCPL], bi[kCPL];
        load_floats(al, p.epi.alpha + n, p.vector_epilogue);
        if (p.epi.bias != nullptr) {
          load_floats(bi, p.epi.bias + n, p.vector_epilogue);
        } else {
#pragma unroll
          for (int c = 0; c < kCPL; ++c) bi[c] = 0.0f;
        }
        union {
          OutT o[kCPL];
          uint4 u[(kCPL * sizeof(OutT) + 15) / 16];
          uint2 h;
        } res;
#pragma unroll
        for (int c = 0; c < kCPL; c += 2)
          OutCvt<OutT>::store2(res.o + c, fmaxf(al[c] * float(v[c]) + bi[c], lower),
                               fmaxf(al[c + 1] * float(v[c + 1]) + bi[c + 1], lower));
        OutT* dst = out + m * p.k;
        if constexpr (kCPL * sizeof(OutT) == 8) {
          *reinterpret_cast<uint2*>(dst) = res.h;
        } else {
#pragma unroll
          for (int c = 0; c < int(kCPL * sizeof(OutT)) / 16; ++c)
            reinterpret_cast<uint4*>(dst)[c] = res.u[c];
        }
      }
    }
  }
}

// The output type is a template parameter too: with a run-time switch the
// compiler hoists every variant's epilogue addresses out of the main loop and
// spills them.
template <typename T, typename OutT, int BM, int BN>
__global__ void __launch_bounds__(kThreads, 2) pointwise_fused_kernel(const Params p) {
  constexpr int kWarpRows = BM / kWarpsM;  // 64 or 32
  constexpr int kWarpCols = BN / kWarpsN;  // 32 or 16
  constexpr int kMT = kWarpRows / 16;      // m16 tiles per warp
  constexpr int kNT = kWarpCols / 8;       // n8 tiles per warp
  constexpr int kEl = Unit<T>::kElems;     // elements per 16-byte load
  constexpr int kWStage = BN * kStepK;
  constexpr int kWUnits = BN * (kStepK / 16) / kThreads;  // 16-byte weight copies per thread
  extern __shared__ __align__(16) int8_t smem[];

  const int c = p.c, a_row_bytes = c + 16;
  int8_t* a_tile = smem;  // [BM][c + 16] codes
  const uint32_t a_base = __cvta_generic_to_shared(a_tile);
  const uint32_t w_base = a_base + BM * a_row_bytes;  // kStages x [BN][64], swizzled

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // The splits blocks of one row block are consecutive: they run together and
  // all but the first find the rows in L2.
  const int split = blockIdx.x % p.splits;
  const int64_t m0 = int64_t(blockIdx.x / p.splits) * BM;
  const int nb0 = split * p.col_blocks_per_cta;
  const int steps_k = c / kStepK;
  const int total_steps = p.col_blocks_per_cta * steps_k;

  // The next weight stage (issued in order: column block nb0 + issued /
  // steps_k, channels (issued % steps_k) * 64 ...) into ring slot issued %
  // kStages. Each thread copies kWUnits 16-byte pieces: rows tid / 4 + 64 i,
  // part tid % 4 (rows 64 apart share the swizzle). Running pointers keep the
  // per-step address arithmetic to a few instructions.
  const int8_t* w_src = p.weight + int64_t(nb0 * BN + (tid >> 2)) * c + (tid & 3) * 16;
  const uint32_t w_dst = w_base + w_offset(tid >> 2, tid & 3);
  int w_issued = 0, w_kc = 0;
  auto issue_weights = [&]() {
    if (w_issued < total_steps) {
      const uint32_t slot = w_dst + (w_issued % kStages) * kWStage;
#pragma unroll
      for (int i = 0; i < kWUnits; ++i)
        cp_async16(slot + i * 64 * kStepK, w_src + int64_t(i) * 64 * c + w_kc * kStepK);
      if (++w_kc == steps_k) {
        w_kc = 0;
        w_src += int64_t(BN) * c;
      }
    }
    ++w_issued;
    cp_async_commit();  // an empty group past the end keeps the wait counts uniform
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue_weights();

  // Optional (Q4CONV_PW_PREFETCH=1, measured slower): L2 prefetch of the row
  // block that a block starting about one resident generation later will read
  // (p.prefetch_rows row blocks ahead), meant to overlap its DRAM reads with
  // this block's work. One bulk prefetch per 4 KB, by the first split.
  if (split == 0 && p.prefetch_rows > 0 && warp == 0) {
    const int64_t ahead = m0 + int64_t(p.prefetch_rows) * BM;
    if (ahead < p.m) {
      const int64_t rows = p.m - ahead < BM ? p.m - ahead : BM;
      const char* base = static_cast<const char*>(p.x) + ahead * c * int64_t(sizeof(T));
      const int64_t bytes = rows * c * int64_t(sizeof(T));
      for (int64_t off = int64_t(lane) * 4096; off < bytes; off += 32 * 4096) {
        const int64_t left = bytes - off;
        const uint32_t size = uint32_t(left < 4096 ? left : 4096);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // a hint; sm_90+ PTX only
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(base + off), "r"(size)
                     : "memory");
#else
        (void)base, (void)size;
#endif
      }
    }
  }

  // Step 1: the row block's codes. Its input is the contiguous range
  // x[m0 * c, (m0 + BM) * c); unit u covers elements u * kEl ... (never two
  // rows: c % 64 == 0). Rows past m are quantized from zeros; their outputs
  // are never stored.
  {
    const float scale = effective_scale(*p.scale_a, p.eps);
    const float inv_scale = 1.0f / scale;
    const uint4* src = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + m0 * c);
    const int64_t rows_left = p.m - m0;
    const int rows = rows_left < BM ? int(rows_left) : BM;
    const int valid_units = rows * (c / kEl), total_units = BM * (c / kEl);
    for (int base = 0; base < total_units; base += kBurst * kThreads) {
      uint4 raw[kBurst];
#pragma unroll
      for (int i = 0; i < kBurst; ++i) {
        const int u = base + tid + i * kThreads;
        raw[i] = u < valid_units ? __ldg(src + u) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int i = 0; i < kBurst; ++i) {
        const int u = base + tid + i * kThreads;
        if (u >= total_units) break;
        const uint32_t e = uint32_t(u) * kEl;
        const uint32_t row = __umulhi(e, p.c_magic);
        const int col = int(e - row * uint32_t(c));
        float f[kEl], b[kEl];
        Unit<T>::to_float(raw[i], f);
#pragma unroll
        for (int v = 0; v < kEl; v += 4) {
          const float4 b4 = __ldg(reinterpret_cast<const float4*>(p.bias_a + col + v));
          b[v] = b4.x, b[v + 1] = b4.y, b[v + 2] = b4.z, b[v + 3] = b4.w;
        }
        union {
          int8_t q[kEl];
          uint32_t w[kEl / 4];
        } codes;
        float shifted[kEl];
#pragma unroll
        for (int v = 0; v < kEl; ++v) shifted[v] = f[v] + b[v];
        quantize_values_fast(shifted, scale, inv_scale, p.bits, codes.q);
        int8_t* dst = a_tile + row * a_row_bytes + col;
        if constexpr (kEl == 8)
          *reinterpret_cast<uint2*>(dst) = make_uint2(codes.w[0], codes.w[1]);
        else
          *reinterpret_cast<uint32_t*>(dst) = codes.w[0];
      }
    }
  }

  // Steps 2 and 3.
  const int warp_m = warp % kWarpsM, warp_n = warp / kWarpsM;
  // ldmatrix lane addresses. A (x4 = one m16 x k32 fragment): lanes 0-7 rows
  // 0-7 bytes 0-15, 8-15 rows 8-15 bytes 0-15, 16-23 rows 0-7 bytes 16-31,
  // 24-31 rows 8-15 bytes 16-31 (registers a0..a3 of mma.m16n8k32).
  const uint32_t a_lane = a_base +
                          (warp_m * kWarpRows + (lane & 7) + ((lane >> 3) & 1) * 8) * a_row_bytes +
                          (lane >> 4) * 16;
  // B (x4 = two n8 x k32 fragments): lanes 0-7 n 0-7 bytes 0-15 (b0 of tile
  // 0), 8-15 n 0-7 bytes 16-31 (b1 of tile 0), 16-31 the same for n 8-15.
  // Rows w_row + 8 j share (row >> 1) & 3, and the k half kk / 32 flips bit
  // 1 of the logical chunk (w_part is 0 or 1), so the swizzled address is
  // w_lane + j * 8 rows, with chunk bit 1 flipped for kk = 32.
  const int w_row = warp_n * kWarpCols + (lane & 7) + (lane >> 4) * 8;
  const int w_lane = w_offset(w_row, (lane >> 3) & 1);
  int* stage = reinterpret_cast<int*>(smem + p.staging_offset) + warp * staging_words<BN>();

  int acc[kMT][kNT][4] = {};
  int kc = 0, nb = nb0;
  for (int step = 0; step < total_steps; ++step) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `step` (and, first time, the codes) visible; slot step-1 free
    issue_weights();
    const uint32_t w_slot = w_base + (step % kStages) * kWStage;
    const uint32_t a_step = a_lane + kc * kStepK;
    // Not unrolled: overlapping the two halves' fragment loads costs the 128 x
    // 128 tile ~20 registers more than it has (spills); 16 warps per SM hide
    // the ldmatrix latency instead.
#pragma unroll 1
    for (int kk = 0; kk < kStepK; kk += 32) {
      uint32_t a_frag[kMT][4], b_frag[kNT][2];
#pragma unroll
      for (int i = 0; i < kMT; ++i) ldmatrix_x4(a_frag[i], a_step + i * 16 * a_row_bytes + kk);
#pragma unroll
      for (int j = 0; j < kNT; j += 2) {
        uint32_t r[4];
        ldmatrix_x4(r, w_slot + ((w_lane + j * 8 * kStepK) ^ (kk / 16 << 4)));
        b_frag[j][0] = r[0], b_frag[j][1] = r[1], b_frag[j + 1][0] = r[2], b_frag[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j) mma_s8(acc[i][j], a_frag[i], b_frag[j][0], b_frag[j][1]);
    }
    if (++kc == steps_k) {
      const int64_t row0 = m0 + warp_m * kWarpRows;
      const int n0 = nb * BN + warp_n * kWarpCols;
      store_tile<OutT>(p, acc, row0, n0, stage);
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j)
#pragma unroll
          for (int v = 0; v < 4; ++v) acc[i][j][v] = 0;
      kc = 0;
      ++nb;
    }
  }
  cp_async_wait<0>();  // no copy outlives the block (the trailing groups are empty)
}

// Multiprocessor count of the current device (cached: one query per device).
int sm_count() {
  static std::atomic<int> cache[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (device < 0 || device >= kMaxDevices) return 0;
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
      return 0;
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// Tuning switch for measurements: Q4CONV_PW_SPLITS=s forces (up to) s column
// ranges per row block; unset or 0 takes the occupancy rule below.
int forced_splits() {
  const char* env = std::getenv("Q4CONV_PW_SPLITS");
  return env != nullptr ? std::atoi(env) : 0;
}

// Tuning switch for measurements: Q4CONV_PW_PREFETCH=1 / =0 turns the L2
// prefetch of later row blocks on / off for every C (default: only C in
// (64, 256]; with 128-row blocks it made 8 of the 12 ResNet-50 1x1 layers
// 4-14% slower on H100 and none faster).
bool prefetch_enabled(int channels) {
  const char* env = std::getenv("Q4CONV_PW_PREFETCH");
  if (env == nullptr) return prefetch_by_default(channels);
  return std::string(env) == "1";
}

template <typename T, typename OutT, int BM, int BN>
KernelStatus launch(Params p, cudaStream_t stream) {
  const size_t smem = smem_bytes_for<BN>(p.c, BM);
  p.staging_offset = int(smem) - kThreads / 32 * staging_words<BN>() * 4;
  // Two ~108 KB blocks per SM need the largest shared-memory carveout.
  static std::atomic<int> smem_raised[kMaxDevices];
  const cudaError_t err =
      raise_smem_limit(reinterpret_cast<const void*>(pointwise_fused_kernel<T, OutT, BM, BN>),
                       int(smem), true, smem_raised);
  if (err != cudaSuccess)
    return KernelStatus::failure(std::string("pointwise_fused_conv: ") + cudaGetErrorString(err));
  const int64_t row_blocks = (p.m + BM - 1) / BM;
  const int col_blocks = p.k / BN;
  // Split K while the doubled grid still fits one wave of resident blocks and
  // the column blocks divide evenly: each split re-reads (from L2) and
  // re-quantizes the rows, which only pays where SMs would otherwise idle
  // (H100, run 2 of NOTES: 2-8 splits on the 7x7 and 14x14 C256 layers).
  const int per_sm = smem * 2 + 2048 <= 228 * 1024 ? 2 : 1;
  const int64_t slots = int64_t(per_sm) * sm_count();
  const int forced = forced_splits();
  int splits = 1;
  while (col_blocks % (splits * 2) == 0 &&
         (forced > 0 ? splits * 2 <= forced : row_blocks * splits * 2 <= slots))
    splits *= 2;
  // Prefetch (when switched on) one resident generation ahead, at most ~16 MB
  // of input in L2; none when the whole grid is resident at once.
  const int64_t block_bytes = int64_t(BM) * p.c * int64_t(sizeof(T));
  const int64_t ahead = (slots + splits - 1) / splits;
  const int64_t cap = (int64_t(16) << 20) / block_bytes;
  p.prefetch_rows = int(ahead < cap ? ahead : cap);
  if (row_blocks * splits <= slots || !prefetch_enabled(p.c)) p.prefetch_rows = 0;
  const int64_t blocks = row_blocks * splits;
  if (blocks > 0x7fffffff)
    return KernelStatus::failure("pointwise_fused_conv: too many pixels for one launch");
  p.splits = splits;
  p.col_blocks_per_cta = col_blocks / splits;
  pointwise_fused_kernel<T, OutT, BM, BN><<<unsigned(blocks), kThreads, smem, stream>>>(p);
  return launch_status("pointwise_fused_conv");
}

// Tuning switch for measurements: Q4CONV_PW_BM=64 takes 64-row blocks for
// every C (more, shorter blocks).
bool short_blocks_forced() {
  const char* env = std::getenv("Q4CONV_PW_BM");
  return env != nullptr && std::string(env) == "64";
}

template <typename T, typename OutT>
KernelStatus launch_for_types(const Params& p, cudaStream_t stream) {
  const bool tall = block_rows(p.c) == 128 && !short_blocks_forced();
  // 128 output channels per column block where K allows; fp32 outputs take 64
  // (their epilogue needs more registers than the 128-wide tile leaves).
  if constexpr (sizeof(OutT) == 2) {
    if (p.k % 128 == 0)
      return tall ? launch<T, OutT, 128, 128>(p, stream) : launch<T, OutT, 64, 128>(p, stream);
  }
  return tall ? launch<T, OutT, 128, 64>(p, stream) : launch<T, OutT, 64, 64>(p, stream);
}

template <typename T>
KernelStatus launch_for_type(const Params& p, cudaStream_t stream) {
  switch (p.epi.out_type) {
    case OutType::kFloat32:
      return launch_for_types<T, float>(p, stream);
    case OutType::kFloat16:
      return launch_for_types<T, __half>(p, stream);
    case OutType::kBFloat16:
      return launch_for_types<T, __nv_bfloat16>(p, stream);
  }
  return KernelStatus::failure("pointwise_fused_conv: unknown output type");
}

}  // namespace

bool pointwise_fused_supports(int64_t pixels, int channels, int out_channels) {
  return pixels > 0 && channels > 0 && channels % kStepK == 0 && channels <= kMaxChannels &&
         out_channels > 0 && out_channels % 64 == 0;
}

KernelStatus pointwise_fused_conv(const void* x, InType x_type, int64_t pixels, int channels,
                                  const float* bias_a, const float* scale_a, float eps, int bits,
                                  const int8_t* weight, int out_channels,
                                  const EpilogueArgs& epilogue, cudaStream_t stream) {
  if (!pointwise_fused_supports(pixels, channels, out_channels))
    return KernelStatus::failure(
        "pointwise_fused_conv: unsupported shape (needs C % 64 == 0, C <= 2048 and K % 64 == 0)");
  if (x == nullptr || weight == nullptr || scale_a == nullptr || epilogue.alpha == nullptr ||
      epilogue.out == nullptr)
    return KernelStatus::failure("pointwise_fused_conv: null pointer argument");
  if (bias_a == nullptr || ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(weight) |
                             reinterpret_cast<uintptr_t>(bias_a)) &
                            15) != 0)
    return KernelStatus::failure(
        "pointwise_fused_conv: x, weight and bias_a must be non-null and 16-byte aligned");
  // Outputs are stored as 16-byte pieces of rows.
  if ((reinterpret_cast<uintptr_t>(epilogue.out) & 15) != 0)
    return KernelStatus::failure("pointwise_fused_conv: out must be 16-byte aligned");
  const uint32_t c_magic =
      static_cast<uint32_t>(((uint64_t(1) << 32) + uint64_t(channels) - 1) / uint64_t(channels));
  Params p{};
  p.x = x, p.weight = weight, p.bias_a = bias_a, p.scale_a = scale_a, p.eps = eps, p.bits = bits;
  p.m = pixels, p.c = channels, p.k = out_channels, p.epi = epilogue;
  p.c_magic = c_magic;
  p.vector_epilogue =
      ((reinterpret_cast<uintptr_t>(epilogue.alpha) | reinterpret_cast<uintptr_t>(epilogue.bias)) &
       15) == 0;
  switch (x_type) {
    case InType::kFloat32:
      return launch_for_type<float>(p, stream);
    case InType::kFloat16:
      return launch_for_type<__half>(p, stream);
    case InType::kBFloat16:
      return launch_for_type<__nv_bfloat16>(p, stream);
  }
  return KernelStatus::failure("pointwise_fused_conv: unknown input type");
}

}  // namespace q4conv
