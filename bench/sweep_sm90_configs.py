"""Every compiled sm90 tile configuration on every ResNet-50 layer, codes in -> codes out.

For each of the 23 batch-64 shapes of bench_codes.py (BN + ReLU folded, int8 codes in and out):
the layer under the tile rule, then under each configuration forced with
``q4conv.tuning(sm90_config=name)`` (where it takes the shape; elsewhere the rule runs and the row
says so), timed in CUDA graphs, and cuDNN fp16 ``F.conv2d`` alone for reference. Each forced run's
codes must equal the rule's bit for bit (the configurations differ only in tiling; the int32 sums
and the epilogue are exact), so the sweep also checks every configuration's codes epilogue.

The table says which configuration is fastest per shape, how far the rule's pick is from it, and
the geometric mean speed-up over cuDNN that a per-shape best choice would give: what a new tile
rule for codes out can reach without new kernels (issue 18).

    python bench/sweep_sm90_configs.py --out bench_out   # H100 / H200 only
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from bench import fmt, geomean, make_shapes  # noqa: E402
from bench_codes import build_case, fp16_reference  # noqa: E402


def graph_ms(fn, inputs, rounds: int, repeats: int) -> float:
    return statistics.median(bench.time_graph_ms(fn, inputs, repeats) for _ in range(rounds))


def sweep_shape(shape, names: Sequence[str], rounds: int, repeats: int) -> Dict[str, object]:
    import q4conv

    device = torch.device("cuda")
    nbuf = bench.n_buffers(shape.n * shape.c * shape.h * shape.h)
    case = build_case(shape, device, nbuf, seed=hash(shape.name) % 2**31)
    row: Dict[str, object] = {"shape": shape.name}
    with torch.inference_mode():
        reference = case.fn(case.codes[0]).clone()
    row["rule_ms"] = graph_ms(case.fn, case.codes, rounds, repeats)
    times = {}
    for name in names:
        with q4conv.tuning(sm90_config=name):
            with torch.inference_mode():
                got = case.fn(case.codes[0])
            if not torch.equal(got, reference):
                row[name] = "MISMATCH"
                continue
            times[name] = graph_ms(case.fn, case.codes, rounds, repeats)
            row[name] = times[name]
    fp16, xs = fp16_reference(shape, device)
    row["fp16_ms"] = graph_ms(fp16, xs, rounds, repeats)
    best = min(times, key=times.get) if times else ""
    row["best"] = best
    row["best_ms"] = times.get(best, "")
    row["rule_vs_best"] = row["rule_ms"] / row["best_ms"] if best else ""
    row["speedup_rule"] = row["fp16_ms"] / row["rule_ms"]
    row["speedup_best"] = row["fp16_ms"] / row["best_ms"] if best else ""
    del case, xs
    torch.cuda.empty_cache()
    return row


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shapes", choices=["resnet50", "quick"], default="resnet50")
    parser.add_argument("--out", type=Path, default=None, help="write sweep_sm90_configs.csv / .md here")
    args = parser.parse_args(argv)
    from q4conv.plan import sm90_configs

    names = list(sm90_configs())
    if not torch.cuda.is_available() or not names or torch.cuda.get_device_capability()[0] != 9:
        print("needs an sm_90 GPU and q4conv built with the sm90 kernels")
        return 1
    shapes = [s for s in make_shapes(args.shapes, args.batch) if s.main]
    rows: List[Dict[str, object]] = []
    for shape in shapes:
        try:
            rows.append(sweep_shape(shape, names, args.rounds, args.repeats))
        except Exception as exc:  # the row says what failed; the sweep goes on
            rows.append({"shape": shape.name, "best": f"error: {type(exc).__name__}: {str(exc)[:120]}"})
        r = rows[-1]
        print(f"{r['shape']:36s} rule {fmt(r.get('rule_ms', ''), 4)} best {r.get('best', '')} "
              f"{fmt(r.get('best_ms', ''), 4)} fp16 {fmt(r.get('fp16_ms', ''), 4)} "
              f"x{fmt(r.get('speedup_rule', ''), 2)} -> x{fmt(r.get('speedup_best', ''), 2)}", flush=True)
    columns = ["shape", "rule_ms", "best", "best_ms", "rule_vs_best", "fp16_ms", "speedup_rule", "speedup_best"] + names
    summary = [
        f"geomean speed-up vs cuDNN fp16 (graphs): rule {fmt(geomean([r.get('speedup_rule') for r in rows]), 3)}, "
        f"best per shape {fmt(geomean([r.get('speedup_best') for r in rows]), 3)} over {len(rows)} shapes",
        f"rule / best time: geomean {fmt(geomean([r.get('rule_vs_best') for r in rows]), 3)}",
        "mismatches: " + (", ".join(f"{r['shape']} {n}" for r in rows for n in names if r.get(n) == "MISMATCH")
                          or "none"),
    ]
    print("\n".join(summary))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "sweep_sm90_configs.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        lines = [f"# sm90 configurations, codes in -> codes out, on {torch.cuda.get_device_name()}",
                 "`python bench/sweep_sm90_configs.py`; CUDA graphs, ms, median of rounds", "",
                 "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(fmt(r.get(c, ""), 4) for c in columns) + " |" for r in rows]
        (args.out / "sweep_sm90_configs.md").write_text("\n".join(lines + [""] + summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
