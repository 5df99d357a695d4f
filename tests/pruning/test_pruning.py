import copy
import csv
import math
import re

import lightning.pytorch as pl
import pytest
import torch
from helpers import DigitsDataModule, DigitsLSTM, DigitsMLP, Probe, assert_fails_before_training
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_compress import MagnitudePruning
from lightning_compress.pruning.schedules import target_sparsity


def _fit(callbacks, kwargs, model=None, max_epochs=4, **extra):
    pl.seed_everything(0, verbose=False)
    model = model or DigitsMLP(hidden=32)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, **{**kwargs, **extra})
    trainer.fit(model, datamodule=DigitsDataModule(shuffle=False))
    return trainer, model


def _zero_fraction(tensors):
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)


def test_schedule_is_followed_from_the_start_of_each_epoch_and_pruned_weights_stay_zero(quiet_trainer_kwargs):
    pruning = MagnitudePruning(amount=0.8, schedule="cubic", start=1)
    probe = Probe(pruning)
    trainer, model = _fit([pruning, probe], quiet_trainer_kwargs, max_epochs=5)
    weights = [model.net[i].weight for i in (0, 2, 4)]
    n = sum(w.numel() for w in weights)
    for epoch, values in probe.sparsity_by_epoch.items():
        target = target_sparsity("cubic", epoch, 0.8, 1, 4)
        # every batch of the epoch, the first included, runs at that epoch's scheduled sparsity
        assert all(v == round(target * n) / n for v in values), (epoch, target, values)
    assert probe.violations == 0  # SGD momentum would regrow them without the post-step re-application
    assert _zero_fraction(weights) == round(0.8 * n) / n
    assert model.net[0].bias.count_nonzero() == model.net[0].bias.numel()  # biases untouched
    assert set(model.state_dict()) == set(DigitsMLP(hidden=32).state_dict())  # plain keys
    assert not model.net[0]._forward_pre_hooks and not hasattr(model.net[0], "weight_orig")
    assert pruning.masks == {}  # made permanent: masks dropped


def test_accuracy_recovers_after_pruning(quiet_trainer_kwargs):
    pruning = MagnitudePruning(amount=0.9)
    trainer, model = _fit([pruning], quiet_trainer_kwargs, max_epochs=8, model=DigitsMLP(hidden=128))
    results = trainer.validate(model, datamodule=DigitsDataModule(), verbose=False)
    assert results[0]["val_acc"] > 0.9


def test_logged_metrics_in_csv(quiet_trainer_kwargs, tmp_path):
    pruning = MagnitudePruning(amount=0.5, schedule="linear")
    logger = CSVLogger(tmp_path, name="run")
    _fit([pruning], {**quiet_trainer_kwargs, "logger": logger}, max_epochs=3)
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("pruning/target")]
    assert [float(r["pruning/target"]) for r in rows] == [0.0, 0.25, 0.5, 0.5]  # 3 updates + end of training
    last = rows[-1]
    assert float(last["pruning/sparsity"]) == pytest.approx(0.5, abs=1e-3)
    for name in ("net.0.weight", "net.2.weight", "net.4.weight"):
        assert f"pruning/sparsity/{name}" in last
        assert last[f"pruning/sparsity/{name}"] != ""


