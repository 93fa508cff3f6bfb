// Unit tests of the quantization arithmetic in csrc/quant.h (SPEC section 3).
// References are written independently of quant.h: fp32 quotients are formed
// in double and rounded once to float (exact for a division of two floats,
// since 53 >= 2 * 24 + 2), rounding uses std::nearbyint in double.
#include <gtest/gtest.h>

#include <cfenv>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "quant.h"

namespace {

using q4conv::effective_scale;
using q4conv::lsq_grad_scale;
using q4conv::lsq_initial_scale;
using q4conv::pack_int4_pair;
using q4conv::qmax;
using q4conv::qmin;
using q4conv::quantize_activation;
using q4conv::quantize_value;
using q4conv::quantize_value_fast;
using q4conv::unpack_int4;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Hand-written range ends for `bits`.
int hand_qmin(int bits) {
  int v = 1;
  for (int i = 1; i < bits; ++i) v *= 2;
  return -v;
}
int hand_qmax(int bits) { return -hand_qmin(bits) - 1; }

// Reference code of an already formed fp32 ratio: NaN -> 0, clamp, round half
// to even (std::nearbyint under the default FE_TONEAREST mode, in double).
int ref_code_of_ratio(double ratio, int bits) {
  if (std::isnan(ratio)) return 0;
  const double lo = hand_qmin(bits), hi = hand_qmax(bits);
  const double c = ratio < lo ? lo : (ratio > hi ? hi : ratio);
  return static_cast<int>(std::nearbyint(c));
}

// Reference with IEEE fp32 division semantics: the double quotient of two
// floats rounded once to float is the correctly rounded fp32 quotient.
int ref_code_fp32(float v, float s, int bits) {
  const float ratio = static_cast<float>(static_cast<double>(v) / static_cast<double>(s));
  return ref_code_of_ratio(ratio, bits);
}

TEST(QRange, MatchesHandFormulas) {
  EXPECT_EQ(qmin(4), -8);
  EXPECT_EQ(qmax(4), 7);
  EXPECT_EQ(qmin(2), -2);
  EXPECT_EQ(qmax(2), 1);
  EXPECT_EQ(qmin(8), -128);
  EXPECT_EQ(qmax(8), 127);
  for (int bits = 2; bits <= 8; ++bits) {
    EXPECT_EQ(qmin(bits), hand_qmin(bits)) << "bits=" << bits;
    EXPECT_EQ(qmax(bits), hand_qmax(bits)) << "bits=" << bits;
  }
}

TEST(QuantizeValue, RoundsHalfToEven) {
  ASSERT_EQ(std::fegetround(), FE_TONEAREST);
  EXPECT_EQ(quantize_value(0.5f, 1.0f, 4), 0);
  EXPECT_EQ(quantize_value(-0.5f, 1.0f, 4), 0);
  EXPECT_EQ(quantize_value(1.5f, 1.0f, 4), 2);
  EXPECT_EQ(quantize_value(-1.5f, 1.0f, 4), -2);
  EXPECT_EQ(quantize_value(2.5f, 1.0f, 4), 2);
  EXPECT_EQ(quantize_value(-2.5f, 1.0f, 4), -2);
  EXPECT_EQ(quantize_value(3.5f, 1.0f, 4), 4);
  EXPECT_EQ(quantize_value(-3.5f, 1.0f, 4), -4);
  EXPECT_EQ(quantize_value(6.5f, 1.0f, 4), 6);
  EXPECT_EQ(quantize_value(-6.5f, 1.0f, 4), -6);
  EXPECT_EQ(quantize_value(-7.5f, 1.0f, 4), -8);  // tie to the even range end
  // Ties through an exact division by a power-of-two scale.
  EXPECT_EQ(quantize_value(0.125f, 0.25f, 4), 0);    // 0.5
  EXPECT_EQ(quantize_value(0.375f, 0.25f, 4), 2);    // 1.5
  EXPECT_EQ(quantize_value(-0.625f, 0.25f, 4), -2);  // -2.5
  // Just off the ties: the nearest integer.
  EXPECT_EQ(quantize_value(std::nextafter(0.5f, 1.0f), 1.0f, 4), 1);
  EXPECT_EQ(quantize_value(std::nextafter(2.5f, 3.0f), 1.0f, 4), 3);
  EXPECT_EQ(quantize_value(std::nextafter(-1.5f, 0.0f), 1.0f, 4), -1);
  // Every tie k + 0.5 inside the 8-bit range goes to the even neighbour.
  for (int k = -128; k < 127; ++k) {
    const float v = static_cast<float>(k) + 0.5f;
    const int even = (k % 2 == 0) ? k : k + 1;
    EXPECT_EQ(quantize_value(v, 1.0f, 8), even) << "v=" << v;
  }
}

TEST(QuantizeValue, ClampsAtQnQp4Bit) {
  EXPECT_EQ(quantize_value(7.0f, 1.0f, 4), 7);
  EXPECT_EQ(quantize_value(7.49f, 1.0f, 4), 7);
  EXPECT_EQ(quantize_value(7.5f, 1.0f, 4), 7);  // clamped before rounding
  EXPECT_EQ(quantize_value(8.0f, 1.0f, 4), 7);
  EXPECT_EQ(quantize_value(1e30f, 1.0f, 4), 7);
  EXPECT_EQ(quantize_value(-8.0f, 1.0f, 4), -8);
  EXPECT_EQ(quantize_value(-8.49f, 1.0f, 4), -8);
  EXPECT_EQ(quantize_value(-9.0f, 1.0f, 4), -8);
  EXPECT_EQ(quantize_value(-1e30f, 1.0f, 4), -8);
  EXPECT_EQ(quantize_value(0.7f, 0.1f, 4), 7);
  EXPECT_EQ(quantize_value(5.0f, 0.1f, 4), 7);
  EXPECT_EQ(quantize_value(-5.0f, 0.1f, 4), -8);
}

TEST(QuantizeValue, ClampsForBitWidths2To8) {
  for (int bits = 2; bits <= 8; ++bits) {
    const int lo = hand_qmin(bits), hi = hand_qmax(bits);
    for (int k = lo; k <= hi; ++k)
      EXPECT_EQ(quantize_value(static_cast<float>(k), 1.0f, bits), k) << "bits=" << bits;
    EXPECT_EQ(quantize_value(hi + 0.4f, 1.0f, bits), hi) << "bits=" << bits;
    EXPECT_EQ(quantize_value(hi + 1.0f, 1.0f, bits), hi) << "bits=" << bits;
    EXPECT_EQ(quantize_value(hi + 100.0f, 1.0f, bits), hi) << "bits=" << bits;
    EXPECT_EQ(quantize_value(lo - 0.4f, 1.0f, bits), lo) << "bits=" << bits;
    EXPECT_EQ(quantize_value(lo - 1.0f, 1.0f, bits), lo) << "bits=" << bits;
    EXPECT_EQ(quantize_value(lo - 100.0f, 1.0f, bits), lo) << "bits=" << bits;
    EXPECT_EQ(quantize_value(3.0e38f, 1e-3f, bits), hi) << "bits=" << bits;  // ratio overflows
    EXPECT_EQ(quantize_value(-3.0e38f, 1e-3f, bits), lo) << "bits=" << bits;
  }
}

TEST(QuantizeValue, NaNAndInfinities) {
  for (int bits = 2; bits <= 8; ++bits) {
    EXPECT_EQ(quantize_value(kNaN, 1.0f, bits), 0) << "bits=" << bits;
    EXPECT_EQ(quantize_value(-kNaN, 0.3f, bits), 0) << "bits=" << bits;
    EXPECT_EQ(quantize_value(kInf, 1.0f, bits), hand_qmax(bits)) << "bits=" << bits;
    EXPECT_EQ(quantize_value(-kInf, 1.0f, bits), hand_qmin(bits)) << "bits=" << bits;
    EXPECT_EQ(quantize_value(kInf, 1e30f, bits), hand_qmax(bits)) << "bits=" << bits;
  }
  // A NaN scale, and 0 / 0 and Inf / Inf ratios, are NaN: code 0.
  EXPECT_EQ(quantize_value(1.0f, kNaN, 4), 0);
  EXPECT_EQ(quantize_value(0.0f, 0.0f, 4), 0);
  EXPECT_EQ(quantize_value(kInf, kInf, 4), 0);
  // Finite / 0 is +-Inf: the range ends.
  EXPECT_EQ(quantize_value(1.0f, 0.0f, 4), 7);
  EXPECT_EQ(quantize_value(-1.0f, 0.0f, 4), -8);
  // Signed zero and the smallest values quantize to 0.
  EXPECT_EQ(quantize_value(-0.0f, 1.0f, 4), 0);
  EXPECT_EQ(quantize_value(std::numeric_limits<float>::denorm_min(), 1.0f, 4), 0);
}

// fp32 division semantics on random values: always equal to the fp32
// reference; equal to the exact (double) quotient's code wherever the exact
// quotient is not within fp32 rounding of a .5 boundary.
TEST(QuantizeValue, Fp32DivisionMatchesReferenceOnRandomValues) {
  std::mt19937 rng(20240611);
  std::uniform_real_distribution<float> val(-12.0f, 12.0f);
  std::uniform_real_distribution<float> scl(0.01f, 2.0f);
  int compared_exact = 0;
  for (int i = 0; i < 200000; ++i) {
    const int bits = 2 + i % 7;
    const float s = scl(rng);
    const float v = val(rng) * s * static_cast<float>(hand_qmax(bits)) / 6.0f;
    const int got = quantize_value(v, s, bits);
    ASSERT_EQ(got, ref_code_fp32(v, s, bits)) << "v=" << v << " s=" << s << " bits=" << bits;
    const double exact = static_cast<double>(v) / static_cast<double>(s);
    const double frac = exact - std::floor(exact);
    if (std::fabs(frac - 0.5) > 1e-6 * (1.0 + std::fabs(exact))) {
      ++compared_exact;
      ASSERT_EQ(got, ref_code_of_ratio(exact, bits)) << "v=" << v << " s=" << s << " bits=" << bits;
    }
  }
  EXPECT_GT(compared_exact, 190000);
}

// quant.h divides: on values where v * (1 / s) rounds to the other side of a
// .5 boundary than v / s, the code must follow the division.
TEST(QuantizeValue, DividesRatherThanMultipliesByReciprocal) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> scl(0.01f, 3.0f);
  std::uniform_int_distribution<int> half(-15, 13);
  int differing = 0;
  for (int i = 0; i < 400000 && differing < 200; ++i) {
    const float s = scl(rng);
    // v near a tie (k + 0.5) * s, so the two quotients often straddle it.
    const float v = (static_cast<float>(half(rng)) + 0.5f) * s;
    volatile float recip = 1.0f / s;
    const float by_mul = v * recip;
    const float by_div = static_cast<float>(static_cast<double>(v) / static_cast<double>(s));
    const int code_mul = ref_code_of_ratio(by_mul, 4);
    const int code_div = ref_code_of_ratio(by_div, 4);
    if (code_mul == code_div) continue;
    ++differing;
    ASSERT_EQ(quantize_value(v, s, 4), code_div) << "v=" << v << " s=" << s;
  }
  EXPECT_GT(differing, 10) << "no value separating division from reciprocal found";
}

