"""Issue 17: silent wrong results, export side effects, the scale_a lifecycle,
errors that name the argument, float weight loading, eval-mode gradients."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import oracle
import q4conv
from conftest import DEVICES, Case, make_inputs

ops = torch.ops.q4conv
EPS = 1e-5


def make_layer(device="cpu", **kwargs) -> q4conv.Q4Conv2dCutlass:
    torch.manual_seed(0)
    args = dict(in_channels=6, out_channels=5, kernel_size=3, padding=1)
    args.update(kwargs)
    return q4conv.Q4Conv2dCutlass(**args, device=device)


def lsq_init(x: torch.Tensor, bias_a: torch.Tensor) -> float:
    return 2 * (x.double() + bias_a.detach().double().view(1, -1, 1, 1)).abs().mean().item() / math.sqrt(7)


def round_trip(layer: nn.Module, fresh: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


# ---------------------------------------------------------------- 1. N = 0
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_empty_batch_gradients_are_zero(device, per_channel):
    layer = make_layer(device, bias=True, per_channel_weight_scale=per_channel)
    layer(torch.randn(2, 6, 7, 7, device=device))  # initialise scale_a
    x = torch.randn(0, 6, 7, 7, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 5, 7, 7)
    y.sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "weight" and name != "scale_w":  # weight grads are sums over N too
            assert (p.grad == 0).all(), name
    assert (layer.weight.grad == 0).all() and (layer.scale_w.grad == 0).all()
    assert x.grad.shape == x.shape


def test_empty_batch_op_gradients_are_zero():
    case = Case(0, 4, 3, 6, 6, 3, 3)
    inputs = [t.detach().requires_grad_(True) for t in make_inputs(case, "cpu")]
    y = ops.conv_train(*inputs, [1, 1], [0, 0], [1, 1], EPS, 4, "auto")
    y.sum().backward()
    assert inputs[2].grad.item() == 0.0  # scale_a: was 0 * 1/sqrt(0) = NaN


# ---------------------------------------------------------------- 2. geometry overflow
def test_layer_rejects_overflowing_dilation():
    with pytest.raises(ValueError, match="dilation"):
        q4conv.Q4Conv2dCutlass(2, 2, 3, dilation=2**62)


def test_fake_kernel_rejects_overflowing_dilation():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, w = torch.randn(1, 2, 8, 8), torch.randn(2, 2, 3, 3)
        with pytest.raises(RuntimeError, match="dilation"):
            ops.conv_train(x, torch.zeros(2), torch.tensor(0.1), w, torch.tensor(0.1), None,
                           [1, 1], [0, 0], [2**62, 1], EPS, 4, "auto")


def test_op_rejects_overflowing_dilation():
    x, w = torch.randn(1, 2, 8, 8), torch.randn(2, 2, 3, 3)
    with pytest.raises(RuntimeError, match="dilation|kernel size"):
        ops.conv_train(x, torch.zeros(2), torch.tensor(0.1), w, torch.tensor(0.1), None,
                       [1, 1], [0, 0], [2**62, 1], EPS, 4, "auto")


# ---------------------------------------------------------------- 3. eps
def test_forward_uses_the_eps_buffer():
    layer = make_layer().eval()
    x = torch.randn(2, 6, 7, 7)
    y = layer(x)
    with torch.no_grad():
        layer.eps.fill_(2.0)  # above scale_a and scale_w: both become 2
    assert layer.scale_a.item() < 2.0 and layer.scale_w.item() < 2.0
    layer.qweight = None
    y_eval = layer(x)
    y_train = layer.train()(x)
    ref, _ = oracle.forward(x, layer.bias_a, layer.scale_a, layer.weight, layer.scale_w, None,
                            oracle.Conv((1, 1), (1, 1), (1, 1), 2.0))
    assert not torch.equal(y, y_eval)
    torch.testing.assert_close(y_eval.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(y_train, y_eval)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qweight_only", [False, True])
def test_half_layer_save_load_identical(dtype, qweight_only):
    """scale_a below eps (s_a = eps): the fp16/bf16 eps buffer's value is used live and after reload."""
    layer = make_layer(dtype=dtype).eval()
    torch.manual_seed(3)
    x = torch.randn(2, 6, 7, 7) * 4e-5
    layer(x)
    with torch.no_grad():
        layer.scale_a.zero_()
    assert float(layer.eps) != 1e-5  # the buffer holds the dtype's rounding of 1e-5
    layer.qweight = None
    y = layer(x)
    if qweight_only:
        layer.generate_quantized_weight(qweight_only=True)
    fresh = round_trip(layer, make_layer(dtype=dtype)).eval()
    assert torch.equal(fresh(x), y)
    assert torch.equal(layer(x), y)


