import lightning.pytorch as pl
import pytest
import torch
from helpers import DigitsDataModule, DigitsMLP, pruned_mlp
from torch import nn

from lightning_compress import DynamicQuantization, MagnitudePruning, load_quantized
from lightning_compress.quantization.dynamic import quantize_dynamic_copy
from lightning_compress.quantization.kernels import (
    CLEAR_MARGIN,
    FLOAT_DENSE,
    QUANTIZED_DENSE,
    SPARSE_CSR,
    KernelChoice,
    SparseLinear,
    build_with_kernels,
    choose_linear_kernels,
    layer_inputs,
)


def _pruned(widths=(256, 512, 512, 10), sparsity=0.9):
    return pruned_mlp(widths, sparsity, "layerwise")


def test_sparse_linear_matches_linear_on_any_leading_shape():
    linear = _pruned()[0]
    x = torch.randn(3, 5, 256)
    with torch.inference_mode():
        assert torch.allclose(SparseLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)


def test_every_candidate_is_timed_and_the_choice_follows_the_rule_on_what_was_measured():
    # What wins depends on the machine's speed (a benchmark's question): this checks only that every candidate was
    # timed on each layer and that the recorded choice is the one the 10 % rule gives for the recorded rounds.
    model = _pruned()
    choices = choose_linear_kernels(model, torch.randn(32, 256), torch.qint8, rounds=3)
    assert list(choices) == ["0", "2", "4"]
    for choice in choices.values():
        assert set(choice.times_ms) == set(choice.spread_ms) == {FLOAT_DENSE, QUANTIZED_DENSE, SPARSE_CSR}
        assert all(low <= choice.times_ms[k] <= high for k, (low, high) in choice.spread_ms.items())
        if choice.chosen != QUANTIZED_DENSE:  # replaced the default only by winning every round by the margin
            assert choice.spread_ms[choice.chosen][1] * CLEAR_MARGIN < choice.spread_ms[QUANTIZED_DENSE][0]
        assert choice.speedup == choice.times_ms[FLOAT_DENSE] / choice.times_ms[choice.chosen]
        assert choice.sparsity == pytest.approx(0.9, abs=1e-3)


@pytest.mark.parametrize(
    "rounds,chosen,close",
    [
        # CSR wins every round by more than 10 %: chosen
        (
            {QUANTIZED_DENSE: [1.0, 1.1, 1.0], FLOAT_DENSE: [3.0, 3.0, 3.0], SPARSE_CSR: [0.5, 0.6, 0.5]},
            SPARSE_CSR,
            False,
        ),
        # CSR has the lowest median but loses one round: the default stays, marked too close to call
        (
            {QUANTIZED_DENSE: [1.0, 1.1, 1.0], FLOAT_DENSE: [3.0, 3.0, 3.0], SPARSE_CSR: [0.5, 1.2, 0.5]},
            QUANTIZED_DENSE,
            True,
        ),
        # the fastest median is not kept when its margin is under 10 % in some round
        (
            {QUANTIZED_DENSE: [1.0, 1.0, 1.0], FLOAT_DENSE: [3.0, 3.0, 3.0], SPARSE_CSR: [0.95, 0.95, 0.95]},
            QUANTIZED_DENSE,
            True,
        ),
    ],
)
def test_choose_linear_kernels_applies_the_rule_to_given_round_times(monkeypatch, rounds, chosen, close):
    import lightning_compress.quantization.kernels as kernels

    monkeypatch.setattr(kernels, "_time_rounds", lambda candidates, x, n: {k: rounds[k] for k in candidates})
    model = _pruned()
    choices = choose_linear_kernels(model, torch.randn(8, 256), torch.qint8, names=["2"])
    assert list(choices) == ["2"]
    assert (choices["2"].chosen, choices["2"].too_close_to_call) == (chosen, close)
    assert choices["2"].spread_ms == {k: (min(v), max(v)) for k, v in rounds.items()}


