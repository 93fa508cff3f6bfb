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
