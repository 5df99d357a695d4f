"""Measuring a model: a metric over (input, target) batches (torchmetrics), serialized size, sparsity.

Plain PyTorch: usable without a Trainer. Every figure is measured on the model it is given, never estimated.
Batches are ``(input, target)`` pairs (the first two items of a tuple/list batch).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torchmetrics
from torch import Tensor, nn


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(input, target)`` of a batch given as a tuple/list whose first two items are those."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        f"Evaluation batches must be (input, target) tuples or lists; got a {type(batch).__name__}. "
        "Pass `dataloader=` with such batches."
    )


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def default_metric(output: Tensor) -> torchmetrics.Metric:
    """Multiclass accuracy of the logits' argmax; the number of classes is the output's last dimension."""
    if output.dim() < 2:
        raise ValueError(
            f"The default metric (multiclass accuracy) needs logits of shape (batch, classes); the model returned "
            f"shape {tuple(output.shape)}. Pass `metric=` (a torchmetrics Metric) that fits the model's output."
        )
    return torchmetrics.Accuracy(task="multiclass", num_classes=output.shape[-1])


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[Any], metric: torchmetrics.Metric) -> float:
    """``metric`` (reset first) over all ``batches``, on the CPU; the model is put in eval mode."""
    model.eval()
    metric = metric.to("cpu")
    metric.reset()
    for batch in batches:
        x, y = split_batch(batch)
        metric.update(model(x), y)
    value = metric.compute()
    metric.reset()
    return float(value)


def serialized_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what storing the weights really costs."""
    return serialized_state_bytes(model.state_dict())


def serialized_state_bytes(state: Mapping[str, Any]) -> int:
    """Bytes of ``torch.save(state)``, for a state dict or part of one (a tensor shared by entries is stored once)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def zero_fraction(tensors: Iterable[Tensor]) -> float:
    """Fraction of entries exactly equal to zero (quantized tensors compared after dequantization)."""
    counts = [_zeros_and_size(t) for t in tensors]
    total = sum(size for _, size in counts)
    return sum(zeros for zeros, _ in counts) / total if total else float("nan")


def sparsity_by_name(tensors: Mapping[str, Tensor]) -> tuple[float, dict[str, float]]:
    """The fraction of exact zeros over all ``tensors`` together, and per name; each tensor is read once."""
    counts = {name: _zeros_and_size(t) for name, t in tensors.items()}
    total = sum(size for _, size in counts.values())
    overall = sum(zeros for zeros, _ in counts.values()) / total if total else float("nan")
    return overall, {name: zeros / size for name, (zeros, size) in counts.items()}


def _zeros_and_size(t: Tensor) -> tuple[int, int]:
    if t.is_quantized:
        t = t.dequantize()
    return int((t == 0).sum()), t.numel()


def quantized_weights(model: nn.Module) -> dict[str, Tensor]:
    """Float (dequantized) weights of a dynamically quantized model, named as in the float model.

    Quantized Linear layers expose ``weight()``, quantized RNNs ``get_weight()``, sparse layers a CSR ``weight``;
    float layers that were not quantized are included as they are.
    """
    weights: dict[str, Tensor] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.layout == torch.sparse_csr:
            items = [("weight", weight.to_dense())]
        elif hasattr(module, "get_weight") and callable(module.get_weight):
            items = module.get_weight().items()
        elif isinstance(module, (torch.ao.nn.quantized.Linear, torch.ao.nn.quantized.dynamic.Linear)):
            items = [("weight", module.weight())]
        else:
            items = module.named_parameters(recurse=False)
        for name, value in items:
            weights[prefix + name] = value.dequantize() if value.is_quantized else value.detach()
    return weights


def pruned_sparsity(
    float_model: nn.Module, quantized: nn.Module, names: Iterable[str]
) -> tuple[float, float, dict[str, tuple[float, float]]] | None:
    """Fractions of exact zeros over the named parameters in the float and the quantized model: overall in each,
    and ``name -> (float, quantized)``; only names both models hold count. ``None`` when none does."""
    float_weights = dict(float_model.named_parameters())
    dequantized = quantized_weights(quantized)
    pruned = [n for n in dict.fromkeys(names) if n in float_weights and n in dequantized]
    if not pruned:
        return None
    float_overall, float_layers = sparsity_by_name({n: float_weights[n] for n in pruned})
    quantized_overall, quantized_layers = sparsity_by_name({n: dequantized[n] for n in pruned})
    return float_overall, quantized_overall, {n: (float_layers[n], quantized_layers[n]) for n in pruned}