def test_rank_zero_info_line_at_each_update(quiet_trainer_kwargs, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        _fit([MagnitudePruning(amount=0.5, schedule="linear")], quiet_trainer_kwargs, max_epochs=2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MagnitudePruning [")]
    assert len(lines) == 3 and "target sparsity 50.00%" in lines[-1]


def test_step_interval_with_frequency_and_gradient_accumulation(quiet_trainer_kwargs):
    targets = []

    def schedule(step):
        targets.append(step)
        return min(step, 10) / 20

    pruning = MagnitudePruning(schedule=schedule, interval="step", start=0, end=10, frequency=3)
    probe = Probe(pruning)
    trainer, model = _fit([pruning, probe], quiet_trainer_kwargs, max_epochs=1, accumulate_grad_batches=2)
    weights = list(pruning.selected_parameters.values())
    n = sum(w.numel() for w in weights)
    # callable values are validated up front (before any update), then used at steps 0, 3, 6, 9 and 10 (end)
    assert targets[:5] == [0, 3, 6, 9, 10]
    assert [h["index"] for h in pruning.history[:-1]] == [0, 3, 6, 9, 10]
    assert probe.violations == 0
    assert _zero_fraction(weights) == round(0.5 * n) / n


def test_manual_optimization(quiet_trainer_kwargs):
    class Manual(DigitsMLP):
        def __init__(self):
            super().__init__(hidden=32)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
            self.manual_backward(loss)
            opt.step()

    pruning = MagnitudePruning(amount=0.7)
    probe = Probe(pruning)
    _fit([pruning, probe], quiet_trainer_kwargs, model=Manual(), max_epochs=3)
    assert probe.violations == 0 and probe.batches > 0


@pytest.mark.parametrize(
    "kwargs,structured",
    [
        (dict(method="l1_unstructured", scope="layerwise"), False),
        (dict(method="random_unstructured", seed=3), False),
        (dict(method="ln_structured", norm=1, dim=0), True),
    ],
)
def test_methods_reach_the_amount_exactly(quiet_trainer_kwargs, kwargs, structured):
    pruning = MagnitudePruning(amount=0.5, **kwargs)
    _, model = _fit([pruning], quiet_trainer_kwargs, max_epochs=2)
    weights = [model.net[i].weight for i in (0, 2, 4)]
    if structured:  # per tensor: round(0.5 * rows) whole rows
        for w in weights:
            assert int((w.abs().sum(dim=1) == 0).sum()) == round(0.5 * w.shape[0])
    elif pruning.scope == "layerwise":  # per tensor: round(0.5 * n) entries
        for w in weights:
            assert int((w == 0).sum()) == round(0.5 * w.numel())
    else:  # global (random_unstructured): round(0.5 * n) entries over all tensors together
        assert pruning.scope == "global"
        assert sum(int((w == 0).sum()) for w in weights) == round(0.5 * sum(w.numel() for w in weights))


def test_lstm_weights_are_pruned(quiet_trainer_kwargs):
    pruning = MagnitudePruning(amount=0.6)
    _, model = _fit([pruning], quiet_trainer_kwargs, model=DigitsLSTM(hidden=16), max_epochs=2)
    names = pruning.parameter_names
    assert names == ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "head.weight"]
    weights = [model.lstm.weight_ih_l0, model.lstm.weight_hh_l0, model.head.weight]
    n = sum(w.numel() for w in weights)
    assert _zero_fraction(weights) == round(0.6 * n) / n


def test_checkpoints_load_into_a_plain_model_with_weights_only(quiet_trainer_kwargs, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    pruning = MagnitudePruning(amount=0.75, schedule="linear")
    _fit([pruning, checkpoint], {**quiet_trainer_kwargs, "enable_checkpointing": True}, max_epochs=3)
    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(files) == 3
    for epoch, path in enumerate(files):
        ckpt = torch.load(path, weights_only=True)
        plain = DigitsMLP(hidden=32)
        plain.load_state_dict(ckpt["state_dict"], strict=True)
        state = ckpt["callbacks"][pruning.state_key]
        weights = [plain.net[i].weight for i in (0, 2, 4)]
        n = sum(w.numel() for w in weights)
        assert _zero_fraction(weights) == round(target_sparsity("linear", epoch, 0.75, 0, 2) * n) / n
        assert all(m.dtype == torch.bool for m in state["masks"].values())
        for w, m in zip(weights, state["masks"].values()):
            assert not w[~m].any()


@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured"])
def test_resume_mid_schedule_equals_uninterrupted_run(quiet_trainer_kwargs, tmp_path, method):
    def run(stop_after_epoch=None, ckpt_path=None, root=None):
        pl.seed_everything(0, verbose=False)
        pruning = MagnitudePruning(amount=0.8, method=method, seed=5, make_permanent=False)
        callbacks = [pruning, ModelCheckpoint(dirpath=root, save_last=True)]
        if stop_after_epoch is not None:
            callbacks.append(_StopAfter(stop_after_epoch))
        trainer = pl.Trainer(
            max_epochs=6, callbacks=callbacks, **{**quiet_trainer_kwargs, "enable_checkpointing": True}
        )
        model = DigitsMLP(hidden=32)
        trainer.fit(model, datamodule=DigitsDataModule(shuffle=False), ckpt_path=ckpt_path)
        return model, pruning

    full_model, full_pruning = run(root=tmp_path / "a")
    run(stop_after_epoch=2, root=tmp_path / "b")
    resumed_model, resumed_pruning = run(ckpt_path=tmp_path / "b" / "last.ckpt", root=tmp_path / "c")
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    for name, mask in full_pruning.masks.items():
        assert torch.equal(mask, resumed_pruning.masks[name])
    assert _zero_fraction(full_pruning.selected_parameters.values()) == pytest.approx(0.8, abs=1e-3)


class _StopAfter(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_fit_twice_with_the_same_callback_and_hooks_removed_after_training(quiet_trainer_kwargs):
    pruning = MagnitudePruning(amount=0.5)
    model = DigitsMLP(hidden=32)
    for _ in range(2):
        trainer = pl.Trainer(max_epochs=2, callbacks=[pruning], **quiet_trainer_kwargs)
        trainer.fit(model, datamodule=DigitsDataModule())
    weights = list(pruning.selected_parameters.values())
    n = sum(w.numel() for w in weights)
    assert _zero_fraction(weights) == round(0.5 * n) / n
    # after training the optimizer no longer re-applies masks: a step outside fit moves pruned weights
    optimizer = trainer.optimizers[0]
    for w in weights:
        w.grad = torch.ones_like(w)
    optimizer.step()
    assert _zero_fraction(weights) < 0.01


def test_two_instances_coexist(quiet_trainer_kwargs, tmp_path):
    body = MagnitudePruning(amount=0.5, parameters=["net.0.weight", "net.2.weight"])
    head = MagnitudePruning(amount=0.2, parameters=["net.4.weight"], schedule="constant")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _, model = _fit([body, head, checkpoint], {**quiet_trainer_kwargs, "enable_checkpointing": True}, max_epochs=2)
    assert body.state_key != head.state_key
    assert int((model.net[4].weight == 0).sum()) == round(0.2 * 320)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert body.state_key in ckpt["callbacks"] and head.state_key in ckpt["callbacks"]


def test_logger_false_and_no_validation(quiet_trainer_kwargs):
    pruning = MagnitudePruning(amount=0.3)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[pruning], limit_val_batches=0, **quiet_trainer_kwargs)
    dm = DigitsDataModule()
    dm.setup()
    trainer.fit(DigitsMLP(hidden=16), train_dataloaders=dm.train_dataloader())
    assert _zero_fraction(list(pruning.selected_parameters.values())) == pytest.approx(0.3, abs=1e-3)


def test_max_steps_bounds_the_epoch_schedule(quiet_trainer_kwargs):
    # 23 batches per epoch; max_steps=50 ends in epoch 2 though max_epochs is 100: the schedule ends there
    pruning = MagnitudePruning(amount=0.6)
    _fit([pruning], quiet_trainer_kwargs, max_epochs=100, max_steps=50)
    assert pruning.schedule_end == 2
    n = sum(w.numel() for w in list(pruning.selected_parameters.values()))
    assert _zero_fraction(list(pruning.selected_parameters.values())) == round(0.6 * n) / n


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(amount=1.0), "`amount` must be a number in \\[0, 1\\)"),
        (dict(amount=-0.1), "`amount`"),
        (dict(amount="0.5"), "`amount`"),
        (dict(schedule="quadratic"), "`schedule` must be one of \\['constant', 'cubic', 'exponential', 'linear'\\]"),
        (dict(method="l2"), "`method` must be one of \\['l1_unstructured', 'random_unstructured', 'ln_structured'\\]"),
        (dict(interval="batch"), "`interval` must be one of \\['epoch', 'step'\\]"),
        (dict(start=3, end=2), "`end` must be None or an integer >= start"),
        (dict(start=-1), "`start`"),
        (dict(frequency=0), "`frequency` must be an integer >= 1"),
        (dict(scope="all"), "`scope` must be None or one of \\['global', 'layerwise'\\]"),
        (dict(method="ln_structured", scope="global"), "scope='global'.*ln_structured"),
        (dict(norm=0), "`norm`"),
        (dict(parameters=[1]), "`parameters`"),
        (dict(seed=1.5), "`seed`"),
        (dict(make_permanent="yes"), "`make_permanent` must be True or False"),
        (dict(modules=[torch.nn.ReLU, "Linear"]), "`modules` must be None or a non-empty list of torch.nn.Module"),
        (dict(modules=[]), "`modules`"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MagnitudePruning(**kwargs)


def _fails_before_training(callback, quiet_trainer_kwargs, match, **trainer_kwargs):
    assert_fails_before_training(
        {**quiet_trainer_kwargs, **trainer_kwargs},
        [callback],
        DigitsMLP(hidden=16),
        match,
        datamodule=DigitsDataModule(),
    )


def test_pattern_matching_nothing_fails_at_setup_listing_names(quiet_trainer_kwargs):
    _fails_before_training(
        MagnitudePruning(parameters=["encoder.*"]), quiet_trainer_kwargs, "encoder.*net.0.weight", max_epochs=1
    )


def test_unbounded_training_with_end_none_fails_at_setup(quiet_trainer_kwargs):
    _fails_before_training(MagnitudePruning(), quiet_trainer_kwargs, "unbounded", max_epochs=-1)


def test_step_interval_with_max_time_only_fails_before_training(quiet_trainer_kwargs):
    _fails_before_training(
        MagnitudePruning(interval="step", end=None), quiet_trainer_kwargs, "end", max_epochs=-1, max_time="00:00:01:00"
    )


def test_callable_schedule_out_of_range_fails_before_training(quiet_trainer_kwargs):
    _fails_before_training(
        MagnitudePruning(schedule=lambda i: 0.5 * i), quiet_trainer_kwargs, "returned 1.0 for epoch 2", max_epochs=3
    )


def test_structured_dim_out_of_range_fails_at_setup(quiet_trainer_kwargs):
    _fails_before_training(MagnitudePruning(method="ln_structured", dim=2), quiet_trainer_kwargs, "dim=2", max_epochs=1)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(max_drop=0.01, monitor="val_acc"), "max_drop=0.01"),
        (dict(method="ln_structured", structure="groups"), "structure='groups'"),
        (dict(swa=True), "StochasticWeightAveraging"),
    ],
)
def test_sharded_strategy_with_an_unsupported_setting_fails_at_setup(kwargs, named):
    from lightning.pytorch.callbacks import StochasticWeightAveraging
    from lightning.pytorch.strategies import ModelParallelStrategy

    swa = [StochasticWeightAveraging(swa_lrs=0.01)] if kwargs.pop("swa", False) else []
    pruning = MagnitudePruning(**kwargs)
    trainer = pl.Trainer(
        strategy=ModelParallelStrategy(), accelerator="cpu", devices=1, logger=False, callbacks=[pruning, *swa]
    )
    with pytest.raises(ValueError, match=rf"under ModelParallelStrategy .* does not support .*{re.escape(named)}"):
        pruning.setup(trainer, DigitsMLP(hidden=8), "fit")


