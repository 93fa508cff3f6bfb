"""Shared fixtures: devices and backends to test, random convolution cases."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import List

import pytest
import torch

import q4conv

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@dataclass(frozen=True)
class Case:
    n: int
    c: int
    k: int
    h: int
    w: int
    r: int
    s: int
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)

    def __str__(self) -> str:
        return (f"n{self.n}c{self.c}k{self.k}_{self.h}x{self.w}_k{self.r}x{self.s}"
                f"_s{self.stride[0]}{self.stride[1]}_p{self.padding[0]}{self.padding[1]}"
                f"_d{self.dilation[0]}{self.dilation[1]}")


# Fixed cases that cover the contract's corners, plus random ones.
FIXED_CASES: List[Case] = [
    Case(2, 3, 5, 9, 7, 3, 3, (1, 1), (1, 1)),                 # odd channels, non-square
    Case(1, 20, 16, 11, 13, 3, 3, (2, 2), (1, 1)),             # stride 2, batch 1
    Case(2, 40, 24, 12, 10, 3, 3, (1, 1), (2, 2), (2, 2)),     # dilation 2
    Case(2, 16, 8, 8, 8, 2, 2, (1, 1), (0, 0)),                # even kernel
    Case(1, 32, 32, 10, 6, 4, 2, (2, 1), (1, 0)),              # even, non-square kernel
    Case(3, 64, 64, 14, 14, 1, 1),                             # 1x1
    Case(2, 48, 40, 7, 7, 3, 3, (1, 1), (1, 1)),
    Case(1, 1, 7, 8, 8, 3, 3, (1, 2), (1, 1), (1, 2)),         # single input channel
]


def random_cases(count: int, seed: int) -> List[Case]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        r, s = rng.choice([1, 2, 3, 5]), rng.choice([1, 3])
        dil = (rng.choice([1, 2]), rng.choice([1, 2]))
        pad = (rng.randint(0, 2), rng.randint(0, 2))
        h = rng.randint(dil[0] * (r - 1) + 1, 16)
        w = rng.randint(dil[1] * (s - 1) + 1, 16)
        cases.append(Case(rng.randint(1, 3), rng.randint(1, 72), rng.choice([1, 3, 8, 16, 24, 33, 64]),
                          h, w, r, s, (rng.randint(1, 2), rng.randint(1, 2)), pad, dil))
    return cases


CASES = FIXED_CASES + random_cases(8, seed=1234)


def backends_for(device: str) -> List[str]:
    if device == "cpu":
        return ["fallback"]
    return ["auto", "fallback", "sm80_int4", "sm90_int8"]


def device_backend_params():
    return [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in backends_for(d)]


def skip_unless_backend_runs(x: torch.Tensor, case: Case, backend: str) -> None:
    """Skips when a forced backend cannot take this device/shape (auto and
    fallback always run)."""
    if backend in ("auto", "fallback"):
        return
    try:
        q4conv.selected_backend(x, case.k, (case.r, case.s), case.stride, case.padding, case.dilation, backend)
    except RuntimeError as error:
        pytest.skip(f"{backend} cannot run {case}: {error}")


def make_inputs(case: Case, device: str, dtype=torch.float32, channels_last=False, bias=True,
                per_channel=False, seed=0):
    """Random inputs with scales that put codes across the whole range."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.n, case.c, case.h, case.w, generator=gen) * 1.5
    weight = torch.randn(case.k, case.c, case.r, case.s, generator=gen) * 0.1
    bias_a = torch.randn(case.c, generator=gen) * 0.2
    scale_a = torch.tensor(0.31)
    scale_w = (torch.rand(case.k, generator=gen) * 0.02 + 0.02) if per_channel else torch.tensor(0.027)
    out_bias = torch.randn(case.k, generator=gen) if bias else None
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    move = lambda t: None if t is None else t.to(device)
    return move(x), move(bias_a), move(scale_a), move(weight), move(scale_w), move(out_bias)


def spawn_with_deadline(fn, args: tuple, nprocs: int, timeout_s: float) -> None:
    """torch.multiprocessing.spawn with an overall deadline: a hung worker fails the test
    (its processes terminated) instead of blocking CI."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"distributed workers did not finish within {timeout_s} s (hang)")
