"""What users see: metric keys, writing metrics to every logger of the trainer, the summary table, the plot."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

SPARSITY = "pruning/sparsity"
TARGET = "pruning/target"
SPARSITY_PREFIX = "pruning/sparsity/"
COVERAGE = "pruning/coverage"
GUARD_HELD = "pruning/guard/held"
GUARD_ROLLED_BACK = "pruning/guard/rolled_back"


def log_to_loggers(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Write ``metrics`` to every logger of ``trainer`` at the current global step, from rank zero only.

    Used from hooks where ``LightningModule.log`` is not allowed (``setup``, ``on_train_end``,
    ``on_fit_end``) or where metrics belong to a single moment rather than to an epoch's aggregate.
    With ``logger=False`` there are no loggers and nothing happens.
    """
    if not trainer.is_global_zero or not metrics:
        return
    for logger in trainer.loggers:
        # "epoch" as Lightning adds it to `LightningModule.log` metrics, so rows can be plotted against epochs
        logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step=trainer.global_step)


ACCURACY_BEFORE = "quantization/accuracy_before"
ACCURACY_AFTER = "quantization/accuracy_after"
ACCURACY_ARTIFACT = "quantization/accuracy_artifact"
SIZE_BEFORE = "quantization/size_mb_before"
SIZE_AFTER = "quantization/size_mb_after"
LATENCY_BEFORE = "quantization/latency_ms_before"
LATENCY_AFTER = "quantization/latency_ms_after"
SPARSITY_BEFORE = "quantization/sparsity_before"
SPARSITY_AFTER = "quantization/sparsity_after"
SIZE_COMPRESSED = "quantization/size_mb_compressed"
KERNEL_SPEEDUP_PREFIX = "quantization/kernel_speedup/"
QUANTIZATION_COVERAGE = "quantization/coverage"


