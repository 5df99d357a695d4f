"""Standalone artifacts of quantized (or pruned float) models: writing them verified, loading them anywhere.

* :mod:`~lightning_compress.artifacts.writing`: :func:`save_quantized`, :func:`save_compressed` and
  :func:`write_verified` (each form written, reloaded from disk and compared with the model; the first that
  reproduces it is kept);
* :mod:`~lightning_compress.artifacts.loading`: :func:`load_quantized`, the one entry for every format (chosen by
  the file's header or suffix), and :func:`load_compressed`;
* :mod:`~lightning_compress.artifacts.torchscript`: the TorchScript format (trace and script forms, its header);
* :mod:`~lightning_compress.artifacts.onnx_format`: the ONNX format (the float model exported, quantized by ONNX
  Runtime; needs the ``[onnx]`` extra, imported lazily);
* :mod:`~lightning_compress.artifacts.compressed`: the compressed codec over a TorchScript archive;
* :mod:`~lightning_compress.artifacts.verification`: whether an artifact reproduces its model, and how closely;
* :mod:`~lightning_compress.artifacts.headers`: our JSON headers read as untrusted input, and :class:`ArtifactError`,
  the one error of every failure to load.

Needs only torch (and the ``[onnx]`` extra for ONNX files): a serving process imports this package without
Lightning or the training code.
"""

from lightning_compress.artifacts.headers import ArtifactError
from lightning_compress.artifacts.loading import load_compressed, load_quantized
from lightning_compress.artifacts.verification import ArtifactMismatch
from lightning_compress.artifacts.writing import Written, save_compressed, save_quantized, write_verified

__all__ = [
    "ArtifactError",
    "ArtifactMismatch",
    "Written",
    "load_compressed",
    "load_quantized",
    "save_compressed",
    "save_quantized",
    "write_verified",
]
