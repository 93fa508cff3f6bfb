// Torch-side declarations shared by the op registration (ops.cpp,
// ops_cuda.cpp), the op bodies (conv.cpp, backward.cpp, quantize_cpu.cpp) and
// the CUDA glue.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>

#include <array>
#include <initializer_list>
#include <utility>
#include <optional>
#include <string>
#include <tuple>

#include "geometry.h"
#include "plan.h"

// A named span of host work, shown by torch.profiler (bench/profile_host.py);
// nearly free when no profiler runs. Declares a variable named `guard`: use
// it in its own block.
#define Q4CONV_HOST_SPAN(name) RECORD_FUNCTION(name, std::vector<c10::IValue>())

namespace q4conv {

// ---- ops (registered in ops.cpp) -------------------------------------------
// Packs weights (K, C, R, S) to int4 codes [K, R, S, ceil(C/2)] uint8.
at::Tensor quantize_pack(const at::Tensor& weight, const at::Tensor& scale_w, double eps,
                         int64_t bits);
// Inverse layout of quantize_pack: int8 codes (K, C, R, S).
at::Tensor unpack(const at::Tensor& qweight, int64_t in_channels);
// Activation codes, int8 NHWC (N, H, W, C).
at::Tensor quantize_activation(const at::Tensor& x, const at::Tensor& bias_a,
                               const at::Tensor& scale_a, double eps, int64_t bits);
// Inference forward on packed weights.
at::Tensor conv_packed(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& scale_a,
                       const at::Tensor& qweight, const at::Tensor& scale_w,
                       const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, double eps, int64_t bits,
                       bool relu, const std::string& backend,
                       const std::optional<at::Tensor>& kernel_weight,
                       const std::optional<at::Tensor>& alpha);
// Deployed inference forward (conv_epilogue.cpp): x float (quantized as in
// conv_packed) or int8 activation codes (N, C, H, W) used as they are;
// v = fp32(alpha * acc) + shift [+ fp32(residual)] [relu], output the
// consumer's int8 codes (N, K, P, Q) channels_last where out_scale_a is given,
// else v in out_dtype (default x's dtype) and x's memory format.
at::Tensor conv_fused(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& scale_a,
                      const at::Tensor& qweight, const at::Tensor& alpha,
                      const std::optional<at::Tensor>& shift, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, double eps, int64_t bits,
                      const std::optional<at::Tensor>& residual, bool relu,
                      const std::optional<at::Tensor>& out_bias_a,
                      const std::optional<at::Tensor>& out_scale_a, double out_eps,
                      std::optional<at::ScalarType> out_dtype, const std::string& backend,
                      const std::optional<at::Tensor>& kernel_weight);
// Weights in the layout a CUDA backend reads (sm90_int8: int8 KRSC, channels
// padded to 16; sm80_int4: packed int4 KRSC, padded to 32), made once and
// passed back to conv_packed as kernel_weight while qweight is unchanged.
at::Tensor kernel_weight(const at::Tensor& qweight, int64_t in_channels,
                         const std::string& backend);
// Training forward on float weights (quantized on the fly).
at::Tensor conv_train(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& scale_a,
                      const at::Tensor& weight, const at::Tensor& scale_w,
                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, double eps, int64_t bits,
                      const std::string& backend);
// LSQ / LSQ+ gradients of conv_train: (dx, dweight, dbias_a, dscale_a,
// dscale_w, dbias); dbias is an empty tensor when has_bias is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_train_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& bias_a,
                    const at::Tensor& scale_a, const at::Tensor& weight, const at::Tensor& scale_w,
                    bool has_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, double eps, int64_t bits);
// Name of the backend conv_packed would use for these arguments ("fallback",
// "sm80_int4", "sm90_int8"); for tests and benchmarks.
std::string selected_backend(const at::Tensor& x, int64_t out_channels, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, const std::string& backend);
// The whole plan (forward and backward) as "key=value" lines: q4conv.explain.
std::string plan(const at::Tensor& x, int64_t out_channels, at::IntArrayRef kernel_size,
                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                 const std::string& backend, c10::ScalarType weight_dtype);
// The sizes of kernel_weight's result for a backend (the fake kernel's rule).
std::vector<int64_t> kernel_weight_sizes(int64_t out_channels, int64_t in_channels,
                                         at::IntArrayRef kernel_size, const std::string& backend);

