"""q4conv.convert (issue 18, item 1): float model -> q4conv model for QAT, with
convolutions that read the same tensor sharing one activation quantizer."""

from __future__ import annotations

import copy
import math
import pickle
import warnings
from typing import Callable, Dict, List

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import q4conv
from q4conv.models import randomize_batchnorm_, resnet18, resnet50

MODELS: Dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: resnet18(num_classes=10, width=8),
    "resnet50": lambda: resnet50(num_classes=10, width=8),
}


def float_model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm_(MODELS[arch](), torch.Generator().manual_seed(seed))


def batch(seed: int = 1, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def conv_names(model: nn.Module, kind: type) -> List[str]:
    return [name for name, m in model.named_modules() if isinstance(m, kind)]


def expected_groups(model: nn.Module) -> List[List[str]]:
    """(block.conv1, block.downsample.0) for every residual block with a downsample."""
    return [[f"{name}.conv1", f"{name}.downsample.0"] for name, m in model.named_modules()
            if getattr(m, "downsample", None) is not None]


def lsq_scale(x: torch.Tensor) -> float:
    return 2.0 * x.abs().mean().item() / math.sqrt(7)


def convert_quietly(model: nn.Module, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the ResNets convert with no warning at all
        return q4conv.convert(model, **kwargs)


# ------------------------------------------------------------------ replacement
@pytest.mark.parametrize("arch", MODELS)
def test_every_conv_replaced(arch):
    model = float_model(arch)
    names = conv_names(model, nn.Conv2d)
    converted = convert_quietly(model)
    assert converted is not model
    assert conv_names(converted, q4conv.Q4Conv2dCutlass) == names
    assert conv_names(converted, nn.Conv2d) == []
    assert conv_names(model, nn.Conv2d) == names  # inplace=False left the float model alone
    assert isinstance(converted.fc, nn.Linear) and torch.equal(converted.fc.weight, model.fc.weight)
    assert len(names) == {"resnet18": 20, "resnet50": 53}[arch]
    # DDP leaves the eps buffers alone (its broadcast would make every layer re-read eps)
    assert converted._ddp_params_and_buffers_to_ignore == [f"{name}.eps" for name in names]


def test_inplace_converts_the_model_itself():
    model = float_model("resnet18")
    assert convert_quietly(model, inplace=True) is model
    assert conv_names(model, nn.Conv2d) == []


def test_a_lone_conv_is_returned_converted():
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=True)
    layer = convert_quietly(conv)
    assert isinstance(layer, q4conv.Q4Conv2dCutlass) and torch.equal(layer.weight, conv.weight)


def check_carried(layer: q4conv.Q4Conv2dCutlass, conv: nn.Conv2d) -> None:
    assert type(layer) is q4conv.Q4Conv2dCutlass
    assert (layer.in_channels, layer.out_channels) == (conv.in_channels, conv.out_channels)
    assert layer.kernel_size == tuple(conv.kernel_size)
    assert layer.stride == tuple(conv.stride)
    assert layer.dilation == tuple(conv.dilation)
    if isinstance(conv.padding, str):
        x = torch.zeros(1, conv.in_channels, 9, 9, dtype=conv.weight.dtype)
        assert conv(x).shape[-2:] == nn.functional.conv2d(x, conv.weight.detach(), None, conv.stride,
                                                          layer.padding, conv.dilation).shape[-2:]
    else:
        assert layer.padding == tuple(conv.padding)
    assert layer.weight is not conv.weight and torch.equal(layer.weight, conv.weight)
    assert layer.weight.dtype == conv.weight.dtype and layer.weight.device == conv.weight.device
    assert layer.weight.requires_grad == conv.weight.requires_grad
    if conv.bias is None:
        assert layer.bias is None
    else:
        assert torch.equal(layer.bias, conv.bias)
    assert layer.training == conv.training
    # Prepared for QAT: scale_w from the weights (LSQ), scale_a left to the first batch.
    torch.testing.assert_close(layer.scale_w, torch.tensor(lsq_scale(conv.weight.detach()), dtype=layer.scale_w.dtype))
    assert float(layer.scale_a.detach()) == 0 and not bool(layer.scale_a_initialized)


@pytest.mark.parametrize("arch", MODELS)
def test_weights_and_geometry_carried(arch):
    model = float_model(arch)
    converted = convert_quietly(model)
    originals = dict(model.named_modules())
    for name, layer in converted.named_modules():
        if isinstance(layer, q4conv.Q4Conv2dCutlass):
            check_carried(layer, originals[name])


def test_bias_dtype_mode_string_padding_and_frozen_weights_carried():
    convs = nn.Sequential(
        nn.Conv2d(3, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=True),
        nn.Conv2d(6, 4, 3, padding="same", dilation=2, bias=True).double(),
        nn.Conv2d(4, 4, 2, padding="valid"),
    )
    convs[2].weight.requires_grad_(False)
    convs[1].eval()
    # float64 parameters are carried (the layer runs them on float32 / 16-bit x), with a warning
    # that a float64 model cannot feed them.
    with pytest.warns(UserWarning, match=r"float64 weights.*take float32, float16 or bfloat16 activations.*: 1;"):
        converted = q4conv.convert(convs)
    for layer, conv in zip(converted, convs):
        check_carried(layer, conv)
    assert converted[1].weight.dtype == torch.float64 and converted[1].padding == (2, 2)
    assert converted[1](torch.randn(1, 6, 5, 5)).dtype == torch.float32


def test_hooks_not_carried_over_are_named_in_a_warning():
    import torch.nn.utils.prune as prune

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    zero_before = (model[0].weight == 0).float().mean().item()
    with pytest.raises(RuntimeError, match=r"copy.deepcopy failed.*inplace=True"):
        q4conv.convert(model)  # PyTorch cannot deepcopy a pruned module
    with pytest.warns(UserWarning, match=r"forward hooks of these convolutions are not carried over.*: 0; "):
        converted = q4conv.convert(model, inplace=True)
    layer = converted[0]
    assert isinstance(layer, q4conv.Q4Conv2dCutlass) and not layer._forward_pre_hooks
    assert zero_before >= 0.5 and torch.equal(layer.weight == 0, model[0].weight == 0)  # the masked weights
    convert_quietly(nn.Sequential(nn.Conv2d(3, 8, 3)))  # no hook, no warning


# ------------------------------------------------------------------ skip
def test_skip_by_name_keeps_modules_and_whole_stages_float():
    model = float_model("resnet18")
    converted = convert_quietly(model, skip=["conv1", "layer1", "fc"])
    kept = conv_names(converted, nn.Conv2d)
    assert kept == ["conv1"] + [n for n in conv_names(model, nn.Conv2d) if n.startswith("layer1.")]
    assert len(conv_names(converted, q4conv.Q4Conv2dCutlass)) == 20 - len(kept)
    assert conv_names(convert_quietly(model, skip="conv1"), nn.Conv2d) == ["conv1"]


def test_skip_by_predicate():
    model = float_model("resnet50")
    converted = convert_quietly(model, skip=lambda name, m: m.kernel_size == (1, 1))
    assert all(m.kernel_size != (1, 1) for m in converted.modules() if isinstance(m, q4conv.Q4Conv2dCutlass))
    assert conv_names(converted, nn.Conv2d) == [n for n, m in model.named_modules()
                                                if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert q4conv.shared_quantizers(converted) == []  # every downsample stayed float


def test_skip_of_one_consumer_drops_its_group():
    model = float_model("resnet18")
    converted = convert_quietly(model, skip=["layer2.0.downsample.0"])
    assert q4conv.shared_quantizers(converted) == [g for g in expected_groups(model) if not g[0].startswith("layer2.")]


def test_unknown_skip_names_raise():
    model = float_model("resnet18")
    with pytest.raises(ValueError, match=r"skip.*\['conv_1', 'layer9'\]"):
        q4conv.convert(model, skip=["conv1", "conv_1", "layer9"])


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(skip=3), TypeError, "skip"),
    (dict(skip=["conv1", 2]), TypeError, "skip"),
    (dict(a_bit=3), ValueError, "a_bit"),
    (dict(w_bit=8), ValueError, "w_bit"),
    (dict(a_bit=4.0), ValueError, "a_bit"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(inplace="yes"), TypeError, "inplace"),
    (dict(share_quantizers=1), TypeError, "share_quantizers"),
    (dict(per_channel_weight_scale=None), TypeError, "per_channel_weight_scale"),
])
def test_bad_arguments_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        q4conv.convert(float_model("resnet18"), **kwargs)


