"""conv_fused on the sm90 kernels (codes in without a pass; residual, ReLU and codes out in the epilogue).

``backend="sm90_int8"`` forces the kernels (a plan that cannot run them is an
error, so each call here is known to have run them); ``backend="fallback"`` is
the exact ATen arithmetic of ``csrc/conv_epilogue.cpp``, itself checked against
the float64 oracle in ``test_codes.py``. The two must agree bit for bit: codes
equal, float16 outputs equal. Shapes are those the kernels take (channels in
multiples of 16), covering each kernel family: 3x3 implicit GEMM, 1x1 GEMMs,
1x1 stride 2 on codes, and the RGB stem (float in, packed filter taps).
Skipped without an sm_90 GPU.
"""

from __future__ import annotations

import pytest
import torch

import oracle
from conftest import HAS_CUDA, Case

ops = torch.ops.q4conv
QN, QP = oracle.qrange(4)

HAS_SM90 = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9
pytestmark = pytest.mark.skipif(not HAS_SM90, reason="needs an sm_90 GPU (the sm90_int8 kernels)")

# ResNet-50-like layers at small batch, each family.
KERNEL_CASES = [
    Case(n=2, c=64, k=64, h=14, w=14, r=3, s=3, stride=(1, 1), padding=(1, 1)),     # implicit GEMM, C == 64 tiles
    Case(n=2, c=128, k=128, h=9, w=11, r=3, s=3, stride=(1, 1), padding=(1, 1)),    # implicit GEMM, odd spatial
    Case(n=4, c=256, k=512, h=7, w=7, r=1, s=1, stride=(1, 1), padding=(0, 0)),     # 1x1 GEMM
    Case(n=2, c=64, k=256, h=16, w=16, r=1, s=1, stride=(1, 1), padding=(0, 0)),    # 1x1 GEMM, wide output
    Case(n=2, c=256, k=512, h=14, w=14, r=1, s=1, stride=(2, 2), padding=(0, 0)),   # 1x1 stride 2 (downsample)
    Case(n=2, c=128, k=128, h=15, w=15, r=3, s=3, stride=(2, 2), padding=(1, 1)),   # 3x3 stride 2
    Case(n=2, c=64, k=128, h=28, w=28, r=3, s=3, stride=(1, 1), padding=(1, 1)),    # 64x128 tiles, C == 64
    Case(n=16, c=128, k=256, h=28, w=28, r=3, s=3, stride=(1, 1), padding=(1, 1)),  # a wave of tiles (persistent)
    Case(n=2, c=512, k=512, h=7, w=7, r=3, s=3, stride=(1, 1), padding=(1, 1)),     # long reduction
]
STEM = Case(n=2, c=3, k=64, h=32, w=32, r=7, s=7, stride=(2, 2), padding=(3, 3))


def output_shape(case: Case):
    p = (case.h + 2 * case.padding[0] - (case.r - 1) - 1) // case.stride[0] + 1
    q = (case.w + 2 * case.padding[1] - (case.s - 1) - 1) // case.stride[1] + 1
    return (case.n, case.k, p, q)


