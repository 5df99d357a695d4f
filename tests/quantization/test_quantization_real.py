"""DynamicQuantization on models and Trainer setups this project did not write: a Hugging Face BERT in the shape of
Lightning's fine-tuning tutorial, Lightning's demo Transformer and BoringModel, a two-input model, torch.compile,
bf16-true; each with MagnitudePruning and a compressed artifact reloaded in a fresh process."""

import csv
import logging

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from helpers import (
    BertClassifier,
    DemoTransformer,
    DigitsDataModule,
    DigitsMLP,
    assert_fails_before_training,
    sentences,
)
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress import DynamicQuantization, MagnitudePruning, load_quantized
from lightning_compress.inputs import plain_outputs


def _fit(kwargs, callbacks, model, max_epochs=1, **fit_kwargs):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, **kwargs)
    trainer.fit(model, **fit_kwargs)
    return trainer


def _is_quantized(module):
    return type(module).__module__.startswith("torch.ao.nn.quantized")


# ---------------------------------------------------------------------------------------------- Hugging Face BERT
@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("bert")
    pruning = MagnitudePruning(amount=0.5)
    quant = DynamicQuantization(save_path=root / "bert.lcz", compress=True, monitor="val_acc")
    logger = CSVLogger(root, name="run")
    model = BertClassifier()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[pruning, quant],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(sentences(96, 0), batch_size=16), DataLoader(sentences(48, 1), batch_size=16))
    return dict(root=root, quant=quant, model=model, logger=logger)


def test_bert_is_evaluated_with_its_own_validation_and_every_metric_is_logged(bert_run):
    quant = bert_run["quant"]
    results = quant.results
    with open(bert_run["logger"].log_dir + "/metrics.csv") as f:
        row = next(r for r in csv.DictReader(f) if r.get("quantization/val_loss_after"))
    for key in ("val_loss_before", "val_loss_after", "val_acc_before", "val_acc_after", "accuracy_after", "coverage"):
        assert float(row[f"quantization/{key}"]) == pytest.approx(results[f"quantization/{key}"], rel=1e-6)
    assert results["quantization/accuracy_before"] == results["quantization/val_acc_before"]  # monitor="val_acc"
    # the logged value is what the module's own validation gives on the quantized copy
    expected = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(
        quant.quantized_model, DataLoader(sentences(48, 1), batch_size=16), verbose=False
    )[0]
    assert results["quantization/val_acc_after"] == pytest.approx(expected["val_acc"])
    assert results["quantization/val_loss_after"] == pytest.approx(expected["val_loss"], rel=1e-5)
    layers = quant.quantized_model.model.bert.encoder.layer
    assert _is_quantized(layers[0].attention.self.query) and _is_quantized(quant.quantized_model.model.classifier)
    assert 0 < results["quantization/coverage"] < 1  # the embeddings stay float
    assert results["quantization/sparsity_before"] == pytest.approx(0.5, abs=1e-3)


def test_bert_artifact_is_called_with_the_forward_keywords_and_returns_a_dict(bert_run, run_in_fresh_process):
    batch = {k: v for k, v in next(iter(DataLoader(sentences(8, 3), batch_size=8))).items()}
    expected = plain_outputs(bert_run["quant"].quantized_model(**batch))
    assert set(expected) == {"loss", "logits"}
    loaded = run_in_fresh_process("load_quantized", bert_run["root"] / "bert.lcz", batch)
    assert loaded.keys() == expected.keys()
    for key in expected:
        assert torch.equal(loaded[key], expected[key]), key


# ---------------------------------------------------------------------------------------------- Lightning's demos
def test_demo_transformer_quantized_by_default_with_two_positional_inputs(
    quiet_trainer_kwargs, tmp_path, run_in_fresh_process
):
    model = DemoTransformer()
    pruning = MagnitudePruning(amount=0.5, schedule="constant")
    quant = DynamicQuantization(save_path=tmp_path / "t.lcz", compress=True)
    _fit({**quiet_trainer_kwargs, "limit_train_batches": 2}, [pruning, quant], model)
    quantized = quant.quantized_model
    assert _is_quantized(quantized.model.transformer.encoder.layers[0].linear1)
    assert "quantization/val_loss_after" in quant.results and "quantization/accuracy_after" not in quant.results
    inputs, target = next(iter(model.val_dataloader()))
    with torch.inference_mode():
        expected = quantized(inputs, target)
    assert torch.equal(run_in_fresh_process("load_quantized", tmp_path / "t.lcz", (inputs, target)), expected)


