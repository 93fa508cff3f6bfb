#!/usr/bin/env python
"""Codes between layers, per layer (issue 18 item 5): codes in -> codes out, BN and ReLU folded,
vs cuDNN fp16 convolution alone, over the 23 ResNet-50 batch-64 shapes; plus the floor of code I/O.

Per shape (bench.py's list; the batch-1/256 extras are reported, not in the geometric means):
  q4 codes: a deployed layer as `q4conv.deploy` chains it, `FusedQ4Conv2d.from_q4conv(layer, bn,
      relu=True, codes_in=True, codes_for=consumer)`: a calibrated q4conv layer (random weights,
      scale_a from a random batch, random bias_a), an eval BatchNorm with random non-trivial
      statistics (`q4conv.models.randomize_batchnorm_`, some gammas negative) and ReLU folded into
      the epilogue; input: int8 (N, C, H, W) channels_last codes of the layer's own quantizer (made
      once, before timing), except the RGB stem (C == 3), which reads the fp16 image as it does in
      the deployed network (no layer before it writes codes); output: int8 codes of a consumer
      layer's quantizer (calibrated on this layer's float output). One call of
      `torch.ops.q4conv.conv_fused`.
  fp16: cuDNN fp16 channels_last F.conv2d alone (no BN, no ReLU, no quantization), as bench.py.
Timing as bench.py: CUDA events, warm-up, median of --repeats, median over --rounds interleaved
rounds, eager and in a CUDA graph (`time_ms` / `time_graph_ms`), rotating input buffers when an
input fits in L2, cudnn.benchmark on.

Op path (the `path` column): on sm_90, `conv_fused` runs the sm90 int8 kernels, reading the codes
with no quantization pass and writing the consumer's codes from the fp32 epilogue value; elsewhere
(or a layer they do not take) its exact ATen arithmetic.

Floor of a codes-in / codes-out layer (docs/notes/codes-between-layers-floor.md):
max(int8 ops / 1979e12, bytes / 3.35e12) with bytes = input codes (for 1x1 pad-0 convolutions the
pixels on the stride grid, as bench.py) + int4 weights + output codes + per-channel parameters
(alpha, shift, the consumer's bias_a: 3 fp32 per output channel); codes of 1 byte (8-bit) or half a
byte (packed 4-bit). "floor frac" = floor / q4 codes time in a graph (CUDA only);
"bound" = cuDNN fp16 graph time / floor, the best speed-up that floor allows.
Targets (issue 18): speed-up >= 3x geomean over the 23 batch-64 shapes, none below 1.5x.

    python bench/bench_codes.py --out bench_out          # GPU: 23 shapes at batch 64 + extras
    python bench/bench_codes.py --dry-run                # shapes and floors, no GPU
    python bench/bench_codes.py --device cpu --smoke     # 2 tiny shapes on the CPU (perf_counter; fp32 conv)
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from bench import HBM_BYTES_PER_S, INT8_PEAK_OPS, Shape, fmt, geomean, make_shapes  # noqa: E402

TARGET_GEOMEAN, TARGET_MIN = 3.0, 1.5
# --smoke: three tiny shapes (a padded 3x3, a strided 1x1, an RGB stem reading the image) at batch 2.
SMOKE_SHAPES = [Shape(2, 8, 16, 10, 3, 1, 1, main=True), Shape(2, 16, 8, 8, 1, 2, 0, main=True),
                Shape(2, 3, 16, 12, 7, 2, 3, main=True)]


def code_bytes(shape: Shape, code_bits: int) -> float:
    """Bytes a codes-in / codes-out layer must move: input codes (the stem: the fp16 image), int4
    weights, output codes, 3 fp32 per output channel."""
    read_h = shape.p if shape.r == 1 and shape.pad == 0 else shape.h
    x = shape.n * shape.c * read_h * read_h * (16 if reads_image(shape) else code_bits) / 8
    w = (shape.k * shape.c * shape.r * shape.r + 1) // 2
    y = shape.n * shape.k * shape.p * shape.p * code_bits / 8
    return x + w + y + 3 * 4 * shape.k


def code_floor_ms(shape: Shape, code_bits: int) -> float:
    return max(shape.ops() / INT8_PEAK_OPS, code_bytes(shape, code_bits) / HBM_BYTES_PER_S) * 1e3


def op_path(device: torch.device, fused: Optional[object] = None, codes: Optional[torch.Tensor] = None) -> str:
    """The path FusedQ4Conv2d's codes-in / codes-out call takes on ``device``: the sm90 kernels where
    conv_fused runs them for this layer (asked by forcing backend="sm90_int8", which raises where
    it cannot), else its exact ATen arithmetic."""
    if device.type != "cuda":
        return "conv_fused CPU reference"
    if fused is not None and codes is not None:
        b = fused._buffers
        try:
            torch.ops.q4conv.conv_fused(
                codes, b["bias_a"], b["scale_a"], b["qweight"], b["alpha"], b["shift"], fused.stride, fused.padding,
                fused.dilation, float(b["eps"]), fused.a_bit, None, True, b["out_bias_a"], b["out_scale_a"],
                float(b["out_eps"]), None, "sm90_int8")
            return "conv_fused sm90 kernels"
        except RuntimeError:
            pass
    return "conv_fused ATen (CUDA)"


# ------------------------------------------------------------------- the layer
def reads_image(shape: Shape) -> bool:
    """The RGB stem (C == 3) reads the fp16 image in the deployed network: no codes come before it."""
    return shape.c == 3


@dataclass
class Case:
    layer: object  # q4conv.Q4Conv2dCutlass, eval, float weights kept
    bn: nn.BatchNorm2d
    consumer: object  # the q4conv layer whose quantizer the output codes are in
    fused: object  # q4conv.FusedQ4Conv2d: codes in, BN + ReLU, codes out
    codes: List[torch.Tensor]  # int8 (N, C, H, W) channels_last inputs (rotated over); the stem's: fp16 images
    fn: Callable[[torch.Tensor], torch.Tensor]  # the timed op


@torch.no_grad()
def build_case(shape: Shape, device: torch.device, count: int = 1, seed: int = 0) -> Case:
    """The timed codes-in / codes-out layer of ``shape`` and ``count`` codes inputs."""
    import q4conv
    from q4conv.models import randomize_batchnorm_

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def quantizer(c: int, k: int, r: int, stride: int, pad: int, sample: torch.Tensor):
        layer = q4conv.Q4Conv2dCutlass(c, k, r, stride, pad, device=device)
        q4conv.prepare_q4conv_layers(layer)
        layer.bias_a.copy_(torch.randn(c, generator=gen) * 0.1)
        layer.calibrate_(sample)
        return layer.eval()

    nsample = min(shape.n, 4)
    sample = torch.randn(nsample, shape.c, shape.h, shape.h, generator=gen).to(device, dtype)
    layer = quantizer(shape.c, shape.k, shape.r, shape.stride, shape.pad, sample)
    bn = randomize_batchnorm_(nn.BatchNorm2d(shape.k), gen).to(device).eval()
    y = torch.relu(bn(layer(sample).float()))  # the unfused float output, to calibrate the consumer
    consumer = quantizer(shape.k, shape.k, 1, 1, 0, y.to(dtype))
    image_in = reads_image(shape)
    fused = q4conv.FusedQ4Conv2d.from_q4conv(layer, bn, relu=True, codes_in=not image_in, codes_for=consumer)
    codes = []
    for _ in range(count):
        x = torch.randn(shape.n, shape.c, shape.h, shape.h, device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        if image_in:
            codes.append(x)
            continue
        q = torch.ops.q4conv.quantize_activation(x, layer.bias_a, layer.scale_a, float(layer.eps), layer.a_bit)
        codes.append(q.permute(0, 3, 1, 2))  # (N, C, H, W) view of the NHWC codes: channels_last
        del x

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return fused(x)

    return Case(layer, bn, consumer, fused, codes, fn)


# ---------------------------------------------------------------------- timing
def fp16_reference(shape: Shape, device: torch.device) -> Tuple[Callable[[torch.Tensor], torch.Tensor],
                                                                List[torch.Tensor]]:
    """The baseline of a shape: cuDNN fp16 channels_last ``F.conv2d`` alone (fp32 on the CPU, which
    has no fast fp16 convolution) and its rotating inputs."""
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    nbuf = bench.n_buffers(shape.n * shape.c * shape.h * shape.h * 2) if cuda else 1
    w = torch.randn(shape.k, shape.c, shape.r, shape.r, device=device, dtype=dtype) * 0.05
    w = w.contiguous(memory_format=torch.channels_last)
    xs = [torch.randn(shape.n, shape.c, shape.h, shape.h, device=device, dtype=dtype)
          .contiguous(memory_format=torch.channels_last) for _ in range(nbuf)]

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return F.conv2d(x, w, None, shape.stride, shape.pad)

    return fn, xs


def cpu_time_ms(fn: Callable[[torch.Tensor], object], inputs: Sequence[torch.Tensor], warmup: int,
                repeats: int) -> float:
    """Median wall time (perf_counter) of fn(input) on the CPU, rotating over ``inputs``."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(inputs[(warmup + i) % len(inputs)])
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


