"""The float copy holds what the forward computes and nothing else, and the backend's refusals are named
(issue 17, items 3 and 5)."""

import threading

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune
from torch.utils.tensorboard import SummaryWriter

from lightning_compress.inputs import ModelInput
from lightning_compress.quantization import copying, dynamic, evaluation
from lightning_compress.quantization.copying import CopyReport


class Holder(nn.Module):
    """A model that keeps, besides its layers, things a deep copy cannot copy."""

    def __init__(self, log_dir):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        self.writer = SummaryWriter(log_dir)
        self.lock = threading.Lock()
        self.stream = (i for i in range(3))  # a generator
        self.history = [1, 2]  # copyable: copied

    def forward(self, x):
        return self.net(x)


def test_what_cannot_be_copied_is_shared_and_named_the_rest_copied(tmp_path):
    model = Holder(tmp_path).eval()
    report = CopyReport()
    copied, _ = copying.float_copy(model, report=report)
    assert copied.writer is model.writer and copied.lock is model.lock and copied.stream is model.stream
    assert copied.history == model.history and copied.history is not model.history
    assert copied.net[0].weight is not model.net[0].weight
    assert [s.split(" ")[0] for s in report.shared] == ["writer", "lock", "stream"]
    assert "writer (SummaryWriter)" in report.describe() and "lock (lock)" in report.describe()
    quantized = dynamic.quantize(copied, torch.qint8, ["net.0", "net.2", "net.4"])  # the backend copies too
    assert quantized.writer is model.writer
    model.writer.close()


class Symmetric(nn.Module):
    """A user's own parametrization (torch's tutorial example)."""

    def forward(self, weight):
        return weight.triu() + weight.triu(1).transpose(-1, -2)


def _reparametrized():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    )
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[0], "weight", amount=0.2)  # a PruningContainer
    parametrizations.weight_norm(model[2])
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(model[4])  # the hook-based one
    parametrizations.spectral_norm(model[5])
    parametrize.register_parametrization(model[6], "weight", Symmetric())
    return model.eval()


def test_reparametrizations_are_folded_into_plain_weights_on_the_copy_only():
    model = _reparametrized()
    x = torch.randn(5, 8)
    report = CopyReport()
    copied, _ = copying.float_copy(model, report=report)
    assert report.folded == ["0.weight", "2.weight", "4.weight", "5.weight", "6.weight"]
    assert torch.equal(copied[6].weight, copied[6].weight.T)
    for layer in copied:
        assert not parametrize.is_parametrized(layer) and not layer._forward_pre_hooks
        assert all(name in ("weight", "bias") for name, _ in layer.named_parameters())
    with torch.no_grad():
        assert torch.allclose(copied(x), model(x), atol=1e-6)
    assert float((copied[0].weight == 0).float().mean()) == pytest.approx(0.6, abs=0.01)
    # the original keeps its reparametrizations
    assert hasattr(model[0], "weight_orig") and parametrize.is_parametrized(model[2]) and model[4]._forward_pre_hooks
    quantized = dynamic.quantize(copied, torch.qint8, ["0", "2", "4", "5", "6"])
    assert torch.all(quantized[0].weight().dequantize()[copied[0].weight == 0] == 0)


def test_other_tools_hooks_and_uncopyable_hooks_are_left_behind_the_users_own_kept():
    from lightning.pytorch.profilers.pytorch import RegisterRecordFunction

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).eval()
    model[1].register_forward_hook(lambda module, args, output: output * 2)  # the user's: part of the model

    class Counter:  # another tool's object, which holds a lock: its bound method cannot be deep-copied
        def __init__(self):
            self.lock, self.calls = threading.Lock(), 0

        def count(self, module, args):
            with self.lock:
                self.calls += 1

    model[0].register_forward_pre_hook(Counter().count)
    profiler_hooks = RegisterRecordFunction(model)
    profiler_hooks.__enter__()  # Lightning's PyTorchProfiler puts these on every module
    before = {i: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for i, m in enumerate(model)}
    report = CopyReport()
    copied, _ = copying.float_copy(model, report=report)
    # the profiler's pre and post hooks on both layers, and the counter's
    assert sorted(report.hooks_left_behind) == [
        "0 (Counter.count)",
        "0 (RegisterRecordFunction._start_recording_forward)",
        "0 (RegisterRecordFunction._stop_recording_forward)",
        "1 (RegisterRecordFunction._start_recording_forward)",
        "1 (RegisterRecordFunction._stop_recording_forward)",
    ]
    assert [len(m._forward_hooks) for m in copied] == [0, 1] and not copied[0]._forward_pre_hooks
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(copied(x), model(x))  # the user's hook still doubles the output
    assert {i: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for i, m in enumerate(model)} == before
    profiler_hooks.__exit__(None, None, None)


def test_a_module_compiled_in_place_is_copied_to_run_its_own_weights():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    model.compile(backend="eager")
    x = torch.randn(2, 4)
    copied, _ = copying.float_copy(model)
    assert copied._compiled_call_impl is None and model._compiled_call_impl is not None
    with torch.no_grad():
        expected = copied(x).clone()
        model[0].weight.add_(1.0)
        assert torch.equal(copied(x), expected) and not torch.equal(model(x), expected)


# ---------------------------------------------------------------------------------------------- refusals
def test_layers_the_backend_cannot_take_are_found_by_kind():
    model = nn.ModuleDict(
        {
            "projected": nn.LSTM(4, 8, proj_size=2),
            "biasless": nn.GRU(4, 8, bias=False),
            "fine": nn.LSTM(4, 8),
        }
    )
    names = ["projected", "biasless", "fine"]
    known = dynamic.known_refusals(model, names)
    assert set(known) == {"projected", "biasless"} and "proj_size=2" in known["projected"]
    # the same kinds are found without knowing them: by converting each layer, and by running it
    assert set(dynamic.unconvertible_layers(model, names, torch.qint8)) == {"biasless"}

    class Run(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.other = model["projected"], model["fine"]

        def forward(self, x):
            return self.lstm(x)[0].sum() + self.other(x)[0].sum()

    run = Run().eval()
    quantized = dynamic.quantize_dynamic_copy(run, torch.qint8, {"lstm", "other"})
    failing = dynamic.failing_layers(run, quantized, ["lstm", "other"], ModelInput((torch.randn(3, 2, 4),)))
    assert list(failing) == ["lstm"] and "packB" in failing["lstm"]
    with pytest.raises(ValueError, match=r"quantized layer 'lstm' \(LSTM\) fails.*exclude=\['lstm'\]"):
        with evaluation.naming_the_failing_layer(quantized, ["lstm", "other"]), torch.no_grad():
            quantized(torch.randn(3, 2, 4))
