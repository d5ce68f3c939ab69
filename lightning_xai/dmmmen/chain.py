"""Starting and summarising a DMM-MEN Gibbs chain: centring, the initial state, the posterior-mean components.

:class:`~lightning_xai.dmmmen.model.DMMMENSurrogate` runs the sweeps (:mod:`~lightning_xai.dmmmen.gibbs`); the
steps before the first sweep (centre the data, draw random assignments and a first parameter set) and after the last
(turn running means, or the last state, into :class:`~lightning_xai.dmmmen.outputs.Components` in the original units,
heaviest first) are plain functions of the chain's pieces, here. So is the data fingerprint that tells a warm start
on the same data from one on new data.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import Tensor

from lightning_xai.dmmmen import gibbs
from lightning_xai.dmmmen.outputs import Components
from lightning_xai.dmmmen.relabel import OnlineMeans
from lightning_xai.dmmmen.state import ChainState, Design, Priors, recompute_statistics

INTERCEPT_PRIOR_SCALE = 100.0  # intercept prior variance v₀ = this × Var(y)


def centring(x: Tensor, y: Tensor, fit_intercept: bool) -> dict[str, Any]:
    """The centring of a fresh fit: ``x_mean``, ``y_mean`` (zeros without intercept), the intercept prior variance
    ``v0``, the feature count ``p`` and a ``fingerprint`` slot (filled by the caller)."""
    if fit_intercept:
        x_mean, y_mean = x.mean(0), y.mean()
    else:
        x_mean, y_mean = torch.zeros_like(x[0]), torch.zeros_like(y[0])
    v0 = INTERCEPT_PRIOR_SCALE * max(float(y.var()), 1e-12)
    return {"x_mean": x_mean, "y_mean": y_mean, "v0": v0, "p": x.shape[1], "fingerprint": None}


def initial_state(
    design: Design,
    priors: Priors,
    n_components: int,
    n_nets: int,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> ChainState:
    """Random assignments, prior-mean hyper-parameters, then one parameter draw given the assignments (draws from
    ``gen``, tensors in ``dtype`` on ``device``)."""
    j, k = n_components, n_nets
    n, q, p = design.x.shape[0], design.x.shape[1], design.p
    like = dict(dtype=dtype, device=device)
    z = torch.randint(j, (n,), generator=gen, device=device)
    c = torch.randint(k, (j,), generator=gen, device=device)

    def start(prior: tuple[float, float] | float) -> Tensor:
        value = prior[0] / prior[1] if isinstance(prior, tuple) else prior
        return torch.full((k,), value, **like)

    state = ChainState(
        z=torch.full_like(z, -1),
        counts=torch.zeros(j, **like),
        gram=torch.zeros(j, q, q, **like),
        xty=torch.zeros(j, q, **like),
        yty=torch.zeros(j, **like),
        log_pi=torch.full((j,), -math.log(j), **like),
        log1m_mu=torch.zeros(j - 1, **like),
        alpha=torch.tensor(priors.alpha[0] / priors.alpha[1], **like),
        c=c,
        log_w=torch.full((k,), -math.log(k), **like),
        lam1=start(priors.lambda1),
        lam2=start(priors.lambda2),
        log_step=torch.full((2, k), math.log(0.5), **like),
        beta=torch.zeros(j, q, **like),
        beta_mean=torch.zeros(j, q, **like),
        u=torch.ones(j, p, **like),
        sigma2=torch.full((j,), max(float(design.y.var()), 1e-8), **like),
        accepted=torch.zeros(3, **like),
        tried=torch.zeros(3, **like),
    )
    recompute_statistics(state, design, z)
    sizes = state.counts.tolist()
    occupied = [i for i, size in enumerate(sizes) if size]
    gibbs.sample_parameters(state, design, priors, gen, occupied, [i for i in range(j) if i not in occupied])
    return state


def summarise(
    state: ChainState, means: OnlineMeans | None, centre: dict[str, Any], fit_intercept: bool, dtype: torch.dtype
) -> Components:
    """Posterior-mean components in the original units, heaviest first: from the running ``means`` of the kept
    sweeps, or from the last ``state`` when none was kept (stopped during burn-in)."""
    p = centre["p"]
    if means is not None and means.kept > 0:
        m = means.means()
    else:
        occupied = (state.counts > 0).to(dtype)
        m = {
            "weight": state.log_pi.exp(), "size": state.counts, "occupancy": occupied,
            "coef": state.beta_mean, "sigma2": state.sigma2,
            "lambda1": state.lam1[state.c], "lambda2": state.lam2[state.c],
        }
    order = torch.argsort(m["weight"], descending=True, stable=True)
    coef = m["coef"][order]
    beta = coef[:, :p]
    intercepts = centre["y_mean"] - beta @ centre["x_mean"]
    if fit_intercept:
        intercepts = intercepts + coef[:, p]
    occupied = m["occupancy"][order] >= 0.5
    occupied[0] = True
    return Components(
        weights=m["weight"][order], coefficients=beta, intercepts=intercepts, sigma2=m["sigma2"][order],
        occupied=occupied, sizes=m["size"][order], occupancy=m["occupancy"][order],
        lambda1=m["lambda1"][order], lambda2=m["lambda2"][order],
    )


def fingerprint(x: Tensor, y: Tensor) -> str:
    """A hash of the values and shapes of ``x`` and ``y`` (float64), to tell new data from the same data."""
    digest = hashlib.blake2b(digest_size=16)
    for t in (x, y):
        arr = t.detach().to("cpu", torch.float64).contiguous().numpy()
        digest.update(str(arr.shape).encode())
        digest.update(arr)
    return digest.hexdigest()
