"""Per-layer kernel choice for pruned Linear layers: quantized dense, float32 sparse (CSR), or float32 dense.

A CSR matmul can beat dense float32 at high sparsity, and dynamic int8 dense usually beats float32 at any sparsity
(figures in ``benchmarks/README.md``); which one wins for a layer depends on its shape, its sparsity, the batch
and the machine.
So each layer's candidates are timed on the activations that a real batch produces at that layer, and the fastest
is kept. Plain PyTorch: usable without a Trainer.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.benchmark as benchmark
from torch import Tensor, nn

from lightning_compress.compat import torch_internal_warnings_silenced
from lightning_compress.inputs import ModelInput
from lightning_compress.quantization.copying import Copier
from lightning_compress.quantization.dynamic import quantizable_modules, quantize, quantize_dynamic_copy

QUANTIZED_DENSE = "quantized dense"
SPARSE_CSR = "fp32 sparse (CSR)"
FLOAT_DENSE = "fp32 dense"


class SparseLinear(nn.Module):
    """A Linear layer whose weight is a float32 CSR tensor: ``y = (W_csr @ x^T)^T + b``.

    ``W_csr @ x^T`` is used rather than ``F.linear(x, W_csr)``, which was several times slower where we measured
    (see ``DESIGN.md``).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch_internal_warnings_silenced():  # torch's notice that CSR support is in beta
            self.register_buffer("weight", linear.weight.detach().to_sparse_csr())
        self.register_buffer("bias", linear.bias.detach().clone() if linear.bias is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        y = (self.weight @ flat.T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


#: Rounds of interleaved timing per layer, and how much faster than quantized dense (the default) another kernel
#: must be in every round (its slowest round against quantized dense's fastest) to replace it.
ROUNDS = 5
CLEAR_MARGIN = 1.10


@dataclass
class KernelChoice:
    """What was measured for one Linear layer, in milliseconds per call on its real input."""

    chosen: str
    times_ms: dict[str, float]
    sparsity: float
    spread_ms: dict[str, tuple[float, float]] = field(default_factory=dict)
    too_close_to_call: bool = False

    @property
    def speedup(self) -> float:
        """fp32 dense time / chosen time."""
        return self.times_ms[FLOAT_DENSE] / self.times_ms[self.chosen]


def layer_inputs(model: nn.Module, example_input: Any, names: list[str]) -> dict[str, Tensor]:
    """The input each named module receives when ``model`` runs on ``example_input``."""
    captured: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_pre_hook(lambda _, args, name=name: captured.setdefault(name, args[0]))
        for name in names
    ]
    try:
        with torch.inference_mode():
            ModelInput.from_example(example_input)(model)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _time_rounds(candidates: dict[str, nn.Module], x: Tensor, rounds: int) -> dict[str, list[float]]:
    """Per-round median time (ms) of each candidate on ``x``, candidates interleaved, order reversed every round."""
    per_round: dict[str, list[float]] = {kind: [] for kind in candidates}
    with torch.inference_mode():
        for r in range(rounds):
            for kind in list(candidates) if r % 2 == 0 else reversed(list(candidates)):
                timer = benchmark.Timer(
                    "m(x)", globals={"m": candidates[kind], "x": x}, num_threads=torch.get_num_threads()
                )
                per_round[kind].append(timer.blocked_autorange(min_run_time=0.02).median * 1e3)
    return per_round


def choose_kernel(per_round: dict[str, list[float]]) -> tuple[str, bool]:
    """The kernel to use from per-round times, and whether the choice was too close to call.

    Quantized dense is the default. Another kernel replaces it only when its slowest round is faster than quantized
    dense's fastest by ``CLEAR_MARGIN``; among several such, the lowest median wins. A kernel with a lower median
    that does not clear that bar leaves the default in place and marks the choice as too close to call.
    """
    default = per_round[QUANTIZED_DENSE]
    medians = {kind: statistics.median(times) for kind, times in per_round.items()}
    clear = [kind for kind, times in per_round.items() if max(times) * CLEAR_MARGIN < min(default)]
    if clear:
        return min(clear, key=medians.__getitem__), False
    return QUANTIZED_DENSE, any(medians[k] < medians[QUANTIZED_DENSE] for k in per_round if k != QUANTIZED_DENSE)


def choose_linear_kernels(
    model: nn.Module,
    example_input: Any,
    dtype: torch.dtype,
    names: Iterable[str] | None = None,
    rounds: int = ROUNDS,
) -> dict[str, KernelChoice]:
    """Time quantized dense, fp32 CSR and fp32 dense for each Linear of the float ``model`` (those in ``names`` when
    given) on its real input, and choose with :func:`choose_kernel`.

    A candidate whose output differs from its own reference (the CSR layer from the dense fp32 layer, beyond
    float tolerance) is not eligible.
    """
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and (names is None or n in names)}
    inputs = layer_inputs(model, example_input, list(linears))
    choices = {}
    for name, linear in linears.items():
        if name not in inputs:
            continue  # not used in forward on this input
        x = inputs[name]
        quantized = quantize_dynamic_copy(nn.Sequential(linear), dtype, {nn.Linear})[0]
        sparse = SparseLinear(linear)
        with torch.inference_mode():
            reference = linear(x)
            eligible = {QUANTIZED_DENSE: quantized, FLOAT_DENSE: linear}
            if torch.allclose(sparse(x), reference, rtol=1e-4, atol=1e-5):
                eligible[SPARSE_CSR] = sparse
        per_round = _time_rounds(eligible, x, rounds)
        chosen, close = choose_kernel(per_round)
        sparsity = float((linear.weight == 0).float().mean())
        choices[name] = KernelChoice(
            chosen,
            {kind: statistics.median(t) for kind, t in per_round.items()},
            sparsity,
            {kind: (min(t), max(t)) for kind, t in per_round.items()},
            close,
        )
    return choices


def build_with_kernels(
    model: nn.Module, choices: dict[str, KernelChoice], dtype: torch.dtype, names: Iterable[str] | None = None
) -> nn.Module:
    """A copy of the float ``model`` with each chosen kernel in place; the other named layers (default: every
    quantizable one) quantized as usual."""

    names = set(quantizable_modules(model) if names is None else names)
    targets = {n for n in names if n not in choices or choices[n].chosen == QUANTIZED_DENSE}
    # Quantize first: the quantization backend deep-copies the model, and CSR tensors cannot be deep-copied.
    result = quantize(model, dtype, targets) if targets else Copier()(model).eval()
    for name, choice in choices.items():
        if choice.chosen == SPARSE_CSR and name in names:
            parent_name, _, child = name.rpartition(".")
            parent = result.get_submodule(parent_name) if parent_name else result
            setattr(parent, child, SparseLinear(getattr(parent, child)))
    return result
