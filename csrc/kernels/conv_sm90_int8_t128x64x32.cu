// sm90 int8 fprop configuration: tile 128x64x32, two CTAs per SM, 64x64 epilogue subtiles (C <= 32,
// K <= 64: few-channel convolutions with their filter taps packed into at most 32 channels).
#define Q4CONV_SM90_IMPL
#include "kernels/conv_sm90_int8.cuh"
Q4CONV_SM90_DEFINE_CONFIG(kCfg128x64x32_2cta_e64, "128x64x32/2cta/e64", 128, 64, 32, 1, 2, 0, 64)
