import struct

import pytest
import torch
from helpers import pruned_mlp
from torch import nn

from lightning_compress import ArtifactError, load_compressed, load_quantized, save_compressed
from lightning_compress.artifacts.compressed import VERSION, decode
from lightning_compress.quantization.dynamic import quantize_dynamic_copy
from lightning_compress.quantization.measure import serialized_size_bytes


def _pruned_mlp(widths, sparsity=0.9):
    return pruned_mlp(widths, sparsity, "global")


@pytest.fixture(scope="module")
def digits_artifact(tmp_path_factory):
    model = _pruned_mlp([64, 256, 256, 10])
    quantized = quantize_dynamic_copy(model, torch.qint8, {nn.Linear})
    path = tmp_path_factory.mktemp("digits") / "mlp.lcz"
    size = save_compressed(quantized, torch.rand(16, 64), path)
    return dict(model=model, quantized=quantized, path=path, size=size)


@pytest.mark.parametrize("widths", [[64, 256, 256, 10], [512, 2048, 2048, 10]], ids=["digits-mlp", "5M-mlp"])
def test_int8_at_90_percent_is_at_least_16x_smaller_than_fp32_dense(tmp_path, widths):
    model = _pruned_mlp(widths)
    quantized = quantize_dynamic_copy(model, torch.qint8, {nn.Linear})
    x = torch.rand(8, widths[0])
    size = save_compressed(quantized, x, tmp_path / "m.lcz")
    assert size == (tmp_path / "m.lcz").stat().st_size
    assert serialized_size_bytes(model) / size >= 16
    assert torch.equal(load_compressed(tmp_path / "m.lcz")(x), quantized(x))


def test_float_pruned_model_round_trip_is_smaller_than_dense(tmp_path):
    model = _pruned_mlp([64, 256, 256, 10])
    x = torch.rand(8, 64)
    size = save_compressed(model, x, tmp_path / "f.lcz")
    assert serialized_size_bytes(model) / size > 4  # zero float32 weights cost a few bits each
    assert torch.equal(load_compressed(tmp_path / "f.lcz")(x), model(x))


def test_fresh_process_round_trip_via_both_loaders(digits_artifact, run_in_fresh_process):
    x = torch.rand(5, 64)
    expected = digits_artifact["quantized"](x)
    assert torch.equal(run_in_fresh_process("load_compressed", digits_artifact["path"], x), expected)
    assert torch.equal(run_in_fresh_process("load_quantized", digits_artifact["path"], x), expected)


def test_every_single_flipped_byte_is_refused(digits_artifact):
    data = digits_artifact["path"].read_bytes()
    assert decode(data)  # the intact file decodes
    for position in range(len(data)):
        corrupted = bytearray(data)
        corrupted[position] ^= 0x01
        with pytest.raises(ArtifactError):
            decode(bytes(corrupted))


@pytest.mark.parametrize("keep", [0, 5, 14, 100, -33, -1])
def test_truncated_files_are_refused(digits_artifact, keep):
    data = digits_artifact["path"].read_bytes()
    with pytest.raises(ArtifactError, match="truncated|corrupted|magic"):
        decode(data[:keep] if keep >= 0 else data[:keep])


def test_newer_version_is_refused_with_a_clear_error(digits_artifact, tmp_path):
    data = bytearray(digits_artifact["path"].read_bytes())
    struct.pack_into("<H", data, 8, VERSION + 1)
    (tmp_path / "newer.lcz").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"format version {VERSION + 1}.*reads version {VERSION}.*Upgrade"):
        load_compressed(tmp_path / "newer.lcz")


def test_other_files_are_refused(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(ArtifactError, match="bad magic"):
        load_compressed(tmp_path / "x.bin")


def test_dynamic_quantization_compress_logs_the_compressed_size(quiet_trainer_kwargs, tmp_path):
    import lightning.pytorch as pl
    from helpers import DigitsDataModule, DigitsMLP

    from lightning_compress import DynamicQuantization, MagnitudePruning

    quant = DynamicQuantization(save_path=tmp_path / "m.lcz", compress=True)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=3, callbacks=[MagnitudePruning(amount=0.9), quant], **quiet_trainer_kwargs)
    trainer.fit(DigitsMLP(hidden=256), datamodule=DigitsDataModule())
    results = quant.results
    assert results["quantization/size_mb_compressed"] == (tmp_path / "m.lcz").stat().st_size / 1e6
    assert results["quantization/size_mb_before"] / results["quantization/size_mb_compressed"] >= 16
    x = torch.rand(7, 64)
    assert torch.equal(load_quantized(tmp_path / "m.lcz")(x), quant.quantized_model(x))


def test_compress_needs_a_save_path():
    from lightning_compress import DynamicQuantization

    with pytest.raises(ValueError, match="`compress=True` needs `save_path`"):
        DynamicQuantization(compress=True)


# ---------------------------------------------------------------------------------------------- hostile files
def _rechecksummed(header: dict, payload: bytes, header_length: int | None = None) -> bytes:
    """An artifact with this header and payload and a valid checksum, as anyone can write one."""
    import hashlib
    import json

    from lightning_compress.artifacts.compressed import MAGIC

    header_bytes = json.dumps(header).encode()
    length = len(header_bytes) if header_length is None else header_length
    body = struct.pack("<8sHI", MAGIC, VERSION, length) + header_bytes + payload
    return body + hashlib.sha256(body).digest()


