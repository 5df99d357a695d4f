r"""Scores: how important each selected weight is. The Pruner prunes the least important first, and the mask
engine (:mod:`lightning_compress.pruning.masks`) finds them exactly.

A functional core under small score objects, as torchmetrics does:

* :func:`l1_scores` (magnitude, ``|w|``) and :func:`random_scores` (uniform, reproducible from a generator) are
  :data:`~lightning_compress.pruning.masks.ScoreSource`\ s of single entries, pruned by
  :func:`~lightning_compress.pruning.masks.update_unstructured` over all tensors (``"global"``) or each one;
* :func:`update_structured` prunes whole slices along a dimension by their Ln norm, as
  ``torch.nn.utils.prune.ln_structured`` does; :func:`update_grouped` prunes coupled channels together
  (:mod:`lightning_compress.pruning.groups`), scored over every member.

A :class:`Score` says how to grow masks to a target; :class:`~lightning_compress.pruning.pruner.Pruner` asks it at
each update. A score accumulated during training (movement: ``S -= g * w`` at each optimizer step) is one more
subclass, with :meth:`Score.before_step` and its state in :meth:`Score.state_dict`
(:class:`lightning_compress.pruning.movement.MovementScore`). Knows nothing of schedules or Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_compress import layouts
from lightning_compress.pruning.masks import (
    CHUNK,
    LOCAL,
    Collective,
    Part,
    ScoreSource,
    apply_masks,
    count_to_prune,
    new_mask,
    prune_smallest,
    update_unstructured,
    whole,
)

if TYPE_CHECKING:
    from lightning_compress.pruning.pruner import Pruner


class Score:
    """How a :class:`~lightning_compress.pruning.pruner.Pruner` grows its masks to a target sparsity.

    The default grows masks entry by entry: :meth:`source` gives each entry's score (non-negative; lowest pruned
    first) and the pruner's scope says whether one threshold covers all tensors. Structured scores override
    :meth:`grow`.
    """

    def grow(self, pruner: Pruner, target: float) -> None:
        """Grow ``pruner``'s masks (its local tensors' masks, in place) to ``target`` sparsity."""
        weights = pruner.weights()
        source = self.source(weights, pruner.parts)
        update_unstructured(weights, pruner.mask_tensors, target, source, pruner.scope, pruner.parts, pruner.collective)

    def source(self, weights: Sequence[Tensor], parts: Sequence[Part]) -> ScoreSource:
        """The scores of the entries of ``weights`` (local tensors, each the ``parts`` of a full one)."""
        raise NotImplementedError(f"{type(self).__name__} grows masks its own way; it has no per-entry scores")

    def bind(self, pruner: Pruner) -> None:
        """Called once by the :class:`~lightning_compress.pruning.pruner.Pruner` that owns this score, when it is
        built (a score with state per weight allocates it here, beside the pruner's local tensors)."""

    def before_step(self, pruner: Pruner, held: Sequence[int]) -> None:
        """Called once per optimizer step once the pruner is attached to the optimizer, when the step's gradients
        are final (after the optimizer's closure, when it is given one) and before the weights change, with the
        positions (in ``pruner.names``) of the parameters that optimizer updates: a score accumulated during
        training updates itself here. Nothing, for scores computed from the weights at each update."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to continue the same sequence of masks."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (keys it does not know are ignored)."""


class MagnitudeScore(Score):
    """``|w|``: the smallest weights go first (``l1_unstructured``)."""

    def source(self, weights: Sequence[Tensor], parts: Sequence[Part]) -> ScoreSource:
        return l1_scores(weights)


class RandomScore(Score):
    """Uniform random scores (``random_unstructured``), reproducible from ``generator`` (a CPU generator, or a seed):
    its state is the score's checkpoint state (``"generator"``)."""

    def __init__(self, generator: torch.Generator | int = 0) -> None:
        if isinstance(generator, bool) or not isinstance(generator, (int, torch.Generator)):
            raise TypeError(f"RandomScore(generator=...) takes a seed (int) or a torch.Generator, got {generator!r}")
        self.generator = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator

    def source(self, weights: Sequence[Tensor], parts: Sequence[Part]) -> ScoreSource:
        return random_scores(weights, self.generator, parts)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])


