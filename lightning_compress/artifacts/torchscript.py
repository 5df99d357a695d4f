"""The TorchScript format: a ``torch.jit`` archive of the model, with our JSON header
``lightning_compress.json`` (format, version, torch version, quantized engine, form, the inputs it takes, metadata).

Forms, in the order :func:`lightning_compress.artifacts.write_verified` tries them: ``"trace"``
(``torch.jit.trace`` on one real input: any Python the forward runs, but one path through it, recorded for that
input) and ``"script"`` (``torch.jit.script``: loops and branches on shapes and values kept, for forwards
TorchScript can compile). ``torch.export`` with dynamic dimensions would be the maintained path, but it cannot hold
torch.ao's quantized Linear or LSTM in torch 2.13.

Why TorchScript: a fresh process loads it with nothing but torch (no user model class, no pickle of user code),
and libtorch loads it from C++ too. In torch 2.13 it is deprecated but supported, and it is the only standalone
format that holds dynamically quantized LSTMs; ``torch.save`` of the module pickles the user's class.

What loading trusts: a TorchScript archive holds code that ``torch.jit.load`` runs, so load only files you trust,
as with any model file. The header is checked field by field before anything is loaded.

What a format module offers the package (:mod:`~lightning_compress.artifacts.writing` and
:mod:`~lightning_compress.artifacts.loading` call these, and a new format offers the same): ``FORMS``;
:func:`make` (the file's bytes), :func:`artifact_call` (a loaded artifact called as the model is called),
:func:`in_memory` (a form of a model without a file: the float reference) and :func:`load` (a line in
:data:`lightning_compress.artifacts.loading.READERS` says which files it takes).
Knows nothing of callbacks, Lightning or the compressed codec.
"""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from lightning_compress.artifacts import headers
from lightning_compress.artifacts.headers import ArtifactError
from lightning_compress.artifacts.verification import FormError, UnsupportedCall, short_error
from lightning_compress.compat import torch_internal_warnings_silenced
from lightning_compress.inputs import ModelInput, forward_adapter, named_inputs, plain_outputs

FORMAT = "lightning_compress.quantized"
VERSION = 2
FORMS = ("trace", "script")
_HEADER = "lightning_compress.json"


def make(model: nn.Module, form: str, inputs: Sequence[ModelInput], metadata: dict[str, Any]) -> tuple[bytes, list]:
    """The bytes of a TorchScript archive of ``model`` in ``form`` (traced on ``inputs[0]``), with our header, and
    the inputs it takes."""
    scripted = make_form(model, form, inputs[0])
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


def in_memory(model: nn.Module, form: str, example: ModelInput) -> Callable[[ModelInput], Any]:
    """``model`` made into ``form`` in memory (no file), called as ``model`` is called: the float reference's form."""
    return artifact_call(model, make_form(model, form, example), form)


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
def load(archive: BinaryIO, source: str) -> torch.jit.ScriptModule:
    """Check our header inside the TorchScript archive (a binary file), then load it under the quantized engine it
    was made with; every failure is an :class:`ArtifactError`."""
    header = read_header(archive, source)
    archive.seek(0)
    _check_members(archive, source)
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


def _check_members(archive: BinaryIO, source: str) -> None:
    """Every member against the CRC-32 the zip recorded for it when it was written: a flipped byte in a weight's
    storage is refused, naming the member, instead of loading as different weights (TorchScript does not check)."""
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            try:
                with z.open(info) as member:  # zipfile checks the CRC-32 as the member is read to its end
                    while member.read(1 << 20):
                        pass
            except Exception as error:  # a bad CRC, or a compressed member whose stream is broken
                what = "does not match the CRC-32 recorded when it was written"
                if "CRC" not in str(error):
                    what = f"cannot be read ({short_error(error)})"
                raise ArtifactError(f"{source} is damaged: its member {info.filename!r} {what}") from error


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