def inputs(case: Case, codes_in: bool, dtype=torch.float16, seed=0, nonfinite=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.n, case.c, case.h, case.w, generator=gen) * 1.5
    if codes_in:
        x = torch.randint(QN, QP + 1, x.shape, generator=gen, dtype=torch.int8)
    weight = torch.randn(case.k, case.c, case.r, case.s, generator=gen) * 0.1
    scale_w = torch.rand(case.k, generator=gen) * 0.02 + 0.02
    t = dict(
        x=x.to(dtype if not codes_in else torch.int8).contiguous(memory_format=torch.channels_last),
        bias_a=torch.randn(case.c, generator=gen) * 0.2,
        scale_a=torch.tensor(0.31),
        qweight=ops.quantize_pack(weight, scale_w, 1e-5, 4),
        # a folded BatchNorm scale of either sign, and its shift
        alpha=(0.31 * scale_w * (torch.randn(case.k, generator=gen) + 0.3)).float(),
        shift=torch.randn(case.k, generator=gen),
        out_bias_a=torch.randn(case.k, generator=gen) * 0.2,
        out_scale_a=torch.tensor(0.23),
    )
    if nonfinite:  # epilogue values NaN, +Inf, -Inf on three channels
        t["shift"][:3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    return {name: v.cuda() for name, v in t.items()}


def fused(t, case: Case, backend: str, residual=None, relu=False, codes_out=False, out_dtype=None):
    return ops.conv_fused(t["x"], t["bias_a"], t["scale_a"], t["qweight"], t["alpha"], t["shift"],
                          list(case.stride), list(case.padding), [1, 1], 1e-5, 4, residual, relu,
                          t["out_bias_a"] if codes_out else None, t["out_scale_a"] if codes_out else None,
                          1e-5, out_dtype, backend)


def assert_same(kernel: torch.Tensor, reference: torch.Tensor):
    assert kernel.dtype == reference.dtype and kernel.shape == reference.shape
    if kernel.dtype == torch.int8:
        assert kernel.is_contiguous(memory_format=torch.channels_last)
        differ = (kernel != reference).sum().item()
        assert differ == 0, f"{differ} of {kernel.numel()} codes differ"
    else:  # NaN where the reference has NaN, else equal values
        same = (kernel == reference) | (kernel.isnan() & reference.isnan())
        assert same.all(), f"max diff {(kernel.float() - reference.float()).abs().nan_to_num().max().item():.3g}"


@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
@pytest.mark.parametrize("codes_in", [True, False], ids=["codes_in", "float_in"])
@pytest.mark.parametrize("codes_out", [True, False], ids=["codes_out", "fp16_out"])
def test_kernels_equal_reference(case, codes_in, codes_out):
    t = inputs(case, codes_in)
    gen = torch.Generator().manual_seed(3)
    residual = (torch.randn(output_shape(case), generator=gen) * 2).half().cuda()
    out_dtype = None if codes_out else torch.float16
    for res in (None, residual, residual.contiguous(memory_format=torch.channels_last)):
        for relu in (False, True):
            args = dict(residual=res, relu=relu, codes_out=codes_out, out_dtype=out_dtype)
            assert_same(fused(t, case, "sm90_int8", **args), fused(t, case, "fallback", **args))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_stem_float_in_codes_out(x_dtype):
    t = inputs(STEM, codes_in=False, dtype=x_dtype)
    for relu in (False, True):
        args = dict(relu=relu, codes_out=True)
        assert_same(fused(t, STEM, "sm90_int8", **args), fused(t, STEM, "fallback", **args))


@pytest.mark.parametrize("codes_out", [True, False], ids=["codes_out", "fp16_out"])
def test_nonfinite_epilogue_values(codes_out):
    case = KERNEL_CASES[2]
    t = inputs(case, codes_in=True, nonfinite=True)
    out_dtype = None if codes_out else torch.float16
    for relu in (False, True):
        args = dict(relu=relu, codes_out=codes_out, out_dtype=out_dtype)
        assert_same(fused(t, case, "sm90_int8", **args), fused(t, case, "fallback", **args))


def test_near_ties_take_the_exact_division():
    """Epilogue values on and next to half-integer multiples of the consumer's scale: the
    kernels' fast product must give way to the division exactly where quant.h says."""
    case = Case(n=2, c=64, k=64, h=8, w=8, r=1, s=1, stride=(1, 1), padding=(0, 0))
    t = inputs(case, codes_in=True)
    scale = 0.23
    # alpha = 0: v = shift, chosen on ties k + 0.5 (times the scale) and their neighbours
    t["alpha"].zero_()
    ties = (torch.arange(case.k, device="cuda") % 16 - 8 + 0.5) * scale
    t["shift"] = torch.nextafter(ties.float(), torch.where(torch.arange(case.k, device="cuda") % 3 == 0,
                                                             ties.float() + 1, ties.float() - 1))
    t["shift"][::5] = ties[::5].float()
    t["out_bias_a"].zero_()
    args = dict(codes_out=True)
    assert_same(fused(t, case, "sm90_int8", **args), fused(t, case, "fallback", **args))


def test_auto_backend_takes_the_kernels_and_falls_back():
    case = KERNEL_CASES[0]
    t = inputs(case, codes_in=True)
    # a bfloat16 residual: only the ATen arithmetic takes it (auto), the forced backend says so
    residual = torch.randn(output_shape(case), device="cuda").bfloat16()
    auto = fused(t, case, "auto", residual=residual, codes_out=True)
    assert_same(auto, fused(t, case, "fallback", residual=residual, codes_out=True))
    with pytest.raises(RuntimeError, match="float16 residual"):
        fused(t, case, "sm90_int8", residual=residual, codes_out=True)
    # codes not in channels_last memory: auto runs the exact arithmetic
    t_nchw = dict(t, x=t["x"].contiguous())
    assert_same(fused(t_nchw, case, "auto", codes_out=True), fused(t, case, "sm90_int8", codes_out=True))
