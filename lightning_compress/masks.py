"""The mask engine: scores, an exact k-th-smallest threshold, growing-only masks, in-place application.

Masks follow ``torch.nn.utils.prune``'s convention: nonzero keeps a weight, 0 prunes it. In memory a mask is one
byte per weight (``int8``: -1, all bits set, keeps; 0 prunes), on the weight's device. Re-applying it after every
optimizer step (:func:`apply_masks`) widens it, a slice of at most ``APPLY_CHUNK`` entries at a time, to an integer
as wide as the weight (sign extension keeps all bits set) and ANDs that into the weight's bits: exact where a
multiply is not (a pruned NaN or inf becomes 0; ``nan * 0`` is NaN), at a quarter of the steady memory of a float32
mask. Figures in ``benchmarks/README.md``. Checkpoints store masks as bool.

Selection rule (the same count and, for magnitude scores, the same entries as ``torch.nn.utils.prune``):
at target sparsity ``s`` over ``n`` candidates, ``round(s * n)`` entries end pruned (Python rounding, as
torch). Entries already pruned stay pruned and count first; the rest are the unpruned entries with the
smallest scores. Exact ties at the threshold, whose order torch leaves undefined, are broken by the
lowest index: flat index within a tensor, tensors in selection order. Masks never regrow: a target below
the current sparsity changes nothing.

The threshold is found without concatenating scores: a radix select over the scores' IEEE-754 bit
patterns (which sort like the values for non-negative floats) builds a 16-bit histogram per pass, one
tensor at a time, so extra memory is a few temporaries of the largest single tensor, not a copy of all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

#: ``scores(i, start, stop)`` is the flat chunk ``[start, stop)`` of the non-negative scores of the i-th
#: tensor, in row-major order of its entries; the same values on every call.
ScoreSource = Callable[[int, int, int], Tensor]

_RADIX_BITS = 16
# Scores are processed in chunks of this many entries: temporaries stay in cache and are reused by the
# allocator instead of being mapped afresh for every tensor (benchmarks/mask_update.py measures the update).
CHUNK = 1 << 18
# The exact k-th score is finished by sorting the entries of its radix bucket once they are at most this many.
CANDIDATE_LIMIT = 1 << 22


def count_to_prune(sparsity: float, n: int) -> int:
    """``round(sparsity * n)``, the number of entries torch.nn.utils.prune zeroes for a float amount."""
    return round(sparsity * n)


#: The dtype of every mask: one byte per weight.
MASK_DTYPE = torch.int8
# The signed integer as wide as a weight's dtype, by element size: what a mask is widened to before the AND.
_WIDE_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Masks are widened this many entries at a time: a 4 MB temporary for float32 weights, however large the tensor.
# Measured against widening whole tensors and against 2^18..2^21 (DESIGN.md): as fast as whole tensors here.
APPLY_CHUNK = 1 << 20


def new_mask(weight: Tensor) -> Tensor:
    """A mask that keeps every entry of ``weight`` (all bits set), on its device."""
    return torch.full(weight.shape, -1, dtype=MASK_DTYPE, device=weight.device)


def mask_from_bool(keep: Tensor, weight: Tensor) -> Tensor:
    """The engine's mask for ``weight`` from a bool tensor (True keeps)."""
    return keep.to(device=weight.device, dtype=MASK_DTYPE).neg_()


def _sortable_keys(scores: Tensor, mask: Tensor, wide: bool) -> Tensor:
    """Integer keys ordered as the non-negative ``scores``, 0 where ``mask`` prunes.

    ``wide``: compare as float64 (int64 keys) rather than float32 (int32 keys); float16/bfloat16 widen exactly.
    """
    masked = torch.where(mask != 0, scores, 0)
    return masked.to(torch.float64).view(torch.int64) if wide else masked.to(torch.float32).view(torch.int32)


