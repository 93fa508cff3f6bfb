"""scale_a initialisation under torch.distributed: the statistic is averaged
over ranks so every rank starts from the same scale (SPEC section 2)."""

from __future__ import annotations

import math
import os
import tempfile

import torch
import torch.distributed as dist

from conftest import spawn_with_deadline

WORLD = 2
SPAWN_TIMEOUT_S = 120.0


def _rank_input(rank: int) -> torch.Tensor:
    torch.manual_seed(100 + rank)
    return torch.randn(2, 6, 5, 5) * (1.0 + 3.0 * rank)  # ranks see different data


def _worker(rank: int, init_file: str, results) -> None:
    import q4conv

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        layer = q4conv.Q4Conv2dCutlass(6, 4, 3, padding=1)
        layer(_rank_input(rank))
        results[rank] = layer.scale_a.item()
    finally:
        dist.destroy_process_group()


def test_scale_a_is_averaged_over_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        manager = torch.multiprocessing.Manager()
        results = manager.dict()
        spawn_with_deadline(_worker, (os.path.join(tmp, "store"), results), WORLD, SPAWN_TIMEOUT_S)
        scales = [results[r] for r in range(WORLD)]
    local = [2 * _rank_input(r).abs().mean().item() / math.sqrt(7) for r in range(WORLD)]
    assert abs(local[0] - local[1]) > 0.1  # a per-rank init would differ
    assert scales[0] == scales[1]
    assert math.isclose(scales[0], sum(local) / WORLD, rel_tol=1e-5)
