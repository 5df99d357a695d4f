"""What users see: metric keys, writing metrics to every logger of the trainer, the summary table, the plot."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Lightning is needed by the functions that take a trainer, not to read the metric keys
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
LATENCY_EAGER = "quantization/latency_ms_eager"
SPARSITY_BEFORE = "quantization/sparsity_before"
SPARSITY_AFTER = "quantization/sparsity_after"
SIZE_COMPRESSED = "quantization/size_mb_compressed"
SIZE_ARTIFACT = "quantization/size_mb_artifact"
LATENCY_ARTIFACT = "quantization/latency_ms_artifact"
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
    layers: Sequence[Any] | None = None,
) -> str:
    """The end-of-fit summary: per weight, the dtype it runs as (and why, when float) and its sparsity; overall
    sparsity, the metrics (the headline one first), size and latency, float vs quantized, with coverage, notes and
    how long each stage took.

    Every figure comes from ``results``, ``layer_sparsity`` (``name -> (float, quantized)`` fractions of zeros),
    ``comparison`` (a :class:`lightning_compress.quantization.figures.Comparison`), ``layers`` (the
    :class:`lightning_compress.quantization.outcomes.LayerOutcome` of each module) and ``stage_seconds``, which
    ``DynamicQuantization`` measured in this run; ``baseline_accuracy`` is shown as given.
    """
    weight_rows, other_lines = _layer_rows(layers or (), layer_sparsity or {})
    pruned = SPARSITY_BEFORE in results
    metrics = _metric_names(results)
    if headline is None and ACCURACY_BEFORE in results:
        headline = "accuracy"
    if headline in metrics:
        metrics.remove(headline)
    labels = [f"{headline}, pruned" if pruned else headline] if headline else []
    labels += [*metrics, "size compressed (MB)", *(f"  {name}" for name, _ in weight_rows)]
    width = max(len(label) for label in labels)
    lines = [f"lightning_compress summary ({dtype}, every figure measured in this run):"]
    lines.append(f"  {'':{width}s} {'float':>12s} {'quantized':>12s} {'ratio':>8s}")

    def row(label: str, before: float | None, after: float | None, fmt: str, ratio: bool = False, extra="") -> None:
        cells = [fmt.format(v) if v is not None else "" for v in (before, after)]
        shown = f"{before / after:.2f}x" if ratio and before is not None and after else ""
        lines.append(f"  {label:{width}s} {cells[0]:>12s} {cells[1]:>12s} {shown:>8s}{extra}")

    if weight_rows:
        lines.append(
            "  weights: zeros in the float and the quantized model, and what each runs as"
            if pruned
            else "  weights: what each runs as"
        )
    for name, runs_as in weight_rows:
        before, after = (layer_sparsity or {}).get(name, (None, None))
        row(f"  {name}", before, after, "{:.2%}", extra=f"  {runs_as}" if runs_as else "")
    lines.extend(f"    {line}" for line in other_lines)
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
        verdict = comparison.latency_verdict if comparison is not None else None
        reliable = verdict is None or verdict.verdict != "unreliable"  # then no ratio is shown as if it were a fact
        row(
            "latency (ms/batch)",
            results[LATENCY_BEFORE],
            results[LATENCY_AFTER],
            "{:.3f}",
            ratio=reliable,
            extra=spread,
        )
        if verdict is not None:
            lines.append(f"  latency: {verdict.text}")
        if LATENCY_EAGER in results:
            row("latency, float eager", results[LATENCY_EAGER], results[LATENCY_AFTER], "{:.3f}", ratio=reliable)
            lines.append("  latency: before = the float model compiled the same way as the quantized one")
        if comparison is not None and comparison.timed_inputs:
            lines.append(f"  latency: timed on {_timed_inputs(comparison.timed_inputs, comparison.timed_on)}")
    lines += _footer_lines(results, comparison, baseline_accuracy, kernel_choices, notes, stage_seconds, save_path)
    return "\n".join(lines)


def _footer_lines(
    results: Mapping[str, float],
    comparison: Any,
    baseline_accuracy: float | None,
    kernel_choices: Mapping[str, Any] | None,
    notes: Sequence[str],
    stage_seconds: Mapping[str, float] | None,
    save_path: str | None,
) -> list[str]:
    """The summary's lines under the figures: coverage, what the figures mean, warnings, kernels, time, artifact."""
    lines: list[str] = []
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
    verdict = getattr(comparison, "latency_verdict", None)
    if verdict is not None and verdict.verdict == "slower":  # a lower ratio within the noise is no verdict
        lines.append(
            f"  note: the quantized model is SLOWER here ({results[LATENCY_BEFORE] / results[LATENCY_AFTER]:.2f}x)"
        )
    if results[SIZE_AFTER] > results[SIZE_BEFORE]:
        causes = getattr(comparison, "size_causes", None)
        lines.append("  note: the quantized model is LARGER" + (": " + "; ".join(causes) if causes else ""))
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
    return lines


