"""The GPEX surrogate: one finite-rank GP per output head, conditioned on every training example.

GPEX (Akbarnejad, Bigras & Ray, arXiv:2112.09820) explains a network g with L outputs by L Gaussian processes with
kernels ``k_ℓ(x, x') = f_ℓ(x)ᵀ f_ℓ(x')`` (:mod:`lightning_xai.gpex.kernel`). Every training example x̃_m is an
inducing point with target ṽ_m = g(x̃_m), and f is trained so that the GP posterior mean matches g. With
``U_ℓ`` the (M, D) feature rows and ``V_ℓ`` the targets, the push-through identity gives, per head,

* ``μ_ℓ(x) = uᵀ (G_ℓ + σ²I)⁻¹ c_ℓ`` and ``var_ℓ(x) = σ² uᵀ (G_ℓ + σ²I)⁻¹ u``, with ``G = UᵀU``, ``c = UᵀV``,

which equals the paper's M×M expressions exactly while costing O(L·(B·D² + D³)) per batch whatever M is.
:class:`~lightning_xai.gpex.cache.InducingCache` keeps G and c current under row writes. The D×D systems are
solved with a float64 Cholesky factor (no ``eigh``, whose gradient is undefined when eigenvalues coincide, as they
do for an empty cache).

Training f (:meth:`GPEXSurrogate.match`) follows the authors' released code: the loss is the uncertainty-weighted
squared error ``½(g − μ)²/sg(var) + ½ log sg(var)`` summed over heads and averaged over the batch, with ``var``
clamped to [1e-5, 5] and detached (sg = stop-gradient); the query batch is a mixture of training examples
(:meth:`GPEXSurrogate.mix`) so that it does not coincide with its own inducing points; and gradients reach f only
through the query features and the rows of one batch of inducing examples recomputed with gradient
(``G_eff = sg(G − U_IᵀU_I) + f(x̃_I)ᵀf(x̃_I)``, ``c_eff`` likewise), never through the other M − B stale rows.
One addition, off with ``holdout_weight=0``: the same loss at the batch's clean examples, predicted by the GP with
the batch's rows left out, which the mixing only approximates (a small, nearly free gain in fidelity). Both
posteriors of a step are solved together and differentiated analytically (:class:`_MatchingPosterior`): since the
variance is a constant of the loss, the gradient through ``G_eff``, ``c_eff`` and the Cholesky factor reduces to one
more solve and per-row products.

**Noise and scale.** Only ``σ²/scale²`` moves the posterior mean (scaling u by s and σ² by s² leaves μ unchanged).
The paper's setting is ``scale = 0.1, σ² = 1`` (ratio 100) with Adam lr 1e-4 and M ≈ 50k inducing points, and it
is one argument away (``default_kernel_net(..., scale=0.1)``, ``noise=1.0``). The ratio acts as a ridge strength
that must be small next to the eigenvalues of G, which grow with M: ratio 100 shrinks most directions to ~1% at
M ≈ 1.4k and fails to match there. The default here is ``σ² = scale²`` (ratio 1), which matched well on digits
(M ≈ 1.4k) and shrinks even less as M grows; it pairs with Adam lr 1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass

import gpytorch
import torch
from linear_operator.operators import DiagLinearOperator, LowRankRootLinearOperator
from torch import nn

from lightning_xai.gpex.cache import InducingCache, RowSwap
from lightning_xai.gpex.kernel import FeatureLinearKernel

__all__ = ["GPEXPrediction", "GPEXSurrogate", "MatchOutput", "fidelity"]

VAR_CLAMP = (1e-5, 5.0)


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


def _chunk_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, a set of (score, column) pairs that contains every entry that can be in the top k, ties included.

    ``topk`` alone picks arbitrarily among entries tied with the k-th; taking every finite entry at least as large
    as the k-th keeps all of them, so the caller's exact (score, slot) ordering decides.
    """
    kth = scores.topk(min(k, scores.shape[1]), dim=1).values[:, -1:]
    keep = int(((scores >= kth) & torch.isfinite(scores)).sum(1).max())
    values, columns = scores.topk(keep, dim=1)
    return values, columns