def _narrow_prefix(
    keys: Callable[[], Iterable[Tensor]], k: int, bits: int, zeros_to_ignore: int
) -> tuple[int, int, int, int]:
    """Radix-narrow the range of the ``k``-th smallest key (1-based) until it holds at most ``CANDIDATE_LIMIT``.

    Each pass histograms the next 16 bits of the keys that share the prefix found so far (one full pass over
    the keys, one chunk at a time). ``zeros_to_ignore`` keys equal to 0 (the already pruned entries) are left
    out of the counts. Returns ``(prefix, shift, below, count)``: the k-th key satisfies
    ``key >> shift == prefix``, ``below`` keys have a smaller prefix and ``count`` keys this one.
    """
    prefix, done, below = 0, 0, 0
    while done < bits:
        width = min(_RADIX_BITS, bits - done)
        shift = bits - done - width
        hist = torch.zeros(1 << width, dtype=torch.int64)
        for key in keys():
            if done:
                key = key[(key >> (shift + width)) == prefix]
            if shift:
                key = key >> shift
            if done:
                key = key & ((1 << width) - 1)
            hist += torch.bincount(key, minlength=1 << width).cpu()
        if prefix == 0:
            hist[0] -= zeros_to_ignore
        cumulative = hist.cumsum(0)
        bucket = int(torch.searchsorted(cumulative, torch.tensor(k - below)))
        below += int(cumulative[bucket - 1]) if bucket > 0 else 0
        prefix = (prefix << width) | bucket
        done += width
        if int(hist[bucket]) <= CANDIDATE_LIMIT:
            break
    return prefix, bits - done, below, int(hist[bucket])


def prune_smallest(scores: ScoreSource, masks: Sequence[Tensor], k: int) -> None:
    """Grow ``masks`` in place so that ``max(k, already pruned)`` entries are pruned in total.

    The newly pruned entries are the unpruned ones with the smallest scores over all tensors together;
    ties at the threshold go to the lowest index (see the module docstring). ``scores`` is asked for each
    chunk two or more times and must return the same values.

    Cost: one pass per 16 bits of key needed to narrow the k-th score's bucket to ``CANDIDATE_LIMIT``
    entries (one pass for float32 weights of ordinary spread), then one pass that prunes every entry of a
    lower bucket and gathers the candidates of that bucket, which a stable sort by key (ties: by position)
    finishes exactly.
    """
    already = sum(m.numel() - int(torch.count_nonzero(m)) for m in masks)
    new = k - already
    if new <= 0:
        return
    total = sum(m.numel() for m in masks)
    if k > total:
        raise ValueError(f"cannot prune {k} entries out of {total}")
    wide = any(scores(i, 0, 0).element_size() == 8 for i in range(len(masks)))

    def chunks() -> Iterator[tuple[Tensor, Tensor]]:
        for i, mask in enumerate(masks):
            flat = mask.view(-1)
            for start in range(0, flat.numel(), CHUNK):
                stop = min(start + CHUNK, flat.numel())
                yield _sortable_keys(scores(i, start, stop), flat[start:stop], wide), flat[start:stop]

    prefix, shift, below, count = _narrow_prefix(lambda: (key for key, _ in chunks()), new, 63 if wide else 31, already)
    # Candidates go into buffers sized up front: appending many small tensors between the chunks' large
    # temporaries fragments the heap (measured: +250 MB resident on 50M weights).
    cand_keys = torch.empty(count, dtype=torch.int64 if wide else torch.int32)
    cand_position = torch.empty(count, dtype=torch.int64)  # chunk number * CHUNK + index in the chunk
    chunk_masks, filled = [], 0
    for key, flat_mask in chunks():
        high = key >> shift if shift else key
        # Multiplying by the uint8 view of the comparison beat masked_fill_ several times over (DESIGN.md).
        flat_mask.mul_((high >= prefix).view(torch.uint8).to(flat_mask.dtype))  # all-ones * 1 keeps all bits
        in_bucket = high == prefix
        if prefix == 0:
            in_bucket &= flat_mask != 0
        index = in_bucket.nonzero().squeeze(1)
        n = index.numel()
        if n:
            cand_keys[filled : filled + n] = key[index].cpu()
            cand_position[filled : filled + n] = index.cpu() + len(chunk_masks) * CHUNK
            filled += n
        chunk_masks.append(flat_mask)
    # Candidates were gathered in position order, so a stable sort by key breaks ties by lowest position.
    chosen = cand_position[torch.sort(cand_keys, stable=True).indices[: new - below]]
    chunk_of_chosen = chosen // CHUNK
    for chunk_id in torch.unique(chunk_of_chosen).tolist():
        flat_mask = chunk_masks[chunk_id]
        flat_mask[(chosen[chunk_of_chosen == chunk_id] % CHUNK).to(flat_mask.device)] = 0


def l1_scores(weights: Sequence[Tensor]) -> ScoreSource:
    """``|w|``, computed chunk by chunk when asked."""
    flats = [w.detach().reshape(-1) for w in weights]
    return lambda i, start, stop: flats[i][start:stop].abs()


