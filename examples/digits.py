"""scikit-learn's 8x8 digits (shipped inside scikit-learn, nothing is downloaded) and two small models.

Shared by the examples, the LightningCLI example and the tests.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsDataModule(pl.LightningDataModule):
    """1797 8x8 images of digits, pixels scaled to [0, 1]; a fixed 80/20 train/validation split."""

    def __init__(self, batch_size: int = 64, shuffle: bool = True, split_seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.split_seed = split_seed

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32) / 16.0
        y = torch.tensor(labels, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = len(x) // 5
        val, train = order[:n_val], order[n_val:]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class _Classifier(pl.LightningModule):
    """Cross-entropy training, validation accuracy logged as ``val_acc``."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class DigitsMLP(_Classifier):
    """An MLP over the 64 pixels: 64 -> hidden -> hidden -> 10."""

    def __init__(self, hidden: int = 256, lr: float = 0.05) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class DigitsLSTM(_Classifier):
    """An LSTM that reads each digit as 8 rows of 8 pixels, then a linear head on the last hidden state."""

    def __init__(self, hidden: int = 64, lr: float = 0.01) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        self.lstm = nn.LSTM(input_size=8, hidden_size=hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], 8, 8)
        output, _ = self.lstm(rows)
        return self.head(output[:, -1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class DigitsCNN(_Classifier):
    """A ResNet-style CNN over the 8x8 image: a stem, two residual blocks with BatchNorm, a linear head.

    ``example_input_array`` (a batch of 64) lets ``MagnitudePruning(structure="groups")`` trace which channels are
    coupled, and is what ``DynamicQuantization`` times and traces.
    """

    def __init__(self, channels: int = 32, lr: float = 0.05) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(_Residual(channels), _Residual(channels))
        self.head = nn.Linear(channels, 10)
        self.example_input_array = torch.rand(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x.reshape(-1, 1, 8, 8))).mean(dim=(2, 3)))
