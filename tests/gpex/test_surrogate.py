"""Tests for the GPEX surrogate: cached algebra against dense GPs, rank-B updates, gradient routing, neighbours,
checkpoints, and a small fit on scikit-learn digits."""

from __future__ import annotations

import io
import time

import pytest
import torch
from conftest import digits_tensors
from torch import nn

from lightning_xai.gpex import (
    FeatureLinearKernel,
    GPEXSurrogate,
    InducingCache,
    KernelMap,
    default_kernel_net,
    fidelity,
    heads_first,
)

L, D = 3, 5


def _random_rows(m: int, heads: int = L, dim: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(m, heads, dim, generator=g, dtype=torch.float64) * 0.5
    v = torch.randn(m, heads, generator=g, dtype=torch.float64)
    return u, v


def _tiny_net(in_dim: int = 6, heads: int = L, dim: int = D, scale: float = 1.0) -> KernelMap:
    torch.manual_seed(0)
    return KernelMap(nn.Sequential(nn.Linear(in_dim, 16), nn.Tanh()), 16, heads=heads, dim=dim, scale=scale)


def _dense_posterior(U: torch.Tensor, V: torch.Tensor, u: torch.Tensor, noise: float):
    """Exact GP posterior per head from the M×M kernel matrix, via gpytorch kernels and dense float64 solves."""
    kernel = FeatureLinearKernel(U.shape[1])
    Uh, uh = heads_first(U), heads_first(u)  # (L, M, D), (L, B, D)
    K = kernel(Uh).to_dense() + noise * torch.eye(U.shape[0], dtype=torch.float64)
    Kx = kernel(uh, Uh).to_dense()  # (L, B, M)
    mean = (Kx @ torch.linalg.solve(K, V.T.unsqueeze(-1))).squeeze(-1).T
    prior = kernel(uh, uh, diag=True)
    var = prior - (Kx * torch.linalg.solve(K, Kx.transpose(1, 2)).transpose(1, 2)).sum(-1)
    return mean, var.T, K, Kx


def test_cached_posterior_equals_dense_gp() -> None:
    M, B, noise = 300, 7, 0.3
    U, V = _random_rows(M)
    u, _ = _random_rows(B, seed=1)
    gp = GPEXSurrogate(nn.Identity(), heads=L, dim=D, cache_size=M, noise=noise, storage_dtype=torch.float64)
    gp.update_rows(torch.arange(M), U, V)
    pred = gp.posterior(u)
    mean, var, K, Kx = _dense_posterior(U, V, u, noise)
    assert torch.allclose(pred.mean, mean, rtol=0, atol=1e-10)
    assert torch.allclose(pred.variance, var, rtol=0, atol=1e-10)
    # the same through gpytorch's Woodbury operator (LowRankRootAddedDiagLinearOperator) and the joint covariance
    noise64 = torch.tensor(noise, dtype=torch.float64)
    K_lr = FeatureLinearKernel(L)(heads_first(U)).evaluate_kernel().add_diagonal(noise64)
    woodbury = (Kx @ K_lr.solve(V.T.unsqueeze(-1))).squeeze(-1).T
    assert torch.allclose(pred.mean, woodbury, rtol=0, atol=1e-10)
    uh = heads_first(u)
    joint = uh @ uh.transpose(1, 2) - Kx @ torch.linalg.solve(K, Kx.transpose(1, 2))
    mvn = pred.distribution
    assert mvn.batch_shape == (L,) and mvn.event_shape == (B,)
    assert torch.allclose(mvn.covariance_matrix, joint, rtol=0, atol=1e-10)
    assert torch.allclose(mvn.variance, pred.variance.T, rtol=0, atol=1e-12)
    assert pred.marginals.mean.shape == (B, L)


def test_empty_slots_do_not_contribute_and_cache_grows() -> None:
    U, V = _random_rows(40)
    slots = torch.arange(0, 80, 2)  # every other slot of a growing cache stays empty
    gp = GPEXSurrogate(nn.Identity(), heads=L, dim=D, noise=0.5, storage_dtype=torch.float64)
    gp.update_rows(slots, U, V)
    assert gp.cache.capacity >= 79 and gp.cache.num_filled == 40
    u, _ = _random_rows(4, seed=2)
    mean, var, _, _ = _dense_posterior(U, V, u, 0.5)
    assert torch.allclose(gp.posterior(u).mean, mean, atol=1e-10)
    assert torch.allclose(gp.posterior(u).variance, var, atol=1e-10)
    fixed = InducingCache(L, D, capacity=10)
    with pytest.raises(IndexError):
        fixed.write(torch.tensor([10]), U[:1].float(), V[:1].float())


def test_rank_b_updates_match_refresh() -> None:
    M, B = 500, 16
    cache = InducingCache(L, 20, capacity=M, refresh_every=None)
    g = torch.Generator().manual_seed(3)
    for _ in range(1500):
        slots = torch.randint(0, M, (B,), generator=g)  # repeats and empty slots included
        cache.write(slots, torch.randn(B, L, 20, generator=g), torch.randn(B, L, generator=g) * 5)
    G, c = cache.G.clone(), cache.c.clone()
    cache.refresh()
    assert (G - cache.G).abs().max() < 1e-10 and (c - cache.c).abs().max() < 1e-10
    assert (cache.G.abs().max() > 10) and cache.num_filled == M


def test_matching_posterior_gradients_equal_autograd_through_grams_and_cholesky() -> None:
    from lightning_xai.gpex.surrogate import _MatchingPosterior

    g = torch.Generator().manual_seed(8)
    n, b, noise = 5, 7, torch.tensor(0.3, dtype=torch.float64)
    root = torch.randn(L, D, 11, generator=g, dtype=torch.float64)
    g0, c0 = root @ root.mT, torch.randn(L, D, generator=g, dtype=torch.float64)
    u_q = torch.randn(L, D, n, generator=g, dtype=torch.float64, requires_grad=True)
    u_b = torch.randn(L, D, b, generator=g, dtype=torch.float64, requires_grad=True)
    v_b = torch.randn(L, b, generator=g, dtype=torch.float64)
    weights = torch.randn(L, n, generator=g, dtype=torch.float64), torch.randn(L, b, generator=g, dtype=torch.float64)

    with torch.no_grad():
        g1, c1 = g0 + u_b @ u_b.mT, c0 + (u_b @ v_b.unsqueeze(-1)).squeeze(-1)
    mean_q, mean_b, var_q, var_b, y_q = _MatchingPosterior.apply(u_q, u_b, g1, c1, g0, c0, v_b, noise)
    loss = (mean_q * weights[0]).sum() + (mean_b * weights[1]).sum()
    grads = torch.autograd.grad(loss, (u_q, u_b))

    # reference: autograd through G(u_b), c(u_b), the Cholesky factor and the solves
    eye = torch.eye(D, dtype=torch.float64)
    a = g0 + u_b @ u_b.mT + noise * eye
    c = c0 + (u_b @ v_b.unsqueeze(-1)).squeeze(-1)
    ref_q = (u_q * torch.cholesky_solve(c.unsqueeze(-1), torch.linalg.cholesky(a))).sum(1)
    a0 = torch.linalg.cholesky(g0 + noise * eye)
    ref_b = (u_b * torch.cholesky_solve(c0.unsqueeze(-1), a0)).sum(1)
    ref = torch.autograd.grad((ref_q * weights[0]).sum() + (ref_b * weights[1]).sum(), (u_q, u_b))
    assert torch.allclose(mean_q, ref_q, rtol=1e-12) and torch.allclose(mean_b, ref_b, rtol=1e-12)
    assert torch.allclose(var_q, noise * (u_q * torch.linalg.solve(a.detach(), u_q.detach())).sum(1), rtol=1e-10)
    assert torch.allclose(var_b, noise * (u_b * torch.cholesky_solve(u_b.detach(), a0)).sum(1), rtol=1e-10)
    assert not (var_q.requires_grad or var_b.requires_grad or y_q.requires_grad)
    for got, want in zip(grads, ref):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


def test_write_with_a_swap_reuses_its_change_only_while_it_applies() -> None:
    M, B = 50, 8
    g = torch.Generator().manual_seed(6)
    caches = [InducingCache(L, D, capacity=None, refresh_every=None) for _ in range(2)]
    for cache in caches:
        cache.write(torch.arange(M), *(t.float() for t in _random_rows(M, seed=1)))
    for step in range(20):
        slots = torch.randperm(M + 10, generator=g)[:B]  # stored, and past the end of the cache (a growing one)
        u = torch.randn(B, L, D, generator=g).requires_grad_()
        v = torch.randn(B, L, generator=g)
        swap = caches[0].swap(slots, u, v)
        if step % 3 == 2:
            caches[0].write(slots[:2], u[:2].detach() * 2, v[:2])  # a write in between makes the swap stale
            caches[1].write(slots[:2], u[:2].detach() * 2, v[:2])
        # the swap's sums are those of the cache with the batch's rows replaced, and without them
        without = caches[1].U.double().clone()
        without[slots[slots < without.shape[0]]] = 0
        if step % 3 != 2:
            assert torch.allclose(swap.G_without, torch.einsum("mld,mle->lde", without, without), atol=1e-9)
            assert torch.allclose(swap.G - swap.G_without, torch.einsum("bld,ble->lde", u, u).double(), atol=1e-9)
        caches[0].write(slots, u.detach(), v, swap=swap)
        caches[1].write(slots, u.detach(), v)  # recomputes the change
        for a, b in ((caches[0].G, caches[1].G), (caches[0].c, caches[1].c)):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-11)
    assert torch.equal(caches[0].U, caches[1].U) and torch.equal(caches[0].filled, caches[1].filled)
    caches[0].refresh()
    assert torch.allclose(caches[0].G, caches[1].G, rtol=1e-12, atol=1e-10)
    # a swap whose rows differ from the written ones is not used
    slots = torch.arange(B)
    u, v = torch.randn(B, L, D, generator=g), torch.randn(B, L, generator=g)
    swap = caches[0].swap(slots, u, v)
    caches[0].write(slots, u + 1, v, swap=swap)
    caches[1].write(slots, u + 1, v)
    assert torch.allclose(caches[0].G, caches[1].G, rtol=1e-12, atol=1e-10)


