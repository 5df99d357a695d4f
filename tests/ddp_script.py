"""Run by tests/test_ddp.py as `python ddp_script.py OUT_DIR METHOD [quantize [MONITOR]]`, strategy="ddp".

METHOD: a pruning method, "guard" (L1 with an accuracy budget of 0), "demo" (L1 on Lightning's demo Transformer) or
"movement" (MovementPruning, with a MovementOracle beside it); several joined by "+" run one fit each in this one
launch, each writing under OUT_DIR/<method>/.

Two CPU processes.

Lightning's launcher starts rank 1 by running this same command again. Each rank writes what it ended with to
OUT_DIR/rank<k>.pt, for the test to compare.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers import (  # beside this script, first on sys.path
    DemoTransformer,
    DigitsDataModule,
    DigitsMLP,
    MovementOracle,
    end_distributed_process,
)

from lightning_compress import MagnitudePruning, MovementPruning


def main(out_dir: Path, method: str, quantize: bool, monitor: str | None = None) -> None:
    pl.seed_everything(0, verbose=False)
    # "guard": l1 with an accuracy budget of 0, so that holds or a rollback happen and every rank must agree
    guard = dict(start=1, monitor="val_acc", max_drop=0.0) if method == "guard" else {}
    demo = method == "demo"  # Lightning's demo Transformer, whose prepare_data Lightning runs inside a barrier
    movement = method == "movement"
    method = "l1_unstructured" if method in ("guard", "demo") else method
    if movement:  # epoch 0 dense, the update at epoch 1 from its scores, which go on accumulating
        pruning = MovementPruning(amount=0.7, schedule="constant", start=1, make_permanent=False)
    else:
        pruning = MagnitudePruning(amount=0.7, method=method, make_permanent=False, **guard)
    callbacks = [pruning]
    oracle = MovementOracle(pruning) if movement else None
    if oracle is not None:
        callbacks.append(oracle)
    quant = None
    if quantize:
        from lightning_compress import DynamicQuantization

        quant = DynamicQuantization(monitor=monitor)
        callbacks.append(quant)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        callbacks=callbacks,
        logger=pl.loggers.CSVLogger(out_dir, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if demo:
        model = DemoTransformer()
        trainer.fit(model)
    else:
        model = DigitsMLP(hidden=32)
        trainer.fit(model, datamodule=DigitsDataModule())
    torch.save(
        {
            "state_dict": model.state_dict(),
            "masks": pruning.masks,
            "guard": pruning.summary_lines(),
            "quantized": quant is not None and quant.quantized_model is not None,
            "is_global_zero": trainer.is_global_zero,
            "scores": pruning.scores if movement else None,
            "oracle_scores": oracle.scores if movement else None,
            "steps": (oracle.steps, pruning.pruner.score.steps) if movement else None,
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    methods = sys.argv[2].split("+")
    for one in methods:
        out = Path(sys.argv[1]) / one if len(methods) > 1 else Path(sys.argv[1])
        out.mkdir(parents=True, exist_ok=True)
        main(out, one, len(sys.argv) > 3, sys.argv[4] if len(sys.argv) > 4 else None)
    end_distributed_process()