# ---------------------------------------------------------------- 4. tracing never changes state
def test_export_does_not_touch_the_live_module():
    model = nn.Sequential(make_layer(), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].scale_a.fill_(0.3)
    x = torch.randn(2, 6, 7, 7)
    exported = torch.export.export(model, (x,))
    layer = model[0]
    assert layer.qweight is None and not layer.scale_a_initialized
    y = model(x)
    assert type(layer.qweight) is torch.Tensor and layer.scale_a.item() == pytest.approx(0.3)
    torch.save(model.state_dict(), io.BytesIO())
    assert torch.equal(exported.module()(x), y)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_and_compile_do_not_initialise(training):
    x = torch.randn(2, 6, 7, 7)
    layer = make_layer().train(training)
    torch.export.export(layer, (x,))
    assert layer.scale_a.item() == 0.0 and not layer.scale_a_initialized and layer.qweight is None
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(x)
    assert layer.scale_a.item() == 0.0 and not layer.scale_a_initialized and layer.qweight is None
    layer(x)  # eager: initialises
    assert layer.scale_a.item() == pytest.approx(lsq_init(x, layer.bias_a), rel=1e-5)


def test_jit_trace_does_not_initialise():
    layer = make_layer().eval()
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        torch.jit.trace(layer, x, check_trace=False)  # the check runs the module eagerly
    assert layer.scale_a.item() == 0.0 and layer.qweight is None


# ---------------------------------------------------------------- 5. scale_a lifecycle
def test_user_set_scale_a_is_kept():
    layer = make_layer()
    with torch.no_grad():
        layer.scale_a.fill_(0.123)
    layer(torch.randn(2, 6, 7, 7))
    assert layer.scale_a.item() == pytest.approx(0.123)
    assert bool(layer.scale_a_initialized)


def test_all_zero_first_batch_leaves_scale_uninitialised():
    layer = make_layer()
    layer(torch.zeros(2, 6, 7, 7))
    assert layer.scale_a.item() == 0.0 and not layer.scale_a_initialized
    x = torch.randn(2, 6, 7, 7)
    layer(x)
    assert layer.scale_a.item() == pytest.approx(lsq_init(x, layer.bias_a), rel=1e-5)
    assert bool(layer.scale_a_initialized)


def test_initialised_state_survives_save_load():
    layer = make_layer()
    x = torch.randn(2, 6, 7, 7)
    layer(x)
    with torch.no_grad():
        layer.scale_a.zero_()  # initialised, then set to 0 by the user: stays 0
    state = layer.state_dict()
    assert bool(state["scale_a_initialized"])
    fresh = round_trip(layer, make_layer())
    fresh(x * 3)
    assert fresh.scale_a.item() == 0.0
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("value,initialised", [(0.0, False), (0.25, True)])
def test_old_state_dict_without_flag(value, initialised):
    state = make_layer().state_dict()
    del state["scale_a_initialized"]
    state["scale_a"] = torch.tensor(value)
    layer = make_layer()
    layer.load_state_dict(state)  # strict: the flag is derived, not missing
    assert bool(layer.scale_a_initialized) == initialised
    x = torch.randn(1, 6, 5, 5)
    layer(x)
    expected = value if initialised else lsq_init(x, layer.bias_a)
    assert layer.scale_a.item() == pytest.approx(expected, rel=1e-5)


def test_calibrate_layer_and_model():
    layer = make_layer()
    x = torch.randn(2, 6, 7, 7)
    layer(x)
    y = torch.randn(2, 6, 7, 7) * 5
    layer.calibrate_(y)
    assert layer.scale_a.item() == pytest.approx(lsq_init(y, layer.bias_a), rel=1e-5)
    with pytest.raises(ValueError, match="scale_a unchanged"):
        layer.calibrate_(torch.zeros(1, 6, 7, 7))

    model = nn.Sequential(make_layer(), nn.ReLU(), make_layer(in_channels=5)).eval()
    batches = [torch.randn(2, 6, 7, 7), (torch.randn(3, 6, 7, 7) * 2,)]
    with torch.no_grad():
        model[2].scale_a.fill_(9.0)  # calibrate overwrites it
    q4conv.calibrate(model, batches)
    both = torch.cat([batches[0], batches[1][0]])
    assert model[0].scale_a.item() == pytest.approx(lsq_init(both, model[0].bias_a), rel=1e-5)
    assert model[2].scale_a.item() != pytest.approx(9.0)
    assert model[0]._calibration is None and all(bool(m.scale_a_initialized) for m in (model[0], model[2]))
    before = model[0].scale_a.item()
    model(torch.randn(1, 6, 7, 7) * 100)  # no longer calibrating
    assert model[0].scale_a.item() == before


