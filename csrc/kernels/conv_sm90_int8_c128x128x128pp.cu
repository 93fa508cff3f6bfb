// sm90 int8 fprop configuration on the persistent pingpong kernel: tile 128x128x128, im2col TMA
// mainloop (PersistentConvMainloop), one warp group's epilogue overlapping the other's mainloop.
#include "kernels/conv_sm90_int8_persistent.cuh"

namespace q4conv {
namespace sm90 {

struct PersistentConv128x128x128Pingpong : PersistentConvConfig {
  static constexpr const char* kName = "conv128x128x128/pp";
  static constexpr int kTileM = 128, kTileN = 128, kTileK = 128;
  static constexpr int kMinBlocks = 1;
};

const Entry kConv128x128x128_pp =
    entry_of<PersistentConvKernel, PersistentConv128x128x128Pingpong>();

}  // namespace sm90
}  // namespace q4conv
