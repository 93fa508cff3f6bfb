// CUDA glue of the training backward (kernels/lsq_cuda.cu,
// kernels/lsq_weight_cuda.cu): checks the tensors, allocates outputs and the
// partial-sum workspaces on PyTorch's allocator and launches on the current
// stream. No host sync: the scales stay on the device, and every sum runs in
// a fixed order (deterministic).
#include <array>
#include <vector>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_glue.h"
#include "kernels/lsq_kernels.h"
#include "plan.h"
#include "q4conv.h"
#include "quant.h"

namespace q4conv {
namespace {

Tensor4dOut lsq_out(at::Tensor& t) {
  Tensor4dOut out;
  out.data = t.data_ptr();
  for (int i = 0; i < 4; ++i) out.stride[i] = t.stride(i);
  return out;
}

// bias_a as fp32 [C] and scale_a as one fp32 value, both on x's device.
std::pair<at::Tensor, at::Tensor> activation_params(const at::Tensor& x, const at::Tensor& bias_a,
                                                    const at::Tensor& scale_a) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "x must be a 4-D CUDA tensor, got ", x.dim(), "-D on ",
              x.device());
  TORCH_CHECK(bias_a.dim() == 1 && bias_a.size(0) == x.size(1), "bias_a must have shape [",
              x.size(1), "] (x's channels), got ", bias_a.sizes());
  TORCH_CHECK(scale_a.numel() == 1, "scale_a must hold one value, got ", scale_a.numel());
  check_on_device("bias_a", bias_a, x);
  check_on_device("scale_a", scale_a, x);
  return {fp32_dense(bias_a), fp32_dense(scale_a)};
}

// Dense in x's suggested memory format, as the ATen path's outputs.
at::Tensor empty_like_x(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(x.suggest_memory_format()));
}

