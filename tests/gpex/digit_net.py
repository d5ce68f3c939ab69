"""A digits classifier the library never saw, shared by the GPEX tests."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn


class DigitNet(L.LightningModule):
    """A digits CNN unlike the library's SmallCNN: two conv-BN-ReLU-pool blocks, then a two-layer classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(12, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("val/acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)
