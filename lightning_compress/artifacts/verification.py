"""Whether an artifact reproduces the model it was made from, input by input, within a tolerance derived from the
same comparison in float. Plain PyTorch: usable without a Trainer, and without Lightning in a serving process.

Why a derived tolerance and not equality: a traced or scripted graph may order float operations differently than
eager PyTorch (tiny GPT-2: traced and eager float logits differ by about 1e-6), and dynamic int8 quantization
turns such a difference into a whole quantization step when an activation sits on a rounding boundary (about 0.01
on a few logits). So on each input, the artifact of the quantized model is compared with the quantized model, and
the same form of the float model with the float model:

* float form and float model agree exactly: the form records this input's computation exactly, and the artifact
  must agree with the quantized model to float precision (``FLOAT_RTOL`` of the output's largest magnitude);
* they differ, but within float precision: the form re-associates float operations; the artifact may then differ
  from the quantized model by what quantization itself changes on that output (the largest difference between the
  quantized and the float model there), no more;
* they differ beyond float precision, or the float form fails: the form does not reproduce the forward on this
  input (a loop or branch on the input's shape or values that a trace recorded once), whatever the quantized
  artifact gives.

Integer outputs (token ids, ...) must be equal, except where the float form already showed rounding noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.inputs import ModelInput, plain_outputs, restore_outputs

#: Float precision of an output: differences up to this fraction of its largest magnitude are float rounding.
FLOAT_RTOL = 1e-5
#: Distinct input signatures (shapes, dtypes) on which an artifact is compared with its model, at most.
MAX_COMPARED = 64


class ArtifactMismatch(RuntimeError):
    """The artifact does not reproduce its model on an input; the message names the input's shapes and how."""


class FormError(RuntimeError):
    """One artifact form cannot be made of a model; the message names the input or output at fault and the fix."""


class UnsupportedCall(RuntimeError):
    """The artifact cannot take a call the model takes; the message names the input and the fix."""


Call = Callable[[ModelInput], Any]


@dataclasses.dataclass
class Reference:
    """The float model, and a call of the same artifact form of it (see the module docstring)."""

    model: nn.Module
    form: Call


@dataclasses.dataclass
class Comparison:
    """The result of comparing an artifact with its model on one input."""

    reason: str | None  # why it does not reproduce; None when it does
    expected: Any = None  # the model's own output, as it returned it
    actual: Any = None  # the artifact's output, plain


def compare(
    model: nn.Module,
    artifact: Call,
    inputs: ModelInput,
    reference: Reference | None = None,
    tolerance: float | None = None,
) -> Comparison:
    """Compare ``artifact`` (a call that runs the artifact as ``model`` is called) with ``model`` on ``inputs``.

    Without ``reference``, the artifact must agree to float precision; with ``tolerance``, each floating output
    within that fraction of its largest magnitude (an artifact quantized by another runtime than ``model``).
    """
    where = inputs.describe()
    with torch.inference_mode():
        raw = inputs(model)
        expected = plain_outputs(raw)
        try:
            actual = plain_outputs(artifact(inputs))
        except UnsupportedCall as error:
            return Comparison(f"on inputs {where}: {error}", raw)
        except Exception as error:
            return Comparison(f"it raises on inputs {where} ({short_error(error)})", raw)
    differences = _differences(expected, actual)
    if differences is None:
        return Comparison(f"on inputs {where} its outputs have another structure or shape than the model's", raw)
    if all(d.value == 0 for d in differences):
        return Comparison(None, raw, actual)
    if tolerance is not None:
        leaves = [value for _, value in _leaves(expected)]
        tolerances, noisy, reason = [tolerance * _scale(v) for v in leaves], False, None
    else:
        tolerances, noisy, reason = _tolerances(expected, differences, inputs, reference)
    if reason is not None:
        return Comparison(reason, raw, actual)
    for difference, tolerance in zip(differences, tolerances):
        exact = not difference.floating and not noisy
        if (exact and difference.value != 0) or difference.value > tolerance:
            return Comparison(
                f"on inputs {where} its output {difference.path or '(the tensor)'} differs from the model's by "
                f"{difference.value:.3g} (tolerance {tolerance:.3g}, derived from the float model)",
                raw,
                actual,
            )
    return Comparison(None, raw, actual)


