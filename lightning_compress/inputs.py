"""How a model is called: its inputs (positional and keyword), captured from real calls, and its outputs as plain
tensors. Plain PyTorch: usable without a Trainer.

Lightning's convention for an example input (``LightningModule.example_input_array``) is followed: a tensor is
one positional input, a tuple (or list) several positional inputs, a dict keyword inputs.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


@dataclasses.dataclass
class ModelInput:
    """One call's inputs: ``model(*args, **kwargs)``."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_example(cls, example: Any) -> ModelInput:
        """From Lightning's ``example_input_array`` convention: tensor, tuple/list of inputs, or dict of keywords."""
        if isinstance(example, ModelInput):
            return example
        if isinstance(example, Mapping):
            return cls((), dict(example))
        if isinstance(example, (tuple, list)):
            return cls(tuple(example), {})
        return cls((example,), {})

    def __call__(self, model: Callable[..., Any]) -> Any:
        return model(*self.args, **self.kwargs)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelInput:
        """On ``device``, floating tensors cast to ``dtype`` when given; tensors are copied out of inference mode."""
        return ModelInput(_map(self.args, device, dtype), _map(self.kwargs, device, dtype))

    def describe(self) -> str:
        parts = [_describe(a) for a in self.args] + [f"{k}={_describe(v)}" for k, v in self.kwargs.items()]
        return f"({', '.join(parts)})"

    def signature(self) -> tuple[Any, ...]:
        """What makes calls differ for a trace: the structure, shapes and dtypes of the inputs, and the values of
        the non-tensor ones (two batches of one signature take the same path through a shape-driven forward)."""
        return (signature_of(self.args), signature_of(self.kwargs))


def capture_inputs(model: nn.Module, run: Callable[[], Any], limit: int) -> tuple[list[ModelInput], Any]:
    """Run ``run()`` and record (up to ``limit``) the inputs ``model``'s forward receives; returns them and the result.

    Inputs are copied to the CPU, out of inference mode, so they can be reused for timing and tracing.
    """
    captured: list[ModelInput] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if len(captured) < limit:
            captured.append(ModelInput(tuple(args), dict(kwargs)))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = run()
    finally:
        handle.remove()
    # Copied here, outside the inference mode the calls may have run in, so the copies are ordinary tensors.
    return [c.to("cpu") for c in captured], result