// ---- internals ---------------------------------------------------------------
// The registered op `name`, called through the dispatcher from whichever key
// the caller's guards leave (below autograd, below autocast, at x's device).
// Look it up once per call site (a function-local static).
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// A None passed for a required tensor arrives as an undefined tensor: name
// the argument instead of failing on its (missing) device.
inline void check_defined(
    std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  for (const auto& [name, t] : tensors)
    TORCH_CHECK(t->defined(), name, " must be a tensor, got None");
}

// fp32 / fp16 / bf16: the activation dtypes (and a float output's).
inline bool is_float_activation(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// `name` (an op argument) must be on x's device.
inline void check_on_device(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on x's device (", x.device(), "), got ",
              t.device());
}

// Shared argument checks of the conv ops (SPEC section 5).
// x's activation quantizer: floating-point bias_a [C] and one scale_a, on x's device.
void check_activation_quantizer(const at::Tensor& x, const at::Tensor& bias_a,
                                const at::Tensor& scale_a);
void check_conv_inputs(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& scale_a,
                       const at::Tensor& scale_w, const std::optional<at::Tensor>& bias,
                       int64_t out_channels, int64_t bits);
void check_bits(int64_t bits);
void check_x_rank(const at::Tensor& x);
// x 4-D, qweight a uint8 (K, R, S, ceil(C/2)) tensor on x's device.
void check_qweight(const at::Tensor& qweight, const at::Tensor& x);
// y in x's suggested memory format; no dispatcher call when it already is.
at::Tensor in_x_format(const at::Tensor& y, const at::Tensor& x);
// CPU kernels of the ops whose CUDA kernels live in the CUDA glue.
at::Tensor cpu_quantize_pack(const at::Tensor& weight, const at::Tensor& scale_w, double eps,
                             int64_t bits);
at::Tensor cpu_quantize_activation(const at::Tensor& x, const at::Tensor& bias_a,
                                   const at::Tensor& scale_a, double eps, int64_t bits);
at::Tensor cpu_output_alpha(const at::Tensor& scale_a, const at::Tensor& scale_w,
                            int64_t out_channels, double eps);
void check_weight_args(const at::Tensor& weight, const at::Tensor& scale_w, double eps,
                       int64_t bits);
void check_activation_args(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& scale_a,
                           double eps, int64_t bits);
void check_alpha_args(const at::Tensor& scale_a, const at::Tensor& scale_w, int64_t out_channels,
                      double eps);
// The training backward through ATen ops (CPU, and what the CUDA kernels do
// not cover); the op conv_train_backward checks its arguments first.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
aten_conv_train_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& bias_a,
                         const at::Tensor& scale_a, const at::Tensor& weight,
                         const at::Tensor& scale_w, bool has_bias, const ConvParams& params);
// qweight is uint8 (K, R, S, ceil(in_channels / 2)).
void check_qweight_layout(const at::Tensor& qweight, int64_t in_channels);
// Exact integer convolution through ATen float convolution. act_codes: int8
// NHWC (N, H, W, C'), w_codes: int8 (K, R, S, C') (C' may include zero
// padding); returns y = act(alpha * acc + bias) of dtype `out_dtype`, shaped
// (N, K, P, Q) in channels_last memory.
at::Tensor fallback_conv(const at::Tensor& act_codes, const at::Tensor& w_codes,
                         const at::Tensor& alpha, const std::optional<at::Tensor>& bias,
                         const ConvParams& params, at::ScalarType out_dtype);

// ---- max_pool_codes (pool_codes.cpp; CUDA: cuda_pool_codes.cpp) ------------
// The op: a 2-D max-pool of int8 activation codes (N, C, H, W) with exactly
// torch.nn.functional.max_pool2d's semantics on int8 (output size, ceil_mode,
// padding that never wins; stride empty = kernel_size; one value = both
// axes; a window with no input position gives -128). The result is int8 in
// codes' suggested memory format (channels_last for deploy's codes).
// max_pool_codes' arguments, checked, as (height, width) pairs, and its
// output size (check_max_pool_codes).
struct MaxPoolParams {
  int64_t kernel[2], stride[2], padding[2], dilation[2];
  bool ceil_mode = false;
  int64_t out_h = 0, out_w = 0;
};
// TORCH_CHECKs codes (int8, 4-D, C, H, W > 0) and the pool arguments as
// max_pool2d does, naming the argument; the output size by its formula.
MaxPoolParams check_max_pool_codes(const at::Tensor& codes, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, bool ceil_mode);
// The max-pool's output, int8 (N, C, out_h, out_w) on codes' device, in codes'
// suggested memory format (as max_pool2d allocates its output).
at::Tensor max_pool_codes_output(const at::Tensor& codes, const MaxPoolParams& params);
// The dense NHWC tensor the pool kernels write for `out`: out itself where it
// is channels_last-contiguous (deploy's codes), else a buffer to copy into it.
at::Tensor nhwc_buffer(const at::Tensor& out);
at::Tensor cpu_max_pool_codes(const at::Tensor& codes, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, bool ceil_mode);

