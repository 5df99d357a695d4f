"""Which layers DynamicQuantization quantizes, and figures that say exactly that: transformers' GPT-2 (Conv1D
layers, an embedding tied to the head), a CNN with attention (convolutions and MultiheadAttention stay float, with
the reason), Linear layers in disguise, coverage against an independent count, size causes, the inputs timed."""

import logging

import lightning.pytorch as pl
import pytest
import torch
from helpers import DigitsDataModule, TinyGPT2, _Classifier, pruned_mlp
from torch import nn
from torch.nn.utils import parametrizations

from lightning_compress import DynamicQuantization, MagnitudePruning
from lightning_compress.inputs import ModelInput
from lightning_compress.quantization import copying, dynamic, figures, outcomes
from lightning_compress.quantization.kernels import (
    FLOAT_DENSE,
    QUANTIZED_DENSE,
    SPARSE_CSR,
    KernelChoice,
    build_with_kernels,
)
from lightning_compress.quantization.measure import serialized_size_bytes

STATIC_HINT = "Conv2d: dynamic quantization covers Linear and RNN layers; StaticQuantization covers convolutions"


def _trainer(**kwargs):
    pl.seed_everything(0, verbose=False)
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _independent_coverage(trained: nn.Module, quantized: nn.Module) -> float:
    """Entries of the trained model's parameters in the layers that are torch.ao dynamic modules in the quantized
    copy, over all its parameters, each tensor counted once."""
    layers = dict(trained.named_modules())
    in_quantized = {
        id(p): p.numel()
        for name, module in quantized.named_modules()
        if type(module).__module__.startswith("torch.ao.nn.quantized.dynamic")
        for p in layers[name].parameters()
    }
    return sum(in_quantized.values()) / sum(p.numel() for p in trained.parameters())


def _summary(caplog) -> str:
    return next(r.getMessage() for r in caplog.records if "lightning_compress summary" in r.getMessage())


def _row(table: str, label: str) -> str:
    return next(line for line in table.splitlines() if line.strip().startswith(label + " "))


def _stated_bytes(message: str) -> int:
    """The bytes a size cause states: "(+1,234 bytes)" or "(+0.129 MB)"."""
    amount, unit = message.rpartition("(+")[2].rstrip(")").split(" ")
    return round(float(amount.replace(",", "")) * (1e6 if unit == "MB" else 1))


def _footnote(table: str, row: str) -> str:
    number = row[row.rindex("[") : row.rindex("]") + 1]
    return next(
        line.strip().removeprefix(number).strip() for line in table.splitlines() if line.strip().startswith(number)
    )


# ---------------------------------------------------------------------------------------------- GPT-2
def test_gpt2_conv1d_layers_are_quantized_and_the_tied_head_stays_float(caplog):
    pytest.importorskip("transformers")
    model = TinyGPT2()
    quant = DynamicQuantization()
    with caplog.at_level(logging.INFO):
        _trainer(max_epochs=1, callbacks=[quant]).fit(model)
    results, layers = quant.results, {layer.name: layer for layer in quant.layers}
    assert results["quantization/size_mb_after"] < 0.6 * results["quantization/size_mb_before"]
    conv1d = [name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8 and sorted(quant.quantized_layers) == sorted(conv1d)
    assert all(layers[name].dtype == "qint8" and layers[name].kind == "Conv1D" for name in conv1d)
    # the tied head stays float, stored once: the quantized copy keeps the tie, and the size counts it once
    head = layers["model.lm_head"]
    assert head.dtype == "float32" and head.reason.startswith("tied to model.transformer.wte.weight (Embedding)")
    copy = quant.quantized_model.model
    assert copy.lm_head.weight is copy.transformer.wte.weight
    assert results["quantization/size_mb_after"] == serialized_size_bytes(quant.quantized_model) / 1e6
    assert results["quantization/coverage"] == pytest.approx(_independent_coverage(model, quant.quantized_model))
    table = _summary(caplog)
    assert "qint8 (Conv1D as Linear)" in _row(table, "model.transformer.h.0.mlp.c_fc.weight")
    assert _footnote(table, _row(table, "model.lm_head.weight")) == head.reason
    assert not any("larger than the float one" in r.getMessage() for r in caplog.records)

    # the float copy's Linear layers compute what the Conv1D layers did, to the bit
    float_model, _ = copying.float_copy(model)
    assert type(float_model.model.transformer.h[0].attn.c_attn) is nn.Linear
    inputs = next(iter(model.val_dataloader()))[0]
    with torch.inference_mode():
        assert torch.equal(float_model(inputs), model.eval()(inputs))

    # asked for by name, the head is quantized, stored beside the float embedding, and the warning says so
    assert "model.lm_head" not in dynamic.select_modules(float_model)
    assert dynamic.select_modules(float_model, ["model.lm_head"]) == ["model.lm_head"]
    tied_head = dynamic.quantize(float_model, torch.qint8, ["model.lm_head"])
    comparison = figures.compare(float_model, tied_head, ["model.lm_head"])
    assert comparison.size_mb_after > comparison.size_mb_before
    (larger,) = comparison.regressions()
    cause = "model.lm_head.weight is tied to model.transformer.wte.weight, which stays float: its qint8 copy is stored"
    assert cause in larger and "packed format" not in larger
    grown = serialized_size_bytes(tied_head) - serialized_size_bytes(float_model)
    assert _stated_bytes(larger) == pytest.approx(grown, rel=0.05)  # the cause accounts for the whole growth

    # a tied weight counts as quantized once a layer holding it runs quantized: alone, and with every Linear
    for modules in (["model.lm_head"], ["model.lm_head", nn.Linear]):
        names = dynamic.select_modules(float_model, modules)
        quantized = dynamic.quantize(float_model, torch.qint8, names)
        counted = outcomes.coverage(outcomes.layer_outcomes(float_model, quantized, modules))
        assert counted == pytest.approx(_independent_coverage(float_model, quantized))
        assert figures.compare(float_model, quantized, names).coverage == pytest.approx(counted)
    assert counted > results["quantization/coverage"] + 0.05  # the head's share, which the default leaves float


# ---------------------------------------------------------------------------------------------- CNN + attention
class ConvAttention(_Classifier):
    """Digits as 1x8x8 images: two convolutions (BatchNorm, ReLU), self-attention over the 64 positions, a linear
    head; ``example_input_array`` is three zero images, as such examples often are."""

    def __init__(self) -> None:
        super().__init__(lr=0.05)
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        )
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 10)
        self.example_input_array = torch.zeros(3, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.reshape(-1, 1, 8, 8)).flatten(2).transpose(1, 2)  # (batch, 64 positions, 16)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


