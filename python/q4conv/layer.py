"""The ``Q4Conv2dCutlass`` layer: a W4A4 quantization-aware ``Conv2d``.

Quantization follows SPEC section 3: LSQ scales, an LSQ+ learnable activation
shift ``bias_a``, signed 4-bit codes. The arithmetic lives in C++
(``csrc/quant.h``); this module holds parameters and state only.
"""

from __future__ import annotations

import itertools
import math
import operator
import warnings
import weakref
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from . import _ops

IntOrPair = Union[int, Tuple[int, int]]
SUPPORTED_BITS = (4,)
# The backend argument's values (csrc/plan.h's Backend, as parse_backend reads them).
BACKENDS = ("auto", "fallback", "sm80_int4", "sm90_int8")
_INT64_MAX = 2**63 - 1
# Keys a q4conv layer has beyond nn.Conv2d's weight and bias.
_Q4_ONLY_KEYS = ("qweight", "bias_a", "scale_a", "scale_w", "eps", "scale_a_initialized")
_EXPORT_ROUTES = "torch.export, torch.compile or torch.jit.trace"


def _int_arg(value: Any, name: str) -> int:
    """An integer as nn.Conv2d accepts it: int, numpy integer, 0-d integer
    tensor (anything with ``__index__``); bools, floats and None are rejected."""
    is_bool = isinstance(value, bool) or type(value).__name__ in ("bool_", "bool") or (
        isinstance(value, torch.Tensor) and value.dtype == torch.bool)
    if value is None or is_bool:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        result = operator.index(value)
    except (TypeError, RuntimeError):
        raise ValueError(f"{name} must be an integer (int, numpy integer or 0-d integer tensor), "
                         f"got {value!r} of type {type(value).__name__}") from None
    if abs(result) > _INT64_MAX:
        raise ValueError(f"{name} must fit in int64, got {result}")
    return result


def _pair(value: Any, name: str, minimum: int) -> Tuple[int, int]:
    """An integer or a pair (tuple/list) of integers, each >= minimum."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        pair = (_int_arg(value[0], name), _int_arg(value[1], name))
    else:
        if isinstance(value, str):
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        pair = (_int_arg(value, name),) * 2
    if any(v < minimum for v in pair):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


def _padding_arg(padding: Any, kernel_size: Tuple[int, int], stride: Tuple[int, int],
                 dilation: Tuple[int, int]) -> Tuple[int, int]:
    """padding as nn.Conv2d takes it: int, pair, 'valid' (0) or 'same' (stride
    1, the same total padding as nn.Conv2d, which must split evenly)."""
    if not isinstance(padding, str):
        return _pair(padding, "padding", 0)
    if padding == "valid":
        return (0, 0)
    if padding != "same":
        raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    if stride != (1, 1):
        raise ValueError(f"padding='same' needs stride 1 (as nn.Conv2d), got stride={stride}")
    result = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        if total % 2:
            raise ValueError(
                f"padding='same' needs symmetric padding, but kernel_size={kernel_size} with "
                f"dilation={dilation} needs {total} padding in total along an axis (odd); pass an "
                f"explicit padding or pad the input asymmetrically with torch.nn.functional.pad")
        result.append(total // 2)
    return result[0], result[1]


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


# Bound once: _is_tracing runs on every forward, which is host bound for small layers.
_is_compiling = torch.compiler.is_compiling
_jit_tracing = torch._C._is_tracing
_get_dispatch_mode = torch._C._get_dispatch_mode
_FAKE_MODE, _PROXY_MODE = torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY
_FakeTensor = torch._subclasses.fake_tensor.FakeTensor


def _distributed() -> bool:
    """Whether scale_a's statistic is all-reduced (a process group of several ranks)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_tracing(t: Optional[torch.Tensor] = None) -> bool:
    """True while torch.compile / torch.export / torch.jit.trace / make_fx trace
    the module, or when fake tensors flow: the layer must not change its state
    then (it would store traced values in the live module)."""
    return (_is_compiling() or _jit_tracing() or isinstance(t, _FakeTensor)
            or _get_dispatch_mode(_FAKE_MODE) is not None or _get_dispatch_mode(_PROXY_MODE) is not None)


def _reject_onnx_export() -> None:
    if torch.onnx.is_in_onnx_export():
        raise RuntimeError("q4conv layers cannot be exported to ONNX (their packed int4 operators "
                           f"have no ONNX equivalent); supported export routes: {_EXPORT_ROUTES}")


class _HostFloats:
    """float(buffer) for forward without a device sync: a buffer is re-read only
    when its storage or version counter changed; while tracing, the last value
    read. The class fills ``_host_floats`` (buffer name -> (key, value)) in
    __init__."""

    _buffers: Dict[str, torch.Tensor]
    _host_floats: Dict[str, Tuple[Any, float]]

    def _host_float(self, name: str, tracing: bool) -> float:
        key, value = self._host_floats[name]
        if not tracing:
            t = self._buffers[name]
            now = (t.data_ptr(), _version_of(t))
            if now != key:
                value = float(t)
                self._host_floats[name] = (now, value)
        return value