def test_deepspeed_and_fsdp1_are_refused_with_the_reason():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from lightning_compress import compat

    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # deepspeed itself is not installed here
    with pytest.raises(ValueError, match="got DeepSpeedStrategy: DeepSpeed's ZeRO keeps the weights"):
        compat.require_supported_strategy(SimpleNamespace(strategy=deepspeed), "MagnitudePruning")
    with pytest.raises(ValueError, match="got FSDPStrategy: .*FlatParameters.*fully_shard"):
        compat.require_supported_strategy(SimpleNamespace(strategy=FSDPStrategy()), "MagnitudePruning")


def test_end_beyond_training_warns(quiet_trainer_kwargs):
    with pytest.warns(UserWarning, match="will not be reached"):
        _fit([MagnitudePruning(amount=0.5, end=10)], quiet_trainer_kwargs, max_epochs=2)


def test_copy_of_a_trained_callback_is_independent(quiet_trainer_kwargs):
    pruning = MagnitudePruning(amount=0.5, schedule="constant", make_permanent=False)
    _fit([pruning], quiet_trainer_kwargs, max_epochs=1)
    before = {name: mask.clone() for name, mask in pruning.masks.items()}
    clone = copy.deepcopy(pruning)
    assert clone.state_key == pruning.state_key
    clone.amount = 0.9
    _fit([clone], quiet_trainer_kwargs, max_epochs=1)  # the copy goes on pruning another model, further
    assert sum(int((~m).sum()) for m in clone.masks.values()) > sum(int((~m).sum()) for m in before.values())
    assert math.isclose(pruning.amount, 0.5)
    assert all(torch.equal(pruning.masks[name], before[name]) for name in before)


def test_ln_structured_on_a_one_dimensional_parameter_fails_before_training(quiet_trainer_kwargs):
    _fails_before_training(
        MagnitudePruning(method="ln_structured", parameters=["net.0.*"]),
        quiet_trainer_kwargs,
        r"ln_structured.*'net\.0\.bias' has shape \(16,\)",
        max_epochs=1,
    )


def test_coverage_is_logged(quiet_trainer_kwargs, tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    pruning = MagnitudePruning(amount=0.5, parameters=["net.0.weight"])
    _fit([pruning], {**quiet_trainer_kwargs, "logger": logger}, max_epochs=1)
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("pruning/coverage")]
    assert float(rows[-1]["pruning/coverage"]) == pytest.approx(64 * 32 / (64 * 32 + 32 * 32 + 32 * 10))
