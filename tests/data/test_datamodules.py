"""Tests for the embedded and torchvision data modules."""

from __future__ import annotations

import sys
import types
from collections import Counter

import pytest
import torch
from torch.utils.data import Dataset

from lightning_xai.data import BreastCancerDataModule, DigitsDataModule, TorchvisionDataModule

EMBEDDED = [(DigitsDataModule, 1797, (1, 8, 8), 10), (BreastCancerDataModule, 569, (30,), 2)]


def _all_labels(dataset) -> torch.Tensor:
    return dataset.tensors[1]


@pytest.mark.parametrize(("cls", "size", "shape", "classes"), EMBEDDED)
def test_shapes_dtypes_and_sizes(cls, size, shape, classes) -> None:
    dm = cls(batch_size=16)
    assert dm.input_shape == shape and dm.num_classes == classes  # known before setup
    dm.setup("fit")
    sizes = [len(d) for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)]
    assert sum(sizes) == size
    assert sizes[1] == pytest.approx(0.15 * size, abs=2) and sizes[2] == pytest.approx(0.15 * size, abs=2)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (16, *shape) and x.dtype == torch.float32
        assert y.shape == (16,) and y.dtype == torch.int64
        assert 0 <= int(y.min()) and int(y.max()) < classes


def test_digits_pixels_in_unit_range() -> None:
    dm = DigitsDataModule()
    dm.setup()
    x = torch.cat([d.tensors[0] for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_setup_is_idempotent_and_loaders_order() -> None:
    dm = DigitsDataModule()
    dm.setup("fit")
    train = dm.train_dataset
    dm.setup("test")
    assert dm.train_dataset is train
    assert torch.equal(next(iter(dm.val_dataloader()))[1], next(iter(dm.val_dataloader()))[1])
    assert not torch.equal(next(iter(dm.train_dataloader()))[1], next(iter(dm.train_dataloader()))[1])


@pytest.mark.parametrize("cls", [DigitsDataModule, BreastCancerDataModule])
def test_split_is_deterministic_per_seed(cls) -> None:
    a, b, c = cls(seed=0), cls(seed=0), cls(seed=1)
    for dm in (a, b, c):
        dm.setup()
    for name in ("train_dataset", "val_dataset", "test_dataset"):
        xa, xb, xc = (getattr(dm, name).tensors[0] for dm in (a, b, c))
        assert torch.equal(xa, xb)
        assert xa.shape == xc.shape and not torch.equal(xa, xc)


@pytest.mark.parametrize("cls", [DigitsDataModule, BreastCancerDataModule])
def test_split_is_stratified(cls) -> None:
    dm = cls(val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    total = Counter()
    parts = [Counter(_all_labels(d).tolist()) for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)]
    for part in parts:
        total.update(part)
    n = sum(total.values())
    for part in parts:
        m = sum(part.values())
        for label, count in total.items():
            assert part[label] / m == pytest.approx(count / n, abs=0.02)


def test_breast_cancer_standardised_with_train_stats() -> None:
    dm = BreastCancerDataModule()
    assert len(dm.feature_names) == 30 and dm.feature_names[0] == "mean radius"
    dm.setup()
    assert dm.mean.shape == (30,) and dm.std.shape == (30,)
    x_train = dm.train_dataset.tensors[0]
    assert torch.allclose(x_train.mean(0), torch.zeros(30), atol=1e-4)
    assert torch.allclose(x_train.std(0, correction=0), torch.ones(30), atol=1e-4)
    # other splits use the same (train) statistics, so they are not exactly standardised themselves
    x_val = dm.val_dataset.tensors[0]
    assert not torch.allclose(x_val.mean(0), torch.zeros(30), atol=1e-4)
    assert float(dm.mean[0]) > 10  # raw units: mean radius is ~14


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"batch_size": 0}, "0"),
        ({"num_workers": -1}, "-1"),
        ({"val_fraction": 1.5}, "1.5"),
        ({"test_fraction": 0.0}, "0.0"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "0.6"),
        ({"seed": "x"}, "'x'"),
    ],
)
@pytest.mark.parametrize("cls", [DigitsDataModule, BreastCancerDataModule])
def test_bad_args_raise(cls, kwargs, shown) -> None:
    with pytest.raises(ValueError, match=shown):
        cls(**kwargs)


def test_loader_before_setup_raises() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


# --- torchvision (not installed here: only the error paths and the split logic, against a fake) ---------------------


def test_vision_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match="svhn.*cifar10.*fashion_mnist.*mnist"):
        TorchvisionDataModule(name="svhn")


@pytest.mark.parametrize(
    ("name", "shape"), [("mnist", (1, 28, 28)), ("fashion_mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))]
)
def test_vision_shape_table(name, shape) -> None:
    dm = TorchvisionDataModule(name=name)
    assert dm.input_shape == shape and dm.num_classes == 10


def test_vision_bad_args() -> None:
    with pytest.raises(ValueError, match="0.0"):
        TorchvisionDataModule(val_fraction=0.0)
    with pytest.raises(ValueError, match="-3"):
        TorchvisionDataModule(batch_size=-3)


def test_vision_missing_torchvision(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` raise ImportError
    dm = TorchvisionDataModule()
    with pytest.raises(ImportError, match=r"pip install 'lightning-xai\[vision\]'"):
        dm.setup()


class _FakeMNIST(Dataset):
    """Stands in for torchvision.datasets.MNIST: 50 train / 20 test images, or 'missing' files."""

    present = True

    def __init__(self, root, train, download, transform) -> None:
        if not (self.present or download):
            raise RuntimeError("Dataset not found. You can use download=True to download it")
        self.n = 50 if train else 20

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((1, 28, 28), i / self.n), i % 10


@pytest.fixture
def fake_torchvision(monkeypatch):
    tv = types.ModuleType("torchvision")
    tv.datasets = types.SimpleNamespace(MNIST=_FakeMNIST)
    tv.transforms = types.SimpleNamespace(ToTensor=lambda: None)
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setattr(_FakeMNIST, "present", True)
    return _FakeMNIST


def test_vision_missing_files_without_download(fake_torchvision, tmp_path) -> None:
    fake_torchvision.present = False
    dm = TorchvisionDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*download=True"):
        dm.setup()


def test_vision_split_with_fake_dataset(fake_torchvision) -> None:
    dm, again, other = (TorchvisionDataModule(batch_size=8, val_fraction=0.2, seed=s) for s in (0, 0, 1))
    for d in (dm, again, other):
        d.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (40, 10, 20)
    assert dm.val_dataset.indices == again.val_dataset.indices != other.val_dataset.indices
    assert not set(dm.val_dataset.indices) & set(dm.train_dataset.indices)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 1, 28, 28) and y.shape == (8,)
