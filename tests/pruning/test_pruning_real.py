"""MagnitudePruning on architectures and Trainer setups this project did not write: Lightning's demo Transformer,
tied embeddings, configure_model, EarlyStopping, max_time, manual optimization, SWA/EMA, validate-then-fit, resume
with other settings, non-finite weights, the default TensorBoard logger."""

import logging

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    ConfiguredMLP,
    DemoTransformer,
    DigitsDataModule,
    DigitsMLP,
    Probe,
    TiedLM,
    assert_fails_before_training,
    expected_fraction,
    zero_fraction,
)
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    EMAWeightAveraging,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from torch import nn

from lightning_compress import MagnitudePruning


def _trainer(kwargs, callbacks, **extra):
    pl.seed_everything(0, verbose=False)
    return pl.Trainer(callbacks=callbacks, **{**kwargs, **extra})


def test_demo_transformer_is_pruned_over_all_its_matrices(quiet_trainer_kwargs, caplog):
    model = DemoTransformer()
    pruning = MagnitudePruning(amount=0.8, schedule="constant")
    with caplog.at_level(logging.INFO):
        _trainer(quiet_trainer_kwargs, [pruning], max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(model)
    names = pruning.parameter_names
    attention = [n for n, _ in model.named_parameters() if n.endswith("in_proj_weight")]
    assert attention and set(attention) <= set(names)  # 56% of the matrix weights of this model
    linears = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert set(linears) <= set(names)
    weights = [dict(model.named_parameters())[n] for n in names]
    assert zero_fraction(weights) == expected_fraction(0.8, weights)
    # coverage: everything but the embedding (48 x 200), the only other matrix
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert pruning.coverage == pytest.approx(sum(w.numel() for w in weights) / matrices)
    assert pruning.coverage < 1
    assert any("Largest not pruned: model.embedding.weight (9,600)" in r.getMessage() for r in caplog.records)


def test_tied_embedding_is_pruned_once_matched_by_any_name_and_stays_tied(quiet_trainer_kwargs):
    model = TiedLM()
    pruning = MagnitudePruning(amount=0.6, parameters=["head.weight"], schedule="linear")
    _trainer(quiet_trainer_kwargs, [pruning], max_epochs=3).fit(model)
    assert pruning.parameter_names == ["embedding.weight"]  # the canonical name of the shared parameter
    assert model.head.weight is model.embedding.weight
    assert zero_fraction([model.head.weight]) == expected_fraction(0.6, [model.head.weight])
    default = MagnitudePruning(amount=0.5)
    _trainer(quiet_trainer_kwargs, [default], max_epochs=1).fit(TiedLM())
    assert default.parameter_names == ["embedding.weight", "body.0.weight"]


def test_layers_built_in_configure_model_are_pruned(quiet_trainer_kwargs):
    model = ConfiguredMLP()
    pruning = MagnitudePruning(amount=0.7)
    _trainer(quiet_trainer_kwargs, [pruning], max_epochs=2).fit(model, datamodule=DigitsDataModule())
    assert pruning.parameter_names == ["net.0.weight", "net.2.weight"]
    weights = [model.net[0].weight, model.net[2].weight]
    assert zero_fraction(weights) == expected_fraction(0.7, weights)


def test_early_stopping_warns_with_target_reached_and_reason(quiet_trainer_kwargs):
    # min_delta=1.0: accuracy can never improve by that much, so EarlyStopping stops after patience=1 epochs
    stop = EarlyStopping(monitor="val_acc", mode="max", patience=1, min_delta=1.0)
    pruning = MagnitudePruning(amount=0.8)
    with pytest.warns(UserWarning, match=r"reached \d+\.\d\d% sparsity, not the final target 80\.00%.*EarlyStopping"):
        _trainer(quiet_trainer_kwargs, [pruning, stop], max_epochs=10).fit(
            DigitsMLP(hidden=16), datamodule=DigitsDataModule()
        )
    assert stop.stopped_epoch == 1 and 0 < pruning.history[-1]["sparsity"] < 0.8


def test_max_time_warns(quiet_trainer_kwargs):
    pruning = MagnitudePruning(amount=0.8)
    with pytest.warns(UserWarning, match=r"not the final target 80\.00%: max_time ended training"):
        _trainer(quiet_trainer_kwargs, [pruning], max_epochs=10_000, max_time={"seconds": 1}).fit(
            DigitsMLP(hidden=16), datamodule=DigitsDataModule()
        )


def test_no_warning_when_the_schedule_completes(quiet_trainer_kwargs, recwarn):
    _trainer(quiet_trainer_kwargs, [MagnitudePruning(amount=0.5)], max_epochs=2).fit(
        DigitsMLP(hidden=16), datamodule=DigitsDataModule()
    )
    assert not [w for w in recwarn if "MagnitudePruning" in str(w.message)]


class TwoOptimizers(DigitsMLP):
    """Manual optimization stepping two optimizers per batch: global_step advances by 2 per batch."""

    def __init__(self):
        super().__init__(hidden=32)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        body, head = self.optimizers()
        loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        body.zero_grad()
        head.zero_grad()
        self.manual_backward(loss)
        body.step()
        head.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.net[:4].parameters(), lr=0.05, momentum=0.9),
            torch.optim.SGD(self.net[4].parameters(), lr=0.05, momentum=0.9),
        )


