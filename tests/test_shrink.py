"""shrink() (issue 12): zeroed channels physically removed, outputs equal to the masked model's, never a wrong model."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import DigitsDataModule, DigitsMLP
from torch import nn

from lightning_compress import MagnitudePruning, shrink
from lightning_compress.shrinking import ShrinkWarning

pytest.importorskip("torch_pruning")  # the [shrink] extra


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_an_mlp_pruned_by_rows_on_digits_shrinks_to_equal_outputs(quiet_trainer_kwargs):
    pruning = MagnitudePruning(amount=0.5, method="ln_structured", parameters=["net.0.weight", "net.2.weight"])
    model = DigitsMLP(hidden=64)
    pl.seed_everything(0, verbose=False)
    pl.Trainer(max_epochs=3, callbacks=[pruning], **quiet_trainer_kwargs).fit(model, datamodule=DigitsDataModule())
    data = DigitsDataModule()
    data.setup()
    x, _ = next(iter(data.val_dataloader()))
    model.eval()
    shrunk = shrink(model, x[:16])
    assert [tuple(shrunk.net[i].weight.shape) for i in (0, 2, 4)] == [(32, 64), (32, 32), (10, 32)]
    with torch.no_grad():  # on every validation input, not only the example
        assert torch.allclose(shrunk(x), model(x), atol=1e-5)
    assert _params(shrunk) < 0.5 * _params(model)
    assert model.net[0].weight.shape == (64, 64)  # the model itself is untouched


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class ResNetish(nn.Module):
    """A stem, two residual blocks with BatchNorm, global average pooling, a linear head."""

    def __init__(self, c=16):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.head = nn.Linear(c, 10)
        for bn in (m for m in self.modules() if isinstance(m, nn.BatchNorm2d)):
            with torch.no_grad():
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.bn(self.stem(x)))).mean((2, 3)))


def _zero_group(convs_and_norms, channels, with_norm=True):
    with torch.no_grad():
        for conv, norm in convs_and_norms:
            conv.weight[channels] = 0
            if conv.bias is not None:
                conv.bias[channels] = 0
            if with_norm:
                norm.weight[channels] = 0
                norm.bias[channels] = 0


def test_a_resnet_with_batchnorm_and_residual_adds_shrinks_by_whole_groups():
    torch.manual_seed(0)
    net = ResNetish().eval()
    residual = [(net.stem, net.bn), (net.blocks[0].c2, net.blocks[0].b2), (net.blocks[1].c2, net.blocks[1].b2)]
    _zero_group(residual, list(range(0, 16, 2)))  # half the residual stream, in every member of its group
    for block in net.blocks:
        _zero_group([(block.c1, block.b1)], list(range(8)))  # half of each block's inner channels
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShrinkWarning)
        shrunk = shrink(net, x)
    assert tuple(shrunk.stem.weight.shape) == (8, 3, 3, 3) and tuple(shrunk.head.weight.shape) == (10, 8)
    assert tuple(shrunk.blocks[1].c1.weight.shape) == (8, 8, 3, 3) and shrunk.blocks[1].b2.num_features == 8
    with torch.no_grad():
        other = torch.randn(5, 3, 8, 8)
        assert torch.allclose(shrunk(other), net(other), atol=1e-5)
    assert _params(shrunk) < 0.3 * _params(net)


def test_a_zeroed_filter_whose_batchnorm_shift_feeds_a_padded_convolution_stays_with_a_warning():
    torch.manual_seed(0)
    net = ResNetish().eval()
    for block in net.blocks:  # filters only, as per-tensor ln_structured does: BatchNorm still adds a shift
        _zero_group([(block.c1, block.b1)], [0, 1, 2], with_norm=False)
    x = torch.randn(2, 3, 8, 8)
    bn = net.blocks[0].b1  # a zeroed filter's channel carries relu(BatchNorm's shift): 0 where the shift is negative
    shift = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
    nonzero = int((torch.relu(shift[:3]) != 0).sum())
    assert 0 < nonzero < 3  # this seed has both kinds
    with pytest.warns(ShrinkWarning, match=rf"left {nonzero} zeroed channel\(s\) of 'blocks.0.c1'.*padded convolution"):
        shrunk = shrink(net, x)
    assert shrunk.blocks[0].c1.weight.shape[0] == 16 - (3 - nonzero)
    with torch.no_grad():
        assert torch.allclose(shrunk(x), net(x), atol=1e-5)


def test_transformer_encoder_feed_forward_channels_go_the_residual_stream_stays():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True).eval()
    with torch.no_grad():
        layer.linear1.weight[::2] = 0  # half the feed-forward channels (their biases stay: folded into linear2)
    x = torch.randn(3, 5, 16)
    shrunk = shrink(layer, x)
    assert tuple(shrunk.linear1.weight.shape) == (16, 16) and tuple(shrunk.linear2.weight.shape) == (16, 16)
    assert shrunk.self_attn.embed_dim == 16
    with torch.no_grad():
        assert torch.allclose(shrunk(x), layer(x), atol=1e-5)


def test_depthwise_separable_convolutions():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1)
    ).eval()
    with torch.no_grad():
        for conv in (net[0], net[2]):
            conv.weight[[1, 4]] = 0
            conv.bias[[1, 4]] = 0
    x = torch.randn(2, 3, 6, 6)
    shrunk = shrink(net, x)
    assert tuple(shrunk[0].weight.shape) == (6, 3, 1, 1) and shrunk[2].groups == 6
    with torch.no_grad():
        assert torch.allclose(shrunk(x), net(x), atol=1e-5)


def test_never_a_wrong_model(monkeypatch):
    import lightning_compress.shrinking as module

    mlp = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        mlp[0].weight[:2] = 0
        mlp[0].bias[:2] = 1.0  # a constant that must be folded
    monkeypatch.setattr(module, "_fold", lambda *args: None)  # a broken fold
    x = torch.randn(4, 8)
    with pytest.warns(ShrinkWarning, match="outputs differ.*returning the model unshrunk"):
        shrunk = shrink(mlp, x)
    assert shrunk[0].weight.shape == (6, 8) and torch.equal(shrunk(x), mlp(x))


def test_without_torch_pruning_it_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch_pruning", None)
    with pytest.raises(ImportError, match=r"pip install 'lightning_compress\[shrink\]'"):
        shrink(nn.Linear(2, 2), torch.zeros(1, 2))


def test_dynamic_quantization_shrinks_before_quantizing(
    quiet_trainer_kwargs, tmp_path, run_in_fresh_process, caplog, monkeypatch
):
    import logging

    from lightning_compress import DynamicQuantization
    from lightning_compress.quantization import base

    given = []  # the inputs shrink is given at the end of fit: every validation input captured, of every shape

    def recording(model, example_input, atol=1e-5, more_inputs=()):
        given.append([example_input, *more_inputs])
        return shrink(model, example_input, atol, more_inputs)

    monkeypatch.setattr(base, "shrink", recording)

    pruning = MagnitudePruning(amount=0.5, method="ln_structured", parameters=["net.0.weight", "net.2.weight"])
    quant = DynamicQuantization(shrink=True, save_path=tmp_path / "small.lcz", compress=True)
    model = DigitsMLP(hidden=64)
    pl.seed_everything(0, verbose=False)
    with caplog.at_level(logging.INFO):
        pl.Trainer(max_epochs=3, callbacks=[pruning, quant], **quiet_trainer_kwargs).fit(
            model, datamodule=DigitsDataModule()
        )
    quantized = quant.quantized_model
    assert [quantized.net[i].weight().shape for i in (0, 2, 4)] == [(32, 64), (32, 32), (10, 32)]
    results = quant.results
    assert results["quantization/accuracy_after"] == pytest.approx(results["quantization/accuracy_before"], abs=0.03)
    table = next(r.getMessage() for r in caplog.records if "lightning_compress summary" in r.getMessage())
    shrunk_count = sum(p.numel() for i in (0, 2, 4) for p in (quantized.net[i].weight(), quantized.net[i].bias()))
    assert f"shrink: {_params(model):,} -> {shrunk_count:,} parameters" in table
    assert "shrink: net.0.weight (64, 64) -> (32, 64)" in table
    shapes = [tuple(x.args[0].shape) for x in given[-1]]
    assert (256, 64) in shapes and (103, 64) in shapes  # the validation batches, the last (smaller) one included
    x = torch.rand(6, 64)
    assert torch.equal(run_in_fresh_process("load_quantized", tmp_path / "small.lcz", x), quantized(x))


def test_shrink_needs_its_extra_at_construction(monkeypatch):
    import importlib.util

    from lightning_compress import DynamicQuantization

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_pruning" else real(name))
    with pytest.raises(ValueError, match=r"`shrink=True`.*pip install 'lightning_compress\[shrink\]'"):
        DynamicQuantization(shrink=True)


class DigitsCNN(pl.LightningModule):
    """A stem, two residual blocks with BatchNorm, a linear head: scikit-learn digits as 1x8x8 images."""

    def __init__(self, channels=16):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(Block(channels), Block(channels))
        self.head = nn.Linear(channels, 10)
        self.example_input_array = torch.zeros(2, 64)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x.reshape(-1, 1, 8, 8))))
        return self.head(self.blocks(h).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_grouped_pruning_prunes_coupled_channels_together_and_shrink_removes_them(quiet_trainer_kwargs):
    pruning = MagnitudePruning(amount=0.5, method="ln_structured", structure="groups")
    model = DigitsCNN()
    pl.seed_everything(0, verbose=False)
    pl.Trainer(max_epochs=2, callbacks=[pruning], **quiet_trainer_kwargs).fit(model, datamodule=DigitsDataModule())
    model.eval()
    # the residual stream: the same 8 channels are zero in the stem, both blocks' second convs and their BatchNorms
    zero = (model.stem.weight.flatten(1) == 0).all(1)
    assert int(zero.sum()) == 8
    for conv, bn in [(model.blocks[0].c2, model.blocks[0].b2), (model.blocks[1].c2, model.blocks[1].b2)]:
        assert torch.equal((conv.weight.flatten(1) == 0).all(1), zero)
        assert not bn.weight[zero].any() and not bn.bias[zero].any()
    assert not model.stem.bias[zero].any() and not model.bn.weight[zero].any()
    data = DigitsDataModule()
    data.setup()
    x, _ = next(iter(data.val_dataloader()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShrinkWarning)
        shrunk = shrink(model, x[:8])
    assert tuple(shrunk.stem.weight.shape) == (8, 1, 3, 3) and tuple(shrunk.blocks[0].c1.weight.shape) == (8, 8, 3, 3)
    with torch.no_grad():
        assert torch.allclose(shrunk(x), model(x), atol=1e-5)
    assert _params(shrunk) < 0.35 * _params(model)


def test_grouped_pruning_needs_an_example_input_and_ln_structured(quiet_trainer_kwargs):
    from helpers import assert_fails_before_training

    with pytest.raises(ValueError, match="`structure='groups'`.*method='ln_structured'.*dim=0"):
        MagnitudePruning(structure="groups")
    model = DigitsCNN()
    model.example_input_array = None
    assert_fails_before_training(
        quiet_trainer_kwargs,
        [MagnitudePruning(method="ln_structured", structure="groups")],
        model,
        "structure='groups'.*set `example_input_array`",
        datamodule=DigitsDataModule(),
    )


def test_concatenated_branches():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 4, 1)
            self.merge = nn.Conv2d(10, 5, 1)

        def forward(self, x):
            return self.merge(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)))

    torch.manual_seed(0)
    net = TwoBranches().eval()
    with torch.no_grad():
        net.a.weight[[0, 5]] = 0
        net.b.weight[[2]] = 0
        net.b.bias[2] = 0.7  # a constant relu(0.7) reaches `merge`, an unpadded 1x1 conv: folded into its bias
    x = torch.randn(2, 3, 5, 5)
    shrunk = shrink(net, x)
    assert shrunk.a.out_channels == 4 and shrunk.b.out_channels == 3 and shrunk.merge.in_channels == 7
    with torch.no_grad():
        assert torch.allclose(shrunk(x), net(x), atol=1e-5)


def test_a_hugging_face_bert_loses_feed_forward_channels_with_equal_logits():
    pytest.importorskip("transformers")
    from helpers import BertClassifier, sentences
    from torch.utils.data import DataLoader

    model = BertClassifier().eval()
    with torch.no_grad():
        for layer in model.model.bert.encoder.layer:
            layer.intermediate.dense.weight[::2] = 0  # GELU(bias) of those rows is folded into the next layer
    batch = next(iter(DataLoader(sentences(4, 0), batch_size=4)))
    shrunk = shrink(model, batch)
    layer = shrunk.model.bert.encoder.layer[0]
    assert tuple(layer.intermediate.dense.weight.shape) == (32, 32) and tuple(layer.output.dense.weight.shape) == (
        32,
        32,
    )
    with torch.no_grad():
        assert torch.allclose(shrunk(**batch).logits, model(**batch).logits, atol=1e-5)


def test_a_model_the_dependency_graph_cannot_follow_comes_back_unshrunk(monkeypatch):
    import torch_pruning

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(torch_pruning.DependencyGraph, "build_dependency", refuse)
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.warns(ShrinkWarning, match="could not follow the model.*cannot trace this.*unshrunk"):
        shrunk = shrink(mlp, torch.randn(2, 4))
    assert shrunk is not mlp and shrunk[0].weight.shape == (4, 4)


class Scaled(nn.Module):
    """A keyword input scales the hidden activations: a zeroed row's constant, relu(bias) * scale, depends on it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, scale: float = 1.0):
        return self.fc2(torch.relu(self.fc1(x)) * scale)


