"""The pruning callbacks' checkpoint state, as plain data: its version, the settings it remembers, the state that
lightning_compress 0.1 saved under another key, and what a resumed run must say when its settings changed.

A callback's state holds ``version``, ``last_index``, ``last_target``, ``settings``, the pruner's
(``masks``, and the score's own state such as ``generator``) and the accuracy guard's (``guard``, ``position``,
``snapshot``). Knows nothing of tensors' contents or of Lightning.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from typing import Any

#: The version written; version 1 (lightning_compress 0.1, without a guard) is read too.
VERSION = 2


def check_version(owner: str, state: Mapping[str, Any]) -> None:
    if state.get("version") not in (1, VERSION):
        raise ValueError(f"{owner} state version {state.get('version')!r} is not {VERSION}")


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """``"amount: 0.5 -> 0.8, ..."`` for each setting the checkpoint remembers that differs now, or ``None``."""
    changed = {k: (v, current[k]) for k, v in saved.items() if current.get(k) != v}
    if not changed:
        return None
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())


def resumed_with_other_settings(owner: str, changed: str) -> str:
    return (
        f"{owner} resumes from a checkpoint saved with other settings ({changed}). It continues from the "
        "checkpoint's masks: weights pruned so far stay pruned, and the schedule continues with the new settings (a "
        "target below the reached sparsity changes nothing)."
    )


def legacy_state(
    callback_states: Mapping[str, Any],
    prefix: str,
    parameters: Sequence[str] | None,
    exclude: Sequence[str],
    modules: Sequence[type] | None,
) -> dict[str, Any] | None:
    """The state lightning_compress 0.1 saved for the same parameters, under its key that also named the amount and
    method (``MagnitudePruning{'amount': ..., 'method': ..., 'parameters': ..., 'exclude': ...}``)."""
    for key, state in callback_states.items():
        if not key.startswith(prefix + "{") or "'amount'" not in key:
            continue
        try:
            fields = ast.literal_eval(key[len(prefix) :])
        except (ValueError, SyntaxError):
            continue
        if not isinstance(fields, dict) or modules is not None:
            continue
        if fields.get("parameters") == parameters and list(fields.get("exclude", [])) == list(exclude):
            # 0.1 saved no settings: these two are what it said, so a change is warned about as usual
            return {**state, "settings": {"amount": fields.get("amount"), "method": fields.get("method")}}
    return None


def resumed_state(
    callback_states: Mapping[str, Any], callback: Any, ours: set[str], owner: str
) -> dict[str, Any] | None:
    """The state a pruning ``callback`` resumes from when the checkpoint holds none under its own key: the state
    0.1 saved for the same parameters, else ``None``.

    Raises:
        ValueError: the checkpoint holds state of a callback of the same class that selected other parameters
            (``ours``: the state keys of this trainer's callbacks of that class); its masks cannot be continued.
    """
    prefix = type(callback).__name__  # as the state keys start
    legacy = legacy_state(callback_states, prefix, callback.parameters, callback.exclude, callback.modules)
    if legacy is not None:
        return legacy
    sibling = sibling_state(callback_states, callback.state_key, prefix)
    if sibling is not None:
        return sibling
    foreign = [key for key in callback_states if key.startswith(prefix) and key not in ours]
    if foreign:
        raise ValueError(
            f"The checkpoint holds pruning state for {foreign}, but this {owner} is {callback.state_key}: it selects "
            "other parameters, so the checkpoint's masks cannot be continued and its pruned weights would grow back. "
            "Resume with the same `parameters`, `exclude` and `modules`, or load the weights into the model yourself "
            "and start a new fit without `ckpt_path`."
        )
    return None


#: The pruning callbacks whose states another one continues from (same parameters, another score).
PRUNING_CALLBACKS = ("MagnitudePruning", "MovementPruning")


def sibling_state(callback_states: Mapping[str, Any], state_key: str, prefix: str) -> dict[str, Any] | None:
    """The state another pruning callback class saved for the same parameters (``MagnitudePruning`` when resuming
    with ``MovementPruning``, say), marked with the class it came from under ``"resumed_from"``; else ``None``.
    Its masks and schedule continue: without them the weights it pruned would grow back."""
    selection = state_key[len(prefix) :]
    for other in PRUNING_CALLBACKS:
        if other != prefix and other + selection in callback_states:
            return {**callback_states[other + selection], "resumed_from": other}
    return None


def resumed_from_another_callback(owner: str, other: str) -> str:
    return (
        f"{owner} resumes from the state {other} saved for the same parameters: it continues from its masks and "
        "schedule (weights pruned so far stay pruned) and scores the weights its own way from now on."
    )


def callback_state(settings: Mapping[str, Any], *parts: Mapping[str, Any] | None) -> dict[str, Any]:
    """A pruning callback's state: every key present (for the readers of older versions), filled from ``parts``
    (the schedule's progress, the pruner's masks and score) in that order; missing parts leave the defaults."""
    saved: dict[str, Any] = {
        "version": VERSION,
        "last_index": None,
        "last_target": 0.0,
        "generator": None,
        "masks": None,
        "settings": dict(settings),
        "guard": None,
        "position": 0,
        "snapshot": None,
    }
    for part in parts:
        saved.update(part or {})
    return saved
