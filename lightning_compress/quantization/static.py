"""Static int8 quantization with torchao's PT2E: export, prepare, calibrate, convert; and what each layer became.

The flow (``torch.ao.quantization.quantize_pt2e`` is gone in torch 2.13; torchao is the maintained path):
:func:`export` (``torch.export`` with a dynamic batch dimension and the dimensions that vary among the inputs) →
:func:`separate_call_sites` (a module called at several places, such as one ``nn.ReLU`` used twice in a residual
block, becomes one module per call site in the exported copy; torchao's X86 quantizer otherwise raises "Input
partition has more than one output node") → :func:`prepare` (``X86InductorQuantizer``, per-channel int8 weights,
per-tensor uint8 activations) → calibration (the caller runs real inputs through the prepared program) →
:func:`convert` (``convert_pt2e``, then the float weights it leaves attached are stripped) → a
:class:`~lightning_compress.artifacts.exported.CompiledProgram`, compiled with freezing at its first call of each
shape. :func:`int8_layers` reads off the converted graph which convolutions and Linear layers run in int8.

Plain PyTorch and torchao (imported on first use): knows nothing of Lightning or callbacks.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import importlib.util
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_compress import compat
from lightning_compress.artifacts.exported import STATIC_HINT, CompiledProgram, import_int8_lowerings
from lightning_compress.artifacts.verification import short_error
from lightning_compress.inputs import ModelInput

BACKENDS = ("x86_inductor",)
#: The layers static int8 quantization takes (their weights run in int8 once quantized).
SUPPORTED_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_INT8_OPS = {"conv1d", "conv2d", "conv3d", "linear"}
EXPORT_FIX = (
    "Static quantization captures the forward with torch.export: it needs tensors in and out, no Python branch or "
    "loop on tensor values (use torch.cond, or move it out of forward), no .item()/.tolist()/numpy on tensors in "
    "forward. Make forward exportable, or use DynamicQuantization (no export needed)"
)


@dataclasses.dataclass
class StaticConfig:
    """``StaticQuantization``'s own arguments, checked (see its docstring)."""

    modules: Sequence[type[nn.Module] | str] | None = None
    calibration_batches: int = 32
    backend: str = "x86_inductor"

    def __post_init__(self) -> None:
        if self.modules is not None:
            if isinstance(self.modules, (str, type)):
                self.modules = [self.modules]
            if not all(isinstance(m, str) or (isinstance(m, type) and issubclass(m, nn.Module)) for m in self.modules):
                raise ValueError(f"`modules` must be None or layer types and/or glob patterns, got {self.modules!r}")
            self.modules = list(self.modules)
        calibration = self.calibration_batches
        if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 1:
            raise ValueError(f"`calibration_batches` must be a positive int (training batches), got {calibration!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {self.backend!r}")
        if importlib.util.find_spec("torchao") is None:
            raise ValueError(f"StaticQuantization: {STATIC_HINT}")


