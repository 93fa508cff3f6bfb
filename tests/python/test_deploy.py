"""q4conv.deploy (SPEC section 8, first stage: float outputs).

The deployed model is compared with the same model unfused (eval, no deploy).

Per block (q4conv -> BatchNorm -> ReLU), with g = gamma / sqrt(var + eps),
alpha the op's fp32 s_a * s_w, acc the exact integer accumulator,
A = |g * alpha * acc| and B = |g| * (|conv_bias| + |running_mean|) + |beta|
(the magnitudes both computations round), u = 2^-24 (fp32 unit roundoff) and
u_d, t_d the unit roundoff and subnormal spacing of x's dtype:

    |fused - unfused|   <= (8 u + 3 u_d) (A + B) + 3 t_d (1 + |g|)
    |fused - exact|     <= (4 u +   u_d) (A + B) +   t_d

The fp32 terms are the fold's rounding (alpha' and shift rounded once from
float64) and the unfused path's own fp32 BatchNorm arithmetic; the u_d terms
are the roundings to x's dtype (the unfused path rounds the conv output
before the BatchNorm and the BatchNorm's output, the fused one only its
output). ReLU is 1-Lipschitz and adds nothing.

Whole ResNets (fp32 on CPU; BN randomised with negative gammas): top-1
agreement >= 99.9% and max |logit difference| <= 1e-5 * max |logit|.
"""

from __future__ import annotations

import copy
import io
import warnings
import os
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import oracle
import q4conv
from conftest import requires_cuda
from q4conv import FusedQ4Conv2d
from q4conv.models import randomize_batchnorm_, resnet18, resnet50

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE_PARAMS = ["cpu", pytest.param("cuda", marks=requires_cuda)]
U32 = 2.0 ** -24


# ------------------------------------------------------------------ helpers
def to_q4(model: nn.Module) -> nn.Module:
    """Every nn.Conv2d (groups=1) of ``model`` replaced by a Q4Conv2dCutlass with its weights."""
    for name, child in model.named_children():
        if isinstance(child, nn.Conv2d) and child.groups == 1:
            layer = q4conv.Q4Conv2dCutlass(child.in_channels, child.out_channels, child.kernel_size,
                                           child.stride, child.padding, child.dilation,
                                           bias=child.bias is not None, device=child.weight.device)
            layer.load_float_weights(child)  # prepare_params() included
            setattr(model, name, layer)
        else:
            to_q4(child)
    return model


