"""The rehearsal of a run whose evaluation data is a stream: what it runs on and what it says it could not check.

A stream (an ``IterableDataset`` drawing from its own generator, a sampler with its own ``generator=``; see
:func:`lightning_compress.quantization.rehearsal.is_stream`) gives other batches once read: reading it before
training would change what training's validation sees, and so training (a ``ReduceLROnPlateau`` on a validation
metric, say). The rehearsal then runs on the batches Lightning's sanity check draws anyway, which the callback
captures as they pass (``num_sanity_val_steps`` of each loader), and on ``example_input_array``; what those do not
show (the stream's other shapes, its last batch's size) is checked only at the end of fit, and the info line of
:func:`rehearsal_line` says so.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from lightning_compress.inputs import signature_of
from lightning_compress.quantization.rehearsal import Batches


@dataclasses.dataclass
class SanityCapture:
    """The streams among the evaluation loaders (described; none: nothing to capture), and the batches the sanity
    check drew from the evaluation loaders (``dataloader_idx -> batches``), added as they pass."""

    streams: list[str] = dataclasses.field(default_factory=list)
    batches: dict[int, list[Any]] = dataclasses.field(default_factory=dict)
    rehearsed_on: Any = None  # the source the deferred rehearsal runs on (set while it runs)

    def add(self, dataloader_idx: int, batch: Any) -> None:
        self.batches.setdefault(dataloader_idx, []).append(batch)

    def source(self, loaders: Any, per_loader: bool) -> Any:
        """The captured batches in the form the evaluation takes (see :func:`sanity_source`)."""
        return sanity_source(loaders, self.batches, per_loader)


def sanity_source(loaders: Any, captured: dict[int, list[Any]], per_loader: bool) -> Any:
    """The captured sanity-check batches (``dataloader_idx -> batches``) in the form the evaluation takes:
    with ``per_loader`` (the module's own validation) one :class:`Batches` per loader of ``loaders`` (one, a list
    or a dict of them), else one :class:`Batches` of all of them (``(input, target)`` batches)."""
    several = isinstance(loaders, (list, tuple, dict))
    count = len(loaders) if several else 1
    if per_loader and several:
        return [Batches(captured.get(i, [])) for i in range(count)]
    return Batches(batch for i in range(count) for batch in captured.get(i, []))


def has_batches(source: Any) -> bool:
    """Whether a source of :func:`sanity_source` (or any list of :class:`Batches`) holds any batch; other sources
    (loaders) are taken to."""
    if isinstance(source, Batches):
        return len(source) > 0
    if isinstance(source, list) and all(isinstance(s, Batches) for s in source):
        return any(len(s) for s in source)
    return True


def rehearsal_line(streams: list[str], source: Any, run: Any) -> str:
    """The info line of a rehearsal that did not read the stream(s): what it ran on and what it could not check
    before training (``run``: the rehearsal's state; ``run.inputs`` are empty when nothing could be run)."""
    batches = list(source) if isinstance(source, Batches) else [b for s in source for b in s]
    shapes = len({signature_of(batch) for batch in batches})
    what = " and ".join(streams[:2]) + (f" and {len(streams) - 2} more" if len(streams) > 2 else "")
    head = (
        f"the evaluation data is a stream ({what}), which the rehearsal does not read (reading it would change what "
        "training's validation sees)"
    )
    if batches:
        return (
            f"{head}: it rehearsed on the {len(batches)} batch(es) Lightning's sanity check drew ({shapes} shape(s)). "
            "Not checked before training: the stream's other batch shapes (e.g. its last batch's size), which the "
            "end of fit evaluates and compares"
        )
    if run.inputs:
        return (
            f"{head}: the sanity check drew no batch (num_sanity_val_steps=0), so it rehearsed on "
            "example_input_array only. Not checked before training: the module's validation on the quantized model "
            "and on the artifact, and the stream's batch shapes (e.g. its last batch's size)"
        )
    return (
        f"{head}: the sanity check drew no batch (num_sanity_val_steps=0) and there is no example_input_array, so "
        "nothing was run before training; the end of fit is the first run of this work. Set `example_input_array` "
        "or keep Lightning's sanity check to rehearse it"
    )


def read_once(loaders: Any, per_loader: bool, limit: int | float) -> Any:
    """Each loader read once (its first ``limit`` batches, as Lightning's ``limit_val_batches``), kept in memory in
    the form :func:`sanity_source` gives: at the end of fit the float model, the quantized model and the artifact
    are evaluated on the same batches of a stream, which would give other batches on each pass."""
    several = isinstance(loaders, (list, tuple, dict))
    listed = list(loaders.values()) if isinstance(loaders, dict) else list(loaders) if several else [loaders]
    captured = {i: list(limited(loader, limit)) for i, loader in enumerate(listed)}
    return sanity_source(loaders, captured, per_loader)


def limited(loader: Any, limit: int | float) -> Any:
    """The batches of ``loader`` that Lightning's ``limit_val_batches=limit`` validates (an int: that many; a float:
    that fraction of a sized loader's batches, rounded down, as Lightning does)."""
    if isinstance(limit, float) and (limit >= 1.0 or not hasattr(loader, "__len__")):
        return loader
    count = limit if isinstance(limit, int) else int(len(loader) * limit)
    return itertools.islice(loader, count)
