"""Shared test set-up: one torch thread (2-core CI machines; oversubscription makes CPU tests 30× slower) and
small models and data the explainers have never seen."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits_tensors(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits as (N, 1, 8, 8) floats in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    return (x, y) if n is None else (x[:n], y[:n])


class DictDigits(Dataset):
    """Digits as dict examples ``{"image": x, "label": y}``, as many real datamodules yield them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "label": self.y[i]}


class NestedNet(L.LightningModule):
    """A classifier with nested, non-Sequential layer names (``backbone.block1.conv``...) and dict batches."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.block1 = nn.Sequential()
        self.backbone.block1.add_module("conv", nn.Conv2d(1, 8, 3, padding=1))
        self.backbone.block1.add_module("norm", nn.BatchNorm2d(8))
        self.backbone.block1.add_module("act", nn.LeakyReLU(0.1))
        self.backbone.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.ModuleDict({"hidden": nn.Linear(16 * 4 * 4, 32), "out": nn.Linear(32, 10)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone.block2(self.backbone.block1(x)).flatten(1)
        return self.classifier["out"](torch.relu(self.classifier["hidden"](h)))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch["image"]), batch["label"])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", (self(batch["image"]).argmax(-1) == batch["label"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def loaders(n_train: int = 512, n_val: int = 128, batch_size: int = 64, as_dict: bool = False):
    x, y = digits_tensors(n_train + n_val)
    make = DictDigits if as_dict else TensorDataset
    train = DataLoader(make(x[:n_train], y[:n_train]), batch_size=batch_size, shuffle=True)
    val = DataLoader(make(x[n_train:], y[n_train:]), batch_size=batch_size)
    return train, val


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    """A CPU Trainer without progress bars, summaries or checkpoints unless asked for."""
    defaults = dict(
        accelerator="cpu",
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def read_events(log_dir) -> tuple[dict[str, list[tuple[int, float]]], dict[str, int]]:
    """Scalars (tag -> [(step, value)]) and image counts (tag -> n) from the TensorBoard event files under log_dir."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    images: dict[str, int] = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in acc.Tags()["images"]:
            images[tag] = images.get(tag, 0) + len(acc.Images(tag))
    return scalars, images


def scalars_on_one_and_two_processes(tmp_path, model, callback, loader, prefixes: tuple[str, ...]):
    """Validate ``model`` with a copy of a trained ``callback`` on one process, then on two (ddp_spawn, gloo).

    Each copy starts with an empty metric set, so it draws it from what it validates (on two processes, each rank
    from its half). Returns the logged scalars starting with ``prefixes``, as (one process, two processes).
    """
    import copy

    from lightning_xai._core.probe import ProbeSet

    def validate(root, **kwargs) -> dict[str, float]:
        twin = copy.deepcopy(callback)
        twin.examples = ProbeSet(twin.examples.size)
        trainer = quiet_trainer(root, callbacks=[twin], **kwargs)
        trainer.validate(model, loader, verbose=False)
        return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefixes)}

    return validate(tmp_path / "one"), validate(tmp_path / "two", strategy="ddp_spawn", devices=2)


def assert_same(a, b, path="state"):
    """Nested states equal: tensors bit for bit (dtype and shape included), everything else by ==."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    else:
        assert a == b, path
