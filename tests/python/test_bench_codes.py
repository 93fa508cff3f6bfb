"""CPU smoke test of bench/bench_codes.py (issue 18 item 5): the --device cpu --smoke run writes its
table (both shapes, times, no errors), and the op it times (codes in, BN + ReLU folded, codes out)
gives the oracle's codes (SPEC section 8, oracle.fused_forward) bit for bit. No timing asserts."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

import oracle
import q4conv

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_codes as bc  # noqa: E402

CPU = torch.device("cpu")


def test_smoke_run_writes_rows(tmp_path, capsys):
    assert bc.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "bench_codes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["shape"] for r in rows] == [s.name for s in bc.SMOKE_SHAPES]
    for r in rows:
        assert r["error"] == "", r["error"]
        assert float(r["q4_codes_ms"]) > 0 and float(r["fp16_ms"]) > 0 and float(r["speedup"]) > 0
        assert float(r["floor8_ms"]) >= float(r["floor4_ms"]) > 0
        assert r["path"] == "conv_fused CPU reference"
        assert r["q4_codes_graph_ms"] == ""  # no graphs on the CPU
    md = (tmp_path / "bench_codes.md").read_text()
    assert "conv_fused" in md and "--smoke" in md and "targets" in md
    for s in bc.SMOKE_SHAPES:
        assert f"| {s.name} |" in md
    assert (tmp_path / "bench_codes.png").stat().st_size > 0


@pytest.mark.parametrize("shape", bc.SMOKE_SHAPES, ids=lambda s: s.name)
def test_timed_op_matches_oracle(shape):
    case = bc.build_case(shape, CPU, count=2, seed=3)
    fused, layer = case.fused, case.layer
    image_in = bc.reads_image(shape)  # the stem reads the float image, as in the deployed network
    assert isinstance(fused, q4conv.FusedQ4Conv2d) and fused.codes_in != image_in and fused.codes_out and fused.relu
    x = case.codes[1]
    assert x.dtype == (torch.float32 if image_in else torch.int8) and x.is_contiguous(memory_format=torch.channels_last)
    assert tuple(x.shape) == (shape.n, shape.c, shape.h, shape.h)
    y = case.fn(x)
    assert y.dtype == torch.int8 and tuple(y.shape) == (shape.n, shape.k, shape.p, shape.p)
    conv = oracle.Conv((shape.stride,) * 2, (shape.pad,) * 2, (1, 1), float(layer.eps), 4)
    ref = oracle.fused_forward(x, layer.bias_a, layer.scale_a, layer.weight, layer.scale_w, fused.alpha,
                               fused.shift, conv, None, True, fused.out_bias_a, fused.out_scale_a,
                               float(fused.out_eps))[0]
    assert torch.equal(y, ref)
    # A non-trivial check: the folded BatchNorm moved alpha, and the codes spread over several values.
    raw_alpha = torch.ops.q4conv.output_alpha(layer.scale_a, layer.scale_w, shape.k, float(layer.eps))
    assert not torch.allclose(fused.alpha, raw_alpha.float())
    assert y.unique().numel() >= 3


def test_sweep_sm90_configs_needs_an_sm90_gpu(capsys):
    """The configuration sweep imports its helpers from bench / bench_codes (a rename there breaks
    it) and, without an sm_90 GPU, says so and returns 1 instead of timing the fallback."""
    import sweep_sm90_configs as sweep

    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        pytest.skip("an sm_90 GPU runs the sweep itself")
    assert sweep.main(["--shapes", "quick", "--rounds", "1"]) == 1
    assert "needs an sm_90 GPU" in capsys.readouterr().out