def test_transformer_encoder_fast_path_works_on_the_quantized_copy(quiet_trainer_kwargs):
    class Encoder(DigitsMLP):
        def __init__(self):
            super().__init__(hidden=16)
            layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Flatten(), nn.Linear(16 * 8, 10))

        def forward(self, x):
            h = self.net[0](x.reshape(-1, 8, 8))
            return self.net[2](self.net[1](self.encoder(h)))

    quant = DynamicQuantization()
    _fit(quiet_trainer_kwargs, [quant], Encoder(), datamodule=DigitsDataModule())
    assert _is_quantized(quant.quantized_model.encoder.layers[0].linear1)
    assert quant.results["quantization/accuracy_after"] > 0


def test_boring_model_without_evaluation_writes_its_artifact(quiet_trainer_kwargs, tmp_path, run_in_fresh_process):
    model = BoringModel()
    pruning = MagnitudePruning(amount=0.5, schedule="constant")
    quant = DynamicQuantization(evaluate=False, save_path=tmp_path / "boring.lcz", compress=True)
    _fit({**quiet_trainer_kwargs, "limit_train_batches": 4, "limit_val_batches": 2}, [pruning, quant], model)
    assert quant.results["quantization/sparsity_before"] == 0.5 and "quantization/latency_ms_after" not in quant.results
    x = torch.randn(3, 32)
    assert torch.equal(run_in_fresh_process("load_quantized", tmp_path / "boring.lcz", x), quant.quantized_model(x))


class TwoInputs(DigitsMLP):
    """Pixels and a per-image brightness as two inputs, the second passed by keyword."""

    def __init__(self):
        super().__init__(hidden=32)
        self.net = nn.Sequential(nn.Linear(65, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, pixels, brightness=None):
        return self.net(torch.cat([pixels.flatten(1), brightness], dim=1))

    def _inputs(self, x):
        return x, x.mean(dim=1, keepdim=True)

    def training_step(self, batch, batch_idx):
        pixels, brightness = self._inputs(batch[0])
        return F.cross_entropy(self(pixels, brightness=brightness), batch[1])

    def validation_step(self, batch, batch_idx):
        pixels, brightness = self._inputs(batch[0])
        self.val_acc(self(pixels, brightness=brightness), batch[1])
        self.log("val_acc", self.val_acc)


def test_two_input_model(quiet_trainer_kwargs, tmp_path, run_in_fresh_process):
    quant = DynamicQuantization(save_path=tmp_path / "two.lcz", compress=True)
    _fit(quiet_trainer_kwargs, [MagnitudePruning(amount=0.5), quant], TwoInputs(), datamodule=DigitsDataModule())
    assert quant.results["quantization/accuracy_after"] == quant.results["quantization/val_acc_after"]
    x = torch.rand(5, 64)
    brightness = x.mean(dim=1, keepdim=True)
    loaded = run_in_fresh_process("load_quantized", tmp_path / "two.lcz", {"pixels": x, "brightness": brightness})
    assert torch.equal(loaded, quant.quantized_model(x, brightness=brightness))


# ---------------------------------------------------------------------------------------------- compile and dtypes
class CompiledDigits(DigitsMLP):
    # A compiled LightningModule's training_step is compiled too, and in Lightning 2.6 with torch 2.13 dynamo fails
    # inside `self.log` there, with or without lightning_compress; so this one does not log while training.
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])