// ---- CUDA glue (cuda_*.cpp; cuda_stubs.cpp raises in CPU-only builds) ------
at::Tensor cuda_quantize_activation(const at::Tensor& x, const at::Tensor& bias_a,
                                    const at::Tensor& scale_a, double eps, int64_t bits);
at::Tensor cuda_quantize_pack(const at::Tensor& weight, const at::Tensor& scale_w, double eps,
                              int64_t bits);
// output_alpha on the GPU in one launch.
at::Tensor cuda_output_alpha(const at::Tensor& scale_a, const at::Tensor& scale_w,
                             int64_t out_channels, double eps);
// qweight in the layout `backend` reads (kernel_weight_layout).
at::Tensor cuda_kernel_weight(const at::Tensor& qweight, int64_t in_channels, Backend backend);
// cached when it has the layout cuda_kernel_weight makes for qweight, else
// cuda_kernel_weight(qweight, ...).
at::Tensor cuda_packed_kernel_weight(const at::Tensor& qweight,
                                     const std::optional<at::Tensor>& cached, int64_t in_channels,
                                     Backend backend);
// Float weights (K, C, R, S) quantized straight into the layout of
// cuda_kernel_weight (training forward: no packed intermediate), and the
// epilogue scales output_alpha(scale_a, scale_w) from the same launch.
struct TrainKernelWeight {
  at::Tensor weight, alpha;
};
TrainKernelWeight cuda_train_kernel_weight(const at::Tensor& weight, const at::Tensor& scale_a,
                                           const at::Tensor& scale_w, double eps, int64_t bits,
                                           Backend backend);
// Runs the plan's CUDA path: quantizes x (or reads it in the fused kernels)
// and launches the backend's kernel with alpha / bias / ReLU in the epilogue.
// kernel_weight: the weights in the backend's layout. The result is
// (N, K, P, Q) in x's suggested memory format.
at::Tensor cuda_conv(const ConvPlan& plan, const at::Tensor& x, const at::Tensor& bias_a,
                     const at::Tensor& scale_a, const at::Tensor& kernel_weight,
                     const at::Tensor& alpha, const std::optional<at::Tensor>& bias,
                     const ConvParams& params);
// conv_fused's epilogue beyond conv_packed's: what cuda_conv_fused adds to
// the kernels' epilogue (residual, ReLU after it, the consumer's codes).
struct FusedEpilogue {
  std::optional<at::Tensor> residual;  // float16, the output's shape
  bool relu = false;
  std::optional<at::Tensor> out_bias_a, out_scale_a;  // codes out (plan.out_type kFusedCodes8)
  double out_eps = 0.0;
};
// Runs a plan made for a fused output type (plan_conv's fused_out): x float
// (quantized as cuda_conv does) or int8 codes read as they are; the result is
// int8 codes (N, K, P, Q) channels_last, or float16 in x's suggested format.
// Bit for bit conv_fused's ATen arithmetic (conv_epilogue.cpp).
at::Tensor cuda_conv_fused(const ConvPlan& plan, const at::Tensor& x, const at::Tensor& bias_a,
                           const at::Tensor& scale_a, const at::Tensor& kernel_weight,
                           const at::Tensor& alpha, const std::optional<at::Tensor>& shift,
                           const ConvParams& params, const FusedEpilogue& fused);
// max_pool_codes on the GPU (cuda_pool_codes.cpp): one launch of the NHWC
// kernel (pool_codes_cuda.cu) on codes made channels_last.
at::Tensor cuda_max_pool_codes(const at::Tensor& codes, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool ceil_mode);
// The whole training backward on a GPU (backward_cuda.cpp) for float32 /
// float16 / bfloat16 x and weight: about six launches besides cuDNN's
// convolution_backward. Same results as aten_conv_train_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cuda_conv_train_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& bias_a,
                         const at::Tensor& scale_a, const at::Tensor& weight,
                         const at::Tensor& scale_w, bool has_bias, const ConvParams& params,
                         const BackwardPlan& plan);

}  // namespace q4conv
