"""Standalone artifacts of quantized (or pruned float) models: one home for saving and loading both formats.

* :func:`save_quantized` writes a TorchScript archive that carries a small JSON header, ``lightning_compress.json``
  (format, version, torch version, quantized engine, form, the inputs it takes, metadata);
* :func:`save_compressed` writes the same archive in the compressed format of :mod:`lightning_compress.compressed`;
* :func:`write_verified` is what both do, and what ``DynamicQuantization`` does at fit end with every validation
  input: try each form, write it beside ``path``, load it back from disk, compare it with the model, keep the first
  that reproduces the model, and leave nothing at ``path`` when none does;
* :func:`load_quantized` loads either format (``load_compressed`` insists on the compressed one), under the
  quantized engine the artifact was made with. Every failure to load is an :class:`ArtifactError` saying what is
  wrong and what to do, or ``FileNotFoundError`` naming the path.

Forms, in the order they are tried: ``"trace"`` (``torch.jit.trace`` on one real input: any Python the forward
runs, but one path through it, recorded for that input) and ``"script"`` (``torch.jit.script``: loops and
branches on shapes and values kept, for forwards TorchScript can compile). ``torch.export`` with dynamic
dimensions would be the maintained path, but it cannot hold torch.ao's quantized Linear or LSTM in torch 2.13.

Why TorchScript: a fresh process loads it with nothing but torch (no user model class, no pickle of user code),
and libtorch loads it from C++ too. In torch 2.13 it is deprecated but supported, and it is the only standalone
format that holds dynamically quantized LSTMs; ``torch.save`` of the module pickles the user's class.

What loading trusts: a TorchScript archive holds code that ``torch.jit.load`` runs, so load only files you trust,
as with any model file. The compressed format's SHA-256 checksum detects damage (truncation, flipped bytes), not
intent: whoever writes a file can compute a valid checksum. Both headers are checked field by field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from lightning_compress import compressed, headers
from lightning_compress.compat import torch_internal_warnings_silenced
from lightning_compress.compressed import DEFAULT_MAX_BYTES
from lightning_compress.headers import ArtifactError
from lightning_compress.inputs import ModelInput, forward_adapter, named_inputs, plain_outputs
from lightning_compress.verification import (
    ArtifactMismatch,
    CheckedArtifact,
    Reference,
    UnsupportedCall,
    short_error,
)

FORMAT = "lightning_compress.quantized"
VERSION = 2
FORMS = ("trace", "script")
_HEADER = "lightning_compress.json"
_UNBOUNDED = 2**63 - 1  # reading back a file we have just written


class FormError(RuntimeError):
    """One artifact form cannot be made of a model; the message names the input or output at fault and the fix."""


# ---------------------------------------------------------------------------------------------- saving
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
    from, which sets the tolerance of the comparison (see :mod:`lightning_compress.verification`); without it the
    artifact must agree to float precision. ``metadata``: strings and numbers stored in the header.

    Raises:
        ArtifactMismatch: no form reproduces the model on ``example_input``; the message says why for each form.
            Nothing is left at ``path``.
    """
    example = ModelInput.from_example(example_input)
    return write_verified(model, path, [example], reference=reference, metadata=metadata).form


def save_compressed(
    model: nn.Module, example_input: Any, path: str | os.PathLike, reference: nn.Module | None = None, **metadata: Any
) -> int:
    """As :func:`save_quantized`, in the format of :mod:`lightning_compress.compressed` (the zeros pruning made
    cost about a bit each); returns the file's size in bytes."""
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
    the artifact), see :class:`lightning_compress.verification.CheckedArtifact`. The first that reproduces is
    renamed to ``path``; a form that raises or differs is removed and the next one tried.

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
            archive, _ = make_archive(model, form, inputs[0], metadata)
            data = compressed.encode(archive, {**metadata, "form": form}) if compress else archive
            with open(scratch, "xb") as f:
                f.write(data)
            loaded = load_quantized(scratch, max_bytes=_UNBOUNDED)
            checked = CheckedArtifact(model, artifact_call(model, loaded, form), _reference(reference, form, inputs[0]))
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


