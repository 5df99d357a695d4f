"""Structured pruning that pays off on any hardware: a ResNet-style CNN on digits, pruned by coupled channel groups
under an accuracy budget, then shrunk (the zeroed channels removed) and statically quantized to int8 (weights and
activations, calibrated on training batches, compiled with inductor) into one small artifact.

The summary shows each stage's gain: the parameters shrink removed, and the size and latency of the int8 program
against the float model compiled the same way (``latency``) and as trained (``latency, float eager``).

python examples/digits_cnn_shrink.py [--amount 0.5] [--epochs 10]
(needs pip install 'lightning_compress[shrink,static]'; the int8 program is compiled at its first call of each
input shape, which takes a few seconds here)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
from digits import DigitsCNN, DigitsDataModule
from lightning.pytorch.loggers import CSVLogger

from lightning_compress import MagnitudePruning, StaticQuantization, load_quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--root", default="runs")
    args = parser.parse_args()

    logger = CSVLogger(args.root, name="digits_cnn")
    pruning = MagnitudePruning(
        amount=args.amount,
        method="ln_structured",
        structure="groups",  # a channel is pruned in its conv, its BatchNorm and its residual partners at once
        start=1,
        end=max(args.epochs - 3, 1),
        monitor="val_acc",
        max_drop=0.03,  # hold, or roll back, if accuracy falls more than 3 points below the dense model's
        patience=2,
    )
    path = Path(logger.log_dir) / "cnn_int8.pt2"
    quantization = StaticQuantization(shrink=True, save_path=path, monitor="val_acc")
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[pruning, quantization], logger=logger)
    model = DigitsCNN()
    trainer.fit(model, datamodule=DigitsDataModule())
    artifact = load_quantized(path)  # the int8 program, compiled at its first call of each input shape
    print(f"artifact {path.name}: predicts {artifact(model.example_input_array[:8]).argmax(1).tolist()}")


if __name__ == "__main__":
    main()
