"""The contract between a pruning callback and ``DynamicQuantization``, so that neither reaches into the other.

``DynamicQuantization`` measures the sparsity of the model it quantizes itself (it never reads another callback's
masks or metrics), and runs in ``on_fit_end``, which Lightning calls after every callback's ``on_train_end``, so
a pruning callback that finishes its work by the end of training (making masks permanent, say) is always done by
then. All it asks of a pruning callback is which parameters it pruned, so that ``quantization/sparsity_before``
and ``quantization/sparsity_after`` are measured over those weights. Any callback, ours or a third party's, takes
part by having this one property.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class PruningCallback(Protocol):
    """A callback that prunes parameters, as ``DynamicQuantization`` sees it."""

    @property
    def pruned_parameter_names(self) -> list[str]:
        """Names of the pruned parameters, as in ``LightningModule.named_parameters()``, known by ``on_fit_end``."""
        ...


@runtime_checkable
class SummaryLines(Protocol):
    """Optional: a callback whose lines ``DynamicQuantization`` adds to its end-of-fit summary table (for
    ``MagnitudePruning``, the accuracy guard's baseline, budget, last value and outcome)."""

    def summary_lines(self) -> list[str]: ...


@runtime_checkable
class QuantizedMetricsPlot(Protocol):
    """Optional: a callback whose figure shows the metrics measured on the quantized model. It draws before
    quantization runs (``MagnitudePruning`` draws ``sparsity.png`` in ``on_train_end``; quantization runs in
    ``on_fit_end``), so ``DynamicQuantization`` calls this once at the end of its fit-end work, on rank zero, with
    its ``quantization/<metric>_after`` values keyed by ``<metric>`` (e.g. ``{"val_acc": 0.95}``)."""

    def redraw_plot(self, trainer: Any, quantized: Mapping[str, float]) -> None: ...
