#!/usr/bin/env python
"""Fused 1x1 kernel vs separate pass + GEMM vs cuDNN fp16, per dense 1x1 layer.

For every ResNet-50 1x1 stride-1 layer (batch --batch): the eval-mode q4conv
layer (fp16 channels_last in and out) timed in CUDA graphs with
Q4CONV_FUSED_POINTWISE=0 (quantization pass + CUTLASS GEMM) and =1 (fused
kernel) for each variant of --variants (label:NAME=value, environment
switches; a bare
label: the kernel's own rules), cuDNN fp16 in the same run, plus the floor
bytes / 3.35 TB/s. Example:
    python bench/pointwise_sweep.py --variants rule: --out sweep_out
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (shapes, timing helpers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--variants", default="rule:", help="comma-separated label:NAME=value")
    parser.add_argument("--repeats", type=int, default=10)
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
        row = [shape.name, f"{shape.bytes() / 3.35e12 * 1e6:.1f}",
               f"{bench.time_graph_ms(cudnn, xs, args.repeats) * 1e3:.1f}"]
        os.environ["Q4CONV_FUSED_POINTWISE"] = "0"
        ref = q4(xs[0]).float()
        row.append(f"{bench.time_graph_ms(q4, xs, args.repeats) * 1e3:.1f}")
        os.environ["Q4CONV_FUSED_POINTWISE"] = "1"
        for _, name, value in variants:
            if name:
                os.environ[name] = value
            fused = q4(xs[0]).float()
            # Same codes, same fp32 epilogue: equal up to the bias FMA's rounding.
            diff = (fused - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
            cell = f"{bench.time_graph_ms(q4, xs, args.repeats) * 1e3:.1f}"
            row.append(cell if diff < 1e-3 else cell + f" (DIFF {diff:.1e})")
            if name:
                os.environ.pop(name, None)
        os.environ.pop("Q4CONV_FUSED_POINTWISE", None)
        line = "| " + " | ".join(row) + " |"
        lines.append(line)
        print(line, flush=True)
        del q4, cudnn, xs
        torch.cuda.empty_cache()
    bench.write_lines(args.out, "pointwise_sweep.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