def test_built_model_runs_each_chosen_path_exactly():
    model = _pruned()
    forced = {
        "0": KernelChoice(SPARSE_CSR, {FLOAT_DENSE: 1.0, SPARSE_CSR: 0.5}, 0.9),
        "2": KernelChoice(QUANTIZED_DENSE, {FLOAT_DENSE: 1.0, QUANTIZED_DENSE: 0.5}, 0.9),
        "4": KernelChoice(FLOAT_DENSE, {FLOAT_DENSE: 1.0}, 0.9),
    }
    built = build_with_kernels(model, forced, torch.qint8)
    assert type(built[0]) is SparseLinear
    assert type(built[2]) is torch.ao.nn.quantized.dynamic.Linear
    assert type(built[4]) is nn.Linear and built[4] is not model[4]
    x = torch.randn(16, 256)
    inputs = layer_inputs(built, x, ["0", "2", "4"])
    reference_int8 = quantize_dynamic_copy(nn.Sequential(model[2]), torch.qint8, {nn.Linear})[0]
    with torch.inference_mode():
        assert torch.allclose(built[0](inputs["0"]), model[0](inputs["0"]), rtol=1e-4, atol=1e-5)
        assert torch.equal(built[2](inputs["2"]), reference_int8(inputs["2"]))
        assert torch.equal(built[4](inputs["4"]), model[4](inputs["4"]))
    assert type(model[0]) is nn.Linear  # the float model is untouched


def test_auto_end_to_end_logs_choices_and_saves_a_loadable_artifact(
    quiet_trainer_kwargs, tmp_path, monkeypatch, run_in_fresh_process
):
    from lightning_compress.quantization import kernels

    def choose_with_csr_first(model, example, dtype, names):
        choices = choose_linear_kernels(model, example, dtype, names)
        first = next(iter(choices))
        choices[first].chosen = SPARSE_CSR  # make sure the CSR path reaches the artifact, whatever the timings
        return choices

    monkeypatch.setattr(kernels, "choose_linear_kernels", choose_with_csr_first)
    quant = DynamicQuantization(sparse_kernels="auto", save_path=tmp_path / "m.lcz", compress=True)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[MagnitudePruning(amount=0.9), quant], **quiet_trainer_kwargs)
    trainer.fit(DigitsMLP(hidden=128), datamodule=DigitsDataModule())
    assert list(quant.kernel_choices) == ["net.0", "net.2", "net.4"]
    assert type(quant.quantized_model.net[0]) is SparseLinear
    for name, choice in quant.kernel_choices.items():
        assert quant.results[f"quantization/kernel_speedup/{name}"] == choice.speedup
    # zeros stay zeros through the sparse layer too, and the summary reports the measured sparsity
    assert quant.layer_sparsity["net.0.weight"][1] == quant.layer_sparsity["net.0.weight"][0]
    x = torch.rand(6, 64)
    assert torch.equal(run_in_fresh_process("load_quantized", tmp_path / "m.lcz", x), quant.quantized_model(x))
    assert torch.equal(load_quantized(tmp_path / "m.lcz")(x), quant.quantized_model(x))


def test_summary_states_the_choice_per_layer():
    from lightning_compress.report import summary_table

    choice = KernelChoice(SPARSE_CSR, {FLOAT_DENSE: 2.0, QUANTIZED_DENSE: 1.0, SPARSE_CSR: 0.5}, 0.95)
    table = summary_table(
        {"quantization/size_mb_before": 1.0, "quantization/size_mb_after": 0.5},
        "qint8",
        kernel_choices={"net.2": choice},
    )
    assert "kernel net.2 (95% zeros): fp32 sparse (CSR), 4.00x fp32 dense" in table


def test_bad_sparse_kernels_value_and_missing_batch(quiet_trainer_kwargs):
    with pytest.raises(ValueError, match=r"`sparse_kernels` must be one of \['auto', 'off'\]"):
        DynamicQuantization(sparse_kernels="on")
    dm = DigitsDataModule()
    dm.setup()
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[DynamicQuantization(evaluate=False, sparse_kernels="auto")], **quiet_trainer_kwargs
    )
    with pytest.raises(ValueError, match="sparse_kernels='auto'\\) times kernels on one real input batch"):
        trainer.fit(DigitsMLP(hidden=8), train_dataloaders=dm.train_dataloader())
