"""Activations as 4-bit codes between layers, the residual add fused (SPEC section 8, issue 18 stage 2).

The op ``torch.ops.q4conv.conv_fused`` against the float64 oracle written from
SPEC section 3 (``oracle.fused_forward``): codes bit-equal; a float output
bit-equal to the oracle's fp32 value rounded to the output dtype, hence
within one rounding of that dtype (plus the fp32 epilogue's few ulps) of the
exact value. Then ``q4conv.deploy`` with codes: which edges carry codes,
residual forms, max-pool on codes, fallbacks, and whole ResNets against the
unfused eval model and the stage-1 deployed model (``codes=False,
residual=False``), under torch.export and torch.compile.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch._prims_common import suggest_memory_format

import oracle
import q4conv
from conftest import DEVICES, FIXED_CASES, Case, requires_cuda
from q4conv import FusedQ4Conv2d
from q4conv.models import randomize_batchnorm_, resnet18, resnet50

ops = torch.ops.q4conv
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QN, QP = oracle.qrange(4)


# ------------------------------------------------------------------ op inputs
def op_inputs(case: Case, device: str, dtype=torch.float32, channels_last=False, codes_in=False, seed=0):
    """x (float or codes), the layer's quantizer and weights, a folded epilogue, the consumer's quantizer."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.n, case.c, case.h, case.w, generator=gen) * 1.5
    bias_a = torch.randn(case.c, generator=gen) * 0.2
    scale_a = torch.tensor(0.31)
    weight = torch.randn(case.k, case.c, case.r, case.s, generator=gen) * 0.1
    scale_w = torch.rand(case.k, generator=gen) * 0.02 + 0.02
    # alpha as deploy folds it: s_a * s_w times a BatchNorm scale of either sign.
    alpha = (0.31 * scale_w * (torch.randn(case.k, generator=gen) + 0.3)).float()
    shift = torch.randn(case.k, generator=gen)
    out_bias_a = torch.randn(case.k, generator=gen) * 0.2
    out_scale_a = torch.tensor(0.23)
    if codes_in:
        x = torch.randint(QN, QP + 1, x.shape, generator=gen, dtype=torch.int8)
    else:
        x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    qweight = ops.quantize_pack(weight, scale_w, 1e-5, 4)
    move = lambda t: t.to(device)  # noqa: E731
    return dict(x=move(x), bias_a=move(bias_a), scale_a=move(scale_a), weight=weight, scale_w=scale_w,
                qweight=move(qweight), alpha=move(alpha), shift=move(shift), out_bias_a=move(out_bias_a),
                out_scale_a=move(out_scale_a))


def run_op(t, case: Case, residual=None, relu=False, codes_out=False, out_dtype=None, eps=1e-5, out_eps=1e-5,
           backend="auto"):
    return ops.conv_fused(t["x"], t["bias_a"], t["scale_a"], t["qweight"], t["alpha"], t["shift"],
                          list(case.stride), list(case.padding), list(case.dilation), eps, 4, residual, relu,
                          t["out_bias_a"] if codes_out else None, t["out_scale_a"] if codes_out else None,
                          out_eps, out_dtype, backend)


def run_oracle(t, case: Case, residual=None, relu=False, codes_out=False, out_dtype=None, eps=1e-5, out_eps=1e-5):
    conv = oracle.Conv(case.stride, case.padding, case.dilation, eps)
    return oracle.fused_forward(t["x"], t["bias_a"], t["scale_a"], t["weight"], t["scale_w"], t["alpha"], t["shift"],
                                conv, residual, relu, t["out_bias_a"] if codes_out else None,
                                t["out_scale_a"] if codes_out else None, out_eps, out_dtype)


def output_shape(case: Case):
    p = (case.h + 2 * case.padding[0] - case.dilation[0] * (case.r - 1) - 1) // case.stride[0] + 1
    q = (case.w + 2 * case.padding[1] - case.dilation[1] * (case.s - 1) - 1) // case.stride[1] + 1
    return (case.n, case.k, p, q)