def calibrated(model: nn.Module, shape, batches: int = 2, seed: int = 0) -> nn.Module:
    """Activation scales from a few random batches, then eval()."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    q4conv.calibrate(model, [torch.randn(*shape, generator=gen) for _ in range(batches)])
    return model.eval()


def q4_resnet(builder, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = builder(num_classes=10, width=8)
    randomize_batchnorm_(model, torch.Generator().manual_seed(seed))
    return calibrated(to_q4(model), (16, 3, 32, 32), seed=seed)


def fused_layers(gm: nn.Module):
    return {name: m for name, m in gm.named_modules() if isinstance(m, FusedQ4Conv2d)}


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def subnormal_spacing(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny * torch.finfo(dtype).eps


def block_terms(conv: q4conv.Q4Conv2dCutlass, bn: Optional[nn.BatchNorm2d], relu: bool, x: torch.Tensor):
    """(exact fold in float64, A + B, |g|) of relu?(bn?(conv(x))), on the CPU."""
    eps = float(conv.eps)
    geometry = oracle.Conv(conv.stride, conv.padding, conv.dilation, eps)
    acc = oracle.integer_conv(oracle.activation_codes(x.cpu(), conv.bias_a.cpu(), conv.scale_a.cpu(), eps),
                              oracle.weight_codes(conv.weight.cpu(), conv.scale_w.cpu(), eps), geometry)
    k = conv.out_channels
    alpha = q4conv.ops.output_alpha(conv.scale_a.detach().cpu(), conv.scale_w.detach().cpu(), k, eps).double()
    bias = conv.bias.detach().double().cpu() if conv.bias is not None else torch.zeros(k, dtype=torch.float64)
    if bn is None:
        g, mean, beta = torch.ones(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), 0.0
    else:
        var, mean = bn.running_var.double().cpu(), bn.running_mean.double().cpu()
        gamma = bn.weight.detach().double().cpu() if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.detach().double().cpu() if bn.bias is not None else torch.zeros_like(var)
        g = gamma / torch.sqrt(var + bn.eps)
        beta = beta.view(1, -1, 1, 1)
    view = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    exact = view(g) * (view(alpha) * acc + view(bias) - view(mean)) + beta
    if relu:
        exact = exact.clamp_min(0)
    magnitude = (view(g * alpha) * acc).abs() + view(g.abs() * (bias.abs() + mean.abs())) + abs(beta)
    return exact, magnitude, view(g.abs())


def check_block(conv, bn, relu, x, fused_out, unfused_out, ratios: Optional[list] = None) -> None:
    """The two bounds of the module docstring, elementwise."""
    exact, magnitude, g = block_terms(conv, bn, relu, x)
    u_d, t_d = unit_roundoff(x.dtype), subnormal_spacing(x.dtype)
    fused, unfused = fused_out.double().cpu(), unfused_out.double().cpu()
    bound_unfused = (8 * U32 + 3 * u_d) * magnitude + 3 * t_d * (1 + g)
    bound_exact = (4 * U32 + u_d) * magnitude + t_d
    diff_unfused, diff_exact = (fused - unfused).abs(), (fused - exact).abs()
    assert (diff_unfused <= bound_unfused).all(), (
        f"fused vs unfused: max diff {diff_unfused.max().item():.3g}, worst ratio "
        f"{(diff_unfused / bound_unfused).max().item():.3g}")
    assert (diff_exact <= bound_exact).all(), (
        f"fused vs exact fold: max diff {diff_exact.max().item():.3g}, worst ratio "
        f"{(diff_exact / bound_exact).max().item():.3g}")
    if ratios is not None:
        ratios.append((diff_unfused / bound_unfused).max().item())


class Block(nn.Module):
    """q4conv -> BatchNorm -> ReLU in one of the forms deploy recognises."""

    def __init__(self, c=8, k=12, kernel=3, relu="module", bn=True, bias=False, **conv_args):
        super().__init__()
        self.conv = q4conv.Q4Conv2dCutlass(c, k, kernel, bias=bias, **conv_args)
        self.bn = nn.BatchNorm2d(k) if bn else None
        self.form = relu
        self.act = nn.ReLU(inplace=relu == "module_inplace")

    def forward(self, x):
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        form = self.form
        if form in ("module", "module_inplace"):
            return self.act(y)
        if form == "F.relu":
            return F.relu(y)
        if form == "F.relu_inplace":
            return F.relu(y, inplace=True)
        if form == "F.relu_":
            return F.relu_(y)
        if form == "torch.relu":
            return torch.relu(y)
        if form == "torch.relu_":
            return torch.relu_(y)
        if form == "method":
            return y.relu()
        if form == "method_":
            return y.relu_()
        return y


def make_block(seed=0, **kwargs) -> Block:
    torch.manual_seed(seed)
    block = Block(**kwargs)
    randomize_batchnorm_(block, torch.Generator().manual_seed(seed))
    return calibrated(block, (2, block.conv.in_channels, 10, 9), seed=seed)


# ------------------------------------------------------------------ per block
RELU_FORMS = ["module", "module_inplace", "F.relu", "F.relu_inplace", "F.relu_", "torch.relu",
              "torch.relu_", "method", "method_"]


@pytest.mark.parametrize("form", RELU_FORMS)
def test_every_relu_form_fuses(form):
    block = make_block(relu=form)
    deployed = q4conv.deploy(block)
    fused = fused_layers(deployed)
    assert list(fused) == ["conv"] and fused["conv"].relu and fused["conv"].shift is not None
    ops = [n for n in deployed.graph.nodes if n.op not in ("placeholder", "output")]
    assert len(ops) == 1, deployed.code  # the one fused call
    x = torch.randn(3, 8, 10, 9)
    with torch.no_grad():
        check_block(block.conv, block.bn, True, x, deployed(x), block(x))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_block_numerics_dtypes_and_formats(device, dtype, channels_last):
    block = make_block(c=19, k=24, bias=True, stride=2, padding=1).to(device)
    deployed = q4conv.deploy(block)
    x = torch.randn(2, 19, 13, 11, device=device).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, ref = deployed(x), block(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.dtype == dtype and out.device == x.device and out.is_contiguous(memory_format=fmt)
    check_block(block.conv, block.bn, True, x, out, ref)


def test_relu_alone_and_bn_alone():
    relu_only = make_block(bn=False, bias=True, relu="F.relu")
    bn_only = make_block(relu=None, padding=1)
    x = torch.randn(2, 8, 10, 9)
    for block, relu in ((relu_only, True), (bn_only, False)):
        deployed = q4conv.deploy(block)
        (fused,) = fused_layers(deployed).values()
        assert fused.relu is relu
        with torch.no_grad():
            check_block(block.conv, block.bn, relu, x, deployed(x), block(x))
    # Without a bias and without BN the epilogue has no shift at all.
    plain = q4conv.deploy(make_block(bn=False, relu="module"))
    assert plain.conv.shift is None and "conv.shift" not in plain.state_dict()


@st.composite
def block_cases(draw):
    r, s = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    conv = dict(c=draw(st.integers(1, 20)), k=draw(st.integers(1, 20)), kernel=(r, s),
                stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
                padding=(draw(st.integers(0, 2)), draw(st.integers(0, 2))), dilation=dilation,
                bias=draw(st.booleans()), per_channel_weight_scale=draw(st.booleans()))
    h = draw(st.integers(dilation[0] * (r - 1) + 1, 9))
    w = draw(st.integers(dilation[1] * (s - 1) + 1, 9))
    bn = dict(affine=draw(st.booleans()), eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
              gamma_sign=draw(st.sampled_from([-1.0, 1.0, 0.0])),  # 0.0: mixed signs
              log_var=draw(st.floats(-6, 4)), mean_scale=draw(st.sampled_from([0.0, 0.1, 3.0])))
    return dict(conv=conv, bn=bn, n=draw(st.integers(1, 2)), hw=(h, w), relu=draw(st.booleans()),
                dtype=draw(st.sampled_from(DTYPES)), channels_last=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


RATIOS: list = []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=block_cases())
def test_fold_property(case):
    """The fold's bounds over conv geometry and BatchNorm parameters (negative,
    zero-crossing and affine-free gammas, tiny and huge variances)."""
    gen = torch.Generator().manual_seed(case["seed"])
    conv_args = dict(case["conv"])
    c, k, kernel = conv_args.pop("c"), conv_args.pop("k"), conv_args.pop("kernel")
    torch.manual_seed(case["seed"])
    block = Block(c, k, kernel, relu="module" if case["relu"] else None, **conv_args)
    p = case["bn"]
    block.bn = nn.BatchNorm2d(k, eps=p["eps"], affine=p["affine"])
    with torch.no_grad():
        block.bn.running_var.copy_(torch.exp(p["log_var"] + torch.randn(k, generator=gen)))
        block.bn.running_mean.copy_(torch.randn(k, generator=gen) * p["mean_scale"])
        if p["affine"]:
            gamma = torch.randn(k, generator=gen).abs() * 2
            block.bn.weight.copy_(gamma * p["gamma_sign"] if p["gamma_sign"] else torch.randn(k, generator=gen))
            block.bn.bias.copy_(torch.randn(k, generator=gen))
        if block.conv.bias is not None:
            block.conv.bias.copy_(torch.randn(k, generator=gen))
    shape = (case["n"], c, *case["hw"])
    calibrated(block, shape, seed=case["seed"])
    x = (torch.randn(*shape, generator=gen) * 2).to(case["dtype"])
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    deployed = q4conv.deploy(block)
    assert list(fused_layers(deployed)) == ["conv"]
    with torch.no_grad():
        check_block(block.conv, block.bn, case["relu"], x, deployed(x), block(x), RATIOS)


def test_bound_is_tight_enough_to_fail():
    """The bound rejects a fold whose alpha' is off by 2^-16 (relative) on one channel."""
    block = make_block(c=16, k=8, padding=1)
    deployed = q4conv.deploy(block)
    x = torch.randn(2, 16, 10, 9)
    with torch.no_grad():
        deployed.conv.alpha[3] *= 1 + 2.0 ** -16
        with pytest.raises(AssertionError, match="fused vs"):
            check_block(block.conv, block.bn, True, x, deployed(x), block(x))