// t in `dtype`; no dispatcher call when it already is (the common case).
at::Tensor as_type(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// The codes both backward convolutions read, in x's dtype and memory format
// (what cuDNN wants for both operands), from one launch: the activation codes
// and the weight codes in their code unit (quant.h's code_unit: the power of
// two nearest the scale, so the convolutions' 16-bit outputs stay near the
// true gradients' range), the weight codes times s_w[k] instead when s_w is
// per channel (a per-channel s_w cannot be applied after the convolution over k). bias / scale:
// activation_params(x, bias_a, scale_a); s_w: dense fp32.
std::pair<at::Tensor, at::Tensor> backward_codes(const at::Tensor& x, const at::Tensor& bias,
                                                 const at::Tensor& scale, const at::Tensor& weight,
                                                 const at::Tensor& s_w, double eps, int64_t bits) {
  Q4CONV_HOST_SPAN("q4conv::backward_codes");
  at::Tensor act_codes = empty_like_x(x);
  at::Tensor wgt_codes =
      at::empty(weight.sizes(),
                weight.options().dtype(x.scalar_type()).memory_format(x.suggest_memory_format()));
  WeightCodesJob weights;
  weights.w = kernel_view(weight, "weight");
  weights.scale_w = s_w.data_ptr<float>();
  weights.per_channel = weights.scaled = s_w.numel() > 1;
  weights.out = lsq_out(wgt_codes);
  check_status(
      lsq_activation_codes(kernel_view(x, "x"), bias.data_ptr<float>(), scale.data_ptr<float>(),
                           static_cast<float>(eps), static_cast<int>(bits), lsq_out(act_codes),
                           at::cuda::getCurrentCUDAStream(), &weights),
      "LSQ activation and weight codes");
  return {act_codes, wgt_codes};
}

// The LSQ backward's outputs besides dx (written into the caller's tensor):
// dweight, and the partial sums that
// lsq_finish_scale_grads reduces, all in one fp32 allocation (`sums`, one
// allocator call instead of three): d bias_a's [bias_rows, C], d scale_a's
// residual terms, and the per-output-channel row sums of d scale_w's.
struct LsqBackward {
  at::Tensor dweight, sums;
  float *bias_partials = nullptr, *residual_partials = nullptr, *row_sums = nullptr;
  int64_t bias_rows = 0, residual_parts = 0;
};

// The weight side of the LSQ backward (dweight written into `dweight`).
LsqWeightBackward weight_backward_args(const at::Tensor& grad_wgt, const at::Tensor& weight,
                                       const at::Tensor& s_w, const at::Tensor& s_a, double eps,
                                       int64_t bits, at::Tensor& dweight) {
  LsqWeightBackward args;
  args.w = kernel_view(weight, "weight");
  args.grad = kernel_view(grad_wgt, "grad_wgt");
  args.dw = lsq_out(dweight);
  args.scale_w = s_w.data_ptr<float>();
  args.per_channel = s_w.numel() > 1;
  args.scale_a = s_a.data_ptr<float>();
  args.eps = static_cast<float>(eps);
  args.bits = static_cast<int>(bits);
  return args;
}

// Both sides of the LSQ backward, in one launch where the kernels allow.
// grad_act: d loss / d (codes times s_a), x's sizes and dtype; grad_scale:
// the raw per-tensor s_w (fp32, one value) that multiplies it, if any;
// grad_wgt: d loss / d (weight codes) from the weight-gradient convolution.
// dx: where the activation gradient goes (x's sizes and dtype, any strides).
LsqBackward cuda_lsq_backward(const at::Tensor& grad_act, const at::Tensor& x, at::Tensor& dx,
                              const at::Tensor& bias, const at::Tensor& scale,
                              const std::optional<at::Tensor>& grad_scale,
                              const at::Tensor& grad_wgt, const at::Tensor& weight,
                              const at::Tensor& s_w, double eps, int64_t bits) {
  TORCH_CHECK(grad_act.sizes() == x.sizes() && grad_act.scalar_type() == x.scalar_type(),
              "grad_act must have x's shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ",
              grad_act.sizes(), " ", grad_act.scalar_type());
  check_on_device("grad_act", grad_act, x);
  // One value, so any fp32 tensor is read right through its data pointer
  // (no reshape / contiguous dispatcher calls).
  const float* multiplier = nullptr;
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->numel() == 1 && grad_scale->scalar_type() == at::kFloat,
                "grad_scale must be one float32 value, got ", grad_scale->numel(), " values of ",
                grad_scale->scalar_type());
    check_on_device("grad_scale", *grad_scale, x);
    multiplier = grad_scale->data_ptr<float>();
  }

  LsqActBackward args;
  args.x = kernel_view(x, "x");
  args.grad = kernel_view(grad_act, "grad_act");
  args.dx = lsq_out(dx);
  args.bias_a = bias.data_ptr<float>();
  args.scale_a = scale.data_ptr<float>();
  args.grad_scale = multiplier;
  args.eps = static_cast<float>(eps);
  args.bits = static_cast<int>(bits);

  const LsqWorkspace ws = lsq_activation_backward_workspace(args);
  LsqBackward out;
  out.dweight =
      at::empty(weight.sizes(), weight.options().memory_format(weight.suggest_memory_format()));
  out.bias_rows = ws.bias_rows;
  out.residual_parts = ws.residual_parts;
  const int64_t bias_floats = ws.bias_rows * x.size(1);
  out.sums = at::empty({bias_floats + ws.residual_parts + weight.size(0)},
                       x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  out.bias_partials = out.sums.data_ptr<float>();
  out.residual_partials = out.bias_partials + bias_floats;
  out.row_sums = out.residual_partials + ws.residual_parts;
  const LsqWeightBackward weights =
      weight_backward_args(grad_wgt, weight, s_w, scale, eps, bits, out.dweight);
  check_status(lsq_activation_backward(args, out.bias_partials, out.residual_partials,
                                       at::cuda::getCurrentCUDAStream(), &weights, out.row_sums),
               "LSQ activation and weight backward");
  return out;
}

// d bias_a, d scale_a and d scale_w (fp32, shaped like their parameters)
// from the partial sums of both LSQ kernels, in one launch. s_a / s_w: the
// raw scales as dense fp32.
struct ScaleGrads {
  at::Tensor dbias_a, dscale_a, dscale_w;
};

