"""Sparsity schedules: a pure mapping from an epoch (or step) index to a target sparsity.

Every named schedule has the form ``target(i) = amount * f(p)`` with the progress
``p = clamp((i - start) / (end - start), 0, 1)`` for ``i >= start`` and ``target(i) = 0`` before ``start``
(when ``end == start``, ``p = 1`` from ``start`` on):

* ``constant``:    ``f(p) = 1``
* ``linear``:      ``f(p) = p``
* ``cubic``:       ``f(p) = 1 - (1 - p)^3``  (Zhu & Gupta, 2017, "To prune or not to prune", eq. 1)
* ``exponential``: ``amount * f(p) = 1 - (1 - amount)^p``, i.e. the density ``1 - target`` decays geometrically
  from 1 to ``1 - amount``: every equal step of progress removes the same fraction of the weights that
  are still alive (the rule behind iterative magnitude pruning at a fixed rate per round).

:func:`update_indices` lists the epochs (or steps) at which masks are updated, and :func:`check_values` evaluates a
callable schedule at each of them before training. This module knows nothing of Lightning or tensors.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

ScheduleFn = Callable[[int], float]
Schedule = str | ScheduleFn


def _constant(p: float, amount: float) -> float:
    return amount


def _linear(p: float, amount: float) -> float:
    return amount * p


def _cubic(p: float, amount: float) -> float:
    return amount * (1.0 - (1.0 - p) ** 3)


def _exponential(p: float, amount: float) -> float:
    return 1.0 - (1.0 - amount) ** p


SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "constant": _constant,
    "linear": _linear,
    "cubic": _cubic,
    "exponential": _exponential,
}


def progress(index: int, start: int, end: int) -> float:
    """``clamp((index - start) / (end - start), 0, 1)``; 1 from ``start`` on when ``end == start``."""
    if end <= start:
        return 1.0 if index >= start else 0.0
    return min(max((index - start) / (end - start), 0.0), 1.0)


def target_sparsity(schedule: Schedule, index: int, amount: float, start: int, end: int) -> float:
    """The scheduled target sparsity at ``index`` (an epoch or a step).

    A callable schedule receives the index and returns the target directly; ``amount``, ``start`` and
    ``end`` are then ignored here (the callback still uses them to decide when masks are updated).
    """
    if callable(schedule):
        return float(schedule(index))
    if index < start:
        return 0.0
    return SCHEDULES[schedule](progress(index, start, end), amount)


def is_update_index(index: int, start: int, end: int, frequency: int) -> bool:
    """Whether masks are updated at ``index``: every ``frequency`` from ``start`` to ``end``, ``end`` always."""
    if index < start or index > end:
        return False
    return (index - start) % frequency == 0 or index == end


def validate_schedule(schedule: object) -> Schedule:
    """Return ``schedule`` if it is a known name or a callable, else raise a ``ValueError`` naming the options."""
    if callable(schedule):
        return schedule  # type: ignore[return-value]
    if isinstance(schedule, str) and schedule in SCHEDULES:
        return schedule
    raise ValueError(
        f"`schedule` must be one of {sorted(SCHEDULES)} or a callable(index: int) -> sparsity, got {schedule!r}"
    )


def update_indices(start: int, end: int, frequency: int) -> list[int]:
    """The epochs (or steps) from ``start`` to ``end`` at which masks are updated (see :func:`is_update_index`)."""
    return [i for i in range(start, end + 1) if is_update_index(i, start, end, frequency)]


def check_values(schedule: Schedule, indices: list[int], interval: str) -> None:
    """Evaluate a callable ``schedule`` at every update index now, so that a bad value fails before training."""
    if not callable(schedule):
        return
    for index in indices:
        value = schedule(index)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
            raise ValueError(f"`schedule` returned {value!r} for {interval} {index}; it must return a number in [0, 1)")
