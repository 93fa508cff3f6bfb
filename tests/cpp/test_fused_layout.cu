// Host-side planning of the fused 1x1 kernel (pointwise_fused.cu): how K is
// covered (one block with passes over its codes, or a cluster of slices)
// and which shapes the kernel takes. Runs without a GPU: these functions
// make no CUDA calls.
#include <gtest/gtest.h>

#include <ostream>
#include <string>

#include "kernels/quantize_kernels.h"

namespace q4conv {
namespace {

struct LayoutCase {
  InType type;
  int channels, out_channels;
  int passes, cluster;
};

void PrintTo(const LayoutCase& c, std::ostream* os) {
  *os << "C" << c.channels << " K" << c.out_channels << ": " << c.passes << " passes, cluster "
      << c.cluster;
}

class FusedLayout : public ::testing::TestWithParam<LayoutCase> {};

TEST_P(FusedLayout, MatchesTheWeightAndSharedMemoryBudget) {
  const LayoutCase& c = GetParam();
  const PointwiseFusedLayout layout = pointwise_fused_layout(c.type, c.channels, c.out_channels);
  EXPECT_EQ(layout.passes, c.passes);
  EXPECT_EQ(layout.cluster, c.cluster);
  EXPECT_TRUE(pointwise_fused_supports(c.type, 1000, c.channels, c.out_channels));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, FusedLayout,
    ::testing::Values(
        // One slice: K <= 128 and K * C <= 64 KB.
        LayoutCase{InType::kFloat16, 64, 64, 1, 1}, LayoutCase{InType::kFloat32, 512, 128, 1, 1},
        // All of K in one block (K * C <= 64 KB, a row block's codes in at
        // most half the code buffers): one pass per 128- or 64-wide slice.
        LayoutCase{InType::kFloat16, 64, 256, 2, 1}, LayoutCase{InType::kFloat16, 128, 512, 4, 1},
        LayoutCase{InType::kBFloat16, 64, 1024, 8, 1}, LayoutCase{InType::kFloat32, 128, 320, 5, 1},
        LayoutCase{InType::kFloat16, 192, 256, 2, 1},
        // fp32 inputs have four code buffers (three steps of codes do not
        // leave half free) and a larger ring (64 x 1024 leaves no room).
        LayoutCase{InType::kFloat32, 192, 256, 1, 2}, LayoutCase{InType::kFloat32, 64, 1024, 1, 8},
        // Weights over 64 KB: clusters of slices.
        LayoutCase{InType::kFloat16, 512, 256, 1, 2}, LayoutCase{InType::kFloat16, 1024, 256, 1, 4},
        LayoutCase{InType::kFloat16, 256, 1024, 1, 8},
        LayoutCase{InType::kFloat16, 1024, 512, 1, 8}),
    [](const ::testing::TestParamInfo<LayoutCase>& info) {
      const LayoutCase& c = info.param;
      const char* type = c.type == InType::kFloat32   ? "fp32"
                         : c.type == InType::kFloat16 ? "fp16"
                                                      : "bf16";
      return std::string(type) + "_C" + std::to_string(c.channels) + "_K" +
             std::to_string(c.out_channels);
    });

TEST(FusedSupports, RejectsWhatTheKernelCannotTake) {
  EXPECT_FALSE(pointwise_fused_supports(InType::kFloat16, 1000, 2048, 512));  // C > 1024
  EXPECT_FALSE(pointwise_fused_supports(InType::kFloat16, 1000, 96, 64));     // C % 64
  EXPECT_FALSE(pointwise_fused_supports(InType::kFloat16, 1000, 64, 96));     // K % 64
  EXPECT_FALSE(pointwise_fused_supports(InType::kFloat16, 1000, 512, 2048));  // cluster of 16
  EXPECT_FALSE(pointwise_fused_supports(InType::kFloat16, 1000, 1024, 384));  // cluster of 6
  EXPECT_FALSE(pointwise_fused_supports(InType::kFloat16, 0, 64, 64));        // no pixels
  // K * C far beyond int range is computed in 64 bits: a cluster too large.
  EXPECT_FALSE(pointwise_fused_supports(InType::kFloat16, 1000, 1024, 1 << 22));
}

}  // namespace
}  // namespace q4conv
