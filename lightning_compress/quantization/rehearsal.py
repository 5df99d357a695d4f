"""Which validation batches the rehearsal before training runs on: those on which calls can differ.

Only what can be read without side effects is read (:func:`is_stream`): for a stream, the rehearsal takes the
batches Lightning's sanity check draws anyway, as they pass (see ``QuantizationCallback``).

A forward that loops over time steps, packs sequences or pads to the batch's longest one computes differently on
each shape, and the last batch of a dataset is usually smaller than the others: rehearsing on one batch proves
nothing about them. :func:`varied_batches` picks the first batch, the first batch of each other shape among the
first few, and the last batch; the last one is read without loading the others when the loader allows it.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from lightning_compress.inputs import signature_of

#: Batches read from the start of each loader, among which each distinct shape is rehearsed.
FIRST_BATCHES = 8


class Batches:
    """A fixed list of batches that Lightning iterates as one dataloader (a plain list would be taken for a list
    of dataloaders)."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = list(batches)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def varied_batches(loader: Iterable[Any], first: int = FIRST_BATCHES) -> list[Any]:
    """The first batch of ``loader``, the first of each other signature (structure, shapes, dtypes) among its
    first ``first`` batches, and its last batch.

    The last batch is taken from the loader's sampler and dataset when it is a ``DataLoader`` over a map-style
    dataset, or from a sequence of batches, without loading the batches between; other iterables are read to the
    end (loading only, no forward).
    """
    iterator = iter(loader)
    head = list(itertools.islice(iterator, first))
    if not head:
        return []
    chosen: dict[Any, Any] = {}
    for batch in head:
        chosen.setdefault(signature_of(batch), batch)
    batches = list(chosen.values())
    last = head[-1] if len(head) < first else _last_batch(loader, iterator)
    if last is not None and not any(last is b for b in batches):
        batches.append(last)
    return batches


def _last_batch(loader: Iterable[Any], iterator: Iterator[Any]) -> Any:
    if isinstance(loader, Sequence):
        return loader[-1] if len(loader) else None
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        dataset = loader.dataset
        if loader.batch_sampler is not None:
            indices = collections.deque(loader.batch_sampler, maxlen=1)
            if not indices:
                return None
            getitems = getattr(dataset, "__getitems__", None)
            samples = getitems(indices[0]) if getitems else [dataset[i] for i in indices[0]]
            return loader.collate_fn(samples)
        index = collections.deque(loader.sampler, maxlen=1)
        return loader.collate_fn(dataset[index[0]]) if index else None
    remaining = collections.deque(iterator, maxlen=1)
    return remaining[0] if remaining else None


def is_stream(loader: Any) -> bool:
    """Whether reading ``loader`` could change what it yields later: anything but a sequence of batches or a
    ``DataLoader`` over a map-style dataset whose sampler has no generator of its own. An ``IterableDataset`` that
    draws from its own generator, a one-shot iterator or a sampler with a ``generator=`` would give training's
    validation other batches after the rehearsal had read them (the global generators are restored, these are not).
    """
    if isinstance(loader, (Sequence, Batches)):
        return False
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return True
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    return any(getattr(sampler, "generator", None) is not None for sampler in samplers)


def streams(loaders: Any) -> list[str]:
    """Descriptions of the loaders among ``loaders`` (one, a list or a dict of them) that are streams
    (:func:`is_stream`), e.g. ``"DataLoader over Stream (an IterableDataset)"``."""
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if not (isinstance(loaders, (list, tuple)) and loaders and all(isinstance(x, DataLoader) for x in loaders)):
        loaders = [loaders]
    return [_describe_loader(loader) for loader in loaders if is_stream(loader)]


def _describe_loader(loader: Any) -> str:
    if not isinstance(loader, DataLoader):
        return f"a {type(loader).__name__}"
    if isinstance(loader.dataset, IterableDataset):
        return f"a DataLoader over {type(loader.dataset).__name__} (an IterableDataset)"
    return "a DataLoader whose sampler has a generator of its own"


def varied_loaders(loaders: Any) -> Any:
    """:func:`varied_batches` of each loader, in the same container (one loader, a list or a dict of them)."""
    if isinstance(loaders, (list, tuple)) and loaders and all(isinstance(x, DataLoader) for x in loaders):
        return [Batches(varied_batches(x)) for x in loaders]
    if isinstance(loaders, dict):
        return {k: Batches(varied_batches(v)) for k, v in loaders.items()}
    return Batches(varied_batches(loaders))
