// Autograd of the q4conv ops, in C++ (registered at the Autograd dispatch
// key), as torchvision does for its ops. Why not torch.library's Python
// register_autograd: its Python wrapper cost a few hundred microseconds of
// host time per training step on the H100 machine (NOTES.md, session 3),
// more than a small layer's GPU work. Fake kernels stay in Python
// (_ops.py); torch.compile traces these autograd kernels through them.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "q4conv.h"

namespace q4conv {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The registered op `name` (below autograd when called inside the guards
// here), looked up once per call site.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

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
    static const auto op = find_op<decltype(conv_train_backward)>("q4conv::conv_train_backward");
    const auto call = [&] {
      return op.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4], has_bias,
                     stride, padding, dilation, ctx->saved_data["eps"].toDouble(), bits);
    };
    // The op has no autograd formula. Without create_graph (grad mode off)
    // skip the autograd keys' boxed fallback; with it, keep the fallback,
    // which warns when a double backward goes through these gradients.
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads;
    if (at::GradMode::is_enabled()) {
      grads = call();
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      grads = call();
    }
    auto& [dx, dweight, dbias_a, dscale_a, dscale_w, dbias] = grads;
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
  return ConvTrainFunction::apply(x, bias_a, scale_a, weight, scale_w, bias, stride, padding,
                                  dilation, eps, bits, backend);
}

// Packed (eval-mode) inference has no gradient: a graph through it raises
// when backpropagated, naming what to use instead.
class ConvPackedFunction : public torch::autograd::Function<ConvPackedFunction> {
 public:
  static at::Tensor forward(AutogradContext* /*ctx*/, const at::Tensor& x, const at::Tensor& bias_a,
                            const at::Tensor& scale_a, const at::Tensor& qweight,
                            const at::Tensor& scale_w, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, double eps, int64_t bits, bool relu,
                            const std::string& backend,
                            const std::optional<at::Tensor>& kernel_weight,
                            const std::optional<at::Tensor>& alpha) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = find_op<decltype(conv_packed)>("q4conv::conv_packed");
    return op.call(x, bias_a, scale_a, qweight, scale_w, bias, stride, padding, dilation, eps, bits,
                   relu, backend, kernel_weight, alpha);
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad_outputs*/) {
    TORCH_CHECK(false,
                "q4conv::conv_packed (eval mode, packed int4 weights) has no gradient: use the "
                "layer in training mode (conv_train) to backpropagate");
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
  return ConvPackedFunction::apply(x, bias_a, scale_a, qweight, scale_w, bias, stride, padding,
                                   dilation, eps, bits, relu, backend, kernel_weight, alpha);
}

}  // namespace

TORCH_LIBRARY_IMPL(q4conv, Autograd, m) {
  m.impl("conv_train", &conv_train_autograd);
  m.impl("conv_packed", &conv_packed_autograd);
}

}  // namespace q4conv
