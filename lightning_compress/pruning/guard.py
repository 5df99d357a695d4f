"""The accuracy guard: raise sparsity only while a monitored validation metric stays within a budget of the dense
baseline. A pure state machine, usable and testable without a Trainer; ``MagnitudePruning`` feeds it each
validation's value and asks it, at each scheduled update that would raise the sparsity, what to do.

Rules, for ``mode="max"`` (``"min"`` mirrors them):

* baseline: the best value observed before pruning starts (or a value given up front);
* within budget: ``value >= baseline - max_drop``;
* at an update: within budget, raise the sparsity; outside, hold (the update is retried at the next scheduled
  index); after ``patience`` consecutive validations outside the budget, roll back to the last state seen within
  it and raise no more for the rest of training;
* validations keep being judged once pruning has started, also at scheduled indices after the schedule is done
  and at the end of training, so that the last raise can be rolled back too;
* an update that would raise the sparsity before any validation has set the baseline is held until one has;
* a rollback before any raise (the dense model already outside the budget) leaves the weights as they are.

:class:`GuardedSchedule` applies these decisions to weights and masks: it consumes the schedule's targets in
order and keeps the :class:`Snapshot` of the last state within budget. Every sequence of validations, updates,
checkpoint round trips and ends of training leaves it in a defined state (``tests/test_guard_states.py`` drives
it with generated sequences against an independent model).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_compress.pruning import masks as mask_engine

RAISE, HOLD, ROLL_BACK, STOP = "raise", "hold", "roll back", "stop"
Decision = Literal["raise", "hold", "roll back", "stop"]


@dataclasses.dataclass
class AccuracyGuard:
    """See the module docstring. ``held`` counts held updates, ``streak`` consecutive out-of-budget validations."""

    max_drop: float
    mode: Literal["max", "min"] = "max"
    patience: int = 1
    baseline: float | None = None
    latest: float | None = None
    validations: int = 0
    held: int = 0
    streak: int = 0
    judged: int = -1
    rolled_back: bool = False
    pruning_started: bool = False
    fixed_baseline: bool = False

    def __post_init__(self) -> None:
        if not _is_number(self.max_drop) or not 0 <= self.max_drop < math.inf:
            raise ValueError(
                f"`max_drop` must be a number >= 0 and finite, in the metric's own units, got {self.max_drop!r}"
            )
        if self.mode not in ("max", "min"):
            raise ValueError(f"`mode` must be one of ['max', 'min'], got {self.mode!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"`patience` must be an integer >= 1, got {self.patience!r}")
        if self.baseline is not None:
            if not _is_number(self.baseline) or not math.isfinite(self.baseline):
                raise ValueError(
                    f"`baseline` must be None or a number, a finite one (None: the best validation before pruning "
                    f"starts), got {self.baseline!r}: a NaN or infinite baseline would hold every update"
                )
            self.fixed_baseline = True

    def observe(self, value: float) -> None:
        """Record one validation's value; before pruning starts it may become the baseline (the best seen). A NaN or
        infinite value is out of any budget (and the worst baseline); ``latest`` keeps it as it was, for messages."""
        self.latest = value
        self.validations += 1
        if not math.isfinite(value):
            value = -math.inf if self.mode == "max" else math.inf
        if not self.pruning_started and not self.fixed_baseline:
            better = max if self.mode == "max" else min
            self.baseline = value if self.baseline is None else better(self.baseline, value)

    def within_budget(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.mode == "max":
            return value >= self.baseline - self.max_drop
        return value <= self.baseline + self.max_drop

    def decide(self, wants_to_raise: bool = True) -> Decision:
        """What to do at a scheduled update (``wants_to_raise``: its target is above the current sparsity) or at
        another moment to judge the latest validation (the schedule done, the end of training).

        ``RAISE`` means go ahead (raise, or carry on); ``HOLD`` keep the sparsity; ``ROLL_BACK`` restore the last
        state within budget; ``STOP`` nothing more to do (rolled back already).
        """
        if self.rolled_back:
            return STOP
        if not wants_to_raise and not self.pruning_started:
            return RAISE  # nothing pruned yet: nothing to judge
        if self.baseline is None:
            if not wants_to_raise:
                return RAISE
            self.held += 1  # no validation of the dense model yet: wait for one before pruning anything
            return HOLD
        self.pruning_started = True
        if self.latest is None or self.within_budget(self.latest):
            self.streak = 0
            return RAISE
        if self.judged != self.validations:  # each validation counts once, however many updates it sees
            self.judged = self.validations
            self.streak += 1
        if wants_to_raise:
            self.held += 1
        if self.streak >= self.patience:
            self.rolled_back = True
            return ROLL_BACK
        return HOLD

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in dataclasses.fields(self):
            if field.name in state and field.name not in ("max_drop", "mode", "patience"):
                setattr(self, field.name, state[field.name])

    def describe(self, monitor: str) -> str:
        """One line for summaries: baseline, budget, latest value, held updates, rollback."""
        sign = "-" if self.mode == "max" else "+"
        baseline = f"{self.baseline:.4f}" if self.baseline is not None else "none"
        latest = f"{self.latest:.4f}" if self.latest is not None else "none"
        outcome = "rolled back" if self.rolled_back else ("held" if self.held else "never held")
        return (
            f"accuracy guard on {monitor} ({self.mode}): baseline {baseline}, budget {sign}{self.max_drop:g}, last "
            f"validation {latest}; {self.held} update(s) held, {outcome}"
        )


@dataclasses.dataclass
class Snapshot:
    """The weights and masks of a state validated within budget, on the CPU: the kept values only once more than
    half is pruned (a sparse copy costs more than a dense one below that). ``target``: that state's target sparsity.
    """

    keep: list[Tensor]
    values: list[Tensor]
    sparse: bool
    target: float

    @classmethod
    def take(cls, weights: Sequence[Tensor], masks: Sequence[Tensor], target: float) -> Snapshot:
        keep = [(m != 0).cpu() for m in masks]
        total = sum(k.numel() for k in keep)
        sparse = total > 0 and sum(int((~k).sum()) for k in keep) / total > 0.5
        values = [
            w.detach()[k.to(w.device)].cpu() if sparse else w.detach().cpu().clone() for w, k in zip(weights, keep)
        ]
        return cls(keep, values, sparse, float(target))

    @torch.no_grad()
    def restore(self, weights: Sequence[Tensor], masks: list[Tensor]) -> None:
        """Write the snapshot back into ``weights`` (in place) and replace the items of ``masks``."""
        for i, (w, keep, values) in enumerate(zip(weights, self.keep, self.values)):
            if self.sparse:
                w.zero_()
                w[keep.to(w.device)] = values.to(device=w.device, dtype=w.dtype)
            else:
                w.copy_(values)
            masks[i] = mask_engine.mask_from_bool(keep, w)
        mask_engine.apply_masks(weights, masks)

    def state_dict(self, names: Sequence[str]) -> dict[str, Any]:
        return {
            "keep": dict(zip(names, self.keep)),
            "values": dict(zip(names, self.values)),
            "sparse": self.sparse,
            "target": self.target,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], names: Sequence[str]) -> Snapshot:
        missing = [n for n in names if n not in state["keep"]]
        if missing:
            raise ValueError(f"The checkpoint's accuracy-guard snapshot has no weights for {missing}")
        return cls(
            [state["keep"][n] for n in names], [state["values"][n] for n in names], state["sparse"], state["target"]
        )


class GuardedSchedule:
    """The schedule's targets, raised one at a time in order while an :class:`AccuracyGuard` allows, with the
    :class:`Snapshot` of the last state within budget to roll back to.

    Args:
        guard: the guard, fed every validation's value by the caller (:meth:`AccuracyGuard.observe`).
        targets: the target sparsity at each scheduled update, in order.

    ``target`` is the target the masks were last grown to (or restored to by a rollback); ``position`` how many
    targets were raised; ``snapshot`` the state before the last raise, ``None`` before any raise of this fit.
    """

    def __init__(self, guard: AccuracyGuard, targets: Sequence[float]) -> None:
        self.guard = guard
        self.targets = [float(t) for t in targets]
        self.position = 0
        self.target = 0.0
        self.snapshot: Snapshot | None = None

    @property
    def next_target(self) -> float:
        """The target the next update tries: the next one of the schedule, or the current once it is done."""
        return self.targets[self.position] if self.position < len(self.targets) else self.target

    def update(self, weights: Sequence[Tensor], masks: list[Tensor], grow: Callable[[float], None]) -> Decision | None:
        """At a scheduled update: ask the guard, then raise (``grow(target)`` grows and applies the masks), hold, or
        roll back. Returns the decision, or ``None`` when nothing changed and nothing needs saying (the schedule is
        done and within budget, or rolled back already)."""
        done = self.position >= len(self.targets)
        target = self.next_target
        decision = self.guard.decide(wants_to_raise=target > self.target)
        if decision == STOP or (done and decision in (RAISE, HOLD)):
            return None
        if decision == RAISE:
            if target > self.target:
                self.snapshot = Snapshot.take(weights, masks, self.target)
            grow(target)
            self.target = max(self.target, target)  # masks never regrow
            self.position += 1
        elif decision == ROLL_BACK:
            self.roll_back(weights, masks)
        return decision

    def end(self, weights: Sequence[Tensor], masks: list[Tensor]) -> bool:
        """At the end of training: roll back if the last validation broke the budget. Returns whether it did."""
        if self.guard.decide(wants_to_raise=False) != ROLL_BACK:
            return False
        self.roll_back(weights, masks)
        return True

    def roll_back(self, weights: Sequence[Tensor], masks: list[Tensor]) -> None:
        """Restore the snapshot; before any raise of this fit there is none, and the weights stay as they are."""
        if self.snapshot is not None:
            self.snapshot.restore(weights, masks)
            self.target = self.snapshot.target

    def state_dict(self, names: Sequence[str]) -> dict[str, Any]:
        return {
            "guard": self.guard.state_dict(),
            "position": self.position,
            "last_target": self.target,
            "snapshot": self.snapshot.state_dict(names) if self.snapshot is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], names: Sequence[str]) -> None:
        """Restore what :meth:`state_dict` saved (each key optional: a checkpoint saved without a guard has none)."""
        if state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])
        self.position = int(state.get("position") or 0)
        self.target = float(state.get("last_target") or 0.0)
        snapshot = state.get("snapshot")
        self.snapshot = Snapshot.from_state_dict(snapshot, names) if snapshot is not None else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
