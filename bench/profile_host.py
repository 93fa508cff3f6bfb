#!/usr/bin/env python
"""Host (CPU) cost of one q4conv call: eval forward and QAT training step.

For each shape, with the GPU kept busy ahead of the host (torch.cuda._sleep) so
that launches never wait for the device, it reports the median host
microseconds of one call of: the eval-mode layer (fp16 channels_last, packed
weights), cuDNN fp16 F.conv2d, the q4conv training step (forward + all
gradients, as bench.py times it) and the fp16 conv training step; then the
number of ATen operators and kernel launches per call and the operators with
the most self CPU time (torch.profiler). Example:
    python bench/profile_host.py --out prof_out
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

SHAPES = [  # N, C, K, H, R, stride, pad
    (1, 64, 64, 56, 3, 1, 1),
    (1, 256, 64, 56, 1, 1, 0),
    (64, 256, 64, 56, 1, 1, 0),
]


def host_us(fn: Callable[[], object], calls: int = 20, rounds: int = 7) -> float:
    """Median over rounds of the host microseconds per call of `calls`
    back-to-back fn() calls, while the GPU is kept busy for longer (so no
    call waits for the device)."""
    per_call: List[float] = []
    for _ in range(rounds):
        torch.cuda._sleep(200_000_000)  # ~100 ms of GPU spinning ahead of the host
        start = time.perf_counter()
        for _ in range(calls):
            out = fn()
            del out
        per_call.append((time.perf_counter() - start) * 1e6 / calls)
        torch.cuda.synchronize()
    return statistics.median(per_call)


def op_profile(fn: Callable[[], object], calls: int = 10) -> Dict[str, object]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    aten = sum(a.count for a in averages if a.key.startswith("aten::")) / calls
    launches = sum(a.count for a in averages if a.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                           "cudaLaunchKernelExC", "cuLaunchKernelEx")) / calls
    top = sorted(averages, key=lambda a: a.self_cpu_time_total, reverse=True)[:18]
    spans = [a for a in averages if a.key.startswith("q4conv::") and a not in top]
    lines = [f"    {a.key[:60]:60s} count/call {a.count / calls:6.1f}  self CPU us/call "
             f"{a.self_cpu_time_total / calls:8.1f}" for a in top + spans]
    return {"aten": aten, "launches": launches, "top": "\n".join(lines)}


def python_layer_only(layer: torch.nn.Module) -> Callable[[torch.Tensor], object]:
    """The eval layer call with conv_packed replaced by a stub returning x: the
    host cost of the Python layer (module call, checks, weight cache) alone.
    Swapping the ops namespace in and out costs two attribute stores."""
    from q4conv import _ops

    real = _ops.ops

    class Stub:
        class conv_packed:  # noqa: N801 (stands in for torch.ops.q4conv.conv_packed)
            default = staticmethod(lambda *args: args[0])

        output_alpha, selected_backend, kernel_weight = real.output_alpha, real.selected_backend, real.kernel_weight
        quantize_pack = real.quantize_pack

    def call(x: torch.Tensor) -> object:
        _ops.ops = Stub
        try:
            with torch.inference_mode():
                return layer(x)
        finally:
            _ops.ops = real

    return call


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import q4conv

    report: List[str] = [f"# Host cost per call on {torch.cuda.get_device_name()}", ""]
    for n, c, k, h, r, stride, pad in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(n, c, h, h, device="cuda", dtype=torch.float16).contiguous(
            memory_format=torch.channels_last)
        layer = q4conv.Q4Conv2dCutlass(c, k, r, stride, pad, device="cuda")
        q4conv.prepare_q4conv_layers(layer)
        with torch.no_grad():
            layer.set_activation(x)
        train_layer = layer
        import copy
        inf_layer = copy.deepcopy(layer).eval()
        inf_layer.generate_quantized_weight(qweight_only=True)
        w16 = (torch.randn(k, c, r, r, device="cuda", dtype=torch.float16) * 0.05).contiguous(
            memory_format=torch.channels_last).requires_grad_(True)
        xg = x.clone().requires_grad_(True)
        params = [p for p in train_layer.parameters() if p.requires_grad]
        gy = torch.randn_like(train_layer(xg).detach())
        gy16 = torch.randn_like(F.conv2d(x, w16, None, stride, pad).detach())

        def eval_q4():
            with torch.inference_mode():
                return inf_layer(x)

        def eval_cudnn():
            with torch.inference_mode():
                return F.conv2d(x, w16, None, stride, pad)

        def train_q4():
            return torch.autograd.grad(train_layer(xg), [xg, *params], gy)

        def train_fp16():
            return torch.autograd.grad(F.conv2d(xg, w16, None, stride, pad), [xg, w16], gy16)

        report.append(f"## N{n} C{c} K{k} {h}x{h} {r}x{r} s{stride} p{pad}")
        for name, fn in (("q4 eval", eval_q4), ("cudnn fp16 eval", eval_cudnn),
                         ("q4 train step", train_q4), ("fp16 train step", train_fp16)):
            us = host_us(fn)
            prof = op_profile(fn)
            report.append(f"- {name}: host {us:.1f} us/call, {prof['aten']:.0f} aten ops, "
                          f"{prof['launches']:.0f} kernel launches")
            if name.startswith("q4"):
                report.append(prof["top"])
        # Pieces of the training step, each timed alone (host us per call).
        ops = torch.ops.q4conv
        conv = ([stride] * 2, [pad] * 2, [1, 1], 1e-5, 4)
        leaves = (xg.detach(), train_layer.bias_a.detach(), train_layer.scale_a.detach(),
                  train_layer.weight.detach(), train_layer.scale_w.detach())
        w_codes = torch.randint(-8, 8, (k, c, r, r), device="cuda").to(torch.float16).contiguous(
            memory_format=torch.channels_last)
        stubbed_layer = python_layer_only(inf_layer)
        pieces = {
            "conv_train op (forward, no graph)": lambda: ops.conv_train.default(*leaves, None, *conv, "auto"),
            "conv_train_backward op": lambda: ops.conv_train_backward.default(gy, *leaves, False, *conv),
            "aten convolution_backward fp16 (dgrad+wgrad)": lambda: torch.ops.aten.convolution_backward.default(
                gy, x, w_codes, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, [True, True, False]),
            "F.conv2d fp16 (no graph)": lambda: F.conv2d(x, w16.detach(), None, stride, pad),
            "q4conv quantize_activation op (one launch)": lambda: ops.quantize_activation.default(
                x, leaves[1], leaves[2], 1e-5, 4),
            "eval layer call (inference_mode)": eval_q4,
            "conv_packed op, cached weights (eval's op alone)": lambda: ops.conv_packed.default(
                x, inf_layer.bias_a, inf_layer.scale_a, inf_layer.qweight, inf_layer.scale_w, None, *conv[:3],
                1e-5, 4, False, "auto", *reversed(inf_layer._cached_kernel_inputs(x, inf_layer.qweight, 1e-5))),
            "conv_packed op, N=0 (dispatch, argument parsing, checks only)": lambda: ops.conv_packed.default(
                x[:0], inf_layer.bias_a, inf_layer.scale_a, inf_layer.qweight, inf_layer.scale_w, None,
                *conv[:3], 1e-5, 4, False, "auto", *reversed(inf_layer._cached_kernel_inputs(x, inf_layer.qweight, 1e-5))),
            "eval layer call, op stubbed (the Python layer alone)": lambda: stubbed_layer(x),
            "aten.convolution fp16 (no F.conv2d wrapper)": lambda: torch.ops.aten.convolution.default(
                x, w16.detach(), None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1),
        }
        for name, fn in pieces.items():
            with torch.no_grad():
                report.append(f"  - piece {name}: host {host_us(fn):.1f} us/call")
        report.append("")
        print("\n".join(report[-20:]), flush=True)
    text = "\n".join(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_host.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
