"""The nn.Module contract of SPEC section 2 and the errors of section 5."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import q4conv
from conftest import DEVICES, requires_cuda


def make_layer(device="cpu", **kwargs) -> q4conv.Q4Conv2dCutlass:
    torch.manual_seed(0)
    args = dict(in_channels=20, out_channels=24, kernel_size=3, stride=(2, 1), padding=1, dilation=(1, 2))
    args.update(kwargs)
    return q4conv.Q4Conv2dCutlass(**args, device=device)


def test_public_names_and_defaults():
    layer = make_layer(bias=True)
    assert q4conv.Q4Conv2d is q4conv.Q4Conv2dCutlass
    assert q4conv.prepare_bie_layers is q4conv.prepare_q4conv_layers
    assert layer.weight.shape == (24, 20, 3, 3)
    assert layer.qweight is None
    assert layer.bias_a.shape == (20,) and not layer.bias_a.any()
    assert layer.scale_a.item() == 0.0
    assert layer.eps.item() == pytest.approx(1e-5)
    assert layer.kernel_size == (3, 3) and layer.stride == (2, 1) and layer.dilation == (1, 2)
    assert isinstance(layer.bias, nn.Parameter)
    assert "kernel_size=(3, 3)" in repr(layer)


@pytest.mark.parametrize("per_channel", [False, True])
def test_prepare_params_is_lsq_init(per_channel):
    layer = make_layer(per_channel_weight_scale=per_channel)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    model = nn.Sequential(nn.Sequential(layer))
    q4conv.prepare_bie_layers(model)
    w = layer.weight.detach().abs()
    expected = (w.mean(dim=(1, 2, 3)) if per_channel else w.mean()) * 2 / math.sqrt(7)
    torch.testing.assert_close(layer.scale_w.detach(), expected)


def test_set_activation_initialises_once_and_adds_bias():
    layer = make_layer()
    with torch.no_grad():
        layer.bias_a.uniform_(-1, 1)
    x = torch.randn(2, 20, 6, 6)
    out = layer.set_activation(x)
    torch.testing.assert_close(out, x + layer.bias_a.view(1, -1, 1, 1))
    expected = 2 * (x + layer.bias_a.view(1, -1, 1, 1)).abs().mean() / math.sqrt(7)
    torch.testing.assert_close(layer.scale_a.detach(), expected.detach())
    layer.set_activation(x * 100)  # second call: scale stays
    torch.testing.assert_close(layer.scale_a.detach(), expected.detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_train_forward_equals_eval_forward(device, dtype, channels_last):
    layer = make_layer(device, bias=True)
    x = torch.randn(2, 20, 9, 11, device=device).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y_train = layer.train()(x)
    assert layer.qweight is None
    y_eval = layer.eval()(x)
    assert layer.qweight is not None and layer.qweight.dtype == torch.uint8
    assert layer.qweight.shape == (24, 3, 3, 10)
    assert y_eval.dtype == dtype and y_eval.shape == (2, 24, 5, 9)
    assert y_eval.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(y_train, y_eval)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_parameter_dtypes_match_float32_layer(device, param_dtype):
    """Parameters of another float type (the CUDA backward's half-precision
    weight kernels; the ATen path for float64) give the float32 layer's output,
    and its gradients rounded to that type, when the values are the same."""
    ref = make_layer(device, bias=True, per_channel_weight_scale=True)
    x = torch.randn(2, 20, 9, 11, device=device)
    ref(x)  # initialises scale_a
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(param_dtype).float())  # values both types hold exactly
    other = make_layer(device, bias=True, per_channel_weight_scale=True, dtype=param_dtype)
    other.load_state_dict({k: v.to(param_dtype) for k, v in ref.state_dict().items()})
    y_ref, y_other = ref(x), other(x)
    assert y_other.dtype == torch.float32 and torch.equal(y_ref, y_other)
    gy = torch.randn_like(y_ref)
    y_ref.backward(gy)
    y_other.backward(gy)
    # float64 parameters on a GPU take the ATen backward (other summation order).
    exact = not (device == "cuda" and param_dtype == torch.float64)
    for name, p in ref.named_parameters():
        got, want = getattr(other, name).grad, p.grad
        assert got is not None and got.dtype == param_dtype and want.abs().sum() > 0, name
        if exact:
            assert torch.equal(got, want.to(param_dtype)), name
        else:
            torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


def test_training_step_updates_every_parameter():
    layer = make_layer(bias=True)
    x = torch.randn(3, 20, 8, 8)
    layer(x).square().mean().backward()
    for name in ["weight", "bias_a", "scale_a", "scale_w", "bias"]:
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_eval_after_training_uses_fresh_weights():
    layer = make_layer()
    x = torch.randn(2, 20, 8, 8)
    y_before = layer.eval()(x)
    layer.train()
    with torch.no_grad():
        layer.weight.mul_(-1)
    y_after = layer.eval()(x)
    assert not torch.equal(y_before, y_after)
    assert torch.equal(y_after, layer.train()(x))


def _negate_in_place(layer):
    with torch.no_grad():
        layer.weight.neg_()


def _negate_by_data(layer):
    layer.weight.data = -layer.weight.data


def _negate_by_new_parameter(layer):
    layer.weight = nn.Parameter(-layer.weight.detach())


def _double_scale_w(layer):
    with torch.no_grad():
        layer.scale_w.mul_(2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change", [_negate_in_place, _negate_by_data, _negate_by_new_parameter, _double_scale_w],
                         ids=["in_place", "data", "new_parameter", "scale_w"])
def test_eval_follows_weight_changes_made_in_eval_mode(device, change):
    """An eval-mode layer whose weight or scale_w changes without a train() call (an EMA copy kept
    in eval mode, pruning, a .data swap) packs its weights again: its output is the one a layer
    holding the new weights from the start gives, never the stale packed weights'."""
    layer = make_layer(device, bias=True).eval()
    x = torch.randn(2, 20, 9, 9, device=device)
    y_before = layer(x)
    change(layer)
    fresh = make_layer(device, bias=True)
    fresh.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "qweight"})
    y_after = layer(x)
    assert torch.equal(y_after, fresh.eval()(x))
    assert not torch.equal(y_after, y_before)
    assert torch.equal(layer.qweight, fresh.qweight)


