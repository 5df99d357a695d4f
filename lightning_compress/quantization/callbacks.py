"""The quantization callbacks users add to a ``Trainer``: each says only how to quantize; everything else (the
rehearsal before training, evaluation with the module's own validation, the figures, the artifact measured, the
summary) is their base, :class:`lightning_compress.quantization.base.QuantizationCallback`.

* :class:`DynamicQuantization`: weights quantized ahead of time, activations on the fly, in Linear and RNN layers
  (torch.ao, :mod:`lightning_compress.quantization.dynamic`), with an optional per-Linear kernel choice
  (:mod:`lightning_compress.quantization.kernels`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn

from lightning_compress import report
from lightning_compress.inputs import ModelInput
from lightning_compress.quantization import dynamic, kernels, outcomes
from lightning_compress.quantization.base import LATENCY_BUDGET_S, QuantizationCallback, QuantizationError
from lightning_compress.quantization.config import QuantizationConfig
from lightning_compress.quantization.dynamic import DTYPES, DynamicConfig
from lightning_compress.quantization.kernels import KernelChoice

__all__ = ["LATENCY_BUDGET_S", "DynamicQuantization", "QuantizationError"]


class DynamicQuantization(QuantizationCallback):
    """Quantize a copy of the trained model dynamically at the end of ``fit``, evaluate it, log what it did.

    Weights of the supported layers are quantized ahead of time (int8 or float16); activations are quantized on the fly
    inside those layers. Runs in ``on_fit_end``, after ``MagnitudePruning`` made its masks permanent, on rank zero, on
    the CPU, on a float32 copy (:mod:`~lightning_compress.quantization.copying`: without ``torch.compile`` wrappers,
    other tools' hooks or reparametrizations; what cannot be copied is shared). The LightningModule itself stays as it
    is and trainable; the quantized copy is ``quantized_model``; layers the backend cannot take stay float, with the
    reason in ``kept_float`` and the summary. Before the first training step the whole path is rehearsed on the first,
    the last and the differently shaped validation batches (copy, quantize, evaluate, write the artifact, reload and
    measure it, check ``save_path``'s folder), so what would fail at the end of fit fails at the start. Random
    generators, modes and the trainer's metrics are restored around all of it. Under ``ModelParallelStrategy`` with
    FSDP2, every rank takes part in gathering the full state dict, and the copy is a plain, unsharded module holding it.

    Evaluation: when the module has a ``validation_step`` (and neither ``metric`` nor ``dataloader`` is given), the
    float and the quantized copy are evaluated with it on the validation data, through Lightning, and every metric
    it logs is reported as ``quantization/<name>_before`` / ``_after``. Otherwise batches are ``(input, target)``
    and ``metric`` (default: multiclass accuracy of the argmax) is computed, reported as ``accuracy``.

    Args:
        dtype: ``"qint8"`` or ``"float16"`` (``torch.qint8`` / ``torch.float16`` accepted).
        modules: what to quantize: ``None`` for every supported layer (Linear, LSTM, GRU, LSTMCell, GRUCell,
            RNNCell, and the Linear layers in disguise of :mod:`~lightning_compress.quantization.linear_like`:
            transformers' ``Conv1D``, Linear subclasses that keep ``Linear.forward``, parametrized Linears), or layer
            types and/or glob patterns over module names (e.g. ``["encoder.*"]``). A layer whose weight is tied to
            another module (GPT-2's ``lm_head``) stays float, with the reason in the summary, unless a pattern here
            names it (its weight is then stored twice; see
            :func:`~lightning_compress.quantization.dynamic.tied_layers`).
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
            :func:`~lightning_compress.quantization.kernels.choose_kernel`); ``"off"``: quantize every selected Linear.
        monitor: the headline metric, a name the module logs in its validation (as in ModelCheckpoint and
            EarlyStopping): ``quantization/accuracy_before``/``_after`` are its values and the summary leads with
            it. ``None``: the trainer's ModelCheckpoint/EarlyStopping ``monitor`` when logged, else the first
            logged metric containing ``acc``.
        exclude: glob patterns over module names to leave in float (e.g. ``["classifier"]``).
        shrink: before quantizing, remove the channels that structured pruning zeroed (see
            :func:`lightning_compress.shrink`), so that the artifact, the size and the latency are the shrunk model's.
            Needs ``pip install 'lightning_compress[shrink]'``.
        artifact_format: the format of ``save_path``: ``"torchscript"`` (the quantized model, traced or scripted)
            or ``"onnx"`` (the float model exported to ONNX and quantized by ONNX Runtime, int8 weights, see
            :mod:`lightning_compress.artifacts.onnx_format`; needs ``pip install 'lightning_compress[onnx]'``);
            ``None``: chosen by the suffix (``.onnx``: ONNX, anything else: TorchScript).

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
    metric and ``quantization/accuracy_artifact`` (the headline metric), ``quantization/size_mb_artifact`` (the
    file's bytes / 1e6) and ``quantization/latency_ms_artifact`` (median per batch, timed interleaved with the float
    model on the same batches as ``_before``).

    After fit, ``layers`` lists every module that holds parameters as it ended (a
    :class:`~lightning_compress.quantization.outcomes.LayerOutcome`: its dtype in the quantized model and, for a
    float one, why), and the summary table shows the same, weight by weight.
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
        artifact_format: Literal["torchscript", "onnx"] | None = None,
    ) -> None:
        own = DynamicConfig(dtype, modules, sparse_kernels)
        super().__init__(
            QuantizationConfig(
                evaluate,
                metric,
                dataloader,
                save_path,
                baseline_accuracy,
                compress,
                monitor,
                exclude,
                shrink,
                artifact_format,
            )
        )
        self.dtype, self.modules, self.sparse_kernels = own.dtype, own.modules, own.sparse_kernels
        if self._artifact_forms == ("onnx",) and self.dtype != "qint8":
            raise ValueError(
                f"`dtype={self.dtype!r}` with an ONNX artifact: ONNX Runtime's dynamic quantization writes int8 "
                "weights only. Use dtype='qint8', or a TorchScript `save_path` (e.g. 'model.ts')"
            )
        chosen = {"modules": self.modules is not None, "exclude": bool(self.exclude)}
        chosen["sparse_kernels='auto'"] = self.sparse_kernels == "auto"
        if self._artifact_forms == ("onnx",) and any(chosen.values()):
            # ONNX Runtime quantizes the exported float graph on its own (every MatMul/Gemm it supports): the file
            # would not be the quantized model these settings shape and the figures describe.
            raise ValueError(
                f"{', '.join(k for k, v in chosen.items() if v)} with an ONNX artifact: ONNX Runtime quantizes the "
                "exported float model itself, so the file would not hold the layers these settings choose. Drop "
                "them, or write a TorchScript `save_path` (e.g. 'model.ts')"
            )
        self.kernel_choices: dict[str, KernelChoice] = {}

    # ------------------------------------------------------------------ how to quantize
    def _select_layers(self, float_model: nn.Module) -> tuple[list[str], dict[str, str]]:
        names = dynamic.select_modules(float_model, self.modules, self.exclude)
        refused = dynamic.known_refusals(float_model, names)
        return _without(names, refused), refused

    def _quantize(
        self,
        trainer: pl.Trainer,
        model: nn.Module,
        names: list[str],
        inputs: list[ModelInput],
        rehearsal: bool,
        refused: dict[str, str],
    ) -> tuple[nn.Module, list[str]]:
        """The quantized model, with the layers the backend cannot convert, or whose quantized form fails on its
        real input, left in float (added to ``refused`` with the reason); and the names of those quantized."""
        dtype = DTYPES[self.dtype]
        try:
            quantized = self._quantize_layers(model, dtype, names, inputs, rehearsal)
        except Exception:
            failing = dynamic.unconvertible_layers(model, names, dtype)
            if not failing:
                raise
            refused.update(failing)
            names = _without(names, failing)
            quantized = self._quantize_layers(model, dtype, names, inputs, rehearsal)
        failing = dynamic.failing_layers(model, quantized, names, inputs[0]) if inputs else {}
        if failing:
            refused.update(failing)
            names = _without(names, failing)
            quantized = self._quantize_layers(model, dtype, names, inputs, rehearsal)
        return quantized, names

    def _quantize_layers(
        self, model: nn.Module, dtype: torch.dtype, names: list[str], inputs: list[ModelInput], rehearsal: bool
    ) -> nn.Module:
        if self.sparse_kernels == "auto" and not rehearsal:
            self.kernel_choices = kernels.choose_linear_kernels(model, inputs[0], dtype, names)
            return kernels.build_with_kernels(model, self.kernel_choices, dtype, names)
        return dynamic.quantize(model, dtype, names)

    def _layer_outcomes(
        self, float_model: nn.Module, quantized: nn.Module, refused: dict[str, str]
    ) -> list[outcomes.LayerOutcome]:
        return outcomes.layer_outcomes(float_model, quantized, self.modules, self.exclude, self.kernel_choices, refused)

    def _artifact_metadata(self) -> dict[str, Any]:
        return {"dtype": self.dtype}

    def _summary_label(self) -> str:
        return self.dtype

    def _extra_results(self) -> dict[str, float]:
        return {report.KERNEL_SPEEDUP_PREFIX + name: choice.speedup for name, choice in self.kernel_choices.items()}

    def _summary_arguments(self) -> dict[str, Any]:
        return {"kernel_choices": self.kernel_choices}

    def _why_an_input_is_needed(self) -> str | None:
        if self.sparse_kernels == "auto":
            return "sparse_kernels='auto') times kernels"
        return super()._why_an_input_is_needed()


def _without(names: list[str], refused: dict[str, str]) -> list[str]:
    kept = [name for name in names if name not in refused]
    if not kept:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in refused.items())
        raise ValueError(f"DynamicQuantization would quantize nothing: the backend cannot take {reasons}")
    return kept
