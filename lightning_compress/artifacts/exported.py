"""The exported-program format (``.pt2``): a ``torch.export`` program of a statically quantized model, with our
JSON header (format, version, torch version, form, metadata) among the archive's extra files.

What it holds: the PT2E-converted graph (int8 weights, calibrated activation scales), re-exported with the dynamic
dimensions it was quantized with (the batch, and the dimensions that varied among the run's inputs), the float
weights ``convert_pt2e`` leaves attached stripped, and no sample inputs (``torch.export`` would store the batch it
was exported on: a piece of the user's data).

What loading returns: a :class:`CompiledProgram`, called as the model's forward is called, that compiles the
program with ``torch.compile`` and inductor's ``freezing`` on, once per input shape, at the first call of each
shape (a few seconds on a small CNN; tens of seconds on a ResNet-18), and then runs the onednn int8 kernels.
Compiling needs torchao (``pip install 'lightning_compress[static]'``): importing
``torchao.quantization.pt2e.quantizer.x86_inductor_quantizer`` registers the int8 lowerings; without them the
program runs, but dequantizes to float kernels, slower than the float model. Inductor's global configuration is
set only for the duration of each call and restored after it. At most ``torch._dynamo.config.recompile_limit``
shapes (8 by default) are compiled; further shapes run the uncompiled program (correct, slow).

What loading trusts: ``torch.export.load`` deserializes a graph of registered operators, not Python code; the
header is checked field by field before the program is loaded. Knows nothing of callbacks or Lightning.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import io
import json
import logging
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lightning_compress.artifacts import headers
from lightning_compress.artifacts.headers import ArtifactError
from lightning_compress.artifacts.verification import FormError, short_error
from lightning_compress.inputs import ModelInput

FORMAT = "lightning_compress.exported"
VERSION = 1
FORMS = ("pt2",)
#: Not verified on extra shapes made from the inputs (writing's ``other_shapes``): the program was exported with
#: dynamic dimensions whose guards torch.export checks at every call, and each new shape would cost a compile.
VERIFY_OTHER_SHAPES = False
_HEADER = "lightning_compress.json"
STATIC_HINT = "Static int8 quantization needs torchao: pip install 'lightning_compress[static]'"
#: Whether :class:`CompiledProgram` compiles (the rehearsal before training turns it off once it proved it works).
_COMPILING: contextvars.ContextVar[bool] = contextvars.ContextVar("lightning_compress_compiling", default=True)


def import_int8_lowerings() -> Any:
    """Import torchao's x86 inductor quantizer (which registers inductor's onednn int8 lowerings) and return the
    module; ``ImportError`` naming the extra when torchao is missing. torchao's import-time notices about its
    GPU-only libraries are silenced."""
    try:
        with _torchao_import_quiet():
            return importlib.import_module("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
    except ImportError as error:
        raise ImportError(f"{STATIC_HINT} ({short_error(error)})") from error


@contextlib.contextmanager
def _torchao_import_quiet() -> Iterator[None]:
    # torchao 0.18 logs "Failed to load ..._C_*.so" for its CUDA extensions and warns about an Enum registration
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="torchao")
            warnings.filterwarnings("ignore", message=".*register_constant.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def compiling(enabled: bool) -> Iterator[None]:
    """Within the body, :class:`CompiledProgram` compiles (``True``) or runs its program uncompiled."""
    token = _COMPILING.set(enabled)
    try:
        yield
    finally:
        _COMPILING.reset(token)


@contextlib.contextmanager
def inductor_freezing() -> Iterator[None]:
    """``torch._inductor.config.freezing = True`` for the body only (weights folded into the compiled graph, which
    is what lets inductor pick the onednn int8 kernels); the global setting is restored after it."""
    from torch._inductor import config

    with config.patch(freezing=True):
        yield


class CompiledProgram(nn.Module):
    """A program (``torch.export``'s ``.module()``, or any ``GraphModule``) that is compiled with freezing at its
    first call of each input shape (``dynamic=False``: one compile per shape; a dynamic-batch compile of a PT2E
    int8 graph hits an inductor stride assertion in torch 2.13) and called as the model's forward is called.

    ``dynamic_shapes``: what the program was exported with (``torch.export``'s format), kept to export it again.
    """

    def __init__(self, program: nn.Module, dynamic_shapes: Any = None) -> None:
        super().__init__()
        self.program = program
        self.dynamic_shapes = dynamic_shapes
        self._compiled: Callable[..., Any] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not _COMPILING.get():
            with torch.no_grad():
                return self.program(*args, **kwargs)
        if self._compiled is None:
            import_int8_lowerings()
            # kept outside the module tree: the compiled wrapper is a module holding the same program again
            object.__setattr__(self, "_compiled", torch.compile(self.program, dynamic=False))
        with torch.no_grad(), inductor_freezing(), _compile_notices_silenced():
            return self._compiled(*args, **kwargs)

    def train(self, mode: bool = True) -> CompiledProgram:
        # An exported program refuses train()/eval() (its graph was captured in one mode, eval here): the flag is
        # this module's own, and the program is not touched
        self.training = mode
        return self

    def __getstate__(self) -> dict[str, Any]:  # a deep copy or pickle recompiles rather than share the compiled code
        state = dict(self.__dict__)
        state["_compiled"] = None
        return state


@contextlib.contextmanager
def _compile_notices_silenced() -> Iterator[None]:
    # inductor's onednn lowering copies a tensor with torch.tensor(tensor) and warns about it (torch 2.13)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
        yield


def find_program(model: nn.Module) -> CompiledProgram:
    """The :class:`CompiledProgram` ``model`` runs (itself or a submodule), or a :class:`FormError`."""
    found = next((m for m in model.modules() if isinstance(m, CompiledProgram)), None)
    if found is None:
        raise FormError("the model is not an exported program (only StaticQuantization's models are written as .pt2)")
    return found


def export_again(program: CompiledProgram, example: ModelInput) -> torch.export.ExportedProgram:
    """``program`` exported for saving, on ``example``, with the dynamic dimensions it was exported with."""
    try:
        return torch.export.export(program.program, example.args, example.kwargs, dynamic_shapes=program.dynamic_shapes)
    except Exception as error:
        raise FormError(f"torch.export of the quantized program failed ({short_error(error)})") from error


# ---------------------------------------------------------------------------------------------- the format's entries
def make(model: nn.Module, form: str, inputs: Sequence[ModelInput], metadata: dict[str, Any]) -> tuple[bytes, list]:
    """The bytes of a ``.pt2`` archive of the program ``model`` runs, with our header; and its inputs (unnamed)."""
    exported = export_again(find_program(model), inputs[0])
    exported._example_inputs = None  # torch.export would store the batch it was exported on
    header = {"format": FORMAT, "version": VERSION, "torch": torch.__version__, "form": form, "metadata": metadata}
    buffer = io.BytesIO()
    torch.export.save(exported, buffer, extra_files={_HEADER: json.dumps(header)})
    return buffer.getvalue(), []


def artifact_call(model: nn.Module, artifact: Callable[..., Any], form: str) -> Callable[[ModelInput], Any]:
    """A loaded program takes the model's forward's inputs as they are given."""
    return lambda inputs: inputs(artifact)


def in_memory(model: nn.Module, form: str, example: ModelInput) -> Callable[[ModelInput], Any]:
    """The float model exported (uncompiled), once per input signature it is called with: the float reference's
    form (needed only when an artifact's output differs from the quantized model's, which is rare)."""
    programs: dict[Any, nn.Module] = {}

    def call(inputs: ModelInput) -> Any:
        key = inputs.signature()
        if key not in programs:
            try:
                programs[key] = torch.export.export(model.eval(), inputs.args, inputs.kwargs).module()
            except Exception as error:
                raise FormError(f"torch.export of the float model failed ({short_error(error)})") from error
        with torch.no_grad():
            return inputs(programs[key])

    return call


def is_exported(path: str, head: bytes) -> bool:
    """Whether the file is a ``torch.export`` archive (a zip holding ``archive_format``)."""
    if not head.startswith(b"PK"):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("/archive_format") for name in z.namelist())
    except Exception:
        return False


def load(data: bytes, source: str, max_bytes: int) -> CompiledProgram:
    """Check our header, then load the program; every failure is an :class:`ArtifactError`."""
    read_header(io.BytesIO(data), source)
    try:
        import_int8_lowerings()
    except ImportError as error:
        raise ArtifactError(f"{source} is a statically quantized program: {error}") from error
    try:
        exported = torch.export.load(io.BytesIO(data))
        program = exported.module()
    except Exception as error:
        raise ArtifactError(f"{source} could not be loaded by torch.export ({short_error(error)})") from error
    return CompiledProgram(program).eval()


def read_header(archive: io.BytesIO, source: str) -> dict[str, Any]:
    """Our JSON header of a ``.pt2`` archive, read from the zip without torch and checked field by field."""
    try:
        with zipfile.ZipFile(archive) as z:
            ours = [info for info in z.infolist() if info.filename.endswith(f"/extra/{_HEADER}")]
            if not ours:
                raise ArtifactError(
                    f"{source} is a torch.export archive but not a lightning_compress artifact: load it with "
                    "torch.export.load"
                )
            if ours[0].file_size > headers.MAX_HEADER_BYTES:
                raise ArtifactError(f"{source} carries a lightning_compress header of {ours[0].file_size:,} bytes")
            raw = z.read(ours[0])
    except ArtifactError:
        raise
    except Exception as error:  # zipfile raises many kinds on damaged files
        raise ArtifactError(f"{source} is a damaged torch.export archive ({short_error(error)})") from error
    header = headers.parse(raw, source)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArtifactError(f"{source} is a torch.export archive but not a lightning_compress artifact")
    version = header.get("version")
    if version != VERSION or isinstance(version, bool):
        raise ArtifactError(
            f"{source} has exported-program format version {headers.describe(version)}; this lightning_compress "
            f"reads version {VERSION}. Upgrade lightning_compress to load it."
        )
    problem = headers.field_problem(
        header,
        {
            "format": lambda v: True,
            "version": lambda v: True,
            "torch": headers.is_name,
            "form": lambda v: v in FORMS,
            "metadata": lambda v: True,
        },
    ) or headers.scalar_problem(header["metadata"], "metadata")
    if problem:
        raise ArtifactError(f"{source} carries a malformed lightning_compress header: {problem}")
    return header