# ------------------------------------------------------------------ whole ResNets
@pytest.mark.parametrize("builder", [resnet18, resnet50], ids=["resnet18", "resnet50"])
def test_resnet_top1_agreement(builder):
    model = q4_resnet(builder, seed=0)
    deployed = q4conv.deploy(model)
    convs = [m for m in model.modules() if isinstance(m, q4conv.Q4Conv2dCutlass)]
    # Every q4conv layer of a torchvision ResNet is followed by BN: all fuse.
    assert len(fused_layers(deployed)) == len(convs)
    assert not any(isinstance(m, (nn.BatchNorm2d, q4conv.Q4Conv2dCutlass)) for m in deployed.modules())
    x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        for fmt in (torch.contiguous_format, torch.channels_last):
            out = deployed(x.contiguous(memory_format=fmt))
            agreement = (out.argmax(1) == ref.argmax(1)).double().mean().item()
            max_diff, scale = (out - ref).abs().max().item(), ref.abs().max().item()
            print(f"\n{builder.__name__} {fmt}: top-1 agreement {agreement:.4f}, "
                  f"max |logit diff| {max_diff:.3g} (max |logit| {scale:.3g})")
            assert agreement >= 0.999
            assert max_diff <= 1e-5 * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resnet_low_precision_runs(dtype):
    """fp16 / bf16 models deploy and run, keeping dtype and memory format. Their
    agreement with the unfused model is printed, not asserted: the unfused model
    rounds every conv output to 16 bits before its BN and a 4-bit network
    amplifies such roundings (its own fp32 and fp16 runs disagree as much)."""
    model = q4_resnet(resnet18, seed=0).to(dtype)
    deployed = q4conv.deploy(model)
    x = torch.randn(64, 3, 32, 32).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, ref = deployed(x), model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    agreement = (out.argmax(1) == ref.argmax(1)).double().mean().item()
    print(f"\nresnet18 {dtype}: top-1 agreement with the unfused {dtype} model {agreement:.3f}")


