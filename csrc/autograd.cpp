// Autograd of the q4conv ops, in C++ (registered at the Autograd dispatch
// key), as torchvision does for its ops. Why not torch.library's Python
// register_autograd: its Python wrapper cost a few hundred microseconds of
// host time per training step on the H100 machine (docs/notes/host-overhead.md),
// more than a small layer's GPU work. Fake kernels stay in Python
// (_ops.py); torch.compile traces these autograd kernels through them.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <initializer_list>
#include <utility>

#include "q4conv.h"

namespace q4conv {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// conv_train_backward below the autograd keys (no graph), as a list.
variable_list call_train_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& bias_a, const at::Tensor& scale_a,
                                  const at::Tensor& weight, const at::Tensor& scale_w,
                                  bool has_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, double eps, int64_t bits) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static const auto op = find_op<decltype(conv_train_backward)>("q4conv::conv_train_backward");
  auto [dx, dweight, dbias_a, dscale_a, dscale_w, dbias] =
      op.call(grad_out, x, bias_a, scale_a, weight, scale_w, has_bias, stride, padding, dilation,
              eps, bits);
  return {dx, dweight, dbias_a, dscale_a, dscale_w, dbias};
}

constexpr const char* kNoDoubleBackward =
    "q4conv does not support double backward (a gradient of q4conv's gradients, e.g. "
    "autograd.grad(..., create_graph=True) followed by another backward): the LSQ gradients "
    "are straight-through estimates with no second derivative";

// The gradients of conv_train as a differentiable function (used when a
// backward runs with create_graph=True): the first-order values are those of
// conv_train_backward, a backward through them raises kNoDoubleBackward.
class ConvTrainBackwardFunction : public torch::autograd::Function<ConvTrainBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const at::Tensor& grad_out,
                               const at::Tensor& x, const at::Tensor& bias_a,
                               const at::Tensor& scale_a, const at::Tensor& weight,
                               const at::Tensor& scale_w, bool has_bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, double eps,
                               int64_t bits) {
    return call_train_backward(grad_out, x, bias_a, scale_a, weight, scale_w, has_bias, stride,
                               padding, dilation, eps, bits);
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad_outputs*/) {
    TORCH_CHECK(false, kNoDoubleBackward);
  }
};

// A first-order gradient computed below autograd (the eval layer's dx) made
// part of a create_graph=True backward's graph: its value, and a backward
// through it raises kNoDoubleBackward instead of PyTorch's "element 0 of
// tensors does not require grad".
class FirstOrderOnly : public torch::autograd::Function<FirstOrderOnly> {
 public:
  // grad_out is an input only so that the result joins the graph (it requires grad).
  static at::Tensor forward(AutogradContext* /*ctx*/, const at::Tensor& /*grad_out*/,
                            const at::Tensor& gradient) {
    return gradient.clone();
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad_outputs*/) {
    TORCH_CHECK(false, kNoDoubleBackward);
  }
};

