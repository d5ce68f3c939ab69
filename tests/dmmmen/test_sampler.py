"""DMM-MEN sampler: recovery of a simulated mixture, exactness on problems with a known posterior, calibration,
reproducibility and checkpoint/resume, argument checks, and the feature/target helpers."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import erfcx

from lightning_xai.dmmmen import DMMMENSurrogate, FeatureSelector, class_logit, logit_target
from lightning_xai.dmmmen import sampling as S

F64 = torch.float64


def sparse_mixture(n: int, seed: int, p: int = 50, noise: float = 0.2):
    """Two well-separated sparse regressions (intercepts ±1, weights 0.6/0.4); returns x, y, z, β."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=F64)
    beta = torch.zeros(2, p, dtype=F64)
    beta[0, :5] = torch.tensor([3.0, -2.0, 2.0, 1.5, -1.0])
    beta[1, 5:10] = torch.tensor([-2.5, 2.0, 1.0, -1.5, 2.0])
    intercept = torch.tensor([1.0, -1.0], dtype=F64)
    z = (torch.rand(n, generator=g) < 0.4).long()
    y = (x * beta[z]).sum(1) + intercept[z] + noise * torch.randn(n, generator=g, dtype=F64)
    return x, y, z, beta


@pytest.fixture(scope="module")
def mixture_fit():
    torch.set_num_threads(1)
    x, y, z, beta = sparse_mixture(2000, seed=0)
    surrogate = DMMMENSurrogate(6, 3, seed=0).fit(x, y, sweeps=300)
    return surrogate, x, y, z, beta


def test_recovers_a_sparse_mixture(mixture_fit):
    surrogate, x, y, z, beta = mixture_fit
    comp = surrogate.components
    assert int(comp.occupied.sum()) == 2  # the four spare components are left out
    # relabel the estimate against the truth (Hungarian on coefficient distance)
    rows, cols = linear_sum_assignment(torch.cdist(beta, comp.coefficients).numpy())
    matched = torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]
    assert set(matched.tolist()) == set(comp.occupied.nonzero().squeeze(1).tolist())
    _, component = surrogate.predict(x, y)
    accuracy = (component == matched[z]).double().mean().item()
    error = ((comp.coefficients[matched] - beta).norm() / beta.norm()).item()
    assert accuracy > 0.95, accuracy
    assert error < 0.10, error
    assert torch.allclose(comp.intercepts[matched], torch.tensor([1.0, -1.0], dtype=F64), atol=0.05)
    assert torch.allclose(comp.sigma2[matched], torch.full((2,), 0.04, dtype=F64), rtol=0.25)
    assert comp.weights[matched].sub(torch.tensor([0.6, 0.4], dtype=F64)).abs().max() < 0.05
    assert surrogate.acceptance["sigma2"] > 0.95
    assert 0.2 < surrogate.acceptance["lambda1"] < 0.5 and 0.2 < surrogate.acceptance["lambda2"] < 0.5


def test_explanations_and_prediction_modes(mixture_fit):
    surrogate, x, y, _, _ = mixture_fit
    comp = surrogate.components
    mean, component = surrogate.predict(x[:100], y[:100])
    explanation = surrogate.explain(x[:100], y[:100])
    assert torch.equal(explanation.component, component)
    assert torch.equal(explanation.coefficients, comp.coefficients[component])
    assert torch.allclose(explanation.contributions, x[:100] * comp.coefficients[component])
    assert torch.allclose(explanation.contributions.sum(1) + explanation.intercept, mean)
    assert torch.allclose(surrogate.responsibilities(x[:100], y[:100]).sum(1), torch.ones(100, dtype=F64))
    # without the explained outputs: the mixture mean, and every input in the heaviest component
    mixture_mean, heaviest = surrogate.predict(x[:100])
    weights = torch.where(comp.occupied, comp.weights, torch.zeros_like(comp.weights))
    expected = (x[:100] @ comp.coefficients.T + comp.intercepts) @ (weights / weights.sum())
    assert torch.allclose(mixture_mean, expected)
    assert bool((heaviest == 0).all())
    scalars = surrogate.summary_scalars()
    assert scalars["n_occupied"] == 2 and scalars["kept"] == 150


