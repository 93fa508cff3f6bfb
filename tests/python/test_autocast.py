"""q4conv under torch.autocast (csrc/autocast.cpp): the layer runs in the
autocast dtype with no cast of its own, exactly as on ``x.to(dtype)`` with
autocast off; the parameters stay fp32 (master weights) and get fp32
gradients, x gets its gradient in its own dtype through the cast. Outside
autocast nothing changes: fp32 keeps its exact semantics."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import oracle
import q4conv
from conftest import DEVICES, HAS_CUDA
from test_forward import check_against_oracle

ops = torch.ops.q4conv
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
STRIDE, PADDING, DILATION = (2, 1), (1, 1), (1, 2)


@pytest.fixture(autouse=True)
def exact_cuda_math():
    """Exact fp32 and deterministic cuDNN algorithms on GPUs, so two runs of
    the same arithmetic give the same bits and fp32 tolerances mean the same
    on every device."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
           torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = old


def make_layer(device: str, **kwargs) -> q4conv.Q4Conv2dCutlass:
    torch.manual_seed(0)
    layer = q4conv.Q4Conv2dCutlass(20, 24, 3, stride=STRIDE, padding=PADDING, dilation=DILATION,
                                   bias=True, device=device, **kwargs)
    with torch.no_grad():
        layer.bias.uniform_(-0.5, 0.5)
        layer.bias_a.uniform_(-0.2, 0.2)
    return layer


def make_x(device: str, channels_last: bool = False) -> torch.Tensor:
    x = torch.randn(2, 20, 9, 11, generator=torch.Generator().manual_seed(1)).to(device) * 1.5
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def ready_layer(device: str, train: bool) -> q4conv.Q4Conv2dCutlass:
    """A layer with scale_a initialised (from fp32 data) and, in eval mode,
    its packed weights made: the calls compared below change no state."""
    layer = make_layer(device)
    with torch.no_grad():
        layer(make_x(device))
    layer.train(train)
    if not train:
        layer.generate_quantized_weight()
    return layer


@contextlib.contextmanager
def nested(*contexts):
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


def grads_of(layer: nn.Module):
    layer = getattr(layer, "_orig_mod", layer)  # torch.compile's wrapper: the module's own names
    return {name: None if p.grad is None else p.grad.clone() for name, p in layer.named_parameters()}


