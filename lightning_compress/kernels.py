"""Per-layer kernel choice for pruned Linear layers: quantized dense, float32 sparse (CSR), or float32 dense.

On this CPU a CSR matmul beats dense float32 from about 75% sparsity, while dynamic int8 dense is several times
faster than float32 at any sparsity; which one wins for a layer depends on its shape, its sparsity and the batch.
So each layer's candidates are timed on the activations that a real batch produces at that layer, and the fastest
is kept. Plain PyTorch: usable without a Trainer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.benchmark as benchmark
from torch import Tensor, nn

from lightning_compress.backends import quantize_dynamic_copy, torch_internal_warnings_silenced

QUANTIZED_DENSE = "quantized dense"
SPARSE_CSR = "fp32 sparse (CSR)"
FLOAT_DENSE = "fp32 dense"


class SparseLinear(nn.Module):
    """A Linear layer whose weight is a float32 CSR tensor: ``y = (W_csr @ x^T)^T + b``.

    ``W_csr @ x^T`` is used rather than ``F.linear(x, W_csr)``, which is about 6x slower on this CPU (measured).
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


@dataclass
class KernelChoice:
    """What was measured for one Linear layer, in milliseconds per call on its real input."""

    chosen: str
    times_ms: dict[str, float]
    sparsity: float

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
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _time_ms(module: nn.Module, x: Tensor) -> float:
    with torch.inference_mode():
        timer = benchmark.Timer("m(x)", globals={"m": module, "x": x}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=0.1).median * 1e3


def choose_linear_kernels(model: nn.Module, example_input: Any, dtype: torch.dtype) -> dict[str, KernelChoice]:
    """Time quantized dense, fp32 CSR and fp32 dense for each Linear of the float ``model``; keep the fastest.

    A candidate whose output differs from its own reference (the CSR layer from the dense fp32 layer, beyond
    float tolerance) is not eligible.
    """
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
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
            eligible = {FLOAT_DENSE: linear, QUANTIZED_DENSE: quantized}
            if torch.allclose(sparse(x), reference, rtol=1e-4, atol=1e-5):
                eligible[SPARSE_CSR] = sparse
        times = {kind: _time_ms(module, x) for kind, module in eligible.items()}
        sparsity = float((linear.weight == 0).float().mean())
        choices[name] = KernelChoice(min(times, key=times.__getitem__), times, sparsity)
    return choices


def build_with_kernels(
    model: nn.Module, choices: dict[str, KernelChoice], dtype: torch.dtype, other_types: set[type[nn.Module]]
) -> nn.Module:
    """A copy of the float ``model`` with each chosen kernel in place; other quantizable types quantized as usual."""
    targets: set[Any] = {t for t in other_types if t is not nn.Linear}
    targets |= {name for name, choice in choices.items() if choice.chosen == QUANTIZED_DENSE}
    # Quantize first: the quantization backend deep-copies the model, and CSR tensors cannot be deep-copied.
    result = quantize_dynamic_copy(model, dtype, targets) if targets else copy.deepcopy(model).eval()
    for name, choice in choices.items():
        if choice.chosen == SPARSE_CSR:
            parent_name, _, child = name.rpartition(".")
            parent = result.get_submodule(parent_name) if parent_name else result
            setattr(parent, child, SparseLinear(getattr(parent, child)))
    return result
