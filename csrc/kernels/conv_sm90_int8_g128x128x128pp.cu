// sm90 int8 1x1-conv-as-GEMM configuration: tile 128x128x128, pingpong persistent (epilogue of one
// warp group overlaps the other's mainloop).
#define Q4CONV_SM90_IMPL
#define Q4CONV_SM90_GEMM
#include "kernels/conv_sm90_int8.cuh"
Q4CONV_SM90_DEFINE_GEMM_CONFIG(kGemm128x128x128_pp, "gemm128x128x128/pp", 128, 128, 128, 1)