def check_against_oracle(out, expected, v32, exact, magnitude, codes_out, dtype):
    """Codes bit-equal; a float output bit-equal to fp32 v rounded to its dtype, and within one
    rounding of that dtype plus the fp32 epilogue's three roundings of the exact value."""
    assert out.device.type in ("cpu", "cuda")
    out = out.cpu()
    if codes_out:
        assert out.dtype == torch.int8 and out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, expected), f"{(out != expected).sum().item()} codes differ"
        return
    assert out.dtype == dtype
    assert torch.equal(out.float(), expected.float()) or torch.equal(out, expected), \
        f"max diff {(out.double() - expected.double()).abs().max().item():.3g}"
    finite = torch.isfinite(exact)
    unit = torch.finfo(dtype).eps / 2
    bound = (unit * exact.abs() + 3 * 2.0 ** -24 * (1 + unit) * magnitude
             + torch.finfo(dtype).tiny * torch.finfo(dtype).eps)
    assert ((out.double() - exact).abs()[finite] <= bound[finite]).all()


OP_CASES = [FIXED_CASES[0], FIXED_CASES[1], FIXED_CASES[2], FIXED_CASES[7],
            Case(2, 33, 7, 6, 5, 1, 1, (2, 1))]  # odd channels everywhere, 1x1 with stride


# ------------------------------------------------------------------ op: oracle
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", OP_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("codes_in", [False, True], ids=["float_in", "codes_in"])
def test_op_matches_oracle(device, case, dtype, channels_last, codes_in):
    t = op_inputs(case, device, dtype, channels_last, codes_in)
    gen = torch.Generator().manual_seed(7)
    residuals = {"none": None,
                 "same": (torch.randn(output_shape(case), generator=gen) * 2).to(dtype),
                 "fp32_nhwc": (torch.randn(output_shape(case), generator=gen) * 2).contiguous(
                     memory_format=torch.channels_last)}
    for name, residual in residuals.items():
        residual = None if residual is None else residual.to(device)
        for relu in (False, True):
            for codes_out in (False, True):
                out_dtype = dtype if codes_in and not codes_out else None
                out = run_op(t, case, residual, relu, codes_out, out_dtype)
                check_against_oracle(out, *run_oracle(t, case, residual, relu, codes_out, out_dtype), codes_out, dtype)
                assert out.device == t["x"].device and tuple(out.shape) == output_shape(case)
                if not codes_out:  # conv_packed's memory-format rule: x's
                    assert out.is_contiguous(memory_format=suggest_memory_format(t["x"]))
    # Codes used as they are: codes in equal float in quantized by the op itself.
    if not codes_in:
        codes = ops.quantize_activation(t["x"], t["bias_a"], t["scale_a"], 1e-5, 4).permute(0, 3, 1, 2)
        as_codes = dict(t, x=codes)
        for codes_out in (False, True):
            assert torch.equal(run_op(as_codes, case, codes_out=codes_out, out_dtype=None if codes_out else dtype),
                               run_op(t, case, codes_out=codes_out))


