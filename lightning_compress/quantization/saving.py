"""The artifact of a fit: written to ``save_path`` only when, reloaded from disk, it reproduces the quantized model
on every input the run compared and on every call of the run's own evaluation, which measures it
(:func:`lightning_compress.artifacts.write_verified`); its figures (``quantization/<metric>_artifact``, its size
and latency, the compressed size) and the summary's lines about it (why a file larger than the float state dict
is, measured). Before training, :func:`rehearse` does the same into a scratch
folder, and checks that ``save_path``'s folder can be written.

Knows nothing of how the model was quantized: the callback passes the quantized model, the float model it came
from (which sets the comparison's tolerance) and the header's metadata.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchmetrics
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_compress import report
from lightning_compress.artifacts import ArtifactMismatch, write_verified
from lightning_compress.artifacts.verification import CheckedArtifact
from lightning_compress.artifacts.writing import FORMATS
from lightning_compress.inputs import ModelInput
from lightning_compress.quantization import figures

#: Rounds and about how many seconds of timing the artifact against the float model: half the fit's own budget
#: (the float model is timed again beside it, so that the ratio is measured side by side).
LATENCY_ROUNDS = 5
LATENCY_BUDGET_S = 10.0

Measure = Callable[[CheckedArtifact], dict[str, float]]


def rehearse(
    path: str,
    quantized: nn.Module,
    reference: nn.Module,
    inputs: Sequence[ModelInput],
    compress: bool,
    metadata: dict[str, Any],
    measure: Measure | None,
    forms: Sequence[str] | None = None,
) -> None:
    """Check that ``path``'s folder can be written, then write, reload and measure the artifact in a scratch folder
    on ``inputs`` (the rehearsal's). Raises ``ValueError`` for the folder, ``ArtifactMismatch`` when no form
    reproduces the model."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"`save_path={path!r}`: its folder cannot be written ({error})") from error
    if not inputs:
        return
    with tempfile.TemporaryDirectory() as scratch:
        write_verified(
            quantized,
            os.path.join(scratch, "rehearsal"),
            inputs,
            compress=compress,
            reference=reference,
            metadata=metadata,
            measure=measure,
            forms=forms,
        )


def save(
    path: str,
    quantized: nn.Module,
    reference: nn.Module,
    inputs: Sequence[ModelInput],
    *,
    compress: bool,
    metadata: dict[str, Any],
    measure: Measure | None,
    headline: str | None,
    owner: str,
    forms: Sequence[str] | None = None,
    timed: Sequence[ModelInput] = (),
    float_model: nn.Module | None = None,
    size_mb_before: float | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Write the artifact, measured; its figures and the summary's lines about it. When no form reproduces the
    model, nothing is written, a warning says why, and the lines say so: a late failure keeps every other figure.

    Figures: ``quantization/<metric>_artifact`` (its evaluation), ``quantization/size_mb_artifact`` (the file),
    ``quantization/latency_ms_artifact`` (timed on ``timed`` interleaved with ``float_model``), and the compressed
    size. When the file is larger than the float state dict (``size_mb_before``), a line says why, measured."""
    try:
        written = write_verified(
            quantized,
            path,
            inputs,
            compress=compress,
            reference=reference,
            metadata=metadata,
            measure=measure,
            forms=forms,
        )
    except ArtifactMismatch as error:
        rank_zero_warn(
            f"{owner}: no artifact was written to {path}: {error}. Every figure of the quantized model is measured "
            "and logged as usual, and `quantized_model` holds it."
        )
        return {}, [f"artifact: none written to {path} (no form reproduced the model; see the warning)"]
    evaluated = measure is not None
    metrics = written.measured if evaluated and written.calls else {}
    results = {f"quantization/{name}_artifact": value for name, value in metrics.items()}
    if headline in metrics:
        results[report.ACCURACY_ARTIFACT] = metrics[headline]
    if compress:
        results[report.SIZE_COMPRESSED] = written.size / 1e6
    results[report.SIZE_ARTIFACT] = written.size / 1e6
    lines = report.artifact_lines(path, written, metrics, headline, evaluated)
    if timed and float_model is not None and written.artifact is not None:
        float_latency, latency = figures.interleaved_latency(
            [float_model, written.artifact], timed, LATENCY_ROUNDS, LATENCY_BUDGET_S
        )
        results[report.LATENCY_ARTIFACT] = latency.median_ms
        ratio = float_latency.median_ms / latency.median_ms
        lines.append(
            f"artifact latency: {latency.median_ms:.3f} ms per batch (round medians "
            f"{latency.low_ms:.3f}-{latency.high_ms:.3f}) against {float_latency.median_ms:.3f} ms for the float "
            f"model timed alongside on the same {latency.batches} batch(es), {ratio:.2f}x"
        )
    if size_mb_before is not None and written.size / 1e6 > size_mb_before:
        lines.append(_why_larger(path, written.size, size_mb_before, reference if _quantizes(forms) else quantized))
    return results, lines


def _quantizes(forms: Sequence[str] | None) -> bool:
    return forms is not None and any(getattr(FORMATS[f], "QUANTIZES", False) for f in forms)


def _why_larger(path: str, size: int, size_mb_before: float, model: nn.Module) -> str:
    """Why the file is larger than the float state dict, measured: the tensors the model holds as plain attributes
    (not parameters or buffers, so not in the state dict), which TorchScript stores as constants."""
    constants = _constants_bytes(path)
    held = plain_tensor_attributes(model)
    if constants is not None:  # TorchScript stores only the attributes its code uses, as constants
        held = [(name, nbytes) for name, nbytes in held if 0 < nbytes <= constants]
    what = (
        "tensors held as plain attributes, outside the state dict, stored in the file as constants: "
        + ", ".join(f"{name} ({nbytes / 1e6:.3f} MB)" for name, nbytes in held[:5])
        + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        if held
        else "no tensor outside the state dict; the difference is the format's own layout (code, graph, headers)"
    )
    stored = f"; its constants take {constants / 1e6:.3f} MB" if constants else ""
    return (
        f"artifact: {size / 1e6:.3f} MB on disk, larger than the float state dict ({size_mb_before:.3f} MB): {what}"
        f"{stored}. Register such tensors as buffers (register_buffer(..., persistent=False) keeps them out of "
        "checkpoints) to have them counted in the model's size"
    )


def plain_tensor_attributes(model: nn.Module) -> list[tuple[str, int]]:
    """``(name, bytes)`` of every tensor a module of ``model`` holds as a plain attribute (not a parameter or a
    buffer), largest first; a tensor shared by several modules counted once."""
    found: dict[int, tuple[str, int]] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, torchmetrics.Metric):  # its states are attributes, but no forward uses them
            continue
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and id(value) not in found:
                name = f"{prefix}.{key}" if prefix else key
                found[id(value)] = (name, value.numel() * value.element_size())
    return sorted(found.values(), key=lambda item: -item[1])


def _constants_bytes(path: str) -> int | None:
    """Bytes of a TorchScript archive's ``constants/`` storages (``None`` for another format)."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        return sum(i.file_size for i in z.infolist() if "/constants/" in i.filename)
