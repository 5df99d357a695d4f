"""Sharded training (FSDP2's fully_shard) with 2 CPU processes (gloo), each in a subprocess with a timeout."""

import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent


def _run_script(script: str, *args, timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(HERE / script), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_sharded_engine_finds_the_masks_of_one_process_holding_the_full_tensors(tmp_path):
    _run_script("sharded_engine_script.py", tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    cases = [k for k in rank0 if not k.endswith("/parts")]
    assert len(cases) == 12
    for case in cases:
        sharded, reference = rank0[case]["sharded"], rank0[case]["reference"]
        for i, (mask, expected) in enumerate(zip(sharded, reference)):
            assert torch.equal(mask, expected), (case, i)
            assert torch.equal(rank1[case]["sharded"][i], expected), (case, i)  # every rank gathers the same
        assert any(not m.all() for m in sharded), case  # something was pruned
    # the shards really are row blocks at offsets: uneven (7 rows: 4 + 3) and empty (1 row: 1 + 0)
    assert rank1["global_l1/1/parts"][:2] == [(20, 35, True), (9, 9, True)]
