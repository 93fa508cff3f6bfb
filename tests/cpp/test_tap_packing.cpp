// Geometry of the packed-taps layout (conv_kernels.h TapPacking): for every
// output row and filter row of a few-channel convolution, the packed
// convolution must read the packed row and row slot that hold the input row
// the original convolution reads, and produce the same output size. Host
// only: no CUDA call, no GPU needed.
#include <gtest/gtest.h>

#include <sstream>
#include <string>

#include "kernels/conv_kernels.h"

namespace q4conv {
namespace {

int out_size(int in, int pad, int dil, int taps, int stride) {
  return (in + 2 * pad - dil * (taps - 1) - 1) / stride + 1;
}

std::string describe(const ConvShape& g) {
  std::ostringstream os;
  os << "C" << g.c << " H" << g.h << " R" << g.r << " S" << g.s << " stride_h " << g.stride_h
     << " pad_h " << g.pad_h << " dil_h " << g.dil_h;
  return os.str();
}

// Checks one convolution; returns the number of (p, r) pairs checked.
int check_packing(const ConvShape& g) {
  const TapPacking t = tap_packing(g);
  const ConvShape packed = packed_taps_shape(g, t);
  EXPECT_GE(t.slot, g.s * g.c);
  EXPECT_EQ(t.slot % 16, 0);
  EXPECT_EQ(t.cols, t.group * t.slot);
  EXPECT_EQ(packed.c, t.cols);
  if (t.group > 1) {
    EXPECT_EQ(t.group, g.stride_h);
    EXPECT_LE(t.cols, kMaxGroupedChannels);
    EXPECT_EQ(g.dil_h, 1);
  }
  EXPECT_EQ(out_size(packed.h, packed.pad_h, packed.dil_h, packed.r, packed.stride_h), g.p);
  EXPECT_EQ(out_size(packed.w, packed.pad_w, packed.dil_w, packed.s, packed.stride_w), g.q);
  int checked = 0;
  for (int p = 0; p < g.p; ++p) {
    for (int r = 0; r < g.r; ++r) {
      const int input_row = p * g.stride_h - g.pad_h + r * g.dil_h;
      const int tap = r / t.group, slot = r % t.group;
      EXPECT_LT(tap, packed.r) << describe(g);
      const int packed_row = p * packed.stride_h + tap * packed.dil_h;
      EXPECT_TRUE(packed_row >= 0 && packed_row < packed.h) << describe(g) << " p " << p;
      // pack_taps_quantize: slot i of packed row j holds input row j * group + i - pad_h.
      EXPECT_EQ(packed_row * t.group + slot - g.pad_h, input_row)
          << describe(g) << " p " << p << " r " << r;
      ++checked;
    }
  }
  return checked;
}

TEST(TapPacking, EveryFilterRowReadsTheSameInputRow) {
  int checked = 0, grouped = 0;
  for (int c = 1; c <= 15; c += 2)
    for (int s = 1; s <= 7; s += 3)
      for (int r = 1; r <= 7; ++r)
        for (int stride = 1; stride <= 4; ++stride)
          for (int dil = 1; dil <= 2; ++dil)
            for (int pad = 0; pad <= 3; ++pad) {
              ConvShape g;
              g.n = 1;
              g.c = c;
              g.k = 8;
              g.h = 23;
              g.w = 9;
              g.r = r;
              g.s = s;
              g.stride_h = stride;
              g.dil_h = dil;
              g.pad_h = pad;
              g.p = out_size(g.h, pad, dil, r, stride);
              g.q = out_size(g.w, 0, 1, s, 1);
              if (g.p < 1 || g.q < 1) continue;
              checked += check_packing(g);
              grouped += tap_packing(g).group > 1;
            }
  EXPECT_GT(checked, 10000);
  EXPECT_GT(grouped, 100);  // the grouped layout is exercised, not only group 1
}

TEST(TapPacking, TheStemPacksTwoRowsInto64Channels) {
  ConvShape g;
  g.n = 64;
  g.c = 3;
  g.k = 64;
  g.h = g.w = 224;
  g.r = g.s = 7;
  g.stride_h = g.stride_w = 2;
  g.pad_h = g.pad_w = 3;
  g.p = g.q = 112;
  const TapPacking t = tap_packing(g);
  EXPECT_EQ(t.group, 2);
  EXPECT_EQ(t.cols, 64);
  EXPECT_EQ(t.taps, 4);
  EXPECT_EQ(t.rows, 115);
  check_packing(g);
}

}  // namespace
}  // namespace q4conv
