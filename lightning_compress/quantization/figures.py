"""What quantization did to a model, measured: :func:`compare` packages the metrics (evaluated by the caller),
the serialized sizes, the coverage and the latency of the float and the quantized model, timed interleaved on the
same inputs (:func:`interleaved_latency`), as a :class:`Comparison`; what each layer became and why is
:mod:`lightning_compress.quantization.outcomes`.

Plain PyTorch, usable without a Trainer; knows nothing of callbacks. Sizes and latency are measured alike whatever
made the quantized model; which of its layers run quantized is read off their types
(:func:`lightning_compress.quantization.outcomes.quantized_dtypes`).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from lightning_compress import report
from lightning_compress.inputs import ModelInput
from lightning_compress.quantization import measure, outcomes


def coverage(model: nn.Module, names: Iterable[str]) -> float:
    """The fraction of the model's parameter entries held by the named (quantized) layers."""
    layers = dict(model.named_modules())
    total = sum(p.numel() for p in model.parameters())
    quantized = {id(p): p.numel() for name in names for p in layers[name].parameters()}
    return sum(quantized.values()) / total if total else float("nan")


@dataclasses.dataclass
class Latency:
    """Per-batch wall time of one model: the median and the range of the per-round medians, in milliseconds, and
    how many inputs (batches) each round timed."""

    median_ms: float
    low_ms: float
    high_ms: float
    batches: int = 1


#: A model's slowest round this many times its fastest: the machine was busy while timing, no verdict is drawn.
BUSY_SPREAD = 3.0


@dataclasses.dataclass
class LatencyVerdict:
    """What two models' timings allow one to say: ``"faster"`` or ``"slower"`` (the quantized model, when every
    round of one model was faster than every round of the other: their ranges of round medians do not overlap),
    ``"too close to call"`` (the ranges overlap: the ratio of medians is within the noise), or ``"unreliable"``
    (a model's slowest round is at least :data:`BUSY_SPREAD` times its fastest: the machine was busy). ``text``
    says it in words, with the figures it rests on."""

    verdict: str
    text: str


def latency_verdict(before: Latency, after: Latency, busy_spread: float = BUSY_SPREAD) -> LatencyVerdict:
    """The verdict on the quantized model's latency (``after``) against the float one's (``before``) from the
    spread of their interleaved rounds (see :class:`LatencyVerdict`); a ratio of medians is never a verdict alone."""
    rounds = f"rounds {before.low_ms:.3f}-{before.high_ms:.3f} / {after.low_ms:.3f}-{after.high_ms:.3f} ms"
    spread = max(_spread(before), _spread(after))
    if spread >= busy_spread:
        return LatencyVerdict(
            "unreliable",
            f"timing unreliable: the slowest round took {spread:.1f}x the fastest ({rounds}), so the machine was "
            "busy while timing; no ratio is claimed. Time again on a quiet machine",
        )
    if after.high_ms < before.low_ms:
        return LatencyVerdict("faster", f"quantized faster in every round ({rounds})")
    if after.low_ms > before.high_ms:
        return LatencyVerdict("slower", f"quantized slower in every round ({rounds})")
    return LatencyVerdict(
        "too close to call", f"too close to call: the two models' rounds overlap ({rounds}), within the noise"
    )


def _spread(latency: Latency) -> float:
    return latency.high_ms / latency.low_ms if latency.low_ms > 0 else float("inf")


@dataclasses.dataclass
class Comparison:
    """What quantization did to a model, every figure measured on it.

    ``coverage``: the fraction of the float model's parameters in layers that run quantized in the quantized model.
    ``size_causes``: when the quantized model is larger, why, each cause with its bytes
    (:func:`lightning_compress.quantization.outcomes.size_causes`). ``timed_inputs``: the inputs latency was timed on,
    described as ``(float32[128, 3, 32, 32])``; ``timed_on``: where they came from, in words.
    """

    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    size_mb_before: float
    size_mb_after: float
    coverage: float
    latency_before: Latency | None = None
    latency_after: Latency | None = None
    cast_from: torch.dtype | None = None
    size_causes: list[str] = dataclasses.field(default_factory=list)
    timed_inputs: list[str] = dataclasses.field(default_factory=list)
    timed_on: str | None = None
    latency_eager: Latency | None = None  # last: positional construction of the fields above stays as it was

    @property
    def speedup(self) -> float | None:
        if self.latency_before is None or self.latency_after is None:
            return None
        return self.latency_before.median_ms / self.latency_after.median_ms

    @property
    def latency_verdict(self) -> LatencyVerdict | None:
        if self.latency_before is None or self.latency_after is None:
            return None
        return latency_verdict(self.latency_before, self.latency_after)

    def regressions(self) -> list[str]:
        """What got worse, in words: a quantized model slower in every timed round (:func:`latency_verdict`), a
        larger one."""
        found = []
        verdict = self.latency_verdict
        if verdict is not None and verdict.verdict == "slower":
            found.append(
                f"the quantized model is slower than the float one on this machine ({self.latency_after.median_ms:.3f}"
                f" against {self.latency_before.median_ms:.3f} ms per batch, {self.speedup:.2f}x, {verdict.text}); "
                f"{self.coverage:.1%} of its parameters are in quantized layers"
            )
        if self.size_mb_after > self.size_mb_before:
            causes = "; ".join(self.size_causes) or "no layer's own bytes grew (the difference is the file's layout)"
            found.append(
                f"the quantized model is larger than the float one ({self.size_mb_after:.3f} against "
                f"{self.size_mb_before:.3f} MB): {causes}"
            )
        return found


