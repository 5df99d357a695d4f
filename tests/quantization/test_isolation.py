"""Adding DynamicQuantization never changes what training computes (issue 17, item 4)."""

import random

import lightning.pytorch as pl
import numpy as np
import torch
from helpers import DigitsDataModule, DigitsMLP
from torch import nn

from lightning_compress import DynamicQuantization
from lightning_compress.quantization.isolation import untouched


class DropoutMLP(DigitsMLP):
    """Dropout while training, so that any random number drawn by someone else changes the result."""

    def __init__(self):
        super().__init__(hidden=32)
        self.net.insert(1, nn.Dropout(0.2))


def _trained(callbacks, kwargs):
    pl.seed_everything(0, verbose=False)
    model = DropoutMLP()
    trainer = pl.Trainer(max_epochs=2, callbacks=callbacks, **kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(shuffle=True))
    return model, trainer


def test_training_is_bit_identical_with_and_without_dynamic_quantization(quiet_trainer_kwargs, tmp_path):
    plain, _ = _trained([], quiet_trainer_kwargs)
    quant = DynamicQuantization(save_path=tmp_path / "m.ts")
    with_callback, trainer = _trained([quant], quiet_trainer_kwargs)
    assert (tmp_path / "m.ts").exists() and quant.results
    expected = dict(plain.named_parameters())
    for name, parameter in with_callback.named_parameters():
        assert torch.equal(parameter, expected[name]), name
    # what follows the fit is untouched too: the next random numbers are those a fit without the callback leaves
    assert torch.equal(torch.rand(3), (_trained([], quiet_trainer_kwargs), torch.rand(3))[1])


def test_untouched_restores_generators_modes_grad_mode_and_metrics():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    model[1].eval()

    class Trainer:
        callback_metrics = {"val_acc": torch.tensor(0.5)}
        logged_metrics = {}
        progress_bar_metrics = {}

    trainer = Trainer()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    with untouched(model, trainer):
        random.random(), np.random.rand(), torch.rand(5)
        model.eval()
        model[1].train()
        torch.set_grad_enabled(False)
        trainer.callback_metrics["val_acc"] = torch.tensor(0.9)
        trainer.callback_metrics["other"] = torch.tensor(1.0)
        torch.backends.quantized.engine = "qnnpack"
    assert random.getstate() == states[0] and torch.equal(torch.get_rng_state(), states[2])
    assert np.array_equal(np.random.get_state()[1], states[1][1])
    assert model.training and not model[1].training and torch.is_grad_enabled()
    assert trainer.callback_metrics == {"val_acc": torch.tensor(0.5)}
    assert torch.backends.quantized.engine != "qnnpack"
    assert expected  # drawn before seeding, only to use the generators once