def test_matching_loss_gradient_flows_only_through_batch_rows() -> None:
    M, B, noise = 60, 8, 0.2
    net = _tiny_net().double()
    gp = GPEXSurrogate(
        net, cache_size=M, noise=noise, storage_dtype=torch.float64, var_clamp=(1e-5, 50.0), holdout_weight=0.0
    )  # the paper's loss alone
    g = torch.Generator().manual_seed(4)
    x_all = torch.randn(M, 6, generator=g, dtype=torch.float64)
    v_all = torch.randn(M, L, generator=g, dtype=torch.float64)
    gp.embed(torch.arange(M), x_all, v_all)
    with torch.no_grad():  # make the cache stale, as it is during training
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    slots = torch.tensor([3, 17, 5, 40, 59, 0, 22, 31])
    x_mix = gp.mix(x_all[:B])
    targets = torch.randn(B, L, generator=g, dtype=torch.float64)
    v_new = v_all[slots] + 0.3  # co-training: the network's outputs at the inducing batch have moved

    loss = gp.matching_loss(x_mix, targets, slots, x_all[slots], v_new)
    grads = torch.autograd.grad(loss, list(net.parameters()))

    # explicit construction: U_eff = stored rows, those of the batch replaced by f(x̃_I); dense M×M GP posterior
    u_rows = net(x_all[slots])
    U_eff = gp.cache.U.clone().index_put((slots,), u_rows)
    V_eff = gp.cache.V.clone()
    V_eff[slots] = v_new
    mean, var, _, _ = _dense_posterior(U_eff, V_eff, net(x_mix), noise)
    var = var.detach().clamp(1e-5, 50.0)
    ref = (0.5 * (targets - mean) ** 2 / var + 0.5 * var.log()).sum(-1).mean()
    ref_grads = torch.autograd.grad(ref, list(net.parameters()))
    assert torch.allclose(loss, ref, rtol=1e-10)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)

    # the leave-batch-out term: the batch's clean examples, predicted by a dense GP without the batch's rows (with
    # fewer mixed queries than inducing rows, so the two systems' queries are padded to one batched solve)
    gp.holdout_weight = 2.0
    x_mix, targets = gp.mix(x_all[:B], size=3), targets[:3]
    assert x_mix.shape == (3, 6)
    loss = gp.matching_loss(x_mix, targets, slots, x_all[slots], v_new)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    keep = torch.ones(M, dtype=torch.bool)
    keep[slots] = False
    mean, var, _, _ = _dense_posterior(gp.cache.U[keep], gp.cache.V[keep], net(x_all[slots]), noise)
    var = var.detach().clamp(1e-5, 50.0)
    held = 2.0 * (0.5 * (v_new - mean) ** 2 / var + 0.5 * var.log()).sum(-1).mean()
    U_eff = gp.cache.U.clone().index_put((slots,), net(x_all[slots]))
    mean, var, _, _ = _dense_posterior(U_eff, V_eff, net(x_mix), noise)
    var = var.detach().clamp(1e-5, 50.0)
    ref = (0.5 * (targets - mean) ** 2 / var + 0.5 * var.log()).sum(-1).mean() + held
    ref_grads = torch.autograd.grad(ref, list(net.parameters()))
    assert torch.allclose(loss, ref, rtol=1e-10)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)
    # the cached rows are constants: nothing in the cache requires grad, and the loss left the cache untouched
    assert not any(t.requires_grad for t in gp.cache.buffers())
    with pytest.raises(ValueError):
        gp.matching_loss(x_mix, targets, torch.tensor([1, 1]), x_all[:2], v_all[:2])