class Q4Conv2dCutlass(_HostFloats, nn.Module):
    """4-bit weights and 4-bit activations 2-D convolution (NCHW or channels_last).

    Args:
        in_channels, out_channels: any positive counts (padded internally).
        kernel_size, stride, padding, dilation: an integer or a pair, as
            ``nn.Conv2d`` (ints, numpy integers, 0-d integer tensors);
            ``padding`` also takes ``'valid'`` (0) and ``'same'`` (stride 1,
            where the total padding is even, i.e. symmetric).
        a_bit, w_bit: code widths; 4 is the only width every backend supports.
        device, dtype: of the parameters (``dtype`` float32 by default).
        bias: add a learnable output bias, fused into the kernel epilogue.
        groups, padding_mode: accepted for ``nn.Conv2d`` compatibility; only
            ``groups=1`` and ``padding_mode='zeros'`` are supported.
        per_channel_weight_scale: one weight scale per output channel.
        learn_weight_scale: train ``scale_w`` with the LSQ gradient.
        backend: ``"auto"`` (dispatch by device and shape) or a forced
            backend (``"fallback"``, ``"sm80_int4"``, ``"sm90_int8"``).

    Activation scale (``scale_a``) lifecycle:
        * The persistent buffer ``scale_a_initialized`` (bool, saved in the
          ``state_dict``) records whether ``scale_a`` is initialised. A
          ``state_dict`` without it (older checkpoints) counts as initialised
          where its ``scale_a`` is non-zero.
        * ``forward`` / ``set_activation`` initialise ``scale_a`` from the batch
          (LSQ: 2 * mean|x + bias_a| / sqrt(Qp), averaged over ranks under
          ``torch.distributed``) only when it is not initialised and the stored
          ``scale_a`` is 0; a non-zero ``scale_a`` set by the user counts as
          initialised and is never overwritten. A batch whose statistic is 0
          (all zeros, or N = 0) or not finite (NaN / Inf, or beyond the range of
          ``scale_a``'s dtype) leaves it uninitialised, so the next batch
          initialises it.
        * ``calibrate_(x)`` (one layer) and ``q4conv.calibrate(model, batches)``
          (every layer, statistics averaged over the batches) re-initialise
          ``scale_a`` from data on purpose.
        * ``freeze_scales()`` stops learning ``scale_a`` and ``scale_w``
          (``requires_grad=False``); ``freeze_scales(False)`` resumes it.
        * Tracing, exporting or compiling (``torch.export``, ``torch.compile``,
          ``torch.jit.trace``) never changes the module: no initialisation, no
          stored ``qweight``; the traced graph uses whatever ``scale_a`` holds,
          so run a forward or a calibration first.

    Float weights: ``layer.load_float_weights(conv)`` copies an ``nn.Conv2d``'s
    weight and bias; ``q4conv.load_float_state_dict(model, float_state_dict)``
    loads a float model's ``state_dict``. Both re-initialise ``scale_w`` from
    the new weights and mark ``scale_a`` uninitialised. A plain
    ``load_state_dict`` (``strict=False``) holding ``weight`` but no ``scale_w``
    re-runs ``prepare_params()`` too, so ``scale_w`` is never stale.

    ``eps`` is the registered buffer: every computation uses ``float(eps)``
    (read on the host only when the buffer changes), so a layer and its
    reloaded copy agree in every parameter dtype.

    Mixed precision: under ``torch.autocast`` the ops run on x cast to the
    autocast dtype (``csrc/autocast.cpp``; this module casts nothing); the
    parameters stay as they are (fp32 master weights, fp32 gradients), and
    ``scale_a`` is initialised from x as given.

    Export routes: ``torch.export``, ``torch.compile`` and ``torch.jit.trace``
    are supported; ``torch.jit.script`` and ONNX export raise a clear error.
    Eval mode (packed weights) has a straight-through input gradient (as
    training's dx) and no parameter gradients.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Union[IntOrPair, str] = 0,
        dilation: IntOrPair = 1,
        a_bit: int = 4,
        w_bit: int = 4,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = torch.float,
        *,
        bias: bool = False,
        groups: int = 1,
        padding_mode: str = "zeros",
        per_channel_weight_scale: bool = False,
        learn_weight_scale: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        in_channels = _int_arg(in_channels, "in_channels")
        out_channels = _int_arg(out_channels, "out_channels")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        if _int_arg(groups, "groups") != 1:
            raise ValueError(f"groups={groups} is not supported: q4conv layers support groups=1 only")
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode={padding_mode!r} is not supported: q4conv layers support "
                             "padding_mode='zeros' only")
        a_bit, w_bit = _int_arg(a_bit, "a_bit"), _int_arg(w_bit, "w_bit")
        for name, bits in (("a_bit", a_bit), ("w_bit", w_bit)):
            if bits not in SUPPORTED_BITS:
                raise ValueError(f"{name} must be 4 (the width every q4conv backend supports), got {bits}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        if dtype is None:
            dtype = torch.get_default_dtype()
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"dtype must be a floating point type, got {dtype}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.dilation = _pair(dilation, "dilation", 1)
        self.padding = _padding_arg(padding, self.kernel_size, self.stride, self.dilation)
        for axis in range(2):  # the C++ geometry arithmetic is int64
            extent = self.dilation[axis] * (self.kernel_size[axis] - 1) + 1
            if extent > _INT64_MAX // 2 or self.padding[axis] > _INT64_MAX // 4:
                raise ValueError(f"dilation={self.dilation} with kernel_size={self.kernel_size} and "
                                 f"padding={self.padding} overflow int64 geometry arithmetic")
        self.groups = 1
        self.padding_mode = "zeros"
        self.a_bit = a_bit
        self.w_bit = w_bit
        self.backend = backend
        self.per_channel_weight_scale = bool(per_channel_weight_scale)
        self.learn_weight_scale = bool(learn_weight_scale)
        factory = {"device": device, "dtype": dtype}

        self.weight: Optional[nn.Parameter] = nn.Parameter(
            torch.empty((out_channels, in_channels, *self.kernel_size), **factory)
        )
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Conv2d
        self.register_buffer("qweight", None)
        self.bias_a = nn.Parameter(torch.zeros(in_channels, **factory))
        self.scale_a = nn.Parameter(torch.zeros((), **factory))
        scale_shape = (out_channels,) if per_channel_weight_scale else ()
        self.scale_w = nn.Parameter(torch.ones(scale_shape, **factory), requires_grad=self.learn_weight_scale)
        self.register_buffer("eps", torch.tensor(1e-5, **factory))
        self.register_buffer("scale_a_initialized", torch.tensor(False, device=device))
        if bias:
            self.bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        # Host-side copies so forward never synchronises with the device: eps
        # (re-read when the buffer's storage or version changes) and whether
        # scale_a is initialised (kept with the buffer by this class).
        self._host_floats: Dict[str, Tuple[Any, float]] = {"eps": (None, 1e-5)}
        # A one-element list, so layers that share one activation quantizer
        # (q4conv.convert) share it too: resetting the shared scale_a through
        # one layer makes every layer of the group re-initialise it.
        self._scale_a_flag: List[bool] = [False]
        # Set by q4conv.calibrate: [sum |x + bias_a|, count] over the batches seen.
        self._calibration: Optional[List[Any]] = None
        # Eval-mode CUDA cache: (validity key, alpha, kernel-layout weights).
        self._inference_cache: Optional[Tuple[torch.Tensor, Any, torch.Tensor, Optional[torch.Tensor]]] = None
        # What the stored qweight was packed from: (id(qweight), _weight_source()).
        self._packed_from: Optional[Tuple[int, ...]] = None
        if self.eps.device.type != "meta":  # meta tensors hold no value (read on first use instead)
            self._host_float("eps", tracing=False)
        self.prepare_params()

    # ------------------------------------------------------------------ scales
    @torch.no_grad()
    def prepare_params(self) -> None:
        """Initialise ``scale_w`` from the weights: 2 * mean|w| / sqrt(Qp) (LSQ).

        Called by the constructor; call it again after loading or changing the
        float weights before training (``prepare_q4conv_layers`` does it for a
        whole model; ``load_state_dict`` does it when a state_dict holds
        ``weight`` but no ``scale_w``).
        """
        if self.weight is None:
            raise RuntimeError("prepare_params needs the float weight, which was dropped by "
                               "generate_quantized_weight(qweight_only=True)")
        w = self.weight.detach().float().abs()
        mean_abs = w.mean(dim=(1, 2, 3)) if self.per_channel_weight_scale else w.mean()
        self.scale_w.copy_(2.0 * mean_abs / math.sqrt(_qmax(self.w_bit)))
        self.qweight = None

    @property
    def _scale_a_ready(self) -> bool:
        """Host copy of scale_a_initialized (forward never reads the device)."""
        return self._scale_a_flag[0]

    @_scale_a_ready.setter
    def _scale_a_ready(self, ready: bool) -> None:
        self._scale_a_flag[0] = ready

    def __getstate__(self) -> Dict[str, Any]:
        # A copy or pickle made while q4conv.calibrate runs is a plain layer:
        # the running statistic belongs to that calibration, which resets only
        # the original's (a copy keeping it would recalibrate on every forward).
        state = self.__dict__.copy()
        state["_calibration"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # Modules pickled before the flag was shared kept a plain bool ...
        ready = state.pop("_scale_a_ready", False)
        super().__setstate__(state)
        if "_scale_a_flag" not in self.__dict__:
            self._scale_a_flag = [bool(ready)]
        # ... and eps as _eps_key / _eps_value.
        if "_host_floats" not in self.__dict__:
            self._host_floats = {"eps": (self.__dict__.pop("_eps_key", None),
                                         self.__dict__.pop("_eps_value", 1e-5))}

    def _mark_scale_a(self, ready: bool) -> None:
        self.scale_a_initialized.fill_(ready)
        self._scale_a_ready = ready

    @torch.no_grad()
    def _activation_statistic(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(sum |x + bias_a|, element count) in fp32, summed over ranks."""
        shifted = x.detach().float() + self.bias_a.detach().float().view(1, -1, 1, 1)
        stats = torch.stack([shifted.abs().sum(dtype=torch.float64),
                             torch.tensor(float(shifted.numel()), dtype=torch.float64, device=x.device)])
        if _distributed():
            dist.all_reduce(stats)  # every rank starts from the same scale
        return stats[0], stats[1]

    @torch.no_grad()
    def _set_scale_a_from(self, total: torch.Tensor, count: torch.Tensor) -> bool:
        """scale_a = 2 * (total / count) / sqrt(Qp) when that is finite and > 0
        in scale_a's dtype (an fp16 layer cannot hold the scale of huge values)."""
        value = (2.0 * (total / count.clamp_min(1)) / math.sqrt(_qmax(self.a_bit))).to(self.scale_a.dtype)
        host = float(value)
        if not (math.isfinite(host) and host > 0):
            return False
        self.scale_a.copy_(value.reshape(self.scale_a.shape))
        self._mark_scale_a(True)
        return True

    @torch.no_grad()
    def _init_scale_a(self, x: torch.Tensor) -> None:
        """The first-use rule of the class docstring."""
        # An empty batch has no statistic, but under torch.distributed it still joins the
        # all-reduce (contributing (0, 0)): skipping it left the other ranks waiting in
        # their all_reduce until the process group timed out (issue 20).
        if self._scale_a_ready or (x.shape[0] == 0 and not _distributed()):
            return
        if float(self.scale_a.detach().reshape(())) != 0:  # set by the user: never overwritten
            self._mark_scale_a(True)
            return
        self._set_scale_a_from(*self._activation_statistic(x))

    def set_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Initialise ``scale_a`` from ``x`` if it is not initialised yet (see the
        class docstring for the rule); return ``x + bias_a``."""
        self._check_input(x)
        if not _is_tracing(x):
            self._init_scale_a(x)
        return x + self.bias_a.view(1, -1, 1, 1).to(x.dtype)

    @torch.no_grad()
    def calibrate_(self, x: torch.Tensor) -> "Q4Conv2dCutlass":
        """(Re)initialise ``scale_a`` from the batch ``x`` on purpose (LSQ
        statistic, averaged over ranks under torch.distributed), whatever its
        current value. Raises ValueError if the statistic is 0 or not finite
        (``scale_a`` then stays as it was). Returns ``self``."""
        self._check_input(x)
        if _is_tracing(x):
            raise RuntimeError("calibrate_ changes the module and cannot run while tracing, exporting or compiling")
        if not self._set_scale_a_from(*self._activation_statistic(x)):
            raise ValueError("calibrate_: mean|x + bias_a| of the batch is 0 or not finite; scale_a unchanged")
        return self

    def freeze_scales(self, frozen: bool = True) -> "Q4Conv2dCutlass":
        """Stop (``frozen=True``) or resume learning the scales: sets
        ``requires_grad`` of ``scale_a`` and ``scale_w`` (``scale_w`` resumes
        only with ``learn_weight_scale=True``). Initialisation of an
        uninitialised ``scale_a`` from the first batch still happens; freeze
        after calibrating to keep calibrated scales fixed. Returns ``self``."""
        self.scale_a.requires_grad_(not frozen)
        self.scale_w.requires_grad_(not frozen and self.learn_weight_scale)
        return self

    @torch.no_grad()
    def _reset_scale_a(self) -> None:
        """Mark scale_a uninitialised (value 0): the next batch initialises it."""
        self.scale_a.zero_()
        self._mark_scale_a(False)

    @torch.no_grad()
    def load_float_weights(self, conv: nn.Conv2d) -> "Q4Conv2dCutlass":
        """Copy ``weight`` (and ``bias``) of a float ``nn.Conv2d`` of the same
        geometry, re-initialise ``scale_w`` from them (``prepare_params``) and
        mark ``scale_a`` uninitialised (the next batch, or a calibration,
        initialises it). The layer is then ready to train. Returns ``self``."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        padding = _padding_arg(conv.padding, self.kernel_size, self.stride, self.dilation) \
            if isinstance(conv.padding, str) else tuple(conv.padding)
        for name, mine, theirs in (("in_channels", self.in_channels, conv.in_channels),
                                   ("out_channels", self.out_channels, conv.out_channels),
                                   ("kernel_size", self.kernel_size, tuple(conv.kernel_size)),
                                   ("stride", self.stride, tuple(conv.stride)),
                                   ("padding", self.padding, padding),
                                   ("dilation", self.dilation, tuple(conv.dilation)),
                                   ("groups", 1, conv.groups)):
            if mine != theirs:
                raise ValueError(f"conv.{name} is {theirs} but this layer's {name} is {mine}")
        if conv.bias is not None and self.bias is None:
            raise ValueError("conv has a bias but this layer was built with bias=False")
        if self.weight is None:
            device, dtype = self.bias_a.device, self.bias_a.dtype
            self.weight = nn.Parameter(torch.empty(conv.weight.shape, device=device, dtype=dtype))
        self.weight.copy_(conv.weight)
        if self.bias is not None:
            if conv.bias is None:
                self.bias.zero_()
            else:
                self.bias.copy_(conv.bias)
        self.prepare_params()
        self._reset_scale_a()
        return self

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError("q4conv layers do not support torch.jit.script; use " + _EXPORT_ROUTES)

    # ----------------------------------------------------------------- weights
    @torch.no_grad()
    def generate_quantized_weight(self, qweight_only: bool = False) -> None:
        """Pack the weights to int4 codes in ``qweight`` (K, R, S, ceil(C/2)) uint8.

        With ``qweight_only=True`` the float weight is dropped: the module then
        runs inference only, and saves/loads ``qweight`` through ``state_dict``.
        """
        if self.weight is None:
            if self.qweight is None:
                raise RuntimeError("neither weight nor qweight is present")
            return
        tracing = _is_tracing(self.weight)
        self.qweight = self._pack_weight(tracing)
        if not tracing:
            self._packed_from = (id(self.qweight),) + self._weight_source()
        if qweight_only:
            self.weight = None

    def _weight_source(self) -> Tuple[int, ...]:
        """What packed weights are made of: weight and scale_w (identity, storage, in-place version)."""
        w, s = self._parameters["weight"], self._parameters["scale_w"]
        return (id(w), w.data_ptr(), _version_of(w), id(s), s.data_ptr(), _version_of(s))

    def _current_qweight(self, tracing: bool, store: bool = True) -> Optional[torch.Tensor]:
        """The stored qweight, packed again where ``weight`` or ``scale_w`` changed since it was
        packed (in place, by ``.data`` or by a new Parameter: an EMA copy in eval mode, pruning,
        ``.half()``); None where there is none. A qweight packed elsewhere (loaded, assigned) is
        taken as made from the weights the layer holds when it is first used. ``store=False``
        returns a fresh pack without storing it; while tracing nothing is checked or stored."""
        qweight = self._buffers["qweight"]
        if qweight is None or tracing or self._parameters["weight"] is None:
            return qweight
        packed_from = self.__dict__.get("_packed_from")  # absent in modules pickled before it existed
        source = (id(qweight),) + self._weight_source()
        if packed_from is None or packed_from[0] != source[0]:
            self._packed_from = source
        elif packed_from != source:
            if not store:
                return self._pack_weight(tracing=False)
            self.generate_quantized_weight()
            qweight = self._buffers["qweight"]
        return qweight

    def _pack_weight(self, tracing: bool) -> torch.Tensor:
        with torch.no_grad():
            return _ops.ops.quantize_pack(self.weight, self.scale_w, self._host_float("eps", tracing), self.w_bit)

    @property
    def opt_weight(self) -> torch.Tensor:
        """The weight forward uses: float ``weight`` in training, packed ``qweight`` in eval
        (generated on demand; while tracing it is computed but not stored)."""
        if self.training:
            if self.weight is None:
                raise RuntimeError("this Q4Conv2dCutlass holds only qweight (qweight_only=True): "
                                   "it runs inference (eval mode) only")
            return self.weight
        tracing = self.weight is not None and _is_tracing(self.weight)
        qweight = self._current_qweight(tracing)
        if qweight is None:
            if tracing:
                return self._pack_weight(tracing=True)
            self.generate_quantized_weight()
            qweight = self.qweight
        return qweight  # type: ignore[return-value]

    def __dir__(self) -> List[str]:
        # torch.jit.trace calls hasattr() on every name dir() lists, which would
        # run the opt_weight property and store a qweight in the live module.
        return [name for name in super().__dir__() if name != "opt_weight"]

    def train(self, mode: bool = True) -> "Q4Conv2dCutlass":
        # Training changes weight and scale_w, so packed weights go stale.
        if mode and self.weight is not None:
            self.qweight = None
        return super().train(mode)

    # ----------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a 4-D tensor (N, C, H, W), got {shape}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x must have in_channels={self.in_channels} channels (dim 1), got {x.shape[1]}")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
        device = self._parameters["bias_a"].device
        if x.device != device:
            raise ValueError(f"x is on {x.device} but the layer's parameters are on {device}")

    def _calibrate_step(self, x: torch.Tensor) -> None:
        """One batch of q4conv.calibrate: scale_a from the statistic of every batch so far."""
        total, count = self._activation_statistic(x)
        acc = self._calibration
        assert acc is not None
        acc[0], acc[1] = acc[0] + total, acc[1] + count
        self._set_scale_a_from(acc[0], acc[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        tracing = _is_tracing(x)
        if tracing:
            _reject_onnx_export()
        elif self._calibration is not None:
            self._calibrate_step(x)
        elif not self._scale_a_ready and (x.shape[0] > 0 or _distributed()):  # skips the no_grad decorator's cost
            self._init_scale_a(x)
        # This runs on every call and a small layer's call is host bound
        # (docs/notes/host-overhead.md): the .default overloads skip the overload-packet lookup,
        # and parameters come from the _parameters dict (each self.<parameter>
        # is a Module.__getattr__ call).
        args = (list(self.stride), list(self.padding), list(self.dilation), self._host_float("eps", tracing), self.a_bit)
        named = self._parameters
        bias_a, scale_a, scale_w, bias = named["bias_a"], named["scale_a"], named["scale_w"], named["bias"]
        if self.training:
            return _ops.ops.conv_train.default(
                x, bias_a, scale_a, self.opt_weight, scale_w, bias, *args, self.backend
            )
        # Packed inference: x gets a straight-through gradient (as training's
        # dx), the parameters none: with grad mode on they enter detached.
        # Under no_grad / inference_mode no graph is built, and the detach
        # calls (ATen ops each) are skipped; a trace always has them (one
        # graph whatever the grad mode, which torch.jit.trace's check wants).
        if tracing or torch.is_grad_enabled():
            bias_a, scale_a, scale_w, bias = (None if p is None else p.detach()
                                              for p in (bias_a, scale_a, scale_w, bias))
        qweight = self._current_qweight(tracing)  # opt_weight's eval branch without its attribute lookups
        if qweight is None:
            qweight = self.opt_weight
        alpha = kernel_weight = None
        if x.is_cuda and not tracing:
            alpha, kernel_weight = self._cached_kernel_inputs(x, qweight, args[3])
        return _ops.ops.conv_packed.default(
            x, bias_a, scale_a, qweight, scale_w, bias, *args, False, self.backend, kernel_weight, alpha,
        )

    def _cached_kernel_inputs(
        self, x: torch.Tensor, qweight: torch.Tensor, eps: float
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """alpha = s_a * s_w and the kernel-layout weights, made once per set of
        packed weights and scales (keyed on their storage and version counters)
        instead of on every eval-mode call (CUDA inputs, not while tracing)."""
        # The cache holds qweight itself, so its storage cannot be freed and
        # reused by a new qweight; in-place changes bump the version counters.
        scale_a, scale_w = self._parameters["scale_a"], self._parameters["scale_w"]
        key = (x.device, _version_of(qweight), scale_a.data_ptr(), _version_of(scale_a),
               scale_w.data_ptr(), _version_of(scale_w), eps, self.backend)
        cache = self._inference_cache
        if cache is None or cache[0] is not qweight or cache[1] != key:
            alpha = _ops.ops.output_alpha(self.scale_a.detach(), self.scale_w.detach(), self.out_channels, eps)
            # The plan's backend for this input: its weight layout. An input
            # another backend runs re-lays the weights per call (conv_packed
            # checks the cached layout).
            backend = _ops.ops.selected_backend(x, self.out_channels, list(self.kernel_size), list(self.stride),
                                                list(self.padding), list(self.dilation), self.backend)
            weight = None if backend == "fallback" else _ops.ops.kernel_weight(qweight, self.in_channels, backend)
            self._inference_cache = (qweight, key, alpha, weight)
        return self._inference_cache[2], self._inference_cache[3]

    # -------------------------------------------------------------- state_dict
    def _load_from_state_dict(
        self,
        state_dict: Dict[str, Any],
        prefix: str,
        local_metadata: Dict[str, Any],
        strict: bool,
        missing_keys: List[str],
        unexpected_keys: List[str],
        error_msgs: List[str],
    ) -> None:
        weight_key, qweight_key = prefix + "weight", prefix + "qweight"
        has_weight, has_qweight = weight_key in state_dict, qweight_key in state_dict
        # Scales of the wrong shape: a message naming the key and the shape
        # before anything is loaded.
        for name in ("scale_a", "scale_w"):
            key = prefix + name
            if key in state_dict:
                value, expected_shape = state_dict[key], tuple(self._parameters[name].shape)
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                if got != expected_shape:
                    raise ValueError(f"{key} must be a tensor of shape {expected_shape}, got {got}")
        expected = (self.out_channels, *self.kernel_size, (self.in_channels + 1) // 2)
        device = self.bias_a.device
        if has_qweight:
            qweight = state_dict[qweight_key]
            if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or tuple(qweight.shape) != expected:
                got = (qweight.dtype, tuple(qweight.shape)) if isinstance(qweight, torch.Tensor) else type(qweight)
                raise ValueError(f"{qweight_key} must be a uint8 tensor of shape {expected}, got {got}")
            self.qweight = torch.empty(expected, dtype=torch.uint8, device=device)
        elif not has_weight and strict:
            raise ValueError(f"state_dict has neither {weight_key} nor {qweight_key}: "
                             "a Q4Conv2dCutlass needs its float or its packed weights")
        if has_weight and self.weight is None:
            shape = (self.out_channels, self.in_channels, *self.kernel_size)
            self.weight = nn.Parameter(torch.empty(shape, dtype=self.bias_a.dtype, device=device))
        if has_qweight and not has_weight and self.weight is not None:
            self.weight = None  # a qweight-only checkpoint makes an inference-only layer
        if has_weight and not has_qweight:
            self.qweight = None  # regenerate from the loaded weights
        flag_key, scale_a_key = prefix + "scale_a_initialized", prefix + "scale_a"
        if flag_key not in state_dict and scale_a_key in state_dict:
            # A checkpoint from before the flag: a non-zero scale_a is initialised.
            state_dict[flag_key] = torch.as_tensor(state_dict[scale_a_key] != 0).reshape(())
        errors_before = len(error_msgs)
        quantizer_before = self._parameters["scale_a"]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if len(error_msgs) != errors_before:
            return
        if local_metadata.get("assign_to_params_buffers", False):
            self._keep_quantizer_shared(quantizer_before)
        if flag_key in state_dict:
            self._scale_a_ready = bool(self.scale_a_initialized)
        if has_weight and prefix + "scale_w" not in state_dict:
            # Float weights alone (e.g. from an nn.Conv2d, strict=False): scale_w
            # would be stale, so it is re-initialised from them.
            self.prepare_params()

    def _keep_quantizer_shared(self, quantizer_before: nn.Parameter) -> None:
        """After ``load_state_dict(..., assign=True)``: PyTorch gives every layer new Parameter
        objects, so layers that shared one activation quantizer (``q4conv.convert``) would each
        train their own copy. The first layer of a group to load records its new objects under
        the group's old ``scale_a``; a later layer of that group whose loaded tensors are the
        same storage (one tensor when the state dict was saved) takes them instead of its own."""
        for key in [key for key, (old, _) in _ASSIGNED_QUANTIZERS.items() if old() is None]:
            del _ASSIGNED_QUANTIZERS[key]
        entry = _ASSIGNED_QUANTIZERS.get(id(quantizer_before))
        first = entry[1]() if entry is not None and entry[0]() is quantizer_before else None
        if first is None or first is self:
            _ASSIGNED_QUANTIZERS[id(quantizer_before)] = (weakref.ref(quantizer_before), weakref.ref(self))
            return
        same_storage = all(getattr(self, name).data_ptr() == getattr(first, name).data_ptr()
                           for name in ("bias_a", "scale_a"))
        if same_storage:
            self.bias_a = first.bias_a
            self.scale_a = first.scale_a
            self.scale_a_initialized = first.scale_a_initialized
            self._scale_a_flag = first._scale_a_flag

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"a_bit={self.a_bit}, w_bit={self.w_bit}, bias={self.bias is not None}")
        if self.weight is None:
            text += ", qweight_only=True"
        return text


Q4Conv2d = Q4Conv2dCutlass

# load_state_dict(assign=True) of layers sharing an activation quantizer: the
# group's old scale_a (by id, checked through the weak reference) -> the first
# loaded layer of the group (Q4Conv2dCutlass._keep_quantizer_shared).
_ASSIGNED_QUANTIZERS: Dict[int, Tuple["weakref.ref[nn.Parameter]", "weakref.ref[Q4Conv2dCutlass]"]] = {}


def _version_of(t: torch.Tensor) -> int:
    """In-place version counter; inference tensors (made under torch.inference_mode,
    e.g. a qweight packed on the first call there) have none and cannot be changed
    in place outside inference mode, so they count as version -1."""
    return -1 if t.is_inference() else t._version


def prepare_q4conv_layers(model: nn.Module) -> nn.Module:
    """Call ``prepare_params()`` on every q4conv layer of ``model`` (after init or
    after loading float weights, before training), and keep the layers' ``eps``
    buffers out of DistributedDataParallel's per-step buffer broadcast.
    Returns ``model``."""
    for module in model.modules():
        if isinstance(module, Q4Conv2dCutlass) and module.weight is not None:
            module.prepare_params()
    keep_eps_out_of_ddp_broadcast(model)
    return model


def keep_eps_out_of_ddp_broadcast(model: nn.Module) -> None:
    """List every q4conv layer's ``eps`` buffer in ``model``'s DDP ignore list.

    DistributedDataParallel (``broadcast_buffers=True``, its default) copies every
    buffer from rank 0 before each forward. eps never changes in training, but
    the copy bumps its version counter, and the layer then re-reads it on the
    host (``float(eps)``): one device synchronisation per layer per step.
    Applies when ``model`` itself is what DDP wraps; ``q4conv.convert`` and
    ``prepare_q4conv_layers`` call it."""
    names = [f"{name}.eps" if name else "eps" for name, m in model.named_modules()
             if isinstance(m, Q4Conv2dCutlass) and "eps" in m._buffers]
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    if names and not set(names) <= set(ignored):
        # What DistributedDataParallel._set_params_and_buffers_to_ignore_for_model sets.
        model._ddp_params_and_buffers_to_ignore = ignored + [n for n in names if n not in ignored]


# The seed library's name for the same helper.
prepare_bie_layers = prepare_q4conv_layers


def _q4_layers(model: nn.Module) -> List[Tuple[str, Q4Conv2dCutlass]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Q4Conv2dCutlass)]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], *, reset_weight_scales: bool = False) -> nn.Module:
    """(Re)initialise ``scale_a`` of every q4conv layer of ``model`` from data.

    Runs ``model`` on each batch (a tensor, a tuple/list of positional arguments or a dict of
    keyword arguments) under
    ``torch.no_grad()``; each layer's ``scale_a`` becomes the LSQ value of the
    mean |x + bias_a| over all batches it saw (summed over ranks under
    ``torch.distributed``), updated batch by batch so that later layers see
    activations quantized with calibrated scales. With
    ``reset_weight_scales=True`` ``scale_w`` is first re-initialised from the
    weights (``prepare_params``). The model's train/eval mode is unchanged,
    and the batches run in it: in training mode BatchNorm layers normalise with
    batch statistics and update their running statistics, as in any forward
    (calibrate in eval mode to leave them as they are). Returns ``model``.

    Raises ValueError (changing nothing) when ``batches`` yields no batch; warns
    (UserWarning) naming the q4conv layers that no batch reached, and those that
    saw only zero or non-finite activations (their ``scale_a`` is unchanged).
    """
    named_layers = _q4_layers(model)
    iterator = iter(batches)
    first = next(iterator, _NO_BATCH)
    if first is _NO_BATCH:
        raise ValueError("batches yielded no batch: q4conv.calibrate needs at least one input batch")
    for _, layer in named_layers:
        if reset_weight_scales and layer.weight is not None:
            layer.prepare_params()
        zero = torch.zeros((), dtype=torch.float64, device=layer.bias_a.device)
        layer._calibration = [zero, zero.clone()]
    try:
        for batch in itertools.chain([first], iterator):
            _run_batch(model, batch)
        # One host sync per layer, once: which layers saw no activation at all, and which saw only
        # zeros (a dead ReLU before them) or non-finite values, leaving no scale to set.
        unreached, no_statistic = [], []
        for name, layer in named_layers:
            total, count = torch.stack(layer._calibration).tolist()
            if count == 0:
                unreached.append(name)
            elif not (math.isfinite(total) and total > 0):
                no_statistic.append(name)
    finally:
        for _, layer in named_layers:
            layer._calibration = None
    if unreached:
        warnings.warn(f"q4conv.calibrate: no batch reached these q4conv layers (scale_a unchanged): {unreached}",
                      stacklevel=2)
    if no_statistic:
        warnings.warn("q4conv.calibrate: these q4conv layers saw only zero or non-finite activations (x + bias_a), "
                      f"so no scale could be set (scale_a unchanged; 0 means uninitialised, which deploy rejects): "
                      f"{no_statistic}", stacklevel=2)
    return model


