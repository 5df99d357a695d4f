"""``Pruner`` in a plain torch training loop (no Trainer): the same masks as ``MagnitudePruning`` on the same data."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import DigitsDataModule, DigitsMLP, half_sparsity

from lightning_compress import MagnitudePruning, Pruner
from lightning_compress.pruning import scores
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


def _two_layer_pruner(**kwargs) -> tuple[torch.nn.Module, Pruner]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return model, Pruner.from_model(model, **kwargs)


def test_masks_given_to_a_pruner_are_checked_converted_and_copied():
    _, first = _two_layer_pruner()
    first.update(0.5)
    copy, _ = _two_layer_pruner()
    # bool masks, as `masks` and `state_dict()` give them, mean the same as the engine's form
    second = Pruner({n: p for n, p in copy.named_parameters() if p.dim() > 1}, masks=list(first.masks.values()))
    second.apply()
    assert second.measure().overall == first.measure().overall == 0.5
    third = Pruner({n: p for n, p in copy.named_parameters() if p.dim() > 1}, masks=first.mask_tensors)
    third.update(0.8)  # a copy: the first pruner's masks do not grow with it
    assert first.measure().overall == 0.5 and (~torch.cat([m.flatten() for m in first.masks.values()])).sum() == 24
    named = {n: p for n, p in copy.named_parameters() if p.dim() > 1}
    with pytest.raises(ValueError, match=r"1 mask\(s\) for 2 parameter"):
        Pruner(named, masks=[torch.ones(8, 4, dtype=torch.bool)])
    with pytest.raises(ValueError, match=r"'2.weight' has shape \(4, 4\), the parameter \(2, 8\)"):
        Pruner(named, masks=[torch.ones(8, 4, dtype=torch.bool), torch.ones(4, 4, dtype=torch.bool)])
    with pytest.raises(ValueError, match="'0.weight' is torch.float32; give bool masks"):
        Pruner(named, masks=[torch.ones(8, 4), torch.ones(2, 8, dtype=torch.bool)])


def test_bad_arguments_are_refused_with_what_is_expected():
    model, pruner = _two_layer_pruner()
    for target in (1.0, -0.1, float("nan"), 1.5):
        with pytest.raises(ValueError, match=r"in \[0, 1\)"):
            pruner.update(target)
    with pytest.raises(TypeError, match="takes a number"):
        pruner.update("half")
    pruner.update(torch.tensor(0.25))  # a scalar tensor is a number
    assert pruner.measure().overall == 0.25
    with pytest.raises(ValueError, match="not a model's state dict"):
        pruner.load_state_dict(model.state_dict())
    with pytest.raises(TypeError, match="mapping of names to parameters"):
        Pruner([model[0].weight])
    with pytest.raises(TypeError, match="takes a Score object"):
        Pruner.from_model(model, score="magnitude")
    with pytest.raises(TypeError, match="a seed"):
        scores.RandomScore("abc")
    with pytest.raises(ValueError, match="out of range for parameter '0.weight'"):
        Pruner.from_model(model, score=scores.LnStructuredScore(dims=3)).update(0.5)
    with pytest.raises(ValueError, match="has shape \\(8,\\)"):
        Pruner({"0.bias": model[0].bias}, score=scores.LnStructuredScore()).update(0.5)
    fresh = Pruner.from_model(model)
    fresh.load_state_dict(Pruner.from_model(model).state_dict())  # a pruner that never updated: no masks
    assert not fresh.has_masks


def test_a_callable_schedule_is_given_by_its_import_path_in_a_cli_config(tmp_path):
    pytest.importorskip("jsonargparse")  # the [cli] extra
    from lightning.pytorch.cli import LightningCLI

    config = {
        "trainer": {
            "max_epochs": 1,
            "logger": False,
            "callbacks": [
                {
                    "class_path": "lightning_compress.MagnitudePruning",
                    "init_args": {"schedule": "helpers.half_sparsity"},
                }
            ],
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(__import__("json").dumps(config))
    cli = LightningCLI(DigitsMLP, DigitsDataModule, run=False, args=["--config", str(path)], save_config_callback=None)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, MagnitudePruning))
    assert callback.schedule is half_sparsity
    named = LightningCLI(
        DigitsMLP,
        DigitsDataModule,
        run=False,
        save_config_callback=None,
        args=["--trainer.callbacks+=lightning_compress.MagnitudePruning", "--trainer.callbacks.schedule=linear"],
    )
    assert next(c for c in named.trainer.callbacks if isinstance(c, MagnitudePruning)).schedule == "linear"
