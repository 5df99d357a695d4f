"""The pruning callbacks users add to a ``Trainer``: when masks grow, from which hook, and what is logged.

:class:`ScheduledPruning` holds what every pruning callback shares: it selects the parameters after
``configure_model``, builds a :class:`~lightning_compress.pruning.pruner.Pruner` when training starts, grows its masks
at each scheduled epoch or step (through the accuracy guard when there is one), applies them after every optimizer
step, logs and plots what it measured, checkpoints, and makes the masks permanent at the end. How weights are scored
is a subclass's: :class:`MagnitudePruning` (magnitude, random, Ln norms of slices or of coupled channel groups) and
:class:`MovementPruning` (movement scores accumulated while training). The masks, scores and thresholds are
computed elsewhere (:mod:`.pruner`, :mod:`.scores`, :mod:`.movement`, :mod:`.masks`); this module knows nothing of
how.
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

from lightning_compress import compat
from lightning_compress.pruning import reporting, sharding, state
from lightning_compress.pruning.config import (
    GuardConfig,
    MagnitudeConfig,
    MovementConfig,
    ScheduleConfig,
    SelectionConfig,
    check_flag,
    fields_of,
)
from lightning_compress.pruning.groups import select_groups
from lightning_compress.pruning.guard import HOLD, ROLL_BACK, AccuracyGuard
from lightning_compress.pruning.movement import MovementScore
from lightning_compress.pruning.progress import Progress
from lightning_compress.pruning.pruner import Pruner
from lightning_compress.pruning.reporting import Reporter
from lightning_compress.pruning.schedules import check_values, update_indices
from lightning_compress.pruning.scores import (
    GroupScore,
    LnStructuredScore,
    MagnitudeScore,
    RandomScore,
    Score,
    check_slices,
    storage_dims,
)
from lightning_compress.pruning.selection import parameter_aliases, select_parameters


class ScheduledPruning(Callback):
    """Scheduled, growing-only pruning while training, whatever the score (see the module docstring).

    Subclasses build the configs from their flat arguments and implement :meth:`_make_score`; they may refine the
    selection (:meth:`_prepare_selection`), name what they cannot do under sharding (:meth:`_unsupported_when_sharded`)
    and list the settings a checkpoint remembers (``_SETTINGS``). ``scope`` is ``"global"`` or ``"layerwise"``.
    """

    #: The settings a checkpoint remembers, to say what changed when a run resumes with others.
    _SETTINGS = ("amount", "schedule", "start", "end", "interval", "frequency", "scope", "monitor", "mode")
    _SETTINGS += ("max_drop", "patience")

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
        self._progress: Progress | None = None  # where the fit is in its schedule (from on_train_start on)
        self._names: list[str] = []
        self._aliases: dict[str, list[str]] = {}
        self._pruner: Pruner | None = None
        self._fsdp_modules: list[nn.Module] = []
        self._pending_state: dict[str, Any] | None = None
        self._hook_handles: list[Any] = []
        self._reporter = Reporter(self._name, scope)

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
        return self._progress.end if self._progress is not None else None

    @property
    def history(self) -> list[dict[str, float]]:
        """One entry per mask update and at the end of training: epoch, step, index, target, measured sparsity."""
        return list(self._reporter.entries)

    @property
    def guard(self) -> AccuracyGuard | None:
        """The accuracy guard (baseline, latest value, held updates, rollback), with ``max_drop``; else ``None``."""
        return self._guard

    @property
    def coverage(self) -> float:
        """Selected weights / entries of all the model's parameters with two or more dimensions."""
        return self._reporter.coverage

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
        _check_fit(trainer, self)
        self._setup_score(trainer)
        _run_after_weight_averaging(self, trainer)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks", {})
        if trainer.state.fn == "fit" and self.state_key not in states:
            ours = {c.state_key for c in trainer.callbacks if isinstance(c, type(self))}
            self._pending_state = state.resumed_state(states, self, ours, self._name)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After `configure_model`, so layers built there are selected; still before the first training step.
        selected = select_parameters(pl_module, self.parameters, self.exclude, self.modules)
        names, counted = self._prepare_selection(pl_module, selected)
        if self._names and self._names != names:
            self._pruner = None  # another model or selection: old masks do not apply
        self._names = names
        all_aliases = parameter_aliases(pl_module)
        self._aliases = {name: all_aliases[name] for name in names}
        self._reporter.selected(pl_module, names, counted)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fsdp_modules = sharding.fsdp_modules(pl_module)
        sharding.reshard(self._fsdp_modules)  # the sanity check's forward may have left them unsharded
        named = dict(pl_module.named_parameters())
        kept = self._pruner.mask_tensors if self._pruner is not None and self._pruner.has_masks else None
        self._pruner = Pruner({n: named[n] for n in self._names}, self._make_score(), self.scope, masks=kept)
        resumed, self._pending_state = self._pending_state, None
        if resumed is not None:
            self._restore(resumed)
        self._reporter.new_fit(resumed is not None)  # a new fit, not a resumed one, starts its schedule over
        self._pruner.start_masks()
        self._pruner.apply()
        self._reporter.pruned_any = self._pruner.measure().overall > 0
        self._start_schedule(trainer, resumed)
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._hook_handles.extend(self._pruner.attach(optimizer))

    def _start_schedule(self, trainer: pl.Trainer, resumed: dict[str, Any] | None) -> None:
        """The schedule's updates, from where a resumed run left off, under a fresh guard (the checkpoint's, when
        resuming). Fail now if a callable schedule gives a bad target, or no baseline can exist before the first
        pruning update."""
        end = _resolve_end(trainer, self)
        check_values(self.schedule, update_indices(self.start, end, self.frequency), self.interval)
        self._guard = self._guard_config.new_guard()
        where = (resumed["last_index"], resumed["last_target"]) if resumed is not None else (None, 0.0)
        self._progress = Progress(self.schedule, self.amount, self.start, end, self.frequency, self._guard, *where)
        if self._guard is not None and resumed is not None:
            self._progress.resume_guard(resumed, self._names)
        if self._guard is not None and self._guard.baseline is None:
            _check_baseline_possible(trainer, self)

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
        decision = self._progress.step(index, self._pruner, self._update_masks)
        if decision is None:
            return
        when = f"{self.interval} {index}"
        if decision == HOLD:
            guarded = self._progress.guarded
            held = (self._guard, self.monitor, self.max_drop, guarded.target, guarded.next_target)
            rank_zero_info(reporting.held_line(self._name, when, *held))
        elif decision == ROLL_BACK:
            self._warn_rolled_back()
        self._report(trainer, when, index)

    def _update_masks(self, target: float) -> None:
        """Grow the masks to ``target`` sparsity with the score and scope, and apply them."""
        self._pruner.update(target)
        # a module left unsharded by a forward without backward (validation) would run its stale unmasked copy
        sharding.reshard(self._fsdp_modules)

    def _warn_rolled_back(self) -> None:
        restored = self._progress.guarded.snapshot is not None
        settings = (self.monitor, self.max_drop, self.patience, self._progress.target, restored)
        rank_zero_warn(reporting.rolled_back_warning(self._name, self._guard, *settings))

    # ------------------------------------------------------------------ what is logged
    def measured_sparsity(self) -> dict[str, float]:
        """``pruning/sparsity`` and ``pruning/sparsity/<name>``: measured fractions of exact zeros."""
        return reporting.sparsity_metrics(self._pruner.measure())

    def _report(self, trainer: pl.Trainer, when: str, index: int | None) -> None:
        self._reporter.update(trainer, when, index, self._pruner, self._progress.target, self._guard)

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
        value = self._reporter.validation(trainer, self.monitor)
        if value is not None and self._guard is not None:
            self._guard.observe(value)

    # ------------------------------------------------------------------ end of training
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if self._pruner is None or not self._pruner.has_masks:
            return
        if self._progress.end_of_training(self._pruner.weights(), self._pruner.mask_tensors):
            self._warn_rolled_back()  # the last validation broke the budget: end within it
        self._pruner.apply()  # after SWA/EMA wrote their averages (see setup)
        sharding.reshard(self._fsdp_modules)
        self._report(trainer, "end of training", None)
        self._reporter.end(trainer, self._progress, self._guard, self.monitor, self.interval)
        self._reporter.write_plot(trainer, self._guard, self.max_drop, mode=self.mode)
        if self.make_permanent:
            self._pruner.squash_mask()
            self._progress.last_index = None

    def redraw_plot(self, trainer: pl.Trainer, quantized: Mapping[str, float]) -> None:
        """Draw ``sparsity.png`` again with the monitored metric measured on the quantized model (the
        :class:`lightning_compress.protocols.QuantizedMetricsPlot` contract: ``DynamicQuantization`` calls it at the
        end of its fit-end work with its ``quantization/<metric>_after`` values, keyed by ``<metric>``)."""
        if self._reporter.entries:
            value = quantized.get(self._reporter.monitor_key) if self._reporter.monitor_key else None
            self._reporter.write_plot(trainer, self._guard, self.max_drop, mode=self.mode, quantized=value)

    def summary_lines(self) -> list[str]:
        """Lines for end-of-fit summaries (``DynamicQuantization``'s table includes them): the accuracy guard's
        baseline, budget, last value, held updates and rollback, when it is on."""
        return self._reporter.summary_lines(self._guard, self.monitor)

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
        averaging = any(isinstance(c, compat.weight_averaging_callbacks()) for c in trainer.callbacks)
        if averaging and self._pruner is not None and self._pruner.has_masks:
            self._pruner.apply_to(checkpoint.get("state_dict", {}), self._aliases)

    def state_dict(self) -> dict[str, Any]:
        progress = self._progress.state_dict(self._names) if self._progress is not None else None
        # the pruner's: its masks (gathered when sharded: a collective), and its score's state
        return state.callback_state(self._settings(), progress, self._pruner.state_dict() if self._pruner else None)

    def _settings(self) -> dict[str, Any]:
        settings = {k: getattr(self, k) for k in self._SETTINGS}
        settings["schedule"] = self.schedule if isinstance(self.schedule, str) else "callable"
        return settings

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at ``on_train_start``, when the parameters are on their device (restoring runs before that).
        self._pending_state = state_dict

    def _restore(self, saved: dict[str, Any]) -> None:
        """The checkpoint's masks and score state into the pruner; where its schedule stood is taken by
        :meth:`_start_schedule`."""
        state.check_version(self._name, saved)
        settings = saved.get("settings") or {}
        if saved.get("resumed_from"):  # another pruning class's state: only the settings both have are compared
            rank_zero_warn(state.resumed_from_another_callback(self._name, saved["resumed_from"]))
            settings = {k: v for k, v in settings.items() if k in self._SETTINGS}
        changed = state.changed_settings(settings, self._settings())
        if changed:
            rank_zero_warn(state.resumed_with_other_settings(self._name, changed))
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

    _SETTINGS = ("amount", "schedule", "start", "end", "interval", "frequency", "method", "scope", "norm", "dim")
    _SETTINGS += ("monitor", "mode", "max_drop", "patience", "structure")

    def __init__(
        self,
        amount: float = 0.5,
        schedule: Callable[[int], float] | str = "cubic",
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


class MovementPruning(ScheduledPruning):
    r"""Prune weights gradually while fine-tuning by how training moves them, not by their size.

    Movement pruning (Sanh, Wolf & Rush, 2020, "Movement Pruning: Adaptive Sparsity by Fine-Tuning", NeurIPS) scores
    each selected weight by ``S = -sum_t g_t * w_t`` over the optimizer steps ``t``: a weight that training pushes
    away from zero gains importance, one it pulls toward zero loses it, however large it is now. What to choose:
    the paper found movement far ahead of magnitude at high sparsity when fine-tuning a pretrained model (BERT-base
    with 3 % of its weights left, without distillation: SQuAD F1 76.3 against 54.5, MNLI 76.1 against 68.9), and
    magnitude pruning ahead when more than about 70 % of the weights remain. For moderate sparsity, or training
    from scratch, prefer :class:`MagnitudePruning`. Our own comparison on small models is in
    ``benchmarks/README.md``.

    The scores (float32, 4 bytes per selected weight, beside the weights on their device) are accumulated from the
    first training step, once per real optimizer step (once per ``accumulate_grad_batches`` batches; under manual
    optimization at each ``optimizer.step()``), from the gradient the optimizer applies: after unscaling and
    gradient clipping, averaged over DDP's processes. They are never reset by an update; a new ``fit`` starts them
    at zero unless it resumes from a checkpoint, which holds them. At each scheduled update the masks grow to the
    target by pruning the weights with the lowest ``S`` among those not yet pruned (exact: the same selection rule,
    ties to the lowest index, as :class:`MagnitudePruning`); pruned weights stay exactly 0 after every step.

    Schedule, selection, accuracy guard, logging (``pruning/sparsity``, ``pruning/target``, ``pruning/coverage``,
    ``pruning/sparsity/<name>``, ``sparsity.png``), checkpoints and strategies (single device, DDP, FSDP2 under
    ``ModelParallelStrategy``: each process keeps the scores of its shards) are :class:`MagnitudePruning`'s: see its
    documentation for every argument not described here.

    Args:
        amount: final sparsity, the fraction of the selected weights that end at exactly 0, in [0, 1).
        scope: ``"global"`` (one threshold over all selected weights) or ``"layerwise"`` (the target in each tensor).

    Resuming from a checkpoint of :class:`MagnitudePruning` for the same parameters continues its masks and schedule,
    with a warning; its checkpoint holds no movement scores, so they start from zero (said in a second warning).
    """

    def __init__(
        self,
        amount: float = 0.5,
        schedule: str | Callable[[int], float] = "cubic",
        start: int = 0,
        end: int | None = None,
        interval: Literal["epoch", "step"] = "epoch",
        frequency: int = 1,
        scope: Literal["global", "layerwise"] = "global",
        parameters: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        modules: Sequence[type[nn.Module]] | None = None,
        make_permanent: bool = True,
        monitor: str | None = None,
        mode: Literal["max", "min"] = "max",
        max_drop: float | None = None,
        patience: int = 1,
        baseline: float | None = None,
    ) -> None:
        super().__init__(
            ScheduleConfig(amount, schedule, start, end, interval, frequency),
            SelectionConfig(parameters, exclude, modules),
            GuardConfig(monitor, mode, max_drop, patience, baseline),
            MovementConfig(scope).scope,
            make_permanent,
        )

    @property
    def scores(self) -> dict[str, Tensor]:
        """The movement scores ``-sum_t g_t * w_t`` by parameter name (float32; this process's shard of each under
        FSDP2), from ``on_train_start`` on; empty before."""
        if self._pruner is None:
            return {}
        return dict(zip(self._pruner.names, self._pruner.score.scores))

    def _make_score(self) -> Score:
        return MovementScore()

    def _prepare_selection(
        self, pl_module: pl.LightningModule, selected: dict[str, Tensor]
    ) -> tuple[list[str], dict[str, Tensor]]:
        # A frozen parameter gets no gradient, so its scores stay 0 and an update would prune it by position.
        frozen = [name for name, param in selected.items() if not param.requires_grad]
        if frozen:
            shown = ", ".join(frozen[:5]) + (f" and {len(frozen) - 5} more" if len(frozen) > 5 else "")
            raise ValueError(
                f"MovementPruning scores weights by how training moves them, but {shown} "
                f"{'is' if len(frozen) == 1 else 'are'} frozen (requires_grad=False): no gradient, no score. "
                "Leave them out (`exclude=[...]`), or prune them with MagnitudePruning."
            )
        return super()._prepare_selection(pl_module, selected)

    def _start_schedule(self, trainer: pl.Trainer, resumed: dict[str, Any] | None) -> None:
        super()._start_schedule(trainer, resumed)
        if resumed is None and self._progress.first_raise() == 0:
            raise ValueError(
                f"{self._name}(schedule={self.schedule!r}, start={self.start}) prunes at {self.interval} 0, before "
                "any optimizer step: every movement score is still 0, so it would prune the first weights by "
                "position. Start later (`start=1`), or use a schedule whose target at `start` is 0 ('cubic', "
                "'linear', 'exponential')."
            )

    def _restore(self, saved: dict[str, Any]) -> None:
        super()._restore(saved)
        if not self._pruner.score.restored:
            rank_zero_warn(
                f"{self._name} resumes from a checkpoint without movement scores (saved by "
                f"{saved.get('resumed_from') or 'another version'}): the scores start from zero now, so the next "
                "updates rank weights by their movement since this resume only."
            )


def _check_fit(trainer: pl.Trainer, callback: ScheduledPruning) -> None:
    """Refuse, before training, a strategy or setting this fit cannot honour."""
    compat.require_supported_strategy(trainer, callback._name)
    found = [setting for setting, present in callback._unsupported_when_sharded(trainer).items() if present]
    if compat.is_sharded_strategy(trainer) and found:
        raise ValueError(
            f"{callback._name} under {type(trainer.strategy).__name__} (sharded parameters) does not support "
            f"{', '.join(found)} yet. Remove them, or train with DDP or a single device."
        )
    if callback.end is None and trainer.max_epochs in (None, -1) and trainer.max_steps == -1:
        raise ValueError(
            "`end=None` means the last epoch/step of training, but training is unbounded "
            "(max_epochs=-1 and no max_steps). Set `end`, max_epochs or max_steps."
        )


def _check_baseline_possible(trainer: pl.Trainer, callback: ScheduledPruning) -> None:
    """The accuracy guard needs a dense baseline before its first pruning update: refuse now when none can exist."""
    without = "there is no validation data" if not compat.has_val_data(trainer) else None
    if without is None and callback._progress.first_raise() == 0:
        without = f"the first pruning update is at {callback.interval} 0, before any validation"
    if without:
        raise ValueError(
            f"{callback._name}(max_drop={callback.max_drop}) needs a dense baseline of {callback.monitor!r}, but "
            f"{without}. Start pruning later (`start=1`: epoch 0 trains and validates the dense model), or "
            "pass `baseline=`."
        )


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


def _resolve_end(trainer: pl.Trainer, callback: ScheduledPruning) -> int:
    """The callback's ``end``, or the last epoch (or step) of training for ``end=None``; a warning when training
    ends before it."""
    last = _last_index_of_training(trainer, callback.interval)
    end = callback.end if callback.end is not None else last
    if end is None:
        raise ValueError(
            f"`end=None` with interval={callback.interval!r} needs a known length of training, but the number of "
            "optimizer steps is unbounded or unknown (max_time only, or a dataloader without length). Set `end`."
        )
    if last is not None and end > last:
        rank_zero_warn(
            f"{callback._name}: the schedule ends at {callback.interval} {end} but training ends at "
            f"{callback.interval} {last}: the final sparsity {callback.amount} will not be reached."
        )
    return end


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