# ------------------------------------------------------------------ unsupported patterns
class Patterns(nn.Module):
    """One branch per pattern deploy must leave (partly) unfused."""

    def __init__(self):
        super().__init__()
        q = lambda: q4conv.Q4Conv2dCutlass(6, 6, 3, padding=1)  # noqa: E731
        self.twice, self.bn_twice = q(), nn.BatchNorm2d(6)            # conv output used twice
        self.shared_bn, self.bn_shared = q(), nn.BatchNorm2d(6)       # BN output used twice
        self.train_bn, self.bn_train = q(), nn.BatchNorm2d(6)         # BN in training mode
        self.batch_stats, self.bn_batch = q(), nn.BatchNorm2d(6)     # no running statistics (below)
        self.leaky = q()                                              # not a ReLU
        self.relu_first, self.bn_after = q(), nn.BatchNorm2d(6)       # ReLU then BN: ReLU fuses
        self.inplace, self.bn_inplace = q(), nn.BatchNorm2d(6)        # relu_ on a BN output used later
        self.shared, self.bn_s1, self.bn_s2 = q(), nn.BatchNorm2d(6), nn.BatchNorm2d(6)  # one layer, two calls
        self.alone = q()                                              # nothing after it

    def forward(self, x):
        a = self.bn_twice(self.twice(x)) + self.twice(x)  # two calls: the first's output is BN's only use
        t = self.twice(x)
        a2 = self.bn_twice(t) + t
        b = self.bn_shared(self.shared_bn(x))
        b = torch.relu(b) + b
        c = torch.relu(self.bn_train(self.train_bn(x)))
        d = torch.relu(self.bn_batch(self.batch_stats(x)))
        e = F.leaky_relu(self.leaky(x))
        f = self.bn_after(torch.relu(self.relu_first(x)))
        g = self.bn_inplace(self.inplace(x))
        torch.relu_(g)
        h = self.bn_s1(self.shared(x)) + self.bn_s2(self.shared(x))
        return a, a2, b, c, d, e, f, g, h, self.alone(x)


# Stage 1 (BN and ReLU only) and the default (residual adds too: the later call of an add's
# two convolutions takes it): {fused module: (relu, residual)}.
STAGE1_FUSED = {
    "twice_fused": (False, False),  # the first call of `twice` (its output's only user is BN)
    "shared_bn": (False, False), "relu_first": (True, False), "inplace": (False, False),
    "shared_fused": (False, False), "shared_fused2": (False, False)}
DEFAULT_FUSED = dict(STAGE1_FUSED, twice_fused2=(False, True), shared_fused2=(False, True))


@pytest.mark.parametrize("flags, expected", [(dict(residual=False, codes=False), STAGE1_FUSED), ({}, DEFAULT_FUSED)],
                         ids=["stage1", "default"])