def _layer_rows(layers: Sequence[Any], layer_sparsity: Mapping[str, Any]) -> tuple[list[tuple[str, str]], list[str]]:
    """Rows ``(weight name, what it runs as)`` of the summary, and the lines below them: the modules without a
    weight matrix, grouped, then the reasons of the float rows, numbered once each."""
    reasons: dict[str, int] = {}

    def runs_as(layer: Any) -> str:
        if layer.reason is None:
            return f"{layer.dtype} ({layer.kind} as Linear)" if layer.as_linear else layer.dtype
        number = reasons.setdefault(layer.reason, len(reasons) + 1)
        return f"{layer.dtype} [{number}]"

    by_module = {layer.name: layer for layer in layers}
    rows: dict[str, str] = {}
    for layer in layers:
        for weight in layer.weights:
            rows[weight] = runs_as(layer)
    for name in layer_sparsity:  # pruned parameters that are not weight matrices
        if name not in rows:
            layer = by_module.get(name.rpartition(".")[0])
            rows[name] = runs_as(layer) if layer is not None else ""
    groups: dict[str, list[str]] = {}
    for layer in layers:
        if not layer.weights and not any(n.startswith(f"{layer.name}.") for n in layer_sparsity):
            groups.setdefault(runs_as(layer), []).append(layer.kind)
    lines = []
    for shown, kinds in groups.items():
        counted = ", ".join(f"{kind} x{kinds.count(kind)}" for kind in dict.fromkeys(kinds))
        lines.append(
            f"and {len(kinds)} layer{'s' if len(kinds) > 1 else ''} without a weight matrix ({counted}): {shown}"
        )
    lines += [f"[{number}] {reason}" for reason, number in reasons.items()]
    return list(rows.items()), lines


def _timed_inputs(described: Sequence[str], source: str | None) -> str:
    """``evaluation batches (2): (float32[256, 64]) x1, (float32[103, 64]) x1``: the calls timed, by shape."""
    shapes = ", ".join(f"{d} x{described.count(d)}" for d in dict.fromkeys(described))
    return f"{source or 'inputs'} ({len(described)}): {shapes}"


