"""``StaticQuantization``: static int8 quantization (calibrated activations) of convolutional networks at the end of
``fit``, through torchao's PT2E, on the machinery every quantization callback shares
(:class:`~lightning_compress.quantization.base.QuantizationCallback`); the plain code is
:mod:`lightning_compress.quantization.static`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_compress import compat
from lightning_compress.artifacts import exported
from lightning_compress.inputs import ModelInput, capture_inputs
from lightning_compress.quantization import measure, outcomes, rehearsal, static
from lightning_compress.quantization.base import QuantizationCallback
from lightning_compress.quantization.config import QuantizationConfig
from lightning_compress.quantization.static import StaticConfig

__all__ = ["StaticQuantization"]


class StaticQuantization(QuantizationCallback):
    """Quantize a copy of the trained model statically to int8 at the end of ``fit`` (weights per channel, activations
    per tensor with ranges calibrated on training batches), compile it, evaluate it, log what it did.

    The flow: float copy → ``torch.export`` (dynamic batch dimension, and the dimensions that vary among the
    captured inputs) → torchao's ``prepare_pt2e`` with ``X86InductorQuantizer`` → calibration on
    ``calibration_batches`` batches of the training dataloader → ``convert_pt2e`` → ``torch.compile`` with inductor's
    freezing (onednn int8 kernels; one compile per input shape, at its first call: seconds on a small CNN, tens of
    seconds on a ResNet-18) → evaluation with the module's own validation → size and latency → artifact → summary.
    A module called at several places (one ``nn.ReLU`` used twice in a residual block) becomes one module per call
    site in the exported copy. Everything else is as in ``DynamicQuantization`` (same machinery): the rehearsal
    before training (export, prepare and convert on real batches, one compile, evaluation, the artifact written and
    reloaded), evaluation through the module's ``validation_step``, random generators and modes restored, the
    summary, logging and artifact verification.

    Args:
        modules: which layers to quantize: ``None`` for every convolution (1-3d) and Linear layer, or layer types
            and/or glob patterns over module names.
        calibration_batches: batches of the training dataloader whose activations set the int8 ranges (through the
            module's ``validation_step`` when it has one, else ``model(batch[0])``). They are drawn from a fresh
            loader made by the datamodule's or module's ``train_dataloader`` hook, with the random generators (and
            the loader's own generator) restored after, so training's data stream and randomness are unchanged.
            The rehearsal calibrates on one batch.
        backend: ``"x86_inductor"`` (torchao's ``X86InductorQuantizer``, int8 onednn kernels through inductor).
        evaluate, metric, dataloader, baseline_accuracy, monitor, exclude, shrink: as in ``DynamicQuantization``.
        save_path: write the quantized program there (``torch.export.save``, a ``.pt2`` file; the float weights
            ``convert_pt2e`` keeps attached are stripped), written only once reloaded from disk it reproduces
            ``quantized_model`` on every captured input shape and through the module's own validation.
            ``lightning_compress.load_quantized`` loads it (where torchao is installed) as a module compiled with
            freezing at its first call of each input shape.

    Logged: the keys of ``DynamicQuantization``, where ``quantization/latency_ms_before`` is the float model compiled
    the same way (exported, ``torch.compile`` with freezing), so the ratio is quantization's own gain, plus
    ``quantization/latency_ms_eager`` (the float model as it is run in eager PyTorch); ``quantization/coverage`` is
    the fraction of the model's parameters in convolutions and Linear layers whose weights run in int8. Not logged
    here: ``quantization/sparsity_before``/``_after`` and the per-weight zeros (the converted program renames the
    weights, so the pruned parameters cannot be matched in it yet).

    Needs ``pip install 'lightning_compress[static]'`` (torchao), checked at construction. One quantization method per
    Trainer: with ``DynamicQuantization`` in the same Trainer, ``setup`` raises.
    """

    def __init__(
        self,
        modules: Sequence[type[nn.Module] | str] | None = None,
        calibration_batches: int = 32,
        backend: Literal["x86_inductor"] = "x86_inductor",
        evaluate: bool = True,
        metric: torchmetrics.Metric | None = None,
        dataloader: Iterable[Any] | None = None,
        save_path: str | os.PathLike | None = None,
        baseline_accuracy: float | None = None,
        monitor: str | None = None,
        exclude: Sequence[str] = (),
        shrink: bool = False,
    ) -> None:
        own = StaticConfig(modules, calibration_batches, backend)
        if save_path is not None and os.fspath(save_path).lower().endswith(".onnx"):
            raise ValueError(
                f"StaticQuantization(save_path={os.fspath(save_path)!r}): StaticQuantization writes a torch.export "
                "program, not ONNX (a static QDQ ONNX artifact is not built yet). Name it '.pt2', or use "
                "DynamicQuantization for an ONNX artifact."
            )
        shared = QuantizationConfig(
            evaluate, metric, dataloader, save_path, baseline_accuracy, False, monitor, exclude, shrink
        )
        super().__init__(shared)
        self.modules, self.calibration_batches, self.backend = own.modules, own.calibration_batches, own.backend
        self.reused_modules: list[str] = []
        self.calibrated_batches = 0  # how many training batches the fit-end calibration ran on
        self._int8: list[str] = []
        self._selected: list[str] = []

    # ------------------------------------------------------------------ how to quantize
    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rehearsal: bool, full_state: Any = None) -> None:
        # The rehearsal compiles once (in _quantize) to prove it works; everything else there runs uncompiled.
        with exported.compiling(not rehearsal):
            super()._run(trainer, pl_module, rehearsal, full_state)

    def _select_layers(self, float_model: nn.Module) -> tuple[list[str], dict[str, str]]:
        self._selected = static.selected_layers(float_model, self.modules, self.exclude)
        return list(self._selected), {}

    def _quantize(
        self,
        trainer: pl.Trainer,
        model: nn.Module,
        names: list[str],
        inputs: list[ModelInput],
        rehearsal: bool,
        refused: dict[str, str],
    ) -> tuple[nn.Module, list[str]]:
        calibration = self._calibration_inputs(trainer, model, 1 if rehearsal else self.calibration_batches)
        program, shapes = static.export(model, [*inputs, *calibration])
        self.reused_modules = static.separate_call_sites(program)
        every = static.selected_layers(model, None, ())
        prepared = static.prepare(program, static.selected_layers(model, self.modules, self.exclude), every)
        static.calibrate(prepared, calibration)
        converted = static.convert(prepared)
        self._int8 = static.int8_layers(converted)
        quantized = static.quantized_module(model, exported.CompiledProgram(converted, shapes))
        if rehearsal:
            with exported.compiling(True):  # one compile proves that inductor lowers the int8 program here
                (inputs or calibration)[0](quantized)
        else:
            self.calibrated_batches = len(calibration)
            fewer = len(calibration) < self.calibration_batches
            asked = f" (calibration_batches={self.calibration_batches}; the training data gave fewer)" if fewer else ""
            rank_zero_info(f"{self._name}: activations calibrated on {len(calibration)} training batch(es){asked}")
            rank_zero_info(
                f"{self._name}: the int8 program is compiled (torch.compile, freezing on) at its first call of each "
                "input shape: seconds for a small CNN, tens of seconds for a ResNet-18"
            )
        return quantized, [n for n in names if n in self._int8]

    def _calibration_inputs(self, trainer: pl.Trainer, model: nn.Module, count: int) -> list[ModelInput]:
        """The forward's inputs on ``count`` training batches, run through the module's own validation (or
        ``model(batch[0])``), without changing training's data stream or random state."""
        batches = _training_batches(trainer, count)
        if not batches:
            raise ValueError(f"{self._name} calibrates on training batches, but the training dataloader is empty")
        captured, _ = capture_inputs(
            model, lambda: self._evaluation.evaluate(trainer, model, rehearsal.Batches(batches)), count
        )
        if not captured:
            raise ValueError(
                f"{self._name}: the model's forward was never called on the calibration batches; call `self(...)` in "
                "`validation_step`"
            )
        return captured

    def _layer_outcomes(
        self, float_model: nn.Module, quantized: nn.Module, refused: dict[str, str]
    ) -> list[outcomes.LayerOutcome]:
        first_owner = {id(p): n for n, p in float_model.named_parameters()}
        found = []
        for name, module in float_model.named_modules():
            own = list(module.named_parameters(recurse=False, remove_duplicate=False))
            if not own:
                continue
            prefix = f"{name}." if name else ""
            counted = sum(p.numel() for n, p in own if first_owner[id(p)] == prefix + n)
            weights = tuple(prefix + n for n, p in own if p.dim() >= 2)
            kind = type(module).__name__
            if name in self._int8:
                found.append(outcomes.LayerOutcome(name, kind, "int8", counted, None, weights))
                continue
            dtypes = "/".join(sorted({str(p.dtype).removeprefix("torch.") for _, p in own}))
            found.append(outcomes.LayerOutcome(name, kind, dtypes, counted, self._float_reason(name, module), weights))
        return found

    def _float_reason(self, name: str, module: nn.Module) -> str:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return "folded into the convolution before it (runs inside its int8 kernel)"
        if not isinstance(module, static.SUPPORTED_MODULES):
            return "static int8 covers convolutions and Linear layers"
        if name not in self._selected:
            excluded = any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)
            return "excluded (`exclude`)" if excluded else "not among `modules`"
        return "the x86 inductor quantizer has no int8 pattern for it here"

    def _compiled_float(self, float_model: nn.Module, inputs: list[ModelInput]) -> nn.Module | None:
        program, shapes = static.export(float_model, inputs)
        compiled = exported.CompiledProgram(program, shapes)
        inputs[0](compiled)  # compiled now, so that the timing's warm-up measures running, not compiling
        return compiled

    @property
    def _artifact_forms(self) -> tuple[str, ...]:
        return exported.FORMS

    def _artifact_metadata(self) -> dict[str, Any]:
        return {"dtype": "int8", "backend": self.backend}

    def _summary_label(self) -> str:
        return "static int8"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not compat.has_train_data(trainer):
            raise ValueError(f"{self._name} calibrates on training batches, but the trainer has no train dataloader")
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            exported.import_int8_lowerings()


def _training_batches(trainer: pl.Trainer, count: int) -> list[Any]:
    """``count`` CPU batches of a fresh training dataloader (the user's hook called again); the loader's and its
    sampler's own generators are restored after (the global ones are restored by the caller's isolation)."""
    loader = compat.train_data_source(trainer).dataloader()
    with _generators_restored(loader):
        return [measure.to_device(b, torch.device("cpu")) for b in itertools.islice(iter(loader), count)]


@contextlib.contextmanager
def _generators_restored(loader: Any) -> Iterator[None]:
    generators = [
        g
        for g in (getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None))
        if isinstance(g, torch.Generator)
    ]
    states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)
