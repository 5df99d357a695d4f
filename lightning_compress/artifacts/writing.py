"""Writing an artifact that is known to reproduce its model: :func:`write_verified`, and the two functions users
call, :func:`save_quantized` and :func:`save_compressed`.

For each form in turn (the format module that makes it is in :data:`FORMATS`): made from the model, written beside
the path, loaded back from disk with :func:`lightning_compress.artifacts.load_quantized`, compared with the model
on every input given and on every call a measurement makes (:mod:`lightning_compress.artifacts.verification`); the
first that reproduces is renamed to the path, and nothing is left there when none does. Knows nothing of callbacks
or Lightning: ``DynamicQuantization`` passes its measurement (the module's own validation) as ``measure``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import uuid
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import nn

from lightning_compress.artifacts import compressed, exported, headers, onnx_format, torchscript
from lightning_compress.artifacts.loading import load_quantized
from lightning_compress.artifacts.verification import (
    ArtifactMismatch,
    CheckedArtifact,
    FormError,
    Reference,
    other_shapes,
    short_error,
)
from lightning_compress.inputs import ModelInput

#: The module that makes, calls and reads each form (a new format adds its forms here).
FORMATS: dict[str, ModuleType] = {"trace": torchscript, "script": torchscript, "onnx": onnx_format, "pt2": exported}
#: The forms tried by default, in order.
FORMS = torchscript.FORMS
_UNBOUNDED = 2**63 - 1  # reading back a file we have just written
# TracerWarnings raised in these files are about library code (torch, ours, installed packages such as
# transformers, whose traces the comparison checks), not the user's
_INSTALLED = re.compile(r"[/\\](site|dist)-packages[/\\]")
_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def save_quantized(
    model: nn.Module, example_input: Any, path: str | os.PathLike, reference: nn.Module | None = None, **metadata: Any
) -> str:
    """Write a standalone artifact of ``model`` to ``path``, verified on ``example_input``; returns its form.

    ``example_input`` follows Lightning's ``example_input_array`` convention (a tensor, a tuple of positional
    inputs, or a dict of keyword inputs) or is a :class:`lightning_compress.inputs.ModelInput`. The artifact is
    called as ``model``'s forward is called, positionally or by its parameters' names (``artifact(x, mask=m)``;
    inputs caught by ``*args`` are named ``input_0``, ...; non-tensor inputs left at their default are not
    inputs of a traced artifact) and returns tensors, tuples of them, or dicts of them (a ``ModelOutput`` or
    dataclass comes back as a dict of its non-None fields). ``reference``: the float model ``model`` was quantized
    from, which sets the tolerance of the comparison (see :mod:`lightning_compress.artifacts.verification`);
    without it the artifact must agree to float precision. ``metadata``: strings and numbers stored in the header.

    Raises:
        ArtifactMismatch: no form reproduces the model on ``example_input``; the message says why for each form.
            Nothing is left at ``path``.
    """
    example = ModelInput.from_example(example_input)
    return write_verified(model, path, [example], reference=reference, metadata=metadata).form


def save_compressed(
    model: nn.Module, example_input: Any, path: str | os.PathLike, reference: nn.Module | None = None, **metadata: Any
) -> int:
    """As :func:`save_quantized`, in the format of :mod:`lightning_compress.artifacts.compressed` (the zeros pruning
    made cost about a bit each); returns the file's size in bytes."""
    example = ModelInput.from_example(example_input)
    return write_verified(model, path, [example], compress=True, reference=reference, metadata=metadata).size


@dataclasses.dataclass
class Written:
    """What :func:`write_verified` kept: the form, the file's size, the inputs compared (described by their
    shapes), what ``measure`` returned for it and how many calls it made, and why each earlier form was not kept.
    ``artifact``: the file as loaded back, called as the model is (timing it); ``tolerance``: the fraction of each
    output's largest magnitude it was allowed to differ by, when its format quantized the float model itself (ONNX);
    ``caveat``: what the kept form may not reproduce, in one line (also warned); ``replaced``: an older file was
    there."""

    form: str
    size: int
    compared: list[str]
    measured: Any
    calls: int
    rejected: dict[str, str]
    artifact: nn.Module | None = None
    tolerance: float | None = None
    caveat: str | None = None
    replaced: bool = False


