// Fused activation quantization + int8 tensor-core GEMM for dense 1x1
// stride-1 convolutions (interface: quantize_kernels.h). No torch, no CUTLASS.
//
// Why: a 1x1 layer is memory bound (fp16 in, fp16 out). The separate
// quantization pass reads the fp16 input, writes int8 codes and the GEMM reads
// them again; here the input is read once, at 2 (or 4) bytes per element, as
// cuDNN reads it, and the codes never leave shared memory.
//
// Persistent, weight-stationary, warp-specialized blocks (A-stationary
// blocks, tried first, could not overlap their load and compute phases).
// One 512-thread block per SM:
//   - The block keeps int8 weights in shared memory for its whole life (<=
//     64 KB): all of K, or one slice of BN (64 or 128) output channels. It
//     walks its row blocks (128 pixel rows each, grid-strided) in steps of
//     64 input channels.
//   - Quantizer warps (two warpgroups) copy each step's fp16/bf16/fp32 input
//     tile [128 x 64] through a cp.async ring (64-96 KB in flight per SM),
//     each thread waiting only for its own copies, and quantize it (quant.h
//     arithmetic, bit-identical to the separate pass) into one of several
//     int8 code buffers.
//   - MMA warps (two warpgroups) run the mma.sync m16n8k32 s8 products of
//     each code buffer against the resident weights and, after the last
//     channel step of a row block, the epilogue of the sm90 EVT (fp32
//     alpha[k] * acc + bias[k], optional ReLU, convert, NHWC store). Where
//     the block holds all of K in K / BN > 1 slices, they hold the row
//     block's code buffers for one BN-wide pass per slice.
//   - The roles hand buffers over through mbarriers (full / empty per
//     buffer), never a block-wide barrier, and setmaxnreg gives the MMA
//     warps the registers the quantizers do not need (sm_90a only).
// Where one block cannot hold all of K, the S = K / BN slices (2, 4 or 8)
// of a row block run as one cluster: each block quantizes 1/S of every
// tile's rows and bulk-copies its codes into the peers' buffers, so each
// input element is read and quantized once. On H100 clusters of more than
// two blocks lose to pass + GEMM (per-step latency), and so do four or more
// passes; dispatch_cuda.cpp has the rule.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "../quant.h"
#include "device_common.cuh"
#include "quantize_kernels.h"

namespace q4conv {
namespace {

constexpr int kThreads = 512;  // four warpgroups

// The role split: two warpgroups of quantizers stream and quantize the
// input, two of MMA warps (4 along M x 2 along N) multiply and store; they
// hand int8 code buffers to each other through mbarriers, so neither waits
// for a block-wide barrier. setmaxnreg moves registers (the 512-thread
// launch gives each thread 128) from the quantizers, which need few, to the
// MMA warps' accumulators. (Three quantizer warpgroups and one MMA warpgroup measured
// no faster on H100: its single MMA warp per scheduler cannot
// hide its own epilogue.)
struct Roles {
  static constexpr int kMmaThreads = 256;
  static constexpr int kQuantThreads = kThreads - kMmaThreads;
  static constexpr int kMmaWarps = kMmaThreads / 32;
  static constexpr int kWarpsM = 4, kWarpsN = kMmaWarps / kWarpsM;
  static constexpr int kQuantRegisters = 96;
  static constexpr int kMmaRegisters =
      (65536 - kQuantThreads * kQuantRegisters) / kMmaThreads / 8 * 8;
  static_assert(kMmaRegisters <= 256, "setmaxnreg takes at most 256");
};
constexpr int kStepK = 64;                  // input channels per pipeline step
constexpr int kCodePitch = kStepK + 16;     // int8 code rows: 80 bytes, ldmatrix conflict-free
constexpr int kMaxCodeBuffers = 6;          // code buffers between the two roles
constexpr int kMaxWeightBytes = 64 * 1024;  // one block's resident weights
constexpr int kMaxChannels = kMaxWeightBytes / 64;

// Input ring (64 KB of fp16/bf16 tiles or 96 KB of fp32 tiles in flight per
// SM) and code buffers: 6 for 16-bit inputs, so the quantizers can run up
// to a row block and a half ahead while the MMA warps store; 4 for fp32
// inputs, whose larger ring leaves room for fewer.
template <typename T>
__host__ __device__ constexpr int ring_bytes() {
  return sizeof(T) == 4 ? 96 * 1024 : 64 * 1024;
}
template <typename T>
__host__ __device__ constexpr int code_buffers() {
  return sizeof(T) == 4 ? 4 : kMaxCodeBuffers;
}

// Named barrier ids (0 is __syncthreads) for the roles' one-off set-up.
constexpr int kQuantBarrier = 1, kMmaBarrier = 2;

__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Cluster and mbarrier primitives (sm_90). Addresses are 32-bit shared
// addresses: shared::cta for the block's own barriers, shared::cluster (from
// map_rank) for a peer block's memory.
__device__ __forceinline__ uint32_t map_rank(uint32_t smem_addr, int rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(out) : "r"(smem_addr), "r"(rank));
  return out;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;\n" ::
          : "memory");
}
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Arrive on the own block's barrier, announcing `bytes` of bulk-copy data.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// Arrive on a barrier of any block of the cluster. Release at block scope,
// as CUTLASS's consumer release: it orders this thread's reads of its own
// block's shared memory before the peer's next bulk copy into it, and unlike
// a cluster-scope release it does not wait for the epilogue's global stores.
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t cluster_bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_bar)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.b32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// Arrive on the own block's barrier (release at block scope: this thread's
// shared-memory reads and writes happen before the phase completes).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// The i-th cluster rank other than `rank` (i < cluster size - 1).
__device__ __forceinline__ int other_rank(int i, int rank) { return i < rank ? i : i + 1; }
// Makes this thread's shared-memory writes visible to the bulk-copy engine.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Bulk copy of `bytes` (a multiple of 16) from this block's shared memory
// into a peer's (cluster address); completes as bytes on the peer's barrier.
__device__ __forceinline__ void bulk_copy_to_peer(uint32_t cluster_dst, uint32_t src, int bytes,
                                                  uint32_t cluster_bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, "
      "[%3];\n" ::"r"(cluster_dst),
      "r"(src), "r"(bytes), "r"(cluster_bar)
      : "memory");
}

