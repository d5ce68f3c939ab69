"""The lifecycle of attribution explainers: nothing to co-train, everything computed at report time.

Linearization and Insens explain the network as it is at each validation epoch end. They keep two fixed sets of
validation examples, filled during the first validation pass and stored in the checkpoint: the probe set (drawn as
images, on global rank zero) and a larger metric set (scalars, on every rank, averaged across ranks by a torchmetrics
metric). A subclass implements :meth:`AttributionCallback.evaluate` (per-example scalars) and
:meth:`AttributionCallback.draw` (images).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_xai._core.batch import BatchFn
from lightning_xai._core.callback import ExplainerCallback
from lightning_xai._core.distributed import all_reduce_
from lightning_xai._core.logging import log_scalars
from lightning_xai._core.probe import ProbeSet
from lightning_xai.metrics import MeanOfNamed


class AttributionCallback(ExplainerCallback):
    """Base class of report-time attribution explainers.

    Args:
        input_fn: callable ``batch -> input``.
        target_fn: callable ``batch -> target`` (optional; attributions explain the predicted class).
        probe_size: validation examples drawn as images (fixed across epochs).
        metric_size: validation examples per rank on which the scalars are computed (fixed across epochs).
        every_n_epochs: report every this many validation epochs.
        name: tag prefix (default: the method's name).
        seed: seed of the private random stream (random baselines).
    """

    def __init__(
        self,
        *,
        input_fn: BatchFn | None = None,
        target_fn: BatchFn | None = None,
        probe_size: int = 8,
        metric_size: int = 64,
        every_n_epochs: int = 1,
        name: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            input_fn=input_fn, target_fn=target_fn, probe_size=probe_size, every_n_epochs=every_n_epochs,
            name=name, seed=seed,
        )
        self.examples = ProbeSet(metric_size)

    # ------------------------------------------------------------------ subclass hooks
    def evaluate(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Per-example scalars ``{name: (B,) tensor}`` (averaged) and scalars to maximise over ranks."""
        raise NotImplementedError

    def draw(self, trainer: pl.Trainer, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Log images for the probe examples ``x`` (global rank zero only)."""

    # ------------------------------------------------------------------ lifecycle
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if dataloader_idx == 0 and not self.examples.full:
            self.examples.offer(self.batches.input(batch), self.batches.target(batch))

    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.examples.inputs is None:
            return
        device = pl_module.device
        x = self.examples.inputs.to(device)
        y = None if self.examples.targets is None else self.examples.targets.to(device)
        means, maxima = self.evaluate(x, y)
        average = MeanOfNamed(sorted(means)).to(device)
        average.update({k: v.float().mean() for k, v in means.items()}, weight=x.shape[0])
        values = average.compute()  # a collective under DDP: every rank gets here
        for key in sorted(maxima):
            values[key] = all_reduce_(torch.tensor(float(maxima[key]), device=device), "max")
        log_scalars(pl_module, {self.tag(k): v for k, v in values.items()})
        if trainer.is_global_zero and self.probe.inputs is not None:
            probe_y = None if self.probe.targets is None else self.probe.targets.to(device)
            self.draw(trainer, self.probe.inputs.to(device), probe_y)

    def explainer_state(self) -> dict[str, Any]:
        return {"examples": self.examples.state_dict()}

    def load_explainer_state(self, state: dict[str, Any]) -> None:
        self.examples.load_state_dict(state["examples"])
