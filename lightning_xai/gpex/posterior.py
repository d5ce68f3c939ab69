"""The GP posterior of GPEX as data, and the matching step's two posteriors with their analytic gradient.

:class:`GPEXPrediction` (the posterior of the L head GPs at a batch of queries) and :class:`MatchOutput` (what one
matching step computed) are what :class:`~lightning_xai.gpex.surrogate.GPEXSurrogate` returns.
:class:`_MatchingPosterior` solves the matching step's query posterior and leave-batch-out posterior together and
differentiates them by hand; it is kept apart from the surrogate because it is pure float64 linear algebra on
heads-first tensors, with its own derivation (in its docstring) and its own gradient test.
"""

from __future__ import annotations

from dataclasses import dataclass

import gpytorch
import torch
from linear_operator.operators import DiagLinearOperator, LowRankRootLinearOperator

from lightning_xai.gpex.cache import RowSwap

__all__ = ["GPEXPrediction", "MatchOutput"]


@dataclass
class GPEXPrediction:
    """Posterior of the L head GPs at B query points (float64).

    Attributes:
        mean: (B, L) posterior means μ_ℓ(x).
        variance: (B, L) posterior variances of the latent function (no observation noise).
        root: (L, B, D) root R of each head's joint posterior covariance ``RRᵀ`` over the B points (rank ≤ D).
    """

    mean: torch.Tensor
    variance: torch.Tensor
    root: torch.Tensor

    @property
    def distribution(self) -> gpytorch.distributions.MultivariateNormal:
        """A batch of L ``MultivariateNormal`` over the B points, with the exact low-rank joint covariance."""
        return gpytorch.distributions.MultivariateNormal(self.mean.T, LowRankRootLinearOperator(self.root))

    @property
    def marginals(self) -> gpytorch.distributions.MultitaskMultivariateNormal:
        """A ``MultitaskMultivariateNormal`` with event shape (B, L) and diagonal covariance (independent marginals)."""
        mvn = gpytorch.distributions.MultivariateNormal(self.mean.T, DiagLinearOperator(self.variance.T))
        return gpytorch.distributions.MultitaskMultivariateNormal.from_batch_mvn(mvn, task_dim=-1)


@dataclass
class MatchOutput:
    """What one matching step computed.

    Attributes:
        loss: Scalar matching loss (carries gradient into the kernel net).
        prediction: Posterior at the mixed queries under ``G_eff, c_eff``.
        inducing_features: (B, L, D) detached f(x̃_I) of the inducing batch, or None; they can be written to the
            cache with :meth:`GPEXSurrogate.update_rows` without another forward pass (one optimiser step stale).
        swap: the cache's :class:`~lightning_xai.gpex.cache.RowSwap` for the inducing batch, or None; pass it to
            :meth:`GPEXSurrogate.update_rows` with those rows and the write reuses its change of G and c.
    """

    loss: torch.Tensor
    prediction: GPEXPrediction
    inducing_features: torch.Tensor | None
    swap: RowSwap | None = None


class _MatchingPosterior(torch.autograd.Function):
    """The two posteriors of a matching step, differentiated analytically in the features (means only).

    Per head, with the batch's new rows ``u_b`` (targets ``v_b``) and the sums ``G₀, c₀`` without the batch:

    * the queries ``u_q`` under ``A = G₀ + Σ_b u_b u_bᵀ + σ²I`` and ``c = c₀ + Σ_b u_b v_b``: ``μ_q = u_qᵀA⁻¹c``;
    * the batch's own examples under ``A₀ = G₀ + σ²I``, ``c₀`` (leave-batch-out): ``μ_b = u_bᵀA₀⁻¹c₀``;

    with variances ``σ²uᵀA⁻¹u`` (not differentiated: the matching loss stops the gradient there). With ``w = A⁻¹c``,
    ``w₀ = A₀⁻¹c₀``, upstream gradients ``ḡ_q, ḡ_b`` and ``z = A⁻¹ Σ_q ḡ_q u_q``, the chain rule through ``A`` and
    ``c`` collapses to per-row products::

        ∂/∂u_q = ḡ_q w          ∂/∂u_b = ḡ_b w₀ + z (v_b − wᵀu_b) − w (zᵀu_b)

    so the backward is one Cholesky solve and elementwise work, where autograd through the Gram products, the
    Cholesky factorisation and the triangular solves would run dozens of small float64 kernels.

    Inputs: ``u_q`` (L, D, n) and ``u_b`` (L, D, B) float64 heads-first; ``g_with``, ``g_without`` (L, D, D) and
    ``c_with``, ``c_without`` (L, D), where the caller guarantees ``g_with = g_without + Σ_b u_b u_bᵀ`` and
    ``c_with = c_without + Σ_b u_b v_b`` (a :class:`~lightning_xai.gpex.cache.RowSwap`); ``v_b`` (L, B); ``noise``.
    Outputs (heads-first): ``mean_q`` (L, n), ``mean_b`` (L, B), and, not differentiable, ``var_q``, ``var_b`` and
    ``y_q = L⁻¹u_q`` (L, D, n; ``A = LLᵀ``, so ``σy_q`` is a root of the queries' joint posterior covariance).
    """

    @staticmethod
    def forward(ctx, u_q, u_b, g_with, c_with, g_without, c_without, v_b, noise):  # noqa: ANN001, ANN205
        heads, dim, n = u_q.shape
        b = u_b.shape[2]
        eye = torch.eye(dim, dtype=torch.float64, device=u_q.device)
        chol = torch.linalg.cholesky(torch.cat([g_with, g_without]) + noise * eye)  # (2L, D, D)
        queries = u_q.new_zeros(2 * heads, dim, max(n, b) + 1)  # both systems' queries, padded; then c
        queries[:heads, :, :n] = u_q
        queries[heads:, :, :b] = u_b
        queries[:, :, -1] = torch.cat([c_with, c_without])
        y = torch.linalg.solve_triangular(chol, queries, upper=False)
        yu, yc = y[..., :-1], y[..., -1:]
        mean = (yu * yc).sum(1)
        variance = noise * (yu * yu).sum(1)
        w = torch.linalg.solve_triangular(chol.mT, yc, upper=True).squeeze(-1)  # (2L, D): A⁻¹c, A₀⁻¹c₀
        ctx.save_for_backward(chol[:heads], w, u_q, u_b, v_b)
        var_q, var_b, y_q = variance[:heads, :n], variance[heads:, :b], yu[:heads, :, :n]
        ctx.mark_non_differentiable(var_q, var_b, y_q)
        return mean[:heads, :n], mean[heads:, :b], var_q, var_b, y_q

    @staticmethod
    def backward(ctx, grad_q, grad_b, *_non_differentiable):  # noqa: ANN001, ANN205
        chol, w2, u_q, u_b, v_b = ctx.saved_tensors
        w, w0 = w2[: chol.shape[0]].unsqueeze(-1), w2[chol.shape[0] :].unsqueeze(-1)  # (L, D, 1)
        grad_u_q = w * grad_q.unsqueeze(1)
        z = torch.cholesky_solve(torch.bmm(u_q, grad_q.unsqueeze(-1)), chol)  # (L, D, 1)
        w_u = (w * u_b).sum(1, keepdim=True)  # (L, 1, B)
        z_u = (z * u_b).sum(1, keepdim=True)
        grad_u_b = w0 * grad_b.unsqueeze(1) + z * (v_b.unsqueeze(1) - w_u) - w * z_u
        return grad_u_q, grad_u_b, None, None, None, None, None, None