// LSQ / LSQ+ training convolution: gradients for x, bias_a, scale_a,
// weight, scale_w and bias from conv_train_backward. Only the inputs are
// saved (references): backward recomputes the codes, so a layer keeps no
// activation memory of its own alive.
class ConvTrainFunction : public torch::autograd::Function<ConvTrainFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& bias_a,
                            const at::Tensor& scale_a, const at::Tensor& weight,
                            const at::Tensor& scale_w, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, double eps, int64_t bits,
                            const std::string& backend) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      static const auto op = find_op<decltype(conv_train)>("q4conv::conv_train");
      y = op.call(x, bias_a, scale_a, weight, scale_w, bias, stride, padding, dilation, eps, bits,
                  backend);
    }
    ctx->save_for_backward({x, bias_a, scale_a, weight, scale_w});
    // Everything else in two saved_data entries (each entry is a hashed
    // string key and a boxed value, on every training step). The op above
    // checked that stride, padding and dilation hold two values each.
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["conv"] = std::vector<int64_t>{
        stride[0],  stride[1],   padding[0],
        padding[1], dilation[0], dilation[1],
        bits,       has_bias,    static_cast<int64_t>(has_bias ? bias->scalar_type() : at::kFloat)};
    ctx->saved_data["eps"] = eps;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<int64_t> conv = ctx->saved_data["conv"].toIntVector();
    const at::IntArrayRef stride(conv.data(), 2), padding(conv.data() + 2, 2),
        dilation(conv.data() + 4, 2);
    const int64_t bits = conv[6];
    const bool has_bias = conv[7] != 0;
    // Below the autograd keys the gradients carry no graph. With create_graph
    // (grad mode on) they go through ConvTrainBackwardFunction, whose own
    // backward raises a clear error: q4conv has no second derivative.
    variable_list grads;
    if (at::GradMode::is_enabled()) {
      grads = ConvTrainBackwardFunction::apply(grad_outputs[0], saved[0], saved[1], saved[2],
                                               saved[3], saved[4], has_bias, stride, padding,
                                               dilation, ctx->saved_data["eps"].toDouble(), bits);
    } else {
      grads = call_train_backward(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                  has_bias, stride, padding, dilation,
                                  ctx->saved_data["eps"].toDouble(), bits);
    }
    const at::Tensor &dx = grads[0], &dweight = grads[1], &dbias_a = grads[2], &dscale_a = grads[3],
                     &dscale_w = grads[4], &dbias = grads[5];
    at::Tensor dbias_out;
    const auto bias_dtype = static_cast<at::ScalarType>(conv[8]);
    if (has_bias) dbias_out = dbias.scalar_type() == bias_dtype ? dbias : dbias.to(bias_dtype);
    // One entry per forward argument; the non-tensor ones get none.
    return {dx,           dbias_a,      dscale_a,     dweight,      dscale_w,     dbias_out,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor conv_train_autograd(const at::Tensor& x, const at::Tensor& bias_a,
                               const at::Tensor& scale_a, const at::Tensor& weight,
                               const at::Tensor& scale_w, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, double eps, int64_t bits,
                               const std::string& backend) {
  check_defined({{"x", &x},
                 {"bias_a", &bias_a},
                 {"scale_a", &scale_a},
                 {"weight", &weight},
                 {"scale_w", &scale_w}});
  return ConvTrainFunction::apply(x, bias_a, scale_a, weight, scale_w, bias, stride, padding,
                                  dilation, eps, bits, backend);
}

// Packed (eval-mode) inference: a straight-through input gradient, as
// training's dx: dx = convT(grad_out, q_w * s_w), masked where
// Qn <= (x + bias_a) / s_a <= Qp. The parameters get no gradient (a frozen
// quantized backbone under a trainable head, saliency, adversarial inputs).
class ConvPackedFunction : public torch::autograd::Function<ConvPackedFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& bias_a,
                            const at::Tensor& scale_a, const at::Tensor& qweight,
                            const at::Tensor& scale_w, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, double eps, int64_t bits, bool relu,
                            const std::string& backend,
                            const std::optional<at::Tensor>& kernel_weight,
                            const std::optional<at::Tensor>& alpha) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      static const auto op = find_op<decltype(conv_packed)>("q4conv::conv_packed");
      y = op.call(x, bias_a, scale_a, qweight, scale_w, bias, stride, padding, dilation, eps, bits,
                  relu, backend, kernel_weight, alpha);
    }
    // Only parameter values (detached) and x are kept; y only with relu.
    ctx->save_for_backward(
        {x, bias_a.detach(), scale_a.detach(), qweight, scale_w.detach(), relu ? y : at::Tensor()});
    ctx->saved_data["conv"] = std::vector<int64_t>{stride[0],   stride[1],   padding[0], padding[1],
                                                   dilation[0], dilation[1], bits,       relu};
    ctx->saved_data["eps"] = eps;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<int64_t> conv = ctx->saved_data["conv"].toIntVector();
    const double eps = ctx->saved_data["eps"].toDouble();
    const at::Tensor &x = saved[0], &bias_a = saved[1], &scale_a = saved[2], &qweight = saved[3],
                     &scale_w = saved[4];
    const int64_t bits = conv[6];
    const bool relu = conv[7] != 0;
    at::Tensor dx;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      static const auto unpack_op = find_op<decltype(unpack)>("q4conv::unpack");
      const int64_t channels = x.size(1), k_out = qweight.size(0);
      at::Tensor grad = grad_outputs[0].to(at::kFloat);
      if (relu) grad = grad * (saved[5] > 0);
      // Per-tensor or per-channel s_w on the output gradient; the weights
      // stay integer codes (exact in fp32).
      const at::Tensor s_w = at::clamp_min(scale_w.to(at::kFloat).reshape({-1}), eps);
      grad = grad * s_w.view({1, s_w.numel() == 1 ? 1 : k_out, 1, 1});
      const at::Tensor w_codes = unpack_op.call(qweight, channels).to(at::kFloat);
      const at::Tensor s_a = at::clamp_min(scale_a.to(at::kFloat).reshape({1, 1, 1, 1}), eps);
      const at::Tensor ratio =
          (x.to(at::kFloat) + bias_a.to(at::kFloat).view({1, channels, 1, 1})) / s_a;
      const double lo = -static_cast<double>(int64_t{1} << (bits - 1));
      const double hi = static_cast<double>((int64_t{1} << (bits - 1)) - 1);
      const at::Tensor inside = at::logical_and(ratio >= lo, ratio <= hi);
      const at::Tensor grad_act = std::get<0>(at::convolution_backward(
          grad, ratio, w_codes, std::nullopt, {conv[0], conv[1]}, {conv[2], conv[3]},
          {conv[4], conv[5]}, false, {0, 0}, 1, {true, false, false}));
      dx = (grad_act * inside).to(x.scalar_type()).contiguous(x.suggest_memory_format());
    }
    // One entry per forward argument: only x gets a gradient.
    // With create_graph=True (grad mode on here) dx joins the new graph.
    if (at::GradMode::is_enabled() && grad_outputs[0].requires_grad())
      dx = FirstOrderOnly::apply(grad_outputs[0], dx);
    variable_list grads(15);
    grads[0] = dx;
    return grads;
  }
};