def test_manual_optimization_with_two_optimizers_reaches_the_amount_at_the_last_step(quiet_trainer_kwargs):
    pruning = MagnitudePruning(amount=0.6, interval="step", schedule="linear", frequency=5)
    probe = Probe(pruning)
    trainer = _trainer(quiet_trainer_kwargs, [pruning, probe], max_epochs=2, limit_val_batches=0)
    trainer.fit(TwoOptimizers(), datamodule=DigitsDataModule())
    batches = probe.batches
    assert trainer.global_step == 2 * batches  # Lightning counts both optimizers' steps
    assert pruning.schedule_end == batches - 1
    assert pruning.history[-2]["index"] == batches - 1 and pruning.history[-2]["target"] == 0.6
    weights = list(pruning.selected_parameters.values())
    assert zero_fraction(weights) == expected_fraction(0.6, weights)
    assert probe.violations == 0


@pytest.mark.parametrize("pruning_first", [True, False])
@pytest.mark.parametrize("averaging", ["swa", "ema"])
def test_weight_averaging_in_either_order_leaves_exactly_the_reported_sparsity(
    quiet_trainer_kwargs, averaging, pruning_first
):
    pruning = MagnitudePruning(amount=0.8, schedule="linear")
    average = (
        StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
        if averaging == "swa"
        else EMAWeightAveraging(decay=0.9)
    )
    model = DigitsMLP(hidden=32)
    callbacks = [pruning, average] if pruning_first else [average, pruning]
    _trainer(quiet_trainer_kwargs, callbacks, max_epochs=4).fit(model, datamodule=DigitsDataModule())
    weights = [model.net[i].weight for i in (0, 2, 4)]
    reported = pruning.history[-1]["sparsity"]
    assert zero_fraction(weights) == reported == expected_fraction(0.8, weights)