def make_archive(model: nn.Module, form: str, example: ModelInput, metadata: dict[str, Any]) -> tuple[bytes, list]:
    """The bytes of a TorchScript archive of ``model`` in ``form``, with our header, and the inputs it takes."""
    scripted = make_form(model, form, example)
    names = _input_names(scripted)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "torch": torch.__version__,
        "engine": torch.backends.quantized.engine if _is_quantized(model) else None,
        "form": form,
        "inputs": names,
        "metadata": metadata,
    }
    buffer = io.BytesIO()
    with torch_internal_warnings_silenced():
        torch.jit.save(scripted, buffer, _extra_files={_HEADER: json.dumps(header)})
    return buffer.getvalue(), names


def make_form(model: nn.Module, form: str, example: ModelInput) -> torch.jit.ScriptModule:
    """``model`` as a TorchScript module in ``form`` (in memory), or a :class:`FormError` saying why not."""
    if form not in FORMS:
        raise ValueError(f"`form` must be one of {list(FORMS)}, got {form!r}")
    model.eval()
    with torch_internal_warnings_silenced(), _lightning_scripting(model):
        if form == "script":
            try:
                return torch.jit.script(model)
            except Exception as error:
                raise FormError(f"torch.jit.script cannot compile the forward ({short_error(error)})") from error
        adapter, trace_inputs = forward_adapter(model, example)
        _check_traceable_inputs(trace_inputs)
        with torch.inference_mode():
            _check_traceable_outputs(plain_outputs(example(model)))
            try:
                return torch.jit.trace(adapter, example_kwarg_inputs=trace_inputs, check_trace=False, strict=False)
            except Exception as error:
                raise FormError(f"torch.jit.trace failed ({short_error(error)})") from error


def artifact_call(model: nn.Module, artifact: Callable[..., Any], form: str) -> Callable[[ModelInput], Any]:
    """How to call a loaded artifact of ``model`` with the inputs ``model`` itself receives."""
    if form == "script":
        return lambda inputs: inputs(artifact)
    forward = model.forward  # the model's own, read now
    takes = set(_input_names(artifact))

    def call(inputs: ModelInput) -> Any:
        named = named_inputs(forward, inputs)
        for name, value in named.items():
            if name not in takes:
                if not _only_tensors(value):
                    raise UnsupportedCall(_non_tensor_input(name, value))
                raise UnsupportedCall(
                    f"forward's input {name!r} was not among the inputs the trace was made with. Set "
                    "`example_input_array` to inputs that include it (a dict of keyword inputs, for instance)"
                )
        return artifact(**named)

    return call


def _reference(model: nn.Module | None, form: str, example: ModelInput) -> Reference | None:
    """The float model and the same form of it, made the first time a comparison needs it (most never do: the
    artifact usually gives exactly the quantized model's outputs)."""
    if model is None:
        return None
    made: list[Callable[[ModelInput], Any]] = []

    def call(inputs: ModelInput) -> Any:
        if not made:
            made.append(artifact_call(model, make_form(model, form, example), form))
        return made[0](inputs)

    return Reference(model, call)


def _check_traceable_inputs(named: dict[str, Any]) -> None:
    for name, value in named.items():
        if not _only_tensors(value):
            raise FormError(_non_tensor_input(name, value))


def _non_tensor_input(name: str, value: Any) -> str:
    return (
        f"forward's input {name!r} is {_kind(value)}, and a traced artifact takes tensors only. Leave it at its "
        "default in the calls, pass it as a tensor, or set `example_input_array` to a dict of the tensor inputs "
        "(e.g. {'x': ...}) and call forward with those"
    )


