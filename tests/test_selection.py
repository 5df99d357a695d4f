import pytest
from torch import nn

from lightning_compress.selection import default_parameter_names, select_parameters


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
