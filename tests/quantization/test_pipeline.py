"""The plain functions under DynamicQuantization: inputs and outputs, layer choice, coverage, interleaved timing,
kernel choice, and the summary's honesty about slowdowns, size increases and dtype casts."""

import dataclasses

import pytest
import torch
from torch import nn

from lightning_compress.inputs import (
    ModelInput,
    capture_inputs,
    forward_adapter,
    forward_call,
    named_inputs,
    plain_outputs,
    restore_outputs,
)
from lightning_compress.quantization import copying, dynamic, figures
from lightning_compress.quantization.kernels import FLOAT_DENSE, QUANTIZED_DENSE, SPARSE_CSR, choose_kernel
from lightning_compress.report import summary_table


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.rnn = nn.GRU(8, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 2)


def test_select_modules_by_type_glob_and_exclude():
    model = Blocks()
    assert dynamic.select_modules(model) == ["encoder.0", "encoder.2", "rnn", "head"]  # out_proj is not replaceable
    assert dynamic.select_modules(model, ["encoder.*"]) == ["encoder.0", "encoder.2"]
    assert dynamic.select_modules(model, [nn.GRU, "head"]) == ["rnn", "head"]
    assert dynamic.select_modules(model, exclude=["encoder.*"]) == ["rnn", "head"]
    with pytest.raises(ValueError, match=r"`modules` pattern 'decoder\.\*' matches no layer.*encoder\.0 \(Linear\)"):
        dynamic.select_modules(model, ["decoder.*"])
    with pytest.raises(ValueError, match="`exclude` pattern 'tail'"):
        dynamic.select_modules(model, exclude=["tail"])
    with pytest.raises(ValueError, match="would quantize nothing"):
        dynamic.select_modules(model, ["head"], exclude=["head"])


def test_coverage_counts_the_parameters_of_the_quantized_layers():
    model = Blocks()
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert figures.coverage(model, ["head"]) == head / total


def test_float_copy_casts_to_float32_and_reports_the_original_dtype():
    model = nn.Sequential(nn.Linear(3, 3)).to(torch.bfloat16)
    copied, cast_from = copying.float_copy(model)
    assert cast_from == torch.bfloat16 and copied[0].weight.dtype == torch.float32
    assert model[0].weight.dtype == torch.bfloat16
    assert copying.float_copy(nn.Linear(2, 2))[1] is None