def test_held_out_intervals_are_calibrated(mixture_fit):
    surrogate = mixture_fit[0]
    x, y, _, _ = sparse_mixture(2000, seed=1)
    low, high = surrogate.predictive_interval(x, level=0.9, draws=1000)
    coverage = ((y >= low) & (y <= high)).double().mean().item()
    assert 0.85 <= coverage <= 0.95, coverage
    exact_low, exact_high = surrogate.predictive_interval(x, level=0.9, draws=None)
    exact = ((y >= exact_low) & (y <= exact_high)).double().mean().item()
    assert 0.85 <= exact <= 0.95, exact
    # Monte Carlo quantiles agree with the exact ones (to a fraction of the interval width) and are reproducible
    width = (exact_high - exact_low).median()
    assert (low - exact_low).abs().median() < 0.05 * width
    again = surrogate.predictive_interval(x[:50], level=0.9, draws=1000)
    assert torch.equal(again[0], surrogate.predictive_interval(x[:50], level=0.9, draws=1000)[0])


def test_one_component_tiny_penalty_is_least_squares():
    g = torch.Generator().manual_seed(0)
    n, p = 400, 20
    x = torch.randn(n, p, generator=g, dtype=F64) * 2 + 1
    beta = torch.randn(p, generator=g, dtype=F64)
    y = x @ beta + 0.5 + 0.3 * torch.randn(n, generator=g, dtype=F64)
    design = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1)
    ols = torch.linalg.lstsq(design, y[:, None]).solution.squeeze(1)
    surrogate = DMMMENSurrogate(1, 1, lambda1_prior=1e-8, lambda2_prior=1e-8, seed=0).fit(x, y, sweeps=300)
    comp = surrogate.components
    assert ((comp.coefficients[0] - ols[:p]).norm() / ols[:p].norm()).item() < 1e-3
    assert abs(comp.intercepts[0].item() - ols[p].item()) < 1e-3
    residual_variance = (y - design @ ols).square().sum().item() / (n - p - 1)
    assert comp.sigma2[0].item() == pytest.approx(residual_variance, rel=0.1)


