"""The state of the DMM-MEN Markov chain and the data as the sampler sees them, with their sufficient statistics.

The most expensive quantities of a sweep after the Cholesky factorisations are the per-component Gram matrices
``X_jᵀX_j``: recomputing them for every component every sweep costs ``n·p²`` flops and about doubles the sweep at the
paper's size (n = 7,000, p = 300: 24 ms against 10–14 ms per sweep in the research notes' prototype). Once the chain
has settled only a few percent of the rows change component per sweep, so
:func:`update_statistics` moves just those rows (a signed rank-m update per touched component) and obtains the
component with the most changes by subtraction from the full ``XᵀX``; it falls back to :func:`recompute_statistics`
when more rows move than that saves.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


@dataclass
class Priors:
    """Hyper-parameters: gamma priors are ``(shape, rate)``; ``sigma`` is the inverse-gamma ``(shape, scale)``.

    ``lambda1``/``lambda2`` given as a single float are fixed at that value instead of sampled.
    """

    alpha: tuple[float, float]
    sigma: tuple[float, float]
    lambda1: tuple[float, float] | float
    lambda2: tuple[float, float] | float


@dataclass
class Design:
    """The data as the sampler uses it: centred inputs with a trailing column of ones (if ``intercept``)."""

    x: Tensor  # (n, q)
    y: Tensor  # (n,)
    xy: Tensor  # (n, q) rows x_i·y_i
    y2: Tensor  # (n,)
    gram: Tensor  # (q, q) full XᵀX
    p: int  # penalised coordinates: the first p columns
    intercept: bool
    v0: float  # prior variance of the intercept


@dataclass
class ChainState:
    """Every quantity of the Markov chain, plus the sufficient statistics derived from ``z``."""

    z: Tensor  # (n,) long
    counts: Tensor  # (J,) float
    gram: Tensor  # (J, q, q)
    xty: Tensor  # (J, q)
    yty: Tensor  # (J,)
    log_pi: Tensor  # (J,)
    log1m_mu: Tensor  # (J - 1,)
    alpha: Tensor  # ()
    c: Tensor  # (J,) long
    log_w: Tensor  # (K,)
    lam1: Tensor  # (K,)
    lam2: Tensor  # (K,)
    log_step: Tensor  # (2, K) log random-walk step sizes of log λ1, log λ2
    beta: Tensor  # (J, q) current draw
    beta_mean: Tensor  # (J, q) conditional mean of the last β draw (Rao–Blackwellised averages)
    u: Tensor  # (J, p)
    sigma2: Tensor  # (J,)
    sweep: int = 0
    accepted: Tensor | None = None  # (3,) σ², λ1, λ2 acceptances in the current fit call
    tried: Tensor | None = None  # (3,)

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}


@dataclass
class Timer:
    """Wall time per step of the sweep, if enabled (synchronising CUDA so the split is meaningful)."""

    enabled: bool = False
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def __call__(self, name: str, device: torch.device):
        if not self.enabled:
            yield
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[name] += time.perf_counter() - start


def make_design(x: Tensor, y: Tensor, x_mean: Tensor, y_mean: Tensor, intercept: bool, v0: float) -> Design:
    """Centre the data by the given means and append the intercept column."""
    xc = x - x_mean
    if intercept:
        xc = torch.cat([xc, torch.ones_like(xc[:, :1])], dim=1)
    yc = y - y_mean
    return Design(xc, yc, xc * yc[:, None], yc * yc, xc.T @ xc, x.shape[1], intercept, v0)


# ----------------------------------------------------------------------------------------------- sufficient statistics
def recompute_statistics(state: ChainState, design: Design, z: Tensor) -> None:
    """Set ``z`` and recompute every per-component Gram matrix from scratch (largest one by subtraction)."""
    j = state.gram.shape[0]
    sizes = torch.bincount(z, minlength=j)
    order = torch.argsort(z, stable=True)
    xs = design.x[order]
    sizes_list = sizes.tolist()
    largest = max(range(j), key=sizes_list.__getitem__)
    start = 0
    for k, size in enumerate(sizes_list):
        if k != largest:
            torch.mm(xs[start : start + size].T, xs[start : start + size], out=state.gram[k])
        start += size
    _gram_by_subtraction(state, design, largest)
    state.xty.zero_().index_add_(0, z, design.xy)
    state.yty.zero_().index_add_(0, z, design.y2)
    _finish_statistics(state, z, sizes, sizes_list)


def update_statistics(state: ChainState, design: Design, z: Tensor) -> None:
    """Move the rows whose component changed between ``state.z`` and ``z`` in the Gram matrices, or recompute."""
    j = state.gram.shape[0]
    changed = (z != state.z).nonzero().squeeze(1)
    m = changed.numel()
    if m == 0:
        return
    old, new = state.z[changed], z[changed]
    touched = torch.bincount(old, minlength=j) + torch.bincount(new, minlength=j)
    sizes = torch.bincount(z, minlength=j)
    touched_list, sizes_list = touched.tolist(), sizes.tolist()
    skip = max(range(j), key=touched_list.__getitem__)
    if 2 * m - touched_list[skip] > z.numel() - max(sizes_list):
        recompute_statistics(state, design, z)
        return
    labels = torch.cat([new, old])
    order = torch.argsort(labels, stable=True)
    labels = labels[order]
    rows = torch.cat([changed, changed])[order]
    sign = torch.ones(2 * m, dtype=design.x.dtype, device=design.x.device)
    sign[m:] = -1
    sign = sign[order]
    xs = design.x[rows]
    signed = xs * sign[:, None]
    start = 0
    for k, size in enumerate(touched_list):
        if k != skip and size:
            state.gram[k].addmm_(xs[start : start + size].T, signed[start : start + size])
        start += size
    _gram_by_subtraction(state, design, skip)
    state.xty.index_add_(0, labels, design.xy[rows] * sign[:, None])
    state.yty.index_add_(0, labels, design.y2[rows] * sign)
    _finish_statistics(state, z, sizes, sizes_list)


def _gram_by_subtraction(state: ChainState, design: Design, k: int) -> None:
    """``X_kᵀX_k = XᵀX − Σ_{j≠k} X_jᵀX_j``."""
    others = state.gram.sum(0).sub_(state.gram[k])
    torch.sub(design.gram, others, out=state.gram[k])


def _finish_statistics(state: ChainState, z: Tensor, sizes: Tensor, sizes_list: list[int]) -> None:
    state.z = z
    state.counts = sizes.to(state.sigma2.dtype)
    for k, size in enumerate(sizes_list):
        if size == 0:  # exact zeros, so the rounding of past updates cannot linger
            state.gram[k].zero_()
            state.xty[k].zero_()
            state.yty[k].zero_()
