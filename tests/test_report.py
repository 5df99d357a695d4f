import csv

import pytest

from lightning_compress import report


def _metrics_csv(tmp_path):
    path = tmp_path / "metrics.csv"
    rows = [
        {"epoch": 0, "step": 0, "pruning/target": 0.0, "pruning/sparsity": 0.0, "val_acc": ""},
        {"epoch": 0, "step": 22, "pruning/target": "", "pruning/sparsity": "", "val_acc": 0.8},
        {"epoch": 1, "step": 23, "pruning/target": 0.5, "pruning/sparsity": 0.5, "val_acc": ""},
        {"epoch": 1, "step": 45, "pruning/target": "", "pruning/sparsity": "", "val_acc": 0.9},
    ]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_plot_metrics_writes_a_png_beside_the_metrics(tmp_path):
    pytest.importorskip("matplotlib")  # the [plot] extra
    out = report.plot_metrics(_metrics_csv(tmp_path))
    assert out == tmp_path / "sparsity.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'lightning_compress\[plot\]'"):
        report.plot_metrics(_metrics_csv(tmp_path))


def test_summary_table_without_pruning_or_evaluation():
    table = report.summary_table({report.SIZE_BEFORE: 4.0, report.SIZE_AFTER: 1.0}, "qint8")
    assert "4.00x" in table and "accuracy" not in table and "sparsity" not in table


def test_plot_metrics_on_a_missing_file_says_which_loggers_write_one(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(
        FileNotFoundError, match="reads a CSVLogger's metrics.csv.*MagnitudePruning writes sparsity.png"
    ):
        report.plot_metrics(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")


# ---------------------------------------------------------------------------------------------- the plot (issue 18)
def _band(axis):
    """The y range of the one shaded band on ``axis``, in data units."""
    (patch,) = [p for p in axis.patches if p.get_label() and not p.get_label().startswith("_")]
    ys = patch.get_path().transformed(patch.get_patch_transform()).vertices[:, 1]
    return float(ys.min()), float(ys.max()), patch.get_label()


def test_the_figure_draws_target_and_measured_apart_with_baseline_budget_and_quantized_metric():
    pytest.importorskip("matplotlib")
    target = [(1, 0.0), (2, 0.5), (3, 0.8), (3, 0.8)]
    measured = [(1, 0.0), (2, 0.5), (3, 0.8), (4, 0.8)]  # the last one: at the end of training, epoch count 4
    figure = report.sparsity_figure(
        target,
        measured,
        [(0, 0.9), (1, 0.91), (2, 0.9), (3, 0.88)],
        "val_acc",
        baseline=0.91,
        max_drop=0.02,
        quantized=0.87,
        last_epoch=3,
    )
    sparsity_axis, metric_axis = figure.axes
    lines = {line.get_label(): line for axis in figure.axes for line in axis.get_lines()}
    target_line, measured_line = lines["target sparsity"], lines["measured sparsity"]
    assert target_line.get_drawstyle() == "steps-post" and target_line.get_linestyle() == "--"
    assert measured_line.get_marker() == "o" and target_line.get_marker() in ("None", "", None)
    assert target_line.get_color() != measured_line.get_color()
    assert target_line.get_zorder() > measured_line.get_zorder()  # equal values: the target stays visible
    assert list(measured_line.get_xdata()) == [1, 2, 3, 3]  # the end-of-training point at the last epoch
    assert sparsity_axis.get_xlim()[1] == 3  # the axis ends at the last trained epoch
    assert list(lines["val_acc, dense baseline"].get_ydata()) == [0.91, 0.91]
    assert _band(metric_axis) == (pytest.approx(0.89), pytest.approx(0.91), "accuracy guard budget (max_drop=0.02)")
    star = lines["val_acc, quantized"]
    assert (list(star.get_xdata()), list(star.get_ydata()), star.get_marker()) == ([3], [0.87], "*")
    legend = [t.get_text() for t in sparsity_axis.get_legend().get_texts()]
    assert legend == [
        "target sparsity",
        "measured sparsity",
        "val_acc",
        "val_acc, dense baseline",
        "accuracy guard budget (max_drop=0.02)",
        "val_acc, quantized",
    ]
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_min_mode_shades_the_budget_above_the_baseline():
    pytest.importorskip("matplotlib")
    figure = report.sparsity_figure(
        [(0, 0.5)], [(0, 0.5)], [(0, 1.2)], "val_loss", baseline=1.0, max_drop=0.3, mode="min", last_epoch=0
    )
    assert _band(figure.axes[1])[:2] == (pytest.approx(1.0), pytest.approx(1.3))
    assert figure.axes[0].get_xlim() == (-1, 0)
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_the_pruning_plot_of_a_run_shows_what_that_run_measured_and_quantization_adds_its_metric(
    quiet_trainer_kwargs, tmp_path, monkeypatch
):
    pytest.importorskip("matplotlib")
    import lightning.pytorch as pl
    from helpers import DigitsDataModule, DigitsMLP
    from lightning.pytorch.loggers import CSVLogger

    from lightning_compress import DynamicQuantization, MagnitudePruning

    drawn = []  # every figure written, inspected before it is closed
    write = report.write_figure
    monkeypatch.setattr(
        report, "write_figure", lambda trainer, figure, **kw: (drawn.append(figure), write(trainer, figure, **kw))[1]
    )
    pruning = MagnitudePruning(amount=0.5, schedule="linear", start=1, end=2, monitor="val_acc", max_drop=0.5)
    quantization = DynamicQuantization()
    logger = CSVLogger(tmp_path, name="plot")
    pl.seed_everything(0, verbose=False)
    kwargs = {**quiet_trainer_kwargs, "logger": logger, "limit_train_batches": 4}
    trainer = pl.Trainer(max_epochs=3, callbacks=[pruning, quantization], **kwargs)
    trainer.fit(DigitsMLP(hidden=16), datamodule=DigitsDataModule())

    assert len(drawn) == 2 and (tmp_path / "plot" / "version_0" / "sparsity.png").stat().st_size > 10_000
    before, after = drawn
    for figure in drawn:
        assert figure.axes[0].get_xlim()[1] == 2  # three epochs: 0, 1, 2 (Lightning's counter says 3 at the end)
        lines = {line.get_label(): line for axis in figure.axes for line in axis.get_lines()}
        assert list(lines["target sparsity"].get_ydata()) == [h["target"] for h in pruning.history]
        assert list(lines["measured sparsity"].get_ydata()) == [h["sparsity"] for h in pruning.history]
        assert lines["val_acc, dense baseline"].get_ydata()[0] == pruning.guard.baseline
        assert _band(figure.axes[1])[:2] == (pytest.approx(pruning.guard.baseline - 0.5), pruning.guard.baseline)
    assert "val_acc, quantized" not in {line.get_label() for line in before.axes[1].get_lines()}
    star = next(line for line in after.axes[1].get_lines() if line.get_label() == "val_acc, quantized")
    assert list(star.get_ydata()) == [quantization.results["quantization/val_acc_after"]]
    assert list(star.get_xdata()) == [2]
