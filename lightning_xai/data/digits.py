"""Data module for scikit-learn's embedded 8×8 handwritten digits.

The digits dataset ships with scikit-learn, so examples and tests can train a small CNN in seconds without downloading
anything.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from sklearn.datasets import load_digits

from lightning_xai.data._tensor import TensorDataModule

__all__ = ["DigitsDataModule"]


class DigitsDataModule(TensorDataModule):
    """The 1797 8×8 grey-scale digit images of :func:`sklearn.datasets.load_digits`, ten classes.

    Images are float32 tensors of shape ``(1, 8, 8)`` scaled to [0, 1] (the raw values run from 0 to 16); labels are
    int64. Batches are ``(x, y)`` tuples. The split is stratified and deterministic for a given ``seed``.

    Args:
        batch_size: Number of samples per batch in every dataloader.
        val_fraction: Fraction of the images used for validation, in (0, 1).
        test_fraction: Fraction of the images used for testing, in (0, 1).
        seed: Random state of the split.
        num_workers: Worker processes per dataloader.

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), dm.num_classes
        ((32, 1, 8, 8), 10)
    """

    input_shape: ClassVar[tuple[int, ...]] = (1, 8, 8)
    num_classes: ClassVar[int] = 10

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Return images of shape ``(1797, 1, 8, 8)`` in [0, 1] and their digit labels."""
        bunch = load_digits()
        x = (bunch.images.astype(np.float32) / 16.0).reshape(-1, *self.input_shape)
        return x, bunch.target.astype(np.int64)
