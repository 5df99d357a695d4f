"""The artifact findings of the issue-17 trial, by kind, for every format: a trace verified only on the shapes
validation used (item 1), a `save_path` that cannot be a file and a late failure that took the figures away
(item 3), sizes that did not describe the file (item 6), a damaged file that loaded (item 10), and the artifact's
own latency (item 9's artifact part)."""

import contextlib
import logging
import os
import shutil
import struct
import warnings
import zipfile

import lightning.pytorch as pl
import onnx
import pytest
import torch
from helpers import DigitsDataModule, DigitsMLP, TimeSteps
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_compress import ArtifactError, DynamicQuantization, load_quantized, save_quantized
from lightning_compress.artifacts import write_verified
from lightning_compress.artifacts.onnx_format import INT8_RTOL
from lightning_compress.inputs import ModelInput
from lightning_compress.quantization.dynamic import quantize_dynamic_copy


class ZerosOfBatch(nn.Module):
    """``torch.zeros(1, len(x), 32)`` (trial repro_1b): a trace records the batch size it saw."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gru = nn.GRU(4, 32, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h0 = torch.zeros(1, len(x), 32)
        return self.head(self.gru(x, h0)[0][:, -1])


class Scaled(nn.Module):
    """A TracerWarning in the user's code on a trace that is right on every shape, and a forward TorchScript cannot
    compile (a ``with`` over a context manager)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        with contextlib.nullcontext():
            return self.linear(x) / float(x.shape[-1]) ** 0.5  # the warned line


def _quantized(model):
    return quantize_dynamic_copy(model.eval(), torch.qint8, {nn.Linear, nn.GRUCell, nn.GRU})


@pytest.mark.parametrize(
    "model, seen, unseen",
    [
        (TimeSteps, [(6, 8, 4), (3, 8, 4)], [(2, 12, 4), (5, 3, 4)]),  # every validation batch 8 steps
        (ZerosOfBatch, [(16, 5, 4), (16, 5, 4)], [(1, 5, 4), (40, 5, 4)]),  # every validation batch 16 rows
    ],
)
def test_a_trace_that_reproduces_only_the_validation_shapes_is_not_kept(tmp_path, model, seen, unseen):
    model = model()
    quantized = _quantized(model)
    inputs = [ModelInput((torch.randn(*shape),)) for shape in seen]
    written = write_verified(quantized, tmp_path / "m.ts", inputs, reference=model)
    assert written.form == "script" and "trace" in written.rejected
    loaded = load_quantized(tmp_path / "m.ts")
    for shape in unseen:
        x = torch.randn(*shape)
        assert torch.equal(loaded(x), quantized(x))


class RowsOfBatch(nn.Module):
    """``torch.zeros(len(x), ...)`` in a small model, for the ONNX format."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        return self.linear(x) + torch.ones(len(x), 1)


def test_an_onnx_file_keeps_the_batch_dynamic_where_a_trace_recorded_it(tmp_path):
    model = RowsOfBatch().eval()
    written = write_verified(model, tmp_path / "m.onnx", [ModelInput((torch.randn(16, 8),))] * 2)
    assert written.compared == ["(float32[16, 8])", "(float32[1, 8])", "(float32[17, 8])"]
    loaded = load_quantized(tmp_path / "m.onnx")
    for rows in (1, 40):
        x = torch.randn(rows, 8)
        expected = model(x)
        assert (loaded(x) - expected).abs().max() <= INT8_RTOL * expected.abs().max()


class ScaledScriptable(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        return self.linear(x) / float(x.shape[-1]) ** 0.5


def test_a_tracer_warning_in_the_users_code_prefers_the_script_form_when_it_reproduces(tmp_path):
    model = ScaledScriptable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = write_verified(
            _quantized(model), tmp_path / "m.ts", [ModelInput((torch.randn(4, 8),))], reference=model
        )
    assert written.form == "script" and written.caveat is None
    assert "torch warned that the trace might not generalize (test_artifact_kinds.py:" in written.rejected["trace"]
    assert not [w for w in caught if "generalize" in str(w.message)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ts"]


def test_a_trace_kept_despite_a_tracer_warning_in_the_users_code_says_so_in_one_line(tmp_path):
    model = Scaled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = write_verified(
            _quantized(model), tmp_path / "m.ts", [ModelInput((torch.randn(4, 8),))], reference=model
        )
    assert written.form == "trace" and "cannot compile" in written.rejected["script"]
    ours = [str(w.message) for w in caught if "might not generalize" in str(w.message)]
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]  # the raw warning became ours
    assert len(ours) == 1 and "test_artifact_kinds.py:" in ours[0]
    assert "verified on: (float32[4, 8]), (float32[1, 8]), (float32[5, 8])" in ours[0]
    assert written.caveat in ours[0]


@pytest.mark.parametrize("save_path", ["", "out/", "existing", f"out{os.sep}"])
def test_a_save_path_that_cannot_be_a_file_fails_at_construction_naming_it(tmp_path, monkeypatch, save_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    with pytest.raises(ValueError, match=r"`save_path=.*` (is empty|is a folder|ends with a separator)"):
        DynamicQuantization(save_path=save_path)


def _flip(path, at):
    data = bytearray(path.read_bytes())
    data[at : at + 4] = bytes(255 - b for b in data[at : at + 4])
    path.write_bytes(bytes(data))


def _member_data(path, kind):
    """Where the bytes of the first archive member whose name contains ``kind`` start in the file."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if kind in i.filename and i.file_size > 16)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_length + extra_length + 8