def write_verified(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: Sequence[ModelInput],
    compress: bool = False,
    reference: nn.Module | None = None,
    metadata: dict[str, Any] | None = None,
    measure: Callable[[CheckedArtifact], Any] | None = None,
    forms: Sequence[str] | None = None,
) -> Written:
    """Write the first form of ``model`` that reproduces it to ``path``.

    For each form: made from ``model`` (traced on ``inputs[0]``), written to a temporary file in ``path``'s folder,
    loaded back from that file with :func:`load_quantized`, and compared with ``model`` on every input of
    ``inputs``, on inputs of other shapes made from ``inputs[0]`` (its first row; its rows plus the first; its
    first half along dimension 1: :func:`~lightning_compress.artifacts.verification.other_shapes`), and then on
    every call ``measure(checked)`` makes (e.g. the module's own validation run through the artifact), see
    :class:`lightning_compress.artifacts.verification.CheckedArtifact`. The first that reproduces is renamed to
    ``path``; a form that raises or differs is removed and the next one tried. A trace that reproduces, while
    torch warned about the user's code that it might not generalize (``TracerWarning``), is kept only when no
    later form (the script) reproduces too; it is then kept with a one-line warning naming that code and the
    shapes it was verified on.

    ``forms``: default :func:`default_forms` of ``path`` (``.onnx``: the ONNX format, which exports ``reference``,
    the float model, when given, else ``model``, and quantizes it with ONNX Runtime; otherwise TorchScript).

    Raises:
        ArtifactMismatch: no form reproduces the model; the message gives each form's reason, with the inputs'
            shapes. Nothing is left at ``path``, not even an older file (the message says when one was removed).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    metadata = dict(metadata or {})
    problem = headers.scalar_problem(metadata, "metadata")
    if problem or not inputs:
        raise ValueError(problem or "write_verified needs at least one input to trace and compare the model on")
    forms = list(forms if forms is not None else default_forms(path))
    replaced = os.path.exists(path)
    rejected: dict[str, str] = {}
    candidate: tuple[str, Written] | None = None  # a trace kept in reserve (see the docstring)
    try:
        for i, form in enumerate(forms):
            scratch = _scratch(folder, path)
            try:
                written, doubts = _write_form(form, model, reference, inputs, scratch, compress, metadata, measure)
            except (FormError, ArtifactMismatch) as error:
                rejected[form] = str(error)
            except Exception as error:  # the form itself, or the model's code run on it, failed
                rejected[form] = short_error(error)
            else:
                written.replaced = replaced
                if doubts:
                    written.caveat = (
                        f"torch warned that the trace might not generalize ({', '.join(doubts)}); it reproduces the "
                        f"model on the shapes it was verified on: {_shapes(written.compared)}"
                    )
                    if i + 1 < len(forms):
                        candidate = (scratch, written)  # kept on disk until a later form reproduces, or not
                        continue
                if candidate is not None:
                    rejected[candidate[1].form] = (
                        f"reproduced the model on the shapes seen, but {candidate[1].caveat.split(';')[0]}; the "
                        f"{form} form keeps that code's dependence on shapes"
                    )
                    candidate = _removed(candidate[0])
                return _kept(scratch, path, written, rejected)
            _removed(scratch)
        if candidate is not None:
            scratch, written = candidate
            candidate = None
            return _kept(scratch, path, written, rejected)
    finally:
        if candidate is not None:
            _removed(candidate[0])
    if os.path.exists(path):
        os.remove(path)  # an older artifact there is not this model's
    reasons = "; ".join(f"{form}: {reason}" for form, reason in rejected.items())
    older = f"; the older file at {path} was removed, as it is not this model's artifact" if replaced else ""
    raise ArtifactMismatch(f"no artifact form reproduces the model ({reasons}){older}")


def _write_form(
    form: str,
    model: nn.Module,
    reference: nn.Module | None,
    inputs: Sequence[ModelInput],
    scratch: str,
    compress: bool,
    metadata: dict[str, Any],
    measure: Callable[[CheckedArtifact], Any] | None,
) -> tuple[Written, list[str]]:
    """One form made, written to ``scratch``, loaded back and compared (see :func:`write_verified`); what it kept,
    and where the user's code raised TracerWarnings while it was made."""
    made = FORMATS[form]
    quantizes = getattr(made, "QUANTIZES", False)  # the format quantizes the float model itself (ONNX)
    target = reference if quantizes and reference is not None else model
    others = [other for example in inputs[:1] for other in other_shapes(target, example)]
    others = others if getattr(made, "VERIFY_OTHER_SHAPES", True) else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        archive, _ = made.make(target, form, [*inputs, *others] if quantizes else inputs, metadata)
    doubts = _tracer_doubts(caught)
    data = compressed.encode(archive, {**metadata, "form": form}) if compress else archive
    with open(scratch, "xb") as f:
        f.write(data)
    loaded = load_quantized(scratch, max_bytes=_UNBOUNDED)
    call = made.artifact_call(target, loaded, form)
    tolerance = made.INT8_RTOL if quantizes else None
    checked = CheckedArtifact(target, call, None if quantizes else _reference(reference, form, inputs[0]), tolerance)
    for example in [*inputs, *others]:
        if example.signature() not in checked.templates:  # one call of each signature is compared
            checked(*example.args, **example.kwargs)
    before = checked.calls
    measured = measure(checked) if measure is not None else None
    calls = checked.calls - before
    return Written(form, len(data), checked.compared, measured, calls, {}, _Calling(call), tolerance), doubts