def _brute_neighbours(cache: InducingCache, u: torch.Tensor, heads: torch.Tensor, k: int):
    query = u[torch.arange(u.shape[0]), heads].double()  # (B, D): each query's features on its head
    scores = torch.einsum("bd,mbd->bm", query, cache.U[:, heads].double())
    scores[:, ~cache.filled] = -float("inf")
    # sort by (-score, slot): a stable descending sort of slots in ascending order
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return order, scores.gather(1, order)


def test_neighbours_equal_brute_force_and_are_deterministic() -> None:
    M, B, k = 257, 6, 10
    U, V = _random_rows(M, seed=5)
    U[7] *= 10  # large norm: the best match of a query equal to it, on every head
    U[[9, 100, 200]] = U[7].clone()  # exact ties, in one chunk and across chunks: lower slots first
    gp = GPEXSurrogate(nn.Identity(), heads=L, dim=D, cache_size=M + 20)
    filled = torch.cat([torch.arange(0, 50), torch.arange(60, M)])  # slots 50..59 and past M stay empty
    gp.update_rows(filled, U[filled].float(), V[filled].float())
    # queries: one equal to the tied rows, one zero vector (every score ties at 0), and random ones
    u = torch.cat([U[7:8], torch.zeros(1, L, D), _random_rows(B - 2, seed=6)[0]]).float()
    heads = gp.posterior(u).mean.argmax(-1)
    ref_i, ref_s = _brute_neighbours(gp.cache, u, heads, k)
    for chunk in (7, 64, 10_000):
        idx, scores = gp.neighbours(features=u, k=k, chunk_size=chunk)
        assert torch.equal(idx, ref_i)
        assert torch.allclose(scores, ref_s, rtol=0, atol=1e-12)
    idx, _ = gp.neighbours(features=u, k=k, chunk_size=7)
    assert torch.equal(idx[0, :4], torch.tensor([7, 9, 100, 200]))  # ties in slot order
    assert torch.equal(idx[1], torch.arange(10))
    assert not torch.isin(idx, torch.arange(50, 60)).any()
    fixed_head, _ = gp.neighbours(features=u, k=k, head=1)
    assert torch.equal(fixed_head, _brute_neighbours(gp.cache, u, torch.ones(B, dtype=torch.long), k)[0])
    few = GPEXSurrogate(nn.Identity(), heads=L, dim=D, cache_size=5)
    few.update_rows(torch.tensor([1, 3]), U[:2].float(), V[:2].float())
    idx, scores = few.neighbours(features=u, k=4)
    assert (idx[:, 2:] == -1).all() and torch.isinf(scores[:, 2:]).all()


