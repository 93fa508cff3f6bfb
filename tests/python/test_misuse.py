"""Property-based misuse test (issue 17): hypothesis draws layer arguments and
inputs -- empty batches, non-contiguous and channels_last inputs, NaN / +-Inf /
huge values, odd channel counts, fp32 / fp16 / bf16 -- and checks that q4conv
either raises a clear error (ValueError / RuntimeError naming the argument)
or returns the float64 oracle's value (SPEC section 3)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
import q4conv
from conftest import DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative error of the output: fp32 is exact up to the rounding of
# alpha * acc + bias; fp16 / bf16 outputs add one rounding to their precision.
Y_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Large finite values each dtype holds (and whose outputs stay finite).
HUGE = {torch.float32: 1e30, torch.float16: 3e4, torch.bfloat16: 1e30}

# Bad constructor arguments and the name the error must contain.
BAD_ARGUMENTS = [
    ("kernel_size", None), ("kernel_size", 3.0), ("kernel_size", True), ("kernel_size", 0),
    ("kernel_size", (3, 3, 3)), ("kernel_size", "3"), ("kernel_size", torch.tensor(2.0)),
    ("stride", 0), ("stride", (1, None)), ("stride", 1.5),
    ("padding", -1), ("padding", "full"), ("padding", 0.5),
    ("dilation", 0), ("dilation", False), ("dilation", 2**62),
    ("in_channels", 3.5), ("in_channels", 0), ("out_channels", None), ("out_channels", -2),
    ("a_bit", 8), ("w_bit", 2.0), ("groups", 2), ("padding_mode", "circular"), ("backend", "bogus"),
]


@st.composite
def layer_arguments(draw):
    args = dict(
        in_channels=draw(st.integers(1, 9)),
        out_channels=draw(st.integers(1, 7)),
        kernel_size=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        padding=(draw(st.integers(0, 2)), draw(st.integers(0, 2))),
        dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        bias=draw(st.booleans()),
        per_channel_weight_scale=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float16])),
    )
    if draw(st.booleans()):  # an integer-like argument of another type
        kind = draw(st.sampled_from(["numpy", "tensor", "list"]))
        k = args["kernel_size"][0]
        if kind == "numpy":
            import numpy as np
            args["kernel_size"] = np.int64(k)
        elif kind == "tensor":
            args["kernel_size"] = torch.tensor(k)
        else:
            args["kernel_size"] = [k, k]
    if draw(st.integers(0, 5)) == 0:
        args["padding"] = "same" if draw(st.booleans()) else "valid"
        if args["padding"] == "same" and draw(st.booleans()):
            args["stride"] = 1
    return args


def make_input(draw, layer_args, in_channels, device: str = "cpu"):
    n = draw(st.sampled_from([2, 1, 0]))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_channels, h, w, generator=gen) * draw(st.sampled_from([0.0, 0.1, 1.0, 5.0]))
    specials = draw(st.sets(st.sampled_from(["nan", "inf", "-inf", "huge"])))
    for i, special in enumerate(sorted(specials)):
        value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": HUGE[dtype]}[special]
        pick = torch.rand(x.shape, generator=gen) < 0.08
        x = x.masked_fill(pick, value * (-1 if i % 2 and special == "huge" else 1))
    x = x.to(dtype).to(device)
    layout = draw(st.sampled_from(["nchw", "channels_last", "sliced", "transposed"]))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # every other column of a wider tensor
        wide = torch.zeros(n, in_channels, h, 2 * w, dtype=dtype, device=device)
        wide[..., ::2] = x
        x = wide[..., ::2]
    elif layout == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


def expect_error(error: BaseException, *names: str) -> None:
    message = str(error)
    assert isinstance(error, (ValueError, RuntimeError, TypeError)), repr(error)
    assert any(name in message for name in names), f"{names} not named in: {message}"


def check_against_oracle(layer: q4conv.Q4Conv2dCutlass, x: torch.Tensor, y: torch.Tensor) -> None:
    conv = oracle.Conv(layer.stride, layer.padding, layer.dilation, float(layer.eps))
    ref, _ = oracle.forward(x, layer.bias_a, layer.scale_a, layer.weight, layer.scale_w, layer.bias, conv)
    assert y.dtype == x.dtype and y.shape == ref.shape
    y = y.cpu()
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    if ref.numel() == 0:
        return
    finfo = torch.finfo(x.dtype)
    in_range = ref.abs() < finfo.max / 2  # elsewhere the output dtype may overflow
    tol = Y_TOL[x.dtype]
    scale = ref.abs()[in_range].max().item() if in_range.any() else 1.0
    got = y.double()
    # atol: cancellation in alpha * acc + bias, and the output dtype's subnormal range.
    torch.testing.assert_close(got[in_range], ref[in_range], rtol=tol, atol=tol * 1e-2 * scale + finfo.tiny)
    out = ~in_range
    assert ((got[out].sign() == ref[out].sign()) & (got[out].abs() >= finfo.max / 4)).all()


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
@pytest.mark.parametrize("device", DEVICES)
def test_misuse_raises_clearly_or_matches_oracle(device, data):
    """On every device (CUDA: whichever backend the plan picks for each drawn shape)."""
    draw = data.draw
    args = draw(layer_arguments())
    args["device"] = device
    bad = draw(st.sampled_from(BAD_ARGUMENTS)) if draw(st.integers(0, 4)) == 0 else None
    if bad is not None:
        args[bad[0]] = bad[1]
    try:
        torch.manual_seed(draw(st.integers(0, 1000)))
        layer = q4conv.Q4Conv2dCutlass(**args)
    except ValueError as error:
        names = ["padding", "symmetric"] if args.get("padding") == "same" else []
        expect_error(error, *(names + ([bad[0]] if bad else [])))
        return
    assert bad is None, f"{bad} was accepted"
    with torch.no_grad():
        layer.bias_a.uniform_(-0.5, 0.5)
        if layer.bias is not None:
            layer.bias.uniform_(-1, 1)
    training = draw(st.booleans())
    layer.train(training)

    in_channels = layer.in_channels
    misuse = draw(st.sampled_from(["channels", "float64", "int", "rank3"])) if draw(st.integers(0, 7)) == 0 else None
    if misuse == "channels":
        in_channels += 1
    x = make_input(draw, args, in_channels, device)
    if misuse == "float64":
        x = x.double()
    elif misuse == "int":
        x = x.nan_to_num().clamp(-100, 100).to(torch.int32)
    elif misuse == "rank3":
        x = x.flatten(0, 1)
    padded = [x.shape[-2 + i] + 2 * layer.padding[i] for i in range(2)]
    extent = [layer.dilation[i] * (layer.kernel_size[i] - 1) + 1 for i in range(2)]
    fits = all(e <= p for e, p in zip(extent, padded))
    if training:
        x = x.detach().requires_grad_(x.is_floating_point())
    try:
        y = layer(x)
    except (ValueError, RuntimeError) as error:
        if misuse == "channels":
            expect_error(error, "in_channels")
        elif misuse in ("float64", "int"):
            expect_error(error, "float32")
        elif misuse == "rank3":
            expect_error(error, "4-D")
        else:
            assert not fits, f"unexpected error: {error!r}"
            expect_error(error, "larger than the padded input")
        return
    assert misuse is None and fits, f"{misuse} input was accepted (x {tuple(x.shape)}, fits={fits})"
    check_against_oracle(layer, x.detach(), y.detach())
    if training:
        y.backward(torch.ones_like(y))
        # Gradients are finite (fp16 parameters' gradients may overflow their range).
        for name, p in layer.named_parameters():
            assert p.grad is not None, name
            assert p.dtype != torch.float32 or torch.isfinite(p.grad).all(), name
        assert x.grad is not None and (x.dtype != torch.float32 or torch.isfinite(x.grad).all())
        if x.shape[0] == 0:
            assert layer.scale_a.grad.item() == 0


# ------------------------------------------------------------------ NaN scales, eps
@pytest.mark.parametrize("device", DEVICES)
def test_nan_scale_quantizes_everything_to_zero_as_the_oracle(device):
    """SPEC 3's s = max(scale, eps) keeps a NaN scale NaN (torch.clamp_min), so every code is
    NaN's code 0: activations, weights, and conv_fused's codes out (kernels and ATen alike)."""
    ops = torch.ops.q4conv
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 16, 6, 5, generator=gen) * 3).to(device).contiguous(memory_format=torch.channels_last)
    bias_a = torch.randn(16, generator=gen).to(device)
    weight = torch.randn(8, 16, 3, 3, generator=gen).to(device)
    nan = torch.tensor(float("nan"), device=device)
    codes = ops.quantize_activation(x, bias_a, nan, 1e-5, 4)
    assert torch.equal(codes.permute(0, 3, 1, 2).cpu().float(), oracle.activation_codes(x.cpu(), bias_a.cpu(), nan.cpu()))
    assert not codes.any()
    assert not ops.quantize_pack(weight, nan, 1e-5, 4).any()
    scale_w = torch.tensor(0.05, device=device)
    qweight = ops.quantize_pack(weight, scale_w, 1e-5, 4)
    alpha = ops.output_alpha(torch.tensor(0.3, device=device), scale_w, 8, 1e-5)
    conv = oracle.Conv(padding=(1, 1))
    for dtype in (torch.float32, torch.float16):
        out = ops.conv_fused(x.to(dtype), bias_a, torch.tensor(0.3, device=device), qweight, alpha, None,
                             [1, 1], [1, 1], [1, 1], 1e-5, 4, None, True, torch.zeros(8, device=device), nan,
                             1e-5, None)
        expected, *_ = oracle.fused_forward(x.to(dtype), bias_a, torch.tensor(0.3), weight, scale_w, alpha, None,
                                            conv, relu=True, out_bias_a=torch.zeros(8), out_scale_a=nan.cpu())
        assert out.dtype == torch.int8 and torch.equal(out.cpu(), expected) and not expected.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")], ids=str)
def test_eps_must_be_finite_and_positive_in_every_op(device, eps):
    ops = torch.ops.q4conv
    x = torch.randn(1, 4, 5, 5, device=device)
    bias_a, scale = torch.zeros(4, device=device), torch.tensor(0.3, device=device)
    weight = torch.randn(2, 4, 3, 3, device=device)
    qweight = ops.quantize_pack(weight, scale, 1e-5, 4)
    alpha = ops.output_alpha(scale, scale, 2, 1e-5)
    geometry = ([1, 1], [0, 0], [1, 1])
    calls = {
        "quantize_activation": lambda: ops.quantize_activation(x, bias_a, scale, eps, 4),
        "quantize_pack": lambda: ops.quantize_pack(weight, scale, eps, 4),
        "output_alpha": lambda: ops.output_alpha(scale, scale, 2, eps),
        "conv_packed": lambda: ops.conv_packed(x, bias_a, scale, qweight, scale, None, *geometry, eps, 4, False,
                                               "auto"),
        "conv_fused out_eps": lambda: ops.conv_fused(x, bias_a, scale, qweight, alpha, None, *geometry, 1e-5, 4,
                                                     None, False, torch.zeros(2, device=device), scale, eps, None),
    }
    for name, call in calls.items():
        argument = "out_eps" if "out_eps" in name else "eps"
        with pytest.raises(RuntimeError, match=rf"{argument} must be finite and > 0"):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_op_arguments_of_the_wrong_kind_name_themselves(device):
    """Zero channels, integer / complex quantizer parameters, empty or overflowing kernel sizes and
    a negative channel count: errors naming the argument (not an ATen view or narrow error)."""
    ops = torch.ops.q4conv
    x = torch.randn(1, 4, 5, 5, device=device)
    scale = torch.tensor(0.3, device=device)
    qweight = ops.quantize_pack(torch.randn(2, 4, 3, 3, device=device), scale, 1e-5, 4)
    geometry = ([1, 1], [0, 0], [1, 1], 1e-5, 4)
    cases = [
        (lambda: ops.conv_packed(torch.randn(1, 0, 5, 5, device=device), torch.zeros(0, device=device), scale,
                                 qweight[..., :0], scale, None, *geometry, False, "auto"), r"at least one channel"),
        (lambda: ops.conv_packed(x, torch.zeros(4, dtype=torch.int32, device=device), scale, qweight, scale,
                                 None, *geometry, False, "auto"), r"bias_a and scale_a must be floating point"),
        (lambda: ops.conv_packed(x, torch.zeros(4, device=device), scale, qweight, scale,
                                 torch.zeros(2, dtype=torch.complex64, device=device), *geometry, False, "auto"),
         r"bias must be floating point"),
        (lambda: ops.quantize_activation(x, torch.zeros(4, dtype=torch.bool, device=device), scale, 1e-5, 4),
         r"bias_a and scale_a must be floating point"),
        (lambda: ops.quantize_pack(torch.randn(2, 4, 3, 3, device=device), torch.tensor(1, device=device), 1e-5, 4),
         r"scale_w must be floating point"),
        (lambda: ops.kernel_weight_sizes(4, 3, [-3, 3], "sm90_int8"), r"kernel_size must be >= 1"),
        (lambda: ops.kernel_weight_sizes(4, 3, [0, 3], "sm80_int4"), r"kernel_size must be >= 1"),
        (lambda: ops.kernel_weight_sizes(4, 3, [2**62, 4], "sm90_int8"), r"overflows int64"),
        (lambda: ops.unpack(qweight, -1), r"in_channels must be >= 1"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
