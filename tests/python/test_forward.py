"""Forward path of every backend against the float64 oracle (SPEC section 3)."""

from __future__ import annotations

import pytest
import torch

import oracle
import q4conv
from conftest import CASES, Case, device_backend_params, make_inputs, skip_unless_backend_runs, DEVICES

ops = torch.ops.q4conv
# Relative error bound of the epilogue's final rounding, per output dtype.
OUT_RTOL = {torch.float32: 4e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def conv_args(case: Case, eps: float = 1e-5):
    return list(case.stride), list(case.padding), list(case.dilation), eps, 4


def check_against_oracle(y, x, bias_a, scale_a, weight, scale_w, bias, case):
    ref, acc = oracle.forward(x, bias_a, scale_a, weight, scale_w, bias,
                              oracle.Conv(case.stride, case.padding, case.dilation))
    assert y.shape == ref.shape
    assert y.dtype == x.dtype
    # The bound scales with |alpha * acc| + |bias|, the magnitudes summed.
    alpha = (ref - (0 if bias is None else bias.double().cpu().view(1, -1, 1, 1))) / acc.where(acc != 0, 1)
    magnitude = (alpha * acc).abs() + (0 if bias is None else bias.double().cpu().abs().view(1, -1, 1, 1))
    error = (y.double().cpu() - ref).abs()
    bound = OUT_RTOL[x.dtype] * magnitude + 1e-30
    worst = (error / bound).max().item() if error.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.2f}x the rounding bound"


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_forward_matches_oracle(device, backend, case, dtype, channels_last):
    x, bias_a, scale_a, weight, scale_w, bias = make_inputs(case, device, dtype, channels_last,
                                                            bias=case.k % 2 == 0, per_channel=case.c % 2 == 1)
    skip_unless_backend_runs(x, case, backend)
    qweight = ops.quantize_pack(weight, scale_w, 1e-5, 4)
    y = ops.conv_packed(x, bias_a, scale_a, qweight, scale_w, bias, *conv_args(case), False, backend)
    check_against_oracle(y, x, bias_a, scale_a, weight, scale_w, bias, case)
    # As nn.Conv2d: the output follows x's layout (C == 1 is ambiguous: NCHW).
    is_nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    expected_format = torch.channels_last if is_nhwc else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected_format)
    if backend in ("sm80_int4", "sm90_int8"):
        # Cached kernel-layout weights and alpha (the layer's eval path) agree.
        kernel_weight = ops.kernel_weight(qweight, case.c, backend)
        alpha = ops.output_alpha(scale_a, scale_w, case.k, 1e-5)
        y_cached = ops.conv_packed(x, bias_a, scale_a, qweight, scale_w, bias, *conv_args(case), False, backend,
                                   kernel_weight, alpha)
        assert torch.equal(y_cached, y)
    # The training forward is the same function of the float weights.
    y_train = ops.conv_train(x, bias_a, scale_a, weight, scale_w, bias, *conv_args(case), backend)
    assert torch.equal(y_train, y)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("case", CASES[:8], ids=str)
def test_integer_accumulator_is_exact(device, backend, case):
    """With s_a * s_w == 1 and no bias the fp32 output IS the int32 sum."""
    x, bias_a, _, weight, _, _ = make_inputs(case, device, torch.float32, bias=False)
    scale_a = torch.tensor(0.25, device=device)
    scale_w = torch.tensor(4.0, device=device)
    x = x * 4  # spread the codes over the whole range for s_a = 0.25... and clamp some
    skip_unless_backend_runs(x, case, backend)
    qweight = ops.quantize_pack(weight * 100, scale_w, 1e-5, 4)
    y = ops.conv_packed(x, bias_a, scale_a, qweight, scale_w, None, *conv_args(case), False, backend)
    _, acc = oracle.forward(x, bias_a, scale_a, weight * 100, scale_w, None,
                            oracle.Conv(case.stride, case.padding, case.dilation))
    assert acc.abs().max() > 0
    assert torch.equal(y.cpu().double(), acc)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_relu_epilogue(device, backend):
    case = Case(2, 32, 16, 9, 9, 3, 3, (1, 1), (1, 1))
    x, bias_a, scale_a, weight, scale_w, bias = make_inputs(case, device, torch.float16, True)
    skip_unless_backend_runs(x, case, backend)
    qweight = ops.quantize_pack(weight, scale_w, 1e-5, 4)
    plain = ops.conv_packed(x, bias_a, scale_a, qweight, scale_w, bias, *conv_args(case), False, backend)
    fused = ops.conv_packed(x, bias_a, scale_a, qweight, scale_w, bias, *conv_args(case), True, backend)
    assert (plain < 0).any()
    assert torch.equal(fused, torch.relu(plain))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided", "nhwc_every_other_pixel"])
