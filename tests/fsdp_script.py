"""Run by tests/test_sharding.py: MagnitudePruning (and DynamicQuantization) with FSDP2 on 2 CPU processes.

    python fsdp_script.py OUT_DIR LAYOUT CASE...

LAYOUT: "fsdp" (each layer's rows split over the 2 processes) or "hsdp" (a 2x1 mesh: replicated over 2 processes,
sharded over 1, so rank 1 holds replicas). Lightning's launcher starts rank 1 by running this same command again.
Each CASE is one fit; each rank writes OUT_DIR/<case>/rank<k>.pt with what the test compares against its oracle:
the selected weights gathered before the first update, the gathered masks and the gathered final weights.

CASE is one of: l1_global, l1_layerwise, random, ln_dim0, ln_dim1 (constant schedule, one epoch); movement:
MovementPruning, its one update at step 6, with a MovementOracle (gathered g and w at every step); demo: Lightning's
demo Transformer with l1_global and DynamicQuantization;
resume_<format>_full / resume_<format>_first / resume_<format>_second (format: "dcp" or "full"): an uninterrupted
4-epoch cubic schedule, and the same run stopped after epoch 1 then resumed from its checkpoint;
quantize: MagnitudePruning with DynamicQuantization(save_path=OUT_DIR/quantize/model.pt); quantize_fails_early /
quantize_fails_late: DynamicQuantization failing on rank zero in its rehearsal / after training; unsupported: a
setting MagnitudePruning does not support under sharding (it must fail before training).
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
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from lightning_compress import DynamicQuantization, MagnitudePruning, MovementPruning

CONSTANT = {
    "l1_global": dict(method="l1_unstructured"),
    "l1_layerwise": dict(method="l1_unstructured", scope="layerwise"),
    "random": dict(method="random_unstructured", seed=3),
    "ln_dim0": dict(method="ln_structured", dim=0),
    "ln_dim1": dict(method="ln_structured", dim=1, norm=1),
}


class ShardedMLP(DigitsMLP):
    """The digits MLP, its layers and itself sharded with fully_shard in configure_model."""

    layout = "fsdp"

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"] if self.layout == "fsdp" else self.device_mesh
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class ShardedDemoTransformer(DemoTransformer):
    """Lightning's demo Transformer, its encoder and decoder layers and itself sharded (the embedding and the output
    head belong to the root's group, whose parameters a validation forward leaves unsharded)."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for m in list(self.modules())[1:]:
            if isinstance(m, (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)):
                fully_shard(m, mesh=mesh)
        fully_shard(self, mesh=mesh)


class RecordInitialWeights(Callback):  # after MagnitudePruning, whose on_train_start must not rely on it
    """Gathers the selected weights at on_train_start, before MagnitudePruning's first update."""

    def __init__(self, pruning: MagnitudePruning) -> None:
        self.pruning = pruning
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        # whatever FSDP2 registers now (a validation forward leaves the root's parameters unsharded)
        full = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True))
        self.weights = {n: full[n].detach().clone() for n in self.pruning.parameter_names}


class FailsAfterTraining(DynamicQuantization):
    """Fault injection: the end-of-fit work fails on rank zero (after a successful rehearsal)."""

    def _run(self, trainer, pl_module, rehearsal, full_state=None):
        if not rehearsal:
            raise RuntimeError("injected failure after training")
        super()._run(trainer, pl_module, rehearsal, full_state)


def fit(out_dir: Path, layout: str, case: str) -> None:
    pl.seed_everything(0, verbose=False)
    ShardedMLP.layout = layout
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint="dcp" in case
    )
    epochs, ckpt_path, callbacks = 1, None, []
    if case == "unsupported":  # not supported under sharding yet: must fail before training
        pruning = MagnitudePruning(amount=0.5, monitor="val_acc", max_drop=0.01)
    elif case == "movement":
        pruning = MovementPruning(amount=0.6, schedule="constant", interval="step", start=6, make_permanent=False)
        callbacks.append(MovementOracle(pruning, snapshot_after=6))
    elif case in CONSTANT or case == "demo":
        settings = CONSTANT.get(case, CONSTANT["l1_global"])
        pruning = MagnitudePruning(amount=0.6, schedule="constant", make_permanent=False, **settings)
    elif case.startswith("quantize"):
        pruning = MagnitudePruning(amount=0.5, end=2, make_permanent=False)
        epochs = 3
    else:
        # random scores: a resume that lost the masks or the generator's state would prune other entries
        pruning = MagnitudePruning(
            amount=0.8, schedule="cubic", end=3, method="random_unstructured", seed=3, make_permanent=False
        )
        epochs = 4
    if case.startswith("resume"):
        checkpoints = out_dir / case.rsplit("_", 1)[0] / "checkpoints"
        if case.endswith("_first"):
            epochs = 2
            callbacks.append(
                ModelCheckpoint(
                    dirpath=checkpoints, filename="epoch{epoch}", save_top_k=-1, auto_insert_metric_name=False
                )
            )
        elif case.endswith("_second"):
            ckpt_path = str(checkpoints / "epoch1.ckpt")
    quant = None
    if case in ("quantize", "demo"):
        quant = DynamicQuantization(save_path=out_dir / case / "model.pt")
    elif case == "quantize_fails_early":  # a monitor the module does not log: the rehearsal fails on rank zero
        quant = DynamicQuantization(monitor="val_accuracy")
    elif case == "quantize_fails_late":
        quant = FailsAfterTraining()
    if quant is not None:
        callbacks.append(quant)
    recorder = RecordInitialWeights(pruning)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=epochs,
        callbacks=[pruning, recorder, *callbacks],
        logger=pl.loggers.CSVLogger(out_dir / case, name="logs"),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if case == "demo":
        model = ShardedDemoTransformer()
        trainer.fit(model)
    else:
        model = ShardedMLP(hidden=48)
        trainer.fit(model, datamodule=DigitsDataModule(), ckpt_path=ckpt_path)
    named = dict(model.named_parameters())
    result = {
        "initial": recorder.weights,
        "masks": pruning.gathered_masks(),
        "final": {n: named[n].full_tensor().detach() for n in pruning.parameter_names},
        "parameters": {n: p.full_tensor().detach() for n, p in named.items()},
        "local_masks": pruning.masks,
        "history": pruning.history,
        "is_global_zero": trainer.is_global_zero,
        "quantized": quant is not None and quant.quantized_model is not None,
    }
    if quant is not None and case != "demo":
        x = torch.rand(16, 64, generator=torch.Generator().manual_seed(1))
        result["input"] = x
        if quant.quantized_model is not None:
            result["outputs"] = quant.quantized_model(x).detach()
            result["results"] = quant.results
    if case == "movement":
        oracle = callbacks[-1]
        result["oracle_snapshot"], result["oracle_scores"] = oracle.snapshot, oracle.scores
        result["gathered_scores"] = pruning.state_dict()["scores"]  # as checkpoints hold them: on rank zero
        result["local_scores"] = pruning.scores
    (out_dir / case).mkdir(parents=True, exist_ok=True)
    torch.save(result, out_dir / case / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    for name in sys.argv[3:]:
        fit(Path(sys.argv[1]), sys.argv[2], name)
    end_distributed_process()
