"""The ``Q4Conv2dCutlass`` layer: a W4A4 quantization-aware ``Conv2d``.

Quantization follows SPEC section 3: LSQ scales, an LSQ+ learnable activation
shift ``bias_a``, signed 4-bit codes. The arithmetic lives in C++
(``csrc/quant.h``); this module holds parameters and state only.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from . import _ops

IntOrPair = Union[int, Tuple[int, int]]
SUPPORTED_BITS = (4,)


def _pair(value: IntOrPair, name: str, minimum: int) -> Tuple[int, int]:
    if isinstance(value, int):
        pair = (value, value)
    else:
        pair = tuple(int(v) for v in value)
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


class Q4Conv2dCutlass(nn.Module):
    """4-bit weights and 4-bit activations 2-D convolution (NCHW or channels_last).

    Args:
        in_channels, out_channels: any positive counts (padded internally).
        kernel_size, stride, padding, dilation: int or pair, as ``nn.Conv2d``.
        a_bit, w_bit: code widths; 4 is the only width every backend supports.
        device, dtype: of the parameters (``dtype`` float32 by default).
        bias: add a learnable output bias, fused into the kernel epilogue.
        per_channel_weight_scale: one weight scale per output channel.
        learn_weight_scale: train ``scale_w`` with the LSQ gradient.
        backend: ``"auto"`` (dispatch by device and shape) or a forced
            backend (``"fallback"``, ``"sm80_int4"``, ``"sm90_int8"``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        a_bit: int = 4,
        w_bit: int = 4,
        device: Optional[Union[str, torch.device]] = None,
        dtype: torch.dtype = torch.float,
        *,
        bias: bool = False,
        per_channel_weight_scale: bool = False,
        learn_weight_scale: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        for name, bits in (("a_bit", a_bit), ("w_bit", w_bit)):
            if bits not in SUPPORTED_BITS:
                raise ValueError(f"{name} must be 4 (the width every q4conv backend supports), got {bits}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"dtype must be a floating point type, got {dtype}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        self.a_bit = a_bit
        self.w_bit = w_bit
        self.backend = backend
        self.per_channel_weight_scale = per_channel_weight_scale
        factory = {"device": device, "dtype": dtype}

        self.weight: Optional[nn.Parameter] = nn.Parameter(
            torch.empty((out_channels, in_channels, *self.kernel_size), **factory)
        )
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Conv2d
        self.register_buffer("qweight", None)
        self.bias_a = nn.Parameter(torch.zeros(in_channels, **factory))
        self.scale_a = nn.Parameter(torch.zeros((), **factory))
        scale_shape = (out_channels,) if per_channel_weight_scale else ()
        self.scale_w = nn.Parameter(torch.ones(scale_shape, **factory), requires_grad=learn_weight_scale)
        self.register_buffer("eps", torch.tensor(1e-5, **factory))
        if bias:
            self.bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        # Host-side copies so forward never synchronises with the device.
        self._eps_value = 1e-5
        self._scale_a_ready = False
        # Eval-mode CUDA cache: (validity key, alpha, kernel-layout weights).
        self._inference_cache: Optional[Tuple[torch.Tensor, Any, torch.Tensor, Optional[torch.Tensor]]] = None
        self.prepare_params()

    # ------------------------------------------------------------------ scales
    @torch.no_grad()
    def prepare_params(self) -> None:
        """Initialise ``scale_w`` from the weights: 2 * mean|w| / sqrt(Qp) (LSQ).

        Called by the constructor; call it again after loading or changing the
        float weights before training (``prepare_q4conv_layers`` does it for a
        whole model).
        """
        if self.weight is None:
            raise RuntimeError("prepare_params needs the float weight, which was dropped by "
                               "generate_quantized_weight(qweight_only=True)")
        w = self.weight.detach().float().abs()
        mean_abs = w.mean(dim=(1, 2, 3)) if self.per_channel_weight_scale else w.mean()
        self.scale_w.copy_(2.0 * mean_abs / math.sqrt(_qmax(self.w_bit)))
        self.qweight = None

    @torch.no_grad()
    def _init_scale_a(self, x: torch.Tensor) -> None:
        if self._scale_a_ready:
            return
        shifted = x.detach().float() + self.bias_a.detach().float().view(1, -1, 1, 1)
        statistic = shifted.abs().mean()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank starts from the same scale.
            dist.all_reduce(statistic)
            statistic /= dist.get_world_size()
        self.scale_a.copy_(2.0 * statistic / math.sqrt(_qmax(self.a_bit)))
        self._scale_a_ready = True

    def set_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Initialise ``scale_a`` from ``x`` on first use (scale_a == 0); return ``x + bias_a``."""
        self._check_input(x)
        self._init_scale_a(x)
        return x + self.bias_a.view(1, -1, 1, 1).to(x.dtype)

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
        self.qweight = _ops.ops.quantize_pack(self.weight, self.scale_w, self._eps_value, self.w_bit)
        if qweight_only:
            self.weight = None

    @property
    def opt_weight(self) -> torch.Tensor:
        """The weight forward uses: float ``weight`` in training, packed ``qweight`` in eval
        (generated on demand)."""
        if self.training:
            if self.weight is None:
                raise RuntimeError("this Q4Conv2dCutlass holds only qweight (qweight_only=True): "
                                   "it runs inference (eval mode) only")
            return self.weight
        if self.qweight is None:
            self.generate_quantized_weight()
        return self.qweight  # type: ignore[return-value]

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not self._scale_a_ready and x.shape[0] > 0:  # skips the no_grad decorator's cost
            self._init_scale_a(x)
        # This runs on every call and a small layer's call is host bound
        # (NOTES.md): the .default overloads skip the overload-packet lookup,
        # and parameters come from the _parameters dict (each self.<parameter>
        # is a Module.__getattr__ call).
        args = (list(self.stride), list(self.padding), list(self.dilation), self._eps_value, self.a_bit)
        named = self._parameters
        bias_a, scale_a, scale_w, bias = named["bias_a"], named["scale_a"], named["scale_w"], named["bias"]
        if self.training:
            return _ops.ops.conv_train.default(
                x, bias_a, scale_a, self.opt_weight, scale_w, bias, *args, self.backend
            )
        # Packed inference has no gradient: with grad mode on, parameters enter
        # detached, so only an input that requires grad makes a graph (whose
        # backward raises). Under no_grad / inference_mode no graph is built,
        # and the detach calls (ATen ops each) are skipped.
        if torch.is_grad_enabled():
            bias_a, scale_a, scale_w, bias = (None if p is None else p.detach()
                                              for p in (bias_a, scale_a, scale_w, bias))
        qweight = self.opt_weight
        alpha, kernel_weight = self._cached_kernel_inputs(x, qweight)
        return _ops.ops.conv_packed.default(
            x, bias_a, scale_a, qweight, scale_w, bias, *args, False, self.backend, kernel_weight, alpha,
        )

    def _cached_kernel_inputs(
        self, x: torch.Tensor, qweight: torch.Tensor
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """alpha = s_a * s_w and the kernel-layout weights, made once per set of
        packed weights and scales (keyed on their storage and version counters)
        instead of on every eval-mode call."""
        if not x.is_cuda or torch.compiler.is_compiling():
            return None, None
        # The cache holds qweight itself, so its storage cannot be freed and
        # reused by a new qweight; in-place changes bump the version counters.
        scale_a, scale_w = self._parameters["scale_a"], self._parameters["scale_w"]
        key = (x.device, _version_of(qweight), scale_a.data_ptr(), _version_of(scale_a),
               scale_w.data_ptr(), _version_of(scale_w), self._eps_value, self.backend)
        cache = self._inference_cache
        if cache is None or cache[0] is not qweight or cache[1] != key:
            alpha = _ops.ops.output_alpha(self.scale_a.detach(), self.scale_w.detach(), self.out_channels,
                                          self._eps_value)
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
        expected = (self.out_channels, *self.kernel_size, (self.in_channels + 1) // 2)
        device = self.bias_a.device
        if has_qweight:
            qweight = state_dict[qweight_key]
            if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or tuple(qweight.shape) != expected:
                got = (qweight.dtype, tuple(qweight.shape)) if isinstance(qweight, torch.Tensor) else type(qweight)
                raise ValueError(f"{qweight_key} must be a uint8 tensor of shape {expected}, got {got}")
            self.qweight = torch.empty(expected, dtype=torch.uint8, device=device)
        elif not has_weight:
            raise ValueError(f"state_dict has neither {weight_key} nor {qweight_key}: "
                             "a Q4Conv2dCutlass needs its float or its packed weights")
        if has_weight and self.weight is None:
            shape = (self.out_channels, self.in_channels, *self.kernel_size)
            self.weight = nn.Parameter(torch.empty(shape, dtype=self.bias_a.dtype, device=device))
        if not has_weight and self.weight is not None:
            self.weight = None  # a qweight-only checkpoint makes an inference-only layer
        if has_weight and not has_qweight:
            self.qweight = None  # regenerate from the loaded weights
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "eps" in state_dict:
            self._eps_value = float(state_dict[prefix + "eps"])
        if prefix + "scale_a" in state_dict:
            self._scale_a_ready = bool(torch.as_tensor(state_dict[prefix + "scale_a"]).item() != 0)

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"a_bit={self.a_bit}, w_bit={self.w_bit}, bias={self.bias is not None}")
        if self.weight is None:
            text += ", qweight_only=True"
        return text


Q4Conv2d = Q4Conv2dCutlass


def _version_of(t: torch.Tensor) -> int:
    """In-place version counter; inference tensors (made under torch.inference_mode,
    e.g. a qweight packed on the first call there) have none and cannot be changed
    in place outside inference mode, so they count as version -1."""
    return -1 if t.is_inference() else t._version


def prepare_q4conv_layers(model: nn.Module) -> nn.Module:
    """Call ``prepare_params()`` on every q4conv layer of ``model`` (after init or
    after loading float weights, before training). Returns ``model``."""
    for module in model.modules():
        if isinstance(module, Q4Conv2dCutlass) and module.weight is not None:
            module.prepare_params()
    return model


# The seed library's name for the same helper.
prepare_bie_layers = prepare_q4conv_layers
