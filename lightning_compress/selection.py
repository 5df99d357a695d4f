"""Which parameters to prune: default layer types, include/exclude glob patterns, clear errors."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

#: Module types whose weights are pruned by default, with the parameter names that count as weights.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.LSTM,
    nn.GRU,
    nn.RNN,
)
_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)


def _is_default_weight(module: nn.Module, param_name: str) -> bool:
    if isinstance(module, _RECURRENT):
        return param_name.startswith(("weight_ih", "weight_hh"))
    return isinstance(module, DEFAULT_LAYER_TYPES) and param_name == "weight"


def default_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the weights pruned when ``parameters=None``.

    Every ``weight`` of Linear and Conv1d/2d/3d, and ``weight_ih*``/``weight_hh*`` of LSTM/GRU/RNN.
    Biases are never included.
    """
    names = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not _is_default_weight(module, param_name):
                continue
            seen.add(id(param))
            names.append(f"{module_name}.{param_name}" if module_name else param_name)
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return sorted((n for n in names if n in order), key=order.__getitem__)


def select_parameters(
    model: nn.Module,
    parameters: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, nn.Parameter]:
    """Select the parameters to prune, in ``model.named_parameters()`` order.

    Args:
        model: the model.
        parameters: ``None`` for the default weights (see :func:`default_parameter_names`), or glob
            patterns (``fnmatch``) over ``model.named_parameters()`` names, e.g. ``["net.*.weight"]``.
        exclude: glob patterns removed from the selection.

    Raises:
        ValueError: a pattern matches nothing, a selected parameter is not floating point, or the selection
            is empty. The message lists the names that can be pruned.
    """
    named = dict(model.named_parameters())
    if parameters is None:
        candidates = default_parameter_names(model)
    else:
        candidates = []
        for pattern in parameters:
            matched = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise ValueError(
                    f"`parameters` pattern {pattern!r} matches no parameter of the model. "
                    f"Parameters that can be pruned: {_listing(named)}"
                )
            candidates.extend(m for m in matched if m not in candidates)
        order = {n: i for i, n in enumerate(named)}
        candidates.sort(key=order.__getitem__)
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in candidates):
            raise ValueError(f"`exclude` pattern {pattern!r} matches none of the selected parameters {candidates}")
    selected = [n for n in candidates if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    if not selected:
        raise ValueError(
            "The selection of parameters to prune is empty "
            f"(parameters={list(parameters) if parameters is not None else None}, exclude={list(exclude)}). "
            f"Parameters that can be pruned: {_listing(named)}"
        )
    for name in selected:
        if not named[name].is_floating_point():
            raise ValueError(
                f"Parameter {name!r} has dtype {named[name].dtype}; only floating point weights can be pruned"
            )
    return {name: named[name] for name in selected}


def _listing(named: dict[str, nn.Parameter], limit: int = 50) -> str:
    names = [f"{n} {tuple(p.shape)}" for n, p in named.items()]
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "(the model has no parameters)"
