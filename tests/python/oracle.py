"""Float64 oracle written from SPEC section 3, independent of the C++ code.

Quantization happens in fp32 exactly as the spec states (fp32 add of the LSQ+
shift, IEEE fp32 division, round half to even, clamp, NaN -> 0); the
convolution of the integer codes is then done in float64, which is exact for
these magnitudes. Gradients come from autograd through the LSQ formulation
``round_ste(clamp(v / s, Qn, Qp)) * s`` in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def qrange(bits: int) -> Tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def codes(value32: torch.Tensor, scale32: torch.Tensor, bits: int) -> torch.Tensor:
    """clamp(rint(value / scale), Qn, Qp) in fp32; NaN -> 0, +-Inf -> ends."""
    assert value32.dtype == torch.float32 and scale32.dtype == torch.float32
    qn, qp = qrange(bits)
    ratio = value32 / scale32
    q = torch.round(torch.clamp(ratio, qn, qp))
    return torch.where(torch.isnan(ratio), torch.zeros_like(q), q)


def effective_scale(scale: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.clamp_min(scale.detach().float(), eps)


def activation_codes(x, bias_a, scale_a, eps=1e-5, bits=4) -> torch.Tensor:
    shifted = x.float() + bias_a.float().view(1, -1, 1, 1)
    return codes(shifted, effective_scale(scale_a, eps).reshape(1, 1, 1, 1), bits)


def weight_codes(weight, scale_w, eps=1e-5, bits=4) -> torch.Tensor:
    s = effective_scale(scale_w, eps).reshape(-1, 1, 1, 1)
    return codes(weight.float(), s, bits)


@dataclass
class Conv:
    stride: Sequence[int] = (1, 1)
    padding: Sequence[int] = (0, 0)
    dilation: Sequence[int] = (1, 1)
    eps: float = 1e-5
    bits: int = 4


def integer_conv(act_codes: torch.Tensor, w_codes: torch.Tensor, conv: Conv) -> torch.Tensor:
    """Exact sum of code products, in float64 on the CPU."""
    return F.conv2d(act_codes.double().cpu(), w_codes.double().cpu(), None,
                    tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))


def forward(x, bias_a, scale_a, weight, scale_w, bias: Optional[torch.Tensor], conv: Conv):
    """Returns (y float64, integer accumulator float64)."""
    acc = integer_conv(activation_codes(x, bias_a, scale_a, conv.eps, conv.bits),
                       weight_codes(weight, scale_w, conv.eps, conv.bits), conv)
    alpha = (effective_scale(scale_a, conv.eps).double().cpu().reshape(1)
             * effective_scale(scale_w, conv.eps).double().cpu().reshape(-1))
    y = acc * alpha.view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.detach().double().cpu().view(1, -1, 1, 1)
    return y, acc


def _grad_scale(t: torch.Tensor, g: float) -> torch.Tensor:
    return (t - t * g).detach() + t * g


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    return t + (torch.round(t) - t).detach()


def lsq(value: torch.Tensor, scale: torch.Tensor, numel_per_scale: int, eps: float, bits: int) -> torch.Tensor:
    qn, qp = qrange(bits)
    s = torch.clamp_min(_grad_scale(scale, 1.0 / math.sqrt(numel_per_scale * qp)), eps)
    return _round_ste(torch.clamp(value / s, qn, qp)) * s


def reference_training_forward(x, bias_a, scale_a, weight, scale_w, bias, conv: Conv):
    """Float64 LSQ/LSQ+ training forward; autograd gives the reference gradients."""
    shifted = x + bias_a.view(1, -1, 1, 1)
    xq = lsq(shifted, scale_a.reshape(1, 1, 1, 1), x.numel(), conv.eps, conv.bits)
    per_channel = scale_w.numel() > 1
    w_numel = weight[0].numel() if per_channel else weight.numel()
    wq = lsq(weight, scale_w.reshape(-1, 1, 1, 1), w_numel, conv.eps, conv.bits)
    return F.conv2d(xq, wq, bias, tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))


def fused_forward(x, bias_a, scale_a, weight, scale_w, alpha, shift, conv: Conv, residual=None, relu=False,
                  out_bias_a=None, out_scale_a=None, out_eps=1e-5, out_dtype=None):
    """SPEC section 8's deployed convolution (torch.ops.q4conv.conv_fused), from SPEC section 3.

    x: float activations (quantized with bias_a / scale_a) or int8 codes (used as they are).
    v = fp32(alpha * acc) + shift, + fp32(residual), ReLU (NaN stays NaN): each an IEEE fp32 op,
    acc the exact integer sum. Returns (out, v fp32, v_exact float64, magnitude float64) with out the
    consumer's codes (int8, from v) when out_scale_a is given, else v rounded to out_dtype (default
    x's dtype); magnitude = |alpha acc| + |shift| + |residual| (what the fp32 roundings scale with).
    """
    q_a = x.cpu().float() if x.dtype == torch.int8 else activation_codes(x.cpu(), bias_a.cpu(), scale_a.cpu(),
                                                                           conv.eps, conv.bits)
    acc = integer_conv(q_a, weight_codes(weight.cpu(), scale_w.cpu(), conv.eps, conv.bits), conv)
    assert acc.abs().max().item() < 2 ** 24 if acc.numel() else True  # exact in fp32
    k = acc.shape[1]
    alpha32 = alpha.detach().cpu().float().view(1, k, 1, 1)
    v = acc.float() * alpha32
    exact = acc * alpha32.double()
    magnitude = exact.abs()
    if shift is not None:
        v = v + shift.detach().cpu().float().view(1, k, 1, 1)
        exact = exact + shift.detach().cpu().double().view(1, k, 1, 1)
        magnitude = magnitude + shift.detach().cpu().double().abs().view(1, k, 1, 1)
    if residual is not None:
        v = v + residual.cpu().float()
        exact = exact + residual.cpu().double()
        magnitude = magnitude + residual.cpu().double().abs()
    if relu:
        v = torch.where(v < 0, torch.zeros_like(v), v)
        exact = torch.where(exact < 0, torch.zeros_like(exact), exact)
    if out_scale_a is not None:
        shifted = v + out_bias_a.detach().cpu().float().view(1, k, 1, 1)
        out = codes(shifted, effective_scale(out_scale_a.cpu(), out_eps).reshape(1, 1, 1, 1), conv.bits)
        return out.to(torch.int8), v, exact, magnitude
    dtype = out_dtype if out_dtype is not None else x.dtype
    return v.to(dtype), v, exact, magnitude
