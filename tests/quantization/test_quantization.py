import csv
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from helpers import DigitsDataModule, DigitsLSTM, DigitsMLP, assert_fails_before_training
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_compress import DynamicQuantization, MagnitudePruning, QuantizationError, compat, load_quantized
from lightning_compress.quantization import dynamic
from lightning_compress.quantization.measure import quantized_weights, serialized_size_bytes


class SnapshotAtTrainEnd(Callback):
    """The float weights as training left them (after pruning was made permanent)."""

    def on_train_end(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}


def _fit(callbacks, kwargs, model, max_epochs=6, datamodule=None, **extra):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, **{**kwargs, **extra})
    trainer.fit(model, datamodule=datamodule or DigitsDataModule())
    return trainer


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    """One real run: digits MLP pruned to 80% and int8-quantized, with a CSV logger and an artifact."""
    root = tmp_path_factory.mktemp("mlp")
    pruning = MagnitudePruning(amount=0.8)
    quant = DynamicQuantization(save_path=root / "model.ts")
    snapshot = SnapshotAtTrainEnd()
    logger = CSVLogger(root, name="run")
    model = DigitsMLP(hidden=256)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=8,
        callbacks=[pruning, snapshot, quant],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=DigitsDataModule())
    return dict(root=root, quant=quant, model=model, snapshot=snapshot, logger=logger, pruning=pruning)


