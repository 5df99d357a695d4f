"""Layer families this project did not write (issue 18, pruning side): transformers' GPT-2 (Conv1D, weights stored
(in, out)) and T5 from tiny configs, ConvTranspose, GroupNorm in a CNN, a forward that branches on its input."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import DigitsDataModule, token_data
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader

from lightning_compress import MagnitudePruning, shrink
from lightning_compress.pruning.selection import matrix_numel
from lightning_compress.shrinking import ShrinkWarning

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")  # the [shrink] extra


class TinyGPT2(pl.LightningModule):
    """transformers' GPT2LMHeadModel from a tiny config (random init, nothing downloaded) on local random tokens."""

    def __init__(self, vocab_size: int = 64):
        super().__init__()
        config = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=2,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.model = transformers.GPT2LMHeadModel(config)
        self.vocab_size = vocab_size
        self.example_input_array = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        return F.cross_entropy(self(inputs).flatten(0, 1), target.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(token_data(self.vocab_size), batch_size=16)


def _fit(model, callbacks, kwargs, datamodule=None, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=callbacks, **{**kwargs, "max_epochs": 1, "limit_train_batches": 2, **trainer_kwargs})
    trainer.fit(model, datamodule=datamodule)
    return trainer


def _conv1d_weights(model):
    return {f"{n}.weight": m.weight for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}


def test_gpt2_conv1d_layers_are_pruned_by_default(quiet_trainer_kwargs):
    model = TinyGPT2()
    pruning = MagnitudePruning(amount=0.5, schedule="constant")
    _fit(model, [pruning], quiet_trainer_kwargs)
    conv1d = _conv1d_weights(model)
    assert set(conv1d) <= set(pruning.parameter_names) and len(conv1d) == 8  # 4 per block: c_attn, c_proj, c_fc, c_proj
    selected = sum(p.numel() for p in pruning.selected_parameters.values())
    assert pruning.coverage == selected / matrix_numel(model) > 0.8  # it was 7.6 %: the tied wte/lm_head only
    assert all(0.2 < float((w == 0).float().mean()) < 0.9 for w in conv1d.values())


def test_ln_structured_dim_0_prunes_output_channels_of_conv1d_like_torch_on_the_transposed_weight(
    quiet_trainer_kwargs,
):
    model = TinyGPT2()
    pruning = MagnitudePruning(
        amount=0.5, schedule="constant", method="ln_structured", parameters=["*.c_fc.weight"], make_permanent=False
    )
    weights = {}

    class Before(pl.Callback):  # the weights the update at epoch 0 sees (callbacks run in list order)
        def on_train_epoch_start(self, trainer, pl_module):
            weights.update({n: w.detach().clone() for n, w in _conv1d_weights(pl_module).items()})

    _fit(model, [Before(), pruning], quiet_trainer_kwargs, limit_train_batches=1)
    for name in pruning.parameter_names:
        linear = nn.Linear(*weights[name].shape)  # an nn.Linear holds the same matrix as (out, in)
        linear.weight.data = weights[name].t().clone()
        expected = prune.ln_structured(linear, "weight", amount=0.5, n=2, dim=0).weight_mask.t()
        assert torch.equal(pruning.masks[name], expected.bool()), name
        kept_outputs = (model.get_parameter(name) != 0).any(dim=0)  # whole columns: output features of x @ W
        assert int(kept_outputs.sum()) == 64


def test_conv_transpose_dim_0_means_output_channels_too(quiet_trainer_kwargs):
    class Upsampler(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(1, 8, 2, stride=2)  # weight (in=1, out=8, 2, 2)
            self.head = nn.Linear(8 * 16 * 16, 10)

        def forward(self, x):
            return self.head(torch.relu(self.up(x.reshape(-1, 1, 8, 8))).flatten(1))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    model = Upsampler()
    pruning = MagnitudePruning(
        amount=0.5, schedule="constant", method="ln_structured", parameters=["up.weight"], make_permanent=False
    )
    _fit(model, [pruning], quiet_trainer_kwargs, limit_train_batches=1, datamodule=DigitsDataModule())
    assert int((model.up.weight != 0).flatten(2).any(dim=(0, 2)).sum()) == 4  # 4 of 8 output channels remain
    assert pruning.masks["up.weight"].any(dim=(1, 2, 3)).all()  # the single input channel is kept


def test_shrink_removes_gpt2_c_fc_channels_with_equal_outputs(quiet_trainer_kwargs):
    model = TinyGPT2()
    pruning = MagnitudePruning(amount=0.5, schedule="constant", method="ln_structured", parameters=["*.c_fc.weight"])
    _fit(model, [pruning], quiet_trainer_kwargs)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShrinkWarning)
        shrunk = shrink(model, model.example_input_array)
    for block, before in zip(shrunk.model.transformer.h, model.model.transformer.h):
        assert type(block.mlp.c_fc).__name__ == "Conv1D"  # still the user's class, fewer channels
        assert tuple(block.mlp.c_fc.weight.shape) == (32, 64) and block.mlp.c_fc.nf == 64
        assert tuple(block.mlp.c_proj.weight.shape) == (64, 32) and tuple(before.mlp.c_fc.weight.shape) == (32, 128)
    other = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(1))  # other batch and length
    with torch.no_grad():
        assert torch.allclose(shrunk(other), model(other), atol=1e-5)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters()) - 8000


