#!/usr/bin/env python
"""q4conv demo: quantization-aware training (W4A4) of a small CNN on scikit-learn's digits.

Trains an FP32 baseline CNN (nn.Conv2d) and the same architecture whose convolutions are
``q4conv.Q4Conv2dCutlass`` layers (4-bit weights and activations, LSQ scales), on the 8x8
``load_digits`` images that ship inside scikit-learn (no download). Then:

* prints a table: test accuracy, model size (float parameters vs packed int4 weights), time;
* writes a PNG of train loss / test accuracy per epoch for both models;
* packs the W4A4 model (``generate_quantized_weight(qweight_only=True)``), saves its
  ``state_dict``, loads it into a fresh model and checks that the test-set logits and
  predictions are bit-identical (exit code 1 if not);
* deploys it (``q4conv.deploy``: BatchNorm and ReLU folded into the convolutions; on the
  CPU also 4-bit activation codes between layers and max-pool on codes) and prints its
  accuracy and top-1 agreement with the packed model (and the time per pass on a GPU).

Usage::

    python examples/demo.py                  # CPU by default (GPU with --device auto/cuda)
    python examples/demo.py --quick --out /tmp/demo   # a few seconds, every step included
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import q4conv


# --------------------------------------------------------------------------- data
def load_data(split_seed: int, quick: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=split_seed)
    if quick:  # a small stratified subset: fast, but still every step of the pipeline
        x_tr, _, y_tr, _ = train_test_split(x_tr, y_tr, train_size=300, stratify=y_tr, random_state=split_seed)
        x_te, _, y_te, _ = train_test_split(x_te, y_te, train_size=150, stratify=y_te, random_state=split_seed)
    mean, std = float(x_tr.mean()), float(x_tr.std())  # statistics of the training split only
    x_tr = (x_tr - mean) / std
    x_te = (x_te - mean) / std
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return to_t(x_tr[:, None]), to_t(y_tr), to_t(x_te[:, None]), to_t(y_te)


# -------------------------------------------------------------------------- model
ConvFactory = Callable[[int, int], nn.Module]


def fp32_conv(cin: int, cout: int) -> nn.Module:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


def q4_conv(cin: int, cout: int) -> nn.Module:
    return q4conv.Q4Conv2dCutlass(cin, cout, 3, padding=1, a_bit=4, w_bit=4, bias=False)


class SmallCNN(nn.Module):
    """conv(1->32)-BN-ReLU -> conv(32->64)-BN-ReLU -> maxpool 2 -> conv(64->64)-BN-ReLU ->
    global average pool -> linear head (float). Every convolution comes from ``conv``."""

    def __init__(self, conv: ConvFactory, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv(1, 32), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            conv(32, 64), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            conv(64, 64), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(64 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def build_model(kind: str, seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)  # both kinds start from the same initial weights
    model = SmallCNN(q4_conv if kind == "w4a4" else fp32_conv).to(device)
    if kind == "w4a4":
        q4conv.prepare_q4conv_layers(model)  # LSQ weight scales from the (moved) weights
    return model


def q4_layers(model: nn.Module) -> List[q4conv.Q4Conv2dCutlass]:
    return [m for m in model.modules() if isinstance(m, q4conv.Q4Conv2dCutlass)]


# ----------------------------------------------------------------------- training
@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def train(
    model: nn.Module, name: str, data, epochs: int, lr: float, batch_size: int, seed: int, progress: bool
) -> Dict[str, object]:
    from tqdm.auto import tqdm

    x_tr, y_tr, x_te, y_te = data
    params_decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    params_other = [p for n, p in model.named_parameters() if p.dim() <= 1]  # BN, scales, bias_a
    optimizer = torch.optim.AdamW(
        [{"params": params_decay, "weight_decay": 1e-4}, {"params": params_other, "weight_decay": 0.0}], lr=lr
    )
    steps_per_epoch = math.ceil(len(x_tr) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15, anneal_strategy="cos"
    )
    gen = torch.Generator().manual_seed(seed)
    losses: List[float] = []
    accs: List[float] = []
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"{name:>5} train", unit="epoch", disable=not progress, file=sys.stdout,
               dynamic_ncols=True)
    for _epoch in bar:
        model.train()
        order = torch.randperm(len(x_tr), generator=gen).to(x_tr.device)
        total, count = 0.0, 0
        for i in range(0, len(x_tr), batch_size):
            idx = order[i:i + batch_size]
            xb, yb = x_tr[idx], y_tr[idx]
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / count)
        acc = float((predict(model, x_te).argmax(1) == y_te).float().mean()) * 100.0
        accs.append(acc)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", test_acc=f"{acc:.2f}%")
    bar.close()
    return {"loss": losses, "acc": accs, "time": time.perf_counter() - start}


# ---------------------------------------------------------------- size / packing
def float_param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def packed_bytes(model: nn.Module) -> int:
    """qweight bytes of every q4conv layer + the float parameters left after packing."""
    qbytes = sum(m.qweight.numel() * m.qweight.element_size() for m in q4_layers(model))
    return qbytes + float_param_bytes(model)  # weight of packed layers is gone from parameters()


def pack_and_reload_check(model: nn.Module, seed: int, device: torch.device, x_te: torch.Tensor,
                          out_dir: Path) -> Tuple[bool, int, Path]:
    model.eval()
    for layer in q4_layers(model):
        layer.generate_quantized_weight(qweight_only=True)
    ref_logits = predict(model, x_te)
    path = out_dir / "w4a4_packed_state_dict.pt"
    torch.save(model.state_dict(), path)

    fresh = build_model("w4a4", seed + 1000, device)  # different random init: must be overwritten
    state = torch.load(path, map_location=device, weights_only=True)
    fresh.load_state_dict(state)
    fresh.eval()
    new_logits = predict(fresh, x_te)
    same_logits = torch.equal(ref_logits, new_logits)
    same_argmax = torch.equal(ref_logits.argmax(1), new_logits.argmax(1))
    all_packed = all(m.weight is None and m.qweight is not None for m in q4_layers(fresh))
    identical = bool(same_logits and same_argmax and all_packed)
    return identical, packed_bytes(model), path


def deploy_check(model: nn.Module, x_te: torch.Tensor, y_te: torch.Tensor,
                 device: torch.device) -> Dict[str, float]:
    """q4conv.deploy of the packed eval model (BatchNorm and ReLU folded into the
    convolutions; on the CPU also activation codes between layers and max-pool
    on codes): accuracy, top-1 agreement with the packed model, largest logit
    difference, and on a GPU the time per test-set pass of both."""
    model.eval()
    deployed = q4conv.deploy(model)
    reference, logits = predict(model, x_te), predict(deployed, x_te)
    result = {
        "acc": float((logits.argmax(1) == y_te).float().mean()) * 100.0,
        "agreement": float((logits.argmax(1) == reference.argmax(1)).float().mean()) * 100.0,
        "max_logit_diff": float((logits.float() - reference.float()).abs().max()),
    }
    if device.type == "cuda":
        for name, net in (("eval_ms", model), ("deployed_ms", deployed)):
            predict(net, x_te)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(5):
                predict(net, x_te)
            torch.cuda.synchronize()
            result[name] = (time.perf_counter() - start) / 5 * 1e3
    return result


# ------------------------------------------------------------------------ output
def plot(histories: Dict[str, Dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, hist in histories.items():
        epochs = range(1, len(hist["loss"]) + 1)
        ax_loss.plot(epochs, hist["loss"], marker=".", label=name)
        ax_acc.plot(epochs, hist["acc"], marker=".", label=name)
    ax_loss.set(title="train loss", xlabel="epoch", ylabel="cross-entropy", yscale="log")
    ax_acc.set(title="test accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("load_digits: FP32 vs q4conv W4A4 (QAT)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but CUDA is not available")
    return torch.device(name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 40, 2 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling (default 0)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/test split (default 0)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                        help="cpu (default), cuda, or auto (cuda when available)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, one-cycle cosine)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default demo_out/)")
    parser.add_argument("--quick", action="store_true", help="fast mode for tests: 2 epochs on a small subset")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)

    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 40)
    if epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    x_tr, y_tr, x_te, y_te = load_data(args.split_seed, args.quick)
    data = tuple(t.to(device) for t in (x_tr, y_tr, x_te, y_te))
    print(f"q4conv {q4conv.__version__} | torch {torch.__version__} | device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({torch.get_num_threads()} threads)"))
    print(f"load_digits: {len(x_tr)} train / {len(x_te)} test images (8x8), {epochs} epochs, seed {args.seed}")
    probe = data[0][:2]
    print("q4conv backend for conv1:", q4conv.selected_backend(probe, 32, (3, 3), (1, 1), (1, 1), (1, 1)))

    histories: Dict[str, Dict[str, object]] = {}
    models: Dict[str, nn.Module] = {}
    for kind, label in (("fp32", "FP32"), ("w4a4", "W4A4")):
        model = build_model(kind, args.seed, device)
        histories[label] = train(model, label, data, epochs, args.lr, args.batch_size, args.seed,
                                 progress=not args.no_progress)
        models[label] = model

    fp32_bytes = float_param_bytes(models["FP32"])
    w4a4_train_bytes = float_param_bytes(models["W4A4"])
    # Accuracy of the final W4A4 model through the packed-weight inference path.
    identical, w4a4_packed, ckpt = pack_and_reload_check(models["W4A4"], args.seed, device, data[2], args.out)
    packed_acc = float((predict(models["W4A4"], data[2]).argmax(1) == data[3]).float().mean()) * 100.0

    deployed = deploy_check(models["W4A4"], data[2], data[3], device)

    plot_path = args.out / "demo_curves.png"
    plot(histories, plot_path)
    print(f"wrote {plot_path} and {ckpt} ({ckpt.stat().st_size} bytes on disk)")

    fp_acc = histories["FP32"]["acc"][-1]
    q_acc = histories["W4A4"]["acc"][-1]
    status = "IDENTICAL" if identical else "NOT IDENTICAL"
    print(f"pack (qweight_only=True) -> torch.save -> fresh model -> load_state_dict: "
          f"reloaded predictions on {len(x_te)} test images are {status} (logits and argmax)")
    print(f"W4A4 accuracy after packing: {packed_acc:.2f}%  |  FP32 - W4A4 gap: {fp_acc - q_acc:+.2f} points")
    print(f"q4conv.deploy (BatchNorm + ReLU folded{', codes between layers' if device.type == 'cpu' else ''}): "
          f"top-1 agreement with the packed model {deployed['agreement']:.2f}%, "
          f"largest logit difference {deployed['max_logit_diff']:.2e}")
    if "deployed_ms" in deployed:
        print(f"test-set pass on {device}: packed eval model {deployed['eval_ms']:.2f} ms, "
              f"deployed {deployed['deployed_ms']:.2f} ms")
    print(f"total run time: {time.perf_counter() - t_start:.1f} s")
    print()
    header = ["model", "test acc (%)", "size (bytes)", "size vs FP32", "train time (s)"]
    rows = [
        ["FP32 (nn.Conv2d)", f"{fp_acc:.2f}", f"{fp32_bytes}", "1.00x", f"{histories['FP32']['time']:.1f}"],
        ["W4A4 q4conv (training, float weights)", f"{q_acc:.2f}", f"{w4a4_train_bytes}",
         f"{w4a4_train_bytes / fp32_bytes:.2f}x", f"{histories['W4A4']['time']:.1f}"],
        ["W4A4 q4conv (packed int4, reloaded)", f"{packed_acc:.2f}", f"{w4a4_packed}",
         f"{w4a4_packed / fp32_bytes:.2f}x", "-"],
        ["W4A4 q4conv deployed (q4conv.deploy)", f"{deployed['acc']:.2f}", f"{w4a4_packed}",
         f"{w4a4_packed / fp32_bytes:.2f}x", "-"],
    ]
    print(format_table(rows, header))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
