"""The artifact of a fit: written to ``save_path`` only when, reloaded from disk, it reproduces the quantized model
on every input the run compared and on every call of the run's own evaluation, which measures it
(:func:`lightning_compress.artifacts.write_verified`); its figures (``quantization/<metric>_artifact``, the
compressed size) and the summary's lines about it. Before training, :func:`rehearse` does the same into a scratch
folder, and checks that ``save_path``'s folder can be written.

Knows nothing of how the model was quantized: the callback passes the quantized model, the float model it came
from (which sets the comparison's tolerance) and the header's metadata.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_compress import report
from lightning_compress.artifacts import ArtifactMismatch, write_verified
from lightning_compress.artifacts.verification import CheckedArtifact
from lightning_compress.artifacts.writing import FORMS
from lightning_compress.inputs import ModelInput

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
            forms=forms or FORMS,
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
) -> tuple[dict[str, float], list[str]]:
    """Write the artifact, measured; its figures and the summary's lines about it. When no form reproduces the
    model, nothing is written, a warning says why, and the lines say so: a late failure keeps every other figure."""
    try:
        written = write_verified(
            quantized,
            path,
            inputs,
            compress=compress,
            reference=reference,
            metadata=metadata,
            measure=measure,
            forms=forms or FORMS,
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
    return results, report.artifact_lines(path, written, metrics, headline, evaluated)
