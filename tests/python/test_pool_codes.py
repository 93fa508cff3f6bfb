"""``torch.ops.q4conv.max_pool_codes``: a 2-D max-pool on int8 activation codes (deploy's max-pools
between a layer writing codes and its readers) against ``F.max_pool2d`` of the codes as floats,
bit for bit, on every device: shapes, pool arguments, memory formats, the kernel's vector and scalar
paths, a hypothesis property, argument errors, opcheck, and the op in deployed graphs (test_codes.py
has the deploy numerics)."""

from __future__ import annotations

import io
import itertools
from typing import Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch._prims_common import suggest_memory_format

import q4conv
from conftest import DEVICES, requires_cuda
from q4conv.models import resnet50
from test_codes import POOLS, codes_edges, converted_resnet, make_chain

ops = torch.ops.q4conv
MAX_POOL_CODES = ops.max_pool_codes.default
RANGES = {"codes4": (-8, 7), "int8": (-128, 127)}
# Pool arguments (kernel_size, stride, padding, dilation, ceil_mode) of the grid tests; those
# max_pool2d rejects (padding > kernel_size // 2, an empty output) must be rejected by the op too.
POOL_ARGS = list(itertools.product((1, 2, 3), (1, 2, 3), (0, 1), (1, 2), (False, True)))