def test_mlp_accuracy_size_latency_logged(mlp_run):
    with open(mlp_run["logger"].log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = [
        "quantization/accuracy_before",
        "quantization/accuracy_after",
        "quantization/size_mb_before",
        "quantization/size_mb_after",
        "quantization/latency_ms_before",
        "quantization/latency_ms_after",
    ]
    row = next(r for r in rows if r.get("quantization/accuracy_after"))
    values = {k: float(row[k]) for k in keys}
    for key in keys:
        assert values[key] == pytest.approx(mlp_run["quant"].results[key], rel=1e-6)
    assert float(row["quantization/sparsity_before"]) == pytest.approx(0.8, abs=1e-4)
    assert float(row["quantization/sparsity_after"]) == pytest.approx(0.8, abs=1e-4)
    assert values["quantization/accuracy_before"] > 0.9
    assert values["quantization/accuracy_before"] - values["quantization/accuracy_after"] <= 0.02
    assert values["quantization/size_mb_before"] / values["quantization/size_mb_after"] > 3.5
    assert values["quantization/latency_ms_before"] > 0 and values["quantization/latency_ms_after"] > 0


def test_accuracy_is_measured_on_the_validation_set(mlp_run):
    dm = DigitsDataModule()
    dm.setup()
    metric = torchmetrics.Accuracy(task="multiclass", num_classes=10)
    quantized = mlp_run["quant"].quantized_model
    with torch.inference_mode():
        for x, y in dm.val_dataloader():
            metric.update(quantized(x), y)
    assert float(metric.compute()) == pytest.approx(mlp_run["quant"].results["quantization/accuracy_after"])


def test_float_model_is_left_untouched(mlp_run):
    model = mlp_run["model"]
    assert all(type(m) is not torch.ao.nn.quantized.dynamic.Linear for m in model.modules())
    assert isinstance(model.net[0], nn.Linear) and model.net[0].weight.requires_grad
    for name, value in model.state_dict().items():
        assert torch.equal(value, mlp_run["snapshot"].state[name]), name


def test_zeros_stay_zeros_after_quantization(mlp_run):
    weights = quantized_weights(mlp_run["quant"].quantized_model)
    for name in mlp_run["pruning"].parameter_names:
        pruned = mlp_run["snapshot"].state[name] == 0
        assert pruned.float().mean() > 0.3
        assert torch.all(weights[name][pruned] == 0), name


def test_artifact_round_trip_in_a_fresh_process_without_the_model_code(mlp_run, run_in_fresh_process):
    x = torch.rand(17, 64)
    loaded = run_in_fresh_process("load_quantized", mlp_run["root"] / "model.ts", x)
    assert torch.equal(loaded, mlp_run["quant"].quantized_model(x))


def test_summary_table_shows_the_measured_figures(mlp_run):
    from lightning_compress.report import summary_table

    quant = mlp_run["quant"]
    table = summary_table(quant.results, "qint8", quant.layer_sparsity, baseline_accuracy=0.987, save_path="m.ts")
    results = quant.results
    assert f"{results['quantization/accuracy_after']:.4f}" in table and "0.9870" in table
    size_ratio = results["quantization/size_mb_before"] / results["quantization/size_mb_after"]
    assert f"{size_ratio:.2f}x" in table and "latency (ms/batch)" in table
    for name in ("net.0.weight", "net.2.weight", "net.4.weight"):
        float_sparsity, quantized_sparsity = quant.layer_sparsity[name]
        assert float_sparsity == pytest.approx(float((mlp_run["snapshot"].state[name] == 0).float().mean()))
        assert f"{name}" in table and f"{float_sparsity:.2%}" in table
    assert "sparsity (overall)" in table and "80.00%" in table


def test_lstm_pruned_and_quantized(quiet_trainer_kwargs, tmp_path):
    pruning = MagnitudePruning(amount=0.5)
    quant = DynamicQuantization(save_path=tmp_path / "lstm.ts")
    snapshot = SnapshotAtTrainEnd()
    _fit([pruning, snapshot, quant], quiet_trainer_kwargs, DigitsLSTM(), max_epochs=6)
    quantized = quant.quantized_model
    assert type(quantized.lstm) is torch.ao.nn.quantized.dynamic.LSTM
    assert type(quantized.head) is torch.ao.nn.quantized.dynamic.Linear
    results = quant.results
    assert results["quantization/accuracy_before"] > 0.8
    assert results["quantization/accuracy_before"] - results["quantization/accuracy_after"] <= 0.05
    assert results["quantization/size_mb_before"] / results["quantization/size_mb_after"] > 2.5
    weights = quantized_weights(quantized)
    for name in ("lstm.weight_ih_l0", "lstm.weight_hh_l0", "head.weight"):
        pruned = snapshot.state[name] == 0
        assert pruned.any() and torch.all(weights[name][pruned] == 0)
    x = torch.rand(9, 64)
    assert torch.equal(load_quantized(tmp_path / "lstm.ts")(x), quantized(x))


def test_float16_and_torch_dtype_spelling(quiet_trainer_kwargs):
    quant = DynamicQuantization(dtype=torch.float16)
    assert quant.dtype == "float16"
    model = DigitsMLP(hidden=64)
    _fit([quant], quiet_trainer_kwargs, model, max_epochs=2)
    results = quant.results
    assert abs(results["quantization/accuracy_before"] - results["quantization/accuracy_after"]) <= 0.01
    weight = quantized_weights(quant.quantized_model)["net.0.weight"]
    assert torch.equal(weight, model.net[0].weight.detach().half().float())  # weights rounded to float16
    # sizes are measured, not estimated: torch.ao serializes float16 packed weights back as float32, and says so
    assert results["quantization/size_mb_after"] == serialized_size_bytes(quant.quantized_model) / 1e6
    (larger,) = [r for r in quant.comparison.regressions() if "larger" in r]
    assert "torch.ao stores float16 weights as float32: 3 layers (net." in larger


def test_evaluate_false_needs_no_validation_data(quiet_trainer_kwargs):
    quant = DynamicQuantization(evaluate=False)
    dm = DigitsDataModule()
    dm.setup()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[quant], **quiet_trainer_kwargs)
    trainer.fit(DigitsMLP(hidden=32), train_dataloaders=dm.train_dataloader())
    assert set(quant.results) == {
        "quantization/size_mb_before",
        "quantization/size_mb_after",
        "quantization/coverage",
    }


