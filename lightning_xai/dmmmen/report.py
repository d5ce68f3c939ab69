"""What the DMMMEN callback reports about a fitted surrogate: fidelity scores, R², bootstrap-test plumbing, figures.

The callback decides when to report and on which rows (its metric set, split by class, bad rows left out); this
module turns those rows and a fitted :class:`~lightning_xai.dmmmen.model.DMMMENSurrogate` into numbers and images,
without Lightning state of its own, so the scores can be read (and tested) apart from the training lifecycle. The
scalar names returned here are the tag suffixes the callback logs (``rmsd_prob``, ``coverage90``, ``pcr_*``, ...).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_xai._core.logging import figure_to_image, log_image
from lightning_xai._core.outputs import OutputFn
from lightning_xai.dmmmen.bootstrap import bootstrap_tests
from lightning_xai.dmmmen.features import FeatureSelector
from lightning_xai.dmmmen.model import DMMMENSurrogate
from lightning_xai.dmmmen.outputs import Components
from lightning_xai.viz import diverging, new_figure, stack_rows, tile_row


def fidelity_scores(
    surrogate: DMMMENSurrogate, features: torch.Tensor, target: torch.Tensor
) -> tuple[dict[str, float], torch.Tensor]:
    """The paper's fidelity figures on one class's rows: ``features`` (n, p) float64 and the network's ``target``
    logits (n,).

    Returns ``({"rmsd_prob", "rmsd_prob_assigned", "coverage90"}, assigned)``: RMSD between the sigmoid of the
    mixture mean (no access to the network's output) and the network's probability, the same with each row in the
    component its output makes most likely (the local explanation's fidelity), the coverage of 90% predictive
    intervals, and the assigned-component predictions (n,) behind the second figure.
    """
    mixture, _ = surrogate.predict(features)
    assigned, _ = surrogate.predict(features, target)
    low, high = surrogate.predictive_interval(features, level=0.9)
    prob = torch.sigmoid(target)
    return {
        "rmsd_prob": float((torch.sigmoid(mixture) - prob).square().mean().sqrt()),
        "rmsd_prob_assigned": float((torch.sigmoid(assigned) - prob).square().mean().sqrt()),
        "coverage90": float(((target >= low) & (target <= high)).double().mean()),
    }, assigned


def logit_spread(target: torch.Tensor) -> tuple[float, bool]:
    """The standard deviation of ``target`` and whether it is too small for R² to mean anything (constant logits:
    any tiny residual over a zero spread gives a huge negative number)."""
    spread = float(target.std()) if target.numel() > 1 else 0.0
    return spread, spread <= 1e-6 * max(1.0, float(target.abs().max()))


def r_squared(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """``1 − SS_res / SS_tot`` of ``predicted`` against ``target`` (check :func:`logit_spread` first)."""
    return float(1 - (predicted - target).square().sum() / (target - target.mean()).square().sum())


def top_positive_features(surrogate: DMMMENSurrogate, selector: FeatureSelector, n: int) -> torch.Tensor:
    """Flat input indices of the heaviest component's ``n`` most positive coefficients.

    Those are the features whose values raise the class's logit (the authors rank by |β|; a negative-β feature's
    removal raises the class rate and muddles the bootstrap tests).
    """
    beta = surrogate.components.coefficients[0]
    k = min(n, beta.numel())
    return selector.indices[beta.argsort(descending=True)[:k]]


def bootstrap_scores(
    model: nn.Module,
    target_class: int,
    top: torch.Tensor,
    x_class: torch.Tensor,
    x_other: torch.Tensor,
    generator: torch.Generator,
    output_fn: OutputFn | None,
) -> dict[str, float]:
    """The paper's three bootstrap tests for features ``top`` as ``pcr_*`` scalars.

    New cases are faint noise just above the baseline 0 (the paper: N(0.03, 0.01)), scaled to the observed range;
    for integer inputs (token ids) they are random ids from the observed range.
    """
    lowest = float(torch.minimum(x_class.min(), x_other.min()))
    highest = float(torch.maximum(x_class.max(), x_other.max()))
    if x_class.is_floating_point():
        noise = (0.0, 0.05 * (highest - lowest))
    else:
        noise = (lowest, highest)
    tests = bootstrap_tests(model, target_class, top, x_class, x_other, baseline=0.0, noise=noise,
                            generator=generator, output_fn=output_fn)
    return {f"pcr_{key}": value for key, value in tests.as_dict().items()}


def draw_components(
    trainer: pl.Trainer, tags: tuple[str, str], selector: FeatureSelector, comp: Components, target_class: int
) -> None:
    """Log coefficient maps of the occupied components (image inputs only) under ``tags[0]`` and the mixture weights
    (a bar chart, grey for unoccupied components) under ``tags[1]``."""
    shown = torch.nonzero(comp.occupied).flatten()[:6]
    if selector.input_shape is not None and len(selector.input_shape) == 3:
        maps = selector.scatter(comp.coefficients[shown].float())
        limit = maps.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        tiles = diverging(maps / limit, 1.0)  # one tile per component, blue < 0 < red
        log_image(trainer, tags[0], stack_rows(tile_row([tiles])))
    figure = new_figure(4, 2.5)
    ax = figure.subplots()
    ax.bar(range(len(comp.weights)), comp.weights.tolist(),
           color=["tab:blue" if o else "lightgray" for o in comp.occupied.tolist()])
    ax.set_xlabel("component (heaviest first; grey: unoccupied)")
    ax.set_ylabel("weight")
    ax.set_title(f"DMM-MEN mixture weights, class {target_class}", fontsize=9)
    figure.tight_layout()
    log_image(trainer, tags[1], figure_to_image(figure))
