// sm90 int8 fprop configuration: tile 128x64x64, two CTAs per SM, 64x64 epilogue subtiles.
#include "kernels/conv_sm90_int8_implicit.cuh"

namespace q4conv {
namespace sm90 {

struct Implicit128x64x64_2cta_e64 : ImplicitConvConfig {
  static constexpr const char* kName = "128x64x64/2cta/e64";
  static constexpr int kTileM = 128, kTileN = 64, kTileK = 64;
  static constexpr int kClusterM = 1;
  static constexpr int kMinBlocks = 2;
  static constexpr int kStages = 0;
  static constexpr int kEpilogueN = 64;
};

const Entry kCfg128x64x64_2cta_e64 = entry_of<ImplicitConvKernel, Implicit128x64x64_2cta_e64>();

}  // namespace sm90
}  // namespace q4conv