TEST(EffectiveScale, ClampsBelowEps) {
  EXPECT_EQ(effective_scale(0.5f, 1e-3f), 0.5f);
  EXPECT_EQ(effective_scale(1e-4f, 1e-3f), 1e-3f);
  EXPECT_EQ(effective_scale(0.0f, 1e-3f), 1e-3f);
  EXPECT_EQ(effective_scale(-2.0f, 1e-3f), 1e-3f);
  EXPECT_EQ(effective_scale(1e-3f, 1e-3f), 1e-3f);
  EXPECT_EQ(effective_scale(std::nextafter(1e-3f, 1.0f), 1e-3f), std::nextafter(1e-3f, 1.0f));
  // A NaN scale stays NaN (torch.clamp_min, SPEC 3), and every code is then NaN's, 0.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(effective_scale(nan, 1e-3f)));
  EXPECT_EQ(quantize_value(5.0f, effective_scale(nan, 1e-3f), 4), 0);
  EXPECT_EQ(
      quantize_value_fast(5.0f, effective_scale(nan, 1e-3f), 1.0f / effective_scale(nan, 1e-3f), 4),
      0);
  // Used as the divisor: a zero learnt scale divides by eps, not by zero.
  EXPECT_EQ(quantize_value(1.0f, effective_scale(0.0f, 0.5f), 4), 2);
  EXPECT_EQ(quantize_value(-3.0f, effective_scale(-1.0f, 0.5f), 4), -6);
  EXPECT_EQ(quantize_value(0.25f, effective_scale(1e-9f, 0.5f), 4), 0);  // 0.5 -> even 0
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int i = 0; i < 10000; ++i) {
    const float s = u(rng), eps = std::fabs(u(rng)) * 0.1f;
    const float want = s > eps ? s : eps;
    ASSERT_EQ(effective_scale(s, eps), want) << "s=" << s << " eps=" << eps;
  }
}