class LnStructuredScore(Score):
    """Whole slices along a dimension, by their Ln norm (``ln_structured``), each tensor on its own.

    Args:
        norm: the ``n`` of the Ln norm (``math.inf`` allowed).
        dims: the stored dimension whose slices are pruned, one for all tensors or one per tensor (see
            :func:`lightning_compress.layouts.storage_dim` for weights stored input-first).
    """

    def __init__(self, norm: float = 2, dims: int | Sequence[int] = 0) -> None:
        self.norm, self.dims = float(norm), dims

    def grow(self, pruner: Pruner, target: float) -> None:
        dims = [self.dims] * len(pruner.names) if isinstance(self.dims, int) else list(self.dims)
        if len(dims) != len(pruner.names):
            raise ValueError(f"LnStructuredScore(dims=...) gives {len(dims)} dims for {len(pruner.names)} parameters")
        for (name, param), dim in zip(pruner.parameters.items(), dims):
            check_slices({name: param}, dim)
        parts = None if pruner.collective is LOCAL else pruner.parts
        update_structured(pruner.weights(), pruner.mask_tensors, target, self.norm, self.dims, parts, pruner.collective)


def check_slices(selected: Mapping[str, Tensor], dim: int) -> None:
    """``ln_structured`` prunes slices of weight matrices: every selected parameter needs 2+ dimensions and ``dim``
    in range (a ``ValueError`` naming the parameter and the fix, before training)."""
    for name, param in selected.items():
        if param.dim() < 2:
            raise ValueError(
                f"`method='ln_structured'` prunes slices of weight matrices, but {name!r} has shape "
                f"{tuple(param.shape)}. Narrow `parameters` (e.g. '*.weight') or add it to `exclude`."
            )
        if not -param.dim() <= dim < param.dim():
            raise ValueError(f"`dim={dim}` is out of range for parameter {name!r} of shape {tuple(param.shape)}")


def storage_dims(model: nn.Module, names: Sequence[str], dim: int) -> list[int]:
    """For each named parameter, the stored dimension that ``dim`` of the output-first layout ``(out, in, *kernel)``
    is (:mod:`lightning_compress.layouts`: ConvTranspose and ``Conv1D`` weights are stored input-first); 0 for
    vectors."""
    out_dims = layouts.output_dims(model, list(names))
    named = dict(model.named_parameters())
    return [layouts.storage_dim(dim, named[n].dim(), out_dims[n]) if named[n].dim() >= 2 else 0 for n in names]


class GroupScore(Score):
    """Coupled channels (:class:`lightning_compress.pruning.groups.ChannelGroup`), scored and pruned together in
    every member, so that :func:`lightning_compress.shrink` can remove them."""

    def __init__(self, groups: Sequence[Any], norm: float = 2) -> None:
        self.groups, self.norm = list(groups), float(norm)

    def grow(self, pruner: Pruner, target: float) -> None:
        weights = dict(zip(pruner.names, pruner.weights()))
        update_grouped(weights, dict(zip(pruner.names, pruner.mask_tensors)), self.groups, target, self.norm)


def l1_scores(weights: Sequence[Tensor]) -> ScoreSource:
    """``|w|``, computed chunk by chunk when asked."""
    flats = [w.detach().reshape(-1) for w in weights]
    return lambda i, start, stop: flats[i][start:stop].abs()