// Ring depth for tiles of `rows` rows: as many as fit ring_bytes, at most 8.
template <typename T, int Rows>
__host__ __device__ constexpr int ring_stages() {
  constexpr int fit = ring_bytes<T>() / (Rows * kStepK * int(sizeof(T)));
  return fit > 8 ? 8 : fit;
}

// Epilogue staging per MMA warp: 8 rows of its int32 accumulators, rows
// padded to kCols + 8 words (stride 8 or 24 mod 32 banks: the 64-bit
// fragment stores of 4 rows by 4 lanes hit distinct banks).
template <int BN>
__host__ __device__ constexpr int staging_words() {
  return 8 * (BN / Roles::kWarpsN + 8);
}

// Shared memory: input ring, code buffers, epilogue staging, the activation
// shift bias_a (kMaxChannels floats), the full / empty mbarriers of the code
// buffers (128 bytes), then the block's weights (its BN * passes output
// channels x C bytes) and their epilogue alpha and bias (2 floats each).
constexpr int kBarrierBytes = 128;
static_assert(2 * kMaxCodeBuffers * 8 <= kBarrierBytes, "mbarrier space");
template <typename T, int BM, int BN>
__host__ __device__ constexpr int fixed_smem_bytes() {
  return ring_bytes<T>() + code_buffers<T>() * BM * kCodePitch +
         Roles::kMmaWarps * staging_words<BN>() * 4 + kMaxChannels * 4 + kBarrierBytes;
}
constexpr int smem_bytes_per_channel(int channels) { return channels + 2 * 4; }

// Largest cluster: the K / BN slices of a row block run as one cluster.
constexpr int kMaxClusterSlices = 8;

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
  int splits;  // output-channel slices = blocks per cluster, which share rows
  int passes;  // BN-wide passes of one block over its codes (1 where splits > 1)
  EpilogueArgs epi;
};

// 16-byte copy, zero-filled past src_bytes (0 or 16).
__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, int src_bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
               "r"(src_bytes));
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

// Word w of a 16-byte unit (constant w after unrolling: a register, no select).
__device__ __forceinline__ uint32_t unit_word(const uint4& u, int w) {
  return w == 0 ? u.x : w == 1 ? u.y : w == 2 ? u.z : u.w;
}

// 16 bytes of input: 8 fp16/bf16 or 4 fp32 values; element e as a float.
// (Reading them as a device::Pack<T, 16 / sizeof(T)> and converting with
// device::to_float made the fp32-input kernels spill.)
template <typename T>
struct Unit;
template <>
struct Unit<float> {
  static constexpr int kElems = 4;
  static __device__ __forceinline__ float element(const uint4& u, int e) {
    return __uint_as_float(unit_word(u, e));
  }
};
template <>
struct Unit<__half> {
  static constexpr int kElems = 8;
  static __device__ __forceinline__ float element(const uint4& u, int e) {
    const uint32_t word = unit_word(u, e / 2);
    return __half2float(__ushort_as_half(static_cast<unsigned short>(e % 2 ? word >> 16 : word)));
  }
};
template <>
struct Unit<__nv_bfloat16> {
  static constexpr int kElems = 8;
  static __device__ __forceinline__ float element(const uint4& u, int e) {
    // bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32.
    const uint32_t word = unit_word(u, e / 2);
    return __uint_as_float(e % 2 ? word & 0xffff0000u : word << 16);
  }
};

// 16-byte global store, as one instruction: built from separately computed
// words, a uint4 assignment through an OutT pointer compiled to four 4-byte
// stores.
__device__ __forceinline__ void store_global16(void* dst, const uint4& v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

// Output conversion: device::OutCvt (element_types.cuh) packs four fp32
// values as 16 bytes (fp32 outputs, the int32 staging epilogue), or two as
// the 32-bit word of two 16-bit outputs (one cvt.rn.f16x2 / bf16x2; the
// stmatrix epilogue). The epilogues build their stores from these words
// explicitly: through a union of OutT elements the compiler had split the
// 16-byte stores into 4-byte ones (4x the store instructions, L1 wavefronts
// the limit).
using device::OutCvt;

// Word offset of the staged accumulator (row, col) in a warp's staging
// buffer: rows padded to kPitch words (8 mod 32: the 64-bit fragment stores
// of 4 rows by 4 lanes hit distinct banks), and odd rows with column bit 2
// flipped, so the 16-byte reads of two rows by four lanes (chunks q * 8
// words apart) fall on distinct banks too.
template <int kPitch>
__device__ __forceinline__ int stage_offset(int row, int col) {
  return row * kPitch + (col ^ ((row & 1) << 2));
}

// out[m, n] = act(alpha[n] * acc + bias[n]) for this warp's accumulators of
// the column block starting at n0 (as the sm90 EVT: fp32 FMA, then convert),
// for fp32 outputs (16-bit outputs: store_tile_16bit). Each 8-row half of an
// m16 tile goes through the warp's staging buffer as int32 fragments; then
// lane (r, q) = (lane / 4, lane % 4) takes row r and 16-byte output chunks q,
// q + 4, ... of the warp's columns (alpha and bias from the block's shared
// copies epi_alpha / epi_bias, indexed from the block's first channel
// block_n0), so the four lanes of a row store 64 contiguous bytes per
// instruction: L2 sees whole sectors.
template <typename OutT, int kMT, int kNT>
__device__ __forceinline__ void store_tile_staged32(const Params& p, const int (&acc)[kMT][kNT][4],
                                                    int64_t row0, int n0, int block_n0,
                                                    const float* epi_alpha, const float* epi_bias,
                                                    int* stage) {
  constexpr int kCols = kNT * 8;
  constexpr int kPitch = kCols + 8;  // words
  constexpr int kChunkChannels = OutCvt<OutT>::kChannels;
  constexpr int kLaneChunks = kCols / kChunkChannels / 4;
  static_assert(kLaneChunks >= 1, "whole chunks per lane");
  // (r, q): the lane's fragment row and column pair, then its output row and chunks.
  const int lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
  const float lower = p.epi.relu ? 0.0f : -INFINITY;
  const float* alpha = epi_alpha + (n0 - block_n0);
  const float* bias = epi_bias + (n0 - block_n0);
  OutT* out = static_cast<OutT*>(p.epi.out) + n0;
#pragma unroll
  for (int i = 0; i < kMT; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int j = 0; j < kNT; ++j)
        *reinterpret_cast<int2*>(stage + stage_offset<kPitch>(r, j * 8 + q * 2)) =
            make_int2(acc[i][j][2 * half], acc[i][j][2 * half + 1]);
      __syncwarp();
      // One chunk at a time (staged accumulators, alpha and bias as 16-byte
      // shared loads), so the converted chunks stay the only large live
      // values next to the accumulators.
      uint4 chunks[kLaneChunks];
#pragma unroll
      for (int c = 0; c < kLaneChunks; ++c) {
        const int col0 = (q + 4 * c) * kChunkChannels;
        float v[kChunkChannels];
#pragma unroll
        for (int w = 0; w < kChunkChannels; w += 4) {
          const int4 a = *reinterpret_cast<const int4*>(stage + stage_offset<kPitch>(r, col0 + w));
          const float4 al = *reinterpret_cast<const float4*>(alpha + col0 + w);
          const float4 bi = *reinterpret_cast<const float4*>(bias + col0 + w);
          v[w] = fmaxf(al.x * float(a.x) + bi.x, lower);
          v[w + 1] = fmaxf(al.y * float(a.y) + bi.y, lower);
          v[w + 2] = fmaxf(al.z * float(a.z) + bi.z, lower);
          v[w + 3] = fmaxf(al.w * float(a.w) + bi.w, lower);
        }
        chunks[c] = OutCvt<OutT>::chunk(v);
      }
      __syncwarp();  // the next half's fragments overwrite the buffer
      const int64_t m = row0 + i * 16 + half * 8 + r;
      if (m < p.m) {
        OutT* dst = out + m * p.k;
#pragma unroll
        for (int c = 0; c < kLaneChunks; ++c)
          store_global16(dst + (q + 4 * c) * kChunkChannels, chunks[c]);
      }
    }
  }
}

