"""Every use of a private or version-dependent attribute of Lightning, torchmetrics or torch, in one place.

Checked against torch 2.13.0, lightning 2.6.6 and torchmetrics 1.9.0 (CI). Each function says what it reads and
why no public API does the same; the tests that cover them fail on an upgrade that changes these internals.

Lightning is imported inside the functions that read it, never at the top: the plain-torch parts of the package
(the pruning core, sharding, shrink, the artifacts) use this module's torch entries without importing Lightning.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    import lightning.pytorch as pl
    import torchmetrics
    from lightning.pytorch.callbacks import Callback


def weight_averaging_callbacks() -> tuple[type[Callback], ...]:
    """Callbacks that overwrite the module's weights with averaged ones at the end of training (SWA, and
    Lightning's ``WeightAveraging`` from 2.5 on)."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    try:  # lightning >= 2.5
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:  # pragma: no cover - older Lightning
        return (StochasticWeightAveraging,)
    return (StochasticWeightAveraging, WeightAveraging)


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
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(trainer.strategy, ModelParallelStrategy)


def require_supported_strategy(trainer: pl.Trainer, callback: str) -> None:
    """Raise a ``ValueError`` naming ``callback`` unless the strategy is single-device, DDP or ModelParallel."""
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

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


def train_data_source(trainer: pl.Trainer) -> Any:
    """The fit loop's training data source (``fit_loop._data_source``, private in Lightning 2.x): its
    ``dataloader()`` calls the user's ``train_dataloader`` hook again, a fresh loader beside training's own."""
    return trainer.fit_loop._data_source


def has_train_data(trainer: pl.Trainer) -> bool:
    return train_data_source(trainer).is_defined()


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


def uncompiled_copy(
    module: nn.Module,
    memo: dict[int, Any] | None = None,
    deepcopy: Callable[[nn.Module, dict[int, Any]], nn.Module] | None = None,
) -> nn.Module:
    """A deep copy of ``module`` with every ``torch.compile`` wrapper removed, so the copy runs its own weights.

    Lightning keeps a compiled LightningModule's compiled ``forward`` (and ``*_step``) as instance attributes, the
    originals in ``_compiler_ctx``; ``torch.compile(submodule)`` wraps submodules in ``OptimizedModule``
    (``_orig_mod``); ``nn.Module.compile()`` (in place, also ``LightningModule.compile()``) keeps a compiled
    ``_call_impl`` of the original module in ``_compiled_call_impl`` (torch 2.13), which ``__call__`` runs instead
    of ``forward``. A plain deep copy would still run the original module's compiled graph, on its weights.
    ``deepcopy(module, memo)`` makes the copy; default: a :class:`lightning_compress.quantization.copying.Copier` (other
    tools' hooks left behind, attributes that cannot be copied shared).
    """
    from lightning_compress.quantization.copying import Copier

    memo = {} if memo is None else memo
    deepcopy = deepcopy or Copier()
    optimized = torch._dynamo.eval_frame.OptimizedModule
    while isinstance(module, optimized):
        module = module._orig_mod
    hidden: dict[nn.Module, dict[str, Any]] = {}
    for m in module.modules():
        if m.__dict__.get("_compiler_ctx") is not None:
            hidden[m] = {k: m.__dict__.pop(k) for k in (*_COMPILED_METHODS, "_compiler_ctx") if k in m.__dict__}
            m.__dict__["_compiler_ctx"] = None
        if m.__dict__.get("_compiled_call_impl") is not None:
            memo[id(m.__dict__["_compiled_call_impl"])] = None  # the copy runs its own forward
    try:
        copied = deepcopy(module, memo)
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


# What torch 2.13's fully_shard (FSDP2) adds to a module, besides its class and its forward hooks: the composable
# API's state entries (keys starting with this) and two flags.
_FSDP_STATE_PREFIX = "__composable_api_state_key"
_FSDP_FLAGS = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs")


def unsharded_copy(
    module: nn.Module,
    full_state: dict[str, Any],
    deepcopy: Callable[[nn.Module, dict[int, Any]], nn.Module] | None = None,
) -> nn.Module:
    """A plain copy of a module sharded with FSDP2's ``fully_shard``, holding the full tensors of ``full_state``.

    ``fully_shard`` swaps each sharded module's class for a subclass of ``FSDPModule`` and registers forward hooks
    bound to its state; no public API undoes it (``FSDPModule.unshard`` only all-gathers for a while). The copy
    gets the original classes, none of FSDP's hooks or state, and plain ``nn.Parameter``s made from ``full_state``
    (the strategy's full state dict, by parameter name). ``module`` is left as it is; ``torch.compile`` wrappers
    are removed as in :func:`uncompiled_copy`, which ``deepcopy`` is passed to.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule

    memo: dict[int, Any] = {}
    for name, parameter in module.named_parameters():
        name = uncompiled_name(name)
        if name not in full_state:
            raise ValueError(f"the gathered full state dict has no entry for parameter {name!r}")
        memo[id(parameter)] = nn.Parameter(full_state[name].detach().clone(), parameter.requires_grad)
    hidden: list[tuple[nn.Module, type, dict[str, Any], dict[str, dict[int, Any]]]] = []
    for m in module.modules():
        for value in m.__dict__.values():
            if isinstance(value, DeviceMesh):
                memo[id(value)] = value  # shared, not copied: the copy never uses it
        state = {k: m.__dict__.pop(k) for k in list(m.__dict__) if k.startswith(_FSDP_STATE_PREFIX) or k in _FSDP_FLAGS}
        hooks = {attr: dict(getattr(m, attr)) for attr in _HOOK_DICTS if hasattr(m, attr)}
        for attr, entries in hooks.items():
            for key, hook in entries.items():
                if type(getattr(hook, "__self__", None)).__module__.startswith("torch.distributed.fsdp"):
                    del getattr(m, attr)[key]
        cls = type(m)
        if issubclass(cls, FSDPModule):
            m.__class__ = next(base for base in cls.__mro__[1:] if not issubclass(base, FSDPModule))
        hidden.append((m, cls, state, hooks))
    try:
        return uncompiled_copy(module, memo, deepcopy)
    finally:
        for m, cls, state, hooks in hidden:
            m.__class__ = cls
            m.__dict__.update(state)
            for attr, entries in hooks.items():
                getattr(m, attr).clear()
                getattr(m, attr).update(entries)


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
    import lightning.pytorch as pl

    for m in module.modules():
        if isinstance(m, pl.LightningModule):
            m._metric_attributes = None


def uncompiled_name(name: str) -> str:
    """A parameter or module name as in the uncompiled model: without ``torch.compile``'s ``_orig_mod`` segments."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def finish_progress_display(trainer: pl.Trainer) -> None:
    """Let the trainer's progress bar finish drawing before we print below it (at ``on_fit_end``).

    ``RichProgressBar`` keeps a live display until its ``teardown``, which Lightning 2.6 calls after ``on_fit_end``:
    lines printed meanwhile land above the last epoch's bar. Its private ``_stop_progress`` (what its ``teardown``
    and ``on_exception`` call; idempotent, and a later validate or fit starts a new display) ends it now. TQDM's bar
    is closed at ``on_train_end``, but its last newline waits in ``sys.stdout``'s buffer while the logging module
    writes to ``sys.stderr``: both are flushed.
    """
    from lightning.pytorch.callbacks import RichProgressBar

    bar = trainer.progress_bar_callback
    if isinstance(bar, RichProgressBar):
        bar._stop_progress()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()


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
