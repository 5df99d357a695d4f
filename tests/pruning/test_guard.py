"""The accuracy guard (issue 11): the state machine alone, then MagnitudePruning(max_drop=...) on digits."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import DigitsDataModule, DigitsMLP, Probe, assert_fails_before_training, digits_val_accuracy
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_compress import DynamicQuantization, MagnitudePruning
from lightning_compress.pruning import reporting
from lightning_compress.pruning.guard import HOLD, RAISE, ROLL_BACK, STOP, AccuracyGuard


# ---------------------------------------------------------------------------------------------- the state machine
def test_baseline_is_the_best_value_before_pruning_starts():
    guard = AccuracyGuard(max_drop=0.02, patience=2)
    for value in (0.5, 0.9, 0.8):
        guard.observe(value)
    assert guard.baseline == 0.9 and guard.decide(wants_to_raise=False) == RAISE  # nothing pruned: nothing judged
    assert guard.decide() == HOLD  # 0.8 < 0.9 - 0.02, at the first raise
    guard.observe(0.95)
    assert guard.baseline == 0.9  # pruning has started: the baseline stays


def test_hold_then_recover_then_roll_back_after_patience_validations():
    guard = AccuracyGuard(max_drop=0.05, patience=2, baseline=1.0)
    guard.observe(0.97)
    assert guard.decide() == RAISE
    guard.observe(0.9)  # out of budget
    assert guard.decide() == HOLD and guard.decide() == HOLD  # the same validation counts once
    guard.observe(0.96)  # recovered
    assert guard.decide() == RAISE and guard.streak == 0
    guard.observe(0.9)
    assert guard.decide() == HOLD
    guard.observe(0.8)
    assert guard.decide(wants_to_raise=False) == ROLL_BACK  # judged after the schedule is done, too
    assert guard.decide() == STOP and guard.held == 3 and guard.rolled_back  # held: updates that wanted to raise


def test_min_mode_and_non_finite_values():
    guard = AccuracyGuard(max_drop=0.1, mode="min", baseline=0.5)
    guard.observe(0.55)
    assert guard.decide() == RAISE
    guard.observe(float("nan"))  # a diverged loss is out of any budget
    assert guard.decide() == ROLL_BACK


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_baseline_or_max_drop_is_refused_at_construction_naming_the_argument(value):
    with pytest.raises(ValueError, match="`baseline` must be None or a number, a finite one"):
        MagnitudePruning(amount=0.5, monitor="val_acc", max_drop=0.02, baseline=value)
    if value > 0 or value != value:  # max_drop=-inf is refused as negative already
        with pytest.raises(ValueError, match="`max_drop` must be a number >= 0 and finite"):
            MagnitudePruning(amount=0.5, monitor="val_acc", max_drop=value)


def test_a_nan_metric_is_printed_as_nan_and_judged_out_of_budget():
    for mode, value in (("max", float("nan")), ("min", float("nan")), ("max", float("inf")), ("min", -float("inf"))):
        guard = AccuracyGuard(max_drop=0.05, mode=mode, patience=2, baseline=0.5)
        guard.observe(value)
        assert guard.decide() == HOLD, (mode, value)  # a non-finite value is never within the budget
        held = reporting.held_line("MagnitudePruning", "epoch 1", guard, "val", 0.05, 0.1, 0.2)
        assert f"val={value:.4f} is outside the budget" in held
        guard.observe(value)
        assert guard.decide() == ROLL_BACK
        rolled = reporting.rolled_back_warning("MagnitudePruning", guard, "val", 0.05, 2, 0.1, True)
        assert f"(last {value:.4f}," in rolled  # "nan" for a NaN (it read "inf"), the infinity it was otherwise


def test_without_a_baseline_a_raise_waits_for_one_and_state_round_trips():
    guard = AccuracyGuard(max_drop=0.01)
    assert guard.decide() == HOLD and guard.held == 1 and not guard.pruning_started  # nothing to judge against yet
    guard.observe(0.8)  # the dense model's first validation: the baseline
    assert guard.baseline == 0.8 and guard.decide() == RAISE
    guard = AccuracyGuard(max_drop=0.01, patience=3)
    guard.observe(0.7)
    guard.decide()
    restored = AccuracyGuard(max_drop=0.01, patience=3)
    restored.load_state_dict(guard.state_dict())
    assert restored == guard


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_drop=0.01), "`max_drop` needs `monitor`"),
        (dict(monitor="val_acc", max_drop=-0.1), "`max_drop` must be a number >= 0"),
        (dict(monitor="val_acc", max_drop=0.1, mode="maximum"), r"`mode` must be one of \['max', 'min'\]"),
        (dict(monitor="val_acc", max_drop=0.1, patience=0), "`patience` must be an integer >= 1"),
        (dict(monitor="val_acc", max_drop=0.1, baseline="0.9"), "`baseline` must be None or a number"),
        (dict(monitor=3), "`monitor` must be None or the name"),
    ],
)
def test_bad_guard_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MagnitudePruning(**kwargs)


# ---------------------------------------------------------------------------------------------- with a Trainer
class DenseAccuracy(Callback):
    """The dense model's accuracy on the validation set at each validation, computed here independently."""

    def __init__(self):
        self.by_epoch = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.by_epoch[trainer.current_epoch] = digits_val_accuracy(pl_module)
            pl_module.train()


