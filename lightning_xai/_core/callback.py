"""The lifecycle every explainer callback shares.

An explainer co-trains beside the user's LightningModule without touching it:

* ``setup`` resolves the explained model and validates the configuration (bad layer names fail here);
* ``on_train_batch_end`` hands each training batch to :meth:`ExplainerCallback.train_batch` (cadence
  ``every_n_steps`` is the subclass's business, counted in :attr:`batches_seen`, which is the same on every rank);
* validation batches feed two fixed :class:`~lightning_xai._core.probe.ProbeSet` s (the probe set drawn as images
  and the metric set behind report-time scalars) and :meth:`validation_batch`;
* ``on_validation_epoch_end`` (every ``every_n_epochs``, never during the sanity check) calls :meth:`report` with
  autograd re-enabled, since Lightning validates under ``torch.inference_mode``;
* ``state_dict``/``load_state_dict`` carry the probe set, the private RNG stream and the subclass's state.

Subclasses implement the hooks named above and keep their own modules, metrics and optimisers.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_xai._core.batch import BatchFn, BatchUnpacker
from lightning_xai._core.probe import ProbeSet
from lightning_xai._core.rng import PrivateRNG


def explained_model(pl_module: pl.LightningModule) -> nn.Module:
    """The network to explain: the LightningModule itself, or the model a post-hoc wrapper holds."""
    inner = getattr(pl_module, "explained_model", None)
    return pl_module if inner is None else inner


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


class ExplainerCallback(Callback):
    """Base class for the explainer callbacks.

    Args:
        layer: dotted name of the layer to explain (``None``: the method's default).
        input_fn: callable ``batch -> input tensor``; the default reads ``(x, y, ...)`` tuples and common dict keys.
        target_fn: callable ``batch -> target tensor | None``.
        probe_size: number of validation examples drawn in the image panels (fixed across epochs).
        metric_size: validation examples (per process) kept as a fixed metric set for report-time scalars; 0 for
            explainers that score every validation batch instead.
        every_n_epochs: report (metrics and images) every this many validation epochs.
        every_n_steps: co-training cadence in training batches.
        name: tag prefix for logged scalars and images (default: the method's name, made unique per layer when the
            same method is attached several times).
        seed: seed of the callback's private random stream (initialisation, dropout in its own modules).
    """

    method: ClassVar[str] = "explainer"

    def __init__(
        self,
        *,
        layer: str | None = None,
        input_fn: BatchFn | None = None,
        target_fn: BatchFn | None = None,
        probe_size: int = 8,
        metric_size: int = 0,
        every_n_epochs: int = 1,
        every_n_steps: int = 1,
        name: str | None = None,
        seed: int = 0,
    ) -> None:
        _check_positive(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps)
        self.layer = layer
        self.batches = BatchUnpacker(input_fn, target_fn)
        self.probe = ProbeSet(probe_size)
        self.examples = ProbeSet(metric_size)
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.name = name
        self.rng = PrivateRNG(seed)
        self.prefix = name or self.method
        self.batches_seen = 0
        self.model: nn.Module | None = None

    # ------------------------------------------------------------------ identity
    @property
    def state_key(self) -> str:
        return self._generate_state_key(layer=self.layer, name=self.name)

    def tag(self, metric: str, prefix: str | None = None) -> str:
        """The logged name of ``metric``: ``<prefix>/<metric>``."""
        return f"{prefix or self.prefix}/{metric}"

    def _unique_prefix(self, trainer: pl.Trainer) -> str:
        if self.name:
            return self.name
        twins = [cb for cb in trainer.callbacks if type(cb) is type(self) and not cb.name]
        return self.method if len(twins) <= 1 else f"{self.method}-{self.layer or 'default'}"

    # ------------------------------------------------------------------ subclass hooks
    def configure(self, trainer: pl.Trainer, model: nn.Module) -> None:
        """Validate the configuration against the model (resolve layers, attach taps). Called from ``setup``."""

    def train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Co-train on one training batch (after the user's optimizer step)."""

    def validation_batch(self, trainer: pl.Trainer, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Update validation metrics with one batch (runs under inference mode)."""

    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute and log metrics (a collective: every rank calls it) and draw images (rank zero)."""

    def reset_metrics(self) -> None:
        """Forget this epoch's metric states."""

    def explainer_state(self) -> dict[str, Any]:
        """The subclass's part of the checkpoint."""
        return {}

    def load_explainer_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`explainer_state` returned."""

    def release(self) -> None:
        """Remove hooks from the user's model (called from ``teardown``)."""

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.model = explained_model(pl_module)
        self.prefix = self._unique_prefix(trainer)
        self.configure(trainer, self.model)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.release()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batches_seen += 1
        self.train_batch(trainer, pl_module, batch)

    def _reporting(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx != 0:
            return
        x, y = self.batches.input(batch), self.batches.target(batch)
        self.probe.offer(x, y)
        self.examples.offer(x, y)
        if self._reporting(trainer):
            self.validation_batch(trainer, x, y)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._reporting(trainer):
            with torch.inference_mode(False), torch.enable_grad():
                self.report(trainer, pl_module)
        self.reset_metrics()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "batches_seen": self.batches_seen,
            "probe": self.probe.state_dict(),
            "examples": self.examples.state_dict(),
            "rng": self.rng.state_dict(),
            **self.explainer_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = int(state_dict["batches_seen"])
        self.probe.load_state_dict(state_dict["probe"])
        self.examples.load_state_dict(state_dict["examples"])
        self.rng.load_state_dict(state_dict["rng"])
        self.load_explainer_state(state_dict)
