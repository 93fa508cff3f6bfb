#!/usr/bin/env python
"""Where a q4conv QAT training step spends its GPU time, per ResNet-50 shape.

For each shape: the GPU microseconds of each kernel of one training step
(forward + all gradients, as bench.py times it) of the q4conv layer and of a
plain fp16 conv (torch.profiler, mean over calls), next to the step's eager
time from bench.time_ms. Example:
    python bench/profile_train.py --shapes 56 --out prof_out
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (shapes, timing helpers)
from profile_fwd import kernel_breakdown, short  # noqa: E402


def train_steps(shape: bench.Shape):
    """(q4conv step, fp16 step, inputs): each step maps x to all its gradients."""
    import q4conv

    st, pd = (shape.stride,) * 2, (shape.pad,) * 2
    layer = q4conv.Q4Conv2dCutlass(shape.c, shape.k, shape.r, shape.stride, shape.pad, device="cuda")
    q4conv.prepare_q4conv_layers(layer)
    xs = bench.rand_inputs(shape, torch.float16, 2, requires_grad=True)
    with torch.no_grad():
        layer.set_activation(xs[0])
    params = [p for p in layer.parameters() if p.requires_grad]
    gy = torch.randn_like(layer(xs[0]).detach())
    w16 = (torch.randn(shape.k, shape.c, shape.r, shape.r, device="cuda", dtype=torch.float16) * 0.05)
    w16 = w16.contiguous(memory_format=torch.channels_last).requires_grad_(True)

    def q4_step(x):
        return torch.autograd.grad(layer(x), [x, *params], gy)

    def fp16_step(x):
        return torch.autograd.grad(F.conv2d(x, w16, None, st, pd), [x, w16], gy)

    return q4_step, fp16_step, xs


def describe(parts) -> str:
    total = sum(parts.values())
    items = sorted(parts.items(), key=lambda kv: -kv[1])
    return f"sum {total:.1f}: " + "; ".join(f"{short(name)} {us:.1f}" for name, us in items)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="",
                        help="only shapes whose input size H is in this comma list (default: all)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.backends.cudnn.benchmark = True
    sizes = {int(s) for s in args.shapes.split(",") if s.strip()}
    lines: List[str] = [f"card: {torch.cuda.get_device_name()}", ""]
    head = ["shape", "q4 step ms", "fp16 step ms", "q4 kernels (us)", "fp16 kernels (us)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    print("\n".join(lines), flush=True)
    for shape in bench.make_shapes("resnet50", args.batch):
        if not shape.main or (sizes and shape.h not in sizes):
            continue
        q4_step, fp16_step, xs = train_steps(shape)
        row = [shape.name]
        for step in (q4_step, fp16_step):
            row.append(f"{bench.time_ms(step, xs, 3, args.repeats):.3f}")
        row += [describe(kernel_breakdown(q4_step, xs[0])), describe(kernel_breakdown(fp16_step, xs[0]))]
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
        del q4_step, fp16_step, xs
        torch.cuda.empty_cache()
    bench.write_lines(args.out, "profile_train.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