class Branching(nn.Module):
    """A branch on the data between the activations, through the same layers (ReLU or sigmoid)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.relu(h) if x.mean() > 0 else torch.sigmoid(h))


@pytest.mark.parametrize(
    ("model_type", "other"),
    [(Scaled, lambda x: {"x": x, "scale": 2.0}), (Branching, lambda x: -x)],
)
def test_constants_that_differ_between_inputs_keep_their_channels(model_type, other):
    torch.manual_seed(0)
    model = model_type().eval()
    with torch.no_grad():
        model.fc1.weight[:8] = 0  # what ln_structured leaves: zero rows, biases kept
        model.fc1.bias[:4] = -1.0  # relu(-1) * scale is 0 on every input; sigmoid(-1) is not
        model.fc1.bias[4:8] = 0.5  # relu(0.5) * scale differs with the scale; the branches differ too
    x, fresh = torch.rand(5, 8), torch.rand(3, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ShrinkWarning)
        shrunk = shrink(model, x, more_inputs=[other(x)])
    # a channel is removed only when its constant is the same on every input given; the others stay, named
    removable = 4 if model_type is Scaled else 0
    assert shrunk.fc1.out_features == 16 - removable
    (warned,) = [str(w.message) for w in caught]
    assert f"left {8 - removable} zeroed channel(s) of 'fc1' in place" in warned
    assert "they are not constant where they are consumed" in warned
    with torch.no_grad():
        for call in (lambda m: m(fresh), lambda m: m(**other(fresh)) if model_type is Scaled else m(other(fresh))):
            assert torch.allclose(call(shrunk), call(model), atol=1e-6)
    one_input = shrink(model, x)  # the one-input call still works: it verifies on that input only
    assert one_input.fc1.out_features == 8