def artifact_lines(
    path: str, written: Any, metrics: Mapping[str, float], headline: str | None, evaluated: bool
) -> list[str]:
    """The summary's lines about an artifact that was written and measured (``written``: a
    :class:`lightning_compress.artifacts.Written`): its form and size, on how many input shapes it was compared,
    its metrics, and why an earlier form was not kept."""
    shapes = ", ".join(written.compared[:6]) + (
        f" and {len(written.compared) - 6} more" if len(written.compared) > 6 else ""
    )
    if written.tolerance is not None:
        against = (
            f"the float model, within {written.tolerance:.0%} of each output's largest magnitude (ONNX Runtime "
            "quantized it)"
        )
    else:
        against = "the quantized model"
    lines = [
        f"artifact: {path} ({written.form} form, {written.size / 1e6:.3f} MB), reloaded from disk and compared with "
        f"{against} on {len(written.compared)} input shape(s): {shapes}"
    ]
    if written.caveat:
        lines.append(f"artifact: {written.caveat}")
    if metrics:
        ordered = sorted(metrics, key=lambda name: name != headline)
        lines.append(
            "artifact measured as the quantized model was: "
            + ", ".join(f"{name} {metrics[name]:.4f}" for name in ordered)
        )
    elif evaluated and written.calls:
        lines.append(
            f"artifact: validation ran it ({written.calls} calls, each compared with the quantized model) but logs "
            "no metric (`self.log` in `validation_step`), so it has no metric to report"
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
    *,
    baseline: float | None = None,
    max_drop: float | None = None,
    mode: str = "max",
    quantized: float | None = None,
    last_epoch: float | None = None,
) -> Any:
    """A matplotlib figure: target and measured sparsity and (on a second axis) a validation metric, by epoch.

    Each series is a sequence of ``(epoch, value)`` points. The target is a step line (it holds from one update to
    the next), the measured sparsity points with markers, in other colours, so neither hides the other.

    Args:
        baseline: the dense model's value of the metric (a dotted line), when known.
        max_drop: with ``baseline``, the accuracy guard's budget, shaded between ``baseline`` and
            ``baseline - max_drop`` (``+`` for ``mode="min"``).
        quantized: the metric measured on the quantized model (a star at the last epoch).
        last_epoch: where the x axis ends: the last trained epoch (points measured after it, at the end of
            training, are drawn at it).
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    def xs(points: Sequence[tuple[float, float]]) -> list[float]:
        return [min(p[0], last_epoch) if last_epoch is not None else p[0] for p in points]

    figure, sparsity_axis = plt.subplots(figsize=(7, 4))
    if target:
        sparsity_axis.plot(
            xs(target),
            [p[1] for p in target],
            drawstyle="steps-post",
            linestyle="--",
            linewidth=2.5,
            color="tab:blue",
            label="target sparsity",
            zorder=3,
        )
    if measured:
        sparsity_axis.plot(
            xs(measured),
            [p[1] for p in measured],
            linestyle="-",
            linewidth=1,
            marker="o",
            markersize=6,
            color="tab:orange",
            label="measured sparsity",
            zorder=2,
            clip_on=False,
        )
    sparsity_axis.set_xlabel("epoch (masks updated at the start of an epoch)")
    sparsity_axis.set_ylabel("sparsity")
    sparsity_axis.set_ylim(0, 1)
    sparsity_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = sparsity_axis.get_legend_handles_labels()
    if metric_name and (metric or baseline is not None or quantized is not None):
        metric_axis = sparsity_axis.twinx()
        at = last_epoch if last_epoch is not None else max((p[0] for p in [*metric, *measured]), default=0)
        _draw_metric(metric_axis, xs(metric), metric, metric_name, baseline, max_drop, mode, quantized, at)
        more_handles, more_labels = metric_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if last_epoch is not None:
        first = min((p[0] for p in [*target, *measured, *metric]), default=last_epoch)
        sparsity_axis.set_xlim(min(first, last_epoch - 1), last_epoch)
    sparsity_axis.legend(handles, labels, loc="lower right", fontsize="small")
    sparsity_axis.set_title("Pruning schedule and recovery")
    figure.tight_layout()
    return figure


def _draw_metric(
    metric_axis: Any,
    x: Sequence[float],
    metric: Sequence[tuple[float, float]],
    metric_name: str,
    baseline: float | None,
    max_drop: float | None,
    mode: str,
    quantized: float | None,
    at: float,
) -> None:
    """The validation metric's side of the sparsity figure: its values at ``x``, the dense baseline with the
    guard's budget, and the quantized model's value (a star at ``at``)."""
    if metric:
        metric_axis.plot(x, [p[1] for p in metric], "-s", color="tab:green", label=metric_name)
    if baseline is not None:
        metric_axis.axhline(baseline, color="tab:green", linestyle=":", label=f"{metric_name}, dense baseline")
        if max_drop is not None:
            low, high = (baseline - max_drop, baseline) if mode == "max" else (baseline, baseline + max_drop)
            metric_axis.axhspan(
                low, high, color="tab:green", alpha=0.12, label=f"accuracy guard budget (max_drop={max_drop:g})"
            )
    if quantized is not None:
        metric_axis.plot(
            [at],
            [quantized],
            linestyle="none",
            marker="*",
            markersize=14,
            color="tab:red",
            label=f"{metric_name}, quantized",
            clip_on=False,
            zorder=4,
        )
    metric_axis.set_ylabel(metric_name)


def write_figure(trainer: pl.Trainer, figure: Any, name: str = "sparsity.png", tag: str = "pruning/schedule") -> Path:
    """Write ``figure`` as ``<first logger's log_dir>/<name>`` and, to each TensorBoard logger, under ``tag``; close
    it. Call it on rank zero with at least one logger."""
    from lightning.pytorch.loggers import TensorBoardLogger

    # Not `trainer.log_dir`: it is a collective (a broadcast) under DDP, and only rank zero is here.
    logger = trainer.loggers[0]
    out = Path(getattr(logger, "log_dir", None) or logger.save_dir or trainer.default_root_dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(tag, figure, global_step=trainer.global_step, close=False)
    _pyplot().close(figure)
    return out


def write_schedule_plot(
    trainer: pl.Trainer,
    history: Sequence[Mapping[str, float]],
    monitored: Sequence[tuple[float, float]],
    metric_name: str | None,
    **extras: Any,
) -> Path | None:
    """Draw the pruning history into ``<trainer.log_dir>/sparsity.png`` and, for TensorBoard, as a figure.

    Works with any logger, as it draws from the callback's own history. Does nothing without a logger, off rank
    zero, or without matplotlib (an optional extra). ``extras`` go to :func:`sparsity_figure` (baseline, budget,
    quantized metric, last epoch). Returns the PNG's path when one was written.
    """
    if not trainer.is_global_zero or not trainer.loggers or not history:
        return None
    try:
        _pyplot()
    except ImportError:
        return None
    figure = sparsity_figure(
        [(h["epoch"], h["target"]) for h in history],
        [(h["epoch"], h["sparsity"]) for h in history],
        monitored,
        metric_name,
        **extras,
    )
    return write_figure(trainer, figure)


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

    metric = series(accuracy_key)
    # rows logged at the end of training carry the epoch count, one past the last epoch validated
    last_epoch = max(p[0] for p in metric) if metric else None
    figure = sparsity_figure(series(TARGET), series(SPARSITY), metric, accuracy_key, last_epoch=last_epoch)
    out = Path(path) if path is not None else metrics_csv.with_name("sparsity.png")
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
