"""What quantization did to each layer and why, read off the float and the quantized model themselves.

* :func:`quantized_dtypes`: the layers that really run quantized in a quantized model, and their weights' dtype;
* :func:`layer_outcomes`: for every module that holds parameters, the dtype it ended with and, when it stayed
  float, the reason (:class:`LayerOutcome`);
* :func:`coverage`: the fraction of the parameters that run quantized;
* :func:`size_causes`: why a quantized model takes more bytes than the float one, each cause with its bytes.

Plain PyTorch: usable without a Trainer. Nothing here is estimated: types, dtypes and bytes are those of the two
models given.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_compress.quantization import linear_like, measure
from lightning_compress.quantization.dynamic import SUPPORTED_MODULES, tied_layers

#: What dynamic quantization covers, said once for every float row that is outside it.
COVERS = "dynamic quantization covers Linear and RNN layers"
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclasses.dataclass(frozen=True)
class LayerOutcome:
    """One module that holds parameters, as it ended in the quantized model.

    Attributes:
        name: the module's name in the model (as in ``named_modules()``).
        kind: what it is in the trained model: its type's name, or what
            :mod:`.linear_like` converted into a Linear (``"Conv1D"`` or a Linear subclass's name).
        dtype: what its weights run as in the quantized model: ``"qint8"``, ``"float16"`` (dynamically
            quantized), or the float dtype it kept (``"float32"``).
        parameters: entries of its own parameters; a parameter shared by several modules is counted once: under
            the first of them that runs quantized (a tied weight runs quantized when one layer holding it does),
            else under the first name ``named_parameters()`` gives it.
        reason: why it stayed float (``None`` when it runs quantized).
        weights: names of its own parameters of two or more dimensions (shared ones included): the rows of the
            summary table.
        as_linear: whether it was converted into an ``nn.Linear`` to be quantized.
    """

    name: str
    kind: str
    dtype: str
    parameters: int
    reason: str | None = None
    weights: tuple[str, ...] = ()
    as_linear: bool = False

    @property
    def quantized(self) -> bool:
        return self.reason is None


def quantized_dtypes(model: nn.Module) -> dict[str, str]:
    """The modules of a quantized model that run quantized (``torch.ao``'s dynamic layers), with their weights'
    dtype (``"qint8"``, ``"float16"``), read from each module."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{q}.") for q in found) or not _is_quantized(module):
            continue
        # torch.ao keeps the dtype in three places: Linear's packed params, the RNNs, the RNN cells
        packed = getattr(module, "_packed_params", None)
        dtype = getattr(packed, "dtype", None) or getattr(module, "dtype", None)
        dtype = dtype or getattr(module, "weight_dtype", None)
        found[name] = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else "quantized"
    return found


def layer_outcomes(
    float_model: nn.Module,
    quantized: nn.Module,
    modules: Sequence[type[nn.Module] | str] | None = None,
    exclude: Sequence[str] = (),
    kernel_choices: Mapping[str, Any] | None = None,
    refused: Mapping[str, str] | None = None,
) -> list[LayerOutcome]:
    """What each module of ``float_model`` that holds parameters became in ``quantized``, and why when it stayed
    float.

    ``modules``, ``exclude`` and ``kernel_choices`` are the selection and kernel choice that produced
    ``quantized`` (as given to ``DynamicQuantization``), ``refused`` the layers the backend could not take, with
    why (:func:`.dynamic.known_refusals`); they only word the reasons. Which layers run
    quantized and with which dtype is read from ``quantized`` itself.
    """
    ran = quantized_dtypes(quantized)
    tied = tied_layers(float_model)
    first_owner = _counting_owners(float_model, ran)
    outcomes = []
    for name, module in float_model.named_modules():
        own = list(module.named_parameters(recurse=False, remove_duplicate=False))
        if not own:
            continue
        prefix = f"{name}." if name else ""
        counted = sum(p.numel() for n, p in own if first_owner[id(p)] == prefix + n)
        weights = tuple(prefix + n for n, p in own if p.dim() >= 2)
        converted = linear_like.converted_from(module)
        kind = converted or type(module).__name__
        if name in ran:
            outcomes.append(LayerOutcome(name, kind, ran[name], counted, None, weights, converted is not None))
            continue
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for _, p in own})
        reason = (refused or {}).get(name) or _float_reason(name, module, modules, exclude, tied, kernel_choices or {})
        outcomes.append(LayerOutcome(name, kind, "/".join(dtypes), counted, reason, weights, converted is not None))
    return outcomes


def coverage(outcomes: Iterable[LayerOutcome]) -> float:
    """The fraction of the model's parameter entries that run quantized (shared parameters counted once)."""
    outcomes = list(outcomes)
    total = sum(o.parameters for o in outcomes)
    return sum(o.parameters for o in outcomes if o.quantized) / total if total else float("nan")


def _counting_owners(float_model: nn.Module, ran: Mapping[str, str]) -> dict[int, str]:
    """``id(parameter) -> the qualified name it is counted under``: the first module holding it that runs quantized
    (in ``ran``), else its first name. So coverage counts GPT-2's tied ``wte``/``lm_head`` weight as quantized when
    ``lm_head`` runs quantized, and once."""
    owners: dict[int, str] = {}
    for name, module in float_model.named_modules():
        prefix = f"{name}." if name else ""
        for own, p in module.named_parameters(recurse=False, remove_duplicate=False):
            if id(p) not in owners or (name in ran and owners[id(p)].rpartition(".")[0] not in ran):
                owners[id(p)] = prefix + own
    return owners


