// sm90 int8 1x1-conv-as-GEMM configuration: tile 256x128x128, cooperative persistent.
#define Q4CONV_SM90_IMPL
#define Q4CONV_SM90_GEMM
#include "kernels/conv_sm90_int8.cuh"
Q4CONV_SM90_DEFINE_GEMM_CONFIG(kGemm256x128x128_coop, "gemm256x128x128/coop", 256, 128, 128, 0)
