"""Gradients of q4conv::conv_train against float64 autograd through the LSQ
formulation of SPEC section 3 (oracle.reference_training_forward)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import oracle
from conftest import CASES, DEVICES, Case, make_inputs, requires_cuda

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


# On top of the shared cases: odd channel counts, and shapes that make the
# CUDA backward use several blocks or chunks (channels_last: more than one
# channel tile or pixel chunk; NCHW: planes longer than a 1024-element chunk).
GRAD_CASES = CASES[:8] + CASES[-3:] + [
    Case(2, 5, 6, 10, 9, 3, 3, (2, 1), (1, 2)),            # C=5, non-square
    Case(2, 17, 8, 13, 11, 3, 1, (1, 2), (2, 0), (2, 1)),  # C=17, non-square kernel
    Case(1, 136, 8, 9, 10, 1, 1, (2, 1)),                  # 136 channels: two fp32 tiles
    Case(2, 3, 4, 40, 36, 3, 3, (2, 2), (1, 1)),           # 1440-element planes (vectors)
    Case(1, 2, 4, 37, 41, 3, 3, (1, 1), (0, 1)),           # 1517-element planes (scalar)
    # Strided 1x1 without padding: on CUDA (channels_last x) the backward runs
    # on x's stride grid; the last column / row is off the grid.
    Case(2, 64, 16, 11, 12, 1, 1, (2, 2)),
    Case(2, 24, 8, 8, 7, 1, 1, (3, 2)),
]
# Edge values, on a few cases: NaN, +-max and exact range ends and ties in
# x; scale_a below eps.
EDGE_CASES = [CASES[0], CASES[5], GRAD_CASES[12]]
VALUE_PARAMS = ([pytest.param(case, "plain", id=f"{case}-plain") for case in GRAD_CASES]
                + [pytest.param(case, values, id=f"{case}-{values}") for case in EDGE_CASES
                   for values in ("special", "scale_below_eps")])
# x layouts: dense NCHW, dense channels_last, dense but neither (W and H
# swapped in memory), channels_last one element past an aligned address.
LAYOUTS = ["nchw", "nhwc", "strided", "misaligned"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative errors: fp32 is exact up to summation order; half-precision GPU
# inputs run the backward convolutions and dx in their own precision.
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Gradients that are sums over many elements (d bias_a, d scale_a, d scale_w)
# can cancel, so for half inputs their error is bounded relative to the sum
# of the terms' magnitudes (each term carries one half-precision rounding).
REDUCED = ("bias_a", "scale_a", "scale_w")
Y_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EPS = 1e-5


def term_magnitudes(inputs, conv: oracle.Conv, grad_out: torch.Tensor):
    """Float64 sums of |per-element terms| of d bias_a, d scale_a and d scale_w
    (the LSQ graph with one bias / scale leaf per element)."""
    x, bias_a, scale_a, weight, scale_w, bias = [t.detach().double().cpu() for t in inputs]
    per_channel = scale_w.numel() > 1
    b = bias_a.view(1, -1, 1, 1).expand(x.shape).clone().requires_grad_(True)
    sa = scale_a.reshape(1, 1, 1, 1).expand(x.shape).clone().requires_grad_(True)
    sw = scale_w.reshape(-1, 1, 1, 1).expand(weight.shape).clone().requires_grad_(True)
    xq = oracle.lsq(x + b, sa, x.numel(), conv.eps, conv.bits)
    wq = oracle.lsq(weight, sw, weight[0].numel() if per_channel else weight.numel(), conv.eps, conv.bits)
    F.conv2d(xq, wq, bias, tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation)).backward(grad_out)
    return {"bias_a": b.grad.abs().sum((0, 2, 3)), "scale_a": sa.grad.abs().sum(),
            "scale_w": sw.grad.abs().sum((1, 2, 3)) if per_channel else sw.grad.abs().sum()}


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nhwc":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "misaligned":
        dense = x.contiguous(memory_format=torch.channels_last)
        storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        out = storage[1:].as_strided(x.shape, dense.stride())
        return out.copy_(dense)
    return x.contiguous()


def with_values(inputs, values: str):
    """Applies the edge values; returns the inputs and where x is NaN."""
    x, bias_a, scale_a, weight, scale_w, bias = inputs
    if values == "special":
        gen = torch.Generator().manual_seed(7)
        pick = torch.rand(x.shape, generator=gen)
        big = torch.finfo(x.dtype).max  # fp32: (x + bias_a) / s overflows to Inf
        x = x.masked_fill(pick < 0.05, float("nan"))
        x = x.masked_fill((pick >= 0.05) & (pick < 0.1), big).masked_fill((pick >= 0.1) & (pick < 0.15), -big)
        # Exact ratios in the even channels (bias_a 0 there, s = 0.25): the
        # range ends Qn and Qp (dx passes), half a step beyond them, and ties.
        scale_a = torch.tensor(0.25)
        bias_a = bias_a.clone()
        bias_a[::2] = 0.0
        ratios = torch.tensor([-8.0, 7.0, -8.5, 7.5, 0.5, -0.5, 1.5, 2.5, -5.5, 6.5])
        chosen = ratios[torch.randint(len(ratios), x.shape, generator=gen)] * 0.25
        even = (torch.arange(x.shape[1]) % 2 == 0).view(1, -1, 1, 1)
        x = torch.where((pick >= 0.15) & (pick < 0.4) & even, chosen.to(x.dtype), x)
    elif values == "scale_below_eps":
        # max(scale_a, eps) = eps; x and bias_a shrunk so the codes still span the range.
        shrink = EPS / scale_a.item()
        x, bias_a, scale_a = x * shrink, bias_a * shrink, torch.tensor(EPS / 10)
    return (x, bias_a, scale_a, weight, scale_w, bias), torch.isnan(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,values", VALUE_PARAMS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor_scale", "channel_scale"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_match_lsq_autograd(device, case, values, per_channel, layout, dtype):
    inputs = make_inputs(case, "cpu", dtype, bias=True, per_channel=per_channel, seed=case.c)
    inputs, nan = with_values(inputs, values)
    x_leaf = with_layout(inputs[0].to(device), layout).detach().requires_grad_(True)
    leaves = [x_leaf] + [t.to(device).detach().clone().requires_grad_(True) for t in inputs[1:]]
    y = ops.conv_train(*leaves, list(case.stride), list(case.padding), list(case.dilation), EPS, 4, "auto")
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(device, y.dtype)
    y.backward(grad_out)

    # NaN activations quantize to 0 and are clipped, which autograd through the
    # LSQ formula cannot express: the oracle sees x + bias_a = 0 (code 0, no
    # residual) there, and those entries' dx is then removed from dx and d bias_a.
    bias_a64 = inputs[1].double().view(1, -1, 1, 1)
    x_ref = torch.where(nan, -bias_a64, inputs[0].double()).requires_grad_(True)
    ref_leaves = [x_ref] + [t.detach().double().requires_grad_(True) for t in inputs[1:]]
    conv = oracle.Conv(case.stride, case.padding, case.dilation, EPS)
    ref = oracle.reference_training_forward(*ref_leaves, conv)
    ref.backward(grad_out.double().cpu())
    half = dtype != torch.float32
    magnitudes = term_magnitudes([x_ref] + list(inputs[1:]), conv, grad_out.double().cpu()) if half else {}
    expected = [leaf.grad for leaf in ref_leaves]
    expected[0] = x_ref.grad.masked_fill(nan, 0.0)
    expected[1] = expected[1] - (x_ref.grad * nan).sum((0, 2, 3))
    tol = Y_TOL[dtype]
    torch.testing.assert_close(y.double().cpu(), ref.detach(), rtol=tol, atol=tol)

    names = ["x", "bias_a", "scale_a", "weight", "scale_w", "bias"]
    for name, leaf, want in zip(names, leaves, expected):
        assert leaf.grad is not None, name
        assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == leaf.dtype, name
        if name == "scale_a" and values == "scale_below_eps":  # eps was used, not scale_a
            assert (want == 0).all() and (leaf.grad == 0).all(), name
            continue
        assert want.abs().sum() > 0, f"{name}: reference gradient is zero, test is void"
        if half and name in REDUCED:
            error = (leaf.grad.double().cpu().reshape(want.shape) - want).abs()
            assert (error <= GRAD_TOL[dtype] * magnitudes[name].reshape(want.shape)).all(), name
        else:
            assert rel_error(leaf.grad, want) < GRAD_TOL[dtype], name
    if nan.any():
        assert (x_leaf.grad.cpu()[nan] == 0).all()
    assert x_leaf.grad.is_contiguous(memory_format=torch.channels_last) == (
        x_leaf.is_contiguous(memory_format=torch.channels_last))


def deterministic_gradients(case: Case, xs, params):
    """The gradients of every leaf of conv_train for each x of `xs` (same
    parameters, same grad_out), with cuDNN's deterministic algorithms."""
    grad_out = None
    results = []
    for x in xs:
        leaves = [x.detach().requires_grad_(True)] + [t.detach().clone().requires_grad_(True) for t in params]
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
            y = ops.conv_train(*leaves, list(case.stride), list(case.padding), list(case.dilation), EPS, 4, "auto")
            if grad_out is None:
                grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to("cuda", y.dtype)
            y.backward(grad_out)
        results.append([leaf.grad for leaf in leaves])
    return results


