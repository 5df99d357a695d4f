import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from lightning_compress.pruning import masks as engine
from lightning_compress.pruning import scores


def _layers(dtype=torch.float32):
    torch.manual_seed(0)
    return [nn.Linear(37, 29).to(dtype), nn.Conv2d(3, 8, 3).to(dtype), nn.Linear(29, 5).to(dtype)]


def _ones(weights):
    return [engine.new_mask(w) for w in weights]


def _keep(masks):
    return [m != 0 for m in masks]


def _torch_global_masks(layers, amount):
    reference = copy.deepcopy(layers)
    prune.global_unstructured([(m, "weight") for m in reference], pruning_method=prune.L1Unstructured, amount=amount)
    return [m.weight_mask for m in reference]


def _assert_equal_up_to_ties(weights, masks, expected):
    """Same count; where the choices differ, the magnitudes tie (torch leaves the order of ties undefined)."""
    ours = torch.cat([(m == 0).view(-1) for m in masks])
    theirs = torch.cat([(m == 0).view(-1) for m in expected])
    magnitude = torch.cat([w.detach().abs().view(-1) for w in weights])
    assert int(ours.sum()) == int(theirs.sum())
    differ = ours != theirs
    assert differ.sum() < 0.01 * ours.numel()
    if differ.any():
        assert magnitude[differ].unique().numel() == 1
        assert magnitude[differ][0] == magnitude[ours & ~differ].max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_global_l1_matches_torch_global_unstructured_while_growing(dtype):
    layers = _layers(dtype)
    weights = [m.weight for m in layers]
    masks = _ones(weights)
    for amount in (0.1, 0.35, 0.6, 0.9, 0.97):
        engine.update_unstructured(weights, masks, amount, scores.l1_scores(weights), "global")
        # torch prunes the same weights (already pruned ones are 0, hence the smallest) in one shot
        expected = _torch_global_masks(layers, amount)
        if dtype == torch.float16:
            _assert_equal_up_to_ties(weights, masks, expected)
        else:
            for keep, ref in zip(_keep(masks), expected):
                assert torch.equal(keep, ref.bool())
        engine.apply_masks(weights, masks)
        n = sum(w.numel() for w in weights)
        assert sum(int((w == 0).sum()) for w in weights) == round(amount * n)


def test_layerwise_l1_matches_torch_l1_unstructured():
    layers = _layers()
    weights = [m.weight for m in layers]
    masks = _ones(weights)
    for amount in (0.25, 0.5, 0.8):
        engine.update_unstructured(weights, masks, amount, scores.l1_scores(weights), "layerwise")
        for layer, mask in zip(layers, masks):
            reference = copy.deepcopy(layer)
            prune.l1_unstructured(reference, "weight", amount)
            assert torch.equal(mask != 0, reference.weight_mask.bool())
        engine.apply_masks(weights, masks)


@pytest.mark.parametrize("norm,dim", [(2, 0), (1, 0), (math.inf, 0), (2, 1), (2, -1)])
def test_structured_matches_torch_ln_structured(norm, dim):
    layers = _layers()
    weights = [m.weight for m in layers]
    masks = _ones(weights)
    for amount in (0.2, 0.5, 0.75):
        scores.update_structured(weights, masks, amount, norm, dim)
        for layer, mask in zip(layers, masks):
            reference = copy.deepcopy(layer)
            prune.ln_structured(reference, "weight", amount, n=norm, dim=dim)
            assert torch.equal(mask != 0, reference.weight_mask.bool())
        engine.apply_masks(weights, masks)


def test_multi_pass_narrowing_and_chunk_boundaries(monkeypatch):
    """Tiny chunks and candidate limits force every radix pass; the result must not change."""
    monkeypatch.setattr(engine, "CHUNK", 97)
    monkeypatch.setattr(engine, "CANDIDATE_LIMIT", 3)
    for dtype in (torch.float32, torch.float64):
        layers = _layers(dtype)
        weights = [m.weight for m in layers]
        masks = _ones(weights)
        for amount in (0.3, 0.7):
            engine.update_unstructured(weights, masks, amount, scores.l1_scores(weights), "global")
            for keep, ref in zip(_keep(masks), _torch_global_masks(layers, amount)):
                assert torch.equal(keep, ref.bool())
            engine.apply_masks(weights, masks)


def test_ties_prefer_already_pruned_then_lowest_index():
    weight = torch.zeros(4, 5)
    weight[0, :3] = 1.0  # a few nonzero entries; the rest tie at 0
    mask = engine.new_mask(weight)
    mask.view(-1)[[17, 18]] = 0  # already pruned, tied at 0 with the others
    engine.update_unstructured([weight], [mask], 0.5, scores.l1_scores([weight]), "global")
    pruned = (mask.view(-1) == 0).nonzero().squeeze(1).tolist()
    # 10 entries: the 2 already pruned, then the 8 lowest indices among the zero-valued ones (3..10)
    assert pruned == [3, 4, 5, 6, 7, 8, 9, 10, 17, 18]


def test_ties_across_tensors_go_to_the_earlier_tensor():
    weights = [torch.full((3,), 0.5), torch.full((3,), 0.5)]
    masks = _ones(weights)
    engine.update_unstructured(weights, masks, 4 / 6, scores.l1_scores(weights), "global")
    assert _keep(masks)[0].tolist() == [False] * 3 and _keep(masks)[1].tolist() == [False, True, True]


