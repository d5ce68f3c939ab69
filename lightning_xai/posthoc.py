"""Explaining an already trained model: the same callbacks, with the model frozen.

:func:`fit_explainers` wraps the model in :class:`FrozenModel`, a LightningModule that only runs forward passes in eval
mode and has no optimizer, and runs ``trainer.fit`` for ``epochs`` passes over the datamodule's training data. Each
callback co-trains exactly as during training, but against a fixed network: this is the setting of the papers
(ClaDec decodes a converged classifier; GPEX fits a surrogate to a trained network), so its figures are the ones to
compare with published numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_xai._core.batch import BatchFn, BatchUnpacker
from lightning_xai._core.modules import eval_mode


class FrozenModel(pl.LightningModule):
    """A LightningModule around a trained model that never changes it.

    Forward passes run in eval mode without gradients; there is no optimizer and ``training_step`` returns ``None``,
    so Lightning performs no update. Callbacks find the network through the ``explained_model`` attribute, so layer
    names are those of the wrapped model.

    Args:
        model: the trained network (any ``nn.Module``, LightningModules included).
        input_fn: callable ``batch -> input``; default handles ``(x, y, ...)`` and dict batches.
    """

    def __init__(self, model: nn.Module, input_fn: BatchFn | None = None) -> None:
        super().__init__()
        self.explained_model = model
        self._batches = BatchUnpacker(input_fn)
        self.explained_model.eval()

    def train(self, mode: bool = True) -> FrozenModel:
        super().train(mode)
        self.explained_model.eval()  # Lightning calls train() at every epoch start: keep BatchNorm/dropout frozen
        return self

    def forward(self, x: torch.Tensor) -> Any:
        return self.explained_model(x)

    def _forward_batch(self, batch: Any) -> None:
        with torch.no_grad():
            self(self._batches.input(batch))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self._forward_batch(batch)  # the forward pass is what activation taps listen to

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._forward_batch(batch)

    def configure_optimizers(self) -> None:
        return None


def fit_explainers(
    model: nn.Module,
    datamodule: pl.LightningDataModule,
    callbacks: Sequence[Callback],
    epochs: int = 10,
    input_fn: BatchFn | None = None,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """Fit explainer callbacks to an already trained, frozen ``model`` for ``epochs`` passes over the training data.

    Args:
        model: the trained network; its parameters, buffers and modes are left as they are.
        datamodule: supplies training (fitting) and validation (reports) data.
        callbacks: explainer callbacks, e.g. ``[ClaDec(layer="features.7")]``.
        epochs: passes over the training data.
        input_fn: how to get the model input from a batch (default: ``(x, y, ...)`` tuples and common dict keys).
        **trainer_kwargs: forwarded to ``lightning.Trainer`` (``logger``, ``accelerator``, ``devices``, ...).

    Returns:
        the Trainer after fitting (``trainer.callback_metrics`` holds the last reports).

    Example::

        trainer = fit_explainers(trained_cnn, DigitsDataModule(), [ClaDec(layer="features.7")], epochs=20)
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be a positive integer")
    trainer_kwargs.setdefault("enable_checkpointing", False)
    trainer_kwargs.setdefault("enable_model_summary", False)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=list(callbacks), **trainer_kwargs)
    with eval_mode(model), warnings.catch_warnings():  # eval_mode restores every submodule's own mode afterwards
        # both intended here: no optimizer, and the explained model stays in eval mode
        warnings.filterwarnings("ignore", message=".*configure_optimizers.* returned `None`")
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training")
        trainer.fit(FrozenModel(model, input_fn), datamodule=datamodule)
    return trainer
