"""Loads the compiled operator library and registers the fake (meta) kernels
torch.compile needs. The autograd formulas (LSQ for ``q4conv::conv_train``,
a straight-through input gradient for ``q4conv::conv_packed``) are C++
kernels (csrc/autograd.cpp)."""

from __future__ import annotations

from pathlib import Path
import torch
from torch._prims_common import suggest_memory_format

_LIB_DIR = Path(__file__).resolve().parent


def _load_library() -> None:
    candidates = sorted(_LIB_DIR.glob("_C*.so")) + sorted(_LIB_DIR.glob("_C*.pyd"))
    if not candidates:
        raise ImportError(f"q4conv: compiled library _C.so not found in {_LIB_DIR}; reinstall q4conv")
    torch.ops.load_library(str(candidates[0]))


_load_library()
ops = torch.ops.q4conv


_INT64_MAX = 2**63 - 1


def _out_hw(h, w, r, s, stride, padding, dilation):
    """Output height and width, with the C++ side's checks: every extent must
    fit in int64 (Python ints do not overflow, the C++ arithmetic would) and
    the dilated kernel must fit the padded input. h and w may be symbolic."""
    sizes = []
    for axis, (size, k) in enumerate(((h, r), (w, s))):
        if not isinstance(k, int) or not isinstance(padding[axis], int):  # symbolic: checked at run time
            extent, padded = dilation[axis] * (k - 1) + 1, size + 2 * padding[axis]
        else:
            extent = dilation[axis] * (k - 1) + 1
            if extent > _INT64_MAX or 2 * padding[axis] > _INT64_MAX - 2**32:
                raise RuntimeError(
                    f"dilation {tuple(dilation)} and kernel size ({r}, {s}) give a dilated kernel extent "
                    f"({extent}) or padding {tuple(padding)} that overflows int64")
            padded = size + 2 * padding[axis]
        torch._check(extent <= padded, lambda: (
            f"kernel size ({r}, {s}) after dilation {tuple(dilation)} is larger than the padded input "
            f"({h + 2 * padding[0]}, {w + 2 * padding[1]})"))
        sizes.append((padded - extent) // stride[axis] + 1)
    return sizes[0], sizes[1]


# The output takes x's dtype, as the real kernels' does. Under torch.autocast
# x arrives already cast (csrc/autocast.cpp runs above these kernels, also
# while torch.compile traces), so compiled graphs carry the autocast dtype.
def _conv_output_like(x: torch.Tensor, k: int, r: int, s: int, stride, padding, dilation) -> torch.Tensor:
    out_h, out_w = _out_hw(x.shape[2], x.shape[3], r, s, stride, padding, dilation)
    # Same rule as the C++ side's x.suggest_memory_format().
    fmt = suggest_memory_format(x)
    return x.new_empty((x.shape[0], k, out_h, out_w)).contiguous(memory_format=fmt)


@torch.library.register_fake("q4conv::quantize_pack")
def _quantize_pack_fake(weight, scale_w, eps, bits):
    k, c, r, s = weight.shape
    return weight.new_empty((k, r, s, (c + 1) // 2), dtype=torch.uint8)


@torch.library.register_fake("q4conv::unpack")
def _unpack_fake(qweight, in_channels):
    k, r, s, _ = qweight.shape
    return qweight.new_empty((k, in_channels, r, s), dtype=torch.int8)


@torch.library.register_fake("q4conv::quantize_activation")
def _quantize_activation_fake(x, bias_a, scale_a, eps, bits):
    n, c, h, w = x.shape
    return x.new_empty((n, h, w, c), dtype=torch.int8)


@torch.library.register_fake("q4conv::conv_packed")
def _conv_packed_fake(x, bias_a, scale_a, qweight, scale_w, bias, stride, padding, dilation, eps, bits, relu, backend,
                      kernel_weight=None, alpha=None):
    k, r, s, _ = qweight.shape
    return _conv_output_like(x, k, r, s, stride, padding, dilation)


@torch.library.register_fake("q4conv::conv_fused")
def _conv_fused_fake(x, bias_a, scale_a, qweight, alpha, shift, stride, padding, dilation, eps, bits, residual, relu,
                     out_bias_a, out_scale_a, out_eps, out_dtype, backend="auto", kernel_weight=None):
    k, r, s, _ = qweight.shape
    out_h, out_w = _out_hw(x.shape[2], x.shape[3], r, s, stride, padding, dilation)
    sizes = (x.shape[0], k, out_h, out_w)
    if out_scale_a is not None:  # the consumer's codes: int8, channels_last (csrc/conv_epilogue.cpp)
        return x.new_empty(sizes, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    torch._check(out_dtype is not None or x.dtype != torch.int8,
                 lambda: "out_dtype is required when x is int8 codes and the output is float")
    dtype = out_dtype if out_dtype is not None else x.dtype
    return x.new_empty(sizes, dtype=dtype).contiguous(memory_format=suggest_memory_format(x))


def _pool_pair(values, name: str):
    """A max_pool2d size argument (one int for both axes, or two) as (height, width)."""
    values = [values] if isinstance(values, int) else list(values)
    torch._check(len(values) in (1, 2), lambda: f"{name} must be one int or two ints, got {values}")
    return values[0], values[-1]


@torch.library.register_fake("q4conv::max_pool_codes")
def _max_pool_codes_fake(codes, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    torch._check(codes.dtype == torch.int8, lambda: f"codes must be int8 (activation codes), got {codes.dtype}")
    torch._check(codes.dim() == 4, lambda: f"codes must be 4-D (N, C, H, W), got {codes.dim()}-D")
    n, c, h, w = codes.shape
    torch._check(c > 0 and h > 0 and w > 0, lambda: f"codes must have C, H and W > 0, got {tuple(codes.shape)}")
    kernel = _pool_pair(kernel_size, "kernel_size")
    step = kernel if len(stride) == 0 else _pool_pair(stride, "stride")
    pad, dil = _pool_pair(padding, "padding"), _pool_pair(dilation, "dilation")
    torch._check(all(k >= 1 and s >= 1 and d >= 1 and 0 <= p <= k // 2
                     for k, s, p, d in zip(kernel, step, pad, dil)),
                 lambda: f"invalid max-pool arguments kernel_size {kernel}, stride {step}, padding {pad}, "
                         f"dilation {dil} (padding at most kernel_size // 2)")
    # The output size from max_pool2d's own shape function (its meta kernel,
    # symbolic sizes included), as csrc/pool_codes.cpp calls ATen's.
    pooled = torch.ops.aten.max_pool2d.default(codes.new_empty((n, c, h, w), dtype=torch.float32),
                                               list(kernel), list(step), list(pad), list(dil), ceil_mode)
    out_h, out_w = pooled.shape[2], pooled.shape[3]
    torch._check(out_h >= 1 and out_w >= 1, lambda: "the max-pool's output would be empty")
    # As csrc/pool_codes.cpp (and max_pool2d): allocated in codes' suggested memory format.
    return torch.empty((n, c, out_h, out_w), dtype=torch.int8, device=codes.device,
                       memory_format=suggest_memory_format(codes))


def kernel_weight_sizes(k: int, c: int, r: int, s: int, backend: str):
    """The layout rule of csrc/plan.cpp's kernel_weight_layout, mirrored for the
    fake kernel (tests/python/test_plan.py checks that both agree)."""
    if backend == "sm80_int4":
        return (k, r, s, (c + 31) // 32 * 16), torch.uint8
    if c < 16:  # sm90 im2col GEMM: one row of R*S*C codes per filter
        return (k, 1, 1, (r * s * c + 15) // 16 * 16), torch.int8
    return (k, r, s, (c + 15) // 16 * 16), torch.int8


@torch.library.register_fake("q4conv::kernel_weight")
def _kernel_weight_fake(qweight, in_channels, backend):
    k, r, s, _ = qweight.shape
    sizes, dtype = kernel_weight_sizes(k, in_channels, r, s, backend)
    return qweight.new_empty(sizes, dtype=dtype)


@torch.library.register_fake("q4conv::output_alpha")
def _output_alpha_fake(scale_a, scale_w, out_channels, eps):
    return scale_a.new_empty((out_channels,), dtype=torch.float32)


@torch.library.register_fake("q4conv::conv_train")
def _conv_train_fake(x, bias_a, scale_a, weight, scale_w, bias, stride, padding, dilation, eps, bits, backend):
    k, _, r, s = weight.shape
    return _conv_output_like(x, k, r, s, stride, padding, dilation)


@torch.library.register_fake("q4conv::conv_train_backward")
def _conv_train_backward_fake(grad_out, x, bias_a, scale_a, weight, scale_w, has_bias, stride, padding, dilation, eps, bits):
    dbias = grad_out.new_empty((weight.shape[0],) if has_bias else (0,), dtype=torch.float32)
    return (
        torch.empty_like(x, memory_format=suggest_memory_format(x)),
        torch.empty_like(weight, memory_format=suggest_memory_format(weight)),
        torch.empty_like(bias_a),
        torch.empty_like(scale_a),
        torch.empty_like(scale_w),
        dbias,
    )
