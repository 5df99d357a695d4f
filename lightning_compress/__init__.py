"""Lightning callbacks that make trained models smaller and faster without changing how you train.

Names are imported lazily, so that ``from lightning_compress import load_quantized`` in a serving process needs
only torch (not Lightning, not the training code), and ``Pruner`` runs in a plain torch training loop.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.4.0"

_EXPORTS = {
    "MagnitudePruning": "lightning_compress.pruning.callbacks",
    "MovementPruning": "lightning_compress.pruning.callbacks",
    "Pruner": "lightning_compress.pruning.pruner",
    "DynamicQuantization": "lightning_compress.quantization.callbacks",
    "StaticQuantization": "lightning_compress.quantization.static_callback",
    "QuantizationError": "lightning_compress.quantization.callbacks",
    "load_quantized": "lightning_compress.artifacts",
    "save_quantized": "lightning_compress.artifacts",
    "save_compressed": "lightning_compress.artifacts",
    "load_compressed": "lightning_compress.artifacts",
    "ArtifactError": "lightning_compress.artifacts",
    "shrink": "lightning_compress.shrinking",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