def test_a_damaged_artifact_is_refused_naming_what_is_damaged(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(3, 16)
    save_quantized(model, x, tmp_path / "m.ts")
    (tmp_path / "q.ts").write_bytes((tmp_path / "m.ts").read_bytes())
    _flip(tmp_path / "m.ts", _member_data(tmp_path / "m.ts", "/data/"))  # inside a weight's storage
    with pytest.raises(ArtifactError, match=r"damaged: its member '.*data/\d+' does not match the CRC-32"):
        load_quantized(tmp_path / "m.ts")
    # the code of the archive, another kind of member
    _flip(tmp_path / "q.ts", _member_data(tmp_path / "q.ts", "/code/"))
    with pytest.raises(
        ArtifactError, match=r"damaged: its member '.*code/.*' (does not match the CRC-32|cannot be read)"
    ):
        load_quantized(tmp_path / "q.ts")
    # ONNX: the graph's SHA-256 in our header
    save_quantized(model, x, tmp_path / "m.onnx")
    weights = max(onnx.load(tmp_path / "m.onnx").graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    _flip(tmp_path / "m.onnx", (tmp_path / "m.onnx").read_bytes().find(weights[:32]) + 8)
    with pytest.raises(ArtifactError, match=r"m.onnx is damaged: its graph .* does not match the SHA-256"):
        load_quantized(tmp_path / "m.onnx")


class WithTable(DigitsMLP):
    """A table held as a plain tensor attribute (not a parameter or buffer), as Lightning's demo transformer holds
    its positional encoding: the state dict does not count it, the artifact stores it (trial repro_6)."""

    def __init__(self):
        super().__init__(hidden=16)
        self.table = torch.linspace(0, 1, 4000 * 64).reshape(4000, 64)

    def forward(self, x):
        return super().forward(x.flatten(1) + 1e-3 * self.table.mean(0))


class Sabotage(Callback):
    """During training: one `save_path` becomes a folder (trial repro_3), another one's folder becomes a file."""

    def __init__(self, folder_at, file_at):
        self.folder_at, self.file_at = folder_at, file_at

    def on_train_epoch_end(self, trainer, pl_module):
        self.folder_at.mkdir()
        shutil.rmtree(self.file_at)
        self.file_at.write_text("not a folder")


def test_figures_of_every_artifact_and_a_late_failure_keeps_them(tmp_path, quiet_trainer_kwargs, caplog):
    sized = DynamicQuantization(save_path=tmp_path / "sized.ts")
    folder = DynamicQuantization(save_path=tmp_path / "late.ts")
    gone = DynamicQuantization(save_path=tmp_path / "gone" / "c.ts")
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        callbacks=[sized, folder, gone, Sabotage(tmp_path / "late.ts", tmp_path / "gone")],
        max_epochs=1,
        limit_train_batches=2,
        **quiet_trainer_kwargs,
    )
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning) as warned:
        trainer.fit(WithTable(), datamodule=DigitsDataModule())
    # every artifact's size and latency; a larger file says why, measured
    results = sized.results
    assert results["quantization/size_mb_artifact"] == os.path.getsize(tmp_path / "sized.ts") / 1e6
    assert results["quantization/latency_ms_artifact"] > 0
    assert results["quantization/size_mb_artifact"] > results["quantization/size_mb_before"]
    summary = next(r.getMessage() for r in caplog.records if "sized.ts" in r.getMessage())
    assert "larger than the float state dict" in summary and "table (1.024 MB)" in summary
    assert "artifact latency:" in summary and "float model timed alongside" in summary
    # the late failures: warned, every figure measured kept, and the quantized model
    messages = [str(w.message) for w in warned]
    for quant, path in ((folder, tmp_path / "late.ts"), (gone, tmp_path / "gone" / "c.ts")):
        assert quant.quantized_model is not None
        assert quant.results["quantization/accuracy_after"] == results["quantization/accuracy_after"]
        assert "quantization/accuracy_artifact" not in quant.results
        assert any(str(path) in m and "`quantized_model` holds it" in m for m in messages)
