"""MovementPruning: the movement scores against an oracle that records g and w at every optimizer step, with
gradient accumulation and clipping; manual optimization; a plain loop whose optimizer takes a closure; resume; the
accuracy guard; a checkpoint of MagnitudePruning."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DigitsDataModule,
    DigitsMLP,
    MovementOracle,
    assert_fails_before_training,
    assert_masks_prune_the_lowest,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_compress import DynamicQuantization, MagnitudePruning, MovementPruning, Pruner
from lightning_compress.pruning.movement import MovementScore, ordered_non_negative

AMOUNT = 0.6


@pytest.fixture(scope="module", params=["global", "layerwise"])
def oracle_fit(request, tmp_path_factory):
    """Epoch 0 accumulates (8 batches, 2 per optimizer step, gradients clipped at a norm of 0.05), epoch 1 starts
    with the constant schedule's one update."""
    pl.seed_everything(0, verbose=False)
    pruning = MovementPruning(amount=AMOUNT, schedule="constant", start=1, scope=request.param, make_permanent=False)
    oracle = MovementOracle(pruning)
    at_update = _ScoresAtEpochStart(oracle, pruning, epoch=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=8,
        limit_val_batches=0,
        accumulate_grad_batches=2,
        gradient_clip_val=0.05,
        callbacks=[pruning, oracle, at_update],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path_factory.mktemp("movement"),
    )
    trainer.fit(DigitsMLP(hidden=32), datamodule=DigitsDataModule())
    return request.param, pruning, oracle, at_update


class _ScoresAtEpochStart(Callback):
    """The oracle's scores and the callback's, as the update at the start of ``epoch`` sees them."""

    def __init__(self, oracle, pruning, epoch):
        self.oracle, self.pruning, self.epoch = oracle, pruning, epoch
        self.oracle_scores, self.scores = {}, {}

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            self.oracle_scores = {n: s.clone() for n, s in self.oracle.scores.items()}
            self.scores = {n: s.clone() for n, s in self.pruning.scores.items()}


def test_masks_prune_the_lowest_movement_of_the_clipped_accumulated_gradients(oracle_fit):
    scope, pruning, oracle, at_update = oracle_fit
    # once per real optimizer step (16 batches, 2 per step), each gradient clipped before it was applied
    assert oracle.steps == 8 and pruning.pruner.score.steps == 8
    assert oracle.clipped_steps == 8 and max(oracle.applied_norms) <= 0.05 * 1.0001
    assert list(pruning.masks) == ["net.0.weight", "net.2.weight", "net.4.weight"]
    for name, score in at_update.scores.items():
        torch.testing.assert_close(score.double(), at_update.oracle_scores[name], rtol=1e-4, atol=1e-9)
    assert any(s.abs().max() > 0 for s in at_update.scores.values())
    assert_masks_prune_the_lowest(pruning.masks, at_update.oracle_scores, AMOUNT, scope)
    # the scores went on accumulating after the update (never reset); pruned weights stay 0 and stop moving
    for name, score in pruning.scores.items():
        torch.testing.assert_close(score.double(), oracle.scores[name], rtol=1e-4, atol=1e-9)
        weight = pruning.selected_parameters[name]
        assert not weight[~pruning.masks[name]].any()
        assert torch.equal(score[~pruning.masks[name]], at_update.scores[name][~pruning.masks[name]])
    n = sum(m.numel() for m in pruning.masks.values())
    assert sum(int((~m).sum()) for m in pruning.masks.values()) == round(AMOUNT * n) or scope == "layerwise"