def test_a_model_that_is_not_a_module_raises():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        q4conv.convert("resnet18")


def test_per_channel_and_backend_reach_the_layers():
    converted = convert_quietly(nn.Sequential(nn.Conv2d(3, 5, 3)), per_channel_weight_scale=True, backend="fallback")
    assert converted[0].scale_w.shape == (5,) and converted[0].backend == "fallback"


# ------------------------------------------------------------------ what stays float
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 16, 1, groups=2)
        self.reflect = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
        self.same_even = nn.Conv2d(16, 16, 2, padding="same")
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(self.depthwise(self.stem(x)))
        return self.head(self.same_even(self.reflect(x)))


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's, from the float conv kept
def test_grouped_depthwise_and_other_padding_stay_float_with_one_warning():
    model = Mixed()
    with pytest.warns(UserWarning) as record:
        converted = q4conv.convert(model)
    messages = [str(w.message) for w in record if "stay float" in str(w.message)]
    assert len(messages) == 1
    for name in ("depthwise", "grouped", "reflect", "same_even"):
        assert name in messages[0]
        assert type(getattr(converted, name)) is nn.Conv2d
        assert torch.equal(getattr(converted, name).weight, getattr(model, name).weight)
    assert "stem" not in messages[0] and "head" not in messages[0]
    assert isinstance(converted.stem, q4conv.Q4Conv2dCutlass) and isinstance(converted.head, q4conv.Q4Conv2dCutlass)
    assert torch.isfinite(converted(torch.randn(2, 3, 8, 8))).all()