def plain_outputs(output: Any) -> Any:
    """Outputs as TorchScript can return them: ``ModelOutput``s and other mappings become dicts of their non-None
    entries, dataclasses dicts of their fields, tuples and lists stay sequences; tensors are returned as they are."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        return {str(k): plain_outputs(v) for k, v in output.items() if v is not None}
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        fields = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
        return {k: plain_outputs(v) for k, v in fields.items() if v is not None}
    if isinstance(output, (tuple, list)):  # named tuples become plain tuples
        items = [plain_outputs(v) for v in output]
        return items if isinstance(output, list) else tuple(items)
    return output


def outputs_match(expected: Any, actual: Any, atol: float | None = None, rtol: float = 0.0) -> bool:
    """Whether two :func:`plain_outputs` match, walking dicts and sequences: tensors of the same shape, equal
    (``atol=None``) or within ``atol``/``rtol`` (``torch.allclose``); anything else compared with ``==``."""
    if isinstance(expected, Tensor):
        if not isinstance(actual, Tensor) or expected.shape != actual.shape:
            return False
        return torch.equal(expected, actual) if atol is None else torch.allclose(expected, actual, rtol, atol)
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and expected.keys() == actual.keys()
            and all(outputs_match(expected[k], actual[k], atol, rtol) for k in expected)
        )
    if isinstance(expected, (tuple, list)):
        return (
            isinstance(actual, (tuple, list))
            and len(expected) == len(actual)
            and all(outputs_match(a, b, atol, rtol) for a, b in zip(expected, actual))
        )
    return expected == actual


def named_inputs(forward: Callable[..., Any], inputs: ModelInput) -> dict[str, Any]:
    """``inputs`` by the names of ``forward``'s parameters, in its order, as an artifact takes them.

    A non-tensor input equal to its parameter's default (``mask=None``, ``temperature=1.0``) is left out: the
    call means the same without it. Inputs caught by ``*args`` are named ``input_0``, ``input_1``, ...; those
    caught by ``**kwargs`` keep their keywords. When ``forward``'s signature cannot be read, positional inputs are
    named ``input_0``, ... and keyword inputs keep their names.
    """
    try:
        signature = inspect.signature(forward)
        bound = signature.bind(*inputs.args, **inputs.kwargs)
    except (TypeError, ValueError):
        return {**{f"input_{i}": v for i, v in enumerate(inputs.args)}, **inputs.kwargs}
    kinds = {name: signature.parameters[name].kind for name in bound.arguments}
    # inputs before a `*args` are passed by position: none of them can be left out
    keep_all = any(k is inspect.Parameter.VAR_POSITIONAL and bound.arguments[n] for n, k in kinds.items())
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if kinds[name] is inspect.Parameter.VAR_POSITIONAL:
            named.update({f"input_{i}": v for i, v in enumerate(value)})
        elif kinds[name] is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif keep_all or kinds[name] is inspect.Parameter.POSITIONAL_ONLY:
            named[name] = value
        elif not _is_default(value, signature.parameters[name].default):
            named[name] = value
    return named


def forward_call(forward: Callable[..., Any], names: list[str]) -> Callable[[dict[str, Any]], tuple[tuple, dict]]:
    """How to call ``forward`` with inputs named as :func:`named_inputs` names them: a function from those named
    inputs to ``(args, kwargs)``. Positional-only parameters and those caught by ``*args`` (and every parameter
    before them) are passed by position, the others by keyword."""
    try:
        parameters = dict(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        parameters = None  # named_inputs then named every positional input input_<i>
    var_positional = parameters is None or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters.values())
    by_position = {
        n
        for n in names
        if (parameters and n in parameters and parameters[n].kind is inspect.Parameter.POSITIONAL_ONLY)
        or (var_positional and re.fullmatch(r"input_\d+", n) and not (parameters and n in parameters))
    }
    last = max((i for i, n in enumerate(names) if n in by_position), default=-1)

    def call(named: dict[str, Any]) -> tuple[tuple, dict]:
        ordered = [n for n in names if n in named]
        positional = [n for n in ordered if names.index(n) <= last]
        return tuple(named[n] for n in positional), {n: named[n] for n in ordered if n not in positional}

    return call


def forward_adapter(model: nn.Module, example: ModelInput) -> tuple[nn.Module, dict[str, Any]]:
    """A module whose ``forward`` takes ``example``'s inputs as parameters named as ``model``'s forward names
    them (:func:`named_inputs`) and returns :func:`plain_outputs`.

    Returns the adapter and the keyword inputs to trace it with. The traced module is then called as ``model``
    is, positionally or by keyword: ``traced(x, mask=m)`` for a ``forward(self, x, mask=None)``. Why:
    ``torch.jit.trace`` needs named parameters for keyword inputs (a ``forward(**inputs)`` has none), and cannot
    return a ``ModelOutput`` or a dataclass.
    """
    named = named_inputs(model.forward, example)
    names = list(named)
    to_call = forward_call(model.forward, names)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        given = dict(zip(names, args))
        given.update(kwargs)
        call_args, call_kwargs = to_call(given)
        return plain_outputs(self.model(*call_args, **call_kwargs))

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, kind) for name in ["self", *names]]
    )
    adapter = type("TracedForward", (nn.Module,), {"forward": forward})()
    adapter.model = model
    return adapter, named


def restore_outputs(plain: Any, template: Any) -> Any:
    """:func:`plain_outputs` turned back into the types of ``template`` (an output of the model itself): a dict
    becomes the ``ModelOutput``, dataclass or mapping it came from, a tuple the named tuple. What the model's own
    code (its ``validation_step``) reads from an output then reads the same from an artifact's output."""
    if isinstance(template, Tensor) or template is None:
        return plain
    if isinstance(template, Mapping) and isinstance(plain, Mapping):
        values = {k: restore_outputs(v, template.get(k)) for k, v in plain.items()}
        return values if type(template) is dict else _rebuild(type(template), values)
    if dataclasses.is_dataclass(template) and not isinstance(template, type) and isinstance(plain, Mapping):
        return type(template)(**{k: restore_outputs(v, getattr(template, k, None)) for k, v in plain.items()})
    if isinstance(template, (tuple, list)) and isinstance(plain, (tuple, list)):
        items = [restore_outputs(v, t) for v, t in zip(plain, template)]
        if hasattr(template, "_fields"):  # a named tuple
            return type(template)(*items)
        return type(template)(items) if type(template) in (tuple, list) else items
    return plain


def _rebuild(cls: type, values: dict[str, Any]) -> Any:
    try:
        return cls(**values)
    except TypeError:
        return cls(values)


def _is_default(value: Any, default: Any) -> bool:
    if default is inspect.Parameter.empty or isinstance(value, Tensor):
        return False
    if value is default:
        return True
    scalar = (bool, int, float, str)
    return type(value) is type(default) and isinstance(value, scalar) and value == default


def signature_of(value: Any) -> Any:
    """A hashable summary of nested inputs or batches: tensors by shape and dtype, scalars by value, other objects
    by type."""
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, Mapping):
        return tuple((k, signature_of(v)) for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(signature_of(v) for v in value))
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    return type(value).__qualname__


def _map(value: Any, device: torch.device | str, dtype: torch.dtype | None) -> Any:
    if isinstance(value, Tensor):
        value = value.to(device)
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        return value.clone() if value.is_inference() else value
    if isinstance(value, Mapping):
        return {k: _map(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, device, dtype) for v in value)
    return value


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    return type(value).__name__
