"""The main job (`make demo`): prune an MLP on scikit-learn's 8x8 digits while training, then quantize it to int8.

Trains the same model twice with the same seed: once dense (the baseline), once with MagnitudePruning and
DynamicQuantization. Prints the library's end-of-fit summary table and writes a plot of the schedule and the
accuracy into the run's log folder. Nothing is downloaded: the digits ship inside scikit-learn.

    python examples/digits_mlp.py [--amount 0.9] [--schedule cubic] [--epochs 15]
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import lightning.pytorch as pl
from digits import DigitsDataModule, DigitsMLP
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_compress import DynamicQuantization, MagnitudePruning


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amount", type=float, default=0.9, help="final sparsity (default 0.9)")
    parser.add_argument("--schedule", default="cubic", help="constant | linear | cubic | exponential")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--end", type=int, default=None, help="epoch of the last mask update (default: 60%% of epochs)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--root", default="runs", help="folder for logs, plot and artifact")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def dense_baseline_accuracy(args: argparse.Namespace) -> float:
    """The same model, data, seed and epochs, trained without pruning: its validation accuracy."""
    pl.seed_everything(args.seed, verbose=False)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = DigitsMLP(hidden=args.hidden)
    data = DigitsDataModule()
    trainer.fit(model, datamodule=data)
    return trainer.validate(model, datamodule=data, verbose=False)[0]["val_acc"]


def main() -> None:
    args = parse_args()
    print(f"Training the dense baseline ({args.epochs} epochs)...")
    baseline = dense_baseline_accuracy(args)

    csv_logger = CSVLogger(args.root, name="digits_mlp")
    loggers = [csv_logger]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(args.root, name="digits_mlp_tb"))
    log_dir = Path(csv_logger.log_dir)
    end = args.end if args.end is not None else max(int(args.epochs * 0.6), 1)
    pruning = MagnitudePruning(amount=args.amount, schedule=args.schedule, end=end)
    quantization = DynamicQuantization(
        dtype="qint8",
        save_path=log_dir / "model_int8.lcz",
        compress=True,
        sparse_kernels="auto",
        baseline_accuracy=baseline,
        monitor="val_acc",
    )

    pl.seed_everything(args.seed, verbose=False)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[pruning, quantization], logger=loggers)
    trainer.fit(DigitsMLP(hidden=args.hidden), datamodule=DigitsDataModule())

    plot = log_dir / "sparsity.png"  # drawn by MagnitudePruning at the end of training (needs matplotlib)
    print(f"Plot: {plot}" if plot.exists() else "Plot: pip install 'lightning_compress[plot]' to get one")
    print(f"Metrics: {log_dir / 'metrics.csv'}  Artifact: {quantization.save_path}")


if __name__ == "__main__":
    main()
