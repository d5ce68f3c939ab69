"""How well a GPEX surrogate follows the network: the fidelity scalars GPEX reports.

Two forms of the same figures (argmax agreement, per-head Pearson correlation, R²): :func:`fidelity`, a function of
two whole (N, L) tensors, and :class:`SurrogateFidelity`, a torchmetrics ``Metric`` built from sums that add up
across batches and processes, which the callback updates on every validation batch. They live apart from the
callback and the surrogate algebra because neither needs the other: the callback only feeds and reads the Metric.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

__all__ = ["SurrogateFidelity", "fidelity"]


def fidelity(mean: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Agreement between GP means and network outputs, both (N, L).

    Returns:
        ``agreement`` (argmax equal, the fraction), ``pearson`` (mean over heads of the per-head correlation),
        ``pearson_min`` (worst head) and ``r2`` (mean over heads of 1 − SSE/SST).
    """
    mean, target = mean.double(), target.double()
    dm, dt = mean - mean.mean(0), target - target.mean(0)
    rho = (dm * dt).sum(0) / (dm.norm(dim=0) * dt.norm(dim=0)).clamp_min(1e-300)
    r2 = 1 - ((mean - target) ** 2).sum(0) / (dt**2).sum(0).clamp_min(1e-300)
    return {
        "agreement": float((mean.argmax(-1) == target.argmax(-1)).double().mean()),
        "pearson": float(rho.mean()),
        "pearson_min": float(rho.min()),
        "r2": float(r2.mean()),
    }


class SurrogateFidelity(Metric):
    """How well a surrogate's means follow a network's outputs, from sums that add up across batches and ranks.

    Per head it keeps ``n, Σp, Σt, Σp², Σt², Σpt`` and the squared error ``Σ(p − t)²`` (p: surrogate mean, t:
    network output), plus argmax agreements and the summed posterior variance, all float64 with ``sum`` reduction,
    so under DDP the synchronised states are exactly those of one process that saw every batch.

    Args:
        heads: Number of output heads L.

    ``compute()`` returns ``agreement`` (fraction of examples whose argmax agrees), ``pearson`` (mean over heads of
    the per-head correlation), ``pearson_min`` (worst head), ``r2`` (mean over heads of ``1 − SSE/SST``) and
    ``variance`` (mean posterior variance over examples and heads). Heads whose network output is constant are left
    out of ``pearson`` and ``r2`` (their correlation is undefined).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, heads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.heads = int(heads)
        for name in ("n", "agree", "var_sum"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("sum_p", "sum_t", "sum_pp", "sum_tt", "sum_pt", "sse"):
            self.add_state(name, torch.zeros(self.heads, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, mean: torch.Tensor, target: torch.Tensor, variance: torch.Tensor | None = None) -> None:
        """Add a batch: ``mean`` and ``target`` (B, L), ``variance`` (B, L) or None."""
        p, t = mean.detach().to(torch.float64), target.detach().to(self.sum_p.device, torch.float64)
        p = p.to(self.sum_p.device)
        if p.shape != t.shape or p.dim() != 2 or p.shape[1] != self.heads:
            shapes = f"{tuple(p.shape)} and {tuple(t.shape)}"
            raise ValueError(f"expected mean and target of shape (B, {self.heads}), got {shapes}")
        self.n += p.shape[0]
        self.agree += (p.argmax(-1) == t.argmax(-1)).sum()
        if variance is not None:
            self.var_sum += variance.detach().to(self.var_sum.device, torch.float64).mean(-1).sum()
        self.sum_p += p.sum(0)
        self.sum_t += t.sum(0)
        self.sum_pp += (p * p).sum(0)
        self.sum_tt += (t * t).sum(0)
        self.sum_pt += (p * t).sum(0)
        self.sse += ((p - t) ** 2).sum(0)

    def _varying(self) -> torch.Tensor:
        """(L,) bool: heads whose network output varies over the examples seen (else Pearson is undefined). A spread
        below 1e-5 of the outputs' magnitude (std/rms) is float32 rounding noise, not variation: R² against it would
        be a huge negative number that means nothing."""
        n = self.n.clamp_min(1)
        sst = (self.sum_tt - self.sum_t**2 / n).clamp_min(0)
        return sst > 1e-10 * self.sum_tt.clamp_min(1e-300)

    def constant_heads(self) -> int:
        """Number of heads whose network output was constant over the examples seen (left out of Pearson and R²)."""
        return int((~self._varying()).sum()) if bool(self.n > 0) else 0

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.n.clamp_min(1)
        cov = self.sum_pt - self.sum_p * self.sum_t / n
        var_p = (self.sum_pp - self.sum_p**2 / n).clamp_min(0)
        sst = (self.sum_tt - self.sum_t**2 / n).clamp_min(0)
        valid = self._varying()
        rho = cov / (var_p * sst).sqrt().clamp_min(1e-300)
        r2 = 1 - self.sse / sst.clamp_min(1e-300)
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=n.device)
        return {
            "agreement": self.agree / n,
            "pearson": rho[valid].mean() if bool(valid.any()) else nan,
            "pearson_min": rho[valid].min() if bool(valid.any()) else nan,
            "r2": r2[valid].mean() if bool(valid.any()) else nan,
            "variance": self.var_sum / n,
        }
