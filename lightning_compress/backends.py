"""The quantization backend seam: one small function that turns a float model into a dynamically quantized copy.

Today's backend is ``torch.ao.quantization.quantize_dynamic``. Why (figures in ``benchmarks/README.md``): it is
the only dynamic path in torch 2.13 that covers LSTM/GRU/RNN cells as well as Linear, and its fbgemm int8 kernels
beat fp32 in eager mode on our CPU machines; torchao's ``Int8DynamicActivationInt8WeightConfig`` covers Linear
only and pays off only after ``torch.compile`` there. torch.ao is deprecated in favour of torchao, so it stays
behind this seam: when torchao is the better CPU path, only this module changes, not the public API.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lightning_compress.artifacts.verification import short_error
from lightning_compress.compat import torch_internal_warnings_silenced
from lightning_compress.copying import Copier

#: Float module types that dynamic quantization replaces, and nothing else: activations are quantized on the
#: fly inside these layers, so there is no separate module to quantize (ReLU, Conv2d... have no dynamic form).
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
DTYPES = {"qint8": torch.qint8, "float16": torch.float16}


def quantize_dynamic_copy(
    model: nn.Module, dtype: torch.dtype, targets: set[type[nn.Module]] | set[type[nn.Module] | str]
) -> nn.Module:
    """A dynamically quantized copy of the CPU float ``model``; ``model`` itself is left untouched.

    ``targets``: module types to quantize wherever they occur, and/or qualified names of single modules. The copy
    is made by :class:`lightning_compress.copying.Copier` (attributes that cannot be deep-copied are shared), and
    then quantized in place.
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


@contextlib.contextmanager
def naming_the_failing_layer(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Run the body; when it raises inside one of the named (quantized) layers of ``model``, raise a
    ``ValueError`` that names the innermost one and how to leave it in float (``exclude=``)."""
    active: list[str] = []
    modules = dict(model.named_modules())
    handles = []

    def entered(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            active.append(name)

        return hook

    def left(*_: Any) -> None:  # a forward hook that returns nothing leaves the output as it is
        active.pop()

    for name in names:
        handles.append(modules[name].register_forward_pre_hook(entered(name)))
        handles.append(modules[name].register_forward_hook(left))
    try:
        yield
    except Exception as error:
        if not active:
            raise
        name = active[-1]
        raise ValueError(
            f"the quantized layer {name!r} ({type(modules[name]).__name__}) fails on its input "
            f"({short_error(error, 160)}). Leave it in float with DynamicQuantization(exclude=[{name!r}])"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