def test_skipped_ineligible_convs_are_not_reported():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = q4conv.convert(Mixed(), skip=["depthwise", "grouped", "reflect", "same_even"])
    assert conv_names(converted, q4conv.Q4Conv2dCutlass) == ["stem", "head"]


# ------------------------------------------------------------------ shared quantizers
@pytest.mark.parametrize("arch", MODELS)
def test_shared_groups_are_the_downsample_pairs(arch):
    model = float_model(arch)
    converted = convert_quietly(model)
    groups = q4conv.shared_quantizers(converted)
    assert groups == expected_groups(model) and len(groups) == {"resnet18": 3, "resnet50": 4}[arch]
    layers = dict(converted.named_modules())
    for first, second in groups:
        a, b = layers[first], layers[second]
        assert a.bias_a is b.bias_a and a.scale_a is b.scale_a
        assert a.scale_a_initialized is b.scale_a_initialized
    # No other layer shares anything.
    scales = [id(m.scale_a) for m in converted.modules() if isinstance(m, q4conv.Q4Conv2dCutlass)]
    assert len(set(scales)) == len(scales) - len(groups)
    assert q4conv.shared_quantizers(convert_quietly(model, share_quantizers=False)) == []


def test_first_consumer_initialises_the_shared_scale_once():
    converted = convert_quietly(float_model("resnet18"))
    block = converted.layer2[0]
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    block.downsample[0](x)  # the block's forward runs the downsample first
    assert float(block.conv1.scale_a.detach()) == pytest.approx(lsq_scale(x), rel=1e-5)
    block.conv1(10 * x)  # a different statistic: initialising again would change scale_a
    assert float(block.conv1.scale_a.detach()) == pytest.approx(lsq_scale(x), rel=1e-5)
    assert bool(block.conv1.scale_a_initialized) and block.conv1._scale_a_ready


def test_a_reset_through_one_consumer_reinitialises_the_group():
    """load_float_weights on one layer of a group resets the shared scale_a: the
    other layer, if it runs first, must initialise it again (not run with
    scale_a = 0, i.e. s_a = eps), and pickling keeps the group's flag shared."""
    converted = convert_quietly(float_model("resnet18"))
    block = converted.layer2[0]
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    block.downsample[0](x)
    block.conv1.load_float_weights(nn.Conv2d(block.conv1.in_channels, block.conv1.out_channels, 3,
                                             stride=2, padding=1, bias=False))
    assert float(block.conv1.scale_a.detach()) == 0 and not block.downsample[0]._scale_a_ready
    block.downsample[0](3 * x)
    assert float(block.conv1.scale_a.detach()) == pytest.approx(lsq_scale(3 * x), rel=1e-5)
    assert block.conv1._scale_a_ready
    copied = pickle.loads(pickle.dumps(converted)).layer2[0]
    copied.conv1._scale_a_ready = False
    assert not copied.downsample[0]._scale_a_ready