def test_cnn_with_attention_float_rows_say_why_and_latency_is_timed_on_validation_batches(caplog):
    model = ConvAttention()
    pruning = MagnitudePruning(amount=0.5, schedule="constant")
    quant = DynamicQuantization()
    with caplog.at_level(logging.INFO):
        trainer = _trainer(max_epochs=1, limit_train_batches=4, callbacks=[pruning, quant])
        trainer.fit(model, datamodule=DigitsDataModule())
    layers = {layer.name: layer for layer in quant.layers}
    assert quant.quantized_layers == ["head"] and layers["head"].dtype == "qint8"
    for name in ("features.0", "features.3"):
        assert (layers[name].dtype, layers[name].reason) == ("float32", STATIC_HINT)
    assert layers["attn"].reason == (
        "MultiheadAttention: in_proj_weight is used by F.multi_head_attention_forward, not by a Linear"
    )
    assert "out_proj" in layers["attn.out_proj"].reason and layers["attn.out_proj"].dtype == "float32"
    assert layers["features.1"].reason.startswith("BatchNorm2d: normalisation runs in float")
    coverage = quant.results["quantization/coverage"]
    assert coverage == pytest.approx(_independent_coverage(model, quant.quantized_model))
    assert coverage == pytest.approx(
        sum(p.numel() for p in model.head.parameters()) / sum(p.numel() for p in model.parameters())
    )

    table = _summary(caplog)
    conv = _row(table, "features.0.weight")
    assert "float32 [" in conv and _footnote(table, conv) == STATIC_HINT
    float_zeros, quantized_zeros = quant.layer_sparsity["features.0.weight"]
    assert f"{float_zeros:.2%}" in conv and float_zeros == quantized_zeros > 0
    assert _footnote(table, _row(table, "attn.in_proj_weight")) == layers["attn"].reason
    assert "qint8" in _row(table, "head.weight") and "[" not in _row(table, "head.weight")
    assert "1 layer without a weight matrix (BatchNorm2d x1): float32 [" in table

    # timed on what validation fed the model (the digits split: 256 + 103 images), not on the three zero images
    assert quant.comparison.timed_on == "evaluation batches"
    assert quant.comparison.timed_inputs == ["(float32[256, 64])", "(float32[103, 64])"]
    assert "latency: timed on evaluation batches (2): (float32[256, 64]) x1, (float32[103, 64]) x1" in table