def summary_table(
    results: Mapping[str, float],
    dtype: str,
    layer_sparsity: Mapping[str, tuple[float, float]] | None = None,
    baseline_accuracy: float | None = None,
    save_path: str | None = None,
    kernel_choices: Mapping[str, Any] | None = None,
    headline: str | None = None,
    comparison: Any = None,
    stage_seconds: Mapping[str, float] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The end-of-fit summary: sparsity per layer and overall, the metrics (the headline one first), size and
    latency, float vs quantized, with coverage, notes and how long each stage took.

    Every figure comes from ``results``, ``layer_sparsity`` (``name -> (float, quantized)`` fractions of zeros),
    ``comparison`` (a :class:`lightning_compress.pipeline.Comparison`) and ``stage_seconds``, which
    ``DynamicQuantization`` measured in this run; ``baseline_accuracy`` is shown as given.
    """
    pruned = SPARSITY_BEFORE in results
    metrics = _metric_names(results)
    if headline is None and ACCURACY_BEFORE in results:
        headline = "accuracy"
    if headline in metrics:
        metrics.remove(headline)
    labels = [f"{headline}, pruned" if pruned else headline] if headline else []
    labels += [*metrics, "size compressed (MB)", *(f"  {n}" for n in layer_sparsity or {})]
    width = max(len(label) for label in labels)
    lines = [f"lightning_compress summary ({dtype}, every figure measured in this run):"]
    lines.append(f"  {'':{width}s} {'float':>12s} {dtype:>12s} {'ratio':>8s}")

    def row(label: str, before: float | None, after: float | None, fmt: str, ratio: bool = False, extra="") -> None:
        cells = [fmt.format(v) if v is not None else "" for v in (before, after)]
        shown = f"{before / after:.2f}x" if ratio and before is not None and after else ""
        lines.append(f"  {label:{width}s} {cells[0]:>12s} {cells[1]:>12s} {shown:>8s}{extra}")

    for name, (before, after) in (layer_sparsity or {}).items():
        row(f"  {name}", before, after, "{:.2%}")
    if pruned:
        row("sparsity (overall)", results[SPARSITY_BEFORE], results[SPARSITY_AFTER], "{:.2%}")
    if baseline_accuracy is not None:
        row("accuracy, dense", baseline_accuracy, None, "{:.4f}")
    if headline:
        row(labels[0], results[ACCURACY_BEFORE], results[ACCURACY_AFTER], "{:.4f}")
    for name in metrics:
        row(name, results[f"quantization/{name}_before"], results.get(f"quantization/{name}_after"), "{:.4f}")
    row("size (MB)", results[SIZE_BEFORE], results[SIZE_AFTER], "{:.3f}", ratio=True)
    if SIZE_COMPRESSED in results:
        row("size compressed (MB)", results[SIZE_BEFORE], results[SIZE_COMPRESSED], "{:.3f}", ratio=True)
    if LATENCY_BEFORE in results:
        spread = ""
        if comparison is not None and comparison.latency_before is not None:
            b, a = comparison.latency_before, comparison.latency_after
            spread = f"  rounds: {b.low_ms:.3f}-{b.high_ms:.3f} / {a.low_ms:.3f}-{a.high_ms:.3f} ms, interleaved"
        row("latency (ms/batch)", results[LATENCY_BEFORE], results[LATENCY_AFTER], "{:.3f}", ratio=True, extra=spread)
    if QUANTIZATION_COVERAGE in results:
        lines.append(
            f"  coverage: {results[QUANTIZATION_COVERAGE]:.1%} of the model's parameters are in quantized layers"
        )
    if baseline_accuracy is not None:
        lines.append("  accuracy, dense: the same model trained without pruning, as measured by the caller")
    if comparison is not None and comparison.cast_from is not None:
        lines.append(
            f"  note: the model's weights are {str(comparison.cast_from).removeprefix('torch.')}; 'float' is a float32 "
            "copy of it, which was quantized"
        )
    if LATENCY_BEFORE in results and results[LATENCY_AFTER] > results[LATENCY_BEFORE]:
        lines.append(
            f"  note: the quantized model is SLOWER here ({results[LATENCY_BEFORE] / results[LATENCY_AFTER]:.2f}x)"
        )
    if results[SIZE_AFTER] > results[SIZE_BEFORE]:
        lines.append("  note: the quantized model is LARGER (packed-weight overhead on small layers)")
    for name, choice in (kernel_choices or {}).items():
        times = ", ".join(f"{kind} {ms:.3f}" for kind, ms in choice.times_ms.items())
        close = "; too close to call, kept the default" if getattr(choice, "too_close_to_call", False) else ""
        lines.append(
            f"  kernel {name} ({choice.sparsity:.0%} zeros): {choice.chosen}, {choice.speedup:.2f}x fp32 dense "
            f"[ms: {times}]{close}"
        )
    lines.extend(f"  {note}" for note in notes)
    if stage_seconds:
        lines.append("  time: " + ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in stage_seconds.items()))
    if save_path:
        lines.append(f"  artifact: {save_path}")
    return "\n".join(lines)


def artifact_lines(
    path: str, written: Any, metrics: Mapping[str, float], headline: str | None, evaluated: bool
) -> list[str]:
    """The summary's lines about an artifact that was written and measured (``written``: a
    :class:`lightning_compress.artifact.Written`): its form and size, on how many input shapes it was compared,
    its metrics, and why an earlier form was not kept."""
    lines = [
        f"artifact: {path} ({written.form} form, {written.size / 1e6:.3f} MB), reloaded from disk and compared with "
        f"the quantized model on {len(written.compared)} input shape(s)"
    ]
    if metrics:
        ordered = sorted(metrics, key=lambda name: name != headline)
        lines.append(
            "artifact measured as the quantized model was: "
            + ", ".join(f"{name} {metrics[name]:.4f}" for name in ordered)
        )
    elif evaluated:
        lines.append(
            "artifact: its metrics were not measured, as validation never calls forward (self(...)); it was "
            "compared on example_input_array only"
        )
    for form, reason in written.rejected.items():
        lines.append(f"artifact: the {form} form was not kept: {reason[:300]}")
    return lines


def _metric_names(results: Mapping[str, float]) -> list[str]:
    """Names ``m`` of the ``quantization/<m>_before`` metrics that are not one of the fixed keys."""
    fixed = {ACCURACY_BEFORE, SIZE_BEFORE, LATENCY_BEFORE, SPARSITY_BEFORE}
    return [
        key.removeprefix("quantization/").removesuffix("_before")
        for key in results
        if key.startswith("quantization/") and key.endswith("_before") and key not in fixed
    ]


def monitored_metric_name(trainer: pl.Trainer) -> str | None:
    """The validation metric a run cares about: the ``monitor`` of its EarlyStopping or ModelCheckpoint callbacks,
    else the first logged metric whose name starts with ``val`` and contains ``acc``, else ``None``."""
    for callback in trainer.callbacks:
        monitor = getattr(callback, "monitor", None)
        if isinstance(monitor, str) and monitor:
            return monitor
    return next((k for k in trainer.callback_metrics if k.startswith("val") and "acc" in k), None)


def why_training_stopped(trainer: pl.Trainer) -> str | None:
    """What ended training early, as Lightning tells it: EarlyStopping, max_time (the Timer) or max_steps."""
    from lightning.pytorch.callbacks import EarlyStopping, Timer

    for callback in trainer.callbacks:
        if isinstance(callback, EarlyStopping) and callback.stopped_epoch > 0:
            reason = getattr(callback, "stopping_reason_message", None)
            detail = f" ({reason})" if reason else ""
            return (
                f"EarlyStopping(monitor={callback.monitor!r}) stopped training at epoch {callback.stopped_epoch}"
                f"{detail}"
            )
        if isinstance(callback, Timer):
            remaining = callback.time_remaining()
            if remaining is not None and remaining <= 0:
                return f"max_time ended training at epoch {trainer.current_epoch}"
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return f"max_steps={trainer.max_steps} ended training at epoch {trainer.current_epoch}"
    return None


PLOT_HINT = "Plotting needs matplotlib: pip install 'lightning_compress[plot]'"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(PLOT_HINT) from error
    return plt


def sparsity_figure(
    target: Sequence[tuple[float, float]],
    measured: Sequence[tuple[float, float]],
    metric: Sequence[tuple[float, float]] = (),
    metric_name: str | None = None,
) -> Any:
    """A matplotlib figure: target and measured sparsity and (on a second axis) a validation metric, by epoch.

    Each series is a sequence of ``(epoch, value)`` points.
    """
    plt = _pyplot()
    figure, sparsity_axis = plt.subplots(figsize=(7, 4))
    for points, style, label in ((target, "--", "target sparsity"), (measured, "-o", "measured sparsity")):
        if points:
            sparsity_axis.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
    sparsity_axis.set_xlabel("epoch (masks updated at the start of an epoch)")
    sparsity_axis.set_ylabel("sparsity")
    sparsity_axis.set_ylim(0, 1)
    handles, labels = sparsity_axis.get_legend_handles_labels()
    if metric and metric_name:
        metric_axis = sparsity_axis.twinx()
        metric_axis.plot([p[0] for p in metric], [p[1] for p in metric], "-s", color="tab:green", label=metric_name)
        metric_axis.set_ylabel(metric_name)
        more_handles, more_labels = metric_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    sparsity_axis.legend(handles, labels, loc="lower right")
    sparsity_axis.set_title("Pruning schedule and recovery")
    figure.tight_layout()
    return figure


def write_schedule_plot(
    trainer: pl.Trainer,
    history: Sequence[Mapping[str, float]],
    monitored: Sequence[tuple[float, float]],
    metric_name: str | None,
) -> Path | None:
    """Draw the pruning history into ``<trainer.log_dir>/sparsity.png`` and, for TensorBoard, as a figure.

    Works with any logger, as it draws from the callback's own history. Does nothing without a logger, off rank
    zero, or without matplotlib (an optional extra). Returns the PNG's path when one was written.
    """
    if not trainer.is_global_zero or not trainer.loggers or not history:
        return None
    try:
        plt = _pyplot()
    except ImportError:
        return None
    from lightning.pytorch.loggers import TensorBoardLogger

    figure = sparsity_figure(
        [(h["epoch"], h["target"]) for h in history],
        [(h["epoch"], h["sparsity"]) for h in history],
        monitored,
        metric_name,
    )
    # Not `trainer.log_dir`: it is a collective (a broadcast) under DDP, and only rank zero is here.
    logger = trainer.loggers[0]
    out = Path(getattr(logger, "log_dir", None) or logger.save_dir or trainer.default_root_dir) / "sparsity.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure("pruning/schedule", figure, global_step=trainer.global_step, close=False)
    plt.close(figure)
    return out


def plot_metrics(
    metrics_csv: str | os.PathLike, path: str | os.PathLike | None = None, accuracy_key: str | None = None
) -> Path:
    """Plot target and measured sparsity and validation accuracy against epoch, from a CSVLogger metrics file.

    ``MagnitudePruning`` writes the same plot itself, from its own history, under any logger; this reads a
    finished run's ``metrics.csv`` instead.

    Args:
        metrics_csv: the ``metrics.csv`` of a run (``CSVLogger(...).log_dir``).
        path: where to write the PNG; default ``sparsity.png`` beside ``metrics_csv``.
        accuracy_key: the accuracy column; default: the first column whose name starts with ``val`` and contains
            ``acc``.

    Returns:
        The path of the PNG.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'lightning_compress[plot]'``).
        FileNotFoundError: no such file (only CSVLogger writes one).
    """
    plt = _pyplot()
    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        raise FileNotFoundError(
            f"No metrics file at {metrics_csv}: plot_metrics reads a CSVLogger's metrics.csv. With other loggers, "
            "MagnitudePruning writes sparsity.png into the trainer's log_dir itself."
        )
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    if accuracy_key is None:
        accuracy_key = next((c for c in columns if c.startswith("val") and "acc" in c), None)

    def series(key: str | None) -> list[tuple[float, float]]:
        if key is None:
            return []
        return [(float(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "") and r.get("epoch")]

    figure = sparsity_figure(series(TARGET), series(SPARSITY), series(accuracy_key), accuracy_key)
    out = Path(path) if path is not None else metrics_csv.with_name("sparsity.png")
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
