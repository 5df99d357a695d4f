"""Evaluating a LightningModule with its own validation: ``validation_step`` and what it logs, through Lightning.

A quiet inner ``Trainer(...).validate`` on the CPU runs the module's own code on its own batches (dicts, several
inputs, ``ModelOutput``s: whatever the module handles), so nothing about the user's model has to be rewritten and
no evaluation loop of ours has to guess the batch layout.
"""

from __future__ import annotations

import contextlib
import logging
import types
import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torchmetrics
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_compress import compat


def has_validation_step(module: pl.LightningModule) -> bool:
    return isinstance(module, pl.LightningModule) and is_overridden("validation_step", module, pl.LightningModule)


def validate(module: pl.LightningModule, dataloaders: Any, limit_batches: int | float = 1.0) -> dict[str, float]:
    """Every metric ``module`` logs in its validation, over ``dataloaders`` (or the first ``limit_batches``).

    Runs on the CPU, in a Trainer of its own with no logger, checkpoint, progress bar or callback of the user's:
    nothing is written anywhere and nothing is printed (the outer Trainer's bar is the only one the user sees; in
    one run with these inner TQDM bars, the latency timed next read 24 ms per batch instead of 0.05 ms). Metrics
    of several dataloaders keep Lightning's ``/dataloader_idx_N`` suffixes. The module's torchmetrics never sync
    across processes (only one process evaluates after a distributed fit).
    """
    for metric in module.modules():
        if isinstance(metric, torchmetrics.Metric):
            compat.never_sync(metric)
    compat.forget_metric_attributes(module)
    with quiet_lightning():
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            limit_val_batches=limit_batches,
        )
        # The module is a copy of a configured one whose data is prepared: its `configure_model` (where FSDP2 users
        # call fully_shard, and others build layers) and `prepare_data` must not run again in this Trainer. Under
        # DDP or FSDP only rank zero is here, and Lightning wraps `prepare_data` in a barrier of every rank.
        # LightningModule's own no-op hooks, bound to the module: Lightning then sees them as not overridden
        for hook in _DONE_HOOKS:
            setattr(module, hook, types.MethodType(getattr(pl.LightningModule, hook), module))
        try:
            results = trainer.validate(module, dataloaders=dataloaders, verbose=False)
        finally:
            for hook in _DONE_HOOKS:
                delattr(module, hook)
    merged: dict[str, float] = {}
    for per_dataloader in results:
        merged.update({name: float(value) for name, value in per_dataloader.items()})
    return merged


# Hooks whose work the outer Trainer did: layers built (and, for an FSDP2 model, the copy unsharded), data prepared.
_DONE_HOOKS = ("configure_model", "prepare_data")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's start-up lines (devices, tips) and its data-loading advice for an inner Trainer."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*GPU available but not used.*")
            warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
            # Lightning 2.6's own use of torch's pytree under torch 2.13; nothing the user can act on
            warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
            yield
    finally:
        logger.setLevel(level)