def test_ema_copy_in_eval_mode_follows_its_updates():
    """timm's ModelEma pattern: a deep copy kept in eval mode, its parameters updated in place."""
    model = nn.Sequential(make_layer(bias=True), nn.ReLU(), make_layer(in_channels=24, bias=True))
    x = torch.randn(2, 20, 9, 9)
    model(x)  # initialises scale_a
    ema = copy.deepcopy(model).eval()
    ema(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(0.5).add_(p, alpha=0.5)
    reference = copy.deepcopy(ema)
    for layer in reference:
        if isinstance(layer, q4conv.Q4Conv2dCutlass):
            layer.qweight = None
    assert torch.equal(ema(x), reference(x))


def test_loaded_qweight_is_used_as_loaded():
    """A qweight that comes with the checkpoint is not packed again on first use."""
    layer = make_layer().eval()
    x = torch.randn(1, 20, 7, 7)
    y = layer(x)
    fresh = make_layer()
    fresh.load_state_dict(layer.state_dict())
    loaded = fresh.qweight
    fresh.eval()
    assert torch.equal(fresh(x), y) and fresh.qweight is loaded


def test_deploy_packs_changed_weights_without_storing_them():
    layer = make_layer(bias=True).eval()
    x = torch.randn(2, 20, 9, 9)
    y_before = layer(x)
    stored = layer.qweight
    with torch.no_grad():
        layer.weight.neg_()
    fused = q4conv.FusedQ4Conv2d.from_q4conv(layer)
    assert layer.qweight is stored
    y_fused = fused(x)
    assert not torch.equal(y_fused, y_before)
    assert torch.equal(y_fused, layer(x))


@pytest.mark.parametrize("device", DEVICES)
def test_qweight_only_round_trip(device):
    layer = make_layer(device, bias=True).eval()
    x = torch.randn(2, 20, 9, 9, device=device)
    y = layer(x)
    layer.generate_quantized_weight(qweight_only=True)
    assert layer.weight is None
    assert torch.equal(layer(x), y)
    state = layer.state_dict()
    assert "weight" not in state and state["qweight"].dtype == torch.uint8
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = make_layer(device, bias=True)
    torch.manual_seed(1)
    nn.init.normal_(fresh.weight)  # different float weights, replaced by the load
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh.eval()
    assert fresh.weight is None
    assert torch.equal(fresh(x), y)
    with pytest.raises(RuntimeError, match="inference"):
        fresh.train()(x)


def test_float_state_dict_round_trip_regenerates_qweight():
    layer = make_layer().eval()
    x = torch.randn(1, 20, 7, 7)
    y = layer(x)
    fresh = make_layer()
    nn.init.normal_(fresh.weight)
    fresh.eval()(x)  # creates a qweight from the wrong weights
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), y)