def _kept(scratch: str, path: str, written: Written, rejected: dict[str, str]) -> Written:
    os.replace(scratch, path)
    written.rejected = dict(rejected)
    if written.caveat:
        warnings.warn(f"the artifact at {path} is a trace: {written.caveat}", UserWarning, stacklevel=3)
    return written


def _removed(scratch: str) -> None:
    if os.path.exists(scratch):
        os.remove(scratch)


def default_forms(path: str | os.PathLike, artifact_format: str | None = None) -> tuple[str, ...]:
    """The forms tried for ``path``: ``artifact_format`` (``"torchscript"`` or ``"onnx"``) when given, else the
    suffix's (``.onnx``: ONNX; anything else: TorchScript)."""
    chosen = artifact_format or ("onnx" if os.fspath(path).lower().endswith(".onnx") else "torchscript")
    return onnx_format.FORMS if chosen == "onnx" else FORMS


def _scratch(folder: str, path: str) -> str:
    # beside `path`, so that the rename is atomic; created as `open` creates files (the umask's permissions)
    return os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")


def _tracer_doubts(caught: list[warnings.WarningMessage]) -> list[str]:
    """``file:line`` of each TracerWarning raised in the user's code (not torch's, not ours) while tracing; every
    other warning is re-emitted as it was."""
    doubts: list[str] = []
    for w in caught:
        library = w.filename.startswith(_LIBRARY_DIRS) or _INSTALLED.search(w.filename) is not None
        if issubclass(w.category, torch.jit.TracerWarning) and not library:
            where = f"{os.path.basename(w.filename)}:{w.lineno}"
            if where not in doubts:
                doubts.append(where)
        elif not issubclass(w.category, torch.jit.TracerWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return doubts


def _shapes(compared: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(compared[:limit])
    return shown + (f" and {len(compared) - limit} more" if len(compared) > limit else "")


class _Calling(nn.Module):
    """A loaded artifact called as the model's forward is called (what latency times)."""

    def __init__(self, call: Callable[[ModelInput], Any]) -> None:
        super().__init__()
        self.call = call

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(ModelInput(args, kwargs))


def _reference(model: nn.Module | None, form: str, example: ModelInput) -> Reference | None:
    """The float model and the same form of it, made the first time a comparison needs it (most never do: the
    artifact usually gives exactly the quantized model's outputs)."""
    if model is None:
        return None
    made: list[Callable[[ModelInput], Any]] = []

    def call(inputs: ModelInput) -> Any:
        if not made:
            made.append(FORMATS[form].in_memory(model, form, example))
        return made[0](inputs)

    return Reference(model, call)
