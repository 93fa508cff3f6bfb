// Quantization arithmetic of SPEC section 3, shared by the CPU code, the CUDA
// kernels and (through the ops) the tests. Everything here is header-only and
// callable from host and device so every backend rounds identically.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define Q4_HD __host__ __device__ __forceinline__
#else
#define Q4_HD inline
#endif

namespace q4conv {

// Signed integer range for `bits`-bit codes: [-2^(b-1), 2^(b-1) - 1].
Q4_HD int qmin(int bits) { return -(1 << (bits - 1)); }
Q4_HD int qmax(int bits) { return (1 << (bits - 1)) - 1; }

// s = max(scale, eps): a zero or negative learnt scale never divides by zero.
// As SPEC 3 and torch.clamp_min define it, a NaN scale stays NaN (so every
// code is NaN's code, 0) rather than becoming eps.
Q4_HD float effective_scale(float scale, float eps) {
  return (scale > eps || scale != scale) ? scale : eps;
}

// The unit the training backward's codes are written in: the power of two
// nearest s (an effective scale), within [2^-14, 2^12]. The backward
// convolutions run on codes times this unit instead of the bare integer codes,
// so their 16-bit outputs are the true gradients times s / unit (within a
// factor sqrt(2)) instead of the true gradients / s, which overflow float16 at
// loss scales the float model's gradients fit (s ~ 1e-3 makes them 1000x
// larger). A power of two keeps everything exact: q * unit is a float16 normal
// (|q| <= 8 makes at most 2^15), and the product with s / unit rounds as the
// product with s did.
Q4_HD float code_unit(float s) {
  int exponent = 0;
  const float mantissa = frexpf(s, &exponent);  // s = mantissa * 2^exponent, mantissa in [0.5, 1)
  if (mantissa < 0.70710678f) --exponent;       // nearer 2^(exponent - 1)
  exponent = exponent < -14 ? -14 : (exponent > 12 ? 12 : exponent);
  return ldexpf(1.0f, exponent);
}

// q = clamp(rint(v / s), Qn, Qp) with an IEEE fp32 division and round half to
// even. NaN maps to 0 and +-Inf to the range ends; fminf/fmaxf would turn NaN
// into a range end, so it is tested explicitly.
Q4_HD int8_t quantize_value(float value, float scale, int bits) {
  const float ratio = value / scale;
  if (ratio != ratio) return 0;
  const float lo = static_cast<float>(qmin(bits));
  const float hi = static_cast<float>(qmax(bits));
  const float clamped = ratio < lo ? lo : (ratio > hi ? hi : ratio);
  return static_cast<int8_t>(rintf(clamped));
}

// IEEE fp32 product that the compiler never contracts with a following add
// into one fused multiply-add (nvcc fuses a * b + c by default, which would
// round once instead of twice and break the bounds of fast_code).
Q4_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// The IEEE bits of a float.
Q4_HD int32_t float_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(value);
#else
  int32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
#endif
}

// 1.5 * 2^23: for |v| < 2^22, (v + kRoundMagic) lands in [2^23, 2^24), where
// the fp32 spacing is 1, so the sum rounds v to the nearest integer (half to
// even, the default rounding) and its low mantissa bits hold that integer in
// two's complement. This replaces rintf and the float-to-int conversion, which
// run on the GPU's quarter-rate conversion pipe, with plain adds.
constexpr float kRoundMagic = 12582912.0f;
constexpr int32_t kRoundMagicBits = 0x4B400000;

