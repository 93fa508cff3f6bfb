// sm90 int8 1x1-conv-as-GEMM configuration: tile 128x128x128, pingpong persistent (epilogue of one
// warp group overlaps the other's mainloop).
#include "kernels/conv_sm90_int8_gemm.cuh"

namespace q4conv {
namespace sm90 {

struct Gemm128x128x128Pingpong : GemmConfig {
  static constexpr const char* kName = "gemm128x128x128/pp";
  static constexpr int kTileM = 128, kTileN = 128, kTileK = 128;
  static constexpr GemmSchedule kSchedule = GemmSchedule::kPingpong;
  static constexpr int kMinBlocks = 1;
};

const Entry kGemm128x128x128_pp = entry_of<GemmKernel, Gemm128x128x128Pingpong>();

}  // namespace sm90
}  // namespace q4conv
