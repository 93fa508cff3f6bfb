#!/usr/bin/env python
"""Eager forward vs CUDA-graph replay: how much of an eager call is host time.

For each shape: the eval-mode q4conv layer (fp16 channels_last, packed
weights) and cuDNN fp16 timed eagerly as bench.py times them (CUDA events
around each call, rotating input buffers) and with one input buffer, the
q4conv call in CUDA graphs, and the host microseconds per call
(profile_host.host_us: GPU kept busy, so launches never wait), then the
operators with the most self CPU time (torch.profiler). Where the eager time
is near the host time and far above the graph time, the call is host bound.
Example:
    python bench/profile_eager.py --only "C1024 K256,3x3"
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (shapes, timing helpers)
from profile_host import host_us, op_profile  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated substrings of shape names; default all")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    wanted = bench.name_filter(args.only)

    lines: List[str] = [f"card: {torch.cuda.get_device_name()}", "",
                        "| shape | buffers | q4 eager us | q4 eager, one buffer us | cudnn eager us | q4 graph us "
                        "| q4 host us/call | cudnn host us/call |", "|" + "---|" * 8]
    print("\n".join(lines), flush=True)
    details: List[str] = []
    for shape in bench.make_shapes("resnet50", args.batch):
        if not shape.main or not wanted(shape):
            continue
        q4, cudnn, xs = bench.eval_pair(shape)
        rotation = itertools.cycle(xs)
        cells = [len(xs),
                 bench.time_ms(q4, xs, 5, args.repeats) * 1e3,
                 bench.time_ms(q4, xs[:1], 5, args.repeats) * 1e3,
                 bench.time_ms(cudnn, xs, 5, args.repeats) * 1e3,
                 bench.time_graph_ms(q4, xs, args.repeats) * 1e3,
                 host_us(lambda: q4(next(rotation))),
                 host_us(lambda: cudnn(xs[0]))]
        line = f"| {shape.name} | " + " | ".join(f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells) + " |"
        lines.append(line)
        print(line, flush=True)
        profile = op_profile(lambda: q4(next(rotation)))
        details += ["", f"## {shape.name}: q4conv eval call, {profile['aten']:.0f} ATen ops, "
                        f"{profile['launches']:.0f} launches", profile["top"]]
        del q4, cudnn, xs
        torch.cuda.empty_cache()
    lines += details
    print("\n".join(details), flush=True)
    bench.write_lines(args.out, "profile_eager.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