__device__ __forceinline__ void stmatrix_x4(uint32_t smem, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(smem),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// Byte offset of 16-byte chunk `chunk` (0 to kChunks - 1) of row `row` in a
// warp's 16-bit staging tile [16 rows x kChunks * 16 bytes], XOR-swizzled so
// that the 8 rows of one stmatrix matrix (same chunk) fall on distinct
// 16-byte bank groups, and so do the chunks one read instruction takes.
// 64-byte rows (kChunks = 4) put two rows in one 128-byte bank line, so the
// chunk flips with row / 2; a read of 8 whole rows is then 512 contiguous
// bytes.
template <int kChunks>
__device__ __forceinline__ uint32_t stage16_offset(int row, int chunk) {
  static_assert(kChunks == 8 || kChunks == 4, "128- or 64-byte rows");
  if constexpr (kChunks == 8) return row * 128 + ((chunk ^ (row & 7)) << 4);
  return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4);
}

// The same epilogue for fp16 / bf16 outputs, without an int32 round trip:
// each lane converts its own accumulator fragments (alpha and bias of its two
// columns per n8 tile, loaded once), stmatrix writes them as 16-bit 8x8
// matrices into the warp's staging tile, and lanes read back 16-byte chunks
// of whole rows: each store instruction writes 4 rows x 128 bytes (64-column
// warp tiles, BN = 128) or 8 rows x 64 bytes (32-column, BN = 64). Half the
// shared-memory traffic of the int32 staging, whose reads and writes made L1
// the busiest unit (ncu). H100, CUDA graphs: C64->K256 56x56 (two passes)
// 60.8 -> 53.1 us; C64->K64 56x56 25.6 -> 23.1 and C256->K64 56x56 51.9 ->
// 49.9 (32-column tiles).
template <typename OutT, int kMT, int kNT>
__device__ __forceinline__ void store_tile_16bit(const Params& p, const int (&acc)[kMT][kNT][4],
                                                 int64_t row0, int n0, int block_n0,
                                                 const float* epi_alpha, const float* epi_bias,
                                                 int* stage) {
  static_assert(kNT == 8 || kNT == 4,
                "32- or 64-column warp tiles: one 16-byte chunk (8 channels) per n8 tile");
  static_assert(16 * kNT * 16 <= staging_words<Roles::kWarpsN * kNT * 8>() * 4,
                "16 rows of 16-byte chunks fit the warp's staging buffer");
  constexpr int kRowsPerStore = 32 / kNT;
  const int lane = threadIdx.x & 31, t4 = lane & 3;
  const float lower = p.epi.relu ? 0.0f : -INFINITY;
  float2 alpha[kNT], bias[kNT];
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    const int col = n0 - block_n0 + j * 8 + t4 * 2;
    alpha[j] = *reinterpret_cast<const float2*>(epi_alpha + col);
    bias[j] = *reinterpret_cast<const float2*>(epi_bias + col);
  }
  const auto word = [&](const int(&d)[4], int j, int hi) {
    return OutCvt<OutT>::word(fmaxf(alpha[j].x * float(d[2 * hi]) + bias[j].x, lower),
                              fmaxf(alpha[j].y * float(d[2 * hi + 1]) + bias[j].y, lower));
  };
  // stmatrix: lanes 8 mi ... 8 mi + 7 address rows of matrix mi = (n8 tile
  // j + mi / 2, rows (mi % 2) * 8 ...): registers {tile j rows 0-7, rows
  // 8-15, tile j + 1 rows 0-7, rows 8-15}.
  const uint32_t stage_addr = __cvta_generic_to_shared(stage);
  const int st_row = ((lane >> 3) & 1) * 8 + (lane & 7), st_tile = lane >> 4;
  const int rd_row = lane / kNT, rd_chunk = lane % kNT;
  OutT* out = static_cast<OutT*>(p.epi.out) + n0 + rd_chunk * 8;
