"""``q4conv.deploy``: a trained q4conv model (eval) as an inference graph.

Each q4conv layer followed by an eval ``BatchNorm2d`` and / or a ReLU becomes
one :class:`FusedQ4Conv2d`, whose forward is one ``torch.ops.q4conv.conv_packed``
call: the BatchNorm is folded into the epilogue as a per-output-channel scale
(``alpha``, the multiplier of the integer accumulator) and shift (the op's
``bias``), not into the weights, so any BatchNorm (negative gammas included)
folds; the ReLU is the op's ``relu``. SPEC section 8.

Graph capture is ``torch.fx`` symbolic tracing with q4conv layers as leaves.
Matching is a chain of epilogue steps (``_EPILOGUE_STEPS``): each step looks at
the only user of the chain's current tail and either takes it into the
epilogue or stops the chain. A graph the steps do not recognise is left as it
is (the layers run unfused), never rewritten into something else. Later stages
(residual add, activation codes between layers, max-pool on codes) are new
steps / patterns there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import _ops
from .layer import Q4Conv2dCutlass, _HostEps, _is_tracing, _reject_onnx_export, _version_of

__all__ = ["FusedQ4Conv2d", "deploy"]

# BatchNorm types whose eval forward is F.batch_norm with the running statistics.
_FOLDABLE_BATCH_NORMS: Tuple[type, ...] = (nn.BatchNorm2d, nn.SyncBatchNorm)
# Functions / methods that are a ReLU of their first argument.
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")


def fold_batch_norm(alpha: torch.Tensor, conv_bias: Optional[torch.Tensor],
                    bn: Optional[nn.modules.batchnorm._BatchNorm]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The epilogue's per-output-channel ``(alpha', shift)`` for ``bn(alpha * acc + conv_bias)``.

    With ``g = gamma / sqrt(running_var + bn.eps)`` (``gamma = 1`` without
    affine parameters): ``alpha' = g * alpha`` and
    ``shift = g * (conv_bias - running_mean) + beta``, computed in float64 and
    rounded to float32 once. Without ``bn``: ``alpha`` and ``conv_bias`` as
    float32 (``shift`` is None without a bias).
    """
    if bn is None:
        return alpha.float().contiguous(), None if conv_bias is None else conv_bias.detach().float().contiguous()
    f64 = dict(dtype=torch.float64, device=alpha.device)
    var = bn.running_var.detach().to(**f64)
    mean = bn.running_mean.detach().to(**f64)
    gamma = bn.weight.detach().to(**f64) if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().to(**f64) if bn.bias is not None else torch.zeros_like(var)
    bias = conv_bias.detach().to(**f64) if conv_bias is not None else torch.zeros_like(var)
    g = gamma / torch.sqrt(var + bn.eps)
    alpha_folded = (g * alpha.to(**f64)).float().contiguous()
    shift = (g * (bias - mean) + beta).float().contiguous()
    return alpha_folded, shift