TEST(QuantizeActivation, AddsBiasInFp32BeforeDividing) {
  // 1 + 2^-25 rounds to 1.0f; 1.0 / 2 = 0.5 is a tie -> 0. The exact sum
  // would give a ratio above 0.5 -> 1.
  const float tiny = std::ldexp(1.0f, -25);
  EXPECT_EQ(quantize_activation(1.0f, tiny, 2.0f, 4), 0);
  // Sum then divide, not the sum of two codes: 0.3 + 0.3 = 0.6 -> 1, while
  // each alone rounds to 0.
  EXPECT_EQ(quantize_activation(0.3f, 0.3f, 1.0f, 4), 1);
  // The bias shifts into and out of the clamped range.
  EXPECT_EQ(quantize_activation(6.0f, 3.0f, 1.0f, 4), 7);
  EXPECT_EQ(quantize_activation(6.0f, -3.0f, 1.0f, 4), 3);
  EXPECT_EQ(quantize_activation(-10.0f, 4.0f, 1.0f, 4), -6);
  // Ties after the bias: 1.25 + 1.25 = 2.5 -> 2; 0.25 + 1.25 = 1.5 -> 2.
  EXPECT_EQ(quantize_activation(1.25f, 1.25f, 1.0f, 4), 2);
  EXPECT_EQ(quantize_activation(0.25f, 1.25f, 1.0f, 4), 2);
  // NaN / Inf through the bias.
  EXPECT_EQ(quantize_activation(kNaN, 1.0f, 1.0f, 4), 0);
  EXPECT_EQ(quantize_activation(1.0f, kNaN, 1.0f, 4), 0);
  EXPECT_EQ(quantize_activation(kInf, -kInf, 1.0f, 4), 0);
  EXPECT_EQ(quantize_activation(kInf, 5.0f, 1.0f, 4), 7);
  EXPECT_EQ(quantize_activation(-kInf, 5.0f, 1.0f, 4), -8);

  std::mt19937 rng(99);
  std::uniform_real_distribution<float> u(-20.0f, 20.0f);
  std::uniform_real_distribution<float> scl(0.05f, 3.0f);
  for (int i = 0; i < 100000; ++i) {
    const int bits = 2 + i % 7;
    const float x = u(rng), b = u(rng) * 0.25f, s = scl(rng);
    // fp32 sum, formed in double and rounded once (exact for a sum of floats).
    const float sum = static_cast<float>(static_cast<double>(x) + static_cast<double>(b));
    ASSERT_EQ(quantize_activation(x, b, s, bits), ref_code_fp32(sum, s, bits))
        << "x=" << x << " b=" << b << " s=" << s << " bits=" << bits;
  }
}

