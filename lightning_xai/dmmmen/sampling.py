"""Random draws and log densities for the DMM-MEN sampler, all from an explicit ``torch.Generator``.

The sampler must be reproducible bit for bit and must never touch the global random stream, so every draw here takes
the generator as an argument. The less common distributions are written from their definitions:

* :func:`log_gamma`: the log of a Gamma(shape, 1) draw, exact for tiny shapes (``Gamma(a) = Gamma(a + 1)·U^(1/a)``),
  because the stick-breaking and Dirichlet draws with shapes like 1/3 underflow to 0 in linear space.
* :func:`inverse_gaussian`: Michael, Schucany & Haas (1976), with the smaller root written as ``1/(1/m + …)`` so it
  neither cancels for large means nor breaks when the mean is infinite (the Lévy limit, a coefficient at exactly 0).
* :func:`elastic_net_prior`: coefficients straight from the elastic-net prior (a truncated normal in ``|β|``), for
  empty components, whose scale variables are never needed (the sampler integrates them out where it could use them).
* :func:`log_elastic_net`: the normalised Bayesian elastic-net log density of a coefficient vector; its normaliser
  ``√(2πσ²/λ₂)·erfcx(√(λ₁²/(8λ₂σ²)))`` per coordinate is summed in logs (``erfcx`` keeps it finite).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Bounds of the scale variables u = 1/(τ − 1): a coefficient's prior precision is λ₂(1 + u).
U_MIN, U_MAX = 1e-12, 1e12
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def uniform(shape: tuple[int, ...] | torch.Size, like: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform draws on (0, 1] (never 0, so their log is finite)."""
    return torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device).neg_().add_(1)


