"""The quantization backend seam: one small function that turns a float model into a dynamically quantized copy.

Today's backend is ``torch.ao.quantization.quantize_dynamic``. Why (figures in ``benchmarks/README.md``): it is
the only dynamic path in torch 2.13 that covers LSTM/GRU/RNN cells as well as Linear, and its fbgemm int8 kernels
beat fp32 in eager mode on our CPU machines; torchao's ``Int8DynamicActivationInt8WeightConfig`` covers Linear
only and pays off only after ``torch.compile`` there. torch.ao is deprecated in favour of torchao, so it stays
behind this seam: when torchao is the better CPU path, only this module changes, not the public API.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn

#: Float module types that dynamic quantization replaces, and nothing else: activations are quantized on the
#: fly inside these layers, so there is no separate module to quantize (ReLU, Conv2d... have no dynamic form).
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
DTYPES = {"qint8": torch.qint8, "float16": torch.float16}

_TORCH_DIR = os.path.dirname(torch.__file__)


# Notices that torch raises about its own APIs, which we call and the user did not.
_INTERNAL_NOTICES = re.compile(
    r"torch\.ao\.quantization is deprecated"
    r"|quantized tensor creation functions .* are deprecated"
    r"|`torch\.jit\.\w+` is deprecated"
    r"|Sparse CSR tensor support is in beta state"
    # torchmetrics' deprecated property, read by torch.jit.trace as it walks a LightningModule's metrics
    r"|Use `Metric\.updated_called` instead"
)


@contextlib.contextmanager
def torch_internal_warnings_silenced() -> Iterator[None]:
    """Drop the warnings torch raises about its own internals while we call it; re-emit every other one.

    Dropped: deprecation notices of torch.ao quantization, quantized tensor creation and torch.jit (the user did
    not call them and cannot act on them; the README says which backend we use and why), and tracer remarks
    raised inside torch's own files (its quantized LSTM code). Everything else, the user's own warnings
    included, is re-emitted unchanged.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if _INTERNAL_NOTICES.search(str(w.message)):
            continue
        if issubclass(w.category, torch.jit.TracerWarning) and w.filename.startswith(_TORCH_DIR):
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def quantize_dynamic_copy(
    model: nn.Module, dtype: torch.dtype, targets: set[type[nn.Module]] | set[type[nn.Module] | str]
) -> nn.Module:
    """A dynamically quantized copy of the CPU float ``model``; ``model`` itself is left untouched.

    ``targets``: module types to quantize wherever they occur, and/or qualified names of single modules.
    """
    qconfig = (
        torch.ao.quantization.default_dynamic_qconfig
        if dtype == torch.qint8
        else torch.ao.quantization.float16_dynamic_qconfig
    )
    with torch_internal_warnings_silenced():
        return torch.ao.quantization.quantize_dynamic(
            model, qconfig_spec=dict.fromkeys(targets, qconfig), dtype=dtype, inplace=False
        ).eval()