class _ManualMLP(DigitsMLP):
    """Manual optimization: two optimizer steps per batch, the gradients clipped by the module."""

    def __init__(self):
        super().__init__(hidden=16)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        for half in (slice(0, len(x) // 2), slice(len(x) // 2, None)):
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(x[half]), y[half]))
            self.clip_gradients(opt, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
            opt.step()


def test_manual_optimization_accumulates_once_per_optimizer_step(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    pruning = MovementPruning(amount=0.5, schedule="constant", start=1, interval="step", make_permanent=False)
    oracle = MovementOracle(pruning)
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=4, limit_val_batches=0, callbacks=[pruning, oracle], **quiet_trainer_kwargs
    )
    trainer.fit(_ManualMLP(), datamodule=DigitsDataModule())
    # clipped by the module before opt.step(), which calls on_before_optimizer_step: the oracle sees the clipped one
    assert oracle.steps == pruning.pruner.score.steps == 8 and max(oracle.applied_norms) <= 0.05 * 1.0001
    for name, score in pruning.scores.items():
        torch.testing.assert_close(score.double(), oracle.scores[name], rtol=1e-4, atol=1e-9)


def test_a_plain_loop_whose_optimizer_takes_a_closure():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    pruner = Pruner.from_model(model, score=MovementScore())
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)  # calls the closure up to 4 times
    pruner.attach(optimizer)
    expected = {n: torch.zeros_like(p) for n, p in pruner.parameters.items()}
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if calls == 1:  # the step's first evaluation, at the weights the step starts from
            for name, p in pruner.parameters.items():
                expected[name] -= p.grad * p.detach()
        return loss

    for _ in range(3):
        calls = 0
        optimizer.step(closure)
        assert calls > 1
    assert pruner.score.steps == 3
    for name, score in zip(pruner.names, pruner.score.scores):
        torch.testing.assert_close(score, expected[name])
    pruner.update(0.5)
    assert pruner.measure().overall == pytest.approx(0.5, abs=0.01)

    # two optimizers (a GAN's, say): each step accumulates the parameters it updates, not the other's
    first, second = (torch.optim.SGD([p], lr=0.1) for p in pruner.parameters.values())
    pruner.attach(first), pruner.attach(second)
    before = [s.clone() for s in pruner.score.scores]
    F.cross_entropy(model(x), y).backward()
    w0, g0 = pruner.weights()[0].detach().clone(), pruner.gradients()[0].clone()
    first.step()
    torch.testing.assert_close(pruner.score.scores[0], before[0] - g0 * w0)
    assert torch.equal(pruner.score.scores[1], before[1])


def test_scores_of_any_sign_keep_their_order_for_the_engine():
    values = torch.tensor([-float("inf"), -3.0, -1e-30, -0.0, 0.0, 1e-38, 2.0, float("inf")])
    keys = ordered_non_negative(values)
    assert (keys >= 0).all() and keys.dtype == torch.float64
    assert keys[3] == keys[4]  # -0 is +0
    assert torch.equal(torch.argsort(keys, stable=True), torch.argsort(values, stable=True))