def test_custom_dataloader_and_metric(quiet_trainer_kwargs):
    dm = DigitsDataModule(shuffle=False)  # dynamic quantization depends on each batch's range: keep batches fixed
    dm.setup()
    metric = torchmetrics.Accuracy(task="multiclass", num_classes=10, top_k=3)
    quant = DynamicQuantization(dataloader=dm.train_dataloader(), metric=metric)
    _fit([quant], quiet_trainer_kwargs, DigitsMLP(hidden=32), max_epochs=2)
    expected = torchmetrics.Accuracy(task="multiclass", num_classes=10, top_k=3)
    with torch.inference_mode():
        for x, y in dm.train_dataloader():
            expected.update(quant.quantized_model(x), y)
    assert quant.results["quantization/accuracy_after"] == pytest.approx(float(expected.compute()))


def test_no_torch_internal_warnings_leak_but_user_warnings_do(quiet_trainer_kwargs):
    class Noisy(DigitsMLP):
        def forward(self, x):
            if not torch.jit.is_tracing() and not self.training:
                warnings.warn("user model warning", UserWarning, stacklevel=1)
                warnings.warn("user warning pointing at the caller", UserWarning, stacklevel=2)
            return super().forward(x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dynamic.quantize_dynamic_copy(DigitsMLP(hidden=8), torch.qint8, {nn.Linear})
        with compat.torch_internal_warnings_silenced():
            Noisy(hidden=8).eval()(torch.rand(2, 64))
    messages = [str(w.message) for w in caught]
    assert not any("torch.ao.quantization is deprecated" in m for m in messages)
    assert "user model warning" in messages and "user warning pointing at the caller" in messages


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(dtype="int4"), r"`dtype` must be one of \['qint8', 'float16'\]"),
        (dict(dtype=torch.quint8), "`dtype`"),
        (dict(modules={nn.Conv2d}), "Conv2d, which dynamic quantization cannot quantize.*Linear, LSTM.*activations"),
        (dict(modules={nn.ReLU, nn.Linear}), "ReLU"),
        (dict(modules=set()), "empty list"),
        (dict(metric="accuracy"), "`metric` must be a torchmetrics.Metric"),
        (dict(evaluate="no"), "`evaluate` must be True or False"),
        (dict(baseline_accuracy="0.9"), "`baseline_accuracy` must be None or a number"),
        (dict(monitor=""), "`monitor` must be None or the name of a logged metric"),
        (dict(exclude=[nn.Linear]), "`exclude` must be a list of glob patterns"),
        (dict(dataloader="batches"), "`dataloader` must be an iterable"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicQuantization(**kwargs)


def _fails_before_training(callbacks, model, quiet_trainer_kwargs, match, **fit_kwargs):
    assert_fails_before_training(quiet_trainer_kwargs, callbacks, model, match, **fit_kwargs)


def test_model_without_quantizable_modules_fails_before_training(quiet_trainer_kwargs):
    class ConvNet(DigitsMLP):
        def __init__(self):
            super().__init__(hidden=8)
            self.net = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 10, 8), nn.Flatten())

    _fails_before_training(
        [DynamicQuantization()],
        ConvNet(),
        quiet_trainer_kwargs,
        "before training.*would quantize nothing.*covers Linear, LSTM, GRU, LSTMCell, GRUCell, RNNCell.*holds Conv2d",
        datamodule=DigitsDataModule(),
    )


def test_evaluate_without_validation_data_fails_at_setup(quiet_trainer_kwargs):
    dm = DigitsDataModule()
    dm.setup()
    _fails_before_training(
        [DynamicQuantization()],
        DigitsMLP(hidden=8),
        quiet_trainer_kwargs,
        "needs evaluation data",
        train_dataloaders=dm.train_dataloader(),
    )


