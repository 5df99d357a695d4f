"""The package's public names: where users import them from (today's and older paths), and what needs Lightning."""

from __future__ import annotations

import subprocess
import sys

import lightning_compress
from lightning_compress import pruning, quantization


def test_every_top_level_name_resolves_and_the_old_paths_are_the_same_objects():
    for name in lightning_compress.__all__:
        assert getattr(lightning_compress, name) is not None, name
    assert pruning.MagnitudePruning is lightning_compress.MagnitudePruning
    assert pruning.MovementPruning is lightning_compress.MovementPruning
    assert pruning.Pruner is lightning_compress.Pruner
    assert quantization.DynamicQuantization is lightning_compress.DynamicQuantization
    assert quantization.QuantizationError is lightning_compress.QuantizationError
    assert quantization.StaticQuantization is lightning_compress.StaticQuantization


def test_the_pruning_core_and_the_artifacts_need_no_lightning():
    # Lightning made unimportable: a plain torch training loop and a serving process must not need it.
    script = """
import sys
sys.modules["lightning"] = sys.modules["lightning.pytorch"] = sys.modules["pytorch_lightning"] = None
import torch
from torch import nn
from lightning_compress import Pruner, load_quantized, shrink
from lightning_compress.pruning.movement import MovementScore
from lightning_compress.pruning.schedules import target_sparsity

model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
pruner = Pruner.from_model(model)
pruner.update(target_sparsity("linear", 2, amount=0.5, start=0, end=2))
assert abs(pruner.measure().overall - 0.5) < 1e-6
print("ok", "lightning" in sys.modules and sys.modules["lightning"] is not None)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "False"]
