"""Data module for standard torchvision image datasets (MNIST, Fashion-MNIST, CIFAR-10).

For users who have (or may download) the real datasets. torchvision is an optional dependency
(``pip install 'lightning-xai[vision]'``) and is imported only when the data are set up, so the rest of the package
works without it. Nothing is downloaded unless ``download=True`` is passed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from lightning_xai.data._tensor import SplitDataModule, check_fraction, check_loader_args

__all__ = ["TorchvisionDataModule"]

#: name -> (torchvision.datasets class name, input shape, number of classes)
_DATASETS: dict[str, tuple[str, tuple[int, ...], int]] = {
    "mnist": ("MNIST", (1, 28, 28), 10),
    "fashion_mnist": ("FashionMNIST", (1, 28, 28), 10),
    "cifar10": ("CIFAR10", (3, 32, 32), 10),
}


def _import_torchvision() -> Any:
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(
            "TorchvisionDataModule needs torchvision, which is not installed; "
            "install it with: pip install 'lightning-xai[vision]'"
        ) from err
    return torchvision


class TorchvisionDataModule(SplitDataModule):
    """One of MNIST, Fashion-MNIST or CIFAR-10 as float image tensors in [0, 1].

    The validation set is a random ``val_fraction`` of the official training set, chosen deterministically from
    ``seed``; the test set is the official test set (also served by :meth:`predict_dataloader`). Batches are
    ``(x, y)`` tuples. :attr:`input_shape` and :attr:`num_classes` are known right after construction.

    Args:
        name: One of ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``.
        root: Directory holding (or to receive) the torchvision dataset files.
        batch_size: Number of samples per batch in every dataloader.
        val_fraction: Fraction of the official training set held out for validation, in (0, 1).
        seed: Random state of the train/validation split.
        num_workers: Worker processes per dataloader.
        download: Whether torchvision may download missing files into ``root``.

    Raises:
        ValueError: If ``name`` is unknown or another argument is out of range.
    """

    def __init__(
        self,
        name: str = "mnist",
        root: str = "data",
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        download: bool = False,
    ) -> None:
        super().__init__()
        if name not in _DATASETS:
            raise ValueError(f"unknown dataset name {name!r}; valid choices are {sorted(_DATASETS)}")
        check_loader_args(batch_size, num_workers)
        val_fraction = check_fraction("val_fraction", val_fraction)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.save_hyperparameters()
        self.name = name
        self.root = str(root)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.download = bool(download)
        _, shape, classes = _DATASETS[name]
        self.input_shape: tuple[int, ...] = shape
        self.num_classes: int = classes
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    def _dataset(self, train: bool, download: bool) -> Dataset:
        torchvision = _import_torchvision()
        cls = getattr(torchvision.datasets, _DATASETS[self.name][0])
        try:
            return cls(self.root, train=train, download=download, transform=torchvision.transforms.ToTensor())
        except RuntimeError as err:
            if download:
                raise
            raise FileNotFoundError(
                f"{self.name} files not found under root={self.root!r}; pass download=True "
                f"(e.g. data.download=true on the command line) to fetch them, or point root at an existing copy. "
                f"torchvision said: {err}"
            ) from err

    def prepare_data(self) -> None:
        """Download the train and test files if ``download=True`` (Lightning runs this on one process only)."""
        if self.download:
            self._dataset(train=True, download=True)
            self._dataset(train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Build :attr:`train_dataset`, :attr:`val_dataset` and :attr:`test_dataset`; calling again does nothing."""
        if self.train_dataset is not None:
            return
        full_train = self._dataset(train=True, download=self.download)
        n_val = max(1, round(len(full_train) * self.val_fraction))
        order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_dataset = Subset(full_train, order[:n_val])
        self.train_dataset = Subset(full_train, order[n_val:])
        self.test_dataset = self._dataset(train=False, download=self.download)
