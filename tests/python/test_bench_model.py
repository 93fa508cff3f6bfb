"""CPU smoke test of bench/bench_model.py (issues 18 / 19): every training configuration's step
and every inference model run once at tiny size (ResNet-18, width 8, 10 classes, batch 2, 32x32;
autocast configurations in bf16 on CPU), and the report path of both modes. No timing asserts."""

from __future__ import annotations

import copy
import math
import sys
import types
from pathlib import Path
from typing import Dict

import pytest
import torch
from torch import nn

import q4conv

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench  # noqa: E402
from conftest import DEVICES  # noqa: E402
import bench_model as bm  # noqa: E402

CPU = torch.device("cpu")


def snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("config", bm.TRAIN_CONFIGS, ids=lambda c: c.key)
def test_train_step_runs_and_updates(config):
    setup = bm.build_train(config, bm.SMOKE, 2, CPU)
    kind = {"q4": q4conv.Q4Conv2dCutlass, "fq": bm.FakeQuantConv2d, "float": nn.Conv2d}[config.model]
    convs = [name for name, m in setup.model.named_modules() if isinstance(m, (nn.Conv2d, q4conv.Q4Conv2dCutlass,
                                                                              bm.FakeQuantConv2d))]
    assert convs and all(isinstance(setup.model.get_submodule(n), kind) for n in convs)
    if config.model != "float":  # scales initialised before the first step
        assert all(float(setup.model.get_submodule(n).scale_a.detach()) > 0 for n in convs)
    assert (setup.scaler is not None) == config.scaler
    before = snapshot(setup.model)
    loss = setup.step()
    assert loss.dim() == 0 and math.isfinite(float(loss))
    after = dict(setup.model.named_parameters())
    changed = {name for name, old in before.items() if not torch.equal(old, after[name].detach())}
    for name in convs:  # every convolution's weight moved (and its weight scale, where it has one)
        assert f"{name}.weight" in changed, name
        if config.model != "float":
            assert f"{name}.scale_w" in changed, name
    assert "fc.weight" in changed
    # The autocast configurations compute the float / fake-quant convolutions in bf16 on CPU.
    if config.model != "q4":
        assert setup.act_dtype == ("bfloat16" if config.amp else "float32")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_sgd_leaves_overflow_steps_to_the_scaler(device):
    """An overflow step (inf gradients) under GradScaler with --optimizer fused must leave the
    weights and the momentum untouched, as the scaler's skip does for the foreach SGD (torch 2.11's
    CUDA fused SGD, handed the inf check, advances the momentum on that step)."""
    setup = bm.build_train(bm.CONFIGS_BY_KEY["fp16_amp"], bm.SMOKE, 2, torch.device(device), optimizer="fused")
    assert setup.optimizer.defaults.get("fused") and not setup.optimizer._step_supports_amp_scaling
    # Momentum buffers exist from the first step the scaler does not skip (on CUDA the first
    # steps overflow at GradScaler's initial scale and are skipped).
    for _ in range(40):
        setup.step()
        if any("momentum_buffer" in state for state in setup.optimizer.state.values()):
            break
    weights = snapshot(setup.model)
    momentum = {id(p): setup.optimizer.state[p]["momentum_buffer"].clone() for p in setup.model.parameters()
                if "momentum_buffer" in setup.optimizer.state[p]}
    assert momentum
    for p in setup.model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    setup.scaler.step(setup.optimizer)
    setup.scaler.update()
    assert all(torch.equal(w, p.detach()) for w, p in zip(weights.values(), setup.model.parameters()))
    for p in setup.model.parameters():
        if id(p) in momentum:
            assert torch.equal(setup.optimizer.state[p]["momentum_buffer"], momentum[id(p)])


