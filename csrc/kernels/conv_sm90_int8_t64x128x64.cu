// sm90 int8 fprop configuration: tile 64x128x64, two CTAs per SM, 64x32 epilogue subtiles.
#define Q4CONV_SM90_IMPL
#include "kernels/conv_sm90_int8.cuh"
Q4CONV_SM90_DEFINE_CONFIG(kCfg64x128x64_2cta, "64x128x64/2cta", 64, 128, 64, 1, 2, 0, 0)
