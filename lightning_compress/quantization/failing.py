"""Which quantized layers break the model's own code, found by evidence.

A quantized layer is another module: torch.ao's dynamic ``Linear`` has a ``weight()`` method where ``nn.Linear``
has a ``weight`` tensor. Code that reads the weight itself, outside the layer's forward (``F.linear(h,
self.head.weight, ...)``, ``h @ self.head.weight.t()``, logging ``self.head.weight.norm()`` in ``validation_step``),
then fails, and nothing in the error names the layer. :func:`breaking_layers` finds them by bisection: quantize
half of the layers, run the model's code once, and keep halving the halves that fail.

Plain PyTorch over two callables: one that quantizes a given set of layers, one that runs the model's code once;
knows nothing of how a model is quantized or run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from lightning_compress.artifacts.verification import short_error

#: The reason given for a layer :func:`breaking_layers` found.
READ_DIRECTLY = "its weight is read directly by the model's code, which fails on its quantized form"


def breaking_layers(names: Sequence[str], failure: Callable[[list[str]], str | None]) -> dict[str, str]:
    """The layers among ``names`` whose quantized form makes the model's code fail, with the failure seen.

    ``failure(subset)``: the failure (a short message) when only ``subset`` is quantized, or ``None`` when the
    code runs. Each layer that fails on its own is found with about ``2 log2(len(names))`` calls; layers that fail
    only together (neither half fails alone) are all returned. Returns ``{}`` when quantizing all of ``names``
    runs, so the caller's failure lies elsewhere.
    """
    found: dict[str, str] = {}

    def search(group: list[str], error: str) -> None:
        if len(group) == 1:
            found[group[0]] = error
            return
        half = len(group) // 2
        failed_alone = False
        for part in (group[:half], group[half:]):
            part_error = failure(part)
            if part_error is not None:
                failed_alone = True
                search(part, part_error)
        if not failed_alone:  # they fail only together: none can be blamed alone, all stay float
            found.update(dict.fromkeys(group, error))

    names = list(names)
    error = failure(names) if names else None
    if error is not None:
        search(names, error)
    return found


def layers_the_code_reads(
    names: Sequence[str], quantize_only: Callable[[list[str]], nn.Module], probe: Callable[[nn.Module], Any]
) -> dict[str, str]:
    """:func:`breaking_layers` with models made by ``quantize_only(subset)`` (only those layers quantized) and run
    once by ``probe(model)`` (which raises when the model's code fails), each with the reason
    (:data:`READ_DIRECTLY` and the failure seen)."""

    def failure(subset: list[str]) -> str | None:
        try:
            probe(quantize_only(subset))
        except Exception as error:
            return short_error(error, 160)
        return None

    return {name: f"{READ_DIRECTLY}: {error}" for name, error in breaking_layers(names, failure).items()}
