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
