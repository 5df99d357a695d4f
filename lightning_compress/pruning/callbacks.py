"""The pruning callbacks users add to a ``Trainer``: when masks grow, from which hook, and what is logged.

:class:`ScheduledPruning` holds what every pruning callback shares: it selects the parameters after
``configure_model``, builds a :class:`~lightning_compress.pruning.pruner.Pruner` when training starts, grows its masks
at each scheduled epoch or step (through the accuracy guard when there is one), applies them after every optimizer
step, logs and plots what it measured, checkpoints, and makes the masks permanent at the end. How weights are scored
is a subclass's: :class:`MagnitudePruning` (magnitude, random, Ln norms of slices or of coupled channel groups). The
masks, scores and thresholds are computed elsewhere (:mod:`.pruner`, :mod:`.scores`, :mod:`.masks`); this module
knows nothing of how.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_compress import compat, report
from lightning_compress.pruning import sharding, state
from lightning_compress.pruning.config import (
    GuardConfig,
    MagnitudeConfig,
    ScheduleConfig,
    SelectionConfig,
    check_flag,
    fields_of,
)
from lightning_compress.pruning.groups import select_groups
from lightning_compress.pruning.guard import HOLD, ROLL_BACK, AccuracyGuard, GuardedSchedule
from lightning_compress.pruning.history import History
from lightning_compress.pruning.masks import apply_masks
from lightning_compress.pruning.pruner import Pruner
from lightning_compress.pruning.schedules import check_values, is_update_index, target_sparsity, update_indices
from lightning_compress.pruning.scores import (
    GroupScore,
    LnStructuredScore,
    MagnitudeScore,
    RandomScore,
    Score,
    check_slices,
    storage_dims,
)
from lightning_compress.pruning.selection import largest_unselected, matrix_numel, parameter_aliases, select_parameters


class ScheduledPruning(Callback):
    """Scheduled, growing-only pruning while training, whatever the score (see the module docstring).

    Subclasses build the configs from their flat arguments and implement :meth:`_make_score`; they may refine the
    selection (:meth:`_prepare_selection`), name what they cannot do under sharding (:meth:`_unsupported_when_sharded`)
    and list the settings a checkpoint remembers (``_SETTINGS``). ``scope`` is ``"global"`` or ``"layerwise"``.
    """

    _SETTINGS: tuple[str, ...] = (
        "amount",
        "schedule",
        "start",
        "end",
        "interval",
        "frequency",
        "scope",
        "monitor",
        "mode",
        "max_drop",
        "patience",
    )

    def __init__(
        self, schedule: ScheduleConfig, selection: SelectionConfig, guard: GuardConfig, scope: str, make_permanent: bool
    ) -> None:
        super().__init__()
        check_flag("make_permanent", make_permanent)
        for name, value in fields_of(schedule, selection, guard).items():  # the checked arguments, as attributes
            setattr(self, name, value)
        self.scope = scope
        self.make_permanent = make_permanent
        self._guard_config = guard
        self._guard = guard.new_guard()  # a fresh one for each fit (on_train_start)
        self._guarded: GuardedSchedule | None = None  # with the guard: the schedule's targets, raised one by one
        self._names: list[str] = []
        self._aliases: dict[str, list[str]] = {}
        self._coverage = float("nan")
        self._unselected: list[tuple[str, int]] = []
        self._pruner: Pruner | None = None
        self._fsdp_modules: list[nn.Module] = []
        self._last_index: int | None = None
        self._last_target = 0.0
        self._resolved_end: int | None = None
        self._pending_state: dict[str, Any] | None = None
        self._hook_handles: list[Any] = []
        self._history = History()

    # ------------------------------------------------------------------ what a subclass says
    def _make_score(self) -> Score:
        """The score of the pruner built when training starts."""
        raise NotImplementedError

    def _prepare_selection(
        self, pl_module: pl.LightningModule, selected: dict[str, Tensor]
    ) -> tuple[list[str], dict[str, Tensor]]:
        """The names the pruner masks, and the selected weights the target and coverage count (the same, unless
        the score prunes parameters coupled to the selected ones)."""
        return list(selected), selected

    def _unsupported_when_sharded(self, trainer: pl.Trainer) -> dict[str, bool]:
        """What cannot run yet under ModelParallelStrategy, by the setting that asks for it."""
        averaging = [type(c).__name__ for c in trainer.callbacks if isinstance(c, compat.weight_averaging_callbacks())]
        return {
            f"max_drop={self.max_drop}": self.max_drop is not None,  # its snapshot is not gathered into checkpoints
            f"callbacks {averaging}": bool(averaging),  # they average full weights, not shards
        }

    def _setup_score(self, trainer: pl.Trainer) -> None:
        """What the score needs from the trainer before training (every rank alike)."""

    # ------------------------------------------------------------------ what users read
    @property
    def state_key(self) -> str:
        # What is pruned identifies an instance: two instances in one Trainer prune different parameters. The
        # amount, schedule and method are not part of it, so a run resumed with other values finds its masks.
        modules = [t.__qualname__ for t in self.modules] if self.modules is not None else None
        return self._generate_state_key(parameters=self.parameters, exclude=self.exclude, modules=modules)

    @property
    def parameter_names(self) -> list[str]:
        """Canonical names of the selected parameters (known from ``on_fit_start`` on)."""
        return list(self._names)

    @property
    def pruned_parameter_names(self) -> list[str]:
        """The :class:`lightning_compress.protocols.PruningCallback` contract: what ``DynamicQuantization``
        measures sparsity over."""
        return list(self._names)

    @property
    def selected_parameters(self) -> dict[str, Tensor]:
        """The selected parameters by canonical name (from ``on_train_start`` on); ``DTensor``s when sharded."""
        return self._pruner.parameters if self._pruner is not None else {}

    @property
    def masks(self) -> dict[str, Tensor]:
        """The current masks as bool tensors (True keeps a weight), empty when there are none.

        Under a sharded strategy, each is this process's shard (the rows of the parameter's local tensor); see
        :meth:`gathered_masks` for the full masks.
        """
        return self._pruner.masks if self._pruner is not None else {}

    def gathered_masks(self) -> dict[str, Tensor]:
        """The full masks as bool CPU tensors (True keeps), whether or not the parameters are sharded.

        Under a sharded strategy this gathers the shards: call it on every process, as any collective.
        """
        return self._pruner.gathered_masks() if self._pruner is not None else {}

    @property
    def pruner(self) -> Pruner | None:
        """The :class:`~lightning_compress.pruning.pruner.Pruner` of the current fit (from ``on_train_start`` on)."""
        return self._pruner

    @property
    def schedule_end(self) -> int | None:
        """The epoch (or step) at which the schedule reaches its final target, resolved at ``on_train_start``."""
        return self._resolved_end

    @property
    def history(self) -> list[dict[str, float]]:
        """One entry per mask update and at the end of training: epoch, step, index, target, measured sparsity."""
        return list(self._history.entries)

    @property
    def guard(self) -> AccuracyGuard | None:
        """The accuracy guard (baseline, latest value, held updates, rollback), with ``max_drop``; else ``None``."""
        return self._guard

    @property
    def coverage(self) -> float:
        """Selected weights / entries of all the model's parameters with two or more dimensions."""
        return self._coverage

    @property
    def _name(self) -> str:
        """The class users know this callback by, in messages (a user's subclass of it keeps its name)."""
        return next(c.__name__ for c in type(self).__mro__ if c.__module__.startswith("lightning_compress."))

    # ------------------------------------------------------------------ setup: everything knowable up front
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # A checkpoint is restored after `setup`: state loaded by an earlier validate/test/predict never leaks in.
        self._pending_state = None
        if stage != "fit":
            return
        compat.require_supported_strategy(trainer, self._name)
        found = [setting for setting, present in self._unsupported_when_sharded(trainer).items() if present]
        if compat.is_sharded_strategy(trainer) and found:
            raise ValueError(
                f"{self._name} under {type(trainer.strategy).__name__} (sharded parameters) does not support "
                f"{', '.join(found)} yet. Remove them, or train with DDP or a single device."
            )
        if self.end is None and trainer.max_epochs in (None, -1) and trainer.max_steps == -1:
            raise ValueError(
                "`end=None` means the last epoch/step of training, but training is unbounded "
                "(max_epochs=-1 and no max_steps). Set `end`, max_epochs or max_steps."
            )
        self._setup_score(trainer)
        _run_after_weight_averaging(self, trainer)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks", {})
        if trainer.state.fn != "fit" or self.state_key in states:
            return
        prefix = type(self).__name__  # as the state key starts
        legacy = state.legacy_state(states, prefix, self.parameters, self.exclude, self.modules)
        if legacy is not None:
            self._pending_state = legacy
            return
        ours = {c.state_key for c in trainer.callbacks if isinstance(c, type(self))}
        foreign = state.foreign_keys(states, prefix, ours)
        if foreign:
            raise ValueError(
                f"The checkpoint holds pruning state for {foreign}, but this {self._name} is {self.state_key}: "
                "it selects other parameters, so the checkpoint's masks cannot be continued and its pruned weights "
                "would grow back. Resume with the same `parameters`, `exclude` and `modules`, or load the weights "
                "into the model yourself and start a new fit without `ckpt_path`."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After `configure_model`, so layers built there are selected; still before the first training step.
        selected = select_parameters(pl_module, self.parameters, self.exclude, self.modules)
        names, counted = self._prepare_selection(pl_module, selected)
        if self._names and self._names != names:
            self._pruner = None  # another model or selection: old masks do not apply
        self._names = names
        all_aliases = parameter_aliases(pl_module)
        self._aliases = {name: all_aliases[name] for name in names}
        matrices = matrix_numel(pl_module)
        self._coverage = sum(p.numel() for p in counted.values()) / matrices if matrices else float("nan")
        self._unselected = largest_unselected(pl_module, names)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fsdp_modules = sharding.fsdp_modules(pl_module)
        sharding.reshard(self._fsdp_modules)  # the sanity check's forward may have left them unsharded
        named = dict(pl_module.named_parameters())
        kept = self._pruner.mask_tensors if self._pruner is not None and self._pruner.has_masks else None
        self._pruner = Pruner({n: named[n] for n in self._names}, self._make_score(), self.scope, masks=kept)
        resumed, self._pending_state = self._pending_state, None
        if resumed is not None:
            self._restore(resumed)
        else:  # a new fit, not a resumed one: its schedule starts over (masks only grow)
            self._last_index = None
            self._last_target = 0.0
        self._history.new_fit(resumed is not None)
        self._pruner.start_masks()
        self._pruner.apply()
        self._history.pruned_any = self._pruner.measure().overall > 0
        self._resolved_end = self._resolve_end(trainer)
        check_values(self.schedule, self._scheduled_indices(), self.interval)
        if self._guard is not None:
            self._prepare_guard(trainer, resumed)
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._hook_handles.extend(self._pruner.attach(optimizer))

    def _prepare_guard(self, trainer: pl.Trainer, resumed: dict[str, Any] | None) -> None:
        """The schedule's targets in order under a guard: fresh for a new fit, the checkpoint's when resuming. Fail
        now if no baseline can exist before the first pruning update."""
        indices = self._scheduled_indices()
        targets = [target_sparsity(self.schedule, i, self.amount, self.start, self._resolved_end) for i in indices]
        self._guard = self._guard_config.new_guard()
        self._guarded = GuardedSchedule(self._guard, targets)
        self._guarded.target = self._last_target
        if resumed is not None:
            saved = dict(resumed)
            if saved.get("guard") is None:  # saved without a guard: the targets up to the last update are done
                saved["position"] = sum(1 for i in indices if self._last_index is not None and i <= self._last_index)
            self._guarded.load_state_dict({**saved, "last_target": self._last_target}, self._names)
        if self._guard.baseline is not None:
            return
        first = next((i for i, t in zip(indices, targets) if t > 0), None)
        if not compat.has_val_data(trainer) or first == 0:
            why = (
                "there is no validation data"
                if not compat.has_val_data(trainer)
                else (f"the first pruning update is at {self.interval} 0, before any validation")
            )
            raise ValueError(
                f"{self._name}(max_drop={self.max_drop}) needs a dense baseline of {self.monitor!r}, but {why}. "
                "Start pruning later (`start=1`: epoch 0 trains and validates the dense model), or pass `baseline=`."
            )

    def _resolve_end(self, trainer: pl.Trainer) -> int:
        last = _last_index_of_training(trainer, self.interval)
        end = self.end if self.end is not None else last
        if end is None:
            raise ValueError(
                f"`end=None` with interval={self.interval!r} needs a known length of training, but the number of "
                "optimizer steps is unbounded or unknown (max_time only, or a dataloader without length). Set `end`."
            )
        if last is not None and end > last:
            rank_zero_warn(
                f"{self._name}: the schedule ends at {self.interval} {end} but training ends at {self.interval} "
                f"{last}: the final sparsity {self.amount} will not be reached."
            )
        return end

    def _scheduled_indices(self) -> list[int]:
        return update_indices(self.start, self._resolved_end, self.frequency)

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch":
            self._maybe_update(trainer, trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.interval == "step":
            manual = not pl_module.automatic_optimization
            self._maybe_update(trainer, trainer.fit_loop.epoch_loop.total_batch_idx if manual else trainer.global_step)

    def _maybe_update(self, trainer: pl.Trainer, index: int) -> None:
        if self._guard is not None:
            self._maybe_guarded_update(trainer, index)
            return
        if index == self._last_index or not is_update_index(index, self.start, self._resolved_end, self.frequency):
            return
        target = target_sparsity(self.schedule, index, self.amount, self.start, self._resolved_end)
        self._update_masks(target)
        self._last_index = index
        self._last_target = target
        self._report(trainer, f"{self.interval} {index}", index)

    def _maybe_guarded_update(self, trainer: pl.Trainer, index: int) -> None:
        """The next target of the schedule, raised only while the guard allows; held ones are retried at the next
        scheduled index, after ``end`` too (every ``frequency``), until the schedule is done or rolled back."""
        scheduled = is_update_index(index, self.start, self._resolved_end, self.frequency) or (
            index > self._resolved_end and (index - self.start) % self.frequency == 0
        )
        if index == self._last_index or not scheduled:
            return
        self._last_index = index
        retried = self._guarded.next_target
        decision = self._guarded.update(self._pruner.weights(), self._pruner.mask_tensors, self._update_masks)
        self._last_target = self._guarded.target
        if decision is None:
            return
        if decision == HOLD:
            why = _held_because(self._guard, self.monitor, self.max_drop)
            rank_zero_info(
                f"{self._name} [{self.interval} {index}]: {why}: holding at {self._last_target:.2%}, retrying "
                f"{retried:.2%} at the next update"
            )
        elif decision == ROLL_BACK:
            self._warn_rolled_back()
        self._report(trainer, f"{self.interval} {index}", index)

    def _update_masks(self, target: float) -> None:
        """Grow the masks to ``target`` sparsity with the score and scope, and apply them."""
        self._pruner.update(target)
        # a module left unsharded by a forward without backward (validation) would run its stale unmasked copy
        sharding.reshard(self._fsdp_modules)

    def _warn_rolled_back(self) -> None:
        restored = (
            f"rolled back to the weights and masks of the last update within budget ({self._last_target:.2%} sparsity)"
            if self._guarded.snapshot is not None
            else "no update had raised the sparsity in this fit, so the weights stay as they are"
        )
        rank_zero_warn(
            f"{self._name}: {self.monitor} stayed outside the budget for {self.patience} validation(s) "
            f"(last {self._guard.latest:.4f}, baseline {self._guard.baseline:.4f}, max_drop {self.max_drop:g}): "
            f"{restored}, and sparsity is raised no more in this fit."
        )

    # ------------------------------------------------------------------ what is logged
    def measured_sparsity(self) -> dict[str, float]:
        """``pruning/sparsity`` and ``pruning/sparsity/<name>``: measured fractions of exact zeros."""
        measured = self._pruner.measure()
        return {
            report.SPARSITY: measured.overall,
            **{report.SPARSITY_PREFIX + n: v for n, v in measured.by_name.items()},
        }

    def _report(self, trainer: pl.Trainer, when: str, index: int | None) -> None:
        if index is not None and not self._history.entries:  # once, at the first update of the callback's life
            rank_zero_info(_selection_line(self._name, self._pruner, self._coverage, self._unselected))
        metrics = self.measured_sparsity()
        self._history.pruned_any = metrics[report.SPARSITY] > 0
        if index is not None and self.scope == "global":
            by_name = {n: metrics[report.SPARSITY_PREFIX + n] for n in self._names}
            warning = self._history.collapse_warning(self._name, by_name, self._last_target)
            if warning:
                rank_zero_warn(warning)
        metrics[report.TARGET] = self._last_target
        metrics[report.COVERAGE] = self._coverage
        if self._guard is not None:
            metrics[report.GUARD_HELD] = float(self._guard.held)
            metrics[report.GUARD_ROLLED_BACK] = float(self._guard.rolled_back)
        report.log_to_loggers(trainer, metrics)
        self._history.record(trainer, index, self._last_target, metrics[report.SPARSITY])
        rank_zero_info(
            f"{self._name} [{when}]: target sparsity {self._last_target:.2%}, measured "
            f"{metrics[report.SPARSITY]:.2%} of {self._pruner.total:,} weights in {len(self._names)} tensors"
        )

    # ------------------------------------------------------------------ validation: what the plot shows
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None and self.monitor not in trainer.callback_metrics:
            # at the first validation (the sanity check's, when there is one), before any weight is pruned
            raise ValueError(
                f"{self._name}(monitor={self.monitor!r}): the module's validation logged no such metric. "
                f"Logged: {sorted(trainer.callback_metrics)}"
            )
        if trainer.sanity_checking or self._pruner is None or not self._pruner.has_masks:
            return
        key = self.monitor or self._history.monitor_key or report.monitored_metric_name(trainer)
        value = trainer.callback_metrics.get(key) if key else None
        if value is None:
            return
        # every rank decides alike: rank zero's value, whether or not the metric was logged with sync_dist
        value = float(trainer.strategy.broadcast(float(value), src=0))
        self._history.observe(trainer.current_epoch, key, value)
        if self._guard is not None:
            self._guard.observe(value)

    # ------------------------------------------------------------------ end of training
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if self._pruner is None or not self._pruner.has_masks:
            return
        if self._guarded is not None and self._guarded.end(self._pruner.weights(), self._pruner.mask_tensors):
            self._last_target = self._guarded.target  # the last validation broke the budget: end within it
            self._warn_rolled_back()
        self._pruner.apply()  # after SWA/EMA wrote their averages (see setup)
        sharding.reshard(self._fsdp_modules)
        self._report(trainer, "end of training", None)
        for line in self.summary_lines():
            rank_zero_info(f"{self._name}: {line}")
        self._warn_if_schedule_unfinished(trainer)
        self._history.last_epoch = self._history.entries[-1]["epoch"]
        self._write_plot(trainer)
        if self.make_permanent:
            self._pruner.squash_mask()
            self._last_index = None

    def _write_plot(self, trainer: pl.Trainer, quantized: float | None = None) -> None:
        guarded = self._guard is not None and self._guard.baseline is not None
        baseline = self._guard.baseline if guarded else self._history.dense_value
        max_drop = self.max_drop if guarded else None
        self._history.write_plot(trainer, baseline, max_drop=max_drop, mode=self.mode, quantized=quantized)

    def redraw_plot(self, trainer: pl.Trainer, quantized: Mapping[str, float]) -> None:
        """Draw ``sparsity.png`` again with the monitored metric measured on the quantized model (the
        :class:`lightning_compress.protocols.QuantizedMetricsPlot` contract: ``DynamicQuantization`` calls it at the
        end of its fit-end work with its ``quantization/<metric>_after`` values, keyed by ``<metric>``)."""
        if not self._history.entries:
            return
        key = self._history.monitor_key
        self._write_plot(trainer, quantized.get(key) if key else None)

    def summary_lines(self) -> list[str]:
        """Lines for end-of-fit summaries (``DynamicQuantization``'s table includes them): the accuracy guard's
        baseline, budget, last value, held updates and rollback, when it is on."""
        if self._guard is None:
            return []
        entries = self._history.entries
        reached = f"; sparsity reached {entries[-1]['sparsity']:.2%}" if entries else ""
        return [self._guard.describe(self.monitor) + reached]

    def _warn_if_schedule_unfinished(self, trainer: pl.Trainer) -> None:
        final = target_sparsity(self.schedule, self._resolved_end, self.amount, self.start, self._resolved_end)
        if self._last_target >= final or (self._guard is not None and self._guard.rolled_back):
            return  # a rollback was warned about when it happened
        reached = self._history.entries[-1]["sparsity"]
        why = report.why_training_stopped(trainer) or "training ended before the schedule did"
        if self._guard is not None and self._guard.held:
            why += f" (the accuracy guard held {self._guard.held} update(s))"
        rank_zero_warn(
            f"{self._name} reached {reached:.2%} sparsity, not the final target {final:.2%}: {why}. The "
            f"schedule ends at {self.interval} {self._resolved_end}; set `end` to a {self.interval} that training "
            "reaches (e.g. well before EarlyStopping can stop it, or raise EarlyStopping's patience), so the "
            "model ends at the sparsity you asked for."
        )

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # SWA/EMA-style callbacks (run before this one, see setup) replace the checkpoint's weights with their
        # averages: keep the pruned entries of those at 0 too, under every name of each parameter.
        averaging = compat.weight_averaging_callbacks()
        if self._pruner is None or not self._pruner.has_masks:
            return
        if not any(isinstance(c, averaging) for c in trainer.callbacks):
            return
        weights = checkpoint.get("state_dict", {})
        for name, mask in zip(self._names, self._pruner.mask_tensors):
            for alias in self._aliases.get(name, [name]):
                if alias in weights:
                    value = weights[alias].clone()
                    apply_masks([value], [mask.to(value.device)])
                    weights[alias] = value

    def state_dict(self) -> dict[str, Any]:
        saved: dict[str, Any] = {
            "version": state.VERSION,
            "last_index": self._last_index,
            "last_target": self._last_target,
            "generator": None,
            "masks": None,
            "settings": self._settings(),
            "guard": None,
            "position": 0,
            "snapshot": None,
        }
        if self._guarded is not None:
            saved.update(self._guarded.state_dict(self._names), last_target=self._last_target)
        if self._pruner is not None:
            saved.update(self._pruner.state_dict())  # the masks (gathered when sharded), and the score's state
        return saved

    def _settings(self) -> dict[str, Any]:
        settings = {k: getattr(self, k) for k in self._SETTINGS}
        settings["schedule"] = self.schedule if isinstance(self.schedule, str) else "callable"
        return settings

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at ``on_train_start``, when the parameters are on their device (restoring runs before that).
        self._pending_state = state_dict

    def _restore(self, saved: dict[str, Any]) -> None:
        state.check_version(self._name, saved)
        changed = state.changed_settings(saved.get("settings") or {}, self._settings())
        if changed:
            rank_zero_warn(
                f"{self._name} resumes from a checkpoint saved with other settings ({changed}). It continues "
                "from the checkpoint's masks: weights pruned so far stay pruned, and the schedule continues with the "
                "new settings (a target below the reached sparsity changes nothing)."
            )
        self._last_index = saved["last_index"]
        self._last_target = saved["last_target"]
        # the guard's state (its position in the schedule, its snapshot) is restored by _prepare_guard
        self._pruner.load_state_dict(saved)


class MagnitudePruning(ScheduledPruning):
    r"""Prune weights gradually while training; leave a plain, permanently sparse model at the end.

    At the start of each scheduled epoch (or step) ``i`` the masks grow to the target sparsity
    ``amount * f(p)``, ``p = clamp((i - start) / (end - start), 0, 1)`` (see :mod:`lightning_compress.pruning.schedules`
    for ``f``), and are applied to the weights in place. After every optimizer step they are applied again, so
    pruned weights stay exactly 0 (NaN and inf included). The model never holds anything pruning-specific: no
    ``weight_orig``, no ``weight_mask``, no forward hooks; ``model.state_dict()`` has plain keys at every moment.
    The masks live on the callback and in its checkpoint state, so resuming continues the schedule with the same
    masks.

    Args:
        amount: final sparsity, the fraction of the selected weights (or, for ``ln_structured``, of the slices
            along ``dim``) that end at exactly 0, in [0, 1).
        schedule: ``"constant"``, ``"linear"``, ``"cubic"``, ``"exponential"``, or a callable that maps the epoch
            (or step) index to the target sparsity.
        start: first epoch (or step) at which masks are updated; the target is 0 before it.
        end: epoch (or step) at which the final ``amount`` is reached; ``None`` is the last epoch
            (or optimizer step) of training.
        interval: ``"epoch"`` or ``"step"``: optimizer steps (``trainer.global_step``) under automatic
            optimization; training batches under manual optimization, where ``global_step`` counts the steps of
            every optimizer.
        frequency: update the masks every ``frequency`` epochs (or steps) from ``start`` to ``end``;
            ``end`` is always an update.
        method: ``"l1_unstructured"`` (smallest ``|w|``), ``"random_unstructured"`` (uniformly random entries),
            or ``"ln_structured"`` (whole slices along ``dim`` with the smallest Ln norm).
        scope: ``"global"`` (one threshold over all selected weights) or ``"layerwise"`` (the target for each
            tensor separately). ``None``: global for unstructured methods, layerwise for ``ln_structured``.
        norm: the ``n`` of the Ln norm, for ``ln_structured``.
        dim: the dimension whose slices ``ln_structured`` prunes, in the output-first layout ``(out, in, *kernel)``
            whatever the storage: 0 is output channels (a Linear's rows, a Conv's filters, the columns of
            ``transformers``' ``Conv1D`` weight stored ``(in, out)``, dim 1 of a ConvTranspose weight stored
            ``(in, out / groups, *kernel)``), 1 is input channels, higher dims as stored. Other parameters (an
            embedding selected by name, say) use their stored dims. See :mod:`lightning_compress.layouts`.
        parameters: ``None`` for the weight matrices of dense layers (see
            :func:`lightning_compress.pruning.selection.default_parameter_names`: Linear, Conv*, ConvTranspose*, the RNN
            family, MultiheadAttention, ``transformers``' ``Conv1D`` (GPT-2), and weights tied to them); or glob
            patterns over parameter names, e.g. ``["net.*.weight"]`` (a shared parameter matches by any of its
            names).
        exclude: glob patterns removed from the selection (e.g. ``["head.*"]``).
        modules: layer types whose weights are selected, e.g. ``[torch.nn.Conv2d]``; combined with ``parameters``
            when both are given.
        make_permanent: at the end of training drop the masks, so that a later ``fit`` starts a new schedule;
            ``False`` keeps them and a later ``fit`` keeps enforcing (and growing) them. The weights are plain
            and sparse either way.
        seed: seed of the generator of ``random_unstructured``; ``None`` draws one on rank zero and shares it.
        monitor: a metric the LightningModule logs during validation (e.g. ``"val_acc"``), as in ModelCheckpoint:
            the accuracy guard's metric (with ``max_drop``), and the metric drawn beside sparsity in the plot.
        mode: ``"max"`` (higher is better) or ``"min"`` for ``monitor``.
        max_drop: the accuracy budget: the largest allowed degradation of ``monitor`` from the dense baseline, in the
            metric's own units (``0.01`` = one point of accuracy). ``None``: no guard (and no snapshot).
        patience: how many validations out of budget, at consecutive updates, before pruning rolls back.
        baseline: the dense baseline of ``monitor``; ``None``: the best value validated before pruning starts.
        structure: for ``ln_structured``: ``"tensor"`` prunes the slices of each selected weight on their own;
            ``"groups"`` scores and prunes coupled channels together (a layer's filters with its BatchNorm, the
            convolutions joined by a residual add, ...: see :mod:`lightning_compress.pruning.groups`), in every member,
            so that :func:`lightning_compress.shrink` can remove them. Needs ``example_input_array`` on the module and
            ``pip install 'lightning_compress[shrink]'``. A selected weight whose channels no group can remove
            (normalized across channels by a GroupNorm or LayerNorm, split into attention heads, the model's output,
            coupled with an unselected layer, or not reached by the example input) is named at setup with the reason,
            stays dense, and is left out of the target and of ``pruning/coverage``; when no selected weight is in such a
            group, setup raises ``ValueError``.

    With ``max_drop``, an update that would raise the sparsity while the latest ``monitor`` value is outside the
    budget is held (retried at the next scheduled epoch or step), and so is one that comes before any validation
    has measured the dense baseline; after ``patience`` such validations the weights and masks of the last update
    made within budget are restored (before any raise, the weights stay as they are) and sparsity is raised no more
    in that fit. Each ``fit`` starts a new guard and schedule; a resumed one continues the checkpoint's (see
    :mod:`lightning_compress.pruning.guard`).

    Logged at each update and at the end of training, to every logger of the trainer: ``pruning/sparsity``
    (measured fraction of exact zeros over the selected weights), ``pruning/target``, ``pruning/coverage``
    (selected weights / entries of all parameters with 2+ dimensions) and ``pruning/sparsity/<parameter name>``.
    Under ``scope="global"``, a tensor pruned beyond 98 % (and beyond the target) is named in a warning, once per
    tensor and fit. At the end of training ``sparsity.png`` (in the first logger's directory, and in TensorBoard)
    draws target and measured sparsity, the monitored metric with its dense baseline and, with ``max_drop``, the
    budget; ``DynamicQuantization`` redraws it with the metric after quantization (:meth:`redraw_plot`).

    Strategies: single device, DDP (every rank computes the same masks), and ``ModelParallelStrategy`` with FSDP2's
    ``fully_shard``. There each process keeps the masks of its own shards, and thresholds, counts and logged
    sparsity are those of the full tensors (see :mod:`lightning_compress.pruning.sharding`).
    """

    _SETTINGS = (
        "amount",
        "schedule",
        "start",
        "end",
        "interval",
        "frequency",
        "method",
        "scope",
        "norm",
        "dim",
        "monitor",
        "mode",
        "max_drop",
        "patience",
        "structure",
    )

    def __init__(
        self,
        amount: float = 0.5,
        schedule: str | Callable[[int], float] = "cubic",
        start: int = 0,
        end: int | None = None,
        interval: Literal["epoch", "step"] = "epoch",
        frequency: int = 1,
        method: Literal["l1_unstructured", "random_unstructured", "ln_structured"] = "l1_unstructured",
        scope: Literal["global", "layerwise"] | None = None,
        norm: float = 2,
        dim: int = 0,
        parameters: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        modules: Sequence[type[nn.Module]] | None = None,
        make_permanent: bool = True,
        seed: int | None = None,
        monitor: str | None = None,
        mode: Literal["max", "min"] = "max",
        max_drop: float | None = None,
        patience: int = 1,
        baseline: float | None = None,
        structure: Literal["tensor", "groups"] = "tensor",
    ) -> None:
        schedule_config = ScheduleConfig(amount, schedule, start, end, interval, frequency)
        own = MagnitudeConfig(method, scope, norm, dim, structure, seed)
        selection = SelectionConfig(parameters, exclude, modules)
        super().__init__(
            schedule_config,
            selection,
            GuardConfig(monitor, mode, max_drop, patience, baseline),
            own.scope,
            make_permanent,
        )
        self.method, self.norm, self.dim, self.structure, self.seed = (
            own.method,
            own.norm,
            own.dim,
            own.structure,
            own.seed,
        )
        self._generator: torch.Generator | None = None  # of random_unstructured: one sequence of masks per run
        self._groups: list[Any] = []
        self._dims: list[int] = []  # for ln_structured: the stored dim of each selected weight that `dim` means

    def _setup_score(self, trainer: pl.Trainer) -> None:
        if self.method == "random_unstructured" and self._generator is None:
            seed = self.seed
            if seed is None:
                seed = trainer.strategy.broadcast(int(torch.randint(0, 2**62, ()).item()), src=0)
            self._generator = torch.Generator().manual_seed(int(seed))

    def _prepare_selection(
        self, pl_module: pl.LightningModule, selected: dict[str, Tensor]
    ) -> tuple[list[str], dict[str, Tensor]]:
        if self.method != "ln_structured":
            return list(selected), selected
        check_slices(selected, self.dim)
        names = list(selected)
        if self.structure == "groups":
            found = select_groups(pl_module, pl_module.example_input_array, selected, self._name)
            if found.message:
                (rank_zero_info if found.expected else rank_zero_warn)(found.message)
            self._groups, names = found.groups, found.names
            selected = {name: p for name, p in selected.items() if name in set(names)}  # what the target covers
        # `dim` is in the output-first layout; weights stored input-first map it (layouts.py)
        self._dims = storage_dims(pl_module, names, self.dim)
        return names, selected

    def _unsupported_when_sharded(self, trainer: pl.Trainer) -> dict[str, bool]:
        # structure='groups' traces the whole model on one process
        return {"structure='groups'": self.structure == "groups", **super()._unsupported_when_sharded(trainer)}

    def _make_score(self) -> Score:
        if self.structure == "groups":
            return GroupScore(self._groups, self.norm)
        if self.method == "ln_structured":
            return LnStructuredScore(self.norm, self._dims)
        if self.method == "random_unstructured":
            return RandomScore(self._generator)
        return MagnitudeScore()


def _run_after_weight_averaging(callback: Callback, trainer: pl.Trainer) -> None:
    """Move ``callback`` after SWA/EMA-style callbacks, so that its train-end masking sees their final weights.

    They overwrite the module with averaged weights in their ``on_train_end``; averages of entries pruned late in
    training are not 0. Lightning calls callbacks in list order.
    """
    callbacks = list(trainer.callbacks)
    positions = [i for i, c in enumerate(callbacks) if isinstance(c, compat.weight_averaging_callbacks())]
    if callback in callbacks and positions and positions[-1] > callbacks.index(callback):
        callbacks.remove(callback)
        callbacks.insert(positions[-1], callback)
        # A new list: Lightning is iterating over the current one to call this very hook.
        trainer.callbacks = callbacks


def _last_index_of_training(trainer: pl.Trainer, interval: str) -> int | None:
    """The last epoch (or optimizer step) training will run, when it is known."""
    # Under manual optimization a "step" is a training batch, and `estimated_stepping_batches` counts batches.
    steps = trainer.estimated_stepping_batches
    if interval == "step":
        return int(steps) - 1 if math.isfinite(steps) else None
    last = trainer.max_epochs - 1 if trainer.max_epochs not in (None, -1) else None
    batches = trainer.num_training_batches
    if trainer.max_steps != -1 and math.isfinite(batches) and batches > 0:
        steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        by_steps = math.ceil(trainer.max_steps / steps_per_epoch) - 1
        last = by_steps if last is None else min(last, by_steps)
    return last


def _held_because(guard: AccuracyGuard, monitor: str | None, max_drop: float | None) -> str:
    if guard.baseline is None:
        return f"no validation has measured the dense model's {monitor} yet (the baseline)"
    return f"{monitor}={guard.latest:.4f} is outside the budget (baseline {guard.baseline:.4f}, max_drop {max_drop:g})"


def _selection_line(owner: str, pruner: Pruner, coverage: float, unselected: list[tuple[str, int]]) -> str:
    listed = ", ".join(f"{name} ({numel:,})" for name, numel in unselected) or "none"
    return (
        f"{owner} prunes {pruner.total:,} weights in {len(pruner.names)} tensors: {coverage:.1%} of the entries of "
        f"the model's weight matrices (parameters with 2+ dimensions). Largest not pruned: {listed}"
    )
