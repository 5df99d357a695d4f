"""What a pruning run measured, and what is shown from it: one entry per mask update (epoch, step, index, target,
measured sparsity), the monitored metric at each validation, the schedule plot drawn from them, and the warning
about tensors that one global threshold nearly emptied. Knows nothing of masks or scores; reads a trainer only for
its epoch counter, to write the plot and to log.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_compress import report

#: Under scope="global", a tensor pruned beyond this fraction (and beyond the overall target) is named in a warning.
COLLAPSED = 0.98


class History:
    """``entries``: one per update and at the end of training (``epoch``, ``step``, ``index``, ``target``,
    ``sparsity``); ``monitored``: ``(epoch, value)`` of the monitored metric at each validation while masks exist;
    ``dense_value``: its last value before anything was pruned; ``collapsed``: tensors warned about in this fit."""

    def __init__(self) -> None:
        self.entries: list[dict[str, float]] = []
        self.monitored: list[tuple[float, float]] = []
        self.monitor_key: str | None = None
        self.dense_value: float | None = None
        self.pruned_any = False
        self.collapsed: set[str] = set()
        self.last_epoch: int | None = None

    def new_fit(self, resumed: bool) -> None:
        """A new fit starts its own history; a resumed one continues the checkpoint's run."""
        if not resumed:
            self.entries, self.monitored, self.dense_value = [], [], None
        self.collapsed = set()

    def record(self, trainer: Any, index: int | None, target: float, sparsity: float) -> None:
        """An update at ``index`` (``None``: the end of training, drawn at the last trained epoch)."""
        self.entries.append(
            {
                # at the end of training, Lightning's epoch counter is one past the last epoch trained
                "epoch": trainer.current_epoch if index is not None else self.last_trained_epoch(trainer),
                "step": trainer.global_step,
                "index": index if index is not None else float("nan"),
                "target": target,
                "sparsity": sparsity,
            }
        )

    def observe(self, epoch: int, key: str, value: float) -> None:
        """A validation's value of the monitored metric ``key``."""
        self.monitor_key = key
        self.monitored.append((epoch, value))
        if not self.pruned_any:
            self.dense_value = value

    def last_trained_epoch(self, trainer: Any) -> int:
        seen = [h["epoch"] for h in self.entries] + [epoch for epoch, _ in self.monitored]
        return max([trainer.current_epoch - 1, *seen, 0])

    def collapse_warning(self, owner: str, by_name: Mapping[str, float], target: float) -> str | None:
        """Under one global threshold, a tensor of small weights can lose almost all of them: the warning naming
        each such tensor once per fit, with the fix (``None`` when there is no new one)."""
        limit = max(COLLAPSED, target)
        found = [(name, v) for name, v in by_name.items() if v > limit and name not in self.collapsed]
        if not found:
            return None
        self.collapsed.update(name for name, _ in found)
        shown = ", ".join(f"{name} ({fraction:.1%})" for name, fraction in found[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        return (
            f"{owner}(scope='global') pruned {shown}{more} beyond {COLLAPSED:.0%}, while the target over all selected "
            f"weights is {target:.1%}: one threshold over all of them takes nearly every weight of a tensor whose "
            "weights are small (a layer initialized at a smaller scale, say), which can cut the layer off. Use "
            "scope='layerwise' (the target in each tensor), or exclude=[...] those tensors."
        )

    def write_plot(self, trainer: Any, baseline: float | None, **extras: Any) -> None:
        """``sparsity.png`` (and the TensorBoard figure) from this history (see
        :func:`lightning_compress.report.write_schedule_plot`); ``extras``: ``max_drop``, ``mode``, ``quantized``."""
        report.write_schedule_plot(
            trainer,
            self.entries,
            self.monitored,
            self.monitor_key,
            baseline=baseline,
            last_epoch=self.last_epoch,
            **extras,
        )