def _check_traceable_outputs(output: Any, path: str = "") -> None:
    if isinstance(output, dict):
        for key, value in output.items():
            _check_traceable_outputs(value, f"{path}.{key}" if path else str(key))
    elif isinstance(output, (tuple, list)):
        for i, value in enumerate(output):
            _check_traceable_outputs(value, f"{path}[{i}]")
    elif not isinstance(output, Tensor):
        what = f"the model returns {path!r} as {_kind(output)}" if path else f"the model returns {_kind(output)}"
        if "cache" in type(output).__name__.lower() or "past_key_values" in path:
            raise FormError(
                f"{what}, its cache of past keys and values, which an artifact cannot return. Turn the cache off: "
                "`config.use_cache=False` on the model (e.g. `self.model.config.use_cache = False`), or pass "
                "`use_cache=False` to it in forward"
            )
        raise FormError(
            f"{what}; an artifact returns tensors, and tuples, lists and dicts of them. Return a tensor (e.g. "
            "torch.tensor(value)) or leave it out of forward's output"
        )


def _only_tensors(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_only_tensors(v) for v in value)
    if isinstance(value, dict):
        return bool(value) and all(isinstance(k, str) and _only_tensors(v) for k, v in value.items())
    return False


def _kind(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def _input_names(scripted: torch.jit.ScriptModule) -> list[str]:
    return [argument.name for argument in scripted.forward.schema.arguments[1:]]


def _is_quantized(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


@contextlib.contextmanager
def _lightning_scripting(model: nn.Module) -> Iterator[None]:
    """Tell LightningModules they are being compiled, as Lightning's own ``to_torchscript`` does.

    Tracing inspects every attribute, and a LightningModule's ``trainer`` property raises once it is detached.
    """
    flagged = [m for m in model.modules() if hasattr(m, "_jit_is_scripting")]
    previous = [m.__dict__.get("_jit_is_scripting") for m in flagged]
    for m in flagged:
        m._jit_is_scripting = True
    try:
        yield
    finally:
        for m, value in zip(flagged, previous):
            if value is None:
                del m.__dict__["_jit_is_scripting"]  # back to the class attribute
            else:
                m._jit_is_scripting = value


# ---------------------------------------------------------------------------------------------- loading
def load_quantized(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.jit.ScriptModule:
    """Load an artifact written by ``DynamicQuantization(save_path=...)``, :func:`save_quantized` or
    :func:`save_compressed`. Needs only torch: not the training code, not Lightning.

    The quantized weights are packed for the quantized engine recorded in the artifact (``x86``, ``fbgemm``,
    ``qnnpack``, ...: ``torch.backends.quantized.engine`` when it was saved), so it computes what was measured;
    the engine set in this process is left as it was.

    Args:
        path: the file.
        max_bytes: refuse a compressed artifact that declares more bytes than this once decoded (default 2 GiB).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ArtifactError: anything else that makes the file unloadable (another format, a damaged or malformed file,
            a newer version, an engine this torch build lacks), with what to do.
    """
    source = os.fspath(path)
    data = _read(source)
    if not compressed.is_compressed(data):
        return _load_archive(io.BytesIO(data), source)
    return _load_compressed(data, source, max_bytes)


def load_compressed(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.jit.ScriptModule:
    """Load an artifact written by :func:`save_compressed` (``load_quantized`` reads it too)."""
    source = os.fspath(path)
    return _load_compressed(_read(source), source, max_bytes)


def _load_compressed(data: bytes, source: str, max_bytes: int) -> torch.jit.ScriptModule:
    # Decoded into a temporary file that TorchScript reads from: memory holds a few blocks, not the archive.
    with tempfile.TemporaryFile() as archive:
        compressed.decode_to(data, archive, source, max_bytes)
        archive.seek(0)
        return _load_archive(archive, source)


def _read(source: str) -> bytes:
    if not os.path.exists(source):
        raise FileNotFoundError(f"No artifact at {source}")
    if os.path.isdir(source):
        raise ArtifactError(f"{source} is a folder; pass the artifact file written by save_path=...")
    with open(source, "rb") as f:
        return f.read()


def _load_archive(archive: BinaryIO, source: str) -> torch.jit.ScriptModule:
    """Check our header inside the TorchScript archive, then load it under its engine; every failure as an
    ArtifactError."""
    header = read_header(archive, source)
    archive.seek(0)
    engine = header.get("engine")
    if engine is not None and engine not in torch.backends.quantized.supported_engines:
        raise ArtifactError(
            f"{source} was quantized for the engine {engine!r}, which this torch build does not have (it has "
            f"{', '.join(e for e in torch.backends.quantized.supported_engines if e != 'none')}). Load it where "
            f"torch supports {engine!r}, or quantize again here."
        )
    try:
        with torch_internal_warnings_silenced(), _quantized_engine(engine):
            module = torch.jit.load(archive, map_location="cpu")
    except Exception as error:  # whatever TorchScript raises on a damaged archive
        raise ArtifactError(f"{source} could not be loaded by TorchScript ({short_error(error)})") from error
    return module.eval()


@contextlib.contextmanager
def _quantized_engine(engine: str | None) -> Iterator[None]:
    """Weights are packed for the engine set while loading; each call then runs on the kernels they were packed
    for (checked: qnnpack-packed Linear and LSTM give qnnpack's outputs when called under x86)."""
    previous = torch.backends.quantized.engine
    if engine is not None:
        torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def read_header(archive: BinaryIO, source: str) -> dict[str, Any]:
    """Our JSON header of a TorchScript archive, read from the zip without torch and checked field by field."""
    try:
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            ours = [info for info in z.infolist() if info.filename.endswith(f"/extra/{_HEADER}")]
            if not ours:
                if any(n.endswith("/data.pkl") for n in names) and not any(n.endswith("/constants.pkl") for n in names):
                    raise ArtifactError(
                        f"{source} is a torch.save file (a pickle), not a lightning_compress artifact: load it with "
                        "torch.load, or write an artifact with DynamicQuantization(save_path=...) or save_quantized"
                    )
                raise ArtifactError(f"{source} is a zip or TorchScript archive but not a lightning_compress artifact")
            if ours[0].file_size > headers.MAX_HEADER_BYTES:
                raise ArtifactError(f"{source} carries a lightning_compress header of {ours[0].file_size:,} bytes")
            raw = z.read(ours[0])
    except ArtifactError:
        raise
    except Exception as error:  # zipfile raises many kinds on damaged files (BadZipFile, EOFError, zlib.error, ...)
        raise ArtifactError(
            f"{source} is not a lightning_compress artifact (neither a TorchScript archive nor the compressed "
            f"format: {short_error(error)})"
        ) from error
    header = headers.parse(raw, source)
    _check_header(header, source)
    return header


def _check_header(header: Any, source: str) -> None:
    if not isinstance(header, dict):
        raise ArtifactError(f"{source} carries a damaged lightning_compress header ({headers.describe(header)})")
    if header.get("format") != FORMAT:
        raise ArtifactError(f"{source} is a TorchScript archive but not a lightning_compress artifact")
    version = header.get("version")
    if version not in (1, 2) or isinstance(version, bool):
        raise ArtifactError(
            f"{source} has artifact format version {headers.describe(version)}; this lightning_compress reads "
            f"versions 1 and {VERSION}. Upgrade lightning_compress to load it."
        )
    if version == 1:  # 0.3: call convention as counts and names; metadata as extra top-level fields
        required = {
            "format": _any,
            "version": _any,
            "torch": headers.is_name,
            "inputs": lambda v: isinstance(v, dict) and not headers.field_problem(v, _V1_INPUTS),
        }
        extra = {k: v for k, v in header.items() if k not in required}
        problem = headers.field_problem({k: header[k] for k in header if k in required}, required)
        problem = problem or headers.scalar_problem(extra, "metadata")
    else:
        problem = headers.field_problem(
            header,
            {
                "format": _any,
                "version": _any,
                "torch": headers.is_name,
                "engine": lambda v: v is None or (isinstance(v, str) and 0 < len(v) <= 64),
                "form": lambda v: v in FORMS,
                "inputs": _is_names,
                "metadata": _any,
            },
        ) or headers.scalar_problem(header["metadata"], "metadata")
    if problem:
        raise ArtifactError(f"{source} carries a malformed lightning_compress header: {problem}")


_V1_INPUTS = {"positional": headers.is_count, "keywords": lambda v: _is_names(v)}


def _any(value: Any) -> bool:
    return True


def _is_names(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= 4096
        and all(headers.is_name(n) for n in value)
        and len(set(value)) == len(value)
    )
