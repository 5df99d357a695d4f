"""``DynamicQuantization``: post-training dynamic quantization at the end of ``fit``, measured and logged.

The work is done by plain functions (:mod:`.figures`, :mod:`.evaluation`,
:mod:`lightning_compress.artifacts`); this callback decides when, on which rank and with which data, rehearses the
whole path before training on the validation batches that vary (:mod:`.rehearsal`), and logs
what it measured. Neither changes what training computes (:mod:`.isolation`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import numbers
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress import compat, report, sharding
from lightning_compress.artifacts import write_verified
from lightning_compress.artifacts.verification import ArtifactMismatch, CheckedArtifact, short_error
from lightning_compress.inputs import ModelInput, capture_inputs
from lightning_compress.protocols import PruningCallback, SummaryLines
from lightning_compress.quantization import (
    dynamic,
    evaluation,
    figures,
    isolation,
    kernels,
    linear_like,
    measure,
    outcomes,
    rehearsal,
)
from lightning_compress.quantization.copying import CopyReport, float_copy
from lightning_compress.quantization.dynamic import DTYPES, SUPPORTED_MODULES
from lightning_compress.quantization.kernels import KernelChoice, build_with_kernels
from lightning_compress.shrinking import SHRINK_HINT, shrink

#: Latency is timed on (up to) this many evaluation batches.
LATENCY_BATCHES = 32
#: Rounds of interleaved timing of the float and the quantized model.
LATENCY_ROUNDS = 5
#: About how long timing may take: large evaluation batches are timed fewer (see figures.interleaved_latency).
LATENCY_BUDGET_S = 20.0


class QuantizationError(RuntimeError):
    """Quantizing, evaluating or saving failed at the end of fit; the float model and checkpoints are intact."""


class DynamicQuantization(Callback):
    """Quantize a copy of the trained model dynamically at the end of ``fit``, evaluate it, log what it did.

    Weights of the supported layers are quantized ahead of time (int8 or float16); activations are quantized on
    the fly inside those layers. Runs in ``on_fit_end``, after ``MagnitudePruning`` made its masks permanent, on
    rank zero, on the CPU, on a float32 copy (:mod:`.copying`: without ``torch.compile``
    wrappers, other tools' hooks or reparametrizations; what cannot be copied is shared). The LightningModule
    itself stays as it is and trainable; the quantized copy is ``quantized_model``; layers the backend cannot take
    stay float, with the reason in ``kept_float`` and the summary. Before the first training step the whole path
    is rehearsed on the first, the last and the differently shaped validation batches (copy, quantize, evaluate,
    write the artifact, reload and measure it, check ``save_path``'s folder), so what would fail at the end of fit
    fails at the start. Random generators, modes and the trainer's metrics are restored around all of it. Under
    ``ModelParallelStrategy`` with FSDP2, every rank takes part in gathering the full state dict, and the copy is a
    plain, unsharded module holding it.

    Evaluation: when the module has a ``validation_step`` (and neither ``metric`` nor ``dataloader`` is given), the
    float and the quantized copy are evaluated with it on the validation data, through Lightning, and every metric
    it logs is reported as ``quantization/<name>_before`` / ``_after``. Otherwise batches are ``(input, target)``
    and ``metric`` (default: multiclass accuracy of the argmax) is computed, reported as ``accuracy``.

    Args:
        dtype: ``"qint8"`` or ``"float16"`` (``torch.qint8`` / ``torch.float16`` accepted).
        modules: what to quantize: ``None`` for every supported layer (Linear, LSTM, GRU, LSTMCell, GRUCell,
            RNNCell, and the Linear layers in disguise of :mod:`.linear_like`: transformers'
            ``Conv1D``, Linear subclasses that keep ``Linear.forward``, parametrized Linears), or layer types and/or
            glob patterns over module names (e.g. ``["encoder.*"]``). A layer whose weight is tied to another
            module (GPT-2's ``lm_head``) stays float, with the reason in the summary, unless a pattern here names it
            (its weight is then stored twice; see :func:`.outcomes.tied_layers`).
        evaluate: measure the metrics and latency before and after quantization on the evaluation data.
        metric: a torchmetrics ``Metric`` of ``(output, target)`` for the ``(input, target)`` path.
        dataloader: evaluation batches ``(input, target)`` (a DataLoader, a list of batches, any iterable) for the
            ``(input, target)`` path; default: the trainer's validation dataloader(s), the full set also under DDP.
        save_path: write a standalone artifact there (see :func:`lightning_compress.load_quantized`), called as the
            module's forward is called. It is written only if, reloaded from disk, it reproduces ``quantized_model``
            on every validation input signature (see :func:`lightning_compress.artifacts.write_verified`: a trace,
            else a script); otherwise nothing is left there and a warning names the input that differs.
        baseline_accuracy: optional accuracy of a reference model measured elsewhere, shown in the summary table.
        compress: write ``save_path`` in the compressed format (see :mod:`lightning_compress.artifacts.compressed`).
        sparse_kernels: ``"auto"``: for each quantizable Linear, time quantized dense, fp32 sparse (CSR) and fp32
            dense on its real input and keep quantized dense unless another is clearly faster (see
            :func:`.kernels.choose_kernel`); ``"off"``: quantize every selected Linear.
        monitor: the headline metric, a name the module logs in its validation (as in ModelCheckpoint and
            EarlyStopping): ``quantization/accuracy_before``/``_after`` are its values and the summary leads with
            it. ``None``: the trainer's ModelCheckpoint/EarlyStopping ``monitor`` when logged, else the first
            logged metric containing ``acc``.
        exclude: glob patterns over module names to leave in float (e.g. ``["classifier"]``).
        shrink: before quantizing, remove the channels that structured pruning zeroed (see
            :func:`lightning_compress.shrink`), so that the artifact, the size and the latency are the shrunk model's.
            Needs ``pip install 'lightning_compress[shrink]'``.

    Logged once at the end of fit, to every logger: ``quantization/<metric>_before``/``_after`` for each metric,
    ``quantization/accuracy_before``/``_after`` (the headline metric), ``quantization/size_mb_before``/``_after``
    (bytes of the serialized state dict / 1e6), ``quantization/latency_ms_before``/``_after`` (median per batch,
    the two models timed interleaved on the same batches: those the model's forward received during evaluation,
    up to 32 and about ``LATENCY_BUDGET_S`` of timing, else ``example_input_array``), ``quantization/coverage``
    (fraction of the model's parameters in layers that run quantized, shared parameters counted once),
    ``quantization/size_mb_compressed`` (with ``compress=True``), ``quantization/kernel_speedup/<layer>`` (with
    ``sparse_kernels="auto"``), and ``quantization/sparsity_before`` / ``quantization/sparsity_after`` (zeros in
    the float and the quantized weights) over the parameters that a pruning callback reports
    (:class:`lightning_compress.protocols.PruningCallback`). With ``save_path``, the
    artifact reloaded from disk and evaluated as ``_after`` is: ``quantization/<metric>_artifact`` for each
    metric and ``quantization/accuracy_artifact`` (the headline metric).

    After fit, ``layers`` lists every module that holds parameters as it ended (a
    :class:`.outcomes.LayerOutcome`: its dtype in the quantized model and, for a float one, why),
    and the summary table shows the same, weight by weight.
    """

    def __init__(
        self,
        dtype: str | torch.dtype = "qint8",
        modules: Sequence[type[nn.Module] | str] | None = None,
        evaluate: bool = True,
        metric: torchmetrics.Metric | None = None,
        dataloader: Iterable[Any] | None = None,
        save_path: str | os.PathLike | None = None,
        baseline_accuracy: float | None = None,
        compress: bool = False,
        sparse_kernels: Literal["auto", "off"] = "off",
        monitor: str | None = None,
        exclude: Sequence[str] = (),
        shrink: bool = False,
    ) -> None:
        super().__init__()
        by_dtype = {v: k for k, v in DTYPES.items()}
        if isinstance(dtype, torch.dtype) and dtype in by_dtype:
            dtype = by_dtype[dtype]
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {list(DTYPES)} (or torch.qint8 / torch.float16), got {dtype!r}")
        if modules is not None:
            modules = [modules] if isinstance(modules, (str, type)) else list(modules)
            unsupported = [
                m
                for m in modules
                if not (
                    isinstance(m, str)
                    or (isinstance(m, type) and (m in SUPPORTED_MODULES or linear_like.is_linear_like_type(m)))
                )
            ]
            if unsupported or not modules:
                names = ", ".join(getattr(m, "__name__", repr(m)) for m in unsupported) or "an empty list"
                raise ValueError(
                    f"`modules` got {names}, which dynamic quantization cannot quantize. It takes glob patterns over "
                    f"module names and the layer types {_names(SUPPORTED_MODULES)} (and Linear layers in disguise: "
                    "transformers' Conv1D, Linear subclasses that keep Linear.forward): their weights are quantized "
                    "ahead of time and activations are quantized on the fly inside these layers, so other modules "
                    "(ReLU, Conv2d, ...) have no dynamically quantized form. Use static quantization for convolutions."
                )
        if isinstance(exclude, str):
            exclude = [exclude]
        if not all(isinstance(p, str) for p in exclude):
            raise ValueError(f"`exclude` must be a list of glob patterns over module names (str), got {exclude!r}")
        if not isinstance(evaluate, bool):
            raise ValueError(f"`evaluate` must be True or False, got {evaluate!r}")
        if metric is not None and not isinstance(metric, torchmetrics.Metric):
            raise ValueError(f"`metric` must be a torchmetrics.Metric or None, got {type(metric).__name__}")
        if dataloader is not None and (isinstance(dataloader, (str, bytes)) or not isinstance(dataloader, Iterable)):
            raise ValueError(f"`dataloader` must be an iterable of (input, target) batches, got {dataloader!r}")
        if sparse_kernels not in ("auto", "off"):
            raise ValueError(f"`sparse_kernels` must be one of ['auto', 'off'], got {sparse_kernels!r}")
        if compress and save_path is None:
            raise ValueError("`compress=True` needs `save_path`: it is the format of the saved artifact")
        if baseline_accuracy is not None and (
            isinstance(baseline_accuracy, bool) or not isinstance(baseline_accuracy, numbers.Real)
        ):
            raise ValueError(f"`baseline_accuracy` must be None or a number, got {baseline_accuracy!r}")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"`monitor` must be None or the name of a logged metric, got {monitor!r}")
        if not isinstance(shrink, bool):
            raise ValueError(f"`shrink` must be True or False, got {shrink!r}")
        if shrink and importlib.util.find_spec("torch_pruning") is None:
            raise ValueError(f"`shrink=True`: {SHRINK_HINT}")
        self.dtype = dtype
        self.modules = modules
        self.exclude = list(exclude)
        self.evaluate = evaluate
        self.metric = metric
        self.dataloader = dataloader
        self.save_path = os.fspath(save_path) if save_path is not None else None
        self.baseline_accuracy = baseline_accuracy
        self.compress = compress
        self.sparse_kernels = sparse_kernels
        self.monitor = monitor
        self.shrink = shrink

        self.quantized_model: nn.Module | None = None
        self.results: dict[str, float] = {}
        self.comparison: figures.Comparison | None = None
        self.layer_sparsity: dict[str, tuple[float, float]] = {}
        self.kernel_choices: dict[str, KernelChoice] = {}
        self.stage_seconds: dict[str, float] = {}
        self.quantized_layers: list[str] = []
        self.layers: list[outcomes.LayerOutcome] = []
        self.kept_float: dict[str, str] = {}

    # ------------------------------------------------------------------ before training: fail fast
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        compat.require_supported_strategy(trainer, "DynamicQuantization")
        if self.dataloader is not None or compat.has_val_data(trainer):
            return
        if self.evaluate:
            raise ValueError(
                "DynamicQuantization(evaluate=True) needs evaluation data, but the trainer has no validation "
                "dataloader. Define `val_dataloader`, pass `val_dataloaders` to `fit`, pass `dataloader=`, or set "
                "`evaluate=False`."
            )
        if pl_module.example_input_array is not None:
            return
        needs = "save_path=...) traces the model" if self.save_path is not None else None
        if self.sparse_kernels == "auto":
            needs = "sparse_kernels='auto') times kernels"
        if needs:
            raise ValueError(
                f"DynamicQuantization({needs} on one real input batch, but there is no validation dataloader to "
                "take it from. Set `example_input_array` on the LightningModule, pass `dataloader=`, or provide "
                "validation data."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After `configure_model` and the strategy's setup; still before the first training step. Rank zero
        # rehearses, and every rank raises its error, so that no rank waits for another one that stopped.
        error = None
        full_state = self._gather(trainer, pl_module)
        if trainer.is_global_zero:
            try:
                with isolation.untouched(pl_module, trainer):
                    self._run(trainer, pl_module, rehearsal=True, full_state=full_state)
            except Exception as exception:  # reported on every rank below
                error = str(exception) if isinstance(exception, ValueError) else short_error(exception, 600)
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise ValueError(
                "DynamicQuantization rehearsed its end-of-fit work before training (on the first, the last and the "
                f"differently shaped validation batches), and it failed: "
                f"{error}"
            )

    # ------------------------------------------------------------------ after training
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Sharded: every rank takes part in gathering the full model, then only rank zero works on it; the others
        # return at once, so that none waits on a collective while rank zero quantizes, evaluates or fails.
        full_state = self._gather(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        compat.finish_progress_display(trainer)  # what we print comes below the last epoch's bar
        try:
            with isolation.untouched(pl_module, trainer):
                self._run(trainer, pl_module, rehearsal=False, full_state=full_state)
        except Exception as error:
            raise QuantizationError(
                f"DynamicQuantization failed after training ({type(error).__name__}: {error}). The trained float "
                "model and its checkpoints are intact."
            ) from error

    @staticmethod
    def _gather(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor] | None:
        """Under a sharded strategy, the full state dict on rank zero (a collective); else ``None``."""
        if not compat.is_sharded_strategy(trainer) or not any(sharding.is_sharded(p) for p in pl_module.parameters()):
            return None
        return sharding.full_state_dict(pl_module)

    def _run(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        rehearsal: bool,
        full_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """The end-of-fit path; with ``rehearsal`` on varied batches (:mod:`.rehearsal`), writing
        nothing but a temporary artifact.

        ``full_state``: the gathered full state dict of a sharded module, which the float copy is made of.
        """
        stages: dict[str, float] = {}
        dtype = DTYPES[self.dtype]
        copy_report = CopyReport()
        with _timed(stages, "copy"):
            float_model, cast_from = float_copy(pl_module, full_state, copy_report)
            names = dynamic.select_modules(float_model, self.modules, self.exclude)
            refused = dynamic.known_refusals(float_model, names)
            names = _without(names, refused)
        example = self._example_input(pl_module, cast_from)
        # the rehearsal, and an end of fit that does not evaluate, run on the first, last and differently shaped
        # validation batches; the evaluations at fit end on all of them
        needs_inputs = self.save_path is not None or self.sparse_kernels == "auto" or self.evaluate or self.shrink
        uses_data = self.evaluate or (needs_inputs and example is None)
        source = self._varied_source(trainer) if uses_data and (rehearsal or not self.evaluate) else None
        with _timed(stages, "evaluate float", announce=not rehearsal):
            if uses_data:
                inputs, before = self._evaluate(trainer, float_model, source)
                before = before if self.evaluate else {}
            else:
                inputs, before = [], {}
        # Latency is timed on the batches evaluation fed the model, when it fed it any: example_input_array (often a
        # few zeros) can time another workload than the users'. Tracing, shrink and kernels take the example first.
        timed, timed_on = inputs, "evaluation batches"
        if not inputs and example is not None:
            timed, timed_on = [example], "example_input_array"
        compared = ([example] if example is not None else []) + inputs
        if example is not None:
            inputs = [example]
        if needs_inputs and not inputs:
            raise ValueError(
                "the model's forward was never called during validation, so there is no input to time or trace. "
                "Set `example_input_array` on the LightningModule (a tensor, a tuple of inputs or a dict of keyword "
                "inputs), or call `self(...)` in `validation_step`."
            )
        headline = self._headline(trainer, before)
        to_quantize, notes = float_model, []
        if self.shrink:
            with _timed(stages, "shrink", announce=not rehearsal):
                to_quantize = shrink(float_model, inputs[0])
            notes = _shape_changes(float_model, to_quantize)
            notes.append(
                "shrink: sparsity in the quantized column is over the shrunk weights (removed channels are gone)"
            )
        with _timed(stages, "quantize", announce=not rehearsal):
            quantized, names = self._quantize_what_it_takes(to_quantize, dtype, names, inputs, rehearsal, refused)
        notes += [f"{name} stays float: {reason}" for name, reason in refused.items()]
        if rehearsal:
            for line in [*notes, copy_report.describe()]:
                if line:
                    rank_zero_info(f"DynamicQuantization: {line}")
        with (
            _timed(stages, "evaluate quantized", announce=not rehearsal),
            dynamic.naming_the_failing_layer(quantized, names),
        ):
            after = self._evaluate(trainer, quantized, source)[1] if self.evaluate else {}
            if not self.evaluate and inputs:
                inputs[0](quantized)  # it runs, at least
        if rehearsal:
            self._rehearse_artifact(trainer, quantized, to_quantize, compared, source)
            return
        with _timed(stages, "time latency", announce=True):
            timed = timed if self.evaluate else []
            comparison = figures.compare(
                float_model, quantized, names, timed, before, after, LATENCY_ROUNDS, LATENCY_BUDGET_S
            )
        layers = outcomes.layer_outcomes(
            to_quantize, quantized, self.modules, self.exclude, self.kernel_choices, refused
        )
        comparison.cast_from, comparison.timed_on = cast_from, timed_on if timed else None
        comparison.coverage = outcomes.coverage(layers)
        results = self._results(comparison, headline)
        results.update(self._sparsity(trainer, float_model, quantized))
        if copy_report.describe():
            notes.append(copy_report.describe())
        if self.save_path is not None:
            with _timed(stages, "save artifact", announce=True):
                measured, lines = self._save(trainer, quantized, to_quantize, compared, headline)
            results.update(measured)
            notes += lines
        self.quantized_model, self.comparison, self.results = quantized, comparison, results
        self.layers, self.stage_seconds, self.kept_float = layers, stages, refused
        self.quantized_layers = [layer.name for layer in layers if layer.quantized]
        report.log_to_loggers(trainer, results)
        for regression in comparison.regressions():
            rank_zero_warn(f"DynamicQuantization: {regression}.")
        rank_zero_info(
            report.summary_table(
                results,
                self.dtype,
                self.layer_sparsity,
                self.baseline_accuracy,
                None,  # the artifact's lines are among the notes, once it was measured
                self.kernel_choices,
                headline=headline,
                comparison=comparison,
                stage_seconds=stages,
                layers=layers,
                notes=notes
                + [line for c in trainer.callbacks if isinstance(c, SummaryLines) for line in c.summary_lines()],
            )
        )
        from lightning_compress.protocols import QuantizedMetricsPlot  # the pruning plot adds what was measured here

        for callback in trainer.callbacks if comparison.metrics_after else ():
            if isinstance(callback, QuantizedMetricsPlot):
                callback.redraw_plot(trainer, dict(comparison.metrics_after))

    def _quantize_what_it_takes(
        self,
        model: nn.Module,
        dtype: torch.dtype,
        names: list[str],
        inputs: list[ModelInput],
        rehearsal: bool,
        refused: dict[str, str],
    ) -> tuple[nn.Module, list[str]]:
        """The quantized model, with the layers the backend cannot convert, or whose quantized form fails on its
        real input, left in float (added to ``refused`` with the reason); and the names of those quantized."""
        try:
            quantized = self._quantize(model, dtype, names, inputs, rehearsal)
        except Exception:
            failing = dynamic.unconvertible_layers(model, names, dtype)
            if not failing:
                raise
            refused.update(failing)
            names = _without(names, failing)
            quantized = self._quantize(model, dtype, names, inputs, rehearsal)
        failing = dynamic.failing_layers(model, quantized, names, inputs[0]) if inputs else {}
        if failing:
            refused.update(failing)
            names = _without(names, failing)
            quantized = self._quantize(model, dtype, names, inputs, rehearsal)
        return quantized, names

    def _quantize(
        self, model: nn.Module, dtype: torch.dtype, names: list[str], inputs: list[ModelInput], rehearsal: bool
    ) -> nn.Module:
        if self.sparse_kernels == "auto" and not rehearsal:
            self.kernel_choices = kernels.choose_linear_kernels(model, inputs[0], dtype, names)
            return build_with_kernels(model, self.kernel_choices, dtype, names)
        return dynamic.quantize(model, dtype, names)

    # ------------------------------------------------------------------ pieces
    def _uses_validation_step(self, pl_module: nn.Module) -> bool:
        return self.metric is None and self.dataloader is None and evaluation.has_validation_step(pl_module)

    def _evaluate(
        self, trainer: pl.Trainer, model: nn.Module, source: Any = None
    ) -> tuple[list[ModelInput], dict[str, float]]:
        """Metrics of ``model`` on the evaluation data (``source``: the varied batches of the rehearsal; ``None``:
        all of it) and the inputs its forward got."""
        if self._uses_validation_step(model):
            loaders = source if source is not None else compat.raw_val_dataloaders(trainer)
            return capture_inputs(model, lambda: evaluation.validate(model, loaders), LATENCY_BATCHES)
        batches = source if source is not None else self._batches(trainer)
        return capture_inputs(model, lambda: {"accuracy": self._metric_value(model, batches)}, LATENCY_BATCHES)

    def _varied_source(self, trainer: pl.Trainer) -> Any:
        """The first, the last and the differently shaped batches of each evaluation loader
        (:func:`.rehearsal.varied_batches`), in the form :meth:`_evaluate` takes."""
        if self._uses_validation_step(trainer.lightning_module):
            return rehearsal.varied_loaders(compat.raw_val_dataloaders(trainer))
        return rehearsal.Batches(self._batches(trainer, varied=True))

    def _metric_value(self, model: nn.Module, batches: Iterable[Any]) -> float:
        batches = iter(batches)
        first = next(batches)
        x, y = measure.split_batch(first)
        try:
            with torch.inference_mode():
                output = model(x)
        except TypeError as error:  # a forward that takes more than one input, e.g. forward(inputs, target)
            raise ValueError(
                f"without a `validation_step`, batches are evaluated as (input, target) with model(input), and "
                f"calling forward with the batch's first item failed ({error}). Add a `validation_step` that calls "
                "self(...) and logs a metric, or pass `dataloader=` and `metric=` that fit; with `evaluate=False`, "
                "set `example_input_array` for tracing."
            ) from error
        metric = self.metric.clone() if self.metric is not None else measure.default_metric(output)
        compat.never_sync(metric.to("cpu"))
        try:
            return measure.evaluate(model, itertools.chain([first], batches), metric)
        except Exception as error:
            raise ValueError(
                f"the metric {type(metric).__name__} cannot be computed on the model's output (shape "
                f"{tuple(output.shape)}) and the batch's target ({_describe(y)}): {error}. Pass `metric=` that fits."
            ) from error

    def _batches(self, trainer: pl.Trainer, varied: bool = False) -> Iterator[Any]:
        """CPU batches of the evaluation data (with ``varied``, those of :func:`rehearsal.varied_batches`); the
        trainer's val data comes without a distributed sampler."""
        source = self.dataloader if self.dataloader is not None else compat.raw_val_dataloaders(trainer)
        is_loaders = isinstance(source, (list, tuple)) and source and all(isinstance(s, DataLoader) for s in source)
        loaders = source if is_loaders else [source]
        empty = True
        for loader in loaders:
            for batch in rehearsal.varied_batches(loader) if varied else loader:
                empty = False
                yield measure.to_device(batch, torch.device("cpu"))
        if empty:
            raise ValueError("DynamicQuantization: the evaluation data is empty")

    def _example_input(self, pl_module: pl.LightningModule, cast_from: torch.dtype | None) -> ModelInput | None:
        example = getattr(pl_module, "example_input_array", None)
        if example is None:
            return None
        return ModelInput.from_example(example).to("cpu", torch.float32 if cast_from is not None else None)

    def _headline(self, trainer: pl.Trainer, before: dict[str, float]) -> str | None:
        if self.monitor is not None and before and self.monitor not in before:
            raise ValueError(
                f"`monitor={self.monitor!r}` is not among the metrics the module's validation logs: {sorted(before)}"
            )
        if self.monitor is not None:
            return self.monitor
        candidates = [report.monitored_metric_name(trainer)]
        candidates += [k for k in before if "acc" in k]
        return next((c for c in candidates if c in before), None)

    def _rehearse_artifact(
        self, trainer: pl.Trainer, quantized: nn.Module, reference: nn.Module, inputs: list[ModelInput], source: Any
    ) -> None:
        if self.save_path is None:
            return
        folder = os.path.dirname(os.path.abspath(self.save_path))
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise ValueError(f"`save_path={self.save_path!r}`: its folder cannot be written ({error})") from error
        if not inputs:
            return
        with tempfile.TemporaryDirectory() as scratch:
            write_verified(
                quantized,
                os.path.join(scratch, "rehearsal"),
                inputs,
                compress=self.compress,
                reference=reference,
                metadata={"dtype": self.dtype},
                measure=self._artifact_measure(trainer, quantized, source),
            )

    def _writes_artifact(self, trainer: pl.Trainer) -> bool:
        # As Lightning's own checkpointing: nothing is written by a fast_dev_run or while sanity checking.
        return self.save_path is not None and not trainer.fast_dev_run and not trainer.sanity_checking

    def _save(
        self,
        trainer: pl.Trainer,
        quantized: nn.Module,
        reference: nn.Module,
        inputs: list[ModelInput],
        headline: str | None,
    ) -> tuple[dict[str, float], list[str]]:
        """Write the artifact, measured (:func:`lightning_compress.artifacts.write_verified`); its figures and the
        summary's lines about it. When no form reproduces the model, nothing is written and it says so."""
        if not self._writes_artifact(trainer):
            rank_zero_info(f"DynamicQuantization: fast_dev_run, so no artifact is written to {self.save_path}")
            return {}, []
        try:
            written = write_verified(
                quantized,
                self.save_path,
                inputs,
                compress=self.compress,
                reference=reference,
                metadata={"dtype": self.dtype},
                measure=self._artifact_measure(trainer, quantized, None),
            )
        except ArtifactMismatch as error:
            rank_zero_warn(
                f"DynamicQuantization: no artifact was written to {self.save_path}: {error}. Every figure of the "
                "quantized model is measured and logged as usual, and `quantized_model` holds it."
            )
            return {}, [f"artifact: none written to {self.save_path} (no form reproduced the model; see the warning)"]
        metrics = written.measured if self.evaluate and written.calls else {}
        results = {f"quantization/{name}_artifact": value for name, value in metrics.items()}
        if headline in metrics:
            results[report.ACCURACY_ARTIFACT] = metrics[headline]
        if self.compress:
            results[report.SIZE_COMPRESSED] = written.size / 1e6
        return results, report.artifact_lines(self.save_path, written, metrics, headline, self.evaluate)

    def _artifact_measure(
        self, trainer: pl.Trainer, quantized: nn.Module, source: Any
    ) -> Callable[[CheckedArtifact], dict[str, float]] | None:
        """How to evaluate the artifact as ``_after`` is evaluated: the module's own validation (or the metric)
        run with the artifact in place of the quantized model's forward."""
        if not self.evaluate:
            return None
        if self._uses_validation_step(quantized):
            loaders = source if source is not None else compat.raw_val_dataloaders(trainer)

            def validate(checked: CheckedArtifact) -> dict[str, float]:
                # a shallow copy (same layers) runs the artifact; the quantized model stays what it is compared with
                runner = copy.copy(quantized)
                with _forward_replaced(runner, checked):
                    return evaluation.validate(runner, loaders)

            return validate

        def metric(checked: CheckedArtifact) -> dict[str, float]:
            batches = source if source is not None else self._batches(trainer)
            return {"accuracy": self._metric_value(_Calling(checked), batches)}

        return metric

    def _results(self, comparison: figures.Comparison, headline: str | None) -> dict[str, float]:
        results: dict[str, float] = {}
        for name, value in comparison.metrics_before.items():
            results[f"quantization/{name}_before"] = value
        for name, value in comparison.metrics_after.items():
            results[f"quantization/{name}_after"] = value
        if headline is not None:
            results[report.ACCURACY_BEFORE] = comparison.metrics_before[headline]
            results[report.ACCURACY_AFTER] = comparison.metrics_after[headline]
        results[report.SIZE_BEFORE] = comparison.size_mb_before
        results[report.SIZE_AFTER] = comparison.size_mb_after
        results[report.QUANTIZATION_COVERAGE] = comparison.coverage
        if comparison.latency_before is not None:
            results[report.LATENCY_BEFORE] = comparison.latency_before.median_ms
            results[report.LATENCY_AFTER] = comparison.latency_after.median_ms
        for name, choice in self.kernel_choices.items():
            results[report.KERNEL_SPEEDUP_PREFIX + name] = choice.speedup
        return results

    def _sparsity(self, trainer: pl.Trainer, float_model: nn.Module, quantized: nn.Module) -> dict[str, float]:
        """Fractions of zeros, measured on both models, over what pruning callbacks pruned (see
        :mod:`lightning_compress.protocols`); without one, nothing is reported."""
        float_weights = dict(float_model.named_parameters())
        quantized_weights = measure.quantized_weights(quantized)
        # named as in the uncompiled copy: a compiled submodule's parameters carry `_orig_mod` in their names
        selected = [compat.uncompiled_name(n) for n in _pruned_parameter_names(trainer)]
        pruned = [n for n in dict.fromkeys(selected) if n in float_weights and n in quantized_weights]
        float_overall, float_layers = measure.sparsity_by_name({n: float_weights[n] for n in pruned})
        quantized_overall, quantized_layers = measure.sparsity_by_name({n: quantized_weights[n] for n in pruned})
        self.layer_sparsity = {n: (float_layers[n], quantized_layers[n]) for n in pruned}
        return {report.SPARSITY_BEFORE: float_overall, report.SPARSITY_AFTER: quantized_overall} if pruned else {}


@contextlib.contextmanager
def _timed(stages: dict[str, float], stage: str, announce: bool = False) -> Iterator[None]:
    if announce:
        rank_zero_info(f"DynamicQuantization: {stage} ...")
    start = time.perf_counter()
    try:
        yield
    finally:
        stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """``module(...)`` runs ``forward`` for a while (its hooks, its ``validation_step`` unchanged)."""
    module.__dict__["forward"] = forward
    try:
        yield
    finally:
        del module.__dict__["forward"]


class _Calling(nn.Module):
    """A module whose forward is a given callable (an artifact, called as the model is)."""

    def __init__(self, call: Callable[..., Any]) -> None:
        super().__init__()
        self.call = call

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(*args, **kwargs)


def _without(names: list[str], refused: dict[str, str]) -> list[str]:
    kept = [name for name in names if name not in refused]
    if not kept:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in refused.items())
        raise ValueError(f"DynamicQuantization would quantize nothing: the backend cannot take {reasons}")
    return kept


def _shape_changes(before: nn.Module, after: nn.Module) -> list[str]:
    """Summary lines: the parameter count, and each layer whose weight changed shape, before and after shrinking."""
    lines = [f"shrink: {_count(before):,} -> {_count(after):,} parameters"]
    shapes = {name: tuple(p.shape) for name, p in after.named_parameters() if name.endswith("weight")}
    for name, p in before.named_parameters():
        if name in shapes and shapes[name] != tuple(p.shape):
            lines.append(f"shrink: {name} {tuple(p.shape)} -> {shapes[name]}")
    return lines


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _pruned_parameter_names(trainer: pl.Trainer) -> list[str]:
    """Parameters that pruning callbacks report through the public contract (:mod:`lightning_compress.protocols`)."""
    return [name for c in trainer.callbacks if isinstance(c, PruningCallback) for name in c.pruned_parameter_names]


def _names(types: Iterable[type]) -> str:
    types = set(types)
    ordered = [t for t in SUPPORTED_MODULES if t in types] + sorted(
        (t for t in types if t not in SUPPORTED_MODULES), key=str
    )
    return ", ".join(t.__name__ for t in ordered)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}, dtype {value.dtype}"
    return type(value).__name__