def _aggressive(kwargs, guard, extra_callbacks=(), **trainer_kwargs):
    """0.99 sparsity in 2 updates on a small MLP: too aggressive to recover."""
    pl.seed_everything(0, verbose=False)
    settings = dict(monitor="val_acc", max_drop=0.02) if guard else {}
    pruning = MagnitudePruning(amount=0.99, start=1, end=3, schedule="linear", **settings)
    accuracy = DenseAccuracy()
    model = DigitsMLP(hidden=64)
    trainer = pl.Trainer(max_epochs=6, callbacks=[pruning, accuracy, *extra_callbacks], **{**kwargs, **trainer_kwargs})
    trainer.fit(model, datamodule=DigitsDataModule())
    return pruning, model, accuracy


def test_an_aggressive_schedule_ends_within_budget_with_the_guard_and_out_of_it_without(quiet_trainer_kwargs, caplog):
    import logging

    quant = DynamicQuantization(evaluate=False)
    with pytest.warns(UserWarning, match="rolled back to the weights and masks of the last update within budget"):
        with caplog.at_level(logging.INFO):
            guarded, model, accuracy = _aggressive(quiet_trainer_kwargs, True, [quant])
    baseline = max(accuracy.by_epoch[e] for e in (0, 1))  # the dense model's best, before epoch 2's first raise
    assert guarded.guard.baseline == pytest.approx(baseline)
    assert guarded.history[1]["target"] > 0 and guarded.history[0]["target"] == 0
    assert digits_val_accuracy(model) >= baseline - 0.02
    weights = list(guarded.selected_parameters.values())
    sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert sparsity > 0.4  # well above zero: the last raise within budget is kept
    assert f"baseline {baseline:.4f}" in guarded.summary_lines()[0] and "rolled back" in guarded.summary_lines()[0]
    assert any(
        "accuracy guard on val_acc" in r.getMessage() and "lightning_compress summary" in r.getMessage()
        for r in caplog.records
    )  # DynamicQuantization's table states it too

    _, unguarded_model, _ = _aggressive(quiet_trainer_kwargs, False)
    assert digits_val_accuracy(unguarded_model) < baseline - 0.02


def test_guard_metrics_are_logged(quiet_trainer_kwargs, tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="guard")
    with pytest.warns(UserWarning, match="rolled back"):
        _aggressive(quiet_trainer_kwargs, True, logger=logger)
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("pruning/guard/rolled_back")]
    assert float(rows[0]["pruning/guard/rolled_back"]) == 0 and float(rows[-1]["pruning/guard/rolled_back"]) == 1


class ScriptedScore(DigitsMLP):
    """Logs `val_score` from a script, one value per validation, so the guard's decisions are known in advance."""

    def __init__(self, scores):
        super().__init__(hidden=16)
        self.scores = list(scores)
        self.validations = 0

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.log("val_score", self.scores[min(self.validations, len(self.scores) - 1)])
            self.validations += 1
        else:
            self.log("val_score", 0.0)


