"""Smoke tests: every example runs as a user would run it, and shows what it promises."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(tmp_path, *args):
    result = subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def test_demo_prints_the_summary_and_writes_the_plot(tmp_path):
    out = _run(tmp_path, EXAMPLES / "digits_mlp.py", "--epochs", "4", "--root", tmp_path / "runs")
    assert "lightning_compress summary (qint8" in out
    for row in ("net.0.weight", "sparsity (overall)", "accuracy, dense", "val_acc, pruned", "size (MB)", "latency"):
        assert row in out
    log_dir = tmp_path / "runs" / "digits_mlp" / "version_0"
    if importlib.util.find_spec("matplotlib") is not None:  # the [plot] extra draws it
        assert (log_dir / "sparsity.png").stat().st_size > 10_000
    else:
        assert "pip install 'lightning_compress[plot]'" in out
    assert (log_dir / "model_int8.lcz").exists() and "size compressed (MB)" in out and "kernel net.2" in out
    header = (log_dir / "metrics.csv").read_text().splitlines()[0]
    assert "pruning/sparsity" in header and "quantization/accuracy_after" in header


def test_lstm_example(tmp_path):
    out = _run(tmp_path, EXAMPLES / "digits_lstm.py", "--epochs", "2", "--root", tmp_path / "runs")
    assert "pruned: lstm.weight_ih_l0, lstm.weight_hh_l0, head.weight" in out
    assert "quantized LSTM: torch.ao.nn.quantized.dynamic" in out


def test_custom_selection_example(tmp_path):
    out = _run(tmp_path, EXAMPLES / "custom_selection.py")
    lines = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.startswith("net.")}
    assert lines["net.4.weight"] == "0.00%"
    assert lines["net.0.weight"] != "0.00%"


@pytest.mark.parametrize("epochs", [2])
def test_lightning_cli_config(tmp_path, epochs):
    pytest.importorskip("jsonargparse")  # the [cli] extra
    out = _run(
        tmp_path,
        EXAMPLES / "cli" / "main.py",
        "fit",
        "--config",
        EXAMPLES / "cli" / "config.yaml",
        f"--trainer.max_epochs={epochs}",
        "--trainer.enable_progress_bar=false",
    )
    assert "MagnitudePruning [epoch 1]" in out and "lightning_compress summary (qint8" in out
    assert "accuracy guard on val_acc (max)" in out and "val_acc" in out
    assert (tmp_path / "runs" / "digits_cli_int8.ts").exists()


@pytest.mark.slow  # inductor compiles: 25-50 s; test_static covers groups + shrink + static int8 + .pt2
def test_cnn_shrink_example(tmp_path):
    pytest.importorskip("torch_pruning")  # the [shrink] extra
    pytest.importorskip("torchao")  # the [static] extra
    out = _run(tmp_path, EXAMPLES / "digits_cnn_shrink.py", "--epochs", "4", "--root", tmp_path / "runs")
    assert "shrink: " in out and "parameters" in out and "shrink: stem.0.weight (32, 1, 3, 3) -> (16, 1, 3, 3)" in out
    assert "lightning_compress summary (static int8" in out and "latency, float eager" in out
    assert "artifact cnn_int8.pt2: predicts [" in out
    assert (tmp_path / "runs" / "digits_cnn" / "version_0" / "cnn_int8.pt2").exists()
    assert "accuracy guard on val_acc" in out


@pytest.mark.slow
def test_fsdp_example(tmp_path):
    out = _run(tmp_path, EXAMPLES / "digits_fsdp.py", "--epochs", "3", "--root", tmp_path / "runs")
    assert "rank 0: net.0.weight shard (128, 64) of (256, 64)" in out
    assert "rank 1: net.0.weight shard (128, 64) of (256, 64)" in out
    assert "lightning_compress summary (qint8" in out and "MagnitudePruning [end of training]" in out
    assert (tmp_path / "runs" / "digits_fsdp_int8.ts").exists()
