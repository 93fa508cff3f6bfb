#!/usr/bin/env python
"""q4conv under DistributedDataParallel on several GPUs (issue 20 item 2): equality and scaling.

Per world size K (one torchrun launch of K processes, one GPU each, NCCL):
  (a) equality: a small converted ResNet-18 (q4conv.models.resnet18, width --eq-width, 10
      classes, 32x32, q4conv.convert with its shared activation quantizers, BatchNorm in eval
      mode so each sample's output does not depend on the rest of its batch) trained --eq-steps
      SGD steps under DDP, --eq-batch images per rank, fp32, against one process trained on the
      joined batch (K * --eq-batch images). Every rank computes that single-process reference on
      its own GPU before the process group exists (so q4conv's first-batch scale_a statistic is
      not all-reduced there); it multiplies its scale_a gradients by sqrt(K) before each step:
      LSQ's factor 1 / sqrt(numel * Qp) uses the batch a process sees, so the DDP-averaged scale_a
      gradient is sqrt(K) times one process's on the joined batch (docs/notes/training-backward.md,
      tests/python/test_ddp.py). TF32 off and cuDNN deterministic for this part. Reported after
      every step, over every parameter and buffer (scale_a, bias_a, scale_w included): max abs
      difference, max relative difference (per tensor: max |ddp - ref| / max |ref|), the
      tolerance ratio max |ddp - ref| / (atol + rtol |ref|) (test_ddp.py's rtol 1e-4, atol 1e-6;
      <= 1 passes) and whether every rank holds identical values (all_gather of one flat float64
      vector of parameters and buffers, compared bit for bit with rank 0's).
  (b) throughput: ResNet-50 (1000 classes, 224x224, random weights, randomized BatchNorm, random
      images / labels, different per rank), --batch images per GPU, channels_last input, SGD
      momentum 0.9, DDP(gradient_as_bucket_view=True), per configuration (--configs):
        q4_amp16       q4conv QAT (q4conv.convert, scales calibrated on the first batch, the
                       statistic all-reduced over ranks) under fp16 autocast + GradScaler, as
                       bench_model.py's q4_amp16;
        fp16_amp       the float model (channels_last weights) in plain fp16 AMP (autocast +
                       GradScaler): the baseline;
        q4_amp16_nobb  q4_amp16 with DDP(broadcast_buffers=False): DDP's default broadcast of
                       the buffers before every forward writes each q4conv layer's eps buffer,
                       whose host copy the layer then re-reads (one device sync per q4conv layer
                       per step, 53 in ResNet-50); this row says what that costs.
      --warmup steps, then --steps timed steps: CUDA events around each step on every rank (perf
      counters on CPU); per rank the median; reported: rank 0's median, the max over ranks of
      the medians, and the wall time per step (barrier to barrier over the timed steps, mean).
      images/s = K * batch / (max-over-ranks median step); scaling efficiency = images/s(K) /
      (K * images/s(1)) of the same configuration (1 = DDP on one GPU, K=1 must be in the run).
      Target (issue 20): q4_amp16's efficiency at K GPUs within 5 points of fp16_amp's, and the
      equality holding at every K.

Launch, one world size (writes OUT/bench_ddp_ws<K>.json, then the table of every
bench_ddp_ws*.json in OUT):
    torchrun --standalone --nproc-per-node=K bench/bench_ddp.py --out OUT
Driver, several world sizes in one run (the default without torchrun's environment):
    python bench/bench_ddp.py --world-sizes 1,2,4,8 --out OUT
The driver starts one `python -m torch.distributed.run --standalone --nproc-per-node=K` per world
size, one after the other, and merges their JSON results. Chosen over sub-groups of one K-process
launch because each world size then gets a fresh process group, fresh CUDA contexts and allocator,
and its own failure (one world size crashing or timing out is an error row, the others still
report); and because q4conv's first-batch scale_a statistic is all-reduced over the default group,
which the ranks outside a sub-group would not join. --launcher spawn replaces torchrun by
torch.multiprocessing.spawn (MASTER_ADDR / MASTER_PORT set by the script) where torchrun is absent.

Outputs with --out: bench_ddp.md (card names, versions, nvidia-smi topology where available, the
command line, the throughput and equality tables, the target lines), bench_ddp.csv (throughput
rows), bench_ddp_equality.csv, bench_ddp.json (everything), bench_ddp_ws<K>.json and ws<K>.log
(each launch's output). The table is printed too. Exit status 0 when every world size produced
results and every equality check passed.

CPU smoke run (CI; tiny ResNet-18 width 8 at 32x32 for the throughput part too, batch 2, 1 warm-up
step, 2 timed steps, fp16 autocast as bf16 on CPU, gloo):
    python bench/bench_ddp.py --device cpu --backend gloo --smoke --world-sizes 1,2 --out OUT
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import json
import math
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model as bm  # noqa: E402  (ModelSpec, RESNET50, amp_dtype, markdown_table, LR, MOMENTUM)

SCRIPT = Path(__file__).resolve()
BASELINE = "fp16_amp"
TARGET_POINTS = 0.05  # q4conv's scaling efficiency within 5 points of fp16 AMP's (issue 20)
EQ_RTOL, EQ_ATOL = 1e-4, 1e-6  # tests/python/test_ddp.py's tolerance
# SGD learning rates of the equality run: the scales get a large one (LSQ's gradient scale makes
# their steps tiny) so that they move ~0.1-1% per step (up to ~10% in the smallest layers), and a
# scale_a gradient off by sqrt(K) fails the comparison; test_ddp.py's lr 10 (for its 4-layer net)
# drives some scale_a of this ResNet-18 negative within 3 steps.
EQ_LR, EQ_SCALE_LR = 0.05, 1.0


@dataclass(frozen=True)
class DDPConfig:
    key: str
    label: str
    model: str  # "q4" or "float"
    broadcast_buffers: bool


CONFIGS = [
    DDPConfig("q4_amp16", "q4conv QAT AMP fp16", "q4", True),
    DDPConfig("fp16_amp", "float AMP fp16 (baseline)", "float", True),
    DDPConfig("q4_amp16_nobb", "q4conv QAT AMP fp16, broadcast_buffers=False", "q4", False),
]
CONFIGS_BY_KEY = {c.key: c for c in CONFIGS}


# ------------------------------------------------------------------ environment
def _in_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def _card_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "CPU"
    cap = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]})"


def _versions() -> Dict[str, Any]:
    import q4conv

    nccl = ""
    if torch.cuda.is_available():
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(str(p) for p in v) if isinstance(v, tuple) else str(v)
        except Exception:
            nccl = "?"
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "nccl": nccl, "q4conv": getattr(q4conv, "__version__", "?"), "python": sys.version.split()[0]}


@contextlib.contextmanager
def _exact_math(device: torch.device):
    """TF32 off, cuDNN deterministic and not benchmarking (the equality part); restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# --------------------------------------------------------------- (a) equality
