// CUDA glue of the convolution: runs a plan's path (plan.h) on PyTorch's
// current stream: the activation codes (pass, im2col rows or packed taps) or
// a fused 1x1 kernel, the backend's kernel with alpha / bias / ReLU and the
// output type in its epilogue, and the layer's output layout.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_glue.h"
#include "q4conv.h"

namespace q4conv {
namespace {

int64_t workspace_bytes(Backend backend, const ConvShape& shape, OutType out_type) {
#ifdef Q4CONV_HAVE_SM90
  if (backend == Backend::kSm90Int8)
    return static_cast<int64_t>(sm90_int8_workspace_bytes(shape, out_type));
#endif
#ifdef Q4CONV_HAVE_SM80
  if (backend == Backend::kSm80Int4)
    return static_cast<int64_t>(sm80_int4_workspace_bytes(shape, out_type));
#endif
  return 0;
}

KernelStatus run_kernel(Backend backend, const ConvShape& shape, const void* act, const void* wgt,
                        const EpilogueArgs& epilogue, void* workspace, cudaStream_t stream) {
#ifdef Q4CONV_HAVE_SM90
  if (backend == Backend::kSm90Int8)
    return sm90_int8_conv(shape, act, wgt, epilogue, workspace, stream);
#endif
#ifdef Q4CONV_HAVE_SM80
  if (backend == Backend::kSm80Int4)
    return sm80_int4_conv(shape, act, wgt, epilogue, workspace, stream);
#endif
  return KernelStatus::failure("backend not built");
}

// The activation codes the backend's kernel reads: packed filter taps
// (quantized straight from x), or the quantization pass's NHWC codes and, on
// the im2col path, their im2col rows. `x` is what the kernels convolve (x or
// its stride grid).
at::Tensor kernel_activation(const ConvPlan& plan, const at::Tensor& x, const at::Tensor& bias_q,
                             const at::Tensor& scale_q, const ConvParams& params,
                             cudaStream_t stream) {
  const ConvShape& shape = plan.shape;
  if (plan.path == Path::kPackedTaps) {
    at::Tensor rows = at::empty({shape.n, shape.h, shape.w, shape.c}, x.options().dtype(at::kChar));
    check_status(
        pack_taps_quantize(kernel_view(x, "x"), bias_q.data_ptr<float>(), scale_q.data_ptr<float>(),
                           static_cast<float>(params.eps), static_cast<int>(params.bits), plan.conv,
                           rows.data_ptr<int8_t>(), stream),
        "packing filter taps");
    return rows;
  }
  const bool packed = plan.backend == Backend::kSm80Int4;
  at::Tensor act =
      at::empty({x.size(0), x.size(2), x.size(3), packed ? plan.c_pad / 2 : plan.c_pad},
                x.options().dtype(packed ? at::kByte : at::kChar));
  {
    Q4CONV_HOST_SPAN("q4conv::quantize_launch");
    quantize_activation_into(x, bias_q, scale_q, params.eps, params.bits, plan.c_pad, packed, act);
  }
  if (plan.path != Path::kIm2col) return act;
  at::Tensor rows = at::empty({int64_t(shape.n) * shape.p * shape.q, shape.c}, act.options());
  check_status(
      im2col_int8(plan.conv, act.data_ptr<int8_t>(), shape.c, rows.data_ptr<int8_t>(), stream),
      "im2col");
  return rows;
}

// The kernels' NHWC result as the logical (N, K, P, Q) tensor: `out` itself
// (allocated channels_last, so no permute call), or for an x whose suggested
// format is NCHW an NCHW copy made by nhwc_to_nchw (ATen's strided copy of
// the stem's 103 MB fp16 output took 399 us on H100, three times the
// convolution).
at::Tensor layer_output(const at::Tensor& out, const at::Tensor& x, cudaStream_t stream) {
  if (x.suggest_memory_format() != at::MemoryFormat::Contiguous || out.is_contiguous()) return out;
  at::Tensor nchw = at::empty(out.sizes(), out.options());
  const int64_t pixels = out.size(2) * out.size(3);
  check_status(nhwc_to_nchw(out.data_ptr(), static_cast<int>(out.element_size()), out.size(0),
                            pixels, out.size(1), nchw.data_ptr(), stream),
               "NCHW output");
  return nchw;
}

// The fused 1x1 kernels (same arguments): quantization inside the GEMM.
void run_fused(const ConvPlan& plan, const at::Tensor& x, const at::Tensor& bias_q,
               const at::Tensor& scale_q, const ConvParams& params, const at::Tensor& wgt,
               const EpilogueArgs& epilogue, cudaStream_t stream) {
#ifdef Q4CONV_HAVE_SM90
  const bool wgmma = plan.path == Path::kFusedWgmma;
  const auto fused = wgmma ? &pointwise_wgmma_conv : &pointwise_fused_conv;
  const ConvShape& shape = plan.shape;
  check_status(
      fused(x.data_ptr(), kernel_in_type(x.scalar_type(), "x"),
            int64_t(shape.n) * shape.h * shape.w, shape.c, bias_q.data_ptr<float>(),
            scale_q.data_ptr<float>(), static_cast<float>(params.eps),
            static_cast<int>(params.bits), wgt.data_ptr<int8_t>(), shape.k, epilogue, stream),
      wgmma ? "sm90_int8 wgmma pointwise convolution" : "sm90_int8 fused pointwise convolution");
#else
  (void)plan, (void)x, (void)bias_q, (void)scale_q, (void)params, (void)wgt, (void)epilogue,
      (void)stream;
  TORCH_CHECK(false, "the fused 1x1 kernels were not built (no sm_90a in Q4CONV_CUDA_ARCHS)");
#endif
}

// Launches the plan's kernel on `input` (x, or its stride grid) with the
// epilogue `epilogue` (whose `out` the caller allocated): the activation codes
// (pass, im2col rows or packed taps; none for codes in) or a fused 1x1 kernel,
// then the backend's GEMM.
void run_plan(const ConvPlan& plan, const at::Tensor& input, const at::Tensor& bias_a,
              const at::Tensor& scale_a, const at::Tensor& kernel_weight, const ConvParams& params,
              const EpilogueArgs& epilogue) {
  const ConvParams kp = kernel_params(plan, params);
  const at::Tensor wgt =
      plan.path == Path::kPackedTaps ? packed_taps_weight(kernel_weight, plan.conv) : kernel_weight;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor bias_q = fp32_dense(bias_a), scale_q = fp32_dense(scale_a);
  if (plan.path == Path::kFusedMma || plan.path == Path::kFusedWgmma) {
    run_fused(plan, input, bias_q, scale_q, kp, wgt, epilogue, stream);
    return;
  }
  // Codes in: x is the NHWC int8 codes the GEMM reads (plan_geometry checked
  // their layout and alignment).
  const at::Tensor act =
      plan.codes_in ? input : kernel_activation(plan, input, bias_q, scale_q, kp, stream);
  const ConvShape& shape = plan.shape;
  const int64_t workspace_size = workspace_bytes(plan.backend, shape, epilogue.out_type);
  at::Tensor workspace;
  if (workspace_size > 0) workspace = at::empty({workspace_size}, input.options().dtype(at::kByte));
  Q4CONV_HOST_SPAN("q4conv::conv_kernel_launch");
  check_status(run_kernel(plan.backend, shape, act.data_ptr(), wgt.data_ptr(), epilogue,
                          workspace.defined() ? workspace.data_ptr() : nullptr, stream),
               backend_name(plan.backend));
}

// The kernels' output: (N, K, P, Q) sizes in NHWC memory, already the
// channels_last result.
at::Tensor kernel_output(const ConvPlan& plan, const at::Tensor& x, at::ScalarType dtype) {
  const ConvShape& shape = plan.shape;
  return at::empty({shape.n, shape.k, shape.p, shape.q},
                   x.options().dtype(dtype).memory_format(at::MemoryFormat::ChannelsLast));
}

// The residual as the fused epilogue loads it: fp16 NHWC, 16-byte aligned
// (TMA); a copy only where it is not (the values are unchanged).
at::Tensor residual_for_kernel(const at::Tensor& residual) {
  TORCH_CHECK(residual.scalar_type() == at::kHalf,
              "the fused kernels take a float16 residual, got ", residual.scalar_type());
  at::Tensor r = residual.contiguous(at::MemoryFormat::ChannelsLast);
  if ((reinterpret_cast<uintptr_t>(r.data_ptr()) & 15) != 0)
    r = r.clone(at::MemoryFormat::ChannelsLast);
  return r;
}

}  // namespace

at::Tensor cuda_conv(const ConvPlan& plan, const at::Tensor& x, const at::Tensor& bias_a,
                     const at::Tensor& scale_a, const at::Tensor& kernel_weight,
                     const at::Tensor& alpha, const std::optional<at::Tensor>& bias,
                     const ConvParams& params) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = plan.stride_grid ? stride_grid_view(x, params.stride) : x;
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) bias_f = fp32_dense(*bias);
  at::Tensor out = kernel_output(plan, x, x.scalar_type());

  EpilogueArgs epilogue;
  epilogue.alpha = alpha.data_ptr<float>();
  epilogue.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  epilogue.relu = params.relu;
  epilogue.out_type = plan.out_type;  // x's float type (planned by try_backend)
  epilogue.out = out.data_ptr();
  run_plan(plan, input, bias_a, scale_a, kernel_weight, params, epilogue);
  return layer_output(out, x, at::cuda::getCurrentCUDAStream());
}