class TwoInputs(nn.Module):
    """a reads x and y, b reads x, c reads y: one quantizer for all three."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x)
        return self.a(x) + self.b(x) + self.a(y) + self.c(y) + self.d(x + 1)


def test_a_conv_reading_two_tensors_joins_both_groups():
    assert q4conv.shared_quantizers(convert_quietly(TwoInputs())) == [["a", "b", "c"]]


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.sum() > 0 else self.b(x)


def test_untraceable_model_converts_without_sharing_and_warns():
    with pytest.warns(UserWarning, match="could not trace DataDependent"):
        converted = q4conv.convert(DataDependent())
    assert conv_names(converted, q4conv.Q4Conv2dCutlass) == ["a", "b"]
    assert q4conv.shared_quantizers(converted) == []
    assert converted(torch.ones(1, 3, 4, 4)).shape == (1, 4, 4, 4)


# ------------------------------------------------------------------ training
def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    target = torch.arange(x.shape[0]) % 10
    return nn.functional.cross_entropy(model(x), target)


@pytest.mark.parametrize("arch", MODELS)
def test_sgd_step_accumulates_both_consumers_into_the_shared_parameters(arch):
    model = float_model(arch)
    shared = convert_quietly(model)
    separate = convert_quietly(model, share_quantizers=False)
    x = batch()
    loss = loss_of(shared, x)
    loss_separate = loss_of(separate, x)
    # Same float weights, same first batch: the same forward.
    assert torch.isfinite(loss) and torch.equal(loss, loss_separate)
    loss.backward()
    loss_separate.backward()
    groups = q4conv.shared_quantizers(shared)
    params = list(shared.parameters())
    assert len(params) == len({id(p) for p in params}) == len(list(separate.parameters())) - 2 * len(groups)
    layers, separate_layers = dict(shared.named_modules()), dict(separate.named_modules())
    for first, second in groups:
        for name in ("scale_a", "bias_a"):
            grad_first = getattr(separate_layers[first], name).grad
            grad_second = getattr(separate_layers[second], name).grad
            grad = getattr(layers[first], name).grad
            torch.testing.assert_close(grad, grad_first + grad_second, rtol=1e-5, atol=1e-7)
            # Both contributions matter, so the assertion above could fail.
            assert not torch.allclose(grad, grad_first) and not torch.allclose(grad, grad_second)

    optimizer = torch.optim.SGD(shared.parameters(), lr=0.01)
    scale_a = layers[groups[0][0]].scale_a
    before, step = scale_a.detach().clone(), scale_a.grad.clone()
    optimizer.step()  # each parameter once: the shared scale moves by one step of the summed gradient
    torch.testing.assert_close(scale_a.detach(), before - 0.01 * step)
    assert torch.isfinite(loss_of(shared, x))


# ------------------------------------------------------------------ equivalence
def convert_by_hand(model: nn.Module) -> nn.Module:
    """Each nn.Conv2d replaced by a q4conv layer built by hand, no sharing."""
    model = copy.deepcopy(model)
    for name, conv in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]:
        parent_name, _, child = name.rpartition(".")
        layer = q4conv.Q4Conv2dCutlass(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                       conv.padding, conv.dilation, bias=conv.bias is not None)
        setattr(model.get_submodule(parent_name), child, layer.load_float_weights(conv))
    return model


@pytest.mark.parametrize("arch", MODELS)
def test_eval_output_equals_a_conversion_by_hand(arch):
    model = float_model(arch).eval()
    converted, by_hand = convert_quietly(model), convert_by_hand(model)
    x = batch()
    with torch.no_grad():
        assert torch.equal(converted(x), by_hand(x))  # first batch initialises the scales
        q4conv.calibrate(converted, [batch(2), batch(3)])
        q4conv.calibrate(by_hand, [batch(2), batch(3)])
        assert torch.equal(converted(x), by_hand(x))


def trained(arch: str) -> nn.Module:
    """A converted model after one SGD step (scales and bias_a non-trivial), in eval mode."""
    model = convert_quietly(float_model(arch))
    loss_of(model, batch()).backward()
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    return model.eval()


def test_state_dict_round_trip_keeps_predictions_and_sharing():
    model = trained("resnet18")
    x = batch(5)
    with torch.no_grad():
        expected = model(x)
        fresh = convert_quietly(float_model("resnet18", seed=7))
        fresh.load_state_dict(model.state_dict())
        fresh.eval()
        assert torch.equal(fresh(x), expected)
    assert q4conv.shared_quantizers(fresh) == q4conv.shared_quantizers(model) == expected_groups(model)
    for first, second in q4conv.shared_quantizers(fresh):
        a, b = fresh.get_submodule(first), fresh.get_submodule(second)
        assert a.scale_a is b.scale_a and a.bias_a is b.bias_a and a._scale_a_ready and b._scale_a_ready


def test_sharing_survives_load_state_dict_with_assign():
    """load_state_dict(assign=True) gives every layer new Parameter objects; a group that shared
    one quantizer in the checkpoint (one tensor) shares one again, and trains it as one."""
    import io

    model = trained("resnet18")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = convert_quietly(float_model("resnet18", seed=7))
    fresh.load_state_dict(torch.load(buffer), assign=True)
    groups = q4conv.shared_quantizers(fresh)
    assert groups == q4conv.shared_quantizers(model) == expected_groups(model)
    assert len(list(fresh.parameters())) == len(list(model.parameters()))
    for first, second in groups:
        a, b = fresh.get_submodule(first), fresh.get_submodule(second)
        assert a.scale_a is b.scale_a and a.bias_a is b.bias_a
        assert a.scale_a_initialized is b.scale_a_initialized and a._scale_a_flag is b._scale_a_flag
    x = batch(5)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    # Sharing follows the target model: one converted without it stays without it ...
    separate = convert_quietly(float_model("resnet18"), share_quantizers=False)
    separate.load_state_dict(model.state_dict(), assign=True)
    assert q4conv.shared_quantizers(separate) == []
    # ... and a checkpoint holding separate tensors (assign takes its tensors) gives separate ones.
    unshared = {k: v.clone() for k, v in model.state_dict().items()}
    again = convert_quietly(float_model("resnet18", seed=3))
    again.load_state_dict(unshared, assign=True)
    assert q4conv.shared_quantizers(again) == []


def test_sharing_survives_deepcopy_and_to():
    model = trained("resnet18")
    groups = q4conv.shared_quantizers(model)
    x = batch(6)
    with torch.no_grad():
        expected = model(x)
        copied = copy.deepcopy(model)
        assert q4conv.shared_quantizers(copied) == groups and torch.equal(copied(x), expected)
        moved = copied.to(torch.float64).to("cpu")
        assert q4conv.shared_quantizers(moved) == groups
        for first, second in groups:
            a, b = moved.get_submodule(first), moved.get_submodule(second)
            assert a.bias_a is b.bias_a and a.scale_a.dtype == torch.float64
            assert a.scale_a_initialized is b.scale_a_initialized


# ------------------------------------------------------------------ odd geometry
def conv_arguments():
    kernel = st.tuples(st.integers(1, 4), st.integers(1, 4))
    return st.fixed_dictionaries({
        "in_channels": st.integers(1, 9), "out_channels": st.integers(1, 9), "kernel_size": kernel,
        "stride": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "padding": st.one_of(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.integers(0, 2),
                             st.sampled_from(["same", "valid"])),
        "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)), "bias": st.booleans(),
    })


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=conv_arguments(), seed=st.integers(0, 2**16), train=st.booleans())
def test_odd_conv_arguments_match_a_layer_built_by_hand(args, seed, train):
    if args["padding"] == "same":
        args["stride"] = (1, 1)  # as nn.Conv2d requires
    conv = nn.Conv2d(**args)
    x = torch.randn(2, args["in_channels"], 11, 10, generator=torch.Generator().manual_seed(seed))
    symmetric = args["padding"] != "same" or all(d * (k - 1) % 2 == 0 for k, d in zip(args["kernel_size"], args["dilation"]))
    if not symmetric:  # nn.Conv2d pads asymmetrically here: the conv stays float, with a warning
        with pytest.warns(UserWarning, match="asymmetric"):
            assert type(q4conv.convert(nn.Sequential(conv))[0]) is nn.Conv2d
        return
    converted = convert_quietly(nn.Sequential(conv))[0]
    check_carried(converted, conv)
    by_hand = q4conv.Q4Conv2dCutlass(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                     conv.padding, conv.dilation, bias=conv.bias is not None)
    by_hand.load_float_weights(conv)
    converted.train(train), by_hand.train(train)
    with torch.no_grad():
        for _ in range(2):  # the first call initialises scale_a, the second uses it
            y = converted(x)
            assert torch.equal(y, by_hand(x)) and y.shape == conv(x).shape
