"""Dynamic quantization on this CPU: fp32 vs int8 vs float16 (torch.ao backend), and torchao int8 where it runs.

Latency: torch.utils.benchmark's blocked_autorange per model, configurations interleaved, median of --repeats
measurements each; size: bytes of the serialized state dict. Models: the examples' digits MLP (batch 256) and
LSTM (batch 256), and a larger MLP, 3 x Linear(1024, 1024) (batch 64).

    python benchmarks/quantization.py [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits import DigitsLSTM, DigitsMLP  # noqa: E402

from lightning_compress.quantization.dynamic import quantize_dynamic_copy  # noqa: E402
from lightning_compress.quantization.measure import serialized_size_bytes  # noqa: E402

warnings.filterwarnings("ignore")


def size_mb(model: nn.Module) -> float:
    return serialized_size_bytes(model) / 1e6


def torchao_int8(model: nn.Module) -> nn.Module | None:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return None
    if any(isinstance(m, (nn.LSTM, nn.GRU)) for m in model.modules()):
        return None  # torchao's dynamic configs cover Linear only
    quantized = copy.deepcopy(model)
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
    return quantized


def variants(model: nn.Module) -> dict[str, nn.Module]:
    model = model.eval()
    out = {
        "fp32": model,
        "int8 (torch.ao)": quantize_dynamic_copy(model, torch.qint8, {nn.Linear, nn.LSTM}),
        "float16 (torch.ao)": quantize_dynamic_copy(model, torch.float16, {nn.Linear, nn.LSTM}),
    }
    ao = torchao_int8(model)
    if ao is not None:
        out["int8 (torchao, eager)"] = ao
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    large = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))
    cases = {
        "digits MLP (64-256-256-10), batch 256": (DigitsMLP(hidden=256), torch.rand(256, 64)),
        "digits LSTM (8x8 rows, hidden 64), batch 256": (DigitsLSTM(hidden=64), torch.rand(256, 64)),
        "MLP 3 x Linear(1024, 1024), batch 64": (large, torch.randn(64, 1024)),
    }
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} blocked_autorange runs")
    for title, (model, x) in cases.items():
        models = variants(model)
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            for _ in range(args.repeats):
                for name, m in models.items():
                    timer = benchmark.Timer("m(x)", globals={"m": m, "x": x}, num_threads=args.threads)
                    times[name].append(timer.blocked_autorange(min_run_time=0.5).median)
        base_time, base_size = statistics.median(times["fp32"]), size_mb(models["fp32"])
        print(f"\n{title}")
        print(f"  {'':24s} {'latency ms':>10s} {'speedup':>8s} {'size MB':>8s} {'smaller':>8s}")
        for name, m in models.items():
            t, s = statistics.median(times[name]), size_mb(m)
            print(f"  {name:24s} {t * 1e3:10.3f} {base_time / t:7.2f}x {s:8.3f} {base_size / s:7.2f}x")


if __name__ == "__main__":
    main()