def test_interleaved_latency_alternates_the_order_of_the_models():
    calls = []

    class Recorder(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    a, b = Recorder("a"), Recorder("b")
    results = figures.interleaved_latency([a, b], [ModelInput.from_example(torch.zeros(1))], rounds=4)
    timed = calls[2:]  # after one warm-up call each
    assert timed == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert all(r.low_ms <= r.median_ms <= r.high_ms for r in results)


def test_kernel_choice_needs_a_clear_win_in_every_round():
    clear = {QUANTIZED_DENSE: [1.0, 1.1, 1.05], FLOAT_DENSE: [2.0, 2.1, 2.0], SPARSE_CSR: [0.5, 0.55, 0.6]}
    assert choose_kernel(clear) == (SPARSE_CSR, False)
    # faster at the median, but one round overlaps quantized dense: keep the default, say it was close
    close = {QUANTIZED_DENSE: [1.0, 1.1, 1.05], FLOAT_DENSE: [2.0, 2.1, 2.0], SPARSE_CSR: [0.8, 0.85, 1.2]}
    assert choose_kernel(close) == (QUANTIZED_DENSE, True)
    slower = {QUANTIZED_DENSE: [1.0, 1.0, 1.0], FLOAT_DENSE: [2.0, 2.0, 2.0]}
    assert choose_kernel(slower) == (QUANTIZED_DENSE, False)


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


def test_plain_outputs_of_dataclasses_mappings_and_sequences():
    t = torch.ones(2)
    assert plain_outputs(Output(t)) == {"logits": t}
    nested = plain_outputs({"a": (t, [t]), "b": None})
    assert list(nested) == ["a"] and isinstance(nested["a"], tuple) and isinstance(nested["a"][1], list)


def test_forward_adapter_names_inputs_as_forward_does_and_leaves_out_default_non_tensors():
    class Mixed(nn.Module):
        def forward(self, x, scale=None, temperature=1.0, *, shift):
            return Output(x * scale / temperature + shift)

    example = ModelInput((torch.ones(2), torch.full((2,), 2.0), 1.0), {"shift": torch.ones(2)})
    adapter, trace_inputs = forward_adapter(Mixed(), example)
    assert list(trace_inputs) == ["x", "scale", "shift"]  # temperature=1.0 is its default: not an input
    traced = torch.jit.trace(adapter, example_kwarg_inputs=trace_inputs, strict=False)
    expected = torch.full((2,), 3.0)
    assert torch.equal(traced(torch.ones(2), torch.full((2,), 2.0), shift=torch.ones(2))["logits"], expected)
    assert torch.equal(traced(x=torch.ones(2), scale=torch.full((2,), 2.0), shift=torch.ones(2))["logits"], expected)


def test_named_inputs_of_var_positional_and_var_keyword_forwards():
    class Star(nn.Module):
        def forward(self, x, *rest, **extra):
            return x

    t = torch.ones(1)
    named = named_inputs(Star().forward, ModelInput((t, t, t), {"mask": t}))
    assert list(named) == ["x", "input_0", "input_1", "mask"]
    args, kwargs = forward_call(Star().forward, list(named))(named)
    assert len(args) == 3 and list(kwargs) == ["mask"]


def test_restore_outputs_gives_back_the_model_output_types():
    from collections import namedtuple

    from transformers.modeling_outputs import SequenceClassifierOutput

    t = torch.ones(2)
    pair = namedtuple("Pair", "a b")
    template = {"out": SequenceClassifierOutput(logits=t), "pair": pair(t, t), "data": Output(t)}
    restored = restore_outputs(plain_outputs(template), template)
    assert isinstance(restored["out"], SequenceClassifierOutput) and torch.equal(restored["out"].logits, t)
    assert isinstance(restored["pair"], pair) and isinstance(restored["data"], Output)


def test_captured_inputs_are_ordinary_cpu_tensors_even_from_inference_mode():
    model = nn.Linear(2, 2)

    def run():
        with torch.inference_mode():
            return model(torch.ones(3, 2))

    captured, _ = capture_inputs(model, run, limit=5)
    assert len(captured) == 1 and not captured[0].args[0].is_inference()


def _comparison(latency_before, latency_after, size_before, size_after, cast_from=None):
    return figures.Comparison(
        {},
        {},
        size_before,
        size_after,
        0.25,
        figures.Latency(latency_before, latency_before, latency_before),
        figures.Latency(latency_after, latency_after, latency_after),
        cast_from,
    )


def test_slowdowns_and_size_increases_are_warned_about_and_stated():
    comparison = _comparison(1.0, 2.0, 0.002, 0.003, torch.float16)
    slower, larger = comparison.regressions()
    assert "slower" in slower and "0.50x" in slower and "25.0% of its parameters" in slower
    assert "larger than the float one" in larger
    assert _comparison(2.0, 1.0, 0.003, 0.002).regressions() == []
    results = {
        "quantization/size_mb_before": 0.002,
        "quantization/size_mb_after": 0.003,
        "quantization/latency_ms_before": 1.0,
        "quantization/latency_ms_after": 2.0,
        "quantization/coverage": 0.25,
    }
    table = summary_table(results, "qint8", comparison=comparison, stage_seconds={"quantize": 0.5})
    assert "SLOWER here (0.50x)" in table and "LARGER" in table and "coverage: 25.0%" in table
    assert "weights are float16" in table and "time: quantize 0.50 s" in table


# ---------------------------------------------------------------------------------------------- latency verdicts
def _latency(*rounds_ms):
    """A Latency from given per-round medians (figures, not timings)."""
    ordered = sorted(rounds_ms)
    return figures.Latency(ordered[len(ordered) // 2], ordered[0], ordered[-1])


@pytest.mark.parametrize(
    ("before", "after", "verdict"),
    [
        ((1.00, 1.02, 1.05, 1.01, 1.03), (0.50, 0.52, 0.55, 0.51, 0.53), "faster"),
        ((1.00, 1.02, 1.05, 1.01, 1.03), (1.20, 1.22, 1.25, 1.21, 1.23), "slower"),
        # the trial's 32.005 against 31.971 ms: a ratio below 1, within the rounds' spread
        ((31.5, 31.9, 31.97, 32.4, 33.0), (31.6, 31.8, 32.005, 32.3, 32.9), "too close to call"),
        ((1.00, 1.30, 1.10, 1.20, 1.05), (1.15, 1.40, 1.25, 1.35, 1.20), "too close to call"),
        # the trial under load: rounds 3.916-399.972 / 1.725-367.968 ms, shown as a 2.83x ratio
        ((3.916, 50.0, 120.0, 250.0, 399.972), (1.725, 30.0, 42.4, 200.0, 367.968), "unreliable"),
        ((1.0, 1.0, 1.0, 1.0, 4.0), (0.5, 0.5, 0.5, 0.5, 0.5), "unreliable"),
    ],
)
def test_latency_verdicts_follow_from_the_rounds_spread(before, after, verdict):
    judged = figures.latency_verdict(_latency(*before), _latency(*after))
    assert judged.verdict == verdict
    comparison = figures.Comparison({}, {}, 1.0, 1.0, 0.5, _latency(*before), _latency(*after))
    warned = [r for r in comparison.regressions() if "slower" in r]
    assert bool(warned) == (verdict == "slower")  # only a slowdown seen in every round is warned about
    results = {
        "quantization/size_mb_before": 1.0,
        "quantization/size_mb_after": 1.0,
        "quantization/latency_ms_before": comparison.latency_before.median_ms,
        "quantization/latency_ms_after": comparison.latency_after.median_ms,
    }
    table = summary_table(results, "qint8", comparison=comparison)
    row = next(line for line in table.splitlines() if line.strip().startswith("latency (ms/batch)"))
    assert (f"{comparison.speedup:.2f}x" in row) == (verdict != "unreliable")  # no ratio stated as fact under load
    assert f"latency: {judged.text}" in table and ("SLOWER" in table) == (verdict == "slower")
    if verdict == "unreliable":
        assert "timing unreliable" in judged.text and "busy" in judged.text