def test_unsupported_patterns_stay_unfused_and_equal(flags, expected):
    torch.manual_seed(0)
    model = Patterns()
    randomize_batchnorm_(model, torch.Generator().manual_seed(0))
    model.bn_batch = nn.BatchNorm2d(6, track_running_stats=False)
    calibrated(model, (2, 6, 8, 8))
    model.bn_train.train()
    with pytest.warns(UserWarning, match=r"training mode.*\['bn_train'\]"):
        deployed = q4conv.deploy(model, **flags)
    fused = fused_layers(deployed)
    kept = {n for n, m in deployed.named_modules() if isinstance(m, q4conv.Q4Conv2dCutlass)}
    assert kept == {"twice", "train_bn", "batch_stats", "leaky", "alone"}
    assert {n: (m.relu, m.residual) for n, m in fused.items()} == expected
    assert not any(m.codes_in or m.codes_out for m in fused.values())  # no output is read by q4conv layers only
    assert {"bn_twice", "bn_train", "bn_batch", "bn_after"} <= dict(deployed.named_modules()).keys()
    x = torch.randn(3, 6, 8, 8)
    with torch.no_grad():
        ref, out = model(x), deployed(x)
    names = "a a2 b c d e f g h alone".split()
    for name, r, o in zip(names, ref, out):
        if name in ("a2", "c", "d", "e", "alone"):  # nothing fused on their path: the same computation
            assert torch.equal(r, o), name
        else:
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=name)
    assert model.training is False and isinstance(model.twice, q4conv.Q4Conv2dCutlass)  # model unchanged


def test_misuse_raises():
    block = make_block()
    with pytest.raises(ValueError, match=r"eval\(\)"):
        q4conv.deploy(copy.deepcopy(block).train())
    fresh = Block().eval()  # scale_a never initialised
    with pytest.raises(ValueError, match="calibrate"):
        q4conv.deploy(fresh)
    with pytest.raises(TypeError, match="nn.Module"):
        q4conv.deploy(lambda x: x)
    deployed = q4conv.deploy(block)
    with pytest.raises(ValueError, match="N, 8, H, W"):
        deployed(torch.randn(2, 5, 8, 8))


@pytest.mark.parametrize("kwargs, message", [
    (dict(codes="no"), r"codes must be True, False or None.*'no'"),
    (dict(residual=1), r"residual must be True, False or None.*1"),
    (dict(leaf_modules=nn.BatchNorm2d), r"leaf_modules must be a sequence.*BatchNorm2d itself \(pass \[BatchNorm2d\]\)"),
    (dict(leaf_modules=[nn.ReLU()]), r"leaf_modules must be a sequence.*\[a ReLU instance\]"),
    (dict(leaf_modules="Block"), r"leaf_modules must be a sequence.*a str"),
])
def test_argument_types_are_checked(kwargs, message):
    with pytest.raises(TypeError, match=message):
        q4conv.deploy(make_block(), **kwargs)


def test_submodules_in_training_mode_are_named_in_a_warning():
    model = nn.Sequential(make_block(), make_block(seed=1)).eval()
    model[1].train()
    with pytest.warns(UserWarning, match=r"in training mode and stay as they are.*\['1.conv', '1.bn'\]; call model.eval\(\)"):
        deployed = q4conv.deploy(model)
    assert len(fused_layers(deployed)) == 1  # the eval block fused, the training one kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q4conv.deploy(model.eval())


def test_a_layer_the_model_never_calls_need_not_be_calibrated():
    class WithAuxHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = make_block()
            self.aux = q4conv.Q4Conv2d(12, 4, 1)  # used in training only: never calibrated

        def forward(self, x):
            return self.block(x)

    model = WithAuxHead().eval()
    x = torch.randn(2, 8, 10, 9)
    with torch.no_grad():
        assert torch.equal(q4conv.deploy(model)(x), q4conv.deploy(model.block)(x))

    class CallingAux(WithAuxHead):
        def forward(self, x):
            return self.aux(self.block(x))

    with pytest.raises(ValueError, match=r"q4conv layer 'aux' has no activation scale yet"):
        q4conv.deploy(CallingAux().eval())  # a called layer: the error names it

    class Holder(nn.Module):  # a leaf module (not traced into) whose layer runs when it is called
        def __init__(self) -> None:
            super().__init__()
            self.conv = q4conv.Q4Conv2d(12, 4, 1)

        def forward(self, x):
            return self.conv(x)

    class CallingHolder(WithAuxHead):
        def __init__(self) -> None:
            super().__init__()
            self.holder = Holder()

        def forward(self, x):
            return self.holder(self.block(x))

    with pytest.raises(ValueError, match=r"q4conv layer 'holder.conv' has no activation scale yet"):
        q4conv.deploy(CallingHolder().eval(), leaf_modules=[Holder])


