"""The arguments of the pruning callbacks, checked once, as torchao checks its configs: small dataclasses that
validate themselves in ``__post_init__`` and raise a ``ValueError`` naming the argument and what it accepts.

One per concept, so that a callback takes the ones it needs: when and how much (:class:`ScheduleConfig`), which
parameters (:class:`SelectionConfig`), the accuracy guard (:class:`GuardConfig`), how ``MagnitudePruning``
scores weights (:class:`MagnitudeConfig`) and how ``MovementPruning`` prunes (:class:`MovementConfig`). The callbacks
keep flat, type-hinted constructor arguments (LightningCLI reads their signatures) and build these. Knows nothing
of tensors or Lightning.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from lightning_compress.pruning.guard import AccuracyGuard
from lightning_compress.pruning.schedules import validate_schedule

METHODS = ("l1_unstructured", "random_unstructured", "ln_structured")
SCOPES = ("global", "layerwise")
INTERVALS = ("epoch", "step")
STRUCTURES = ("tensor", "groups")


def is_int(value: object) -> bool:
    """An integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")


@dataclasses.dataclass
class ScheduleConfig:
    """When and how much: the target sparsity ``amount`` reached by ``schedule`` from ``start`` to ``end`` (``None``:
    the end of training), updated every ``frequency`` epochs or steps (``interval``)."""

    amount: float = 0.5
    schedule: Callable[[int], float] | str = "cubic"
    start: int = 0
    end: int | None = None
    interval: str = "epoch"
    frequency: int = 1

    def __post_init__(self) -> None:
        amount = self.amount
        if isinstance(amount, bool) or not isinstance(amount, numbers.Real) or not 0 <= amount < 1:
            raise ValueError(f"`amount` must be a number in [0, 1), got {amount!r}")
        self.amount = float(amount)
        self.schedule = validate_schedule(self.schedule)
        if not is_int(self.start) or self.start < 0:
            raise ValueError(f"`start` must be an integer >= 0, got {self.start!r}")
        if self.end is not None and (not is_int(self.end) or self.end < self.start):
            raise ValueError(f"`end` must be None or an integer >= start ({self.start}), got {self.end!r}")
        if self.interval not in INTERVALS:
            raise ValueError(f"`interval` must be one of {list(INTERVALS)}, got {self.interval!r}")
        if not is_int(self.frequency) or self.frequency < 1:
            raise ValueError(f"`frequency` must be an integer >= 1, got {self.frequency!r}")
        self.start, self.frequency = int(self.start), int(self.frequency)


@dataclasses.dataclass
class SelectionConfig:
    """Which parameters (see :func:`lightning_compress.pruning.selection.select_parameters`); one pattern or one
    type may be given alone."""

    parameters: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    modules: Sequence[type[nn.Module]] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.parameters, str):
            self.parameters = [self.parameters]
        if self.parameters is not None and not all(isinstance(p, str) for p in self.parameters):
            raise ValueError(f"`parameters` must be None or a list of glob patterns (str), got {self.parameters!r}")
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        if not all(isinstance(p, str) for p in self.exclude):
            raise ValueError(f"`exclude` must be a list of glob patterns (str), got {self.exclude!r}")
        if isinstance(self.modules, type):
            self.modules = [self.modules]
        modules = self.modules
        if modules is not None and (
            not modules or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in modules)
        ):
            raise ValueError(f"`modules` must be None or a non-empty list of torch.nn.Module types, got {modules!r}")
        self.parameters = list(self.parameters) if self.parameters is not None else None
        self.exclude = list(self.exclude)
        self.modules = list(modules) if modules is not None else None


@dataclasses.dataclass
class GuardConfig:
    """The accuracy guard (see :mod:`lightning_compress.pruning.guard`): on with ``max_drop``, which needs
    ``monitor``; ``monitor`` alone only names the metric the plot draws."""

    monitor: str | None = None
    mode: str = "max"
    max_drop: float | None = None
    patience: int = 1
    baseline: float | None = None

    def __post_init__(self) -> None:
        if self.monitor is not None and (not isinstance(self.monitor, str) or not self.monitor):
            raise ValueError(
                f"`monitor` must be None or the name of a metric logged in validation, got {self.monitor!r}"
            )
        if self.max_drop is not None and self.monitor is None:
            raise ValueError("`max_drop` needs `monitor`: the validation metric whose drop it bounds, e.g. 'val_acc'")
        self.new_guard()  # checks max_drop, mode, patience and baseline

    def new_guard(self) -> AccuracyGuard | None:
        """A fresh guard (one for each fit), or ``None`` without ``max_drop``."""
        guard = AccuracyGuard(0.0 if self.max_drop is None else self.max_drop, self.mode, self.patience, self.baseline)
        return guard if self.max_drop is not None else None


@dataclasses.dataclass
class MagnitudeConfig:
    """How ``MagnitudePruning`` scores weights: ``method``, ``scope`` (``None``: global for unstructured methods,
    layerwise for ``ln_structured``), ``norm``, ``dim``, ``structure`` and the ``seed`` of random scores."""

    method: str = "l1_unstructured"
    scope: str | None = None
    norm: float = 2
    dim: int = 0
    structure: str = "tensor"
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {list(METHODS)}, got {self.method!r}")
        if self.scope is not None and self.scope not in SCOPES:
            raise ValueError(f"`scope` must be None or one of {list(SCOPES)}, got {self.scope!r}")
        if self.method == "ln_structured" and self.scope == "global":
            raise ValueError(
                "`scope='global'` is not supported with `method='ln_structured'`: structured pruning is layerwise. "
                "Use scope=None or scope='layerwise'."
            )
        norm = self.norm
        if isinstance(norm, bool) or not isinstance(norm, numbers.Real) or not norm > 0:
            raise ValueError(f"`norm` must be a number > 0 (math.inf allowed), got {norm!r}")
        if not is_int(self.dim):
            raise ValueError(f"`dim` must be an integer, got {self.dim!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"`seed` must be None or an integer, got {self.seed!r}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"`structure` must be one of {list(STRUCTURES)}, got {self.structure!r}")
        if self.structure == "groups" and (self.method != "ln_structured" or self.dim != 0):
            raise ValueError(
                "`structure='groups'` prunes whole output channels: it needs `method='ln_structured'` and `dim=0`, got "
                f"method={self.method!r}, dim={self.dim!r}"
            )
        self.scope = self.scope or ("layerwise" if self.method == "ln_structured" else "global")
        self.norm, self.dim = float(norm), int(self.dim)


@dataclasses.dataclass
class MovementConfig:
    """How ``MovementPruning`` prunes: unstructured, with one threshold over all selected weights (``"global"``) or
    the target in each tensor (``"layerwise"``)."""

    scope: str = "global"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(
                f"`scope` must be one of {list(SCOPES)}, got {self.scope!r} (movement pruning is unstructured)"
            )


def fields_of(*configs: Any) -> dict[str, Any]:
    """The fields of ``configs`` by name: the checked arguments, as a callback's attributes."""
    return {f.name: getattr(c, f.name) for c in configs for f in dataclasses.fields(c)}