// The code quantize_value would give, computed from the product with
// inv_scale = 1.0f / scale instead of the division (the division is a long
// instruction sequence on GPUs). Returns false where that product cannot be
// trusted; the caller then takes quantize_value. Bound: with a normal
// inv_scale (scale <= 2^126) the product is the exact quotient q times
// (1 + d1)(1 + d2), |d1|, |d2| <= u = 2^-24, and fp32(q), which
// quantize_value rounds, is q (1 + d3): the two differ by less than 3.0001 u
// |q|. Only |q| < qmax + 2 matters (beyond it both paths saturate to the same
// end, ties at the range ends included), so if the product lies more than
// tie_margin(bits) = 4 u (qmax + 2) from every half-integer (2.1e-6 for 4
// bits, 3.1e-5 for 8), rint gives the same code on both paths. A product of
// 2^22 or more either is already an integer or fails the test. Ties, NaN
// and infinities (product - nearest is then NaN or too close to 0.5) and a
// subnormal inv_scale fail the test.
Q4_HD float tie_margin(int bits) { return static_cast<float>(qmax(bits) + 2) * 2.384185791e-7f; }
constexpr float kMinNormal = 1.17549435e-38f;  // FLT_MIN
Q4_HD bool fast_code(float value, float inv_scale, int bits, int8_t& code) {
  const float approx = mul_rn(value, inv_scale);
  const float shifted = approx + kRoundMagic;  // kRoundMagic + rint(approx) for |approx| < 2^22
  const float nearest = shifted - kRoundMagic;
  // lo and hi are integers, so clamping after rounding equals rounding after
  // clamping. The clamp works on the shifted sum directly: within the range
  // it is kRoundMagic + an integer, and beyond it (|approx| >= 2^22) the sum
  // still lies on the right side of both ends, so it saturates as the
  // unshifted value would; the clamped sum's low bits are the code.
  const float lo = kRoundMagic + static_cast<float>(qmin(bits));
  const float hi = kRoundMagic + static_cast<float>(qmax(bits));
  code = static_cast<int8_t>(float_bits(fminf(fmaxf(shifted, lo), hi)) - kRoundMagicBits);
  return fabsf(approx - nearest) < 0.5f - tie_margin(bits) && inv_scale >= kMinNormal;
}

// quantize_value(value, scale, bits), through fast_code where it can be trusted.
Q4_HD int8_t quantize_value_fast(float value, float scale, float inv_scale, int bits) {
  int8_t code;
  return fast_code(value, inv_scale, bits, code) ? code : quantize_value(value, scale, bits);
}

// quantize_value for kN values at once: fast_code for all of them and one
// test; if any failed (near-ties, NaN, Inf), the values are tested again one
// by one and only the failed ones take the exact division. One branch per
// group keeps the values' instruction chains independent, so they
// interleave; redoing only the failed values keeps the rare group that fails
// cheap (on GPUs a warp runs the fallback when any of its lanes needs it,
// and fp16 activations repeat the same few values near a tie thousands of
// times, so for some scales it is not rare at all).
//
// value_at(i) gives value i; it is called again for the fallback, so a caller
// may compute values on the fly instead of keeping all kN of them live (the
// fused 1x1 kernel converts them from the raw input twice rather than hold
// 32 floats in registers).
template <int kN, typename ValueAt>
Q4_HD void quantize_values_fast_at(const ValueAt& value_at, float scale, float inv_scale, int bits,
                                   int8_t (&code)[kN]) {
  bool fast = true;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < kN; ++i) fast &= fast_code(value_at(i), inv_scale, bits, code[i]);
  if (!fast) {
    for (int i = 0; i < kN; ++i) code[i] = quantize_value_fast(value_at(i), scale, inv_scale, bits);
  }
}

template <int kN>
struct ArrayValues {
  const float (&value)[kN];
  Q4_HD float operator()(int i) const { return value[i]; }
};

template <int kN>
Q4_HD void quantize_values_fast(const float (&value)[kN], float scale, float inv_scale, int bits,
                                int8_t (&code)[kN]) {
  quantize_values_fast_at<kN>(ArrayValues<kN>{value}, scale, inv_scale, bits, code);
}

// Activation code: x' = fp32(x) + fp32(bias_a[c]), then quantize_value.
Q4_HD int8_t quantize_activation(float x, float bias_a, float scale, int bits) {
  return quantize_value(x + bias_a, scale, bits);
}

// Two signed 4-bit codes in one byte: the even channel in the low nibble (the
// order of cutlass::int4b_t arrays), the odd channel in the high nibble.
Q4_HD uint8_t pack_int4_pair(int8_t even, int8_t odd) {
  return static_cast<uint8_t>((static_cast<uint8_t>(even) & 0x0F) |
                              ((static_cast<uint8_t>(odd) & 0x0F) << 4));
}

// Sign-extends the low (high == false) or high nibble of a packed byte.
Q4_HD int8_t unpack_int4(uint8_t packed, bool high) {
  const int nibble = high ? (packed >> 4) : (packed & 0x0F);
  return static_cast<int8_t>(nibble >= 8 ? nibble - 16 : nibble);
}

// LSQ gradient scale g = 1 / sqrt(numel * Qp) (Esser et al. 2019).
inline double lsq_grad_scale(double numel, int bits) {
  return 1.0 / std::sqrt(numel * static_cast<double>(qmax(bits)));
}

// LSQ initial scale from mean(|t|): s = 2 * mean|t| / sqrt(Qp).
inline double lsq_initial_scale(double mean_abs, int bits) {
  return 2.0 * mean_abs / std::sqrt(static_cast<double>(qmax(bits)));
}

}  // namespace q4conv
