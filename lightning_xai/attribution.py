"""The lifecycle of attribution explainers: nothing to co-train, everything computed at report time.

Linearization and Insens explain the network as it is at each validation epoch end. They keep two fixed sets of
validation examples, filled during the first validation pass and stored in the checkpoint: the probe set (drawn as
images, on global rank zero) and a larger metric set (scalars, on every rank, averaged across ranks by a torchmetrics
metric). A subclass implements :meth:`AttributionCallback.evaluate` (per-example scalars) and
:meth:`AttributionCallback.draw` (images).

Both sets hold finite examples only: a validation row with NaN/Inf is left out and counted, and the count over all
ranks is logged as ``<prefix>/skipped`` with every report. Rows a ``DistributedSampler`` repeats to even out the
ranks are left out too, so the scalars of N processes are the scalars of one process over the same examples (as
long as ``metric_size`` covers each rank's share). A rank whose metric set is empty still takes part in the
collectives, with weight zero.
"""

from __future__ import annotations

import re

import lightning.pytorch as pl
import torch

from lightning_xai._core.batch import BatchFn
from lightning_xai._core.callback import ExplainerCallback
from lightning_xai._core.distributed import all_reduce_
from lightning_xai._core.logging import figure_to_image, log_image, log_scalars
from lightning_xai.metrics import MeanOfNamed
from lightning_xai.metrics.functional import deletion_auc, insertion_auc
from lightning_xai.viz import attribution_rows, feature_bars


class AttributionCallback(ExplainerCallback):
    """Base class of report-time attribution explainers.

    Args:
        steps: steps of the deletion and insertion curves.
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
        steps: int = 20,
        input_fn: BatchFn | None = None,
        target_fn: BatchFn | None = None,
        probe_size: int = 8,
        metric_size: int = 64,
        every_n_epochs: int = 1,
        name: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            input_fn=input_fn, target_fn=target_fn, probe_size=probe_size, metric_size=metric_size,
            every_n_epochs=every_n_epochs, name=name, seed=seed,
        )
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r} must be a positive integer")
        self.steps = steps

    # ------------------------------------------------------------------ subclass hooks
    def evaluate(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Per-example scalars ``{name: (B,) tensor}`` (averaged) and scalars to maximise over ranks."""
        raise NotImplementedError

    def draw(self, trainer: pl.Trainer, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Log images for the probe examples ``x`` (global rank zero only)."""

    def chart_layout(self) -> dict[str, list[str]]:
        """Each curve of the deletion (lower is better) and insertion (higher is better) AUCs in one chart."""
        prefix = re.escape(self.prefix)
        return {"deletion AUC by ordering (lower: more faithful)": [rf"{prefix}/deletion_auc_.*"],
                "insertion AUC by ordering (higher: more faithful)": [rf"{prefix}/insertion_auc_.*"]}

    # ------------------------------------------------------------------ shared pieces
    def _explained(self, model: torch.nn.Module | None) -> torch.nn.Module:
        """``model``, or the model the callback was set up with."""
        model = model if model is not None else self.model
        if model is None:
            raise RuntimeError(f"{type(self).__name__}.explain needs a model: pass model=<the network> (the callback "
                               "has not been set up by trainer.fit)")
        return model

    def orderings(
        self, x: torch.Tensor, target: torch.Tensor, attributions: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Deletion and insertion AUC (probability of ``target``, baseline 0) of each attribution and of a random
        ordering drawn from the private stream: ``{deletion_auc_<name>, insertion_auc_<name>}`` per example."""
        assert self.model is not None
        with self.rng.active(x.device):
            attributions = {**attributions, "random": torch.rand_like(x)}
        scores = {}
        for name, attribution in attributions.items():
            scores[f"deletion_auc_{name}"] = deletion_auc(self.model, x, attribution, target, steps=self.steps)
            scores[f"insertion_auc_{name}"] = insertion_auc(self.model, x, attribution, target, steps=self.steps)
        return scores

    def draw_maps(self, trainer: pl.Trainer, x: torch.Tensor, maps: dict[str, torch.Tensor], titles: list[str]) -> None:
        """One image ``<prefix>/probes``: image inputs as rows (input, then each signed map), tabular inputs as bar
        charts per feature (at most four examples)."""
        if x.dim() == 4:
            log_image(trainer, self.tag("probes"), attribution_rows(x.cpu(), [m.cpu() for m in maps.values()]))
            return
        rows = [{name: m[i].flatten().cpu() for name, m in maps.items()} for i in range(min(4, len(x)))]
        names = getattr(trainer.datamodule, "feature_names", None) if trainer.datamodule is not None else None
        log_image(trainer, self.tag("probes"), figure_to_image(feature_bars(rows, names, titles[: len(rows)])))

    def _metric_batch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
        """The metric set on ``device`` and its weight (its size); an empty set gives one all-zero placeholder row
        of the shape seen in validation, with weight 0 (so this rank joins the collectives); None if never seen."""
        if self.examples.inputs is not None and len(self.examples):
            y = None if self.examples.targets is None else self.examples.targets.to(device)
            return self.examples.inputs.to(device), y, len(self.examples)
        if self.examples.template is None:
            return None
        shape, dtype = self.examples.template
        return torch.zeros((1, *shape), dtype=dtype, device=device), None, 0

    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        counts = torch.tensor([float(len(self.examples)), float(self.examples.skipped)], device=device)
        n, skipped = all_reduce_(counts, "sum").tolist()  # a collective: every rank reports
        batch = self._metric_batch(device) if n else None
        if batch is None:
            if skipped:
                log_scalars(pl_module, {self.tag("skipped"): skipped})
            return
        x, y, weight = batch
        means, maxima = self.evaluate(x, y)
        average = MeanOfNamed(sorted(means)).to(device)
        rows = {k: v.float().mean() if weight else torch.zeros((), device=device) for k, v in means.items()}
        average.update(rows, weight=weight)
        values = average.compute()  # a collective under DDP: every rank gets here
        for key in sorted(maxima):
            local = float(maxima[key]) if weight else float("-inf")
            values[key] = all_reduce_(torch.tensor(local, device=device), "max")
        values["skipped"] = torch.tensor(skipped)
        log_scalars(pl_module, {self.tag(k): v for k, v in values.items()})
        if trainer.is_global_zero and self.probe.inputs is not None:
            probe_y = None if self.probe.targets is None else self.probe.targets.to(device)
            self.draw(trainer, self.probe.inputs.to(device), probe_y)

