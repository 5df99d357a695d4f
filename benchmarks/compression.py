"""Artifact sizes at 50/75/90/95% sparsity: fp32 dense, int8 dense, and the compressed format (int8 and float32).

A 5.3M-parameter MLP (512-2048-2048-10) and the digits MLP (64-256-256-10), pruned with the mask engine (global L1),
sizes in bytes of what lands on disk; latency of the loaded compressed int8 artifact against fp32 (batch 64, one
thread, blocked_autorange medians). The compressed artifact loads the same TorchScript as the plain int8 one, so
its latency is the int8 dense latency: compression saves bytes, not time.

    python benchmarks/compression.py
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark
from torch import nn

from lightning_compress import masks as engine
from lightning_compress.backends import quantize_dynamic_copy
from lightning_compress.compressed import load_compressed, save_compressed
from lightning_compress.measure import serialized_size_bytes

warnings.filterwarnings("ignore")


def pruned_mlp(widths: list[int], sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).eval()
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    masks = [torch.ones_like(w) for w in weights]
    engine.update_unstructured(weights, masks, sparsity, engine.l1_scores(weights), "global")
    engine.apply_masks(weights, masks)
    return model


def latency_ms(model: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        timer = benchmark.Timer("m(x)", globals={"m": model, "x": x}, num_threads=1)
        return timer.blocked_autorange(min_run_time=0.5).median * 1e3


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        for title, widths in (("MLP 512-2048-2048-10", [512, 2048, 2048, 10]), ("digits MLP", [64, 256, 256, 10])):
            print(f"\n{title}: size in bytes (x smaller than fp32 dense)")
            print(
                f"  {'sparsity':>8s} {'fp32 dense':>12s} {'int8 dense':>16s} {'int8 compressed':>18s} "
                f"{'fp32 compressed':>18s} {'int8 latency vs fp32':>22s}"
            )
            for sparsity in (0.5, 0.75, 0.9, 0.95):
                model = pruned_mlp(widths, sparsity)
                x = torch.rand(64, widths[0])
                int8 = quantize_dynamic_copy(model, torch.qint8, {nn.Linear})
                dense = serialized_size_bytes(model)
                int8_dense = serialized_size_bytes(int8)
                int8_comp = save_compressed(int8, x, Path(folder) / "q.lcz")
                fp32_comp = save_compressed(model, x, Path(folder) / "f.lcz")
                speedup = latency_ms(model, x) / latency_ms(load_compressed(Path(folder) / "q.lcz"), x)
                print(
                    f"  {sparsity:8.0%} {dense:12,d} {int8_dense:10,d} ({dense / int8_dense:4.1f}x) "
                    f"{int8_comp:10,d} ({dense / int8_comp:4.1f}x) {fp32_comp:10,d} ({dense / fp32_comp:4.1f}x) "
                    f"{speedup:21.2f}x"
                )


if __name__ == "__main__":
    main()