def eq_spec(args: argparse.Namespace) -> "bm.ModelSpec":
    return bm.ModelSpec("resnet18", 10, args.eq_width, 32)


def eq_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The converted small ResNet, on device, train mode with every BatchNorm in eval mode."""
    import q4conv

    model = q4conv.convert(eq_spec(args).build(seed=0)).to(device).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def eq_data(args: argparse.Namespace, world: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The joined batch (world * eq_batch images, CPU) and labels of every step."""
    g = torch.Generator().manual_seed(1234)
    n = world * args.eq_batch
    xs = [torch.randn(n, 3, 32, 32, generator=g) for _ in range(args.eq_steps)]
    ys = [torch.randint(0, 10, (n,), generator=g) for _ in range(args.eq_steps)]
    return xs, ys


def eq_optimizer(model: nn.Module) -> torch.optim.SGD:
    named = list(model.named_parameters())  # unique: convert's shared scale_a / bias_a once
    scales = [p for n, p in named if n.endswith(("scale_a", "scale_w"))]
    others = [p for n, p in named if not n.endswith(("scale_a", "scale_w"))]
    return torch.optim.SGD([{"params": others}, {"params": scales, "lr": EQ_SCALE_LR}], lr=EQ_LR)


def model_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer as float64 CPU copies (named_* list a shared tensor once)."""
    out = {n: p.detach().double().cpu().clone() for n, p in model.named_parameters()}
    out.update({n: b.detach().double().cpu().clone() for n, b in model.named_buffers() if b is not None})
    return out


def reference_states(args: argparse.Namespace, world: int, device: torch.device,
                     scale_a_factor: Optional[float] = None) -> List[Dict[str, torch.Tensor]]:
    """One process (no process group) trained on the joined batches; state after every step.
    Its scale_a gradients are multiplied by scale_a_factor (default sqrt(world), what DDP gives)."""
    factor = math.sqrt(world) if scale_a_factor is None else scale_a_factor
    xs, ys = eq_data(args, world)
    model = eq_model(args, device)
    opt = eq_optimizer(model)
    states = []
    for step in range(args.eq_steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xs[step].to(device)), ys[step].to(device)).backward()
        for name, p in model.named_parameters():  # a shared scale_a once: its summed gradient scales too
            if name.endswith("scale_a") and p.grad is not None:
                p.grad.mul_(factor)
        opt.step()
        states.append(model_state(model))
    return states


def compare_states(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor],
                   rtol: float, atol: float) -> Dict[str, Any]:
    """max abs diff, max per-tensor relative diff, tolerance ratio and the tensor that set it."""
    if got.keys() != ref.keys():
        missing = sorted(set(ref) ^ set(got))
        return {"max_abs": math.inf, "max_rel": math.inf, "tol_ratio": math.inf, "worst": f"keys differ: {missing[:4]}"}
    max_abs = max_rel = tol_ratio = 0.0
    worst = ""
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape:
            return {"max_abs": math.inf, "max_rel": math.inf, "tol_ratio": math.inf, "worst": f"{name} shape"}
        if r.numel() == 0:
            continue
        diff = (g - r).abs()
        d = float(diff.max())
        scale = float(r.abs().max())
        ratio = float((diff / (atol + rtol * r.abs())).max())
        if not math.isfinite(d):
            d = ratio = math.inf
        max_abs = max(max_abs, d)
        max_rel = max(max_rel, d / scale if scale > 0 else (0.0 if d == 0 else math.inf))
        if ratio > tol_ratio:
            tol_ratio, worst = ratio, name
    return {"max_abs": max_abs, "max_rel": max_rel, "tol_ratio": tol_ratio, "worst": worst}


def _flat_state(model: nn.Module, device: torch.device) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in model_state(model).values()]).to(device)


def ranks_identical(model: nn.Module, device: torch.device) -> Tuple[bool, float]:
    """(every rank bit-identical to rank 0, max abs difference to rank 0) of parameters and buffers."""
    import torch.distributed as dist

    flat = _flat_state(model, device)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], g) for g in gathered[1:])
    diff = max([float((gathered[0] - g).abs().max()) for g in gathered[1:]] or [0.0])
    return same, diff


def ddp_equality(args: argparse.Namespace, refs: List[Dict[str, torch.Tensor]], device: torch.device) -> Dict[str, Any]:
    """Train the same model under DDP on this rank's part of every joined batch and compare
    with the reference after every step (the result is the same on every rank)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    xs, ys = eq_data(args, world)
    model = eq_model(args, device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              gradient_as_bucket_view=True)
    opt = eq_optimizer(model)
    part = slice(rank * args.eq_batch, (rank + 1) * args.eq_batch)
    result: Dict[str, Any] = {"steps": args.eq_steps, "batch_per_rank": args.eq_batch, "width": args.eq_width,
                              "rtol": args.eq_rtol, "atol": args.eq_atol, "max_abs": 0.0, "max_rel": 0.0,
                              "tol_ratio": 0.0, "worst": "", "ranks_identical": True, "rank_max_diff": 0.0,
                              "per_step": []}
    for step in range(args.eq_steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(xs[step][part].to(device)), ys[step][part].to(device)).backward()
        opt.step()
        same, rank_diff = ranks_identical(model, device)
        cmp = compare_states(model_state(model), refs[step], args.eq_rtol, args.eq_atol)
        result["per_step"].append(dict(cmp, step=step, ranks_identical=same))
        result["ranks_identical"] = result["ranks_identical"] and same
        result["rank_max_diff"] = max(result["rank_max_diff"], rank_diff)
        for key in ("max_abs", "max_rel"):
            result[key] = max(result[key], cmp[key])
        if cmp["tol_ratio"] >= result["tol_ratio"]:
            result["tol_ratio"] = cmp["tol_ratio"]
            result["worst"] = f"{cmp['worst']} (step {step})" if cmp["worst"] else ""
    scales = [float(p.detach()) for n, p in model.named_parameters() if n.endswith("scale_a")]
    result["scale_a_positive"] = bool(scales) and all(s > 0 for s in scales)
    result["passed"] = bool(result["tol_ratio"] <= 1.0 and result["ranks_identical"] and result["scale_a_positive"])
    del ddp, model, opt
    return result


