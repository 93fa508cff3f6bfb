"""torch.library.opcheck on every q4conv operator (schema, fake kernels,
autograd registration, AOT dispatch with dynamic shapes)."""

from __future__ import annotations

import pytest
import torch

from conftest import CASES, DEVICES, make_inputs

ops = torch.ops.q4conv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck_all_ops(device, case, channels_last):
    x, bias_a, scale_a, weight, scale_w, bias = make_inputs(case, device, channels_last=channels_last)
    conv = (list(case.stride), list(case.padding), list(case.dilation), 1e-5, 4)
    qweight = ops.quantize_pack(weight, scale_w, 1e-5, 4)
    torch.library.opcheck(ops.quantize_pack, (weight, scale_w, 1e-5, 4))
    torch.library.opcheck(ops.unpack, (qweight, case.c))
    torch.library.opcheck(ops.quantize_activation, (x, bias_a, scale_a, 1e-5, 4))
    torch.library.opcheck(ops.conv_packed, (x, bias_a, scale_a, qweight, scale_w, bias, *conv, False, "auto"))
    alpha = ops.output_alpha(scale_a, scale_w, case.k, 1e-5)
    torch.library.opcheck(ops.output_alpha, (scale_a, scale_w, case.k, 1e-5))
    # conv_fused (deploy): float in with a residual, codes out; codes in, float out (test_codes.py has more).
    residual = torch.randn_like(ops.conv_packed(x, bias_a, scale_a, qweight, scale_w, bias, *conv, False, "auto"))
    torch.library.opcheck(ops.conv_fused, (x, bias_a, scale_a, qweight, alpha, bias, *conv, residual, True,
                                           bias_a.new_zeros(case.k), scale_a, 1e-5, None))
    codes = ops.quantize_activation(x, bias_a, scale_a, 1e-5, 4).permute(0, 3, 1, 2)
    torch.library.opcheck(ops.conv_fused, (codes, bias_a, scale_a, qweight, alpha, bias, *conv, None, False,
                                           None, None, 1e-5, torch.bfloat16))
    if device == "cuda":
        for backend in ("sm80_int4", "sm90_int8"):
            kernel_weight = ops.kernel_weight(qweight, case.c, backend)
            torch.library.opcheck(ops.kernel_weight, (qweight, case.c, backend))
            torch.library.opcheck(ops.conv_packed, (x, bias_a, scale_a, qweight, scale_w, bias, *conv, False,
                                                    "auto", kernel_weight, alpha))
    grads = [t.detach().clone().requires_grad_(True) for t in (x, bias_a, scale_a, weight, scale_w, bias)]
    torch.library.opcheck(ops.conv_train, (*grads, *conv, "auto"))
    grad_out = ops.conv_train(x, bias_a, scale_a, weight, scale_w, bias, *conv, "auto")
    torch.library.opcheck(ops.conv_train_backward,
                          (torch.randn_like(grad_out), x, bias_a, scale_a, weight, scale_w, True, *conv))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_output_alpha_is_differentiable_where_a_scale_requires_grad(device, per_channel):
    """Scales that require grad (a user's own call; the layers pass detached ones) get
    max(scale_a, eps) * max(scale_w, eps)'s gradient, not a missing one, and the same values."""
    scale_a = torch.tensor(0.3, device=device, requires_grad=True)
    scale_w = (torch.tensor([0.2, 1e-7, -0.5], device=device) if per_channel
               else torch.tensor(0.2, device=device)).requires_grad_(True)
    alpha = ops.output_alpha(scale_a, scale_w, 3, 1e-5)
    assert alpha.requires_grad and torch.equal(alpha.detach(),
                                               ops.output_alpha(scale_a.detach(), scale_w.detach(), 3, 1e-5))
    weights = torch.tensor([1.0, 2.0, 3.0], device=device)
    (alpha * weights).sum().backward()
    a_ref, w_ref = scale_a.detach().clone().requires_grad_(True), scale_w.detach().clone().requires_grad_(True)
    expected = (torch.clamp_min(a_ref, 1e-5) * torch.clamp_min(w_ref, 1e-5).reshape(-1)).expand(3)
    (expected * weights).sum().backward()
    torch.testing.assert_close(scale_a.grad, a_ref.grad)
    torch.testing.assert_close(scale_w.grad, w_ref.grad)
    assert scale_a.grad.item() != 0
    with torch.no_grad():
        assert not ops.output_alpha(scale_a, scale_w, 3, 1e-5).requires_grad
    torch.library.opcheck(ops.output_alpha, (scale_a, scale_w, 3, 1e-5))
