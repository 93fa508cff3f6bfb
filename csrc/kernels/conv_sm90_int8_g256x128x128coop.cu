// sm90 int8 1x1-conv-as-GEMM configuration: tile 256x128x128, cooperative persistent.
#include "kernels/conv_sm90_int8_gemm.cuh"

namespace q4conv {
namespace sm90 {

struct Gemm256x128x128Cooperative : GemmConfig {
  static constexpr const char* kName = "gemm256x128x128/coop";
  static constexpr int kTileM = 256, kTileN = 128, kTileK = 128;
  static constexpr GemmSchedule kSchedule = GemmSchedule::kCooperative;
  static constexpr int kMinBlocks = 1;
};

const Entry kGemm256x128x128_coop = entry_of<GemmKernel, Gemm256x128x128Cooperative>();

}  // namespace sm90
}  // namespace q4conv
