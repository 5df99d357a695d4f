"""Standalone artifacts of quantized (or pruned float) models: one home for saving and loading both formats.

* ``save_quantized`` writes a TorchScript archive (``torch.jit.trace`` with one real input, then ``torch.jit.save``)
  that carries a small JSON header, ``lightning_compress.json``, with the format name, version and call convention;
* ``save_compressed`` writes the same archive in the compressed format of :mod:`lightning_compress.compressed`;
* ``load_quantized`` loads either (``load_compressed`` insists on the compressed one). Every failure to load is an
  :class:`ArtifactError` saying what is wrong and what to do, or ``FileNotFoundError`` naming the path.

Why TorchScript: a fresh process loads it with nothing but torch (no user model class, no pickle of user code),
and libtorch loads it from C++ too. In torch 2.13 it is deprecated but supported, and it is the only standalone
format that holds dynamically quantized LSTMs: ``torch.export`` fails on them, and ``torch.save`` of the module
pickles the user's class. A trace records the operations run for the example batch, so models whose forward
branches on data are not traced faithfully; the saved artifact is therefore loaded back and compared with the
model on the example batch before saving returns.

What loading trusts: a TorchScript archive holds code that ``torch.jit.load`` runs, so load only files you trust,
as with any model file. The compressed format's SHA-256 checksum detects damage (truncation, flipped bytes), not
intent: whoever writes a file can compute a valid checksum. Its decoder checks every header field and refuses,
before allocating, sizes above ``max_bytes``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from typing import Any, BinaryIO

import torch
from torch import nn

from lightning_compress import compressed
from lightning_compress.backends import torch_internal_warnings_silenced
from lightning_compress.compressed import DEFAULT_MAX_BYTES, ArtifactError
from lightning_compress.inputs import ModelInput, forward_adapter, outputs_match, plain_outputs

FORMAT = "lightning_compress.quantized"
VERSION = 1
_HEADER = "lightning_compress.json"
_UNBOUNDED = 2**63 - 1  # verifying a file we just wrote ourselves


def save_quantized(model: nn.Module, example_input: Any, path: str | os.PathLike, **metadata: Any) -> None:
    """Trace ``model`` on ``example_input`` and write a standalone artifact to ``path``.

    ``example_input`` follows Lightning's ``example_input_array`` convention (a tensor, a tuple of positional
    inputs, or a dict of keyword inputs) or is a :class:`lightning_compress.inputs.ModelInput`. The artifact is
    called as ``model`` is (``artifact(**inputs)`` for keyword inputs) and returns tensors, tuples of them, or
    dicts of them (a ``ModelOutput`` or dataclass comes back as a dict of its non-None fields).

    Raises:
        RuntimeError: the reloaded artifact does not reproduce the model's output on ``example_input``.
    """
    archive = traced_archive(model, example_input, **metadata)
    with open(path, "wb") as f:
        f.write(archive)


def save_compressed(model: nn.Module, example_input: Any, path: str | os.PathLike, **metadata: Any) -> int:
    """Trace ``model`` on ``example_input`` and write a compressed artifact to ``path``; returns its size in bytes.

    As :func:`save_quantized`, in the format of :mod:`lightning_compress.compressed`: the zeros pruning made cost
    about a bit each. The artifact is verified: decoded, loaded back and compared with the model's output.
    """
    data = compressed.encode(traced_archive(model, example_input, **metadata), metadata)
    verify_reproduces(model, _load_compressed(data, "the compressed model", _UNBOUNDED), example_input)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def traced_archive(model: nn.Module, example_input: Any, **metadata: Any) -> bytes:
    """The bytes of a verified TorchScript archive of ``model`` traced on ``example_input``, with our header."""
    model.eval()
    example = ModelInput.from_example(example_input)
    adapter, trace_inputs = forward_adapter(model, example)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "torch": torch.__version__,
        "inputs": {"positional": len(example.args), "keywords": list(example.kwargs)},
        **metadata,
    }
    buffer = io.BytesIO()
    with torch_internal_warnings_silenced(), torch.inference_mode(), _lightning_scripting(model):
        traced = torch.jit.trace(adapter, example_kwarg_inputs=trace_inputs, check_trace=False, strict=False)
        torch.jit.save(traced, buffer, _extra_files={_HEADER: json.dumps(header)})
    verify_reproduces(model, _load_archive(io.BytesIO(buffer.getvalue()), "the traced model"), example)
    return buffer.getvalue()


def verify_reproduces(model: nn.Module, loaded: nn.Module, example_input: Any) -> None:
    """Raise ``RuntimeError`` unless ``loaded`` gives exactly ``model``'s output on ``example_input``."""
    example = ModelInput.from_example(example_input)
    with torch.inference_mode():
        expected, actual = plain_outputs(example(model)), example(loaded)
    if not outputs_match(expected, actual):
        raise RuntimeError(
            "The saved artifact does not reproduce the model's output on the example batch; the model's forward "
            "may depend on its input's values (data-dependent control flow), which tracing cannot record."
        )


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


def load_quantized(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.jit.ScriptModule:
    """Load an artifact written by ``DynamicQuantization(save_path=...)``, :func:`save_quantized` or
    :func:`save_compressed`. Needs only torch: not the training code, not Lightning.

    Args:
        path: the file.
        max_bytes: refuse a compressed artifact that declares more bytes than this once decoded (default 2 GiB).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ArtifactError: anything else that makes the file unloadable, with what to do.
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
    """Check our header inside the TorchScript archive, then load it; every failure as an ArtifactError."""
    header = _archive_header(archive, source)
    archive.seek(0)
    if header.get("format") != FORMAT:
        raise ArtifactError(f"{source} is a TorchScript archive but not a lightning_compress artifact")
    if header.get("version") != VERSION:
        raise ArtifactError(
            f"{source} has artifact format version {header.get('version')!r}; this lightning_compress reads version "
            f"{VERSION}. Upgrade lightning_compress to load it."
        )
    try:
        with torch_internal_warnings_silenced():
            module = torch.jit.load(archive, map_location="cpu")
    except (RuntimeError, ValueError, OSError) as error:
        raise ArtifactError(f"{source} could not be loaded by TorchScript ({error})") from error
    return module.eval()


def _archive_header(archive: BinaryIO, source: str) -> dict[str, Any]:
    """Our JSON header, read from the zip without torch; the reason the file is not ours if it is not."""
    try:
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            ours = [n for n in names if n.endswith(f"/extra/{_HEADER}")]
            if not ours:
                if any(n.endswith("/data.pkl") for n in names) and not any(n.endswith("/constants.pkl") for n in names):
                    raise ArtifactError(
                        f"{source} is a torch.save file (a pickle), not a lightning_compress artifact: load it with "
                        "torch.load, or write an artifact with DynamicQuantization(save_path=...) or save_quantized"
                    )
                raise ArtifactError(f"{source} is a zip or TorchScript archive but not a lightning_compress artifact")
            header = json.loads(z.read(ours[0]))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as error:
        raise ArtifactError(
            f"{source} is not a lightning_compress artifact (neither a TorchScript archive nor the compressed "
            f"format: {error})"
        ) from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{source} carries a damaged lightning_compress header ({error})") from error
    if not isinstance(header, dict):
        raise ArtifactError(f"{source} carries a damaged lightning_compress header (not a JSON object)")
    return header
