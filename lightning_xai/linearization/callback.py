"""The Linearization callback: the exact ``F(x) = W(x)·x + b(x)`` of the network, logged at each validation epoch.

At every reporting epoch it linearizes the network on a fixed set of validation examples (see
:func:`~lightning_xai.linearization.linearize`) and logs

* ``linearization/residual_max``: the largest relative ``‖W·x + b − F(x)‖/‖F(x)‖`` with ``b`` from the independent
  frozen-gate pass (≈1e-7 in float32 for a piecewise-linear network; larger means the network is not what its
  modules say, e.g. functional ``torch.relu`` calls);
* ``linearization/gated``: 1 when the network needed the gated-linear mode (smooth units, norms, softmax), else 0;
* ``linearization/bias_share``: ``|b|/(|W·x| + |b|)`` of the predicted class (how much of the logit no input
  feature accounts for);
* ``linearization/r_min_median`` and ``linearization/active_fraction_<layer>`` (ReLU networks): the median distance
  from an input to the nearest neuron switching boundary, and the fraction of active neurons per layer;
* ``linearization/deletion_auc_<order>`` and ``linearization/insertion_auc_<order>`` for the orders ``wx``
  (``W⊙x`` of the predicted class), ``gradient`` (``W`` alone) and ``random`` (Petsiuk et al.'s deletion and
  insertion, probability of the predicted class, baseline 0);

and the image ``linearization/probes``: per probe example, input | W of the predicted class | W⊙x | W of the
predicted class minus W of the runner-up (each map on its own symmetric colour scale).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_xai._core.attribution import AttributionCallback
from lightning_xai._core.batch import BatchFn
from lightning_xai.insens.core import insens
from lightning_xai.insens.neurons import neuron_layers
from lightning_xai.linearization.core import MODES, Linearized, linearize


def _pick(lin: Linearized, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` and ``b`` of one output per example (``index`` holds column positions of ``lin``)."""
    rows = torch.arange(index.shape[0], device=index.device)
    return lin.weight[rows, index], lin.bias[rows, index]


class Linearization(AttributionCallback):
    """Log the exact instance-wise linearization of any LightningModule at validation epoch end.

    Args:
        mode: ``"auto"`` (exact for piecewise-linear networks, gated-linear otherwise), ``"exact"`` (fail on other
            networks) or ``"gated-linear"``.
        steps: steps of the deletion and insertion curves.
        probe_size: validation examples drawn in ``linearization/probes``.
        metric_size: validation examples (per rank) behind the scalars.
        every_n_epochs: report every this many validation epochs.
        input_fn: callable ``batch -> input``.
        target_fn: callable ``batch -> target``.
        name: tag prefix (default ``linearization``).
        seed: seed of the random ordering.
    """

    method = "linearization"

    def __init__(
        self,
        mode: str = "auto",
        *,
        steps: int = 20,
        probe_size: int = 8,
        metric_size: int = 64,
        every_n_epochs: int = 1,
        input_fn: BatchFn | None = None,
        target_fn: BatchFn | None = None,
        name: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            steps=steps, input_fn=input_fn, target_fn=target_fn, probe_size=probe_size, metric_size=metric_size,
            every_n_epochs=every_n_epochs, name=name, seed=seed,
        )
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        self.mode = mode
        self._announced = False

    def explain(self, x: torch.Tensor, classes: torch.Tensor | None = None) -> Linearized:
        """``F(x) = W·x + b`` of the attached model for all outputs (or ``classes``), see :func:`linearize`."""
        if self.model is None:
            raise RuntimeError("Linearization.explain needs the callback to have been set up by trainer.fit")
        return linearize(self.model, x, classes, mode=self.mode)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        assert self.model is not None
        lin = self.explain(x)
        if not self._announced:
            self._announced = True
            rank_zero_info(f"Linearization: {type(self.model).__name__} is linearized in {lin.mode} mode.")
        pred = lin.output.argmax(-1)
        w, b = _pick(lin, pred)
        wx = w * x
        explained = wx.flatten(1).sum(1)
        scores: dict[str, torch.Tensor] = {
            "gated": torch.full_like(b, float(lin.mode == "gated-linear")),
            "bias_share": b.abs() / (explained.abs() + b.abs()).clamp_min(1e-12),
        }
        scores.update(self.orderings(x, pred, {"wx": wx, "gradient": w}))
        if lin.mode == "exact" and neuron_layers(self.model):
            method = "exact" if x[0].numel() <= 1024 else "hutchinson"
            with self.rng.active(x.device):
                regions = insens(self.model, x, method=method)
            scores["r_min_median"] = regions.r_min.median().expand_as(b)
            for layer, fraction in regions.active_fraction.items():
                scores[f"active_fraction_{layer}"] = fraction
        return scores, {"residual_max": float(lin.residual(x).max())}

    def draw(self, trainer: pl.Trainer, x: torch.Tensor, y: torch.Tensor | None) -> None:
        lin = self.explain(x)
        top2 = lin.output.topk(min(2, lin.output.shape[1]), dim=-1).indices
        w_pred, _ = _pick(lin, top2[:, 0])
        w_next, _ = _pick(lin, top2[:, -1])
        maps = {"W": w_pred, "W⊙x": w_pred * x, "W − W(runner-up)": w_pred - w_next}
        self.draw_maps(trainer, x, maps, [f"probe {i}: predicted {int(c)}" for i, c in enumerate(top2[:, 0])])