def run(layer, x, gy, dtype=None, backward_inside=False):
    """(y, x.grad, parameter grads) of layer on a fresh leaf copy of x, under
    autocast to `dtype` (None: autocast off)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = layer(x)
        if backward_inside:
            y.backward(gy)
    if not backward_inside:
        y.backward(gy)
    return y.detach(), x.grad, grads_of(layer)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_layer_runs_in_autocast_dtype(device, dtype, train, channels_last):
    layer = ready_layer(device, train)
    x = make_x(device, channels_last)
    gy = torch.randn(2, 24, 5, 9, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    y, dx, grads = run(layer, x, gy, dtype)
    # The explicit-cast version: autocast off, x.to(dtype) inside the graph.
    layer.zero_grad(set_to_none=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = layer(x_ref.to(dtype))
    y_ref.backward(gy)

    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(y, y_ref)
    check_against_oracle(y, x.to(dtype), layer.bias_a, layer.scale_a, layer.weight, layer.scale_w,
                         layer.bias, oracle.Conv(STRIDE, PADDING, DILATION))
    assert dx.dtype == torch.float32 and dx.abs().sum() > 0
    assert torch.equal(dx, x_ref.grad)
    for name, p in layer.named_parameters():
        assert p.dtype == torch.float32, name  # master parameters untouched
        if train:
            assert grads[name] is not None and grads[name].dtype == torch.float32, name
            assert torch.equal(grads[name], p.grad), name
        else:  # packed inference: the parameters get no gradient
            assert grads[name] is None and p.grad is None, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_backward_inside_the_autocast_region(device, train):
    """loss.backward() inside the region (the engine then runs with autocast
    on) gives the gradients of a backward outside it."""
    layer = ready_layer(device, train)
    x = make_x(device)
    gy = torch.randn(2, 24, 5, 9, device=device, dtype=torch.bfloat16)
    _, dx_out, grads_out = run(layer, x, gy, torch.bfloat16)
    _, dx_in, grads_in = run(layer, x, gy, torch.bfloat16, backward_inside=True)
    assert torch.equal(dx_in, dx_out)
    for name, g in grads_out.items():
        assert (g is None and grads_in[name] is None) or torch.equal(g, grads_in[name]), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_half_input_is_not_cast_again(device, train):
    """An x already in the autocast dtype runs as it is; an x of the other
    half type is cast (autocast's rule for floating inputs)."""
    layer = ready_layer(device, train)
    x = make_x(device)
    with torch.no_grad():
        with torch.autocast(device, dtype=torch.bfloat16):
            y_same, y_other = layer(x.to(torch.bfloat16)), layer(x.half())
        assert torch.equal(y_same, layer(x.to(torch.bfloat16)))
        assert y_other.dtype == torch.bfloat16
        assert torch.equal(y_other, layer(x.half().to(torch.bfloat16)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fp32_outside_autocast_is_exact(device, train):
    """Without autocast (never entered, disabled inside a region, or enabled
    only for another device) fp32 runs as before: the float64 oracle's
    quantized convolution, on the CPU to the last bit of fp32's
    acc * alpha + bias, and the oracle's LSQ gradients."""
    layer = ready_layer(device, train)
    x = make_x(device)
    gy = torch.randn(2, 24, 5, 9, generator=torch.Generator().manual_seed(2)).to(device)
    y, dx, grads = run(layer, x, gy)
    assert y.dtype == torch.float32 and dx.dtype == torch.float32
    conv = oracle.Conv(STRIDE, PADDING, DILATION)
    check_against_oracle(y, x, layer.bias_a, layer.scale_a, layer.weight, layer.scale_w, layer.bias, conv)
    if device == "cpu":  # the fallback's epilogue: fp32 acc * alpha, then + bias
        _, acc = oracle.forward(x, layer.bias_a, layer.scale_a, layer.weight, layer.scale_w, layer.bias, conv)
        alpha = oracle.effective_scale(layer.scale_a, conv.eps) * oracle.effective_scale(layer.scale_w, conv.eps)
        expected = acc.float() * alpha.reshape(1, -1, 1, 1) + layer.bias.detach().view(1, -1, 1, 1)
        assert torch.equal(y, expected)

    # Autocast disabled inside an enabled region; enabled for the other device only.
    contexts = [lambda: nested(torch.autocast(device, dtype=torch.bfloat16), torch.autocast(device, enabled=False))]
    if HAS_CUDA:
        contexts.append(lambda: torch.autocast("cpu" if device == "cuda" else "cuda", dtype=torch.bfloat16))
    for context in contexts:
        layer.zero_grad(set_to_none=True)
        x2 = x.clone().requires_grad_(True)
        with context():
            y2 = layer(x2)
        y2.backward(gy)
        assert y2.dtype == torch.float32 and torch.equal(y2, y)
        assert torch.equal(x2.grad, dx)
        for name, g in grads.items():
            assert (g is None and layer.get_parameter(name).grad is None) or torch.equal(
                layer.get_parameter(name).grad, g), name

    if train:  # gradients: float64 autograd through the LSQ formulation
        ref_inputs = [t.detach().double().cpu().requires_grad_(True)
                      for t in (x, layer.bias_a, layer.scale_a, layer.weight, layer.scale_w, layer.bias)]
        oracle.reference_training_forward(*ref_inputs, conv).backward(gy.double().cpu())
        for name, got, want in zip(["x", "bias_a", "scale_a", "weight", "scale_w", "bias"],
                                   [dx] + [grads[n] for n in ("bias_a", "scale_a", "weight", "scale_w", "bias")],
                                   [t.grad for t in ref_inputs]):
            error = ((got.double().cpu() - want).norm() / want.norm().clamp_min(1e-30)).item()
            assert error < 1e-4, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("device", DEVICES)
def test_scale_a_initialised_from_the_fp32_input(device):
    """The first forward under autocast initialises scale_a from x as given
    (fp32), the statistic a forward without autocast takes: autocast changes
    what the convolution runs in, not the layer's state."""
    x = make_x(device)
    plain, autocast = make_layer(device), make_layer(device)
    with torch.no_grad():
        plain(x)
        with torch.autocast(device, dtype=torch.bfloat16):
            autocast(x)
    assert autocast.scale_a.dtype == torch.float32 and autocast.scale_a_initialized
    assert torch.equal(autocast.scale_a, plain.scale_a)


def small_model(device: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        q4conv.Q4Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        q4conv.Q4Conv2d(16, 16, 3, stride=2, padding=1, bias=True), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).to(device)
    return q4conv.prepare_q4conv_layers(model)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_small_model_trains_under_autocast(device, dtype):
    model = small_model(device)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, 12, 12, generator=gen).to(device)
    target = torch.randint(0, 4, (8,), generator=gen).to(device)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype):
            q4_out = model[:3](x)
            assert q4_out.dtype == dtype
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, name
            assert torch.isfinite(p.grad).all(), name
        optimizer.step()
        losses.append(loss.item())
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and not torch.equal(p, before[name]), name
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_torch_compile_under_autocast(device, backend, train):
    """Fake kernels see the cast x: the compiled graph produces the autocast
    dtype, the eager layer's values and gradients."""
    torch._dynamo.reset()
    layer = ready_layer(device, train)
    x = make_x(device)
    gy = torch.randn(2, 24, 5, 9, device=device, dtype=torch.bfloat16)
    y_eager, dx_eager, grads_eager = run(layer, x, gy, torch.bfloat16)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    y, dx, grads = run(compiled, x, gy, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_eager)
    assert dx.dtype == torch.float32 and torch.equal(dx, dx_eager)
    for name, g in grads_eager.items():
        assert (g is None and grads[name] is None) or torch.equal(grads[name], g), name
    torch._dynamo.reset()


class AutocastInside(nn.Module):
    """torch.export keeps an autocast region of the forward (an outer one
    around export is not traced, as for ATen ops)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.layer(x)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_torch_export_keeps_the_autocast_region(train):
    layer = ready_layer("cpu", train)
    x = make_x("cpu")
    model = AutocastInside(layer)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        expected = model(x)
        assert expected.dtype == torch.bfloat16
        assert torch.equal(exported.module()(x), expected)
        decomposed = exported.run_decompositions()
        assert torch.equal(decomposed.module()(x), expected)
    # After decomposition the cast is an explicit node feeding the q4conv op.
    targets = [node.target for node in decomposed.graph.nodes if node.op == "call_function"]
    op = ops.conv_train.default if train else ops.conv_packed.default
    assert torch.ops.aten._to_copy.default in targets and op in targets


@pytest.mark.parametrize("device", DEVICES)
def test_plan_queries_see_the_autocast_dtype(device):
    """selected_backend and plan (q4conv.explain, the eval cache's weight
    layout) plan what runs: x in the autocast dtype, without copying it."""
    layer = ready_layer(device, train=False)
    for channels_last in (False, True):
        x = make_x(device, channels_last)
        args = (24, [3, 3], list(STRIDE), list(PADDING), list(DILATION), "auto")
        expected = ops.plan(x.to(torch.float16), *args, torch.float32)
        with torch.autocast(device, dtype=torch.float16):
            assert ops.plan(x, *args, torch.float32) == expected
            assert ops.selected_backend(x, *args) == ops.selected_backend(x.to(torch.float16), *args)
            assert q4conv.explain(layer, x) == q4conv.explain(layer, x.to(torch.float16))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_under_autocast(device):
    """torch.library.opcheck (schema, fake kernels, autograd registration, AOT
    dispatch) with autocast on: the cast x goes through every check."""
    layer = ready_layer(device, train=True)
    x = make_x(device)
    conv = (list(STRIDE), list(PADDING), list(DILATION), 1e-5, 4)
    params = [t.detach().clone().requires_grad_(True)
              for t in (layer.bias_a, layer.scale_a, layer.weight, layer.scale_w, layer.bias)]
    qweight = ops.quantize_pack(layer.weight, layer.scale_w, 1e-5, 4)
    with torch.autocast(device, dtype=torch.bfloat16):
        torch.library.opcheck(ops.conv_train, (x.clone().requires_grad_(True), *params, *conv, "auto"))
        torch.library.opcheck(ops.conv_packed, (x.clone().requires_grad_(True), layer.bias_a.detach(),
                                                layer.scale_a.detach(), qweight, layer.scale_w.detach(),
                                                layer.bias.detach(), *conv, False, "auto"))