def test_state_dict_round_trip_restores_predictions_bit_for_bit() -> None:
    x, _ = digits_tensors(96)
    f = default_kernel_net((1, 8, 8), heads=4, dim=6, width=4, hidden=16)
    gp = GPEXSurrogate(f, store_inputs=True, seed=7)  # growing cache with stored inputs
    gp.embed(torch.arange(96), x, torch.randn(96, 4), index=torch.arange(96) + 1000)
    gp.mix(x[:4])  # advance the private generator
    buffer = io.BytesIO()
    torch.save(gp.state_dict(), buffer)
    buffer.seek(0)

    torch.manual_seed(123)
    other = GPEXSurrogate(default_kernel_net((1, 8, 8), heads=4, dim=6, width=4, hidden=16), store_inputs=True)
    other.load_state_dict(torch.load(buffer, weights_only=False))
    for name, tensor in gp.cache.state_dict().items():
        assert torch.equal(tensor, other.cache.state_dict()[name]), name
    a, b = gp.predict(x[:16]), other.predict(x[:16])
    assert torch.equal(a.mean, b.mean) and torch.equal(a.variance, b.variance)
    assert torch.equal(gp.neighbours(x[:4])[0], other.neighbours(x[:4])[0])
    assert torch.equal(gp.mix(x[:8]), other.mix(x[:8]))  # the private generator continues identically
    assert torch.equal(other.cache.index[:3], torch.tensor([1000, 1001, 1002]))


