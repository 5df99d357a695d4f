"""Where a pruning run is in its schedule: at which epochs (or steps) the masks grow and to which target, the last
update done and its target, and, with an accuracy guard, the guarded schedule that raises the targets one by one
(:class:`lightning_compress.pruning.guard.GuardedSchedule`).

The callback feeds :meth:`Progress.step` the current index at each epoch (or batch) start; the masks are grown by
the function it passes. Knows nothing of Lightning, scores or how masks are computed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_compress.pruning.guard import RAISE, AccuracyGuard, Decision, GuardedSchedule
from lightning_compress.pruning.schedules import Schedule, is_update_index, target_sparsity, update_indices

if TYPE_CHECKING:
    from lightning_compress.pruning.pruner import Pruner


class Progress:
    """A schedule's updates from ``start`` to the resolved ``end`` (every ``frequency``; ``end`` always), the
    last one done (``last_index``, ``target``), and the ``guarded`` schedule when there is a ``guard``.

    ``last_index`` and ``target`` are where a resumed run left off (``None`` and 0 for a new fit).
    """

    def __init__(
        self,
        schedule: Schedule,
        amount: float,
        start: int,
        end: int,
        frequency: int,
        guard: AccuracyGuard | None = None,
        last_index: int | None = None,
        target: float = 0.0,
    ) -> None:
        self.schedule, self.amount, self.start, self.end, self.frequency = schedule, amount, start, end, frequency
        self.last_index, self.target = last_index, target
        self.indices = update_indices(start, end, frequency)
        self.guarded: GuardedSchedule | None = None
        if guard is not None:
            self.guarded = GuardedSchedule(guard, [self.target_at(i) for i in self.indices])
            self.guarded.target = target

    def target_at(self, index: int) -> float:
        return target_sparsity(self.schedule, index, self.amount, self.start, self.end)

    @property
    def final(self) -> float:
        """The target at ``end``."""
        return self.target_at(self.end)

    def first_raise(self) -> int | None:
        """The first update whose target is above 0."""
        return next((i for i in self.indices if self.target_at(i) > 0), None)

    def step(self, index: int, pruner: Pruner, grow: Callable[[float], None]) -> Decision | None:
        """At epoch (or step) ``index``: grow ``pruner``'s masks when an update is due (``grow(target)`` grows and
        applies them), through the guard when there is one (which may restore the pruner's weights and masks). Returns
        ``None`` when nothing happened or needs saying, else the guard's
        :data:`~lightning_compress.pruning.guard.Decision` (``RAISE`` without a guard).

        With a guard, held updates are retried at the next scheduled index, after ``end`` too (every
        ``frequency``), until the schedule is done or rolled back.
        """
        due = is_update_index(index, self.start, self.end, self.frequency)
        if self.guarded is not None:
            due = due or (index > self.end and (index - self.start) % self.frequency == 0)
        if index == self.last_index or not due:
            return None
        self.last_index = index
        if self.guarded is None:
            self.target = self.target_at(index)
            grow(self.target)
            return RAISE
        decision = self.guarded.update(pruner.weights(), pruner.mask_tensors, grow)
        self.target = self.guarded.target
        return decision

    def end_of_training(self, weights: Sequence[Tensor], masks: list[Tensor]) -> bool:
        """With a guard, roll back if the last validation broke the budget; returns whether it did."""
        if self.guarded is None or not self.guarded.end(weights, masks):
            return False
        self.target = self.guarded.target
        return True

    def resume_guard(self, saved: Mapping[str, Any], names: Sequence[str]) -> None:
        """Continue the guarded schedule of a checkpoint (one saved without a guard: the targets up to its last
        update are done)."""
        saved = dict(saved)
        if saved.get("guard") is None:
            saved["position"] = sum(1 for i in self.indices if self.last_index is not None and i <= self.last_index)
        self.guarded.load_state_dict({**saved, "last_target": self.target}, names)

    def state_dict(self, names: Sequence[str]) -> dict[str, Any]:
        """``last_index``, ``last_target`` and the guarded schedule's ``guard``, ``position`` and ``snapshot``."""
        saved: dict[str, Any] = {"last_index": self.last_index, "guard": None, "position": 0, "snapshot": None}
        if self.guarded is not None:
            saved.update(self.guarded.state_dict(names))
        saved["last_target"] = self.target
        return saved