def test_hold_then_recover_without_rollback(quiet_trainer_kwargs):
    # validations after epochs 0..: dense 1.0 (baseline), then 0.99, 0.5 (out), 0.99 (recovered), ...
    model = ScriptedScore([1.0, 0.99, 0.5, 0.99, 0.99, 0.99, 0.99])
    pruning = MagnitudePruning(
        amount=0.6, start=1, end=3, schedule="linear", monitor="val_score", max_drop=0.05, patience=2
    )
    probe = Probe(pruning)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=6, callbacks=[pruning, probe], **quiet_trainer_kwargs)
    trainer.fit(model, datamodule=DigitsDataModule())
    targets = {h["index"]: h["target"] for h in pruning.history if h["index"] == h["index"]}
    # epoch 1: 0.0; epoch 2: 0.3 (0.99 within budget); epoch 3: held at 0.3 (0.5 out); epoch 4: 0.6 (recovered)
    assert targets == {1: 0.0, 2: 0.3, 3: 0.3, 4: 0.6}
    assert pruning.summary_lines()[0].count("1 update(s) held, held") == 1
    weights = list(pruning.selected_parameters.values())
    assert sum(int((w == 0).sum()) for w in weights) == round(0.6 * sum(w.numel() for w in weights))
    assert probe.violations == 0


class WithValLoss(DigitsMLP):
    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))