class CheckedArtifact:
    """Calls an artifact as the model's forward is called, comparing it with the model (:func:`compare`) on the
    first call of each input signature (up to ``MAX_COMPARED``), and returns its output in the types the model
    returns (a ``ModelOutput`` stays one), so the model's own validation code can run on it.

    Raises :class:`ArtifactMismatch` at the first input on which it does not reproduce.
    """

    def __init__(
        self, model: nn.Module, artifact: Call, reference: Reference | None = None, tolerance: float | None = None
    ) -> None:
        self.model, self.artifact, self.reference, self.tolerance = model, artifact, reference, tolerance
        self.templates: dict[Any, Any] = {}
        self.compared: list[str] = []
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = ModelInput(args, kwargs)
        self.calls += 1
        key = inputs.signature()
        if key not in self.templates and len(self.templates) < MAX_COMPARED:
            result = compare(self.model, self.artifact, inputs, self.reference, self.tolerance)
            if result.reason is not None:
                raise ArtifactMismatch(result.reason)
            self.templates[key] = result.expected
            self.compared.append(inputs.describe())
            return restore_outputs(result.actual, result.expected)
        with torch.inference_mode():
            actual = plain_outputs(self.artifact(inputs))
        template = self.templates.get(key, next(iter(self.templates.values()), None))
        return restore_outputs(actual, template)