_NO_BATCH = object()


def _run_batch(model: nn.Module, batch: Any) -> None:
    """model(*batch) for a tuple / list, model(**batch) for a dict, else model(batch); a TypeError
    from a tuple batch (a loader's (inputs, labels) pairs) gets a note saying how to pass inputs."""
    try:
        if isinstance(batch, (tuple, list)):
            model(*batch)
        elif isinstance(batch, dict):
            model(**batch)
        else:
            model(batch)
    except TypeError as err:
        if isinstance(batch, (tuple, list)) and len(batch) > 1:
            err.add_note(f"q4conv.calibrate passes a tuple / list batch as the model's {len(batch)} positional "
                         "arguments; for a loader of (inputs, labels) pairs pass "
                         "(inputs for inputs, _ in loader)")
        raise


def load_float_state_dict(model: nn.Module, state_dict: Dict[str, Any], strict: bool = True) -> _IncompatibleKeys:
    """Load a float model's ``state_dict`` (``nn.Conv2d`` keys ``weight``/``bias``)
    into a model whose convolutions are q4conv layers, ready to train:

        q4conv.load_float_state_dict(model, float_model.state_dict())

    Every q4conv layer whose ``weight`` is loaded gets ``scale_w`` re-initialised
    from it (``prepare_params``) and ``scale_a`` marked uninitialised (the next
    batch or ``q4conv.calibrate`` initialises it). The q4conv-only keys
    (``scale_a``, ``scale_w``, ``bias_a``, ``eps``, ``qweight``,
    ``scale_a_initialized``) may be absent; with ``strict=True`` any other
    missing or unexpected key raises RuntimeError. Returns the missing and
    unexpected keys.
    """
    result = model.load_state_dict(state_dict, strict=False)
    q4_prefixes = set()
    for name, layer in _q4_layers(model):
        prefix = f"{name}." if name else ""
        q4_prefixes.add(prefix)
        if prefix + "weight" in state_dict:
            if prefix + "scale_w" not in state_dict:
                layer.prepare_params()
            layer._reset_scale_a()
    missing = [k for k in result.missing_keys
               if not (k.rsplit(".", 1)[-1] in _Q4_ONLY_KEYS and k[: len(k) - len(k.rsplit(".", 1)[-1])] in q4_prefixes)]
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise RuntimeError(f"load_float_state_dict: missing keys {missing}, unexpected keys {unexpected}")
    return _IncompatibleKeys(missing, unexpected)
