#!/usr/bin/env python
"""q4conv model-level benchmark: ResNet-50 QAT training steps and inference forwards.

Random weights (q4conv.models.resnet50, torchvision's architecture, no torchvision, no download),
BatchNorm statistics made non-trivial by q4conv.models.randomize_batchnorm_, random 224x224 images
(channels_last) and random labels. Everything is measured in one run on one card.

--mode train (issue 19): one optimizer step = zero_grad, forward, cross-entropy, backward,
SGD (momentum 0.9) step, per configuration (--configs, default all):
  q4_fp32    q4conv QAT: q4conv.convert(model) (every conv a q4conv layer), fp32 master weights,
             fp32 input;
  q4_amp16   the same under torch.autocast("cuda", torch.float16) with a GradScaler;
  q4_bf16    the same under bf16 autocast (no scaler);
  fp16_amp   the float model in fp16 AMP (autocast fp16 + GradScaler): the baseline;
  fq_fp32    LSQ fake-quant QAT in pure PyTorch (FakeQuantConv2d: bench.py's lsq_fake_quant on
             activations and weights, per-tensor scales, LSQ gradient scale, then F.conv2d), fp32;
  fq_amp16   the same under autocast fp16 with a GradScaler.
Float and fake-quant models are channels_last (weights too); q4conv models take channels_last input
(their output follows the input's layout; the weights stay OIHW, the layer re-lays them).
Before timing, one no-grad forward in train mode initialises the scales (q4conv.calibrate for q4conv
models; the first forward for fake-quant ones). Then, per configuration (built, measured and freed
before the next, so peak memory is its own):
  step ms    median CUDA-event time of --steps back-to-back steps after --warmup steps;
  images/s   batch / step time;
  peak MB    torch.cuda.max_memory_allocated over the timed steps (reset before them) minus what
             was allocated before the configuration was built: weights, gradients, optimizer
             state, activations, workspaces (cuBLAS / cuBLASLt keep theirs, ~65 MB on an H100,
             for the life of the process: allocated once before the first configuration, so that
             no configuration counts them and none is measured against a base that holds them);
  host ms    median perf_counter time for step() to return, each started from an idle GPU
             (synchronize first, none after): the host's issue time where the GPU keeps up (a
             host-bound step: host ms ~ step ms and a low busy fraction); an upper bound where the
             GPU falls behind (the launch queue fills) or the step synchronises (GradScaler's inf
             check: see the syncs column);
  busy       GPU busy fraction: the summed duration of the GPU kernels / copies of 3 steps under
             torch.profiler, per step, over the step time above (kernel times barely move under the
             profiler, the host's do);
  syncs      synchronising CUDA calls in one step (torch.cuda.set_sync_debug_mode);
  act dtype  the output dtype of layer1.0.conv1: what the convolutions compute in (a q4conv build
             without autocast kernels runs fp32 under autocast);
  setup s    build + scale init + warm-up (includes torch.compile and cuDNN autotuning);
  / fp16 AMP the step time (peak memory) over the fp16_amp configuration's at the same batch
             and mode (eager / compile / graph);
  --profile  adds the top ops by self CPU time (ms per step) over the 3 profiled steps.
--rounds N measures every configuration N times, round by round (configurations interleaved, so a
drifting host moves all of them), and reports the median step and host times. The summary adds the
GPU-time ratios (profiled kernel time per step, q4conv over fp16 AMP): the host-independent part of
the step ratio, what it tends to where the host keeps ahead of the GPU.
--compile adds each configuration under torch.compile (default mode); --cuda-graph adds each with
the whole step (forward, backward, optimizer, scaler) captured in one CUDA graph (after warm-up on a
side stream, as PyTorch's whole-network capture recipe; autocast with cache_enabled=False); a
failed capture (e.g. GradScaler's .item() with the foreach SGD) is reported in the row.
Targets (SPEC section 7): q4conv step / fp16 AMP step <= 1.3; fake-quant AMP / q4conv AMP >= 3;
q4conv peak memory <= fp16 AMP's.

--mode infer (issue 18 item 5): eval forward images/s at --batches (default 1,64,256) of
  fp16      the float model, fp16 weights and input, channels_last;
  q4 eval   the q4conv QAT model (convert + calibrate on one fp32 batch) in eval mode: packed
            weights, per-layer path, fp16 input (BatchNorm and fc in fp16, q4conv parameters fp32);
  deployed  q4conv.deploy(q4 eval model, codes=False, residual=False): BatchNorm / ReLU fused into
            the q4conv epilogues, fp16 between layers (stage 1), fp16 input, where q4conv has
            deploy (else a row says it is absent);
  deployed, codes  q4conv.deploy(q4, codes=True, residual=True): int8 codes between q4conv layers,
            residual adds in the epilogues (conv_fused);
each eager (torch.inference_mode) and replayed from a CUDA graph (captured after warm-up; a failed
capture is reported, not fatal; --no-graph skips), and with --compile under torch.compile
(mode="max-autotune" for fp16, default mode for the q4conv models; dynamic=False, so one compile per
batch: combine with --batches 256). Time: median CUDA-event time per forward over --steps calls
after --warmup, median over --rounds rounds that interleave the variants of a batch. Columns:
images/s; x fp16 eager and x fp16 compiled (images/s over the fp16 model's, eager / compiled); the
fraction of 88,500 images/s (NVIDIA's MLPerf INT8 TensorRT ResNet-50 offline result on one H100).
Targets: deployed at batch 256 >= 3x fp16 eager and >= 2x fp16 max-autotune.

Both modes print the table and, with --out DIR, write bench_model_<mode>.md (table, card name,
torch / CUDA / cuDNN versions, the command line), .csv and .png (matplotlib, Agg).

Commands (GPU; after the package is built: `bash scripts/gpu_check.sh model_train model_infer` builds
it and runs the first and fourth):
    python bench/bench_model.py --mode train --out OUT                    # batch 64 (estimate: 1-3 min)
    python bench/bench_model.py --mode train --batches 64,128,256 --out OUT
    python bench/bench_model.py --mode train --compile --cuda-graph --configs q4_amp16,fp16_amp --out OUT
    python bench/bench_model.py --mode infer --out OUT                    # batches 1,64,256
    python bench/bench_model.py --mode infer --compile --batches 256 --out OUT
CPU smoke run (tiny ResNet-18, width 8, 10 classes, 32x32, batch 2; fp16 autocast runs as bf16):
    python bench/bench_model.py --mode train --device cpu --smoke
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import math
import shlex
import statistics
import sys
import time
import traceback
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (lsq_fake_quant, QP, fmt)

MLPERF_H100_INT8_IMAGES_S = 88_500.0  # NVIDIA MLPerf Inference, ResNet-50 offline, INT8 TensorRT, 1x H100
LR, MOMENTUM = 0.01, 0.9
PROFILE_STEPS = 3
TOP_OPS = 5


# ------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """Which ResNet and at what size (the default is the benchmark's ResNet-50)."""

    arch: str = "resnet50"
    num_classes: int = 1000
    width: int = 64
    image_size: int = 224

    def build(self, seed: int = 0) -> nn.Module:
        """The float model (CPU, fp32, train mode), random weights, randomized BatchNorm."""
        from q4conv.models import randomize_batchnorm_, resnet18, resnet50

        factory = {"resnet50": resnet50, "resnet18": resnet18}[self.arch]
        torch.manual_seed(seed)
        model = factory(num_classes=self.num_classes, width=self.width)
        return randomize_batchnorm_(model, torch.Generator().manual_seed(seed))


RESNET50 = ModelSpec()
SMOKE = ModelSpec("resnet18", 10, 8, 32)


class FakeQuantConv2d(nn.Module):
    """Pure-PyTorch LSQ fake-quant W4A4 conv (the baseline q4conv replaces).

    Activations: ``lsq_fake_quant(x + bias_a, scale_a)``; weights: ``lsq_fake_quant(weight,
    scale_w)`` (bench.py's formulation: round-STE of clamp(v / s, -8, 7) times s, the scale's
    gradient multiplied by 1 / sqrt(numel * 7)); then ``F.conv2d``. Per-tensor scales: scale_w
    from the weights (LSQ init), scale_a from the first training-mode batch.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("FakeQuantConv2d takes groups=1, padding_mode='zeros', numeric padding")
        w = conv.weight.detach()
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight = nn.Parameter(w.clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.bias_a = nn.Parameter(torch.zeros(conv.in_channels, dtype=w.dtype, device=w.device))
        self.scale_a = nn.Parameter(torch.zeros((), dtype=w.dtype, device=w.device))
        self.scale_w = nn.Parameter((2 * w.abs().mean() / math.sqrt(bench.QP)).reshape(()).clone())
        self._scale_a_ready = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shifted = x + self.bias_a.view(1, -1, 1, 1)
        if not self._scale_a_ready:
            with torch.no_grad():
                self.scale_a.copy_(2 * shifted.detach().float().abs().mean() / math.sqrt(bench.QP))
            self._scale_a_ready = True
        xq = bench.lsq_fake_quant(shifted, self.scale_a)
        wq = bench.lsq_fake_quant(self.weight, self.scale_w)
        return F.conv2d(xq, wq, self.bias, self.stride, self.padding, self.dilation)


def convert_fake_quant(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every groups=1 ``nn.Conv2d`` replaced by a FakeQuantConv2d."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d and child.groups == 1:
                setattr(parent, name, FakeQuantConv2d(child))
    return model


def half_except_q4conv(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating parameters and buffers of every module except q4conv layers to dtype
    (BatchNorm, fc: the fp16 activations then flow through the whole model; the q4conv layers
    keep fp32 parameters, deployed ones keep their own dtypes). Returns model."""
    from q4conv import Q4Conv2dCutlass

    for module in model.modules():
        if not isinstance(module, Q4Conv2dCutlass):
            module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)
    return model


