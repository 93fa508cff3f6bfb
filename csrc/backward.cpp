// Gradients of conv_train: LSQ with straight-through rounding (Esser et al.
// 2019) and the LSQ+ activation offset, equal to autograd through
// round_ste(clamp(v / s, Qn, Qp)) * s with the scale's gradient scaled by
// g = 1 / sqrt(numel * Qp). Nothing but the inputs is saved by the forward:
// the codes are recomputed here from x and weight (one cheap pass each), so a
// layer keeps no extra activation memory alive between forward and backward.
#include <array>
#include <initializer_list>
#include <utility>
#include <tuple>

#include "q4conv.h"
#include "quant.h"

namespace q4conv {
namespace {

// Pieces of the fake-quantizer q(v) = clamp(rint(v / s)) * s that backward
// needs, computed in fp32 with exactly the forward's rounding.
struct LsqParts {
  at::Tensor codes;     // q: integer-valued, exact in fp16/bf16 too
  at::Tensor inside;    // Qn <= v / s <= Qp: where dv passes
  at::Tensor residual;  // d(q(v)) / ds: q - v/s inside, q outside
};

LsqParts lsq_parts(const at::Tensor& value, const at::Tensor& scale, int64_t bits) {
  const double lo = qmin(static_cast<int>(bits)), hi = qmax(static_cast<int>(bits));
  const at::Tensor ratio = value / scale;
  at::Tensor codes = at::round(at::clamp(ratio, lo, hi));
  codes = at::where(at::isnan(ratio), at::zeros_like(codes), codes);
  LsqParts parts;
  parts.inside = at::logical_and(ratio >= lo, ratio <= hi);
  parts.residual = at::where(parts.inside, codes - ratio, codes);
  parts.codes = codes;
  return parts;
}

// d loss / d scale from the summed grad * residual: times the LSQ factor,
// and zero where max(scale, eps) picked eps.
// An empty quantized tensor (an N = 0 batch) contributes nothing: its
// gradient is zero, not 0 * 1/sqrt(0) = NaN.
at::Tensor finish_scale_grad(const at::Tensor& summed, const at::Tensor& scale, double eps,
                             double numel_per_scale, int64_t bits) {
  const at::Tensor raw = scale.detach().to(at::kFloat).reshape(summed.sizes());
  const at::Tensor passes = (raw >= eps).to(at::kFloat);
  const double factor =
      numel_per_scale > 0 ? lsq_grad_scale(numel_per_scale, static_cast<int>(bits)) : 0.0;
  return (summed * factor * passes).reshape(scale.sizes()).to(scale.scalar_type());
}

// d loss / d scale: sum of grad * residual over `dims` (all when empty),
// then finish_scale_grad.
at::Tensor scale_grad(const at::Tensor& grad, const LsqParts& parts, const at::Tensor& scale,
                      double eps, double numel_per_scale, int64_t bits, at::IntArrayRef dims) {
  const at::Tensor product = grad * parts.residual;
  const at::Tensor summed = dims.empty() ? product.sum() : product.sum(dims);
  return finish_scale_grad(summed, scale, eps, numel_per_scale, bits);
}

// Activation side of the backward: dx, d bias_a (fp32 [C]) and the fp32 sum
// of grad_act * residual that d scale_a is made of.
struct ActivationGrads {
  at::Tensor dx, dbias, residual_sum;
};

// grad_act is fp32 and already includes s_w.
ActivationGrads activation_grads(const at::Tensor& grad_act, const LsqParts& act,
                                 const at::Tensor& x) {
  const at::Tensor dshifted = grad_act * act.inside;
  return {dshifted.to(x.scalar_type()).contiguous(x.suggest_memory_format()),
          dshifted.sum({0, 2, 3}), (grad_act * act.residual).sum()};
}

// conv_train's checks, plus grad_out against the output conv_train makes:
// a direct call with wrong shapes gets a message naming the argument
// instead of a oneDNN or reshape error.
void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& bias_a, const at::Tensor& scale_a,
                           const at::Tensor& weight, const at::Tensor& scale_w,
                           const ConvParams& params) {
  check_defined({{"grad_out", &grad_out},
                 {"x", &x},
                 {"bias_a", &bias_a},
                 {"scale_a", &scale_a},
                 {"weight", &weight},
                 {"scale_w", &scale_w}});
  TORCH_CHECK(weight.dim() == 4, "weight must be 4-D (K, C, R, S), got ", weight.dim(),
              "-D with shape ", weight.sizes());
  check_conv_inputs(x, bias_a, scale_a, scale_w, std::nullopt, weight.size(0), params.bits);
  TORCH_CHECK(weight.size(1) == x.size(1), "x must have ", weight.size(1),
              " channels (the weight's in_channels), got ", x.size(1));
  check_on_device("weight", weight, x);
  check_on_device("grad_out", grad_out, x);
  const auto [p, q] = output_hw(x.size(2), x.size(3), weight.size(2), weight.size(3), params);
  const std::array<int64_t, 4> expected{x.size(0), weight.size(0), p, q};
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.sizes() == at::IntArrayRef(expected),
              "grad_out must have the convolution's output shape ", at::IntArrayRef(expected),
              ", got ", grad_out.sizes());
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()),
              "grad_out must be a floating point tensor, got ", grad_out.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_train_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& bias_a,
                    const at::Tensor& scale_a, const at::Tensor& weight, const at::Tensor& scale_w,
                    bool has_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, double eps, int64_t bits) {
  const ConvParams params = make_params(stride, padding, dilation, eps, bits, false);
  check_backward_inputs(grad_out, x, bias_a, scale_a, weight, scale_w, params);
  const BackwardPlan plan = plan_backward(x, weight, params);
  if (plan.cuda_kernels)
    return cuda_conv_train_backward(grad_out, x, bias_a, scale_a, weight, scale_w, has_bias, params,
                                    plan);
  return aten_conv_train_backward(grad_out, x, bias_a, scale_a, weight, scale_w, has_bias, params);
}

