"""Static int8 (StaticQuantization's PT2E path) on this CPU, against fp32 eager and fp32 compiled the same way.

A ResNet-18-shaped CNN (torchvision's layout: 7x7 stem, max-pool, 4 stages of 2 BasicBlocks at 64-512 channels, one
ReLU module called twice per block) at batch 16x3x64x64, random weights, BatchNorm statistics from a few batches:

* latency: fp32 eager, fp32 exported and compiled with freezing, int8 (export, X86InductorQuantizer, calibration on
  8 batches, convert, compile with freezing), timed in the same process, the three interleaved round after round
  (order reversed every other round), median of ``--rounds`` rounds of ``torch.utils.benchmark``'s
  ``blocked_autorange``; with 1 and 2 threads (``--threads``);
* size: bytes of the ``.pt2`` artifact StaticQuantization writes (float weights stripped), against
  ``torch.save(state_dict)`` of the fp32 model;
* accuracy (``--digits``): a fit of the examples' digits CNN with ``StaticQuantization``; ``val_acc`` before and
  after, from its results.

    python benchmarks/static_quantization.py [--rounds 7] [--threads 1 2] [--digits]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from lightning_compress.artifacts import exported, write_verified  # noqa: E402
from lightning_compress.inputs import ModelInput  # noqa: E402
from lightning_compress.quantization import static  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + self.down(x))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def build(batch: int) -> tuple[nn.Module, list[ModelInput]]:
    torch.manual_seed(0)
    model = ResNet18()
    model.train()
    with torch.no_grad():
        for _ in range(4):  # BatchNorm statistics of this input distribution
            model(torch.randn(batch, 3, 64, 64))
    model.eval()
    return model, [ModelInput((torch.randn(batch, 3, 64, 64),)) for _ in range(8)]


def quantized(model: nn.Module, inputs: list[ModelInput]) -> tuple[exported.CompiledProgram, float]:
    start = time.perf_counter()
    program, shapes = static.export(model, inputs)
    static.separate_call_sites(program)
    every = static.selected_layers(model, None, ())
    prepared = static.prepare(program, every, every)
    static.calibrate(prepared, inputs)
    return exported.CompiledProgram(static.convert(prepared), shapes), time.perf_counter() - start


def timed(models: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    per: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            timer = benchmark.Timer("m(x)", globals={"m": models[name], "x": x})
            per[name].append(timer.blocked_autorange(min_run_time=0.5).median * 1e3)
    return {name: statistics.median(v) for name, v in per.items()}


def latency(rounds: int, threads: list[int]) -> None:
    model, inputs = build(16)
    x = inputs[0].args[0]
    int8, prepared_s = quantized(model, inputs)
    float_program, shapes = static.export(model, inputs[:1])
    compiled = exported.CompiledProgram(float_program, shapes)
    with torch.no_grad():
        for name, m in (("int8", int8), ("fp32 compiled", compiled)):
            start = time.perf_counter()
            m(x)
            print(f"first call (compile) of {name}: {time.perf_counter() - start:.1f} s", flush=True)
        error = (int8(x) - model(x)).abs().max() / model(x).abs().max()
    print(f"export+prepare+calibrate+convert: {prepared_s:.1f} s; int8 relative error {float(error):.2e}")
    models = {"fp32 eager": model, "fp32 compiled": compiled, "int8 compiled": int8}
    for n in threads:
        torch.set_num_threads(n)
        with torch.no_grad():
            ms = timed(models, x, rounds)
        eager, comp, q = ms["fp32 eager"], ms["fp32 compiled"], ms["int8 compiled"]
        print(
            f"{n} thread(s), 16x3x64x64, median of {rounds} interleaved rounds: fp32 eager {eager:.2f} ms, "
            f"fp32 compiled {comp:.2f} ms, int8 {q:.2f} ms -> {eager / q:.2f}x eager, {comp / q:.2f}x compiled",
            flush=True,
        )
    state = io.BytesIO()
    torch.save(model.state_dict(), state)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "resnet18.pt2")
        written = write_verified(int8, path, inputs[:1], forms=exported.FORMS)
    fp32 = state.getbuffer().nbytes
    print(f"artifact {written.size / 1e6:.2f} MB vs fp32 state dict {fp32 / 1e6:.2f} MB: {written.size / fp32:.3f}x")


def digits_accuracy() -> None:
    import lightning.pytorch as pl
    from digits import DigitsCNN, DigitsDataModule

    from lightning_compress import StaticQuantization

    pl.seed_everything(0, verbose=False)
    callback = StaticQuantization(monitor="val_acc")
    trainer = pl.Trainer(max_epochs=10, callbacks=[callback], logger=False, enable_checkpointing=False)
    trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())
    before, after = callback.results["quantization/accuracy_before"], callback.results["quantization/accuracy_after"]
    print(f"digits CNN val_acc: float {before:.4f}, int8 {after:.4f} ({(after - before) * 100:+.2f} points)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--digits", action="store_true")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    latency(args.rounds, args.threads)
    if args.digits:
        digits_accuracy()
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