def random_codes(shape: Sequence[int], value_range: Tuple[int, int], device: str = "cpu",
                 channels_last: bool = False, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(value_range[0], value_range[1] + 1, tuple(shape), generator=gen, dtype=torch.int8)
    if channels_last:
        codes = codes.contiguous(memory_format=torch.channels_last)
    return codes.to(device)


def reference(codes: torch.Tensor, *args) -> torch.Tensor:
    """max_pool2d of the codes as floats, back to int8 (a window holding only padding, -inf, gives
    -128, as max_pool2d on int8 does); float32 holds every int8 value exactly."""
    return F.max_pool2d(codes.float(), *args).clamp(-128, 127).to(torch.int8)


def assert_pool_matches(codes: torch.Tensor, *args, what: str = "") -> Optional[torch.Tensor]:
    """The op equals the reference bit for bit, in the reference's shape and memory format; where
    max_pool2d rejects the arguments, the op does too. Returns the op's output (None if rejected)."""
    try:
        expected = reference(codes, *args)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            ops.max_pool_codes(codes, *args)
        return None
    out = ops.max_pool_codes(codes, *args)
    context = f"{what} args={args} shape={tuple(codes.shape)} strides={codes.stride()}"
    assert out.dtype == torch.int8 and out.device == codes.device, context
    assert out.shape == expected.shape, context
    assert torch.equal(out, expected), context
    fmt = suggest_memory_format(codes)
    assert out.is_contiguous(memory_format=fmt), context
    if codes.shape[1] > 1 and out.shape[2] * out.shape[3] > 1:  # strides unambiguous: max_pool2d's
        assert out.stride() == expected.stride(), context
    return out


# ------------------------------------------------------------------ equality over a grid
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value_range", list(RANGES), ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("c", [1, 3, 17, 64, 65])
def test_matches_max_pool2d_grid(device, value_range, channels_last, c):
    for hw in ((9, 7), (4, 5)):
        codes = random_codes((2, c, *hw), RANGES[value_range], device, channels_last, seed=c)
        for kernel, stride, padding, dilation, ceil_mode in POOL_ARGS:
            assert_pool_matches(codes, kernel, stride, padding, dilation, ceil_mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("args", [
    ((3, 2), (2, 1), (1, 0), (1, 2), True),  # per-axis values
    ((2, 3), (), (1, 1), (2, 1), False),     # stride empty: kernel_size
    ([3], [2], [1], [1], False),             # one value: both axes
    ((1, 3), (3, 1), (0, 1), (1, 1), True),
], ids=str)
def test_per_axis_and_argument_forms(device, args):
    for channels_last in (False, True):
        assert_pool_matches(random_codes((3, 16, 11, 8), RANGES["int8"], device, channels_last), *args)


@pytest.mark.parametrize("device", DEVICES)
def test_defaults_are_max_pool2d_defaults(device):
    codes = random_codes((2, 8, 9, 9), RANGES["codes4"], device)
    assert torch.equal(ops.max_pool_codes(codes, [3, 3]), reference(codes, 3))
    assert torch.equal(ops.max_pool_codes(codes, 3, padding=1), reference(codes, 3, None, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_empty_batch(device, channels_last):
    codes = random_codes((0, 5, 9, 7), RANGES["codes4"], device, channels_last)
    out = assert_pool_matches(codes, 3, 2, 1)
    assert out is not None and out.shape == (0, 5, 5, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_window_of_padding_only_gives_lowest_int8(device):
    """ceil_mode with a dilation wider than the input: a window holding no input position gives
    -128 (max_pool2d on int8 gives the same; on floats -inf)."""
    codes = torch.full((1, 2, 1, 1), 5, dtype=torch.int8, device=device)
    out = ops.max_pool_codes(codes, 2, 2, 1, 3, True)
    assert out.tolist() == [[[[-128]], [[-128]]]]
    assert torch.equal(out.cpu(), F.max_pool2d(codes.cpu(), 2, 2, 1, 3, True))  # PyTorch's int8 CPU pool


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1, 4, 8], ids=lambda o: f"offset{o}")
@pytest.mark.parametrize("c", [64, 20, 7])
def test_vector_and_scalar_paths(device, offset, c):
    """Dense NHWC codes at a storage offset: the CUDA kernel's 16-channel (C % 16 == 0, 16-byte
    aligned), 4-channel (C % 4 == 0, 4-byte aligned) and scalar paths give the same result."""
    n, h, w = 2, 10, 9
    flat = random_codes((offset + n * h * w * c,), RANGES["int8"], device, seed=offset + c)
    codes = flat[offset:].view(n, h, w, c).permute(0, 3, 1, 2)
    assert codes.is_contiguous(memory_format=torch.channels_last)
    for args in ((3, 2, 1), (2, 1, 0, 2, True)):
        assert_pool_matches(codes, *args)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_input(device):
    """Neither NCHW nor NHWC dense (a channel slice of an NHWC tensor, a spatial slice of NCHW)."""
    big = random_codes((2, 40, 12, 11), RANGES["int8"], device, channels_last=True)
    assert_pool_matches(big[:, 3:35], 3, 2, 1, 1, True)
    assert_pool_matches(random_codes((2, 6, 16, 11), RANGES["int8"], device)[:, :, ::2], 2, 1, 1)


# ------------------------------------------------------------------ property
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 3), c=st.integers(1, 70), h=st.integers(1, 12), w=st.integers(1, 12),
       kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       pad_fraction=st.tuples(st.booleans(), st.booleans()), dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       ceil_mode=st.booleans(), channels_last=st.booleans(), value_range=st.sampled_from(list(RANGES.values())),
       device=st.sampled_from(DEVICES), seed=st.integers(0, 2**16))
def test_property_matches_max_pool2d(n, c, h, w, kernel, stride, pad_fraction, dilation, ceil_mode, channels_last,
                                     value_range, device, seed):
    padding = tuple(k // 2 if full else 0 for k, full in zip(kernel, pad_fraction))
    codes = random_codes((n, c, h, w), value_range, device, channels_last, seed)
    assert_pool_matches(codes, kernel, stride, padding, dilation, ceil_mode)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("codes, args, message", [
    (torch.zeros(1, 2, 5, 5), (3, 2, 1), r"codes must be int8.*Float"),
    (torch.zeros(1, 2, 5, 5, dtype=torch.uint8), (3, 2, 1), r"codes must be int8.*Byte"),
    (torch.zeros(2, 5, 5, dtype=torch.int8), (3, 2, 1), r"codes must be 4-D \(N, C, H, W\), got 3-D"),
    (torch.zeros(1, 0, 5, 5, dtype=torch.int8), (3, 2, 1), r"codes must have C, H and W > 0"),
    (torch.zeros(1, 2, 5, 5, dtype=torch.int8), (3, 2, 2), r"padding must be at most half of kernel_size \(1, 1\)"),
    (torch.zeros(1, 2, 5, 5, dtype=torch.int8), ((2, 3), 1, (1, 2)), r"padding must be at most half"),
    (torch.zeros(1, 2, 5, 5, dtype=torch.int8), (3, 2, -1), r"padding must be >= 0"),
    (torch.zeros(1, 2, 5, 5, dtype=torch.int8), (0, 1, 0), r"kernel_size must be >= 1"),
    (torch.zeros(1, 2, 5, 5, dtype=torch.int8), (3, 0, 1), r"stride must be >= 1"),
    (torch.zeros(1, 2, 5, 5, dtype=torch.int8), (3, 1, 1, 0), r"dilation must be >= 1"),
    (torch.zeros(1, 2, 5, 5, dtype=torch.int8), ((3, 3, 3), 1, 1), r"kernel_size must be one int or two ints"),
    (torch.zeros(1, 2, 5, 5, dtype=torch.int8), (3, (1, 1, 1), 1), r"stride must be one int or two ints"),
    (torch.zeros(1, 2, 5, 5, dtype=torch.int8), (3, 1, 1, 2**40), r"dilation must be at most 2147483647"),
    (torch.zeros(1, 2, 2, 5, dtype=torch.int8), (3, 1, 0, 2), r"give an empty output \(-\d+, 1\).*kernel_size"),
])
def test_errors_name_the_argument(codes, args, message):
    for device in DEVICES:
        with pytest.raises(RuntimeError, match=message):
            ops.max_pool_codes(codes.to(device), *args)


# ------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("args", [([3, 3], [2, 2], [1, 1], [1, 1], False), ([2, 3], [], [1, 0], [2, 1], True)],
                         ids=["stem", "ceil_dilated"])
def test_opcheck(device, channels_last, args):
    for shape in ((2, 5, 9, 7), (2, 1, 6, 6)):
        codes = random_codes(shape, RANGES["codes4"], device, channels_last)
        torch.library.opcheck(ops.max_pool_codes, (codes, *args))


def test_fake_kernel_matches_the_op_over_the_grid():
    """The fake kernel (max_pool2d's shape function on a float stand-in) gives the op's shape and
    strides for every grid argument set, and rejects exactly the sets the op rejects."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for shape, channels_last in itertools.product(((2, 5, 9, 7), (1, 3, 4, 5), (2, 1, 3, 2)), (False, True)):
        codes = random_codes(shape, RANGES["codes4"], channels_last=channels_last)
        for args in POOL_ARGS:
            try:
                real = ops.max_pool_codes(codes, *args)
            except RuntimeError:
                real = None
            with FakeTensorMode() as mode:
                fake_codes = mode.from_tensor(codes)
                try:
                    fake = ops.max_pool_codes(fake_codes, *args)
                except RuntimeError:
                    fake = None
            context = f"args={args} shape={shape} channels_last={channels_last}"
            assert (real is None) == (fake is None), context
            if real is not None:
                assert fake.shape == real.shape and fake.dtype == real.dtype, context
                assert fake.stride() == real.stride(), context


# ------------------------------------------------------------------ CUDA at the stem's size
@requires_cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_stem_size_matches_cpu(channels_last):
    """ResNet's stem pool (3, 2, 1) at 112x112, 64 channels (batch 8 of deploy's 256)."""
    codes = random_codes((8, 64, 112, 112), RANGES["codes4"], "cuda", channels_last)
    out = ops.max_pool_codes(codes, 3, 2, 1)
    assert torch.equal(out.cpu(), ops.max_pool_codes(codes.cpu(), 3, 2, 1))
    assert torch.equal(out, reference(codes, 3, 2, 1))


# ------------------------------------------------------------------ deploy's graph
def pool_calls(gm: nn.Module):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is MAX_POOL_CODES]


@pytest.mark.parametrize("pool, expected", [
    ("module", ([3, 3], [2, 2], [1, 1], [1, 1], False)),
    ("ceil_dilated", ([2, 2], [2, 2], [1, 1], [2, 2], True)),
    ("functional", ([3, 3], [1, 1], [1, 1], [1, 1], False)),
    ("torch_max_pool2d", ([2, 3], [1, 2], [1, 1], [1, 1], False)),
], ids=str)
def test_deploy_pools_codes_with_the_op(pool, expected):
    """Each pool form between a codes producer and its readers becomes one max_pool_codes call with
    the pool's arguments (no float round trip left in the graph)."""
    deployed = q4conv.deploy(make_chain(pool=POOLS[pool]))
    calls = pool_calls(deployed)
    assert len(calls) == 1 and tuple(calls[0].args[1:]) == expected
    assert calls[0].args[0].target == "conv" and {u.target for u in calls[0].users} == {"conv_a", "conv_b"}
    assert not any(n.op == "call_method" and n.target in ("half", "to", "float") for n in deployed.graph.nodes)
    assert not any(isinstance(m, nn.MaxPool2d) for m in deployed.modules())