def random_scores(
    weights: Sequence[Tensor], generator: torch.Generator, parts: Sequence[Part] | None = None
) -> ScoreSource:
    """Uniform random scores in [0, 1), reproducible from ``generator`` (a CPU generator) alone.

    One seed per weight is drawn from ``generator`` now; the entries ``[c, c + CHUNK)`` of the full tensor
    (``c`` a multiple of ``CHUNK``) are drawn from a generator seeded with that seed plus ``c``. Each call thus
    regenerates the same scores without keeping them, the sequence of masks follows from the generator state
    alone (saved in checkpoints; the same on every rank), and a sharded tensor's entries get the scores they
    would get whole, whatever the ``parts``.
    """
    seeds = torch.randint(0, 2**62, (len(weights),), generator=generator).tolist()
    parts = list(parts) if parts is not None else whole(weights)

    def score(i: int, start: int, stop: int) -> Tensor:
        first, last = parts[i].offset + start, parts[i].offset + stop
        drawn = [torch.empty(0)]
        for chunk in range(first - first % CHUNK, last, CHUNK):
            size = min(CHUNK, parts[i].total - chunk)
            drawn.append(torch.rand(size, generator=torch.Generator().manual_seed(seeds[i] + chunk)))
        begin = first % CHUNK
        return torch.cat(drawn)[begin : begin + stop - start].to(weights[i].device)

    return score


def channel_norms(weight: Tensor, norm: float, dim: int) -> Tensor:
    """The Ln norm of each slice along ``dim``, computed exactly as ``torch.nn.utils.prune.ln_structured``."""
    dims = list(range(weight.dim()))
    dims.remove(dims[dim])
    return torch.norm(weight.detach(), p=norm, dim=dims)


def _slice_mask_view(mask: Tensor, dim: int) -> Tensor:
    """A vector of the mask's dtype, 1 for each slice along ``dim`` that is kept, 0 for each fully pruned slice."""
    dims = list(range(mask.dim()))
    dims.remove(dims[dim])
    if not dims:
        return (mask != 0).to(mask.dtype)
    if mask.numel() == 0:  # an empty shard holds no entry of any slice
        return torch.zeros(mask.shape[dim], dtype=mask.dtype, device=mask.device)
    return (mask != 0).any(dim=dims).to(mask.dtype)


