"""ONNX artifacts (issue 20): DynamicQuantization(save_path="model.onnx") on the digits MLP; a tiny BERT with dict
inputs and two sequence lengths and an LSTM over tokens written without a Trainer (write_verified, as the fit
does). Each file runs in a fresh
process with onnxruntime alone (torch and lightning_compress not imported there) and matches the float model on
every validation batch within the stated tolerance; load_quantized runs it as forward is called; the artifact's
figures are logged; a missing extra is named before training."""

import csv
import json
import subprocess
import sys

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import BertClassifier, DigitsDataModule, DigitsMLP, assert_fails_before_training, sentences
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress import ArtifactError, DynamicQuantization, load_quantized
from lightning_compress.artifacts import onnx_format, write_verified
from lightning_compress.artifacts.onnx_format import INT8_RTOL
from lightning_compress.inputs import ModelInput, named_inputs, plain_outputs

# Runs each ONNX file on each batch with onnxruntime alone; says which of torch/lightning modules got imported.
FRESH = """
import json, sys
import numpy as np
import onnxruntime as ort
cases = json.load(open(sys.argv[1]))
for case in cases:
    session = ort.InferenceSession(case["file"], providers=["CPUExecutionProvider"])
    for batch in case["batches"]:
        outputs = session.run(None, {name: np.load(path) for name, path in batch["inputs"].items()})
        np.savez(batch["out"], *outputs)
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "lightning_compress", "lightning"})
json.dump(loaded, open(sys.argv[2], "w"))
"""


