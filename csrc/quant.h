// Quantization arithmetic of SPEC section 3, shared by the CPU code, the CUDA
// kernels and (through the ops) the tests. Everything here is header-only and
// callable from host and device so every backend rounds identically.
#pragma once

#include <cmath>
#include <cstdint>

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
Q4_HD float effective_scale(float scale, float eps) { return scale > eps ? scale : eps; }

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

// quantize_value(value, scale, bits) for every input, with the division
// replaced by a product with inv_scale = 1.0f / scale (the division is a long
// instruction sequence on GPUs). The product is within 2.5e-7 relative of the
// exact quotient (two roundings; inv_scale keeps >= 20 significant bits even
// when subnormal), so for |product| <= 129 (the 8-bit range plus one) it is
// within 3.3e-5 absolute: rint agrees with the exact path unless the product
// lies within 1e-4 of a half-integer. Beyond that range both paths saturate
// to the same end. Ties, NaN and infinities (product - rint(product) is then
// NaN) take the exact division.
Q4_HD int8_t quantize_value_fast(float value, float scale, float inv_scale, int bits) {
  const float approx = value * inv_scale;
  const float nearest = rintf(approx);
  if (!(fabsf(approx - nearest) < 0.5f - 1e-4f)) return quantize_value(value, scale, bits);
  // lo and hi are integers, so clamping after rint equals rint after clamping.
  const float lo = static_cast<float>(qmin(bits));
  const float hi = static_cast<float>(qmax(bits));
  return static_cast<int8_t>(nearest < lo ? lo : (nearest > hi ? hi : nearest));
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