def test_hooks_that_would_not_run_are_named_in_a_warning():
    model = q4_resnet(resnet18, seed=0)
    x = torch.randn(2, 3, 32, 32)
    calls = []
    model.conv1.register_forward_pre_hook(lambda module, args: calls.append("conv1"))  # fused away
    model.layer4.register_forward_hook(lambda *args: calls.append("layer4"))  # traced through
    model.fc.register_forward_hook(lambda *args: calls.append("fc"))  # a leaf call: kept
    with pytest.warns(UserWarning, match=r"forward hooks of these modules do not run.*\['conv1', 'layer4'\];"):
        deployed = q4conv.deploy(model)
    calls.clear()  # fx ran layer4's hook once while tracing
    with torch.no_grad():
        deployed(x)
    assert calls == ["fc"]
    layer = copy.deepcopy(model.fc)  # a bare module keeps its hook: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q4conv.deploy(layer)


def test_leaf_modules_keep_untraceable_code():
    class Dynamic(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.dyn = Block(), Dynamic()

        def forward(self, x):
            return self.dyn(self.block(x))

    torch.manual_seed(0)
    model = calibrated(randomize_batchnorm_(Net()), (2, 8, 6, 6))
    deployed = q4conv.deploy(model, leaf_modules=[Dynamic])
    assert list(fused_layers(deployed)) == ["block.conv"]
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)


