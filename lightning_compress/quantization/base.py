"""One base for the quantization callbacks: everything but how to quantize.

:class:`QuantizationCallback` decides when, on which rank and with which data: before the first training step it
rehearses the whole end-of-fit path on the validation batches that vary (:mod:`.rehearsal`), so what would fail
after training fails before it; in ``on_fit_end`` it runs it for real, on rank zero, on a float copy
(:mod:`.copying`), evaluates both models with the module's own validation (:mod:`.evaluation`), measures size,
latency and coverage (:mod:`.figures`), writes the artifact measured (:mod:`.saving`), logs, and prints the summary.
Neither run changes what training computes (:mod:`.isolation`).

A subclass says how to quantize, and nothing else: :meth:`~QuantizationCallback._select_layers`,
:meth:`~QuantizationCallback._quantize` and :meth:`~QuantizationCallback._layer_outcomes`, plus what it writes in
the artifact's header and the summary (``DynamicQuantization`` is one; see :mod:`.callbacks`). Pruning callbacks are
known only through :mod:`lightning_compress.protocols`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_compress import compat, report
from lightning_compress.artifacts.verification import short_error
from lightning_compress.artifacts.writing import default_forms
from lightning_compress.inputs import ModelInput
from lightning_compress.protocols import PruningCallback, QuantizedMetricsPlot, SummaryLines
from lightning_compress.quantization import failing, figures, isolation, measure, outcomes, saving, streamed
from lightning_compress.quantization.config import QuantizationConfig
from lightning_compress.quantization.copying import CopyReport, float_copy, full_state_dict
from lightning_compress.quantization.evaluation import Evaluator, LayerFailure, naming_the_failing_layer
from lightning_compress.shrinking import ShrinkWarning, shrink, zeroed_channels

#: Rounds of interleaved timing of the float and the quantized model.
LATENCY_ROUNDS = 5
#: About how long timing may take: large evaluation batches are timed fewer (see figures.interleaved_latency).
LATENCY_BUDGET_S = 20.0


class QuantizationError(RuntimeError):
    """Quantizing, evaluating or saving failed at the end of fit; the float model and checkpoints are intact."""


@dataclasses.dataclass
class _Run:
    """What one pass of the end-of-fit path (the rehearsal's or the real one) has made and measured so far.

    ``inputs``: what tracing, shrink and kernel timing take (``example_input_array`` first); ``compared``: what the
    artifact is compared on; ``timed``: what latency is timed on; ``source``: the rehearsal's varied batches (or
    ``None``: all of the evaluation data).
    """

    rehearsal: bool
    stages: dict[str, float]
    copy_report: CopyReport
    float_model: nn.Module
    cast_from: torch.dtype | None
    names: list[str]
    refused: dict[str, str]
    source: Any = None
    inputs: list[ModelInput] = dataclasses.field(default_factory=list)
    compared: list[ModelInput] = dataclasses.field(default_factory=list)
    timed: list[ModelInput] = dataclasses.field(default_factory=list)
    timed_on: str = "evaluation batches"
    before: dict[str, float] = dataclasses.field(default_factory=dict)
    headline: str | None = None
    to_quantize: nn.Module | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    without_data: bool = False


class QuantizationCallback(Callback):
    """Quantize a copy of the trained model at the end of ``fit``, evaluate it, write it, log what it did (see the
    module docstring). Subclasses implement the methods under "how to quantize"; the arguments are those of
    :class:`lightning_compress.quantization.config.QuantizationConfig`."""

    def __init__(self, config: QuantizationConfig) -> None:
        super().__init__()
        self.evaluate = config.evaluate
        self.metric = config.metric
        self.dataloader = config.dataloader
        self.save_path = config.save_path
        self.baseline_accuracy = config.baseline_accuracy
        self.compress = config.compress
        self.monitor = config.monitor
        self.exclude = config.exclude
        self.shrink = config.shrink
        self.artifact_format = config.artifact_format

        self.quantized_model: nn.Module | None = None
        self.results: dict[str, float] = {}
        self.comparison: figures.Comparison | None = None
        self.layer_sparsity: dict[str, tuple[float, float]] = {}
        self.stage_seconds: dict[str, float] = {}
        self.quantized_layers: list[str] = []
        self.layers: list[outcomes.LayerOutcome] = []
        self.kept_float: dict[str, str] = {}
        self._sanity = streamed.SanityCapture()  # a stream's sanity-check batches (set in on_fit_start)
        self._code_reads: dict[str, str] = {}  # layers whose weight the model's code reads, found in the rehearsal

    # ------------------------------------------------------------------ how to quantize: what a subclass says
    def _select_layers(self, float_model: nn.Module) -> tuple[list[str], dict[str, str]]:
        """The names of the layers to quantize, and the layers known to stay float with the reason."""
        raise NotImplementedError

    def _quantize(
        self,
        trainer: pl.Trainer,
        model: nn.Module,
        names: list[str],
        inputs: list[ModelInput],
        rehearsal: bool,
        refused: dict[str, str],
    ) -> tuple[nn.Module, list[str]]:
        """A quantized copy of the float ``model`` (``inputs``: real inputs of its forward, ``example_input_array``
        first), and the names of the layers it quantized; layers it leaves float go into ``refused`` with why."""
        raise NotImplementedError

    def _layer_outcomes(
        self, float_model: nn.Module, quantized: nn.Module, refused: dict[str, str]
    ) -> list[outcomes.LayerOutcome]:
        """What each module that holds parameters became, and why when it stayed float."""
        raise NotImplementedError

    def _artifact_metadata(self) -> dict[str, Any]:
        """Strings and numbers written in the artifact's header."""
        return {}

    def _summary_label(self) -> str:
        """What the summary's first line names (a dtype)."""
        return type(self).__name__

    def _extra_results(self) -> dict[str, float]:
        """Figures of the quantization itself to log beside the others."""
        return {}

    def _summary_arguments(self) -> dict[str, Any]:
        """More arguments of :func:`lightning_compress.report.summary_table`."""
        return {}

    def _compiled_float(self, float_model: nn.Module, inputs: list[ModelInput]) -> nn.Module | None:
        """The float model as the quantized one is run (compiled the same way, on ``inputs``: those timed), timed as
        ``latency_ms_before``; ``None``: the quantized model runs eagerly, and the float model is timed as it is."""
        return None

    def _why_an_input_is_needed(self) -> str | None:
        """What needs one real input batch even without evaluation (``"save_path=...) traces the model"``)."""
        return "save_path=...) traces the model" if self.save_path is not None else None

    @property
    def _artifact_forms(self) -> tuple[str, ...]:
        """The artifact forms tried for ``save_path`` (by ``artifact_format``, else its suffix)."""
        return default_forms(self.save_path or "", self.artifact_format)

    # ------------------------------------------------------------------ before training: fail fast
    @property
    def _name(self) -> str:
        """The class users know this callback by, in messages (a user's subclass of it keeps its name)."""
        return next(c.__name__ for c in type(self).__mro__ if c.__module__.startswith("lightning_compress."))

    @property
    def _evaluation(self) -> Evaluator:
        return Evaluator(self.metric, self.dataloader, self._name)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        compat.require_supported_strategy(trainer, self._name)
        others = {c._name for c in trainer.callbacks if isinstance(c, QuantizationCallback) and c._name != self._name}
        if others:
            raise ValueError(
                f"{' and '.join(sorted({self._name, *others}))} are in one Trainer: each quantizes its own copy of the "
                "model at the end of fit, and one quantization method per fit is supported. Keep one of them."
            )
        if self.dataloader is not None or compat.has_val_data(trainer):
            return
        if self.evaluate:
            raise ValueError(
                f"{self._name}(evaluate=True) needs evaluation data, but the trainer has no validation "
                "dataloader. Define `val_dataloader`, pass `val_dataloaders` to `fit`, pass `dataloader=`, or set "
                "`evaluate=False`."
            )
        needs = self._why_an_input_is_needed()
        if pl_module.example_input_array is None and needs:
            raise ValueError(
                f"{self._name}({needs} on one real input batch, but there is no validation dataloader to take it "
                "from. Set `example_input_array` on the LightningModule, pass `dataloader=`, or provide validation "
                "data."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After `configure_model` and the strategy's setup; still before the first training step. Evaluation data
        # that reading would change (a stream) is not read: the rehearsal then waits for `on_train_start` and runs
        # on the batches Lightning's sanity check draws anyway, captured as they pass.
        self._code_reads = {}
        self._sanity = streamed.SanityCapture(self._streams(trainer))
        if not self._sanity.streams:
            self._rehearse(trainer, pl_module)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._sanity.streams and trainer.sanity_checking and trainer.is_global_zero:
            self._sanity.add(dataloader_idx, _cpu_copy(batch))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sanity.streams:
            per_loader = self._evaluation.uses_validation_step(pl_module)
            self._rehearse(trainer, pl_module, self._sanity.source(compat.raw_val_dataloaders(trainer), per_loader))
            self._sanity = streamed.SanityCapture()

    def _streams(self, trainer: pl.Trainer) -> list[str]:
        """The evaluation loaders the run reads that must not be read before training (:func:`.rehearsal.is_stream`)."""
        example = getattr(trainer.lightning_module, "example_input_array", None)
        reads = self.evaluate or (example is None and (self.shrink or self._why_an_input_is_needed() is not None))
        has_data = self.dataloader is not None or compat.has_val_data(trainer)
        return self._evaluation.streams(trainer) if reads and has_data else []

    def _rehearse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: Any = None) -> None:
        """Rank zero rehearses (on ``source``: the sanity check's batches of a stream; else the varied validation
        batches), and every rank raises its error, so that no rank waits for another one that stopped."""
        error = None
        full_state = _gather(trainer, pl_module)
        if trainer.is_global_zero:
            try:
                with isolation.untouched(pl_module, trainer):
                    self._sanity.rehearsed_on = source
                    self._run(trainer, pl_module, rehearsal=True, full_state=full_state)
            except Exception as exception:  # reported on every rank below
                error = str(exception) if isinstance(exception, ValueError) else short_error(exception, 600)
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            on = "the first, the last and the differently shaped validation batches"
            on = "the validation batches the sanity check drew" if source is not None else on
            raise ValueError(
                f"{self._name} rehearsed its end-of-fit work before training (on {on}), and it failed: {error}"
            )

    # ------------------------------------------------------------------ after training
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Sharded: every rank takes part in gathering the full model, then only rank zero works on it; the others
        # return at once, so that none waits on a collective while rank zero quantizes, evaluates or fails.
        full_state = _gather(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        compat.finish_progress_display(trainer)  # what we print comes below the last epoch's bar
        try:
            with isolation.untouched(pl_module, trainer):
                self._run(trainer, pl_module, rehearsal=False, full_state=full_state)
        except Exception as error:
            raise QuantizationError(
                f"{self._name} failed after training ({type(error).__name__}: {error}). The trained float "
                "model and its checkpoints are intact."
            ) from error

    # ------------------------------------------------------------------ the end-of-fit path
    def _run(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        rehearsal: bool,
        full_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """The end-of-fit path; with ``rehearsal`` on varied batches (:mod:`.rehearsal`), or on the batches a stream
        gave the sanity check (``_sanity.rehearsed_on``), writing nothing but a temporary artifact. ``full_state``:
        the gathered full state dict of a sharded module, which the float copy is made of."""
        run = self._copy(pl_module, rehearsal, full_state)
        source = run.source = self._sanity.rehearsed_on if rehearsal else None
        self._evaluate_float(trainer, pl_module, run)
        if source is not None:
            rank_zero_info(f"{self._name}: {streamed.rehearsal_line(self._sanity.streams, source, run)}")
            if not run.inputs:
                return  # nothing to run the model on before training: the end of fit is its first run
        self._shrink(run)
        with self._timed(run, "quantize"):
            quantized, run.names = self._quantize(
                trainer, run.to_quantize, run.names, run.inputs, rehearsal, run.refused
            )
        quantized, after = self._evaluate_quantized(trainer, run, quantized)
        run.notes += [f"{name} stays float: {reason}" for name, reason in run.refused.items()]
        if rehearsal:
            for line in [*run.notes, run.copy_report.describe()]:
                if line:
                    rank_zero_info(f"{self._name}: {line}")
            if self.save_path is not None:
                evaluate = self.evaluate and not run.without_data
                measure = self._artifact_measure(trainer, quantized, run.source) if evaluate else None
                metadata = self._artifact_metadata()
                saving.rehearse(
                    self.save_path,
                    quantized,
                    run.to_quantize,
                    run.compared,
                    self.compress,
                    metadata,
                    measure,
                    self._artifact_forms,
                )
            return
        self._finish(trainer, run, quantized, after)

    def _evaluate_quantized(
        self, trainer: pl.Trainer, run: _Run, quantized: nn.Module
    ) -> tuple[nn.Module, dict[str, float]]:
        """The quantized model evaluated (or run once, without evaluation). When the model's own code fails on it
        outside every quantized layer's forward (it reads a layer's ``.weight``), the layers that cause it are found
        by evidence (:func:`.failing.breaking_layers`), stay float with the reason, are named in an info line, and
        the model is quantized again without them."""
        try:
            return quantized, self._evaluate_once(trainer, run, quantized)
        except LayerFailure:
            raise  # inside a quantized layer: it is named, with `exclude=`
        except Exception:
            found = self._layers_the_code_reads(trainer, run)
            if not found:
                raise
        run.refused.update(found)
        self._code_reads.update(found)
        rank_zero_info(
            f"{self._name}: the model's code reads the weight of {', '.join(found)} directly and fails on their "
            f"quantized form, so they stay float; pass exclude={list(found)!r} to skip this search"
        )
        kept = [name for name in run.names if name not in found]
        quantized, run.names = self._quantize(trainer, run.to_quantize, kept, run.inputs, run.rehearsal, run.refused)
        return quantized, self._evaluate_once(trainer, run, quantized)

    def _evaluate_once(self, trainer: pl.Trainer, run: _Run, quantized: nn.Module) -> dict[str, float]:
        evaluate = self.evaluate and not run.without_data
        with self._timed(run, "evaluate quantized"), naming_the_failing_layer(quantized, run.names, self._name):
            if evaluate:
                return self._evaluation.evaluate(trainer, quantized, run.source)[1]
            if run.inputs:
                run.inputs[0](quantized)  # it runs, at least
        return {}

    def _layers_the_code_reads(self, trainer: pl.Trainer, run: _Run) -> dict[str, str]:
        """The quantized layers whose quantized form makes the model's code fail, with the reason
        (:func:`.failing.layers_the_code_reads`)."""
        probe = self._probe(trainer, run)
        if probe is None:
            return {}

        def quantize_only(subset: list[str]) -> nn.Module:
            return self._quantize(trainer, run.to_quantize, subset, run.inputs, True, dict(run.refused))[0]

        with self._timed(run, "find the layers the model's code reads"):
            return failing.layers_the_code_reads(run.names, quantize_only, probe)

    def _probe(self, trainer: pl.Trainer, run: _Run) -> Any:
        """One run of the model's own code on one batch (its validation on the first batch, else its forward on the
        first input), or ``None`` when there is nothing to run it on."""
        if self.evaluate:
            one = self._evaluation.first_batch(trainer, run.source)
            if one is not None:
                return lambda model: self._evaluation.evaluate(trainer, model, one)
        if run.inputs:
            return lambda model: run.inputs[0](model)
        return None

    def _copy(self, pl_module: pl.LightningModule, rehearsal: bool, full_state: dict[str, Any] | None) -> _Run:
        stages: dict[str, float] = {}
        copy_report = CopyReport()
        with _timed(stages, "copy"):
            float_model, cast_from = float_copy(pl_module, full_state, copy_report)
            names, refused = self._select_layers(float_model)
        if not rehearsal:  # found by the rehearsal: the model's code reads their weight
            refused.update({name: why for name, why in self._code_reads.items() if name in names})
            names = [name for name in names if name not in refused]
        return _Run(rehearsal, stages, copy_report, float_model, cast_from, names, refused, to_quantize=float_model)

    def _evaluate_float(self, trainer: pl.Trainer, pl_module: pl.LightningModule, run: _Run) -> None:
        """Evaluate the float copy, capture the inputs its forward gets, and decide what is traced, compared and
        timed: the rehearsal, and an end of fit that does not evaluate, run on the varied validation batches."""
        example = getattr(pl_module, "example_input_array", None)
        if example is not None:
            example = ModelInput.from_example(example).to("cpu", torch.float32 if run.cast_from is not None else None)
        needs_inputs = self.evaluate or self.shrink or self._why_an_input_is_needed() is not None
        uses_data = self.evaluate or (needs_inputs and example is None)
        if uses_data and (run.rehearsal or not self.evaluate) and run.source is None:
            run.source = self._evaluation.varied_source(trainer)
        elif uses_data and run.source is None and self._streams(trainer):
            per_loader = self._evaluation.uses_validation_step(pl_module)
            limit = self._evaluation.limit(trainer)
            run.source = streamed.read_once(self._evaluation.loaders(trainer), per_loader, limit)
            run.notes.append(
                "the evaluation data is a stream: it was read once, and the float model, the quantized model and "
                "the artifact were evaluated on those same batches"
            )
        run.without_data = run.source is not None and not streamed.has_batches(run.source)
        uses_data = uses_data and not run.without_data
        inputs, before = [], {}
        with self._timed(run, "evaluate float"):
            if uses_data:
                inputs, before = self._evaluation.evaluate(trainer, run.float_model, run.source)
        # Latency is timed on the batches evaluation fed the model, when it fed it any: example_input_array (often a
        # few zeros) can time another workload than the users'. Tracing, shrink and kernels take the example first.
        run.timed, run.timed_on = inputs, "evaluation batches"
        if not inputs and example is not None:
            run.timed, run.timed_on = [example], "example_input_array"
        run.compared = ([example] if example is not None else []) + inputs
        run.inputs = [example] if example is not None else inputs
        if needs_inputs and not run.inputs and not run.without_data:
            raise ValueError(
                "the model's forward was never called during validation, so there is no input to time or trace. "
                "Set `example_input_array` on the LightningModule (a tensor, a tuple of inputs or a dict of keyword "
                "inputs), or call `self(...)` in `validation_step`."
            )
        run.before = before if self.evaluate else {}
        run.headline = _headline(trainer, self.monitor, run.before)
        limit = self._evaluation.limit(trainer)
        if not run.rehearsal and self.evaluate and limit != 1.0:
            run.notes.append(
                f"evaluated on the batches the trainer validates on (limit_val_batches={limit!r} of each validation "
                "loader): the float metrics equal the trainer's last validation of the model"
            )

    def _shrink(self, run: _Run) -> None:
        """Shrink on every input the run has: ``example_input_array`` and each captured validation input (the
        constants of removed channels are read, and the result verified, on all of them). The rehearsal says
        nothing about what it removed: that is the pruned model's, at the end of fit."""
        if not self.shrink:
            return
        inputs = run.compared or run.inputs
        with self._timed(run, "shrink"):
            run.to_quantize, caught = _shrunk(run.float_model, inputs)
        if not run.rehearsal:
            run.notes += _shrink_lines(run.float_model, run.to_quantize, caught, len(inputs))

    def _finish(self, trainer: pl.Trainer, run: _Run, quantized: nn.Module, after: dict[str, float]) -> None:
        """Measure, write the artifact, keep the results on the callback, log, warn and print the summary."""
        comparison, layers, results = self._measure(trainer, run, quantized, after)
        if run.copy_report.describe():
            run.notes.append(run.copy_report.describe())
        # kept before the artifact stage, so that nothing it raises can take them away
        self.quantized_model, self.comparison, self.results = quantized, comparison, results
        if self.save_path is not None:
            with _timed(run.stages, "save artifact", self._name):
                measured, lines = self._save(trainer, run, quantized, results)
            results.update(measured)
            run.notes += lines
        self.layers, self.stage_seconds, self.kept_float = layers, run.stages, run.refused
        self.quantized_layers = [layer.name for layer in layers if layer.quantized]
        report.log_to_loggers(trainer, results)
        for regression in comparison.regressions():
            rank_zero_warn(f"{self._name}: {regression}.")
        notes = run.notes + [
            line for c in trainer.callbacks if isinstance(c, SummaryLines) for line in c.summary_lines()
        ]
        rank_zero_info(
            report.summary_table(
                results,
                self._summary_label(),
                self.layer_sparsity,
                self.baseline_accuracy,
                None,  # the artifact's lines are among the notes, once it was measured
                headline=run.headline,
                comparison=comparison,
                stage_seconds=run.stages,
                layers=layers,
                notes=notes,
                **self._summary_arguments(),
            )
        )
        for callback in trainer.callbacks if comparison.metrics_after else ():
            if isinstance(callback, QuantizedMetricsPlot):  # the pruning plot adds what was measured here
                callback.redraw_plot(trainer, dict(comparison.metrics_after))

    def _measure(
        self, trainer: pl.Trainer, run: _Run, quantized: nn.Module, after: dict[str, float]
    ) -> tuple[figures.Comparison, list[outcomes.LayerOutcome], dict[str, float]]:
        """The comparison of the two models (latency timed now), what each layer became, and the logged figures."""
        with _timed(run.stages, "time latency", self._name):
            timed = run.timed if self.evaluate else []
            compiled = self._compiled_float(run.float_model, timed) if timed else None
            comparison = figures.compare(
                run.float_model,
                quantized,
                run.names,
                timed,
                run.before,
                after,
                LATENCY_ROUNDS,
                LATENCY_BUDGET_S,
                timed_before=compiled,
            )
        layers = self._layer_outcomes(run.to_quantize, quantized, run.refused)
        comparison.cast_from, comparison.timed_on = run.cast_from, run.timed_on if timed else None
        comparison.coverage = outcomes.coverage(layers)
        results = {**figures.results(comparison, run.headline), **self._extra_results()}
        sparsity, self.layer_sparsity = _sparsity(trainer, run.float_model, quantized)
        return comparison, layers, {**results, **sparsity}

    def _save(
        self, trainer: pl.Trainer, run: _Run, quantized: nn.Module, results: dict[str, float]
    ) -> tuple[dict[str, float], list[str]]:
        """The artifact stage; whatever fails in it is a warning: the figures measured and ``quantized_model``
        stay (a late failure never destroys them)."""
        # As Lightning's own checkpointing: nothing is written by a fast_dev_run or while sanity checking.
        if trainer.fast_dev_run or trainer.sanity_checking:
            rank_zero_info(f"{self._name}: fast_dev_run, so no artifact is written to {self.save_path}")
            return {}, []
        try:
            return saving.save(
                self.save_path,
                quantized,
                run.to_quantize,
                run.compared,
                compress=self.compress,
                metadata=self._artifact_metadata(),
                measure=self._artifact_measure(trainer, quantized, run.source),
                headline=run.headline,
                owner=self._name,
                forms=self._artifact_forms,
                timed=run.timed if self.evaluate else [],
                float_model=run.float_model,
                size_mb_before=results.get(report.SIZE_BEFORE),
            )
        except Exception as error:
            rank_zero_warn(
                f"{self._name}: writing the artifact to {self.save_path} failed ({short_error(error, 300)}). Every "
                "figure of the quantized model is measured and logged as usual, and `quantized_model` holds it."
            )
            return {}, [f"artifact: none written to {self.save_path} (it failed; see the warning)"]

    def _artifact_measure(self, trainer: pl.Trainer, quantized: nn.Module, source: Any) -> saving.Measure | None:
        """The artifact evaluated as ``_after`` is (see :meth:`.evaluation.Evaluator.artifact_measure`)."""
        return self._evaluation.artifact_measure(trainer, quantized, source) if self.evaluate else None

    def _timed(self, run: _Run, stage: str) -> contextlib.AbstractContextManager[None]:
        """Time ``stage`` into the run's stages; announced at fit end, quiet in the rehearsal."""
        return _timed(run.stages, stage, None if run.rehearsal else self._name)


@contextlib.contextmanager
def _timed(stages: dict[str, float], stage: str, announce: str | None = None) -> Iterator[None]:
    if announce:
        rank_zero_info(f"{announce}: {stage} ...")
    start = time.perf_counter()
    try:
        yield
    finally:
        stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - start


def _shape_changes(before: nn.Module, after: nn.Module) -> list[str]:
    """Summary lines: the parameter count, and each layer whose weight changed shape, before and after shrinking."""
    lines = [f"shrink: {_count(before):,} -> {_count(after):,} parameters"]
    shapes = {name: tuple(p.shape) for name, p in after.named_parameters() if name.endswith("weight")}
    for name, p in before.named_parameters():
        if name in shapes and shapes[name] != tuple(p.shape):
            lines.append(f"shrink: {name} {tuple(p.shape)} -> {shapes[name]}")
    return lines


def _cpu_copy(batch: Any) -> Any:
    """A batch as the sanity check passed it, copied to the CPU (its tensors may be reused or changed in place)."""
    return apply_to_collection(batch, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))


def _shrunk(model: nn.Module, inputs: list[ModelInput]) -> tuple[nn.Module, list[warnings.WarningMessage]]:
    """:func:`lightning_compress.shrink` on all of ``inputs``, and the ShrinkWarnings it gave (shown as it gave them;
    they also explain a shrink that removed nothing)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ShrinkWarning)
        shrunk = shrink(model, inputs[0], more_inputs=inputs[1:])
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return shrunk, [warning for warning in caught if issubclass(warning.category, ShrinkWarning)]


def _shrink_lines(before: nn.Module, after: nn.Module, caught: list[warnings.WarningMessage], inputs: int) -> list[str]:
    """The summary's lines about shrinking: what changed, or why nothing did."""
    if _count(after) != _count(before):
        note = "shrink: sparsity in the quantized column is over the shrunk weights (removed channels are gone)"
        return [*_shape_changes(before, after), note]
    return [_why_nothing_shrank(before, caught, inputs)]


def _why_nothing_shrank(model: nn.Module, caught: list[warnings.WarningMessage], inputs: int) -> str:
    """The summary's one line when shrink removed no channel, with the reason."""
    zeroed = zeroed_channels(model)
    if not zeroed:
        why = (
            "no output channel of a Linear or convolution has all-zero weights (shrink removes the channels "
            "structured pruning zeroed, e.g. MagnitudePruning(method='ln_structured', dim=0); unstructured zeros "
            "stay as sparsity)"
        )
    elif caught:
        why = f"the {zeroed} zeroed channel(s) stay: {str(caught[0].message).removeprefix('shrink: ')[:240]}"
    else:
        why = (
            f"the {zeroed} zeroed channel(s) stay: they are part of the model's output, or not constant where they "
            f"are consumed on the {inputs} input(s) shrink was given"
        )
    return f"shrink: removed nothing ({_count(model):,} parameters): {why}"


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _gather(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor] | None:
    """Under a sharded strategy, the full state dict on rank zero (a collective); else ``None``."""
    if not compat.is_sharded_strategy(trainer) or not any(isinstance(p, DTensor) for p in pl_module.parameters()):
        return None
    return full_state_dict(pl_module)


def _headline(trainer: pl.Trainer, monitor: str | None, before: dict[str, float]) -> str | None:
    """The metric the summary leads with and ``quantization/accuracy_*`` report: ``monitor``, else the trainer's
    monitored metric, else the first logged metric containing ``acc``."""
    if monitor is not None and before and monitor not in before:
        raise ValueError(
            f"`monitor={monitor!r}` is not among the metrics the module's validation logs: {sorted(before)}"
        )
    if monitor is not None:
        return monitor
    candidates = [report.monitored_metric_name(trainer)]
    candidates += [k for k in before if "acc" in k]
    return next((c for c in candidates if c in before), None)


def _sparsity(
    trainer: pl.Trainer, float_model: nn.Module, quantized: nn.Module
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Fractions of zeros, measured on both models, over what pruning callbacks pruned (see
    :mod:`lightning_compress.protocols`), and per parameter; without one, nothing is reported."""
    pruned = [name for c in trainer.callbacks if isinstance(c, PruningCallback) for name in c.pruned_parameter_names]
    # named as in the uncompiled copy: a compiled submodule's parameters carry `_orig_mod` in their names
    measured = measure.pruned_sparsity(float_model, quantized, [compat.uncompiled_name(n) for n in pruned])
    if measured is None:
        return {}, {}
    before, after, by_name = measured
    return {report.SPARSITY_BEFORE: before, report.SPARSITY_AFTER: after}, by_name