def _parts(data: bytes) -> tuple[dict, bytes]:
    import json

    (length,) = struct.unpack_from("<I", data, 10)
    return json.loads(data[14 : 14 + length]), data[14 + length : -32]


def _bomb(tmp_path, megabytes: int) -> bytes:
    """A few kilobytes that declare ``megabytes`` of zeros once decoded: legal, but huge."""
    import io
    import zipfile

    from lightning_compress.artifacts.compressed import encode

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("m/data/0", bytes(megabytes * 2**20))
    return encode(archive.getvalue())


def test_a_decompression_bomb_is_decoded_as_a_stream(tmp_path):
    import tracemalloc

    from lightning_compress.artifacts.compressed import decode_to

    data = _bomb(tmp_path, 32)
    declared = 32 * 2**20
    assert len(data) < 20_000
    (tmp_path / "bomb.lcz").write_bytes(data)
    tracemalloc.start()
    try:
        with open(tmp_path / "archive.zip", "wb") as out:
            decode_to(data, out)
        _, to_file = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with pytest.raises(ArtifactError, match="not a lightning_compress artifact"):  # decodes, then is not ours
            load_quantized(tmp_path / "bomb.lcz")
        _, loading = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        in_memory = len(decode(data))
        _, to_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "archive.zip").stat().st_size > declared and in_memory > declared
    # the LZMA dictionary (no larger than the payload), the bitmask (an eighth) and a few 2 Mi-entry blocks
    assert max(to_file, loading) < 1.5 * declared, (to_file, loading)
    assert to_bytes < 4 * declared, to_bytes  # decode() returns the bytes: those, and the buffer they grew in


def test_an_xz_stream_that_asks_for_a_huge_dictionary_is_refused(digits_artifact, tmp_path):
    import lzma

    header, _ = _parts(digits_artifact["path"].read_bytes())
    raw = decode(digits_artifact["path"].read_bytes())  # any bytes will do as content
    greedy = lzma.compress(raw[:1000], format=lzma.FORMAT_XZ, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 2**30}])
    (tmp_path / "greedy.lcz").write_bytes(_rechecksummed(header, greedy))
    with pytest.raises(ArtifactError, match="not a valid xz stream.*[Mm]emory"):
        load_quantized(tmp_path / "greedy.lcz")


def test_declared_sizes_above_max_bytes_are_refused_before_allocating(tmp_path):
    import tracemalloc

    data = _bomb(tmp_path, 8)
    (tmp_path / "bomb.lcz").write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError, match=r"declares 8,388,608 bytes.*max_bytes=1,000,000.*larger max_bytes"):
            load_quantized(tmp_path / "bomb.lcz", max_bytes=1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_random_mutations_with_a_valid_checksum_raise_only_artifact_errors(tmp_path):
    import random

    quantized = quantize_dynamic_copy(nn.Sequential(nn.Linear(4, 3)), torch.qint8, {nn.Linear})
    save_compressed(quantized, torch.rand(2, 4), tmp_path / "small.lcz")
    header, payload = _parts((tmp_path / "small.lcz").read_bytes())
    rng = random.Random(0)
    pool = [None, -1, 0, 1, 2**62, 1.5, True, "", "x" * 2000, "raw", "nonzero-bitmask", [], {}, [1, 2, 3]]
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(1200):
        h = __import__("copy").deepcopy(header)
        p, length = payload, None
        kind = rng.randrange(7)
        if kind == 0:
            h[rng.choice(["format", "version", "raw_size", "members", "metadata", "torch"])] = rng.choice(pool)
        elif kind == 1:
            del h[rng.choice(list(h))]
        elif kind == 2 and h["members"]:
            member = rng.choice(h["members"])
            member[rng.randrange(3)] = rng.choice(pool + [m[0] for m in h["members"]])
        elif kind == 3:
            rng.shuffle(h["members"]) if rng.random() < 0.5 else h["members"].pop(rng.randrange(len(h["members"])))
        elif kind == 4:
            h["raw_size"] = max(0, h["raw_size"] + rng.randint(-50, 50))
        elif kind == 5:
            cut = rng.randrange(len(p))
            p = p[:cut] if rng.random() < 0.5 else p + bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        else:
            length = rng.choice([0, 1, 13, len(str(h)) + rng.randint(-20, 20), 2**32 - 1])
        (tmp_path / "m.lcz").write_bytes(_rechecksummed(h, p, length))
        try:
            load_quantized(tmp_path / "m.lcz")
            outcomes["loaded"] += 1
        except ArtifactError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 900  # and nothing but ArtifactError escaped


def test_a_header_of_a_newer_version_asks_to_upgrade(digits_artifact, tmp_path):
    header, payload = _parts(digits_artifact["path"].read_bytes())
    (tmp_path / "v2.lcz").write_bytes(_rechecksummed({**header, "version": 2}, payload))
    with pytest.raises(ArtifactError, match="format version 2.*Upgrade lightning_compress"):
        load_quantized(tmp_path / "v2.lcz")


@pytest.mark.parametrize("loader", [load_quantized, load_compressed])
def test_wrong_files_and_paths_give_clear_errors(tmp_path, loader):
    with pytest.raises(FileNotFoundError, match="missing.lcz"):
        loader(tmp_path / "missing.lcz")
    with pytest.raises(ArtifactError, match="is a folder"):
        loader(tmp_path)
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ArtifactError, match="torch.save file" if loader is load_quantized else "bad magic"):
        loader(tmp_path / "weights.pt")
