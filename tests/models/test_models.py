"""Tests for the example classifiers: layer layout, shapes, hyperparameters and a short training run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from lightning_xai.data import BreastCancerDataModule, DigitsDataModule
from lightning_xai.models import MLP, ClassifierModule, SmallCNN


@pytest.fixture(autouse=True)
def _one_thread():
    """Run single-threaded: these tiny models gain nothing from threads, and thread contention on a busy CI host can
    make a 1 s fit take 30 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_cnn_forward_shapes(shape) -> None:
    model = SmallCNN(input_shape=shape, num_classes=7)
    assert model(torch.rand(5, *shape)).shape == (5, 7)


@pytest.mark.parametrize("shape", [(30,), (1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_mlp_forward_shapes(shape) -> None:
    model = MLP(input_shape=shape, num_classes=3, dropout=0.2)
    assert model(torch.rand(4, *shape)).shape == (4, 3)


def test_cnn_layer_names() -> None:
    modules = dict(SmallCNN().named_modules())
    expected = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d] * 2
    assert [type(modules[f"features.{i}"]) for i in range(8)] == expected
    assert [type(modules[f"head.{i}"]) for i in range(4)] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    assert modules["head.3"].out_features == 10
    three = dict(SmallCNN(input_shape=(3, 32, 32), channels=(8, 8, 8)).named_modules())
    assert isinstance(three["features.11"], nn.MaxPool2d) and three["head.1"].in_features == 8 * 4 * 4


def test_mlp_layer_names() -> None:
    modules = dict(MLP().named_modules())
    assert isinstance(modules["net.0"], nn.Flatten)
    assert [type(modules[f"net.{i}"]) for i in range(1, 6)] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert "net.6" not in modules
    assert isinstance(dict(MLP(dropout=0.5).named_modules())["net.3"], nn.Dropout)


def test_hparams_are_plain_python() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    shape = omegaconf.OmegaConf.create({"s": [1, 8, 8]}).s
    model = SmallCNN(input_shape=shape, channels=omegaconf.OmegaConf.create([4, 8]))
    assert model.hparams.input_shape == (1, 8, 8) and type(model.hparams.input_shape) is tuple
    assert model.hparams.channels == (4, 8) and model.input_shape == (1, 8, 8)
    mlp = MLP(input_shape=shape, hidden=[16])
    assert mlp.hparams.hidden == (16,) and mlp.hparams.input_shape == (1, 8, 8)


def test_bad_model_args() -> None:
    with pytest.raises(ValueError, match="too small"):
        SmallCNN(input_shape=(1, 2, 2), channels=(4, 4))
    with pytest.raises(ValueError, match="input_shape"):
        SmallCNN(input_shape=(8, 8))
    with pytest.raises(ValueError, match="1.5"):
        MLP(dropout=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        MLP(num_classes=1)


def test_optimizer_and_predict_step() -> None:
    model = MLP(lr=0.01, weight_decay=0.001)
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam)
    assert opt.defaults["lr"] == 0.01 and opt.defaults["weight_decay"] == 0.001
    x = torch.rand(3, 30)
    assert model.predict_step((x, torch.zeros(3, dtype=torch.long)), 0).shape == (3, 2)
    assert isinstance(model, ClassifierModule)


def _trainer(epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_cnn_learns_digits() -> None:
    L.seed_everything(0)
    dm = DigitsDataModule()
    model = SmallCNN(input_shape=dm.input_shape, num_classes=dm.num_classes)
    trainer = _trainer(3)
    trainer.fit(model, datamodule=dm)
    assert float(trainer.callback_metrics["val/acc"]) > 0.85
    assert {"train/loss", "train/acc", "val/loss"} <= set(trainer.callback_metrics)
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert set(result) == {"test/loss", "test/acc"} and result["test/acc"] > 0.8


def test_mlp_learns_breast_cancer() -> None:
    L.seed_everything(0)
    dm = BreastCancerDataModule()
    model = MLP(input_shape=dm.input_shape, num_classes=dm.num_classes)
    trainer = _trainer(5)
    trainer.fit(model, datamodule=dm)
    assert float(trainer.callback_metrics["val/acc"]) > 0.9