COLUMNS = [
    "shape", "N", "C", "K", "H", "R", "stride", "pad", "main", "path",
    "q4_codes_ms", "q4_codes_graph_ms", "fp16_ms", "fp16_graph_ms", "graph_speedup", "speedup",
    "floor8_ms", "floor4_ms", "floor8_frac", "floor4_frac", "bound8", "bound4", "error",
]


def error_line(label: str, exc: BaseException) -> str:
    """One line for a row's error column: what failed, the exception type and its first line."""
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{label}: {type(exc).__name__}: {text}"


def bench_shape(shape: Shape, args) -> Dict[str, object]:
    device = args.device
    cuda = device.type == "cuda"
    row: Dict[str, object] = {c: "" for c in COLUMNS}
    row.update(shape=shape.name, N=shape.n, C=shape.c, K=shape.k, H=shape.h, R=shape.r, stride=shape.stride,
               pad=shape.pad, main=shape.main, path=op_path(device), floor8_ms=code_floor_ms(shape, 8),
               floor4_ms=code_floor_ms(shape, 4))
    errors: List[str] = []
    timings: List[tuple] = []  # (label, key, thunk)
    x_elems = shape.n * shape.c * shape.h * shape.h

    def attempt(label: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # report in the row and carry on
            errors.append(error_line(label, exc))
            if args.verbose:
                traceback.print_exc()
        finally:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()

    def register(label: str, fn, inputs) -> None:
        if cuda:
            timings.append((label, f"{label}_ms", lambda: bench.time_ms(fn, inputs, args.warmup, args.repeats)))
            timings.append((label, f"{label}_graph_ms", lambda: bench.time_graph_ms(fn, inputs, args.repeats)))
        else:
            timings.append((label, f"{label}_ms", lambda: cpu_time_ms(fn, inputs, args.warmup, args.repeats)))

    def setup_q4() -> None:
        nbuf = bench.n_buffers(x_elems * (2 if reads_image(shape) else 1)) if cuda else 1  # int8 codes: 1 byte
        case = build_case(shape, device, nbuf, seed=hash(shape.name) % 2**31)
        y = case.fn(case.codes[0])
        assert y.dtype == torch.int8 and tuple(y.shape) == (shape.n, shape.k, shape.p, shape.p) and \
            y.is_contiguous(memory_format=torch.channels_last), f"codes out: {y.dtype} {tuple(y.shape)}"
        row["path"] = op_path(device, case.fused, case.codes[0])
        register("q4_codes", case.fn, case.codes)

    def setup_fp16() -> None:
        register("fp16", *fp16_reference(shape, device))

    attempt("q4 codes setup", setup_q4)
    attempt("fp16 setup", setup_fp16)

    rounds: Dict[str, List[float]] = {}
    failed = set()
    for _ in range(args.rounds):
        for label, key, thunk in timings:
            if label in failed:
                continue
            try:
                rounds.setdefault(key, []).append(thunk())
            except Exception as exc:
                failed.add(label)
                errors.append(error_line(key, exc))
                if args.verbose:
                    traceback.print_exc()
            finally:
                if cuda:
                    torch.cuda.synchronize()
    for label, key, _ in timings:
        if label not in failed and rounds.get(key):
            row[key] = statistics.median(rounds[key])
    timings.clear()
    if cuda:
        torch.cuda.empty_cache()

    def ratio(a, b):
        return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else ""

    row["speedup"] = ratio(row["fp16_ms"], row["q4_codes_ms"])
    row["graph_speedup"] = ratio(row["fp16_graph_ms"], row["q4_codes_graph_ms"])
    if cuda:  # (an H100 floor: no fraction of it for CPU times)
        row["floor8_frac"] = ratio(row["floor8_ms"], row["q4_codes_graph_ms"])
        row["floor4_frac"] = ratio(row["floor4_ms"], row["q4_codes_graph_ms"])
        row["bound8"] = ratio(row["fp16_graph_ms"], row["floor8_ms"])
        row["bound4"] = ratio(row["fp16_graph_ms"], row["floor4_ms"])
    row["error"] = "; ".join(errors)
    return row


# --------------------------------------------------------------------- reports
MD_COLUMNS = [
    ("shape", "shape"), ("path", "op path"), ("q4_codes_ms", "q4 codes ms"),
    ("q4_codes_graph_ms", "q4 codes graph ms"), ("fp16_ms", "fp16 ms"), ("fp16_graph_ms", "fp16 graph ms"),
    ("graph_speedup", "graph x fp16"), ("speedup", "eager x fp16"), ("floor8_ms", "floor ms 8-bit codes"),
    ("floor4_ms", "floor ms 4-bit codes"), ("floor8_frac", "floor frac 8-bit"), ("floor4_frac", "floor frac 4-bit"),
    ("bound8", "bound x 8-bit"), ("bound4", "bound x 4-bit"), ("error", "error"),
]


def summary_lines(rows: List[Dict[str, object]], batch: int) -> List[str]:
    main_rows = [r for r in rows if r["main"]]
    out = [f"Over the {len(main_rows)} main (batch-{batch}) shapes; targets: geomean >= {TARGET_GEOMEAN:g}x, "
           f"none below {TARGET_MIN:g}x:"]
    for key, label in (("graph_speedup", "speed-up vs cuDNN fp16, both in CUDA graphs"),
                       ("speedup", "speed-up vs cuDNN fp16, eager")):
        vals = [(r[key], r["shape"]) for r in main_rows if isinstance(r[key], float)]
        if not vals:
            out.append(f"- {label}: n/a")
            continue
        g = geomean([v for v, _ in vals])
        low, low_shape = min(vals)
        met = g >= TARGET_GEOMEAN and low >= TARGET_MIN and len(vals) == len(main_rows)
        out.append(f"- {label}: geomean {g:.3f}x, min {low:.3f}x ({low_shape}) over {len(vals)} shapes: "
                   f"targets {'met' if met else 'NOT met'}")
    for key, label in (("floor8_frac", "fraction of the 8-bit-codes floor"),
                       ("floor4_frac", "fraction of the packed-4-bit-codes floor"),
                       ("bound8", "best speed-up the 8-bit-codes floor allows (fp16 graph / floor)"),
                       ("bound4", "best speed-up the 4-bit-codes floor allows")):
        g = geomean([r[key] for r in main_rows])
        if g is not None:
            out.append(f"- {label}: geomean {g:.3f}")
    failed = [r["shape"] for r in rows if r["error"]]
    if failed:
        out.append(f"- {len(failed)} shape(s) had errors: {', '.join(failed)}")
    return out


def markdown(rows: List[Dict[str, object]], header: List[str], summary: List[str]) -> str:
    lines = [*header, "", "| " + " | ".join(h for _, h in MD_COLUMNS) + " |",
             "|" + "|".join("---" for _ in MD_COLUMNS) + "|"]
    for r in rows:
        cells = []
        for key, _ in MD_COLUMNS:
            v = r.get(key, "")
            digits = 2 if "speedup" in key or "frac" in key or "bound" in key else 4
            cells.append(fmt(v, digits).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *summary])