# CUDA channels_last paths: 24 the 8-channel vectors, 3 (RGB stem) and 20 the
# flat one (8 consecutive elements across channels, ragged tail for 3).
@pytest.mark.parametrize("channels", [3, 20, 24])
def test_activation_codes_exact(device, dtype, layout, channels):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, channels, 5, 7, generator=gen) * 3
    scale = torch.tensor(0.25)
    # Exact ties (k + 0.5) * s, values beyond the range, NaN and infinities.
    x[0, :, 0, 0] = (torch.arange(channels) - 10 + 0.5) * 0.25
    x[1, 0, 2, :] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0, -0.0])
    bias_a = torch.zeros(channels)
    bias_a[3:] = torch.randn(channels - 3, generator=gen) * 0.1
    x = x.to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)  # H innermost
    elif layout == "nhwc_every_other_pixel":  # what a 1x1 stride-2 convolution reads
        x = x.contiguous(memory_format=torch.channels_last)[:, :, ::2, ::2]
    codes = ops.quantize_activation(x.to(device), bias_a.to(device), scale.to(device), 1e-5, 4)
    expected = oracle.activation_codes(x, bias_a, scale).permute(0, 2, 3, 1)
    assert codes.dtype == torch.int8 and codes.shape == (2, x.shape[2], x.shape[3], channels)
    assert torch.equal(codes.cpu().float(), expected)
    if layout != "nhwc_every_other_pixel":  # NaN, +Inf, -Inf in channel 0 of row 2
        assert codes[1, 2, 0, 0] == 0 and codes[1, 2, 1, 0] == 7 and codes[1, 2, 2, 0] == -8


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("case", [Case(3, 32, 16, 10, 9, 1, 1, (2, 2)),
                                  Case(2, 48, 24, 7, 12, 1, 1, (3, 2)),
                                  Case(2, 64, 40, 11, 11, 1, 1, (2, 1), (0, 0), (2, 2))], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_strided_pointwise_equals_subsampled_input(device, backend, case, dtype, channels_last):
    """A 1x1 convolution with stride reads only the pixels on its stride grid
    (the CUDA backends quantize just those, through a strided view): equal to
    a stride-1 convolution of x[:, :, ::sh, ::sw], and to the oracle."""
    x, bias_a, scale_a, weight, scale_w, bias = make_inputs(case, device, dtype, channels_last=channels_last)
    skip_unless_backend_runs(x, case, backend)
    qweight = ops.quantize_pack(weight, scale_w, 1e-5, 4)
    y = ops.conv_packed(x, bias_a, scale_a, qweight, scale_w, bias, *conv_args(case), False, backend)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    sub = x[:, :, ::case.stride[0], ::case.stride[1]].contiguous(memory_format=layout)
    y_sub = ops.conv_packed(sub, bias_a, scale_a, qweight, scale_w, bias, [1, 1], [0, 0], [1, 1], 1e-5, 4,
                            False, backend)
    assert torch.equal(y, y_sub)
    check_against_oracle(y, x, bias_a, scale_a, weight, scale_w, bias, case)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("case", [Case(2, 3, 64, 32, 30, 7, 7, (2, 2), (3, 3)),       # ResNet stem: 2 rows x 7 x 3 in 64 channels, 4 taps
                                  Case(1, 15, 16, 12, 9, 7, 7, (1, 2), (2, 3), (1, 2)),  # 112 packed channels; im2col: 736 cols
                                  Case(3, 5, 8, 70, 3, 3, 1, (1, 1), (1, 0)),             # 630 GEMM rows: a 54-row tail block
                                  Case(2, 3, 16, 9, 150, 3, 3, (1, 2), (1, 1)),           # 75 output pixels per row
                                  Case(1, 5, 8, 4, 6010, 3, 3, (1, 1), (1, 0), (1, 3000)),  # taps 3000 pixels apart
                                  Case(2, 2, 8, 17, 12, 5, 3, (3, 1), (2, 1)),            # 3 rows per packed pixel, 2 taps
                                  Case(2, 3, 16, 15, 13, 3, 3, (2, 2), (1, 1)),           # 2 rows, 2 taps (the 2nd half empty)
                                  Case(1, 3, 8, 12, 10, 3, 3, (2, 2), (1, 1), (2, 1)),    # dilated rows: one row per packed pixel
                                  Case(2, 3, 32, 20, 32, 7, 7, (2, 2), (3, 3)),           # stem, 16-byte aligned rows (vector loads)
                                  Case(1, 3, 8, 6, 288, 3, 3, (2, 2), (1, 1)),            # aligned rows, 144 columns: 2 blocks per row
                                  Case(1, 3, 8, 4, 16, 1, 1, (1, 1), (0, 130))],          # column blocks wholly in the padding
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("packed", ["1", "0"], ids=["packed_taps", "im2col"])
def test_few_channel_convolutions(device, backend, case, dtype, channels_last, packed):
    """C < 16: on sm90 the input quantized straight into packed filter taps
    (rows and columns of the filter in the channels of one pixel) and a short
    R' x 1 convolution (packed_taps switch at its rule: wherever the packing
    fits), or an im2col matrix of the codes through the GEMM (switch off). The
    plan names the path; where the profiler sees kernels, the packing kernel
    runs exactly on the packed-taps path and the separate pass exactly on the
    im2col path."""
    x, bias_a, scale_a, weight, scale_w, bias = make_inputs(case, device, dtype, channels_last=channels_last)
    skip_unless_backend_runs(x, case, backend)
    qweight = ops.quantize_pack(weight, scale_w, 1e-5, 4)
    args = (x, bias_a, scale_a, qweight, scale_w, bias, *conv_args(case), False, backend)
    with q4conv.tuning(packed_taps="rule" if packed == "1" else "never"):
        plan = plan_of(x, case, backend)
        if device != "cuda":  # the CUDA profiler has nothing to see (and no activity) on CPU
            y, kernels = ops.conv_packed(*args), None
        else:
            y, kernels = run_with_kernel_names(lambda: ops.conv_packed(*args))
    if plan.backend == "sm90_int8":
        assert plan.path in ("packed_taps", "im2col_gemm")
        if packed == "0":
            assert plan.path == "im2col_gemm"
        if kernels is not None:
            packed_ran = any("pack_taps_quantize_kernel" in name for name in kernels)
            im2col_ran = any("im2col_int8_kernel" in name for name in kernels)
            pass_ran = any("quantize_" in name and "pack_taps" not in name for name in kernels)
            expected = (True, False, False) if plan.path == "packed_taps" else (False, True, True)
            assert (packed_ran, im2col_ran, pass_ran) == expected, kernels
    check_against_oracle(y, x, bias_a, scale_a, weight, scale_w, bias, case)


def plan_of(x: torch.Tensor, case: Case, backend: str) -> "q4conv.ConvPlan":
    """The plan conv_packed makes for `case` on x."""
    return q4conv.plan_convolution(x, case.k, (case.r, case.s), case.stride, case.padding, case.dilation, backend)


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] == "sm90_int8"])
@pytest.mark.parametrize("case", [Case(3, 64, 64, 14, 14, 1, 1), Case(2, 192, 128, 9, 7, 1, 1),
                                  Case(1, 128, 256, 5, 11, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fused_pointwise_kernel(device, backend, case, dtype):
    """fused_pointwise="always" runs every dense 1x1 stride-1 convolution it
    can take (C, K multiples of 64; K in one block, as one slice or passes,
    or in a cluster of 2, 4 or 8 slices) through the fused quantize + GEMM
    kernel (row tails: 588, 126, 55 pixels); "never" never does. Both match the
    oracle."""
    x, bias_a, scale_a, weight, scale_w, bias = make_inputs(case, device, dtype, channels_last=True)
    skip_unless_backend_runs(x, case, backend)
    qweight = ops.quantize_pack(weight, scale_w, 1e-5, 4)
    args = (x, bias_a, scale_a, qweight, scale_w, bias, *conv_args(case), True, backend)
    for switch in ("always", "never"):
        with q4conv.tuning(wgmma_pointwise="never", fused_pointwise=switch):
            assert (plan_of(x, case, backend).path == "fused_mma") == (switch == "always")
            y = ops.conv_packed(*args)
        ref, _ = oracle.forward(x, bias_a, scale_a, weight, scale_w, bias, oracle.Conv())
        relu_ref = ref.clamp_min(0)
        bound = OUT_RTOL[dtype] * relu_ref.abs() + 1e-6 * relu_ref.abs().max()
        assert ((y.double().cpu() - relu_ref).abs() <= bound).all(), f"switch {switch}"


def tie_inputs(case: Case, device: str, dtype: torch.dtype):
    """Channels_last inputs (x, bias_a, scale_a, weight, scale_w) for the
    fused kernels' bit-exactness tests: x' / s = j + 0.5 exactly for some
    values (s a power of two, bias_a multiples of 1/8 so x + bias_a is exact),
    NaN, +-Inf and values beyond the code range."""
    x, bias_a, _, weight, scale_w, _ = make_inputs(case, device, dtype, channels_last=True,
                                                   per_channel=True, seed=case.c + case.k)
    scale_a = torch.tensor(0.25, device=device)
    bias_a = bias_a.float().mul(8).round().div(8)
    flat = x.permute(0, 2, 3, 1).reshape(-1, case.c)  # a view of x
    flat[0, :8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.125, -0.125, 0.375, 1.875, -2.125],
                               dtype=dtype, device=device) - bias_a[:8].to(dtype)
    flat[-1, -4:] = torch.tensor([0.625, -0.625, 100.0, -100.0], dtype=dtype, device=device)
    return x, bias_a, scale_a, weight, scale_w


def check_equals_unfused(case: Case, device: str, backend: str, dtype: torch.dtype, relu: bool,
                         switch: str, path: str) -> None:
    """conv_packed on tie_inputs (no output bias) with the fused kernel that
    `switch`="always" selects (the plan's `path`) equals the pass + GEMM result
    (both fused kernels off) bit for bit."""
    x, bias_a, scale_a, weight, scale_w = tie_inputs(case, device, dtype)
    skip_unless_backend_runs(x, case, backend)
    qweight = ops.quantize_pack(weight, scale_w, 1e-5, 4)
    args = (x, bias_a, scale_a, qweight, scale_w, None, *conv_args(case), relu, backend)
    with q4conv.tuning(wgmma_pointwise="never", fused_pointwise="never"):
        assert plan_of(x, case, backend).path == "pass_gemm"
        reference = ops.conv_packed(*args)
    switches = {"wgmma_pointwise": "never", "fused_pointwise": "never", switch: "always"}
    with q4conv.tuning(**switches):
        assert plan_of(x, case, backend).path == path
        y, kernels = run_with_kernel_names(lambda: ops.conv_packed(*args))
    if kernels is not None:
        assert (fused_kernel_ran if path == "fused_mma" else wgmma_kernel_ran)(kernels), kernels
    assert torch.isfinite(y).all()
    assert torch.equal(y, reference)


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] == "sm90_int8"])
@pytest.mark.parametrize("case", [
    Case(1, 1024, 128, 5, 7, 1, 1),    # largest C (64 KB weight slices): two 64-wide slices, 35 pixels
    Case(2, 1024, 256, 9, 9, 1, 1),    # a cluster of four 64-wide slices
    Case(3, 512, 256, 11, 13, 1, 1),   # two 128-wide slices, 429 pixels
    Case(1, 64, 1024, 3, 5, 1, 1),     # 15 pixels; 8 passes of one block (fp16, bf16), a cluster of 8 (fp32)
    Case(3, 64, 256, 23, 17, 1, 1),    # two 128-wide passes over each row block, row tail
    Case(2, 128, 320, 9, 11, 1, 1),    # five 64-wide passes over two channel steps
    Case(17, 256, 1024, 15, 15, 1, 1), # 8 slices, 30 row blocks: several per cluster
    Case(2, 320, 64, 17, 19, 1, 1),    # C not a power of two (5 channel steps)
    Case(2, 192, 128, 13, 9, 1, 1),    # one 128-wide slice, 234 pixels (row tail)
    Case(1, 128, 512, 16, 16, 1, 1),   # 256 pixels (exact blocks), 4 passes of 128 (64 KB of weights)
    Case(48, 64, 64, 27, 27, 1, 1),    # 274 row blocks: several per persistent block
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_fused_pointwise_equals_unfused(device, backend, case, dtype, relu):
    """The fused kernel's codes are the separate pass's, bit for bit: without
    an output bias (alpha * acc is then one rounding on both paths) its output
    equals the pass + GEMM output exactly, with 64- and 128-wide weight slices,
    one block for all of K (one or several passes) or clusters of blocks,
    including NaN, +-Inf and exact rounding ties."""
    check_equals_unfused(case, device, backend, dtype, relu, "fused_pointwise", "fused_mma")


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] == "sm90_int8"])
@pytest.mark.parametrize("case", [
    Case(4, 128, 128, 64, 64, 3, 3, (1, 1), (1, 1)),            # 128 tiles of 128x128: the smallest that takes it
    Case(18, 144, 136, 48, 40, 3, 3, (2, 2), (1, 1)),           # C and K tails, stride 2, non-square
    Case(2, 256, 128, 96, 96, 3, 3, (1, 1), (2, 2), (2, 2)),    # dilation 2
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_persistent_conv_kernel(device, backend, case, dtype):
    """Filtered convolutions with C >= 128 and at least 128 output tiles of
    128x128 run CUTLASS's persistent pingpong kernel with the im2col conv
    mainloop (conv_sm90_int8_persistent.cuh, PersistentConvMainloop) and match the
    oracle."""
    x, bias_a, scale_a, weight, scale_w, bias = make_inputs(case, device, dtype, channels_last=True)
    skip_unless_backend_runs(x, case, backend)
    qweight = ops.quantize_pack(weight, scale_w, 1e-5, 4)
    args = (x, bias_a, scale_a, qweight, scale_w, bias, *conv_args(case), False, backend)
    assert plan_of(x, case, backend).config == "conv128x128x128/pp"
    y, kernels = run_with_kernel_names(lambda: ops.conv_packed(*args))
    if kernels is not None:
        assert any("PersistentConvMainloop" in name for name in kernels), "the persistent conv kernel did not run"
    check_against_oracle(y, x, bias_a, scale_a, weight, scale_w, bias, case)


WGMMA_CASES = [
    Case(3, 64, 128, 14, 14, 1, 1),     # one k tile, one 128-wide slice, row tail (588 pixels)
    Case(2, 192, 256, 9, 7, 1, 1),      # three k tiles, one 256-wide slice, 126 pixels
    Case(1, 1024, 256, 14, 14, 1, 1),   # 16 k tiles: the ring wraps four times
    Case(2, 2048, 512, 7, 7, 1, 1),     # the largest C, two 256-wide slices
    Case(1, 128, 384, 5, 11, 1, 1),     # three 128-wide slices, 55 pixels (one partial row block)
    Case(5, 320, 128, 13, 13, 1, 1),    # C not a power of two (5 k tiles), 845 pixels
    Case(3, 128, 512, 56, 56, 1, 1),    # 9408 pixels: 147 row blocks, two 256-wide slices
]


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] == "sm90_int8"])
@pytest.mark.parametrize("case", WGMMA_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_wgmma_pointwise_kernel(device, backend, case, dtype, bias):
    """wgmma_pointwise="always" runs dense fp16 / bf16 1x1 stride-1
    convolutions with C % 64 == 0 and K % 128 == 0 through the wgmma kernel
    that quantizes into shared memory (fp32 inputs take the other paths); the
    result matches the oracle either way."""
    x, bias_a, scale_a, weight, scale_w, out_bias = make_inputs(case, device, dtype, channels_last=True,
                                                                bias=bias, per_channel=True)
    skip_unless_backend_runs(x, case, backend)
    qweight = ops.quantize_pack(weight, scale_w, 1e-5, 4)
    args = (x, bias_a, scale_a, qweight, scale_w, out_bias, *conv_args(case), False, backend)
    with q4conv.tuning(wgmma_pointwise="always"):
        assert (plan_of(x, case, backend).path == "fused_wgmma") == (dtype != torch.float32)
        y, kernels = run_with_kernel_names(lambda: ops.conv_packed(*args))
    if kernels is not None:
        assert wgmma_kernel_ran(kernels) == (dtype != torch.float32), kernels
    check_against_oracle(y, x, bias_a, scale_a, weight, scale_w, out_bias, case)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] == "sm90_int8"])
