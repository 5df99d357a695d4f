"""The compressed artifact format: the zeros that pruning made cost (almost) nothing on disk. A codec only:
:func:`encode` turns the bytes of a TorchScript archive into the format, :func:`decode` turns them back, checked
and bounded. Saving and loading models is :mod:`lightning_compress.artifacts`'s job.

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

Decoding checks the magic, the version (a newer one is refused with an upgrade hint), the checksum (a truncated
file or any flipped byte is refused), then the header's every field, and refuses before allocating anything when
the sizes it declares exceed ``max_bytes``. It then decodes as a stream, one block at a time: its peak memory is
the LZMA dictionary (at most 64 MiB, no larger than the payload when we wrote it; a stream that asks for more is
refused), one member's bitmask (an eighth of its size) and a few blocks, however the payload was crafted. The
checksum proves the file is what its writer wrote, not that the writer meant well: anyone can write a file with
a valid checksum.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np
import torch

from lightning_compress.artifacts import headers
from lightning_compress.artifacts.headers import ArtifactError

__all__ = ["ArtifactError", "decode", "decode_to", "encode", "is_compressed"]

FORMAT = "lightning_compress.compressed"
VERSION = 1
MAGIC = b"LCOMPRS\x00"
#: Default bound on the bytes a compressed artifact may declare (its decoded archive): 2 GiB.
DEFAULT_MAX_BYTES = 2 * 1024**3
ENCODINGS = ("raw", "nonzero-bitmask")
_PREFIX = struct.Struct("<8sHI")
_CHECKSUM_BYTES = 32
_BLOCK = 1 << 18  # bytes of a bitmask decoded at a time (2 Mi entries)
_DECODER_MEMORY = 96 * 2**20  # liblzma's memory for the 64 MiB dictionary, with room to spare


def is_compressed(data: bytes) -> bool:
    return data[: len(MAGIC)] == MAGIC


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
    # preset 9's dictionary (64 MiB), no larger than the payload: a larger one compresses no better, and the reader
    # allocates the whole dictionary the stream declares
    dictionary = min(64 * 2**20, max(4096, len(raw_payload)))
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dictionary}]
    payload = lzma.compress(raw_payload, format=lzma.FORMAT_XZ, filters=filters)
    body = _PREFIX.pack(MAGIC, VERSION, len(header_bytes)) + header_bytes + payload
    return body + hashlib.sha256(body).digest()


def decode(data: bytes, source: str = "artifact", max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Check and decompress an artifact back into the bytes of a TorchScript archive (see :func:`decode_to`)."""
    buffer = io.BytesIO()
    decode_to(data, buffer, source, max_bytes)
    return buffer.getvalue()


