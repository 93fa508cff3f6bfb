"""``q4conv.deploy``: a trained q4conv model (eval) as an inference graph.

SPEC section 8. Each q4conv layer becomes one :class:`FusedQ4Conv2d` that
computes, in one op call, the layer with what follows it:

* an eval ``BatchNorm2d``, folded into the epilogue as a per-output-channel
  scale (``alpha``, the multiplier of the integer accumulator) and shift, not
  into the weights, so any BatchNorm (negative gammas included) folds;
* a residual add (``+``, ``torch.add``, ``.add``; either operand order; the
  other operand is any tensor), then a ReLU;
* or a ReLU alone;
* and the output as **activation codes**: where every user of the output is a
  q4conv layer (possibly behind a max-pool) and all of them share one
  activation quantizer, the producer writes that quantizer's int8 codes and the
  consumers read them with no quantization pass; a max-pool between them runs
  on the codes (rounding is monotonic, so max commutes with quantization).
  Where the output is needed as float too (a residual identity, pooling, a
  classifier), it stays float and its q4conv readers quantize it as before.

Graph capture is ``torch.fx`` symbolic tracing with q4conv layers as leaves.
Matching is in three passes. (1) Epilogues: for each q4conv call, latest
first, a chain of epilogue steps (``_EPILOGUE_STEPS``) each looks at the only
user of the chain's current tail and takes it into the epilogue or is
skipped. (2) Codes (``_mark_codes_edges``): each q4conv output, in graph
order, is switched to codes where all its users allow it. (3) Each matched
call becomes a :class:`FusedQ4Conv2d`. A graph the passes do not recognise is
left as it is (the layers run unfused), never rewritten into something else.

Ops: outputs in float with no residual and float inputs run
``torch.ops.q4conv.conv_packed`` (the stage-1 path, CUDA kernels included);
everything else (codes in or out, a residual) runs
``torch.ops.q4conv.conv_fused`` (``csrc/conv_epilogue.cpp``), exact on every
device; on CUDA it is the ATen arithmetic until the kernels read and write
codes.
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import _ops
from .layer import Q4Conv2dCutlass, _HostFloats, _is_tracing, _reject_onnx_export, _version_of

__all__ = ["FusedQ4Conv2d", "deploy"]

# BatchNorm types whose eval forward is F.batch_norm with the running statistics.
_FOLDABLE_BATCH_NORMS: Tuple[type, ...] = (nn.BatchNorm2d, nn.SyncBatchNorm)
# Functions / methods that are a ReLU of their first argument.
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
# a + b as functions (either operand order), in place (the tail must be the one changed).
_ADD_FUNCTIONS = (operator.add, torch.add)
_INPLACE_ADD_FUNCTIONS = (operator.iadd,)
# Max-pool functions whose first argument is the input (no indices returned).
_MAX_POOL_FUNCTIONS = (F.max_pool2d, torch.max_pool2d, torch.nn.functional._max_pool2d)
# Functions that change their first argument (besides names ending in "_" and inplace=True).
_MUTATING_FUNCTIONS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                       operator.ilshift, operator.irshift, operator.imatmul, operator.setitem)


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


def _warn_no_gradient() -> None:
    warnings.warn("a deployed q4conv layer (FusedQ4Conv2d) got an input that requires grad: it is inference "
                  "only, so no gradient reaches that input through it (x.grad stays None); for input "
                  "gradients run the q4conv model in eval mode (straight-through gradients) instead of "
                  "the deployed one, or run the deployed model under torch.no_grad()", UserWarning, stacklevel=3)


class FusedQ4Conv2d(_HostFloats, nn.Module):
    """A q4conv convolution with its epilogue: BatchNorm, residual add, ReLU, codes (inference only).

    ``v = alpha[k] * conv(q_a, q_w)[k] + shift[k]`` in float32, plus
    ``fp32(residual)`` where the module takes a residual, then ``max(v, 0)``
    where ``relu``. ``q_a`` are the activation codes: ``x`` quantized with
    ``bias_a`` / ``scale_a`` as the q4conv layer does it, or, with
    ``codes_in``, ``x`` itself (int8 codes written by the producing
    ``FusedQ4Conv2d``). The output is ``v`` in the activations' float dtype
    (x's, or ``float_like``'s with codes in), or, where the module has
    ``out_bias_a`` / ``out_scale_a`` (``codes_out``), the consumers' codes
    ``clamp(rint((v + out_bias_a) / max(out_scale_a, out_eps)))`` as an int8
    (N, K, P, Q) channels_last tensor. ``alpha`` is ``s_a * s_w`` times the
    folded BatchNorm's scale.

    Float in and float out with no residual runs ``torch.ops.q4conv.conv_packed``
    (the CUDA kernels on a GPU, kernel-layout weights cached per device as the
    layer's eval cache); codes in or out, or a residual, runs
    ``torch.ops.q4conv.conv_fused`` (exact on every device; on CUDA its ATen
    arithmetic for now). A residual that is not a tensor of the output's shape,
    dtype and device (a broadcast add, type promotion) is added outside the
    op exactly as the unfused model adds it.

    Every tensor is a buffer (``state_dict`` saves and loads them, ``.to(device)``
    moves them). Their dtypes are fixed: ``alpha`` / ``shift`` / ``bias_a`` /
    ``scale_a`` / ``scale_w`` / ``out_bias_a`` / ``out_scale_a`` float32,
    ``eps`` / ``out_eps`` float64, ``qweight`` uint8; ``.half()`` or
    ``.to(dtype)`` leave them as they are (the epilogue reads float32; the
    input's dtype decides the output's).

    Inference only: no gradient flows through the module (its output does not
    require grad). Build one with :func:`deploy` or :meth:`from_q4conv`.
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
        residual: bool = False,
        codes_in: bool = False,
        out_quantizer: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None,
    ) -> None:
        super().__init__()
        if qweight.dtype != torch.uint8 or qweight.dim() != 4 or qweight.shape[3] != (in_channels + 1) // 2:
            raise ValueError(f"qweight must be a uint8 tensor (K, R, S, {(in_channels + 1) // 2}), "
                             f"got {qweight.dtype} {tuple(qweight.shape)}")
        k = qweight.shape[0]
        out_bias_a, out_scale_a, out_eps = out_quantizer if out_quantizer is not None else (None, None, 1e-5)
        for name, t, shape in (("alpha", alpha, (k,)), ("shift", shift, (k,)), ("bias_a", bias_a, (in_channels,)),
                               ("out_bias_a", out_bias_a, (k,))):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if out_scale_a is not None and out_scale_a.numel() != 1:
            raise ValueError(f"out_scale_a must hold one value, got {out_scale_a.numel()}")
        self.in_channels = int(in_channels)
        self.out_channels = int(k)
        self.kernel_size = (int(qweight.shape[1]), int(qweight.shape[2]))
        self.stride = [int(v) for v in stride]
        self.padding = [int(v) for v in padding]
        self.dilation = [int(v) for v in dilation]
        self.a_bit = int(a_bit)
        self.relu = bool(relu)
        self.backend = backend
        self.residual = bool(residual)
        self.codes_in = bool(codes_in)
        device = qweight.device
        f32 = dict(dtype=torch.float32, device=device)
        f64 = dict(dtype=torch.float64, device=device)
        self.register_buffer("qweight", qweight.detach().clone())
        self.register_buffer("bias_a", bias_a.detach().to(**f32).contiguous())
        self.register_buffer("scale_a", scale_a.detach().to(**f32).clone())
        self.register_buffer("scale_w", scale_w.detach().to(**f32).clone())
        self.register_buffer("eps", torch.tensor(float(eps), **f64))
        self.register_buffer("alpha", alpha.detach().to(**f32).contiguous())
        self.register_buffer("shift", None if shift is None else shift.detach().to(**f32).contiguous())
        codes_out = out_quantizer is not None
        self.register_buffer("out_bias_a", out_bias_a.detach().to(**f32).contiguous() if codes_out else None)
        self.register_buffer("out_scale_a", out_scale_a.detach().to(**f32).clone() if codes_out else None)
        self.register_buffer("out_eps", torch.tensor(float(out_eps), **f64) if codes_out else None)
        # float(buffer) read once per change of the buffer (as the layer reads its eps).
        self._host_floats: Dict[str, Tuple[Any, float]] = {"eps": (None, float(eps)),
                                                           "out_eps": (None, float(out_eps))}
        # (qweight, validity key, kernel-layout weights or None for the fallback)
        self._kernel_cache: Optional[Tuple[torch.Tensor, tuple, Optional[torch.Tensor]]] = None

    @property
    def codes_out(self) -> bool:
        """Whether the output is the consumers' int8 activation codes (else float)."""
        return self._buffers.get("out_scale_a") is not None

    @classmethod
    @torch.no_grad()
    def from_q4conv(cls, layer: Q4Conv2dCutlass, bn: Optional[nn.modules.batchnorm._BatchNorm] = None,
                    relu: bool = False, *, residual: bool = False, codes_in: bool = False,
                    codes_for: Optional[Q4Conv2dCutlass] = None) -> "FusedQ4Conv2d":
        """``relu?(bn?(layer(x)) + residual?)`` of an eval-mode, calibrated q4conv layer as one module.

        ``residual``: the module's forward takes a residual, added before the
        ReLU. ``codes_in``: x is the int8 codes of ``layer``'s activation
        quantizer (written by a producer with ``codes_for=layer``).
        ``codes_for``: a q4conv layer (the consumer) whose activation
        quantizer (``bias_a``, ``scale_a``, ``eps``) the output is written in,
        as int8 codes. ``layer`` is not changed (its packed weights are made on
        the side if it has none). ``bn`` must be in eval mode with running
        statistics.
        """
        if not isinstance(layer, Q4Conv2dCutlass):
            raise TypeError(f"layer must be a Q4Conv2dCutlass, got {type(layer).__name__}")
        if layer.training:
            raise ValueError("from_q4conv needs the layer in eval mode (call .eval())")
        _check_calibrated(layer, "layer")
        if bn is not None and not _foldable_batch_norm(bn, layer.out_channels):
            raise ValueError("bn must be an eval-mode BatchNorm2d with running statistics and "
                             f"num_features={layer.out_channels}")
        out_quantizer = None
        if codes_for is not None:
            if not isinstance(codes_for, Q4Conv2dCutlass) or codes_for.in_channels != layer.out_channels:
                raise ValueError(f"codes_for must be a Q4Conv2dCutlass with in_channels={layer.out_channels}")
            if codes_for.a_bit != layer.a_bit:
                raise ValueError(f"codes_for has a_bit={codes_for.a_bit}, the producer a_bit={layer.a_bit}")
            _check_calibrated(codes_for, "codes_for")
            out_quantizer = (codes_for.bias_a, codes_for.scale_a, float(codes_for.eps))
        eps = float(layer.eps)
        qweight = layer._current_qweight(tracing=False, store=False)
        if qweight is None:  # the packed weights as the layer would make them, without storing them
            qweight = _ops.ops.quantize_pack(layer.weight.detach(), layer.scale_w.detach(), eps, layer.w_bit)
        alpha = _ops.ops.output_alpha(layer.scale_a.detach(), layer.scale_w.detach(), layer.out_channels, eps)
        alpha, shift = fold_batch_norm(alpha, layer.bias, bn)
        return cls(qweight, layer.bias_a, layer.scale_a, layer.scale_w, eps, alpha, shift,
                   in_channels=layer.in_channels, stride=layer.stride, padding=layer.padding,
                   dilation=layer.dilation, a_bit=layer.a_bit, relu=relu, backend=layer.backend,
                   residual=residual, codes_in=codes_in, out_quantizer=out_quantizer)

    def _kernel_weight(self, x: torch.Tensor, backend: str) -> Optional[torch.Tensor]:
        """The kernel-layout weights for x's device and the op's ``backend`` argument, made once per
        qweight."""
        qweight = self._buffers["qweight"]
        key = (x.device, _version_of(qweight), backend)
        cache = self._kernel_cache
        if cache is None or cache[0] is not qweight or cache[1] != key:
            selected = _ops.ops.selected_backend(x, self.out_channels, list(self.kernel_size), self.stride,
                                                 self.padding, self.dilation, backend)
            weight = None if selected == "fallback" else _ops.ops.kernel_weight(qweight, self.in_channels, selected)
            self._kernel_cache = (qweight, key, weight)
        return self._kernel_cache[2]

    def _check_args(self, x: Any, residual: Any, float_like: Any) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a 4-D tensor (N, {self.in_channels}, H, W), got {shape}")
        if self.codes_in != (x.dtype == torch.int8):
            expected = "int8 activation codes" if self.codes_in else "a float tensor"
            raise ValueError(f"x must be {expected} for this module (codes_in={self.codes_in}), got {x.dtype}")
        if self.residual != (residual is not None):
            raise ValueError(f"this module {'takes' if self.residual else 'takes no'} residual "
                             f"(residual={self.residual}), got {type(residual).__name__}")
        if self.codes_in and not self.codes_out and not isinstance(float_like, torch.Tensor):
            raise ValueError("with codes in and a float output, float_like (a tensor of the activations' "
                             f"dtype) is required, got {type(float_like).__name__}")

    def forward(self, x: torch.Tensor, residual: Optional[Any] = None,
                float_like: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_args(x, residual, float_like)
        tracing = _is_tracing(x)
        if tracing:
            _reject_onnx_export()
        elif torch.is_grad_enabled() and (x.requires_grad or getattr(residual, "requires_grad", False)):
            _warn_no_gradient()
        b = self._buffers
        eps = self._host_float("eps", tracing)
        packed = not self.codes_in and not self.codes_out and residual is None
        # conv_packed takes the layer's backend; conv_fused "auto" unless forced to the fallback.
        backend = self.backend if packed else self._fused_backend()
        kernel_weight = None if tracing or not x.is_cuda else self._kernel_weight(x, backend)
        if packed:
            return _ops.ops.conv_packed.default(
                x.detach(), b["bias_a"], b["scale_a"], b["qweight"], b["scale_w"], b["shift"], self.stride,
                self.padding, self.dilation, eps, self.a_bit, self.relu, self.backend, kernel_weight, b["alpha"])
        float_dtype = float_like.dtype if self.codes_in and float_like is not None else x.dtype
        if torch.is_autocast_enabled(x.device.type):  # conv_fused's autocast kernel: float out in its dtype
            float_dtype = torch.get_autocast_dtype(x.device.type)
        fused_residual = residual is None or self._residual_fits(x, residual, float_dtype)
        codes_out = self.codes_out and fused_residual
        out_eps = self._host_float("out_eps", tracing) if codes_out else 1e-5
        y = _ops.ops.conv_fused.default(
            x.detach(), b["bias_a"], b["scale_a"], b["qweight"], b["alpha"], b["shift"], self.stride, self.padding,
            self.dilation, eps, self.a_bit, residual.detach() if fused_residual and residual is not None else None,
            self.relu and fused_residual, b["out_bias_a"] if codes_out else None,
            b["out_scale_a"] if codes_out else None, out_eps,
            float_dtype if self.codes_in and not codes_out else None, backend, kernel_weight)
        if fused_residual:
            return y
        # A residual the op does not take (broadcast, other dtype or device, not a
        # tensor): the unfused model's add, ReLU and quantization, as it runs them.
        y = y + residual
        if self.relu:
            y = torch.relu(y)
        if not self.codes_out:
            return y
        codes = _ops.ops.quantize_activation.default(y.detach(), b["out_bias_a"], b["out_scale_a"],
                                                     self._host_float("out_eps", tracing), self.a_bit)
        return codes.permute(0, 3, 1, 2)

    def _fused_backend(self) -> str:
        """conv_fused's backend: "fallback" where the layer forced it, else "auto" (a forced kernel
        backend would make conv_fused raise for a call only its ATen arithmetic takes, e.g. a
        bfloat16 residual, where the unfused layer ran)."""
        return "fallback" if self.backend == "fallback" else "auto"

    def _residual_fits(self, x: torch.Tensor, residual: Any, float_dtype: torch.dtype) -> bool:
        """Whether conv_fused takes ``residual`` and gives the unfused add's result: a tensor of the
        output's shape on x's device, in the output's float dtype (a float output; for codes out any
        of float32 / float16 / bfloat16: the codes come from fp32 v either way)."""
        if not isinstance(residual, torch.Tensor) or residual.device != x.device or residual.dim() != 4:
            return False
        if residual.dtype != float_dtype and not (
                self.codes_out and residual.dtype in (torch.float32, torch.float16, torch.bfloat16)):
            return False
        # The output's height and width (the op checks the geometry itself).
        p, q = ((x.shape[2 + i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1)
                // self.stride[i] + 1 for i in (0, 1))
        return tuple(residual.shape) == (x.shape[0], self.out_channels, p, q)

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
                f"residual={self.residual}, relu={self.relu}, codes_in={self.codes_in}, codes_out={self.codes_out}")


# ----------------------------------------------------------------- matching
def _check_calibrated(layer: Q4Conv2dCutlass, name: str) -> None:
    if not (bool(layer.scale_a_initialized) or float(layer.scale_a.detach().reshape(())) != 0):
        raise ValueError(f"q4conv layer {name!r} has no activation scale yet (scale_a uninitialised): "
                         "run q4conv.calibrate(model, batches) or a forward on data before deploying (a layer "
                         "whose inputs were all zero, e.g. behind a dead ReLU, gets no scale: set its scale_a)")


def _foldable_batch_norm(bn: nn.Module, channels: int) -> bool:
    """An eval BatchNorm whose forward is the affine map of its running statistics."""
    return (type(bn) in _FOLDABLE_BATCH_NORMS and not bn.training and bn.running_mean is not None
            and bn.running_var is not None and bn.num_features == channels)


def _fusable_q4conv(module: Optional[nn.Module]) -> bool:
    # A subclass with its own forward computes something else: not fused.
    return (isinstance(module, Q4Conv2dCutlass) and type(module).forward is Q4Conv2dCutlass.forward
            and not module.training)


@dataclass
class _Match:
    """A q4conv call node, the epilogue nodes taken after it (in order) and its inputs and output."""

    conv_node: fx.Node
    conv: Q4Conv2dCutlass
    nodes: List[fx.Node] = field(default_factory=list)
    bn: Optional[nn.modules.batchnorm._BatchNorm] = None
    relu: bool = False
    residual: Optional[fx.Node] = None       # the add's other operand (as matched; node.args[1] after)
    codes_in: bool = False                   # x is codes of conv's quantizer
    float_like: Optional[fx.Node] = None     # with codes in: a tensor of the activations' float dtype
    codes_for: Optional[Q4Conv2dCutlass] = None  # output: codes of this consumer's quantizer

    @property
    def tail(self) -> fx.Node:
        return self.nodes[-1] if self.nodes else self.conv_node


def _reads(node: fx.Node) -> List[fx.Node]:
    """The nodes ``node`` reads, once per reference (args and kwargs)."""
    refs: List[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), refs.append)
    return refs


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    """The single node that reads ``node``, reading it once (so the epilogue can replace both)."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    return user if _reads(user).count(node) == 1 else None


def _may_mutate(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """Whether ``node`` may change a tensor in place (conservative: unknown modules may)."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, (Q4Conv2dCutlass, FusedQ4Conv2d)):
            return False
        return bool(getattr(module, "inplace", False)) or not type(module).__module__.startswith("torch.nn.")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in _MUTATING_FUNCTIONS or (name.endswith("_") and not name.endswith("__"))
                or "out" in node.kwargs or any(v is True for v in list(node.args[1:]) + list(node.kwargs.values())))
    if node.op == "call_method":
        name = str(node.target)
        return (name.endswith("_") and not name.endswith("__")) or name == "__setitem__"
    return False


