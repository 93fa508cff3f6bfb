"""The RGB stem (64x3x224x224 -> 64 channels, 7x7, stride 2, padding 3) by input
dtype and memory format: q4conv with packed filter taps (the default) and with
the im2col GEMM (Q4CONV_PACKED_TAPS=0), and cuDNN, all in CUDA graphs, the
q4conv paths in interleaved rounds. Run on the GPU machine:
    python bench/stem_layouts.py
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (timing helpers)


def main(rounds: int = 3, repeats: int = 20) -> int:
    import q4conv

    torch.backends.cudnn.benchmark = True
    layer = q4conv.Q4Conv2dCutlass(3, 64, 7, 2, 3, device="cuda")
    q4conv.prepare_q4conv_layers(layer)
    for dtype in (torch.float32, torch.float16):
        for fmt, fmt_name in ((torch.contiguous_format, "NCHW"), (torch.channels_last, "NHWC")):
            xs = [torch.randn(64, 3, 224, 224, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
                  for _ in range(2)]
            with torch.no_grad():
                layer.set_activation(xs[0])
            layer.eval()
            layer.generate_quantized_weight(qweight_only=True)
            w = torch.randn(64, 3, 7, 7, device="cuda", dtype=dtype).contiguous(memory_format=fmt)

            def q4(x: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode():
                    return layer(x)

            def cudnn(x: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode():
                    return F.conv2d(x, w, None, 2, 3)

            times: Dict[str, List[float]] = {"1": [], "0": []}
            for _ in range(rounds):
                for switch in times:
                    with bench.env_switch("Q4CONV_PACKED_TAPS", switch):
                        times[switch].append(bench.time_graph_ms(q4, xs, repeats) * 1e3)
            cudnn_us = bench.time_graph_ms(cudnn, xs, repeats) * 1e3
            print(f"{str(dtype):14s} {fmt_name}: packed {statistics.median(times['1']):.1f} us, "
                  f"im2col {statistics.median(times['0']):.1f} us, cuDNN {cudnn_us:.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
