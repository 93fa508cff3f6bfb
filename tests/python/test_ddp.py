"""QAT under DistributedDataParallel on CPU (gloo, 2 processes), issue 20 items 1 and 3.

1. A small ResNet of q4conv layers trained N steps under DDP equals one process
   trained on the joined batch; every rank holds identical parameters after every
   step; a checkpoint saved by rank 0 loads on every rank with identical outputs.
3. What differs between ranks under DDP: unequal first-batch sizes, an empty batch
   on one rank, a q4conv layer skipped in forward (find_unused_parameters=True).
"""

from __future__ import annotations

import datetime
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import q4conv
from conftest import spawn_with_deadline

WORLD = 2
STEPS = 3
PER_RANK = 4
SPAWN_TIMEOUT_S = 120.0


# ----------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    """torchvision's BasicBlock (stride 2, 1x1 projection shortcut) with q4conv convolutions."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = q4conv.Q4Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = q4conv.Q4Conv2d(cout, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(q4conv.Q4Conv2d(cin, cout, 1, stride=stride), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        # The stem's input is the raw image (3 channels): q4conv takes any channel count.
        self.conv1 = q4conv.Q4Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 16, stride=2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _make_model() -> TinyResNet:
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():  # non-trivial BN statistics and affines, so BN is not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.train()
    # BN in eval mode (running statistics): each sample's output does not depend on the
    # rest of its batch, so a rank's half batch computes what the joined batch does.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return q4conv.prepare_q4conv_layers(model)


def _data():
    """The joined batch (WORLD * PER_RANK images) for every step, and its labels."""
    g = torch.Generator().manual_seed(1234)
    xs = [torch.randn(WORLD * PER_RANK, 3, 16, 16, generator=g) for _ in range(STEPS)]
    ys = [torch.randint(0, 5, (WORLD * PER_RANK,), generator=g) for _ in range(STEPS)]
    return xs, ys


def _q4_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, q4conv.Q4Conv2d)]


def _state(model: nn.Module):
    """Every parameter and buffer (scale_a, bias_a, scale_w included) as float64 copies."""
    out = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    out.update({name: b.detach().double().clone() for name, b in model.named_buffers() if b is not None})
    return out


def _optimizer(model: nn.Module) -> torch.optim.SGD:
    """Plain SGD; the scales get a large learning rate because LSQ's gradient scale makes
    their steps tiny (~1e-6 relative at lr 0.05, under the comparison's tolerance): at
    lr 10 they move ~0.1-1% per step, so a wrong scale gradient fails the comparison."""
    scales = [p for n, p in model.named_parameters() if n.endswith(("scale_a", "scale_w"))]
    others = [p for n, p in model.named_parameters() if not n.endswith(("scale_a", "scale_w"))]
    return torch.optim.SGD([{"params": others}, {"params": scales, "lr": 10.0}], lr=0.05)


# ------------------------------------------------------------------------- spawning
def _spawn(fn, *args) -> None:
    spawn_with_deadline(fn, args, WORLD, SPAWN_TIMEOUT_S)


def _init(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))