@pytest.mark.parametrize("where", ["module", "submodule", "in_place"])
def test_compiled_models_are_quantized_for_real_and_independent_of_the_original(
    quiet_trainer_kwargs, tmp_path, where, run_in_fresh_process
):
    model = CompiledDigits(hidden=32)
    if where == "submodule":
        model.net = torch.compile(model.net, backend="eager")
        fitted = model
    elif where == "in_place":
        model.compile(backend="eager")  # LightningModule.compile(): nn.Module's, in place
        fitted = model
    else:
        fitted = torch.compile(model, backend="eager")  # Lightning unwraps it and keeps the compiled forward
    quant = DynamicQuantization(save_path=tmp_path / "c.lcz", compress=True)
    pruning = MagnitudePruning(amount=0.6)
    _fit(quiet_trainer_kwargs, [pruning, quant], fitted, max_epochs=2, datamodule=DigitsDataModule())
    assert quant.results["quantization/sparsity_before"] == pytest.approx(0.6, abs=1e-3)
    quantized = quant.quantized_model
    layers = [m for m in quantized.modules() if isinstance(m, (nn.Linear, torch.ao.nn.quantized.dynamic.Linear))]
    assert len(layers) == 3 and all(_is_quantized(m) for m in layers)
    x = torch.rand(7, 64)
    with torch.no_grad():
        before = quantized(x).clone()
        assert not torch.equal(before, model(x))  # int8 activations: not the float model's output
        for p in model.parameters():
            p.add_(1.0)  # the original changes; the quantized copy must not
        assert torch.equal(quantized(x), before)
    assert torch.equal(run_in_fresh_process("load_quantized", tmp_path / "c.lcz", x), before)


def test_bf16_true_training_quantizes_a_float32_copy_and_says_so(
    quiet_trainer_kwargs, tmp_path, caplog, run_in_fresh_process
):
    quant = DynamicQuantization(save_path=tmp_path / "bf16.lcz", compress=True)
    pruning = MagnitudePruning(amount=0.5)
    model = DigitsMLP(hidden=32)
    with caplog.at_level(logging.INFO):
        _fit({**quiet_trainer_kwargs, "precision": "bf16-true"}, [pruning, quant], model, datamodule=DigitsDataModule())
    assert model.net[0].weight.dtype == torch.bfloat16  # the trained model is left as it is
    assert quant.comparison.cast_from == torch.bfloat16
    assert any("weights are bfloat16; 'float' is a float32 copy" in r.getMessage() for r in caplog.records)
    x = torch.rand(4, 64)
    assert quant.quantized_model(x).dtype == torch.float32
    assert torch.equal(run_in_fresh_process("load_quantized", tmp_path / "bf16.lcz", x), quant.quantized_model(x))
    assert quant.results["quantization/sparsity_before"] == pytest.approx(
        0.5, abs=1e-3
    )  # pruned in bfloat16, measured in fp32
    assert abs(quant.results["quantization/accuracy_before"] - quant.results["quantization/accuracy_after"]) < 0.05


# ---------------------------------------------------------------------------------------------- fail before training
def _fails_before_training(callbacks, model, kwargs, match, **fit_kwargs):
    assert_fails_before_training(kwargs, callbacks, model, match, **fit_kwargs)


def test_unwritable_save_path_fails_before_the_first_step(quiet_trainer_kwargs, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    _fails_before_training(
        [DynamicQuantization(save_path=tmp_path / "a_file" / "model.ts")],
        DigitsMLP(hidden=8),
        quiet_trainer_kwargs,
        "before training.*save_path=.*its folder cannot be written",
        datamodule=DigitsDataModule(),
    )


def test_unknown_monitor_fails_before_the_first_step_listing_logged_metrics(quiet_trainer_kwargs):
    _fails_before_training(
        [DynamicQuantization(monitor="val_accuracy")],
        DigitsMLP(hidden=8),
        quiet_trainer_kwargs,
        r"`monitor='val_accuracy'` is not among the metrics.*\['val_acc'\]",
        datamodule=DigitsDataModule(),
    )


def test_a_forward_never_called_in_validation_needs_example_input_array(quiet_trainer_kwargs, tmp_path):
    class DirectCalls(DigitsMLP):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))  # not self(...)

    _fails_before_training(
        [DynamicQuantization(save_path=tmp_path / "m.ts")],
        DirectCalls(hidden=8),
        quiet_trainer_kwargs,
        "forward was never called during validation.*example_input_array",
        datamodule=DigitsDataModule(),
    )
    model = DirectCalls(hidden=8)
    model.example_input_array = torch.zeros(2, 64)
    quant = DynamicQuantization(save_path=tmp_path / "m.ts")
    _fit(quiet_trainer_kwargs, [quant], model, datamodule=DigitsDataModule())
    assert (tmp_path / "m.ts").exists() and "quantization/val_loss_after" in quant.results
    # validation never called forward, so never the artifact: no metric claims to be the artifact's (its file size
    # and its latency on example_input_array are measured on the artifact itself)
    own = {"quantization/size_mb_artifact", "quantization/latency_ms_artifact"}
    assert own <= set(quant.results)
    assert not any(key.endswith("_artifact") for key in set(quant.results) - own)


