#!/usr/bin/env python
"""Fused 1x1 kernel vs separate pass + GEMM vs cuDNN fp16, per dense 1x1 layer.

For every ResNet-50 1x1 stride-1 layer (batch --batch): the eval-mode q4conv
layer (fp16 channels_last in and out) timed in CUDA graphs with
Q4CONV_FUSED_POINTWISE=0 (quantization pass + CUTLASS GEMM) and =1 (fused
kernel) for each variant of --variants (label:NAME=value, environment
switches; a bare label: the kernel's own rules), cuDNN fp16 in the same run,
all timed in --rounds interleaved rounds (median of the round medians), plus
the floor bytes / 3.35 TB/s. Example:
    python bench/pointwise_sweep.py --rounds 5 --out sweep_out
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (shapes, timing helpers)


def switch(name: str, value: str):
    """The tuning switch NAME=value inside the block (nothing when name is empty)."""
    return bench.env_switch(name, value) if name else contextlib.nullcontext()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--variants", default="rule:", help="comma-separated label:NAME=value")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median of their medians)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.backends.cudnn.benchmark = True
    variants = []
    for item in filter(None, (v.strip() for v in args.variants.split(","))):
        label, _, setting = item.partition(":")
        name, _, value = setting.partition("=")
        variants.append((label, name, value))
    head = ["shape", "floor us", "cudnn fp16 us", "pass+GEMM us"] + [f"fused {v[0]} us" for v in variants]
    lines = [f"card: {torch.cuda.get_device_name()}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    print("\n".join(lines), flush=True)
    for shape in bench.make_shapes("resnet50", args.batch):
        if not shape.main or shape.r != 1 or shape.stride != 1:
            continue
        q4, cudnn, xs = bench.eval_pair(shape)
        fused_switch = "Q4CONV_FUSED_POINTWISE"
        with switch(fused_switch, "0"):
            ref = q4(xs[0]).float()
        notes = []
        for _, name, value in variants:
            with switch(fused_switch, "1"), switch(name, value):
                fused = q4(xs[0]).float()
            # Same codes, same fp32 epilogue: equal up to the bias FMA's rounding.
            diff = (fused - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
            notes.append("" if diff < 1e-3 else f" (DIFF {diff:.1e})")
        # Every variant once per round, rounds interleaved: one slow spell of
        # the card or host does not spoil one variant's whole measurement.
        times = [[] for _ in range(2 + len(variants))]
        for _ in range(args.rounds):
            times[0].append(bench.time_graph_ms(cudnn, xs, args.repeats))
            with switch(fused_switch, "0"):
                times[1].append(bench.time_graph_ms(q4, xs, args.repeats))
            for i, (_, name, value) in enumerate(variants):
                with switch(fused_switch, "1"), switch(name, value):
                    times[2 + i].append(bench.time_graph_ms(q4, xs, args.repeats))
        cells = [f"{statistics.median(t) * 1e3:.1f}" for t in times]
        row = [shape.name, f"{shape.bytes() / 3.35e12 * 1e6:.1f}"] + cells[:2] + [
            c + n for c, n in zip(cells[2:], notes)]
        line = "| " + " | ".join(row) + " |"
        lines.append(line)
        print(line, flush=True)
        del q4, cudnn, xs
        torch.cuda.empty_cache()
    bench.write_lines(args.out, "pointwise_sweep.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
