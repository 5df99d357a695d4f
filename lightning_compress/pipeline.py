"""Post-training dynamic quantization as plain functions, usable without a Trainer:

* :func:`float_copy`: a CPU float32 copy of any model (compiled, bf16/fp16/fp64 ones included), its Linear layers
  in disguise (transformers' ``Conv1D``...) turned into ``nn.Linear`` (:mod:`lightning_compress.linear_like`);
* :func:`select_modules`: which layers to quantize, by type and/or glob over module names;
* :func:`quantize`: the quantized copy (the backend seam is :mod:`lightning_compress.backends`);
* :func:`compare`: size, interleaved latency and coverage of the float and the quantized model, with the metrics
  measured on them, as a :class:`Comparison`; what each layer became and why is
  :func:`lightning_compress.outcomes.layer_outcomes`.

``DynamicQuantization`` only decides when, on which rank and with which data to call these, and logs the result.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_compress import compat, copying, linear_like, measure, outcomes
from lightning_compress.backends import SUPPORTED_MODULES, quantize_dynamic_copy
from lightning_compress.inputs import ModelInput


def float_copy(
    model: nn.Module, full_state: dict[str, Any] | None = None, report: copying.CopyReport | None = None
) -> tuple[nn.Module, torch.dtype | None]:
    """A float32 copy of ``model`` on the CPU in eval mode, without ``torch.compile`` wrappers, holding what its
    forward computes (:mod:`lightning_compress.copying`: other tools' hooks left behind, attributes that cannot be
    copied shared, reparametrized weights folded into plain ones; ``report``, when given, is filled with those).

    ``full_state``: for a model sharded with FSDP2, its gathered full state dict; the copy is then a plain,
    unsharded module holding those tensors (:func:`lightning_compress.compat.unsharded_copy`).

    Returns the copy and the floating dtype the model's weights had when it was not float32 (``None`` otherwise):
    dynamic quantization starts from float32 weights. Layers that compute a Linear under another type (transformers'
    ``Conv1D``, ``nn.Linear`` subclasses, parametrized Linears) are ``nn.Linear`` in the copy, with equal outputs
    (:func:`lightning_compress.linear_like.as_linears`). The model itself is left as it is.
    """
    copier = copying.Copier()
    if full_state is None:
        copied = compat.uncompiled_copy(model, deepcopy=copier)
    else:
        copied = compat.unsharded_copy(model, full_state, deepcopy=copier)
    copied = copied.cpu().eval()
    copying.fold_reparametrizations(copied, copier.report)
    if report is not None:
        for field in dataclasses.fields(report):
            getattr(report, field.name).extend(getattr(copier.report, field.name))
    dtypes = {p.dtype for p in copied.parameters() if p.is_floating_point()} - {torch.float32}
    cast_from = sorted(dtypes, key=str)[0] if dtypes else None
    if cast_from is not None:
        copied.float()
    linear_like.as_linears(copied)
    return copied, cast_from


def quantizable_modules(model: nn.Module, include_tied: bool = False) -> dict[str, nn.Module]:
    """Named layers that dynamic quantization can replace (exact types, as the backend matches them), less, unless
    ``include_tied``, those whose weight is tied to another module (:func:`lightning_compress.outcomes.tied_layers`
    says why they stay float)."""
    tied = {} if include_tied else outcomes.tied_layers(model)
    return {name: m for name, m in model.named_modules() if name and type(m) in SUPPORTED_MODULES and name not in tied}


def select_modules(
    model: nn.Module, modules: Iterable[type[nn.Module] | str] | None = None, exclude: Sequence[str] = ()
) -> list[str]:
    """Names of the layers to quantize.

    Args:
        model: the float model (a :func:`float_copy`, whose Linear layers in disguise are ``nn.Linear``).
        modules: ``None`` for every supported layer; else layer types (e.g. ``torch.nn.Linear``, or transformers'
            ``Conv1D`` for the layers converted from it) and/or glob patterns over module names (e.g.
            ``"encoder.*"``); a layer is chosen when it matches any of them. A layer whose weight is tied to another
            module is chosen only by a name pattern (the weight is then stored twice: float and quantized).
        exclude: glob patterns over module names to leave in float.

    Raises:
        ValueError: a pattern matches no quantizable layer, or nothing is left to quantize. The message lists the
            quantizable layers.
    """
    candidates = quantizable_modules(model)
    if modules is None:
        chosen = list(candidates)
    else:
        modules = list(modules)
        types = tuple(t for t in modules if isinstance(t, type))
        patterns = [p for p in modules if isinstance(p, str)]
        # asked for by name, a tied layer is quantized: faster, and its weight stored twice (float and quantized)
        named = quantizable_modules(model, include_tied=True)
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in named):
                raise ValueError(
                    f"`modules` pattern {pattern!r} matches no layer that dynamic quantization can replace. "
                    f"Quantizable layers: {_listing(named)}"
                )
        chosen = [
            name
            for name, m in named.items()
            if (name in candidates and (isinstance(m, types) or issubclass(linear_like.original_type(m), types)))
            or any(fnmatch.fnmatchcase(name, p) for p in patterns)
        ]
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in chosen):
            raise ValueError(f"`exclude` pattern {pattern!r} matches none of the layers to quantize: {chosen}")
    chosen = [name for name in chosen if not any(fnmatch.fnmatchcase(name, p) for p in exclude)]
    if not chosen:
        held = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
        tied = "".join(f" {name} stays float: {why}." for name, why in outcomes.tied_layers(model).items())
        raise ValueError(
            "DynamicQuantization would quantize nothing: no layer of the model is selected. Dynamic quantization "
            f"covers {', '.join(t.__name__ for t in SUPPORTED_MODULES)} (activations are quantized on the fly inside "
            f"these layers); the model holds {', '.join(held) or 'no layers'}. Quantizable layers: "
            f"{_listing(candidates)}.{tied}"
        )
    return chosen


def quantize(model: nn.Module, dtype: torch.dtype, names: Iterable[str]) -> nn.Module:
    """A dynamically quantized copy of the CPU float ``model`` with the named layers quantized.

    ``nn.TransformerEncoderLayer``'s fused fast path reads float weights, which quantized layers no longer have:
    it is turned off on the copy (only there), so those layers run their ordinary, quantized, path.
    """
    quantized = quantize_dynamic_copy(model, dtype, set(names))
    compat.disable_transformer_fast_path(quantized)
    return quantized


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


@dataclasses.dataclass
class Comparison:
    """What quantization did to a model, every figure measured on it.

    ``coverage``: the fraction of the float model's parameters in layers that run quantized in the quantized model.
    ``size_causes``: when the quantized model is larger, why, each cause with its bytes
    (:func:`lightning_compress.outcomes.size_causes`). ``timed_inputs``: the inputs latency was timed on, described
    as ``(float32[128, 3, 32, 32])``; ``timed_on``: where they came from, in words.
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

    @property
    def speedup(self) -> float | None:
        if self.latency_before is None or self.latency_after is None:
            return None
        return self.latency_before.median_ms / self.latency_after.median_ms

    def regressions(self) -> list[str]:
        """What got worse, in words: a slower quantized model, a larger one."""
        found = []
        if self.speedup is not None and self.speedup < 1:
            found.append(
                f"the quantized model is slower than the float one on this machine ({self.latency_after.median_ms:.3f}"
                f" against {self.latency_before.median_ms:.3f} ms per batch, {self.speedup:.2f}x); {self.coverage:.1%}"
                " of its parameters are in quantized layers"
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
) -> Comparison:
    """Package what was measured: the metrics (evaluated by the caller, e.g. with
    :func:`lightning_compress.evaluation.validate`), the serialized sizes (and, when the quantized model is
    larger, why), the coverage of the layers that run quantized in ``quantized`` and, when ``inputs`` are given,
    both models' latency timed interleaved on them (see :func:`interleaved_latency`, and its ``budget_s``).

    ``names``: the layers selected for quantization; coverage counts those that really run quantized.
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
    if inputs:
        comparison.latency_before, comparison.latency_after = interleaved_latency(
            [float_model, quantized], inputs, rounds, budget_s
        )
        comparison.timed_inputs = [example.describe() for example in inputs[: comparison.latency_before.batches]]
    return comparison


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


def _listing(named: dict[str, nn.Module], limit: int = 30) -> str:
    names = [f"{n} ({type(m).__name__})" for n, m in named.items()]
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "none"
