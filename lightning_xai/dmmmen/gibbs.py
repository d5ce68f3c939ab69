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
   components instead redraw ``(σ², β, b)`` from the prior (``β`` from the elastic net directly, ``u`` integrated
   out: nothing would use it).

Drawing ``c`` and ``λ`` with ``u`` integrated out and redrawing ``u`` right after is a valid partially collapsed Gibbs
step and mixes better than conditioning on ``u`` (the authors' R code conditions on it, and leaves out the λ priors).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_xai.dmmmen import sampling as S
from lightning_xai.dmmmen.state import ChainState, Design, Priors, Timer, update_statistics

ADAPT_TARGET = 0.35  # acceptance the penalty random walks are tuned towards during burn-in


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
    state: ChainState,
    design: Design,
    priors: Priors,
    gen: torch.Generator,
    occupied: list[int],
    empty: list[int],
    timer: Timer | None = None,
) -> None:
    """Occupied components: ``u``, then ``β`` (batched Cholesky), then ``σ²`` (MH). Empty ones: a prior draw."""
    timer = timer or Timer()
    device = state.z.device
    if occupied:
        idx = torch.tensor(occupied, device=device)
        lam1, lam2 = state.lam1[state.c[idx]], state.lam2[state.c[idx]]
        sigma2 = state.sigma2[idx]
        with timer("scales", device):
            u = _draw_scales(state.beta[idx, : design.p], sigma2, lam1, lam2, gen)
        with timer("coefficients", device):
            quadratic, added, mean, beta = _draw_coefficients(state, design, idx, u, sigma2, lam2, gen)
        with timer("variances", device):
            new_sigma2 = _draw_variances(state, design, priors, idx, u, sigma2, lam1, lam2, quadratic, added, beta, gen)
        state.u[idx], state.beta[idx], state.beta_mean[idx], state.sigma2[idx] = u, beta, mean, new_sigma2
    if empty:
        with timer("empty", device):
            _sample_empty(state, design, priors, gen, torch.tensor(empty, device=device))


def _draw_scales(beta: Tensor, sigma2: Tensor, lam1: Tensor, lam2: Tensor, gen: torch.Generator) -> Tensor:
    """``u = 1/(τ − 1) ~ IG(λ1/(2λ2|β|), λ1²/(4λ2σ²))`` per coefficient (Li & Lin's Gibbs step)."""
    inv_mean = (2 * lam2 / lam1)[:, None] * beta.abs()
    return S.inverse_gaussian(inv_mean, (lam1 * lam1 / (4 * lam2 * sigma2))[:, None], gen).clamp_(S.U_MIN, S.U_MAX)


def _draw_coefficients(
    state: ChainState, design: Design, idx: Tensor, u: Tensor, sigma2: Tensor, lam2: Tensor, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``β ~ N(A⁻¹Xᵀy, σ²A⁻¹)`` with ``A = XᵀX + diag(λ2(1 + u), σ²/v₀)``, batched over the components ``idx``.

    Returns ``βᵀAβ`` (``= ‖Lᵀβ‖²``, the right-hand side of the last solve, for free), the diagonal added to
    ``X_jᵀX_j``, the conditional mean and the draw.
    """
    p, q = design.p, design.x.shape[1]
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
    rhs = torch.cat([half, half + noise], dim=2)
    both = torch.linalg.solve_triangular(chol.mT, rhs, upper=True)
    return rhs[..., 1].square().sum(1), added, both[..., 0], both[..., 1]


def _draw_variances(
    state: ChainState,
    design: Design,
    priors: Priors,
    idx: Tensor,
    u: Tensor,
    sigma2: Tensor,
    lam1: Tensor,
    lam2: Tensor,
    quadratic: Tensor,
    added: Tensor,
    beta: Tensor,
    gen: torch.Generator,
) -> Tensor:
    """Independence MH for ``σ²`` in ``η = log(1/σ²)``, gamma proposal matched to the full conditional."""
    p = design.p
    added_beta2 = added * beta.square()
    ridge = added_beta2[:, :p].sum(1)  # λ2·Σ(1 + u)β²
    # RSS = yᵀy − 2βᵀXᵀy + βᵀXᵀXβ, with βᵀXᵀXβ = βᵀAβ − Σ added·β²
    rss = state.yty[idx] - 2 * (beta * state.xty[idx]).sum(1) + quadratic - added_beta2.sum(1)
    c = lam1 * lam1 / (8 * lam2)
    shape = state.counts[idx].mul(0.5).add_(priors.sigma[0] + p)
    scale = (rss.clamp_min(0) + ridge).mul_(0.5).add_(c * u.reciprocal().sum(1)).add_(priors.sigma[1])
    prop_shape, prop_rate = S.sigma2_proposal(shape, scale, c, p)
    eta = torch.stack([S.log_gamma(prop_shape, gen) - prop_rate.log(), -sigma2.log()])  # proposed, current
    excess = S.log_sigma_target(eta, shape, scale, c, p) - (prop_shape * eta - prop_rate * eta.exp())
    accept = S.uniform(shape.shape, shape, gen).log_() < excess[0] - excess[1]
    state.accepted[0] += accept.sum()
    state.tried[0] += accept.numel()
    return torch.where(accept, (-eta[0]).exp(), sigma2)


def _sample_empty(state: ChainState, design: Design, priors: Priors, gen: torch.Generator, idx: Tensor) -> None:
    """Prior draws ``σ² ~ InvGamma(a, b)``, ``β ~ EN(σ², λ_c)``, intercept ``~ N(0, v₀)``.

    The scale variables are not drawn: nothing uses an empty component's (the net, penalty and assignment steps see
    ``β`` and ``σ²`` only, and a component that fills up draws its ``u`` from ``β`` first), so they are set to 1.
    """
    p = design.p
    lam1, lam2 = state.lam1[state.c[idx]], state.lam2[state.c[idx]]
    shape = torch.full((idx.numel(),), priors.sigma[0], dtype=state.sigma2.dtype, device=state.sigma2.device)
    sigma2 = (math.log(priors.sigma[1]) - S.log_gamma(shape, gen)).exp_().clamp_(1e-200, 1e200)
    beta = torch.empty_like(state.beta[idx])
    beta[:, :p] = S.elastic_net_prior(sigma2, lam1, lam2, p, gen)
    if design.intercept:
        beta[:, p] = S.normal((idx.numel(),), sigma2, gen).mul_(design.v0**0.5)
    state.sigma2[idx], state.beta[idx], state.beta_mean[idx] = sigma2, beta, beta
    state.u[idx] = 1.0


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
    sizes = state.counts.tolist()
    occupied = [k for k, n in enumerate(sizes) if n > 0]
    empty = [k for k, n in enumerate(sizes) if n == 0]
    sample_parameters(state, design, priors, gen, occupied, empty, timer)
    if not bool(torch.isfinite(state.beta).all() & torch.isfinite(state.sigma2).all()):
        raise FloatingPointError(f"DMM-MEN sweep {state.sweep}: non-finite coefficients or variances")
    state.sweep += 1