def test_save_path_without_any_batch_to_trace_fails_at_setup(quiet_trainer_kwargs, tmp_path):
    dm = DigitsDataModule()
    dm.setup()
    _fails_before_training(
        [DynamicQuantization(evaluate=False, save_path=tmp_path / "m.ts")],
        DigitsMLP(hidden=8),
        quiet_trainer_kwargs,
        "traces the model on one real input batch",
        train_dataloaders=dm.train_dataloader(),
    )


def test_metric_that_does_not_fit_the_output_fails_before_training(quiet_trainer_kwargs):
    _fails_before_training(
        [DynamicQuantization(metric=torchmetrics.MeanSquaredError())],
        DigitsMLP(hidden=8),
        quiet_trainer_kwargs,
        "MeanSquaredError cannot be computed on the model's output",
        datamodule=DigitsDataModule(),
    )


def test_failure_at_fit_end_keeps_model_and_checkpoints(quiet_trainer_kwargs, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("backend exploded")

    # only the end-of-fit run compares
    monkeypatch.setattr("lightning_compress.quantization.figures.compare", broken)
    snapshot = SnapshotAtTrainEnd()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = DigitsMLP(hidden=16)
    with pytest.raises(QuantizationError, match="backend exploded.*float model and its checkpoints are intact"):
        _fit(
            [snapshot, checkpoint, DynamicQuantization()],
            {**quiet_trainer_kwargs, "enable_checkpointing": True},
            model,
            max_epochs=1,
        )
    assert (tmp_path / "last.ckpt").exists()
    plain = DigitsMLP(hidden=16)
    plain.load_state_dict(torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshot.state[name])
        assert torch.equal(value, plain.state_dict()[name])


def test_load_quantized_rejects_other_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a lightning_compress artifact"):
        load_quantized(tmp_path / "junk.pt")
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(tmp_path / "plain.ts"))
    with pytest.raises(ValueError, match="not a lightning_compress artifact"):
        load_quantized(tmp_path / "plain.ts")
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "missing.ts")


def test_a_third_party_pruning_callback_takes_part_through_the_protocol(quiet_trainer_kwargs):
    from lightning_compress.protocols import PruningCallback

    class HalveFirstLayer(Callback):
        """Someone else's pruning: zeroes the first half of net.0's rows at the end of training."""

        pruned_parameter_names = ["net.0.weight"]

        def on_train_end(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.net[0].weight[: pl_module.net[0].weight.shape[0] // 2] = 0

    assert isinstance(HalveFirstLayer(), PruningCallback) and isinstance(MagnitudePruning(), PruningCallback)
    quant = DynamicQuantization()
    _fit([HalveFirstLayer(), quant], quiet_trainer_kwargs, DigitsMLP(hidden=32), max_epochs=1)
    assert list(quant.layer_sparsity) == ["net.0.weight"]
    assert quant.results["quantization/sparsity_before"] == 0.5
    assert 0.5 <= quant.results["quantization/sparsity_after"] < 0.51  # zeros stay; int8 rounds a few more to 0
    assert "pruning/sparsity" not in quant.results  # the pruning callback's own key is its own


def test_without_a_pruning_callback_no_sparsity_is_reported(quiet_trainer_kwargs):
    quant = DynamicQuantization()
    _fit([quant], quiet_trainer_kwargs, DigitsMLP(hidden=16), max_epochs=1)
    assert not any("sparsity" in key for key in quant.results) and quant.layer_sparsity == {}


def test_fsdp1_and_deepspeed_are_refused_at_setup_with_the_reason():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    with pytest.raises(ValueError, match="DynamicQuantization supports .* got FSDPStrategy: .*fully_shard"):
        DynamicQuantization().setup(SimpleNamespace(strategy=FSDPStrategy()), DigitsMLP(hidden=8), "fit")
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # deepspeed itself is not installed here
    with pytest.raises(ValueError, match="got DeepSpeedStrategy: DeepSpeed's ZeRO"):
        DynamicQuantization().setup(SimpleNamespace(strategy=deepspeed), DigitsMLP(hidden=8), "fit")