def test_gpt2_by_groups_prunes_the_mlp_and_names_what_cannot_be_grouped(quiet_trainer_kwargs):
    model = TinyGPT2()
    pruning = MagnitudePruning(amount=0.5, schedule="constant", method="ln_structured", structure="groups")
    with pytest.warns(UserWarning, match="leaves 7 selected weight") as record:
        _fit(model, [pruning], quiet_trainer_kwargs)
    message = next(str(w.message) for w in record if "leaves 7" in str(w.message))
    lines = message.splitlines()
    assert len(lines) == 3  # grouped by reason: a few lines, however many layers
    assert lines[1] == "  - its channels are the model's output: model.transformer.wte.weight"  # tied to lm_head
    assert (
        "mixes channels (attention (ScaledDotProduct" in lines[2] and "LayerNorm 'model.transformer.ln_f'" in lines[2]
    )
    assert lines[2].endswith("model.transformer.h.1.attn.c_attn.weight and 2 more")
    c_fc = [f"model.transformer.h.{i}.mlp.c_fc.weight" for i in (0, 1)]
    assert set(pruning.parameter_names) == {*c_fc, *(n.replace("weight", "bias") for n in c_fc)}
    assert pruning.coverage == pytest.approx(2 * 32 * 128 / matrix_numel(model))
    for block in model.model.transformer.h:
        zero = (block.mlp.c_fc.weight == 0).all(dim=0)  # whole output columns, with their bias entries
        assert int(zero.sum()) == 64 and not block.mlp.c_fc.bias[zero].any()
    shrunk = shrink(model.eval(), model.example_input_array)
    assert shrunk.model.transformer.h[0].mlp.c_fc.nf == 64


