"""Which parameters to prune: default layer types, layer types by choice, include/exclude glob patterns.

A parameter shared by several modules (an embedding tied to an output head) is one parameter: it is selected
once, under its first name in ``model.named_parameters()`` (the canonical name), and a glob that matches any of
its names selects it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

from lightning_compress.layouts import conv1d_types

#: Layer types whose weight matrices are pruned by default: the matrices that dense layers multiply by.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.LSTM,
    nn.GRU,
    nn.RNN,
    nn.MultiheadAttention,  # in_proj_weight or q/k/v_proj_weight; out_proj is a Linear and is selected as one
)
# and transformers' Conv1D (GPT-2's dense layers, weight stored (in, out)), found without importing transformers:
# see :func:`default_layer_types`.
_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def is_layer_weight(module: nn.Module, param_name: str) -> bool:
    """Whether ``param_name`` is a weight (not a bias) of ``module``, by the layer's own naming."""
    if isinstance(module, _RECURRENT):
        return param_name.startswith(("weight_ih", "weight_hh"))
    if isinstance(module, nn.MultiheadAttention):
        return param_name in _ATTENTION_WEIGHTS
    return param_name == "weight"


def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every name of each parameter, keyed by its canonical name (the first, as ``named_parameters()`` lists it)."""
    canonical: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = canonical.setdefault(id(param), name)
        aliases.setdefault(first, []).append(name)
    return aliases


def layer_weight_names(model: nn.Module, layer_types: Iterable[type[nn.Module]] = DEFAULT_LAYER_TYPES) -> list[str]:
    """Canonical names of the weights of every layer of ``layer_types``, in ``named_parameters()`` order.

    A weight shared with a layer of another type (an embedding tied to a Linear head) is included.
    """
    layer_types = tuple(layer_types)
    canonical = {id(p): n for n, p in model.named_parameters()}
    found: set[str] = set()
    for module in model.modules():
        if not isinstance(module, layer_types):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if is_layer_weight(module, param_name) and id(param) in canonical:
                found.add(canonical[id(param)])
    return [n for n in canonical.values() if n in found]


def default_layer_types() -> tuple[type[nn.Module], ...]:
    """:data:`DEFAULT_LAYER_TYPES` and, when ``transformers`` is imported, its ``Conv1D`` (see
    :mod:`lightning_compress.layouts`)."""
    return DEFAULT_LAYER_TYPES + conv1d_types()


def default_parameter_names(model: nn.Module) -> list[str]:
    """Names of the weights pruned when ``parameters=None`` and ``modules=None``.

    The weight matrices of Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, LSTM/GRU/RNN (``weight_ih*``,
    ``weight_hh*``), MultiheadAttention (``in_proj_weight`` or ``q/k/v_proj_weight``, ``out_proj.weight``) and
    ``transformers``' ``Conv1D`` (GPT-2's attention and MLP matrices), and any parameter tied to one of them.
    Biases are never included.
    """
    return layer_weight_names(model, default_layer_types())


def select_parameters(
    model: nn.Module,
    parameters: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    modules: Iterable[type[nn.Module]] | None = None,
) -> dict[str, nn.Parameter]:
    """Select the parameters to prune, by canonical name, in ``model.named_parameters()`` order.

    Args:
        model: the model.
        parameters: ``None`` for the layer weights (see :func:`default_parameter_names`), or glob patterns
            (``fnmatch``) over parameter names, e.g. ``["net.*.weight"]``; a shared parameter matches by any name.
        exclude: glob patterns removed from the selection (matched against every name of a parameter).
        modules: layer types whose weights are selected (e.g. ``{nn.Conv2d}``); with ``parameters`` too, a
            parameter must satisfy both.

    Raises:
        ValueError: a pattern matches nothing, a layer type is absent, a selected parameter is not floating point,
            or the selection is empty. The message lists the names that can be selected.
    """
    aliases = parameter_aliases(model)
    named = dict(model.named_parameters())
    if modules is not None:
        modules = tuple(modules)
        by_type = layer_weight_names(model, modules)
        if not by_type:
            present = sorted({type(m).__name__ for m in model.modules()})
            raise ValueError(
                f"`modules` {[t.__name__ for t in modules]} selects nothing: the model has no weight of those layer "
                f"types. Layer types in the model: {', '.join(present)}"
            )
    candidates = default_parameter_names(model) if modules is None else by_type
    if parameters is not None:
        matched_any: list[str] = []
        for pattern in parameters:
            matched = [n for n, names in aliases.items() if any(fnmatch.fnmatchcase(a, pattern) for a in names)]
            if not matched:
                raise ValueError(
                    f"`parameters` pattern {pattern!r} matches no parameter of the model. "
                    f"Parameters that can be pruned: {_listing(model)}"
                )
            matched_any.extend(m for m in matched if m not in matched_any)
        allowed = set(candidates) if modules is not None else None
        candidates = [n for n in named if n in matched_any and (allowed is None or n in allowed)]
    for pattern in exclude:
        if not any(_matches(aliases[n], pattern) for n in candidates):
            raise ValueError(f"`exclude` pattern {pattern!r} matches none of the selected parameters {candidates}")
    selected = [n for n in candidates if not any(_matches(aliases[n], p) for p in exclude)]
    if not selected:
        raise ValueError(
            "The selection of parameters to prune is empty "
            f"(parameters={list(parameters) if parameters is not None else None}, exclude={list(exclude)}"
            f"{', modules=' + str([t.__name__ for t in modules]) if modules is not None else ''}). "
            f"Parameters that can be pruned: {_listing(model)}"
        )
    for name in selected:
        if not named[name].is_floating_point():
            raise ValueError(
                f"Parameter {name!r} has dtype {named[name].dtype}; only floating point weights can be pruned"
            )
    return {name: named[name] for name in selected}


def matrix_numel(model: nn.Module) -> int:
    """Entries of the model's parameters with two or more dimensions, each shared parameter counted once."""
    return sum(p.numel() for p in model.parameters() if p.dim() >= 2)


def largest_unselected(model: nn.Module, selected: Iterable[str], limit: int = 5) -> list[tuple[str, int]]:
    """The largest parameters of two or more dimensions that are not selected: ``(name, numel)``, largest first."""
    chosen = set(selected)
    rest = [(n, p.numel()) for n, p in model.named_parameters() if p.dim() >= 2 and n not in chosen]
    return sorted(rest, key=lambda item: -item[1])[:limit]


def _matches(names: list[str], pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def _listing(model: nn.Module, limit: int = 50) -> str:
    names = [f"{n} {tuple(p.shape)}" for n, p in model.named_parameters(remove_duplicate=False)]
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "(the model has no parameters)"
