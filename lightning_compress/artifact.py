"""Standalone artifacts of quantized models: ``save_quantized`` / ``load_quantized``.

Format: a TorchScript archive (``torch.jit.trace`` with one real input batch, then ``torch.jit.save``) that
carries a small JSON header, ``lightning_compress.json``, with the format name and version.

Why TorchScript: a fresh process loads it with nothing but torch (no user model class, no pickle of user code),
and libtorch loads it from C++ too. In torch 2.13 it is deprecated but supported, and it is the only standalone
format that holds dynamically quantized LSTMs: ``torch.export`` fails on them, and ``torch.save`` of the module
pickles the user's class. A trace records the operations run for the example batch, so models whose forward
branches on data are not traced faithfully; the saved artifact is therefore loaded back and compared with the
model on the example batch before ``save_quantized`` returns.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_compress.backends import torch_internal_warnings_silenced
from lightning_compress.inputs import ModelInput, forward_adapter, plain_outputs

FORMAT = "lightning_compress.quantized"
VERSION = 1
_HEADER = "lightning_compress.json"
COMPRESSED_MAGIC = b"LCOMPRS\x00"  # files of lightning_compress.compressed, which load_quantized reads too


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
    verify_reproduces(model, _load_archive(buffer.getvalue(), "the traced model"), example)
    return buffer.getvalue()


def verify_reproduces(model: nn.Module, loaded: nn.Module, example_input: Any) -> None:
    """Raise ``RuntimeError`` unless ``loaded`` gives exactly ``model``'s output on ``example_input``."""
    example = ModelInput.from_example(example_input)
    with torch.inference_mode():
        expected, actual = plain_outputs(example(model)), example(loaded)
    if not _same(expected, actual):
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


def load_quantized(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load an artifact written by ``DynamicQuantization(save_path=...)`` or :func:`save_quantized`.

    Needs only torch: not the training code, not Lightning.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No quantized artifact at {path}")
    with open(path, "rb") as f:
        if f.read(len(COMPRESSED_MAGIC)) == COMPRESSED_MAGIC:
            from lightning_compress.compressed import load_compressed

            return load_compressed(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a lightning_compress quantized artifact (not a TorchScript archive)")
    with open(path, "rb") as f:
        return _load_archive(f.read(), path)


def _load_archive(archive: bytes, source: str) -> torch.jit.ScriptModule:
    extra = {_HEADER: ""}
    with torch_internal_warnings_silenced():
        module = torch.jit.load(io.BytesIO(archive), map_location="cpu", _extra_files=extra)
    try:
        header = json.loads(extra[_HEADER])
    except json.JSONDecodeError:
        header = {}
    if header.get("format") != FORMAT:
        raise ValueError(f"{source} is a TorchScript archive but not a lightning_compress quantized artifact")
    if header.get("version") != VERSION:
        raise ValueError(
            f"{source} has artifact format version {header.get('version')!r}; this lightning_compress reads version "
            f"{VERSION}. Upgrade lightning_compress to load it."
        )
    return module.eval()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
