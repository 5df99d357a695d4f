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


ACCURACY_BEFORE = "quantization/accuracy_before"
ACCURACY_AFTER = "quantization/accuracy_after"
SIZE_BEFORE = "quantization/size_mb_before"
SIZE_AFTER = "quantization/size_mb_after"
LATENCY_BEFORE = "quantization/latency_ms_before"
LATENCY_AFTER = "quantization/latency_ms_after"
SPARSITY_AFTER = "quantization/sparsity_after"


def quantization_table(results: Mapping[str, float], dtype: str, save_path: str | None = None) -> str:
    """A short before/after table of what quantization did, every figure measured in this run."""
    rows = [
        ("accuracy", ACCURACY_BEFORE, ACCURACY_AFTER, "{:.4f}"),
        ("size (MB)", SIZE_BEFORE, SIZE_AFTER, "{:.3f}"),
        ("latency (ms/batch)", LATENCY_BEFORE, LATENCY_AFTER, "{:.3f}"),
        ("sparsity", SPARSITY, SPARSITY_AFTER, "{:.2%}"),
    ]
    lines = [f"DynamicQuantization ({dtype}):", f"  {'':20s} {'float':>12s} {dtype:>12s} {'ratio':>8s}"]
    for label, before_key, after_key, fmt in rows:
        if before_key not in results or after_key not in results:
            continue
        before, after = results[before_key], results[after_key]
        ratio = f"{before / after:.2f}x" if label in ("size (MB)", "latency (ms/batch)") and after else ""
        lines.append(f"  {label:20s} {fmt.format(before):>12s} {fmt.format(after):>12s} {ratio:>8s}")
    if save_path:
        lines.append(f"  artifact: {save_path}")
    return "\n".join(lines)