def test_mix_uses_private_generator_and_defaults() -> None:
    x = torch.rand(32, 1, 8, 8)
    gp = GPEXSurrogate(default_kernel_net((1, 8, 8), heads=10, scale=0.1), cache_size=4)
    assert gp.noise.item() == pytest.approx(0.01)  # σ²/scale² = 1 by default
    assert GPEXSurrogate(default_kernel_net((64,), heads=10, scale=0.1), noise=1.0).noise.item() == 1.0  # paper
    state = torch.get_rng_state()
    mixed = gp.mix(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert mixed.shape == x.shape and not torch.equal(mixed, gp.mix(x))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(gp.mix(x, g1), gp.mix(x, g2))
    # fewer mixtures: each is α·x_i + (1 − α)·x_j + noise of two batch examples, the x_i distinct
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    few = gp.mix(x, g1, noise_std=0.0, size=8)
    assert few.shape == (8, 1, 8, 8) and torch.equal(few, gp.mix(x, g2, noise_std=0.0, size=8))
    alpha = torch.rand(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3 - 1
    flat = x.flatten(1)
    for row, a in zip(few.flatten(1), alpha.float()):  # some pair (i, j) explains each row
        fits = (a * flat[:, None] + (1 - a) * flat[None] - row).abs().amax(-1) < 1e-5
        assert bool(fits.any())
    with pytest.raises(ValueError, match="size=33"):
        gp.mix(x, size=33)


def test_gp_matches_a_frozen_digits_classifier() -> None:
    x, y = digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = perm[:1437], perm[1437:]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(15):
        for idx in torch.randperm(len(train)).split(64):
            loss = nn.functional.cross_entropy(net(x[train][idx]), y[train][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval().requires_grad_(False)
    assert (net(x[val]).argmax(1) == y[val]).float().mean() > 0.9

    start = time.perf_counter()
    f = default_kernel_net((1, 8, 8), heads=10)  # CNN kernel net, scale 1, σ² 1
    gp = GPEXSurrogate(f, cache_size=len(train), refresh_every=0.5)
    xt, vt, xv, vv = x[train], net(x[train]), x[val], net(x[val])

    def reembed() -> None:
        f.eval()
        for s in torch.arange(len(train)).split(512):
            gp.embed(s, xt[s], vt[s])
        gp.refresh()
        f.train()

    reembed()
    opt = torch.optim.Adam(f.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(1)
    for _ in range(4):
        for s in torch.randperm(len(train), generator=order).split(64):
            mixed = gp.mix(xt[s])
            out = gp.match(mixed, net(mixed), s, xt[s], vt[s])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            gp.update_rows(s, out.inducing_features, vt[s])
        reembed()
    f.eval()
    scores = fidelity(gp.predict(xv).mean, vv)
    print(f"digits fit: {scores} in {time.perf_counter() - start:.1f} s")
    assert scores["agreement"] >= 0.97 and scores["pearson"] >= 0.97