// Near ties, (x + b) / s and x / s + b / s can round to different codes; the
// code must follow the fp32 sum divided once.
TEST(QuantizeActivation, SumsBeforeDividingNearTies) {
  std::mt19937 rng(21);
  std::uniform_real_distribution<float> scl(0.01f, 3.0f);
  std::uniform_real_distribution<float> ub(-4.0f, 4.0f);
  std::uniform_int_distribution<int> half(-9, 7);
  auto fdiv = [](float a, float b) {
    return static_cast<float>(static_cast<double>(a) / static_cast<double>(b));
  };
  int differing = 0;
  for (int i = 0; i < 400000 && differing < 200; ++i) {
    const float s = scl(rng);
    const float b = ub(rng) * s;
    const float target = (static_cast<float>(half(rng)) + 0.5f) * s;
    const float x = target - b;
    const float sum = static_cast<float>(static_cast<double>(x) + static_cast<double>(b));
    const int code_sum_first = ref_code_of_ratio(fdiv(sum, s), 4);
    const float split =
        static_cast<float>(static_cast<double>(fdiv(x, s)) + static_cast<double>(fdiv(b, s)));
    if (ref_code_of_ratio(split, 4) == code_sum_first) continue;
    ++differing;
    ASSERT_EQ(quantize_activation(x, b, s, 4), code_sum_first)
        << "x=" << x << " b=" << b << " s=" << s;
  }
  EXPECT_GT(differing, 10) << "no value separating sum-then-divide from divide-then-sum found";
}

