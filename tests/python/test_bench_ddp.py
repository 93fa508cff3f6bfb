"""CPU smoke test of bench/bench_ddp.py (issue 20 item 2): the multi-GPU DDP benchmark's smoke mode
(gloo, tiny ResNet-18, batch 2) at world sizes 1 and 2 through the script's own launcher, its
equality check, its report arithmetic, and that the equality check would catch a scale_a gradient
off by sqrt(world). No timing asserts."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import q4conv

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import bench_ddp as bd  # noqa: E402

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
LAUNCHER = "torchrun" if importlib.util.find_spec("torch.distributed.run") is not None else "spawn"
CONFIG_KEYS = [c.key for c in bd.CONFIGS]


def _run(tmp_path: Path, *extra: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    python_dir = str(Path(q4conv.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([python_dir] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, str(BENCH / "bench_ddp.py"), "--device", "cpu", "--backend", "gloo", "--smoke",
           "--out", str(tmp_path), "--timeout-s", "180", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@needs_gloo
def test_smoke_run_world_sizes_1_and_2(tmp_path):
    proc = _run(tmp_path, "--world-sizes", "1,2", "--launcher", LAUNCHER)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "bench_ddp.json").read_text())

    # Equality: DDP == one process on the joined batch (scale_a gradients x sqrt(world)) at both sizes.
    eq = {r["world"]: r for r in report["equality"]}
    assert sorted(eq) == [1, 2]
    for world, row in eq.items():
        assert row["result"] == "pass", row
        assert row["ranks_identical"] == "yes"
        assert float(row["tol_ratio"]) <= 1.0
    results = {r["world"]: r for r in report["results"]}
    assert results[1]["equality"]["max_abs"] == 0.0  # world 1: the same computation, bit for bit
    assert results[2]["equality"]["per_step"] and len(results[2]["equality"]["per_step"]) == 3
    assert all(r["complete"] for r in results.values())
    assert results[2]["cards"] == ["CPU", "CPU"]

    # Throughput: one row per (world size, configuration), no errors, efficiency 1 at world 1.
    rows = {(r["world"], r["config"]): r for r in report["throughput"]}
    assert sorted(rows) == sorted((w, k) for w in (1, 2) for k in CONFIG_KEYS)
    for (world, key), row in rows.items():
        assert row["error"] == "", row
        assert row["images_s"] > 0 and math.isfinite(row["loss"])
        assert row["step_ms_max"] >= row["step_ms_rank0"] > 0
        assert len(row["step_ms_ranks"]) == world
        assert row["images_s"] == pytest.approx(world * 2 / (row["step_ms_max"] / 1e3))
        assert isinstance(row["efficiency"], float)
        if world == 1:
            assert row["efficiency"] == pytest.approx(1.0)
        if key != bd.BASELINE:
            assert isinstance(row["vs_fp16_amp"], float) and isinstance(row["eff_vs_fp16"], float)

    # The written table, CSVs and per-launch files.
    md = (tmp_path / "bench_ddp.md").read_text()
    assert "| GPUs | configuration |" in md and "| GPUs | steps |" in md
    for world in (1, 2):
        for config in bd.CONFIGS:
            assert f"| {world} | {config.label} | 2 |" in md
        assert (tmp_path / f"bench_ddp_ws{world}.json").exists() and (tmp_path / f"ws{world}.log").exists()
    assert "Command: `" in md and "--world-sizes 1,2" in md
    assert "equality: 2 of 2 world sizes pass" in md
    with open(tmp_path / "bench_ddp.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * len(CONFIG_KEYS)
    with open(tmp_path / "bench_ddp_equality.csv") as f:
        assert [r["result"] for r in csv.DictReader(f)] == ["pass", "pass"]
    assert "| 2 | float AMP fp16 (baseline) | 2 |" in proc.stdout  # the table is printed


@needs_gloo
def test_spawn_launcher(tmp_path):
    """The torch.multiprocessing.spawn launcher (for where torchrun is absent), world size 2."""
    proc = _run(tmp_path, "--world-sizes", "2", "--launcher", "spawn", "--configs", "q4_amp16")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "bench_ddp.json").read_text())
    assert [r["result"] for r in report["equality"]] == ["pass"]
    assert [(r["world"], r["config"], r["error"]) for r in report["throughput"]] == [(2, "q4_amp16", "")]
    assert report["results"][0]["launcher"] == "spawn"


def test_equality_check_sees_a_missing_sqrt_world_factor():
    """The reference with scale_a gradients x sqrt(2) and one without differ beyond the tolerance:
    the scales move enough in 3 steps that DDP would fail the check if its factor were wrong."""
    args = bd.parse_args(["--device", "cpu", "--smoke"])
    cpu = torch.device("cpu")
    right = bd.reference_states(args, 2, cpu)
    wrong = bd.reference_states(args, 2, cpu, scale_a_factor=1.0)
    assert bd.compare_states(right[-1], right[-1], bd.EQ_RTOL, bd.EQ_ATOL)["tol_ratio"] == 0.0
    cmp = bd.compare_states(wrong[-1], right[-1], bd.EQ_RTOL, bd.EQ_ATOL)
    assert cmp["tol_ratio"] > 10, cmp
    # Every scale_a stays positive at the equality run's learning rates.
    assert all(float(v) > 0 for name, v in right[-1].items() if name.endswith("scale_a"))


def _fake_result(world, images_s_by_config, equality_passed=True):
    rows = []
    for key, images_s in images_s_by_config.items():
        step = world * 64 / images_s * 1e3
        rows.append({"world": world, "config": key, "label": bd.CONFIGS_BY_KEY[key].label, "batch_per_gpu": 64,
                     "step_ms_rank0": step, "step_ms_max": step, "wall_ms": step, "images_s": images_s,
                     "peak_MB": 1.0, "loss": 1.0, "error": ""})
    eq = {"passed": equality_passed, "ranks_identical": True, "max_abs": 0.0, "max_rel": 0.0, "tol_ratio": 0.0,
          "worst": "", "steps": 3, "batch_per_rank": 4}
    return {"world": world, "complete": True, "throughput": rows, "equality": eq, "cards": ["X"] * world,
            "versions": {}, "device": "cuda", "backend": "nccl", "model": "resnet50", "batch_per_gpu": 64}


def test_report_arithmetic(tmp_path):
    results = [_fake_result(1, {"q4_amp16": 1000.0, "fp16_amp": 1200.0}),
               _fake_result(8, {"q4_amp16": 7000.0, "fp16_amp": 9100.0}, equality_passed=False)]
    md = bd.write_report(tmp_path, results, "python bench/bench_ddp.py")
    rows = {(r["world"], r["config"]): r for r in bd.throughput_rows(results)}
    assert rows[(8, "q4_amp16")]["efficiency"] == pytest.approx(7000 / 8000)
    assert rows[(8, "fp16_amp")]["efficiency"] == pytest.approx(9100 / 9600)
    assert rows[(8, "q4_amp16")]["eff_vs_fp16"] == pytest.approx(7000 / 8000 - 9100 / 9600)
    assert rows[(8, "q4_amp16")]["vs_fp16_amp"] == pytest.approx(9100 / 7000)
    assert "8 GPUs, q4_amp16: efficiency 0.875 vs fp16 AMP 0.948 (-7.3 points): NOT met" in md
    assert "equality: 1 of 2 world sizes pass (failing: 8 (FAIL))" in md
    assert "on 8x X" in md
