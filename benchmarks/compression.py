"""Size and latency at 50/75/90/95/99% sparsity: fp32 dense, int8 dense, compressed artifacts, auto-chosen kernels.

MLPs pruned with the mask engine (layerwise L1, so every layer has the stated sparsity), one run, side by side:

- size: bytes on disk of the fp32 dense state dict, the int8 dense state dict, and the compressed artifacts
  (int8 and fp32); x = how many times smaller than fp32 dense;
- latency: batch 64 (digits: 256), torch.utils.benchmark blocked_autorange medians, configurations interleaved,
  for fp32 dense, int8 dense (the compressed int8 artifact loads this same TorchScript model, so it runs at the
  same speed) and the model that sparse_kernels="auto" builds; x = fp32 time / time.

    python benchmarks/compression.py [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark
from torch import nn

from lightning_compress import save_compressed
from lightning_compress.pruning import scores
from lightning_compress.quantization.dynamic import quantize_dynamic_copy
from lightning_compress.quantization.kernels import build_with_kernels, choose_linear_kernels
from lightning_compress.quantization.measure import serialized_size_bytes

warnings.filterwarnings("ignore")
SHORT = {"quantized dense": "int8", "fp32 sparse (CSR)": "csr", "fp32 dense": "fp32"}


def pruned_mlp(widths: list[int], sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).eval()
    scores.prune_by_magnitude([m.weight for m in model if isinstance(m, nn.Linear)], sparsity, "layerwise")
    return model


def medians_ms(models: dict[str, nn.Module], x: torch.Tensor, threads: int, rounds: int = 3) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, model in models.items():
                timer = benchmark.Timer("m(x)", globals={"m": model, "x": x}, num_threads=threads)
                times[name].append(timer.blocked_autorange(min_run_time=0.3).median * 1e3)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = (("MLP 512-2048-2048-10", [512, 2048, 2048, 10], 64), ("digits MLP 64-256-256-10", [64, 256, 256, 10], 256))
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    with tempfile.TemporaryDirectory() as folder:
        for title, widths, batch in cases:
            print(f"\n{title}, batch {batch}")
            print(
                f"  {'sparsity':>8s} | {'fp32 dense B':>12s} {'int8 dense':>15s} {'int8 compr.':>15s} "
                f"{'fp32 compr.':>16s} | {'fp32 ms':>8s} {'int8':>15s} {'auto':>15s} | auto kernels"
            )
            for sparsity in (0.5, 0.75, 0.9, 0.95, 0.99):
                model = pruned_mlp(widths, sparsity)
                x = torch.rand(batch, widths[0])
                int8 = quantize_dynamic_copy(model, torch.qint8, {nn.Linear})
                choices = choose_linear_kernels(model, x, torch.qint8)
                auto = build_with_kernels(model, choices, torch.qint8)
                dense, int8_dense = serialized_size_bytes(model), serialized_size_bytes(int8)
                int8_comp = save_compressed(int8, x, Path(folder) / "q.lcz")
                fp32_comp = save_compressed(model, x, Path(folder) / "f.lcz")
                ms = medians_ms({"fp32": model, "int8": int8, "auto": auto}, x, args.threads)
                kernels = " ".join(SHORT[c.chosen] for c in choices.values())
                print(
                    f"  {sparsity:8.0%} | {dense:12,d} {int8_dense:9,d} ({dense / int8_dense:3.1f}x) "
                    f"{int8_comp:9,d} ({dense / int8_comp:4.1f}x) {fp32_comp:10,d} ({dense / fp32_comp:4.1f}x) | "
                    f"{ms['fp32']:8.3f} {ms['int8']:8.3f} ({ms['fp32'] / ms['int8']:4.2f}x) "
                    f"{ms['auto']:8.3f} ({ms['fp32'] / ms['auto']:4.2f}x) | {kernels}"
                )


if __name__ == "__main__":
    main()