ScaleGrads finish_scale_grads(const LsqBackward& act, int64_t out_channels, const at::Tensor& x,
                              const at::Tensor& s_a, const at::Tensor& scale_a,
                              const at::Tensor& s_w, const at::Tensor& scale_w,
                              int64_t weight_numel, double eps, int64_t bits) {
  Q4CONV_HOST_SPAN("q4conv::backward_finish");
  const auto f32 = x.options().dtype(at::kFloat);
  ScaleGrads grads{at::empty({x.size(1)}, f32), at::empty(scale_a.sizes(), f32),
                   at::empty(scale_w.sizes(), f32)};
  const bool per_channel = s_w.numel() > 1;
  const int b = static_cast<int>(bits);
  LsqFinish finish;
  finish.bias_partials = act.bias_partials;
  finish.bias_rows = act.bias_rows;
  finish.channels = x.size(1);
  finish.act_residual = act.residual_partials;
  finish.act_parts = act.residual_parts;
  finish.row_sums = act.row_sums;
  finish.out_channels = out_channels;
  finish.scale_a = s_a.data_ptr<float>();
  finish.scale_w = s_w.data_ptr<float>();
  finish.per_channel = per_channel;
  finish.eps = static_cast<float>(eps);
  finish.act_factor = static_cast<float>(lsq_grad_scale(static_cast<double>(x.numel()), b));
  const int64_t per_scale = weight_numel / (per_channel ? out_channels : 1);
  finish.weight_factor = static_cast<float>(lsq_grad_scale(static_cast<double>(per_scale), b));
  finish.dbias_a = grads.dbias_a.data_ptr<float>();
  finish.dscale_a = grads.dscale_a.data_ptr<float>();
  finish.dscale_w = grads.dscale_w.data_ptr<float>();
  check_status(lsq_finish_scale_grads(finish, at::cuda::getCurrentCUDAStream()),
               "LSQ scale gradients");
  return grads;
}

// What the backward convolutions and the LSQ kernels run on. A 1x1
// convolution without padding reads only x's stride grid: the other pixels get
// no gradient (dx = 0) and add nothing to d bias_a or d scale_a (each of
// their terms is a zero gradient times a finite factor: NaN and +-Inf inputs
// count as clipped, with a finite code). So where the plan says so the
// backward runs on the grid pixels as a stride-1 convolution, as the forward
// does, and dx is zero around them: 1 / (stride_h * stride_w) of the codes,
// LSQ and dgrad bytes.
struct BackwardInput {
  at::Tensor x;        // x, or the view of its stride grid
  at::Tensor dx;       // where the kernels write dx (dx_full or its grid)
  at::Tensor dx_full;  // the gradient returned
  std::array<int64_t, 2> stride, padding, dilation;
};

BackwardInput backward_input(const at::Tensor& x, const BackwardPlan& plan,
                             const ConvParams& params) {
  BackwardInput in;
  if (!plan.stride_grid) {
    in.x = x;
    in.stride = {params.stride[0], params.stride[1]};
    in.padding = {params.padding[0], params.padding[1]};
    in.dilation = {params.dilation[0], params.dilation[1]};
    return in;
  }
  in.x = stride_grid_view(x, params.stride);
  in.stride = {1, 1};
  in.padding = {0, 0};
  in.dilation = {1, 1};
  return in;
}

// dx_full (x's sizes and memory format) and where the kernels write it: all of
// it, or its stride grid with the rest zero (one memset of the dense tensor).
void allocate_dx(BackwardInput& in, const at::Tensor& x, const BackwardPlan& plan,
                 const ConvParams& params, cudaStream_t stream) {
  in.dx_full = empty_like_x(x);
  if (!plan.stride_grid) {
    in.dx = in.dx_full;
    return;
  }
  const at::Tensor& d = in.dx_full;
  C10_CUDA_CHECK(cudaMemsetAsync(d.data_ptr(), 0, d.numel() * d.element_size(), stream));
  in.dx = stride_grid_view(d, params.stride);
}

// The convolutions' gradients: d loss / d (activation codes), d loss / d
// (weight codes), d loss / d bias.
struct ConvGrads {
  at::Tensor act, wgt, bias;
};

