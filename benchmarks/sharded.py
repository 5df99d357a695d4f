"""Pruning sharded weights (FSDP2): one global mask update on 1 vs 2 processes, and the training step with masks.

1. ``update``: 12 x Linear(2048, 2048) without bias (50.3M weights), one global L1 update from dense to 50%.
   One process holds the full tensors; two processes (gloo) hold row blocks (``Shard(0)``, as fully_shard does).
   Per rank: wall time of the update (the slowest rank's), the masks' memory, and the peak RSS during the update
   (the kernel's VmHWM, reset just before) minus the RSS before it. Each process gets its share of the cores.
   Each measurement in fresh processes, alternating, medians.
2. ``step``: a 5.3M-parameter MLP (512-2048-2048-10) sharded with fully_shard under Lightning's
   ModelParallelStrategy on 2 CPU processes, batch 128 per process, SGD with momentum: plain FSDP2 training vs
   MagnitudePruning at 90% (reached before epoch 1, whose steps are timed), alternating fresh runs, medians.

    python benchmarks/sharded.py [--repeats 3] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mask_update import _rss_mb  # the single-process update benchmark's reading, beside this script


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM), so that the peak of the update alone is read afterwards."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))


# ---------------------------------------------------------------------------------------------- 1. one update
def _update_worker(rank: int, world: int, port: int, out: str, layers: int, width: int, amount: float) -> None:
    import torch

    from lightning_compress.pruning import masks as engine
    from lightning_compress.pruning import scores

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the same cores in all, not more threads
    generator = torch.Generator().manual_seed(0)
    full = [torch.randn(width, width, generator=generator) for _ in range(layers)]
    if world == 1:
        weights, parts, collective = full, None, engine.LOCAL
    else:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        from lightning_compress.pruning import sharding

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        mesh = init_device_mesh("cpu", (world,))
        params = [distribute_tensor(w, mesh, [Shard(0)], src_data_rank=None) for w in full]
        del full
        weights = [sharding.local(p) for p in params]
        parts = [sharding.part_of(f"w{i}", p) for i, p in enumerate(params)]
        collective = sharding.ProcessGroupCollective()
        dist.barrier()
    masks = [engine.new_mask(w) for w in weights]
    before = _rss_mb()
    _reset_peak()
    start = time.perf_counter()
    engine.update_unstructured(weights, masks, amount, scores.l1_scores(weights), "global", parts, collective)
    engine.apply_masks(weights, masks)
    seconds = time.perf_counter() - start
    zeros = sum(int((w == 0).sum()) for w in weights)
    result = {
        "seconds": seconds,
        "peak_overhead_mb": _peak_mb() - before,
        "mask_mb": sum(m.numel() * m.element_size() for m in masks) / 2**20,
        "weights_mb": sum(w.numel() * w.element_size() for w in weights) / 2**20,
        "zeros": zeros,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def _update_child(world: int, layers: int, width: int, amount: float) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        args = (world, _free_port(), out, layers, width, amount)
        if world == 1:
            _update_worker(0, *args)
        else:
            mp.spawn(_update_worker, args=args, nprocs=world)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


# ---------------------------------------------------------------------------------------------- 2. the step
def _step_child(config: str, out: str, batches: int) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    # the model and timer of the single-process step benchmark, beside this script
    from step_overhead import MLP, BatchTimer
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_compress import MagnitudePruning

    class ShardedMLP(MLP):
        def configure_model(self):
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self, mesh=self.device_mesh["data_parallel"])

    torch.manual_seed(0)
    n = batches * 128 * 2
    data = TensorDataset(torch.randn(n, 512), torch.randint(0, 10, (n,)))
    callbacks = [MagnitudePruning(amount=0.9, schedule="constant")] if config == "MagnitudePruning" else []
    timer = BatchTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=2,
        callbacks=[*callbacks, timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ShardedMLP(), DataLoader(data, batch_size=128))
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(timer.times))
    # Lightning leaves the process group up, and under FSDP2 an exit can abort in the interpreter's finalization
    # even after destroy_process_group (DESIGN.md): the result is written, so end here.
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_self(*args: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--update-child", type=int, default=None)
    parser.add_argument("--step-child", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.update_child:
        print(json.dumps(_update_child(args.update_child, args.layers, args.width, args.amount)))
        return
    if args.step_child:
        _step_child(args.step_child, args.out, args.batches)
        return

    updates: dict[int, list[list[dict]]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for world in updates:
            out = _run_self("--update-child", str(world), "--layers", str(args.layers), "--width", str(args.width))
            updates[world].append(json.loads(out.strip().splitlines()[-1]))
    n = args.layers * args.width * args.width
    print(f"global L1 update to {args.amount:.0%} on {n / 1e6:.1f}M weights, medians of {args.repeats} runs each")
    for world, runs in updates.items():
        seconds = statistics.median(max(r["seconds"] for r in ranks) for ranks in runs)
        peak = statistics.median(max(r["peak_overhead_mb"] for r in ranks) for ranks in runs)
        masks = max(r["mask_mb"] for r in runs[0])
        weights = max(r["weights_mb"] for r in runs[0])
        zeros = sum(r["zeros"] for r in runs[0])
        print(
            f"  {world} process(es): {seconds:.3f} s (slowest rank), per rank: weights {weights:.0f} MB, "
            f"masks {masks:.0f} MB, peak +{peak:.0f} MB during the update; {zeros:,} zeros in all"
        )

    if not args.rounds:
        return
    times: dict[str, list[float]] = {"plain FSDP2": [], "MagnitudePruning": []}
    for _ in range(args.rounds):
        for config in times:
            with tempfile.TemporaryDirectory() as out:
                _run_self("--step-child", config, "--out", out, "--batches", str(args.batches))
                per_rank = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]
                times[config].extend(max(a, b) for a, b in zip(*per_rank))  # a step takes as long as its slower rank
    plain = statistics.median(times["plain FSDP2"])
    print(f"training step under FSDP2 on 2 processes, median of {len(times['plain FSDP2'])} steps per configuration")
    for config, values in times.items():
        median = statistics.median(values)
        print(f"  {config:18s} {median * 1e3:7.2f} ms   {median / plain:.3f}x plain")


if __name__ == "__main__":
    main()