def test_matches_a_posterior_computed_on_a_grid():
    """One coefficient, six points, fixed penalties: the elastic-net posterior of (β, σ²) by 2-D quadrature."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, generator=g, dtype=F64)
    y = 0.8 * x[:, 0] + 0.5 * torch.randn(6, generator=g, dtype=F64)
    lam1, lam2, a, b = 3.0, 2.0, 2.0, 0.5
    beta, log_s2 = np.meshgrid(np.linspace(-3, 3, 601), np.linspace(math.log(1e-3), math.log(50), 801), indexing="ij")
    s2 = np.exp(log_s2)
    rss = ((y.numpy() - beta[..., None] * x[:, 0].numpy()) ** 2).sum(-1)
    log_post = (
        -3 * log_s2 - rss / (2 * s2)  # likelihood of six points
        - (lam1 * np.abs(beta) + lam2 * beta**2) / (2 * s2) - 0.5 * np.log(s2 / lam2)
        - np.log(erfcx(np.sqrt(lam1**2 / (8 * lam2 * s2))))  # normalised elastic-net prior
        - (a + 1) * log_s2 - b / s2  # inverse-gamma prior
        + log_s2  # the grid is in log σ²
    )
    w = np.exp(log_post - log_post.max())
    w /= w.sum()
    surrogate = DMMMENSurrogate(
        1, 1, sigma_prior=(a, b), lambda1_prior=lam1, lambda2_prior=lam2, fit_intercept=False, seed=0
    ).fit(x, y, sweeps=3000, burn_in=200)
    comp = surrogate.components
    assert comp.coefficients[0, 0].item() == pytest.approx((w * beta).sum(), abs=0.01)
    assert comp.sigma2[0].item() == pytest.approx((w * s2).sum(), abs=0.02)


def test_reproducible_and_seed_dependent():
    x, y, _, _ = sparse_mixture(300, seed=2, p=10)
    first = DMMMENSurrogate(4, 2, seed=5).fit(x, y, sweeps=40)
    second = DMMMENSurrogate(4, 2, seed=5).fit(x, y, sweeps=40)
    assert torch.equal(first.components.coefficients, second.components.coefficients)
    assert torch.equal(first.components.sigma2, second.components.sigma2)
    again = first.fit(x, y, sweeps=40)  # a fresh fit restarts from the seed
    assert torch.equal(again.components.coefficients, second.components.coefficients)
    other = DMMMENSurrogate(4, 2, seed=6).fit(x, y, sweeps=40)
    assert not torch.equal(other.components.coefficients, first.components.coefficients)


def test_warm_start_and_checkpoint_resume_exactly():
    x, y, _, _ = sparse_mixture(300, seed=2, p=10)
    uninterrupted = DMMMENSurrogate(4, 2, seed=1).fit(x, y, sweeps=30)
    uninterrupted.fit(x, y, sweeps=20, burn_in=5, warm_start=True)
    assert uninterrupted._state.sweep == 50  # continued, not restarted

    interrupted = DMMMENSurrogate(4, 2, seed=1).fit(x, y, sweeps=30)
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = DMMMENSurrogate(4, 2, seed=1)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(resumed.components.coefficients, interrupted.components.coefficients)  # before any sweep
    resumed.fit(x, y, sweeps=20, burn_in=5, warm_start=True)
    for name, tensor in uninterrupted._state.tensors().items():
        assert torch.equal(tensor, getattr(resumed._state, name)), name
    assert torch.equal(resumed.components.coefficients, uninterrupted.components.coefficients)

    restarted = DMMMENSurrogate(4, 2, seed=1).fit(x, y, sweeps=20, burn_in=5)
    assert not torch.equal(restarted.components.coefficients, uninterrupted.components.coefficients)


def test_warm_start_on_new_data_and_time_budget():
    x, y, _, _ = sparse_mixture(300, seed=2, p=10)
    surrogate = DMMMENSurrogate(4, 2, seed=0).fit(x, y, sweeps=60)
    x2, y2, _, _ = sparse_mixture(250, seed=3, p=10)
    surrogate.fit(x2, y2, sweeps=40, warm_start=True)
    assert surrogate._state.z.shape == (250,) and surrogate._state.counts.sum().item() == 250
    assert surrogate.predict(x2, y2)[0].sub(y2).abs().median() < 0.3
    with pytest.raises(ValueError, match="same number of features"):
        surrogate.fit(x2[:, :5], y2, sweeps=5, warm_start=True)

    calls = []
    surrogate.fit(x, y, sweeps=10_000, time_budget=0.05, progress=lambda done, total: calls.append((done, total)))
    assert surrogate.stopped_early and 0 < surrogate.sweeps_done < 10_000
    assert calls[-1] == (surrogate.sweeps_done, 10_000)
    assert surrogate.components.coefficients.shape == (4, 10)  # reports fall back to the last state


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"n_components": 0}, "0"),
        ({"n_nets": 2.5}, "2.5"),
        ({"alpha_prior": (5.0, -1.0)}, "-1.0"),
        ({"sigma_prior": (0.5,)}, "(0.5,)"),
        ({"lambda1_prior": -3.0}, "-3.0"),
        ({"lambda2_prior": "big"}, "'big'"),
        ({"seed": 1.5}, "1.5"),
        ({"dtype": torch.int64}, "torch.int64"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, bad):
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))}.*{bad}".replace("(", r"\(").replace(")", r"\)")):
        DMMMENSurrogate(**kwargs)


def test_fit_and_outputs_reject_bad_arguments():
    x, y, _, _ = sparse_mixture(50, seed=0, p=10)
    x = x[:, :4]
    surrogate = DMMMENSurrogate(2, 1)
    with pytest.raises(ValueError, match="sweeps.*-3"):
        surrogate.fit(x, y, sweeps=-3)
    with pytest.raises(ValueError, match="burn_in.*20"):
        surrogate.fit(x, y, sweeps=10, burn_in=20)
    with pytest.raises(ValueError, match="time_budget.*0"):
        surrogate.fit(x, y, sweeps=10, time_budget=0)
    with pytest.raises(ValueError, match=r"y must have shape \(50,\).*\(49,\)"):
        surrogate.fit(x, y[:49])
    with pytest.raises(ValueError, match="finite"):
        surrogate.fit(x, torch.full_like(y, math.nan))
    with pytest.raises(RuntimeError, match="not fitted"):
        surrogate.predict(x)
    surrogate.fit(x, y, sweeps=4)
    with pytest.raises(ValueError, match="level.*1.5"):
        surrogate.predictive_interval(x, level=1.5)
    with pytest.raises(ValueError, match="draws.*0"):
        surrogate.predictive_interval(x, draws=0)
    with pytest.raises(ValueError, match=r"shape \(n, 4\).*\(50, 3\)"):
        surrogate.predict(x[:, :3])
    with pytest.raises(ValueError, match="n_nets=1 but this surrogate has 3"):
        DMMMENSurrogate(2, 3).load_state_dict(surrogate.state_dict())


def test_distribution_draws():
    g = torch.Generator().manual_seed(0)
    from scipy import stats

    # inverse Gaussian (mean m, shape s) is scipy's invgauss(mu=m/s, scale=s); inv_mean 0 is the Lévy limit
    draws = S.inverse_gaussian(torch.full((20000,), 1 / 10.0, dtype=F64), torch.tensor(0.5, dtype=F64), g)
    assert stats.kstest(draws.numpy(), stats.invgauss(mu=20.0, scale=0.5).cdf).pvalue > 1e-3
    levy = S.inverse_gaussian(torch.zeros(20000, dtype=F64), torch.tensor(0.7, dtype=F64), g)
    assert stats.kstest(levy.numpy(), stats.levy(scale=0.7).cdf).pvalue > 1e-3
    # elastic-net prior draws (empty components): CDF by quadrature, including the far tail a = λ1/(2σ√λ2) > 30
    for sigma2, lam1, lam2 in ((2.0, 2.0, 8.0), (0.05, 1.0, 0.5), (0.4, 0.5, 0.002), (1e-4, 2.0, 8.0)):
        args = [torch.full((4,), v, dtype=F64) for v in (sigma2, lam1, lam2)]
        draws = S.elastic_net_prior(*args, 5000, g).reshape(-1).numpy()
        scale = math.sqrt(sigma2 / lam2)
        grid = np.linspace(-12 * scale, 12 * scale, 200001)
        density = np.exp(-(lam1 * np.abs(grid) + lam2 * grid**2) / (2 * sigma2))
        cdf = np.cumsum(density) / density.sum()
        assert stats.kstest(draws, lambda t: np.interp(t, grid, cdf)).pvalue > 1e-3, (sigma2, lam1, lam2)
    # log-gamma draws stay finite for tiny shapes
    small = S.log_gamma(torch.full((20000,), 0.05, dtype=F64), g)
    assert bool(torch.isfinite(small).all())
    assert stats.kstest(small.exp().numpy(), stats.gamma(0.05).cdf).pvalue > 1e-3


def test_feature_selector_and_targets():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(100, 1, 8, 8, generator=g) * 1.5 ** torch.arange(64.0).reshape(1, 1, 8, 8)
    selector = FeatureSelector(k=10).fit(images)
    assert selector.indices.tolist() == list(range(54, 64))  # the ten highest-variance pixels
    x = selector.transform(images)
    assert x.shape == (100, 10) and torch.equal(x, images.flatten(1)[:, 54:])
    maps = selector.scatter(torch.ones(3, 10))
    assert maps.shape == (3, 1, 8, 8) and maps.sum().item() == 30 and maps[0, 0, 7, 7].item() == 1
    given = FeatureSelector(indices=[3, 1]).fit(images)
    assert given.k == 2 and torch.equal(given.transform(images), images.flatten(1)[:, [3, 1]])
    assert given.scatter(torch.tensor([5.0, 7.0]), (64,))[[1, 3]].tolist() == [7.0, 5.0]
    with pytest.raises(ValueError, match="k.*0"):
        FeatureSelector(k=0)

    probs = torch.tensor([0.0, 0.5, 0.9, 1.0], dtype=F64)
    y = logit_target(probs)
    assert torch.isfinite(y).all() and y[1] == 0 and y[2].item() == pytest.approx(math.log(9))
    assert y[3].item() == pytest.approx(-y[0].item()) and y[3].item() == pytest.approx(math.log(1e6 - 1), rel=1e-6)
    logits = torch.randn(20, 5, generator=g, dtype=F64)
    assert torch.allclose(class_logit(logits, 2), logit_target(logits.softmax(1)[:, 2]))
    huge = torch.tensor([[60.0, 0.0, 0.0]], dtype=F64)
    assert class_logit(huge, 0).item() == pytest.approx(math.log(1e6 - 1), rel=1e-6)