def _nothing_mutates_between(match: _Match, end: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """No node strictly between the conv call and ``end``, other than the chain's own, may change a
    tensor in place: the fused call can then move to ``end`` (where its residual exists) and read
    x and the residual as the unfused nodes did."""
    chain = set(match.nodes)
    node = match.conv_node.next
    while node is not end:
        if node.op == "root":  # end not after the conv: never the case for a user
            return False
        if node not in chain and _may_mutate(node, modules):
            return False
        node = node.next
    return True


def _take_batch_norm(user: fx.Node, modules: Dict[str, nn.Module], match: _Match) -> bool:
    """``bn(tail)`` with an eval BatchNorm2d, before any other epilogue step."""
    if match.relu or match.bn is not None or match.residual is not None or match.nodes or \
            user.op != "call_module" or len(user.args) != 1 or user.kwargs:
        return False
    bn = modules.get(str(user.target))
    if bn is None or not _foldable_batch_norm(bn, match.conv.out_channels):
        return False
    match.bn = bn
    return True


def _take_relu(user: fx.Node, modules: Dict[str, nn.Module], match: _Match) -> bool:
    """A ReLU of the tail: nn.ReLU, F.relu / torch.relu / torch.relu_ (inplace or not), .relu() / .relu_()."""
    if match.relu or user.args[:1] != (match.tail,):
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
    if ok and match.residual is not None and not _nothing_mutates_between(match, user, modules):
        ok = False
    if ok:
        match.relu = True
    return ok


def _take_residual_add(user: fx.Node, modules: Dict[str, nn.Module], match: _Match) -> bool:
    """``tail + other`` / ``other + tail`` (``+``, ``torch.add``, ``.add``; in place only where the tail
    is the tensor changed) with any tensor ``other``, before a ReLU. The fused call moves to the
    add, so nothing between the conv call and the add may change a tensor in place."""
    if match.relu or match.residual is not None or user.kwargs or len(user.args) != 2:
        return False
    tail = match.tail
    first, second = user.args
    either_order = ((user.op == "call_function" and any(user.target is f for f in _ADD_FUNCTIONS))
                    or (user.op == "call_method" and user.target == "add"))
    tail_in_place = first is tail and (
        (user.op == "call_function" and any(user.target is f for f in _INPLACE_ADD_FUNCTIONS))
        or (user.op == "call_method" and user.target == "add_"))
    if not (either_order or tail_in_place):
        return False
    other = second if first is tail else first
    if not isinstance(other, fx.Node) or other is tail or not _nothing_mutates_between(match, user, modules):
        return False
    match.residual = other
    return True


# The epilogue steps, tried in this order on the only user of the chain's tail;
# a step that does not apply is skipped, so "BN", "ReLU", "BN then ReLU",
# "BN, add, ReLU", "add, ReLU", ... all match (a ReLU before the add ends the
# chain there: the op adds the residual before its ReLU). Later stages add
# steps here and the matching arguments of FusedQ4Conv2d.from_q4conv. The
# output's form (float or codes) is not a step: it depends on all users of
# the fused output, decided in a second pass (_mark_codes_edges).
EpilogueStep = Callable[[fx.Node, Dict[str, nn.Module], _Match], bool]
_EPILOGUE_STEPS: Tuple[Tuple[str, EpilogueStep], ...] = (
    ("batch_norm", _take_batch_norm),
    ("relu", _take_relu),
    ("residual_add", _take_residual_add),
    ("relu_after_add", _take_relu),
)


def _q4conv_layer(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[Q4Conv2dCutlass]:
    """The layer of a q4conv call node ``layer(x)`` (fused or not, before pass 3), or None."""
    if node.op != "call_module" or node.kwargs or not 1 <= len(node.args) <= 2:
        return None
    module = modules.get(str(node.target))
    return module if _fusable_q4conv(module) else None  # type: ignore[return-value]


def _match_epilogue(conv_node: fx.Node, modules: Dict[str, nn.Module], steps: Sequence[Tuple[str, EpilogueStep]]
                    ) -> Optional[_Match]:
    """The longest epilogue after a q4conv call node, or None when there is nothing to fuse."""
    conv = _q4conv_layer(conv_node, modules)
    if conv is None or len(conv_node.args) != 1:
        return None
    match = _Match(conv_node, conv)
    for _, step in steps:
        user = _only_user(match.tail)
        if user is None:
            break
        if step(user, modules, match):
            match.nodes.append(user)
    return match if match.nodes else None


def _fuse_epilogues(graph: fx.Graph, modules: Dict[str, nn.Module], residual: bool) -> Dict[fx.Node, _Match]:
    """Pass 1: each q4conv call (the latest first, so of two convolutions meeting in an add the later
    one, a block's main path, takes it) with its epilogue nodes folded into the call node."""
    steps = tuple(s for s in _EPILOGUE_STEPS if residual or s[0] != "residual_add")
    matches: Dict[fx.Node, _Match] = {}
    for node in reversed(list(graph.nodes)):
        match = _match_epilogue(node, modules, steps)
        if match is None:
            continue
        matches[node] = match
        tail = match.tail
        tail.replace_all_uses_with(node)
        if match.residual is not None:
            tail.prepend(node)  # after the residual; _nothing_mutates_between allowed the move
            node.args = (node.args[0], match.residual)
        for taken in reversed(match.nodes):
            graph.erase_node(taken)
    return matches


def _max_pool_of(node: fx.Node, source: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a 2-D max-pool of ``source`` (its first argument, read once), values only,
    with constant pool arguments (``_max_pool_arguments`` reads them)."""
    if not node.args or node.args[0] is not source or _reads(node) != [source]:
        return False
    if node.op == "call_module":
        pool = modules.get(str(node.target))
        return type(pool) is nn.MaxPool2d and not pool.return_indices and len(node.args) == 1 and not node.kwargs
    if node.op == "call_function" and any(node.target is f for f in _MAX_POOL_FUNCTIONS):
        # F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
        return node.kwargs.get("return_indices", False) is False and (len(node.args) < 7 or node.args[6] is False)
    return False


# The pool arguments of F.max_pool2d / torch.max_pool2d after the input, in order, with their defaults
# (a stride of None or [] is the kernel size).
_MAX_POOL_PARAMETERS = (("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1),
                        ("ceil_mode", False))


def _pool_pair(value: Any) -> Any:
    """A max_pool2d size argument as the op's ``int[2]`` (one int or a 1-sequence: both axes);
    anything else as given, for the op to reject as max_pool2d would."""
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, (tuple, list)) and len(value) in (1, 2):
        return [value[0], value[-1]]
    return value


def _max_pool_arguments(pool: fx.Node, modules: Dict[str, nn.Module]) -> Tuple[Any, ...]:
    """``torch.ops.q4conv.max_pool_codes``' arguments after the codes for a node ``_max_pool_of``
    accepted: (kernel_size, stride, padding, dilation, ceil_mode), the sizes as ``[h, w]`` lists."""
    if pool.op == "call_module":
        module = modules[str(pool.target)]
        values = [module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode]
    else:
        values = [pool.args[i + 1] if i + 1 < len(pool.args) else pool.kwargs.get(name, default)
                  for i, (name, default) in enumerate(_MAX_POOL_PARAMETERS)]
    kernel, stride, padding, dilation, ceil_mode = values
    if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0):
        stride = kernel
    return (_pool_pair(kernel), _pool_pair(stride), _pool_pair(padding), _pool_pair(dilation), bool(ceil_mode))


def _same_quantizer(a: Q4Conv2dCutlass, b: Q4Conv2dCutlass) -> bool:
    """One activation quantizer: the same bias_a / scale_a (q4conv.convert's sharing) or equal
    values, with the same eps and bit width."""
    if a.a_bit != b.a_bit or a.in_channels != b.in_channels or float(a.eps) != float(b.eps):
        return False
    if a.bias_a is b.bias_a and a.scale_a is b.scale_a:
        return True
    return all(x.dtype == y.dtype and x.device == y.device and x.shape == y.shape and torch.equal(x, y)
               for x, y in ((a.bias_a.detach(), b.bias_a.detach()), (a.scale_a.detach(), b.scale_a.detach())))


def _mark_codes_edges(graph: fx.Graph, modules: Dict[str, nn.Module], matches: Dict[fx.Node, _Match]) -> None:
    """Pass 2: a q4conv output whose every user is a q4conv layer reading it as x, directly or
    through max-pools, all with one activation quantizer, becomes that quantizer's codes; the
    readers take codes, the max-pools run on them. Graph order, so a producer's input is
    settled (codes or float) before its output is."""
    for node in list(graph.nodes):
        layer = _q4conv_layer(node, modules)
        if layer is None or not node.users:
            continue
        consumers: List[fx.Node] = []
        pools: List[fx.Node] = []
        ok = True
        for user in node.users:
            if _q4conv_layer(user, modules) is not None and user.args[0] is node and _reads(user).count(node) == 1:
                consumers.append(user)
            elif _max_pool_of(user, node, modules) and user.users and all(
                    _q4conv_layer(u, modules) is not None and u.args[0] is user and _reads(u).count(user) == 1
                    for u in user.users):
                pools.append(user)
                consumers.extend(user.users)
            else:
                ok = False
                break
        if not ok or not consumers:
            continue
        readers = [_q4conv_layer(c, modules) for c in consumers]
        first = readers[0]
        if first.in_channels != layer.out_channels or first.a_bit != layer.a_bit or \
                not all(_same_quantizer(first, r) for r in readers[1:]):
            continue
        producer = matches.setdefault(node, _Match(node, layer))
        producer.codes_for = first
        if producer.codes_in:
            float_like = producer.float_like
        else:  # a tensor of x's dtype that does not keep x alive
            with graph.inserting_before(node):
                float_like = graph.call_method("new_empty", (node.args[0], (0,)))
        for consumer in consumers:
            match = matches.setdefault(consumer, _Match(consumer, _q4conv_layer(consumer, modules)))
            match.codes_in, match.float_like = True, float_like
        # The max-pool on the int8 codes themselves (one op, csrc/pool_codes.cpp: a native kernel on
        # CUDA), with the pool's arguments.
        for pool in pools:
            with graph.inserting_before(pool):
                codes = graph.call_function(_ops.ops.max_pool_codes.default,
                                            (node, *_max_pool_arguments(pool, modules)))
            pool.replace_all_uses_with(codes)
            graph.erase_node(pool)


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


def _drop_string_annotations(graph: fx.Graph) -> None:
    """Drops the type annotations fx kept as strings (a forward annotated under
    ``from __future__ import annotations``): the generated code refers to them as global
    objects, which pickling (``torch.save`` of the deployed module) cannot name."""
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = None


@torch.no_grad()
def _q4_layers_on_cpu(model: nn.Module) -> bool:
    """Whether every q4conv layer's tensors are on the CPU (where conv_fused's
    exact path is the only path anyway)."""
    return all(t.device.type == "cpu" for m in model.modules() if isinstance(m, (Q4Conv2dCutlass, FusedQ4Conv2d))
               for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))


def deploy(model: nn.Module, *, leaf_modules: Sequence[Type[nn.Module]] = (),
           residual: Optional[bool] = None, codes: Optional[bool] = None) -> nn.Module:
    """An inference copy of ``model`` (eval mode) with BatchNorm, residual adds, ReLU and activation
    codes fused into its q4conv layers.

    ``model`` is traced with ``torch.fx`` (q4conv layers and ``leaf_modules``
    kept whole) and copied; ``model`` itself is not changed. In the copy, each
    q4conv layer with an epilogue becomes a :class:`FusedQ4Conv2d` under the
    layer's name: an eval ``BatchNorm2d`` that is the layer's only user, then
    (``residual=True``) an add of any other tensor (``+``, ``torch.add``,
    ``.add``, either operand order; ``+=`` / ``.add_`` where the conv side is
    changed in place), then a ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``,
    ``.relu()``, in-place forms), each the only user of what it follows.
    With ``codes=True``, a q4conv output whose every user is a q4conv layer
    (directly or behind ``nn.MaxPool2d`` / ``F.max_pool2d``), all sharing one
    activation quantizer (the same ``bias_a`` / ``scale_a`` objects, as
    ``q4conv.convert`` shares them, or equal values and ``eps``), is written
    as that quantizer's int8 codes, read by the layers without a quantization
    pass; the max-pools run on the codes. An output also needed as float (a
    residual identity, pooling, a classifier, the model's output) stays float.
    Everything else (a BatchNorm in training mode or with other users, a layer
    whose output is used twice, a ReLU before the add) is kept as it was.

    Numerics: the deployed model equals the unfused eval model up to the
    float32 rounding of the BatchNorm fold (alpha and shift are computed in
    float64 and rounded once) and, in float16 / bfloat16, to where values are
    rounded to that dtype: the fused epilogue adds the residual and computes
    codes from the float32 value, the unfused model from values rounded to
    the activations' dtype. In float32 the codes are bit-identical to those
    the consumers compute from the stage-1 deployed model's float outputs
    (``codes=False, residual=False``). Max-pooling codes
    (``torch.ops.q4conv.max_pool_codes``, one int8 op) equals quantizing the
    max-pooled float value except where that value is NaN (it quantizes to
    0; the codes' max-pool gives the largest code of the rest), which a
    q4conv epilogue with finite parameters never produces, and in a window
    holding no input position (``ceil_mode`` with a dilation wider than the
    input: the float pool's -inf quantizes to the lowest code, the codes'
    max-pool gives -128, as ``max_pool2d`` on int8 does).

    On an sm_90 GPU (H100 / H200), convolutions with codes or a residual run
    ``torch.ops.q4conv.conv_fused`` on the sm90 kernels (codes read without a
    quantization pass; residual, ReLU and the consumer's codes in the
    epilogue; bit-identical to its exact arithmetic) for float16 activations;
    float32 / bfloat16 activations, other GPUs and layers the kernels do not
    take run its exact ATen arithmetic (slower). The kernels' int8 output
    store still makes 1x1 layers slower than the stage-1 path, so ``residual``
    and ``codes`` default (``None``) to on for a model on the CPU and off for
    a model on a GPU (every fused layer then runs conv_packed's kernels:
    BatchNorm and ReLU folded, float between layers). Pass ``True`` for the
    codes network on a GPU.

    A module fx cannot trace (data-dependent control flow) is not an error: it
    keeps its own forward, each child holding q4conv layers is deployed in its
    place the same way (fused where something fuses), bare q4conv children
    keep the per-layer eval path, and a UserWarning names the module (put such
    code in ``leaf_modules`` to fuse around it). So the result is an
    ``fx.GraphModule``, or ``model``'s class where the root could not be traced.

    A bare q4conv layer (or another leaf module) is deployed as a one-module
    graph (nothing to fuse). Raises ValueError when ``model`` is in training
    mode or a q4conv layer it calls has no activation scale yet (calibrate first). The
    result runs under ``torch.compile`` and ``torch.export``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    leaf_modules = _leaf_module_types(leaf_modules)
    for name, flag in (("residual", residual), ("codes", codes)):
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"{name} must be True, False or None (the device's default), got {flag!r}")
    if model.training:
        raise ValueError("q4conv.deploy needs the model in eval mode (BatchNorm folds its running "
                         "statistics): call model.eval() first")
    # Modules whose computation depends on the mode (containers' and deployed modules' flags do not).
    training = [name for name, m in model.named_modules()
                if m.training and isinstance(m, (Q4Conv2dCutlass, nn.modules.batchnorm._BatchNorm,
                                                 nn.modules.dropout._DropoutNd))]
    if training:
        warnings.warn("q4conv.deploy: these submodules are in training mode and stay as they are (not fused; "
                      f"a BatchNorm among them updates its running statistics on every call): {training}; "
                      "call model.eval() to deploy all of them", UserWarning, stacklevel=2)
    hooked = _hooked_modules(model)
    on_cpu = _q4_layers_on_cpu(model)
    residual = on_cpu if residual is None else residual
    codes = on_cpu if codes is None else codes
    model = copy.deepcopy(model)
    tracer = _DeployTracer(leaf_modules)
    wrapped = tracer.is_leaf_module(model, "")
    if wrapped:  # a bare layer: fx traces into its root, so give it one
        model = nn.Sequential(model)
    untraced: List[str] = []
    deployed = _deploy_tree(model, tracer, residual, codes, "", untraced, is_root=True)
    if untraced:
        warnings.warn("q4conv.deploy: torch.fx could not trace " + "; ".join(untraced) + ". Each runs its own "
                      "forward, with its submodules deployed one by one (no fusion across them); keep "
                      "submodules fx cannot trace (data-dependent control flow) whole with "
                      "q4conv.deploy(model, leaf_modules=[TheirType, ...]) to fuse around them",
                      UserWarning, stacklevel=2)
    kept = _hooked_modules(deployed)
    if wrapped:  # the layer is child "0" of the root deploy gave it
        kept = [name[2:] if name.startswith("0.") else "<model>" if name == "0" else name for name in kept]
    dropped = [name for name in hooked if name not in set(kept)]
    if dropped:
        warnings.warn("q4conv.deploy: the forward hooks of these modules do not run in the deployed model "
                      f"(torch.fx traced through them, or they were fused into other modules): {dropped}; "
                      "register hooks on the deployed model's modules, or keep such a module whole with "
                      "leaf_modules=[ItsType]", UserWarning, stacklevel=2)
    return deployed


def _leaf_module_types(leaf_modules: Any) -> Tuple[Type[nn.Module], ...]:
    """deploy's ``leaf_modules`` as a tuple of nn.Module subclasses, or TypeError naming it."""
    if isinstance(leaf_modules, (type, nn.Module, str)):  # iterable or not, never a sequence of types
        items = None
    else:
        try:
            items = tuple(leaf_modules)
        except TypeError:
            items = None
    if items is None or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in items):
        got = (f"{leaf_modules.__name__} itself (pass [{leaf_modules.__name__}])" if isinstance(leaf_modules, type)
               else f"a {type(leaf_modules).__name__}" if items is None else
               "[" + ", ".join(t.__name__ if isinstance(t, type) else f"a {type(t).__name__} instance"
                               for t in items) + "]")
        raise TypeError(f"leaf_modules must be a sequence of nn.Module subclasses (types, e.g. [MyBlock]), got {got}")
    return items


def _hooked_modules(model: nn.Module) -> List[str]:
    """Qualified names of the modules of ``model`` with forward or forward-pre hooks."""
    return [name or "<model>" for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks]


def _deploy_tree(model: nn.Module, tracer: "_DeployTracer", residual: bool, codes: bool, path: str,
                 untraced: List[str], is_root: bool = False) -> nn.Module:
    """``model`` (a copy deploy owns) captured and fused, or, where fx cannot trace it, ``model``
    itself running its own forward with each child that holds q4conv layers deployed in its place
    (recursively; such a child is replaced only where something was fused); bare q4conv children
    stay as they are (the per-layer eval path). Modules fx could not trace go to ``untraced``."""
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, AttributeError... on what it cannot trace
        untraced.append(f"{path or type(model).__name__} ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
    else:
        # The eval q4conv layers the graph calls (or a leaf module it calls holds) must be
        # calibrated; one it never calls (an auxiliary head used in training only) need not be.
        for node in graph.nodes:
            if node.op == "call_module":
                called = f"{path}.{node.target}" if path else str(node.target)
                for name, module in tracer.root.get_submodule(str(node.target)).named_modules(prefix=called):
                    if isinstance(module, Q4Conv2dCutlass) and not module.training:
                        _check_calibrated(module, name)
        gm, fused_any = _deploy_graph(graph, tracer.root, type(model).__name__, residual, codes)
        return gm if fused_any or is_root else model
    for name, child in list(model.named_children()):
        if isinstance(child, Q4Conv2dCutlass) and not child.training:  # runs its own eval path
            _check_calibrated(child, f"{path}.{name}" if path else name)
        if tracer.is_leaf_module(child, name) or not any(isinstance(m, Q4Conv2dCutlass) for m in child.modules()):
            continue
        setattr(model, name, _deploy_tree(child, tracer, residual, codes, f"{path}.{name}" if path else name,
                                          untraced))
    return model


def _deploy_graph(graph: fx.Graph, root: nn.Module, name: str, residual: bool,
                  codes: bool) -> Tuple[fx.GraphModule, bool]:
    """deploy's rewrite of one traced module: the GraphModule, and whether anything was fused."""
    _drop_string_annotations(graph)
    gm = fx.GraphModule(root, graph, name)
    modules = dict(gm.named_modules())
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    matches = _fuse_epilogues(graph, modules, residual)
    if codes:
        _mark_codes_edges(graph, modules, matches)
    # Pass 3: the modules, named in graph order.
    carriers = set()
    for node in list(graph.nodes):
        match = matches.get(node)
        if match is None:
            continue
        fused = FusedQ4Conv2d.from_q4conv(match.conv, match.bn, match.relu, residual=match.residual is not None,
                                          codes_in=match.codes_in, codes_for=match.codes_for)
        args: Tuple[Any, ...] = tuple(node.args)  # (x,) or (x, residual): pass 1 set them
        if match.codes_in and match.codes_for is None:  # codes in, float out: the float dtype's carrier
            args += (None,) * (2 - len(args)) + (match.float_like,)
        if match.float_like is not None:
            carriers.add(match.float_like)
        node.args = args
        target = str(node.target)
        if calls[target] > 1:  # a layer called in several places keeps its name for the other calls
            target = _free_name(gm, target)
        gm.add_submodule(target, fused)
        node.target = target
    for carrier in carriers:
        if not carrier.users:
            graph.erase_node(carrier)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, bool(matches)
