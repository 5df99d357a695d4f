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
  and at the end of training, so that the last raise can be rolled back too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

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
        if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float)) or not self.max_drop >= 0:
            raise ValueError(f"`max_drop` must be a number >= 0 in the metric's own units, got {self.max_drop!r}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"`mode` must be one of ['max', 'min'], got {self.mode!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"`patience` must be an integer >= 1, got {self.patience!r}")
        if self.baseline is not None:
            if isinstance(self.baseline, bool) or not isinstance(self.baseline, (int, float)):
                raise ValueError(f"`baseline` must be None or a number, got {self.baseline!r}")
            self.fixed_baseline = True

    def observe(self, value: float) -> None:
        """Record one validation's value; before pruning starts it may become the baseline (the best seen)."""
        if not math.isfinite(value):
            value = -math.inf if self.mode == "max" else math.inf
        self.latest = value
        self.validations += 1
        if not self.pruning_started and not self.fixed_baseline:
            better = max if self.mode == "max" else min
            self.baseline = value if self.baseline is None else better(self.baseline, value)

    def within_budget(self, value: float) -> bool:
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
            raise ValueError(
                "MagnitudePruning(max_drop=...) needs a dense baseline before it prunes anything, but no validation "
                "has run yet. Let validation run before the first pruning update (`start >= 1`, or a schedule whose "
                "first target is 0), or pass `baseline=`."
            )
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