# ---------------------------------------------------------------------------------------------- GroupNorm
class GroupNormCNN(pl.LightningModule):
    """Digits as 1x8x8 images: conv+BatchNorm, conv+GroupNorm, conv+BatchNorm, a linear head."""

    def __init__(self, group_norm_everywhere: bool = False):
        super().__init__()
        norm = (lambda c: nn.GroupNorm(4, c)) if group_norm_everywhere else nn.BatchNorm2d
        self.c1, self.n1 = nn.Conv2d(1, 16, 3, padding=1), norm(16)
        self.c2, self.n2 = nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(4, 32)
        self.c3, self.n3 = nn.Conv2d(32, 32, 3, padding=1), norm(32)
        self.head = nn.Linear(32, 10)
        self.example_input_array = torch.zeros(2, 64)

    def forward(self, x):
        x = x.reshape(-1, 1, 8, 8)
        for conv, norm in ((self.c1, self.n1), (self.c2, self.n2), (self.c3, self.n3)):
            x = torch.relu(norm(conv(x)))
        return self.head(x.mean((2, 3)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_groups_through_groupnorm_are_named_at_setup_and_left_out_of_the_target(quiet_trainer_kwargs):
    model = GroupNormCNN()
    pruning = MagnitudePruning(amount=0.5, schedule="constant", method="ln_structured", structure="groups")
    with pytest.warns(UserWarning, match=r"leaves 2 selected weight\(s\) dense") as record:
        _fit(model, [pruning], quiet_trainer_kwargs, datamodule=DigitsDataModule())
    message = next(str(w.message) for w in record if "leaves 2" in str(w.message))
    assert "mixes channels (GroupNorm 'n2'): c2.weight" in message and "model's output: head.weight" in message
    grouped = [model.c1.weight, model.c3.weight]
    assert pruning.coverage == sum(w.numel() for w in grouped) / matrix_numel(model)  # it said 1.0
    assert "c2.weight" not in pruning.parameter_names and not (model.c2.weight == 0).any()
    assert [int((w.flatten(1) == 0).all(1).sum()) for w in grouped] == [8, 16]  # half the channels of each
    sparsity = pruning.history[-1]["sparsity"]  # over what the target covers: it said 0.8 %
    members = [pruning.selected_parameters[n] for n in pruning.parameter_names]
    assert sparsity == sum(int((p == 0).sum()) for p in members) / sum(p.numel() for p in members) > 0.45


def test_when_no_group_can_be_pruned_it_fails_before_training_and_says_why(quiet_trainer_kwargs):
    from helpers import assert_fails_before_training

    assert_fails_before_training(
        {**quiet_trainer_kwargs, "limit_train_batches": 2},
        [MagnitudePruning(amount=0.5, method="ln_structured", structure="groups")],
        GroupNormCNN(group_norm_everywhere=True),
        r"found no group.*among the 4 selected weights:\n.*GroupNorm 'n1', GroupNorm 'n2', GroupNorm 'n3'.*\n"
        r".*model's output: head.weight\nUse structure='tensor'",
        datamodule=DigitsDataModule(),
    )


# ---------------------------------------------------------------------------------------------- shrink: branches
class Branching(nn.Module):
    """Takes one of two layers depending on the input's values: the example reaches only one."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.positive, self.negative = nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        branch = self.positive if x.sum() > 0 else self.negative
        return self.head(torch.relu(branch(h)))


def test_shrink_of_a_branching_model_warns_and_equals_the_original_on_both_branches():
    torch.manual_seed(0)
    model = Branching().eval()
    with torch.no_grad():
        model.stem.weight[::2] = 0  # half the stem's channels, consumed by both branches
        model.positive.weight[:4] = 0
    positive, negative = torch.rand(4, 8) + 0.1, -torch.rand(4, 8) - 0.1
    with pytest.warns(ShrinkWarning, match=r"'negative' \(Linear\) hold\(s\) parameters that the example input does"):
        shrunk = shrink(model, positive)
    with torch.no_grad():
        for x in (positive, negative):
            assert torch.equal(shrunk(x), model(x))
    # with an example that reaches both layers (here a model without the branch), channels do go
    model.negative = model.positive
    assert shrink(model, positive).stem.out_features == 8


# ---------------------------------------------------------------------------------------------- global collapse
class TinyT5(pl.LightningModule):
    """transformers' T5 from a tiny config: its query projections are initialized at 1/sqrt(d_kv) the scale of the
    other matrices, so one global magnitude threshold takes nearly all of them."""

    def __init__(self):
        super().__init__()
        config = transformers.T5Config(
            vocab_size=64,
            d_model=32,
            d_kv=32,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            use_cache=False,
        )
        self.model = transformers.T5ForConditionalGeneration(config)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        return self.model(input_ids=inputs, labels=target).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(token_data(64, n=32), batch_size=16)


def test_a_global_collapse_is_warned_once_per_tensor(quiet_trainer_kwargs):
    pruning = MagnitudePruning(amount=0.6, schedule="linear", end=1, scope="global", interval="step")
    with pytest.warns(UserWarning, match=r"scope='global'\) pruned .*SelfAttention.q.weight \(99") as record:
        _fit(TinyT5(), [pruning], quiet_trainer_kwargs, limit_train_batches=2)
    collapse = [str(w.message) for w in record if "scope='global') pruned" in str(w.message)]
    assert len(collapse) == 1  # at step 1; not again at the end of training
    assert "scope='layerwise'" in collapse[0] and "exclude=" in collapse[0] and "and 1 more" in collapse[0]
    queries = [n for n in pruning.parameter_names if n.endswith(".q.weight")]
    assert len(queries) == 6 and all(n in collapse[0] for n in queries[:5])
    layerwise = MagnitudePruning(amount=0.6, schedule="linear", end=1, scope="layerwise", interval="step")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(TinyT5(), [layerwise], quiet_trainer_kwargs, limit_train_batches=2)
    assert not [w for w in record if "pruned" in str(w.message)]  # every tensor at 60 %: nothing to say
