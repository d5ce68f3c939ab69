"""The Insens callback: switched linear projections and inactive-state sensitivity at each validation epoch.

At every reporting epoch it computes Insens (:func:`~lightning_xai.insens.insens`) on a fixed set of validation
examples and logs

* ``insens/active_fraction_<layer>``: the fraction of each ReLU layer's neurons that are on (the paper reports 17%
  on average for its MNIST network), and ``insens/inactive``, the number of neurons behind each map;
* ``insens/r_min_median``: the median distance from an input to the nearest neuron switching hyperplane;
* ``insens/deletion_auc_<order>`` and ``insens/insertion_auc_<order>`` for the orders ``insens`` (``|Ω̂|``, since
  Insens is class-agnostic), ``gradient`` (``|∂F_pred/∂x|``) and ``random``, on the predicted class;

and the image ``insens/probes``: per probe example, input | Insens | gradient of the predicted class.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_xai._core.batch import BatchFn
from lightning_xai._core.layers import resolve_layer
from lightning_xai._core.modules import to_module_dtype
from lightning_xai._core.outputs import OutputFn
from lightning_xai._core.relu_regions import layer_output
from lightning_xai.attribution import AttributionCallback
from lightning_xai.insens.core import LOSER_POLICIES, InsensMap, insens, require_relu_network
from lightning_xai.linearization.core import linearize

METHODS = ("auto", "exact", "hutchinson")
DUAL_BATCH = 256  # stacked (direction, example) pairs per forward-mode pass: bounds the report's peak memory


class Insens(AttributionCallback):
    """Log Insens maps and neuron statistics of a ReLU-family LightningModule at validation epoch end.

    Args:
        method: ``"auto"`` (exact row norms up to 1,024 input features, Hutchinson beyond), ``"exact"`` or
            ``"hutchinson"``.
        samples: Hutchinson directions (relative error per neuron about ``√(2/samples)``).
        maxpool_losers: ``"active"`` (only ``v ≤ 0`` is inactive, the paper's equation) or ``"inactive"``.
        steps: steps of the deletion and insertion curves.
        probe_size: validation examples drawn in ``insens/probes``.
        metric_size: validation examples (per rank) behind the scalars.
        every_n_epochs: report every this many validation epochs.
        input_fn: callable ``batch -> input``.
        target_fn: callable ``batch -> target``.
        output_fn: callable ``model output -> tensor (B, K)`` for models returning a dict, tuple or output object.
        input_layer: explain in this module's output instead of the model input (e.g. ``"embed"`` for token-id
            models); the deletion/insertion curves, which perturb the raw input, are then skipped.
        name: tag prefix (default ``insens``).
        seed: seed of the Hutchinson directions and of the random ordering.
    """

    method = "insens"

    def __init__(
        self,
        method: str = "auto",
        *,
        samples: int = 64,
        maxpool_losers: str = "active",
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
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {METHODS}")
        if maxpool_losers not in LOSER_POLICIES:
            raise ValueError(f"maxpool_losers={maxpool_losers!r} is not one of {LOSER_POLICIES}")
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples={samples!r} must be a positive integer")
        self.norms, self.samples, self.maxpool_losers = method, samples, maxpool_losers
        self.output_fn, self.input_layer = output_fn, input_layer

    @staticmethod
    def inapplicable_reason(model: torch.nn.Module) -> str | None:
        """Why Insens cannot explain ``model`` (smooth units, norms, softmax, recurrent layers), or None."""
        try:
            require_relu_network(model)
        except (ValueError, NotImplementedError) as error:
            return str(error)
        return None

    def configure(self, trainer: pl.Trainer | None, model: torch.nn.Module) -> None:
        require_relu_network(model)  # fail at setup, not at the first report
        if self.input_layer is not None:
            resolve_layer(model, self.input_layer)

    def explain(self, x: torch.Tensor, *, model: torch.nn.Module | None = None) -> InsensMap:
        """Insens for a batch ``x`` (see :func:`~lightning_xai.insens.insens`) of ``model`` or, by default, of the model
        the callback was set up with (after a checkpoint load, ``model=`` is all it needs)."""
        model = self._explained(model)
        x = to_module_dtype(x, model)
        features = layer_output(model, x[:1], self.input_layer)[0].numel()
        method = self.norms if self.norms != "auto" else ("exact" if features <= 1024 else "hutchinson")
        # directions per batched forward: about DUAL_BATCH stacked examples at a time, whatever the metric set size
        chunk = max(1, DUAL_BATCH // x.shape[0])
        with self.rng.active(x.device):
            return insens(model, x, method=method, samples=self.samples, maxpool_losers=self.maxpool_losers,
                          chunk_size=chunk, input_layer=self.input_layer)

    def _gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the predicted class (the Jacobian row: the model is piecewise-linear) and the prediction."""
        lin = linearize(self.model, to_module_dtype(x, self.model), classes=None, input_layer=self.input_layer,
                        output_fn=self.output_fn)
        pred = lin.output.argmax(-1)
        return lin.weight[torch.arange(x.shape[0], device=x.device), pred], pred

    def evaluate(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        result = self.explain(x)
        grad, pred = self._gradient(x)
        scores: dict[str, torch.Tensor] = {
            "inactive": result.inactive,
            "r_min_median": result.r_min.median().expand_as(result.inactive),
        }
        for layer, fraction in result.active_fraction.items():
            scores[f"active_fraction_{layer}"] = fraction
        if self.input_layer is None:
            x = to_module_dtype(x, self.model)
            scores.update(self.orderings(x, pred, {"insens": result.map.abs(), "gradient": grad.abs()}))
        return scores, {}

    def draw(self, trainer: pl.Trainer, x: torch.Tensor, y: torch.Tensor | None) -> None:
        result = self.explain(x)
        grad, pred = self._gradient(x)
        maps = {"Insens": result.map, "gradient": grad}
        if self.input_layer is not None:  # maps over an embedding: one value per position (summed over features)
            maps = {name: m.flatten(2).sum(-1) for name, m in maps.items()}
            x = layer_output(self.model, to_module_dtype(x, self.model), self.input_layer).flatten(2).norm(dim=-1)
        self.draw_maps(trainer, x, maps, [f"probe {i}: predicted {int(c)}" for i, c in enumerate(pred)])