class _StopAfter(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _fit(root, callback_class=MovementPruning, stop_after=None, ckpt_path=None, quantize=False):
    pl.seed_everything(0, verbose=False)
    pruning = callback_class(amount=0.8, end=3, make_permanent=False, monitor="val_acc" if quantize else None)
    callbacks = [pruning, ModelCheckpoint(dirpath=root, save_last=True)]
    if stop_after is not None:
        callbacks.append(_StopAfter(stop_after))
    if quantize:  # it measures the pruned weights' sparsity through the PruningCallback protocol
        callbacks.append(DynamicQuantization())
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=4,
        limit_train_batches=6,
        limit_val_batches=2,
        callbacks=callbacks,
        logger=pl.loggers.CSVLogger(root, name="logs") if quantize else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    model = DigitsMLP(hidden=32)
    trainer.fit(model, datamodule=DigitsDataModule(shuffle=False), ckpt_path=ckpt_path)
    return model, pruning, trainer


def test_resume_mid_schedule_equals_an_uninterrupted_run(tmp_path):
    full_model, full, trainer = _fit(tmp_path / "a", quantize=True)
    quant = next(c for c in trainer.callbacks if isinstance(c, DynamicQuantization))
    assert quant.results["quantization/sparsity_before"] == pytest.approx(0.8, abs=1e-3)
    assert list((tmp_path / "a" / "logs").glob("*/sparsity.png"))
    _, first, _ = _fit(tmp_path / "b", stop_after=1)
    state = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["callbacks"][first.state_key]
    assert list(state["scores"]) == list(first.scores) and state["score_steps"] == 12
    assert 0 < first.history[-1]["sparsity"] < full.history[-1]["sparsity"]  # mid-schedule
    resumed_model, resumed, _ = _fit(tmp_path / "c", ckpt_path=tmp_path / "b" / "last.ckpt")
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    for name, mask in full.masks.items():
        assert torch.equal(mask, resumed.masks[name]), name
        assert torch.equal(full.scores[name], resumed.scores[name]), name
    assert resumed.pruner.score.steps == full.pruner.score.steps == 24


def test_resuming_from_a_magnitude_pruning_checkpoint_keeps_its_masks_and_says_so(tmp_path):
    _, magnitude, _ = _fit(tmp_path / "a", callback_class=MagnitudePruning, stop_after=1)
    kept = {n: m.clone() for n, m in magnitude.masks.items()}
    assert any(not m.all() for m in kept.values())
    with pytest.warns(UserWarning) as caught:
        _, movement, _ = _fit(tmp_path / "b", ckpt_path=tmp_path / "a" / "last.ckpt")
    messages = " ".join(str(w.message) for w in caught)
    assert "MovementPruning resumes from the state MagnitudePruning saved for the same parameters" in messages
    assert "without movement scores (saved by MagnitudePruning): the scores start from zero now" in messages
    for name, mask in kept.items():
        assert not (movement.masks[name] & ~mask).any(), name  # every weight pruned before stays pruned
    assert movement.history[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_the_accuracy_guard_holds_and_rolls_back_movement_pruning(quiet_trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    # an unreachable baseline: every update is out of budget
    pruning = MovementPruning(amount=0.8, start=1, end=2, monitor="val_acc", max_drop=0.0, baseline=1.0, patience=1)
    trainer = pl.Trainer(
        max_epochs=3, limit_train_batches=4, limit_val_batches=2, callbacks=[pruning], **quiet_trainer_kwargs
    )
    with pytest.warns(UserWarning, match="val_acc stayed outside the budget for 1 validation"):
        trainer.fit(DigitsMLP(hidden=16), datamodule=DigitsDataModule())
    assert pruning.guard.rolled_back and pruning.pruner.score.steps == 12
    assert pruning.history[-1]["sparsity"] == 0.0


def test_bad_arguments_fail_at_construction_or_before_training(quiet_trainer_kwargs):
    with pytest.raises(ValueError, match=r"`scope` must be one of \['global', 'layerwise'\], got 'tensor'"):
        MovementPruning(scope="tensor")
    with pytest.raises(ValueError, match="`amount` must be a number in"):
        MovementPruning(amount=1.0)
    assert_fails_before_training(
        {**quiet_trainer_kwargs, "limit_train_batches": 2, "limit_val_batches": 0},
        [MovementPruning(amount=0.5, schedule="constant")],
        DigitsMLP(hidden=8),
        r"prunes at epoch 0, before any optimizer step: every movement score is still 0",
        datamodule=DigitsDataModule(),
    )
    frozen = DigitsMLP(hidden=8)
    frozen.net[0].requires_grad_(False)  # fine-tuning with a frozen first layer: it would be pruned by position
    assert_fails_before_training(
        {**quiet_trainer_kwargs, "limit_train_batches": 2, "limit_val_batches": 0},
        [MovementPruning(amount=0.5, start=1)],
        frozen,
        r"net\.0\.weight is frozen \(requires_grad=False\).*`exclude=\[\.\.\.\]`",
        datamodule=DigitsDataModule(),
    )
