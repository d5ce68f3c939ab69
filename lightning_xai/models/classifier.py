"""Base LightningModule for the example classifiers.

Holds the training, validation and test logic shared by every example network (cross-entropy loss, accuracy, Adam),
so that each concrete model only defines its layers and ``forward``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["ClassifierModule"]


def as_shape(values: Any, name: str = "input_shape") -> tuple[int, ...]:
    """Return ``values`` (a tuple, list or omegaconf ``ListConfig``) as a tuple of positive ints."""
    try:
        shape = tuple(int(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a sequence of integers, got {values!r}") from err
    if any(v < 1 for v in shape):
        raise ValueError(f"{name} must contain only positive integers, got {values!r}")
    return shape


class ClassifierModule(L.LightningModule):
    """Multiclass classifier trained with cross-entropy on ``(x, y)`` batches.

    Subclasses build their layers, implement ``forward(x) -> logits`` and call ``self.save_hyperparameters()``.
    Logged metrics (accuracy is micro-averaged, i.e. the fraction of correct predictions):

    * ``train/loss`` (per step and epoch, progress bar) and ``train/acc`` (per epoch);
    * ``val/loss`` and ``val/acc`` (per epoch, progress bar);
    * ``test/loss`` and ``test/acc`` (per epoch).

    Args:
        num_classes: Number of target classes (at least 2).
        lr: Adam learning rate.
        weight_decay: Adam weight decay (L2 penalty).
    """

    def __init__(self, num_classes: int, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        num_classes = int(num_classes)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes!r}")
        if not float(lr) > 0.0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not float(weight_decay) >= 0.0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")
        self.num_classes = num_classes
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape ``(batch, num_classes)``; implemented by subclasses."""
        raise NotImplementedError

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy loss of one training batch; logs ``train/loss`` and ``train/acc``."""
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Log ``val/loss`` and ``val/acc`` for one validation batch."""
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Log ``test/loss`` and ``test/acc`` for one test batch."""
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.log("test/acc", self.test_acc, on_epoch=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Return logits for a batch given as ``x`` or ``(x, y)``."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over all parameters with the module's ``lr`` and ``weight_decay``."""
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