@pytest.mark.parametrize("device", DEVICES)
def test_float_output_equals_conv_packed(device):
    """Float in, float out, no residual: the stage-1 op's result (same fp32 epilogue) on the fallback."""
    case = FIXED_CASES[6]
    t = op_inputs(case, device)
    for relu in (False, True):
        ref = ops.conv_packed(t["x"], t["bias_a"], t["scale_a"], t["qweight"], t["scale_w"].to(device), t["shift"],
                              list(case.stride), list(case.padding), list(case.dilation), 1e-5, 4, relu, "fallback",
                              None, t["alpha"])
        assert torch.equal(run_op(t, case, relu=relu), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("codes_in", [False, True], ids=["float_in", "codes_in"])
def test_empty_batch(device, codes_in):
    case = Case(0, 5, 3, 6, 6, 3, 3, padding=(1, 1))
    t = op_inputs(case, device, channels_last=True, codes_in=codes_in)
    codes = run_op(t, case, codes_out=True)
    assert codes.shape == (0, 3, 6, 6) and codes.dtype == torch.int8
    assert codes.is_contiguous(memory_format=torch.channels_last)
    out = run_op(t, case, residual=torch.empty(0, 3, 6, 6, device=device), relu=True,
                 out_dtype=torch.float16 if codes_in else None)
    assert out.shape == (0, 3, 6, 6) and out.dtype == (torch.float16 if codes_in else torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_into_codes(device):
    """SPEC 3's rules on v: NaN -> 0, +Inf -> Qp, -Inf -> Qn; ReLU keeps NaN (-> 0) and maps -Inf to 0;
    a float output carries NaN / Inf; NaN in x quantizes to code 0 first."""
    case = Case(1, 4, 3, 5, 5, 1, 1)
    t = op_inputs(case, device)
    t["out_bias_a"] = torch.zeros_like(t["out_bias_a"])
    residual = torch.zeros(output_shape(case))
    residual[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    residual = residual.to(device)
    t["x"][0, :, 4, 4] = float("nan")
    for relu in (False, True):
        expected = run_oracle(t, case, residual, relu, codes_out=True)[0]
        out = run_op(t, case, residual, relu, codes_out=True).cpu()
        assert torch.equal(out, expected)
        want = [0, QP, 0 if relu else QN]
        assert out[0, 0, 0, :3].tolist() == want
        floats = run_op(t, case, residual, relu).cpu()
        assert torch.isnan(floats[0, 0, 0, 0]) and floats[0, 0, 0, 1] == float("inf")
        assert floats[0, 0, 0, 2] == (0 if relu else -float("inf"))
    # x NaN quantizes to 0: the same output as x = -bias_a there.
    clean = dict(t, x=t["x"].clone())
    clean["x"][0, :, 4, 4] = -t["bias_a"]
    assert torch.equal(run_op(t, case, codes_out=True), run_op(clean, case, codes_out=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_one_channel_strided_geometry(device, channels_last):
    """One input channel, a 1x2 kernel at stride (1, 2) over 3 columns: ATen's CPU convolution
    (oneDNN) returned garbage in the second output row when the exact path handed it one-channel
    operands with channels_last strides (found by test_op_property; the path now gives them
    NCHW strides)."""
    for k in (1, 4):
        case = Case(2, 1, k, 2, 3, 1, 2, (1, 2))
        t = op_inputs(case, device, torch.float32, channels_last, False, 0)
        for codes_out in (False, True):
            out = run_op(t, case, None, False, codes_out, None, out_eps=1e-3)
            expected = run_oracle(t, case, None, False, codes_out, None, out_eps=1e-3)
            check_against_oracle(out.cpu(), *expected, codes_out, torch.float32)


@st.composite
def geometry(draw):
    r, s = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    return dict(case=Case(draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.integers(1, 24)),
                          draw(st.integers(dil[0] * (r - 1) + 1, 12)), draw(st.integers(dil[1] * (s - 1) + 1, 12)),
                          r, s, (draw(st.integers(1, 3)), draw(st.integers(1, 2))),
                          (draw(st.integers(0, 2)), draw(st.integers(0, 2))), dil),
                dtype=draw(st.sampled_from(DTYPES)), channels_last=draw(st.booleans()), codes_in=draw(st.booleans()),
                residual=draw(st.booleans()), relu=draw(st.booleans()), codes_out=draw(st.booleans()),
                out_scale=draw(st.sampled_from([0.0, 1e-7, 0.05, 0.23, 3.0])), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=geometry())
def test_op_property(g):
    case = g["case"]
    t = op_inputs(case, "cpu", g["dtype"], g["channels_last"], g["codes_in"], g["seed"])
    t["out_scale_a"] = torch.tensor(g["out_scale"])  # 0 and 1e-7: the effective scale is out_eps
    residual = (torch.randn(output_shape(case), generator=torch.Generator().manual_seed(g["seed"])) * 3
                ).to(g["dtype"]) if g["residual"] else None
    out_dtype = g["dtype"] if g["codes_in"] and not g["codes_out"] else None
    out = run_op(t, case, residual, g["relu"], g["codes_out"], out_dtype, out_eps=1e-3)
    expected = run_oracle(t, case, residual, g["relu"], g["codes_out"], out_dtype, out_eps=1e-3)
    check_against_oracle(out, *expected, g["codes_out"], g["dtype"])


# ------------------------------------------------------------------ op: errors, opcheck, autograd
def test_op_errors_name_the_argument():
    case = FIXED_CASES[0]
    t = op_inputs(case, "cpu")
    codes = dict(op_inputs(case, "cpu", codes_in=True))
    with pytest.raises(RuntimeError, match="out_dtype is required when x is int8 codes"):
        run_op(codes, case)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16 .* or int8"):
        run_op(dict(t, x=t["x"].double()), case)
    with pytest.raises(RuntimeError, match=r"residual must have the output's shape \[2, 5, 9, 7\]"):
        run_op(t, case, residual=torch.zeros(2, 5, 1, 1))
    with pytest.raises(RuntimeError, match="residual must be float32, float16 or bfloat16"):
        run_op(t, case, residual=torch.zeros(output_shape(case), dtype=torch.float64))
    with pytest.raises(RuntimeError, match="out_bias_a and out_scale_a must be given together"):
        ops.conv_fused(t["x"], t["bias_a"], t["scale_a"], t["qweight"], t["alpha"], None, [1, 1], [1, 1], [1, 1],
                       1e-5, 4, None, False, t["out_bias_a"], None, 1e-5, None)
    with pytest.raises(RuntimeError, match=r"out_bias_a must be a floating-point tensor \[5\]"):
        run_op(dict(t, out_bias_a=torch.zeros(4)), case, codes_out=True)
    with pytest.raises(RuntimeError, match="out_dtype must be None or torch.int8 with codes out"):
        run_op(t, case, codes_out=True, out_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="out_dtype must be float32, float16 or bfloat16"):
        run_op(t, case, out_dtype=torch.int32)
    with pytest.raises(RuntimeError, match="out_eps must be finite and > 0"):
        run_op(t, case, codes_out=True, out_eps=0.0)
    with pytest.raises(RuntimeError, match=r"alpha must be a contiguous float32 tensor \[5\]"):
        run_op(dict(t, alpha=t["alpha"].double()), case)
    with pytest.raises(RuntimeError, match=r"bias_a must have shape \[3\]"):
        run_op(dict(codes, bias_a=torch.zeros(4)), case, out_dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"shift must be a float32, float16 or bfloat16 tensor \[5\]"):
        run_op(dict(t, shift=torch.zeros(3)), case)
    with pytest.raises(RuntimeError, match="conv_fused is inference only .* x requires grad"):
        run_op(dict(t, x=t["x"].clone().requires_grad_(True)), case)
    with torch.no_grad():  # no grad mode: fine, and the output does not require grad
        assert not run_op(dict(t, x=t["x"].clone().requires_grad_(True)), case).requires_grad


def test_op_backend_argument_on_cpu():
    """backend (trailing, defaulted): "auto" and "fallback" run the exact
    arithmetic on the CPU, a forced kernel backend is an error naming it (as conv_packed's), an
    unknown name too; int8 codes plan as conv_fused's codes input (the fallback on the CPU)."""
    case = FIXED_CASES[0]
    t = op_inputs(case, "cpu")
    codes = op_inputs(case, "cpu", codes_in=True, channels_last=True)
    for inputs, out_dtype in ((t, None), (codes, torch.float32)):
        for codes_out in (False, True):
            dtype = None if codes_out else out_dtype
            ref = run_op(inputs, case, relu=True, codes_out=codes_out, out_dtype=dtype)
            assert torch.equal(run_op(inputs, case, relu=True, codes_out=codes_out, out_dtype=dtype,
                                      backend="fallback"), ref)
    for backend in ("sm90_int8", "sm80_int4"):
        with pytest.raises(RuntimeError, match=f"backend '{backend}' needs a CUDA input"):
            run_op(t, case, codes_out=True, backend=backend)
    with pytest.raises(RuntimeError, match="backend must be one of 'auto', 'fallback'"):
        run_op(t, case, backend="cudnn")
    assert ops.selected_backend(codes["x"], case.k, [case.r, case.s], list(case.stride), list(case.padding),
                                list(case.dilation), "auto") == "fallback"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck(device, channels_last):
    case = FIXED_CASES[0]
    conv = (list(case.stride), list(case.padding), list(case.dilation), 1e-5, 4)
    for codes_in in (False, True):
        t = op_inputs(case, device, channels_last=channels_last, codes_in=codes_in)
        residual = torch.randn(output_shape(case), device=device)
        for res, codes_out in ((None, False), (residual, False), (residual, True), (None, True)):
            out = (t["out_bias_a"], t["out_scale_a"]) if codes_out else (None, None)
            out_dtype = torch.float16 if codes_in and not codes_out else None
            torch.library.opcheck(ops.conv_fused, (t["x"], t["bias_a"], t["scale_a"], t["qweight"], t["alpha"],
                                                   t["shift"], *conv, res, True, *out, 1e-3, out_dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_float_output_takes_autocast_dtype(device):
    case = FIXED_CASES[0]
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    t = op_inputs(case, device)
    codes = op_inputs(case, device, codes_in=True)
    with torch.autocast(device, dtype=dtype):
        assert run_op(t, case).dtype == dtype
        assert run_op(codes, case, out_dtype=torch.float32).dtype == dtype
        assert run_op(t, case, codes_out=True).dtype == torch.int8
    # The cast is x's: the same result as running on x.to(dtype).
    with torch.autocast(device, dtype=dtype):
        inside = run_op(t, case, codes_out=True)
    assert torch.equal(inside, run_op(dict(t, x=t["x"].to(dtype)), case, codes_out=True))


# ------------------------------------------------------------------ deploy helpers
def calibrated(model: nn.Module, shape, batches: int = 2, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    q4conv.calibrate(model, [torch.randn(*shape, generator=gen) for _ in range(batches)])
    return model.eval()


def converted_resnet(builder, seed: int = 0) -> nn.Module:
    """q4conv.convert of a random torchvision-architecture ResNet (width 8, 10 classes) with
    randomised BatchNorm, calibrated on a few random 32x32 batches."""
    torch.manual_seed(seed)
    model = builder(num_classes=10, width=8)
    randomize_batchnorm_(model, torch.Generator().manual_seed(seed))
    return calibrated(q4conv.convert(model), (16, 3, 32, 32), seed=seed)


def fused_layers(gm: nn.Module):
    return {name: m for name, m in gm.named_modules() if isinstance(m, FusedQ4Conv2d)}


def codes_edges(gm: nn.Module):
    """(producers writing codes, consumers reading codes) of a deployed model."""
    fused = fused_layers(gm)
    return sorted(n for n, m in fused.items() if m.codes_out), sorted(n for n, m in fused.items() if m.codes_in)


class Chain(nn.Module):
    """conv -> BN -> ReLU -> [pool] -> (conv_a, conv_b) reading one tensor, each -> BN, then added."""

    def __init__(self, pool=None, c=6, k=10):
        super().__init__()
        self.conv, self.bn = q4conv.Q4Conv2dCutlass(c, k, 3, padding=1, bias=True), nn.BatchNorm2d(k)
        self.pool = pool
        self.conv_a, self.bn_a = q4conv.Q4Conv2dCutlass(k, k, 3, padding=1), nn.BatchNorm2d(k)
        self.conv_b, self.bn_b = q4conv.Q4Conv2dCutlass(k, k, 1), nn.BatchNorm2d(k)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        if self.pool is not None:
            y = self.pool(y)
        return F.relu(self.bn_a(self.conv_a(y)) + self.bn_b(self.conv_b(y)))


def make_chain(share=True, seed=0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = Chain(**kwargs)
    randomize_batchnorm_(model, torch.Generator().manual_seed(seed))
    if share:
        model.conv_b.bias_a, model.conv_b.scale_a = model.conv_a.bias_a, model.conv_a.scale_a
        model.conv_b.scale_a_initialized = model.conv_a.scale_a_initialized
        model.conv_b._scale_a_flag = model.conv_a._scale_a_flag
    return calibrated(model, (2, 6, 11, 9), seed=seed)


def assert_equal_stage1_and_close_unfused(model, x, atol=1e-5):
    """fp32: the codes model is bit-equal to the stage-1 deployed model (same fp32 values, the consumers'
    codes computed from them), and equal to the unfused model up to the fold's rounding."""
    deployed = q4conv.deploy(model)
    stage1 = q4conv.deploy(model, codes=False, residual=False)
    with torch.no_grad():
        out, ref, unfused = deployed(x), stage1(x), model(x)
    assert torch.equal(out, ref)
    torch.testing.assert_close(out, unfused, rtol=1e-5, atol=atol)
    return deployed


# ------------------------------------------------------------------ deploy: codes edges
POOLS = {
    "module": nn.MaxPool2d(3, stride=2, padding=1),
    "ceil_dilated": nn.MaxPool2d(2, stride=2, padding=1, dilation=2, ceil_mode=True),
    "functional": lambda y: F.max_pool2d(y, 3, 1, 1),
    "torch_max_pool2d": lambda y: torch.max_pool2d(y, (2, 3), (1, 2), (1, 1)),
}


@pytest.mark.parametrize("pool", [None] + list(POOLS), ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_codes_through_max_pool(pool, channels_last):
    model = make_chain(pool=POOLS.get(pool))
    x = torch.randn(3, 6, 11, 9) * 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    deployed = assert_equal_stage1_and_close_unfused(model, x)
    assert codes_edges(deployed) == (["conv"], ["conv_a", "conv_b"])
    pools = [n for n in deployed.graph.nodes if n.target is ops.max_pool_codes.default]
    assert len(pools) == (pool is not None)  # the pool runs on the codes (test_pool_codes.py)
    fused = fused_layers(deployed)
    assert fused["conv_a"].residual != fused["conv_b"].residual  # one of them takes the add
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in deployed.modules())


def test_max_pool_of_codes_equals_codes_of_max_pool():
    """Rounding is monotonic: the deploy graph's max-pool of codes (max_pool_codes; padding never
    wins) is the codes of the max-pooled floats, for every padding / dilation / ceil_mode, at the
    range ends too."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(3, 5, 13, 11, generator=gen) * 4
    v[0, 0, :3] = float("inf")
    v[0, 1, :3] = -float("inf")
    bias, scale = torch.randn(5, generator=gen) * 0.2, torch.tensor(0.4)
    codes = lambda t: ops.quantize_activation(t, bias, scale, 1e-5, 4).permute(0, 3, 1, 2)  # noqa: E731
    for args in ((3, 2, 1), (2, 2, 1, 2, True), (3, 1, 0), ((3, 2), (2, 3), (1, 1), (1, 2), True)):
        pooled_codes = ops.max_pool_codes(codes(v), *args)
        assert torch.equal(pooled_codes, codes(F.max_pool2d(v, *args))), args


def test_codes_need_one_quantizer():
    """Readers with two quantizers: float edge (each quantizes); equal values in two objects: codes."""
    separate = make_chain(share=False)
    with torch.no_grad():  # calibration gave both the same scale_a (they read one tensor)
        separate.conv_b.bias_a.add_(0.01)
    deployed = q4conv.deploy(separate)
    assert codes_edges(deployed) == ([], [])
    x = torch.randn(2, 6, 11, 9)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), separate(x), rtol=1e-5, atol=1e-5)
    equal = make_chain(share=False)
    with torch.no_grad():
        equal.conv_b.bias_a.copy_(equal.conv_a.bias_a)
        equal.conv_b.scale_a.copy_(equal.conv_a.scale_a)
    assert codes_edges(q4conv.deploy(equal)) == (["conv"], ["conv_a", "conv_b"])
    assert_equal_stage1_and_close_unfused(equal, x)
    equal.conv_b.eps.fill_(1e-3)  # another eps: another effective scale where scale_a < eps
    assert codes_edges(q4conv.deploy(equal)) == ([], [])


class Mixed(nn.Module):
    """Outputs read by q4conv layers and by something else stay float; q4conv-only outputs become codes."""

    def __init__(self):
        super().__init__()
        q = lambda c, k, **kw: q4conv.Q4Conv2dCutlass(c, k, 3, padding=1, **kw)  # noqa: E731
        self.stem, self.bn = q(3, 8), nn.BatchNorm2d(8)
        self.a, self.c = q(8, 8), q(8, 8)
        self.plain = q(8, 8)       # no epilogue: still writes codes for its reader
        self.reader = q(8, 8)
        self.train_mode = q(8, 8)  # training mode: not fused, so its input stays float
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        s = torch.relu(self.bn(self.stem(x)))
        a = self.a(s) + s.mean()           # s read by a q4conv layer and by mean(): float
        b = self.reader(self.plain(a))     # a read by `plain` only: codes; plain -> reader: codes
        c = self.c(b) * 2                  # b read by c (-> float for the multiply)
        d = self.train_mode(c)
        return self.head(d.mean((2, 3))), c


def test_codes_only_where_every_user_is_a_q4conv_layer():
    torch.manual_seed(0)
    model = calibrated(randomize_batchnorm_(Mixed()), (2, 3, 8, 8))
    model.train_mode.train()
    with pytest.warns(UserWarning, match=r"training mode.*\['train_mode'\]"):
        deployed = q4conv.deploy(model)
    assert codes_edges(deployed) == (["a", "plain", "reader"], ["c", "plain", "reader"])
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        for o, r in zip(deployed(x), model(x)):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    assert isinstance(deployed.train_mode, q4conv.Q4Conv2dCutlass)


# ------------------------------------------------------------------ deploy: residual forms
class AddForms(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.conv, self.bn = q4conv.Q4Conv2dCutlass(5, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.skip = q4conv.Q4Conv2dCutlass(5, 5, 1) if form == "q4conv_pair" else None
        self.scale = nn.Parameter(torch.randn(1, 5, 1, 1))

    def forward(self, x):
        other = x * 0.5  # any tensor
        y = self.bn(self.conv(x))
        form = self.form
        if form == "plus":
            z = y + other
        elif form == "plus_reversed":
            z = other + y
        elif form == "iadd":
            y += other
            z = y
        elif form == "torch_add":
            z = torch.add(other, y)
        elif form == "method_add":
            z = other.add(y)
        elif form == "method_add_":
            z = y.add_(other)
        elif form == "other_add_":      # changes `other` in place: not fused
            z = other.add_(y)
        elif form == "relu_first":      # ReLU before the add: the ReLU fuses, the add does not
            z = torch.relu(y) + other
        elif form == "broadcast":       # fused, the add runs outside the op (shape differs)
            z = y + self.scale
        elif form == "scalar":          # a number, not a tensor: not fused
            z = y + 1.5
        elif form == "mutation_between":  # something changed in place between conv and add: not fused
            other.mul_(2)
            z = y + other
        elif form == "q4conv_pair":     # two convolutions meet: the later call takes the add
            z = self.skip(x) + y
        return torch.relu(z)


ADD_FORMS = {"plus": True, "plus_reversed": True, "iadd": True, "torch_add": True, "method_add": True,
             "method_add_": True, "other_add_": False, "relu_first": False, "broadcast": True, "scalar": False,
             "mutation_between": False, "q4conv_pair": True}


@pytest.mark.parametrize("form", list(ADD_FORMS))
def test_residual_add_forms(form):
    torch.manual_seed(0)
    model = calibrated(randomize_batchnorm_(AddForms(form)), (2, 5, 7, 6))
    deployed = q4conv.deploy(model)
    fused = fused_layers(deployed)
    taken = {n: m.residual for n, m in fused.items()}
    assert any(taken.values()) is ADD_FORMS[form], (taken, deployed.code)
    if form == "q4conv_pair":
        assert taken == {"conv": False, "skip": True}
    x = torch.randn(3, 5, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)
        half = copy.deepcopy(deployed).half()(x.half())
    assert half.dtype == torch.float16 and torch.isfinite(half).all()


def test_residual_of_another_dtype_runs_the_unfused_add():
    """A float32 residual into a float16 layer: the op would round once, the unfused add promotes to
    float32; the module adds outside the op then, exactly as unfused."""
    torch.manual_seed(0)
    model = calibrated(randomize_batchnorm_(AddForms("plus")), (2, 5, 7, 6))
    deployed = q4conv.deploy(model)
    fused = deployed.conv
    x, other = torch.randn(2, 5, 7, 6).half(), torch.randn(2, 5, 7, 6)
    with torch.no_grad():
        out = fused(x, other)
        y = FusedQ4Conv2d.from_q4conv(model.conv, model.bn)(x)
    assert fused.relu and out.dtype == torch.float32 and torch.equal(out, torch.relu(y + other))


# ------------------------------------------------------------------ deploy: whole ResNets
# Producers writing codes / consumers reading them (see ARCHITECTURE.md, Deploy).
RESNET_CODES = {"resnet18": (11, 14), "resnet50": (36, 40)}


@pytest.mark.parametrize("builder", [resnet18, resnet50], ids=["resnet18", "resnet50"])
def test_resnet_codes_agreement(builder):
    model = converted_resnet(builder)
    deployed = q4conv.deploy(model)
    stage1 = q4conv.deploy(model, codes=False, residual=False)
    producers, consumers = codes_edges(deployed)
    print(f"\n{builder.__name__}: {len(producers)} layers write codes, {len(consumers)} read them, "
          f"{sum(m.residual for m in fused_layers(deployed).values())} take the residual add")
    assert (len(producers), len(consumers)) == RESNET_CODES[builder.__name__]
    # ResNet-50's stem max-pool runs on codes (ResNet-18's output also feeds the identity: float).
    pools = [n for n in deployed.graph.nodes if n.target is ops.max_pool_codes.default]
    assert len(pools) == (builder is resnet50)
    convs = [m for m in model.modules() if isinstance(m, q4conv.Q4Conv2dCutlass)]
    assert len(fused_layers(deployed)) == len(convs)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU, q4conv.Q4Conv2dCutlass)) for m in deployed.modules())
    x = torch.randn(1024, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        for fmt in (torch.contiguous_format, torch.channels_last):
            xf = x.contiguous(memory_format=fmt)
            out = deployed(xf)
            agreement = (out.argmax(1) == ref.argmax(1)).double().mean().item()
            max_diff, scale = (out - ref).abs().max().item(), ref.abs().max().item()
            print(f"{builder.__name__} {fmt}: top-1 agreement {agreement:.4f} over {len(x)}, "
                  f"max |logit diff| {max_diff:.3g} (max |logit| {scale:.3g})")
            assert agreement >= 0.999
            assert max_diff <= 1e-5 * scale
            # fp32: the same values as the stage-1 deployed model, so the same codes.
            assert torch.equal(out, stage1(xf))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resnet_low_precision(dtype):
    """fp16 / bf16: runs, keeps the dtype; agreement printed (codes come from fp32 values, the unfused
    model's from values rounded to 16 bits: SPEC 8)."""
    model = converted_resnet(resnet18).to(dtype)
    deployed = q4conv.deploy(model)
    x = torch.randn(64, 3, 32, 32).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, ref = deployed(x), model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    print(f"\nresnet18 {dtype}: top-1 agreement with the unfused model "
          f"{(out.argmax(1) == ref.argmax(1)).double().mean().item():.3f}")


def test_state_dict_round_trip():
    deployed = q4conv.deploy(converted_resnet(resnet18, seed=0))
    target = q4conv.deploy(converted_resnet(resnet18, seed=3))
    assert {"out_bias_a", "out_scale_a", "out_eps"} <= set(dict(deployed.get_submodule("layer1.0.conv1").named_buffers()))
    buf = io.BytesIO()
    torch.save(deployed.state_dict(), buf)
    buf.seek(0)
    target.load_state_dict(torch.load(buf))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x), deployed(x))
        assert torch.equal(copy.deepcopy(deployed)(x), deployed(x))
        assert torch.equal(q4conv.deploy(deployed)(x), deployed(x))  # deploying again changes nothing


def test_torch_export_and_compile():
    deployed = q4conv.deploy(converted_resnet(resnet18))
    x, y = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    program = torch.export.export(deployed, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("q4conv.conv_fused.default") >= 19
    with torch.no_grad():
        assert torch.equal(program.module()(y), deployed(y))
    torch._dynamo.reset()
    compiled = torch.compile(deployed, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for fmt in (torch.contiguous_format, torch.channels_last):
            assert torch.equal(compiled(y.contiguous(memory_format=fmt)), deployed(y.contiguous(memory_format=fmt)))


# ------------------------------------------------------------------ CUDA
@requires_cuda
def test_cuda_deployed_codes_match_cpu():
    model = converted_resnet(resnet50)
    deployed = q4conv.deploy(model)
    x = torch.randn(128, 3, 32, 32)
    with torch.no_grad():
        cpu = deployed(x)
        gpu_model = copy.deepcopy(deployed).cuda()
        gpu = gpu_model(x.cuda().contiguous(memory_format=torch.channels_last)).cpu()
        ref = model(x)
    assert (gpu.argmax(1) == ref.argmax(1)).double().mean().item() >= 0.99
    assert (gpu - cpu).abs().max().item() <= 1e-4 * cpu.abs().max().item()


def test_deployed_model_under_autocast(monkeypatch):
    """Under torch.autocast the fused layers' float outputs take the autocast dtype, and residuals of
    that dtype go into the op (not the unfused add)."""
    fits = []
    original = FusedQ4Conv2d._residual_fits
    monkeypatch.setattr(FusedQ4Conv2d, "_residual_fits",
                        lambda self, *args: fits.append(original(self, *args)) or fits[-1])
    model = converted_resnet(resnet18)
    deployed = q4conv.deploy(model)
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = deployed(x), model(x)
    assert out.dtype == torch.bfloat16 and len(fits) == 8 and all(fits)
    print(f"\nresnet18 under bf16 autocast: top-1 agreement with the unfused model "
          f"{(out.argmax(1) == ref.argmax(1)).double().mean().item():.3f}")
