"""How a model is called: its inputs (positional and keyword), captured from real calls, and its outputs as plain
tensors. Plain PyTorch: usable without a Trainer.

Lightning's convention for an example input (``LightningModule.example_input_array``) is followed: a tensor is
one positional input, a tuple (or list) several positional inputs, a dict keyword inputs.
"""

from __future__ import annotations

import dataclasses
import inspect
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


def forward_adapter(model: nn.Module, example: ModelInput) -> tuple[nn.Module, dict[str, Any]]:
    """A module whose ``forward`` takes ``example``'s inputs as named parameters and returns :func:`plain_outputs`.

    Returns the adapter and the keyword inputs to trace it with. Positional inputs are named ``input_0``,
    ``input_1``, ...; keyword inputs keep their names. The traced module is then called as ``model`` is:
    ``traced(*example.args, **example.kwargs)``. Why: ``torch.jit.trace`` needs named parameters for keyword
    inputs (a ``forward(**inputs)`` has none), and cannot return a ``ModelOutput`` or a dataclass.
    """
    positional = [f"input_{i}" for i in range(len(example.args))]
    keywords = list(example.kwargs)
    clash = set(positional) & set(keywords)
    if clash:
        raise ValueError(f"keyword inputs {sorted(clash)} clash with the names given to positional inputs")

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        named = dict(zip(positional + keywords, args))
        named.update(kwargs)
        call_args = tuple(named.pop(name) for name in positional)
        return plain_outputs(self.model(*call_args, **named))

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, kind) for name in ["self", *positional, *keywords]]
    )
    adapter = type("TracedForward", (nn.Module,), {"forward": forward})()
    adapter.model = model
    return adapter, {**dict(zip(positional, example.args)), **example.kwargs}


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