def random_scores(weights: Sequence[Tensor], generator: torch.Generator) -> ScoreSource:
    """Uniform random scores in [0, 1), reproducible from ``generator`` (a CPU generator) alone.

    One seed per weight is drawn from ``generator`` now; the chunk starting at ``start`` is drawn from a
    generator seeded with that seed plus ``start``. Each call thus regenerates the same scores without
    keeping them, and the sequence of masks follows from the generator state alone (saved in checkpoints;
    the same on every DDP rank).
    """
    seeds = torch.randint(0, 2**62, (len(weights),), generator=generator).tolist()

    def score(i: int, start: int, stop: int) -> Tensor:
        chunk_generator = torch.Generator().manual_seed(seeds[i] + start)
        return torch.rand(stop - start, generator=chunk_generator).to(weights[i].device)

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
    return (mask != 0).any(dim=dims).to(mask.dtype) if dims else (mask != 0).to(mask.dtype)


def update_unstructured(
    weights: Sequence[Tensor], masks: Sequence[Tensor], sparsity: float, scores: ScoreSource, scope: str
) -> None:
    """Grow the masks to ``sparsity``: one threshold over all tensors (``"global"``) or one per tensor."""
    if scope == "global":
        n = sum(w.numel() for w in weights)
        prune_smallest(scores, masks, count_to_prune(sparsity, n))
        return
    for i, (w, m) in enumerate(zip(weights, masks)):
        prune_smallest(lambda _, a, b, i=i: scores(i, a, b), [m], count_to_prune(sparsity, w.numel()))


def update_structured(
    weights: Sequence[Tensor], masks: Sequence[Tensor], sparsity: float, norm: float, dim: int
) -> None:
    """Grow each mask to ``round(sparsity * slices)`` fully pruned slices along ``dim``, by smallest Ln norm.

    Slices already pruned count first (their norm is 0); matches ``torch.nn.utils.prune.ln_structured``.
    """
    for w, m in zip(weights, masks):
        slice_mask = _slice_mask_view(m, dim)
        norms = channel_norms(w, norm, dim)
        prune_smallest(lambda _, a, b, norms=norms: norms[a:b], [slice_mask], count_to_prune(sparsity, w.shape[dim]))
        shape = [1] * w.dim()
        shape[dim] = w.shape[dim]
        m.mul_(slice_mask.view(shape))


def update_grouped(
    params: Mapping[str, Tensor], masks: Mapping[str, Tensor], groups: Sequence[Any], sparsity: float, norm: float
) -> None:
    """Grow the masks so that ``round(sparsity * channels)`` channels of each group are pruned in every member.

    ``groups`` are :class:`lightning_compress.groups.ChannelGroup`: for each channel, the dim-0 slices of every
    parameter coupled to it. A channel's score is its slices' ``|w|^norm`` summed over all members (the max for
    ``norm=inf``), so coupled layers are scored together; channels already pruned count first and stay pruned;
    ties go to the lowest channel index.
    """
    for group in groups:
        scores = torch.zeros(group.channels, dtype=torch.float64)
        pruned = torch.ones(group.channels, dtype=torch.bool)
        for name, by_channel in group.slices.items():
            rows = params[name].detach().reshape(params[name].shape[0], -1).abs().double().cpu()
            per_row = rows.amax(dim=1) if math.isinf(norm) else rows.pow(norm).sum(dim=1)
            kept = (masks[name].reshape(masks[name].shape[0], -1) != 0).any(dim=1).cpu()
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
                masks[name].reshape(masks[name].shape[0], -1)[by_channel[channel]] = 0


@torch.no_grad()
def apply_masks(weights: Iterable[Tensor], masks: Iterable[Tensor]) -> None:
    """Set the pruned entries to exactly 0 in place: a bitwise AND of each weight's bits with its widened mask.

    Unlike ``w *= mask``, a pruned NaN or inf becomes 0. Weights must be contiguous (parameters are).
    """
    for w, m in zip(weights, masks):
        bits = w.view(_WIDE_DTYPES[w.element_size()]).view(-1)
        flat = m.view(-1)
        if bits.dtype == flat.dtype:
            bits.bitwise_and_(flat)
            continue
        for start in range(0, bits.numel(), APPLY_CHUNK):
            stop = start + APPLY_CHUNK
            bits[start:stop].bitwise_and_(flat[start:stop].to(bits.dtype))


def prune_by_magnitude(weights: Sequence[Tensor], sparsity: float, scope: str = "global") -> list[Tensor]:
    """One shot, without a Trainer: zero the smallest-magnitude entries of ``weights`` in place to ``sparsity``
    (one threshold over all tensors for ``"global"``, one per tensor for ``"layerwise"``); returns the masks."""
    masks = [new_mask(w) for w in weights]
    update_unstructured(weights, masks, sparsity, l1_scores(weights), scope)
    apply_masks(weights, masks)
    return masks