def _assert_same_on_all_ranks(model: nn.Module, what: str) -> None:
    flat = torch.cat([t.reshape(-1).double() for t in _state(model).values()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    for r in range(1, WORLD):
        assert torch.equal(gathered[0], gathered[r]), f"{what}: rank {r} differs from rank 0"


# ------------------------------------------------------------------ 1. DDP == joined
def _train_worker(rank: int, init_file: str, ckpt: str, results) -> None:
    _init(rank, init_file)
    try:
        xs, ys = _data()
        model = _make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = _optimizer(model)
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        eps_keys = [m._host_floats["eps"][0] for m in _q4_layers(model)]
        for step in range(STEPS):
            opt.zero_grad()
            # The first forward initialises every scale_a from (sum |x|, count) all-reduced
            # over ranks: the joined batch's statistic.
            F.cross_entropy(ddp(xs[step][part]), ys[step][part]).backward()
            opt.step()
            _assert_same_on_all_ranks(model, f"after step {step}")
            if rank == 0:
                results[f"state{step}"] = _state(model)
        # DDP's buffer broadcast must not make the layers re-read eps (a device sync on GPU).
        results[f"eps_rereads{rank}"] = sum(m._host_floats["eps"][0] != k for m, k in zip(_q4_layers(model), eps_keys))
        if rank == 0:
            torch.save(model.state_dict(), ckpt)
        dist.barrier()
        fresh = _make_model()
        fresh.load_state_dict(torch.load(ckpt, map_location="cpu"))
        fresh.eval()
        model.eval()
        probe = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            results[f"out{rank}"] = fresh(probe)
            results[f"trained_out{rank}"] = model(probe)
    finally:
        dist.destroy_process_group()


def _reference_states():
    """One process (no process group) trained on the joined batches."""
    xs, ys = _data()
    model = _make_model()
    opt = _optimizer(model)
    states = []
    for step in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(xs[step]), ys[step]).backward()
        # LSQ's gradient scale for scale_a is g = 1 / sqrt(numel(x) * Qp) with numel(x) the
        # batch a process sees (csrc/backward.cpp): under DDP each rank's numel is 1/WORLD of
        # the joined batch's, so the averaged scale_a gradient is sqrt(WORLD) times the one
        # process's. The reference applies that factor (the documented DDP convention, as
        # per-GPU BatchNorm statistics); everything else is the plain joined-batch gradient.
        for layer in _q4_layers(model):
            layer.scale_a.grad.mul_(math.sqrt(WORLD))
        opt.step()
        states.append(_state(model))
    return states


def test_ddp_training_equals_one_process_on_the_joined_batch():
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        _spawn(_train_worker, os.path.join(tmp, "store"), os.path.join(tmp, "ckpt.pt"), results)
        got = dict(results)
    reference = _reference_states()
    for step in range(STEPS):
        ddp_state, ref_state = got[f"state{step}"], reference[step]
        assert ddp_state.keys() == ref_state.keys()
        for name in ref_state:
            # Not bit-exact: the gradient all-reduce averages per-rank sums (and the
            # scale_a statistic sums per-rank partial sums) in a different order than
            # one process's reduction over the joined batch; rounding differences only.
            torch.testing.assert_close(ddp_state[name], ref_state[name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name, s=step: f"{n} after step {s}: {m}")
    for layer_name in ("conv1", "layer1.conv1", "layer1.conv2", "layer1.downsample.0"):
        assert float(got[f"state{STEPS - 1}"][f"{layer_name}.scale_a"]) > 0
    for r in range(WORLD):  # the checkpoint gives identical eval outputs on every rank
        assert got[f"eps_rereads{r}"] == 0, "DDP's buffer broadcast made layers re-read eps"
        assert torch.equal(got[f"out{r}"], got["out0"])
        assert torch.equal(got[f"out{r}"], got[f"trained_out{r}"])


# ------------------------------------------------------- 3. what differs between ranks
def _stat_input(rank: int, sizes) -> torch.Tensor:
    torch.manual_seed(100 + rank)
    return torch.randn(sizes[rank], 6, 5, 5) * (1.0 + 3.0 * rank)


def _stat_worker(rank: int, init_file: str, sizes, results) -> None:
    _init(rank, init_file)
    try:
        torch.manual_seed(0)
        layer = q4conv.Q4Conv2d(6, 4, 3, padding=1)
        out = layer(_stat_input(rank, sizes))
        assert out.shape[0] == sizes[rank]
        results[rank] = (layer.scale_a.item(), bool(layer.scale_a_initialized))
        dist.barrier()  # a rank left behind in a collective would time out here
    finally:
        dist.destroy_process_group()


def _run_stat(sizes):
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        _spawn(_stat_worker, os.path.join(tmp, "store"), sizes, results)
        return [results[r] for r in range(WORLD)]


@pytest.mark.parametrize("sizes", [(1, 5), (0, 3)], ids=["unequal", "empty_on_rank0"])
def test_first_batches_of_different_sizes_give_the_joined_statistic(sizes):
    """scale_a's statistic is (sum |x|, count) all-reduced, so unequal first batches give
    the joined batch's mean |x| (not a mean of per-rank means), and a rank whose first
    batch is empty still joins the all-reduce (no hang) and adopts the other ranks' scale."""
    got = _run_stat(sizes)
    joined = torch.cat([_stat_input(r, sizes) for r in range(WORLD)])
    expected = 2 * joined.abs().mean().item() / math.sqrt(7)
    assert got[0] == got[1]
    assert got[0][1] is True
    assert math.isclose(got[0][0], expected, rel_tol=1e-5)
    if sizes[0] > 0:
        local = [2 * _stat_input(r, sizes).abs().mean().item() / math.sqrt(7) for r in range(WORLD)]
        assert not math.isclose(got[0][0], sum(local) / WORLD, rel_tol=1e-2)  # not a mean of means


class SkipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = q4conv.Q4Conv2d(3, 8, 3, padding=1)
        self.skipped = q4conv.Q4Conv2d(8, 8, 3, padding=1)  # never called in forward
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.used(x)), 1).flatten(1))


def _unused_worker(rank: int, init_file: str, results) -> None:
    _init(rank, init_file)
    try:
        torch.manual_seed(0)
        model = SkipNet()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        torch.manual_seed(50 + rank)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(ddp(torch.randn(2, 3, 8, 8)), torch.randint(0, 5, (2,))).backward()
            opt.step()
        _assert_same_on_all_ranks(model, "after 2 steps with a skipped layer")
        results[rank] = (model.used.scale_a.item(), model.skipped.scale_a.item(),
                         bool(model.skipped.scale_a_initialized))
    finally:
        dist.destroy_process_group()


def test_find_unused_parameters_with_a_skipped_q4conv_layer():
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        _spawn(_unused_worker, os.path.join(tmp, "store"), results)
        got = [results[r] for r in range(WORLD)]
    assert got[0] == got[1]
    used, skipped, skipped_ready = got[0]
    assert used > 0
    assert skipped == 0.0 and skipped_ready is False  # never saw data: still uninitialised
