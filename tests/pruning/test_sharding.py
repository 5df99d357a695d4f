"""Sharded training (FSDP2's fully_shard) with 2 CPU processes (gloo), each in a subprocess with a timeout."""

import subprocess
import sys

import pytest
import torch
from helpers import TESTS_DIR


def _run_script(script: str, *args, timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(TESTS_DIR / script), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_sharded_engine_finds_the_masks_of_one_process_holding_the_full_tensors(tmp_path):
    _run_script("sharded_engine_script.py", tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert "'head.weight' has placements (Shard(dim=1),)" in rank0["refused"]
    cases = [k for k in rank0 if not k.endswith("/parts") and k != "refused"]
    assert len(cases) == 12
    for case in cases:
        sharded, reference = rank0[case]["sharded"], rank0[case]["reference"]
        for i, (mask, expected) in enumerate(zip(sharded, reference)):
            assert torch.equal(mask, expected), (case, i)
            assert torch.equal(rank1[case]["sharded"][i], expected), (case, i)  # every rank gathers the same
        assert any(not m.all() for m in sharded), case  # something was pruned
    # the shards really are row blocks at offsets: uneven (7 rows: 4 + 3) and empty (1 row: 1 + 0)
    assert rank1["global_l1/1/parts"][:2] == [(20, 35, True), (9, 9, True)]


def _fsdp_results(out_dir, layout, *cases):
    _run_script("fsdp_script.py", out_dir, layout, *cases, timeout=300)
    return {case: [torch.load(out_dir / case / f"rank{r}.pt") for r in (0, 1)] for case in cases}


def _oracle_masks(case: str, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The masks torch.nn.utils.prune (or, for random scores, our engine in one process) computes on the gathered
    initial weights."""
    from torch import nn
    from torch.nn.utils import prune

    from lightning_compress.pruning import masks as engine
    from lightning_compress.pruning import scores

    if case == "random":
        weights = [w.clone() for w in initial.values()]
        masks = [engine.new_mask(w) for w in weights]
        scores = scores.random_scores(weights, torch.Generator().manual_seed(3))
        engine.update_unstructured(weights, masks, 0.6, scores, "global")
        return {name: m != 0 for name, m in zip(initial, masks)}
    holders = {name: nn.Module() for name in initial}
    for name, holder in holders.items():
        holder.weight = nn.Parameter(initial[name].clone())
    if case == "l1_global":
        prune.global_unstructured(
            [(h, "weight") for h in holders.values()], pruning_method=prune.L1Unstructured, amount=0.6
        )
    for holder in holders.values():
        if case == "l1_layerwise":
            prune.l1_unstructured(holder, "weight", amount=0.6)
        elif case == "ln_dim0":
            prune.ln_structured(holder, "weight", amount=0.6, n=2, dim=0)
        elif case == "ln_dim1":
            prune.ln_structured(holder, "weight", amount=0.6, n=1, dim=1)
    return {name: h.weight_mask.bool() for name, h in holders.items()}


@pytest.mark.parametrize("layout", ["fsdp", pytest.param("hsdp", marks=pytest.mark.slow)])
def test_sharded_masks_equal_the_oracle_on_the_gathered_initial_weights(tmp_path, layout):
    cases = ["l1_global", "l1_layerwise", "random", "ln_dim0", "ln_dim1", "movement"]
    results = _fsdp_results(tmp_path, layout, *cases)
    for case, (rank0, rank1) in results.items():
        if case == "movement":
            _check_sharded_movement(rank0, rank1)
            continue
        oracle = _oracle_masks(case, rank0["initial"])
        assert list(rank0["masks"]) == list(oracle) == ["net.0.weight", "net.2.weight", "net.4.weight"]
        for name, expected in oracle.items():
            assert torch.equal(rank0["masks"][name], expected), (case, name)
            assert torch.equal(rank1["masks"][name], expected), (case, name)
            # the trained weights kept every pruned entry at exactly 0
            assert not rank0["final"][name][~expected].any(), (case, name)
        local = {name: m.shape for name, m in rank0["local_masks"].items()}
        full = {name: m.shape for name, m in rank0["masks"].items()}
        if layout == "fsdp":  # each process holds the masks of its rows only
            assert all(local[n][0] < full[n][0] and local[n][1:] == full[n][1:] for n in full), (local, full)
        else:  # a 2x1 mesh: both processes hold full rows, rank 1 as a replica that is not counted twice
            assert local == full
        if case.startswith("l1") or case == "random":  # the final sparsity over the gathered weights is exact
            counts = [(w == 0).sum() for w in rank0["final"].values()]
            numels = [w.numel() for w in rank0["final"].values()]
            if case == "l1_layerwise":
                assert [int(c) for c in counts] == [round(0.6 * n) for n in numels]
            else:
                assert int(sum(counts)) == round(0.6 * sum(numels))
        assert rank0["history"][-1]["sparsity"] == pytest.approx(
            float(sum((~m).sum() for m in oracle.values()) / sum(m.numel() for m in oracle.values()))
        )


def _check_sharded_movement(rank0, rank1):
    """Scores beside the shards are one process's: the gathered scores equal the oracle's sums of the gathered
    -g * w, and the masks prune the lowest of them as they stood at the update (after 6 steps)."""
    from helpers import assert_masks_prune_the_lowest

    gathered, oracle = rank0["gathered_scores"], rank0["oracle_scores"]
    assert list(gathered) == list(oracle) == ["net.0.weight", "net.2.weight", "net.4.weight"]
    assert rank1["gathered_scores"] == {}  # kept on rank zero only, as the masks
    for name, score in gathered.items():
        torch.testing.assert_close(score.double(), oracle[name], rtol=1e-4, atol=1e-9)
        assert rank0["local_scores"][name].shape == rank0["local_masks"][name].shape
    for rank in (rank0, rank1):
        assert_masks_prune_the_lowest(rank["masks"], rank0["oracle_snapshot"], 0.6, "global")
        for name, keep in rank["masks"].items():
            assert not rank0["final"][name][~keep].any(), name


@pytest.mark.parametrize("checkpoint_format", ["dcp", pytest.param("full", marks=pytest.mark.slow)])
def test_resuming_mid_schedule_gives_the_weights_and_masks_of_an_uninterrupted_run(tmp_path, checkpoint_format):
    run = f"resume_{checkpoint_format}"
    results = _fsdp_results(tmp_path, "fsdp", f"{run}_full", f"{run}_first", f"{run}_second")
    (whole, _), (first, _), (resumed, _) = (results[f"{run}_{part}"] for part in ("full", "first", "second"))
    saved = tmp_path / run / "checkpoints" / "epoch1.ckpt"
    assert saved.is_dir() if checkpoint_format == "dcp" else saved.is_file()
    # stopped after epoch 1 of a schedule that ends at epoch 3: mid-schedule
    assert 0 < first["history"][-1]["sparsity"] < whole["history"][-1]["sparsity"]
    for name in whole["masks"]:
        assert torch.equal(resumed["masks"][name], whole["masks"][name]), name
        assert torch.equal(resumed["final"][name], whole["final"][name]), name
    assert [h["target"] for h in resumed["history"]] == [h["target"] for h in whole["history"]][2:]


def test_an_unsupported_setting_fails_on_every_rank_before_training(tmp_path):
    result = subprocess.run(
        [sys.executable, str(TESTS_DIR / "fsdp_script.py"), tmp_path, "fsdp", "unsupported"],
        capture_output=True,
        text=True,
        timeout=120,  # a rank left waiting for the other would hang here instead of failing
    )
    assert result.returncode != 0
    assert "does not support max_drop=0.01 yet" in result.stderr
    assert not list(tmp_path.glob("unsupported/rank*.pt")) and not list(tmp_path.glob("**/metrics.csv"))


def test_quantization_gathers_the_model_and_writes_one_artifact_that_loads_in_a_fresh_process(
    tmp_path, run_in_fresh_process
):
    import csv

    from helpers import DigitsMLP, digits_val_accuracy

    (rank0, rank1) = _fsdp_results(tmp_path, "fsdp", "quantize")["quantize"]
    assert rank0["is_global_zero"] and rank0["quantized"] and not rank1["quantized"]
    assert sorted(p.name for p in (tmp_path / "quantize").iterdir()) == ["logs", "model.pt", "rank0.pt", "rank1.pt"]
    outputs = run_in_fresh_process("load_quantized", tmp_path / "quantize" / "model.pt", rank0["input"])
    assert torch.equal(outputs, rank0["outputs"])
    (metrics,) = (tmp_path / "quantize").glob("logs/*/metrics.csv")
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("quantization/val_acc_after")]
    assert len(rows) == 1
    # rank zero quantized the gathered final model: its logged float accuracy is that of the gathered weights,
    # computed here independently over the whole validation set
    model = DigitsMLP(hidden=48)
    model.load_state_dict(rank0["parameters"], strict=False)  # all parameters; the metric's state is not one
    assert float(rows[0]["quantization/val_acc_before"]) == pytest.approx(digits_val_accuracy(model), abs=1e-6)
    assert float(rows[0]["quantization/val_acc_before"]) > 0.5  # it learned: the copy is not of untrained weights
    assert float(rows[0]["quantization/sparsity_before"]) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("when", [pytest.param("early", marks=pytest.mark.slow), "late"])
def test_a_quantization_failure_on_rank_zero_ends_every_rank_without_hanging(tmp_path, when):
    result = subprocess.run(
        [sys.executable, str(TESTS_DIR / "fsdp_script.py"), tmp_path, "fsdp", f"quantize_fails_{when}"],
        capture_output=True,
        text=True,
        timeout=180,  # a rank left waiting for the other would hang here instead of failing
    )
    assert result.returncode != 0
    if when == "early":  # before training, on every rank
        assert "rehearsed its end-of-fit work before training (on the first, the last" in result.stderr
        assert "validation batches), and it failed" in result.stderr
        assert not list(tmp_path.glob("**/rank*.pt"))
    else:  # after training, on rank zero, while the others return from their fit (or Lightning's launcher ends them)
        assert "DynamicQuantization failed after training (RuntimeError: injected failure" in result.stderr
        assert "The trained float model and its checkpoints are intact" in result.stderr


@pytest.mark.slow
def test_a_model_this_project_did_not_write_lightnings_demo_transformer(tmp_path):
    (rank0, rank1) = _fsdp_results(tmp_path, "fsdp", "demo")["demo"]
    # attention, feed-forward, embedding and head weights, some in the root's group (left unsharded by the sanity
    # check's validation forward, which the callback handles)
    assert "model.decoder.weight" in rank0["masks"] and len(rank0["masks"]) == 21
    oracle = _oracle_masks("l1_global", rank0["initial"])
    for name, expected in oracle.items():
        assert torch.equal(rank0["masks"][name], expected), name
        assert torch.equal(rank1["masks"][name], expected), name
        assert not rank0["final"][name][~expected].any(), name
    # its prepare_data (Lightning wraps it in a barrier of every rank) does not run again in the rehearsal's
    # validation on rank zero alone, which hung before
    assert rank0["quantized"] and not rank1["quantized"] and (tmp_path / "demo" / "model.pt").exists()