at::Tensor cuda_conv_fused(const ConvPlan& plan, const at::Tensor& x, const at::Tensor& bias_a,
                           const at::Tensor& scale_a, const at::Tensor& kernel_weight,
                           const at::Tensor& alpha, const std::optional<at::Tensor>& shift,
                           const ConvParams& params, const FusedEpilogue& fused) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(is_fused_out_type(plan.out_type),
              "cuda_conv_fused needs a plan for a fused output type");
  const bool codes_out = plan.out_type == OutType::kFusedCodes8;
  const at::Tensor input = plan.stride_grid ? stride_grid_view(x, params.stride) : x;
  at::Tensor shift_f, residual, out_bias, out_scale;
  if (shift.has_value() && shift->defined()) shift_f = fp32_dense(*shift);
  if (fused.residual.has_value() && fused.residual->defined())
    residual = residual_for_kernel(*fused.residual);
  at::Tensor out = kernel_output(plan, x, codes_out ? at::kChar : at::kHalf);

  EpilogueArgs epilogue;
  epilogue.alpha = alpha.data_ptr<float>();
  epilogue.bias = shift_f.defined() ? shift_f.data_ptr<float>() : nullptr;
  epilogue.relu = fused.relu;
  epilogue.out_type = plan.out_type;
  epilogue.out = out.data_ptr();
  epilogue.residual = residual.defined() ? residual.data_ptr() : nullptr;
  if (codes_out) {
    out_bias = fp32_dense(*fused.out_bias_a);
    out_scale = fp32_dense(*fused.out_scale_a);
    epilogue.out_bias = out_bias.data_ptr<float>();
    epilogue.out_scale = out_scale.data_ptr<float>();
    epilogue.out_eps = static_cast<float>(fused.out_eps);
    epilogue.out_bits = static_cast<int>(params.bits);
  }
  // Codes in: the GEMM reads x's NHWC memory from its first element.
  run_plan(plan, plan.codes_in ? x.permute({0, 2, 3, 1}) : input, bias_a, scale_a, kernel_weight,
           params, epilogue);
  return codes_out ? out : layer_output(out, x, at::cuda::getCurrentCUDAStream());
}

}  // namespace q4conv