def _conv_output_dtype(model: nn.Module, run: Callable[[], Any]) -> str:
    """The output dtype of layer1.0.conv1 during run() ('' where the model has no such module)."""
    try:
        conv = model.get_submodule("layer1.0.conv1")
    except AttributeError:
        return ""
    seen: List[str] = []
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(str(o.dtype).replace("torch.", "")))
    try:
        run()
    finally:
        handle.remove()
    return seen[0] if seen else ""


# ------------------------------------------------------------- train setup
@dataclass(frozen=True)
class TrainConfig:
    key: str
    label: str
    model: str  # "q4", "float" or "fq"
    amp: Optional[str]  # None, "fp16" or "bf16"
    scaler: bool


TRAIN_CONFIGS: List[TrainConfig] = [
    TrainConfig("q4_fp32", "q4conv QAT fp32", "q4", None, False),
    TrainConfig("q4_amp16", "q4conv QAT AMP fp16", "q4", "fp16", True),
    TrainConfig("q4_bf16", "q4conv QAT AMP bf16", "q4", "bf16", False),
    TrainConfig("fp16_amp", "float AMP fp16 (baseline)", "float", "fp16", True),
    TrainConfig("fq_fp32", "fake-quant LSQ fp32", "fq", None, False),
    TrainConfig("fq_amp16", "fake-quant LSQ AMP fp16", "fq", "fp16", True),
]
CONFIGS_BY_KEY = {c.key: c for c in TRAIN_CONFIGS}
BASELINE = "fp16_amp"
MODES = ("eager", "compile", "graph")


