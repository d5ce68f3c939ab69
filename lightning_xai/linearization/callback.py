"""The Linearization callback: the exact ``F(x) = W(x)·x + b(x)`` of the network, logged at each validation epoch.

At every reporting epoch it linearizes the network on a fixed set of validation examples (see
:func:`~lightning_xai.linearization.linearize`) and logs

* ``linearization/residual_max``: the largest relative ``‖W·x + b − F(x)‖/‖F(x)‖`` with ``b`` from the independent
  frozen-gate pass (≈1e-7 in float32 for a piecewise-linear network; larger means the network is not what its
  modules say, e.g. functional ``torch.relu`` calls);
* ``linearization/gated``: 1 when the network needed the gated-linear mode (smooth units, norms, softmax), else 0;
* ``linearization/bias_share``: ``|b|/(|W·x| + |b|)`` of the predicted class (how much of the logit no input
  feature accounts for);
* ``linearization/r_min_median`` (ReLU networks): the median distance from an input to the nearest neuron switching
  boundary, i.e. how far the exact map reaches (estimated on at most ``REGION_EXAMPLES`` examples with Hutchinson
  row norms, so its cost does not grow with the metric set; per-layer active fractions are Insens' scalars);
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

from lightning_xai._core.batch import BatchFn
from lightning_xai._core.layers import resolve_layer
from lightning_xai._core.modules import to_module_dtype
from lightning_xai._core.outputs import OutputFn
from lightning_xai._core.relu_regions import region_radius
from lightning_xai.attribution import AttributionCallback
from lightning_xai.linearization.core import MODES, Linearized, linearize, resolve_mode

REGION_EXAMPLES = 8  # examples behind r_min_median
REGION_DIRECTIONS = 32  # Hutchinson directions per example for its row norms


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
        output_fn: callable ``model output -> tensor (B, K)`` for models returning a dict, tuple or output object.
        input_layer: linearize in this module's output instead of the model input (e.g. ``"embed"`` for token-id
            models; then ``W`` has the embedding's shape, and the deletion/insertion curves, which perturb the raw
            input, are skipped).
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
        output_fn: OutputFn | None = None,
        input_layer: str | None = None,
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
        self.output_fn, self.input_layer = output_fn, input_layer
        self._announced = False

    def configure(self, trainer: pl.Trainer | None, model: torch.nn.Module) -> None:
        resolve_mode(model, self.mode)  # unknown modes, recurrent layers and exact-on-gated fail at setup
        if self.input_layer is not None:
            resolve_layer(model, self.input_layer)

    def explain(
        self, x: torch.Tensor, classes: torch.Tensor | None = None, *, model: torch.nn.Module | None = None
    ) -> Linearized:
        """``F(x) = W·x + b`` for all outputs (or ``classes``), see :func:`linearize`, of ``model`` or, by default, of
        the model the callback was set up with. Nothing is fitted, so after a checkpoint load ``model=`` is all it
        needs."""
        model = self._explained(model)
        return linearize(model, to_module_dtype(x, model), classes, mode=self.mode, input_layer=self.input_layer,
                         output_fn=self.output_fn)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        assert self.model is not None
        x = to_module_dtype(x, self.model)
        lin = self.explain(x)
        if not self._announced:
            self._announced = True
            rank_zero_info(f"Linearization: {type(self.model).__name__} is linearized in {lin.mode} mode.")
        pred = lin.output.argmax(-1)
        w, b = _pick(lin, pred)
        point = lin.point
        wx = w * point
        explained = wx.flatten(1).sum(1)
        scores: dict[str, torch.Tensor] = {
            "gated": torch.full_like(b, float(lin.mode == "gated-linear")),
            "bias_share": b.abs() / (explained.abs() + b.abs()).clamp_min(1e-12),
        }
        if self.input_layer is None:
            scores.update(self.orderings(x, pred, {"wx": wx, "gradient": w}))
        if lin.mode == "exact" and self.input_layer is None:
            r_min = self._region_radius(x[:REGION_EXAMPLES])
            if r_min is not None:
                scores["r_min_median"] = r_min.median().expand_as(b)
        return scores, {"residual_max": float(lin.residual().max())}

    def _region_radius(self, x: torch.Tensor) -> torch.Tensor | None:
        """Distance to the nearest ReLU switching hyperplane per example (None for networks without ReLU units)."""
        method = "exact" if x[0].numel() <= 256 else "hutchinson"
        with self.rng.active(x.device):
            return region_radius(self.model, x, method=method, samples=REGION_DIRECTIONS, chunk_size=8)

    def draw(self, trainer: pl.Trainer, x: torch.Tensor, y: torch.Tensor | None) -> None:
        x = to_module_dtype(x, self.model)
        lin = self.explain(x)
        top2 = lin.output.topk(min(2, lin.output.shape[1]), dim=-1).indices
        w_pred, _ = _pick(lin, top2[:, 0])
        w_next, _ = _pick(lin, top2[:, -1])
        maps = {"W": w_pred, "W⊙x": w_pred * lin.point, "W − W(runner-up)": w_pred - w_next}
        if self.input_layer is not None:  # maps over an embedding: one value per position (summed over features)
            maps = {name: m.flatten(2).sum(-1) for name, m in maps.items()}
            x = lin.point.flatten(2).norm(dim=-1)
        self.draw_maps(trainer, x, maps, [f"probe {i}: predicted {int(c)}" for i, c in enumerate(top2[:, 0])])