def test_bad_qweight_in_state_dict_raises():
    layer = make_layer().eval()
    layer.generate_quantized_weight(qweight_only=True)
    state = layer.state_dict()
    wrong = dict(state, qweight=state["qweight"][:, :, :, :-1].clone())
    with pytest.raises(ValueError, match="qweight"):
        make_layer().load_state_dict(wrong)
    missing = {k: v for k, v in state.items() if k != "qweight"}
    with pytest.raises(ValueError, match="qweight"):
        make_layer().load_state_dict(missing)


def test_unsupported_bits_raise():
    with pytest.raises(ValueError, match="a_bit"):
        make_layer(a_bit=3)
    with pytest.raises(ValueError, match="w_bit"):
        make_layer(w_bit=8)


@pytest.mark.parametrize("bad,match", [
    (torch.randn(20, 8, 8), "4-D"),
    (torch.randn(1, 19, 8, 8), "in_channels"),
    (torch.randn(1, 20, 8, 8).double(), "float32"),
    (torch.randint(0, 4, (1, 20, 8, 8)), "float32"),
])
def test_bad_inputs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        make_layer()(bad)


def test_kernel_larger_than_padded_input_raises():
    layer = q4conv.Q4Conv2dCutlass(4, 4, 5, padding=0)
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        layer(torch.randn(1, 4, 3, 8))


def test_op_level_errors_name_the_argument():
    ops = torch.ops.q4conv
    x = torch.randn(1, 4, 6, 6)
    w = torch.randn(4, 4, 3, 3)
    s = torch.tensor(0.1)
    args = ([1, 1], [0, 0], [1, 1], 1e-5, 4, "auto")
    with pytest.raises(RuntimeError, match="bias_a"):
        ops.conv_train(x, torch.zeros(3), s, w, s, None, *args)
    with pytest.raises(RuntimeError, match="scale_w"):
        ops.conv_train(x, torch.zeros(4), s, w, torch.ones(3), None, *args)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.conv_train(x, torch.zeros(4), s, w, s, torch.zeros(5), *args)
    with pytest.raises(RuntimeError, match="bits"):
        ops.conv_train(x, torch.zeros(4), s, w, s, None, *args[:4], 8, "auto")
    with pytest.raises(RuntimeError, match="backend must be one of"):
        ops.conv_train(x, torch.zeros(4), s, w, s, None, *args[:5], "fastest")
    with pytest.raises(RuntimeError, match="needs a CUDA input"):
        ops.conv_train(x, torch.zeros(4), s, w, s, None, *args[:5], "sm90_int8")
    with pytest.raises(RuntimeError, match="qweight"):
        ops.conv_packed(x, torch.zeros(4), s, torch.zeros(4, 3, 3, 5, dtype=torch.uint8), s, None,
                        *args[:5], False, "auto")