# ------------------------------------------------------------- (b) throughput
def throughput_spec(args: argparse.Namespace) -> "bm.ModelSpec":
    return bm.SMOKE if args.smoke else bm.RESNET50


def measure_config(config: DDPConfig, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """This rank's timing of one configuration (raises on failure: torchrun then stops the launch)."""
    import q4conv
    import torch.distributed as dist

    rank = dist.get_rank()
    spec = throughput_spec(args)
    cuda = device.type == "cuda"
    _free(device)
    t0 = time.perf_counter()
    model = spec.build(seed=0)
    if config.model == "q4":
        model = q4conv.convert(model).to(device).train()  # weights stay OIHW (the layer re-lays them)
    else:
        model = model.to(device).to(memory_format=torch.channels_last).train()
    gen = torch.Generator().manual_seed(1000 + rank)  # a different batch on every rank
    x = torch.randn(args.batch, 3, spec.image_size, spec.image_size, generator=gen)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.num_classes, (args.batch,), generator=gen).to(device)
    dtype = bm.amp_dtype("fp16", device)

    def autocast():
        return torch.autocast(device.type, dtype)

    if config.model == "q4":
        with torch.no_grad(), autocast():
            q4conv.calibrate(model, [x])  # the statistic is all-reduced: every rank the same scales
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                              gradient_as_bucket_view=True,
                                              broadcast_buffers=config.broadcast_buffers)
    kwargs = {"fused": True} if args.optimizer == "fused" else {"foreach": cuda}
    opt = torch.optim.SGD(model.parameters(), lr=bm.LR, momentum=bm.MOMENTUM, **kwargs)
    scaler = torch.amp.GradScaler(device.type)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(ddp(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    for _ in range(args.warmup):
        step()
    _synchronize(device)
    dist.barrier()
    setup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times: List[float] = []
    loss = None
    wall0 = time.perf_counter()
    if cuda:
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(args.steps)]
        for start, end in pairs:
            start.record()
            loss = step()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in pairs]
    else:
        for _ in range(args.steps):
            s = time.perf_counter()
            loss = step()
            times.append((time.perf_counter() - s) * 1e3)
    dist.barrier()
    wall_ms = (time.perf_counter() - wall0) / args.steps * 1e3
    out = {"step_ms": statistics.median(times), "wall_ms": wall_ms, "setup_s": setup_s,
           "loss": float(loss) if loss is not None else math.nan,
           "peak_MB": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else ""}
    return out  # the model, optimizer and data go with this frame (the caller frees the cache)