class FusedQ4Conv2d(_HostEps, nn.Module):
    """A q4conv convolution with its BatchNorm and ReLU in the epilogue (inference only).

    ``y = relu?(alpha[k] * conv(q_a, q_w)[k] + shift[k])``, computed by one
    ``torch.ops.q4conv.conv_packed`` call: activation codes
    ``q_a = clamp(rint((x + bias_a) / max(scale_a, eps)))`` as the q4conv layer
    makes them, packed int4 weights ``qweight``, the integer accumulator
    scaled by ``alpha`` (``s_a * s_w``, times the BatchNorm's ``g``) and
    shifted by ``shift`` in float32, the output in x's dtype and memory format.
    On CPU the exact fallback runs; on CUDA the kernel-layout weights are
    cached per device (as the layer's eval cache).

    Every tensor is a buffer (``state_dict`` saves and loads them, ``.to(device)``
    moves them). Their dtypes are fixed: ``alpha`` / ``shift`` / ``bias_a`` /
    ``scale_a`` / ``scale_w`` float32, ``eps`` float64, ``qweight`` uint8;
    ``.half()`` or ``.to(dtype)`` leave them as they are (the epilogue reads
    float32; the input's dtype decides the output's).

    Inference only: no gradient flows through the module (its output does not
    require grad); the folded epilogue has no straight-through gradient of
    its own. Build one with :func:`deploy` or :meth:`from_q4conv`.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        bias_a: torch.Tensor,
        scale_a: torch.Tensor,
        scale_w: torch.Tensor,
        eps: float,
        alpha: torch.Tensor,
        shift: Optional[torch.Tensor],
        *,
        in_channels: int,
        stride: Sequence[int] = (1, 1),
        padding: Sequence[int] = (0, 0),
        dilation: Sequence[int] = (1, 1),
        a_bit: int = 4,
        relu: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if qweight.dtype != torch.uint8 or qweight.dim() != 4 or qweight.shape[3] != (in_channels + 1) // 2:
            raise ValueError(f"qweight must be a uint8 tensor (K, R, S, {(in_channels + 1) // 2}), "
                             f"got {qweight.dtype} {tuple(qweight.shape)}")
        k = qweight.shape[0]
        for name, t, shape in (("alpha", alpha, (k,)), ("shift", shift, (k,)), ("bias_a", bias_a, (in_channels,))):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        self.in_channels = int(in_channels)
        self.out_channels = int(k)
        self.kernel_size = (int(qweight.shape[1]), int(qweight.shape[2]))
        self.stride = [int(v) for v in stride]
        self.padding = [int(v) for v in padding]
        self.dilation = [int(v) for v in dilation]
        self.a_bit = int(a_bit)
        self.relu = bool(relu)
        self.backend = backend
        device = qweight.device
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("qweight", qweight.detach().clone())
        self.register_buffer("bias_a", bias_a.detach().to(**f32).contiguous())
        self.register_buffer("scale_a", scale_a.detach().to(**f32).clone())
        self.register_buffer("scale_w", scale_w.detach().to(**f32).clone())
        self.register_buffer("eps", torch.tensor(float(eps), dtype=torch.float64, device=device))
        self.register_buffer("alpha", alpha.detach().to(**f32).contiguous())
        self.register_buffer("shift", None if shift is None else shift.detach().to(**f32).contiguous())
        self._eps_key: Optional[Tuple[int, int]] = None
        self._eps_value = float(eps)
        # (qweight, validity key, kernel-layout weights or None for the fallback)
        self._kernel_cache: Optional[Tuple[torch.Tensor, tuple, Optional[torch.Tensor]]] = None

    @classmethod
    @torch.no_grad()
    def from_q4conv(cls, layer: Q4Conv2dCutlass, bn: Optional[nn.modules.batchnorm._BatchNorm] = None,
                    relu: bool = False) -> "FusedQ4Conv2d":
        """``relu?(bn?(layer(x)))`` of an eval-mode, calibrated q4conv layer as one module.

        ``layer`` is not changed (its packed weights are made on the side if it
        has none). ``bn`` must be in eval mode with running statistics.
        """
        if not isinstance(layer, Q4Conv2dCutlass):
            raise TypeError(f"layer must be a Q4Conv2dCutlass, got {type(layer).__name__}")
        if layer.training:
            raise ValueError("from_q4conv needs the layer in eval mode (call .eval())")
        _check_calibrated(layer, "layer")
        if bn is not None and not _foldable_batch_norm(bn, layer.out_channels):
            raise ValueError("bn must be an eval-mode BatchNorm2d with running statistics and "
                             f"num_features={layer.out_channels}")
        eps = float(layer.eps)
        qweight = layer.qweight
        if qweight is None:  # the packed weights as the layer would make them, without storing them
            qweight = _ops.ops.quantize_pack(layer.weight.detach(), layer.scale_w.detach(), eps, layer.w_bit)
        alpha = _ops.ops.output_alpha(layer.scale_a.detach(), layer.scale_w.detach(), layer.out_channels, eps)
        alpha, shift = fold_batch_norm(alpha, layer.bias, bn)
        return cls(qweight, layer.bias_a, layer.scale_a, layer.scale_w, eps, alpha, shift,
                   in_channels=layer.in_channels, stride=layer.stride, padding=layer.padding,
                   dilation=layer.dilation, a_bit=layer.a_bit, relu=relu, backend=layer.backend)

    def _kernel_weight(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The kernel-layout weights for x's device and backend, made once per qweight."""
        qweight = self._buffers["qweight"]
        key = (x.device, _version_of(qweight), self.backend)
        cache = self._kernel_cache
        if cache is None or cache[0] is not qweight or cache[1] != key:
            backend = _ops.ops.selected_backend(x, self.out_channels, list(self.kernel_size), self.stride,
                                                self.padding, self.dilation, self.backend)
            weight = None if backend == "fallback" else _ops.ops.kernel_weight(qweight, self.in_channels, backend)
            self._kernel_cache = (qweight, key, weight)
        return self._kernel_cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a 4-D tensor (N, {self.in_channels}, H, W), got {shape}")
        tracing = _is_tracing(x)
        if tracing:
            _reject_onnx_export()
        kernel_weight = None if tracing or not x.is_cuda else self._kernel_weight(x)
        b = self._buffers
        return _ops.ops.conv_packed.default(
            x.detach(), b["bias_a"], b["scale_a"], b["qweight"], b["scale_w"], b["shift"], self.stride,
            self.padding, self.dilation, self._host_eps(tracing), self.a_bit, self.relu, self.backend,
            kernel_weight, b["alpha"])

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "FusedQ4Conv2d":
        # .to(device) moves the buffers; a dtype change (.half(), .to(dtype)) leaves them as they are.
        before = {name: t for name, t in self._buffers.items() if t is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, "
                f"dilation={tuple(self.dilation)}, a_bit={self.a_bit}, shift={self.shift is not None}, "
                f"relu={self.relu}")


