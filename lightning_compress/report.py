"""What users see: metric keys, writing metrics to every logger of the trainer, the summary table, the plot."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl

SPARSITY = "pruning/sparsity"
TARGET = "pruning/target"
SPARSITY_PREFIX = "pruning/sparsity/"


def log_to_loggers(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Write ``metrics`` to every logger of ``trainer`` at the current global step, from rank zero only.

    Used from hooks where ``LightningModule.log`` is not allowed (``setup``, ``on_train_end``,
    ``on_fit_end``) or where metrics belong to a single moment rather than to an epoch's aggregate.
    With ``logger=False`` there are no loggers and nothing happens.
    """
    if not trainer.is_global_zero or not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)