// The same arithmetic through ATen ops (CPU, float64 parameters, empty batches).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
aten_conv_train_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& bias_a,
                         const at::Tensor& scale_a, const at::Tensor& weight,
                         const at::Tensor& scale_w, bool has_bias, const ConvParams& params) {
  const double eps = params.eps;
  const int64_t bits = params.bits;
  const int64_t channels = x.size(1), k_out = weight.size(0);
  const bool per_channel = scale_w.numel() > 1;
  const at::Tensor s_a = at::clamp_min(scale_a.detach().to(at::kFloat).reshape({1, 1, 1, 1}), eps);
  const at::Tensor shifted =
      x.detach().to(at::kFloat) + bias_a.detach().to(at::kFloat).view({1, channels, 1, 1});
  const LsqParts act = lsq_parts(shifted, s_a, bits);
  const at::Tensor s_w = at::clamp_min(
      scale_w.detach().to(at::kFloat).reshape({per_channel ? k_out : 1, 1, 1, 1}), eps);
  const LsqParts wgt = lsq_parts(weight.detach().to(at::kFloat), s_w, bits);

  // The backward convolutions see q_a * s_a and q_w * s_w, as the forward
  // did, but run on the integer codes (exact in any float type) with the
  // scales applied outside: d/d(xq) = convT(gy * s_w[k], q_w),
  // d/d(wq) = s_a * wgrad(q_a, gy). fp16/bf16 inputs on a GPU thus use
  // half-precision tensor-core convolutions, like an fp16 Conv2d would.
  const bool half_on_gpu =
      x.is_cuda() && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16);
  const at::ScalarType compute = half_on_gpu ? x.scalar_type() : at::kFloat;
  const at::Tensor act_codes = act.codes.to(compute);
  const at::Tensor wgt_codes = wgt.codes.to(compute);
  const at::Tensor grad_y = grad_out.to(compute);
  const auto conv_grads = [&](const at::Tensor& grad, std::array<bool, 3> mask) {
    std::optional<at::IntArrayRef> bias_sizes;
    const std::vector<int64_t> bias_shape{k_out};
    if (mask[2]) bias_sizes = bias_shape;
    return at::convolution_backward(
        grad, act_codes, wgt_codes, bias_sizes, {params.stride[0], params.stride[1]},
        {params.padding[0], params.padding[1]}, {params.dilation[0], params.dilation[1]}, false,
        {0, 0}, 1, mask);
  };
  at::Tensor grad_act, grad_wgt, grad_bias;
  if (per_channel) {
    const at::Tensor scaled = (grad_out.to(at::kFloat) * s_w.view({1, k_out, 1, 1})).to(compute);
    grad_act = std::get<0>(conv_grads(scaled, {true, false, false}));
    std::tie(std::ignore, grad_wgt, grad_bias) = conv_grads(grad_y, {false, true, has_bias});
  } else {
    std::tie(grad_act, grad_wgt, grad_bias) = conv_grads(grad_y, {true, true, has_bias});
  }
  grad_wgt = grad_wgt.to(at::kFloat) * s_a.reshape({});
  grad_act = per_channel ? grad_act.to(at::kFloat) : grad_act.to(at::kFloat) * s_w.reshape({});
  const ActivationGrads agrads = activation_grads(grad_act, act, x);
  const at::Tensor dx = agrads.dx;
  const at::Tensor dbias_a = agrads.dbias.to(bias_a.scalar_type());
  const at::Tensor dscale_a =
      finish_scale_grad(agrads.residual_sum, scale_a, eps, static_cast<double>(x.numel()), bits);
  const at::Tensor dweight =
      (grad_wgt * wgt.inside).to(weight.scalar_type()).contiguous(weight.suggest_memory_format());
  const double w_numel = static_cast<double>(per_channel ? weight.numel() / k_out : weight.numel());
  const at::Tensor dscale_w =
      per_channel ? scale_grad(grad_wgt, wgt, scale_w, eps, w_numel, bits, {1, 2, 3})
                  : scale_grad(grad_wgt, wgt, scale_w, eps, w_numel, bits, {});
  // Without a bias the last gradient is an empty placeholder (ops return
  // tensors, never undefined ones).
  return {
      dx,
      dweight,
      dbias_a,
      dscale_a,
      dscale_w,
      has_bias ? grad_bias.to(at::kFloat) : at::empty({0}, grad_out.options().dtype(at::kFloat))};
}

}  // namespace q4conv