def test_calibrate_rejects_no_batches_and_names_unreached_layers():
    model = nn.Sequential(make_layer(), nn.ReLU(), make_layer(in_channels=5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no batch"):
        q4conv.calibrate(model, iter([]), reset_weight_scales=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed

    class Branch(nn.Module):  # the second layer runs only on wide inputs
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = make_layer(), make_layer()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(x) if x.shape[-1] > 8 else self.a(x)

    branch = Branch()
    with pytest.warns(UserWarning, match=r"no batch reached these q4conv layers .*\['b'\]"):
        q4conv.calibrate(branch, [torch.randn(2, 6, 7, 7)])
    assert bool(branch.a.scale_a_initialized) and not bool(branch.b.scale_a_initialized)


def test_calibrate_names_layers_that_saw_only_zeros():
    """A layer behind a dead ReLU sees only zeros: no scale can be set, and calibrate says so
    (deploy would otherwise reject the model with scale_a uninitialised after a calibration)."""
    dead = make_layer(in_channels=5, out_channels=6)
    with torch.no_grad():
        dead.weight.zero_()
    model = nn.Sequential(make_layer(), nn.ReLU(), dead, nn.ReLU(), make_layer())
    with pytest.warns(UserWarning, match=r"only zero or non-finite activations.*\['4'\]"):
        q4conv.calibrate(model, [torch.randn(2, 6, 7, 7)])
    assert bool(model[0].scale_a_initialized) and bool(model[2].scale_a_initialized)
    assert not bool(model[4].scale_a_initialized) and float(model[4].scale_a.detach()) == 0


def test_a_copy_made_during_calibrate_is_a_plain_layer():
    """A deepcopy or pickle of a layer taken while q4conv.calibrate runs (a checkpoint between
    batches) does not carry the calibration's running statistic: its later forwards keep scale_a."""
    import copy

    layer = make_layer()
    x = torch.randn(2, 6, 7, 7)
    copies = {}

    def batches():
        yield x
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        copies["pickled"] = torch.load(buffer, weights_only=False)
        copies["deepcopy"] = copy.deepcopy(layer)
        yield x * 2

    q4conv.calibrate(layer, batches())
    for name, twin in copies.items():
        assert twin._calibration is None, name
        scale = float(twin.scale_a.detach())
        assert scale > 0, name
        with torch.no_grad():
            twin.eval()(x * 10)  # a forward of other data changes nothing
            twin.train()(x * 10)
        assert float(twin.scale_a.detach()) == scale, name


def test_calibrate_batch_forms():
    """A dict batch is keyword arguments; a loader's (inputs, labels) pairs fail in the model's
    forward with a note saying how to pass the inputs alone."""
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = make_layer()

        def forward(self, *, image: torch.Tensor) -> torch.Tensor:
            return self.conv(image)

    model = Keyword()
    q4conv.calibrate(model, [{"image": torch.randn(2, 6, 7, 7)}])
    assert bool(model.conv.scale_a_initialized)
    plain = nn.Sequential(make_layer())
    pairs = [(torch.randn(2, 6, 7, 7), torch.tensor([0, 1]))]
    with pytest.raises(TypeError) as error:
        q4conv.calibrate(plain, pairs)
    assert "for inputs, _ in loader" in "".join(getattr(error.value, "__notes__", []))
    q4conv.calibrate(plain, (inputs for inputs, _ in pairs))
    assert bool(plain[0].scale_a_initialized)


def test_freeze_scales():
    layer = make_layer()
    assert layer.freeze_scales() is layer
    assert not layer.scale_a.requires_grad and not layer.scale_w.requires_grad
    layer(torch.randn(2, 6, 7, 7)).sum().backward()
    assert layer.scale_a.grad is None and layer.scale_w.grad is None and layer.weight.grad is not None
    layer.freeze_scales(False)
    assert layer.scale_a.requires_grad and layer.scale_w.requires_grad
    assert not make_layer(learn_weight_scale=False).freeze_scales(False).scale_w.requires_grad


# ---------------------------------------------------------------- 6. op argument checks
def test_output_alpha_checks_arguments():
    s = torch.tensor(0.1)
    with pytest.raises(RuntimeError, match="out_channels"):
        ops.output_alpha(s, s, -1, EPS)
    with pytest.raises(RuntimeError, match="scale_w"):
        ops.output_alpha(s, torch.ones(3), 4, EPS)
    with pytest.raises(RuntimeError, match="scale_a"):
        ops.output_alpha(torch.ones(2), s, 4, EPS)


def test_conv_train_backward_checks_arguments():
    x, w = torch.randn(1, 4, 6, 6), torch.randn(3, 4, 3, 3)
    s, b = torch.tensor(0.1), torch.zeros(4)
    conv = ([1, 1], [0, 0], [1, 1], EPS)
    g = torch.randn(1, 3, 4, 4)
    ops.conv_train_backward(g, x, b, s, w, s, False, *conv, 4)  # valid
    bad = [
        ("grad_out", dict(g=torch.randn(1, 3, 5, 4))),
        ("grad_out", dict(g=torch.randn(3, 4, 4))),
        ("weight", dict(w=torch.randn(3, 4, 3))),
        ("x must have", dict(w=torch.randn(3, 5, 3, 3))),
        ("scale_a", dict(sa=torch.ones(2))),
        ("scale_w", dict(sw=torch.ones(2))),
        ("bias_a", dict(b=torch.zeros(3))),
        ("x must be 4-D", dict(x=torch.randn(4, 6, 6))),
    ]
    for match, change in bad:
        args = dict(g=g, x=x, b=b, sa=s, w=w, sw=s)
        args.update(change)
        with pytest.raises(RuntimeError, match=match):
            ops.conv_train_backward(args["g"], args["x"], args["b"], args["sa"], args["w"], args["sw"],
                                    False, *conv, 4)
    with pytest.raises(RuntimeError, match="bits"):
        ops.conv_train_backward(g, x, b, s, w, s, False, *conv, 8)


# ---------------------------------------------------------------- 7. constructor arguments
@pytest.mark.parametrize("kernel_size", [3, np.int64(3), torch.tensor(3), (3, 3), [3, 3], (np.int32(3), 3)],
                         ids=["int", "numpy", "tensor", "tuple", "list", "mixed"])
def test_integer_like_arguments(kernel_size):
    layer = q4conv.Q4Conv2dCutlass(np.int64(4), torch.tensor(2), kernel_size, stride=np.int64(1),
                                   padding=torch.tensor(1))
    assert layer.kernel_size == (3, 3) and layer.padding == (1, 1) and layer.in_channels == 4
    assert type(layer.in_channels) is int and type(layer.kernel_size[0]) is int


@pytest.mark.parametrize("name,value", [
    ("kernel_size", None), ("kernel_size", 3.0), ("kernel_size", True), ("kernel_size", (3, None)),
    ("kernel_size", (3, 3, 3)), ("kernel_size", torch.tensor(3.0)), ("kernel_size", torch.tensor([3, 3])),
    ("stride", 0), ("stride", "2"), ("padding", -1), ("padding", "full"), ("dilation", 1.5),
    ("in_channels", 3.5), ("out_channels", None), ("a_bit", 4.0),
])
def test_bad_arguments_name_themselves(name, value):
    args = dict(in_channels=4, out_channels=2, kernel_size=3)
    args[name] = value
    with pytest.raises(ValueError, match=name):
        q4conv.Q4Conv2dCutlass(**args)


@pytest.mark.parametrize("kernel_size,dilation,expected", [(3, 1, (1, 1)), (5, (1, 2), (2, 4)), ((1, 3), 1, (0, 1))])
def test_padding_same_and_valid(kernel_size, dilation, expected):
    layer = q4conv.Q4Conv2dCutlass(3, 4, kernel_size, padding="same", dilation=dilation)
    ref = nn.Conv2d(3, 4, kernel_size, padding="same", dilation=dilation)
    assert layer.padding == expected
    x = torch.randn(1, 3, 11, 12)
    assert layer(x).shape == ref(x).shape == (1, 4, 11, 12)
    assert q4conv.Q4Conv2dCutlass(3, 4, 3, padding="valid").padding == (0, 0)


def test_padding_same_errors():
    with pytest.raises(ValueError, match="symmetric"):
        q4conv.Q4Conv2dCutlass(3, 4, 4, padding="same")
    with pytest.raises(ValueError, match="stride"):
        q4conv.Q4Conv2dCutlass(3, 4, 3, stride=2, padding="same")


def test_groups_and_padding_mode():
    q4conv.Q4Conv2dCutlass(3, 4, 3, groups=1, padding_mode="zeros")
    with pytest.raises(ValueError, match="groups.*not supported"):
        q4conv.Q4Conv2dCutlass(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode.*not supported"):
        q4conv.Q4Conv2dCutlass(4, 4, 3, padding_mode="reflect")


# ---------------------------------------------------------------- 8. clear messages
def test_none_tensor_in_op_call_names_the_argument():
    x, w, s = torch.randn(1, 4, 6, 6), torch.randn(3, 4, 3, 3), torch.tensor(0.1)
    with pytest.raises((TypeError, RuntimeError), match="x must be a tensor, got None"):
        ops.conv_train(None, torch.zeros(4), s, w, s, None, [1, 1], [0, 0], [1, 1], EPS, 4, "auto")
    with pytest.raises((TypeError, RuntimeError), match="scale_w must be a tensor"):
        ops.output_alpha(s, None, 3, EPS)
    with pytest.raises((TypeError, RuntimeError), match="grad_out must be a tensor, got None"):
        ops.conv_train_backward(None, x, torch.zeros(4), s, w, s, False, [1, 1], [0, 0], [1, 1], EPS, 4)


@pytest.mark.parametrize("name,value", [("scale_a", torch.ones(2)), ("scale_w", torch.ones(3))])
def test_wrong_scale_shape_in_state_dict(name, value):
    state = make_layer().state_dict()
    state[name] = value
    with pytest.raises(ValueError, match=rf"{name} must be a tensor of shape \(\)"):
        make_layer().load_state_dict(state)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_double_backward_raises_clearly(mode):
    layer = make_layer()
    layer(torch.randn(2, 6, 7, 7))  # initialises scale_a
    layer.train(mode == "train")
    x = torch.randn(2, 6, 7, 7, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    (gx_first,) = torch.autograd.grad(layer(x).square().sum(), x)
    assert torch.equal(gx.detach(), gx_first)  # the first-order value is unchanged
    with pytest.raises(RuntimeError, match="q4conv does not support double backward"):
        gx.sum().backward()


# ---------------------------------------------------------------- 9. export routes
def test_jit_script_raises_clearly():
    with pytest.raises(RuntimeError, match="do not support torch.jit.script.*torch.export"):
        torch.jit.script(nn.Sequential(make_layer()))


def test_jit_trace_works():
    model = nn.Sequential(make_layer(bias=True), nn.ReLU()).eval()
    x = torch.randn(2, 6, 7, 7)
    y = model(x)
    traced = torch.jit.trace(model, x)  # grad mode on: the trace check compares two traces
    assert torch.equal(traced(x), y)
    x2 = torch.randn(3, 6, 9, 8)
    assert torch.equal(traced(x2), model(x2))


def test_onnx_export_raises_clearly(monkeypatch):
    model = nn.Sequential(make_layer()).eval()
    x = torch.randn(1, 6, 7, 7)
    model(x)
    # Whatever exporter is installed, forward refuses to run inside an ONNX export.
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    monkeypatch.setattr(q4conv.layer, "_jit_tracing", lambda: True)  # the TorchScript exporter traces
    with pytest.raises(RuntimeError, match="ONNX.*torch.export, torch.compile or torch.jit.trace"):
        model(x)


def test_torchscript_onnx_exporter_raises_clearly():
    model = nn.Sequential(make_layer()).eval()
    x = torch.randn(1, 6, 7, 7)
    model(x)
    with pytest.raises(RuntimeError, match="ONNX.*torch.export"):
        torch.onnx.export(model, (x,), io.BytesIO(), dynamo=False)


# ---------------------------------------------------------------- 10. float weights
def float_and_q4_models(bias: bool):
    torch.manual_seed(5)
    float_model = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1, bias=bias), nn.ReLU(),
                                nn.Conv2d(5, 4, 1, bias=bias))
    q4_model = nn.Sequential(make_layer(bias=bias), nn.ReLU(), make_layer(in_channels=5, out_channels=4,
                                                                          kernel_size=1, padding=0, bias=bias))
    return float_model, q4_model


def expected_scale_w(weight: torch.Tensor) -> float:
    return 2 * weight.detach().abs().mean().item() / math.sqrt(7)


@pytest.mark.parametrize("bias", [False, True])
def test_load_float_state_dict(bias):
    float_model, q4_model = float_and_q4_models(bias)
    q4_model(torch.randn(2, 6, 7, 7))  # scale_a initialised from other data
    keys = q4conv.load_float_state_dict(q4_model, float_model.state_dict())
    assert keys.missing_keys == [] and keys.unexpected_keys == []
    for i in (0, 2):
        layer, conv = q4_model[i], float_model[i]
        assert torch.equal(layer.weight, conv.weight)
        assert layer.scale_w.item() == pytest.approx(expected_scale_w(conv.weight), rel=1e-6)
        assert layer.scale_a.item() == 0.0 and not layer.scale_a_initialized
        if bias:
            assert torch.equal(layer.bias, conv.bias)
    x = torch.randn(2, 6, 7, 7)
    q4_model(x).sum().backward()  # ready to train
    assert q4_model[0].scale_a.item() == pytest.approx(lsq_init(x, q4_model[0].bias_a), rel=1e-5)
    with pytest.raises(RuntimeError, match="unexpected"):
        q4conv.load_float_state_dict(q4_model, dict(float_model.state_dict(), extra=torch.zeros(1)))


def test_non_strict_float_load_reinitialises_scale_w():
    float_model, q4_model = float_and_q4_models(False)
    q4_model.load_state_dict(float_model.state_dict(), strict=False)
    assert q4_model[0].scale_w.item() == pytest.approx(expected_scale_w(float_model[0].weight), rel=1e-6)


def test_load_float_weights_from_conv():
    conv = nn.Conv2d(6, 5, 3, padding="same", bias=True)
    layer = make_layer(bias=True)
    layer(torch.randn(1, 6, 7, 7))
    assert layer.load_float_weights(conv) is layer
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)
    assert layer.scale_w.item() == pytest.approx(expected_scale_w(conv.weight), rel=1e-6)
    assert not layer.scale_a_initialized and layer.scale_a.item() == 0.0
    with pytest.raises(ValueError, match="stride"):
        layer.load_float_weights(nn.Conv2d(6, 5, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match="bias"):
        make_layer().load_float_weights(conv)


# ---------------------------------------------------------------- 11. eval-mode input gradient
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor_scale", "channel_scale"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_eval_mode_input_gradient_matches_oracle(device, per_channel, channels_last):
    layer = make_layer(device, bias=True, per_channel_weight_scale=per_channel, stride=(2, 1), dilation=(1, 2))
    with torch.no_grad():
        layer.bias_a.uniform_(-0.3, 0.3)
    x = torch.randn(2, 6, 9, 10, device=device) * 2
    layer(x)  # initialise scale_a
    with torch.no_grad():
        layer.scale_a.mul_(0.5)  # many activations clipped
    layer.eval()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.detach().requires_grad_(True)
    y = layer(x)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
    y.backward(grad_out)

    x_ref = x.detach().double().cpu().requires_grad_(True)
    params = [p.detach().double().cpu() for p in (layer.bias_a, layer.scale_a, layer.weight, layer.scale_w, layer.bias)]
    conv = oracle.Conv(layer.stride, layer.padding, layer.dilation, EPS)
    ref = oracle.reference_training_forward(x_ref, *params, conv)
    ref.backward(grad_out.double().cpu())
    torch.testing.assert_close(y.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-5)
    clipped = x_ref.grad == 0
    assert clipped.any() and not clipped.all()
    assert ((x.grad.double().cpu() - x_ref.grad).norm() / x_ref.grad.norm()).item() < 1e-5
    assert x.grad.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert all(p.grad is None for p in layer.parameters())


def test_packed_op_relu_input_gradient():
    case = Case(2, 5, 4, 8, 8, 3, 3, (1, 1), (1, 1))
    x, bias_a, scale_a, weight, scale_w, bias = make_inputs(case, "cpu")
    qweight = ops.quantize_pack(weight, scale_w, EPS, 4)
    x = x.requires_grad_(True)
    y = ops.conv_packed(x, bias_a, scale_a, qweight, scale_w, bias, [1, 1], [1, 1], [1, 1], EPS, 4, True, "auto")
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(grad_out)
    x_ref = x.detach().double().requires_grad_(True)
    conv = oracle.Conv((1, 1), (1, 1), (1, 1), EPS)
    ref = torch.relu(oracle.reference_training_forward(
        x_ref, *(t.double() for t in (bias_a, scale_a, weight, scale_w, bias)), conv))
    ref.backward(grad_out.double())
    assert ((x.grad.double() - x_ref.grad).norm() / x_ref.grad.norm()).item() < 1e-5
