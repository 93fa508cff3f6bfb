// sm90 int8 fprop configuration: tile 128x128x128, one CTA per SM, 64x32 epilogue subtiles.
#define Q4CONV_SM90_IMPL
#include "kernels/conv_sm90_int8.cuh"
Q4CONV_SM90_DEFINE_CONFIG(kCfg128x128x128, "128x128x128", 128, 128, 128, 1, 1, 0, 0)