def test_min_mode_on_val_loss(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    pruning = MagnitudePruning(
        amount=0.99, start=1, end=3, schedule="linear", monitor="val_loss", mode="min", max_drop=0.1
    )
    trainer = pl.Trainer(max_epochs=5, callbacks=[pruning], **quiet_trainer_kwargs)
    with pytest.warns(UserWarning, match="rolled back"):
        trainer.fit(WithValLoss(hidden=64), datamodule=DigitsDataModule())
    assert float(trainer.callback_metrics["val_loss"]) <= pruning.guard.baseline + 0.1
    line = pruning.summary_lines()[0]
    assert "(min)" in line and "budget +0.1" in line


def test_resume_mid_schedule_with_the_guard_equals_an_uninterrupted_run(quiet_trainer_kwargs, tmp_path):
    kwargs = {**quiet_trainer_kwargs, "enable_checkpointing": True}

    class StopAfterEpoch3(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 3

    def run(extra=(), ckpt_path=None, root=None):
        pl.seed_everything(0, verbose=False)
        pruning = MagnitudePruning(amount=0.99, start=1, end=3, schedule="linear", monitor="val_acc", max_drop=0.02)
        callbacks = [pruning, ModelCheckpoint(dirpath=root, save_last=True), *extra]
        model = DigitsMLP(hidden=64)
        with pytest.warns(UserWarning):
            pl.Trainer(max_epochs=6, callbacks=callbacks, **kwargs).fit(
                model, datamodule=DigitsDataModule(shuffle=False), ckpt_path=ckpt_path
            )
        return model, pruning

    full, full_pruning = run(root=tmp_path / "a")
    run(extra=[StopAfterEpoch3()], root=tmp_path / "b")  # stops after the raise to 99% and its bad validation
    resumed, resumed_pruning = run(ckpt_path=tmp_path / "b" / "last.ckpt", root=tmp_path / "c")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed_pruning.summary_lines() == full_pruning.summary_lines()


def test_a_missing_baseline_fails_before_the_first_step(quiet_trainer_kwargs):
    assert_fails_before_training(
        {**quiet_trainer_kwargs, "max_epochs": 2},
        [MagnitudePruning(amount=0.5, schedule="constant", monitor="val_acc", max_drop=0.02)],
        DigitsMLP(hidden=16),
        "needs a dense baseline of 'val_acc'.*epoch 0.*`start=1`.*`baseline=`",
        datamodule=DigitsDataModule(),
    )
    # with a baseline given, the same settings train
    given = MagnitudePruning(amount=0.5, schedule="constant", monitor="val_acc", max_drop=0.5, baseline=0.9)
    pl.Trainer(max_epochs=1, callbacks=[given], **quiet_trainer_kwargs).fit(
        DigitsMLP(hidden=16), datamodule=DigitsDataModule()
    )
    assert given.history[0]["target"] == 0.5


def test_an_unknown_monitor_fails_at_the_first_validation_before_any_pruning(quiet_trainer_kwargs):
    pruning = MagnitudePruning(amount=0.5, start=1, monitor="val_accuracy", max_drop=0.02)
    probe = Probe(pruning)
    trainer = pl.Trainer(
        max_epochs=3, callbacks=[pruning, probe], **{**quiet_trainer_kwargs, "num_sanity_val_steps": 0}
    )
    with pytest.raises(ValueError, match=r"monitor='val_accuracy'.*logged no such metric.*Logged: \[.*'val_acc'\]"):
        trainer.fit(DigitsMLP(hidden=16), datamodule=DigitsDataModule())
    assert all(probe.all_kept_by_epoch.values())  # not a weight was pruned


# ---------------------------------------------------------------------------------------------- issue 17: totality
class Weights(Callback):
    """The module's parameters at the end of training, copied."""

    def on_train_end(self, trainer, pl_module):
        self.final = {name: p.detach().clone() for name, p in pl_module.named_parameters()}


def test_a_rollback_before_any_raise_leaves_the_weights_as_they_were(quiet_trainer_kwargs):
    # The README's pattern: schedule="linear", start=1, whose update at epoch 1 has target 0. The dense model's
    # second validation (0.9) is below the budget of the best one (1.0 - 0.05): the first raise (epoch 2) rolls back
    # before anything was pruned. It used to crash in the snapshot restore (TypeError: 'NoneType' ...).
    def run(callbacks):
        pl.seed_everything(0, verbose=False)
        model = ScriptedScore([1.0, 0.9, 0.9])
        weights = Weights()
        trainer = pl.Trainer(
            max_epochs=3, limit_train_batches=4, callbacks=[*callbacks, weights], **quiet_trainer_kwargs
        )
        trainer.fit(model, datamodule=DigitsDataModule())
        return weights.final

    pruning = MagnitudePruning(amount=0.5, schedule="linear", start=1, monitor="val_score", max_drop=0.05)
    probe = Probe(pruning)
    with pytest.warns(UserWarning, match="no update had raised the sparsity in this fit, so the weights stay as"):
        guarded = run([pruning, probe])
    assert pruning.guard.rolled_back and pruning.guard.baseline == 1.0
    assert [h["target"] for h in pruning.history] == [0.0, 0.0, 0.0]  # epoch 1, the rollback at 2, the end
    assert all(probe.all_kept_by_epoch.values()) and probe.violations == 0
    unpruned = run([])  # the same training without the callback: not one bit differs
    assert all(torch.equal(guarded[name], unpruned[name]) for name in unpruned)


def test_a_raise_before_any_validation_waits_for_the_baseline(quiet_trainer_kwargs):
    # interval="step": the schedule's first raise (step 2) comes before the first validation (end of epoch 0, after
    # 23 steps). It used to raise "needs a dense baseline" mid-training; it is held until that validation.
    pruning = MagnitudePruning(
        amount=0.5, schedule="constant", start=2, end=30, interval="step", monitor="val_acc", max_drop=0.5
    )
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[pruning], **quiet_trainer_kwargs)
    trainer.fit(DigitsMLP(hidden=16), datamodule=DigitsDataModule())
    raised = [h for h in pruning.history if h["target"] > 0]
    steps_per_epoch = trainer.num_training_batches
    assert pruning.history[0] == {**pruning.history[0], "step": 2, "target": 0.0}  # held: nothing pruned
    assert raised[0]["step"] == steps_per_epoch  # the first step after epoch 0's validation
    assert pruning.guard.held == len([h for h in pruning.history if h["target"] == 0])
    assert pruning.history[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_a_second_fit_starts_a_new_guard_and_never_restores_the_first_fits_weights(quiet_trainer_kwargs):
    pruning = MagnitudePruning(amount=0.5, schedule="linear", start=1, end=2, monitor="val_score", max_drop=0.05)
    first = ScriptedScore([1.0, 1.0, 1.0])
    pl.seed_everything(0, verbose=False)
    kwargs = {**quiet_trainer_kwargs, "limit_train_batches": 4}
    pl.Trainer(max_epochs=3, callbacks=[pruning], **kwargs).fit(first, datamodule=DigitsDataModule())
    assert pruning.guard.baseline == 1.0 and not pruning.guard.rolled_back
    second, weights = ScriptedScore([0.6, 0.5, 0.5]), Weights()  # another model, another baseline
    with pytest.warns(UserWarning, match="no update had raised the sparsity in this fit"):
        pl.Trainer(max_epochs=3, callbacks=[pruning, weights], **kwargs).fit(second, datamodule=DigitsDataModule())
    assert pruning.guard.baseline == pytest.approx(0.6) and pruning.guard.rolled_back
    assert all(torch.equal(weights.final[n], p) for n, p in second.named_parameters())
    assert not any(bool((p == 0).all()) for p in second.parameters())  # not the first fit's pruned weights
