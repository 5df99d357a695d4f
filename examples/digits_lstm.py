"""An LSTM reads each 8x8 digit as 8 rows of 8 pixels; its weights (LSTM included) are pruned, then int8-quantized.

python examples/digits_lstm.py [--amount 0.6] [--epochs 12]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
from digits import DigitsDataModule, DigitsLSTM
from lightning.pytorch.loggers import CSVLogger

from lightning_compress import DynamicQuantization, MagnitudePruning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--amount", type=float, default=0.6)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--root", default="runs")
    args = parser.parse_args()

    logger = CSVLogger(args.root, name="digits_lstm")
    pruning = MagnitudePruning(amount=args.amount, end=max(args.epochs - 4, 0))  # weight_ih/weight_hh + head
    quantization = DynamicQuantization(dtype="qint8", save_path=Path(logger.log_dir) / "lstm_int8.ts")
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[pruning, quantization], logger=logger)
    trainer.fit(DigitsLSTM(), datamodule=DigitsDataModule())
    print("pruned:", ", ".join(pruning.parameter_names))
    print("quantized LSTM:", type(quantization.quantized_model.lstm).__module__)


if __name__ == "__main__":
    main()