@pytest.mark.parametrize("form", ["stride_none", "keywords"])
def test_deploy_functional_pool_defaults_and_keywords(form):
    pool = {"stride_none": lambda y: F.max_pool2d(y, 3, padding=1),
            "keywords": lambda y: F.max_pool2d(y, kernel_size=(3, 2), stride=1, padding=(1, 0), ceil_mode=True)}[form]
    model = make_chain(pool=pool)
    deployed = q4conv.deploy(model)
    expected = {"stride_none": ([3, 3], [3, 3], [1, 1], [1, 1], False),
                "keywords": ([3, 2], [1, 1], [1, 0], [1, 1], True)}[form]
    assert [tuple(c.args[1:]) for c in pool_calls(deployed)] == [expected]
    x = torch.randn(2, 6, 11, 9)
    with torch.no_grad():
        assert torch.equal(deployed(x), q4conv.deploy(model, codes=False, residual=False)(x))


def test_deploy_pool_with_computed_arguments_stays_float():
    """A pool whose arguments are computed in the graph is not rewritten: its input stays float."""
    deployed = q4conv.deploy(make_chain(pool=lambda y: F.max_pool2d(y, y.shape[-1] // 4, 1)))
    assert pool_calls(deployed) == [] and codes_edges(deployed) == ([], [])


def test_deployed_resnet50_stem_pool_runs_the_op():
    """ResNet-50's stem (conv -> BN -> ReLU -> max-pool -> layer1.0.conv1 + downsample) pools codes
    with the op, in the fx graph and in torch.export's program; same output as the stage-1 model,
    after torch.save / torch.load and after deploying the deployed model again."""
    model = converted_resnet(resnet50)
    deployed = q4conv.deploy(model)
    (call,) = pool_calls(deployed)
    assert call.args[0].target == "conv1" and tuple(call.args[1:]) == ([3, 3], [2, 2], [1, 1], [1, 1], False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(deployed, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("q4conv.max_pool_codes.default") == 1
    with torch.no_grad():
        out = deployed(x)
        assert torch.equal(out, q4conv.deploy(model, codes=False, residual=False)(x))
        assert torch.equal(program.module()(x), out)
        buffer = io.BytesIO()
        torch.save(deployed, buffer)
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=False)(x), out)
        assert torch.equal(q4conv.deploy(deployed)(x), out)


def test_deployed_pool_under_torch_compile():
    """The fake kernel's shapes under torch.compile (dynamic sizes, both memory formats)."""
    deployed = q4conv.deploy(make_chain(pool=POOLS["ceil_dilated"]))
    torch._dynamo.reset()
    compiled = torch.compile(deployed, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for shape in ((2, 6, 11, 9), (3, 6, 14, 10)):
            for fmt in (torch.contiguous_format, torch.channels_last):
                x = torch.randn(shape).contiguous(memory_format=fmt)
                assert torch.equal(compiled(x), deployed(x))
