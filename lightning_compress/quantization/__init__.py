"""Post-training quantization at the end of ``fit``, measured: the callbacks and the plain functions under them.

* :mod:`~lightning_compress.quantization.callbacks`: ``DynamicQuantization`` (how to quantize, dynamically);
  :mod:`~lightning_compress.quantization.static_callback`: ``StaticQuantization`` (static int8 through torchao's
  PT2E, whose plain code is :mod:`~lightning_compress.quantization.static`);
* :mod:`~lightning_compress.quantization.base`: ``QuantizationCallback``, everything the callbacks share (the
  rehearsal, evaluation, figures, the artifact, the summary), and ``QuantizationError``;
* :mod:`~lightning_compress.quantization.config`: their common arguments, checked;
* :mod:`~lightning_compress.quantization.saving`: the fit's artifact, written measured;
* :mod:`~lightning_compress.quantization.copying`: the robust float copy quantization starts from;
* :mod:`~lightning_compress.quantization.linear_like`: Linear layers in disguise turned into ``nn.Linear``;
* :mod:`~lightning_compress.quantization.dynamic`: dynamic quantization with torch.ao (which layers, the backend's
  refusals); :mod:`~lightning_compress.quantization.kernels`: the per-Linear kernel choice;
* :mod:`~lightning_compress.quantization.evaluation`: the module's own validation on a copy, the inputs it feeds
  forward; :mod:`~lightning_compress.quantization.measure`: metrics, sizes, zeros;
* :mod:`~lightning_compress.quantization.figures` and :mod:`~lightning_compress.quantization.outcomes`: the
  figures before and after, and what each layer became and why;
* :mod:`~lightning_compress.quantization.rehearsal` and :mod:`~lightning_compress.quantization.isolation`: the
  batches the rehearsal before training runs on, and training left untouched by it.

The callbacks are imported on first use (``lightning_compress.quantization.DynamicQuantization``), so the plain
modules can be imported without Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_CALLBACKS = {
    "DynamicQuantization": "lightning_compress.quantization.callbacks",
    "StaticQuantization": "lightning_compress.quantization.static_callback",
    "QuantizationError": "lightning_compress.quantization.base",
    "QuantizationCallback": "lightning_compress.quantization.base",
}
__all__ = list(_CALLBACKS)


def __getattr__(name: str) -> Any:
    if name in _CALLBACKS:
        return getattr(importlib.import_module(_CALLBACKS[name]), name)
    raise AttributeError(f"module 'lightning_compress.quantization' has no attribute {name!r}")
