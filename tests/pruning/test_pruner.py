"""``Pruner`` in a plain torch training loop (no Trainer): the same masks as ``MagnitudePruning`` on the same data."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import DigitsDataModule, DigitsMLP

from lightning_compress import MagnitudePruning, Pruner
from lightning_compress.pruning.schedules import target_sparsity

EPOCHS = 3


def _fresh_model() -> DigitsMLP:
    torch.manual_seed(0)
    return DigitsMLP(hidden=32)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_a_plain_loop_gets_the_callbacks_masks(quiet_trainer_kwargs, scope):
    data = DigitsDataModule(shuffle=False)
    data.setup()

    model = _fresh_model()
    callback = MagnitudePruning(amount=0.7, schedule="cubic", end=EPOCHS - 1, scope=scope, make_permanent=False)
    trainer = pl.Trainer(max_epochs=EPOCHS, callbacks=[callback], limit_val_batches=0, **quiet_trainer_kwargs)
    trainer.fit(model, datamodule=data)
    expected = callback.masks

    plain = _fresh_model()
    optimizer = plain.configure_optimizers()
    pruner = Pruner.from_model(plain, scope=scope)
    handles = pruner.attach(optimizer)
    for epoch in range(EPOCHS):
        pruner.update(target_sparsity("cubic", epoch, amount=0.7, start=0, end=EPOCHS - 1))
        for x, y in data.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(plain(x), y).backward()
            optimizer.step()
    for handle in handles:
        handle.remove()

    assert list(pruner.masks) == list(expected) == ["net.0.weight", "net.2.weight", "net.4.weight"]
    for name, mask in expected.items():
        assert torch.equal(pruner.masks[name], mask), name
    assert pruner.measure().overall == pytest.approx(0.7, abs=1e-3)
    for name, weight in plain.named_parameters():
        assert torch.equal(weight, dict(model.named_parameters())[name]), name  # the same training, step by step
    pruner.squash_mask()
    assert pruner.masks == {} and pruner.measure().overall == pytest.approx(0.7, abs=1e-3)  # the zeros stay
