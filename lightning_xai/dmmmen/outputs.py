"""What a fitted DMM-MEN surrogate reports: the mixture summary, local explanations, and predictive intervals.

The predictive distribution of a new output given its input is the plug-in mixture ``Σ_j π_j·N(x·β_j + b_j, σ_j²)``
over the occupied components (posterior-mean parameters). Its central interval is computed either by Monte Carlo, as
in the authors' analysis script (component by weight, then the normal), or exactly, by bisection on the mixture CDF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_xai.dmmmen import sampling as S


@dataclass
class Components:
    """Posterior-mean summary of the mixture, heaviest component first.

    Attributes:
        weights: mixture weights π (J,).
        coefficients: β per component (J, p), in the input's units.
        intercepts: b per component (J,).
        sigma2: noise variance σ² per component (J,).
        occupied: components that held data in at least half of the kept sweeps (J,); the others are prior draws,
            left out of predictions and explanations (their rows here are zeros or rarely-seen averages).
        sizes: mean number of data points per component (J,).
        occupancy: fraction of kept sweeps in which the component held data (J,).
        lambda1: mean L1 penalty of the net each component used (J,).
        lambda2: mean L2 penalty of the net each component used (J,).
    """

    weights: Tensor
    coefficients: Tensor
    intercepts: Tensor
    sigma2: Tensor
    occupied: Tensor
    sizes: Tensor
    occupancy: Tensor
    lambda1: Tensor
    lambda2: Tensor


@dataclass
class Explanation:
    """Local explanations: each input's component, its coefficients and the signed contributions ``x ⊙ β``."""

    component: Tensor  # (n,)
    coefficients: Tensor  # (n, p)
    contributions: Tensor  # (n, p)
    intercept: Tensor  # (n,)


def mixture_quantile(means: Tensor, sd: Tensor, weights: Tensor, prob: float, iters: int = 80) -> Tensor:
    """Quantile ``prob`` of ``Σ_j w_j·N(means[:, j], sd_j²)`` per row, by bisection on the mixture CDF."""
    live = weights > 0
    lo = (means - 12 * sd).masked_fill(~live, math.inf).amin(1)
    hi = (means + 12 * sd).masked_fill(~live, -math.inf).amax(1)
    scale = torch.where(live, sd, torch.ones_like(sd)) * math.sqrt(2)
    for _ in range(iters):
        mid = (lo + hi) / 2
        cdf = (weights * torch.special.erfc((means - mid[:, None]) / scale).mul_(0.5)).sum(1)
        below = cdf < prob
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return (lo + hi) / 2


def mixture_interval(
    means: Tensor,
    sd: Tensor,
    weights: Tensor,
    probs: tuple[float, float],
    draws: int,
    generator: torch.Generator,
    chunk: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Monte Carlo quantiles ``probs`` of the mixture per row: ``draws`` samples each, ``chunk`` rows at a time."""
    cumulative = weights.cumsum(0)
    q = torch.tensor(probs, dtype=means.dtype, device=means.device)
    lows, highs = [], []
    for start in range(0, means.shape[0], chunk):
        m = means[start : start + chunk]
        u = S.uniform((m.shape[0], draws), m, generator) * cumulative[-1]
        pick = torch.searchsorted(cumulative, u).clamp_max_(weights.numel() - 1)
        values = m.gather(1, pick) + sd[pick] * S.normal(pick.shape, m, generator)
        low, high = torch.quantile(values, q, dim=1)
        lows.append(low)
        highs.append(high)
    return torch.cat(lows), torch.cat(highs)
