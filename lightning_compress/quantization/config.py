"""The arguments every quantization callback takes, checked once, as torchao checks its configs: a dataclass that
validates itself in ``__post_init__`` and raises a ``ValueError`` naming the argument and what it accepts.

The callbacks keep flat, type-hinted constructor arguments (LightningCLI reads their signatures) and build these;
what a subclass adds (``DynamicQuantization``'s ``dtype``, ``modules``, ``sparse_kernels``) has its own config
beside the code that uses it (:class:`lightning_compress.quantization.dynamic.DynamicConfig`). Knows nothing of
Lightning or of how a model is quantized.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import numbers
import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torchmetrics

from lightning_compress.artifacts import onnx_format
from lightning_compress.shrinking import SHRINK_HINT


@dataclasses.dataclass
class QuantizationConfig:
    """See ``DynamicQuantization``'s arguments of the same names. ``exclude`` given as one string is one pattern;
    ``save_path`` is kept as a string."""

    evaluate: bool = True
    metric: torchmetrics.Metric | None = None
    dataloader: Iterable[Any] | None = None
    save_path: str | os.PathLike | None = None
    baseline_accuracy: float | None = None
    compress: bool = False
    monitor: str | None = None
    exclude: Sequence[str] = ()
    shrink: bool = False
    artifact_format: Literal["torchscript", "onnx"] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        if not all(isinstance(p, str) for p in self.exclude):
            raise ValueError(f"`exclude` must be a list of glob patterns over module names (str), got {self.exclude!r}")
        self.exclude = list(self.exclude)
        if not isinstance(self.evaluate, bool):
            raise ValueError(f"`evaluate` must be True or False, got {self.evaluate!r}")
        if self.metric is not None and not isinstance(self.metric, torchmetrics.Metric):
            raise ValueError(f"`metric` must be a torchmetrics.Metric or None, got {type(self.metric).__name__}")
        loader = self.dataloader
        if loader is not None and (isinstance(loader, (str, bytes)) or not isinstance(loader, Iterable)):
            raise ValueError(f"`dataloader` must be an iterable of (input, target) batches, got {loader!r}")
        if self.compress and self.save_path is None:
            raise ValueError("`compress=True` needs `save_path`: it is the format of the saved artifact")
        self.save_path = os.fspath(self.save_path) if self.save_path is not None else None
        _check_artifact(self.save_path, self.artifact_format, self.compress)
        accuracy = self.baseline_accuracy
        if accuracy is not None and (isinstance(accuracy, bool) or not isinstance(accuracy, numbers.Real)):
            raise ValueError(f"`baseline_accuracy` must be None or a number, got {accuracy!r}")
        if self.monitor is not None and (not isinstance(self.monitor, str) or not self.monitor):
            raise ValueError(f"`monitor` must be None or the name of a logged metric, got {self.monitor!r}")
        if not isinstance(self.shrink, bool):
            raise ValueError(f"`shrink` must be True or False, got {self.shrink!r}")
        if self.shrink and importlib.util.find_spec("torch_pruning") is None:
            raise ValueError(f"`shrink=True`: {SHRINK_HINT}")


def _check_artifact(save_path: str | None, artifact_format: str | None, compress: bool) -> None:
    """``save_path`` names a file we can write, the format is one we write, and its extra is installed."""
    if artifact_format not in (None, "torchscript", "onnx"):
        raise ValueError(f"`artifact_format` must be None, 'torchscript' or 'onnx', got {artifact_format!r}")
    if save_path is None:
        if artifact_format is not None:
            raise ValueError(f"`artifact_format={artifact_format!r}` needs `save_path`: it is the format of that file")
        return
    if not save_path or save_path.endswith(("/", os.sep)) or os.path.isdir(save_path):
        what = "is empty" if not save_path else "is a folder" if os.path.isdir(save_path) else "ends with a separator"
        raise ValueError(
            f"`save_path={save_path!r}` {what}; it must name the artifact's file, e.g. 'model.ts' or 'model.onnx'"
        )
    onnx = artifact_format == "onnx" or (artifact_format is None and save_path.lower().endswith(".onnx"))
    if onnx and compress:
        raise ValueError(
            "`compress=True` is a format of TorchScript artifacts; an ONNX file (`save_path` ending in .onnx or "
            "`artifact_format='onnx'`) is written as ONNX Runtime quantized it. Drop `compress` or write a .ts file"
        )
    if onnx and onnx_format.missing_packages():
        raise ValueError(
            f"`save_path={save_path!r}` writes an ONNX artifact, which needs "
            f"{', '.join(onnx_format.missing_packages())}: {onnx_format.EXTRA_HINT}"
        )