#pragma unroll
  for (int i = 0; i < kMT; ++i) {
#pragma unroll
    for (int j = 0; j < kNT; j += 2) {
      const uint32_t words[4] = {word(acc[i][j], j, 0), word(acc[i][j], j, 1),
                                 word(acc[i][j + 1], j + 1, 0), word(acc[i][j + 1], j + 1, 1)};
      stmatrix_x4(stage_addr + stage16_offset<kNT>(st_row, j + st_tile), words);
    }
    __syncwarp();
#pragma unroll
    for (int k = 0; k < 16 / kRowsPerStore; ++k) {
      const int row = rd_row + k * kRowsPerStore;
      uint4 chunk;
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(chunk.x), "=r"(chunk.y), "=r"(chunk.z), "=r"(chunk.w)
                   : "r"(stage_addr + stage16_offset<kNT>(row, rd_chunk))
                   : "memory");
      const int64_t m = row0 + i * 16 + row;
      if (m < p.m) store_global16(out + m * p.k, chunk);
    }
    __syncwarp();  // the next tile's stmatrix overwrites the buffer
  }
}

template <typename OutT, int kMT, int kNT>
__device__ __forceinline__ void store_tile(const Params& p, const int (&acc)[kMT][kNT][4],
                                           int64_t row0, int n0, int block_n0,
                                           const float* epi_alpha, const float* epi_bias,
                                           int* stage) {
  if constexpr (sizeof(OutT) == 2)
    store_tile_16bit<OutT>(p, acc, row0, n0, block_n0, epi_alpha, epi_bias, stage);
  else
    store_tile_staged32<OutT>(p, acc, row0, n0, block_n0, epi_alpha, epi_bias, stage);
}

// The quantizer warps' side. Step j of the cluster's sequence is row block
// j / steps_k, channels (j % steps_k) * 64 ...; of its [BM x 64] tile this
// block (cluster rank `rank` of S) copies and quantizes rows rank * BM / S
// ... + BM / S - 1 into code buffer j % kBuffers, and each warp copies its
// rows into the same buffer of every other block of the cluster (bulk
// copies, completing on the peer's full barrier), so each input element is
// read and quantized once however many slices K takes. (Writing
// the codes to the peers directly, 8 bytes per st.async, measured 2-20x
// slower: every store completes on the same remote barrier.) The same
// threads copy and quantize a unit, so each thread waits only for its own
// copies (cp.async.wait_group) and the ring needs no barrier. Thread q (of
// kActive) owns units q + i * kActive of its rows: row q / kUnitsPerRow +
// i * kRowsPerPass, 16 bytes at column my_col.
template <typename T, int BM, int S>
struct QuantizerRole {
  static constexpr int kEl = Unit<T>::kElems;  // elements per 16-byte unit
  static constexpr int kUnitsPerRow = kStepK / kEl;
  static constexpr int kRowsMine = BM / S;  // this block's rows of each tile
  // Each active thread quantizes at least kGroup units (16 values) per tile:
  // with the small tiles of large clusters fewer threads work (fewer warps
  // pay the per-step overhead).
  static constexpr int kGroup = 16 / kEl;
  static constexpr int kFullPass = Roles::kQuantThreads / kUnitsPerRow;
  static constexpr int kWarpRows = 32 / kUnitsPerRow;  // rows of one warp's pass
  static constexpr int kGroupPass = kRowsMine / kGroup > kWarpRows ? kRowsMine / kGroup : kWarpRows;
  static constexpr int kRowsPerPass = kGroupPass < kFullPass ? kGroupPass : kFullPass;
  static constexpr int kActive = kRowsPerPass * kUnitsPerRow;  // threads with units
  static constexpr int kUnits = kRowsMine / kRowsPerPass;      // per thread and tile
  static constexpr int kTileBytes = kRowsMine * kStepK * int(sizeof(T));
  static constexpr int kStages = ring_stages<T, kRowsMine>();
  static constexpr int kBuffers = code_buffers<T>();
  // Units per quantize_values_fast_at call: the whole step for fp16 (one
  // chain: C256->K64 56x56 58.9 -> 51.6 us on H100); groups of 16
  // values for bf16 and fp32, whose whole-step chains spill at 96 registers.
  static constexpr int kCallUnits = std::is_same<T, __half>::value ? kUnits : kGroup;
  static constexpr int kPeerBytes = kRowsMine * kCodePitch;  // this block's rows of a buffer
  static_assert(BM % S == 0 && kRowsMine % kRowsPerPass == 0, "whole passes");
  static_assert(kUnits % kGroup == 0 && kUnits % kCallUnits == 0, "whole groups");
  static_assert(kActive % 32 == 0 && kPeerBytes % 16 == 0, "whole warps, bulk-copy sizes");
  static_assert(kStages >= 3, "the ring needs at least three tiles");
  using CodeWord = typename std::conditional<kEl == 8, uint2, uint32_t>::type;

  // Each warp sends its own rows of `buffer` (kWarpRows rows per pass,
  // contiguous in the buffer) to every peer: lane l < (S - 1) * kUnits
  // copies pass l % kUnits to the (l / kUnits)-th other rank. No barrier
  // between the quantizer warps (one sending warp per block measured slower:
  // the others' rows gated every step).
  static constexpr int kWarpBytes = kWarpRows * kCodePitch;
  static_assert((S - 1) * kUnits <= 32 && kWarpBytes % 16 == 0, "one copy per lane");
  static __device__ __forceinline__ void send_to_peers(int q, int rank, uint32_t buffer_addr,
                                                       uint32_t full) {
    const int lane = q % 32, warp = q / 32;
    if (lane >= (S - 1) * kUnits) return;
    const int r = other_rank(lane / kUnits, rank), pass = lane % kUnits;
    const uint32_t rows =
        buffer_addr + (rank * kRowsMine + pass * kRowsPerPass + warp * kWarpRows) * kCodePitch;
    bulk_copy_to_peer(map_rank(rows, r), rows, kWarpBytes, map_rank(full, r));
  }