def test_weight_averaging_checkpoints_hold_pruned_zeros(quiet_trainer_kwargs, tmp_path):
    pruning = MagnitudePruning(amount=0.7, schedule="linear", make_permanent=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = DigitsMLP(hidden=32)
    kwargs = {**quiet_trainer_kwargs, "enable_checkpointing": True}
    _trainer(kwargs, [EMAWeightAveraging(decay=0.9), pruning, checkpoint], max_epochs=3).fit(
        model, datamodule=DigitsDataModule()
    )
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    for name, keep in pruning.masks.items():
        assert not state[name][~keep].any(), name


def test_validate_with_a_checkpoint_then_fit_starts_a_fresh_schedule(quiet_trainer_kwargs, tmp_path):
    kwargs = {**quiet_trainer_kwargs, "enable_checkpointing": True}
    first = MagnitudePruning(amount=0.6, schedule="constant", make_permanent=False)
    _trainer(kwargs, [first, ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_epochs=1).fit(
        DigitsMLP(hidden=32), datamodule=DigitsDataModule()
    )
    pruning = MagnitudePruning(amount=0.6, schedule="constant", start=1, make_permanent=False)
    probe = Probe(pruning)
    trainer = _trainer(quiet_trainer_kwargs, [pruning, probe], max_epochs=2)
    model = DigitsMLP(hidden=32)
    trainer.validate(model, datamodule=DigitsDataModule(), ckpt_path=tmp_path / "last.ckpt", verbose=False)
    trainer.fit(model, datamodule=DigitsDataModule())
    assert probe.all_kept_by_epoch == {0: True, 1: False}  # nothing masked before `start`
    assert pruning.history[0]["index"] == 1


def test_resume_with_another_amount_warns_and_never_regrows(quiet_trainer_kwargs, tmp_path):
    kwargs = {**quiet_trainer_kwargs, "enable_checkpointing": True}

    class StopAfterEpoch1(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 1

    first = MagnitudePruning(amount=0.8, schedule="linear", make_permanent=False)
    _trainer(kwargs, [first, StopAfterEpoch1(), ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_epochs=4).fit(
        DigitsMLP(hidden=32), datamodule=DigitsDataModule()
    )
    saved = first.masks
    pruning = MagnitudePruning(amount=0.3, schedule="linear", method="random_unstructured", seed=1)
    probe = Probe(pruning)
    with pytest.warns(UserWarning, match=r"amount: 0\.8 -> 0\.3.*method: 'l1_unstructured' -> 'random_unstructured'"):
        _trainer(quiet_trainer_kwargs, [pruning, probe], max_epochs=4).fit(
            DigitsMLP(hidden=32), datamodule=DigitsDataModule(), ckpt_path=tmp_path / "last.ckpt"
        )
    weights = pruning.selected_parameters
    for name, keep in saved.items():
        assert not weights[name][~keep].any(), f"{name}: a weight pruned in the checkpoint grew back"
    assert min(min(v) for v in probe.sparsity_by_epoch.values()) >= 1 - sum(int(k.sum()) for k in saved.values()) / sum(
        k.numel() for k in saved.values()
    )


def test_resume_with_another_selection_is_refused_before_training(quiet_trainer_kwargs, tmp_path):
    kwargs = {**quiet_trainer_kwargs, "enable_checkpointing": True}
    callbacks = [MagnitudePruning(amount=0.5), ModelCheckpoint(dirpath=tmp_path, save_last=True)]
    _trainer(kwargs, callbacks, max_epochs=1).fit(DigitsMLP(hidden=32), datamodule=DigitsDataModule())
    assert_fails_before_training(
        quiet_trainer_kwargs,
        [MagnitudePruning(amount=0.5, exclude=["net.4.weight"])],
        DigitsMLP(hidden=32),
        "selects other parameters.*same `parameters`, `exclude` and `modules`",
        datamodule=DigitsDataModule(),
        ckpt_path=tmp_path / "last.ckpt",
    )


class NonFiniteGradients(Callback):
    """Before each optimizer step, makes the gradient of every pruned entry NaN or inf (alternating)."""

    def __init__(self, pruning):
        self.pruning = pruning

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        weights = self.pruning.selected_parameters
        for i, (name, keep) in enumerate(self.pruning.masks.items()):
            weights[name].grad[~keep] = float("nan") if i % 2 else float("inf")


def test_pruned_entries_are_exactly_zero_even_when_the_step_makes_them_nan_or_inf(quiet_trainer_kwargs):
    pruning = MagnitudePruning(amount=0.5, schedule="constant")
    probe = Probe(pruning)
    model = DigitsMLP(hidden=32)
    _trainer(quiet_trainer_kwargs, [pruning, NonFiniteGradients(pruning), probe], max_epochs=2).fit(
        model, datamodule=DigitsDataModule()
    )
    assert probe.batches > 0 and probe.violations == 0
    weights = [model.net[i].weight for i in (0, 2, 4)]
    assert all(torch.isfinite(w).all() for w in weights)
    assert zero_fraction(weights) == expected_fraction(0.5, weights)


def test_plot_is_written_under_the_default_tensorboard_logger(quiet_trainer_kwargs, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _trainer({**quiet_trainer_kwargs, "logger": True}, [MagnitudePruning(amount=0.5)], max_epochs=2)
    trainer.fit(DigitsMLP(hidden=16), datamodule=DigitsDataModule())
    assert type(trainer.logger).__name__ == "TensorBoardLogger"
    png = tmp_path / "lightning_logs" / "version_0" / "sparsity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    assert "pruning/schedule" in events.Tags()["images"]


def test_a_checkpoint_of_version_0_1_resumes_with_its_masks(quiet_trainer_kwargs, tmp_path):
    """0.1 keyed the state by amount and method too, and saved version 1 state without settings."""
    kwargs = {**quiet_trainer_kwargs, "enable_checkpointing": True}
    first = MagnitudePruning(amount=0.8, schedule="linear", make_permanent=False)
    _trainer(kwargs, [first, ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_epochs=2).fit(
        DigitsMLP(hidden=32), datamodule=DigitsDataModule()
    )
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    state = checkpoint["callbacks"].pop(first.state_key)
    legacy = {k: state[k] for k in ("last_index", "last_target", "generator", "masks")}
    legacy_key = "MagnitudePruning" + repr(
        {"amount": 0.8, "method": "l1_unstructured", "parameters": None, "exclude": []}
    )
    checkpoint["callbacks"][legacy_key] = {**legacy, "version": 1}
    torch.save(checkpoint, tmp_path / "v01.ckpt")
    saved = first.masks
    pruning = MagnitudePruning(amount=0.5, schedule="linear")
    with pytest.warns(UserWarning, match=r"amount: 0\.8 -> 0\.5"):
        _trainer(quiet_trainer_kwargs, [pruning], max_epochs=3).fit(
            DigitsMLP(hidden=32), datamodule=DigitsDataModule(), ckpt_path=tmp_path / "v01.ckpt"
        )
    weights = pruning.selected_parameters
    for name, keep in saved.items():
        assert not weights[name][~keep].any(), name