TEST(PackInt4, RoundTripsAllCodePairs) {
  int pairs = 0;
  for (int even = -8; even <= 7; ++even) {
    for (int odd = -8; odd <= 7; ++odd) {
      const uint8_t byte = pack_int4_pair(static_cast<int8_t>(even), static_cast<int8_t>(odd));
      // Hand layout: two's complement nibbles, even channel low.
      const int want = ((even + 16) % 16) | (((odd + 16) % 16) << 4);
      ASSERT_EQ(byte, want) << "even=" << even << " odd=" << odd;
      ASSERT_EQ(unpack_int4(byte, false), even) << "even=" << even << " odd=" << odd;
      ASSERT_EQ(unpack_int4(byte, true), odd) << "even=" << even << " odd=" << odd;
      ++pairs;
    }
  }
  EXPECT_EQ(pairs, 256);
}

TEST(PackInt4, NibbleOrderAndAllBytes) {
  EXPECT_EQ(pack_int4_pair(-1, 0), 0x0F);
  EXPECT_EQ(pack_int4_pair(0, -1), 0xF0);
  EXPECT_EQ(pack_int4_pair(0, -8), 0x80);
  EXPECT_EQ(pack_int4_pair(7, -1), 0xF7);
  EXPECT_EQ(pack_int4_pair(1, 2), 0x21);
  EXPECT_EQ(unpack_int4(0x8F, false), -1);
  EXPECT_EQ(unpack_int4(0x8F, true), -8);
  EXPECT_EQ(unpack_int4(0x7A, false), -6);
  EXPECT_EQ(unpack_int4(0x7A, true), 7);
  // Every byte is the packing of its two unpacked nibbles, which are in range.
  for (int b = 0; b < 256; ++b) {
    const int8_t lo = unpack_int4(static_cast<uint8_t>(b), false);
    const int8_t hi = unpack_int4(static_cast<uint8_t>(b), true);
    ASSERT_GE(lo, -8);
    ASSERT_LE(lo, 7);
    ASSERT_GE(hi, -8);
    ASSERT_LE(hi, 7);
    ASSERT_EQ(pack_int4_pair(lo, hi), b) << "byte=" << b;
  }
}

TEST(PackInt4, QuantizeThenPackRoundTrip) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1.5f, 1.5f);
  for (int i = 0; i < 10000; ++i) {
    const float a = u(rng), b = u(rng), s = 0.1f;
    const int8_t qa = quantize_value(a, s, 4), qb = quantize_value(b, s, 4);
    const uint8_t byte = pack_int4_pair(qa, qb);
    ASSERT_EQ(unpack_int4(byte, false), ref_code_fp32(a, s, 4));
    ASSERT_EQ(unpack_int4(byte, true), ref_code_fp32(b, s, 4));
  }
}

