// sm90 int8 fprop configuration on the persistent pingpong kernel: tile 128x128x128, im2col TMA
// mainloop (PersistentConvMainloop), one warp group's epilogue overlapping the other's mainloop.
#define Q4CONV_SM90_IMPL
#define Q4CONV_SM90_GEMM
#include "kernels/conv_sm90_int8.cuh"
Q4CONV_SM90_DEFINE_PERSISTENT_CONV_CONFIG(kConv128x128x128_pp, "conv128x128x128/pp", 128, 128, 128)
