"""The plan (csrc/plan.h): what q4conv.explain reports, the kernel weight
layout rule the fake kernel mirrors, the tuning switches, and the geometry
checks every op shares."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import q4conv
from q4conv import _ops, ops
from conftest import requires_cuda


def test_explain_cpu_layer_is_the_exact_fallback():
    layer = q4conv.Q4Conv2d(5, 7, 3, stride=2, padding=1, dilation=(1, 2))
    x = torch.randn(2, 5, 11, 13)
    plan = q4conv.explain(layer, x)
    reference = F.conv2d(x, torch.zeros(7, 5, 3, 3), stride=2, padding=1, dilation=(1, 2))
    assert plan.backend == "fallback" and plan.path == "fallback" and plan.config == ""
    assert plan.out_hw == tuple(reference.shape[2:])
    assert plan.backward == "aten" and not plan.stride_grid and plan.sm_count == 0
    assert layer(x).shape == reference.shape


def test_forced_cuda_backend_on_cpu_input_names_the_backend():
    x = torch.randn(1, 16, 8, 8)
    with pytest.raises(RuntimeError, match="sm90_int8.*needs a CUDA input"):
        q4conv.plan_convolution(x, 8, (3, 3), backend="sm90_int8")
    with pytest.raises(RuntimeError, match="backend must be one of"):
        q4conv.plan_convolution(x, 8, (3, 3), backend="tensorrt")


@pytest.mark.parametrize("backend", ["sm80_int4", "sm90_int8"])
def test_fake_kernel_weight_layout_mirrors_the_plan(backend):
    """_ops.py's fake kernel for kernel_weight uses the same layout rule as
    csrc/plan.cpp's kernel_weight_layout (what the CUDA op allocates)."""
    for k, c, r, s in itertools.product([1, 8, 64], [1, 3, 15, 16, 17, 31, 32, 33, 100], [1, 3, 7], [1, 2, 7]):
        sizes, _ = _ops.kernel_weight_sizes(k, c, r, s, backend)
        assert list(sizes) == ops.kernel_weight_sizes(k, c, [r, s], backend), (k, c, r, s)


def test_tuning_switches_set_and_restore():
    before = ops.tuning()
    with q4conv.tuning(fused_pointwise="never", packed_taps=True):
        inside = dict(item.split("=") for item in ops.tuning().split(","))
        assert inside["fused_pointwise"] == "0" and inside["packed_taps"] == "1"
        assert q4conv.plan_convolution(torch.randn(1, 3, 4, 4), 2, (1, 1)).tuning == ops.tuning()
    assert ops.tuning() == before
    with pytest.raises(ValueError, match="fused_pointwise"):
        with q4conv.tuning(fused_pointwise="sometimes"):
            pass
    with pytest.raises(RuntimeError, match="name must be"):
        ops.set_tuning("warp_speed", 1)
    assert ops.tuning() == before


def test_sm90_config_switch_checks_its_value():
    from q4conv.plan import sm90_configs

    names = sm90_configs()
    before = ops.tuning()
    with q4conv.tuning(sm90_config=None):
        assert "sm90_config=-1" in ops.tuning()
    with pytest.raises(ValueError, match="sm90_config must be"):
        with q4conv.tuning(sm90_config="no_such_tile"):
            pass
    with pytest.raises(RuntimeError, match="sm90_config must be"):
        ops.set_tuning("sm90_config", len(names))
    assert ops.tuning() == before


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("kernel,stride", [(3, 1), (1, 1), (3, 2)])
def test_forced_sm90_config_runs_where_it_fits_and_matches_the_rule(kernel, stride):
    """Each compiled configuration, forced, runs where it takes the shape (the plan names it) and
    gives the rule's output bit for bit (float out and codes out: exact int32 sums, one epilogue)."""
    from q4conv.plan import sm90_configs

    torch.manual_seed(0)
    layer = q4conv.Q4Conv2dCutlass(64, 128, kernel, stride, kernel // 2, bias=True, device="cuda")
    x = torch.randn(4, 64, 20, 20, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    layer.eval()(x)
    reference = layer(x)
    ran = set()
    for name in sm90_configs():
        # (the fused 1x1 paths off, so every shape takes the implicit-GEMM kernels of the table)
        with q4conv.tuning(sm90_config=name, fused_pointwise="never", wgmma_pointwise="never"):
            plan = q4conv.explain(layer, x)
            assert torch.equal(layer(x), reference), name
        if plan.config == name:
            ran.add(name)
    assert len(ran) >= 2, ran  # the switch reaches the kernels (several configurations take these shapes)


@pytest.mark.parametrize("dilation", [2**62, 2**40])
def test_huge_dilation_is_an_error_not_a_shape(dilation):
    """The output-size arithmetic is overflow-checked: a dilation near 2^63
    raises naming it instead of wrapping into a plausible output size."""
    x = torch.randn(1, 4, 8, 8)
    weight = torch.randn(6, 4, 3, 3)
    bias_a, scale_a, scale_w = torch.zeros(4), torch.tensor(0.1), torch.tensor(0.05)
    qweight = ops.quantize_pack(weight, scale_w, 1e-5, 4)
    with pytest.raises(RuntimeError, match="dilation|larger than the padded input"):
        ops.conv_packed(x, bias_a, scale_a, qweight, scale_w, None, [1, 1], [0, 0], [dilation, 1], 1e-5, 4,
                        False, "auto")
    with pytest.raises(RuntimeError, match="dilation|larger than the padded input"):
        ops.conv_train(x, bias_a, scale_a, weight, scale_w, None, [1, 1], [0, 0], [1, dilation], 1e-5, 4, "auto")


def test_padding_overflow_is_an_error():
    x = torch.randn(1, 4, 8, 8)
    weight = torch.randn(6, 4, 1, 1)
    with pytest.raises(RuntimeError, match="padding"):
        ops.conv_train(x, torch.zeros(4), torch.tensor(0.1), weight, torch.tensor(0.05), None, [1, 1],
                       [2**62, 0], [1, 1], 1e-5, 4, "auto")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_plan_is_reused_and_reports_the_device(dtype):
    x = torch.randn(2, 64, 14, 14, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    first = q4conv.plan_convolution(x, 64, (3, 3), padding=(1, 1))
    assert first == q4conv.plan_convolution(x, 64, (3, 3), padding=(1, 1))
    assert first.sm_count == torch.cuda.get_device_properties(0).multi_processor_count
    if first.backend != "fallback":
        assert first.config and first.kernel_shape and first.backward == "cuda_lsq"


@requires_cuda
def test_cuda_strided_pointwise_runs_on_the_stride_grid():
    """1x1 stride-2 layers: forward and (channels_last x) backward read only
    the stride grid, as the plan says."""
    x = torch.randn(2, 64, 14, 14, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    plan = q4conv.plan_convolution(x, 128, (1, 1), stride=(2, 2))
    if plan.backend == "fallback":
        pytest.skip("no CUDA backend runs here")
    assert plan.stride_grid and plan.backward_stride_grid and plan.out_hw == (7, 7)
    assert not q4conv.plan_convolution(x.contiguous(), 128, (1, 1), stride=(2, 2)).backward_stride_grid


def test_explain_names_its_arguments():
    layer = q4conv.Q4Conv2dCutlass(4, 8, 3)
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(TypeError, match=r"q4conv.explain\(layer, x\)"):
        q4conv.explain(x, layer)
    with pytest.raises(TypeError, match="x must be a tensor"):
        q4conv.explain(layer, [x])