@pytest.mark.parametrize("case", WGMMA_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_wgmma_pointwise_equals_unfused(device, backend, case, dtype, relu):
    """The wgmma kernel's codes are the separate pass's, bit for bit: without
    an output bias its output equals the pass + GEMM output exactly,
    including NaN, +-Inf and exact rounding ties, with and without ReLU."""
    check_equals_unfused(case, device, backend, dtype, relu, "wgmma_pointwise", "fused_wgmma")


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] == "sm90_int8"])
@pytest.mark.parametrize("n,c,k,h,dtype,wgmma", [
    (3, 512, 256, 56, torch.float16, True),    # K one 256-wide slice, C >= 512, 147 row blocks
    (3, 1024, 256, 56, torch.bfloat16, True),
    (3, 512, 256, 56, torch.float32, False),   # fp32 input: not supported
    (3, 512, 512, 56, torch.float16, False),   # two slices re-read the input
    (3, 256, 256, 56, torch.float16, False),   # C < 512
    (2, 512, 256, 64, torch.float16, False),   # 128 row blocks: less than a wave of 132
])
def test_wgmma_pointwise_dispatch_rule(device, backend, n, c, k, h, dtype, wgmma):
    """With the switches at their rules, dense 1x1 layers run the wgmma kernel
    exactly where K is one 256-wide slice, C >= 512 and the 64-pixel row
    blocks fill a wave of the device's SMs (the last case: 128 row blocks,
    under a wave of an H100's 132)."""
    case = Case(n, c, k, h, h, 1, 1)
    plan = default_dispatch_plan(case, device, backend, dtype)
    rows = n * h * h // 64
    assert (plan.path == "fused_wgmma") == (wgmma and rows >= plan.sm_count), plan
    if plan.sm_count <= 128:
        pytest.skip(f"{plan.sm_count} SMs: the wave rule's last case needs more than 128")
    assert (plan.path == "fused_wgmma") == wgmma, plan


