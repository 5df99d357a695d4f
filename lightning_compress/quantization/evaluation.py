"""Evaluating a model the way the run evaluates it: with the LightningModule's own validation (``validation_step``
and what it logs, through Lightning), or, without one, on ``(input, target)`` batches with a torchmetrics metric;
and the inputs its forward received, for timing and tracing (:class:`Evaluator`).

A quiet inner ``Trainer(...).validate`` on the CPU runs the module's own code on its own batches (dicts, several
inputs, ``ModelOutput``s: whatever the module handles), so nothing about the user's model has to be rewritten and
no evaluation loop of ours has to guess the batch layout. An artifact is evaluated the same way, run in place of
the model's forward (:meth:`Evaluator.artifact_measure`). Knows nothing of how a model is quantized.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress import compat
from lightning_compress.artifacts.verification import CheckedArtifact, short_error
from lightning_compress.inputs import ModelInput, capture_inputs
from lightning_compress.quantization import measure, rehearsal, streamed

#: Inputs the model's forward receives during an evaluation that are kept (for latency and tracing), at most.
CAPTURED_INPUTS = 32


def has_validation_step(module: pl.LightningModule) -> bool:
    return isinstance(module, pl.LightningModule) and is_overridden("validation_step", module, pl.LightningModule)


def validate(module: pl.LightningModule, dataloaders: Any, limit_batches: int | float = 1.0) -> dict[str, float]:
    """Every metric ``module`` logs in its validation, over ``dataloaders`` (or the first ``limit_batches``).

    Runs on the CPU, in a Trainer of its own with no logger, checkpoint, progress bar or callback of the user's:
    nothing is written anywhere and nothing is printed (the outer Trainer's bar is the only one the user sees; in
    one run with these inner TQDM bars, the latency timed next read 24 ms per batch instead of 0.05 ms). Metrics
    of several dataloaders keep Lightning's ``/dataloader_idx_N`` suffixes. The module's torchmetrics never sync
    across processes (only one process evaluates after a distributed fit).
    """
    for metric in module.modules():
        if isinstance(metric, torchmetrics.Metric):
            compat.never_sync(metric)
    compat.forget_metric_attributes(module)
    with quiet_lightning():
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            limit_val_batches=limit_batches,
        )
        # The module is a copy of a configured one whose data is prepared: its `configure_model` (where FSDP2 users
        # call fully_shard, and others build layers) and `prepare_data` must not run again in this Trainer. Under
        # DDP or FSDP only rank zero is here, and Lightning wraps `prepare_data` in a barrier of every rank.
        # LightningModule's own no-op hooks, bound to the module: Lightning then sees them as not overridden
        for hook in _DONE_HOOKS:
            setattr(module, hook, types.MethodType(getattr(pl.LightningModule, hook), module))
        try:
            results = trainer.validate(module, dataloaders=dataloaders, verbose=False)
        finally:
            for hook in _DONE_HOOKS:
                delattr(module, hook)
    merged: dict[str, float] = {}
    for per_dataloader in results:
        merged.update({name: float(value) for name, value in per_dataloader.items()})
    return merged


# Hooks whose work the outer Trainer did: layers built (and, for an FSDP2 model, the copy unsharded), data prepared.
_DONE_HOOKS = ("configure_model", "prepare_data")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's start-up lines (devices, tips) and its data-loading advice for an inner Trainer."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*GPU available but not used.*")
            warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
            # Lightning 2.6's own use of torch's pytree under torch 2.13; nothing the user can act on
            warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
            yield
    finally:
        logger.setLevel(level)


@dataclasses.dataclass
class Evaluator:
    """How a run evaluates a model: with the module's own validation when it has a ``validation_step`` (and
    neither ``metric`` nor ``dataloader`` is given), else on ``(input, target)`` batches of ``dataloader`` (default:
    the trainer's validation data, without a distributed sampler) with ``metric`` (default: multiclass accuracy of
    the argmax, reported as ``accuracy``). ``owner`` names the callback in messages."""

    metric: torchmetrics.Metric | None = None
    dataloader: Iterable[Any] | None = None
    owner: str = "DynamicQuantization"

    def uses_validation_step(self, module: nn.Module) -> bool:
        return self.metric is None and self.dataloader is None and has_validation_step(module)

    def evaluate(
        self, trainer: pl.Trainer, model: nn.Module, source: Any = None
    ) -> tuple[list[ModelInput], dict[str, float]]:
        """Metrics of ``model`` on the evaluation data (``source``: the varied batches of :meth:`varied_source`;
        ``None``: all of it) and the inputs its forward got (up to ``CAPTURED_INPUTS``)."""
        if self.uses_validation_step(model):
            loaders = source if source is not None else compat.raw_val_dataloaders(trainer)
            limit = self.limit(trainer) if source is None else 1.0
            return capture_inputs(model, lambda: validate(model, loaders, limit), CAPTURED_INPUTS)
        batches = source if source is not None else self.batches(trainer)
        return capture_inputs(model, lambda: {"accuracy": self.metric_value(model, batches)}, CAPTURED_INPUTS)

    def limit(self, trainer: pl.Trainer) -> int | float:
        """How many batches of each of the trainer's validation loaders an evaluation of all of them reads: the
        trainer's ``limit_val_batches``, so that ``_before`` is measured on the batches the trainer validates on (a
        ``dataloader=`` of the user's is read whole)."""
        return trainer.limit_val_batches if self.dataloader is None else 1.0

    def streams(self, trainer: pl.Trainer) -> list[str]:
        """The evaluation loaders that reading would change (:func:`lightning_compress.quantization.rehearsal.
        is_stream`), described; the rehearsal must not read them."""
        return rehearsal.streams(self.loaders(trainer))

    def loaders(self, trainer: pl.Trainer) -> Any:
        """The loader(s) evaluation reads: the trainer's validation dataloader(s), or ``dataloader``."""
        uses_own = self.uses_validation_step(trainer.lightning_module) or self.dataloader is None
        return compat.raw_val_dataloaders(trainer) if uses_own else self.dataloader

    def first_batch(self, trainer: pl.Trainer, source: Any = None) -> Any:
        """The first batch of the evaluation data (``source`` as in :meth:`evaluate`), in the form :meth:`evaluate`
        takes; ``None`` when there is none."""
        if self.uses_validation_step(trainer.lightning_module):
            loaders = source if source is not None else compat.raw_val_dataloaders(trainer)
            if isinstance(loaders, dict):
                loaders = list(loaders.values())
            first = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        else:
            first = source if source is not None else self.batches(trainer)
        batch = next(iter(first), None)
        return None if batch is None else rehearsal.Batches([batch])

    def varied_source(self, trainer: pl.Trainer) -> Any:
        """The first, the last and the differently shaped batches of each evaluation loader
        (:func:`lightning_compress.quantization.rehearsal.varied_batches`), in the form :meth:`evaluate` takes."""
        if self.uses_validation_step(trainer.lightning_module):
            return rehearsal.varied_loaders(compat.raw_val_dataloaders(trainer))
        return rehearsal.Batches(self.batches(trainer, varied=True))

    def metric_value(self, model: nn.Module, batches: Iterable[Any]) -> float:
        """``metric`` over ``(input, target)`` batches of ``model(input)``; errors say which part does not fit."""
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

    def batches(self, trainer: pl.Trainer, varied: bool = False) -> Iterator[Any]:
        """CPU batches of the evaluation data (with ``varied``, those of
        :func:`lightning_compress.quantization.rehearsal.varied_batches`)."""
        source = self.dataloader if self.dataloader is not None else compat.raw_val_dataloaders(trainer)
        is_loaders = isinstance(source, (list, tuple)) and source and all(isinstance(s, DataLoader) for s in source)
        loaders = source if is_loaders else [source]
        limit = self.limit(trainer)
        empty = True
        for loader in loaders:
            for batch in rehearsal.varied_batches(loader) if varied else streamed.limited(loader, limit):
                empty = False
                yield measure.to_device(batch, torch.device("cpu"))
        if empty:
            raise ValueError(f"{self.owner}: the evaluation data is empty")

    def artifact_measure(
        self, trainer: pl.Trainer, quantized: nn.Module, source: Any
    ) -> Callable[[CheckedArtifact], dict[str, float]]:
        """How to evaluate an artifact as the quantized model is evaluated: the same validation (or metric), run
        with the artifact in place of the quantized model's forward (``source`` as in :meth:`evaluate`)."""
        if self.uses_validation_step(quantized):
            loaders = source if source is not None else compat.raw_val_dataloaders(trainer)

            def validate_artifact(checked: CheckedArtifact) -> dict[str, float]:
                # a shallow copy (same layers) runs the artifact; the quantized model stays what it is compared with
                runner = copy.copy(quantized)
                with _forward_replaced(runner, checked):
                    return validate(runner, loaders, self.limit(trainer) if source is None else 1.0)

            return validate_artifact

        def metric(checked: CheckedArtifact) -> dict[str, float]:
            batches = source if source is not None else self.batches(trainer)
            return {"accuracy": self.metric_value(_Calling(checked), batches)}

        return metric


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


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}, dtype {value.dtype}"
    return type(value).__name__


class LayerFailure(ValueError):
    """Raised inside a quantized layer's own forward (see :func:`naming_the_failing_layer`)."""


@contextlib.contextmanager
def naming_the_failing_layer(model: nn.Module, names: list[str], owner: str = "DynamicQuantization") -> Iterator[None]:
    """Run the body; when it raises inside one of the named (quantized) layers of ``model``, raise a
    ``ValueError`` that names the innermost one and how to leave it in float (``owner``'s ``exclude=``)."""
    active: list[str] = []
    modules = dict(model.named_modules())
    handles = []

    def entered(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            active.append(name)

        return hook

    def left(*_: Any) -> None:  # a forward hook that returns nothing leaves the output as it is
        active.pop()

    for name in (n for n in names if n in modules):  # a compiled program has no modules of the float names
        handles.append(modules[name].register_forward_pre_hook(entered(name)))
        handles.append(modules[name].register_forward_hook(left))
    try:
        yield
    except Exception as error:
        if not active:
            raise
        name = active[-1]
        raise LayerFailure(
            f"the quantized layer {name!r} ({type(modules[name]).__name__}) fails on its input "
            f"({short_error(error, 160)}). Leave it in float with {owner}(exclude=[{name!r}])"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