def _float_reason(
    name: str,
    module: nn.Module,
    modules: Sequence[type[nn.Module] | str] | None,
    exclude: Sequence[str],
    tied: Mapping[str, str],
    kernel_choices: Mapping[str, Any],
) -> str:
    kind = type(module).__name__
    if name in kernel_choices:
        return f"sparse_kernels='auto': {kernel_choices[name].chosen} measured faster than quantized dense here"
    if name in tied:
        return tied[name]
    if type(module) in SUPPORTED_MODULES:
        matched = [p for p in exclude if fnmatch.fnmatchcase(name, p)]
        if matched:
            return f"excluded by exclude={matched!r}"
        if modules is not None and not _selected(name, module, modules):
            return f"not selected by modules={[getattr(m, '__name__', m) for m in modules]!r}"
        return "left float by the quantization backend"
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return (
            "MultiheadAttention's out_proj: its weight is read by F.multi_head_attention_forward, not called as a "
            "Linear"
        )
    if isinstance(module, nn.MultiheadAttention):
        return "MultiheadAttention: in_proj_weight is used by F.multi_head_attention_forward, not by a Linear"
    if isinstance(module, _CONVOLUTIONS):
        return f"{kind}: {COVERS}; StaticQuantization covers convolutions"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return f"{kind}: a table lookup, not a matmul; {COVERS}"
    if isinstance(module, _NORMS):
        return f"{kind}: normalisation runs in float; {COVERS}"
    if isinstance(module, nn.Linear):
        return f"{kind} overrides Linear.forward, so it is not a plain Linear; {COVERS}"
    if list(module.children()):
        held = ", ".join(n for n, _ in module.named_parameters(recurse=False))
        return f"{kind}: {held} used directly in its forward, not by a Linear; {COVERS}"
    return f"{kind}: {COVERS}"


def _selected(name: str, module: nn.Module, modules: Sequence[type[nn.Module] | str]) -> bool:
    types = tuple(t for t in modules if isinstance(t, type))
    return (
        isinstance(module, types)
        or issubclass(linear_like.original_type(module), types)
        or any(fnmatch.fnmatchcase(name, p) for p in modules if isinstance(p, str))
    )


def _is_quantized(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.ao.nn.quantized")


# ---------------------------------------------------------------------------------------------- size
def size_causes(float_model: nn.Module, quantized: nn.Module) -> list[str]:
    """Why ``quantized`` serializes to more bytes than ``float_model``: each cause with the bytes it adds,
    largest first. Empty when no quantized layer grew.

    Causes: a quantized layer whose weight is tied to a module that stayed float (the float tensor is still
    stored, and the quantized copy comes on top); float16 layers, whose weights ``torch.ao`` serializes as float32
    (read from the layers' unpacked weights); layers too small for the packed format (scale, zero point and
    packing entries outweigh the bytes saved: the layer's quantized state serializes larger than its float one).
    A cause's bytes: ``torch.save`` of its layers' quantized states less that of the float states they replaced
    (under the layers' full names; tied tensors still stored elsewhere are not replaced), all of a cause's layers
    in one file, as in the model's file, where what pickle writes once per file (the quantized types' names) is
    written once.
    """
    float_modules = dict(float_model.named_modules())
    still_float = {n for n, _ in quantized.named_parameters(remove_duplicate=False)}
    owners: dict[int, list[str]] = {}
    for n, p in float_model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    ties: list[str] = []
    states: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {"tied": ({}, {}), "half": ({}, {}), "small": ({}, {})}
    layers: dict[str, list[str]] = {"tied": [], "half": [], "small": []}
    for name, dtype in quantized_dtypes(quantized).items():
        layer = float_modules.get(name)
        if layer is None:
            continue
        q_layer = quantized.get_submodule(name)
        tied = [
            (n, other)
            for n, p in layer.named_parameters(prefix=name)
            for other in owners[id(p)]
            if other != n and other in still_float
        ]
        # what quantizing this layer replaced: its float state, less the tied tensors, which are still stored
        kept = {n for n, _ in tied}
        after = q_layer.state_dict(prefix=f"{name}.")
        before = {k: v for k, v in layer.state_dict(prefix=f"{name}.").items() if k not in kept}
        if tied:
            cause = "tied"
            ties.append(
                f"{tied[0][0]} is tied to {tied[0][1]}, which stays float: its {dtype} copy is stored beside it"
            )
        elif dtype == "float16" and torch.float16 not in _stored_dtypes(q_layer):
            cause = "half"
        elif measure.serialized_state_bytes(after) > measure.serialized_state_bytes(before):
            cause = "small"
        else:
            continue
        states[cause][0].update(after)
        states[cause][1].update(before)
        layers[cause].append(name)
    wording = {
        "tied": "; ".join(ties),
        "half": f"torch.ao stores float16 weights as float32: {_layers(layers['half'])} save nothing and add their "
        "packing entries",
        "small": f"{_layers(layers['small'])} too small for the packed format: the scale, zero point and packing "
        "entries outweigh the bytes saved",
    }
    causes = []
    for cause, (after, before) in states.items():
        added = measure.serialized_state_bytes(after) - measure.serialized_state_bytes(before)
        if layers[cause] and added > 0:
            causes.append((added, f"{wording[cause]} (+{_bytes(added)})"))
    return [cause for _, cause in sorted(causes, key=lambda item: -item[0])]


def _stored_dtypes(module: nn.Module) -> set[torch.dtype]:
    """The dtypes a dynamically quantized layer's weights are serialized in (its unpacked weights)."""
    if callable(getattr(module, "get_weight", None)):
        weights = list(module.get_weight().values())
    elif callable(getattr(module, "weight", None)):
        weights = [module.weight()]
    else:
        return set()
    return {w.dtype for w in weights}


def _layers(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} layer{'s' if len(names) > 1 else ''} ({', '.join(names[:shown])}{more})"


def _bytes(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if abs(n) >= 100_000 else f"{n:,} bytes"