def normal(shape: tuple[int, ...] | torch.Size, like: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal draws."""
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)


def log_gamma(shape: Tensor, generator: torch.Generator) -> Tensor:
    """``log X`` for ``X ~ Gamma(shape, rate=1)``, elementwise; accurate for shapes far below 1."""
    small = shape < 1
    if not bool(small.any()):
        return torch._standard_gamma(shape, generator=generator).log_()
    draw = torch._standard_gamma(torch.where(small, shape + 1, shape), generator=generator)
    boost = uniform(shape.shape, shape, generator).log_() / shape
    return torch.where(small, draw.log() + boost, draw.log())


def log_dirichlet(concentration: Tensor, generator: torch.Generator) -> Tensor:
    """Log of a Dirichlet draw over the last dimension (log-space normalisation of log-gamma draws)."""
    logs = log_gamma(concentration, generator)
    return logs - torch.logsumexp(logs, dim=-1, keepdim=True)


def log_beta_pair(a: Tensor, b: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(log μ, log(1 − μ))`` for ``μ ~ Beta(a, b)`` elementwise, both computed without forming ``1 − μ``."""
    la, lb = log_gamma(a, generator), log_gamma(b, generator)
    total = torch.logaddexp(la, lb)
    return la - total, lb - total


def categorical(logits: Tensor, generator: torch.Generator) -> Tensor:
    """One draw per row from ``softmax(logits)`` over the last dimension (inverse CDF, one uniform per row)."""
    weights = (logits - logits.amax(-1, keepdim=True)).exp_()
    cumulative = weights.cumsum(-1)
    threshold = uniform(cumulative.shape[:-1], logits, generator).mul_(cumulative[..., -1])
    return (cumulative < threshold.unsqueeze(-1)).sum(-1).clamp_max_(logits.shape[-1] - 1)


def inverse_gaussian(inv_mean: Tensor, shape: Tensor, generator: torch.Generator) -> Tensor:
    """Draws from the inverse Gaussian with mean ``1/inv_mean`` and shape ``shape`` (broadcast together).

    ``inv_mean`` may be 0 (infinite mean): the draw is then the Lévy limit ``shape/ν²``. The transformation method of
    Michael, Schucany & Haas: with ``ν ~ N(0, 1)`` the two roots of ``λ(x − m)²/(m²x) = ν²`` are
    ``x₁ = 1/(1/m + ν²/(2λ) + √(ν⁴/(4λ²) + ν²/(λm)))`` (cancellation-free form of ``m + m²ν²/(2λ) − …``) and
    ``m²/x₁``; ``x₁`` is kept with probability ``m/(m + x₁)``.
    """
    inv_mean, shape = torch.broadcast_tensors(inv_mean, shape)
    nu2 = normal(inv_mean.shape, inv_mean, generator).square_()
    half = nu2 / (2 * shape)
    root = (half * half + nu2 * inv_mean / shape).sqrt_().add_(half).add_(inv_mean).reciprocal_()
    keep = uniform(inv_mean.shape, inv_mean, generator).mul_(root * inv_mean + 1) <= 1
    return torch.where(keep, root, (inv_mean * inv_mean * root).reciprocal_())


def elastic_net_prior(sigma2: Tensor, lam1: Tensor, lam2: Tensor, p: int, generator: torch.Generator) -> Tensor:
    """``p`` coefficients from the Bayesian elastic-net prior ``∝ exp{−(λ₁|β| + λ₂β²)/(2σ²)}`` per row (m, p).

    ``|β|`` is a normal ``N(−λ₁/(2λ₂), σ²/λ₂)`` truncated to ``(0, ∞)``: ``|β| = s·(W − a)`` with ``s = σ/√λ₂``,
    ``a = λ₁/(2σ√λ₂)`` and ``W`` a standard normal truncated to ``(a, ∞)``, drawn by inverse CDF
    (``W = −Φ⁻¹(U·Φ(−a))``) while ``Φ(−a)`` is representable, and beyond ``a = 30`` by rejection from
    ``a + Exp(a)`` (accepted with probability ``exp(−(W − a)²/2)``, > 99.9% there). The sign is a fair coin.
    """
    s = (sigma2 / lam2).sqrt()[:, None]
    a = (lam1 / (2 * (sigma2 * lam2).sqrt()))[:, None].expand(-1, p)
    u = uniform(a.shape, a, generator)
    tail = torch.special.erfc(a * (0.5**0.5)).mul_(0.5)  # Φ(−a), accurate where torch's ndtr(−a) rounds to 0
    excess = torch.special.ndtri(u * tail).neg_().sub_(a).clamp_min_(0)
    far = a > 30
    if bool(far.any()):
        excess[far] = _far_tail_excess(a[far], generator)
    sign = torch.where(uniform(a.shape, a, generator) < 0.5, -1.0, 1.0).to(a.dtype)
    return s * excess * sign


def _far_tail_excess(a: Tensor, generator: torch.Generator, candidates: int = 4) -> Tensor:
    """``W − a`` for ``W ~ N(0, 1)`` truncated to ``(a, ∞)``, ``a ≥ 30``: rejection from ``Exp(a)``."""
    out = torch.empty_like(a)
    todo = torch.arange(a.numel(), device=a.device)
    while todo.numel():
        rate = a[todo].expand(candidates, -1)
        t = uniform(rate.shape, rate, generator).log_().neg_() / rate
        ok = uniform(rate.shape, rate, generator).log_() <= -0.5 * t * t
        done = ok.any(0)
        out[todo[done]] = t.gather(0, ok.to(torch.int8).argmax(0)[None]).squeeze(0)[done]
        todo = todo[~done]
    return out


def log_erfcx_sqrt(x: Tensor) -> Tensor:
    """``log erfcx(√x)`` for ``x ≥ 0`` (``erfcx(z) = exp(z²)·erfc(z)``, finite for any ``x``)."""
    return torch.special.erfcx(x.clamp_min(0).sqrt()).log()


def log_elastic_net(
    abs_sum: Tensor, sq_sum: Tensor, sigma2: Tensor, lam1: Tensor, lam2: Tensor, p: int
) -> Tensor:
    """Normalised Bayesian elastic-net log density of coefficient vectors (broadcast over all arguments).

    ``log p(β | σ², λ₁, λ₂) = −(λ₁‖β‖₁ + λ₂‖β‖²)/(2σ²) − p·[½·log(2πσ²/λ₂) + log erfcx(√(λ₁²/(8λ₂σ²)))]``, with
    ``abs_sum = ‖β‖₁`` and ``sq_sum = ‖β‖²`` over the ``p`` penalised coordinates.
    """
    energy = (lam1 * abs_sum + lam2 * sq_sum) / (2 * sigma2)
    log_norm = _LOG_SQRT_2PI + 0.5 * torch.log(sigma2 / lam2) + log_erfcx_sqrt(lam1 * lam1 / (8 * lam2 * sigma2))
    return -energy - p * log_norm


def _normaliser_slopes(z: Tensor) -> tuple[Tensor, Tensor]:
    """``t = z·L′(z)/2`` and ``v = z²·L″(z)/4 + z·L′(z)/4`` for ``L = log erfcx`` and ``z ≥ 0``.

    They are the first and second derivatives of ``L(√(c·e^η))`` in ``η``. With ``r = 1/(√π·erfcx(z))``,
    ``L′ = 2(z − r)`` and ``L″ = 2 + 4r(z − r)``; beyond ``z = 30`` that cancels, and the asymptotic series
    ``t ≈ −1/2 + 1/(2z²) − 5/(4z⁴)``, ``v ≈ −1/(2z²) + 5/(2z⁴)`` is used instead.
    """
    r = torch.special.erfcx(z).mul_(math.sqrt(math.pi)).reciprocal_()
    t = z * (z - r)
    v = (z * z) * (r * (z - r) + 0.5) + 0.5 * t
    far = z > 30
    if bool(far.any()):
        zi2 = (z * z).clamp_min(1.0).reciprocal()
        t = torch.where(far, zi2 * (0.5 - 1.25 * zi2) - 0.5, t)
        v = torch.where(far, zi2 * (2.5 * zi2 - 0.5), v)
    return t, v


def log_sigma_target(eta: Tensor, shape: Tensor, scale: Tensor, c: Tensor, p: int) -> Tensor:
    """Log full conditional of ``η = log(1/σ²)`` (see :func:`sigma2_proposal`), up to a constant."""
    s = eta.exp()
    return shape * eta - scale * s - p * log_erfcx_sqrt(c * s)


def sigma2_proposal(shape: Tensor, scale: Tensor, c: Tensor, p: int, newton_steps: int = 1) -> tuple[Tensor, Tensor]:
    """Gamma ``(shape, rate)`` for the precision ``s = 1/σ²``, matched to its full conditional at the mode.

    In ``η = log s`` the full conditional is ``G(η) = A·η − B·e^η − p·log erfcx(√(c·e^η))``: the conjugate part
    ``s^A·e^(−Bs)`` times the elastic-net normaliser of the ``p`` scale variables (``c = λ₁²/(8λ₂)``). Damped Newton
    steps from the conjugate mode ``log(A/B)`` approach the mode of ``G`` (one is plenty: with ``A ≥ p`` the normaliser
    barely moves it); the returned gamma has the same first and second ``η``-derivatives as ``G`` at the last point.
    An independence Metropolis–Hastings step with it is accepted > 99% of the time, against 5–18% for the conjugate
    part alone.
    """
    eta = torch.log(shape / scale)
    for step in range(newton_steps + 1):
        s = eta.exp()
        t, v = _normaliser_slopes(torch.sqrt(c * s))
        grad = shape - scale * s - p * t
        curv = torch.minimum(-scale * s - p * v, -1e-3 * shape)
        if step == newton_steps:
            break
        eta = eta - (grad / curv).clamp_(-2.0, 2.0)
    rate = -curv / s
    return (grad + rate * s).clamp_min(1e-3 * shape), rate
