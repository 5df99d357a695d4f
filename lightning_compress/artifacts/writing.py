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
import uuid
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from torch import nn

from lightning_compress.artifacts import compressed, exported, headers, torchscript
from lightning_compress.artifacts.loading import load_quantized
from lightning_compress.artifacts.verification import (
    ArtifactMismatch,
    CheckedArtifact,
    FormError,
    Reference,
    short_error,
)
from lightning_compress.inputs import ModelInput

#: The module that makes, calls and reads each form (a new format adds its forms here).
FORMATS: dict[str, ModuleType] = {"trace": torchscript, "script": torchscript, "pt2": exported}
#: The forms tried by default, in order.
FORMS = torchscript.FORMS
_UNBOUNDED = 2**63 - 1  # reading back a file we have just written


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
    shapes), what ``measure`` returned for it and how many calls it made, and why each earlier form was not kept."""

    form: str
    size: int
    compared: list[str]
    measured: Any
    calls: int
    rejected: dict[str, str]


def write_verified(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: Sequence[ModelInput],
    compress: bool = False,
    reference: nn.Module | None = None,
    metadata: dict[str, Any] | None = None,
    measure: Callable[[CheckedArtifact], Any] | None = None,
    forms: Sequence[str] = FORMS,
) -> Written:
    """Write the first form of ``model`` that reproduces it to ``path``.

    For each form: made from ``model`` (traced on ``inputs[0]``), written to a temporary file in ``path``'s folder,
    loaded back from that file with :func:`load_quantized`, and compared with ``model`` on every input of
    ``inputs`` and then on every call ``measure(checked)`` makes (e.g. the module's own validation run through
    the artifact), see :class:`lightning_compress.artifacts.verification.CheckedArtifact`. The first that reproduces
    is renamed to ``path``; a form that raises or differs is removed and the next one tried.

    Raises:
        ArtifactMismatch: no form reproduces the model; the message gives each form's reason, with the inputs'
            shapes. Nothing is left at ``path``, not even an older file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    metadata = dict(metadata or {})
    problem = headers.scalar_problem(metadata, "metadata")
    if problem or not inputs:
        raise ValueError(problem or "write_verified needs at least one input to trace and compare the model on")
    rejected: dict[str, str] = {}
    for form in forms:
        # beside `path`, so that the rename is atomic; created as `open` creates files (the umask's permissions)
        scratch = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            made = FORMATS[form]
            archive, _ = made.make(model, form, inputs[0], metadata)
            data = compressed.encode(archive, {**metadata, "form": form}) if compress else archive
            with open(scratch, "xb") as f:
                f.write(data)
            loaded = load_quantized(scratch, max_bytes=_UNBOUNDED)
            call = made.artifact_call(model, loaded, form)
            checked = CheckedArtifact(model, call, _reference(reference, form, inputs[0]))
            for example in inputs:
                if example.signature() not in checked.templates:  # one call of each signature is compared
                    checked(*example.args, **example.kwargs)
            before = checked.calls
            measured = measure(checked) if measure is not None else None
            calls = checked.calls - before
        except (FormError, ArtifactMismatch) as error:
            rejected[form] = str(error)
        except Exception as error:  # the form itself, or the model's code run on it, failed
            rejected[form] = short_error(error)
        else:
            os.replace(scratch, path)
            return Written(form, len(data), checked.compared, measured, calls, rejected)
        finally:
            if os.path.exists(scratch):
                os.remove(scratch)
    if os.path.exists(path):
        os.remove(path)  # an older artifact there is not this model's
    reasons = "; ".join(f"{form}: {reason}" for form, reason in rejected.items())
    raise ArtifactMismatch(f"no artifact form reproduces the model ({reasons})")


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
