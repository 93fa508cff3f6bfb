// Internal header of the sm90 (Hopper, wgmma) int8 fprop: the table of
// compiled configurations, without CUTLASS. Included by conv_sm90_int8.cu
// (the choice), the configuration .cu files (through their family header)
// and the harness tests/cuda/sm90_int8_check.cu.
//
// The kernel families, one header each:
//   conv_sm90_int8_common.cuh      epilogue EVT, launch-parameter cache, table entries
//   conv_sm90_int8_implicit.cuh    CUTLASS's implicit-GEMM conv kernel (non-persistent)
//   conv_sm90_int8_gemm.cuh        1x1 stride-1 convolutions as persistent GEMMs
//   conv_sm90_int8_persistent.cuh  filtered convolutions on the persistent pingpong kernel
// Each conv_sm90_int8_<config>.cu file names one configuration (a struct of
// named parameters) and defines its table entry.
#pragma once

#include "kernels/conv_kernels.h"

namespace q4conv {
namespace sm90 {

// One compiled configuration (every type of Sm90Int8OutTypes).
struct Entry {
  const char* name;
  int tile_m, tile_n, tile_k;
  bool (*supports)(const ConvShape&, OutType);
  size_t (*workspace)(const ConvShape&, OutType);
  KernelStatus (*run)(const ConvShape&, const void*, const void*, const EpilogueArgs&, void*,
                      cudaStream_t);
  int (*smem_bytes)(OutType);  // dynamic shared memory per CTA
  int (*min_blocks)();         // CTAs per SM the kernel is built for
};

// Configurations, defined one per .cu file (compiled in parallel):
// implicit-GEMM conv, conv_sm90_int8_t<M>x<N>x<K>[e<E>].cu. "/2cta": built
// for two CTAs per SM; "e<E>": epilogue subtile 64 x E instead of CUTLASS's
// 64 x 32.
extern const Entry kCfg128x128x128;
extern const Entry kCfg128x128x128_e128;
extern const Entry kCfg128x64x128_2cta;
extern const Entry kCfg128x64x64_2cta_e64;
extern const Entry kCfg64x128x128_2cta;
extern const Entry kCfg64x128x64_2cta;
extern const Entry kCfg128x64x32_2cta_e64;
// 1x1 stride-1 convolutions as persistent GEMMs (conv_sm90_int8_g*.cu)
extern const Entry kGemm256x128x128_coop;
extern const Entry kGemm128x128x128_pp;
// Filtered convolutions on the persistent pingpong kernel (conv_sm90_int8_c*.cu)
extern const Entry kConv128x128x128_pp;

// Table and choice (conv_sm90_int8.cu).
int num_configs();
const Entry& config(int i);
// Index of the configuration sm90_int8_conv uses for this shape, or -1.
int pick_config(const ConvShape& shape, OutType out_type);

// The current device's SM count, queried once per device (device: the
// current device, when not null). 0 where the query fails.
int current_sm_count(int* device = nullptr);

}  // namespace sm90
}  // namespace q4conv