at::Tensor conv_packed_autograd(const at::Tensor& x, const at::Tensor& bias_a,
                                const at::Tensor& scale_a, const at::Tensor& qweight,
                                const at::Tensor& scale_w, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, double eps, int64_t bits, bool relu,
                                const std::string& backend,
                                const std::optional<at::Tensor>& kernel_weight,
                                const std::optional<at::Tensor>& alpha) {
  check_defined({{"x", &x},
                 {"bias_a", &bias_a},
                 {"scale_a", &scale_a},
                 {"qweight", &qweight},
                 {"scale_w", &scale_w}});
  return ConvPackedFunction::apply(x, bias_a, scale_a, qweight, scale_w, bias, stride, padding,
                                   dilation, eps, bits, relu, backend, kernel_weight, alpha);
}

// conv_fused is inference only (the deployed model's op; its codes output has
// no gradient and its float output has no straight-through formula): an input
// that requires grad under grad mode is an error, not a silently missing
// gradient. Otherwise it runs below autograd, its output not requiring grad.
at::Tensor conv_fused_autograd(const at::Tensor& x, const at::Tensor& bias_a,
                               const at::Tensor& scale_a, const at::Tensor& qweight,
                               const at::Tensor& alpha, const std::optional<at::Tensor>& shift,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, double eps, int64_t bits,
                               const std::optional<at::Tensor>& residual, bool relu,
                               const std::optional<at::Tensor>& out_bias_a,
                               const std::optional<at::Tensor>& out_scale_a, double out_eps,
                               std::optional<at::ScalarType> out_dtype, const std::string& backend,
                               const std::optional<at::Tensor>& kernel_weight) {
  if (at::GradMode::is_enabled()) {
    const std::pair<const char*, const std::optional<at::Tensor>> inputs[] = {
        {"x", x},
        {"bias_a", bias_a},
        {"scale_a", scale_a},
        {"alpha", alpha},
        {"shift", shift},
        {"residual", residual},
        {"out_bias_a", out_bias_a},
        {"out_scale_a", out_scale_a}};
    for (const auto& [name, t] : inputs) {
      TORCH_CHECK(!(t.has_value() && t->defined() && t->requires_grad()),
                  "conv_fused is inference only (no gradient): ", name,
                  " requires grad; detach it or run under torch.no_grad() / "
                  "torch.inference_mode()");
    }
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static const auto op = find_op<decltype(conv_fused)>("q4conv::conv_fused");
  return op.call(x, bias_a, scale_a, qweight, alpha, shift, stride, padding, dilation, eps, bits,
                 residual, relu, out_bias_a, out_scale_a, out_eps, out_dtype, backend,
                 kernel_weight);
}

// output_alpha = max(scale_a, eps) * max(scale_w, eps) per output channel.
// The layers call it on detached scales; where a scale requires grad, the
// same product from differentiable ATen ops (one IEEE product of the clamped
// fp32 scales, the kernels' value) gives autograd a graph instead of a
// missing gradient.
at::Tensor output_alpha_autograd(const at::Tensor& scale_a, const at::Tensor& scale_w,
                                 int64_t out_channels, double eps) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double)>(
      "q4conv::output_alpha");
  at::Tensor alpha;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // Checks the arguments too, through the op so that traced (fake, symbolic)
    // scales reach its fake kernel rather than checks that read sizes.
    alpha = op.call(scale_a, scale_w, out_channels, eps);
  }
  if (!at::GradMode::is_enabled() || !(scale_a.requires_grad() || scale_w.requires_grad()))
    return alpha;
  const at::Tensor s_a = at::clamp_min(scale_a.to(at::kFloat).reshape({1}), eps);
  const at::Tensor s_w = at::clamp_min(scale_w.to(at::kFloat).reshape({-1}), eps);
  return (s_a * s_w).expand({out_channels}).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(q4conv, Autograd, m) {
  m.impl("conv_train", &conv_train_autograd);
  m.impl("conv_packed", &conv_packed_autograd);
  m.impl("conv_fused", &conv_fused_autograd);
  m.impl("output_alpha", &output_alpha_autograd);
}

}  // namespace q4conv
