"""GPEX's validation metrics and reports: fidelity scalars, the matching loss, skipped rows and the neighbour panel.

:class:`FidelityReporting` (a mixin of :class:`~lightning_xai.gpex.GPEX`) feeds every validation batch's explanation
into a :class:`~lightning_xai.gpex.fidelity.SurrogateFidelity`, and at each report logs ``<prefix>/agreement``,
``pearson``, ``pearson_min``, ``r2``, ``variance`` (fidelity; Pearson and R² left out, with a warning, when the
explained output is constant), ``match_loss`` and ``skipped``, then draws ``<prefix>/neighbours``
(:func:`~lightning_xai.gpex.figure.neighbour_figure`). Every scalar goes through torchmetrics state or an all-reduce,
so all ranks log the same values.
"""

from __future__ import annotations

import re

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_xai._core.distributed import all_reduce_
from lightning_xai._core.logging import figure_to_image, image_loggers, log_image, log_scalars
from lightning_xai.gpex.fidelity import SurrogateFidelity
from lightning_xai.gpex.figure import neighbour_figure
from lightning_xai.gpex.surrogate import GPEXSurrogate
from lightning_xai.metrics import MeanOfNamed

__all__ = ["FidelityReporting"]


class FidelityReporting:
    """Validation metrics, reports and the neighbour panel (mixed into :class:`~lightning_xai.gpex.GPEX`).

    Uses the callback's ``surrogate``, its deferred ``_restored`` state, the ``probe`` set, ``neighbours``, the
    metric objects ``_fidelity`` and ``_losses``, the ``skipped_rows`` counter and ``explain``.
    """

    surrogate: GPEXSurrogate | None
    neighbours: int
    skipped_rows: int
    _fidelity: SurrogateFidelity | None
    _losses: MeanOfNamed | None
    _degenerate_warned: set[str]

    def chart_layout(self) -> dict[str, list[str]]:
        """The surrogate's fidelity scores in one chart."""
        return {"fidelity: agreement, Pearson, R²": [re.escape(self.tag(m)) for m in ("agreement", "pearson", "r2")]}

    def validation_batch(self, trainer: pl.Trainer, x: torch.Tensor, y: torch.Tensor | None) -> None:
        if self.surrogate is None and self._restored is None:
            return
        e = self._explain(x, k=None)
        if self._fidelity is None:
            with torch.inference_mode(False):
                self._fidelity = SurrogateFidelity(e.output.shape[1])
        self._fidelity.to(x.device).update(e.mean, e.output, e.variance)

    def _fidelity_scalars(self, fidelity: SurrogateFidelity) -> dict[str, torch.Tensor]:
        """The fidelity scalars to log. Heads whose network output was constant over the validation set have no
        correlation; when every head is constant, Pearson and R² are left out (with a warning), since a NaN beside
        a trivially perfect agreement reads as a working surrogate (and breaks ``monitor=`` callbacks)."""
        values = fidelity.compute()  # a collective under DDP: every rank computes
        constant, heads = fidelity.constant_heads(), fidelity.heads
        if constant == heads:
            self._warn_degenerate(
                "all", f"GPEX: the explained output is constant over the validation examples (all {heads} heads), so "
                "the surrogate's Pearson correlation and R² are undefined: gpex/pearson, gpex/pearson_min and gpex/r2 "
                "are not logged, and gpex/agreement = 1 only says that the surrogate predicts the same constant class "
                "(warned once)."
            )
            values = {k: v for k, v in values.items() if k not in ("pearson", "pearson_min", "r2")}
        elif constant:
            self._warn_degenerate(
                "some", f"GPEX: {constant} of {heads} explained output heads are constant over the validation "
                "examples; gpex/pearson, gpex/pearson_min and gpex/r2 are over the other heads (warned once)."
            )
        return {self.tag(k): v for k, v in values.items()}

    def _warn_degenerate(self, kind: str, message: str) -> None:
        """Warn ``message`` once per ``kind`` of degenerate output (``all`` or ``some`` heads constant)."""
        if kind not in self._degenerate_warned:
            self._degenerate_warned.add(kind)
            rank_zero_warn(message)

    def _skipped_since_report(self) -> torch.Tensor:
        """Training rows left out for NaN/Inf since the last report, summed over processes (a collective)."""
        count = torch.tensor(float(self.skipped_rows), dtype=torch.float64)
        if self._sharded and self.surrogate is not None:
            count = all_reduce_(count.to(self.surrogate.cache.G.device))
        self.skipped_rows = 0
        return count

    def reset_metrics(self) -> None:
        # outside inference mode: reset states are updated in place by training steps (match_loss)
        with torch.inference_mode(False):
            for metric in (self._fidelity, self._losses):
                if metric is not None:
                    metric.reset()

    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values: dict[str, torch.Tensor] = {}
        if self._fidelity is not None and self._fidelity.update_count > 0:
            values.update(self._fidelity_scalars(self._fidelity))
        if self._losses is not None and self._losses.update_count > 0:
            values.update(self._losses.compute())
        values[self.tag("skipped")] = self._skipped_since_report()
        log_scalars(pl_module, values)
        # the same decision on every rank (the panel's search is a collective); drawing costs more than an epoch of
        # steps on small models, so it is skipped when no logger could store it
        wanted = bool(trainer.loggers) if self._sharded else bool(image_loggers(trainer))
        if self.probe.size and self.surrogate is not None and wanted:
            self.draw_neighbours(trainer)

    def draw_neighbours(self, trainer: pl.Trainer) -> None:
        """Log the ``neighbours`` panel of the probe examples (rank zero draws; every rank searches its shard)."""
        assert self.surrogate is not None
        if self.probe.inputs is None:  # this rank saw no validation example: it still answers the others' queries
            features = self.surrogate.cache.U.new_zeros(0, self.surrogate.heads, self.surrogate.dim)
            self._neighbours(features, torch.zeros(0, dtype=torch.long), self.neighbours)
            return
        x = self.probe.inputs.to(self.surrogate.cache.U.device)
        e = self.explain(x, k=self.neighbours)
        if not trainer.is_global_zero:
            return
        labels = self.probe.targets
        figure = neighbour_figure(
            x.cpu(),
            None if e.examples is None else e.examples.cpu(),
            e.neighbours.cpu(),
            e.scores.cpu(),
            e.head.cpu(),
            e.mean.argmax(-1).cpu(),
            None if labels is None else labels.cpu(),
        )
        log_image(trainer, self.tag("neighbours"), figure_to_image(figure))