def selected_layers(model: nn.Module, modules: Sequence[Any] | None, exclude: Sequence[str]) -> list[str]:
    """Names of the convolutions and Linear layers to quantize: every one, or those ``modules`` names (types or
    glob patterns over names), less those ``exclude`` names."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, SUPPORTED_MODULES) or any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if modules is None or any(
            (isinstance(m, str) and fnmatch.fnmatchcase(name, m)) or (isinstance(m, type) and isinstance(module, m))
            for m in modules
        ):
            names.append(name)
    return names


def dynamic_shapes(inputs: Sequence[ModelInput]) -> tuple[ModelInput, Any]:
    """The input to export on (the largest batch: ``torch.export`` specializes a dimension of size 1) and the
    dynamic shapes: the batch dimension of every tensor input, and each dimension that varies among ``inputs``
    (``Dim.AUTO``: a dimension the model fixes is specialized rather than refused)."""
    example = max(inputs, key=_batch_size)
    same = [i for i in inputs if _structure(i) == _structure(example)]
    auto = torch.export.Dim.AUTO

    def spec(value: Any, others: list[Any]) -> Any:
        if isinstance(value, torch.Tensor):
            varying = {d for d in range(1, value.dim()) if any(o.shape[d] != value.shape[d] for o in others)}
            return {d: auto for d in sorted({0, *varying} if value.dim() else varying)} or None
        if isinstance(value, (tuple, list)):
            return type(value)(spec(v, [o[i] for o in others]) for i, v in enumerate(value))
        if isinstance(value, dict):
            return {k: spec(v, [o[k] for o in others]) for k, v in value.items()}
        return None

    shapes = spec(example.args, [i.args for i in same])
    if example.kwargs:
        return example, {"args": shapes, "kwargs": spec(example.kwargs, [i.kwargs for i in same])}
    return example, shapes


def _batch_size(example: ModelInput) -> int:
    tensors = [v for v in [*example.args, *example.kwargs.values()] if isinstance(v, torch.Tensor) and v.dim()]
    return tensors[0].shape[0] if tensors else 0


def _structure(example: ModelInput) -> Any:
    def ranks(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.dim()
        if isinstance(value, (tuple, list)):
            return tuple(ranks(v) for v in value)
        if isinstance(value, dict):
            return tuple((k, ranks(v)) for k, v in value.items())
        return type(value).__name__

    return ranks(example.args), ranks(example.kwargs)


def export(model: nn.Module, inputs: Sequence[ModelInput]) -> tuple[torch.fx.GraphModule, Any]:
    """``model`` captured by ``torch.export`` (``.module()``) and its dynamic shapes; a ``ValueError`` with the cause
    and the fix when it cannot be captured."""
    example, shapes = dynamic_shapes(inputs)
    model.eval()
    try:
        with compat.torch_internal_warnings_silenced():
            if example.kwargs:
                shapes = _by_name(model, example, shapes)
            program = torch.export.export(model, example.args, example.kwargs, dynamic_shapes=shapes)
    except Exception as error:
        cause = short_error(error, 300)
        raise ValueError(f"torch.export cannot capture the model's forward ({cause}). {EXPORT_FIX}.") from error
    return program.module(), shapes


def _by_name(model: nn.Module, example: ModelInput, shapes: dict[str, Any]) -> dict[str, Any]:
    # with keyword inputs, torch.export takes dynamic shapes by forward's parameter names
    import inspect

    names = list(inspect.signature(model.forward).bind(*example.args, **example.kwargs).arguments)
    by_name = dict(zip(names, shapes["args"] or ()))
    by_name.update(shapes["kwargs"] or {})
    return by_name


def separate_call_sites(program: torch.fx.GraphModule) -> list[str]:
    """Give each call site of a module called more than once its own module name in the exported copy (the second
    call of ``block.relu`` becomes ``block.relu@1``), so that the quantizer sees one partition per call; returns the
    names of the modules that were called more than once."""
    reused = set()
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        renamed = {}
        for key, (name, kind) in stack.items():
            site = re.search(r"@(\d+)$", key)
            if site and name:
                reused.add(name)
                name = f"{name}@{site.group(1)}"
            renamed[key] = (name, kind)
        node.meta["nn_module_stack"] = renamed
    return sorted(reused)


def prepare(program: torch.fx.GraphModule, names: list[str], all_layers: list[str]) -> torch.fx.GraphModule:
    """The program with observers, for per-channel int8 weights of the ``names`` layers (``all_layers``: every
    supported layer; those not in ``names`` are left float)."""
    xiq = import_int8_lowerings()
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    for name in set(all_layers) - set(names):
        quantizer.set_module_name_qconfig(name, None)
    try:
        with compat.torch_internal_warnings_silenced(), warnings.catch_warnings():
            # torchao says, with its whole config's repr (~1.2 kB), that a pooling layer after a float one stays
            # float; the summary's rows say what each layer ran as
            warnings.filterwarnings("ignore", message=r"The input of \w+ is not quantized, skip annotate")
            return prepare_pt2e(program, quantizer)
    except Exception as error:
        raise ValueError(
            "torchao's prepare_pt2e (X86InductorQuantizer) cannot annotate the exported model "
            f"({short_error(error, 300)}). "
            "Leave the layer at fault in float with `exclude=[...]`, or use DynamicQuantization"
        ) from error


@torch.no_grad()
def calibrate(prepared: nn.Module, inputs: Sequence[ModelInput]) -> None:
    """Run ``inputs`` through the observers of a prepared program (activation ranges are recorded)."""
    for example in inputs:
        example(prepared)


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``convert_pt2e``, then the float weights it leaves attached beside the int8 ones removed."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    with compat.torch_internal_warnings_silenced():
        converted = convert_pt2e(prepared)
    used = {node.target for node in converted.graph.nodes if node.op == "get_attr"}
    for name, _ in [*converted.named_parameters(), *converted.named_buffers()]:
        if name not in used:
            owner, _, attribute = name.rpartition(".")
            delattr(converted.get_submodule(owner) if owner else converted, attribute)
    return converted


def int8_layers(converted: torch.fx.GraphModule) -> list[str]:
    """The layers whose weights run in int8 in the converted program: convolutions and linear ops whose weight is
    the dequantization of an int8 per-channel constant, named as in the float model."""
    found = []
    for node in converted.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "").split(".")[0] not in _INT8_OPS:
            continue
        weight = node.args[1] if len(node.args) > 1 else None
        if not isinstance(weight, torch.fx.Node) or "dequantize_per_channel" not in str(weight.target):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            name = re.sub(r"@\d+$", "", list(stack.values())[-1][0])
            if name not in found:
                found.append(name)
    return found


def quantized_module(float_model: nn.Module, program: CompiledProgram) -> nn.Module:
    """A shell of ``float_model`` whose forward runs ``program``: its own methods (``validation_step``, ...) and its
    parameterless submodules (metrics) are kept, its weights are not (they are in the program)."""
    shell = copy.copy(float_model)
    shell._parameters, shell._buffers = {}, {}
    shell._non_persistent_buffers_set = set()
    shell._modules = {
        name: module
        for name, module in float_model._modules.items()
        if module is not None and next(module.parameters(), None) is None and next(module.buffers(), None) is None
    }
    for attribute, value in list(vars(shell).items()):
        if attribute.endswith(("hooks", "hooks_with_kwargs", "always_called")):
            setattr(shell, attribute, copy.copy(value))
    shell.int8_program = program
    shell.__dict__["forward"] = program
    compat.forget_metric_attributes(shell)
    return shell.eval()
