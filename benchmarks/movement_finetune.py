"""Fine-tuning at high sparsity: MovementPruning against MagnitudePruning, same pretrained model, same run.

The setting of Sanh, Wolf & Rush (2020), in miniature: a model trained on one task is fine-tuned to another while
it is pruned. Task A: scikit-learn's digits (8x8, 10 classes). Task B: the same digits seen transposed (rows become
columns: a different input geometry) with the labels shifted by 3 (``(y + 3) % 10``), and a fresh head. The model,
an MLP 64-256-256-10, is trained on A (dense, 20 epochs, Adam 2e-3), then fine-tuned on B for 15 epochs (Adam
1e-3) with each pruning callback on the two hidden layers' weights (81,920; the head is excluded, as the paper
keeps the classifier dense), a cubic schedule from epoch 0 to epoch 10, at 90 % and 97 % sparsity, and without
pruning for reference. Every fine-tuning of a seed starts from the same pretrained weights; the data split and
order are the same for all. Reported: task-B validation accuracy (359 digits) at the end, per seed, and the mean.

    python benchmarks/movement_finetune.py [--seeds 0 1 2] [--amounts 0.9 0.97]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import MagnitudePruning, MovementPruning

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def tasks() -> dict[str, tuple[TensorDataset, TensorDataset]]:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    val, train = order[: len(x) // 5], order[len(x) // 5 :]
    x_b = x.reshape(-1, 8, 8).transpose(1, 2).reshape(-1, 64)
    y_b = (y + 3) % 10
    return {
        "A": (TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])),
        "B": (TensorDataset(x_b[train], y_b[train]), TensorDataset(x_b[val], y_b[val])),
    }


class MLP(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def fit(model: MLP, train: TensorDataset, epochs: int, callbacks: list, seed: int) -> None:
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer.fit(model, loader)


def methods(amount: float) -> dict[str, object]:
    common = dict(amount=amount, schedule="cubic", start=0, end=10, exclude=["net.4.*"])
    return {
        f"MagnitudePruning {amount:.0%}": lambda: [MagnitudePruning(**common)],
        f"MovementPruning {amount:.0%}": lambda: [MovementPruning(**common)],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--amounts", type=float, nargs="+", default=[0.9, 0.97])
    args = parser.parse_args()
    data = tasks()
    results: dict[str, list[float]] = {}
    began = time.perf_counter()
    for seed in args.seeds:
        pl.seed_everything(seed, verbose=False)
        pretrained = MLP(lr=2e-3)
        fit(pretrained, data["A"][0], 20, [], seed)
        results.setdefault("pretrained on A, accuracy on A", []).append(accuracy(pretrained, data["A"][1]))
        runs = {"dense fine-tuning": lambda: []}
        for amount in args.amounts:
            runs.update(methods(amount))
        for name, make in runs.items():
            model = copy.deepcopy(pretrained)
            model.lr = 1e-3
            torch.manual_seed(seed)
            model.net[4].reset_parameters()  # a fresh head for task B
            fit(model, data["B"][0], 15, make(), seed)
            results.setdefault(name, []).append(accuracy(model, data["B"][1]))
        print(f"seed {seed} done ({time.perf_counter() - began:.0f} s)", flush=True)
    print(f"task-B validation accuracy after fine-tuning, seeds {args.seeds}:")
    for name, values in results.items():
        per_seed = ", ".join(f"{v:.3f}" for v in values)
        print(f"  {name:34s} mean {statistics.mean(values):.3f}   ({per_seed})")


if __name__ == "__main__":
    main()