def test_masks_never_regrow():
    layers = _layers()
    weights = [m.weight for m in layers]
    masks = _ones(weights)
    engine.update_unstructured(weights, masks, 0.6, scores.l1_scores(weights), "global")
    before = [m.clone() for m in masks]
    with torch.no_grad():
        for w in weights:
            w.add_(torch.randn_like(w))  # pruned weights now have large magnitudes
    engine.update_unstructured(weights, masks, 0.3, scores.l1_scores(weights), "global")
    assert all(torch.equal(a, b) for a, b in zip(masks, before))
    engine.update_unstructured(weights, masks, 0.7, scores.l1_scores(weights), "global")
    assert all(bool((b == 0)[a != 0].sum() == 0) for a, b in zip(masks, before)), "a pruned weight regrew"


def test_random_count_growth_and_reproducibility():
    weights = [torch.randn(50, 40), torch.randn(30, 10)]
    n = sum(w.numel() for w in weights)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        masks = _ones(weights)
        history = []
        for amount in (0.2, 0.5, 0.8):
            engine.update_unstructured(weights, masks, amount, scores.random_scores(weights, generator), "global")
            assert sum(int((m == 0).sum()) for m in masks) == round(amount * n)
            history.append([m.clone() for m in masks])
        return history

    first, again, other = run(1), run(1), run(2)
    for earlier, later in zip(first, first[1:]):
        assert all(bool(((a == 0) & (b != 0)).sum() == 0) for a, b in zip(earlier, later))
    assert all(torch.equal(a, b) for step_a, step_b in zip(first, again) for a, b in zip(step_a, step_b))
    assert not all(torch.equal(a, b) for a, b in zip(first[-1], other[-1]))
    # random, not magnitude: about half of the pruned entries lie below the median magnitude (magnitude: all)
    pruned = first[0][0] == 0
    below_median = weights[0].abs() < weights[0].abs().median()
    assert 0.35 < float(below_median[pruned].float().mean()) < 0.65


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_apply_masks_zeroes_pruned_nan_and_inf_and_keeps_the_rest_bit_exact(dtype):
    weight = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.5, 1.25, float("nan")], dtype=dtype)
    keep = torch.tensor([False, False, False, False, True, True])
    before = weight.clone()
    mask = engine.mask_from_bool(keep, weight)
    assert mask.element_size() == 1  # one byte per weight, whatever the weight's width
    engine.apply_masks([weight], [mask])
    assert torch.equal(weight[~keep], torch.zeros(4, dtype=dtype)) and not weight[~keep].signbit().any()
    assert torch.equal(weight[4:5], before[4:5]) and weight[5].isnan()


def test_count_to_prune_rounds_like_torch():
    assert engine.count_to_prune(0.25, 10) == round(2.5) == 2
    assert engine.count_to_prune(0.35, 10) == 4
    t = torch.randn(10)
    assert int((prune.L1Unstructured(0.25).compute_mask(t, torch.ones(10)) == 0).sum()) == 2


def test_zero_fraction_counts_exact_zeros():
    from lightning_compress.quantization.measure import zero_fraction

    assert zero_fraction([torch.tensor([0.0, -0.0, 1e-30, 2.0])]) == 0.5


def test_grouped_update_scores_coupled_slices_together_and_only_grows():
    from lightning_compress.pruning.groups import ChannelGroup

    torch.manual_seed(0)
    conv = torch.randn(6, 3, 3, 3)  # a layer's 6 filters
    bn_weight, bn_bias = torch.randn(6), torch.randn(6)  # its BatchNorm
    other = torch.randn(6, 4)  # a coupled layer (say, joined by a residual add)
    params = {"conv": conv, "bn.w": bn_weight, "bn.b": bn_bias, "other": other}
    masks = {name: engine.new_mask(p) for name, p in params.items()}
    group = ChannelGroup("conv", 6, {name: [[c] for c in range(6)] for name in params})
    scores.update_grouped(params, masks, [group], 0.5, norm=2)
    by_hand = conv.flatten(1).pow(2).sum(1) + bn_weight.pow(2) + bn_bias.pow(2) + other.pow(2).sum(1)
    expected = set(by_hand.argsort()[:3].tolist())
    for name in params:
        pruned = {c for c in range(6) if not masks[name].reshape(6, -1)[c].any()}
        assert pruned == expected, name  # the same channels, in every member
    with torch.no_grad():
        other.mul_(100)  # scores change; pruned channels stay pruned and count first
    scores.update_grouped(params, masks, [group], 4 / 6, norm=2)
    pruned = {c for c in range(6) if not masks["conv"].reshape(6, -1)[c].any()}
    assert expected < pruned and len(pruned) == 4


def test_apply_masks_widens_chunk_by_chunk_and_matches_a_multiply(monkeypatch):
    monkeypatch.setattr(engine, "APPLY_CHUNK", 7)  # tensors span several chunks, the last one partial
    torch.manual_seed(0)
    weights = [torch.randn(5, 9), torch.randn(3), torch.randn(2, 2, 4, dtype=torch.float64)]
    keeps = [torch.rand(w.shape) > 0.4 for w in weights]
    expected = [w * k for w, k in zip(weights, keeps)]
    engine.apply_masks(weights, [engine.mask_from_bool(k, w) for k, w in zip(keeps, weights)])
    assert all(torch.equal(w, e) for w, e in zip(weights, expected))
