"""ClaDec's metric set and reports: the scalars and the probe panel logged at validation epoch ends.

:class:`ClaDecReporting` holds the validation side of :class:`lightning_xai.cladec.ClaDec`. On the fixed
``metric_size`` validation examples it computes ``<prefix>/rec_loss``, ``agreement``, ``acc_on_recon`` and
``ce_on_recon`` and their RefAE twins under :attr:`refae_prefix`, ``rec_ratio``, and ``skipped`` (the examples left
out so far, summed over processes), leaving out rows the bad-row policy of :mod:`lightning_xai.cladec.rows` refuses;
averages go through :class:`lightning_xai.metrics.MeanOfNamed` (one collective under DDP). The probe panel is drawn
by :func:`lightning_xai.cladec.probes.probe_image`. It is a mixin of the callback, kept apart so that the callback
module holds the lifecycle; it uses the callback's state and accessors (declared below for type checkers) and never
imports the callback.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_xai._core import ExplainerCallback, eval_mode
from lightning_xai._core.distributed import all_reduce_
from lightning_xai._core.logging import log_image, log_scalars
from lightning_xai.cladec.explanation import ClaDecExplanation
from lightning_xai.cladec.model import ClaDecModel, reconstruction_loss
from lightning_xai.cladec.probes import probe_image
from lightning_xai.cladec.rows import finite_rows, labels_in_range
from lightning_xai.metrics import MeanOfNamed


class ClaDecReporting(ExplainerCallback):
    """The reporting half of :class:`lightning_xai.cladec.ClaDec` (a mixin: it has no constructor of its own)."""

    use_refae: bool
    input_layer: str | None
    core: ClaDecModel | None
    _restored: dict[str, Any] | None
    skipped: int
    _metric_skipped: int

    if TYPE_CHECKING:  # provided by the callback

        def explain(self, x: torch.Tensor, model: torch.nn.Module | None = None) -> ClaDecExplanation: ...

        def _reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, ClaDecExplanation]: ...

        def _logits_on(self, recon: torch.Tensor, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor: ...

        def _warn_once(self, key: str, message: str) -> None: ...

    @property
    def refae_prefix(self) -> str:
        """Tag prefix of the RefAE's scalars: ``refae``, or ``refae-<layer>`` beside ``cladec-<layer>``."""
        if self.prefix.startswith(self.method):
            return "refae" + self.prefix[len(self.method) :]
        return f"{self.prefix}-refae"

    def chart_layout(self) -> dict[str, list[str]]:
        """ClaDec beside the RefAE of the same shape, one chart per score."""
        charts = {}
        for score, title in (("rec_loss", "reconstruction loss: ClaDec vs RefAE"),
                             ("acc_on_recon", "classifier accuracy on reconstructions: ClaDec vs RefAE"),
                             ("agreement", "agreement with the classifier on the input: ClaDec vs RefAE")):
            charts[title] = [re.escape(self.tag(score)), re.escape(self.tag(score, self.refae_prefix))]
        return charts

    def _score_names(self, with_targets: bool) -> list[str]:
        """The scalars :meth:`_scores_on` returns (the same on every rank, whatever rows it could use)."""
        names = [self.tag("rec_loss"), self.tag("agreement")]
        names += [self.tag("acc_on_recon"), self.tag("ce_on_recon")] if with_targets else []
        if self.use_refae:
            ref = self.refae_prefix
            names += [self.tag("rec_loss", ref), self.tag("agreement", ref)]
            names += [self.tag("acc_on_recon", ref)] if with_targets else []
        return names

    def _scores_on(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], int]:
        """Reconstruction losses, and the frozen classifier's accuracy, agreement and CE on the reconstructions, over
        the usable rows of ``(x, y)``; returns the scores and the number of rows behind them.

        Rows with a NaN/Inf input, activation or classifier output, or a label outside ``[0, K)``, are left out
        (their number is kept in ``_metric_skipped``); with no usable row every score is 0 with weight 0.
        """
        logits_x, out = self._reconstruct(x)
        original = x if out.original is None else out.original
        keep = finite_rows(x, original, out.code, logits_x)
        if y is not None:
            keep &= labels_in_range(y, logits_x.shape[-1]).to(keep.device)
        self._metric_skipped = int((~keep).sum())
        n = int(keep.sum())
        if n == 0:
            return {name: torch.zeros((), device=x.device) for name in self._score_names(y is not None)}, 0
        x, original, logits_x, cladec = x[keep], original[keep], logits_x[keep], out.cladec[keep]
        y = None if y is None else y[keep]
        refae = None if out.refae is None else out.refae[keep]
        recons = cladec if refae is None else torch.cat([cladec, refae])
        with torch.no_grad(), eval_mode(self.model):  # one forward for both reconstructions
            logits = self._logits_on(recons, x if refae is None else torch.cat([x, x]), original)
        labels, pred = logits.argmax(-1), logits_x.argmax(-1)
        x32 = original.float()
        scores = {
            self.tag("rec_loss"): reconstruction_loss(cladec, x32),
            self.tag("agreement"): (labels[:n] == pred).float().mean(),
        }
        if y is not None:
            scores[self.tag("acc_on_recon")] = (labels[:n] == y).float().mean()
            scores[self.tag("ce_on_recon")] = F.cross_entropy(logits[:n], y)
        if refae is not None:
            ref = self.refae_prefix
            scores[self.tag("rec_loss", ref)] = reconstruction_loss(refae, x32)
            scores[self.tag("agreement", ref)] = (labels[n:] == pred).float().mean()
            if y is not None:
                scores[self.tag("acc_on_recon", ref)] = (labels[n:] == y).float().mean()
        return scores, n

    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.core is None and self._restored is None:
            return  # nothing trained yet (the same on every rank: the cadence depends on the step count only)
        device = pl_module.device
        has = self.examples.inputs is not None and len(self.examples) > 0
        # whether any rank has examples (and targets): a rank whose validation rows were all NaN still joins
        anyone = all_reduce_(torch.tensor([float(has), float(self.examples.targets is not None)], device=device), "max")
        if not bool(anyone[0]):
            return  # no rank has a metric set: the same decision everywhere
        if has:
            x = self.examples.inputs.to(device)
            y = None if self.examples.targets is None else self.examples.targets.to(device)
            scores, n = self._scores_on(x, y)
        else:
            x = torch.zeros(0, device=device)
            scores, n = {name: torch.zeros((), device=device) for name in self._score_names(bool(anyone[1]))}, 0
            self._metric_skipped = 0
        average = MeanOfNamed(sorted(scores)).to(x.device)
        average.update(scores, weight=n)
        values = average.compute()  # a collective under DDP: every rank gets here
        ref_rec = values.get(self.tag("rec_loss", self.refae_prefix))
        if ref_rec is not None and self.tag("rec_loss") in values:
            values[self.tag("rec_ratio")] = values[self.tag("rec_loss")] / ref_rec.clamp_min(1e-12)
        if self._metric_skipped:
            self._warn_once(
                "metric",
                f"ClaDec: {self._metric_skipped} of the {x.shape[0]} metric-set examples have NaN/Inf inputs, "
                "activations or outputs, or labels outside the class range; the scalars leave them out (counted in "
                f"{self.tag('skipped')}).",
            )
        left_out = self.skipped + getattr(self.examples, "skipped", 0) + self._metric_skipped
        skipped = torch.tensor([float(left_out)], device=x.device)
        values[self.tag("skipped")] = all_reduce_(skipped, "sum")[0]
        log_scalars(pl_module, values)
        if trainer.is_global_zero and len(self.probe):
            self.draw_probes(trainer)

    def draw_probes(self, trainer: pl.Trainer) -> None:
        """Log the probe panels (images) or bar charts (tabular inputs) to the image-capable loggers.

        With ``input_layer``, sequences of vectors ``(T, d)`` (token embeddings) are drawn as one-channel images."""
        assert self.probe.inputs is not None and self.core is not None
        x = self.probe.inputs.to(next(self.core.parameters()).device)
        keep = finite_rows(x)  # a NaN/Inf example has no picture
        targets = None if self.probe.targets is None else self.probe.targets[keep.cpu()]
        if not bool(keep.any()):
            return
        out = self.explain(x[keep])
        shown = (x[keep] if out.original is None else out.original).cpu().float()
        cladec, refae = out.cladec.cpu(), (out.refae.cpu() if out.refae is not None else None)
        if self.input_layer is not None and shown.dim() == 3:
            shown, cladec = shown.unsqueeze(1), cladec.unsqueeze(1)
            refae = None if refae is None else refae.unsqueeze(1)
        names = getattr(trainer.datamodule, "feature_names", None) if trainer.datamodule is not None else None
        log_image(trainer, self.tag("probes"), probe_image(shown, cladec, refae, targets, names))
