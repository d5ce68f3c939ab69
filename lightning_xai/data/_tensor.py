"""Shared machinery for the small, embedded (in-memory) datasets.

Every embedded dataset in :mod:`lightning_xai.data` is a pair of NumPy arrays that fits in memory. The
:class:`TensorDataModule` base class holds everything they have in common (argument checks, a deterministic
stratified train/val/test split, dataloaders) so that each concrete data module only says how to load its arrays and,
optionally, how to preprocess the splits.
"""

from __future__ import annotations

from typing import ClassVar

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["SplitDataModule", "TensorDataModule", "check_loader_args", "check_fraction"]


def check_fraction(name: str, value: float) -> float:
    """Return ``value`` as a float if it lies strictly between 0 and 1, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def check_loader_args(batch_size: int, num_workers: int) -> None:
    """Raise ``ValueError`` unless ``batch_size`` is a positive int and ``num_workers`` a non-negative int."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")


class SplitDataModule(L.LightningDataModule):
    """Dataloaders over three prepared splits: :attr:`train_dataset`, :attr:`val_dataset`, :attr:`test_dataset`.

    Subclasses build the splits in ``setup`` and set :attr:`batch_size` and :attr:`num_workers`; only the training
    loader shuffles.
    """

    batch_size: int
    num_workers: int
    train_dataset: Dataset | None = None
    val_dataset: Dataset | None = None
    test_dataset: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches ``(x, y)`` of the training split."""
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Batches ``(x, y)`` of the validation split, in a fixed order."""
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches ``(x, y)`` of the test split, in a fixed order."""
        return self._loader(self.test_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Same batches as :meth:`test_dataloader`."""
        return self.test_dataloader()


class TensorDataModule(SplitDataModule):
    """Base class for data modules over a small dataset held in memory as tensors.

    Subclasses set the class attributes :attr:`input_shape` and :attr:`num_classes` and implement
    :meth:`load_arrays`. They may override :meth:`preprocess` to fit a transformation on the training split only
    (e.g. standardisation) and apply it to all three splits.

    The split is stratified by label and fully determined by ``seed``: the test set is carved off first, then the
    validation set from what remains, both with :func:`sklearn.model_selection.train_test_split`.

    Args:
        batch_size: Number of samples per batch in every dataloader.
        val_fraction: Fraction of the whole dataset used for validation, in (0, 1).
        test_fraction: Fraction of the whole dataset used for testing, in (0, 1).
        seed: Random state of the split; the same seed always gives the same three sets.
        num_workers: Worker processes per dataloader (0 loads in the main process).

    Raises:
        ValueError: If an argument is out of range or the two fractions leave no training data.
    """

    #: Shape of one input sample, without the batch dimension.
    input_shape: ClassVar[tuple[int, ...]] = ()
    #: Number of target classes.
    num_classes: ClassVar[int] = 0

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers)
        val_fraction = check_fraction("val_fraction", val_fraction)
        test_fraction = check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be below 1 to leave training data, "
                f"got {val_fraction!r} + {test_fraction!r} = {val_fraction + test_fraction!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the whole dataset as ``(x, y)`` with ``x`` of shape ``(N, *input_shape)`` and integer labels ``y``."""
        raise NotImplementedError

    def preprocess(
        self, x_train: torch.Tensor, x_val: torch.Tensor, x_test: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Transform the three input splits; fit any statistics on ``x_train`` only. Identity by default."""
        return x_train, x_val, x_test

    def setup(self, stage: str | None = None) -> None:
        """Split the data and build :attr:`train_dataset`, :attr:`val_dataset` and :attr:`test_dataset`.

        All three are built whatever the ``stage``; calling this again does nothing.
        """
        if self.train_dataset is not None:
            return
        x, y = self.load_arrays()
        indices = np.arange(len(y))
        rest, test_idx = train_test_split(indices, test_size=self.test_fraction, stratify=y, random_state=self.seed)
        train_idx, val_idx = train_test_split(
            rest,
            test_size=self.val_fraction / (1.0 - self.test_fraction),
            stratify=y[rest],
            random_state=self.seed,
        )
        x_all = torch.as_tensor(np.asarray(x, dtype=np.float32))
        y_all = torch.as_tensor(np.asarray(y, dtype=np.int64))
        parts = [torch.as_tensor(idx) for idx in (train_idx, val_idx, test_idx)]
        x_train, x_val, x_test = self.preprocess(*(x_all[p] for p in parts))
        self.train_dataset = TensorDataset(x_train, y_all[parts[0]])
        self.val_dataset = TensorDataset(x_val, y_all[parts[1]])
        self.test_dataset = TensorDataset(x_test, y_all[parts[2]])