def update_structured(
    weights: Sequence[Tensor],
    masks: Sequence[Tensor],
    sparsity: float,
    norm: float,
    dim: int | Sequence[int],
    parts: Sequence[Part] | None = None,
    collective: Collective = LOCAL,
) -> None:
    """Grow each mask to ``round(sparsity * slices)`` fully pruned slices along ``dim``, by smallest Ln norm.

    ``dim`` is a stored dimension, one for all tensors or one per tensor (the callback maps "output channels" to
    each weight's layout: see :mod:`lightning_compress.layouts`).
    Slices already pruned count first (their norm is 0); matches ``torch.nn.utils.prune.ln_structured``.
    With ``parts``, the local tensors are row blocks (dim 0) of the full ones: slices along dim 0 are whole on
    one process and pruned as the parts of one vector of norms; a slice along another dim spans processes, and
    its norm is the ``norm``-th root of the sum of the processes' partial sums of ``|w|^norm`` (the max for inf).
    """
    dims = [dim] * len(weights) if isinstance(dim, int) else list(dim)
    for w, m, part, d in zip(weights, masks, parts if parts is not None else whole(weights), dims):
        dim_ = d % w.dim()
        shape = [1] * w.dim()
        shape[dim_] = w.shape[dim_]
        slice_mask = _slice_mask_view(m, dim_)
        if parts is None:
            norms = channel_norms(w, norm, dim_)
            prune_smallest(lambda _, a, b, norms=norms: norms[a:b], [slice_mask], count_to_prune(sparsity, len(norms)))
        elif dim_ == 0:
            row = math.prod(w.shape[1:])
            rows = Part(part.offset // row if row else 0, part.total // row if row else 0, part.counted)
            norms = channel_norms(w, norm, 0)
            prune_smallest(
                lambda _, a, b, norms=norms: norms[a:b],
                [slice_mask],
                count_to_prune(sparsity, rows.total),
                [rows],
                collective,
            )
        else:
            norms = _partial_norms(w, norm, dim_, part.counted, collective)
            local_kept = slice_mask.cpu().long() if part.counted else torch.zeros(len(norms), dtype=torch.int64)
            slice_mask = collective.max(local_kept).to(m.device, m.dtype)
            prune_smallest(lambda _, a, b, norms=norms: norms[a:b], [slice_mask], count_to_prune(sparsity, len(norms)))
        m.mul_(slice_mask.view(shape))


def _partial_norms(weight: Tensor, norm: float, dim: int, counted: bool, collective: Collective) -> Tensor:
    """The Ln norm of each slice along ``dim`` of a tensor whose rows are spread over processes."""
    dims = [d for d in range(weight.dim()) if d != dim]
    values = weight.detach().abs().double()
    if math.isinf(norm):
        local = values.amax(dim=dims) if values.numel() else torch.zeros(weight.shape[dim], dtype=torch.float64)
        return collective.max(local.cpu() if counted else torch.zeros_like(local.cpu())).to(weight.dtype)
    local = values.pow(norm).sum(dim=dims)
    return collective.sum(local.cpu() if counted else torch.zeros_like(local.cpu())).pow(1 / norm).to(weight.dtype)


def update_grouped(
    params: Mapping[str, Tensor], masks: Mapping[str, Tensor], groups: Sequence[Any], sparsity: float, norm: float
) -> None:
    """Grow the masks so that ``round(sparsity * channels)`` channels of each group are pruned in every member.

    ``groups`` are :class:`lightning_compress.pruning.groups.ChannelGroup`: for each channel, the slices (along each
    parameter's channel dimension, ``group.dims``, 0 by default) of every parameter coupled to it. A channel's score
    is its slices' ``|w|^norm`` summed over all members (the max for ``norm=inf``), so coupled layers are scored
    together; channels already pruned count first and stay pruned; ties go to the lowest channel index.
    """
    for group in groups:
        dims = getattr(group, "dims", {})
        scores = torch.zeros(group.channels, dtype=torch.float64)
        pruned = torch.ones(group.channels, dtype=torch.bool)
        for name, by_channel in group.slices.items():
            weight = params[name].detach().movedim(dims.get(name, 0), 0)
            rows = weight.reshape(weight.shape[0], -1).abs().double().cpu()
            per_row = rows.amax(dim=1) if math.isinf(norm) else rows.pow(norm).sum(dim=1)
            mask = masks[name].movedim(dims.get(name, 0), 0)
            kept = (mask.reshape(mask.shape[0], -1) != 0).any(dim=1).cpu()
            for channel, rows_of_channel in enumerate(by_channel):
                value = per_row[rows_of_channel]
                scores[channel] = (
                    torch.maximum(scores[channel], value.max()) if math.isinf(norm) else (scores[channel] + value.sum())
                )
                pruned[channel] &= not bool(kept[rows_of_channel].any())
        channel_mask = torch.where(pruned, 0, -1).to(torch.int64)
        prune_smallest(
            lambda _, a, b, scores=scores: scores[a:b], [channel_mask], count_to_prune(sparsity, group.channels)
        )
        for channel in (channel_mask == 0).nonzero().flatten().tolist():
            for name, by_channel in group.slices.items():
                masks[name].movedim(dims.get(name, 0), 0)[by_channel[channel]] = 0  # a view: writes into the mask


def prune_by_magnitude(weights: Sequence[Tensor], sparsity: float, scope: str = "global") -> list[Tensor]:
    """One shot, without a Trainer or a Pruner: zero the smallest-magnitude entries of ``weights`` in place to
    ``sparsity`` (one threshold over all tensors for ``"global"``, one per tensor for ``"layerwise"``); returns the
    masks."""
    masks = [new_mask(w) for w in weights]
    update_unstructured(weights, masks, sparsity, l1_scores(weights), scope)
    apply_masks(weights, masks)
    return masks
