"""Gradients of q4conv::conv_train against float64 autograd through the LSQ
formulation of SPEC section 3 (oracle.reference_training_forward)."""

from __future__ import annotations

import pytest
import torch

import oracle
from conftest import CASES, DEVICES, make_inputs

ops = torch.ops.q4conv


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu().reshape(-1), expected.double().cpu().reshape(-1)
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact fp32 on GPUs too, so tolerances mean the same on every device."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES[:8] + CASES[-3:], ids=str)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor_scale", "channel_scale"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradients_match_lsq_autograd(device, case, per_channel, channels_last):
    inputs = make_inputs(case, device, torch.float32, channels_last, bias=True, per_channel=per_channel,
                         seed=case.c)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    conv = oracle.Conv(case.stride, case.padding, case.dilation)
    y = ops.conv_train(*leaves, list(case.stride), list(case.padding), list(case.dilation), 1e-5, 4, "auto")
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(device)
    y.backward(grad_out)

    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in inputs]
    ref = oracle.reference_training_forward(*ref_leaves, conv)
    ref.backward(grad_out.double().cpu())
    torch.testing.assert_close(y.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-5)

    names = ["x", "bias_a", "scale_a", "weight", "scale_w", "bias"]
    for name, leaf, ref_leaf in zip(names, leaves, ref_leaves):
        assert leaf.grad is not None, name
        assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == leaf.dtype, name
        assert ref_leaf.grad.abs().sum() > 0, f"{name}: reference gradient is zero, test is void"
        assert rel_error(leaf.grad, ref_leaf.grad) < 1e-4, name
    assert leaves[0].grad.is_contiguous(memory_format=torch.channels_last) == (
        leaves[0].is_contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_masks_and_uninitialised_scale(device):
    """Clipped entries get no dx/dw; scale below eps gets no gradient."""
    case = CASES[0]
    x, bias_a, _, weight, scale_w, _ = make_inputs(case, device, bias=False)
    x = (x * 10).requires_grad_(True)  # many activations outside [Qn, Qp] * s
    scale_a = torch.tensor(0.0, device=device, requires_grad=True)
    scale_w = scale_w.clone().requires_grad_(True)
    y = ops.conv_train(x, bias_a, scale_a, weight, scale_w, None, list(case.stride), list(case.padding),
                       list(case.dilation), 1e-5, 4, "auto")
    y.sum().backward()
    assert scale_a.grad.item() == 0.0
    outside = ((x.detach() + bias_a.view(1, -1, 1, 1)) / 1e-5).abs() > 8
    assert outside.any()
    assert (x.grad[outside] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_gradients(device, dtype):
    case = CASES[1]
    inputs = list(make_inputs(case, device, dtype, bias=True))
    x = inputs[0].detach().requires_grad_(True)
    weight = inputs[3].detach().requires_grad_(True)
    y = ops.conv_train(x, inputs[1], inputs[2], weight, inputs[4], inputs[5], list(case.stride),
                       list(case.padding), list(case.dilation), 1e-5, 4, "auto")
    y.float().sum().backward()
    assert x.grad.dtype == dtype and weight.grad.dtype == torch.float32

    ref_x = inputs[0].detach().double().cpu().requires_grad_(True)
    ref_w = inputs[3].detach().double().cpu().requires_grad_(True)
    ref = oracle.reference_training_forward(ref_x, inputs[1].double().cpu(), inputs[2].double().cpu(), ref_w,
                                            inputs[4].double().cpu(), inputs[5].double().cpu(),
                                            oracle.Conv(case.stride, case.padding, case.dilation))
    ref.sum().backward()
    # On GPUs the backward convolutions run in the input's half precision.
    assert rel_error(x.grad, ref_x.grad) < 1e-2
    assert rel_error(weight.grad, ref_w.grad) < (1e-2 if device == "cuda" else 1e-4)
