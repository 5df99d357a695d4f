"""StaticQuantization (torchao PT2E): one fit shared by most checks (inductor compiles take seconds each) of a digits
CNN with BatchNorm, a residual add, one ReLU called twice and a conv + Linear head, pruned by channel groups and
shrunk before static int8; plus cheap fits that must fail before training."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from helpers import DigitsDataModule, _Classifier, assert_fails_before_training
from torch import nn

from lightning_compress import DynamicQuantization, MagnitudePruning, StaticQuantization, load_quantized
from lightning_compress.artifacts import ArtifactError
from lightning_compress.artifacts.exported import CompiledProgram
from lightning_compress.quantization import base

pytest.importorskip("torchao")


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()  # called twice, as torchvision's BasicBlock does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class StaticCNN(_Classifier):
    """Conv stem with BatchNorm, one residual block, a two-Linear head: a hybrid conv + Linear model."""

    def __init__(self, channels: int = 16, lr: float = 0.01) -> None:
        super().__init__(lr)
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.block = Residual(channels)
        self.head = nn.Sequential(nn.Linear(channels, 32), nn.ReLU(), nn.Linear(32, 10))
        # groups pruning traces the model on it; 103 rows, the size of the last validation batch (359 = 256 + 103),
        # so that no third input shape is compiled
        self.example_input_array = torch.rand(103, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x.reshape(-1, 1, 8, 8))).mean(dim=(2, 3)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def _pruning() -> MagnitudePruning:
    return MagnitudePruning(amount=0.25, method="ln_structured", structure="groups", start=0, end=1)


def _fit(callbacks: list, tmp_root) -> StaticCNN:
    pl.seed_everything(0, verbose=False)
    model = StaticCNN()
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_root,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    return model


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("static")
    callback = StaticQuantization(save_path=root / "cnn.pt2", calibration_batches=4, shrink=True)
    with pytest.MonkeyPatch.context() as patch:  # latency is timed briefly here: its figures only need to exist
        patch.setattr(base, "LATENCY_ROUNDS", 2)
        patch.setattr(base, "LATENCY_BUDGET_S", 0.5)
        model = _fit([_pruning(), callback], root)
    return callback, model, root / "cnn.pt2", root


def test_static_int8_after_groups_pruning_and_shrink(fitted) -> None:
    callback, model, _, _ = fitted
    results = callback.results
    assert results["quantization/accuracy_before"] > 0.8
    assert abs(results["quantization/accuracy_before"] - results["quantization/accuracy_after"]) <= 0.02
    assert results["quantization/accuracy_artifact"] == results["quantization/accuracy_after"]
    for key in ("latency_ms_before", "latency_ms_after", "latency_ms_eager", "size_mb_before", "size_mb_after"):
        assert results[f"quantization/{key}"] > 0
    assert results["quantization/size_mb_after"] < 0.5 * results["quantization/size_mb_before"]
    # every conv and Linear runs in int8 (the second call of the shared ReLU too), BatchNorm folded into its conv
    ran = {layer.name: layer.dtype for layer in callback.layers}
    int8 = {"stem.0", "block.conv1", "block.conv2", "head.0", "head.2"}
    assert {name for name, dtype in ran.items() if dtype == "int8"} == int8
    assert callback.reused_modules == ["block.relu"]
    assert callback.calibrated_batches == 4
    shrunk = callback.quantized_model
    assert isinstance(shrunk.int8_program, CompiledProgram)
    # shrink removed the channels pruned by groups before quantizing: the int8 stem holds 12 of the 16 filters
    stem = next(v for k, v in shrunk.state_dict().items() if v.dtype == torch.int8 and v.shape[1:] == (1, 3, 3))
    assert stem.shape[0] == 12 and model.stem[0].out_channels == 16
    # coverage: the int8 layers' parameters over all, counted on the shrunk float model the program came from
    assert 0.9 < results["quantization/coverage"] < 1.0


def test_the_artifact_loads_in_a_fresh_process_and_matches_every_validation_batch(fitted, tmp_path) -> None:
    callback, _, path, _ = fitted
    data = DigitsDataModule(batch_size=64)
    data.setup()
    batches = [x for x, _ in data.val_dataloader()]
    with torch.no_grad():
        expected = [callback.quantized_model(x) for x in batches]
    torch.save(batches, tmp_path / "inputs.pt")
    script = (
        "import sys, json, torch\n"
        "from lightning_compress import load_quantized\n"
        "model = load_quantized(sys.argv[1])\n"
        "torch.save([model(x) for x in torch.load(sys.argv[2])], sys.argv[3])\n"
        "print(json.dumps({'lightning': 'lightning' in sys.modules}))\n"
    )
    out = tmp_path / "out.pt"
    done = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "inputs.pt"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"lightning": False}
    for want, got in zip(expected, torch.load(out), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_calibration_and_the_rehearsal_leave_training_bit_identical(fitted) -> None:
    _, model, _, root = fitted
    alone = _fit([_pruning()], root / "alone")
    for (name, a), (_, b) in zip(model.state_dict().items(), alone.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_without_torchao_loading_names_the_extra(fitted, monkeypatch) -> None:
    _, _, path, _ = fitted
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", None)
    with pytest.raises(ArtifactError, match=r"pip install 'lightning_compress\[static\]'"):
        load_quantized(path)


def test_without_torchao_the_callback_names_the_extra_at_construction(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name))
    with pytest.raises(ValueError, match=r"pip install 'lightning_compress\[static\]'"):
        StaticQuantization()


class Unexportable(StaticCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a branch on a tensor's value: torch.export cannot capture it
            x = x * 2
        return super().forward(x)


def test_an_unexportable_forward_fails_before_training_with_its_cause(quiet_trainer_kwargs) -> None:
    assert_fails_before_training(
        quiet_trainer_kwargs,
        [StaticQuantization(calibration_batches=1)],
        Unexportable(),
        r"(?s)torch.export cannot capture the model's forward.*data-dependent.*torch.cond",
        datamodule=DigitsDataModule(),
    )


def test_dynamic_and_static_quantization_in_one_trainer_is_a_setup_error(quiet_trainer_kwargs) -> None:
    assert_fails_before_training(
        quiet_trainer_kwargs,
        [DynamicQuantization(), StaticQuantization()],
        StaticCNN(),
        "DynamicQuantization and StaticQuantization are in one Trainer",
        datamodule=DigitsDataModule(),
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"calibration_batches": 0}, "`calibration_batches` must be a positive int"),
        ({"backend": "fbgemm"}, r"`backend` must be one of \['x86_inductor'\]"),
        ({"modules": [3]}, "`modules` must be None or layer types"),
        ({"save_path": "model.onnx"}, r"writes a torch.export program, not ONNX.*Name it '.pt2'"),
    ],
)
def test_arguments_are_checked_at_construction(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        StaticQuantization(**kwargs)


def test_torchaos_notice_that_a_pooling_input_stays_float_is_not_printed() -> None:
    import warnings

    from lightning_compress.inputs import ModelInput
    from lightning_compress.quantization import static

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 2)).eval()
    program, _ = static.export(model, [ModelInput((torch.randn(2, 1, 8, 8),), {})])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        static.prepare(program, ["4"], ["0", "4"])  # the conv stays float: the pool after it gets a float input
    assert not [w for w in caught if "is not quantized, skip annotate" in str(w.message)]