TEST(Lsq, GradScaleMatchesFormula) {
  EXPECT_DOUBLE_EQ(lsq_grad_scale(100.0, 4), 1.0 / std::sqrt(700.0));
  EXPECT_DOUBLE_EQ(lsq_grad_scale(1.0, 2), 1.0);  // Qp = 1
  EXPECT_DOUBLE_EQ(lsq_grad_scale(127.0, 8), 1.0 / 127.0);
  std::mt19937 rng(11);
  std::uniform_real_distribution<double> log_numel(0.0, 8.0);
  for (int i = 0; i < 2000; ++i) {
    const int bits = 2 + i % 7;
    const double numel = std::floor(std::pow(10.0, log_numel(rng)));
    const double qp = std::pow(2.0, bits - 1) - 1.0;
    const double want = std::pow(numel * qp, -0.5);
    EXPECT_NEAR(lsq_grad_scale(numel, bits), want, 1e-14 * want)
        << "numel=" << numel << " bits=" << bits;
  }
}

TEST(Lsq, InitialScaleMatchesFormula) {
  EXPECT_DOUBLE_EQ(lsq_initial_scale(0.7, 4), 1.4 / std::sqrt(7.0));
  EXPECT_DOUBLE_EQ(lsq_initial_scale(0.0, 4), 0.0);
  EXPECT_DOUBLE_EQ(lsq_initial_scale(3.0, 2), 6.0);  // Qp = 1
  std::mt19937 rng(13);
  std::normal_distribution<double> normal(0.0, 1.5);
  for (int i = 0; i < 200; ++i) {
    const int bits = 2 + i % 7;
    std::vector<double> t(1 + i * 17);
    for (double& x : t) x = normal(rng);
    double sum_abs = 0.0;
    for (double x : t) sum_abs += std::fabs(x);
    const double mean_abs = sum_abs / static_cast<double>(t.size());
    const double qp = std::pow(2.0, bits - 1) - 1.0;
    const double want = 2.0 * mean_abs * std::pow(qp, -0.5);
    EXPECT_NEAR(lsq_initial_scale(mean_abs, bits), want, 1e-14 * want)
        << "mean_abs=" << mean_abs << " bits=" << bits;
  }
}

}  // namespace

// quantize_value_fast must equal quantize_value everywhere: random values,
// values next to every half-integer tie (the only places a reciprocal product
// can round differently), specials, and tiny / huge scales.
TEST(QuantizeValueFast, MatchesExactDivisionEverywhere) {
  std::mt19937 rng(12345);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  std::uniform_real_distribution<float> log_scale(-20.0f, 10.0f);
  int checked = 0;
  for (int bits = 2; bits <= 8; ++bits) {
    for (int trial = 0; trial < 20000; ++trial) {
      const float scale = std::exp2(log_scale(rng));
      const float inv = 1.0f / scale;
      const float range = static_cast<float>(q4conv::qmax(bits)) + 2.0f;
      const float value = unit(rng) * range * scale;
      ASSERT_EQ(q4conv::quantize_value_fast(value, scale, inv, bits),
                q4conv::quantize_value(value, scale, bits))
          << "value=" << value << " scale=" << scale << " bits=" << bits;
      // Neighbours of the tie (k + 0.5) * scale, up to 32 ulps either way
      // (at |k| ~ 128 an ulp of the quotient is 1.5e-5 and the fast path's
      // tie window, tie_margin(8), 3.1e-5; at |k| ~ 8 an ulp is 9.5e-7 and
      // tie_margin(4) 2.1e-6: this reaches past the window on both sides).
      const float tie = (std::floor(unit(rng) * range) + 0.5f) * scale;
      float near = tie;
      for (int step = 0; step < 32; ++step) near = std::nextafter(near, -INFINITY);
      for (int step = 0; step < 65; ++step, near = std::nextafter(near, INFINITY)) {
        ASSERT_EQ(q4conv::quantize_value_fast(near, scale, inv, bits),
                  q4conv::quantize_value(near, scale, bits))
            << "near tie value=" << near << " scale=" << scale << " bits=" << bits;
        ++checked;
      }
    }
  }
  for (const float special : {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 1e30f, -1e30f, 1e-40f}) {
    for (const float scale : {1e-5f, 0.37f, 3e38f, 1e-38f}) {
      EXPECT_EQ(q4conv::quantize_value_fast(special, scale, 1.0f / scale, 4),
                q4conv::quantize_value(special, scale, 4))
          << "special=" << special << " scale=" << scale;
    }
  }
  EXPECT_GT(checked, 1000000);
}

