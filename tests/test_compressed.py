import struct

import pytest
import torch
from helpers import pruned_mlp
from torch import nn

from lightning_compress import load_compressed, load_quantized, save_compressed
from lightning_compress.backends import quantize_dynamic_copy
from lightning_compress.compressed import VERSION, ArtifactError, decode
from lightning_compress.measure import serialized_size_bytes


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
    from digits import DigitsDataModule, DigitsMLP

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