// One x-sized buffer alive at a time where the plan allows: the weight
// gradient first (activation codes alive, no activation gradient yet), the
// activation codes freed, then the data gradient, over which the LSQ kernel
// writes dx in place. That is what an fp16 Conv2d's backward holds (its
// dgrad output); the first backward layers set the training step's peak
// memory. One more cuDNN call on the host than the combined backward, which
// the stride-grid path keeps (its dx is a zero-filled tensor around the grid,
// not the gradient's shape).
ConvGrads backward_convolutions(const at::Tensor& grad_out,
                                std::pair<at::Tensor, at::Tensor>& codes, BackwardInput& in,
                                const at::Tensor& x, bool has_bias, const BackwardPlan& plan,
                                const ConvParams& params) {
  std::optional<at::IntArrayRef> bias_sizes;
  const std::vector<int64_t> bias_shape{codes.second.size(0)};  // K
  if (has_bias) bias_sizes = bias_shape;
  ConvGrads g;
  if (plan.stride_grid) {
    std::tie(g.act, g.wgt, g.bias) =
        at::convolution_backward(grad_out, codes.first, codes.second, bias_sizes, in.stride,
                                 in.padding, in.dilation, false, {0, 0}, 1, {true, true, has_bias});
    codes = {};  // back to the allocator before dx is made
    allocate_dx(in, x, plan, params, at::cuda::getCurrentCUDAStream());
    return g;
  }
  std::tie(std::ignore, g.wgt, g.bias) =
      at::convolution_backward(grad_out, codes.first, codes.second, bias_sizes, in.stride,
                               in.padding, in.dilation, false, {0, 0}, 1, {false, true, has_bias});
  codes.first = at::Tensor();
  // The data gradient reads only the input's shape, layout and dtype: x's
  // (the codes are x-shaped, in x's dtype and memory format).
  g.act = std::get<0>(at::convolution_backward(grad_out, x, codes.second, std::nullopt, in.stride,
                                               in.padding, in.dilation, false, {0, 0}, 1,
                                               {true, false, false}));
  codes.second = at::Tensor();
  const bool in_place = g.act.sizes() == x.sizes() && g.act.scalar_type() == x.scalar_type() &&
                        g.act.is_contiguous(x.suggest_memory_format());
  in.dx_full = in_place ? g.act : empty_like_x(x);
  in.dx = in.dx_full;
  return g;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cuda_conv_train_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& bias_a,
                         const at::Tensor& scale_a, const at::Tensor& weight,
                         const at::Tensor& scale_w, bool has_bias, const ConvParams& params,
                         const BackwardPlan& plan) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  check_on_device("weight", weight, x);
  check_on_device("scale_w", scale_w, x);
  check_on_device("grad_out", grad_out, x);
  const double eps = params.eps;
  const int64_t bits = params.bits, k_out = weight.size(0);
  const auto [bias_f, s_a] = activation_params(x, bias_a, scale_a);
  const at::Tensor s_w = fp32_dense(scale_w);
  TORCH_CHECK(s_w.numel() == 1 || s_w.numel() == k_out, "scale_w must hold 1 value or ", k_out,
              ", got ", s_w.numel());
  const bool per_channel = s_w.numel() > 1;

  // The backward convolutions see q_a * s_a and q_w * s_w, as the forward
  // did: they run on the codes in x's dtype (fp16 / bf16 tensor cores for
  // half inputs, like an fp16 Conv2d), written in a power-of-two unit near
  // each scale, the rest of the scales (s / unit, exact) applied around them.
  const at::ScalarType compute = x.scalar_type();
  BackwardInput in = backward_input(x, plan, params);
  std::pair<at::Tensor, at::Tensor> codes =
      backward_codes(in.x, bias_f, s_a, weight, s_w, eps, bits);
  const ConvGrads conv =
      backward_convolutions(as_type(grad_out, compute), codes, in, x, has_bias, plan, params);

  // A per-tensor s_w multiplies grad_act inside the kernel; a per-channel
  // one is already in the weight codes.
  const std::optional<at::Tensor> grad_scale =
      per_channel ? std::nullopt : std::optional<at::Tensor>(s_w);
  LsqBackward act;
  {
    Q4CONV_HOST_SPAN("q4conv::backward_lsq");
    act = cuda_lsq_backward(conv.act, in.x, in.dx, bias_f, s_a, grad_scale, conv.wgt, weight, s_w,
                            eps, bits);
  }

  const ScaleGrads scales =
      finish_scale_grads(act, k_out, x, s_a, scale_a, s_w, scale_w, weight.numel(), eps, bits);
  return {
      in.dx_full,
      act.dweight,
      as_type(scales.dbias_a, bias_a.scalar_type()),
      as_type(scales.dscale_a, scale_a.scalar_type()),
      as_type(scales.dscale_w, scale_w.scalar_type()),
      has_bias ? as_type(conv.bias, at::kFloat) : at::empty({0}, x.options().dtype(at::kFloat))};
}

}  // namespace q4conv