# ---------------------------------------------------------------------------------------------- Lightning conventions
def test_fast_dev_run_writes_no_artifact(quiet_trainer_kwargs, tmp_path):
    quant = DynamicQuantization(save_path=tmp_path / "m.ts")
    _fit({**quiet_trainer_kwargs, "fast_dev_run": True}, [quant], DigitsMLP(hidden=8), datamodule=DigitsDataModule())
    assert quant.quantized_model is not None and not (tmp_path / "m.ts").exists()


def test_a_list_of_batches_is_a_dataloader(quiet_trainer_kwargs):
    dm = DigitsDataModule(shuffle=False)
    dm.setup()
    batches = list(dm.val_dataloader())
    quant = DynamicQuantization(dataloader=batches)
    _fit(quiet_trainer_kwargs, [quant], DigitsMLP(hidden=16), datamodule=dm)
    metric = torchmetrics.Accuracy(task="multiclass", num_classes=10)
    with torch.inference_mode():
        for x, y in batches:
            metric.update(quant.quantized_model(x), y)
    assert quant.results["quantization/accuracy_after"] == pytest.approx(float(metric.compute()))


def test_exclude_leaves_layers_float_and_the_summary_states_coverage(quiet_trainer_kwargs, caplog):
    quant = DynamicQuantization(exclude=["net.0"])
    model = DigitsMLP(hidden=32)
    with caplog.at_level(logging.INFO):
        _fit(quiet_trainer_kwargs, [quant], model, datamodule=DigitsDataModule())
    assert type(quant.quantized_model.net[0]) is nn.Linear and _is_quantized(quant.quantized_model.net[2])
    total = sum(p.numel() for p in model.parameters())
    expected = sum(p.numel() for i in (2, 4) for p in model.net[i].parameters()) / total
    assert quant.results["quantization/coverage"] == pytest.approx(expected)
    assert any(f"coverage: {expected:.1%} of the model's parameters" in r.getMessage() for r in caplog.records)


class DemoWithoutValidationStep(DemoTransformer):
    """Lightning's demo Transformer as it ships: no validation_step, forward(inputs, target)."""

    validation_step = pl.LightningModule.validation_step


def test_a_module_without_validation_step_and_two_inputs(quiet_trainer_kwargs, tmp_path, run_in_fresh_process):
    _fails_before_training(
        [DynamicQuantization()],
        DemoWithoutValidationStep(),
        {**quiet_trainer_kwargs, "limit_train_batches": 2},
        r"without a `validation_step`.*forward\(\) missing 1 required positional argument.*example_input_array",
    )
    model = DemoWithoutValidationStep()
    model.example_input_array = next(iter(model.val_dataloader()))  # (inputs, target), as forward takes them
    quant = DynamicQuantization(evaluate=False, save_path=tmp_path / "demo.ts")
    _fit({**quiet_trainer_kwargs, "limit_train_batches": 2}, [quant], model)
    inputs, target = model.example_input_array
    with torch.inference_mode():
        expected = quant.quantized_model(inputs, target)
    assert torch.equal(run_in_fresh_process("load_quantized", tmp_path / "demo.ts", (inputs, target)), expected)
    # a tuple example_input_array, and the artifact is still called by forward's names
    assert torch.equal(load_quantized(tmp_path / "demo.ts")(inputs=inputs, target=target), expected)
