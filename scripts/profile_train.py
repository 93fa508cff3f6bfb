"""Host profile of the ResNet-50 QAT training step, per configuration of bench/bench_model.py.

For each configuration: build it as bench_model.py does, run 5 warm-up steps, profile 3 steps
with torch.profiler (CPU, and CUDA on a GPU) and write the table of ops by self CPU time to
``$OUT/profile_<config>.txt`` (on a GPU also by self CUDA time: where the GPU time goes); print
the self CPU time, the GPU kernel time and the kernel launches per step.

    python scripts/profile_train.py [cuda|cpu] [q4_amp16,q4_fp32,fp16_amp,q4_bf16] [foreach|fused]

On the CPU it profiles the smoke model (ResNet-18, width 8, 32x32) at batch 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_model as bm  # noqa: E402

LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel")
WARMUP, STEPS = 5, 3


def profile_config(key: str, device: torch.device, out: Path, optimizer: str = "foreach") -> str:
    """Profiles configuration `key`, writes its table, returns the one-line summary."""
    cuda = device.type == "cuda"
    setup = bm.build_train(bm.CONFIGS_BY_KEY[key], bm.RESNET50 if cuda else bm.SMOKE,
                           64 if cuda else 2, device, optimizer=optimizer)
    for _ in range(WARMUP):
        setup.step()
    bm.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(STEPS):
            setup.step()
        bm.synchronize(device)
    averages = prof.key_averages()
    text = f"{key} ({optimizer} SGD): {STEPS} steps after {WARMUP}\n"
    text += averages.table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=60)
    gpu_ms = 0.0
    if cuda:
        text += "\nby self CUDA time:\n" + averages.table(sort_by="self_device_time_total", row_limit=40,
                                                         max_name_column_width=80)
        gpu_ms = sum(a.self_device_time_total for a in averages if bm.is_gpu_work(a)) / STEPS / 1e3
    (out / f"profile_{key}.txt").write_text(text + "\n")
    launches = sum(a.count for a in averages if a.key in LAUNCH_CALLS) / STEPS
    self_cpu_ms = sum(a.self_cpu_time_total for a in averages) / STEPS / 1e3
    del setup
    bm._free(device)
    return (f"{key}: self CPU {self_cpu_ms:.1f} ms/step, GPU kernels {gpu_ms:.2f} ms/step, "
            f"kernel launches {launches:.0f}/step")


def main() -> None:
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    keys = sys.argv[2].split(",") if len(sys.argv) > 2 else ["q4_amp16", "q4_fp32", "fp16_amp", "q4_bf16"]
    optimizer = sys.argv[3] if len(sys.argv) > 3 else "foreach"
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    for key in keys:
        print(profile_config(key, device, out, optimizer), flush=True)


if __name__ == "__main__":
    main()
