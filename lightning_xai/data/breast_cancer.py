"""Data module for scikit-learn's embedded Wisconsin breast-cancer table.

A small tabular binary task (569 samples, 30 named features) that ships with scikit-learn; useful for showing
feature attributions on named inputs without downloading anything.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer

from lightning_xai.data._tensor import TensorDataModule

__all__ = ["BreastCancerDataModule"]


class BreastCancerDataModule(TensorDataModule):
    """The 569 × 30 table of :func:`sklearn.datasets.load_breast_cancer`, two classes (0 malignant, 1 benign).

    Features are standardised with the mean and standard deviation of the **training split only**, so that no
    statistic leaks from validation or test data; both are kept as :attr:`mean` and :attr:`std` (shape ``(30,)``,
    ``None`` until :meth:`setup`) to map attributions or inputs back to the original units. Batches are ``(x, y)``
    tuples of float32 features of shape ``(30,)`` and int64 labels.

    Args:
        batch_size: Number of samples per batch in every dataloader.
        val_fraction: Fraction of the rows used for validation, in (0, 1).
        test_fraction: Fraction of the rows used for testing, in (0, 1).
        seed: Random state of the split.
        num_workers: Worker processes per dataloader.

    Attributes:
        feature_names: The 30 feature names from scikit-learn, in column order; set on construction.
        mean: Per-feature training mean, set by :meth:`setup`.
        std: Per-feature training standard deviation, set by :meth:`setup`.
    """

    input_shape: ClassVar[tuple[int, ...]] = (30,)
    num_classes: ClassVar[int] = 2

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            num_workers=num_workers,
        )
        self.feature_names: list[str] = [str(name) for name in load_breast_cancer().feature_names]
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the raw ``(569, 30)`` feature table and its binary labels."""
        bunch = load_breast_cancer()
        return bunch.data.astype(np.float32), bunch.target.astype(np.int64)

    def preprocess(
        self, x_train: torch.Tensor, x_val: torch.Tensor, x_test: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Standardise all splits with the training split's per-feature mean and (population) std."""
        self.mean = x_train.mean(dim=0)
        self.std = x_train.std(dim=0, correction=0).clamp_min(1e-8)
        return tuple((x - self.mean) / self.std for x in (x_train, x_val, x_test))  # type: ignore[return-value]