def decode_to(data: bytes, out: BinaryIO, source: str = "artifact", max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Check an artifact and write the TorchScript archive it holds into ``out`` (a seekable binary file).

    Memory: the LZMA dictionary (at most 64 MiB), one member's bitmask (an eighth of its size) and a few blocks of
    2 Mi entries, whatever the payload holds; the decoded bytes go to ``out``.

    Raises:
        ArtifactError: anything wrong with the file, including declared sizes above ``max_bytes``.
    """
    header, payload = _checked_header(data, source)
    members = header["members"]
    declared = sum(size for _, _, size in members)
    if max(declared, header["raw_size"]) > max_bytes:
        raise ArtifactError(
            f"{source} declares {max(declared, header['raw_size']):,} bytes once decoded, more than max_bytes="
            f"{max_bytes:,}. If you trust this file and have the memory, load it with a larger max_bytes."
        )
    stream = _Payload(payload, header["raw_size"], source)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        for name, encoding, size in members:
            with z.open(name, "w", force_zip64=size >= 2**31 - 1) as member:
                if encoding == "raw":
                    for start in range(0, size, _BLOCK * 8):
                        member.write(stream.read(min(_BLOCK * 8, size - start)))
                else:
                    _write_dense(stream, size, member)
    stream.finish()


def _checked_header(data: bytes, source: str) -> tuple[dict[str, Any], memoryview]:
    if len(data) < _PREFIX.size or data[: len(MAGIC)] != MAGIC:
        raise ArtifactError(f"{source} is not a lightning_compress compressed artifact (bad magic bytes)")
    _, version, header_length = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise ArtifactError(_newer(source, version))
    if len(data) < _PREFIX.size + header_length + _CHECKSUM_BYTES:
        raise ArtifactError(f"{source} is truncated: {len(data)} bytes cannot hold its header and checksum")
    body, checksum = memoryview(data)[:-_CHECKSUM_BYTES], data[-_CHECKSUM_BYTES:]
    if hashlib.sha256(body).digest() != checksum:
        raise ArtifactError(f"{source} is corrupted or truncated: its SHA-256 checksum does not match")
    header = headers.parse(bytes(body[_PREFIX.size : _PREFIX.size + header_length]), source)
    _check_fields(header, source)
    return header, body[_PREFIX.size + header_length :]


def _check_fields(header: Any, source: str) -> None:
    """Every field of a version-1 header, exactly: anything else is malformed."""
    if not isinstance(header, dict):
        raise _malformed(source, f"its header is {headers.describe(header)}, not a JSON object")
    if header.get("format") != FORMAT:
        raise _malformed(
            source, f"its header names the format {headers.describe(header.get('format'))}, not {FORMAT!r}"
        )
    if header.get("version") != VERSION:
        raise ArtifactError(_newer(source, header.get("version")))
    problem = headers.field_problem(
        header,
        {
            "format": lambda v: True,
            "version": lambda v: True,
            "torch": headers.is_name,
            "raw_size": headers.is_count,
            "members": lambda v: isinstance(v, list),
            "metadata": lambda v: True,
        },
    ) or headers.scalar_problem(header["metadata"], "metadata")
    if problem:
        raise _malformed(source, problem)
    names = set()
    for member in header["members"]:
        if not (isinstance(member, list) and len(member) == 3):
            raise _malformed(source, f"each member must be [name, encoding, size], got {headers.describe(member)}")
        name, encoding, size = member
        if not headers.is_name(name) or name in names:
            raise _malformed(
                source, f"member name {headers.describe(name)} is empty, too long, repeated or not a string"
            )
        if encoding not in ENCODINGS:
            raise _malformed(source, f"member {name!r:.80} has the unknown encoding {headers.describe(encoding)}")
        if not headers.is_count(size):
            raise _malformed(source, f"member {name!r:.80} has the size {headers.describe(size)}")
        names.add(name)
    members, raw_size = header["members"], header["raw_size"]
    encoded = sum(size + ((size + 7) // 8 if encoding != "raw" else 0) for _, encoding, size in members)
    if raw_size > encoded:
        raise _malformed(source, f"'raw_size' {raw_size:,} exceeds what its members can hold ({encoded:,})")


class _Payload:
    """The LZMA payload read as a stream: never more than ``raw_size`` bytes in all, errors as ArtifactError."""

    def __init__(self, compressed: memoryview, raw_size: int, source: str) -> None:
        # the writer's dictionary is at most 64 MiB; a stream asking the reader for more is refused
        self._decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_DECODER_MEMORY)
        self._input: memoryview | bytes = compressed
        self._left = raw_size
        self.source = source

    def read(self, n: int) -> bytes:
        if n > self._left:
            raise _malformed(self.source, "its members need more bytes than 'raw_size' declares")
        chunks, need = [], n
        while need:
            if self._decompressor.eof:
                raise _malformed(self.source, "its payload ends before its members do")
            try:
                out = self._decompressor.decompress(self._input, max_length=need)
            except lzma.LZMAError as error:
                raise _malformed(self.source, f"its payload is not a valid xz stream ({error})") from error
            self._input = b""
            if not out and self._decompressor.needs_input:
                raise _malformed(self.source, "its payload is truncated")
            chunks.append(out)
            need -= len(out)
        self._left -= n
        return b"".join(chunks)

    def finish(self) -> None:
        if self._left:
            raise _malformed(self.source, "its payload is longer than its members")
        try:
            extra = b"" if self._decompressor.eof else self._decompressor.decompress(self._input, max_length=1)
        except lzma.LZMAError as error:
            raise _malformed(self.source, f"its payload is not a valid xz stream ({error})") from error
        if extra or not self._decompressor.eof:
            raise _malformed(self.source, "its payload does not decompress to the size its header declares")


def _write_dense(stream: _Payload, size: int, out: BinaryIO) -> None:
    """Decode one ``nonzero-bitmask`` member into ``out``, one block of the bitmask at a time.

    ``np.place`` fills the nonzero positions without building an index array (boolean-mask assignment would
    allocate 8 bytes per nonzero entry).
    """
    mask = np.frombuffer(stream.read((size + 7) // 8), dtype=np.uint8)
    counts = [int(np.unpackbits(mask[i : i + _BLOCK]).sum()) for i in range(0, len(mask), _BLOCK)]
    if size % 8 and int(np.unpackbits(mask[-1:])[size % 8 :].sum()):
        raise _malformed(stream.source, "a member's bitmask marks bytes beyond the member's size")
    values = memoryview(stream.read(sum(counts)))
    offset = 0
    for block, count in zip(range(0, len(mask), _BLOCK), counts):
        entries = min(_BLOCK * 8, size - block * 8)
        keep = np.unpackbits(mask[block : block + _BLOCK], count=entries).view(bool)
        dense = np.zeros(entries, dtype=np.uint8)
        np.place(dense, keep, np.frombuffer(values[offset : offset + count], dtype=np.uint8))
        out.write(dense.data)
        offset += count


def _is_storage(name: str) -> bool:
    parts = name.split("/")
    return len(parts) >= 2 and parts[-2] == "data" and parts[-1].isdigit()


def _sparse_bytes(raw: bytes) -> bytes:
    """Packed bitmask of the nonzero bytes, then those bytes."""
    values = np.frombuffer(raw, dtype=np.uint8)
    nonzero = values != 0
    return np.packbits(nonzero).tobytes() + values[nonzero].tobytes()


def _malformed(source: str, what: str) -> ArtifactError:
    return ArtifactError(
        f"{source} is malformed: {what}. It was not written by lightning_compress, or was altered after its "
        "checksum was computed."
    )


def _newer(source: str, version: Any) -> str:
    return (
        f"{source} has compressed-artifact format version {headers.describe(version)}; this lightning_compress reads "
        f"version "
        f"{VERSION} only. Upgrade lightning_compress to read newer files."
    )
