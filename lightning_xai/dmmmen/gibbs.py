"""One blocked Gibbs sweep of DMM-MEN, batched over the J mixture components.

Model (Guo et al., NeurIPS 2018, arXiv:1811.03422, written here from the equations; the intercept is this package's):

* ``y_i | z_i = j ~ N(x_i·β_j + b_j, σ_j²)``; ``P(z_i = j) = π_j`` by truncated stick-breaking,
  ``π_j = μ_j·Π_{l<j}(1 − μ_l)``, ``μ_j ~ Beta(1, α)`` for ``j < J``, ``α ~ Gamma(e, f)``;
* component ``j`` uses elastic net ``c_j ~ Cat(w)``, ``w ~ Dir(1/K, …, 1/K)``, with
  ``p(β_j | σ_j², c_j = k) ∝ exp{−(λ_k1‖β_j‖₁ + λ_k2‖β_j‖²)/(2σ_j²)}`` written as Li & Lin's (2010) scale mixture
  ``β_jd ~ N(0, σ_j²/(λ_k2·(1 + u_jd)))``, ``u = 1/(τ − 1)``, ``τ ~ Gamma(1/2, λ_k1²/(8λ_k2σ_j²))`` on ``(1, ∞)``;
* ``σ_j² ~ InvGamma(a, b)``; ``λ_k1 ~ Gamma``, ``λ_k2 ~ Gamma`` (or fixed); the per-component intercept ``b_j``
  (on centred data) has a fixed wide prior ``N(0, v₀)`` and no penalty.

Order of the steps in a sweep:

1. assignments ``z`` (log-sum-exp), then the per-component Gram matrices ``X_jᵀX_j`` and ``X_jᵀy_j``, updated only from
   the rows whose component changed, the component with the most changes obtained by subtraction from the full Gram
   (or everything recomputed, when that is cheaper);
2. stick weights ``μ`` (log space) and ``α``;
3. net choices ``c`` and weights ``w``, then the penalties ``λ`` by log-scale random-walk Metropolis–Hastings; both
   with the scale variables ``u`` integrated out (the elastic-net density is normalised in closed form), so:
4. ``u | β, σ²`` is drawn next (inverse Gaussian), then ``β | u, σ²`` by one batched Cholesky, then ``σ²`` by an
   independence Metropolis–Hastings step whose gamma proposal matches the full conditional at its mode. Empty
   components instead redraw ``(σ², u, β, b)`` from the prior.

Drawing ``c`` and ``λ`` with ``u`` integrated out and redrawing ``u`` right after is a valid partially collapsed Gibbs
step and mixes better than conditioning on ``u`` (the authors' R code conditions on it, and leaves out the λ priors).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from lightning_xai.dmmmen import sampling as S

ADAPT_TARGET = 0.35  # acceptance the penalty random walks are tuned towards during burn-in


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


# -------------------------------------------------------------------------------------------------------------- steps
def component_log_likelihood(design: Design, beta: Tensor, sigma2: Tensor) -> Tensor:
    """``log N(y_i | x_i·β_j, σ_j²)`` up to the constant, shape (n, J)."""
    resid = torch.addmm(design.y[:, None], design.x, beta.T, alpha=-1)
    return resid.square_().mul_(-0.5 / sigma2).sub_(0.5 * sigma2.log())


def sample_assignments(state: ChainState, design: Design, gen: torch.Generator) -> Tensor:
    """Draw every ``z_i`` from ``∝ π_j·N(y_i | x_i·β_j, σ_j²)``."""
    return S.categorical(state.log_pi + component_log_likelihood(design, state.beta, state.sigma2), gen)


def sample_sticks(state: ChainState, priors: Priors, gen: torch.Generator) -> None:
    """``μ_j ~ Beta(1 + n_j, α + Σ_{l>j} n_l)`` in log space, then ``π``; then ``α | μ``."""
    n = state.counts
    j = n.shape[0]
    if j > 1:
        after = n.flip(0).cumsum(0).flip(0)[1:]
        log_mu, log1m = S.log_beta_pair(1 + n[:-1], state.alpha + after, gen)
        state.log1m_mu = log1m
        before = torch.cat([log1m.new_zeros(1), log1m.cumsum(0)])
        state.log_pi = torch.cat([log_mu, log_mu.new_zeros(1)]) + before
    shape = torch.full_like(state.alpha, priors.alpha[0] + j - 1)
    rate = priors.alpha[1] - state.log1m_mu.sum()
    state.alpha = S.log_gamma(shape, gen).exp() / rate


def _elastic_net_table(state: ChainState, p: int, lam1: Tensor, lam2: Tensor) -> Tensor:
    """``log EN(β_j | σ_j², λ_k)`` for every component j and net k, shape (J, K)."""
    b = state.beta[:, :p]
    abs_sum, sq_sum = b.abs().sum(1, keepdim=True), b.square().sum(1, keepdim=True)
    return S.log_elastic_net(abs_sum, sq_sum, state.sigma2[:, None], lam1, lam2, p)


def sample_nets_and_penalties(
    state: ChainState, design: Design, priors: Priors, gen: torch.Generator, adapt_gain: float | None
) -> None:
    """Net choices, net weights, then the penalties, all with the scale variables integrated out.

    ``c_j ∝ w_k·EN(β_j | σ_j², λ_k)``; ``w ~ Dir(1/K + counts)``; then random-walk MH on ``log λ_k1`` and on
    ``log λ_k2`` for all nets at once, the target being the gamma prior (with the log-scale Jacobian) times the
    elastic-net densities of the components that use the net.
    """
    k = state.lam1.shape[0]
    table = _elastic_net_table(state, design.p, state.lam1, state.lam2)
    if k > 1:
        state.c = S.categorical(state.log_w + table, gen)
        conc = 1.0 / k + torch.bincount(state.c, minlength=k).to(state.log_w.dtype)
        state.log_w = S.log_dirichlet(conc, gen)
        member = torch.nn.functional.one_hot(state.c, k).to(table.dtype)
    else:
        member = torch.ones_like(table)
    current = (table * member).sum(0)
    for which, prior in ((0, priors.lambda1), (1, priors.lambda2)):
        if not isinstance(prior, tuple):
            continue
        lam = state.lam1 if which == 0 else state.lam2
        proposal = lam * (state.log_step[which].exp() * S.normal(lam.shape, lam, gen)).exp()
        pair = (proposal, state.lam2) if which == 0 else (state.lam1, proposal)
        proposed = (_elastic_net_table(state, design.p, *pair) * member).sum(0)
        log_prior_ratio = prior[0] * (proposal / lam).log() - prior[1] * (proposal - lam)
        accept = S.uniform(lam.shape, lam, gen).log() < proposed - current + log_prior_ratio
        current = torch.where(accept, proposed, current)
        if which == 0:
            state.lam1 = torch.where(accept, proposal, lam)
        else:
            state.lam2 = torch.where(accept, proposal, lam)
        acc = accept.to(lam.dtype)
        state.accepted[1 + which] += acc.sum()
        state.tried[1 + which] += k
        if adapt_gain is not None:
            state.log_step[which] += adapt_gain * (acc - ADAPT_TARGET)


def sample_parameters(
    state: ChainState, design: Design, priors: Priors, gen: torch.Generator, occupied: list[int], empty: list[int]
) -> None:
    """Occupied components: ``u``, then ``β`` (batched Cholesky), then ``σ²`` (MH). Empty ones: a prior draw."""
    if occupied:
        _sample_occupied(state, design, priors, gen, torch.tensor(occupied, device=state.z.device))
    if empty:
        _sample_empty(state, design, priors, gen, torch.tensor(empty, device=state.z.device))


def _sample_occupied(state: ChainState, design: Design, priors: Priors, gen: torch.Generator, idx: Tensor) -> None:
    p, q = design.p, design.x.shape[1]
    lam1, lam2 = state.lam1[state.c[idx]], state.lam2[state.c[idx]]
    sigma2 = state.sigma2[idx]
    # scale variables: 1/(τ − 1) ~ IG(λ1/(2λ2|β|), λ1²/(4λ2σ²))
    inv_mean = (2 * lam2 / lam1)[:, None] * state.beta[idx, :p].abs()
    u = S.inverse_gaussian(inv_mean, (lam1 * lam1 / (4 * lam2 * sigma2))[:, None], gen).clamp_(S.U_MIN, S.U_MAX)
    # coefficients: N(A⁻¹Xᵀy, σ²A⁻¹), A = XᵀX + diag(λ2(1 + u), σ²/v₀)
    added = torch.empty_like(state.beta[idx])
    added[:, :p] = lam2[:, None] * (1 + u)
    if design.intercept:
        added[:, p] = sigma2 / design.v0
    precision = state.gram[idx]
    precision.diagonal(dim1=-2, dim2=-1).add_(added)
    chol, info = torch.linalg.cholesky_ex(precision)
    if bool((info != 0).any()):  # numerically indefinite: add jitter relative to the diagonal, once
        jitter = 1e-10 * precision.diagonal(dim1=-2, dim2=-1)
        precision.diagonal(dim1=-2, dim2=-1).add_(jitter)
        added += jitter
        chol = torch.linalg.cholesky(precision)
    # mean = L⁻ᵀL⁻¹·Xᵀy and the draw mean + σ·L⁻ᵀε from one forward and one two-column backward solve
    half = torch.linalg.solve_triangular(chol, state.xty[idx][..., None], upper=False)
    noise = S.normal((idx.numel(), q, 1), sigma2, gen).mul_(sigma2.sqrt()[:, None, None])
    both = torch.linalg.solve_triangular(chol.mT, torch.cat([half, half + noise], dim=2), upper=True)
    mean, beta = both[..., 0], both[..., 1]
    # variance: independence MH in η = log(1/σ²) with a gamma proposal matched to the full conditional
    gram_beta = (precision @ beta[..., None]).squeeze(-1) - added * beta  # X_jᵀX_j·β
    rss = state.yty[idx] - 2 * (beta * state.xty[idx]).sum(1) + (beta * gram_beta).sum(1)
    ridge = (added[:, :p] * beta[:, :p].square()).sum(1)  # λ2·Σ(1 + u)β²
    c = lam1 * lam1 / (8 * lam2)
    shape = state.counts[idx].mul(0.5).add_(priors.sigma[0] + p)
    scale = (rss.clamp_min(0) + ridge).mul_(0.5).add_(c * u.reciprocal().sum(1)).add_(priors.sigma[1])
    prop_shape, prop_rate = S.sigma2_proposal(shape, scale, c, p)
    eta = torch.stack([S.log_gamma(prop_shape, gen) - prop_rate.log(), -sigma2.log()])  # proposed, current
    excess = S.log_sigma_target(eta, shape, scale, c, p) - (prop_shape * eta - prop_rate * eta.exp())
    accept = S.uniform(shape.shape, shape, gen).log_() < excess[0] - excess[1]
    eta_new = eta[0]
    state.u[idx] = u
    state.beta[idx] = beta
    state.beta_mean[idx] = mean
    state.sigma2[idx] = torch.where(accept, (-eta_new).exp(), sigma2)
    state.accepted[0] += accept.sum()
    state.tried[0] += accept.numel()


def _sample_empty(state: ChainState, design: Design, priors: Priors, gen: torch.Generator, idx: Tensor) -> None:
    p, q = design.p, design.x.shape[1]
    lam1, lam2 = state.lam1[state.c[idx]], state.lam2[state.c[idx]]
    shape = torch.full((idx.numel(),), priors.sigma[0], dtype=state.sigma2.dtype, device=state.sigma2.device)
    sigma2 = (math.log(priors.sigma[1]) - S.log_gamma(shape, gen)).exp()
    sigma2 = sigma2.clamp(1e-200, 1e200)
    rate = (lam1 * lam1 / (8 * lam2 * sigma2))[:, None].expand(-1, p).contiguous()
    u = S.scale_prior(rate, gen)
    noise = S.normal((idx.numel(), q), sigma2, gen)
    beta = torch.empty_like(noise)
    beta[:, :p] = noise[:, :p] * torch.sqrt(sigma2[:, None] / (lam2[:, None] * (1 + u)))
    if design.intercept:
        beta[:, p] = noise[:, p] * design.v0**0.5
    state.sigma2[idx], state.u[idx], state.beta[idx], state.beta_mean[idx] = sigma2, u, beta, beta


def sweep(
    state: ChainState,
    design: Design,
    priors: Priors,
    gen: torch.Generator,
    adapt_gain: float | None = None,
    timer: Timer | None = None,
) -> None:
    """One full blocked Gibbs sweep, in place. ``adapt_gain`` tunes the penalty random walks (burn-in only)."""
    timer = timer or Timer()
    device = state.z.device
    with timer("assignments", device):
        z = sample_assignments(state, design, gen)
    with timer("gram", device):
        update_statistics(state, design, z)
    with timer("sticks", device):
        sample_sticks(state, priors, gen)
    with timer("nets+penalties", device):
        sample_nets_and_penalties(state, design, priors, gen, adapt_gain)
    with timer("parameters", device):
        sizes = state.counts.tolist()
        occupied = [k for k, n in enumerate(sizes) if n > 0]
        empty = [k for k, n in enumerate(sizes) if n == 0]
        sample_parameters(state, design, priors, gen, occupied, empty)
    state.sweep += 1
