// sm90 int8 fprop configuration: tile 128x128x128, one CTA per SM, 64x32 epilogue subtiles.
#include "kernels/conv_sm90_int8_implicit.cuh"

namespace q4conv {
namespace sm90 {

struct Implicit128x128x128 : ImplicitConvConfig {
  static constexpr const char* kName = "128x128x128";
  static constexpr int kTileM = 128, kTileN = 128, kTileK = 128;
  static constexpr int kClusterM = 1;
  static constexpr int kMinBlocks = 1;
  static constexpr int kStages = 0;
  static constexpr int kEpilogueN = 0;
};

const Entry kCfg128x128x128 = entry_of<ImplicitConvKernel, Implicit128x128x128>();

}  // namespace sm90
}  // namespace q4conv
