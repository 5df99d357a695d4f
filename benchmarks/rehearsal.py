"""What DynamicQuantization's rehearsal before training costs, beside one training epoch of the same run.

The rehearsal runs the whole end-of-fit path at fit start on the first, the last and the differently shaped
validation batches (copy, quantize, evaluate both with the module's own validation, write the artifact to a
temporary file, reload it and evaluate it the same way, check save_path's folder). Measured between two
marker callbacks around it in the same Trainer; the epoch is epoch 0 of that run (train batches and validation).
Models: the digits MLP and a tiny Hugging Face BERT (when transformers is installed). Median of 3 runs each.

    python benchmarks/rehearsal.py
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from digits import DigitsDataModule, DigitsMLP  # noqa: E402

from lightning_compress import DynamicQuantization  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
logging.getLogger("transformers").setLevel(logging.ERROR)


class Marks(Callback):
    def __init__(self, times, key):
        self.times, self.key = times, key

    def on_fit_start(self, trainer, pl_module):
        self.times[self.key] = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        self.times.setdefault("epoch_start", time.perf_counter())

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.times.setdefault("epoch_end", time.perf_counter())


def run(model_fn, fit_kwargs) -> tuple[float, float]:
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        quant = DynamicQuantization(save_path=Path(folder) / "m.lcz", compress=True)
        quant.on_fit_end = lambda *args: None  # only the rehearsal is measured here
        trainer = pl.Trainer(
            max_epochs=1,
            callbacks=[Marks(times, "before"), quant, Marks(times, "after")],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(model_fn(), **fit_kwargs())
    return times["after"] - times["before"], times["epoch_end"] - times["epoch_start"]


def main() -> None:
    models = {"digits MLP 64-256-256-10": (lambda: DigitsMLP(hidden=256), lambda: {"datamodule": DigitsDataModule()})}
    try:
        import transformers  # noqa: F401
        from helpers import BertClassifier, sentences
        from torch.utils.data import DataLoader

        models["BERT (2 layers, hidden 32)"] = (
            BertClassifier,
            lambda: {
                "train_dataloaders": DataLoader(sentences(256, 0), batch_size=16),
                "val_dataloaders": DataLoader(sentences(64, 1), batch_size=16),
            },
        )
    except ImportError:
        pass
    print("| model | rehearsal | one epoch (train + validation) | rehearsal / epoch |")
    print("| --- | --- | --- | --- |")
    for name, (model_fn, fit_kwargs) in models.items():
        results = [run(model_fn, fit_kwargs) for _ in range(3)]
        rehearsal = statistics.median(r[0] for r in results)
        epoch = statistics.median(r[1] for r in results)
        print(f"| {name} | {rehearsal:.3f} s | {epoch:.3f} s | {rehearsal / epoch:.2f} |")


if __name__ == "__main__":
    main()
