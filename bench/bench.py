#!/usr/bin/env python
"""q4conv benchmark (SPEC section 7): q4conv vs cuDNN and a pure-PyTorch LSQ fake-quant conv.

Per shape, in one run on one CUDA card:
  (a) q4conv inference forward: eval mode, packed int4 weights (qweight_only), fp16 channels_last
      input and fp16 output, activation quantization included;
  (b) q4conv QAT training step: forward + backward (dx, dweight, dscale_a, dscale_w, dbias_a),
      fp16 channels_last input, fp32 parameters;
  (c) cuDNN fp16 channels_last conv forward, (d) the same in bf16;
  (e) a plain fp16 conv training step (fp16 weights, channels_last, forward + backward dx, dw);
  (f) a pure-PyTorch LSQ fake-quant conv in fp32 (channels_last; fake-quantize activations and
      weights with round-STE in PyTorch ops, then F.conv2d), forward + backward.
Timing: CUDA events around each call, warm-up, median over repeats, and the median of that over
--rounds rounds that interleave all variants of a shape (host-bound eager steps are sensitive to
slow spells of the host; a spell then spoils one round, not one variant); cudnn.benchmark on; fresh
random data per shape; when an input fits in L2 (50 MB) the calls rotate over several input
buffers (together > 2x L2) so that no call reads an input the previous call left in L2.

The floor column is max(int8 ops / 1979e12, bytes / 3.35e12) (H100 SXM dense int8 peak and HBM3
bandwidth) with ops = 2*N*P*Q*K*C*R*S and bytes = fp16 input (for 1x1 convolutions: the pixels on the stride grid) + int4 weights + fp16 output;
"floor frac" = floor / q4conv forward time.

Memory saved for backward: torch.cuda.memory_allocated() after minus before a forward with grad
enabled, the output's own bytes excluded (so: what the layer keeps alive for backward beyond the
tensors that already existed); "saved (hook)" sums the storages handed to autograd's
saved_tensors_hooks (these include references to the input and the parameters).

Needs only torch, numpy, matplotlib (and q4conv). Example:
    python bench/bench.py --out bench_out            # all ResNet-50 convs, batch 64 (+ batch 1/256)
    python bench/bench.py --shapes quick --repeats 10
    python bench/bench.py --dry-run                  # list shapes, no GPU needed
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

INT8_PEAK_OPS = 1979e12  # H100 SXM dense int8 tensor-core ops/s
HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3
L2_BYTES = 50 * 1024 * 1024
QN, QP = -8, 7

# (C, K, H=W, R=S, stride, pad): every distinct convolution of ResNet-50.
RESNET50 = [
    (3, 64, 224, 7, 2, 3), (64, 64, 56, 1, 1, 0), (64, 64, 56, 3, 1, 1), (64, 256, 56, 1, 1, 0),
    (256, 64, 56, 1, 1, 0), (256, 128, 56, 1, 1, 0), (128, 128, 56, 3, 2, 1), (128, 512, 28, 1, 1, 0),
    (256, 512, 56, 1, 2, 0), (512, 128, 28, 1, 1, 0), (128, 128, 28, 3, 1, 1), (512, 256, 28, 1, 1, 0),
    (256, 256, 28, 3, 2, 1), (256, 1024, 14, 1, 1, 0), (512, 1024, 28, 1, 2, 0), (1024, 256, 14, 1, 1, 0),
    (256, 256, 14, 3, 1, 1), (1024, 512, 14, 1, 1, 0), (512, 512, 14, 3, 2, 1), (512, 2048, 7, 1, 1, 0),
    (1024, 2048, 14, 1, 2, 0), (2048, 512, 7, 1, 1, 0), (512, 512, 7, 3, 1, 1),
]
EXTRA_BATCH_SHAPES = [(64, 64, 56, 3, 1, 1), (256, 256, 14, 3, 1, 1), (1024, 256, 14, 1, 1, 0)]
EXTRA_BATCHES = (1, 256)
QUICK = [(64, 64, 56, 3, 1, 1), (256, 256, 14, 3, 1, 1), (1024, 256, 14, 1, 1, 0), (512, 2048, 7, 1, 1, 0)]


@dataclass
class Shape:
    n: int
    c: int
    k: int
    h: int
    r: int
    stride: int
    pad: int
    main: bool  # part of the main-batch set (geometric means)

    @property
    def p(self) -> int:
        return (self.h + 2 * self.pad - self.r) // self.stride + 1

    @property
    def name(self) -> str:
        return f"N{self.n} C{self.c} K{self.k} {self.h}x{self.h} {self.r}x{self.r} s{self.stride} p{self.pad}"

    def ops(self) -> int:
        return 2 * self.n * self.p * self.p * self.k * self.c * self.r * self.r

    def bytes(self) -> int:
        # A 1x1 convolution reads only the pixels on its stride grid.
        read_h = self.p if self.r == 1 and self.pad == 0 else self.h
        x = self.n * self.c * read_h * read_h * 2
        w = (self.k * self.c * self.r * self.r + 1) // 2
        y = self.n * self.k * self.p * self.p * 2
        return x + w + y

    def floor_ms(self) -> float:
        return max(self.ops() / INT8_PEAK_OPS, self.bytes() / HBM_BYTES_PER_S) * 1e3


def name_filter(spec: str) -> Callable[[Shape], bool]:
    """Shape predicate of a comma-separated list of name substrings (a
    script's --only): a shape matches if its name contains any of them; an
    empty list matches every shape."""
    parts = [part for part in spec.split(",") if part]
    return lambda shape: not parts or any(part in shape.name for part in parts)


def make_shapes(which: str, batch: int) -> List[Shape]:
    base = RESNET50 if which == "resnet50" else QUICK
    shapes = [Shape(batch, *s, main=True) for s in base]
    if which == "resnet50":
        for n in EXTRA_BATCHES:
            if n != batch:
                shapes += [Shape(n, *s, main=False) for s in EXTRA_BATCH_SHAPES]
    return shapes


# ----------------------------------------------------------------------- timing
def time_ms(fn: Callable[[torch.Tensor], object], inputs: Sequence[torch.Tensor], warmup: int, repeats: int) -> float:
    """Median of CUDA-event times of fn(input), rotating over ``inputs``."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        x = inputs[(warmup + i) % len(inputs)]
        starts[i].record()
        out = fn(x)
        ends[i].record()
        del out
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


_TUNING_ENV = {"Q4CONV_PACKED_TAPS": "packed_taps", "Q4CONV_FUSED_POINTWISE": "fused_pointwise",
               "Q4CONV_WGMMA_POINTWISE": "wgmma_pointwise"}


def env_switch(name: str, value: str):
    """The tuning switch an environment-style NAME=value selects ("0" never,
    anything else always), as a context manager: the library reads the
    environment once, so scripts change switches through q4conv.tuning."""
    import q4conv

    if name not in _TUNING_ENV:
        raise ValueError(f"switch name must be one of {sorted(_TUNING_ENV)}, got {name!r}")
    return q4conv.tuning(**{_TUNING_ENV[name]: "never" if value == "0" else "always"})


def time_graph_ms(fn: Callable[[torch.Tensor], object], inputs: Sequence[torch.Tensor], repeats: int,
                  calls: int = 8) -> float:
    """Per-call GPU time with launch overhead removed: ``calls`` calls over the
    rotating inputs captured in one CUDA graph, median of replays / calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(inputs[i % len(inputs)])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(inputs[i % len(inputs)]) for i in range(calls)]
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del outs, graph
    return statistics.median(times)


def n_buffers(nbytes: int) -> int:
    """Enough input buffers that a rotation touches > 2x L2 before revisiting one (capped)."""
    if nbytes >= L2_BYTES:
        return 1
    return int(min(64, max(2, math.ceil(2 * L2_BYTES / max(nbytes, 1)) + 1)))


def rand_inputs(shape: Shape, dtype: torch.dtype, count: int, requires_grad: bool = False) -> List[torch.Tensor]:
    out = []
    for _ in range(count):
        x = torch.randn(shape.n, shape.c, shape.h, shape.h, device="cuda", dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        out.append(x.requires_grad_(requires_grad))
    return out


def eval_pair(shape: Shape) -> Tuple[Callable[[torch.Tensor], torch.Tensor],
                                      Callable[[torch.Tensor], torch.Tensor], List[torch.Tensor]]:
    """For the A/B scripts: the eval-mode q4conv layer of `shape` (packed
    weights, scale_a from the data) and a cuDNN fp16 channels_last conv, each
    as a callable of x under inference_mode, and rotating fp16 inputs."""
    import q4conv

    layer = q4conv.Q4Conv2dCutlass(shape.c, shape.k, shape.r, shape.stride, shape.pad, device="cuda")
    q4conv.prepare_q4conv_layers(layer)
    xs = rand_inputs(shape, torch.float16, n_buffers(shape.n * shape.c * shape.h * shape.h * 2))
    with torch.no_grad():
        layer.set_activation(xs[0])
    layer.eval()
    layer.generate_quantized_weight(qweight_only=True)
    w = (torch.randn(shape.k, shape.c, shape.r, shape.r, device="cuda", dtype=torch.float16) * 0.05)
    w = w.contiguous(memory_format=torch.channels_last)

    def q4(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return layer(x)

    def cudnn(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return F.conv2d(x, w, None, shape.stride, shape.pad)

    return q4, cudnn, xs


def write_lines(out: Optional[Path], name: str, lines: Sequence[str]) -> None:
    """Writes a script's table lines to out/name (when out is given)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------- fake-quant (LSQ)
def _grad_scale(s: torch.Tensor, g: float) -> torch.Tensor:
    return (s - s * g).detach() + s * g


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return (v.round() - v).detach() + v


def lsq_fake_quant(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    g = 1.0 / math.sqrt(v.numel() * QP)
    s = _grad_scale(s, g)
    return _round_ste(torch.clamp(v / s, QN, QP)) * s


def fake_quant_conv(x, bias_a, scale_a, w, scale_w, stride, pad):
    xq = lsq_fake_quant(x + bias_a.view(1, -1, 1, 1), scale_a)
    wq = lsq_fake_quant(w, scale_w)
    return F.conv2d(xq, wq, None, stride, pad)


# --------------------------------------------------------------------- memory
def saved_for_backward(forward: Callable[[], torch.Tensor]) -> Dict[str, float]:
    """(extra allocated bytes kept after forward, output excluded; bytes handed to saved_tensors_hooks)."""
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    extra = after - before - y.untyped_storage().nbytes()
    del y
    return {"alloc": extra / 2**20, "hook": sum(storages.values()) / 2**20}


# ---------------------------------------------------------------------- bench
COLUMNS = [
    "shape", "N", "C", "K", "H", "R", "stride", "pad", "main", "backend",
    "q4_fwd_ms", "fp16_fwd_ms", "bf16_fwd_ms", "fwd_speedup_vs_fp16", "fwd_speedup_vs_bf16",
    "floor_ms", "floor_frac", "q4_fwd_graph_ms", "fp16_fwd_graph_ms", "graph_fwd_speedup_vs_fp16",
    "q4_train_ms", "fp16_train_ms", "fq32_train_ms", "train_speedup_vs_fq32", "train_ratio_vs_fp16",
    "q4_saved_MB", "fp16_saved_MB", "fq32_saved_MB", "q4_saved_hook_MB", "fp16_saved_hook_MB", "error",
]


def bench_shape(shape: Shape, args) -> Dict[str, object]:
    import q4conv

    row: Dict[str, object] = {c: "" for c in COLUMNS}
    row.update(shape=shape.name, N=shape.n, C=shape.c, K=shape.k, H=shape.h, R=shape.r,
               stride=shape.stride, pad=shape.pad, main=shape.main, floor_ms=shape.floor_ms())
    errors: List[str] = []
    ks, st, pd = (shape.r, shape.r), (shape.stride, shape.stride), (shape.pad, shape.pad)
    x_bytes = shape.n * shape.c * shape.h * shape.h * 2
    nbuf = n_buffers(x_bytes)
    torch.manual_seed(hash(shape.name) % 2**31)

    # Timings are registered while each variant is set up and run afterwards
    # in --rounds interleaved rounds (every variant once per round); a value is
    # the median of its rounds' medians, so a slow spell of the host (the
    # eager steps are host bound) hits one round of a few variants, not one
    # variant's whole measurement.
    timings: List[Tuple[str, str, Callable[[], float]]] = []

    def measure(label: str, key: str, fn: Callable[[], float]) -> None:
        timings.append((label, key, fn))

    def attempt(label: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # report in the row and carry on
            msg = f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            errors.append(msg)
            if args.verbose:
                traceback.print_exc()
        finally:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # ---- q4conv layers (shared init: scale_a from the data, scale_w from the weights)
    state: Dict[str, object] = {}

    def setup_q4():
        layer = q4conv.Q4Conv2dCutlass(shape.c, shape.k, shape.r, shape.stride, shape.pad, device="cuda")
        q4conv.prepare_q4conv_layers(layer)
        x0 = rand_inputs(shape, torch.float16, 1)[0]
        with torch.no_grad():
            layer.set_activation(x0)
        state["train_layer"] = copy.deepcopy(layer)
        layer.eval()
        layer.generate_quantized_weight(qweight_only=True)
        state["inf_layer"] = layer
        row["backend"] = q4conv.selected_backend(x0, shape.k, ks, st, pd, (1, 1))

    attempt("q4 setup", setup_q4)

    # ---- (a) q4conv inference forward
    def run_q4_fwd():
        layer = state["inf_layer"]
        xs = rand_inputs(shape, torch.float16, nbuf)

        def fn(x):
            with torch.inference_mode():
                return layer(x)

        y = fn(xs[0])
        assert y.dtype == torch.float16 and y.is_contiguous(memory_format=torch.channels_last), \
            f"q4conv output {y.dtype}, channels_last={y.is_contiguous(memory_format=torch.channels_last)}"
        measure("q4 fwd", "q4_fwd_ms", lambda: time_ms(fn, xs, args.warmup, args.repeats))
        measure("q4 fwd", "q4_fwd_graph_ms", lambda: time_graph_ms(fn, xs, args.repeats))

    if "inf_layer" in state:
        attempt("q4 fwd", run_q4_fwd)

    # ---- (c), (d) cuDNN forward fp16 / bf16
    def run_cudnn_fwd(dtype, key):
        w = torch.randn(shape.k, shape.c, shape.r, shape.r, device="cuda", dtype=dtype) * 0.05
        w = w.contiguous(memory_format=torch.channels_last)
        xs = rand_inputs(shape, dtype, nbuf)

        def fn(x):
            with torch.inference_mode():
                return F.conv2d(x, w, None, st, pd)

        label = f"{dtype} fwd"
        measure(label, key, lambda: time_ms(fn, xs, args.warmup, args.repeats))
        if dtype == torch.float16:
            measure(label, "fp16_fwd_graph_ms", lambda: time_graph_ms(fn, xs, args.repeats))

    attempt("fp16 fwd", lambda: run_cudnn_fwd(torch.float16, "fp16_fwd_ms"))
    attempt("bf16 fwd", lambda: run_cudnn_fwd(torch.bfloat16, "bf16_fwd_ms"))

    if not args.no_train:
        # ---- (b) q4conv training step
        def run_q4_train():
            layer = state["train_layer"]
            layer.train()
            params = [p for p in layer.parameters() if p.requires_grad]
            xs = rand_inputs(shape, torch.float16, nbuf, requires_grad=True)
            gy = torch.randn_like(layer(xs[0]).detach())

            def fn(x):
                y = layer(x)
                return torch.autograd.grad(y, [x, *params], gy)

            measure("q4 train", "q4_train_ms", lambda: time_ms(fn, xs, args.warmup, args.repeats))
            mem = saved_for_backward(lambda: layer(xs[0]))
            row["q4_saved_MB"], row["q4_saved_hook_MB"] = mem["alloc"], mem["hook"]

        if "train_layer" in state:
            attempt("q4 train", run_q4_train)

        # ---- (e) fp16 conv training step
        def run_fp16_train():
            w = (torch.randn(shape.k, shape.c, shape.r, shape.r, device="cuda", dtype=torch.float16) * 0.05)
            w = w.contiguous(memory_format=torch.channels_last).requires_grad_(True)
            xs = rand_inputs(shape, torch.float16, nbuf, requires_grad=True)
            gy = torch.randn_like(F.conv2d(xs[0], w, None, st, pd).detach())

            def fn(x):
                y = F.conv2d(x, w, None, st, pd)
                return torch.autograd.grad(y, [x, w], gy)

            measure("fp16 train", "fp16_train_ms", lambda: time_ms(fn, xs, args.warmup, args.repeats))
            mem = saved_for_backward(lambda: F.conv2d(xs[0], w, None, st, pd))
            row["fp16_saved_MB"], row["fp16_saved_hook_MB"] = mem["alloc"], mem["hook"]

        attempt("fp16 train", run_fp16_train)

        # ---- (f) pure-PyTorch LSQ fake-quant conv, fp32, training step
        def run_fq_train():
            w = (torch.randn(shape.k, shape.c, shape.r, shape.r, device="cuda") * 0.05)
            w = w.contiguous(memory_format=torch.channels_last).requires_grad_(True)
            bias_a = torch.zeros(shape.c, device="cuda", requires_grad=True)
            scale_a = torch.tensor(2 * 0.8 / math.sqrt(QP), device="cuda", requires_grad=True)
            scale_w = (2 * w.detach().abs().mean() / math.sqrt(QP)).requires_grad_(True)
            params = [w, bias_a, scale_a, scale_w]
            xs = rand_inputs(shape, torch.float32, n_buffers(2 * x_bytes), requires_grad=True)
            fwd = lambda x: fake_quant_conv(x, bias_a, scale_a, w, scale_w, st, pd)
            gy = torch.randn_like(fwd(xs[0]).detach())

            def fn(x):
                return torch.autograd.grad(fwd(x), [x, *params], gy)

            measure("fq32 train", "fq32_train_ms", lambda: time_ms(fn, xs, args.warmup, args.repeats))
            row["fq32_saved_MB"] = saved_for_backward(lambda: fwd(xs[0]))["alloc"]

        attempt("fq32 train", run_fq_train)

    rounds: Dict[str, List[float]] = {}
    failed_labels = set()
    for _ in range(args.rounds):
        for label, key, fn in timings:
            if label in failed_labels:
                continue
            try:
                rounds.setdefault(key, []).append(fn())
            except Exception as exc:  # report in the row and carry on
                failed_labels.add(label)
                errors.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
                if args.verbose:
                    traceback.print_exc()
            finally:
                torch.cuda.synchronize()
    for key, values in rounds.items():
        if values and not any(label in failed_labels for label, k, _ in timings if k == key):
            row[key] = statistics.median(values)
    timings.clear()
    state.clear()
    torch.cuda.empty_cache()

    def ratio(a, b):
        return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else ""

    row["fwd_speedup_vs_fp16"] = ratio(row["fp16_fwd_ms"], row["q4_fwd_ms"])
    row["fwd_speedup_vs_bf16"] = ratio(row["bf16_fwd_ms"], row["q4_fwd_ms"])
    row["floor_frac"] = ratio(row["floor_ms"], row["q4_fwd_ms"])
    row["graph_fwd_speedup_vs_fp16"] = ratio(row["fp16_fwd_graph_ms"], row["q4_fwd_graph_ms"])
    row["train_speedup_vs_fq32"] = ratio(row["fq32_train_ms"], row["q4_train_ms"])
    row["train_ratio_vs_fp16"] = ratio(row["q4_train_ms"], row["fp16_train_ms"])
    row["error"] = "; ".join(errors)
    return row


# -------------------------------------------------------------------- reports
def geomean(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if isinstance(v, float) and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def fmt(v: object, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


MD_COLUMNS = [
    ("shape", "shape"), ("backend", "backend"), ("q4_fwd_ms", "q4 fwd ms"), ("fp16_fwd_ms", "fp16 fwd ms"),
    ("bf16_fwd_ms", "bf16 fwd ms"), ("fwd_speedup_vs_fp16", "fwd x fp16"), ("fwd_speedup_vs_bf16", "fwd x bf16"),
    ("floor_ms", "floor ms"), ("floor_frac", "floor frac"), ("q4_fwd_graph_ms", "q4 fwd graph ms"),
    ("fp16_fwd_graph_ms", "fp16 fwd graph ms"), ("graph_fwd_speedup_vs_fp16", "graph fwd x fp16"),
    ("q4_train_ms", "q4 train ms"),
    ("fp16_train_ms", "fp16 train ms"), ("fq32_train_ms", "FQ fp32 train ms"),
    ("train_speedup_vs_fq32", "train x FQ32"), ("train_ratio_vs_fp16", "train / fp16"),
    ("q4_saved_MB", "q4 saved MB"), ("fp16_saved_MB", "fp16 saved MB"), ("fq32_saved_MB", "FQ32 saved MB"),
    ("error", "error"),
]


def markdown(rows: List[Dict[str, object]], summary: List[str], header_lines: List[str]) -> str:
    lines = [*header_lines, ""]
    lines.append("| " + " | ".join(h for _, h in MD_COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in MD_COLUMNS) + "|")
    for r in rows:
        cells = []
        for key, _ in MD_COLUMNS:
            v = r.get(key, "")
            digits = 2 if key.endswith("_MB") or "speedup" in key or "ratio" in key or "frac" in key else 4
            cells.append(fmt(v, digits).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *summary]
    return "\n".join(lines)


def plot(rows: List[Dict[str, object]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = [
        ("fwd_speedup_vs_fp16", "fwd vs cuDNN fp16"),
        ("fwd_speedup_vs_bf16", "fwd vs cuDNN bf16"),
        ("train_speedup_vs_fq32", "train step vs fake-quant fp32"),
        ("train_inv_fp16", "train step vs fp16 train (fp16/q4)"),
    ]
    labels = [r["shape"] for r in rows]
    x = np.arange(len(rows))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(10, 0.55 * len(rows) + 3), 6))
    for i, (key, label) in enumerate(series):
        vals = []
        for r in rows:
            if key == "train_inv_fp16":
                v = r.get("train_ratio_vs_fp16")
                v = 1.0 / v if isinstance(v, float) and v > 0 else float("nan")
            else:
                v = r.get(key)
                v = v if isinstance(v, float) else float("nan")
            vals.append(v)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=label)
    ax.axhline(1.0, color="black", linewidth=1.0)
    ax.axhline(2.0, color="red", linewidth=1.0, linestyle="--", label="2x")
    ax.set_yscale("log")
    ax.set_ylabel("speed-up (x, log scale)")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=75, ha="right", fontsize=7)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out: Path, stem: str, rows: List[Dict[str, object]], columns: Sequence[str], md: str,
                  plot_fn: Callable[[List[Dict[str, object]], Path, str], None], title: str) -> None:
    """<stem>.csv, <stem>.md and the plot <stem>.png under out; a failed plot is
    reported, not raised (the table matters more)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.md").write_text(md + "\n")
    try:
        plot_fn(rows, out / f"{stem}.png", title)
    except Exception as exc:
        print(f"plot failed: {exc}", file=sys.stderr)
    print(f"wrote {out / (stem + '.csv')}, {out / (stem + '.md')}, {out / (stem + '.png')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--batch", type=int, default=64, help="batch of the main shape set (default 64)")
    parser.add_argument("--shapes", choices=["resnet50", "quick"], default="resnet50",
                        help="resnet50: all distinct ResNet-50 convs (+ 3 shapes at batch 1 and 256); quick: 4 shapes")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per measurement (median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up calls per measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds per shape (every variant timed once per round); "
                             "reported: the median of the rounds' medians")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step measurements")
    parser.add_argument("--out", type=Path, default=None, help="write bench.csv, bench.md, bench.png here")
    parser.add_argument("--dry-run", action="store_true", help="list the shapes (no GPU needed) and exit")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing measurements")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--batch, --repeats and --rounds must be >= 1, --warmup >= 0")

    shapes = make_shapes(args.shapes, args.batch)
    if args.dry_run:
        print(f"{len(shapes)} shapes (main batch {args.batch}); floor = max(ops/{INT8_PEAK_OPS:.4g}, "
              f"bytes/{HBM_BYTES_PER_S:.4g})")
        print(f"{'#':>3}  {'shape':<40} {'P=Q':>4} {'GOPs':>9} {'MB':>9} {'floor ms':>9} {'in L2':>6} {'bufs':>5}")
        for i, s in enumerate(shapes):
            xb = s.n * s.c * s.h * s.h * 2
            print(f"{i:>3}  {s.name:<40} {s.p:>4} {s.ops() / 1e9:>9.2f} {s.bytes() / 2**20:>9.2f} "
                  f"{s.floor_ms():>9.4f} {str(xb < L2_BYTES):>6} {n_buffers(xb):>5}"
                  + ("" if s.main else "  (extra batch)"))
        return 0
    if not torch.cuda.is_available():
        print("error: bench.py needs a CUDA GPU (use --dry-run to list the shapes)", file=sys.stderr)
        return 2

    import q4conv

    torch.backends.cudnn.benchmark = True
    device_name = torch.cuda.get_device_name()
    cap = torch.cuda.get_device_capability()
    header = [
        f"# q4conv benchmark on {device_name} (sm_{cap[0]}{cap[1]})",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
        f"q4conv {getattr(q4conv, '__version__', '?')}; warm-up {args.warmup}, median of {args.repeats}, "
        f"median over {args.rounds} interleaved rounds; "
        f"times in ms (CUDA events); train steps compute all input and parameter gradients",
    ]
    print(header[0].lstrip("# "))
    print(header[1])
    t0 = time.perf_counter()
    rows = []
    for i, shape in enumerate(shapes):
        t = time.perf_counter()
        row = bench_shape(shape, args)
        rows.append(row)
        print(f"[{i + 1:>2}/{len(shapes)}] {shape.name:<40} {row['backend'] or '?':<12} "
              f"q4 fwd {fmt(row['q4_fwd_ms'], 4)} ms (x{fmt(row['fwd_speedup_vs_fp16'], 2)} vs fp16) "
              f"q4 train {fmt(row['q4_train_ms'], 4)} ms (x{fmt(row['train_speedup_vs_fq32'], 2)} vs FQ32, "
              f"{fmt(row['train_ratio_vs_fp16'], 2)} of fp16)  [{time.perf_counter() - t:.1f} s]"
              + (f"  ERROR {row['error']}" if row["error"] else ""), flush=True)

    main_rows = [r for r in rows if r["main"]]
    summary = [f"Geometric means over the {len(main_rows)} batch-{args.batch} shapes:"]
    for key, label, target in (
        ("fwd_speedup_vs_fp16", "q4conv fwd speed-up vs cuDNN fp16", "target >= 2"),
        ("fwd_speedup_vs_bf16", "q4conv fwd speed-up vs cuDNN bf16", ""),
        ("graph_fwd_speedup_vs_fp16", "q4conv fwd speed-up vs cuDNN fp16, both in CUDA graphs (no launch overhead)", ""),
        ("floor_frac", "q4conv fwd fraction of floor", ""),
        ("train_speedup_vs_fq32", "q4conv train step speed-up vs fake-quant fp32", "target >= 5"),
        ("train_ratio_vs_fp16", "q4conv train step / fp16 train step", "target <= 1.3"),
    ):
        g = geomean([r[key] for r in main_rows])
        summary.append(f"- {label}: {fmt(g, 3) if g is not None else 'n/a'}" + (f" ({target})" if target else ""))
    failed = [r["shape"] for r in rows if r["error"]]
    if failed:
        summary.append(f"- {len(failed)} shape(s) had errors: {', '.join(failed)}")
    summary.append(f"- total benchmark time {time.perf_counter() - t0:.0f} s")
    md = markdown(rows, summary, header)

    if args.out is not None:
        write_results(args.out, "bench", rows, COLUMNS, md, plot, f"q4conv speed-ups on {device_name}")
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