def short_error(error: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of an exception, at most ``limit`` characters, tensor values left out."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    cut = first.find("tensor(")
    if cut >= 0:
        first = first[:cut] + "tensor(...)"
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


@dataclasses.dataclass
class _Difference:
    path: str
    value: float  # largest absolute difference (0/1 for non-float leaves)
    floating: bool


def _leaves(output: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(output, dict):
        return [leaf for k, v in output.items() for leaf in _leaves(v, f"{path}.{k}" if path else str(k))]
    if isinstance(output, (tuple, list)):
        return [leaf for i, v in enumerate(output) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path, output)]


def _structure(output: Any) -> Any:
    if isinstance(output, dict):
        return ("dict", tuple((k, _structure(v)) for k, v in output.items()))
    if isinstance(output, (tuple, list)):
        return ("seq", tuple(_structure(v) for v in output))
    if isinstance(output, Tensor):
        return ("tensor", tuple(output.shape), output.dtype)
    return ("value",)


def _differences(expected: Any, actual: Any) -> list[_Difference] | None:
    """Per leaf, the largest absolute difference; ``None`` when structures, shapes or dtypes differ."""
    if _structure(expected) != _structure(actual):
        return None
    found = []
    for (path, a), (_, b) in zip(_leaves(expected), _leaves(actual)):
        if isinstance(a, Tensor) and a.is_floating_point():
            if a.numel() == 0:
                value = 0.0
            elif bool(torch.isnan(a).ne(torch.isnan(b)).any()):
                value = float("inf")
            else:
                finite = ~torch.isnan(a)
                value = float((a[finite].double() - b[finite].double()).abs().max()) if bool(finite.any()) else 0.0
            found.append(_Difference(path, value, True))
        elif isinstance(a, Tensor):
            found.append(_Difference(path, 0.0 if torch.equal(a, b) else 1.0, False))
        else:
            found.append(_Difference(path, 0.0 if a == b else 1.0, False))
    return found


def _scale(value: Any) -> float:
    if isinstance(value, Tensor) and value.is_floating_point() and value.numel():
        finite = value[torch.isfinite(value)]
        return max(float(finite.abs().max()), 1e-30) if finite.numel() else 1.0
    return 1.0


def _tolerances(
    expected: Any, differences: list[_Difference], inputs: ModelInput, reference: Reference | None
) -> tuple[list[float], bool, str | None]:
    """Per leaf, the tolerance; whether the float form showed rounding noise; or why the form does not reproduce."""
    leaves = [value for _, value in _leaves(expected)]
    float_level = [FLOAT_RTOL * _scale(v) for v in leaves]
    if reference is None:
        return float_level, False, None
    with torch.inference_mode():
        float_expected = plain_outputs(inputs(reference.model))
        try:
            float_actual = plain_outputs(reference.form(inputs))
        except Exception as error:
            reason = f"the same form of the float model raises on inputs {inputs.describe()} ({short_error(error)})"
            return float_level, False, reason
    float_differences = _differences(float_expected, float_actual)
    if float_differences is None or _structure(float_expected) != _structure(expected):
        return (
            float_level,
            False,
            f"on inputs {inputs.describe()} the same form of the float model gives outputs "
            "of another structure or shape: the form recorded another computation",
        )
    float_leaves = [value for _, value in _leaves(float_expected)]
    for difference, value in zip(float_differences, float_leaves):
        if difference.floating and difference.value > FLOAT_RTOL * _scale(value):
            return (
                float_level,
                False,
                (
                    f"on inputs {inputs.describe()} the same form of the float model differs from it by "
                    f"{difference.value:.3g} at {difference.path or 'its output'}: the forward depends on its input "
                    "in a way this form did not record (a loop or branch on shapes or values)"
                ),
            )
    if all(d.value == 0 for d in float_differences):
        return float_level, False, None
    quantization_error = [
        float((q.double() - f.double()).abs().max()) if isinstance(q, Tensor) and q.is_floating_point() else 0.0
        for q, f in zip(leaves, float_leaves)
    ]
    tolerances = [
        max(level, error + d.value) for level, error, d in zip(float_level, quantization_error, float_differences)
    ]
    return tolerances, True, None


def other_shapes(model: nn.Module, inputs: ModelInput) -> list[ModelInput]:
    """Real inputs of other shapes made from ``inputs``, on which ``model`` runs: its first row alone, its rows with
    the first one appended (batch + 1), where every tensor input shares its first dimension; and its first half
    along dimension 1 (fewer time steps or tokens), where every tensor input of two or more dimensions shares it.

    A trace records the shapes of the input it ran on (``torch.zeros(1, len(x), 32)`` or a loop over
    ``x.shape[1]`` become constants); comparing it on these as well finds that on real data, whatever shapes
    validation happened to use. A candidate the model itself does not take (a forward made for one batch size, an
    image's channels) is left out.
    """
    tensors = [v for v in (*inputs.args, *inputs.kwargs.values()) if isinstance(v, Tensor)]
    if not tensors or any(t.dim() == 0 for t in tensors):
        return []
    candidates = []
    batch = tensors[0].shape[0]
    if batch >= 1 and all(t.shape[0] == batch for t in tensors):
        if batch > 1:
            candidates.append(_changed(inputs, lambda t: t[:1].clone()))
        candidates.append(_changed(inputs, lambda t: torch.cat([t, t[:1]])))
    wide = [t for t in tensors if t.dim() >= 2]
    steps = wide[0].shape[1] if wide else 0
    if steps >= 2 and all(t.shape[1] == steps for t in wide):
        candidates.append(_changed(inputs, lambda t: t[:, : steps // 2].clone() if t.dim() >= 2 else t))
    taken = []
    for candidate in candidates:
        try:
            with torch.inference_mode():
                candidate(model)
        except Exception:  # not an input this model takes: nothing to learn from it
            continue
        taken.append(candidate)
    return taken


def _changed(inputs: ModelInput, change: Callable[[Tensor], Tensor]) -> ModelInput:
    def each(value: Any) -> Any:
        return change(value) if isinstance(value, Tensor) else value

    return ModelInput(tuple(each(v) for v in inputs.args), {k: each(v) for k, v in inputs.kwargs.items()})
