"""Lightning callbacks that make trained models smaller and faster without changing how you train."""

from lightning_compress.pruning import MagnitudePruning

__all__ = ["MagnitudePruning"]
__version__ = "0.1.0"
