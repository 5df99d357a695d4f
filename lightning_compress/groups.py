"""Coupled channels: which slices of which parameters must be pruned together so that a channel can be removed.

A channel produced by a layer (a Linear row, a Conv filter) lives on in every layer coupled to it: the BatchNorm
after it, the other convolutions added to it by a residual connection, a depthwise convolution. Pruning it per
tensor leaves it alive elsewhere, and :func:`lightning_compress.shrink` cannot remove it. A :class:`ChannelGroup`
lists, for each channel of a root layer, the slice (along dim 0) of every producing parameter in its group: weights,
biases, BatchNorm scale and shift. The groups come from Torch-Pruning's dependency graph, as in
:mod:`lightning_compress.shrinking` (the ``[shrink]`` extra).

Plain PyTorch and Torch-Pruning: usable without a Trainer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from lightning_compress import compat
from lightning_compress.inputs import ModelInput
from lightning_compress.shrinking import _LAYERS, _PER_CHANNEL, dependency_graph


@dataclasses.dataclass
class ChannelGroup:
    """``slices[name][c]``: the indices along dim 0 of parameter ``name`` that belong to channel ``c``."""

    root: str
    channels: int
    slices: dict[str, list[list[int]]]


def channel_groups(model: nn.Module, example_input: Any, roots: set[str] | None = None) -> list[ChannelGroup]:
    """The coupled channel groups of ``model`` whose root layer's weight is in ``roots`` (default: all).

    Groups that reach the model's output (no layer consumes them) or that run through a layer mixing channels
    (LayerNorm, attention, any other layer with parameters) are left out: their channels cannot be removed.
    The model is not modified (a copy is traced).
    """
    copy = compat.uncompiled_copy(model).cpu().eval()
    graph = dependency_graph(copy, ModelInput.from_example(example_input).to("cpu"), purpose="Pruning by groups")
    names = {module: name for name, module in copy.named_modules()}
    canonical = {id(p): n for n, p in copy.named_parameters()}
    groups = []
    for group in graph.get_all_groups(root_module_types=_LAYERS):
        root = names[group[0].dep.target.module]
        if roots is not None and f"{root}.weight" not in roots:
            continue
        found = _slices(graph, group, canonical, len(group[0].idxs))
        if found:
            groups.append(ChannelGroup(root, len(group[0].idxs), found))
    return groups


def _slices(graph: Any, group: Any, canonical: dict[int, str], channels: int) -> dict[str, list[list[int]]] | None:
    slices: dict[str, list[list[int]]] = {}
    consumed = False
    for item in group:
        module = item.dep.target.module
        params = dict(module.named_parameters(recurse=False)) if isinstance(module, nn.Module) else {}
        if not params:
            continue  # an operation (add, reshape, activation)
        if not isinstance(module, _LAYERS + _PER_CHANNEL):
            return None  # mixes channels: nothing here can be removed
        if not graph.is_out_channel_pruning_fn(item.dep.handler):
            consumed = consumed or isinstance(module, _LAYERS)
            continue
        if any(root is None for root in item.root_idxs):
            return None  # an index mapping Torch-Pruning cannot trace back to the root's channels
        by_channel: list[list[int]] = [[] for _ in range(channels)]
        for idx, root in zip(item.idxs, item.root_idxs):
            by_channel[root].append(idx)
        for param in params.values():
            slices.setdefault(canonical[id(param)], by_channel)
    return slices if consumed else None