def amp_dtype(amp: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a configuration on device (CPU runs fp16 autocast as bf16)."""
    if amp is None:
        return None
    if amp == "fp16" and device.type == "cuda":
        return torch.float16
    return torch.bfloat16


def half_dtype(device: torch.device) -> torch.dtype:
    """The 16-bit inference dtype on device: fp16 on CUDA, bf16 on CPU (smoke runs)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


@dataclass
class TrainSetup:
    """A built configuration: ``step()`` runs one optimizer step and returns its (detached) loss."""

    config: TrainConfig
    mode: str
    batch: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[Any]
    x: torch.Tensor
    y: torch.Tensor
    act_dtype: str
    step: Callable[[], torch.Tensor]


def build_train(config: TrainConfig, spec: ModelSpec, batch: int, device: torch.device,
                mode: str = "eager", optimizer: str = "foreach", seed: int = 0) -> TrainSetup:
    """Model, optimizer, scaler, data and the step function of one training configuration.

    mode: "eager", "compile" (torch.compile of the model, default mode) or "graph" (the whole
    step captured in a CUDA graph; raises where capture fails)."""
    import q4conv

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "graph" and device.type != "cuda":
        raise ValueError("CUDA graphs need a CUDA device")
    model = spec.build(seed)
    if config.model == "q4":
        model = q4conv.convert(model)
    elif config.model == "fq":
        model = convert_fake_quant(model)
    model = model.to(device).train()
    if config.model != "q4":
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=gen)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.num_classes, (batch,), generator=gen).to(device)
    dtype = amp_dtype(config.amp, device)

    def autocast():
        return torch.autocast(device.type, dtype, cache_enabled=mode != "graph") if dtype else nullcontext()

    # Scale initialisation: one no-grad forward in train mode (BatchNorm running stats move too).
    def init_forward() -> None:
        with torch.no_grad(), autocast():
            if config.model == "q4":
                q4conv.calibrate(model, [x])
            else:
                model(x)

    act = _conv_output_dtype(model, init_forward)
    kwargs = {"fused": True} if optimizer == "fused" else {"foreach": device.type == "cuda"}
    params = list(model.parameters())  # unique: convert's shared bias_a / scale_a appear once
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, **kwargs)
    scaler = torch.amp.GradScaler(device.type) if config.scaler else None
    if scaler is not None and optimizer == "fused":
        # torch 2.11's fused SGD, handed GradScaler's inf check, still advances the momentum on
        # the overflow steps the scaler skips (inf momentum, NaN weights a step later: every AMP
        # configuration diverged on an H200, fp16 AMP included). GradScaler's own skip then: the
        # fused kernel for the update, and the sync of the inf check as with foreach.
        opt._step_supports_amp_scaling = False
    run_model = torch.compile(model) if mode == "compile" else model

    def body(zero_grad: bool = True) -> torch.Tensor:
        if zero_grad:
            opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(run_model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss.detach()

    step = body if mode != "graph" else capture_step(body, opt)
    return TrainSetup(config, mode, batch, model, opt, scaler, x, y, act, step)


def capture_step(body: Callable[..., torch.Tensor], opt: torch.optim.Optimizer,
                 warmup: int = 3) -> Callable[[], torch.Tensor]:
    """The whole step in one CUDA graph (PyTorch's whole-network recipe): warm-up on a side
    stream, gradients set to None, capture; each call replays it and returns the static loss."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = body(zero_grad=False)

    def replay() -> torch.Tensor:
        graph.replay()
        return loss

    replay.graph = graph  # type: ignore[attr-defined]  (kept alive with the closure)
    return replay


# ---------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], Any], count: int, device: torch.device) -> float:
    """Median milliseconds per fn() over count back-to-back calls: CUDA events on CUDA (each
    call's GPU span; host gaps count where the GPU waits for the host), perf_counter on CPU."""
    times: List[float] = []
    if device.type == "cuda":
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(count)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in pairs]
    else:
        for _ in range(count):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_ms(fn: Callable[[], Any], count: int, device: torch.device) -> float:
    """Median perf_counter ms for fn() to return, each call started from an idle GPU."""
    times = []
    for _ in range(count):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    synchronize(device)
    return statistics.median(times)


def count_syncs(fn: Callable[[], Any]) -> int:
    """Synchronising CUDA calls in one fn() (torch.cuda.set_sync_debug_mode warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchronizing" in str(w.message) for w in caught)


def is_gpu_work(event: Any) -> bool:
    """A profiler event (or key average) that is GPU kernel or copy time: not a CPU op, and not the
    GPU-side range of a record_function annotation (e.g. Optimizer.step), which overlaps kernels."""
    return event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def profile_steps(fn: Callable[[], Any], steps: int, top_ops: bool) -> Tuple[float, str]:
    """(GPU kernel + copy ms per step, top ops by self CPU time as text) over steps fn() calls
    under torch.profiler (CPU activity only with top_ops)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if top_ops else [])
    torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    device_us = sum(e.time_range.elapsed_us() for e in prof.events() if is_gpu_work(e))
    top = ""
    if top_ops:
        averages = [a for a in prof.key_averages() if a.self_cpu_time_total > 0]
        averages.sort(key=lambda a: a.self_cpu_time_total, reverse=True)
        top = "; ".join(f"{a.key[:48]} {a.self_cpu_time_total / steps / 1e3:.2f}"
                        for a in averages[:TOP_OPS])
    return device_us / steps / 1e3, top


