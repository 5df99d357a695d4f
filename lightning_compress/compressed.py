"""Compressed artifacts: the zeros that pruning made cost (almost) nothing on disk.

``save_compressed(model, example_input, path)`` traces the model (float pruned, or dynamically quantized) to a
TorchScript archive, exactly as :func:`lightning_compress.save_quantized` does, then stores that archive's members
compactly; ``load_compressed(path)`` rebuilds the archive in memory and loads it with ``torch.jit.load``, in a
fresh process with torch alone, giving outputs identical to the saved model.

Encoding, per archive member: tensor storages (``data/N``) are split into a packed bitmask of their nonzero bytes
plus those bytes (a zeroed int8 weight costs one bit; a zeroed float32 weight four bits), everything else is kept
as it is; then all members together go through one LZMA stream, which squeezes the bitmask and the code (an
entropy coder over the serialized tensors). TorchScript's ``.debug_pkl`` members (source ranges for error
messages) are left out.

File layout (version 1), little-endian::

    magic     8 bytes   b"LCOMPRS\\x00"
    version   uint16    1
    length    uint32    of the header
    header    JSON      {"format", "version", "torch", "raw_size", "members": [[name, encoding, size], ...], ...}
    payload   LZMA (xz) stream of the encoded members, in header order
    checksum  32 bytes  SHA-256 of everything above

Loading checks the magic, then the version (a newer or unknown one is refused with a clear error), then the
checksum (a truncated file or any flipped byte is refused), and only then decodes. No pickle of Python objects is
involved in our layer; the TorchScript archive inside is read by torch's TorchScript loader.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import struct
import zipfile
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_compress.artifact import COMPRESSED_MAGIC, traced_archive, verify_reproduces
from lightning_compress.backends import torch_internal_warnings_silenced

FORMAT = "lightning_compress.compressed"
VERSION = 1
MAGIC = COMPRESSED_MAGIC
_PREFIX = struct.Struct("<8sHI")
_CHECKSUM_BYTES = 32


class ArtifactError(ValueError):
    """The file is not a valid lightning_compress compressed artifact (wrong format, version, or corrupted)."""


def save_compressed(model: nn.Module, example_input: Any, path: str | os.PathLike, **metadata: Any) -> int:
    """Trace ``model`` on ``example_input`` and write a compressed artifact to ``path``; returns its size in bytes.

    The artifact is verified: loaded back and compared with the model's output on ``example_input``.
    """
    data = encode(traced_archive(model, example_input, **metadata), metadata)
    verify_reproduces(model, _load(decode(data)), example_input)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def load_compressed(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load an artifact written by :func:`save_compressed` (or ``DynamicQuantization(compress=True)``)."""
    with open(path, "rb") as f:
        data = f.read()
    return _load(decode(data, source=os.fspath(path)))


def _load(archive: bytes) -> torch.jit.ScriptModule:
    with torch_internal_warnings_silenced():
        return torch.jit.load(io.BytesIO(archive), map_location="cpu").eval()


def encode(archive: bytes, metadata: dict[str, Any] | None = None) -> bytes:
    """Compress a TorchScript archive (bytes of its zip) into the artifact format."""
    members, chunks = [], []
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        for info in z.infolist():
            if info.filename.endswith(".debug_pkl"):
                continue
            raw = z.read(info.filename)
            if _is_storage(info.filename):
                encoded, encoding = _sparse_bytes(raw), "nonzero-bitmask"
            else:
                encoded, encoding = raw, "raw"
            members.append([info.filename, encoding, len(raw)])
            chunks.append(encoded)
    raw_payload = b"".join(chunks)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "torch": torch.__version__,
        "raw_size": len(raw_payload),
        "members": members,
        "metadata": metadata or {},
    }
    header_bytes = json.dumps(header, sort_keys=True).encode()
    payload = lzma.compress(raw_payload, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    body = _PREFIX.pack(MAGIC, VERSION, len(header_bytes)) + header_bytes + payload
    return body + hashlib.sha256(body).digest()


def decode(data: bytes, source: str = "artifact") -> bytes:
    """Check and decompress an artifact back into the bytes of a TorchScript archive."""
    if len(data) < _PREFIX.size or data[:8] != MAGIC:
        raise ArtifactError(f"{source} is not a lightning_compress compressed artifact (bad magic bytes)")
    _, version, header_length = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise ArtifactError(
            f"{source} has compressed-artifact format version {version}; this lightning_compress reads version "
            f"{VERSION} only. Upgrade lightning_compress to read newer files."
        )
    if len(data) < _PREFIX.size + header_length + _CHECKSUM_BYTES:
        raise ArtifactError(f"{source} is truncated: {len(data)} bytes cannot hold its header and checksum")
    body, checksum = data[:-_CHECKSUM_BYTES], data[-_CHECKSUM_BYTES:]
    if hashlib.sha256(body).digest() != checksum:
        raise ArtifactError(f"{source} is corrupted or truncated: its SHA-256 checksum does not match")
    header = json.loads(body[_PREFIX.size : _PREFIX.size + header_length])
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ArtifactError(f"{source}: unexpected header {header.get('format')!r} v{header.get('version')!r}")
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    raw_payload = decompressor.decompress(body[_PREFIX.size + header_length :], max_length=header["raw_size"] + 1)
    if len(raw_payload) != header["raw_size"] or not decompressor.eof:
        raise ArtifactError(f"{source}: the payload does not decompress to the size its header declares")
    archive = io.BytesIO()
    offset = 0
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as z:
        for name, encoding, size in header["members"]:
            if encoding == "raw":
                raw, offset = raw_payload[offset : offset + size], offset + size
            elif encoding == "nonzero-bitmask":
                raw, offset = _dense_bytes(raw_payload, offset, size)
            else:
                raise ArtifactError(f"{source}: unknown member encoding {encoding!r}")
            z.writestr(name, raw)
    if offset != len(raw_payload):
        raise ArtifactError(f"{source}: the payload is longer than its members")
    return archive.getvalue()


def _is_storage(name: str) -> bool:
    parts = name.split("/")
    return len(parts) >= 2 and parts[-2] == "data" and parts[-1].isdigit()


def _sparse_bytes(raw: bytes) -> bytes:
    """Packed bitmask of the nonzero bytes, then those bytes."""
    values = np.frombuffer(raw, dtype=np.uint8)
    nonzero = values != 0
    return np.packbits(nonzero).tobytes() + values[nonzero].tobytes()


def _dense_bytes(payload: bytes, offset: int, size: int) -> tuple[bytes, int]:
    mask_length = (size + 7) // 8
    nonzero = np.unpackbits(np.frombuffer(payload, dtype=np.uint8, count=mask_length, offset=offset))[:size].astype(
        bool
    )
    count = int(nonzero.sum())
    values = np.zeros(size, dtype=np.uint8)
    values[nonzero] = np.frombuffer(payload, dtype=np.uint8, count=count, offset=offset + mask_length)
    return values.tobytes(), offset + mask_length + count