  static __device__ __forceinline__ void run(const Params& p, int8_t* smem, int8_t* codes_base,
                                             uint32_t full_base, uint32_t empty_base,
                                             const float* bias_smem, int rank, int64_t first_rb,
                                             int64_t rb_stride, int total_steps) {
    const int q = threadIdx.x, c = p.c, steps_k = c / kStepK;
    if (q >= kActive) return;  // large clusters: fewer quantizer warps
    const int my_row = rank * kRowsMine + q / kUnitsPerRow, my_col = (q % kUnitsPerRow) * kEl;
    const T* x_thread = static_cast<const T*>(p.x) + int64_t(my_row) * c + my_col;
    const int64_t pass_stride = int64_t(kRowsPerPass) * c;
    const uint32_t ring_thread = __cvta_generic_to_shared(smem) + q * 16;
    int8_t* codes_thread = codes_base + my_row * kCodePitch + my_col;
    const uint32_t codes_addr = __cvta_generic_to_shared(codes_base);

    // Running source pointer and rows left below this thread's first row, so
    // a step costs a few adds (units past the last pixel copy zeros from x).
    const T* x_base = static_cast<const T*>(p.x);
    const T* issue_src = x_thread + first_rb * BM * c;
    const int64_t next_row_block = rb_stride * BM * c - c;  // from the last channel step
    int64_t issue_rows_left = p.m - first_rb * BM - my_row;
    int issued = 0, issue_kc = 0;
    auto issue_tile = [&]() {
      if (issued < total_steps) {
        const uint32_t slot = ring_thread + (issued % kStages) * kTileBytes;
        const int rows_left = issue_rows_left < BM ? int(issue_rows_left) : BM;
#pragma unroll
        for (int i = 0; i < kUnits; ++i) {
          const bool valid = i * kRowsPerPass < rows_left;
          cp_async16(slot + i * kActive * 16, valid ? issue_src + i * pass_stride : x_base,
                     valid ? 16 : 0);
        }
        issue_src += kStepK;
        if (++issue_kc == steps_k) {
          issue_kc = 0;
          issue_src += next_row_block;
          issue_rows_left -= rb_stride * BM;
        }
      }
      ++issued;
      cp_async_commit();  // an empty group past the end keeps the wait counts uniform
    };
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) issue_tile();

    const float scale = effective_scale(*p.scale_a, p.eps);
    const float inv_scale = 1.0f / scale;
    int kc = 0;
    for (int j = 0; j < total_steps; ++j) {
      issue_tile();
      cp_async_wait<kStages - 1>();  // this thread's part of tile j has landed
      const int buffer = j % kBuffers;
      // Wait until every block's MMA warps are done with step j - kBuffers.
      if (j >= kBuffers) mbar_wait(empty_base + buffer * 8, (j / kBuffers - 1) & 1);
      const int8_t* tile = smem + (j % kStages) * kTileBytes + q * 16;
      int8_t* codes = codes_thread + buffer * (BM * kCodePitch);
      float b[kEl];
#pragma unroll
      for (int v = 0; v < kEl; ++v) b[v] = bias_smem[kc * kStepK + my_col + v];
      // All of this step's input first (the loads overlap), then its values
      // through quantize_values_fast_at, kCallUnits units per call: one
      // branch-free chain per call the compiler can interleave, the values
      // converted from the raw units where used (and again on the rare
      // fallback) rather than held as floats. Rows past m quantize zeros;
      // their outputs are never stored.
      uint4 raw[kUnits];
#pragma unroll
      for (int i = 0; i < kUnits; ++i)
        raw[i] = *reinterpret_cast<const uint4*>(tile + i * kActive * 16);
#pragma unroll
      for (int i0 = 0; i0 < kUnits; i0 += kCallUnits) {
        union {
          int8_t q[kCallUnits * kEl];
          CodeWord w[kCallUnits];
        } out;
        const auto shifted = [&](int v) {
          return Unit<T>::element(raw[i0 + v / kEl], v % kEl) + b[v % kEl];
        };
        quantize_values_fast_at<kCallUnits * kEl>(shifted, scale, inv_scale, p.bits, out.q);
#pragma unroll
        for (int i = 0; i < kCallUnits; ++i)
          *reinterpret_cast<CodeWord*>(codes + (i0 + i) * kRowsPerPass * kCodePitch) = out.w[i];
      }
      // Every thread arrives for its own codes (one arrival per warp after
      // __syncwarp measured no faster, and racecheck cannot follow it).
      mbar_arrive(full_base + buffer * 8);
      if (S > 1) {
        fence_proxy_async();  // the bulk copies read these codes
        __syncwarp();
        send_to_peers(q, rank, codes_addr + buffer * (BM * kCodePitch), full_base + buffer * 8);
      }
      if (++kc == steps_k) kc = 0;
    }
    cp_async_wait<0>();  // no copy outlives the block (the trailing groups are empty)
  }
};

// The MMA warps' side: warp (warp_m, warp_n) of 4 x 2 owns rows warp_m *
// BM / 4 ... and output channels warp_n * BN / 2 ... of every row block's
// BN-wide pass. With p.passes > 1 (one block holds all of K) the warps hold a
// row block's code buffers for p.passes passes over them, one BN-wide group
// of output channels each, and release them after the last.
template <typename T, typename OutT, int BM, int BN>
struct MmaRole {
  static constexpr int kQuantThreads = Roles::kQuantThreads;
  static constexpr int kWarpsM = Roles::kWarpsM, kWarpsN = Roles::kWarpsN;
  static constexpr int kBuffers = code_buffers<T>();
  static constexpr int kWarpRows = BM / kWarpsM;  // 32 (BM = 128)
  static constexpr int kWarpCols = BN / kWarpsN;  // 32 or 64
  static constexpr int kMT = kWarpRows / 16;      // m16 tiles per warp
  static constexpr int kNT = kWarpCols / 8;       // n8 tiles per warp (even: ldmatrix pairs)
  using Acc = int[kMT][kNT][4];

