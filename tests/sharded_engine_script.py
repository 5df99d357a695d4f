"""Run by tests/test_sharding.py as `python sharded_engine_script.py OUT_DIR`: the mask engine on DTensors.

Two CPU processes (gloo) hold row blocks of the same full tensors (``distribute_tensor(..., [Shard(0)])``, uneven
blocks, one empty). Each case grows masks on the shards with the sharded engine and gathers them; rank zero
also computes the masks on the full tensors in one process (the engine's unsharded path, itself checked against
torch.nn.utils.prune in test_masks.py) and saves both to OUT_DIR/rank<k>.pt. CHUNK and the candidate limits are made
tiny so that chunks straddle the shard boundary and the radix select needs several passes.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from lightning_compress.pruning import masks as engine
from lightning_compress.pruning import scores, sharding

SHAPES = [(7, 5), (1, 9), (6, 4, 3), (16,)]


def full_weights() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) for shape in SHAPES]
    weights[2] = torch.randint(-3, 4, SHAPES[2], generator=generator).float()  # many exact ties, across shards
    return weights


def cases():
    """(name, function of (weights, masks, parts, collective, sparsity) that grows the masks)."""

    def l1(scope):
        def grow(w, m, parts, collective, sparsity):
            engine.update_unstructured(w, m, sparsity, scores.l1_scores(w), scope, parts, collective)

        return grow

    def random(w, m, parts, collective, sparsity):
        source = scores.random_scores(w, torch.Generator().manual_seed(5), parts)
        engine.update_unstructured(w, m, sparsity, source, "global", parts, collective)

    def structured(dim, norm):
        def grow(w, m, parts, collective, sparsity):
            scores.update_structured(w[:3], m[:3], sparsity, norm, dim, parts[:3] if parts else None, collective)

        return grow

    return {
        "global_l1": l1("global"),
        "layerwise_l1": l1("layerwise"),
        "random": random,
        "ln_structured_dim0": structured(0, 2.0),
        "ln_structured_dim1": structured(1, 1.0),
        "ln_structured_dim1_inf": structured(-1, float("inf")),
    }


def worker(rank: int, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    engine.CHUNK, engine.CANDIDATE_LIMIT, engine.SHARDED_CANDIDATE_LIMIT = 8, 4, 4
    mesh = init_device_mesh("cpu", (2,))
    collective = sharding.ProcessGroupCollective()
    results = {}
    for name, grow in cases().items():
        for rounds in (1, 2):  # the second round grows masks that already prune some entries
            full = full_weights()
            params = [distribute_tensor(w, mesh, [Shard(0)]) for w in full]
            local = [sharding.local(p) for p in params]
            parts = [sharding.part_of(f"w{i}", p) for i, p in enumerate(params)]
            masks = [engine.new_mask(t) for t in local]
            reference = [engine.new_mask(w) for w in full]
            for r, sparsity in enumerate((0.4, 0.65)[:rounds]):
                grow(local, masks, parts, collective, sparsity)
                grow(full, reference, None, engine.LOCAL, sparsity)
                if r == 0 and rounds == 2:  # perturb the weights between rounds, alike in both
                    for tensor in [*local, *full]:
                        tensor.mul_(1.5).add_(0.25)
            gathered = [sharding.full_keep(p, m) for p, m in zip(params, masks)]
            results[f"{name}/{rounds}"] = {"sharded": gathered, "reference": [m != 0 for m in reference]}
            results[f"{name}/{rounds}/parts"] = [(p.offset, p.total, p.counted) for p in parts]
    try:  # a layout the engine does not support (tensor parallelism shards dim 1) is refused, naming the parameter
        sharding.part_of("head.weight", distribute_tensor(full_weights()[0], mesh, [Shard(1)]))
    except ValueError as error:
        results["refused"] = str(error)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    mp.spawn(worker, args=(sys.argv[1], free_port), nprocs=2)
