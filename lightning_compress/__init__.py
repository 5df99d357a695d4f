"""Lightning callbacks that make trained models smaller and faster without changing how you train."""

from lightning_compress.artifact import load_quantized, save_quantized
from lightning_compress.pruning import MagnitudePruning
from lightning_compress.quantization import DynamicQuantization, QuantizationError

__all__ = ["DynamicQuantization", "MagnitudePruning", "QuantizationError", "load_quantized", "save_quantized"]
__version__ = "0.1.0"
