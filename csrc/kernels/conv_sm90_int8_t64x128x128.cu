// sm90 int8 fprop configuration: tile 64x128x128, two CTAs per SM, 64x32 epilogue subtiles.
#include "kernels/conv_sm90_int8_implicit.cuh"

namespace q4conv {
namespace sm90 {

struct Implicit64x128x128_2cta : ImplicitConvConfig {
  static constexpr const char* kName = "64x128x128/2cta";
  static constexpr int kTileM = 64, kTileN = 128, kTileK = 128;
  static constexpr int kClusterM = 1;
  static constexpr int kMinBlocks = 2;
  static constexpr int kStages = 0;
  static constexpr int kEpilogueN = 0;
};

const Entry kCfg64x128x128_2cta = entry_of<ImplicitConvKernel, Implicit64x128x128_2cta>();

}  // namespace sm90
}  // namespace q4conv
