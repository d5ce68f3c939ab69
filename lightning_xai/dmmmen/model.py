"""DMM-MEN as a plain-torch surrogate: a Dirichlet mixture of linear regressions with multiple elastic nets.

Guo et al., "Explaining Deep Learning Models – A Bayesian Non-parametric Approach", NeurIPS 2018
(arXiv:1811.03422), explain a network's output (the logit of one class's probability) by a mixture of sparse linear
models of the input features: each component is a class-level pattern, and an input's local explanation is the
coefficient vector of the component it belongs to. :class:`DMMMENSurrogate` fits that model by the authors' blocked
Gibbs sampler with Metropolis–Hastings steps (see :mod:`~lightning_xai.dmmmen.gibbs` for the model and the sweep),
written from the equations, in float64 torch, batched over components, on CPU or GPU.

Where this implementation departs from the authors' R code (deliberately):

* each component has its own **unpenalised intercept** (with a wide Gaussian prior); the fit centres ``x`` and ``y``
  for conditioning, and every output is in the original units (``ŷ = x·β_j + b_j``);
* the net choices and penalties are drawn with the scale variables integrated out, and the penalties' gamma priors
  are included; empty components really are redrawn from the prior (the R code writes that draw to the wrong place);
* label switching is fixed online (Hungarian matching of every kept sweep to a reference assignment) and only
  running means are kept, never traces; coefficient means are Rao–Blackwellised (means of ``E[β | rest]``).

Without the explained network's output ``y`` a mixture of regressions cannot tell which component a new input
belongs to (``z`` does not depend on ``x`` in the model), so :meth:`DMMMENSurrogate.predict` and
:meth:`DMMMENSurrogate.explain` take an optional ``y``: with it, the component is the one of maximum responsibility
(the paper's local explanation); without it, predictions are the mixture mean and the component the heaviest one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_xai.dmmmen import gibbs
from lightning_xai.dmmmen.chain import INTERCEPT_PRIOR_SCALE, centring, fingerprint, initial_state, summarise
from lightning_xai.dmmmen.checks import fit_data, fit_options, gamma_prior, positive_int
from lightning_xai.dmmmen.outputs import Components, Explanation, mixture_interval, mixture_quantile
from lightning_xai.dmmmen.relabel import OnlineMeans
from lightning_xai.dmmmen.state import ChainState, Design, Priors, Timer, make_design, recompute_statistics

__all__ = ["FORMAT_VERSION", "INTERCEPT_PRIOR_SCALE", "DMMMENSurrogate"]

FORMAT_VERSION = 1


class DMMMENSurrogate:
    """Dirichlet-process mixture of regressions with multiple elastic nets, fitted by blocked Gibbs sampling.

    Args:
        n_components: truncation level J of the stick-breaking mixture.
        n_nets: number K of elastic-net priors the components choose from.
        alpha_prior: gamma ``(shape, rate)`` of the concentration α.
        sigma_prior: inverse-gamma ``(shape, scale)`` of each component's noise variance.
        lambda1_prior: gamma ``(shape, rate)`` of each net's L1 penalty, or a float to fix it.
        lambda2_prior: gamma ``(shape, rate)`` of each net's L2 penalty, or a float to fix it.
        fit_intercept: give every component an unpenalised intercept (the data are centred for the fit).
        seed: seed of the private generator (a fresh :meth:`fit` restarts from it).
        device: where the sampler runs (default CPU).
        dtype: float64 (float32 is allowed but the Cholesky factorisations may fail).

    Example::

        surrogate = DMMMENSurrogate(n_components=6, n_nets=3, seed=0).fit(x, y, sweeps=2000)
        surrogate.components.coefficients     # (6, p), heaviest component first
        mean, component = surrogate.predict(x_new, y_new)
        low, high = surrogate.predictive_interval(x_new, level=0.9)
    """

    def __init__(
        self,
        n_components: int = 6,
        n_nets: int = 3,
        *,
        alpha_prior: tuple[float, float] = (5.0, 1.0),
        sigma_prior: tuple[float, float] = (0.5, 0.5),
        lambda1_prior: tuple[float, float] | float = (1.0, 0.5),
        lambda2_prior: tuple[float, float] | float = (4.0, 0.5),
        fit_intercept: bool = True,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.n_components = positive_int("n_components", n_components)
        self.n_nets = positive_int("n_nets", n_nets)
        self.priors = Priors(
            alpha=gamma_prior("alpha_prior", alpha_prior),
            sigma=gamma_prior("sigma_prior", sigma_prior),
            lambda1=gamma_prior("lambda1_prior", lambda1_prior, fixable=True),
            lambda2=gamma_prior("lambda2_prior", lambda2_prior, fixable=True),
        )
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype!r}")
        self.fit_intercept = bool(fit_intercept)
        self.seed = seed
        self.device = torch.device(device if device is not None else "cpu")
        self.dtype = dtype
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._state: ChainState | None = None
        self._means: OnlineMeans | None = None
        self._centre: dict | None = None  # x_mean, y_mean, v0, p, fingerprint
        self._components: Components | None = None
        self.sweeps_done = 0
        self.stopped_early = False
        self.acceptance: dict[str, float] = {}
        self.timings: dict[str, float] = {}

    # ---------------------------------------------------------------------------------------------------------- fit
    def fit(
        self,
        x: Tensor,
        y: Tensor,
        sweeps: int = 2000,
        burn_in: int | None = None,
        warm_start: bool = False,
        time_budget: float | None = None,
        progress: Callable[[int, int], None] | bool = False,
        profile: bool = False,
    ) -> DMMMENSurrogate:
        """Run the Gibbs sampler on ``(x, y)`` and keep the relabelled posterior means of the kept sweeps.

        Args:
            x: inputs (n, p).
            y: response (n,), e.g. :func:`~lightning_xai.dmmmen.features.logit_target` of the class probability.
            sweeps: number of sweeps in this call.
            burn_in: sweeps discarded first (default ``sweeps // 2``); the penalties' random-walk steps are tuned
                during them. The posterior means are over the remaining sweeps of this call.
            warm_start: continue the chain from its current state (and generator) instead of restarting from the
                seed. With the same data the assignments carry over; with new data (same p) they are first drawn
                from the current parameters. The centring of the first fit is kept.
            time_budget: stop cleanly after this many seconds (the means cover the kept sweeps done so far; if none
                was kept, reports use the last state).
            progress: ``True`` for a tqdm bar, or a callable receiving ``(done, total)`` after every sweep.
            profile: record wall time per step of the sweep in :attr:`timings` (synchronises CUDA).

        Returns:
            ``self``.
        """
        x, y = fit_data(x, y, self.device, self.dtype)
        sweeps, burn = fit_options(sweeps, burn_in, time_budget, progress)
        started = time.perf_counter()
        design = self._start(x, y, warm_start)
        timer = Timer(enabled=profile)
        self.sweeps_done = self._run(design, sweeps, burn, started, time_budget, progress, timer)
        state = self._state
        self.acceptance = {
            name: a / b
            for name, a, b in zip(("sigma2", "lambda1", "lambda2"), state.accepted.tolist(), state.tried.tolist())
            if b > 0
        }
        self.timings = dict(timer.seconds)
        return self

    def _start(self, x: Tensor, y: Tensor, warm_start: bool) -> Design:
        """The design of this fit, with the chain ready for its first sweep: restarted from the seed (a fresh fit),
        or continued (a warm start; on new data the assignments are first drawn from the current parameters)."""
        data_hash = fingerprint(x, y)
        continuing = bool(warm_start) and self._state is not None
        if continuing and x.shape[1] != self._centre["p"]:
            expected = self._centre["p"]
            raise ValueError(f"warm_start needs the same number of features as before ({expected}), got {x.shape[1]}")
        if not continuing:
            self._generator.manual_seed(self.seed)
            self._centre = centring(x, y, self.fit_intercept)
        design = self._design(x, y)
        if not continuing:
            self._state = initial_state(design, self.priors, self.n_components, self.n_nets, self._generator,
                                        self.dtype, self.device)
        elif data_hash != self._centre["fingerprint"]:  # new data: assignments from the current parameters
            z = gibbs.sample_assignments(self._state, design, self._generator)
            recompute_statistics(self._state, design, z)
        self._centre["fingerprint"] = data_hash
        self._state.accepted.zero_()
        self._state.tried.zero_()
        self._means = OnlineMeans(self.n_components, design.x.shape[1], design.x)
        self._components = None
        return design

    def _run(
        self,
        design: Design,
        sweeps: int,
        burn: int,
        started: float,
        time_budget: float | None,
        progress: Callable[[int, int], None] | bool,
        timer: Timer,
    ) -> int:
        """Run up to ``sweeps`` sweeps (penalty steps tuned during the first ``burn``, means kept after), stopping
        cleanly once ``time_budget`` seconds have passed since ``started``; returns the sweeps done."""
        state = self._state
        bar = _progress_bar(sweeps) if progress is True else None
        done, self.stopped_early = 0, False
        try:
            for t in range(sweeps):
                gain = (t + 1) ** -0.6 if t < burn else None
                gibbs.sweep(state, design, self.priors, self._generator, gain, timer)
                if t >= burn:
                    with timer("relabel+means", self.device):
                        self._accumulate(state)
                done = t + 1
                if bar is not None:
                    bar.update(1)
                elif callable(progress):
                    progress(done, sweeps)
                if time_budget is not None and time.perf_counter() - started > time_budget and done < sweeps:
                    self.stopped_early = True
                    break
        finally:
            if bar is not None:
                bar.close()
        return done

    def _accumulate(self, state: ChainState) -> None:
        values = {
            "coef": state.beta_mean,
            "sigma2": state.sigma2,
            "lambda1": state.lam1[state.c],
            "lambda2": state.lam2[state.c],
        }
        self._means.add(state.z, state.log_pi.exp(), state.counts, values, state.alpha)

    def _design(self, x: Tensor, y: Tensor) -> Design:
        c = self._centre
        return make_design(x, y, c["x_mean"], c["y_mean"], self.fit_intercept, c["v0"])

    # -------------------------------------------------------------------------------------------------- summaries
    @property
    def components(self) -> Components:
        """Posterior-mean parameters per component, heaviest first (see :class:`Components`)."""
        if self._components is None:
            if self._state is None:
                raise RuntimeError("DMMMENSurrogate is not fitted: call fit(x, y) first")
            self._components = summarise(self._state, self._means, self._centre, self.fit_intercept, self.dtype)
        return self._components

    def summary_scalars(self) -> dict[str, float]:
        """Scalars worth logging: occupied components, mean α, MH acceptance rates, sweeps done and kept."""
        kept = self._means.kept if self._means is not None else 0
        out = {
            "n_occupied": float(self.components.occupied.sum()),
            "sweeps": float(self.sweeps_done),
            "kept": float(kept),
        }
        if kept:
            out["alpha"] = float(self._means.alpha / kept)
            out["n_occupied_per_sweep"] = float(self._means.n_occupied / kept)
        out.update({f"accept_{k}": v for k, v in self.acceptance.items()})
        return out

    # ------------------------------------------------------------------------------------------------- prediction
    def _inputs(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x).detach().to(device=self.device, dtype=self.dtype)
        p = self.components.coefficients.shape[1]
        if x.dim() != 2 or x.shape[1] != p:
            raise ValueError(f"x must have shape (n, {p}), got {tuple(x.shape)}")
        return x

    def _mixture(self, x: Tensor) -> tuple[Tensor, Tensor, Components]:
        """Component means (n, J) and weights renormalised over the occupied components."""
        comp = self.components
        weights = torch.where(comp.occupied, comp.weights, torch.zeros_like(comp.weights))
        return x @ comp.coefficients.T + comp.intercepts, weights / weights.sum(), comp

    def responsibilities(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``P(z = j | x, y)`` under the posterior-mean parameters (n, J); without ``y`` every row is the weights."""
        x = self._inputs(x)
        means, weights, comp = self._mixture(x)
        if y is None:
            return weights.expand(x.shape[0], -1).clone()
        y = torch.as_tensor(y).to(device=self.device, dtype=self.dtype).reshape(-1, 1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y must have {x.shape[0]} entries to match x, got {y.shape[0]}")
        sigma2 = torch.where(comp.occupied, comp.sigma2, torch.ones_like(comp.sigma2))
        log_r = weights.log() - 0.5 * sigma2.log() - (y - means).square() / (2 * sigma2)
        return torch.softmax(log_r.masked_fill(~comp.occupied, -math.inf), dim=1)

    def predict(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Surrogate predictions and components.

        Args:
            x: inputs (n, p).
            y: the explained model's outputs for ``x`` (optional). With them each input goes to its
                maximum-responsibility component and the prediction is that component's ``x·β + b``; without them
                the prediction is the mixture mean and the component the heaviest occupied one.

        Returns:
            ``(mean (n,), component (n,))``, components indexed as in :attr:`components`.
        """
        x = self._inputs(x)
        means, weights, _ = self._mixture(x)
        if y is None:
            return means @ weights, torch.full((x.shape[0],), int(weights.argmax()), device=self.device)
        component = self.responsibilities(x, y).argmax(1)
        return means.gather(1, component[:, None]).squeeze(1), component

    def explain(self, x: Tensor, y: Tensor | None = None) -> Explanation:
        """Local explanations: the component as in :meth:`predict`, its ``β`` and the contributions ``x ⊙ β``."""
        x = self._inputs(x)
        _, component = self.predict(x, y)
        comp = self.components
        coefficients = comp.coefficients[component]
        return Explanation(component, coefficients, x * coefficients, comp.intercepts[component])

    def predictive_interval(
        self, x: Tensor, level: float = 0.9, draws: int | None = 1000, chunk: int = 1024
    ) -> tuple[Tensor, Tensor]:
        """Central interval of the mixture predictive ``Σ_j π_j·N(x·β_j + b_j, σ_j²)`` for each row of ``x``.

        Args:
            x: inputs (n, p).
            level: coverage of the interval, in (0, 1).
            draws: Monte Carlo draws per row (component by weight, then the normal), from a generator seeded by
                ``seed`` so the answer is reproducible and the chain's stream is untouched; ``None`` computes the
                exact quantiles of the plug-in mixture by bisection.
            chunk: rows processed at once.

        Returns:
            ``(low (n,), high (n,))``.
        """
        if not (isinstance(level, float) and 0.0 < level < 1.0):
            raise ValueError(f"level must be a float in (0, 1), got {level!r}")
        if draws is not None and (not isinstance(draws, int) or isinstance(draws, bool) or draws < 2):
            raise ValueError(f"draws must be an int >= 2 or None, got {draws!r}")
        x = self._inputs(x)
        means, weights, comp = self._mixture(x)
        sd = torch.where(comp.occupied, comp.sigma2, torch.ones_like(comp.sigma2)).sqrt()
        probs = ((1 - level) / 2, (1 + level) / 2)
        if draws is None:
            return mixture_quantile(means, sd, weights, probs[0]), mixture_quantile(means, sd, weights, probs[1])
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        return mixture_interval(means, sd, weights, probs, draws, gen, chunk)

    # -------------------------------------------------------------------------------------------------- checkpoint
    def _config(self) -> dict:
        return {
            "n_components": self.n_components,
            "n_nets": self.n_nets,
            "fit_intercept": self.fit_intercept,
            "seed": self.seed,
            "priors": {k: getattr(self.priors, k) for k in ("alpha", "sigma", "lambda1", "lambda2")},
        }

    def state_dict(self) -> dict:
        """Everything needed to resume the chain exactly: chain tensors, generator state, running means, centring."""
        out: dict = {"format": FORMAT_VERSION, "config": self._config(), "fitted": self._state is not None}
        if self._state is None:
            return out
        tensors = {name: t.detach().cpu().clone() for name, t in self._state.tensors().items()}
        centre = {k: (v.cpu().clone() if isinstance(v, Tensor) else v) for k, v in self._centre.items()}
        out.update(
            chain=tensors,
            sweep=self._state.sweep,
            generator=self._generator.get_state(),
            means=None if self._means is None else self._means.state_dict(),
            centre=centre,
            run={"sweeps_done": self.sweeps_done, "stopped_early": self.stopped_early,
                 "acceptance": dict(self.acceptance)},
        )
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (the configuration must match this instance's)."""
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported DMMMENSurrogate state format {state.get('format')!r}")
        mine, theirs = self._config(), state["config"]
        for key in ("n_components", "n_nets", "fit_intercept"):
            if mine[key] != theirs[key]:
                raise ValueError(f"state_dict has {key}={theirs[key]!r} but this surrogate has {mine[key]!r}")
        self._components = None
        if not state["fitted"]:
            self._state, self._means, self._centre = None, None, None
            return
        on = dict(device=self.device)
        chain = {k: (v.to(**on, dtype=self.dtype) if v.is_floating_point() else v.to(**on))
                 for k, v in state["chain"].items()}
        self._state = ChainState(**chain, sweep=int(state["sweep"]))
        self._generator.set_state(state["generator"])
        self._centre = {k: (v.to(**on, dtype=self.dtype) if isinstance(v, Tensor) else v)
                        for k, v in state["centre"].items()}
        self._means = None
        if state["means"] is not None:
            p = self._centre["p"] + int(self.fit_intercept)
            self._means = OnlineMeans(self.n_components, p, self._state.beta)
            self._means.load_state_dict(state["means"])
        run = state["run"]
        self.sweeps_done, self.stopped_early = int(run["sweeps_done"]), bool(run["stopped_early"])
        self.acceptance = dict(run["acceptance"])


# ------------------------------------------------------------------------------------------------------------ helpers
def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="DMM-MEN sweeps", leave=False)
