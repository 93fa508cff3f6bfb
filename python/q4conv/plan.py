"""Which path runs a q4conv convolution (the C++ planner's answer) and the
kernel switches (the tuning record), for users, tests and benchmarks."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import torch

from ._ops import ops

_SWITCH_VALUES = {None: -1, "rule": -1, False: 0, "never": 0, True: 1, "always": 1}


@dataclass(frozen=True)
class ConvPlan:
    """The plan of one convolution, as ``csrc/plan.h`` makes it.

    Attributes:
        backend: ``"fallback"``, ``"sm80_int4"`` or ``"sm90_int8"``.
        path: ``"fallback"``, ``"pass_gemm"`` (quantization pass + implicit GEMM),
            ``"im2col_gemm"``, ``"packed_taps"``, ``"fused_mma"`` or ``"fused_wgmma"``.
        config: the kernel configuration (tile shape or fused layout); empty for the fallback.
        stride_grid: the kernels read only x's stride grid (1x1, stride > 1, no padding).
        out_hw: the output's height and width.
        code_channels: channels of the stored activation codes (padded).
        sm_count: streaming multiprocessors of x's device (0 on CPU).
        kernel_shape: the geometry the CUDA kernel runs (empty for the fallback).
        backward: ``"cuda_lsq"`` (CUDA LSQ kernels) or ``"aten"`` for the training backward.
        backward_stride_grid: the training backward runs on x's stride grid.
        tuning: the kernel switches in force (see :func:`tuning`).
    """

    backend: str
    path: str
    config: str
    stride_grid: bool
    out_hw: Tuple[int, int]
    code_channels: int
    sm_count: int
    kernel_shape: str
    backward: str
    backward_stride_grid: bool
    tuning: str


def _parse(text: str) -> ConvPlan:
    fields = dict(line.split("=", 1) for line in text.splitlines() if line)
    out_h, out_w = (int(v) for v in fields["out_hw"].split(","))
    return ConvPlan(
        backend=fields["backend"], path=fields["path"], config=fields["config"],
        stride_grid=fields["stride_grid"] == "1", out_hw=(out_h, out_w),
        code_channels=int(fields["code_channels"]), sm_count=int(fields["sm_count"]),
        kernel_shape=fields.get("kernel_shape", ""), backward=fields["backward"],
        backward_stride_grid=fields["backward_stride_grid"] == "1", tuning=fields["tuning"],
    )


def plan_convolution(
    x: torch.Tensor,
    out_channels: int,
    kernel_size: Sequence[int],
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    backend: str = "auto",
    weight_dtype: Optional[torch.dtype] = None,
) -> ConvPlan:
    """The plan for convolving ``x`` with ``out_channels`` filters of ``kernel_size``."""
    text = ops.plan(x, out_channels, list(kernel_size), list(stride), list(padding), list(dilation),
                    backend, weight_dtype or x.dtype)
    return _parse(text)


def explain(layer: torch.nn.Module, x: torch.Tensor) -> ConvPlan:
    """Which backend, path and kernel configuration ``layer`` (a q4conv layer) runs for ``x``.

    Example::

        >>> q4conv.explain(model.layer1[0].conv1, x)   # doctest: +SKIP
        ConvPlan(backend='sm90_int8', path='fused_mma', ...)

    Raises TypeError when ``layer`` is not a q4conv layer or ``x`` not a tensor.
    """
    from .layer import Q4Conv2dCutlass

    if not isinstance(layer, Q4Conv2dCutlass):
        raise TypeError(f"layer must be a q4conv layer (Q4Conv2dCutlass), got {type(layer).__name__}; "
                        "the call is q4conv.explain(layer, x)")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    weight = layer.weight if layer.weight is not None else layer.scale_w
    return plan_convolution(x, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                            layer.dilation, layer.backend, weight.dtype)


def selected_backend(x: torch.Tensor, *args: object, **kwargs: object) -> str:
    """Name of the backend that would run for ``x`` (the plan's ``backend``); the
    arguments are :func:`plan_convolution`'s."""
    return plan_convolution(x, *args, **kwargs).backend  # type: ignore[arg-type]


@contextlib.contextmanager
def tuning(**switches: object) -> Iterator[None]:
    """Sets kernel switches for the block, then restores them.

    Switches: ``packed_taps``, ``fused_pointwise``, ``wgmma_pointwise``; values
    ``"rule"`` / ``None`` (the measured rule), ``"never"`` / ``False``, ``"always"`` / ``True``.
    The environment variables ``Q4CONV_PACKED_TAPS``, ``Q4CONV_FUSED_POINTWISE`` and
    ``Q4CONV_WGMMA_POINTWISE`` set their initial values (read once, at import).
    ``sm90_config``: the name of an sm90 tile configuration (one of :func:`sm90_configs`) to run
    wherever it takes a shape, ``"rule"`` / ``None`` for the tile rule (for benchmarks).
    """
    previous = {}
    try:
        for name, value in switches.items():
            previous[name] = ops.set_tuning(name, _switch_value(name, value))
        yield
    finally:
        for name, value in previous.items():
            ops.set_tuning(name, value)


def sm90_configs() -> Tuple[str, ...]:
    """Names of the compiled sm90 tile configurations (empty without the CUDA kernels)."""
    return tuple(ops.sm90_configs())


def _switch_value(name: str, value: object) -> int:
    if name == "sm90_config":
        if value is None or value == "rule":
            return -1
        names = sm90_configs()
        if value not in names:
            raise ValueError(f"tuning switch sm90_config must be 'rule', None or one of {list(names)} "
                             f"(the compiled sm90 configurations), got {value!r}")
        return names.index(value)
    if value not in _SWITCH_VALUES:
        raise ValueError(f"tuning switch {name} must be 'rule', 'never', 'always', None, "
                         f"False or True, got {value!r}")
    return _SWITCH_VALUES[value]