def default_dispatch_plan(case: Case, device: str, backend: str, dtype: torch.dtype) -> "q4conv.ConvPlan":
    """The plan conv_packed makes for a channels_last input of `case` with the
    fused-kernel switches at their rules; where the profiler sees kernels,
    the fused kernels' names confirm it."""
    x, bias_a, scale_a, weight, scale_w, bias = make_inputs(case, device, dtype, channels_last=True)
    skip_unless_backend_runs(x, case, backend)
    qweight = ops.quantize_pack(weight, scale_w, 1e-5, 4)
    with q4conv.tuning(wgmma_pointwise="rule", fused_pointwise="rule"):
        plan = plan_of(x, case, backend)
        _, kernels = run_with_kernel_names(
            lambda: ops.conv_packed(x, bias_a, scale_a, qweight, scale_w, bias, *conv_args(case), False, backend))
    if kernels is not None:
        assert wgmma_kernel_ran(kernels) == (plan.path == "fused_wgmma"), kernels
        assert fused_kernel_ran(kernels) == (plan.path == "fused_mma"), kernels
    return plan


def wgmma_kernel_ran(kernel_names) -> bool:
    """Whether the wgmma 1x1 kernel is among the launched kernels' names."""
    return any("pointwise_wgmma_kernel" in name for name in kernel_names)