def compare(
    float_model: nn.Module,
    quantized: nn.Module,
    names: Iterable[str],
    inputs: Sequence[ModelInput] = (),
    metrics_before: dict[str, float] | None = None,
    metrics_after: dict[str, float] | None = None,
    rounds: int = 5,
    budget_s: float | None = None,
    timed_before: nn.Module | None = None,
) -> Comparison:
    """Package what was measured: the metrics (evaluated by the caller, e.g. with
    :func:`lightning_compress.quantization.evaluation.validate`), the serialized sizes (and, when the quantized model is
    larger, why), the coverage of the layers that run quantized in ``quantized`` and, when ``inputs`` are given,
    both models' latency timed interleaved on them (see :func:`interleaved_latency`, and its ``budget_s``).

    ``names``: the layers selected for quantization; coverage counts those that really run quantized.
    ``timed_before``: the float model as the quantized one is run (compiled the same way), timed as
    ``latency_before``; ``float_model`` itself is then timed beside them as ``latency_eager``.
    """
    ran = set(outcomes.quantized_dtypes(quantized))
    comparison = Comparison(
        dict(metrics_before or {}),
        dict(metrics_after or {}),
        measure.serialized_size_bytes(float_model) / 1e6,
        measure.serialized_size_bytes(quantized) / 1e6,
        coverage(float_model, [n for n in names if n in ran]),
    )
    if comparison.size_mb_after > comparison.size_mb_before:
        comparison.size_causes = outcomes.size_causes(float_model, quantized)
    if inputs and timed_before is not None:
        comparison.latency_eager, comparison.latency_before, comparison.latency_after = interleaved_latency(
            [float_model, timed_before, quantized], inputs, rounds, budget_s
        )
    elif inputs:
        comparison.latency_before, comparison.latency_after = interleaved_latency(
            [float_model, quantized], inputs, rounds, budget_s
        )
    if inputs:
        comparison.timed_inputs = [example.describe() for example in inputs[: comparison.latency_before.batches]]
    return comparison


def results(comparison: Comparison, headline: str | None) -> dict[str, float]:
    """The logged figures of a comparison (:mod:`lightning_compress.report`'s keys): ``quantization/<metric>_before``
    and ``_after`` for each metric, the headline metric as ``accuracy``, size, coverage and latency."""
    found: dict[str, float] = {}
    for name, value in comparison.metrics_before.items():
        found[f"quantization/{name}_before"] = value
    for name, value in comparison.metrics_after.items():
        found[f"quantization/{name}_after"] = value
    if headline is not None:
        found[report.ACCURACY_BEFORE] = comparison.metrics_before[headline]
        found[report.ACCURACY_AFTER] = comparison.metrics_after[headline]
    found[report.SIZE_BEFORE] = comparison.size_mb_before
    found[report.SIZE_AFTER] = comparison.size_mb_after
    found[report.QUANTIZATION_COVERAGE] = comparison.coverage
    if comparison.latency_before is not None:
        found[report.LATENCY_BEFORE] = comparison.latency_before.median_ms
        found[report.LATENCY_AFTER] = comparison.latency_after.median_ms
    if comparison.latency_eager is not None:
        found[report.LATENCY_EAGER] = comparison.latency_eager.median_ms
    return found


@torch.inference_mode()
def interleaved_latency(
    models: Sequence[nn.Module], inputs: Sequence[ModelInput], rounds: int = 5, budget_s: float | None = None
) -> list[Latency]:
    """Per-batch latency of each model on the same ``inputs``, timed in alternating order round after round.

    Each round runs every model over every input once (after one warm-up pass over the first three), the order of
    the models reversed every other round, so a machine that slows down or speeds up during the measurement
    affects all of them alike. Reported per model: the median over rounds of the round's median per-batch time,
    and the lowest and highest round medians (the spread).

    ``budget_s``: when given, only the first inputs that fit ``rounds`` rounds into about that many seconds (as the
    warm-up measured them; at least one) are timed, so that large evaluation batches do not make timing longer
    than evaluating; ``Latency.batches`` says how many were timed.
    """
    per_batch = [0.0 for _ in models]
    for i, model in enumerate(models):
        model.eval()
        warm = []
        for example in inputs[:3]:
            start = time.perf_counter()
            example(model)
            warm.append(time.perf_counter() - start)
        per_batch[i] = statistics.median(warm) if warm else 0.0
    inputs = inputs[: _timed_count(len(inputs), sum(per_batch), rounds, budget_s)]
    per_round: list[list[float]] = [[] for _ in models]
    for r in range(rounds):
        order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
        for i in order:
            times = []
            for example in inputs:
                start = time.perf_counter()
                example(models[i])
                times.append(time.perf_counter() - start)
            per_round[i].append(statistics.median(times) * 1e3)
    return [Latency(statistics.median(r), min(r), max(r), len(inputs)) for r in per_round]


def _timed_count(available: int, seconds_per_batch: float, rounds: int, budget_s: float | None) -> int:
    """How many of ``available`` inputs :func:`interleaved_latency` times: all, or those that fit the budget."""
    if budget_s is None or seconds_per_batch <= 0:
        return available
    return max(1, min(available, int(budget_s / (rounds * seconds_per_batch))))
