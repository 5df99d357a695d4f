"""Coupled channels: which slices of which parameters must be pruned together so that a channel can be removed.

A channel produced by a layer (a Linear row, a Conv filter) lives on in every layer coupled to it: the BatchNorm
after it, the other convolutions added to it by a residual connection, a depthwise convolution. Pruning it per
tensor leaves it alive elsewhere, and :func:`lightning_compress.shrink` cannot remove it. A :class:`ChannelGroup`
lists, for each channel of a root layer, the slice (along the output-channel dimension) of every producing
parameter in its group: weights, biases, BatchNorm scale and shift. The groups come from Torch-Pruning's dependency
graph, as in :mod:`lightning_compress.shrinking` (the ``[shrink]`` extra).

Not every selected weight belongs to a group that can be pruned: :func:`analyse_groups` says why for each one that
does not (its channels are normalized across channels by a GroupNorm/LayerNorm, split into attention heads, are the
model's output, are coupled with a layer the selection leaves out, or the example input does not reach it).

Plain PyTorch and Torch-Pruning: usable without a Trainer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from torch import nn

from lightning_compress import compat, layouts
from lightning_compress.inputs import ModelInput
from lightning_compress.shrinking import (
    _LAYERS,
    _PER_CHANNEL,
    Trace,
    indices_fit,
    mixes_channels,
    mixing_operation,
    trace,
)

#: Why a selected weight's channels cannot be pruned as a group: each value of :attr:`GroupAnalysis.left_out`
#: starts with one of these, followed by ``": <detail>"`` where a detail helps (the layer that mixes channels).
MIXED = "its channels run through a layer that mixes channels"
UNFOLLOWED = "its channels run through a layer groups do not follow"
UNMAPPED = "its channels are split or reshaped in a way the dependency graph cannot map back (attention heads)"
OUTPUT = "its channels are the model's output"
UNSELECTED = "its channels are coupled with a layer the selection leaves out"
UNREACHED = "the example input does not reach it"
NOT_A_ROOT = "groups follow the output channels of Linear and Conv layers only"


@dataclasses.dataclass
class ChannelGroup:
    """``slices[name][c]``: the indices, along parameter ``name``'s channel dimension ``dims.get(name, 0)`` (1 for
    the weight of a ``transformers`` ``Conv1D``, stored ``(in, out)``), that belong to channel ``c``."""

    root: str
    channels: int
    slices: dict[str, list[list[int]]]
    dims: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class GroupAnalysis:
    """The groups that can be pruned, and each selected weight in none of them with the reason
    (``"<reason>: <detail>"``, the reason one of this module's constants)."""

    groups: list[ChannelGroup]
    left_out: dict[str, str]


def analyse_groups(model: nn.Module, example_input: Any, selected: Iterable[str] | None = None) -> GroupAnalysis:
    """The coupled channel groups of ``model`` that can be pruned, among the layers whose weights are ``selected``
    (canonical parameter names; default: every weight).

    A group can be pruned when every layer producing its channels is selected, some layer consumes them, and
    nothing between mixes them (LayerNorm, GroupNorm, attention, any other layer with parameters). The model is not
    modified (a copy is traced).
    """
    copy = compat.uncompiled_copy(model).cpu().eval()
    dims = {f"{name}.weight": 1 for name in layouts.conv1d_as_linear(copy)}
    traced = trace(copy, ModelInput.from_example(example_input).to("cpu"), purpose="Pruning by groups")
    graph, names = traced.graph, {module: name for name, module in copy.named_modules()}
    canonical = {id(p): n for n, p in copy.named_parameters()}
    if selected is None:
        selected = {canonical[id(m.weight)] for m in copy.modules() if isinstance(m, _LAYERS)}
    selected = set(selected)
    groups, left_out = [], {}
    for group in graph.get_all_groups(root_module_types=_LAYERS):
        found, producers, reason = _judge(traced, group, canonical, names, selected)
        if reason is None:
            member_dims = {name: dims[name] for name in found if name in dims}
            groups.append(ChannelGroup(names[group[0].dep.target.module], len(group[0].idxs), found, member_dims))
        else:
            left_out.update({name: reason for name in producers if name in selected})
    grouped = {name for g in groups for name in g.slices}
    unreached = {id(p) for _, module in traced.unreached for p in module.parameters(recurse=False)}
    for module in copy.modules():
        for param in module.parameters(recurse=False):
            key = canonical[id(param)]
            if key in selected and key not in grouped and key not in left_out:
                why = UNREACHED if id(param) in unreached else f"{NOT_A_ROOT}: {type(module).__name__}"
                left_out[key] = why
    return GroupAnalysis(groups, left_out)


@dataclasses.dataclass
class GroupSelection:
    """What ``structure="groups"`` prunes: the groups, every parameter in them (in model order), and, when some
    selected weights are in none, the message naming them with the reasons (``expected``: only output layers,
    worth an info line rather than a warning)."""

    groups: list[ChannelGroup]
    names: list[str]
    message: str | None
    expected: bool


def select_groups(model: nn.Module, example_input: Any, selected: Iterable[str], owner: str) -> GroupSelection:
    """The prunable groups among the ``selected`` weights (canonical names) of ``model``, traced on
    ``example_input`` (``example_input_array``).

    Raises:
        ValueError: there is no example input, or no selected weight is in a group that can be pruned (the message
            gives each weight's reason and the fixes).
    """
    if example_input is None:
        raise ValueError(
            f"{owner}(structure='groups') traces the model to find coupled channels, and needs an input: "
            "set `example_input_array` on the LightningModule (a tensor, a tuple, or a dict of keyword inputs)."
        )
    selected = list(selected)
    analysis = analyse_groups(model, example_input, selected)
    members = {name for g in analysis.groups for name in g.slices}
    left_out = {name: analysis.left_out[name] for name in selected if name in analysis.left_out}  # model order
    reasons = "\n".join(f"  - {line}" for line in describe_left_out(left_out))
    if not analysis.groups:
        raise ValueError(
            f"{owner}(structure='groups') found no group of coupled channels that can be removed among the "
            f"{len(selected)} selected weights:\n{reasons}\nUse structure='tensor' to prune each weight's slices "
            "on its own, or select the layers whose channels can be removed (`parameters=`, `exclude=`)."
        )
    message = None
    if left_out:
        message = (
            f"{owner}(structure='groups') leaves {len(left_out)} selected weight(s) dense, out of the target and of "
            f"pruning/coverage, because their channels cannot be removed together:\n{reasons}"
        )
    names = [name for name, _ in model.named_parameters() if name in members]
    expected = all(why.startswith(OUTPUT) for why in left_out.values())  # an output layer: expected
    return GroupSelection(analysis.groups, names, message, expected)


def channel_groups(model: nn.Module, example_input: Any, roots: set[str] | None = None) -> list[ChannelGroup]:
    """The groups of :func:`analyse_groups` (``roots``: the selected weights)."""
    return analyse_groups(model, example_input, roots).groups


def _judge(
    traced: Trace, group: Any, canonical: dict[int, str], names: dict[Any, str], selected: set[str]
) -> tuple[dict[str, list[list[int]]], list[str], str | None]:
    """``(slices, producing weights, reason)``: the group's channel slices, the weights of the layers producing its
    channels, and why it cannot be pruned (``None`` when it can)."""
    slices: dict[str, list[list[int]]] = {}
    producers: list[str] = []
    reason: str | None = None
    consumed = False
    channels = len(group[0].idxs)
    for item in group:
        module = item.dep.target.module
        params = dict(module.named_parameters(recurse=False)) if isinstance(module, nn.Module) else {}
        if not params:
            continue  # an operation (add, reshape, activation)
        out = traced.graph.is_out_channel_pruning_fn(item.dep.handler)
        if not isinstance(module, _LAYERS + _PER_CHANNEL):
            why = MIXED if mixes_channels(module) else UNFOLLOWED
            reason = reason or f"{why}: {type(module).__name__} {names.get(module, '')!r}"
            continue
        if not out:
            consumed = consumed or isinstance(module, _LAYERS)
            continue
        if isinstance(module, _LAYERS):
            producers.append(canonical[id(module.weight)])
        if any(root is None for root in item.root_idxs):
            reason = reason or UNMAPPED
            continue
        by_channel: list[list[int]] = [[] for _ in range(channels)]
        for idx, root in zip(item.idxs, item.root_idxs):
            by_channel[root].append(idx)
        for param in params.values():
            slices.setdefault(canonical[id(param)], by_channel)
    attention = mixing_operation(group)
    if reason is None and attention is not None:
        reason = f"{MIXED}: attention ({attention})"
    if reason is None and not indices_fit(traced.graph, group):
        reason = UNMAPPED
    if reason is None and (not consumed or traced.reaches_output(group)):
        reason = OUTPUT
    left = [name for name in producers if name not in selected]
    if reason is None and left:
        reason = f"{UNSELECTED}: {', '.join(repr(n) for n in left[:3])}"
    return slices, producers, reason


def describe_left_out(left_out: dict[str, str], limit: int = 4) -> list[str]:
    """One line per reason, naming at most ``limit`` weights each (and how many more): a few lines, whatever the
    model's size."""
    by_reason: dict[str, tuple[list[str], list[str]]] = {}
    for name, why in left_out.items():
        reason, _, detail = why.partition(": ")
        names, details = by_reason.setdefault(reason, ([], []))
        names.append(name)
        if detail and detail not in details:
            details.append(detail)
    lines = []
    for reason, (names, details) in by_reason.items():
        via = f" ({', '.join(details[:limit])}{', ...' if len(details) > limit else ''})" if details else ""
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        lines.append(f"{reason}{via}: {', '.join(names[:limit])}{more}")
    return lines