// quantize_values_fast (eight values, one fallback test) must equal
// quantize_value for each of them: groups of random values with one value
// placed next to a tie, a special or a huge product, so both the fast group
// and the fallback group are exercised.
TEST(QuantizeValuesFast, GroupMatchesExactDivision) {
  std::mt19937 rng(777);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  std::uniform_real_distribution<float> log_scale(-20.0f, 10.0f);
  std::uniform_int_distribution<int> slot(0, 7), kind(0, 4), ulps(-40, 40);
  const float specials[] = {NAN, INFINITY, -INFINITY, 1e30f, -1e30f, 4194304.5f, -8388609.0f};
  int fallbacks = 0;
  for (int bits = 2; bits <= 8; ++bits) {
    for (int trial = 0; trial < 30000; ++trial) {
      const float scale = std::exp2(log_scale(rng));
      const float inv = 1.0f / scale;
      const float range = static_cast<float>(q4conv::qmax(bits)) + 2.0f;
      float values[8];
      for (float& v : values) v = unit(rng) * range * scale;
      float& odd_one = values[slot(rng)];
      switch (kind(rng)) {
        case 0: {  // next to a tie
          odd_one = (std::floor(unit(rng) * range) + 0.5f) * scale;
          for (int step = ulps(rng); step != 0; step += step > 0 ? -1 : 1)
            odd_one = std::nextafter(odd_one, step > 0 ? INFINITY : -INFINITY);
          break;
        }
        case 1:
          odd_one = specials[slot(rng) % 7];
          break;
        case 2:
          odd_one = specials[5 + slot(rng) % 2] * scale;
          break;  // product >= 2^22
        default:
          break;  // all random: the fast group
      }
      int8_t codes[8];
      q4conv::quantize_values_fast(values, scale, inv, bits, codes);
      bool all_fast = true;
      for (int i = 0; i < 8; ++i) {
        int8_t unused;
        all_fast &= q4conv::fast_code(values[i], inv, bits, unused);
        ASSERT_EQ(codes[i], q4conv::quantize_value(values[i], scale, bits))
            << "value=" << values[i] << " scale=" << scale << " bits=" << bits;
      }
      fallbacks += all_fast ? 0 : 1;
    }
  }
  EXPECT_GT(fallbacks, 1000);  // the exact path ran for many groups
}

// The backward's code unit: a power of two within a factor sqrt(2) of s,
// clamped to [2^-14, 2^12]; codes times it stay exact float16 normals, and
// the product of a gradient with s / unit equals the product with s.
TEST(CodeUnit, NearestPowerOfTwoWithinRange) {
  EXPECT_EQ(q4conv::code_unit(1.0f), 1.0f);
  EXPECT_EQ(q4conv::code_unit(0.7f), 0.5f);   // 0.7 / 0.5 = 1.4 < sqrt(2)
  EXPECT_EQ(q4conv::code_unit(0.71f), 1.0f);  // 1 / 0.71 = 1.41 < sqrt(2)
  EXPECT_EQ(q4conv::code_unit(3e-3f), std::ldexp(1.0f, -8));
  EXPECT_EQ(q4conv::code_unit(1e-9f), std::ldexp(1.0f, -14));
  EXPECT_EQ(q4conv::code_unit(1e9f), std::ldexp(1.0f, 12));
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> log2s(-13.5f, 11.5f);
  for (int i = 0; i < 100000; ++i) {
    const float s = std::exp2(log2s(rng));
    const float unit = q4conv::code_unit(s);
    int exponent = 0;
    ASSERT_EQ(std::frexp(unit, &exponent), 0.5f) << "not a power of two: " << unit;
    ASSERT_LE(std::max(s / unit, unit / s), 1.41422f) << "s=" << s;
    ASSERT_EQ((s / unit) * unit, s) << "s / unit is not exact for s=" << s;
  }
}
