"""``Pruner``: the pruning core, in plain torch. It owns the selected parameters, their masks and their score, and does
what pruning needs in any training loop: grow the masks to a target (:meth:`Pruner.update`), keep pruned weights at
exactly 0 after every optimizer step (:meth:`Pruner.apply`, or :meth:`Pruner.attach` to the optimizer), measure
the sparsity (:meth:`Pruner.measure`), checkpoint (:meth:`Pruner.state_dict`) and end with plain sparse weights
(:meth:`Pruner.squash_mask`). ``torch.ao.pruning``'s ``BaseSparsifier`` does the same with parametrizations; here
the model holds plain weights at every moment: no ``weight_orig``, no forward hooks, plain ``state_dict`` keys.

Example, without Lightning::

    from lightning_compress import Pruner
    from lightning_compress.pruning.schedules import target_sparsity

    pruner = Pruner.from_model(model)  # the weight matrices of Linear, Conv*, RNN, attention layers
    pruner.attach(optimizer)  # pruned weights stay exactly 0 after every optimizer step
    for epoch in range(epochs):
        pruner.update(target_sparsity("cubic", epoch, amount=0.8, start=0, end=epochs - 1))
        train_one_epoch(model, optimizer)
    pruner.squash_mask()  # the masks go; the zeros stay

When and how much (a schedule, the accuracy guard) is the caller's: ``MagnitudePruning`` is this core driven from
Lightning's hooks. Sharded parameters (FSDP2's ``DTensor``): each process keeps the masks of its shards, and
thresholds, counts and measured sparsity are those of the full tensors (:mod:`lightning_compress.pruning.sharding`);
every process calls :meth:`~Pruner.update`, :meth:`~Pruner.measure` and :meth:`~Pruner.state_dict` alike. Knows
nothing of Lightning or schedules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_compress.pruning import sharding
from lightning_compress.pruning.masks import LOCAL, MASK_DTYPE, apply_masks, mask_from_bool, new_mask
from lightning_compress.pruning.scores import MagnitudeScore, Score
from lightning_compress.pruning.selection import select_parameters

SCOPES = ("global", "layerwise")


@dataclasses.dataclass(frozen=True)
class Sparsity:
    """Measured fractions of exact zeros: over all the pruner's weights, and per parameter name."""

    overall: float
    by_name: dict[str, float]