def test_empty_batch_layer():
    layer = make_layer()
    for mode in (True, False):
        y = layer.train(mode)(torch.randn(0, 20, 8, 8))
        assert y.shape == (0, 24, 4, 6)


@requires_cuda
def test_mismatched_devices_raise():
    layer = make_layer("cuda")
    with pytest.raises(ValueError, match="cuda"):
        layer(torch.randn(1, 20, 8, 8))
    s = torch.tensor(0.1)
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.q4conv.conv_train(torch.randn(1, 4, 6, 6, device="cuda"), torch.zeros(4), s,
                                    torch.randn(4, 4, 3, 3, device="cuda"), s.cuda(), None,
                                    [1, 1], [0, 0], [1, 1], 1e-5, 4, "auto")


def test_torch_compile_matches_eager():
    layer = make_layer(bias=True)
    x = torch.randn(2, 20, 8, 8)
    layer(x)  # initialise scale_a outside the compiled region
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    y.sum().backward()
    assert layer.weight.grad is not None
    layer.eval()
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


@requires_cuda
def test_eval_cache_follows_weight_and_scale_changes():
    """Eval mode caches kernel-layout weights and alpha; in-place changes of
    scale_w (which rescales the packed codes) and new weights must show."""
    layer = make_layer("cuda", bias=True).eval()
    x = torch.randn(2, 20, 9, 9, device="cuda", dtype=torch.float16)
    y = layer(x)
    assert torch.equal(layer(x), y)  # cached path, same result
    with torch.no_grad():
        layer.scale_w.mul_(2)
    y_scaled = layer(x)
    uncached = torch.ops.q4conv.conv_packed(
        x, layer.bias_a, layer.scale_a, layer.qweight, layer.scale_w, layer.bias, list(layer.stride),
        list(layer.padding), list(layer.dilation), 1e-5, 4, False, "auto")
    assert torch.equal(y_scaled, uncached) and not torch.equal(y_scaled, y)
    layer.train()
    with torch.no_grad():
        layer.weight.neg_()
    y_neg = layer.eval()(x)  # qweight regenerated from the new weights
    assert not torch.equal(y_neg, y_scaled)
    assert torch.equal(layer.train()(x), y_neg)


@pytest.mark.parametrize("device", DEVICES)
def test_first_eval_call_inside_inference_mode(device):
    """model.eval(); with torch.inference_mode(): model(x) -- the packed weights
    are then made inside inference mode (inference tensors, no version
    counter) and later calls, in or out of inference mode, agree."""
    layer = make_layer(device, bias=True)
    x = torch.randn(2, 20, 9, 11, device=device)
    y_train = layer(x)
    layer.eval()
    with torch.inference_mode():
        y_inference = layer(x)
        assert layer.qweight.is_inference()
        assert torch.equal(layer(x), y_inference)
    with torch.no_grad():
        assert torch.equal(layer(x), y_inference)
    assert torch.equal(y_inference, y_train)


def test_meta_device_construction_then_materialise():
    """Built on the meta device (as nn.Conv2d can be: no values, no host reads), materialised
    with to_empty and loaded, the layer gives the eagerly built layer's output; convert works
    on a model built under torch.device("meta") too."""
    ref = q4conv.Q4Conv2d(6, 8, 3, padding=1, bias=True).eval()
    x = torch.randn(2, 6, 7, 5)
    expected = ref(x)
    for assign in (False, True):
        layer = q4conv.Q4Conv2d(6, 8, 3, padding=1, bias=True, device="meta")
        assert layer.weight.is_meta and layer.eps.is_meta
        layer = layer.to_empty(device="cpu")
        layer.load_state_dict(ref.state_dict(), assign=assign)
        assert torch.equal(layer.eval()(x), expected)
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Conv2d(6, 8, 3), torch.nn.ReLU())
    converted = q4conv.convert(model)
    assert isinstance(converted[0], q4conv.Q4Conv2dCutlass) and converted[0].weight.is_meta