# ----------------------------------------------------------------- matching
def _check_calibrated(layer: Q4Conv2dCutlass, name: str) -> None:
    if not (bool(layer.scale_a_initialized) or float(layer.scale_a.detach().reshape(())) != 0):
        raise ValueError(f"q4conv layer {name!r} has no activation scale yet (scale_a uninitialised): "
                         "run q4conv.calibrate(model, batches) or a forward on data before deploying")


def _foldable_batch_norm(bn: nn.Module, channels: int) -> bool:
    """An eval BatchNorm whose forward is the affine map of its running statistics."""
    return (type(bn) in _FOLDABLE_BATCH_NORMS and not bn.training and bn.running_mean is not None
            and bn.running_var is not None and bn.num_features == channels)


def _fusable_q4conv(module: nn.Module) -> bool:
    # A subclass with its own forward computes something else: not fused.
    return (isinstance(module, Q4Conv2dCutlass) and type(module).forward is Q4Conv2dCutlass.forward
            and not module.training)


@dataclass
class _Match:
    """A q4conv call node and the epilogue nodes taken after it, in order."""

    conv_node: fx.Node
    conv: Q4Conv2dCutlass
    nodes: List[fx.Node] = field(default_factory=list)
    bn: Optional[nn.modules.batchnorm._BatchNorm] = None
    relu: bool = False


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    """The single node that reads ``node``, reading it once as its first argument and
    nowhere else (so the epilogue can replace both)."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if not user.args or user.args[0] is not node:
        return None
    refs: List[fx.Node] = []
    fx.node.map_arg((user.args[1:], user.kwargs), refs.append)
    return None if node in refs else user


def _take_batch_norm(user: fx.Node, modules: Dict[str, nn.Module], match: _Match) -> bool:
    """``bn(tail)`` with an eval BatchNorm2d, before any other epilogue step."""
    if match.relu or match.bn is not None or user.op != "call_module" or len(user.args) != 1 or user.kwargs:
        return False
    bn = modules.get(str(user.target))
    if bn is None or not _foldable_batch_norm(bn, match.conv.out_channels):
        return False
    match.bn = bn
    return True


def _take_relu(user: fx.Node, modules: Dict[str, nn.Module], match: _Match) -> bool:
    """A ReLU of the tail: nn.ReLU, F.relu / torch.relu / torch.relu_ (inplace or not), .relu() / .relu_()."""
    if match.relu:
        return False
    if user.op == "call_module":
        ok = type(modules.get(str(user.target))) is nn.ReLU and len(user.args) == 1 and not user.kwargs
    elif user.op == "call_function":
        # relu(t), relu(t, True), relu(t, inplace=...): nothing but the in-place flag besides t.
        flags = list(user.args[1:]) + list(user.kwargs.values())
        ok = (any(user.target is f for f in _RELU_FUNCTIONS) and len(flags) <= 1
              and set(user.kwargs) <= {"inplace"} and all(isinstance(v, bool) for v in flags))
    elif user.op == "call_method":
        ok = user.target in _RELU_METHODS and len(user.args) == 1 and not user.kwargs
    else:
        ok = False
    if ok:
        match.relu = True
    return ok


# The extension point: the epilogue steps, tried in this order on the only user
# of the chain's tail; a step that does not apply is skipped, so "BN", "ReLU"
# and "BN then ReLU" all match. Later stages add steps here (residual add and
# the ReLU after it, which need the op's residual input; output codes where
# every consumer is a q4conv layer with the same quantizer, then max-pool on
# codes), and FusedQ4Conv2d.from_q4conv grows the matching arguments.
EpilogueStep = Callable[[fx.Node, Dict[str, nn.Module], _Match], bool]
_EPILOGUE_STEPS: Tuple[Tuple[str, EpilogueStep], ...] = (
    ("batch_norm", _take_batch_norm),
    ("relu", _take_relu),
)


def _match_epilogue(conv_node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[_Match]:
    """The longest epilogue after a q4conv call node, or None when there is nothing to fuse."""
    conv = modules.get(str(conv_node.target))
    if conv is None or not _fusable_q4conv(conv) or len(conv_node.args) != 1 or conv_node.kwargs:
        return None
    match = _Match(conv_node, conv)  # type: ignore[arg-type]
    tail = conv_node
    for _, step in _EPILOGUE_STEPS:
        user = _only_user(tail)
        if user is None:
            break
        if step(user, modules, match):
            match.nodes.append(user)
            tail = user
    return match if match.nodes else None


class _DeployTracer(fx.Tracer):
    """torch.fx tracer that keeps q4conv layers (and ``leaf_modules``) whole."""

    def __init__(self, leaf_modules: Sequence[Type[nn.Module]] = ()) -> None:
        super().__init__()
        self._leaves = (Q4Conv2dCutlass, FusedQ4Conv2d) + tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, module_qualified_name)


def _free_name(root: nn.Module, name: str) -> str:
    """A free submodule name ``<name>_fused``, ``<name>_fused2``, ... for a fused call of a layer
    that other call sites still use under ``name``."""
    candidate, i = f"{name}_fused", 1
    while True:
        try:
            root.get_submodule(candidate)
        except AttributeError:
            return candidate
        i += 1
        candidate = f"{name}_fused{i}"


@torch.no_grad()
def deploy(model: nn.Module, *, leaf_modules: Sequence[Type[nn.Module]] = ()) -> fx.GraphModule:
    """An inference copy of ``model`` (eval mode) with BatchNorm and ReLU fused into its q4conv layers.

    ``model`` is traced with ``torch.fx`` (q4conv layers and ``leaf_modules``
    kept whole) and copied; ``model`` itself is not changed. In the copy, each
    q4conv layer followed by an eval ``BatchNorm2d`` (the layer's only user)
    and / or a ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``.relu()``,
    in-place forms; the only user of what it follows) becomes a
    :class:`FusedQ4Conv2d` under the layer's name. Everything else (a
    BatchNorm in training mode or with other users, a layer whose output is
    used twice, residual adds, pooling) is kept as it was.

    Numerics: the fused output equals the unfused eval model's
    ``relu(bn(layer(x)))`` up to the float32 rounding of the fold (alpha and
    shift are computed in float64 and rounded once; the unfused path rounds
    the layer's output to x's dtype before the BatchNorm, the fused one only
    at the end).

    Raises ValueError when ``model`` is in training mode or a q4conv layer has
    no activation scale yet (calibrate first). The result runs under
    ``torch.compile`` and ``torch.export``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("q4conv.deploy needs the model in eval mode (BatchNorm folds its running "
                         "statistics): call model.eval() first")
    for name, module in model.named_modules():
        if isinstance(module, Q4Conv2dCutlass) and not module.training:
            _check_calibrated(module, name)
    model = copy.deepcopy(model)
    tracer = _DeployTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as err:
        err.add_note("q4conv.deploy captures the model with torch.fx symbolic tracing; keep "
                     "submodules it cannot trace (data-dependent control flow) whole with "
                     "q4conv.deploy(model, leaf_modules=[TheirType, ...])")
        raise
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    modules = dict(gm.named_modules())
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        match = _match_epilogue(node, modules)
        if match is None:
            continue
        fused = FusedQ4Conv2d.from_q4conv(match.conv, match.bn, match.relu)
        target = str(node.target)
        if calls[target] > 1:  # a layer called in several places keeps its name for the other calls
            target = _free_name(gm, target)
        gm.add_submodule(target, fused)
        node.target = target
        match.nodes[-1].replace_all_uses_with(node)
        for taken in reversed(match.nodes):
            graph.erase_node(taken)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