def fused_kernel_ran(kernel_names) -> bool:
    """Whether the fused 1x1 kernel is among the launched kernels' names."""
    return any("pointwise_fused_kernel" in name for name in kernel_names)


def run_with_kernel_names(fn):
    """fn()'s result and the names of the CUDA kernels it launched; None for
    the names where the profiler sees no kernel at all (CUPTI unavailable, as
    under compute-sanitizer)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    names = [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    return result, names or None


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] == "sm90_int8"])
@pytest.mark.parametrize("c,k,fused", [(64, 64, True), (64, 256, True), (256, 128, True), (128, 512, False),
                                       (512, 256, True), (1024, 256, False), (256, 1024, False)])
def test_fused_pointwise_dispatch_rule(device, backend, c, k, fused):
    """With the switches at their rules, fp16 1x1 layers run the fused kernel
    where one block holds all of K's weights in one slice or two passes or
    where K takes a cluster of two, and pass + GEMM where K needs more passes
    or a larger cluster; never the wgmma 1x1 kernel (128 pixels: too few row
    blocks for its rule)."""
    plan = default_dispatch_plan(Case(2, c, k, 8, 8, 1, 1), device, backend, torch.float16)
    assert (plan.path == "fused_mma") == fused, plan
    assert plan.path != "fused_wgmma", "the wgmma 1x1 kernel ran below its rule's row blocks"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3, 20, 33])
@pytest.mark.parametrize("per_channel", [False, True])
def test_pack_unpack_round_trip(device, channels, per_channel):
    gen = torch.Generator().manual_seed(channels)
    weight = torch.randn(6, channels, 3, 2, generator=gen) * 0.2
    scale_w = torch.rand(6, generator=gen) * 0.05 + 0.01 if per_channel else torch.tensor(0.03)
    packed = ops.quantize_pack(weight.to(device), scale_w.to(device), 1e-5, 4)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 3, 2, (channels + 1) // 2)
    unpacked = ops.unpack(packed, channels)
    assert torch.equal(unpacked.cpu().float(), oracle.weight_codes(weight, scale_w))
    # Nibble order: even channel low, odd channel high.
    byte = int(packed.cpu()[0, 0, 0, 0])
    low = byte & 0xF
    assert (low - 16 if low >= 8 else low) == int(unpacked.cpu()[0, 0, 0, 0])


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_empty_batch_returns_empty(device, backend):
    case = Case(0, 16, 8, 6, 6, 3, 3, (1, 1), (1, 1))
    x, bias_a, scale_a, weight, scale_w, bias = make_inputs(case, device)
    qweight = ops.quantize_pack(weight, scale_w, 1e-5, 4)
    y = ops.conv_packed(x, bias_a, scale_a, qweight, scale_w, bias, *conv_args(case), False, "auto")
    assert y.shape == (0, 8, 6, 6)