  // acc += codes [kWarpRows x 64] (a_step) x weights [64 x kWarpCols] (w_step).
  static __device__ __forceinline__ void multiply_step(Acc& acc, uint32_t a_step, uint32_t w_step) {
#pragma unroll
    for (int kk = 0; kk < kStepK; kk += 32) {
      uint32_t a_frag[kMT][4], b_frag[kNT][2];
#pragma unroll
      for (int i = 0; i < kMT; ++i) ldmatrix_x4(a_frag[i], a_step + i * 16 * kCodePitch + kk);
#pragma unroll
      for (int jn = 0; jn < kNT; jn += 2) {
        uint32_t r[4];
        ldmatrix_x4(r, (w_step + jn * 8 * kStepK) ^ (kk / 16 << 4));
        b_frag[jn][0] = r[0], b_frag[jn][1] = r[1];
        b_frag[jn + 1][0] = r[2], b_frag[jn + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int jn = 0; jn < kNT; ++jn)
          mma_s8(acc[i][jn], a_frag[i], b_frag[jn][0], b_frag[jn][1]);
    }
  }

  static __device__ __forceinline__ void run(const Params& p, const int8_t* codes_base,
                                             uint32_t w_base, uint32_t full_base,
                                             uint32_t empty_base, const float* epi_alpha,
                                             const float* epi_bias, int* stage, int slice,
                                             int64_t first_rb, int64_t rb_stride, int total_steps) {
    const int t = threadIdx.x - kQuantThreads, lane = t & 31, warp = t >> 5;
    const int steps_k = p.c / kStepK;
    const int warp_m = warp % kWarpsM, warp_n = warp / kWarpsM;
    const int peer_bytes = (BM - BM / p.splits) * kCodePitch;  // codes quantized by the peers
    const int block_n0 = slice * BN * p.passes;                // this block's first channel
    // ldmatrix lane addresses. A (x4 = one m16 x k32 fragment): lanes 0-7
    // rows 0-7 bytes 0-15, 8-15 rows 8-15 bytes 0-15, 16-23 rows 0-7 bytes
    // 16-31, 24-31 rows 8-15 bytes 16-31 (registers a0..a3 of mma.m16n8k32).
    const uint32_t a_lane = __cvta_generic_to_shared(codes_base) +
                            (warp_m * kWarpRows + (lane & 7) + ((lane >> 3) & 1) * 8) * kCodePitch +
                            (lane >> 4) * 16;
    // B (x4 = two n8 x k32 fragments): lanes 0-7 n 0-7 bytes 0-15 (b0 of
    // tile 0), 8-15 n 0-7 bytes 16-31 (b1 of tile 0), 16-31 the same for n
    // 8-15. Rows w_row + 8 j share (row >> 1) & 3, and the k half kk / 32
    // flips bit 1 of the logical chunk (w_part is 0 or 1), so the swizzled
    // address is w_lane + j * 8 rows, with chunk bit 1 flipped for kk = 32.
    // Pass `pass`, step kc of the weights is block (pass * steps_k + kc).
    const int w_row = warp_n * kWarpCols + (lane & 7) + (lane >> 4) * 8;
    const uint32_t w_lane = w_base + w_offset(w_row, (lane >> 3) & 1);

    Acc acc = {};
    int64_t row0 = first_rb * BM + warp_m * kWarpRows;
    for (int j0 = 0; j0 < total_steps; j0 += steps_k) {  // one row block
      for (int pass = 0; pass < p.passes; ++pass) {
        const bool last_pass = pass + 1 == p.passes;
        for (int kc = 0; kc < steps_k; ++kc) {
          const int j = j0 + kc, buffer = j % kBuffers;
          // The buffer's codes: this block's quantizer warps arrive, the
          // peers' rows come as bulk-copy bytes, which one arrival here
          // announces. Later passes reuse the buffers they hold.
          if (pass == 0) {
            const uint32_t full = full_base + buffer * 8;
            if (t == 0) mbar_arrive_expect_tx(full, peer_bytes);
            mbar_wait(full, (j / kBuffers) & 1);
          }
          multiply_step(acc, a_lane + buffer * (BM * kCodePitch),
                        w_lane + (pass * steps_k + kc) * (BN * kStepK));
          // Buffer free for step j + kBuffers (if the quantizers get there)
          // after the last pass: every thread arrives on its own block's
          // empty barrier, and in a cluster one lane per warp on each peer's
          // (lane r to the r-th other rank; after __syncwarp, all of the
          // warp's ldmatrix reads are done).
          if (last_pass && j + kBuffers < total_steps) {
            mbar_arrive(empty_base + buffer * 8);
            if (p.splits > 1) {
              __syncwarp();
              if (lane < p.splits - 1)
                mbar_arrive_cluster(map_rank(empty_base + buffer * 8, other_rank(lane, slice)));
            }
          }
        }
        store_tile<OutT>(p, acc, row0, block_n0 + pass * BN + warp_n * kWarpCols, block_n0,
                         epi_alpha, epi_bias, stage);
#pragma unroll
        for (int i = 0; i < kMT; ++i)
#pragma unroll
          for (int jn = 0; jn < kNT; ++jn)
#pragma unroll
            for (int v = 0; v < 4; ++v) acc[i][jn][v] = 0;
      }
      row0 += rb_stride * BM;
    }
  }
};

// Calls f(QuantizerRole<T, BM, S>{}) for the cluster size S = splits (the
// host launches clusters of 1, 2, 4 or 8 blocks only).
template <typename T, int BM, typename F>
__device__ __forceinline__ void with_quantizer_role(int splits, F&& f) {
  switch (splits) {
    case 1:
      f(QuantizerRole<T, BM, 1>{});
      break;
    case 2:
      f(QuantizerRole<T, BM, 2>{});
      break;
    case 4:
      f(QuantizerRole<T, BM, 4>{});
      break;
    case 8:
      f(QuantizerRole<T, BM, 8>{});
      break;
    default:
      __trap();
  }
}

// The output type is a template parameter too: with a run-time switch the
// compiler hoists every variant's epilogue addresses out of the main loop and
// spills them. Launched as clusters of p.splits blocks, one per slice.
template <typename T, typename OutT, int BM, int BN>
__global__ void __launch_bounds__(kThreads, 1) pointwise_fused_kernel(const Params p) {
  extern __shared__ __align__(128) int8_t smem[];
  int8_t* codes_base = smem + ring_bytes<T>();
  int* staging = reinterpret_cast<int*>(codes_base + code_buffers<T>() * BM * kCodePitch);
  float* bias_smem = reinterpret_cast<float*>(staging + Roles::kMmaWarps * staging_words<BN>());
  int8_t* barriers = reinterpret_cast<int8_t*>(bias_smem + kMaxChannels);
  int8_t* weights = barriers + kBarrierBytes;
  const int block_n = BN * p.passes;  // this block's output channels
  float* epi_alpha = reinterpret_cast<float*>(weights + block_n * p.c);
  float* epi_bias = epi_alpha + block_n;
  const uint32_t full_base = __cvta_generic_to_shared(barriers);
  const uint32_t empty_base = full_base + kMaxCodeBuffers * 8;

  // This block's slice (its rank in the cluster) and the cluster's row
  // blocks first_rb, first_rb + rb_stride, ...
  const int slice = blockIdx.x % p.splits;
  const int64_t first_rb = blockIdx.x / p.splits, rb_stride = gridDim.x / p.splits;
  const int64_t row_blocks = (p.m + BM - 1) / BM;
  const int my_row_blocks =
      first_rb < row_blocks ? int((row_blocks - first_rb + rb_stride - 1) / rb_stride) : 0;
  const int total_steps = my_row_blocks * (p.c / kStepK);

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // Full: one arrival per active quantizer thread and one from the MMA
  // warps (with the peers' bulk-copy bytes); empty: one arrival per own MMA
  // thread and one per MMA warp of each peer. Every block's barriers exist
  // before any peer writes to them.
  if (threadIdx.x == 0) {
    int quantizers = 0;  // active quantizer threads
    with_quantizer_role<T, BM>(p.splits, [&](auto role) { quantizers = decltype(role)::kActive; });
    const int empty_arrivals = Roles::kMmaThreads + Roles::kMmaWarps * (p.splits - 1);
    for (int b = 0; b < code_buffers<T>(); ++b) {
      mbar_init(full_base + b * 8, quantizers + 1);
      mbar_init(empty_base + b * 8, empty_arrivals);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  cluster_sync();
  if (threadIdx.x < Roles::kQuantThreads) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Roles::kQuantRegisters));
    // bias_a into shared memory, visible to all quantizer threads.
    for (int i = threadIdx.x; i < p.c; i += Roles::kQuantThreads)
      bias_smem[i] = __ldg(p.bias_a + i);
    named_sync(kQuantBarrier, Roles::kQuantThreads);
    with_quantizer_role<T, BM>(p.splits, [&](auto role) {
      decltype(role)::run(p, smem, codes_base, full_base, empty_base, bias_smem, slice, first_rb,
                          rb_stride, total_steps);
    });
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Roles::kMmaRegisters));
    // The block's weights, copied and waited for by the MMA warps only:
    // [pass][channel step][BN rows of 64 bytes], swizzled (w_offset).
    const int t = threadIdx.x - Roles::kQuantThreads, c = p.c, units_per_row = c / 16;
    const uint32_t w_base = __cvta_generic_to_shared(weights);
    const int8_t* src = p.weight + int64_t(slice) * block_n * c;
    for (int u = t; u < block_n * units_per_row; u += Roles::kMmaThreads) {
      const int n = u / units_per_row, rem = u - n * units_per_row;
      const int pass = n / BN, row = n - pass * BN;
      cp_async16(
          w_base + (pass * (c / kStepK) + (rem >> 2)) * (BN * kStepK) + w_offset(row, rem & 3),
          src + int64_t(n) * c + rem * 16);
    }
    cp_async_commit();
    // The block's epilogue scales and bias (zeros without a bias).
    for (int n = t; n < block_n; n += Roles::kMmaThreads) {
      epi_alpha[n] = p.epi.alpha[slice * block_n + n];
      epi_bias[n] = p.epi.bias != nullptr ? p.epi.bias[slice * block_n + n] : 0.0f;
    }
    cp_async_wait<0>();
    named_sync(kMmaBarrier, Roles::kMmaThreads);
    int* stage = staging + (t >> 5) * staging_words<BN>();
    MmaRole<T, OutT, BM, BN>::run(p, codes_base, w_base, full_base, empty_base, epi_alpha, epi_bias,
                                  stage, slice, first_rb, rb_stride, total_steps);
  }
  // Every byte and arrival a block receives is awaited by that block, so no
  // peer's shared memory is touched after this; the cluster still leaves
  // together, so no block exits while a peer could address its memory.
  __syncwarp();
  cluster_sync();
