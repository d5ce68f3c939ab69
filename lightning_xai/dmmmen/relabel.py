"""Label switching: match each kept sweep's components to a reference, then accumulate online posterior means.

A mixture's likelihood is invariant to permuting its components, so averaging a component's coefficients over sweeps
is meaningless unless the labels are aligned first. As in the authors' post-processing, each kept sweep is matched to
a reference assignment by the Hungarian algorithm on the assignment overlap (``scipy.optimize.linear_sum_assignment``
on a J×J table: cheap, O(n) to build). Unlike their R code, nothing is stored per sweep: :class:`OnlineMeans` keeps
running sums in the reference's labels, so memory does not grow with the number of sweeps (the traces of β alone
would be 300×6×20,000 doubles, 288 MB).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def overlap_permutation(z: Tensor, reference: Tensor, n_components: int) -> Tensor:
    """``perm[j]`` = the reference label that current component ``j`` is matched to (maximum total overlap)."""
    j = n_components
    table = torch.bincount(z * j + reference, minlength=j * j).reshape(j, j).cpu().numpy()
    rows, cols = linear_sum_assignment(-table.astype(np.float64))
    perm = np.empty(j, dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm).to(z.device)


class OnlineMeans:
    """Running sums of relabelled per-component quantities, in the reference's labels.

    Per-component parameters (coefficients, intercepts, variances, penalties) are averaged only over the sweeps in
    which the component held at least one point: an empty component's parameters are prior draws, not estimates.
    Weights, sizes and occupancy are averaged over all kept sweeps.

    Args:
        n_components: J.
        n_coef: coefficients per component (including the intercept, if any).
        like: a tensor whose dtype and device the sums take.
    """

    FIELDS = ("coef", "sigma2", "lambda1", "lambda2")

    def __init__(self, n_components: int, n_coef: int, like: Tensor) -> None:
        zeros = dict(dtype=like.dtype, device=like.device)
        self.kept = 0
        self.reference: Tensor | None = None
        self.weight = torch.zeros(n_components, **zeros)
        self.size = torch.zeros(n_components, **zeros)
        self.occupied = torch.zeros(n_components, **zeros)
        self.coef = torch.zeros(n_components, n_coef, **zeros)
        self.sigma2 = torch.zeros(n_components, **zeros)
        self.lambda1 = torch.zeros(n_components, **zeros)
        self.lambda2 = torch.zeros(n_components, **zeros)
        self.alpha = 0.0
        self.n_occupied = 0.0

    def add(self, z: Tensor, weight: Tensor, size: Tensor, values: dict[str, Tensor], alpha: Tensor) -> None:
        """Add one sweep: ``z`` its assignments (the first call's become the reference), ``values`` per component."""
        j = weight.shape[0]
        if self.reference is None:
            self.reference = z.clone()
            perm = torch.arange(j, device=z.device)
        else:
            perm = overlap_permutation(z, self.reference, j)
        occupied = (size > 0).to(weight.dtype)
        self.kept += 1
        self.weight.index_add_(0, perm, weight)
        self.size.index_add_(0, perm, size)
        self.occupied.index_add_(0, perm, occupied)
        for name in self.FIELDS:
            value = values[name]
            mask = occupied.reshape(-1, *([1] * (value.dim() - 1)))
            getattr(self, name).index_add_(0, perm, value * mask)
        self.alpha += float(alpha)
        self.n_occupied += float(occupied.sum())

    def means(self) -> dict[str, Tensor | float]:
        """Posterior means (per-component parameters over the sweeps where the component was occupied)."""
        kept = max(self.kept, 1)
        seen = self.occupied.clamp_min(1)
        out: dict[str, Tensor | float] = {
            "weight": self.weight / kept,
            "size": self.size / kept,
            "occupancy": self.occupied / kept,
            "alpha": self.alpha / kept,
            "n_occupied": self.n_occupied / kept,
        }
        for name in self.FIELDS:
            value = getattr(self, name)
            out[name] = value / seen.reshape(-1, *([1] * (value.dim() - 1)))
        return out

    def state_dict(self) -> dict:
        state = {name: getattr(self, name).cpu().clone() for name in ("weight", "size", "occupied", *self.FIELDS)}
        state.update(
            kept=self.kept,
            reference=None if self.reference is None else self.reference.cpu().clone(),
            alpha=self.alpha,
            n_occupied=self.n_occupied,
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        device = self.weight.device
        for name in ("weight", "size", "occupied", *self.FIELDS):
            setattr(self, name, state[name].to(device=device, dtype=self.weight.dtype).clone())
        self.kept = int(state["kept"])
        self.reference = None if state["reference"] is None else state["reference"].to(device).clone()
        self.alpha = float(state["alpha"])
        self.n_occupied = float(state["n_occupied"])
