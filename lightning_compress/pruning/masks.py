"""The mask engine: an exact k-th-smallest threshold over any scores, growing-only masks, in-place application.
The scores themselves (magnitude, random, structured norms) are :mod:`lightning_compress.pruning.scores`; this
module knows nothing of what a score means, of schedules or of Lightning.

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

Sharded tensors: each process may hold only a :class:`Part` of each tensor (a contiguous range of its flat
entries, as FSDP2 shards dim 0). A :class:`Collective` then sums the counts and histograms and concatenates the
threshold's candidates across processes, and ties are broken by the index in the full tensor, so every process
finds the masks a single process holding the full tensors would (see :mod:`lightning_compress.pruning.sharding`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

#: ``scores(i, start, stop)`` is the flat chunk ``[start, stop)`` of the non-negative scores of the i-th
#: (local) tensor, in row-major order of its entries; the same values on every call.
ScoreSource = Callable[[int, int, int], Tensor]

_RADIX_BITS = 16
# Scores are processed in chunks of this many entries: temporaries stay in cache and are reused by the
# allocator instead of being mapped afresh for every tensor (benchmarks/mask_update.py measures the update).
CHUNK = 1 << 18
# The exact k-th score is finished by sorting the entries of its radix bucket once they are at most this many.
CANDIDATE_LIMIT = 1 << 22
# With sharded tensors the candidates are gathered onto every process and sorted there: one more pass over the
# local shards (and one more all-reduce) to narrow the bucket costs less than moving millions of them.
SHARDED_CANDIDATE_LIMIT = 1 << 16


@dataclass(frozen=True)
class Part:
    """Which entries of a full tensor a process's local tensor holds: flat entries ``[offset, offset + local numel)``
    of ``total``. ``counted=False`` marks a replica (another process holds the same entries and counts them)."""

    offset: int
    total: int
    counted: bool = True


class Collective(Protocol):
    """Reductions over the processes that hold the parts of the tensors (every process calls each one alike)."""

    def sum(self, tensor: Tensor) -> Tensor: ...

    def max(self, tensor: Tensor) -> Tensor: ...

    def cat(self, tensor: Tensor) -> Tensor: ...


class _Local:
    """One process holding whole tensors: every reduction is the identity."""

    def sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def max(self, tensor: Tensor) -> Tensor:
        return tensor

    def cat(self, tensor: Tensor) -> Tensor:
        return tensor


LOCAL: Collective = _Local()


def whole(tensors: Sequence[Tensor]) -> list[Part]:
    """The parts of tensors that a process holds entirely."""
    return [Part(0, t.numel()) for t in tensors]


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
    keys: Callable[[], Iterable[Tensor]], k: int, bits: int, zeros_to_ignore: int, collective: Collective, limit: int
) -> tuple[int, int, int, int]:
    """Radix-narrow the range of the ``k``-th smallest key (1-based) until it holds at most ``limit`` keys.

    Each pass histograms the next 16 bits of the keys that share the prefix found so far (one full pass over
    the keys, one chunk at a time). ``zeros_to_ignore`` keys equal to 0 (the already pruned entries) are left
    out of the counts. Histograms are summed over processes by ``collective`` (one all-reduce of 65,536 counts
    per pass). Returns ``(prefix, shift, below, count)``: the k-th key satisfies ``key >> shift == prefix``,
    ``below`` keys have a smaller prefix and ``count`` keys (over all processes) this one.
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
        hist = collective.sum(hist)
        if prefix == 0:
            hist[0] -= zeros_to_ignore
        cumulative = hist.cumsum(0)
        bucket = int(torch.searchsorted(cumulative, torch.tensor(k - below)))
        below += int(cumulative[bucket - 1]) if bucket > 0 else 0
        prefix = (prefix << width) | bucket
        done += width
        if int(hist[bucket]) <= limit:
            break
    return prefix, bits - done, below, int(hist[bucket])