class TokenLSTM(nn.Module):
    """Token ids -> embedding -> LSTM -> a head on the last step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, tokens):
        hidden, _ = self.lstm(self.embedding(tokens))
        return self.head(hidden[:, -1])


def _bert_validation():
    """16 sentences of 12 tokens and 16 of 7, in batches of one length each (variable sequence lengths)."""
    samples = sentences(16, 1, length=12) + sentences(16, 2, length=7)
    for sample in samples[::3]:
        sample["attention_mask"][-2:] = 0  # padded ends
    return DataLoader(samples, batch_sampler=[list(range(0, 16)), list(range(16, 32))])


def _fit(trainer_kwargs, model, callback, **fit_kwargs):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[callback], **{"max_epochs": 1, "limit_train_batches": 3, **trainer_kwargs})
    trainer.fit(model, **fit_kwargs)
    return trainer


@pytest.fixture(scope="module")
def onnx_runs(tmp_path_factory):
    """The three ONNX files, the float models and validation batches they were made from, and what a fresh process
    with onnxruntime alone computed on each batch."""
    tmp = tmp_path_factory.mktemp("onnx")
    kwargs = dict(
        accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp,
    )  # fmt: skip
    runs = {}

    digits = DigitsDataModule()
    mlp, quant = DigitsMLP(hidden=64), DynamicQuantization(save_path=tmp / "mlp.onnx")
    trainer = _fit({**kwargs, "logger": CSVLogger(tmp, name="mlp")}, mlp, quant, datamodule=digits)
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        logged = {k for row in csv.DictReader(f) for k, v in row.items() if v}
    mlp_batches = [ModelInput((x,)) for x, _ in digits.val_dataloader()]
    runs["mlp"] = dict(model=mlp.eval(), callback=quant, batches=mlp_batches, logged=logged)

    # without a Trainer (the fit path is the MLP's): one export instead of the rehearsal's and the fit's
    bert = BertClassifier().eval()
    bert_batches = [ModelInput((), dict(batch)) for batch in _bert_validation()]
    write_verified(bert, tmp / "bert.onnx", bert_batches)
    runs["bert"] = dict(model=bert, batches=bert_batches)

    lstm = TokenLSTM().eval()
    # a first input of one row, as an example_input_array often is: the export must not fix the batch at 1
    lengths = [
        ModelInput((torch.randint(0, 50, (rows, n), generator=torch.Generator().manual_seed(n)),))
        for rows, n in ((1, 5), (8, 9))
    ]
    written = write_verified(lstm, tmp / "lstm.onnx", lengths)
    runs["lstm"] = dict(model=lstm, written=written, batches=lengths)

    cases = []
    for name, run in runs.items():
        batches = []
        for i, batch in enumerate(run["batches"]):
            inputs = {}
            for key, value in named_inputs(run["model"].forward, batch).items():
                inputs[key] = str(tmp / f"{name}.{i}.{key}.npy")
                np.save(inputs[key], value.numpy())
            batches.append({"inputs": inputs, "out": str(tmp / f"{name}.{i}.out.npz")})
        cases.append({"file": str(tmp / f"{name}.onnx"), "batches": batches})
        run["outputs"] = [b["out"] for b in batches]
    (tmp / "cases.json").write_text(json.dumps(cases))
    result = subprocess.run(
        [sys.executable, "-c", FRESH, str(tmp / "cases.json"), str(tmp / "loaded.json")],
        capture_output=True, text=True, timeout=120, cwd=tmp,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs["fresh_imported"] = json.loads((tmp / "loaded.json").read_text())
    runs["tmp"] = tmp
    return runs


def _float_outputs(model, batch):
    with torch.inference_mode():
        return onnx_format._flatten(plain_outputs(batch(model)))[1]


@pytest.mark.parametrize("name", ["mlp", "bert", "lstm"])
def test_the_onnx_file_runs_with_onnxruntime_alone_and_matches_the_float_model_on_every_batch(onnx_runs, name):
    assert onnx_runs["fresh_imported"] == []  # neither torch nor lightning_compress in that process
    run = onnx_runs[name]
    for batch, out in zip(run["batches"], run["outputs"]):
        fresh = np.load(out)
        expected = _float_outputs(run["model"], batch)
        assert len(fresh.files) == len(expected)
        for i, e in enumerate(expected):
            actual = torch.from_numpy(fresh[f"arr_{i}"])
            assert actual.shape == e.shape
            assert (actual - e).abs().max() <= INT8_RTOL * e.abs().max()
    # load_quantized runs the same file, called as forward is called, with torch's threads
    loaded = load_quantized(onnx_runs["tmp"] / f"{name}.onnx")
    assert loaded.session.get_session_options().intra_op_num_threads == torch.get_num_threads()
    batch = run["batches"][-1]
    with torch.inference_mode():
        got = onnx_format._flatten(batch(loaded))[1]
    for g, out_i in zip(got, np.load(run["outputs"][-1]).values()):
        assert torch.equal(g, torch.from_numpy(out_i))


def test_the_fit_logs_the_onnx_artifacts_figures_and_states_the_tolerance(onnx_runs):
    mlp = onnx_runs["mlp"]
    results = mlp["callback"].results
    for key in ("val_acc_artifact", "accuracy_artifact", "size_mb_artifact", "latency_ms_artifact"):
        assert f"quantization/{key}" in results and f"quantization/{key}" in mlp["logged"]
    size = (onnx_runs["tmp"] / "mlp.onnx").stat().st_size
    assert results["quantization/size_mb_artifact"] == size / 1e6
    assert abs(results["quantization/accuracy_artifact"] - results["quantization/accuracy_before"]) < 0.05
    # the dict input's names, and the sequence dimension dynamic (two lengths validated, others run)
    loaded = load_quantized(onnx_runs["tmp"] / "bert.onnx")
    assert loaded.input_names == ["input_ids", "attention_mask", "token_type_ids", "labels"]
    batch = next(iter(DataLoader(sentences(3, 5, length=20), batch_size=3)))
    expected = onnx_runs["bert"]["model"](**batch).logits
    got = loaded(**batch)["logits"]
    assert (got - expected).abs().max() <= INT8_RTOL * expected.abs().max()
    written = onnx_runs["lstm"]["written"]
    assert written.form == "onnx" and written.tolerance == INT8_RTOL
    assert written.compared == ["(int64[1, 5])", "(int64[8, 9])", "(int64[2, 5])", "(int64[1, 2])"]
    x = torch.randint(0, 50, (13, 6))
    expected = onnx_runs["lstm"]["model"](x)
    assert (
        load_quantized(onnx_runs["tmp"] / "lstm.onnx")(x) - expected
    ).abs().max() <= INT8_RTOL * expected.abs().max()


def test_a_missing_onnx_extra_is_named_before_training(monkeypatch, quiet_trainer_kwargs, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"save_path=.*onnxruntime.*pip install 'lightning_compress\[onnx\]'"):
        DynamicQuantization(save_path=tmp_path / "m.onnx")
    with pytest.raises(ArtifactError, match=r"lightning_compress\[onnx\]"):
        (tmp_path / "x.onnx").write_bytes(b"\x08\x07")
        load_quantized(tmp_path / "x.onnx")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="`compress=True`"):
        DynamicQuantization(save_path=tmp_path / "m.bin", artifact_format="onnx", compress=True)
    with pytest.raises(ValueError, match="dtype='float16'"):
        DynamicQuantization(save_path=tmp_path / "m.onnx", dtype="float16")


class _Unexportable(DigitsMLP):
    def forward(self, x):
        out = self.net(x.flatten(1))
        if out.sum() > 1e9:  # a branch on values: torch.export cannot record it
            return -out
        return out


def test_an_export_failure_is_caught_by_the_rehearsal_before_training(quiet_trainer_kwargs, tmp_path):
    assert_fails_before_training(
        quiet_trainer_kwargs,
        [DynamicQuantization(save_path=tmp_path / "m.onnx")],
        _Unexportable(hidden=16),
        "rehearsed.*onnx",
        datamodule=DigitsDataModule(),
    )
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("kwargs", [{"exclude": ["net.4"]}, {"modules": [torch.nn.Linear]}, {"sparse_kernels": "auto"}])
def test_settings_that_onnx_runtime_would_ignore_are_refused_at_construction(kwargs, tmp_path):
    with pytest.raises(ValueError, match="with an ONNX artifact: ONNX Runtime quantizes the exported float model"):
        DynamicQuantization(save_path=tmp_path / "model.onnx", **kwargs)