# ---------------------------------------------------------------------------------------------- plain functions
def test_linear_layers_in_disguise_become_linear_with_equal_outputs():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class Scaled(nn.Linear):  # its own initialisation, Linear's forward
        def __init__(self, n):
            super().__init__(n, n)
            nn.init.zeros_(self.bias)

    class Doubled(nn.Linear):  # its own forward: not a plain Linear
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 8), Scaled(12), parametrizations.weight_norm(nn.Linear(12, 12)), Doubled(12, 6))
    model.eval()
    x = torch.randn(3, 5, 8)
    float_model, _ = copying.float_copy(model)
    assert [type(m) for m in float_model] == [nn.Linear, nn.Linear, nn.Linear, Doubled]
    with torch.inference_mode():
        assert torch.equal(float_model(x), model(x))
    assert type(model[0]) is Conv1D and type(model[1]) is Scaled  # the model itself is untouched
    assert dynamic.select_modules(float_model) == ["0", "1", "2"]
    assert dynamic.select_modules(float_model, [Conv1D]) == ["0"]
    quantized = dynamic.quantize(float_model, torch.qint8, ["0", "1", "2"])
    layers = {layer.name: layer for layer in outcomes.layer_outcomes(float_model, quantized, exclude=())}
    # the weight-normed Linear is a plain Linear once the copy folded its parametrization (copying.py)
    assert [layers[n].kind for n in "0123"] == ["Conv1D", "Scaled", "Linear", "Doubled"]
    assert [layers[n].dtype for n in "0123"] == ["qint8", "qint8", "qint8", "float32"]
    assert layers["3"].reason.startswith("Doubled overrides Linear.forward")


def test_float_rows_name_the_selection_that_left_them_float():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.GRU(8, 8))
    names = dynamic.select_modules(model, [nn.Linear], exclude=["2"])
    quantized = dynamic.quantize(model, torch.qint8, names)
    layers = {o.name: o for o in outcomes.layer_outcomes(model, quantized, [nn.Linear], ["2"])}
    assert layers["0"].dtype == "qint8"
    assert layers["2"].reason == "excluded by exclude=['2']"
    assert layers["3"].reason == "not selected by modules=['Linear']"
    assert outcomes.coverage(layers.values()) == pytest.approx(
        sum(p.numel() for p in model[0].parameters()) / sum(p.numel() for p in model.parameters())
    )
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match=r"would quantize nothing.* 1 stays float: tied to 0\.weight \(Embedding\)"):
        dynamic.select_modules(tied)


def test_layers_given_another_kernel_run_float_and_are_not_counted_as_quantized():
    model = pruned_mlp((16, 32, 8), 0.9)
    csr = KernelChoice(SPARSE_CSR, {QUANTIZED_DENSE: 2.0, SPARSE_CSR: 1.0, FLOAT_DENSE: 3.0}, 0.9)
    quantized = build_with_kernels(model, {"0": csr}, torch.qint8, ["0", "2"])
    layers = {o.name: o for o in outcomes.layer_outcomes(model, quantized, kernel_choices={"0": csr})}
    assert layers["0"].dtype == "float32" and layers["0"].reason.startswith("sparse_kernels='auto': fp32 sparse")
    head = sum(p.numel() for p in model[2].parameters()) / sum(p.numel() for p in model.parameters())
    assert figures.compare(model, quantized, ["0", "2"]).coverage == pytest.approx(head)
    assert outcomes.coverage(layers.values()) == pytest.approx(head)


def test_latency_times_as_many_batches_as_the_budget_allows():
    model = nn.Linear(4, 4)
    inputs = [ModelInput.from_example(torch.ones(2, 4)) for _ in range(5)]
    assert all(latency.batches == 5 for latency in figures.interleaved_latency([model, model], inputs, 2))
    tight = figures.interleaved_latency([model, model], inputs, 2, budget_s=1e-9)
    assert all(latency.batches == 1 for latency in tight)  # at least one, whatever the budget


def test_size_causes_are_computed_from_the_two_models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    half = dynamic.quantize(mlp, torch.float16, ["0", "2", "4"])
    comparison = figures.compare(mlp, half, ["0", "2", "4"])
    assert comparison.size_mb_after > comparison.size_mb_before  # as reported: 0.310 -> 0.311 MB
    (larger,) = comparison.regressions()
    assert "torch.ao stores float16 weights as float32: 3 layers (" in larger and "tied" not in larger
    grown = serialized_size_bytes(half) - serialized_size_bytes(mlp)
    assert _stated_bytes(larger) == pytest.approx(grown, rel=0.05)
    tiny = nn.Sequential(nn.Linear(2, 2))
    comparison = figures.compare(tiny, dynamic.quantize(tiny, torch.qint8, ["0"]), ["0"])
    (larger,) = comparison.regressions()
    assert "1 layer (0) too small for the packed format" in larger and "float16" not in larger
