#!/usr/bin/env python
"""Where the q4conv inference forward spends its GPU time, per ResNet-50 shape.

For each shape: the eval-mode layer (packed weights, fp16 channels_last in and out)
timed in CUDA graphs for each value of an environment switch (--env NAME=v1,v2,
e.g. Q4CONV_FUSED_POINTWISE=0,1), cuDNN fp16 in the same run, and a
torch.profiler breakdown of the GPU kernels of one call (switch unset) with the
quantization pass's DRAM-equivalent bandwidth. Example:
    python bench/profile_fwd.py --env Q4CONV_FUSED_POINTWISE=0,1 --out prof_out
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (shapes, timing helpers)


def kernel_breakdown(fn, x, calls: int = 20) -> Dict[str, float]:
    """Mean GPU microseconds per call of each kernel name launched by fn(x)."""
    from torch.profiler import ProfilerActivity, profile

    fn(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(x)
        torch.cuda.synchronize()
    totals: Dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time / calls
    return dict(totals)


def short(name: str) -> str:
    name = name.replace("void ", "").replace("q4conv::(anonymous namespace)::", "")
    for key, label in (("quantize", "quantize"), ("cutlass", "cutlass"), ("Kernel", "cutlass"),
                       ("elementwise", "elementwise"), ("copy", "copy")):
        if key in name:
            return label + ":" + name.split("(")[0].split("<")[0][-40:]
    return name[:50]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Q4CONV_FUSED_POINTWISE=0,1",
                        help="NAME=v1,v2,...: time q4conv once per value of this environment variable")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds over the switch values (median of the round medians)")
    parser.add_argument("--only", default="",
                        help="comma-separated substrings of shape names (e.g. 'C3 ,3x3 s2'); default all but the stem")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    wanted = bench.name_filter(args.only)

    torch.backends.cudnn.benchmark = True
    env_name, _, env_values = args.env.partition("=")
    chunks = [c.strip() for c in env_values.split(",") if c.strip()]
    lines: List[str] = [f"card: {torch.cuda.get_device_name()}", ""]
    head = (["shape", "cudnn fp16 us", "fp16 clone us"] + [f"q4 {env_name}={c} us" for c in chunks]
            + ["x cudnn (best)", "kernels (us, switch unset)"])
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    print("\n".join(lines), flush=True)
    for shape in bench.make_shapes("resnet50", args.batch):
        if not shape.main or not wanted(shape) or (not args.only.strip(",") and shape.c < 16):
            continue
        q4, cudnn, xs = bench.eval_pair(shape)
        cudnn_us = bench.time_graph_ms(cudnn, xs, args.repeats) * 1e3
        # A plain fp16 copy of the input (4 bytes per element moved; the pass
        # moves 3): what this card's DRAM allows an elementwise pass.
        copy_us = bench.time_graph_ms(lambda x: x.clone(memory_format=torch.preserve_format), xs,
                                      args.repeats) * 1e3
        # Every value once per round, rounds interleaved: a slow spell of the
        # card does not spoil one value's whole measurement.
        rounds: List[List[float]] = [[] for _ in chunks]
        for _ in range(args.rounds):
            for i, chunk in enumerate(chunks):
                with bench.env_switch(env_name, chunk):
                    rounds[i].append(bench.time_graph_ms(q4, xs, args.repeats) * 1e3)
        q4_us = [statistics.median(r) for r in rounds]
        parts = kernel_breakdown(q4, xs[0])
        x_bytes = shape.n * shape.c * shape.h * shape.h * 2
        desc = []
        for name, us in sorted(parts.items(), key=lambda kv: -kv[1]):
            label = short(name)
            if label.startswith("quantize"):
                label += f" ({x_bytes * 1.5 / (us * 1e-6) / 1e12:.2f} TB/s if full input)"
            desc.append(f"{label} {us:.1f}")
        row = [shape.name, f"{cudnn_us:.1f}", f"{copy_us:.1f}"] + [f"{t:.1f}" for t in q4_us] + [f"{cudnn_us / min(q4_us):.2f}", "; ".join(desc)]
        line = "| " + " | ".join(row) + " |"
        lines.append(line)
        print(line, flush=True)
        del q4, cudnn, xs
        torch.cuda.empty_cache()
    bench.write_lines(args.out, "profile_fwd.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