def prune_smallest(
    scores: ScoreSource,
    masks: Sequence[Tensor],
    k: int,
    parts: Sequence[Part] | None = None,
    collective: Collective = LOCAL,
) -> None:
    """Grow ``masks`` in place so that ``max(k, already pruned)`` entries are pruned in total.

    The newly pruned entries are the unpruned ones with the smallest scores over all tensors together;
    ties at the threshold go to the lowest index (see the module docstring). ``scores`` is asked for each
    chunk two or more times and must return the same values. With ``parts`` (sharded tensors), ``k`` counts
    entries of the full tensors and ``collective`` joins the processes' counts.

    Cost: one pass per 16 bits of key needed to narrow the k-th score's bucket to ``CANDIDATE_LIMIT``
    entries (``SHARDED_CANDIDATE_LIMIT`` when sharded; one pass for float32 weights of ordinary spread), then
    one pass that prunes every entry of a lower bucket and gathers the candidates of that bucket, which a
    stable sort by key (ties: by position) finishes exactly.
    """
    parts = list(parts) if parts is not None else whole(masks)
    local_zeros = sum(m.numel() - int(torch.count_nonzero(m)) for m, p in zip(masks, parts) if p.counted)
    already = int(collective.sum(torch.tensor([local_zeros], dtype=torch.int64))[0])
    new = k - already
    if new <= 0:
        return
    total = sum(p.total for p in parts)
    if k > total:
        raise ValueError(f"cannot prune {k} entries out of {total}")
    wide = any(scores(i, 0, 0).element_size() == 8 for i in range(len(masks)))

    def chunks(counted_only: bool) -> Iterator[tuple[Tensor, Tensor, int, int]]:
        for i, mask in enumerate(masks):
            if counted_only and not parts[i].counted:
                continue
            flat = mask.view(-1)
            for start in range(0, flat.numel(), CHUNK):
                stop = min(start + CHUNK, flat.numel())
                yield _sortable_keys(scores(i, start, stop), flat[start:stop], wide), flat[start:stop], i, start

    limit = CANDIDATE_LIMIT if collective is LOCAL else SHARDED_CANDIDATE_LIMIT
    prefix, shift, below, count = _narrow_prefix(
        lambda: (key for key, *_ in chunks(True)), new, 63 if wide else 31, already, collective, limit
    )
    bases = _bases(parts)
    cand_keys, cand_position = _bucket_candidates(chunks(False), parts, bases, prefix, shift, count, wide)
    cand_keys, cand_position = collective.cat(cand_keys), collective.cat(cand_position)
    if collective is not LOCAL:  # one process gathers its candidates in position order; several interleave
        order = torch.argsort(cand_position)
        cand_keys, cand_position = cand_keys[order], cand_position[order]
    # Candidates are in position order, so a stable sort by key breaks ties by lowest position.
    chosen = torch.sort(cand_position[torch.sort(cand_keys, stable=True).indices[: new - below]]).values
    _prune_positions(masks, parts, bases, chosen)


def _bases(parts: Sequence[Part]) -> list[int]:
    """Where each tensor starts in the concatenation of the full tensors, in selection order."""
    bases = [0]
    for part in parts:
        bases.append(bases[-1] + part.total)
    return bases


def _bucket_candidates(
    chunks: Iterator[tuple[Tensor, Tensor, int, int]],
    parts: Sequence[Part],
    bases: Sequence[int],
    prefix: int,
    shift: int,
    count: int,
    wide: bool,
) -> tuple[Tensor, Tensor]:
    """One pass over the chunks: prune every unpruned entry whose key is below the threshold's bucket, and return
    the keys and flat positions of the bucket's unpruned entries (the candidates), in position order."""
    # Candidates go into buffers sized up front: appending many small tensors between the chunks' large
    # temporaries fragments the heap (measured: +250 MB resident on 50M weights). Positions are flat indices in
    # the concatenation of the full tensors, in selection order.
    cand_keys = torch.empty(count, dtype=torch.int64 if wide else torch.int32)
    cand_position = torch.empty(count, dtype=torch.int64)
    filled = 0
    for key, flat_mask, i, start in chunks:
        high = key >> shift if shift else key
        # Multiplying by the uint8 view of the comparison beat masked_fill_ several times over (DESIGN.md).
        flat_mask.mul_((high >= prefix).view(torch.uint8).to(flat_mask.dtype))  # -1 * 1 keeps all bits
        if not parts[i].counted:
            continue  # a replica: the processes that count these entries propose the candidates
        in_bucket = high == prefix
        if prefix == 0:
            in_bucket &= flat_mask != 0
        index = in_bucket.nonzero().squeeze(1)
        n = index.numel()
        if n:
            cand_keys[filled : filled + n] = key[index].cpu()
            cand_position[filled : filled + n] = index.cpu() + (bases[i] + parts[i].offset + start)
            filled += n
    return cand_keys[:filled], cand_position[:filled]


def _prune_positions(masks: Sequence[Tensor], parts: Sequence[Part], bases: Sequence[int], chosen: Tensor) -> None:
    """Prune the entries at ``chosen`` (sorted flat positions in the concatenated full tensors) this process holds."""
    for i, mask in enumerate(masks):
        low = bases[i] + parts[i].offset
        bounds = torch.searchsorted(chosen, torch.tensor([low, low + mask.numel()]))
        mine = chosen[int(bounds[0]) : int(bounds[1])] - low
        if mine.numel():
            mask.view(-1)[mine.to(mask.device)] = 0


def update_unstructured(
    weights: Sequence[Tensor],
    masks: Sequence[Tensor],
    sparsity: float,
    scores: ScoreSource,
    scope: str,
    parts: Sequence[Part] | None = None,
    collective: Collective = LOCAL,
) -> None:
    """Grow the masks to ``sparsity``: one threshold over all tensors (``"global"``) or one per tensor."""
    parts = list(parts) if parts is not None else whole(weights)
    if scope == "global":
        n = sum(p.total for p in parts)
        prune_smallest(scores, masks, count_to_prune(sparsity, n), parts, collective)
        return
    for i, (m, part) in enumerate(zip(masks, parts)):
        score = lambda _, a, b, i=i: scores(i, a, b)  # noqa: E731
        prune_smallest(score, [m], count_to_prune(sparsity, part.total), [part], collective)


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
