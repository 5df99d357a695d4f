"""ONNX Runtime int8 (issue 20) against torch.ao int8 and fp32, on the digits MLP, the digits LSTM and a tiny BERT,
at 1 and 2 threads, in one run; and the files' sizes.

Variants: fp32 (eager torch), int8 torch.ao eager (what `quantization/latency_ms_after` times), the int8 TorchScript
artifact (`save_quantized`, loaded back), and the ONNX artifact (`save_quantized(float_model, ..., "m.onnx")`:
exported, pre-processed, `quantize_dynamic(QInt8)`, run by `load_quantized`'s InferenceSession with
`torch.get_num_threads()` intra-op threads). Latency: per round, each variant runs `--calls` times on the same
batch and its median is taken; the variants alternate (order reversed every other round); reported: the median of
`--rounds` round medians, and ratios to torch.ao eager computed from those medians. Sizes: the files on disk, and
the float state dict (`torch.save`).

    python benchmarks/onnx_runtime.py [--rounds 7] [--calls 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits import DigitsLSTM, DigitsMLP  # noqa: E402

from lightning_compress import load_quantized, save_quantized  # noqa: E402
from lightning_compress.quantization.dynamic import quantize_dynamic_copy  # noqa: E402
from lightning_compress.quantization.measure import serialized_size_bytes  # noqa: E402

warnings.filterwarnings("ignore")


class TinyBert(nn.Module):
    """BERT classifier, hidden 256, 4 layers, 4 heads (the issue's tiny BERT), built from a config."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        config = transformers.BertConfig(
            vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
        )
        self.bert = transformers.BertForSequenceClassification(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits


def cases() -> dict[str, tuple[nn.Module, tuple]]:
    torch.manual_seed(0)
    ids = torch.randint(0, 30522, (8, 128))
    return {
        "digits MLP (64-256-256-10), batch 256": (DigitsMLP(hidden=256), (torch.rand(256, 64),)),
        "digits LSTM (8x8 rows, hidden 64), batch 256": (DigitsLSTM(hidden=64), (torch.rand(256, 64),)),
        "tiny BERT (hidden 256, 4 layers), 8 x 128 tokens": (TinyBert(), (ids, torch.ones_like(ids))),
    }


def timed(models: dict[str, object], args: tuple, rounds: int, calls: int) -> dict[str, float]:
    per_round: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(*args)
        for r in range(rounds):
            for name in names if r % 2 == 0 else reversed(names):
                times = []
                for _ in range(calls):
                    start = time.perf_counter()
                    models[name](*args)
                    times.append(time.perf_counter() - start)
                per_round[name].append(statistics.median(times) * 1e3)
    return {name: statistics.median(values) for name, values in per_round.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    import onnxruntime

    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, load average "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}; median of {args.rounds} interleaved round medians "
        f"of {args.calls} calls"
    )
    folder = Path(tempfile.mkdtemp())
    for title, (model, inputs) in cases().items():
        model.eval()
        quantized = quantize_dynamic_copy(model, torch.qint8, {nn.Linear, nn.LSTM})
        ts, ox = folder / "m.ts", folder / "m.onnx"
        save_quantized(quantized, inputs, ts, reference=model)
        save_quantized(model, inputs, ox)
        print(f"\n{title}")
        print(
            f"  size MB: fp32 state dict {serialized_size_bytes(model) / 1e6:.3f}, torch.ao int8 TorchScript "
            f"{ts.stat().st_size / 1e6:.3f}, ONNX int8 {ox.stat().st_size / 1e6:.3f} "
            f"({ox.stat().st_size / ts.stat().st_size:.2f}x the TorchScript file)"
        )
        for threads in (1, 2):
            torch.set_num_threads(threads)
            variants = {
                "fp32": model,
                "int8 torch.ao eager": quantized,
                "int8 TorchScript artifact": load_quantized(ts),
                "int8 ONNX Runtime": load_quantized(ox),  # its session takes torch's thread count now
            }
            ms = timed(variants, inputs, args.rounds, args.calls)
            base = ms["int8 torch.ao eager"]
            cells = ", ".join(f"{name} {value:.3f} ms ({base / value:.2f}x)" for name, value in ms.items())
            print(f"  {threads} thread(s): {cells}")
            print(
                f"    ORT / torch.ao eager latency {ms['int8 ONNX Runtime'] / base:.3f}, ORT / TorchScript artifact "
                f"{ms['int8 ONNX Runtime'] / ms['int8 TorchScript artifact']:.3f}, fp32 / ORT "
                f"{ms['fp32'] / ms['int8 ONNX Runtime']:.2f}x"
            )
    print(f"\nload average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
