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
