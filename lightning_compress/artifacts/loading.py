"""Loading an artifact: :func:`load_quantized`, the one entry for every format, and :func:`load_compressed`.

The format is chosen by the file itself: each reader of :data:`READERS` is asked in turn whether the file is its
format (by its first bytes, or its suffix where a format has no header of its own) and the first that says so
loads it. A new format is its module and one line in :data:`READERS`. Every failure to load is an
:class:`~lightning_compress.artifacts.headers.ArtifactError` saying what is wrong and what to do, or
``FileNotFoundError`` naming the path. Needs only torch: not the training code, not Lightning.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from lightning_compress.artifacts import compressed, exported, onnx_format, torchscript
from lightning_compress.artifacts.compressed import DEFAULT_MAX_BYTES
from lightning_compress.artifacts.headers import ArtifactError


@dataclasses.dataclass(frozen=True)
class Reader:
    """One format :func:`load_quantized` reads: whether a file is in it, from its path and first 16 bytes, and how
    to load it (``load(data, path, max_bytes)``)."""

    recognizes: Callable[[str, bytes], bool]
    load: Callable[[bytes, str, int], Any]


def load_quantized(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.nn.Module:
    """Load an artifact written by ``DynamicQuantization(save_path=...)``, ``StaticQuantization(save_path=...)``,
    :func:`save_quantized` or :func:`save_compressed`. Needs only torch: not the training code, not Lightning (an
    ONNX artifact also needs the ``[onnx]`` extra, a ``StaticQuantization`` program torchao, the ``[static]`` extra).

    An ONNX artifact loads as a module that runs an ``onnxruntime.InferenceSession`` with ``torch.get_num_threads()``
    intra-op threads, called as the model's forward was, returning torch tensors. A ``StaticQuantization`` artifact
    (``.pt2``) loads as a :class:`~lightning_compress.artifacts.exported.CompiledProgram`: it is compiled with
    ``torch.compile`` and inductor's freezing at its first call of each input shape (seconds to tens of seconds),
    then runs int8 kernels.

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
    reader = next(r for r in READERS if r.recognizes(source, data[:16]))
    return reader.load(data, source, max_bytes)


def load_compressed(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.jit.ScriptModule:
    """Load an artifact written by :func:`save_compressed` (``load_quantized`` reads it too)."""
    source = os.fspath(path)
    return _load_compressed(_read(source), source, max_bytes)


def _load_compressed(data: bytes, source: str, max_bytes: int) -> torch.jit.ScriptModule:
    # Decoded into a temporary file that TorchScript reads from: memory holds a few blocks, not the archive.
    with tempfile.TemporaryFile() as archive:
        compressed.decode_to(data, archive, source, max_bytes)
        archive.seek(0)
        return torchscript.load(archive, source)


def _read(source: str) -> bytes:
    if not os.path.exists(source):
        raise FileNotFoundError(f"No artifact at {source}")
    if os.path.isdir(source):
        raise ArtifactError(f"{source} is a folder; pass the artifact file written by save_path=...")
    with open(source, "rb") as f:
        return f.read()


def _load_onnx(data: bytes, source: str, max_bytes: int) -> torch.nn.Module:
    return onnx_format.load(data, source)


def _load_archive(data: bytes, source: str, max_bytes: int) -> torch.jit.ScriptModule:
    return torchscript.load(io.BytesIO(data), source)


#: The formats :func:`load_quantized` reads, asked in this order. TorchScript comes last and takes any other file:
#: its header check says what a file that is not an artifact is (a ``torch.save`` pickle, another zip, ...).
READERS: tuple[Reader, ...] = (
    Reader(lambda path, head: compressed.is_compressed(head), _load_compressed),
    Reader(lambda path, head: head[:2] != b"PK" and onnx_format.is_onnx(path, head), _load_onnx),
    Reader(exported.is_exported, exported.load),
    Reader(lambda path, head: True, _load_archive),
)
