#!/usr/bin/env python
"""Where a fused (conv_fused) sm90 layer's time goes: the same convolution with each epilogue.

Per shape, in CUDA graphs (bench.time_graph_ms, rotating inputs), on one card:
  packed_fp16   conv_packed, fp16 x (quantization pass + GEMM, fp16 out, one-FMA epilogue;
                the fused 1x1 kernels switched off so every shape takes pass + GEMM);
  codes_fp16    conv_fused, int8 codes in (no pass), fp16 out (kFusedFloat16: the exact epilogue);
  codes_fp16_r  the same with an fp16 residual read in the epilogue;
  codes_codes   conv_fused, codes in, the consumer's int8 codes out (kFusedCodes8);
  codes_codes_r the same with an fp16 residual.
codes_fp16 vs packed_fp16 = the pass saved minus the exact epilogue's cost; codes_codes vs
codes_fp16 = what an int8 output costs against an fp16 one (half the bytes written).

    python bench/bench_fused_epilogue.py            # GPU (sm_90)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

import q4conv  # noqa: E402

ops = torch.ops.q4conv
# (name, n, c, k, h, r, stride, pad)
SHAPES = [
    ("1x1 C64 K256 56", 64, 64, 256, 56, 1, 1, 0),
    ("1x1 C64 K64 56", 64, 64, 64, 56, 1, 1, 0),
    ("3x3 C64 K64 56", 64, 64, 64, 56, 3, 1, 1),
    ("1x1 C1024 K256 14", 64, 1024, 256, 14, 1, 1, 0),
    ("3x3 C256 K256 14", 64, 256, 256, 14, 3, 1, 1),
]
VARIANTS = ["packed_fp16", "codes_fp16", "codes_fp16_r", "codes_codes", "codes_codes_r"]


def layer_args(n: int, c: int, k: int, h: int, r: int, stride: int, pad: int):
    dev = "cuda"
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(k, c, r, r, generator=gen) * 0.05
    scale_w = torch.rand(k, generator=gen) * 0.02 + 0.02
    t = dict(bias_a=torch.randn(c, generator=gen) * 0.1, scale_a=torch.tensor(0.3),
             qweight=ops.quantize_pack(weight, scale_w, 1e-5, 4), scale_w=scale_w,
             alpha=(0.3 * scale_w).float(), shift=torch.randn(k, generator=gen),
             out_bias_a=torch.randn(k, generator=gen) * 0.1, out_scale_a=torch.tensor(0.25))
    t = {name: v.to(dev) for name, v in t.items()}
    t["kernel_weight"] = ops.kernel_weight(t["qweight"], c, "sm90_int8")
    p = (h + 2 * pad - r) // stride + 1
    nbuf = bench.n_buffers(n * c * h * h * 2)
    t["x16"] = [torch.randn(n, c, h, h, device=dev).half().contiguous(memory_format=torch.channels_last)
                for _ in range(nbuf)]
    t["codes"] = [torch.randint(-8, 8, (n, c, h, h), device=dev, dtype=torch.int8)
                  .contiguous(memory_format=torch.channels_last) for _ in range(nbuf)]
    t["residual"] = torch.randn(n, k, p, p, device=dev).half().contiguous(memory_format=torch.channels_last)
    return t


def variant_fn(t, v: str, stride: int, pad: int):
    geo = ([stride] * 2, [pad] * 2, [1, 1])
    if v == "packed_fp16":
        return lambda x: ops.conv_packed(x, t["bias_a"], t["scale_a"], t["qweight"], t["scale_w"], t["shift"],
                                         *geo, 1e-5, 4, True, "sm90_int8", t["kernel_weight"], t["alpha"])
    residual = t["residual"] if v.endswith("_r") else None
    codes_out = v.startswith("codes_codes")
    return lambda x: ops.conv_fused(x, t["bias_a"], t["scale_a"], t["qweight"], t["alpha"], t["shift"], *geo,
                                    1e-5, 4, residual, True, t["out_bias_a"] if codes_out else None,
                                    t["out_scale_a"] if codes_out else None, 1e-5,
                                    None if codes_out else torch.float16, "sm90_int8", t["kernel_weight"])


def main() -> None:
    print(f"# fused epilogue variants on {torch.cuda.get_device_name()} (CUDA graphs, ms per call)")
    print("| shape | " + " | ".join(VARIANTS) + " |")
    print("|---" * (len(VARIANTS) + 1) + "|")
    with q4conv.tuning(fused_pointwise="never", wgmma_pointwise="never"), torch.inference_mode():
        for name, n, c, k, h, r, stride, pad in SHAPES:
            t = layer_args(n, c, k, h, r, stride, pad)
            cells = []
            for v in VARIANTS:
                inputs = t["x16"] if v == "packed_fp16" else t["codes"]
                try:
                    cells.append(f"{bench.time_graph_ms(variant_fn(t, v, stride, pad), inputs, 20):.4f}")
                except Exception as exc:  # report and go on
                    cells.append(f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