def _error_text(label: str, exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{label}: {type(exc).__name__}: {first}".replace("|", "/")


def warm_up(setup: TrainSetup, steps: int, max_skipped: int = 100) -> None:
    """``steps`` steps, then more until the optimizer has taken one: a GradScaler skips the first
    steps while its scale comes down from 2^16 to where the gradients fit float16 (q4conv AMP
    took more than 5 of them, fp16 AMP fewer), and a skipped step, without the update, would be
    timed as a cheaper step."""
    for _ in range(steps):
        setup.step()
    for _ in range(max_skipped):
        if setup.scaler is None or any(setup.optimizer.state.values()):
            return
        setup.step()


def prime_library_workspaces(device: torch.device) -> None:
    """Makes cuBLAS / cuBLASLt allocate the workspaces they keep for the life of the process
    (through PyTorch's caching allocator, on the first matmul of each kind on a stream): a
    configuration measured first would count them in its peak memory, one measured after it would
    not (they are in its base), so the order of the configurations would move the ratios."""
    if device.type != "cuda":
        return
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        a = torch.randn(64, 64, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(64, 64, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(64, device=device, dtype=dtype, requires_grad=True)
        F.linear(a, w, b).sum().backward()  # addmm (cuBLASLt) forward, mm (cuBLAS) backward
    torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# -------------------------------------------------------------- train mode
TRAIN_COLUMNS = [
    ("batch", "batch", 0), ("label", "configuration", 0), ("mode", "mode", 0), ("act_dtype", "act dtype", 0),
    ("step_ms", "step ms", 2), ("images_s", "images/s", 0), ("vs_fp16_amp", "/ fp16 AMP", 3),
    ("peak_MB", "peak MB", 0), ("mem_vs_fp16_amp", "mem / fp16 AMP", 3), ("host_ms", "host ms", 2),
    ("busy_frac", "busy", 3), ("syncs", "syncs", 0), ("loss", "loss", 3), ("setup_s", "setup s", 1),
    ("error", "error", 0),
]
TRAIN_CSV = ["batch", "config", "label", "mode", "optimizer", "act_dtype", "step_ms", "images_s",
             "vs_fp16_amp", "peak_MB", "mem_vs_fp16_amp", "host_ms", "busy_frac", "gpu_ms",
             "syncs", "loss", "setup_s", "top_ops", "error"]


def measure_train(config: TrainConfig, spec: ModelSpec, batch: int, device: torch.device,
                  mode: str, args: argparse.Namespace, profile: bool) -> Dict[str, Any]:
    """One configuration's row (errors are reported in it, never raised)."""
    row: Dict[str, Any] = {c: "" for c in TRAIN_CSV}
    row.update(batch=batch, config=config.key, label=config.label, mode=mode, optimizer=args.optimizer)
    cuda = device.type == "cuda"
    _free(device)
    base = torch.cuda.memory_allocated() if cuda else 0
    setup: Optional[TrainSetup] = None
    stage = "build and capture" if mode == "graph" else "build"
    try:
        t0 = time.perf_counter()
        setup = build_train(config, spec, batch, device, mode, args.optimizer)
        row["act_dtype"] = setup.act_dtype
        stage = "warm-up"
        warm_up(setup, args.warmup)
        synchronize(device)
        row["setup_s"] = time.perf_counter() - t0
        stage = "timed steps"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        row["step_ms"] = time_calls(setup.step, args.steps, device)
        row["images_s"] = batch / (row["step_ms"] / 1e3)
        if cuda:
            row["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        stage = "host time"
        row["host_ms"] = host_ms(setup.step, args.host_steps, device)
        loss = setup.step()
        row["loss"] = float(loss)
        if cuda:
            stage = "sync count"
            row["syncs"] = count_syncs(setup.step)
            if profile:
                stage = "profiler"
                gpu_ms, top = profile_steps(setup.step, PROFILE_STEPS, args.profile)
                row["gpu_ms"] = gpu_ms
                row["busy_frac"] = gpu_ms / row["step_ms"] if gpu_ms > 0 else ""
                row["top_ops"] = top
        if not math.isfinite(row["loss"]):
            row["error"] = f"loss is {row['loss']}"
    except Exception as exc:  # reported in the row; the run goes on
        row["error"] = _error_text(stage, exc)
        if args.verbose:
            traceback.print_exc()
        if cuda:
            try:
                torch.cuda.synchronize()
            except Exception as sync_exc:  # a sticky CUDA error: later rows will say so too
                row["error"] += f" (then {type(sync_exc).__name__} on synchronize)"
    finally:
        del setup
        if mode == "compile":
            torch._dynamo.reset()  # drop the compiled graphs (and what they hold) of this configuration
        _free(device)
    return row


def _ratio(a: Any, b: Any) -> Any:
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else ""


def train_summary(rows: List[Dict[str, Any]]) -> List[str]:
    """The target ratios per batch and mode."""
    lines = ["Ratios (step times and peak memory of one run; SPEC section 7 targets):"]
    keyed = {(r["batch"], r["mode"], r["config"]): r for r in rows}
    for batch, mode in sorted({(r["batch"], r["mode"]) for r in rows}, key=lambda bm: (bm[0], MODES.index(bm[1]))):
        def get(key: str, column: str) -> Any:
            row = keyed.get((batch, mode, key))
            return row.get(column, "") if row and not row["error"] else ""

        items = []
        for q4 in ("q4_fp32", "q4_amp16", "q4_bf16"):
            items.append((f"{q4} step / fp16_amp step", _ratio(get(q4, "step_ms"), get(BASELINE, "step_ms")),
                          "<= 1.3"))
        items.append(("fq_amp16 step / q4_amp16 step", _ratio(get("fq_amp16", "step_ms"), get("q4_amp16", "step_ms")),
                      ">= 3"))
        items.append(("fq_fp32 step / q4_fp32 step", _ratio(get("fq_fp32", "step_ms"), get("q4_fp32", "step_ms")), ""))
        for q4 in ("q4_amp16", "q4_fp32", "q4_bf16"):
            items.append((f"{q4} peak memory / fp16_amp peak memory",
                          _ratio(get(q4, "peak_MB"), get(BASELINE, "peak_MB")), "<= 1"))
        # GPU work alone (profiled kernel + copy time per step): what the step ratio tends to
        # where the host keeps ahead of the GPU; independent of the host's speed.
        for q4 in ("q4_amp16", "q4_fp32", "q4_bf16"):
            items.append((f"{q4} GPU ms / fp16_amp GPU ms", _ratio(get(q4, "gpu_ms"), get(BASELINE, "gpu_ms")), ""))
        text = [f"{name} {bench.fmt(v, 3)}" + (f" (target {t})" if t else "") for name, v, t in items if v != ""]
        lines.append(f"- batch {batch}, {mode}: " + ("; ".join(text) if text else "n/a"))
    return lines


def run_train(args: argparse.Namespace, spec: ModelSpec, device: torch.device) -> Tuple[List[Dict[str, Any]], List[str]]:
    configs = [CONFIGS_BY_KEY[k] for k in args.configs]
    prime_library_workspaces(device)
    modes = ["eager"] + (["compile"] if args.compile else []) + (["graph"] if args.cuda_graph else [])
    rows: List[Dict[str, Any]] = []
    for mode in modes:  # graph captures last: a failed capture cannot spoil an eager or compiled row
        for batch in args.batches:
            # Rounds interleave the configurations (each measured once per round): a host whose
            # speed drifts during the run then moves every configuration, not only the last ones.
            per_config: Dict[str, List[Dict[str, Any]]] = {c.key: [] for c in configs}
            for r in range(args.rounds):
                for config in configs:
                    t = time.perf_counter()
                    row = measure_train(config, spec, batch, device, mode, args, profile=(r == 0 and not args.no_busy))
                    per_config[config.key].append(row)
                    print(f"  batch {batch:>4} {mode:<7} {config.key:<9} step {bench.fmt(row['step_ms'], 2)} ms "
                          f"host {bench.fmt(row['host_ms'], 2)} ms peak {bench.fmt(row['peak_MB'], 0)} MB "
                          f"busy {bench.fmt(row['busy_frac'], 2)} [{time.perf_counter() - t:.1f} s]"
                          + (f"  ERROR {row['error']}" if row["error"] else ""), flush=True)
            rows.extend(_merge_rounds(per_config[c.key]) for c in configs)
    for row in rows:
        base = next((r for r in rows if r["batch"] == row["batch"] and r["mode"] == row["mode"]
                     and r["config"] == BASELINE and not r["error"]), None)
        if base is not None and not row["error"]:
            row["vs_fp16_amp"] = _ratio(row["step_ms"], base["step_ms"])
            row["mem_vs_fp16_amp"] = _ratio(row["peak_MB"], base["peak_MB"])
    return rows, train_summary(rows)


def _merge_rounds(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Round 1's row with the medians of step_ms / host_ms over the rounds that succeeded."""
    merged = dict(rows[0])
    good = [r for r in rows if not r["error"]]
    if len(rows) > 1 and good:
        for key in ("step_ms", "host_ms"):
            vals = [r[key] for r in good if isinstance(r[key], float)]
            if vals:
                merged[key] = statistics.median(vals)
        merged["images_s"] = merged["batch"] / (merged["step_ms"] / 1e3) if isinstance(merged["step_ms"], float) else ""
        if isinstance(merged["gpu_ms"], float) and isinstance(merged["step_ms"], float):
            merged["busy_frac"] = merged["gpu_ms"] / merged["step_ms"]
        merged["error"] = "; ".join(r["error"] for r in rows if r["error"])
    return merged


# -------------------------------------------------------------- infer mode
INFER_MODELS = ("fp16", "q4", "deploy", "deploy_codes")
INFER_LABELS = {"fp16": "fp16 float", "q4": "q4conv QAT eval", "deploy": "q4conv deployed",
                "deploy_codes": "q4conv deployed, codes"}
INFER_COLUMNS = [
    ("batch", "batch", 0), ("label", "model", 0), ("mode", "mode", 0), ("ms", "ms / forward", 3),
    ("images_s", "images/s", 0), ("vs_fp16_eager", "x fp16 eager", 3),
    ("vs_fp16_compiled", "x fp16 compiled", 3), ("mlperf_frac", "of MLPerf 88.5k", 4), ("error", "error / note", 0),
]
INFER_CSV = ["batch", "model", "label", "mode", "ms", "images_s", "vs_fp16_eager", "vs_fp16_compiled",
             "mlperf_frac", "setup_s", "error"]


def build_infer_models(spec: ModelSpec, device: torch.device, which: Sequence[str] = INFER_MODELS,
                       seed: int = 0) -> Dict[str, Tuple[Optional[nn.Module], str]]:
    """{name: (eval model or None, note)} for "fp16" / "q4" / "deploy" (a build that fails or a
    missing q4conv.deploy gives None and the reason)."""
    import q4conv

    half = half_dtype(device)
    out: Dict[str, Tuple[Optional[nn.Module], str]] = {}
    float_model = spec.build(seed).eval()
    if "fp16" in which:
        m = copy.deepcopy(float_model).to(device=device, dtype=half).to(memory_format=torch.channels_last)
        out["fp16"] = (m, "")
    if "q4" in which or "deploy" in which:
        try:
            q4 = q4conv.convert(float_model).to(device).eval()
            gen = torch.Generator().manual_seed(seed + 1)
            calib = torch.randn(8, 3, spec.image_size, spec.image_size, generator=gen)
            q4conv.calibrate(q4, [calib.to(device).contiguous(memory_format=torch.channels_last)])
        except Exception as exc:
            q4, note = None, _error_text("convert / calibrate", exc)
            out.update({k: (None, note) for k in ("q4", "deploy", "deploy_codes") if k in which})
        if q4 is not None:
            stage1 = {"codes": False, "residual": False}
            for name, options in (("deploy", stage1), ("deploy_codes", {"codes": True, "residual": True})):
                if name not in which:
                    continue
                if not hasattr(q4conv, "deploy"):
                    out[name] = (None, "skipped: this q4conv has no q4conv.deploy")
                    continue
                try:
                    out[name] = (half_except_q4conv(q4conv.deploy(q4, **options), half), "")
                except Exception as exc:
                    out[name] = (None, _error_text("q4conv.deploy", exc))
            if "q4" in which:
                out["q4"] = (half_except_q4conv(q4, half), "")
    return out


def inference_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)
    return fn


def capture_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    warmup: int = 3) -> Callable[[], torch.Tensor]:
    """fn(x) captured in a CUDA graph after warm-up on a side stream; returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x)

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    replay.graph = graph  # type: ignore[attr-defined]
    return replay


def run_infer(args: argparse.Namespace, spec: ModelSpec, device: torch.device) -> Tuple[List[Dict[str, Any]], List[str]]:
    cuda = device.type == "cuda"
    half = half_dtype(device)
    t = time.perf_counter()
    models = build_infer_models(spec, device, args.models)
    print(f"  models built in {time.perf_counter() - t:.1f} s: "
          + ", ".join(f"{k}{' (' + v[1] + ')' if v[1] else ''}" for k, v in models.items()), flush=True)
    modes = ["eager"] + (["graph"] if cuda and not args.no_graph else []) + (["compile"] if args.compile else [])
    rows: List[Dict[str, Any]] = []
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=gen)
        x = x.to(device=device, dtype=half).contiguous(memory_format=torch.channels_last)
        variants: List[Tuple[Dict[str, Any], Callable[[], Any]]] = []
        batch_rows: List[Dict[str, Any]] = []
        for name in args.models:
            model, note = models[name]
            for mode in modes:
                row = {c: "" for c in INFER_CSV}
                row.update(batch=batch, model=name, label=INFER_LABELS[name], mode=mode)
                batch_rows.append(row)
                if model is None:
                    row["error"] = note
                    continue
                t0 = time.perf_counter()
                try:
                    if mode == "compile":
                        compiled = torch.compile(model, mode="max-autotune" if name == "fp16" else None, dynamic=False)
                        fn = inference_fn(compiled)
                        call: Callable[[], Any] = (lambda f=fn, x=x: f(x))
                    elif mode == "graph":
                        call = capture_forward(inference_fn(model), x)
                    else:
                        fn = inference_fn(model)
                        call = (lambda f=fn, x=x: f(x))
                    for _ in range(args.warmup):
                        call()
                    synchronize(device)
                    row["setup_s"] = time.perf_counter() - t0
                    variants.append((row, call))
                except Exception as exc:
                    row["error"] = _error_text(f"{mode} setup", exc)
                    if args.verbose:
                        traceback.print_exc()
                    _free(device)
        times: Dict[int, List[float]] = {}
        for _ in range(args.rounds):  # interleaved: every variant once per round
            for row, call in variants:
                if row["error"]:
                    continue
                try:
                    times.setdefault(id(row), []).append(time_calls(call, args.steps, device))
                except Exception as exc:
                    row["error"] = _error_text("timing", exc)
                    if args.verbose:
                        traceback.print_exc()
                    _free(device)
        for row, _ in variants:
            if not row["error"] and times.get(id(row)):
                row["ms"] = statistics.median(times[id(row)])
                row["images_s"] = batch / (row["ms"] / 1e3)
                row["mlperf_frac"] = row["images_s"] / MLPERF_H100_INT8_IMAGES_S
        ref = {m: next((r for r in batch_rows if r["model"] == "fp16" and r["mode"] == m and r["ms"] != ""), None)
               for m in ("eager", "compile")}
        for row in batch_rows:
            if row["ms"] != "":
                for mode, key in (("eager", "vs_fp16_eager"), ("compile", "vs_fp16_compiled")):
                    if ref[mode] is not None:
                        row[key] = ref[mode]["ms"] / row["ms"]
            print(f"  batch {batch:>4} {row['label']:<18} {row['mode']:<7} {bench.fmt(row['ms'], 3)} ms "
                  f"{bench.fmt(row['images_s'], 0)} images/s"
                  + (f"  ({row['error']})" if row["error"] else ""), flush=True)
        rows += batch_rows
        del variants, x
        _free(device)
    return rows, infer_summary(rows)


def infer_summary(rows: List[Dict[str, Any]]) -> List[str]:
    lines = ["Ratios (images/s over the fp16 float model's, same batch; SPEC section 7 targets at batch 256: "
             "deployed >= 3x fp16 eager, >= 2x fp16 max-autotune):"]
    for row in rows:
        if row["model"] != "fp16" and row["ms"] != "":
            parts = [f"x{bench.fmt(row['vs_fp16_eager'], 3)} fp16 eager"]
            if row["vs_fp16_compiled"] != "":
                parts.append(f"x{bench.fmt(row['vs_fp16_compiled'], 3)} fp16 compiled")
            parts.append(f"{bench.fmt(row['mlperf_frac'], 4)} of MLPerf INT8 TensorRT 88.5k images/s")
            lines.append(f"- batch {row['batch']}, {row['label']}, {row['mode']}: " + ", ".join(parts))
    return lines


# ----------------------------------------------------------------- reports
def markdown_table(rows: List[Dict[str, Any]], columns: Sequence[Tuple[str, str, int]]) -> List[str]:
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(bench.fmt(row.get(k, ""), d).replace("|", "/") for k, _, d in columns) + " |")
    return lines


def header_lines(args: argparse.Namespace, device: torch.device, spec: ModelSpec) -> List[str]:
    import q4conv

    if device.type == "cuda":
        cap = torch.cuda.get_device_capability()
        card = f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})"
    else:
        card = "CPU (smoke run: no GPU timing)"
    autocast_key = "AutocastCUDA" if device.type == "cuda" else "AutocastCPU"
    try:
        has_autocast = torch._C._dispatch_has_kernel_for_dispatch_key("q4conv::conv_train", autocast_key)
    except Exception:
        has_autocast = "unknown"
    what = "training step" if args.mode == "train" else "inference forward"
    return [
        f"# q4conv model benchmark ({what}) on {card}",
        "",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
        f"q4conv {getattr(q4conv, '__version__', '?')} (autocast kernels: {has_autocast}; "
        f"deploy: {hasattr(q4conv, 'deploy')}); model {spec.arch} width {spec.width}, {spec.num_classes} "
        f"classes, {spec.image_size}x{spec.image_size}; warm-up {args.warmup}, median of {args.steps} "
        f"(rounds {args.rounds})"
        + (f"; optimizer SGD momentum {MOMENTUM} ({args.optimizer})" if args.mode == "train" else ""),
        "",
        "Command: `" + " ".join(shlex.quote(a) for a in [sys.executable.rsplit('/', 1)[-1], *sys.argv]) + "`",
    ]


def plot(rows: List[Dict[str, Any]], path: Path, mode: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if isinstance(r.get("images_s"), float)]
    if mode == "train":
        labels = [f"b{r['batch']} {r['config']} {r['mode']}" for r in good]
    else:
        labels = [f"b{r['batch']} {r['model']} {r['mode']}" for r in good]
    values = [r["images_s"] for r in good]
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.32 * len(good) + 1.5)))
    colors = []
    for r in good:
        key = r["config"] if mode == "train" else r["model"]
        colors.append("tab:gray" if key in (BASELINE, "fp16") else "tab:red" if key.startswith("fq")
                      else "tab:blue")
    ax.barh(range(len(good)), values, color=colors)
    ax.set_yticks(range(len(good)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images/s")
    if mode == "infer":
        ax.set_xscale("log")
        ax.axvline(MLPERF_H100_INT8_IMAGES_S, color="black", linestyle="--", linewidth=1,
                   label="MLPerf INT8 TensorRT, 1x H100 (88.5k)")
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, mode: str, rows: List[Dict[str, Any]], md: str, title: str) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_model_{mode}"
    paths = [stem.with_suffix(".md"), stem.with_suffix(".csv"), stem.with_suffix(".png")]
    paths[0].write_text(md + "\n")
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TRAIN_CSV if mode == "train" else INFER_CSV, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    try:
        plot(rows, paths[2], mode, title)
    except Exception as exc:
        print(f"plot failed: {exc}", file=sys.stderr)
        paths.pop()
    return paths


# -------------------------------------------------------------------- main
def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["train", "infer"], required=True)
    parser.add_argument("--batches", type=_int_list, default=None,
                        help="comma list (default: train 64, infer 1,64,256; --smoke 2)")
    parser.add_argument("--configs", default=",".join(c.key for c in TRAIN_CONFIGS),
                        help=f"train: comma list of {', '.join(CONFIGS_BY_KEY)} (default all)")
    parser.add_argument("--models", default=",".join(INFER_MODELS),
                        help="infer: comma list of fp16, q4, deploy (default all)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps / forwards first (default 5)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps / forwards (median; default 20)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="train: times each configuration is rebuilt and measured (default 1); "
                             "infer: interleaved timing rounds per batch (default 3); median over rounds")
    parser.add_argument("--host-steps", type=int, default=5, help="train: steps timed for host ms (default 5)")
    parser.add_argument("--optimizer", choices=["foreach", "fused"], default="foreach",
                        help="train: SGD implementation (fused: the fused update kernel; under a GradScaler "
                             "the scaler's own inf skip, since torch 2.11's fused SGD corrupts momentum on "
                             "skipped steps)")
    parser.add_argument("--compile", action="store_true",
                        help="train: add torch.compile rows (default mode); infer: add torch.compile rows "
                             "(max-autotune for fp16, default for q4conv; slow: one compile per batch)")
    parser.add_argument("--cuda-graph", action="store_true", help="train: add whole-step CUDA graph rows")
    parser.add_argument("--no-graph", action="store_true", help="infer: skip the CUDA graph rows")
    parser.add_argument("--profile", action="store_true",
                        help="train: the top ops by self CPU time (torch.profiler, 3 steps)")
    parser.add_argument("--no-busy", action="store_true", help="train: skip the profiler (busy fraction)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke: a functional check)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny ResNet-18 (width 8, 10 classes, 32x32), batch 2, 1 warm-up, 2 steps")
    parser.add_argument("--out", type=Path, default=None, help="write bench_model_<mode>.md / .csv / .png here")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing rows")
    args = parser.parse_args(argv)
    args.configs = [k for k in args.configs.split(",") if k]
    args.models = [k for k in args.models.split(",") if k]
    bad = [k for k in args.configs if k not in CONFIGS_BY_KEY] + [k for k in args.models if k not in INFER_MODELS]
    if bad:
        parser.error(f"unknown configuration / model names {bad}")
    if args.smoke:
        args.batches = args.batches or [2]
        args.warmup, args.steps, args.host_steps = min(args.warmup, 1), min(args.steps, 2), min(args.host_steps, 1)
        args.rounds = args.rounds or 1
    if args.batches is None:
        args.batches = [64] if args.mode == "train" else [1, 64, 256]
    if args.rounds is None:
        args.rounds = 1 if args.mode == "train" else 3
    if args.warmup < 0 or args.steps < 1 or args.rounds < 1 or args.host_steps < 1:
        parser.error("--warmup must be >= 0, --steps, --rounds and --host-steps >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --device cpu --smoke for a functional check)", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    spec = SMOKE if args.smoke else RESNET50
    header = header_lines(args, device, spec)
    print(header[0].lstrip("# "))
    print(header[2])
    t0 = time.perf_counter()
    if args.mode == "train":
        rows, summary = run_train(args, spec, device)
        columns = TRAIN_COLUMNS
    else:
        rows, summary = run_infer(args, spec, device)
        columns = INFER_COLUMNS
    summary.append(f"- total benchmark time {time.perf_counter() - t0:.0f} s")
    md_lines = [*header, "", *markdown_table(rows, columns), "", *summary]
    if args.mode == "train" and any(r.get("top_ops") for r in rows):
        md_lines += ["", "Top ops by self CPU time (ms per step, torch.profiler over 3 steps):"]
        md_lines += [f"- batch {r['batch']} {r['config']} {r['mode']}: {r['top_ops']}" for r in rows if r.get("top_ops")]
    md = "\n".join(md_lines)
    if args.out is not None:
        paths = write_outputs(args.out, args.mode, rows, md, header[0].lstrip("# "))
        print("wrote " + ", ".join(str(p) for p in paths))
    print()
    print(md)
    return 1 if all(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
