"""Sharded training: the digits MLP sharded with FSDP2 over 2 CPU processes, pruned while training, int8 at the end.

Each process holds half of every weight matrix and the masks of its half only; the masks equal those one process
holding the full weights would compute. At the end, every process takes part in gathering the full model, and
rank zero quantizes it and writes the artifact.

python examples/digits_fsdp.py [--amount 0.7] [--epochs 8]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from digits import DigitsDataModule, DigitsMLP
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from lightning_compress import DynamicQuantization, MagnitudePruning


class ShardedDigitsMLP(DigitsMLP):
    def configure_model(self) -> None:
        # Lightning calls this in the strategy's context; each Linear and then the whole module are sharded
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--amount", type=float, default=0.7)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--root", default="runs")
    args = parser.parse_args()

    pruning = MagnitudePruning(amount=args.amount, end=max(args.epochs - 3, 0))
    quantization = DynamicQuantization(dtype="qint8", save_path=Path(args.root) / "digits_fsdp_int8.ts")
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=args.epochs,
        callbacks=[pruning, quantization],
        logger=CSVLogger(args.root, name="digits_fsdp"),
        enable_progress_bar=False,
    )
    trainer.fit(ShardedDigitsMLP(), datamodule=DigitsDataModule())
    for name, weight in pruning.selected_parameters.items():  # DTensors: this process holds a block of rows
        shard = weight.to_local()
        zeros = float((shard == 0).float().mean())
        print(
            f"rank {trainer.global_rank}: {name} shard {tuple(shard.shape)} of {tuple(weight.shape)}, {zeros:.0%} zeros"
        )
    # Lightning leaves the process group up. On gloo, an FSDP2 process can still abort at interpreter exit after
    # destroy_process_group (pytorch/pytorch#190489), so end the process once everything is written.
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