def test_fake_quant_conv_matches_bench_formulation():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=False)
    fq = bm.FakeQuantConv2d(conv)
    x = torch.randn(2, 6, 9, 9)
    y = fq(x)  # initialises scale_a from this batch
    assert float(fq.scale_a.detach()) == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-6)
    assert float(fq.scale_w.detach()) == pytest.approx(2 * conv.weight.abs().mean().item() / math.sqrt(7), rel=1e-6)
    ref = bench.fake_quant_conv(x, fq.bias_a, fq.scale_a, fq.weight, fq.scale_w, (2, 2), (1, 1))
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    y.square().sum().backward()
    for p in (fq.weight, fq.bias_a, fq.scale_a, fq.scale_w):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_convert_fake_quant_replaces_every_conv():
    model = bm.SMOKE.build()
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    converted = bm.convert_fake_quant(model)
    assert sum(isinstance(m, bm.FakeQuantConv2d) for m in converted.modules()) == n_convs
    assert not any(type(m) is nn.Conv2d for m in converted.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == n_convs  # original untouched


@pytest.mark.parametrize("with_deploy", [False, True])
def test_infer_models_run(monkeypatch, with_deploy):
    if with_deploy and not hasattr(q4conv, "deploy"):
        # Stand-in until q4conv.deploy lands: exercises the deployed model's path.
        monkeypatch.setattr(q4conv, "deploy", lambda model, **options: copy.deepcopy(model), raising=False)
    if not with_deploy and hasattr(q4conv, "deploy"):
        monkeypatch.delattr(q4conv, "deploy")
    models = bm.build_infer_models(bm.SMOKE, CPU)
    assert set(models) == {"fp16", "q4", "deploy", "deploy_codes"}
    if not with_deploy:
        for name in ("deploy", "deploy_codes"):
            assert models[name][0] is None and "no q4conv.deploy" in models[name][1]
    else:  # the codes variant writes int8 codes between layers
        assert any(getattr(m, "codes_out", False) for m in models["deploy_codes"][0].modules())
    x = torch.randn(2, 3, 32, 32).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    for name, (model, note) in models.items():
        if model is None:
            continue
        assert note == ""
        assert not model.training
        y = bm.inference_fn(model)(x)
        assert y.shape == (2, 10) and torch.isfinite(y.float()).all(), name
    q4_layers = [m for m in models["q4"][0].modules() if isinstance(m, q4conv.Q4Conv2dCutlass)]
    assert q4_layers and all(m.weight.dtype == torch.float32 and float(m.scale_a.detach()) > 0 for m in q4_layers)


def test_main_writes_reports(tmp_path):
    quick = ["--device", "cpu", "--smoke", "--warmup", "0", "--steps", "1", "--out", str(tmp_path)]
    assert bm.main(["--mode", "train", "--configs", "q4_fp32,fp16_amp", *quick]) == 0
    assert bm.main(["--mode", "infer", "--models", "q4,deploy", *quick]) == 0
    for mode in ("train", "infer"):
        md = (tmp_path / f"bench_model_{mode}.md").read_text()
        assert "Command: `" in md and "| batch |" in md
        csv_lines = (tmp_path / f"bench_model_{mode}.csv").read_text().splitlines()
        assert len(csv_lines) == 3  # header + two rows
        assert (tmp_path / f"bench_model_{mode}.png").stat().st_size > 0
    assert "q4_fp32 step / fp16_amp step" in (tmp_path / "bench_model_train.md").read_text()


def test_arguments():
    args = bm.parse_args(["--mode", "infer"])
    assert args.batches == [1, 64, 256] and args.rounds == 3 and args.models == list(bm.INFER_MODELS)
    args = bm.parse_args(["--mode", "train", "--batches", "64,128,256"])
    assert args.batches == [64, 128, 256] and args.rounds == 1 and args.configs == [c.key for c in bm.TRAIN_CONFIGS]
    with pytest.raises(SystemExit):
        bm.parse_args(["--mode", "train", "--configs", "q4_fp64"])
    with pytest.raises(SystemExit):
        bm.parse_args(["--mode", "train", "--batches", "0"])


def test_train_summary_ratios_from_rows():
    """The summary's step, memory and GPU-time ratios are the rows' quotients (same batch, mode)."""
    def row(config: str, step: float, peak: float, gpu: float) -> Dict[str, object]:
        return {"batch": 64, "mode": "eager", "config": config, "error": "", "step_ms": step,
                "peak_MB": peak, "gpu_ms": gpu}

    rows = [row("q4_amp16", 30.0, 2900.0, 19.0), row("fp16_amp", 25.0, 3000.0, 15.2),
            row("fq_amp16", 96.0, 12000.0, 60.0)]
    text = "\n".join(bm.train_summary(rows))
    assert "q4_amp16 step / fp16_amp step 1.200 (target <= 1.3)" in text
    assert "fq_amp16 step / q4_amp16 step 3.200 (target >= 3)" in text
    assert "q4_amp16 peak memory / fp16_amp peak memory 0.967 (target <= 1)" in text
    assert "q4_amp16 GPU ms / fp16_amp GPU ms 1.250" in text
    assert "q4_fp32" not in text  # no row, no ratio


def test_warm_up_runs_until_the_optimizer_has_stepped():
    """Under a GradScaler the warm-up goes on past --warmup until a step was not skipped (the
    skipped ones would be timed as cheaper steps); without one it runs exactly --warmup steps."""
    class Setup:
        def __init__(self, scaler, skipped):
            self.scaler, self.skipped, self.calls = scaler, skipped, 0
            self.optimizer = types.SimpleNamespace(state={})

        def step(self):
            self.calls += 1
            if self.calls > self.skipped:
                self.optimizer.state["w"] = {"momentum_buffer": 0}

    scaled = Setup(scaler=object(), skipped=7)
    bm.warm_up(scaled, 5)
    assert scaled.calls == 8
    unscaled = Setup(scaler=None, skipped=7)
    bm.warm_up(unscaled, 5)
    assert unscaled.calls == 5
    never = Setup(scaler=object(), skipped=10**6)
    bm.warm_up(never, 2, max_skipped=4)
    assert never.calls == 6