def _top_by_score_then_slot(scores: torch.Tensor, slots: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best pairs per row ordered by descending score, then ascending slot (a deterministic order)."""
    by_slot = slots.argsort(dim=1)
    scores, slots = scores.gather(1, by_slot), slots.gather(1, by_slot)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), slots.gather(1, order)


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


class GPEXSurrogate(nn.Module):
    """L finite-rank GPs (one per output head) over a kernel net f, conditioned on a cache of inducing examples.

    Args:
        kernel_net: Maps ``(B, *input_shape)`` to ``(B, L, D)`` features, e.g.
            :func:`~lightning_xai.gpex.kernel.default_kernel_net`.
        heads: L; read from ``kernel_net.heads`` when omitted.
        dim: D; read from ``kernel_net.dim`` when omitted.
        cache_size: Number of inducing slots M, or ``None`` for a cache that grows as slots are written.
        max_cache_size: Largest M a growing cache may reach (``None``: unbounded).
        noise: Likelihood noise σ². Default ``scale²`` (``kernel_net.scale``, else 1), i.e. ``σ²/scale² = 1``.
            The paper uses σ² = 1 with scale 0.1; see the module docstring.
        store_inputs: Keep each slot's input in the cache (for neighbour panels without dataset indices).
        storage_dtype: dtype of the cached feature rows.
        refresh_every: Recompute G, c from all rows once the rows rewritten since the last recompute reach this many
            times the filled rows (``None``: never); see :class:`~lightning_xai.gpex.cache.InducingCache`.
        sharded: Under ``torch.distributed``, this process keeps one shard of the inducing rows while G and c sum
            over all shards (writes and refreshes become collectives; :meth:`neighbours` searches this shard only,
            :mod:`lightning_xai.gpex.sharding` merges the shards' answers).
        var_clamp: Range the variance is clamped to in the matching loss.
        holdout_weight: Weight of a second term of the same form at the batch's clean examples, each predicted by the
            GP without the batch's own rows (a leave-batch-out fit, which the mixed queries only approximate). Not in
            the paper (``0`` is the paper's loss); 1 raised the co-trained digits fit from Pearson ≈ .977 to ≈ .982
            at no measurable cost, since it reuses the batch's features.
        seed: Seed of the private generator used by :meth:`mix`.

    Example::

        f = default_kernel_net((1, 8, 8), heads=10)
        gp = GPEXSurrogate(f, cache_size=len(train))
        gp.embed(slots, x, logits)                      # fill the cache (no grad)
        mixed = gp.mix(xb, size=len(xb) // 2)
        out = gp.match(mixed, net(mixed), slots_b, xb, logits_b)
        out.loss.backward(); opt.step()
        gp.update_rows(slots_b, out.inducing_features, logits_b, swap=out.swap)  # reuses the step's ΔG, Δc
        mean = gp.predict(x_test).mean
    """

    def __init__(
        self,
        kernel_net: nn.Module,
        heads: int | None = None,
        dim: int | None = None,
        cache_size: int | None = None,
        noise: float | None = None,
        store_inputs: bool = False,
        storage_dtype: torch.dtype = torch.float32,
        refresh_every: float | None = 4.0,
        var_clamp: tuple[float, float] = VAR_CLAMP,
        seed: int = 0,
        sharded: bool = False,
        holdout_weight: float = 1.0,
        max_cache_size: int | None = None,
    ) -> None:
        super().__init__()
        heads = heads if heads is not None else getattr(kernel_net, "heads", None)
        dim = dim if dim is not None else getattr(kernel_net, "dim", None)
        if heads is None or dim is None:
            raise ValueError("pass heads= and dim= (the kernel net has no .heads/.dim attributes)")
        self.heads, self.dim = int(heads), int(dim)
        if noise is None:
            noise = float(getattr(kernel_net, "scale", 1.0)) ** 2
        if not noise > 0:
            raise ValueError(f"noise must be positive, got {noise!r}")
        self.kernel_net = kernel_net
        self.kernel = FeatureLinearKernel(self.heads)
        self.cache = InducingCache(
            self.heads, self.dim, cache_size, storage_dtype, store_inputs, refresh_every, sharded=sharded,
            max_capacity=max_cache_size,
        )
        self.register_buffer("noise", torch.tensor(float(noise), dtype=torch.float64))
        self.var_clamp = (float(var_clamp[0]), float(var_clamp[1]))
        self.holdout_weight = float(holdout_weight)
        self._generator = torch.Generator().manual_seed(int(seed))

    # ------------------------------------------------------------------ features and posterior
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x)``, checked to be ``(B, L, D)``."""
        u = self.kernel_net(x)
        if u.dim() != 3 or u.shape[1:] != (self.heads, self.dim):
            raise ValueError(f"kernel_net must return (B, {self.heads}, {self.dim}), got {tuple(u.shape)}")
        return u

    def posterior(
        self, u: torch.Tensor, G: torch.Tensor | None = None, c: torch.Tensor | None = None
    ) -> GPEXPrediction:
        """Posterior at features ``u`` (B, L, D) given Gram sums ``G`` (L, D, D) and ``c`` (L, D) (default: cache).

        With ``A = G + σ²I = LLᵀ`` and ``y = L⁻¹u``: ``μ = yᵀ L⁻¹c``, ``var = σ²‖y‖²``, joint covariance root σy.
        Differentiable in ``u``, ``G`` and ``c``; float64 throughout.
        """
        G = self.cache.G if G is None else G
        c = self.cache.c if c is None else c
        noise = self.noise.to(G.device)
        eye = torch.eye(self.dim, dtype=torch.float64, device=G.device)
        chol = torch.linalg.cholesky(G.to(torch.float64) + noise * eye)
        u64 = u.to(torch.float64).permute(1, 2, 0)  # (L, D, B)
        rhs = torch.cat([u64, c.to(torch.float64).unsqueeze(-1)], dim=-1)
        y = torch.linalg.solve_triangular(chol, rhs, upper=False)
        yu, yc = y[..., :-1], y[..., -1]
        mean = torch.einsum("ldb,ld->bl", yu, yc)
        variance = noise * (yu**2).sum(1).T
        return GPEXPrediction(mean, variance, noise.sqrt() * yu.transpose(1, 2))

    def forward(self, x: torch.Tensor) -> GPEXPrediction:
        """Posterior at inputs ``x`` under the cached G and c (differentiable)."""
        return self.posterior(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> GPEXPrediction:
        """Posterior at inputs ``x``, without gradient. ``.distribution`` gives gpytorch distributions."""
        return self.posterior(self.features(x))

    # ------------------------------------------------------------------ the inducing cache
    def update_rows(
        self,
        slots: torch.Tensor,
        u_rows: torch.Tensor,
        v_rows: torch.Tensor,
        inputs: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        swap: RowSwap | None = None,
        keys: torch.Tensor | None = None,
    ) -> None:
        """Write rows at ``slots`` with the rank-B update of G and c (see :meth:`InducingCache.write`); ``swap``, a
        :attr:`MatchOutput.swap` for the same rows, saves recomputing the update; ``keys`` name the examples."""
        self.cache.write(slots, u_rows, v_rows, inputs=inputs, index=index, swap=swap, keys=keys)

    @torch.no_grad()
    def embed(
        self, slots: torch.Tensor, x: torch.Tensor, v_rows: torch.Tensor, index: torch.Tensor | None = None
    ) -> None:
        """Compute ``f(x)`` without gradient and write it with targets ``v_rows`` (and ``x`` if stored) at ``slots``."""
        self.update_rows(slots, self.features(x), v_rows, inputs=x, index=index)

    def refresh(self) -> None:
        """Recompute G and c from all cached rows (removes accumulated rounding of the rank-B updates)."""
        self.cache.refresh()

    # ------------------------------------------------------------------ training f
    def match(
        self,
        x_mixed: torch.Tensor,
        targets: torch.Tensor,
        slots_with_grad: torch.Tensor | None = None,
        x_inducing_batch: torch.Tensor | None = None,
        v_inducing_batch: torch.Tensor | None = None,
    ) -> MatchOutput:
        """One evaluation of the matching loss, with what it computed on the way.

        Args:
            x_mixed: (B, ...) query inputs, normally ``mix(x)``.
            targets: (B, L) the explained network's outputs at ``x_mixed`` (detached).
            slots_with_grad: (B',) distinct slots of the inducing batch, or None (then only the queries carry
                gradient and the cached G, c are used as they are).
            x_inducing_batch: (B', ...) the examples stored at those slots, un-mixed.
            v_inducing_batch: (B', L) their targets (normally the network's current outputs at them).
        """
        with_rows = slots_with_grad is not None
        if with_rows and (x_inducing_batch is None or v_inducing_batch is None):
            raise ValueError("slots_with_grad needs x_inducing_batch and v_inducing_batch")
        u_inducing = None
        if with_rows and x_inducing_batch.shape[1:] == x_mixed.shape[1:]:
            u_all = self.features(torch.cat([x_mixed, x_inducing_batch]))
            u, u_inducing = u_all[: x_mixed.shape[0]], u_all[x_mixed.shape[0] :]
        else:
            u = self.features(x_mixed)
            if with_rows:
                u_inducing = self.features(x_inducing_batch)
        if with_rows:
            swap = self.cache.swap(slots_with_grad, u_inducing, v_inducing_batch)
            u_b, v_b = u_inducing, v_inducing_batch
        else:  # only the queries carry gradient, under the cached sums as they are
            swap, u_b = None, u.new_zeros(0, self.heads, self.dim)
            v_b = u.new_zeros(0, self.heads)
        g, c = (self.cache.G, self.cache.c) if swap is None else (swap.G, swap.c)
        g0, c0 = (g, c) if swap is None else (swap.G_without, swap.c_without)
        noise = self.noise.to(g.device)
        mean, held_mean, variance, held_variance, y = _MatchingPosterior.apply(
            u.to(torch.float64).permute(1, 2, 0),
            u_b.to(torch.float64).permute(1, 2, 0),
            g,
            c,
            g0,
            c0,
            v_b.detach().to(torch.float64).T,
            noise,
        )
        loss = self._weighted_error(targets, mean, variance)
        if swap is not None and self.holdout_weight:
            # the leave-batch-out term: the batch's clean examples under the sums without the batch's rows
            loss = loss + self.holdout_weight * self._weighted_error(v_b, held_mean, held_variance)
        prediction = GPEXPrediction(mean.T, variance.T, noise.sqrt() * y.transpose(1, 2))
        return MatchOutput(loss, prediction, None if swap is None else swap.rows, swap)

    def _weighted_error(self, targets: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        """``½(t − μ)²/sg(var) + ½ log sg(var)``, summed over heads and averaged over the batch; ``mean`` and
        ``variance`` heads-first (L, B), ``targets`` (B, L)."""
        var = variance.detach().clamp(*self.var_clamp)
        residual = targets.detach().to(torch.float64).T - mean
        return (0.5 * residual**2 / var + 0.5 * var.log()).sum(0).mean()

    def matching_loss(
        self,
        x_mixed: torch.Tensor,
        targets: torch.Tensor,
        slots_with_grad: torch.Tensor | None = None,
        x_inducing_batch: torch.Tensor | None = None,
        v_inducing_batch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The scalar matching loss of :meth:`match` (float64)."""
        return self.match(x_mixed, targets, slots_with_grad, x_inducing_batch, v_inducing_batch).loss

    def mix(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        low: float = -1.0,
        high: float = 2.0,
        noise_std: float = 0.1,
        size: int | None = None,
    ) -> torch.Tensor:
        """``α·x + (1 − α)·x[perm] + noise_std·ε``, α ~ U[low, high] per example, ε ~ N(0, 1) (paper's code).

        ``size`` (default: the batch) draws fewer mixtures: ``size`` distinct examples of ``x``, chosen at random, each
        mixed with a partner as above. Random numbers come from ``generator`` (a CPU generator; default: the
        surrogate's private one, saved in the ``state_dict``), never from the global stream.
        """
        gen = self._generator if generator is None else generator
        b = x.shape[0]
        n = b if size is None else int(size)
        if not 0 <= n <= b:
            raise ValueError(f"size={size!r} must be between 0 and the batch size {b}")
        alpha = (torch.rand(n, generator=gen, dtype=torch.float64) * (high - low) + low).to(x.device, x.dtype)
        alpha = alpha.view(n, *([1] * (x.dim() - 1)))
        perm = torch.randperm(b, generator=gen).to(x.device)
        base = x
        if n < b:
            base = x[torch.randperm(b, generator=gen)[:n].to(x.device)]
            perm = perm[:n]
        noise = torch.randn((n, *x.shape[1:]), generator=gen, dtype=x.dtype).to(x.device)
        return alpha * base + (1 - alpha) * x[perm] + noise_std * noise

    # ------------------------------------------------------------------ explanations
    @torch.no_grad()
    def neighbours(
        self,
        x: torch.Tensor | None = None,
        k: int = 10,
        head: int | torch.Tensor | None = None,
        *,
        features: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k cached examples most similar to each query under one head's kernel, by raw ``u*ᵀũ_m``.

        The search runs over the cache in chunks with a running top-k, so memory is O(B·chunk), never O(B·M). Ties
        go to the lower slot. Empty slots are never returned; when fewer than k slots are filled the tail is padded
        with slot −1 and score −inf.

        Args:
            x: (B, ...) queries (or pass ``features``).
            k: Number of neighbours.
            head: One head for all queries, a (B,) tensor of heads, or None for the argmax of each query's GP mean
                (the paper uses the argmax of the network's output: pass it here).
            features: (B, L, D) precomputed ``f(x)``.
            chunk_size: Cache rows scored at once (default ≈ 2²⁴ / B).

        Returns:
            ``(slots, scores)``, both (B, k): slots into the cache (map them to data with ``cache.index`` or
            ``cache.inputs``) and float64 similarities, best first.
        """
        u = self.features(x) if features is None else features
        b = u.shape[0]
        if head is None:
            heads = self.posterior(u).mean.argmax(-1)
        else:
            heads = torch.as_tensor(head, dtype=torch.long, device=u.device).expand(b).clone()
        u = u.to(torch.float64)
        cache = self.cache
        device = cache.U.device
        heads, u = heads.to(device), u.to(device)
        chunk = int(chunk_size) if chunk_size is not None else max(1024, (1 << 24) // max(b, 1))
        best_s = torch.full((b, 0), -float("inf"), dtype=torch.float64, device=device)
        best_i = torch.full((b, 0), -1, dtype=torch.long, device=device)
        rows_by_head = [(h, (heads == h).nonzero().squeeze(1)) for h in heads.unique().tolist()]
        for start in range(0, cache.capacity, chunk):
            stop = min(start + chunk, cache.capacity)
            filled = cache.filled[start:stop]
            if not bool(filled.any()):
                continue
            scores = torch.empty(b, stop - start, dtype=torch.float64, device=device)
            for h, rows in rows_by_head:
                scores[rows] = u[rows, h] @ cache.U[start:stop, h].to(torch.float64).T
            scores.masked_fill_(~filled, -float("inf"))
            cand_s, cand_i = _chunk_candidates(scores, k)
            best_s, best_i = _top_by_score_then_slot(
                torch.cat([best_s, cand_s], dim=1), torch.cat([best_i, cand_i + start], dim=1), k
            )
        if best_s.shape[1] < k:
            pad = k - best_s.shape[1]
            best_s = torch.cat([best_s, best_s.new_full((b, pad), -float("inf"))], dim=1)
            best_i = torch.cat([best_i, best_i.new_full((b, pad), -1)], dim=1)
        best_i = best_i.masked_fill(torch.isinf(best_s), -1)
        return best_i, best_s

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict:
        return {"generator": self._generator.get_state(), "var_clamp": self.var_clamp}

    def set_extra_state(self, state: dict) -> None:
        self._generator.set_state(state["generator"])
        self.var_clamp = tuple(state.get("var_clamp", self.var_clamp))