@requires_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor_scale", "channel_scale"])
def test_cuda_gradients_are_deterministic(layout, per_channel):
    """The fused backward sums fixed partials (no atomics): bitwise repeatable
    (with cuDNN's deterministic algorithms for the backward convolutions)."""
    case = Case(4, 48, 32, 40, 36, 3, 3, (1, 1), (1, 1))
    inputs = make_inputs(case, "cuda", torch.float16, per_channel=per_channel, seed=5)
    x = with_layout(inputs[0], layout)
    for first, second in zip(*deterministic_gradients(case, [x, x], inputs[1:])):
        assert torch.equal(first, second)


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
def test_gradients_with_create_graph_match(device):
    """The backward runs the gradient op below the autograd keys only with
    grad mode off: with create_graph=True (grad mode on) it takes the other
    branch, and the first-order gradients must be the same."""
    case = GRAD_CASES[12]
    inputs = make_inputs(case, device, torch.float32, bias=True, seed=11)
    results = []
    for create_graph in (False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        y = ops.conv_train(*leaves, list(case.stride), list(case.padding), list(case.dilation), EPS, 4, "auto")
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(device)
        results.append(torch.autograd.grad(y, leaves, grad_out, create_graph=create_graph))
    for plain, with_graph in zip(*results):
        assert plain.dtype == with_graph.dtype and plain.shape == with_graph.shape
        assert torch.equal(plain, with_graph)


@requires_cuda
@pytest.mark.parametrize("case", [CASES[1], CASES[6], GRAD_CASES[12], GRAD_CASES[-2], GRAD_CASES[-1]], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_pixel_strided_x_matches_dense(case, dtype):
    """x with adjacent channels but pixels at larger strides (every other pixel
    of a channels_last tensor) takes the LSQ kernels' pixel-strided paths (and
    strided 1x1 layers take them on any channels_last x): every gradient must
    equal, bit for bit, that of the same values stored densely, whose kernels
    split the work the same way."""
    inputs = make_inputs(case, "cuda", dtype, per_channel=False, seed=2)
    dense = inputs[0].contiguous(memory_format=torch.channels_last)
    big = torch.zeros(case.n, case.c, 2 * case.h, 2 * case.w, device="cuda", dtype=dtype)
    view = big.contiguous(memory_format=torch.channels_last)[:, :, ::2, ::2]
    view.copy_(dense)
    assert view.stride(1) == 1 and not view.is_contiguous(memory_format=torch.channels_last)
    grads = deterministic_gradients(case, [dense, view], inputs[1:])
    names = ["x", "bias_a", "scale_a", "weight", "scale_w", "bias"]
    for name, from_dense, from_view in zip(names, *grads):
        assert from_dense.abs().sum() > 0, f"{name}: zero gradient, test is void"
        assert torch.equal(from_dense, from_view), name


@requires_cuda
def test_cuda_fp16_backward_range_does_not_depend_on_the_scales():
    """The backward convolutions run on codes in a power-of-two unit near each scale, so their
    float16 outputs are near the true gradients: a loss-scaled gradient whose true dx fits float16
    must not overflow because s_w is small. (With bare integer codes the dgrad output was dx / s_w:
    here 7 * 144 * 2000 ~ 2e6, inf in float16, for a true dx of ~29.)"""
    import q4conv

    layer = q4conv.Q4Conv2dCutlass(16, 16, 3, padding=1, device="cuda")
    x = torch.randn(8, 16, 12, 12, generator=torch.Generator().manual_seed(0)).cuda().half().float()
    with torch.no_grad():
        layer.weight.fill_(1e-4)
        layer.scale_w.fill_(1e-4 / 7)  # every weight code 7
    layer(x)  # scale_a from x
    grads = []
    for dtype in (torch.float32, torch.float16):
        xd = x.detach().to(dtype).requires_grad_()  # a leaf of each dtype (x itself never requires grad)
        y = layer(xd)
        y.backward(torch.full_like(y, 2000.0))
        grads.append(xd.grad.float())
    fp32, fp16 = grads
    assert fp32.abs().max() > 10 and fp32.abs().max() < 1e3  # a true dx float16 holds
    assert torch.isfinite(fp16).all()
    torch.testing.assert_close(fp16, fp32, rtol=4e-3, atol=1e-2)


def backward_peak_bytes(output: torch.Tensor, grad: torch.Tensor) -> int:
    """Bytes allocated at the peak of output.backward(grad) beyond those allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    output.backward(grad)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@requires_cuda
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_cuda_backward_holds_one_activation_sized_buffer(layout):
    """The backward runs the weight gradient on the activation codes first, frees them, then the
    data gradient, over which the LSQ kernel writes dx in place: one x-sized buffer at a time
    besides the returned dx's, as an fp16 Conv2d's backward (its data gradient). Holding two (the
    codes and the data gradient, or the data gradient and a separate dx) adds x's bytes to the
    peak, which is what sets a training step's peak memory at the first backward layers."""
    case = Case(8, 64, 64, 56, 56, 3, 3, (1, 1), (1, 1))
    inputs = make_inputs(case, "cuda", torch.float16, per_channel=True, seed=1)
    x = with_layout(inputs[0], layout)
    leaves = [x.detach().requires_grad_(True)] + [t.detach().clone().requires_grad_(True) for t in inputs[1:]]
    y = ops.conv_train(*leaves, list(case.stride), list(case.padding), list(case.dilation), EPS, 4, "auto")
    q4_peak = backward_peak_bytes(y, torch.randn_like(y))
    assert leaves[0].grad is not None and leaves[0].grad.stride() == x.stride()

    xf = x.detach().requires_grad_(True)
    wf = inputs[3].detach().half().requires_grad_(True)
    yf = F.conv2d(xf, wf, padding=case.padding)
    fp16_peak = backward_peak_bytes(yf, torch.randn_like(yf))
    # Slack for the weight-sized buffers (codes, fp32 gradients), the partial sums and cuDNN's
    # workspaces (measured on an H100: 1.3 MB over F.conv2d's 5.0 MB channels_last, 0.1 over 11.2
    # NCHW): half of the one more x-sized buffer (3.1 MB) that holding two would add.
    assert q4_peak <= fp16_peak + x.numel() * x.element_size() // 2, (q4_peak, fp16_peak)
