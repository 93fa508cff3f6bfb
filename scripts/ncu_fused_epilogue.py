#!/usr/bin/env python
"""One call each of conv_fused with an fp16 output and with codes out (codes in for both), inside a
profiler range, for Nsight Compute: the comparison behind docs/notes/codes-between-layers.md
(session 18). Shapes are bench/bench_fused_epilogue.py's, by index.

    ncu --profile-from-start off --kernel-name regex:device_kernel --set full -o /tmp/epi \\
        python scripts/ncu_fused_epilogue.py 0 gemm128x128x128/pp
    ncu -i /tmp/epi.ncu-rep --page details --csv > epi.csv

Arguments: comma-separated shape indices; optionally an sm90 configuration to force on both
(q4conv.plan.sm90_configs()), so that the two output types run the same tile.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_fused_epilogue as epilogue  # noqa: E402

import q4conv  # noqa: E402


def main(argv: list) -> None:
    if not argv:
        raise SystemExit(__doc__)
    shapes = [epilogue.SHAPES[int(i)] for i in argv[0].split(",")]
    forced = dict(sm90_config=argv[1]) if len(argv) > 1 else {}
    with q4conv.tuning(fused_pointwise="never", wgmma_pointwise="never", **forced), torch.inference_mode():
        calls = []
        for name, n, c, k, h, r, stride, pad in shapes:
            t = epilogue.layer_args(n, c, k, h, r, stride, pad)
            for variant in ("codes_fp16", "codes_codes"):
                fn = epilogue.variant_fn(t, variant, stride, pad)
                for _ in range(3):  # plans, caches and CUTLASS params before the profiled call
                    fn(t["codes"][0])
                calls.append((f"{name}/{variant}", fn, t["codes"][0]))
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        for label, fn, x in calls:
            torch.cuda.nvtx.range_push(label)
            fn(x)
            torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print("profiled, in order:", ", ".join(label for label, _, _ in calls))


if __name__ == "__main__":
    main(sys.argv[1:])
