"""Dynamic quantization with torch.ao, as plain functions: which layers it takes (:func:`select_modules`: types,
name patterns, tied weights), the quantized copy (:func:`quantize`), what the backend refuses and why, and the
checked arguments of ``DynamicQuantization`` that say so (:class:`DynamicConfig`). Knows nothing of Lightning,
of evaluation or of artifacts.

The backend is one small function, :func:`quantize_dynamic_copy`, over ``torch.ao.quantization.quantize_dynamic``.
Why (figures in ``benchmarks/README.md``): it is the only dynamic path in torch 2.13 that covers LSTM/GRU/RNN
cells as well as Linear, and its fbgemm int8 kernels beat fp32 in eager mode on our CPU machines; torchao's
``Int8DynamicActivationInt8WeightConfig`` covers Linear only and pays off only after ``torch.compile`` there.
torch.ao is deprecated in favour of torchao, so it stays behind this seam: when torchao is the better CPU path,
only this module changes, not the public API. Static
quantization (activations calibrated ahead of time, convolutions included) is another module beside this one.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_compress import compat
from lightning_compress.artifacts.verification import short_error
from lightning_compress.compat import torch_internal_warnings_silenced
from lightning_compress.quantization import linear_like
from lightning_compress.quantization.copying import Copier

#: Float module types that dynamic quantization replaces, and nothing else: activations are quantized on the
#: fly inside these layers, so there is no separate module to quantize (ReLU, Conv2d... have no dynamic form).
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
DTYPES = {"qint8": torch.qint8, "float16": torch.float16}


@dataclasses.dataclass
class DynamicConfig:
    """``DynamicQuantization``'s own arguments (see its docstring), checked: ``dtype`` becomes its name
    (``"qint8"``/``"float16"``), ``modules`` a list (one type or pattern may be given alone)."""

    dtype: str | torch.dtype = "qint8"
    modules: Sequence[type[nn.Module] | str] | None = None
    sparse_kernels: str = "off"

    def __post_init__(self) -> None:
        by_dtype = {v: k for k, v in DTYPES.items()}
        if isinstance(self.dtype, torch.dtype) and self.dtype in by_dtype:
            self.dtype = by_dtype[self.dtype]
        if self.dtype not in DTYPES:
            raise ValueError(
                f"`dtype` must be one of {list(DTYPES)} (or torch.qint8 / torch.float16), got {self.dtype!r}"
            )
        if self.modules is not None:
            self.modules = [self.modules] if isinstance(self.modules, (str, type)) else list(self.modules)
            _check_modules(self.modules)
        if self.sparse_kernels not in ("auto", "off"):
            raise ValueError(f"`sparse_kernels` must be one of ['auto', 'off'], got {self.sparse_kernels!r}")


def _check_modules(modules: list[Any]) -> None:
    unsupported = [
        m
        for m in modules
        if not (
            isinstance(m, str)
            or (isinstance(m, type) and (m in SUPPORTED_MODULES or linear_like.is_linear_like_type(m)))
        )
    ]
    if unsupported or not modules:
        names = ", ".join(getattr(m, "__name__", repr(m)) for m in unsupported) or "an empty list"
        raise ValueError(
            f"`modules` got {names}, which dynamic quantization cannot quantize. It takes glob patterns over "
            f"module names and the layer types {_type_names(SUPPORTED_MODULES)} (and Linear layers in disguise: "
            "transformers' Conv1D, Linear subclasses that keep Linear.forward): their weights are quantized "
            "ahead of time and activations are quantized on the fly inside these layers, so other modules "
            "(ReLU, Conv2d, ...) have no dynamically quantized form. Use static quantization for convolutions."
        )


def _type_names(types: Iterable[type]) -> str:
    types = set(types)
    ordered = [t for t in SUPPORTED_MODULES if t in types] + sorted(
        (t for t in types if t not in SUPPORTED_MODULES), key=str
    )
    return ", ".join(t.__name__ for t in ordered)


def quantize_dynamic_copy(
    model: nn.Module, dtype: torch.dtype, targets: set[type[nn.Module]] | set[type[nn.Module] | str]
) -> nn.Module:
    """A dynamically quantized copy of the CPU float ``model``; ``model`` itself is left untouched.

    ``targets``: module types to quantize wherever they occur, and/or qualified names of single modules. The copy
    is made by :class:`lightning_compress.quantization.copying.Copier` (attributes that cannot be deep-copied are
    shared), and then quantized in place.
    """
    copied = Copier()(model)
    qconfig = (
        torch.ao.quantization.default_dynamic_qconfig
        if dtype == torch.qint8
        else torch.ao.quantization.float16_dynamic_qconfig
    )
    with torch_internal_warnings_silenced():
        return torch.ao.quantization.quantize_dynamic(
            copied, qconfig_spec=dict.fromkeys(targets, qconfig), dtype=dtype, inplace=True
        ).eval()


def quantizable_modules(model: nn.Module, include_tied: bool = False) -> dict[str, nn.Module]:
    """Named layers that dynamic quantization can replace (exact types, as the backend matches them), less, unless
    ``include_tied``, those whose weight is tied to another module (:func:`tied_layers`
    says why they stay float)."""
    tied = {} if include_tied else tied_layers(model)
    return {name: m for name, m in model.named_modules() if name and type(m) in SUPPORTED_MODULES and name not in tied}


def tied_layers(model: nn.Module) -> dict[str, str]:
    """Layers dynamic quantization could replace whose parameters are shared with another module, and why each
    stays float unless named in ``modules=``.

    Why float by default: a tied weight is one tensor serving two modules, most often a language model's token
    embedding and its output head (GPT-2's ``wte`` and ``lm_head``). Dynamic quantization has no form of the
    embedding's lookup, and fbgemm packs a quantized Linear's weight into a layout of its own, so quantizing the
    head stores the weight a second time beside the float embedding: a tiny GPT-2 grew (1.745 -> 1.779 MB), and
    GPT-2 small (random init) went to 0.566x of float instead of 0.488x. The head is also the layer most sensitive
    to int8 with one scale per tensor (an embedding's rows differ widely in range); as Hugging Face's
    ``TorchAoConfig`` (``include_input_output_embeddings=False``) and llama.cpp (output at higher precision) do,
    it stays float unless asked for. Asked for by name, it pays in speed where the vocabulary is large: GPT-2 small,
    1 x 128 tokens, one thread, 272.8 -> 141.5 ms. The same holds for two Linear layers sharing a weight and for
    one module registered under two names.
    """
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    modules = dict(model.named_modules(remove_duplicate=False))
    reasons = {}
    for name, module in model.named_modules():
        if not name or type(module) not in SUPPORTED_MODULES:
            continue
        for p in module.parameters(recurse=False):
            others = [n for n in owners[id(p)] if n.rpartition(".")[0] != name]
            if not others:
                continue
            partner = modules[others[0].rpartition(".")[0]]
            shared = (
                f"the same module is also used as {others[0].rpartition('.')[0]}"
                if partner is module
                else f"tied to {others[0]} ({type(partner).__name__})"
            )
            reasons[name] = f"{shared}: a quantized copy would store the weight twice (name it in modules= to do so)"
            break
    return reasons


def select_modules(
    model: nn.Module, modules: Iterable[type[nn.Module] | str] | None = None, exclude: Sequence[str] = ()
) -> list[str]:
    """Names of the layers to quantize.

    Args:
        model: the float model (a :func:`float_copy`, whose Linear layers in disguise are ``nn.Linear``).
        modules: ``None`` for every supported layer; else layer types (e.g. ``torch.nn.Linear``, or transformers'
            ``Conv1D`` for the layers converted from it) and/or glob patterns over module names (e.g.
            ``"encoder.*"``); a layer is chosen when it matches any of them. A layer whose weight is tied to another
            module is chosen only by a name pattern (the weight is then stored twice: float and quantized).
        exclude: glob patterns over module names to leave in float.

    Raises:
        ValueError: a pattern matches no quantizable layer, or nothing is left to quantize. The message lists the
            quantizable layers.
    """
    candidates = quantizable_modules(model)
    if modules is None:
        chosen = list(candidates)
    else:
        modules = list(modules)
        types = tuple(t for t in modules if isinstance(t, type))
        patterns = [p for p in modules if isinstance(p, str)]
        # asked for by name, a tied layer is quantized: faster, and its weight stored twice (float and quantized)
        named = quantizable_modules(model, include_tied=True)
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in named):
                raise ValueError(
                    f"`modules` pattern {pattern!r} matches no layer that dynamic quantization can replace. "
                    f"Quantizable layers: {_listing(named)}"
                )
        chosen = [
            name
            for name, m in named.items()
            if (name in candidates and (isinstance(m, types) or issubclass(linear_like.original_type(m), types)))
            or any(fnmatch.fnmatchcase(name, p) for p in patterns)
        ]
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in chosen):
            raise ValueError(f"`exclude` pattern {pattern!r} matches none of the layers to quantize: {chosen}")
    chosen = [name for name in chosen if not any(fnmatch.fnmatchcase(name, p) for p in exclude)]
    if not chosen:
        held = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
        tied = "".join(f" {name} stays float: {why}." for name, why in tied_layers(model).items())
        raise ValueError(
            "DynamicQuantization would quantize nothing: no layer of the model is selected. Dynamic quantization "
            f"covers {', '.join(t.__name__ for t in SUPPORTED_MODULES)} (activations are quantized on the fly inside "
            f"these layers); the model holds {', '.join(held) or 'no layers'}. Quantizable layers: "
            f"{_listing(candidates)}.{tied}"
        )
    return chosen


def quantize(model: nn.Module, dtype: torch.dtype, names: Iterable[str]) -> nn.Module:
    """A dynamically quantized copy of the CPU float ``model`` with the named layers quantized.

    ``nn.TransformerEncoderLayer``'s fused fast path reads float weights, which quantized layers no longer have:
    it is turned off on the copy (only there), so those layers run their ordinary, quantized, path.
    """
    quantized = quantize_dynamic_copy(model, dtype, set(names))
    compat.disable_transformer_fast_path(quantized)
    return quantized


def known_refusals(model: nn.Module, names: list[str]) -> dict[str, str]:
    """The named layers this backend is known not to take, with the reason (checked without running anything).

    torch.ao's dynamic RNNs need biases (``bias=False`` fails its conversion: "mod.bias must be True"), and its
    dynamic LSTM has no projection (``proj_size`` fails at the first call: "The number of rows in the packB
    should be equal to K").
    """
    modules = dict(model.named_modules())
    refused = {}
    for name in names:
        module = modules[name]
        if isinstance(module, (nn.RNNBase, nn.RNNCellBase)) and not module.bias:
            refused[name] = f"{type(module).__name__} with bias=False: torch.ao's dynamic RNN layers need biases"
        elif isinstance(module, nn.LSTM) and module.proj_size > 0:
            refused[name] = f"LSTM with proj_size={module.proj_size}: torch.ao's dynamic LSTM has no projection"
    return refused


def unconvertible_layers(model: nn.Module, names: list[str], dtype: torch.dtype) -> dict[str, str]:
    """The named layers that the backend fails to convert, each tried alone, with a short reason."""
    modules = dict(model.named_modules())
    failing = {}
    for name in names:
        try:
            quantize_dynamic_copy(nn.Sequential(modules[name]), dtype, {type(modules[name])})
        except Exception as error:
            failing[name] = f"the backend cannot convert it ({short_error(error, 160)})"
    return failing


def failing_layers(float_model: nn.Module, quantized: nn.Module, names: list[str], example: Any) -> dict[str, str]:
    """The named layers whose quantized form raises on the input its float form receives when ``float_model``
    runs on ``example`` (a :class:`lightning_compress.inputs.ModelInput`), with a short reason; layers that the
    example does not reach are not tried."""
    modules = dict(float_model.named_modules())
    received: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def record(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            received.setdefault(name, (args, kwargs))

        return hook

    handles = [modules[n].register_forward_pre_hook(record(n), with_kwargs=True) for n in names]
    try:
        with torch.inference_mode():
            example(float_model)
    finally:
        for handle in handles:
            handle.remove()
    failing = {}
    with torch.inference_mode(), torch_internal_warnings_silenced():
        for name, (args, kwargs) in received.items():
            try:
                quantized.get_submodule(name)(*args, **kwargs)
            except Exception as error:
                failing[name] = f"its quantized form fails on its input ({short_error(error, 160)})"
    return failing


def _listing(named: dict[str, nn.Module], limit: int = 30) -> str:
    names = [f"{n} ({type(m).__name__})" for n, m in named.items()]
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "none"