#else
  // setmaxnreg is sm_90a only, and so is this kernel (dispatch runs it on the
  // sm90 backend alone); other architectures get a trap, not a silent no-op.
  __trap();
#endif
}

// How many clusters of `slices` blocks of `kernel` fit on the current device
// at once (cached per device and cluster size: a clusters of 8 needs eight
// free SMs of one GPC, so it is not the SM count divided by 8).
int max_active_clusters(const void* kernel, const cudaLaunchConfig_t& config, int slices,
                        std::atomic<int> (&cache)[kMaxDevices][4]) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 0;
  const int index = slices == 1 ? 0 : slices == 2 ? 1 : slices == 4 ? 2 : 3;
  int count = cache[device][index].load(std::memory_order_relaxed);
  if (count == 0) {
    if (cudaOccupancyMaxActiveClusters(&count, kernel, &config) != cudaSuccess) return 0;
    cache[device][index].store(count, std::memory_order_relaxed);
  }
  return count;
}

template <typename T, typename OutT, int BM, int BN>
KernelStatus launch(Params p, cudaStream_t stream) {
  const void* kernel = reinterpret_cast<const void*>(pointwise_fused_kernel<T, OutT, BM, BN>);
  const int smem = fixed_smem_bytes<T, BM, BN>() + BN * p.passes * smem_bytes_per_channel(p.c);
  static std::atomic<int> smem_raised[kMaxDevices];
  const cudaError_t err = raise_smem_limit(kernel, smem, true, smem_raised);
  if (err != cudaSuccess)
    return KernelStatus::failure(std::string("pointwise_fused_conv: ") + cudaGetErrorString(err));
  // Persistent: one block per SM (~150-225 KB of shared memory each); with
  // several slices, the slices of a row block form one cluster, which
  // quantizes each input tile once for all of them.
  cudaLaunchAttribute cluster;
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = unsigned(p.splits);
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(p.splits));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = size_t(smem);
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  static std::atomic<int> clusters_cache[kMaxDevices][4];
  const int64_t fit = max_active_clusters(kernel, config, p.splits, clusters_cache);
  if (fit <= 0)
    return KernelStatus::failure("pointwise_fused_conv: no cluster of " + std::to_string(p.splits) +
                                 " blocks fits the device");
  const int64_t row_blocks = (p.m + BM - 1) / BM;
  const int64_t clusters = row_blocks < fit ? row_blocks : fit;
  if (clusters * p.splits > 0x7fffffff || row_blocks > 0x7fffffff / 2)
    return KernelStatus::failure("pointwise_fused_conv: too many pixels for one launch");
  config.gridDim = dim3(unsigned(clusters * p.splits));
  const cudaError_t launched =
      cudaLaunchKernelEx(&config, pointwise_fused_kernel<T, OutT, BM, BN>, p);
  if (launched != cudaSuccess)
    return KernelStatus::failure(std::string("pointwise_fused_conv: launch failed: ") +
                                 cudaGetErrorString(launched));
  return launch_status("pointwise_fused_conv");
}

