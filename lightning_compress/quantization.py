"""``DynamicQuantization``: post-training dynamic quantization at the end of ``fit``, measured and logged."""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress import measure, report
from lightning_compress.artifact import save_quantized
from lightning_compress.backends import DTYPES, SUPPORTED_MODULES, quantize_dynamic_copy
from lightning_compress.compressed import save_compressed
from lightning_compress.kernels import KernelChoice, build_with_kernels, choose_linear_kernels

#: Latency is timed on (up to) this many evaluation batches.
LATENCY_BATCHES = 32


class QuantizationError(RuntimeError):
    """Quantizing, evaluating or saving failed at the end of fit; the float model and checkpoints are intact."""


class DynamicQuantization(Callback):
    """Quantize a copy of the trained model dynamically at the end of ``fit``, evaluate it, log what it did.

    Weights of the supported layers are quantized ahead of time (int8 or float16); activations are quantized on
    the fly inside those layers. Runs in ``on_fit_end``, after ``MagnitudePruning`` made its masks permanent, on
    rank zero, on the CPU. The LightningModule itself stays float and trainable; the quantized copy is
    ``quantized_model``.

    Args:
        dtype: ``"qint8"`` or ``"float16"`` (``torch.qint8`` / ``torch.float16`` accepted).
        modules: the layer types to quantize; ``None``: every supported type present in the model
            (Linear, LSTM, GRU, LSTMCell, GRUCell, RNNCell).
        evaluate: measure the metric before and after quantization on the evaluation data.
        metric: a torchmetrics ``Metric`` of ``(output, target)``; default: multiclass accuracy of the logits'
            argmax, classes inferred from the output's last dimension.
        dataloader: evaluation data of ``(input, target)`` batches; default: the trainer's validation
            dataloader(s), as the LightningModule/DataModule define them (the full set, also under DDP).
        save_path: write a standalone artifact there (see :func:`lightning_compress.load_quantized`).
        compress: write ``save_path`` in the compressed format (see :mod:`lightning_compress.compressed`): the
            zeros pruning made cost about a bit each; ``load_quantized`` and ``load_compressed`` both read it.
        sparse_kernels: ``"auto"``: for each quantizable Linear, time quantized dense, fp32 sparse (CSR) and fp32
            dense on the activations of a real evaluation batch and keep the fastest (see
            :mod:`lightning_compress.kernels`); ``"off"``: quantize every Linear.
        baseline_accuracy: optional accuracy of a reference model measured elsewhere (say, the same model
            trained without pruning), shown beside the measured figures in the summary table.

    Logged once at the end of fit, to every logger: ``quantization/accuracy_before``,
    ``quantization/accuracy_after`` (with ``evaluate``), ``quantization/size_mb_before``,
    ``quantization/size_mb_after`` (bytes of the serialized state dict / 1e6),
    ``quantization/latency_ms_before``, ``quantization/latency_ms_after`` (median per batch over the evaluation
    data, on the CPU, after warm-up), ``quantization/size_mb_compressed`` (bytes of the compressed artifact / 1e6,
    with ``compress=True``), ``quantization/kernel_speedup/<layer>`` (fp32 dense time / chosen kernel's time,
    with ``sparse_kernels="auto"``), and ``pruning/sparsity`` when a pruning callback ran.
    """

    def __init__(
        self,
        dtype: str | torch.dtype = "qint8",
        modules: set[type[nn.Module]] | None = None,
        evaluate: bool = True,
        metric: torchmetrics.Metric | None = None,
        dataloader: DataLoader | None = None,
        save_path: str | os.PathLike | None = None,
        baseline_accuracy: float | None = None,
        compress: bool = False,
        sparse_kernels: Literal["auto", "off"] = "off",
    ) -> None:
        super().__init__()
        by_dtype = {v: k for k, v in DTYPES.items()}
        if isinstance(dtype, torch.dtype) and dtype in by_dtype:
            dtype = by_dtype[dtype]
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {list(DTYPES)} (or torch.qint8 / torch.float16), got {dtype!r}")
        if modules is not None:
            modules = set(modules)
            unsupported = [m for m in modules if not (isinstance(m, type) and m in SUPPORTED_MODULES)]
            if unsupported or not modules:
                names = ", ".join(getattr(m, "__name__", repr(m)) for m in unsupported) or "an empty set"
                raise ValueError(
                    f"`modules` got {names}, which dynamic quantization cannot quantize. It covers "
                    f"{_names(SUPPORTED_MODULES)}: their weights are quantized ahead of time and activations are "
                    "quantized on the fly inside these layers, so other modules (ReLU, Conv2d, ...) have no "
                    "dynamically quantized form. Use static quantization for convolutions."
                )
        if metric is not None and not isinstance(metric, torchmetrics.Metric):
            raise ValueError(f"`metric` must be a torchmetrics.Metric or None, got {type(metric).__name__}")
        if dataloader is not None and not isinstance(dataloader, Iterable):
            raise ValueError(f"`dataloader` must be an iterable of (input, target) batches, got {dataloader!r}")
        if sparse_kernels not in ("auto", "off"):
            raise ValueError(f"`sparse_kernels` must be one of ['auto', 'off'], got {sparse_kernels!r}")
        self.sparse_kernels = sparse_kernels
        self.kernel_choices: dict[str, KernelChoice] = {}
        if compress and save_path is None:
            raise ValueError("`compress=True` needs `save_path`: it is the format of the saved artifact")
        self.compress = compress
        self.dtype = dtype
        self.modules = modules
        self.evaluate = evaluate
        self.metric = metric
        self.dataloader = dataloader
        self.save_path = os.fspath(save_path) if save_path is not None else None
        self.quantized_model: nn.Module | None = None
        self.baseline_accuracy = baseline_accuracy
        self.results: dict[str, float] = {}
        self.layer_sparsity: dict[str, tuple[float, float]] = {}
        self._module_types: set[type[nn.Module]] = set()

    # ------------------------------------------------------------------ before training: fail fast
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.dataloader is not None or _has_val_data(trainer):
            return
        if self.evaluate:
            raise ValueError(
                "DynamicQuantization(evaluate=True) needs evaluation data, but the trainer has no validation "
                "dataloader. Define `val_dataloader`, pass `val_dataloaders` to `fit`, pass `dataloader=`, or set "
                "`evaluate=False`."
            )
        needs = "save_path=...) traces the model" if self.save_path is not None else None
        if self.sparse_kernels == "auto":
            needs = "sparse_kernels='auto') times kernels"
        if needs:
            raise ValueError(
                f"DynamicQuantization({needs} on one real input batch, but there is no validation dataloader to "
                "take it from. Pass `dataloader=` or provide validation data."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After `configure_model`, so layers created there are seen; still before the first training step.
        present = {type(m) for m in pl_module.modules()}
        wanted = self.modules if self.modules is not None else set(SUPPORTED_MODULES)
        self._module_types = {t for t in wanted if t in present}
        if not self._module_types:
            held = sorted({type(m).__name__ for m in pl_module.modules() if not list(m.children())})
            raise ValueError(
                f"DynamicQuantization would quantize nothing: the model has no {_names(wanted)} module. "
                f"Dynamic quantization covers {_names(SUPPORTED_MODULES)}; the model holds {', '.join(held)}."
            )
        if self.evaluate and trainer.is_global_zero:
            self._dry_run(pl_module, next(iter(self._batches(trainer))))

    def _dry_run(self, pl_module: pl.LightningModule, batch: Any) -> None:
        x, y = measure.split_batch(batch)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.inference_mode():
                output = pl_module(measure.to_device(x, pl_module.device)).cpu()
        finally:
            pl_module.train(was_training)
        metric = self._metric_for(output)
        try:
            metric.update(output, y)
            metric.compute()
        except Exception as error:
            raise ValueError(
                f"The metric {type(metric).__name__} cannot be computed on the model's output (shape "
                f"{tuple(output.shape)}) and the batch's target ({_describe(y)}): {error}. Pass `metric=` that fits."
            ) from error

    def _metric_for(self, output: torch.Tensor) -> torchmetrics.Metric:
        metric = self.metric.clone() if self.metric is not None else measure.default_metric(output)
        # Only rank zero evaluates: a metric that synced across processes would wait for the others forever.
        # torchmetrics reads `_to_sync` (set from the `sync_on_compute` constructor argument) in `compute`.
        metric.sync_on_compute = False
        metric._to_sync = False
        metric.dist_sync_on_step = False
        return metric.to("cpu")

    def _batches(self, trainer: pl.Trainer) -> Iterator[Any]:
        """CPU batches of the evaluation data; the trainer's val data comes without a distributed sampler."""
        loaders = self.dataloader if self.dataloader is not None else _raw_val_dataloaders(trainer)
        if not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        empty = True
        for loader in loaders:
            for batch in loader:
                empty = False
                yield measure.to_device(batch, torch.device("cpu"))
        if empty:
            raise ValueError("DynamicQuantization: the evaluation data is empty")

    # ------------------------------------------------------------------ after training
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        try:
            self._quantize_and_measure(trainer, pl_module)
        except Exception as error:
            raise QuantizationError(
                f"DynamicQuantization failed after training ({type(error).__name__}: {error}). The trained float "
                "model and its checkpoints are intact."
            ) from error

    def _quantize_and_measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        float_model = copy.deepcopy(pl_module).cpu().eval()  # the LightningModule itself is never modified
        results: dict[str, float] = {}
        inputs = []
        if self.evaluate or self.save_path is not None or self.sparse_kernels == "auto":
            inputs = [measure.split_batch(b)[0] for b in itertools.islice(self._batches(trainer), LATENCY_BATCHES)]
        dtype = DTYPES[self.dtype]
        if self.sparse_kernels == "auto" and nn.Linear in self._module_types:
            self.kernel_choices = choose_linear_kernels(float_model, inputs[0], dtype)
            quantized = build_with_kernels(float_model, self.kernel_choices, dtype, self._module_types)
            for name, choice in self.kernel_choices.items():
                results[report.KERNEL_SPEEDUP_PREFIX + name] = choice.speedup
        else:
            quantized = quantize_dynamic_copy(float_model, dtype, self._module_types)
        if self.evaluate:
            metric = self._metric_for(_first_output(float_model, inputs[0]))
            results[report.ACCURACY_BEFORE] = measure.evaluate(float_model, self._batches(trainer), metric)
            results[report.ACCURACY_AFTER] = measure.evaluate(quantized, self._batches(trainer), metric)
            results[report.LATENCY_BEFORE] = measure.latency_ms(float_model, inputs)
            results[report.LATENCY_AFTER] = measure.latency_ms(quantized, inputs)
        results[report.SIZE_BEFORE] = measure.serialized_size_bytes(float_model) / 1e6
        results[report.SIZE_AFTER] = measure.serialized_size_bytes(quantized) / 1e6
        float_weights = dict(float_model.named_parameters())
        quantized_weights = measure.quantized_weights(quantized)
        pruned = [n for n in _pruned_parameter_names(trainer) if n in float_weights and n in quantized_weights]
        float_overall, float_layers = measure.sparsity_by_name({n: float_weights[n] for n in pruned})
        quantized_overall, quantized_layers = measure.sparsity_by_name({n: quantized_weights[n] for n in pruned})
        self.layer_sparsity = {n: (float_layers[n], quantized_layers[n]) for n in pruned}
        if pruned:
            results[report.SPARSITY] = float_overall
            results[report.SPARSITY_AFTER] = quantized_overall
        if self.save_path is not None:
            if self.compress:
                size = save_compressed(quantized, inputs[0], self.save_path, dtype=self.dtype)
                results[report.SIZE_COMPRESSED] = size / 1e6
            else:
                save_quantized(quantized, inputs[0], self.save_path, dtype=self.dtype)
        self.quantized_model = quantized
        self.results = results
        report.log_to_loggers(trainer, results)
        rank_zero_info(
            report.summary_table(
                results, self.dtype, self.layer_sparsity, self.baseline_accuracy, self.save_path, self.kernel_choices
            )
        )


def _first_output(model: nn.Module, x: Any) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def _pruned_parameter_names(trainer: pl.Trainer) -> list[str]:
    """Parameters a pruning callback selected, found by duck typing so the callbacks never import each other."""
    names: list[str] = []
    for callback in trainer.callbacks:
        names.extend(getattr(callback, "parameter_names", []))
    return names


def _has_val_data(trainer: pl.Trainer) -> bool:
    source = trainer.fit_loop.epoch_loop.val_loop._data_source
    return source.is_defined() and trainer.limit_val_batches != 0


def _raw_val_dataloaders(trainer: pl.Trainer) -> Any:
    # The user's own dataloader(s), before Lightning injects a DistributedSampler: rank zero evaluates them all.
    return trainer.fit_loop.epoch_loop.val_loop._data_source.dataloader()


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