def test_untraceable_model_deploys_its_traceable_parts():
    """A forward fx cannot trace (data-dependent control flow) is not an error: that module runs
    its own forward, its traceable children are deployed (fused) in its place, a bare q4conv child
    keeps the per-layer eval path, and a warning names the module and the leaf_modules route."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = Block(k=8), Block(k=8)
            self.head = q4conv.Q4Conv2dCutlass(8, 8, 1)

        def forward(self, x):
            y = self.first(x)
            if x.sum() > 0:  # data-dependent: fx cannot trace Net
                y = self.second(y)
            return self.head(y)

    torch.manual_seed(0)
    model = calibrated(randomize_batchnorm_(Net()), (2, 8, 6, 6))
    with pytest.warns(UserWarning, match="could not trace Net.*leaf_modules"):
        deployed = q4conv.deploy(model)
    assert type(deployed) is Net and deployed is not model
    assert set(fused_layers(deployed)) == {"first.conv", "second.conv"}
    assert isinstance(deployed.head, q4conv.Q4Conv2dCutlass) and not deployed.head.training
    assert isinstance(model.first.conv, q4conv.Q4Conv2dCutlass)  # the model itself is not changed
    for sign in (1, -1):
        x = sign * torch.randn(2, 8, 6, 6).abs()
        with torch.no_grad():
            torch.testing.assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ state, devices, grad
def test_state_dict_round_trip_and_dtype_conversion():
    model, other = q4_resnet(resnet18, seed=0), q4_resnet(resnet18, seed=5)
    deployed, target = q4conv.deploy(model), q4conv.deploy(other)
    buffers = dict(deployed.conv1.named_buffers())
    assert set(buffers) == {"qweight", "bias_a", "scale_a", "scale_w", "eps", "alpha", "shift"}
    buf = io.BytesIO()
    torch.save(deployed.state_dict(), buf)
    buf.seek(0)
    target.load_state_dict(torch.load(buf))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x), deployed(x))
        # .half() converts the float layers (fc) but not the fused buffers.
        half = copy.deepcopy(deployed).half()
        assert half.conv1.alpha.dtype == torch.float32 and half.conv1.eps.dtype == torch.float64
        assert half.fc.weight.dtype == torch.float16
        assert half(x.half()).dtype == torch.float16
    # Deploying a deployed model is a no-op.
    again = q4conv.deploy(deployed)
    with torch.no_grad():
        assert torch.equal(again(x), deployed(x))


def test_qweight_only_model_deploys():
    model = q4_resnet(resnet18, seed=0)
    packed = copy.deepcopy(model)
    for m in packed.modules():
        if isinstance(m, q4conv.Q4Conv2dCutlass):
            m.generate_quantized_weight(qweight_only=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(q4conv.deploy(packed)(x), q4conv.deploy(model)(x))


def test_inference_only_no_gradient():
    deployed = q4conv.deploy(make_block())
    x = torch.randn(2, 8, 10, 9, requires_grad=True)
    with pytest.warns(UserWarning, match="inference only"):
        assert not deployed(x).requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            deployed(x)
        deployed(x.detach())


def test_input_gradient_that_cannot_flow_is_named():
    """A float head after the deployed layers makes the output require grad, so backward runs and
    x.grad silently stays None: the deployed layer warns that no gradient reaches x."""
    model = q4_resnet(resnet18, seed=0)
    deployed = q4conv.deploy(model)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with pytest.warns(UserWarning, match="no gradient reaches that input"):
        y = deployed(x)
    y.sum().backward()
    assert y.requires_grad and x.grad is None


def test_bare_layer_deploys():
    """A q4conv layer deployed on its own (fx cannot trace a leaf as the root) computes as in eval."""
    layer = make_block().conv.eval()
    deployed = q4conv.deploy(layer)
    x = torch.randn(2, 8, 10, 9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(deployed(x), layer(x))


def test_torch_save_load_round_trip():
    """A deployed model pickles (torch.save of the module, torch.load) and runs the same; the
    model's forward is annotated under ``from __future__ import annotations`` (q4conv.models),
    whose string annotations fx would otherwise put in the generated code as unpicklable globals."""
    deployed = q4conv.deploy(q4_resnet(resnet18, seed=3).eval())
    buffer = io.BytesIO()
    torch.save(deployed, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), deployed(x))


@requires_cuda
def test_cuda_resnet_matches_unfused():
    model = q4_resnet(resnet18, seed=0).cuda()
    deployed = q4conv.deploy(model)
    assert all(b.is_cuda for b in deployed.buffers())
    x = torch.randn(128, 3, 32, 32, device="cuda")
    with torch.no_grad():
        ref = model(x)
        for _ in range(2):  # the second call uses the cached kernel-layout weights
            out = deployed(x.contiguous(memory_format=torch.channels_last))
            # Looser than the CPU test's 1e-5: the kernels' fp32 epilogue (FMA) rounds differently.
            assert (out.argmax(1) == ref.argmax(1)).double().mean().item() >= 0.99
            assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


@requires_cuda
def test_cpu_deployed_moves_to_cuda():
    block = make_block(c=32, k=32, padding=1)
    deployed = q4conv.deploy(block).cuda()
    x = torch.randn(2, 32, 10, 9)
    with torch.no_grad():
        check_block(block.conv, block.bn, True, x.cuda(), deployed(x.cuda()), block(x))


# ------------------------------------------------------------------ compile / export
class Residual(nn.Module):
    """Fused blocks around an unfused residual add (a later stage)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = q4conv.Q4Conv2dCutlass(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = q4conv.Q4Conv2dCutlass(8, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(x))
        return self.fc(torch.relu(y + x).mean((2, 3)))


def residual_model() -> nn.Module:
    torch.manual_seed(0)
    return calibrated(randomize_batchnorm_(Residual()), (2, 3, 12, 12))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(backend):
    deployed = q4conv.deploy(residual_model())
    torch._dynamo.reset()
    compiled = torch.compile(deployed, backend=backend, fullgraph=True)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 3, 12, 12).contiguous(memory_format=fmt)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), deployed(x), rtol=0, atol=0)


@pytest.mark.skipif(os.environ.get("Q4CONV_TEST_INDUCTOR") != "1",
                    reason="inductor's C++ compile takes about a minute on 2 cores; set Q4CONV_TEST_INDUCTOR=1")
def test_torch_compile_inductor():
    deployed = q4conv.deploy(residual_model())
    torch._dynamo.reset()
    compiled = torch.compile(deployed, fullgraph=True)
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), deployed(x), rtol=1e-6, atol=1e-6)


def test_torch_export():
    deployed = q4conv.deploy(q4_resnet(resnet18, seed=0))
    x = torch.randn(4, 3, 32, 32)
    program = torch.export.export(deployed, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "q4conv.conv_packed.default" in targets
    assert not any("batch_norm" in t for t in targets)
    y = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(program.module()(y), deployed(y))
