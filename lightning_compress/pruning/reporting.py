"""What a pruning callback logs, prints and draws. :class:`Reporter` keeps what the run measured: one entry per
mask update (epoch, step, index, target, measured sparsity) and the monitored metric at each validation, from which
the schedule plot is drawn; the functions below word what is said: the selection, an update, a held update, a
rollback, a schedule that did not finish. Knows nothing of how masks or scores are computed (the pruner measures);
reads a trainer for its epoch counter and metrics, to log and to draw.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_compress import report
from lightning_compress.pruning.guard import AccuracyGuard
from lightning_compress.pruning.progress import Progress
from lightning_compress.pruning.pruner import Pruner, Sparsity
from lightning_compress.pruning.selection import largest_unselected, matrix_numel

#: Under scope="global", a tensor pruned beyond this fraction (and beyond the overall target) is named in a warning.
COLLAPSED = 0.98


class Reporter:
    """What a pruning callback (``owner``, its class's name) logs, prints and draws, and the history it draws from.

    ``entries``: one per update and at the end of training (``epoch``, ``step``, ``index``, ``target``,
    ``sparsity``); ``monitored``: ``(epoch, value)`` of the monitored metric at each validation while masks exist;
    ``dense_value``: its last value before anything was pruned; ``collapsed``: tensors warned about in this fit.
    """

    def __init__(self, owner: str, scope: str) -> None:
        self.owner, self.scope = owner, scope
        self.coverage = float("nan")
        self.unselected: list[tuple[str, int]] = []
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

    def selected(self, model: Any, names: list[str], counted: Mapping[str, Tensor]) -> None:
        """What is pruned of ``model``: ``coverage`` (the ``counted`` weights over the entries of all its parameters
        with 2+ dimensions) and the largest parameters left out, said at the first update."""
        matrices = matrix_numel(model)
        self.coverage = sum(p.numel() for p in counted.values()) / matrices if matrices else float("nan")
        self.unselected = largest_unselected(model, names)

    def update(self, trainer: Any, when: str, index: int | None, pruner: Pruner, target: float, guard: Any) -> None:
        """After an update at ``index`` (``None``: the end of training) to ``target``: log the measured sparsity
        (and the ``guard``'s counts) to every logger, keep it in the history, say it."""
        coverage = self.coverage
        if index is not None and not self.entries:  # once, at the first update of the callback's life
            rank_zero_info(selection_line(self.owner, pruner, coverage, self.unselected))
        measured = pruner.measure()
        self.pruned_any = measured.overall > 0
        if index is not None and self.scope == "global":
            warning = self._collapse_warning(measured.by_name, target)
            if warning:
                rank_zero_warn(warning)
        report.log_to_loggers(trainer, metrics(measured, target, coverage, guard))
        self.entries.append(
            {
                # at the end of training, Lightning's epoch counter is one past the last epoch trained
                "epoch": trainer.current_epoch if index is not None else self._last_trained_epoch(trainer),
                "step": trainer.global_step,
                "index": index if index is not None else float("nan"),
                "target": target,
                "sparsity": measured.overall,
            }
        )
        rank_zero_info(update_line(self.owner, when, target, measured.overall, pruner))

    def validation(self, trainer: Any, monitor: str | None) -> float | None:
        """Record this validation's value of the monitored metric (``monitor``, else the run's monitored metric),
        rank zero's on every rank so that all decide alike; ``None`` when it was not logged."""
        key = monitor or self.monitor_key or report.monitored_metric_name(trainer)
        value = trainer.callback_metrics.get(key) if key else None
        if value is None:
            return None
        # every rank decides alike: rank zero's value, whether or not the metric was logged with sync_dist
        value = float(trainer.strategy.broadcast(float(value), src=0))
        self.monitor_key = key
        self.monitored.append((trainer.current_epoch, value))
        if not self.pruned_any:
            self.dense_value = value
        return value

    def _last_trained_epoch(self, trainer: Any) -> int:
        seen = [h["epoch"] for h in self.entries] + [epoch for epoch, _ in self.monitored]
        return max([trainer.current_epoch - 1, *seen, 0])

    def _collapse_warning(self, by_name: Mapping[str, float], target: float) -> str | None:
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
            f"{self.owner}(scope='global') pruned {shown}{more} beyond {COLLAPSED:.0%}, while the target over all "
            f"selected weights is {target:.1%}: one threshold over all of them takes nearly every weight of a tensor "
            "whose weights are small (a layer initialized at a smaller scale, say), which can cut the layer off. Use "
            "scope='layerwise' (the target in each tensor), or exclude=[...] those tensors."
        )

    def end(
        self, trainer: Any, progress: Progress, guard: AccuracyGuard | None, monitor: str | None, interval: str
    ) -> None:
        """At the end of training, after its last update was reported: the guard's summary line, a warning when
        the schedule did not reach its final target (and why), and the plot."""
        for line in self.summary_lines(guard, monitor):
            rank_zero_info(f"{self.owner}: {line}")
        final = progress.final
        if progress.target < final and not (guard is not None and guard.rolled_back):  # a rollback was warned of
            why = report.why_training_stopped(trainer) or "training ended before the schedule did"
            if guard is not None and guard.held:
                why += f" (the accuracy guard held {guard.held} update(s))"
            reached = self.entries[-1]["sparsity"]
            rank_zero_warn(unfinished_warning(self.owner, reached, final, why, interval, progress.end))
        self.last_epoch = self.entries[-1]["epoch"]

    def summary_lines(self, guard: AccuracyGuard | None, monitor: str | None) -> list[str]:
        """The accuracy guard's baseline, budget, last value, held updates and rollback, when it is on."""
        if guard is None:
            return []
        reached = f"; sparsity reached {self.entries[-1]['sparsity']:.2%}" if self.entries else ""
        return [guard.describe(monitor) + reached]

    def write_plot(self, trainer: Any, guard: AccuracyGuard | None, max_drop: float | None, **extras: Any) -> None:
        """``sparsity.png`` (and the TensorBoard figure) from this history, with the guard's baseline and budget
        once it has a baseline, else the last dense value (:func:`lightning_compress.report.write_schedule_plot`;
        ``extras``: ``mode``, ``quantized``)."""
        guarded = guard is not None and guard.baseline is not None
        report.write_schedule_plot(
            trainer,
            self.entries,
            self.monitored,
            self.monitor_key,
            baseline=guard.baseline if guarded else self.dense_value,
            max_drop=max_drop if guarded else None,
            last_epoch=self.last_epoch,
            **extras,
        )


def sparsity_metrics(measured: Sparsity) -> dict[str, float]:
    """``pruning/sparsity`` and ``pruning/sparsity/<name>``."""
    return {report.SPARSITY: measured.overall, **{report.SPARSITY_PREFIX + n: v for n, v in measured.by_name.items()}}


def metrics(measured: Sparsity, target: float, coverage: float, guard: AccuracyGuard | None) -> dict[str, float]:
    """What is logged at an update and at the end of training (:mod:`lightning_compress.report`'s keys)."""
    found = sparsity_metrics(measured)
    found[report.TARGET] = target
    found[report.COVERAGE] = coverage
    if guard is not None:
        found[report.GUARD_HELD] = float(guard.held)
        found[report.GUARD_ROLLED_BACK] = float(guard.rolled_back)
    return found


def selection_line(owner: str, pruner: Pruner, coverage: float, unselected: list[tuple[str, int]]) -> str:
    """What is pruned, said once at the first update: weights, tensors, coverage, the largest left out."""
    listed = ", ".join(f"{name} ({numel:,})" for name, numel in unselected) or "none"
    return (
        f"{owner} prunes {pruner.total:,} weights in {len(pruner.names)} tensors: {coverage:.1%} of the entries of "
        f"the model's weight matrices (parameters with 2+ dimensions). Largest not pruned: {listed}"
    )


def update_line(owner: str, when: str, target: float, sparsity: float, pruner: Pruner) -> str:
    return (
        f"{owner} [{when}]: target sparsity {target:.2%}, measured {sparsity:.2%} of {pruner.total:,} weights in "
        f"{len(pruner.names)} tensors"
    )


def held_line(
    owner: str, when: str, guard: AccuracyGuard, monitor: str, max_drop: float, held: float, retried: float
) -> str:
    """An update the accuracy guard held, and why."""
    if guard.baseline is None:
        why = f"no validation has measured the dense model's {monitor} yet (the baseline)"
    else:
        why = (
            f"{monitor}={guard.latest:.4f} is outside the budget (baseline {guard.baseline:.4f}, max_drop {max_drop:g})"
        )
    return f"{owner} [{when}]: {why}: holding at {held:.2%}, retrying {retried:.2%} at the next update"


def rolled_back_warning(
    owner: str, guard: AccuracyGuard, monitor: str, max_drop: float, patience: int, target: float, restored: bool
) -> str:
    """The accuracy guard rolled back (``restored``: to a snapshot; else nothing had been raised in this fit)."""
    what = (
        f"rolled back to the weights and masks of the last update within budget ({target:.2%} sparsity)"
        if restored
        else "no update had raised the sparsity in this fit, so the weights stay as they are"
    )
    return (
        f"{owner}: {monitor} stayed outside the budget for {patience} validation(s) (last {guard.latest:.4f}, "
        f"baseline {guard.baseline:.4f}, max_drop {max_drop:g}): {what}, and sparsity is raised no more in this fit."
    )


def unfinished_warning(owner: str, reached: float, final: float, why: str, interval: str, end: int) -> str:
    """Training ended before the schedule reached its final target."""
    article = "an" if interval[0] in "aeiou" else "a"
    return (
        f"{owner} reached {reached:.2%} sparsity, not the final target {final:.2%}: {why}. The schedule ends at "
        f"{interval} {end}; set `end` to {article} {interval} that training reaches (e.g. well before EarlyStopping "
        "can stop it, or raise EarlyStopping's patience), so the model ends at the sparsity you asked for."
    )