def plot(rows: List[Dict[str, object]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = [("graph_speedup", "q4 codes vs fp16 (graphs)"), ("speedup", "q4 codes vs fp16 (eager)"),
              ("bound8", "floor bound, 8-bit codes"), ("bound4", "floor bound, packed 4-bit codes")]
    x = np.arange(len(rows))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(10, 0.55 * len(rows) + 3), 6))
    for i, (key, label) in enumerate(series):
        vals = [r[key] if isinstance(r.get(key), float) else float("nan") for r in rows]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=label)
    ax.axhline(1.0, color="black", linewidth=1.0)
    ax.axhline(TARGET_GEOMEAN, color="red", linewidth=1.0, linestyle="--", label=f"{TARGET_GEOMEAN:g}x (geomean target)")
    ax.axhline(TARGET_MIN, color="orange", linewidth=1.0, linestyle=":", label=f"{TARGET_MIN:g}x (minimum)")
    ax.set_yscale("log")
    ax.set_ylabel("speed-up over cuDNN fp16 (x, log scale)")
    ax.set_xticks(x)
    ax.set_xticklabels([r["shape"] for r in rows], rotation=75, ha="right", fontsize=7)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda when available, else an error (the CPU is for --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="2 tiny shapes, 1 repeat, 1 round, no warm-up (a test of the script, not a benchmark)")
    parser.add_argument("--batch", type=int, default=64, help="batch of the main shape set (default 64)")
    parser.add_argument("--shapes", choices=["resnet50", "quick"], default="resnet50")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write bench_codes.csv / .md / .png here")
    parser.add_argument("--dry-run", action="store_true", help="list the shapes and floors and exit")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    command = "python bench/bench_codes.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    if args.smoke:
        shapes = list(SMOKE_SHAPES)
        args.repeats, args.rounds, args.warmup = 1, 1, 0
    else:
        shapes = make_shapes(args.shapes, args.batch)
    if args.batch < 1 or args.repeats < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--batch, --repeats and --rounds must be >= 1, --warmup >= 0")
    if args.dry_run:
        print(f"{'shape':<40} {'GOPs':>8} {'MB 8b':>8} {'MB 4b':>8} {'floor8 ms':>10} {'floor4 ms':>10}")
        for s in shapes:
            print(f"{s.name:<40} {s.ops() / 1e9:>8.2f} {code_bytes(s, 8) / 2**20:>8.2f} "
                  f"{code_bytes(s, 4) / 2**20:>8.2f} {code_floor_ms(s, 8):>10.4f} {code_floor_ms(s, 4):>10.4f}")
        return 0
    if args.device is None:
        if not torch.cuda.is_available():
            print("error: bench_codes.py needs a CUDA GPU (or --device cpu --smoke, or --dry-run)", file=sys.stderr)
            return 2
        args.device = "cuda"
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU", file=sys.stderr)
        return 2

    import q4conv

    cuda = args.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        card = f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
        timing = "CUDA events, eager and in CUDA graphs"
        baseline = "cuDNN fp16 channels_last F.conv2d alone"
    else:
        card = "CPU"
        timing = "perf_counter wall time, eager only (no graphs)"
        baseline = "ATen fp32 channels_last F.conv2d alone (the fp16 columns hold fp32 on the CPU)"
    header = [
        f"# q4conv codes-in / codes-out layers (BN + ReLU folded) vs {baseline}, on {card}",
        f"`{command}`",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, q4conv {getattr(q4conv, '__version__', '?')}; "
        f"warm-up {args.warmup}, median of {args.repeats}, median over {args.rounds} rounds; {timing}; times in ms.",
        "Op path: the `path` column (`torch.ops.q4conv.conv_fused`: the sm90 kernels reading and writing "
        "codes where they take the layer, else its exact ATen arithmetic; on the CPU its reference arithmetic)."
        + " Floor = max(int8 ops / 1979 TOPS, bytes / 3.35 TB/s), bytes = input codes + int4 weights + "
          "output codes + 3 fp32 per output channel, codes of 8 or packed 4 bits; floor frac = floor / q4 "
          "graph time; bound = fp16 graph time / floor (CUDA only).",
    ]
    print("\n".join(header))
    t0 = time.perf_counter()
    rows = []
    for i, shape in enumerate(shapes):
        t = time.perf_counter()
        row = bench_shape(shape, args)
        rows.append(row)
        print(f"[{i + 1:>2}/{len(shapes)}] {shape.name:<40} q4 codes {fmt(row['q4_codes_ms'], 4)} ms "
              f"(graph {fmt(row['q4_codes_graph_ms'], 4)}) fp16 {fmt(row['fp16_ms'], 4)} "
              f"(graph {fmt(row['fp16_graph_ms'], 4)}) x{fmt(row['graph_speedup'], 2)} graph, "
              f"x{fmt(row['speedup'], 2)} eager  [{time.perf_counter() - t:.1f} s]"
              + (f"  ERROR {row['error']}" if row["error"] else ""), flush=True)
    summary = summary_lines(rows, shapes[0].n if args.smoke else args.batch)
    summary.append(f"- total benchmark time {time.perf_counter() - t0:.0f} s")
    md = markdown(rows, header, summary)
    if args.out is not None:
        bench.write_results(args.out, "bench_codes", rows, COLUMNS, md, plot,
                            f"q4conv codes-in/codes-out layers vs fp16 conv on {card}")
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
