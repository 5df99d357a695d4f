import pytest
from torch import nn

from lightning_compress.pruning.selection import default_parameter_names, select_parameters


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.emb = nn.Embedding(10, 4)
        self.lstm = nn.LSTM(4, 8, num_layers=2)
        self.gru = nn.GRU(4, 4)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)


def test_default_selection_is_weights_of_linear_conv_and_recurrent_layers():
    names = default_parameter_names(Mixed())
    assert names == [
        "conv.weight",
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "lstm.weight_ih_l1",
        "lstm.weight_hh_l1",
        "gru.weight_ih_l0",
        "gru.weight_hh_l0",
        "body.0.weight",
        "body.2.weight",
        "head.weight",
    ]
    assert not any("bias" in n for n in names)


def test_tied_weights_are_selected_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    assert list(select_parameters(model)) == ["0.weight"]


def test_patterns_and_exclude():
    model = Mixed()
    selected = select_parameters(model, ["body.*.weight", "head.*"], exclude=["head.bias"])
    assert list(selected) == ["body.0.weight", "body.2.weight", "head.weight"]
    assert selected["head.weight"] is model.head.weight
    assert list(select_parameters(model, exclude=["lstm.*", "gru.*", "conv.*"])) == [
        "body.0.weight",
        "body.2.weight",
        "head.weight",
    ]


def test_pattern_matching_nothing_lists_what_exists():
    with pytest.raises(ValueError, match=r"`parameters` pattern 'net\.\*' matches no parameter.*body\.0\.weight"):
        select_parameters(Mixed(), ["net.*"])


def test_exclude_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="`exclude` pattern 'haed.weight'"):
        select_parameters(Mixed(), exclude=["haed.weight"])


def test_empty_selection_is_an_error():
    with pytest.raises(ValueError, match="selection of parameters to prune is empty.*head.weight"):
        select_parameters(Mixed(), ["head.weight"], exclude=["head.*"])
    with pytest.raises(ValueError, match="empty"):
        select_parameters(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 3)
        self.attn = nn.MultiheadAttention(8, 2)
        self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)  # separate q/k/v projection weights
        self.norm = nn.LayerNorm(8)


def test_default_covers_attention_and_transposed_convolutions():
    assert default_parameter_names(Attention()) == [
        "up.weight",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "cross.q_proj_weight",
        "cross.k_proj_weight",
        "cross.v_proj_weight",
        "cross.out_proj.weight",
    ]


def test_modules_selects_by_layer_type_and_combines_with_patterns():
    model = Mixed()
    assert list(select_parameters(model, modules=[nn.Conv2d, nn.Embedding])) == ["conv.weight", "emb.weight"]
    assert list(select_parameters(model, ["body.*"], modules=[nn.Linear])) == ["body.0.weight", "body.2.weight"]
    with pytest.raises(ValueError, match=r"`modules` \['ConvTranspose1d'\] selects nothing.*Conv2d"):
        select_parameters(model, modules=[nn.ConvTranspose1d])


def test_a_shared_parameter_matches_by_any_name_and_is_listed_under_every_name():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight
    assert list(select_parameters(model, ["1.weight"])) == ["0.weight"]
    with pytest.raises(ValueError, match="selection of parameters to prune is empty"):
        select_parameters(model, exclude=["1.*"])  # excluding the head's name excludes the shared weight
    with pytest.raises(ValueError, match=r"matches no parameter.*0\.weight \(5, 4\), 1\.weight \(5, 4\)"):
        select_parameters(model, ["head.*"])


def test_globs_may_select_one_dimensional_parameters():
    selected = select_parameters(Mixed(), ["body.0.*"])
    assert list(selected) == ["body.0.weight", "body.0.bias"]