def throughput_row(config: DDPConfig, per_rank: List[Dict[str, Any]], args: argparse.Namespace,
                   world: int) -> Dict[str, Any]:
    """The row of one configuration from every rank's measurement."""
    steps = [r["step_ms"] for r in per_rank]
    row = {"world": world, "config": config.key, "label": config.label, "batch_per_gpu": args.batch,
           "broadcast_buffers": config.broadcast_buffers, "step_ms_rank0": steps[0], "step_ms_max": max(steps),
           "step_ms_ranks": steps, "wall_ms": max(r["wall_ms"] for r in per_rank),
           "peak_MB": max(r["peak_MB"] for r in per_rank) if per_rank[0]["peak_MB"] != "" else "",
           "loss": per_rank[0]["loss"],
           "setup_s": max(r["setup_s"] for r in per_rank), "error": ""}
    row["images_s"] = world * args.batch / (row["step_ms_max"] / 1e3)
    if not math.isfinite(row["loss"]):
        row["error"] = f"loss is {row['loss']}"
    return row


# ----------------------------------------------------------------- the worker
def _write_json(path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def worker_main(args: argparse.Namespace) -> int:
    """One rank of one world size (torchrun's environment, or the spawn launcher's)."""
    import torch.distributed as dist

    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if args.device == "cuda":
        if not torch.cuda.is_available() or torch.cuda.device_count() <= local_rank:
            print(f"rank {rank}: no CUDA device {local_rank} (use --device cpu --backend gloo)", file=sys.stderr)
            return 2
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    json_path = args.json or (args.out / f"bench_ddp_ws{world}.json" if args.out else None)
    result: Dict[str, Any] = {
        "world": world, "device": args.device, "backend": args.backend, "smoke": args.smoke,
        "launcher": os.environ.get("Q4CONV_BENCH_DDP_LAUNCHER", "torchrun"), "argv": sys.argv,
        "versions": _versions(), "cards": [], "equality": None, "throughput": [], "complete": False,
        "model": throughput_spec(args).arch, "batch_per_gpu": args.batch,
    }

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[world {world}] {msg}", flush=True)

    def save() -> None:
        if rank == 0 and json_path is not None:
            _write_json(json_path, result)

    # (a) the single-process reference, before the process group exists.
    refs = None
    if not args.skip_equality:
        t = time.perf_counter()
        with _exact_math(device):
            refs = reference_states(args, world, device)
        log(f"reference ({args.eq_steps} steps on {world * args.eq_batch} images) in {time.perf_counter() - t:.1f} s")

    kwargs: Dict[str, Any] = {"timeout": datetime.timedelta(seconds=args.pg_timeout_s)}
    if device.type == "cuda":
        kwargs["device_id"] = device
    try:
        dist.init_process_group(args.backend, **kwargs)
    except TypeError:  # a torch without device_id
        kwargs.pop("device_id", None)
        dist.init_process_group(args.backend, **kwargs)
    try:
        cards: List[Any] = [None] * world
        dist.all_gather_object(cards, _card_name(device))
        result["cards"] = cards
        log(f"cards: {', '.join(cards)}")
        save()
        if refs is not None:
            t = time.perf_counter()
            with _exact_math(device):
                result["equality"] = ddp_equality(args, refs, device)
            eq = result["equality"]
            log(f"equality: {'PASS' if eq['passed'] else 'FAIL'} max abs {eq['max_abs']:.3g} max rel "
                f"{eq['max_rel']:.3g} tol ratio {eq['tol_ratio']:.3g} ({eq['worst']}) ranks identical "
                f"{eq['ranks_identical']} [{time.perf_counter() - t:.1f} s]")
            save()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        for key in args.configs:
            config = CONFIGS_BY_KEY[key]
            t = time.perf_counter()
            mine = measure_config(config, args, device)
            _free(device)
            per_rank: List[Any] = [None] * world
            dist.all_gather_object(per_rank, mine)
            row = throughput_row(config, per_rank, args, world)
            result["throughput"].append(row)
            log(f"{key:<14} step {row['step_ms_rank0']:.2f} ms (max over ranks {row['step_ms_max']:.2f}) "
                f"{row['images_s']:.0f} images/s [{time.perf_counter() - t:.1f} s]"
                + (f" ERROR {row['error']}" if row["error"] else ""))
            save()
        result["complete"] = True
        save()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0 and args.out is not None and args.json is None:  # launched by hand: this OUT's table
        results = [json.loads(p.read_text()) for p in sorted(args.out.glob("bench_ddp_ws*.json"))]
        results.sort(key=lambda r: r["world"])
        command = f"torchrun --nproc-per-node={world} " + " ".join(shlex.quote(a) for a in sys.argv)
        md = write_report(args.out, results, command, topology=_topology() if device.type == "cuda" else "")
        print()
        print(md)
    if args.json is not None:  # launched by the driver: the driver judges (exit 0 = results written)
        return 0
    eq_ok = result["equality"] is None or result["equality"]["passed"]
    return 0 if eq_ok and not any(r["error"] for r in result["throughput"]) else 1


# ----------------------------------------------------------------- launchers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(rank: int, world: int, port: int, argv: List[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), Q4CONV_BENCH_DDP_LAUNCHER="spawn")
    code = worker_main(parse_args(argv))
    if code != 0:
        raise SystemExit(code)


def spawn_main(world: int, argv: List[str]) -> int:
    """--launcher spawn: world processes by torch.multiprocessing.spawn (one world size)."""
    import torch.multiprocessing as mp

    mp.spawn(_spawn_entry, args=(world, _free_port(), argv), nprocs=world, join=True)
    return 0


def worker_argv(args: argparse.Namespace, json_path: Path) -> List[str]:
    """The worker's command-line arguments (everything the driver was given that a worker reads)."""
    argv = ["--json", str(json_path), "--device", args.device, "--backend", args.backend,
            "--batch", str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--configs", ",".join(args.configs), "--optimizer", args.optimizer,
            "--eq-steps", str(args.eq_steps), "--eq-batch", str(args.eq_batch), "--eq-width", str(args.eq_width),
            "--eq-rtol", repr(args.eq_rtol), "--eq-atol", repr(args.eq_atol),
            "--pg-timeout-s", str(args.pg_timeout_s)]
    if args.smoke:
        argv.append("--smoke")
    if args.skip_equality:
        argv.append("--skip-equality")
    return argv


def _run_logged(cmd: List[str], env: Dict[str, str], log_path: Path, timeout_s: float) -> Tuple[int, str]:
    """Run cmd in its own session, echoing its output and writing it to log_path; kill its
    process group after timeout_s. Returns (exit status, or 'timeout', the last lines)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: List[str] = []
    timed_out = threading.Event()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, 9)  # the launch's own process group (started above)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                tail = (tail + [line.rstrip()])[-30:]
                if line.startswith("[world ") or "Error" in line or "error" in line:
                    print("    " + line.rstrip(), flush=True)
            proc.wait()
        finally:
            timer.cancel()
    rc = proc.returncode
    return (-9 if timed_out.is_set() else rc), ("(timed out) " if timed_out.is_set() else "") + "\n".join(tail[-8:])


def _launch_command(args: argparse.Namespace, world: int, json_path: Path) -> List[str]:
    wargs = worker_argv(args, json_path)
    if args.launcher == "spawn":
        return [sys.executable, str(SCRIPT), "--spawn-world", str(world), *wargs]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            str(SCRIPT), *wargs]


def _child_env() -> Dict[str, str]:
    """The environment of a launch: this q4conv's package directory first on PYTHONPATH."""
    import q4conv

    env = dict(os.environ)
    pkg_parent = str(Path(q4conv.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _topology() -> str:
    """nvidia-smi's GPU list and topology matrix, where nvidia-smi answers."""
    parts = []
    for cmd in (["nvidia-smi", "--query-gpu=index,name,pci.bus_id,memory.total", "--format=csv,noheader"],
                ["nvidia-smi", "topo", "-m"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                parts.append(out.stdout.rstrip())
        except Exception:
            pass
    return "\n\n".join(parts)


def driver_main(args: argparse.Namespace) -> int:
    """Launch one world size after the other and merge their results."""
    out = args.out
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_ddp_")
        out = Path(tmp.name)
    out.mkdir(parents=True, exist_ok=True)
    world_sizes = args.world_sizes
    if world_sizes is None:
        n = torch.cuda.device_count() if args.device == "cuda" else 2
        world_sizes = sorted({k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n} | {max(n, 1)})
    if args.device == "cuda":
        have = torch.cuda.device_count()
        if have == 0:
            print("error: no CUDA device (use --device cpu --backend gloo --smoke for a functional check)",
                  file=sys.stderr)
            return 2
        too_many = [k for k in world_sizes if k > have]
        if too_many:
            print(f"error: world sizes {too_many} need more than the {have} GPUs here", file=sys.stderr)
            return 2
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    print(f"bench_ddp: world sizes {world_sizes}, device {args.device}, backend {args.backend}, "
          f"{'smoke' if args.smoke else throughput_spec(args).arch} batch {args.batch} per GPU; results in {out}",
          flush=True)
    results: List[Dict[str, Any]] = []
    env = _child_env()
    t_all = time.perf_counter()
    for world in world_sizes:
        json_path = out / f"bench_ddp_ws{world}.json"
        if json_path.exists():
            json_path.unlink()  # never merge a stale result
        cmd = _launch_command(args, world, json_path)
        print(f"  world size {world}: {' '.join(shlex.quote(c) for c in cmd[:6])} ...", flush=True)
        t = time.perf_counter()
        rc, tail = _run_logged(cmd, env, out / f"ws{world}.log", args.timeout_s)
        result = json.loads(json_path.read_text()) if json_path.exists() else {
            "world": world, "device": args.device, "backend": args.backend, "cards": [], "equality": None,
            "throughput": [], "complete": False, "versions": _versions()}
        if not result.get("complete") or rc != 0:
            result["error"] = f"launch exit status {rc}: " + tail.replace("\n", " / ")[-600:]
            print(f"  world size {world}: FAILED (exit {rc}; log {out / f'ws{world}.log'})\n{tail}", flush=True)
        print(f"  world size {world}: done in {time.perf_counter() - t:.0f} s", flush=True)
        results.append(result)
    md = write_report(out, results, command, topology=_topology() if args.device == "cuda" else "",
                      total_s=time.perf_counter() - t_all)
    print()
    print(md)
    if args.out is not None:
        print(f"\nwrote {out}/bench_ddp.md, .csv, _equality.csv, .json")
    if tmp is not None:
        tmp.cleanup()
    ok = all(r.get("complete") and not r.get("error") for r in results)
    ok = ok and all(r["equality"] is None or r["equality"]["passed"] for r in results)
    return 0 if ok else 1


# ------------------------------------------------------------------- reports
THROUGHPUT_COLUMNS = [
    ("world", "GPUs", 0), ("label", "configuration", 0), ("batch_per_gpu", "batch/GPU", 0),
    ("step_ms_rank0", "step ms (rank 0)", 2), ("step_ms_max", "step ms (max rank)", 2), ("wall_ms", "wall ms", 2),
    ("images_s", "images/s", 0), ("efficiency", "scaling eff.", 3), ("eff_vs_fp16", "eff. - fp16 AMP's", 3),
    ("vs_fp16_amp", "step / fp16 AMP", 3), ("peak_MB", "peak MB", 0), ("loss", "loss", 3), ("error", "error", 0),
]
THROUGHPUT_CSV = ["world", "config", "label", "batch_per_gpu", "broadcast_buffers", "step_ms_rank0", "step_ms_max",
                  "wall_ms", "images_s", "efficiency", "eff_vs_fp16", "vs_fp16_amp", "peak_MB", "loss", "setup_s",
                  "step_ms_ranks", "error"]
EQUALITY_COLUMNS = [
    ("world", "GPUs", 0), ("steps", "steps", 0), ("batch_per_rank", "batch/rank", 0), ("max_abs", "max abs diff", 0),
    ("max_rel", "max rel diff", 0), ("tol_ratio", "tol. ratio", 0), ("worst", "worst tensor", 0),
    ("ranks_identical", "ranks identical", 0), ("result", "result", 0),
]
EQUALITY_CSV = ["world", "steps", "batch_per_rank", "width", "rtol", "atol", "max_abs", "max_rel", "tol_ratio",
                "worst", "ranks_identical", "rank_max_diff", "scale_a_positive", "result"]


def throughput_rows(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Every world size's throughput rows with scaling efficiency and the fp16 AMP comparisons."""
    rows = []
    for res in results:
        if res.get("error") and not res.get("throughput"):
            rows.append({"world": res["world"], "config": "", "label": "(no result)", "error": res["error"]})
        for r in res.get("throughput", []):
            rows.append(dict(r))
    one = {r["config"]: r for r in rows if r.get("world") == 1 and not r.get("error") and r.get("images_s")}
    for r in rows:
        if r.get("error") or not r.get("images_s"):
            continue
        base1 = one.get(r["config"])
        if base1 is not None:
            r["efficiency"] = r["images_s"] / (r["world"] * base1["images_s"])
    for r in rows:
        if r.get("error") or not r.get("images_s"):
            continue
        fp16 = next((b for b in rows if b.get("world") == r["world"] and b.get("config") == BASELINE
                     and not b.get("error") and b.get("images_s")), None)
        if fp16 is not None and r["config"] != BASELINE:
            r["vs_fp16_amp"] = r["step_ms_max"] / fp16["step_ms_max"]
            if isinstance(r.get("efficiency"), float) and isinstance(fp16.get("efficiency"), float):
                r["eff_vs_fp16"] = r["efficiency"] - fp16["efficiency"]
    for r in rows:
        for key in THROUGHPUT_CSV:
            r.setdefault(key, "")
    return rows


def equality_rows(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for res in results:
        eq = res.get("equality")
        if eq is None:
            row = {k: "" for k in EQUALITY_CSV}
            row.update(world=res["world"], result="not run" if res.get("complete") else "no result")
        else:
            row = {k: eq.get(k, "") for k in EQUALITY_CSV}
            row.update(world=res["world"], result="pass" if eq["passed"] else "FAIL",
                       ranks_identical="yes" if eq["ranks_identical"] else "NO")
            for key in ("max_abs", "max_rel", "tol_ratio"):
                row[key] = f"{eq[key]:.3g}"
        rows.append(row)
    return rows


def summary_lines(trows: List[Dict[str, Any]], erows: List[Dict[str, Any]]) -> List[str]:
    lines = [f"Target (issue 20): q4conv QAT step's scaling efficiency at K GPUs within {TARGET_POINTS * 100:.0f} "
             "points of plain fp16 AMP DDP's on the same machine, and DDP equal to the single-process run."]
    good = [r for r in trows if not r.get("error") and r.get("images_s")]
    if good:
        kmax = max(r["world"] for r in good)
        for key in [c.key for c in CONFIGS if c.key != BASELINE]:
            r = next((r for r in good if r["world"] == kmax and r["config"] == key), None)
            if r is None or not isinstance(r.get("eff_vs_fp16"), float):
                continue
            fp16 = next(b for b in good if b["world"] == kmax and b["config"] == BASELINE)
            met = r["eff_vs_fp16"] >= -TARGET_POINTS
            lines.append(f"- {kmax} GPUs, {key}: efficiency {r['efficiency']:.3f} vs fp16 AMP {fp16['efficiency']:.3f} "
                         f"({100 * r['eff_vs_fp16']:+.1f} points): {'met' if met else 'NOT met'}"
                         + ("" if key == "q4_amp16" else " (diagnostic row, not the target's)"))
    if erows:
        passed = [r for r in erows if r["result"] == "pass"]
        failing = ", ".join(f"{r['world']} ({r['result']})" for r in erows if r["result"] != "pass")
        lines.append(f"- equality: {len(passed)} of {len(erows)} world sizes pass"
                     + (f" (failing: {failing})" if failing else ""))
    return lines


def _cards_text(results: Sequence[Dict[str, Any]]) -> str:
    biggest = max(results, key=lambda r: len(r.get("cards") or []), default=None)
    cards = (biggest or {}).get("cards") or []
    if not cards:
        return "unknown cards"
    counts: Dict[str, int] = {}
    for c in cards:
        counts[c] = counts.get(c, 0) + 1
    return ", ".join(f"{n}x {c}" for c, n in counts.items())


def write_report(out: Path, results: Sequence[Dict[str, Any]], command: str, topology: str = "",
                 total_s: Optional[float] = None) -> str:
    """Write bench_ddp.md / .csv / _equality.csv / .json to out; return the markdown."""
    trows, erows = throughput_rows(results), equality_rows(results)
    first = next((r for r in results if r.get("versions")), {})
    v = first.get("versions", {})
    smoke = any(r.get("smoke") for r in results)
    device = first.get("device", "?")
    title = f"# q4conv DDP benchmark on {_cards_text(results)}"
    if smoke or device == "cpu":
        title += " (smoke run: no GPU timing)"
    md = [title, "",
          f"torch {v.get('torch')}, CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')}, NCCL {v.get('nccl') or '-'}, "
          f"q4conv {v.get('q4conv')}; backend {first.get('backend')}; throughput model {first.get('model', '?')}, "
          f"{first.get('batch_per_gpu', '?')} images per GPU, channels_last, SGD momentum {bm.MOMENTUM}, "
          "DDP(gradient_as_bucket_view=True)",
          "", f"Command: `{command}`", "",
          "Throughput (images/s = GPUs x batch / the max over ranks of each rank's median step; "
          "scaling eff. = images/s(K) / (K x images/s(1)) of the same configuration):", "",
          *bm.markdown_table(trows, THROUGHPUT_COLUMNS), "",
          "Equality: DDP vs one process on the joined batch (scale_a gradients x sqrt(K) in the reference), "
          "fp32, TF32 off; tol. ratio = max |ddp - ref| / (atol + rtol |ref|), <= 1 passes:", "",
          *bm.markdown_table(erows, EQUALITY_COLUMNS), "",
          *summary_lines(trows, erows)]
    errors = [f"- world size {r['world']}: {r['error']}" for r in results if r.get("error")]
    if errors:
        md += ["", "Launch errors:", *errors]
    if total_s is not None:
        md += ["", f"Total time {total_s:.0f} s."]
    if topology:
        md += ["", "GPUs and topology (nvidia-smi):", "", "```", topology, "```"]
    text = "\n".join(md)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_ddp.md").write_text(text + "\n")
    for name, rows, fields in (("bench_ddp.csv", trows, THROUGHPUT_CSV),
                               ("bench_ddp_equality.csv", erows, EQUALITY_CSV)):
        with open(out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    _write_json(out / "bench_ddp.json", {"command": command, "results": list(results), "throughput": trows,
                                          "equality": erows, "summary": summary_lines(trows, erows)})
    return text


# ---------------------------------------------------------------------- main
def _int_list(text: str) -> List[int]:
    """bench_model's comma-separated positive integers, sorted, each once."""
    return sorted(set(bm._int_list(text)))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=_int_list, default=None,
                        help="driver: comma list of world sizes (default 1,2,4,... up to the GPU count; CPU 1,2)")
    parser.add_argument("--launcher", choices=["torchrun", "spawn"], default="torchrun",
                        help="driver: python -m torch.distributed.run (default) or torch.multiprocessing.spawn")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="driver: limit per world size (default 1800)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--backend", default=None, help="nccl (default on cuda) or gloo (default on cpu)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny ResNet-18 (width 8, 10 classes, 32x32) for the throughput part too, batch 2, "
                             "1 warm-up step, 2 timed steps; equality at width 8, 2 images per rank")
    parser.add_argument("--batch", type=int, default=None, help="images per GPU (default 64; --smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration (default 10)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 20)")
    parser.add_argument("--configs", default=",".join(c.key for c in CONFIGS),
                        help=f"comma list of {', '.join(CONFIGS_BY_KEY)} (default all)")
    parser.add_argument("--optimizer", choices=["foreach", "fused"], default="foreach",
                        help="SGD implementation (fused makes GradScaler's step sync-free)")
    parser.add_argument("--skip-equality", action="store_true", help="throughput only")
    parser.add_argument("--eq-steps", type=int, default=3, help="equality: SGD steps (default 3)")
    parser.add_argument("--eq-batch", type=int, default=None, help="equality: images per rank (default 4; --smoke 2)")
    parser.add_argument("--eq-width", type=int, default=None, help="equality: ResNet-18 width (default 16; --smoke 8)")
    parser.add_argument("--eq-rtol", type=float, default=EQ_RTOL)
    parser.add_argument("--eq-atol", type=float, default=EQ_ATOL)
    parser.add_argument("--pg-timeout-s", type=int, default=600, help="process group timeout (default 600)")
    parser.add_argument("--out", type=Path, default=None, help="write the report and the JSON results here")
    parser.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)  # set by the driver
    parser.add_argument("--spawn-world", type=int, default=None, help=argparse.SUPPRESS)  # --launcher spawn
    args = parser.parse_args(argv)
    args.configs = [k for k in args.configs.split(",") if k]
    bad = [k for k in args.configs if k not in CONFIGS_BY_KEY]
    if bad:
        parser.error(f"unknown configurations {bad}; known: {list(CONFIGS_BY_KEY)}")
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    if args.backend == "nccl" and args.device != "cuda":
        parser.error("--backend nccl needs --device cuda")
    small = args.smoke
    args.batch = args.batch or (2 if small else 64)
    args.warmup = (1 if small else 10) if args.warmup is None else args.warmup
    args.steps = args.steps or (2 if small else 20)
    args.eq_batch = args.eq_batch or (2 if small else 4)
    args.eq_width = args.eq_width or (8 if small else 16)
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.eq_steps < 1 or args.eq_batch < 1:
        parser.error("--batch, --steps, --eq-steps, --eq-batch must be >= 1, --warmup >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.spawn_world is not None:
        rest = [a for i, a in enumerate(argv) if a != "--spawn-world" and (i == 0 or argv[i - 1] != "--spawn-world")]
        return spawn_main(args.spawn_world, rest)
    if _in_torchrun():
        return worker_main(args)
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
