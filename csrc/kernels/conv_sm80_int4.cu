// CUTLASS 2.x sm80 int4 implicit-GEMM forward convolution (W4A4) with a fused
// per-channel affine + ReLU epilogue. Dispatch, argument checks and the
// alpha/bias packing kernel live here; the three CUTLASS kernel
// instantiations (one per output type) live in conv_sm80_int4_{f32,f16,bf16}.cu
// so they compile in parallel. See conv_sm80_int4_impl.cuh for the design.
#include "kernels/conv_sm80_int4_impl.cuh"

#include <cstdint>
#include <limits>
#include <string>

namespace q4conv {

namespace {

using sm80_int4_detail::AlphaBias;

__global__ void pack_alpha_bias_kernel(const float* __restrict__ alpha,
                                       const float* __restrict__ bias, AlphaBias* __restrict__ out,
                                       int k, int k_padded) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= k_padded) return;
  AlphaBias v(0.f, 0.f);
  if (i < k) {
    v.alpha = alpha[i];
    v.bias = bias ? bias[i] : 0.f;
  }
  out[i] = v;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Checks that need no CUTLASS types; returns an empty string when fine.
std::string shape_problem(const ConvShape& s) {
  if (s.n <= 0 || s.h <= 0 || s.w <= 0 || s.c <= 0 || s.k <= 0 || s.r <= 0 || s.s <= 0 ||
      s.p <= 0 || s.q <= 0)
    return "non-positive dimension";
  if (s.pad_h < 0 || s.pad_w < 0 || s.stride_h <= 0 || s.stride_w <= 0 || s.dil_h <= 0 ||
      s.dil_w <= 0)
    return "invalid padding, stride or dilation";
  if (s.c % kSm80ChannelAlign != 0) return "c is not a multiple of kSm80ChannelAlign (32)";
  // The output (p, q) must be the one of the given geometry.
  const long long p =
      (static_cast<long long>(s.h) + 2LL * s.pad_h - 1LL * s.dil_h * (s.r - 1) - 1) / s.stride_h +
      1;
  const long long q =
      (static_cast<long long>(s.w) + 2LL * s.pad_w - 1LL * s.dil_w * (s.s - 1) - 1) / s.stride_w +
      1;
  if (p != s.p || q != s.q) return "p/q inconsistent with h/w, padding, stride and dilation";
  return {};
}

cutlass::Status dispatch_can_implement(const ConvShape& s, OutType t) {
  return with_out_type<Sm80Int4OutTypes>(
      t, [&](auto out) { return sm80_int4_detail::can_implement<decltype(out)::value>(s); },
      [] { return cutlass::Status::kErrorNotSupported; });
}

}  // namespace

bool sm80_int4_supports(const ConvShape& shape, OutType out_type) {
  if (!shape_problem(shape).empty()) return false;
  // Output vector width: 4 channels (fp32) or 8 channels (fp16 / bf16).
  if (!sm80_int4_detail::whole_out_vectors(shape.k, out_type)) return false;
  return dispatch_can_implement(shape, out_type) == cutlass::Status::kSuccess;
}

size_t sm80_int4_workspace_bytes(const ConvShape& shape, OutType /*out_type*/) {
  if (shape.k <= 0) return 0;
  return sm80_int4_detail::alpha_bias_elems(shape.k) * sizeof(AlphaBias);
}

KernelStatus sm80_int4_conv(const ConvShape& shape, const void* act, const void* weight,
                            const EpilogueArgs& epilogue, void* workspace, cudaStream_t stream) {
  const std::string bad = shape_problem(shape);
  if (!bad.empty()) return KernelStatus::failure("sm80_int4_conv: " + bad);
  if (!sm80_int4_detail::whole_out_vectors(shape.k, epilogue.out_type))
    return KernelStatus::failure("sm80_int4_conv: k is not a multiple of the output vector width");
  if (!act || !weight || !epilogue.out || !epilogue.alpha || !workspace)
    return KernelStatus::failure("sm80_int4_conv: null pointer argument");
  if (!aligned16(act) || !aligned16(weight) || !aligned16(epilogue.out) || !aligned16(workspace))
    return KernelStatus::failure(
        "sm80_int4_conv: act, weight, out and workspace must be 16-byte aligned");

  // Do not let an earlier, unrelated launch error be blamed on this kernel.
  cudaError_t e = cudaPeekAtLastError();
  if (e != cudaSuccess)
    return KernelStatus::failure(std::string("sm80_int4_conv: pending CUDA error before launch: ") +
                                 cudaGetErrorString(e));

  const int k_padded = static_cast<int>(sm80_int4_detail::alpha_bias_elems(shape.k));
  auto* alpha_bias = static_cast<AlphaBias*>(workspace);
  constexpr int kThreads = 256;
  pack_alpha_bias_kernel<<<(k_padded + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      epilogue.alpha, epilogue.bias, alpha_bias, shape.k, k_padded);
  e = cudaGetLastError();
  if (e != cudaSuccess)
    return KernelStatus::failure(std::string("sm80_int4_conv: alpha/bias packing launch: ") +
                                 cudaGetErrorString(e));

  return with_out_type<Sm80Int4OutTypes>(
      epilogue.out_type,
      [&](auto out) {
        return sm80_int4_detail::run<decltype(out)::value>(shape, act, weight, alpha_bias,
                                                           epilogue.relu, epilogue.out, stream);
      },
      [] { return KernelStatus::failure("sm80_int4_conv: unknown output type"); });
}

}  // namespace q4conv
