"""Two real fits with DynamicQuantization, one under Lightning's TQDM progress bar and one under its Rich bar, whose
stdout and stderr the test reads as one stream, as a terminal or a log file shows them."""

import lightning.pytorch as pl
from helpers import DigitsDataModule, DigitsMLP
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from lightning_compress import DynamicQuantization

for bar in (TQDMProgressBar(), RichProgressBar()):
    print(f"=== {type(bar).__name__}", flush=True)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[bar, DynamicQuantization()],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=100,  # the trainer itself never validates: any validation bar would be ours
        limit_train_batches=4,
    )
    trainer.fit(DigitsMLP(hidden=16), datamodule=DigitsDataModule())
