"""Choose what to prune with glob patterns, follow your own schedule, and update masks every optimizer step.

Prunes only the hidden layers (the classifier head is excluded), with a callable schedule of step indices:
sparsity rises in equal steps of 10% every 20 optimizer steps up to 80%.

    python examples/custom_selection.py [--epochs 8]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from digits import DigitsDataModule, DigitsMLP

from lightning_compress import MagnitudePruning


def staircase(step: int) -> float:
    """Target sparsity at an optimizer step: +10% every 20 steps, at most 80%."""
    return min(step // 20, 8) / 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()

    pruning = MagnitudePruning(
        schedule=staircase,
        interval="step",
        end=160,
        frequency=20,
        parameters=["net.*.weight"],  # glob patterns over model.named_parameters() names
        exclude=["net.4.*"],  # keep the classifier head dense
    )
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[pruning], logger=False, enable_checkpointing=False)
    model = DigitsMLP()
    trainer.fit(model, datamodule=DigitsDataModule())
    for name, param in model.named_parameters():
        if name.endswith("weight"):
            print(f"{name:14s} sparsity {float((param == 0).float().mean()):.2%}")


if __name__ == "__main__":
    main()