class Pruner:
    """Masks over named parameters, grown by a score, applied in place.

    Args:
        parameters: the parameters to prune, by name (e.g. from
            :func:`lightning_compress.pruning.selection.select_parameters`; :meth:`from_model` selects them).
        score: how weights are ranked; default :class:`~lightning_compress.pruning.scores.MagnitudeScore`.
        scope: ``"global"``: one threshold over all the weights; ``"layerwise"``: the target in each tensor.
            Structured scores prune each tensor (or group) on its own whatever the scope.
        masks: masks to continue from, one per parameter in order, each of the parameter's shape (this process's
            part when sharded): bool (True keeps, as :attr:`masks` gives them) or the engine's form (another
            pruner's :attr:`mask_tensors`). They are copied. Default: none until the first :meth:`update`.

    The pruner holds the parameter objects themselves: if the model's parameters are replaced
    (``load_state_dict(..., assign=True)``, ``model.to_empty()``), build a new pruner over the new ones.

    Raises:
        TypeError: ``parameters`` is not a mapping of names to tensors, or ``score`` is not a ``Score``.
        ValueError: no parameter, or an unknown scope; ``masks`` of another number, shape or form; a parameter
            sharded in a layout the engine does not support.
    """

    def __init__(
        self,
        parameters: Mapping[str, Tensor],
        score: Score | None = None,
        scope: Literal["global", "layerwise"] = "global",
        masks: Sequence[Tensor] | None = None,
    ) -> None:
        if not isinstance(parameters, Mapping) or not all(isinstance(p, Tensor) for p in parameters.values()):
            raise TypeError(
                "Pruner(parameters=...) takes a mapping of names to parameters, e.g. "
                f"{{n: p for n, p in model.named_parameters() if p.dim() > 1}}, or use Pruner.from_model(model); "
                f"got {type(parameters).__name__}"
            )
        if not parameters:
            raise ValueError("Pruner needs at least one parameter to prune")
        if score is not None and not isinstance(score, Score):
            raise TypeError(
                f"Pruner(score=...) takes a Score object (MagnitudeScore(), RandomScore(seed), "
                f"LnStructuredScore(norm, dims) from lightning_compress.pruning.scores); got {type(score).__name__}"
            )
        if scope not in SCOPES:
            raise ValueError(f"`scope` must be one of {list(SCOPES)}, got {scope!r}")
        self.names = list(parameters)
        self._params = list(parameters.values())
        self.score = score if score is not None else MagnitudeScore()
        self.scope = scope
        self.parts, self.collective = sharding.locate(self.names, self._params)
        self._masks: list[Tensor] | None = None
        if masks is not None:
            self._masks = _checked_masks(masks, self.names, self.weights())
        self.score.bind(self)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        parameters: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        modules: Sequence[type[nn.Module]] | None = None,
        score: Score | None = None,
        scope: Literal["global", "layerwise"] = "global",
    ) -> Pruner:
        """A pruner of ``model``'s parameters chosen as ``MagnitudePruning`` chooses them (default: the weight
        matrices of dense layers; see :func:`lightning_compress.pruning.selection.select_parameters`)."""
        return cls(select_parameters(model, parameters, exclude, modules), score, scope)

    # ------------------------------------------------------------------ what it holds
    @property
    def parameters(self) -> dict[str, Tensor]:
        """The pruned parameters by name (``DTensor``\\ s when sharded)."""
        return dict(zip(self.names, self._params))

    def weights(self) -> list[Tensor]:
        """The tensors this process holds of the parameters (the parameters themselves unless sharded), asked for
        anew at each call: FSDP2 may replace a parameter's local tensor."""
        return [sharding.local(p) for p in self._params]

    def gradients(self) -> list[Tensor | None]:
        """The gradients of :meth:`weights` (this process's part of each; ``None`` where a parameter has none)."""
        return [None if p.grad is None else sharding.local(p.grad) for p in self._params]

    @property
    def total(self) -> int:
        """Entries of the full parameters."""
        return sum(p.total for p in self.parts)

    @property
    def has_masks(self) -> bool:
        return self._masks is not None

    @property
    def mask_tensors(self) -> list[Tensor]:
        """The masks in the engine's form (one byte per weight: -1 keeps, 0 prunes), this process's part of each
        (started keeping everything if there were none). The list itself: the accuracy guard restores into it."""
        self.start_masks()
        return self._masks

    def start_masks(self) -> None:
        """Start masks that keep every weight, unless there are masks already."""
        if self._masks is None:
            self._masks = [new_mask(w) for w in self.weights()]

    @property
    def masks(self) -> dict[str, Tensor]:
        """The masks as bool tensors (True keeps), this process's part of each; empty when there are none."""
        if self._masks is None:
            return {}
        return {name: mask != 0 for name, mask in zip(self.names, self._masks)}

    def gathered_masks(self) -> dict[str, Tensor]:
        """The full masks as bool CPU tensors (True keeps). Sharded, this gathers the shards: call it on every
        process."""
        if self._masks is None:
            return {}
        return {name: sharding.full_keep(p, m) for name, p, m in zip(self.names, self._params, self._masks)}

    # ------------------------------------------------------------------ what it does
    def update(self, target: float) -> None:
        """Grow the masks to ``target`` sparsity (a fraction of the weights, or of the slices for structured
        scores) and apply them. Masks only grow: a target below the reached sparsity changes nothing.

        Raises:
            ValueError: ``target`` is not in [0, 1) (1 would prune every weight).
        """
        target = _checked_target(target)
        self.start_masks()
        self.score.grow(self, target)
        self.apply()

    def apply(self) -> None:
        """Set the pruned weights to exactly 0 (NaN and inf included), in place."""
        if self._masks is not None:
            apply_masks(self.weights(), self._masks)

    def apply_to(self, tensors: dict[str, Tensor], aliases: Mapping[str, Sequence[str]] | None = None) -> None:
        """Zero the pruned entries of the copies of the parameters in ``tensors`` (a state dict: a checkpoint's,
        whose weights SWA or EMA replaced with averages), found under every name ``aliases`` gives a parameter
        (default: its own). Each copy is replaced by a masked clone; the parameters are not touched."""
        for name, mask in zip(self.names, self.mask_tensors):
            for alias in (aliases or {}).get(name, [name]):
                if alias in tensors:
                    value = tensors[alias].clone()
                    apply_masks([value], [mask.to(value.device)])
                    tensors[alias] = value

    def attach(self, optimizer: torch.optim.Optimizer) -> list[RemovableHandle]:
        """Keep pruned weights at 0 after every step of ``optimizer`` (a step post-hook that applies the masks),
        and call the score's :meth:`~lightning_compress.pruning.scores.Score.before_step` once per step, from the
        gradients the step applies, when it has one (see :func:`_when_gradients_are_final`). Returns the hooks'
        handles (``handle.remove()`` detaches)."""
        handles = [optimizer.register_step_post_hook(lambda *_: self.apply())]
        if type(self.score).before_step is not Score.before_step:
            hook = _when_gradients_are_final(lambda: self.score.before_step(self, self._held_by(optimizer)))
            handles.append(optimizer.register_step_pre_hook(hook))
        return handles

    def _held_by(self, optimizer: torch.optim.Optimizer) -> list[int]:
        """The positions of the parameters ``optimizer`` updates (another optimizer's are not its step's)."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return [i for i, p in enumerate(self._params) if id(p) in held]

    def measure(self) -> Sparsity:
        """The measured fractions of exact zeros over the full parameters (every shard counted once)."""
        zeros = sharding.global_zero_counts(self.weights(), self.parts, self.collective)
        totals = [p.total for p in self.parts]
        overall = sum(zeros) / sum(totals) if sum(totals) else float("nan")
        return Sparsity(overall, {name: z / t for name, z, t in zip(self.names, zeros, totals)})

    def squash_mask(self) -> None:
        """Make the pruning permanent: drop the masks (the pruned weights stay 0). A later :meth:`update` starts
        new masks from the weights as they are."""
        self._masks = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{"masks": {name: full bool mask} or None, **score state}``. Sharded, the masks are gathered one parameter
        at a time (a collective: call it on every process) and kept on rank zero only, where Lightning writes
        callback state from (in a distributed checkpoint too)."""
        state: dict[str, Any] = {"masks": None, **self.score.state_dict()}
        if self._masks is None:
            return state
        keep = self.collective is LOCAL or torch.distributed.get_rank() == 0
        masks = {}
        for name, p, m in zip(self.names, self._params, self._masks):
            full = sharding.full_keep(p, m)
            if keep:
                masks[name] = full
        state["masks"] = masks
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved: the score's state, and the masks (each process takes its part).

        Raises:
            ValueError: the masks are for other parameters, or of other shapes.
        """
        if not isinstance(state, Mapping) or "masks" not in state:
            raise ValueError(
                "Pruner.load_state_dict takes what Pruner.state_dict() returned (a dict with a 'masks' entry), not a "
                "model's state dict or a whole checkpoint: e.g. pruner.load_state_dict(checkpoint['pruner'])"
            )
        self.score.load_state_dict(state)
        saved = state["masks"]
        if saved is None:
            self._masks = None
            return
        if list(saved) != self.names:
            raise ValueError(
                f"The checkpoint's pruning masks are for parameters {list(saved)}, but this run selects {self.names}"
            )
        for name, weight in zip(self.names, self._params):
            if tuple(saved[name].shape) != tuple(weight.shape):
                raise ValueError(
                    f"The checkpoint's mask for {name!r} has shape {tuple(saved[name].shape)}, "
                    f"the parameter {tuple(weight.shape)}"
                )
        self._masks = [
            mask_from_bool(sharding.local_keep(saved[name], part, w), w)
            for name, part, w in zip(self.names, self.parts, self.weights())
        ]


def _checked_target(target: float) -> float:
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise TypeError(f"Pruner.update(target) takes a number in [0, 1), got {type(target).__name__}") from None
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise ValueError(
            f"Pruner.update(target={value!r}): the target sparsity is a fraction of the weights (of the slices, for "
            "structured scores) in [0, 1)"
        )
    return value


def _checked_masks(masks: Sequence[Tensor], names: Sequence[str], weights: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``masks`` in the engine's form, one per weight; a ``ValueError`` naming the parameter otherwise."""
    masks = list(masks)
    if len(masks) != len(weights):
        raise ValueError(
            f"Pruner(masks=...) got {len(masks)} mask(s) for {len(weights)} parameter(s) {list(names)}: give one per "
            "parameter, in the same order"
        )
    checked = []
    for name, mask, weight in zip(names, masks, weights):
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(weight.shape):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(
                f"Pruner(masks=...): the mask for {name!r} has shape {shape}, the parameter {tuple(weight.shape)}"
            )
        if mask.dtype == torch.bool:
            checked.append(mask_from_bool(mask, weight))
        elif mask.dtype == MASK_DTYPE and bool(((mask == 0) | (mask == -1)).all()):
            checked.append(mask.to(weight.device, copy=True))
        else:
            raise ValueError(
                f"Pruner(masks=...): the mask for {name!r} is {mask.dtype}; give bool masks (True keeps, as "
                "Pruner.masks gives) or the engine's masks (Pruner.mask_tensors: int8, -1 keeps, 0 prunes)"
            )
    return checked


def _when_gradients_are_final(
    call: Callable[[], None],
) -> Callable[[torch.optim.Optimizer, tuple, dict], tuple[tuple, dict] | None]:
    """An optimizer step pre-hook that calls ``call`` once per step, when the step's gradients are final.

    A step given no closure has them already (a plain loop, manual optimization, Lightning's AMP with a gradient
    scaler, which unscales before the step). Lightning's automatic optimization passes a closure that runs the
    training step, backward, unscaling and gradient clipping inside ``optimizer.step``, after the pre-hooks: the
    closure is wrapped so that ``call`` runs after it returns, once per step even when the optimizer calls it
    several times (LBFGS). A step the gradient scaler skips (inf or NaN) never calls ``optimizer.step``: nothing.
    """

    def hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # `args` are step's own: the optimizer first, then `closure` when it is passed by position
        positional = len(args) > 1 and callable(args[1])
        closure = args[1] if positional else kwargs.get("closure")
        if closure is None:
            call()
            return None
        done = False

        def closure_then_call() -> Any:
            nonlocal done
            result = closure()
            if not done:
                done = True
                call()
            return result

        if positional:
            return (args[0], closure_then_call, *args[2:]), kwargs
        return args, {**kwargs, "closure": closure_then_call}

    return hook
