"""``MagnitudePruning``: scheduled, growing-only pruning while training, with plain weights at every moment."""

from __future__ import annotations

import ast
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_compress import compat, layouts, report, sharding
from lightning_compress import masks as mask_engine
from lightning_compress.guard import HOLD, ROLL_BACK, AccuracyGuard, GuardedSchedule
from lightning_compress.schedules import is_update_index, target_sparsity, validate_schedule
from lightning_compress.selection import largest_unselected, matrix_numel, parameter_aliases, select_parameters

METHODS = ("l1_unstructured", "random_unstructured", "ln_structured")
SCOPES = ("global", "layerwise")
INTERVALS = ("epoch", "step")
_STATE_VERSION = 2
# Under scope="global", a tensor pruned beyond this fraction (and beyond the overall target) is named in a warning.
COLLAPSED = 0.98
# What a checkpoint remembers of the settings, to say what changed when a run resumes with others.
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


class MagnitudePruning(Callback):
    r"""Prune weights gradually while training; leave a plain, permanently sparse model at the end.

    At the start of each scheduled epoch (or step) ``i`` the masks grow to the target sparsity
    ``amount * f(p)``, ``p = clamp((i - start) / (end - start), 0, 1)`` (see :mod:`lightning_compress.schedules`
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
            :func:`lightning_compress.selection.default_parameter_names`: Linear, Conv*, ConvTranspose*, the RNN
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
            convolutions joined by a residual add, ...: see :mod:`lightning_compress.groups`), in every member, so
            that :func:`lightning_compress.shrink` can remove them. Needs ``example_input_array`` on the module and
            ``pip install 'lightning_compress[shrink]'``. A selected weight whose channels no group can remove
            (normalized across channels by a GroupNorm or LayerNorm, split into attention heads, the model's output,
            coupled with an unselected layer, or not reached by the example input) is named at setup with the
            reason, stays dense, and is left out of the target and of ``pruning/coverage``; when no selected weight
            is in such a group, setup raises ``ValueError``.

    With ``max_drop``, an update that would raise the sparsity while the latest ``monitor`` value is outside the
    budget is held (retried at the next scheduled epoch or step), and so is one that comes before any validation
    has measured the dense baseline; after ``patience`` such validations the weights and masks of the last update
    made within budget are restored (before any raise, the weights stay as they are) and sparsity is raised no more
    in that fit. Each ``fit`` starts a new guard and schedule; a resumed one continues the checkpoint's (see
    :mod:`lightning_compress.guard`).

    Logged at each update and at the end of training, to every logger of the trainer: ``pruning/sparsity``
    (measured fraction of exact zeros over the selected weights), ``pruning/target``, ``pruning/coverage``
    (selected weights / entries of all parameters with 2+ dimensions) and ``pruning/sparsity/<parameter name>``.
    Under ``scope="global"``, a tensor pruned beyond 98 % (and beyond the target) is named in a warning, once per
    tensor and fit. At the end of training ``sparsity.png`` (in the first logger's directory, and in TensorBoard)
    draws target and measured sparsity, the monitored metric with its dense baseline and, with ``max_drop``, the
    budget; ``DynamicQuantization`` redraws it with the metric after quantization (:meth:`redraw_plot`).

    Strategies: single device, DDP (every rank computes the same masks), and ``ModelParallelStrategy`` with FSDP2's
    ``fully_shard``. There each process keeps the masks of its own shards, and thresholds, counts and logged
    sparsity are those of the full tensors (see :mod:`lightning_compress.sharding`).
    """

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
        super().__init__()
        if isinstance(amount, bool) or not isinstance(amount, numbers.Real) or not 0 <= amount < 1:
            raise ValueError(f"`amount` must be a number in [0, 1), got {amount!r}")
        self.schedule = validate_schedule(schedule)
        if not _is_int(start) or start < 0:
            raise ValueError(f"`start` must be an integer >= 0, got {start!r}")
        if end is not None and (not _is_int(end) or end < start):
            raise ValueError(f"`end` must be None or an integer >= start ({start}), got {end!r}")
        if interval not in INTERVALS:
            raise ValueError(f"`interval` must be one of {list(INTERVALS)}, got {interval!r}")
        if not _is_int(frequency) or frequency < 1:
            raise ValueError(f"`frequency` must be an integer >= 1, got {frequency!r}")
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {list(METHODS)}, got {method!r}")
        if scope is not None and scope not in SCOPES:
            raise ValueError(f"`scope` must be None or one of {list(SCOPES)}, got {scope!r}")
        if method == "ln_structured" and scope == "global":
            raise ValueError(
                "`scope='global'` is not supported with `method='ln_structured'`: structured pruning is layerwise. "
                "Use scope=None or scope='layerwise'."
            )
        if isinstance(norm, bool) or not isinstance(norm, numbers.Real) or not norm > 0:
            raise ValueError(f"`norm` must be a number > 0 (math.inf allowed), got {norm!r}")
        if not _is_int(dim):
            raise ValueError(f"`dim` must be an integer, got {dim!r}")
        if isinstance(parameters, str):
            parameters = [parameters]
        if parameters is not None and not all(isinstance(p, str) for p in parameters):
            raise ValueError(f"`parameters` must be None or a list of glob patterns (str), got {parameters!r}")
        if isinstance(exclude, str):
            exclude = [exclude]
        if not all(isinstance(p, str) for p in exclude):
            raise ValueError(f"`exclude` must be a list of glob patterns (str), got {exclude!r}")
        if isinstance(modules, type):
            modules = [modules]
        if modules is not None and (
            not modules or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in modules)
        ):
            raise ValueError(f"`modules` must be None or a non-empty list of torch.nn.Module types, got {modules!r}")
        if not isinstance(make_permanent, bool):
            raise ValueError(f"`make_permanent` must be True or False, got {make_permanent!r}")
        if seed is not None and not _is_int(seed):
            raise ValueError(f"`seed` must be None or an integer, got {seed!r}")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"`monitor` must be None or the name of a metric logged in validation, got {monitor!r}")
        if max_drop is not None and monitor is None:
            raise ValueError("`max_drop` needs `monitor`: the validation metric whose drop it bounds, e.g. 'val_acc'")
        if structure not in ("tensor", "groups"):
            raise ValueError(f"`structure` must be one of ['tensor', 'groups'], got {structure!r}")
        if structure == "groups" and (method != "ln_structured" or dim != 0):
            raise ValueError(
                "`structure='groups'` prunes whole output channels: it needs `method='ln_structured'` and `dim=0`, got "
                f"method={method!r}, dim={dim!r}"
            )
        guard = AccuracyGuard(0.0 if max_drop is None else max_drop, mode, patience, baseline)  # checks every value
        self._guard = guard if max_drop is not None else None  # a fresh one for each fit (on_train_start)

        self.amount = float(amount)
        self.start = int(start)
        self.end = end
        self.interval = interval
        self.frequency = int(frequency)
        self.method = method
        self.scope = scope or ("layerwise" if method == "ln_structured" else "global")
        self.norm = float(norm)
        self.dim = int(dim)
        self.parameters = list(parameters) if parameters is not None else None
        self.exclude = list(exclude)
        self.modules = list(modules) if modules is not None else None
        self.make_permanent = make_permanent
        self.seed = seed
        self.structure = structure
        self.monitor = monitor
        self.mode = mode
        self.max_drop = max_drop
        self.patience = patience
        self.baseline = baseline

        self._names: list[str] = []
        self._aliases: dict[str, list[str]] = {}
        self._params: list[Tensor] = []
        self._fsdp_modules: list[nn.Module] = []
        self._parts: list[mask_engine.Part] = []
        self._collective: mask_engine.Collective = mask_engine.LOCAL
        self._masks: list[Tensor] | None = None
        self._coverage = float("nan")
        self._last_index: int | None = None
        self._last_target = 0.0
        self._resolved_end: int | None = None
        self._generator: torch.Generator | None = None
        self._pending_state: dict[str, Any] | None = None
        self._hook_handles: list[Any] = []
        self._history: list[dict[str, float]] = []
        self._monitored: list[tuple[float, float]] = []
        self._monitor_key: str | None = None
        self._dense_value: float | None = None  # the monitored metric's last value before anything was pruned
        self._pruned_any = False
        self._collapsed: set[str] = set()  # tensors named in a collapse warning in this fit
        self._last_epoch: int | None = None
        self._unselected: list[tuple[str, int]] = []
        self._guarded: GuardedSchedule | None = None  # with the guard: the schedule's targets, raised one by one
        self._groups: list[Any] = []
        self._dims: list[int] = []  # for ln_structured: the stored dim of each selected weight that `dim` means

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
        return dict(zip(self._names, self._params))

    @property
    def masks(self) -> dict[str, Tensor]:
        """The current masks as bool tensors (True keeps a weight), empty when there are none.

        Under a sharded strategy, each is this process's shard (the rows of the parameter's local tensor); see
        :meth:`gathered_masks` for the full masks.
        """
        if self._masks is None:
            return {}
        return {name: mask != 0 for name, mask in zip(self._names, self._masks)}

    def gathered_masks(self) -> dict[str, Tensor]:
        """The full masks as bool CPU tensors (True keeps), whether or not the parameters are sharded.

        Under a sharded strategy this gathers the shards: call it on every process, as any collective.
        """
        if self._masks is None:
            return {}
        return {name: sharding.full_keep(p, m) for name, p, m in zip(self._names, self._params, self._masks)}

    def _local(self) -> list[Tensor]:
        """The tensors this process holds of the selected parameters (the parameters themselves unless sharded)."""
        return [sharding.local(p) for p in self._params]

    @property
    def schedule_end(self) -> int | None:
        """The epoch (or step) at which the schedule reaches its final target, resolved at ``on_train_start``."""
        return self._resolved_end

    @property
    def history(self) -> list[dict[str, float]]:
        """One entry per mask update and at the end of training: epoch, step, index, target, measured sparsity."""
        return list(self._history)

    @property
    def guard(self) -> AccuracyGuard | None:
        """The accuracy guard (baseline, latest value, held updates, rollback), with ``max_drop``; else ``None``."""
        return self._guard

    @property
    def coverage(self) -> float:
        """Selected weights / entries of all the model's parameters with two or more dimensions."""
        return self._coverage

    # ------------------------------------------------------------------ setup: everything knowable up front
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # A checkpoint is restored after `setup`: state loaded by an earlier validate/test/predict never leaks in.
        self._pending_state = None
        if stage != "fit":
            return
        compat.require_supported_strategy(trainer, "MagnitudePruning")
        if compat.is_sharded_strategy(trainer):
            self._check_sharded_settings(trainer)
        if self.end is None and trainer.max_epochs in (None, -1) and trainer.max_steps == -1:
            raise ValueError(
                "`end=None` means the last epoch/step of training, but training is unbounded "
                "(max_epochs=-1 and no max_steps). Set `end`, max_epochs or max_steps."
            )
        if self.method == "random_unstructured" and self._generator is None:
            seed = self.seed
            if seed is None:
                seed = trainer.strategy.broadcast(int(torch.randint(0, 2**62, ()).item()), src=0)
            self._generator = torch.Generator().manual_seed(int(seed))
        self._run_after_weight_averaging(trainer)

    def _check_sharded_settings(self, trainer: pl.Trainer) -> None:
        """What is not supported yet under ModelParallelStrategy fails here, before training."""
        averaging = [type(c).__name__ for c in trainer.callbacks if isinstance(c, compat.weight_averaging_callbacks())]
        unsupported = {
            "structure='groups'": self.structure == "groups",  # traces the whole model on one process
            f"max_drop={self.max_drop}": self.max_drop is not None,  # its snapshot is not gathered into checkpoints
            f"callbacks {averaging}": bool(averaging),  # they average full weights, not shards
        }
        found = [setting for setting, present in unsupported.items() if present]
        if found:
            raise ValueError(
                f"MagnitudePruning under {type(trainer.strategy).__name__} (sharded parameters) does not support "
                f"{', '.join(found)} yet. Remove them, or train with DDP or a single device."
            )

    def _run_after_weight_averaging(self, trainer: pl.Trainer) -> None:
        """Move this callback after SWA/EMA-style callbacks, so that its train-end masking sees their final weights.

        They overwrite the module with averaged weights in their ``on_train_end``; averages of entries pruned late
        in training are not 0. Lightning calls callbacks in list order.
        """
        callbacks = list(trainer.callbacks)
        positions = [i for i, c in enumerate(callbacks) if isinstance(c, compat.weight_averaging_callbacks())]
        if self in callbacks and positions and positions[-1] > callbacks.index(self):
            callbacks.remove(self)
            callbacks.insert(positions[-1], self)
            # A new list: Lightning is iterating over the current one to call this very hook.
            trainer.callbacks = callbacks

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != "fit" or self.state_key in checkpoint.get("callbacks", {}):
            return
        legacy = self._legacy_state(checkpoint.get("callbacks", {}))
        if legacy is not None:
            self._pending_state = legacy
            return
        ours = {c.state_key for c in trainer.callbacks if isinstance(c, MagnitudePruning)}
        foreign = [k for k in checkpoint.get("callbacks", {}) if k.startswith(type(self).__name__) and k not in ours]
        if foreign:
            raise ValueError(
                f"The checkpoint holds pruning state for {foreign}, but this MagnitudePruning is {self.state_key}: "
                "it selects other parameters, so the checkpoint's masks cannot be continued and its pruned weights "
                "would grow back. Resume with the same `parameters`, `exclude` and `modules`, or load the weights "
                "into the model yourself and start a new fit without `ckpt_path`."
            )

    def _legacy_state(self, callback_states: dict[str, Any]) -> dict[str, Any] | None:
        """The state lightning_compress 0.1 saved for the same parameters, under its key that also named the amount and
        method (``MagnitudePruning{'amount': ..., 'method': ..., 'parameters': ..., 'exclude': ...}``)."""
        prefix = type(self).__name__
        for key, state in callback_states.items():
            if not key.startswith(prefix + "{") or "'amount'" not in key:
                continue
            try:
                fields = ast.literal_eval(key[len(prefix) :])
            except (ValueError, SyntaxError):
                continue
            if not isinstance(fields, dict) or self.modules is not None:
                continue
            if fields.get("parameters") == self.parameters and list(fields.get("exclude", [])) == self.exclude:
                # 0.1 saved no settings: these two are what it said, so a change is warned about as usual
                return {**state, "settings": {"amount": fields.get("amount"), "method": fields.get("method")}}
        return None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After `configure_model`, so layers built there are selected; still before the first training step.
        selected = select_parameters(pl_module, self.parameters, self.exclude, self.modules)
        if self.method == "ln_structured":
            for name, param in selected.items():
                if param.dim() < 2:
                    raise ValueError(
                        f"`method='ln_structured'` prunes slices of weight matrices, but {name!r} has shape "
                        f"{tuple(param.shape)}. Narrow `parameters` (e.g. '*.weight') or add it to `exclude`."
                    )
                if not -param.dim() <= self.dim < param.dim():
                    raise ValueError(
                        f"`dim={self.dim}` is out of range for parameter {name!r} of shape {tuple(param.shape)}"
                    )
        names = list(selected)
        if self.structure == "groups":
            names = self._with_group_members(pl_module, selected)
            selected = {name: p for name, p in selected.items() if name in set(names)}  # what the target covers
        if self._names and self._names != names:
            self._masks = None  # another model or selection: old masks do not apply
        self._names = names
        all_aliases = parameter_aliases(pl_module)
        self._aliases = {name: all_aliases[name] for name in self._names}
        matrices = matrix_numel(pl_module)
        self._coverage = sum(p.numel() for p in selected.values()) / matrices if matrices else float("nan")
        self._unselected = largest_unselected(pl_module, self._names)
        # ln_structured's `dim` is in the output-first layout; weights stored input-first map it (layouts.py)
        out_dims = layouts.output_dims(pl_module, self._names)
        named = dict(pl_module.named_parameters())
        self._dims = [
            layouts.storage_dim(self.dim, named[n].dim(), out_dims[n]) if named[n].dim() >= 2 else 0
            for n in self._names
        ]

    def _with_group_members(self, pl_module: pl.LightningModule, selected: dict[str, Tensor]) -> list[str]:
        """Find the coupled channel groups of the selected layers; every parameter in them gets a mask. Selected
        weights in no group that can be pruned are named with the reason, and left out of the target and coverage."""
        from lightning_compress.groups import OUTPUT, analyse_groups, describe_left_out

        example = pl_module.example_input_array
        if example is None:
            raise ValueError(
                "MagnitudePruning(structure='groups') traces the model to find coupled channels, and needs an input: "
                "set `example_input_array` on the LightningModule (a tensor, a tuple, or a dict of keyword inputs)."
            )
        analysis = analyse_groups(pl_module, example, selected)
        self._groups = analysis.groups
        members = {name for g in self._groups for name in g.slices}
        left_out = {name: analysis.left_out[name] for name in selected if name in analysis.left_out}  # model order
        reasons = "\n".join(f"  - {line}" for line in describe_left_out(left_out))
        if not self._groups:
            raise ValueError(
                "MagnitudePruning(structure='groups') found no group of coupled channels that can be removed among "
                f"the {len(selected)} selected weights:\n{reasons}\nUse structure='tensor' to prune each weight's "
                "slices on its own, or select the layers whose channels can be removed (`parameters=`, `exclude=`)."
            )
        if left_out:
            message = (
                f"MagnitudePruning(structure='groups') leaves {len(left_out)} selected weight(s) dense, out of the "
                f"target and of pruning/coverage, because their channels cannot be removed together:\n{reasons}"
            )
            if all(why.startswith(OUTPUT) for why in left_out.values()):
                rank_zero_info(message)  # an output layer: expected, and not worth a warning
            else:
                rank_zero_warn(message)
        return [name for name, _ in pl_module.named_parameters() if name in members]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fsdp_modules = sharding.fsdp_modules(pl_module)
        sharding.reshard(self._fsdp_modules)  # the sanity check's forward may have left them unsharded
        named = dict(pl_module.named_parameters())
        self._params = [named[name] for name in self._names]
        self._locate_shards(trainer)
        resumed, self._pending_state = self._pending_state, None
        if resumed is not None:
            self._restore(resumed)
        else:  # a new fit, not a resumed one: its schedule starts over (masks only grow)
            self._last_index = None
            self._last_target = 0.0
            self._history, self._monitored, self._dense_value = [], [], None
        self._collapsed = set()
        weights = self._local()
        if self._masks is None:
            self._masks = [mask_engine.new_mask(w) for w in weights]
        else:
            self._masks = [m.to(w.device) for m, w in zip(self._masks, weights)]
        mask_engine.apply_masks(weights, self._masks)
        self._pruned_any = self.measured_sparsity()[report.SPARSITY] > 0
        self._resolved_end = self._resolve_end(trainer)
        self._check_schedule_values()
        if self._guard is not None:
            self._prepare_guard(trainer, resumed)
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._hook_handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    def _locate_shards(self, trainer: pl.Trainer) -> None:
        """Which part of each selected parameter this process holds, and how the processes' counts are joined.

        Sharded (``DTensor``) parameters hold row blocks; a parameter left unsharded under a sharded strategy is a
        full copy on every process, counted on rank zero only. Without sharding every process holds everything
        (DDP ranks compute the same masks each on its own).
        """
        if not any(sharding.is_sharded(p) for p in self._params):
            self._parts = mask_engine.whole(self._params)
            self._collective = mask_engine.LOCAL
            return
        self._parts = [
            sharding.part_of(name, p)
            if sharding.is_sharded(p)
            else mask_engine.Part(0, p.numel(), trainer.is_global_zero)
            for name, p in zip(self._names, self._params)
        ]
        self._collective = sharding.ProcessGroupCollective()

    def _prepare_guard(self, trainer: pl.Trainer, resumed: dict[str, Any] | None) -> None:
        """The schedule's targets in order under a guard: fresh for a new fit, the checkpoint's when resuming. Fail
        now if no baseline can exist before the first pruning update."""
        indices = self._scheduled_indices()
        targets = [target_sparsity(self.schedule, i, self.amount, self.start, self._resolved_end) for i in indices]
        self._guard = AccuracyGuard(self.max_drop, self.mode, self.patience, self.baseline)
        self._guarded = GuardedSchedule(self._guard, targets)
        self._guarded.target = self._last_target
        if resumed is not None:
            state = dict(resumed)
            if state.get("guard") is None:  # saved without a guard: the targets up to the last update are done
                state["position"] = sum(1 for i in indices if self._last_index is not None and i <= self._last_index)
            self._guarded.load_state_dict({**state, "last_target": self._last_target}, self._names)
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
                f"MagnitudePruning(max_drop={self.max_drop}) needs a dense baseline of {self.monitor!r}, but {why}. "
                "Start pruning later (`start=1`: epoch 0 trains and validates the dense model), or pass `baseline=`."
            )

    def _resolve_end(self, trainer: pl.Trainer) -> int:
        last = self._last_index_of_training(trainer)
        end = self.end if self.end is not None else last
        if end is None:
            raise ValueError(
                f"`end=None` with interval={self.interval!r} needs a known length of training, but the number of "
                "optimizer steps is unbounded or unknown (max_time only, or a dataloader without length). Set `end`."
            )
        if last is not None and end > last:
            rank_zero_warn(
                f"MagnitudePruning: the schedule ends at {self.interval} {end} but training ends at {self.interval} "
                f"{last}: the final sparsity {self.amount} will not be reached."
            )
        return end

    def _last_index_of_training(self, trainer: pl.Trainer) -> int | None:
        # Under manual optimization a "step" is a training batch, and `estimated_stepping_batches` counts batches.
        steps = trainer.estimated_stepping_batches
        if self.interval == "step":
            return int(steps) - 1 if math.isfinite(steps) else None
        last = trainer.max_epochs - 1 if trainer.max_epochs not in (None, -1) else None
        batches = trainer.num_training_batches
        if trainer.max_steps != -1 and math.isfinite(batches) and batches > 0:
            steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
            by_steps = math.ceil(trainer.max_steps / steps_per_epoch) - 1
            last = by_steps if last is None else min(last, by_steps)
        return last

    def _check_schedule_values(self) -> None:
        """Evaluate a callable schedule at every update index now, so a bad value fails before training."""
        if not callable(self.schedule):
            return
        for index in self._scheduled_indices():
            value = self.schedule(index)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
                raise ValueError(
                    f"`schedule` returned {value!r} for {self.interval} {index}; it must return a number in [0, 1)"
                )

    def _scheduled_indices(self) -> list[int]:
        """The epochs (or steps) from ``start`` to the resolved ``end`` at which the masks are updated."""
        return [
            i
            for i in range(self.start, self._resolved_end + 1)
            if is_update_index(i, self.start, self._resolved_end, self.frequency)
        ]

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

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        mask_engine.apply_masks(self._local(), self._masks)

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
        decision = self._guarded.update(self._local(), self._masks, self._update_masks)
        self._last_target = self._guarded.target
        if decision is None:
            return
        if decision == HOLD:
            guard = self._guard
            why = (
                f"{self.monitor}={guard.latest:.4f} is outside the budget (baseline {guard.baseline:.4f}, max_drop "
                f"{self.max_drop:g})"
                if guard.baseline is not None
                else f"no validation has measured the dense model's {self.monitor} yet (the baseline)"
            )
            rank_zero_info(
                f"MagnitudePruning [{self.interval} {index}]: {why}: holding at {self._last_target:.2%}, retrying "
                f"{retried:.2%} at the next update"
            )
        elif decision == ROLL_BACK:
            self._warn_rolled_back()
        self._report(trainer, f"{self.interval} {index}", index)

    def _warn_rolled_back(self) -> None:
        guard = self._guard
        restored = (
            f"rolled back to the weights and masks of the last update within budget ({self._last_target:.2%} sparsity)"
            if self._guarded.snapshot is not None
            else "no update had raised the sparsity in this fit, so the weights stay as they are"
        )
        rank_zero_warn(
            f"MagnitudePruning: {self.monitor} stayed outside the budget for {self.patience} validation(s) "
            f"(last {guard.latest:.4f}, baseline {guard.baseline:.4f}, max_drop {self.max_drop:g}): {restored}, and "
            "sparsity is raised no more in this fit."
        )

    def _describe_selection(self) -> None:
        n = sum(p.total for p in self._parts)
        unselected = ", ".join(f"{name} ({numel:,})" for name, numel in self._unselected) or "none"
        rank_zero_info(
            f"MagnitudePruning prunes {n:,} weights in {len(self._params)} tensors: {self._coverage:.1%} of the "
            f"entries of the model's weight matrices (parameters with 2+ dimensions). Largest not pruned: {unselected}"
        )

    def _update_masks(self, target: float) -> None:
        """Grow the masks to ``target`` sparsity with the configured method and scope, and apply them."""
        weights = self._local()
        if self.structure == "groups":
            mask_engine.update_grouped(
                dict(zip(self._names, weights)),
                dict(zip(self._names, self._masks)),
                self._groups,
                target,
                self.norm,
            )
        elif self.method == "ln_structured":
            mask_engine.update_structured(
                weights, self._masks, target, self.norm, self._dims, self._sharded_parts(), self._collective
            )
        else:
            if self.method == "l1_unstructured":
                scores = mask_engine.l1_scores(weights)
            else:
                scores = mask_engine.random_scores(weights, self._generator, self._parts)
            mask_engine.update_unstructured(
                weights, self._masks, target, scores, self.scope, self._parts, self._collective
            )
        mask_engine.apply_masks(weights, self._masks)
        # a module left unsharded by a forward without backward (validation) would run its stale unmasked copy
        sharding.reshard(self._fsdp_modules)

    def _sharded_parts(self) -> list[mask_engine.Part] | None:
        return None if self._collective is mask_engine.LOCAL else self._parts

    def measured_sparsity(self) -> dict[str, float]:
        """``pruning/sparsity`` and ``pruning/sparsity/<name>``: measured fractions of exact zeros."""
        # zeros of the full tensors: when sharded, every process's shard counted once
        zeros = sharding.global_zero_counts(self._local(), self._parts, self._collective)
        totals = [p.total for p in self._parts]
        overall = sum(zeros) / sum(totals) if sum(totals) else float("nan")
        by_name = {name: z / t for name, z, t in zip(self._names, zeros, totals)}
        return {report.SPARSITY: overall, **{report.SPARSITY_PREFIX + name: v for name, v in by_name.items()}}

    def _report(self, trainer: pl.Trainer, when: str, index: int | None) -> None:
        if index is not None and not self._history:
            self._describe_selection()  # once, at the first update of the callback's life
        metrics = self.measured_sparsity()
        self._pruned_any = metrics[report.SPARSITY] > 0
        if index is not None:
            self._warn_collapsed(metrics)
        metrics[report.TARGET] = self._last_target
        metrics[report.COVERAGE] = self._coverage
        if self._guard is not None:
            metrics[report.GUARD_HELD] = float(self._guard.held)
            metrics[report.GUARD_ROLLED_BACK] = float(self._guard.rolled_back)
        report.log_to_loggers(trainer, metrics)
        self._history.append(
            {
                # at the end of training, Lightning's epoch counter is one past the last epoch trained
                "epoch": trainer.current_epoch if index is not None else self._last_trained_epoch(trainer),
                "step": trainer.global_step,
                "index": index if index is not None else float("nan"),
                "target": self._last_target,
                "sparsity": metrics[report.SPARSITY],
            }
        )
        n = sum(p.total for p in self._parts)
        rank_zero_info(
            f"MagnitudePruning [{when}]: target sparsity {self._last_target:.2%}, measured "
            f"{metrics[report.SPARSITY]:.2%} of {n:,} weights in {len(self._params)} tensors"
        )

    def _last_trained_epoch(self, trainer: pl.Trainer) -> int:
        seen = [h["epoch"] for h in self._history] + [epoch for epoch, _ in self._monitored]
        return max([trainer.current_epoch - 1, *seen, 0])

    def _warn_collapsed(self, metrics: dict[str, float]) -> None:
        """Under one global threshold, a tensor of small weights can lose almost all of them: name each such tensor
        once per fit, with the fix."""
        if self.scope != "global":
            return
        limit = max(COLLAPSED, self._last_target)
        found = [
            (name, metrics[report.SPARSITY_PREFIX + name])
            for name in self._names
            if metrics[report.SPARSITY_PREFIX + name] > limit and name not in self._collapsed
        ]
        if not found:
            return
        self._collapsed.update(name for name, _ in found)
        shown = ", ".join(f"{name} ({fraction:.1%})" for name, fraction in found[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        rank_zero_warn(
            f"MagnitudePruning(scope='global') pruned {shown}{more} beyond {COLLAPSED:.0%}, while the target over "
            f"all selected weights is {self._last_target:.1%}: one threshold over all of them takes nearly every "
            "weight of a tensor whose weights are small (a layer initialized at a smaller scale, say), which can cut "
            "the layer off. Use scope='layerwise' (the target in each tensor), or exclude=[...] those tensors."
        )

    # ------------------------------------------------------------------ validation: what the plot shows
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None and self.monitor not in trainer.callback_metrics:
            # at the first validation (the sanity check's, when there is one), before any weight is pruned
            raise ValueError(
                f"MagnitudePruning(monitor={self.monitor!r}): the module's validation logged no such metric. "
                f"Logged: {sorted(trainer.callback_metrics)}"
            )
        if trainer.sanity_checking or self._masks is None:
            return
        key = self.monitor or self._monitor_key or report.monitored_metric_name(trainer)
        value = trainer.callback_metrics.get(key) if key else None
        if value is None:
            return
        # every rank decides alike: rank zero's value, whether or not the metric was logged with sync_dist
        value = float(trainer.strategy.broadcast(float(value), src=0))
        self._monitor_key = key
        self._monitored.append((trainer.current_epoch, value))
        if not self._pruned_any:
            self._dense_value = value
        if self._guard is not None:
            self._guard.observe(value)

    # ------------------------------------------------------------------ end of training
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if self._masks is None:
            return
        if self._guarded is not None and self._guarded.end(self._local(), self._masks):
            self._last_target = self._guarded.target  # the last validation broke the budget: end within it
            self._warn_rolled_back()
        mask_engine.apply_masks(self._local(), self._masks)  # after SWA/EMA wrote their averages (see setup)
        sharding.reshard(self._fsdp_modules)
        self._report(trainer, "end of training", None)
        for line in self.summary_lines():
            rank_zero_info(f"MagnitudePruning: {line}")
        self._warn_if_schedule_unfinished(trainer)
        self._last_epoch = self._history[-1]["epoch"]
        self._write_plot(trainer)
        if self.make_permanent:
            self._masks = None
            self._last_index = None

    def _write_plot(self, trainer: pl.Trainer, quantized: float | None = None) -> None:
        guarded = self._guard is not None and self._guard.baseline is not None
        report.write_schedule_plot(
            trainer,
            self._history,
            self._monitored,
            self._monitor_key,
            baseline=self._guard.baseline if guarded else self._dense_value,
            max_drop=self.max_drop if guarded else None,
            mode=self.mode,
            quantized=quantized,
            last_epoch=self._last_epoch,
        )

    def redraw_plot(self, trainer: pl.Trainer, quantized: Mapping[str, float]) -> None:
        """Draw ``sparsity.png`` again with the monitored metric measured on the quantized model (the
        :class:`lightning_compress.protocols.QuantizedMetricsPlot` contract: ``DynamicQuantization`` calls it at the
        end of its fit-end work with its ``quantization/<metric>_after`` values, keyed by ``<metric>``)."""
        if not self._history:
            return
        self._write_plot(trainer, quantized.get(self._monitor_key) if self._monitor_key else None)

    def summary_lines(self) -> list[str]:
        """Lines for end-of-fit summaries (``DynamicQuantization``'s table includes them): the accuracy guard's
        baseline, budget, last value, held updates and rollback, when it is on."""
        if self._guard is None:
            return []
        reached = f"; sparsity reached {self._history[-1]['sparsity']:.2%}" if self._history else ""
        return [self._guard.describe(self.monitor) + reached]

    def _warn_if_schedule_unfinished(self, trainer: pl.Trainer) -> None:
        final = target_sparsity(self.schedule, self._resolved_end, self.amount, self.start, self._resolved_end)
        if self._last_target >= final or (self._guard is not None and self._guard.rolled_back):
            return  # a rollback was warned about when it happened
        reached = self._history[-1]["sparsity"]
        why = report.why_training_stopped(trainer) or "training ended before the schedule did"
        if self._guard is not None and self._guard.held:
            why += f" (the accuracy guard held {self._guard.held} update(s))"
        rank_zero_warn(
            f"MagnitudePruning reached {reached:.2%} sparsity, not the final target {final:.2%}: {why}. The "
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
        if self._masks is None or not any(isinstance(c, averaging) for c in trainer.callbacks):
            return
        state = checkpoint.get("state_dict", {})
        for name, mask in zip(self._names, self._masks):
            for alias in self._aliases.get(name, [name]):
                if alias in state:
                    value = state[alias].clone()
                    mask_engine.apply_masks([value], [mask.to(value.device)])
                    state[alias] = value

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "last_index": self._last_index,
            "last_target": self._last_target,
            "generator": self._generator.get_state() if self._generator is not None else None,
            "masks": None,
            "settings": self._settings(),
            "guard": None,
            "position": 0,
            "snapshot": None,
        }
        if self._guarded is not None:
            state.update(self._guarded.state_dict(self._names), last_target=self._last_target)
        if self._masks is not None:
            state["masks"] = self._masks_for_checkpoint()
        return state

    def _masks_for_checkpoint(self) -> dict[str, Tensor]:
        """Full bool masks. Sharded, they are gathered one parameter at a time (a collective: Lightning calls
        ``state_dict`` on every rank when it saves) and kept on rank zero only, since Lightning writes callback
        state from rank zero alone, in a distributed checkpoint too (``meta.pt`` beside the DCP shards)."""
        keep = self._collective is mask_engine.LOCAL or torch.distributed.get_rank() == 0
        masks = {}
        for name, p, m in zip(self._names, self._params, self._masks):
            full = sharding.full_keep(p, m)
            if keep:
                masks[name] = full
        return masks

    def _settings(self) -> dict[str, Any]:
        settings = {k: getattr(self, k) for k in _SETTINGS}
        settings["schedule"] = self.schedule if isinstance(self.schedule, str) else "callable"
        return settings

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at ``on_train_start``, when the parameters are on their device (restoring runs before that).
        self._pending_state = state_dict

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("version") not in (1, _STATE_VERSION):
            raise ValueError(f"MagnitudePruning state version {state.get('version')!r} is not {_STATE_VERSION}")
        saved_settings = state.get("settings") or {}
        changed = {k: (v, self._settings()[k]) for k, v in saved_settings.items() if self._settings().get(k) != v}
        if changed:
            listing = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            rank_zero_warn(
                f"MagnitudePruning resumes from a checkpoint saved with other settings ({listing}). It continues "
                "from the checkpoint's masks: weights pruned so far stay pruned, and the schedule continues with the "
                "new settings (a target below the reached sparsity changes nothing)."
            )
        self._last_index = state["last_index"]
        self._last_target = state["last_target"]
        # the guard's state (its position in the schedule, its snapshot) is restored by _prepare_guard
        if state["generator"] is not None:
            self._generator = torch.Generator()
            self._generator.set_state(state["generator"])
        saved = state["masks"]
        if saved is None:
            self._masks = None
            return
        if list(saved) != self._names:
            raise ValueError(
                f"The checkpoint's pruning masks are for parameters {list(saved)}, but this run selects {self._names}"
            )
        for name, weight in zip(self._names, self._params):
            if tuple(saved[name].shape) != tuple(weight.shape):
                raise ValueError(
                    f"The checkpoint's mask for {name!r} has shape {tuple(saved[name].shape)}, "
                    f"the parameter {tuple(weight.shape)}"
                )
        self._masks = [
            mask_engine.mask_from_bool(sharding.local_keep(saved[name], part, w), w)
            for name, part, w in zip(self._names, self._parts, self._local())
        ]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
