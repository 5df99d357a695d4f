"""Every use of a private or version-dependent attribute of Lightning, torchmetrics or torch, in one place.

Checked against torch 2.13.0, lightning 2.6.6 and torchmetrics 1.9.0 (CI). Each function says what it reads and
why no public API does the same; the tests that cover them fail on an upgrade that changes these internals.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from torch import nn

try:  # lightning >= 2.5
    from lightning.pytorch.callbacks import WeightAveraging
except ImportError:  # pragma: no cover - older Lightning
    WeightAveraging = None

#: Callbacks that overwrite the module's weights with averaged ones at the end of training.
WEIGHT_AVERAGING_CALLBACKS: tuple[type[Callback], ...] = tuple(
    c for c in (StochasticWeightAveraging, WeightAveraging) if c is not None
)


_DEEPSPEED_WHY = (
    "DeepSpeed's ZeRO keeps the weights its optimizer updates in its own partitioned float32 buffers, outside the "
    "module's parameters and the optimizers Lightning exposes, so weights zeroed in the module would be written "
    "back by the next step"
)
_FSDP1_WHY = (
    "FSDPStrategy (FSDP1) flattens the parameters into FlatParameters, whose names and shapes are not the layers'; "
    "use ModelParallelStrategy and apply torch.distributed.fsdp.fully_shard (FSDP2) in configure_model"
)


def is_sharded_strategy(trainer: pl.Trainer) -> bool:
    """Whether the trainer runs ``ModelParallelStrategy`` (parameters may be ``DTensor`` shards)."""
    return isinstance(trainer.strategy, ModelParallelStrategy)


def require_supported_strategy(trainer: pl.Trainer, callback: str) -> None:
    """Raise a ``ValueError`` naming ``callback`` unless the strategy is single-device, DDP or ModelParallel."""
    strategy = trainer.strategy
    supported = (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)
    if isinstance(strategy, supported) and not isinstance(strategy, (DeepSpeedStrategy, FSDPStrategy)):
        return
    why = (
        _DEEPSPEED_WHY
        if isinstance(strategy, DeepSpeedStrategy)
        else _FSDP1_WHY
        if isinstance(strategy, FSDPStrategy)
        else "it is neither single-device, DDP nor ModelParallelStrategy"
    )
    raise ValueError(
        f"{callback} supports the single-device, DDP and ModelParallelStrategy (FSDP2's fully_shard) strategies; got "
        f"{type(strategy).__name__}: {why}."
    )


def local_shard_offset(parameter: Any) -> tuple[int, ...]:
    """Where a ``DTensor``'s local shard starts in the full tensor, per dim (torch's private
    ``compute_local_shape_and_global_offset``, torch 2.13; DCP uses it to place shards). No public API says where an
    uneven shard starts; recomputing ``torch.chunk``'s sizes by hand would repeat it."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(parameter.shape, parameter.device_mesh, parameter.placements)
    return tuple(offset)


def val_data_source(trainer: pl.Trainer) -> Any:
    """The fit loop's validation data source (``val_loop._data_source``, private in Lightning 2.x).

    It yields the user's own dataloader(s) before Lightning injects a DistributedSampler, which is what rank zero
    needs to evaluate the whole set; no public API returns them (``trainer.val_dataloaders`` is the wrapped one).
    """
    return trainer.fit_loop.epoch_loop.val_loop._data_source


def has_val_data(trainer: pl.Trainer) -> bool:
    return val_data_source(trainer).is_defined() and trainer.limit_val_batches != 0


def raw_val_dataloaders(trainer: pl.Trainer) -> Any:
    return val_data_source(trainer).dataloader()


def never_sync(metric: torchmetrics.Metric) -> torchmetrics.Metric:
    """Stop ``metric`` from all-gathering its state in ``compute`` (torchmetrics reads the private ``_to_sync``).

    Only rank zero evaluates after training: a metric that synced across processes would wait for the others
    forever. ``sync_on_compute`` alone is read at construction only.
    """
    metric.sync_on_compute = False
    metric._to_sync = False
    metric.dist_sync_on_step = False
    return metric


# Instance attributes Lightning's ``from_compiled`` sets on a compiled LightningModule (lightning 2.6).
_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


def uncompiled_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every ``torch.compile`` wrapper removed, so the copy runs its own weights.

    Lightning keeps a compiled LightningModule's compiled ``forward`` (and ``*_step``) as instance attributes, the
    originals in ``_compiler_ctx``; ``torch.compile(submodule)`` wraps submodules in ``OptimizedModule``
    (``_orig_mod``). A plain deep copy would still run the original module's compiled graph, on its weights.
    """
    optimized = torch._dynamo.eval_frame.OptimizedModule
    while isinstance(module, optimized):
        module = module._orig_mod
    hidden: dict[nn.Module, dict[str, Any]] = {}
    for m in module.modules():
        if m.__dict__.get("_compiler_ctx") is not None:
            hidden[m] = {k: m.__dict__.pop(k) for k in (*_COMPILED_METHODS, "_compiler_ctx") if k in m.__dict__}
            m.__dict__["_compiler_ctx"] = None
    try:
        copied = copy.deepcopy(module)
    finally:
        for m, attributes in hidden.items():
            m.__dict__.update(attributes)
    for parent in list(copied.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, optimized):
                while isinstance(child, optimized):
                    child = child._orig_mod
                setattr(parent, name, child)
    return copied


def disable_transformer_fast_path(model: nn.Module) -> list[str]:
    """Turn off the fused inference fast path of ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` in
    ``model`` (only there, unlike the global ``torch.backends.mha.set_fastpath_enabled``); returns their names.

    The fast path reads ``linear1.weight.device`` and friends, which a dynamically quantized Linear exposes as a
    method, not a tensor. torch 2.13 checks ``activation_relu_or_gelu`` (layer) and ``use_nested_tensor``
    (encoder) before touching the weights; the layers' ordinary forward does not read either attribute.
    """
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            module.activation_relu_or_gelu = False
            changed.append(name)
        elif isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
            changed.append(name)
    return changed


def forget_metric_attributes(module: nn.Module) -> None:
    """Drop LightningModule's cache of ``id(metric) -> attribute name`` (``_metric_attributes``, lightning 2.6).

    ``self.log(name, metric)`` looks the metric up by ``id`` in that cache; a deep copy carries the original's
    cache, whose ids are not the copy's metrics, and logging then fails with "Could not find the LightningModule
    attribute for the torchmetrics.Metric logged".
    """
    for m in module.modules():
        if isinstance(m, pl.LightningModule):
            m._metric_attributes = None


def uncompiled_name(name: str) -> str:
    """A parameter or module name as in the uncompiled model: without ``torch.compile``'s ``_orig_mod`` segments."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")
