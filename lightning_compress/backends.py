"""The quantization backend seam: one small function that turns a float model into a dynamically quantized copy.

Today's backend is ``torch.ao.quantization.quantize_dynamic``. Why, measured on this CPU (see
``benchmarks/README.md``): it is the only dynamic path in torch 2.13 that covers LSTM/GRU/RNN cells as well as
Linear, and its fbgemm int8 kernels run several times faster than fp32 in eager mode; torchao's
``Int8DynamicActivationInt8WeightConfig`` covers Linear only and is slower than fp32 in eager mode here (it pays
off only after ``torch.compile``). torch.ao is deprecated in favour of torchao, so it stays behind this seam:
when torchao is the better CPU path, only this module changes, not the public API.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
from torch import nn

#: Float module types that dynamic quantization replaces, and nothing else: activations are quantized on the
#: fly inside these layers, so there is no separate module to quantize (ReLU, Conv2d... have no dynamic form).
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
DTYPES = {"qint8": torch.qint8, "float16": torch.float16}

_TORCH_DIR = os.path.dirname(torch.__file__)


@contextlib.contextmanager
def torch_internal_warnings_silenced() -> Iterator[None]:
    """Drop warnings that torch raises from its own files about its own internals while we call it.

    The user did not call torch.ao or torch.jit, and can do nothing about their deprecation notices or the
    tracer's remarks on torch's quantized LSTM code. Every other warning (raised from the user's code, or by
    anything outside torch) is re-emitted unchanged.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        internal = w.filename.startswith(_TORCH_DIR) or w.filename == __file__
        if internal and issubclass(w.category, (DeprecationWarning, UserWarning, torch.jit.TracerWarning)):
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def quantize_dynamic_copy(model: nn.Module, dtype: torch.dtype, module_types: set[type[nn.Module]]) -> nn.Module:
    """A dynamically quantized copy of the CPU float ``model``; ``model`` itself is left untouched."""
    with torch_internal_warnings_silenced():
        return torch.ao.quantization.quantize_dynamic(
            model, qconfig_spec=set(module_types), dtype=dtype, inplace=False
        ).eval()
