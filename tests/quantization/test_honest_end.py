"""What a new user's trial of issues 17/18 found at the end of fit, by kind: a validation stream is not read before
training and training stays bit-identical; layers whose weight the model's code reads stay float, found by
evidence; the final evaluations respect `limit_val_batches`; a shrink that removed nothing says why; the reason
for unmeasured artifact metrics is the true one (Lightning's BoringModel)."""

import logging

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import DigitsDataModule
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_compress import DynamicQuantization
from lightning_compress.artifacts.writing import Written
from lightning_compress.quantization import rehearsal
from lightning_compress.report import artifact_lines


def _trainer(**kwargs):
    pl.seed_everything(0, verbose=False)
    options = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**options, **kwargs})


def _info(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


# ---------------------------------------------------------------------------------------------- a validation stream
class Stream(IterableDataset):
    """Each pass yields new samples from the stream's own generator (as a stream of live data does)."""

    def __init__(self, samples: int) -> None:
        self.samples, self.reads = samples, 0
        self.generator = torch.Generator().manual_seed(1)

    def __iter__(self):
        for _ in range(self.samples):
            self.reads += 1
            x = torch.rand(8, generator=self.generator)
            yield x, (x.sum() > 4).long()


class Plateau(pl.LightningModule):
    """ReduceLROnPlateau on the validation loss: what validation sees steers training."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.5)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"}}


class ReadsAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.reads = trainer.val_dataloaders.dataset.reads


def _fit_on_a_stream(callbacks, tmp_path):
    stream, probe = Stream(70), ReadsAtTrainStart()  # batches of 16: the last one holds 6
    train = [(torch.rand(16, 8, generator=torch.Generator().manual_seed(i)), torch.arange(16) % 2) for i in range(4)]
    trainer = _trainer(max_epochs=3, callbacks=[probe, *callbacks])  # seeds: the same initial weights
    model = Plateau()
    trainer.fit(model, DataLoader(train, batch_size=None), DataLoader(stream, batch_size=16))
    return [p.detach().clone() for p in model.parameters()], stream, probe


def test_a_validation_stream_is_not_read_before_training_and_training_is_bit_identical(tmp_path, caplog):
    plain, plain_stream, plain_probe = _fit_on_a_stream([], tmp_path)
    quant = DynamicQuantization(save_path=tmp_path / "stream.ts")
    with caplog.at_level(logging.INFO):
        weights, stream, probe = _fit_on_a_stream([quant], tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(plain, weights))  # the learning-rate schedule saw the same losses
    assert probe.reads == plain_probe.reads == 32  # before training: only the sanity check's 2 batches of 16
    assert stream.reads == plain_stream.reads + 70  # after training: the stream read once more, for all three models
    (line,) = [m for m in _info(caplog) if "the rehearsal does not read" in m]
    assert "rehearsed on the 2 batch(es) Lightning's sanity check drew" in line and "last batch's size" in line
    summary = next(m for m in _info(caplog) if "lightning_compress summary" in m)
    assert "the evaluation data is a stream: it was read once" in summary
    results = quant.results
    # the float model, the quantized model and the artifact were evaluated on the same batches of the stream
    assert results["quantization/val_loss_artifact"] == pytest.approx(results["quantization/val_loss_after"], abs=1e-6)
    assert abs(results["quantization/val_loss_after"] - results["quantization/val_loss_before"]) < 0.01


def test_what_the_rehearsal_may_read_without_side_effects():
    data = TensorDataset(torch.rand(10, 2))
    assert not rehearsal.is_stream(DataLoader(data, batch_size=4))
    assert not rehearsal.is_stream(DataLoader(data, batch_size=4, shuffle=True))  # the global generator: restored
    assert not rehearsal.is_stream([torch.rand(2, 2)])
    own = torch.Generator().manual_seed(0)
    assert rehearsal.is_stream(DataLoader(data, batch_size=4, shuffle=True, generator=own))  # its own generator
    assert rehearsal.is_stream(DataLoader(Stream(4), batch_size=2))
    assert rehearsal.is_stream(iter([torch.rand(2, 2)]))  # a one-shot iterator
    assert rehearsal.streams([DataLoader(data), DataLoader(Stream(4))]) == [
        "a DataLoader over Stream (an IterableDataset)"
    ]


# ---------------------------------------------------------------------------------------------- weights read by code
class ReadsWeights(pl.LightningModule):
    """A digits MLP whose forward multiplies by ``mid.weight.t()`` itself and whose validation logs
    ``head.weight.norm()``: code that breaks when those layers are quantized, outside their forward."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.mid, self.head = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        h = F.relu(self.body(x))
        h = F.relu(h @ self.mid.weight.t() + self.mid.bias)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())
        self.log("head_norm", self.head.weight.norm())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class MarkTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        logging.getLogger("lightning.pytorch").info("marker: training starts")


def test_layers_whose_weight_the_code_reads_stay_float_and_fit_end_respects_limit_val_batches(caplog):
    quant = DynamicQuantization(shrink=True)
    data = DigitsDataModule(batch_size=64)
    data.val_dataloader = lambda: DataLoader(data.val_set, batch_size=100)  # 4 batches; the trainer validates 2
    trainer = _trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2, callbacks=[MarkTrainStart(), quant])
    with caplog.at_level(logging.INFO):
        trainer.fit(ReadsWeights(), datamodule=data)
    messages = _info(caplog)
    assert quant.quantized_layers == ["body"]
    assert sorted(quant.kept_float) == ["head", "mid"]
    assert "its weight is read directly by the model's code" in quant.kept_float["mid"]
    assert "'function' object has no attribute 't'" in quant.kept_float["mid"]
    assert "has no attribute 'norm'" in quant.kept_float["head"]
    found = [i for i, m in enumerate(messages) if "reads the weight of" in m]
    assert found and "exclude=['mid', 'head']" in messages[found[0]]
    assert found[0] < messages.index("marker: training starts")  # the rehearsal found them before training

    # limit_val_batches: the float model's figures are the trainer's last validation of it
    metrics = trainer.callback_metrics
    assert quant.results["quantization/val_acc_before"] == pytest.approx(float(metrics["val_acc"]), abs=1e-6)
    assert quant.results["quantization/head_norm_before"] == pytest.approx(float(metrics["head_norm"]), abs=1e-5)
    summary = next(m for m in messages if "lightning_compress summary" in m)
    assert "limit_val_batches=2" in summary

    # shrink had nothing to remove (no structured pruning): one line says why, and the rehearsal said nothing
    assert not any("->" in m and "shrink:" in m for m in messages)
    (line,) = [line for line in summary.splitlines() if "shrink:" in line]
    assert "removed nothing" in line and "no output channel" in line


# ---------------------------------------------------------------------------------------------- unmeasured artifact
def test_an_artifact_run_by_a_validation_that_logs_no_metric_says_so(tmp_path, caplog):
    quant = DynamicQuantization(save_path=tmp_path / "boring.ts")
    trainer = _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2, callbacks=[quant])
    with caplog.at_level(logging.INFO):
        trainer.fit(BoringModel())
    summary = next(m for m in _info(caplog) if "lightning_compress summary" in m)
    assert "validation ran it" in summary and "logs no metric" in summary
    assert "never calls forward" not in summary and "example_input_array" not in summary

    # the other cause of the kind: a validation that never calls forward, compared on example_input_array only
    written = Written("trace", 1000, ["(float32[2, 32])"], {}, 0, {})
    (line,) = artifact_lines("a.ts", written, {}, None, True)[1:]
    assert "never calls forward" in line