// 128-channel weight slices where K allows and the slice fits
// kMaxWeightBytes, else 64.
bool wide_slices(int channels, int out_channels) {
  return out_channels % 128 == 0 && 128 * channels <= kMaxWeightBytes;
}

// Largest opt-in shared memory per block on sm_90 (H100, H200).
constexpr int kMaxSmemBytes = 227 * 1024;

// How a launch covers K with BN-wide slices (BN = 128 where wide_slices,
// else 64): one block per row block making K / BN passes over its codes
// where it can hold all of K's weights, its shared memory fits and a row
// block's codes leave as many code buffers free for the quantizers to run
// ahead; otherwise clusters of K / BN blocks, one slice each.
template <typename T>
PointwiseFusedLayout fused_layout_for(int channels, int out_channels) {
  const bool wide = wide_slices(channels, out_channels);
  const int slices = out_channels / (wide ? 128 : 64);
  const int64_t fixed = wide ? fixed_smem_bytes<T, 128, 128>() : fixed_smem_bytes<T, 128, 64>();
  const int64_t weight_bytes = int64_t(out_channels) * channels;
  const bool one_block =
      slices > 1 && weight_bytes <= kMaxWeightBytes &&
      2 * (channels / kStepK) <= code_buffers<T>() &&
      fixed + int64_t(out_channels) * smem_bytes_per_channel(channels) <= kMaxSmemBytes;
  return one_block ? PointwiseFusedLayout{slices, 1} : PointwiseFusedLayout{1, slices};
}

// 128-row blocks (64-row blocks measured 6-25% slower on H100).
template <typename T, typename OutT>
KernelStatus launch_for_types(Params p, cudaStream_t stream) {
  const PointwiseFusedLayout layout = fused_layout_for<T>(p.c, p.k);
  p.passes = layout.passes, p.splits = layout.cluster;
  return wide_slices(p.c, p.k) ? launch<T, OutT, 128, 128>(p, stream)
                               : launch<T, OutT, 128, 64>(p, stream);
}

template <typename T>
KernelStatus launch_for_type(const Params& p, cudaStream_t stream) {
  return with_out_type<PointwiseFusedOutTypes>(
      p.epi.out_type,
      [&](auto out) { return launch_for_types<T, out_element_of<decltype(out)>>(p, stream); },
      [] { return KernelStatus::failure("pointwise_fused_conv: unsupported output type"); });
}

}  // namespace

PointwiseFusedLayout pointwise_fused_layout(InType x_type, int channels, int out_channels) {
  // An unknown input type plans as bf16 (the kernel rejects it at launch).
  return with_in_type(
      x_type,
      [&](auto in) {
        return fused_layout_for<in_element_of<decltype(in)>>(channels, out_channels);
      },
      [&] { return fused_layout_for<__nv_bfloat16>(channels, out_channels); });
}

bool pointwise_fused_supports(InType x_type, int64_t pixels, int channels, int out_channels) {
  if (pixels <= 0 || channels <= 0 || channels % kStepK != 0 || channels > kMaxChannels ||
      out_channels <= 0 || out_channels % 64 != 0)
    return false;
  const int cluster = pointwise_fused_layout(x_type, channels, out_channels).cluster;
  return cluster <= kMaxClusterSlices && (cluster & (cluster - 1)) == 0;
}

KernelStatus pointwise_fused_conv(const void* x, InType x_type, int64_t pixels, int channels,
                                  const float* bias_a, const float* scale_a, float eps, int bits,
                                  const int8_t* weight, int out_channels,
                                  const EpilogueArgs& epilogue, cudaStream_t stream) {
  if (!pointwise_fused_supports(x_type, pixels, channels, out_channels))
    return KernelStatus::failure(
        "pointwise_fused_conv: unsupported shape (needs C % 64 == 0, C <= 1024, K % 64 == 0 "
        "and one block or a cluster of 2, 4 or 8 for K)");
  const KernelStatus pointers = device::check_pointwise_pointers("pointwise_fused_conv", x, weight,
                                                                 bias_a, scale_a, epilogue);
  if (!pointers.ok) return pointers;
  Params p{};
  p.x = x, p.weight = weight, p.bias_a = bias_a, p.scale_a = scale_a, p.eps = eps, p.bits = bits;
  p.m = pixels, p.c = channels, p.k = out_channels, p.epi = epilogue;
  return device::with_type(x_type, [&](auto* type) {
    return launch_for_type<std::remove_pointer_t<decltype(type)>>(p, stream);
  });
}

}  // namespace q4conv
