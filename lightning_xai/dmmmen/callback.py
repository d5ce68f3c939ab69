"""The DMMMEN callback: a Dirichlet mixture of elastic-net regressions fitted to the network as a global surrogate.

DMM-MEN (Guo et al., NeurIPS 2018, arXiv:1811.03422) explains one class of a classifier by regressing the logit of
that class's probability on the input features with a mixture of sparse linear models; each component is a
class-level pattern, and an input's explanation is its component's coefficients. Training examples are collected as
they stream past (a reservoir of at most ``max_examples`` inputs per process, with labels when the batches carry
them); every ``every_n_epochs`` validation epochs, and once more at the end of training, the surrogate is (re)fitted
on the **current** network's outputs for the stored inputs of the class, warm-started from the previous fit, within
``sweeps`` Gibbs sweeps or ``time_budget`` seconds, with a progress bar. Under DDP the reservoirs are gathered and
the fit runs on global rank zero, its state broadcast to the others.

At each report it logs, for the explained class, on held-out validation inputs of that class:
``dmmmen/rmsd_prob`` (RMSD between the sigmoid of the surrogate's prediction and the network's probability, the
paper's fidelity figure; mixture mean, no access to the network's output), ``dmmmen/rmsd_prob_assigned`` (each input
in the component its network output makes most likely: the local explanation's fidelity), ``dmmmen/r2`` (on logits),
``dmmmen/coverage90`` (90% predictive intervals), ``dmmmen/occupied`` and the paper's three bootstrap tests (PCR of
top-N features vs N random ones, see :mod:`~lightning_xai.dmmmen.bootstrap`), plus the images
``dmmmen/components`` (coefficient maps of the occupied components, heaviest first) and ``dmmmen/weights``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_xai._core.batch import BatchFn
from lightning_xai._core.callback import ExplainerCallback
from lightning_xai._core.logging import figure_to_image, log_image, log_scalars
from lightning_xai._core.modules import eval_mode
from lightning_xai.dmmmen.bootstrap import bootstrap_tests
from lightning_xai.dmmmen.features import FeatureSelector, class_logit
from lightning_xai.dmmmen.model import DMMMENSurrogate
from lightning_xai.viz import diverging, new_figure, stack_rows, tile_row


class DMMMEN(ExplainerCallback):
    """Fit a DMM-MEN global surrogate of one class of the network during (and at the end of) training.

    Args:
        target_class: the class explained.
        n_features: input features kept (highest variance; all of them when the input has fewer).
        feature_indices: flat input indices to keep instead (e.g. pixels chosen by the user); overrides
            ``n_features``.
        n_components: truncation level J of the mixture.
        n_nets: number K of elastic-net priors.
        sweeps: Gibbs sweeps of the first fit; refits run ``refit_sweeps``.
        refit_sweeps: Gibbs sweeps of each warm-started refit.
        time_budget: seconds one fit may take at most (``None``: no limit).
        max_examples: training inputs kept per process (reservoir sampling, fixed memory).
        top_features: N of the bootstrap tests.
        metric_size: validation inputs per process behind the scalars.
        every_n_epochs: refit and report every this many validation epochs.
        progress: show a progress bar during fits.
        input_fn: callable ``batch -> input``.
        target_fn: callable ``batch -> labels``; without labels the network's predictions choose the class's inputs.
        name: tag prefix (default ``dmmmen``).
        seed: seed of the sampler and of the reservoir.
    """

    method = "dmmmen"

    def __init__(
        self,
        target_class: int = 0,
        *,
        n_features: int = 300,
        feature_indices: list[int] | None = None,
        n_components: int = 6,
        n_nets: int = 3,
        sweeps: int = 1000,
        refit_sweeps: int = 300,
        time_budget: float | None = 60.0,
        max_examples: int = 5000,
        top_features: int = 16,
        metric_size: int = 512,
        every_n_epochs: int = 5,
        progress: bool = True,
        input_fn: BatchFn | None = None,
        target_fn: BatchFn | None = None,
        name: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(input_fn=input_fn, target_fn=target_fn, probe_size=0, metric_size=metric_size,
                         every_n_epochs=every_n_epochs, name=name, seed=seed)
        for key, value in (("n_features", n_features), ("sweeps", sweeps), ("refit_sweeps", refit_sweeps),
                           ("max_examples", max_examples), ("top_features", top_features),
                           ("metric_size", metric_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        if not isinstance(target_class, int) or target_class < 0:
            raise ValueError(f"target_class={target_class!r} must be a non-negative class index")
        if time_budget is not None and time_budget <= 0:
            raise ValueError(f"time_budget={time_budget!r} must be positive or None")
        self.target_class = target_class
        self.n_features, self.sweeps, self.refit_sweeps = n_features, sweeps, refit_sweeps
        self.time_budget, self.max_examples, self.top_features = time_budget, max_examples, top_features
        self.progress = progress
        self._surrogate_args = (n_components, n_nets, seed)
        self._surrogate: DMMMENSurrogate | None = None  # built on first use: a torch.Generator cannot cross ddp_spawn
        self.selector = None if feature_indices is None else FeatureSelector(indices=list(feature_indices))
        self._pool: torch.Tensor | None = None  # reservoir of training inputs (CPU)
        self._labels: torch.Tensor | None = None
        self._seen = 0
        self.fits = 0
        self.skipped_rows = 0  # training inputs left out of the reservoir for holding NaN/Inf

    @property
    def surrogate(self) -> DMMMENSurrogate:
        """The DMM-MEN model (created on first use, in the process that trains)."""
        if self._surrogate is None:
            n_components, n_nets, seed = self._surrogate_args
            self._surrogate = DMMMENSurrogate(n_components, n_nets, seed=seed)
            pickled = self.__dict__.pop("_pickled_surrogate", None)
            if pickled is not None:
                self._surrogate.load_state_dict(pickled)
        return self._surrogate

    def __getstate__(self) -> dict[str, Any]:
        # a fitted surrogate travels as its state dict: its torch.Generator cannot cross ddp_spawn's pickling
        state = self.__dict__.copy()
        if state.get("_surrogate") is not None:
            state["_pickled_surrogate"] = state.pop("_surrogate").state_dict()
            state["_surrogate"] = None
        return state

    # ------------------------------------------------------------------ collecting
    def train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        x, y = self.batches.input(batch).detach().cpu(), self.batches.target(batch)
        y = None if y is None else y.detach().cpu()
        finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
        if not bool(finite.all()):  # a NaN/Inf input would make every later fit fail: keep it out of the reservoir
            if self.skipped_rows == 0:
                rank_zero_warn("DMMMEN: skipped training inputs holding NaN/Inf (counted in skipped_rows).")
            self.skipped_rows += int((~finite).sum())
            x, y = x[finite], None if y is None else y[finite]
        with self.rng.active():  # reservoir sampling (Vitter's algorithm R) from the private stream
            for i in range(x.shape[0]):
                self._seen += 1
                if self._pool is None or self._pool.shape[0] < self.max_examples:
                    self._append(x[i : i + 1], None if y is None else y[i : i + 1])
                else:
                    j = int(torch.randint(self._seen, ()))
                    if j < self.max_examples:
                        self._pool[j] = x[i]
                        if self._labels is not None and y is not None:
                            self._labels[j] = y[i]

    def _append(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        self._pool = x.clone() if self._pool is None else torch.cat([self._pool, x])
        if y is not None:
            self._labels = y.clone() if self._labels is None else torch.cat([self._labels, y])

    # ------------------------------------------------------------------ fitting
    def _class_inputs(self, x: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs of the explained class (by label, else by the network's prediction) and the others."""
        logits = self._logits(x)
        chosen = (labels if labels is not None else logits.argmax(-1)).to(x.device) == self.target_class
        return x[chosen], x[~chosen]

    def _logits(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        assert self.model is not None
        with torch.no_grad(), eval_mode(self.model):
            return torch.cat([self.model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])

    def _gathered(
        self, trainer: pl.Trainer | None, x: torch.Tensor | None, y: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Every process's rows (a collective under DDP) in a canonical order: distinct inputs, sorted.

        The order and the duplicates a sampler deals out then no longer matter: a fit or a score on the same examples
        is the same on one process or many.
        """
        parts: list[Any] = [(x, y)]
        if trainer is not None and trainer.world_size > 1:
            parts = [None] * trainer.world_size
            dist.all_gather_object(parts, (x, y))
        xs = [p for p, _ in parts if p is not None]
        ys = [q for _, q in parts if q is not None]
        if not xs:
            return None, None
        return canonical_rows(torch.cat(xs), torch.cat(ys) if len(ys) == len(xs) else None)

    def refit(self, trainer: pl.Trainer | None = None, device: torch.device | str = "cpu") -> None:
        """(Re)fit the surrogate on the current network's outputs for the stored inputs of the class."""
        pool, labels = self._gathered(trainer, self._pool, self._labels)
        rank_zero = trainer is None or trainer.is_global_zero
        if rank_zero and pool is not None:
            x_class, _ = self._class_inputs(pool.to(device), labels)
            if x_class.shape[0] >= 2:
                if self.selector is None:
                    self.selector = FeatureSelector(min(self.n_features, x_class[0].numel()))
                if self.selector.input_shape is None:
                    self.selector.fit(x_class.cpu())
                features = self.selector.transform(x_class.cpu()).double()
                target = class_logit(self._logits(x_class), self.target_class).double().cpu()
                finite = torch.isfinite(target)  # the network's output may have turned non-finite on some inputs
                features, target = features[finite], target[finite]
                sweeps = self.sweeps if self.fits == 0 else self.refit_sweeps
                self.surrogate.fit(features, target, sweeps=sweeps, warm_start=self.fits > 0,
                                   time_budget=self.time_budget, progress=self.progress)
                self.fits += 1
        if trainer is not None and trainer.world_size > 1:  # rank zero's fit, shared (each keeps its reservoir)
            self._load_fit(trainer.strategy.broadcast(self._fit_state(), src=0))

    # ------------------------------------------------------------------ reports
    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.refit(trainer, pl_module.device)
        examples = self._gathered(trainer, self.examples.inputs, self.examples.targets)  # every process's metric set
        if self.fits == 0 or examples[0] is None:
            rank_zero_info(f"DMMMEN: not enough examples of class {self.target_class} yet; nothing to report")
            return
        log_scalars(pl_module, {self.tag(k): v for k, v in self.evaluate(pl_module.device, *examples).items()})
        if trainer.is_global_zero:
            self.draw(trainer)

    def evaluate(
        self, device: torch.device | str = "cpu", x: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Held-out fidelity, interval coverage, occupancy and the bootstrap tests on validation inputs ``x`` (default:
        this process's metric set) with their ``labels``."""
        if x is None:
            x, labels = self.examples.inputs, self.examples.targets
        assert x is not None and self.selector is not None
        x = x.to(device)
        labels = None if labels is None else labels.to(device)
        x_class, x_other = self._class_inputs(x, labels)
        if x_class.shape[0] < 2:
            return {"occupied": float(self.surrogate.components.occupied.sum())}
        features = self.selector.transform(x_class.cpu()).double()
        target = class_logit(self._logits(x_class), self.target_class).double().cpu()
        mixture, _ = self.surrogate.predict(features)
        assigned, _ = self.surrogate.predict(features, target)
        low, high = self.surrogate.predictive_interval(features, level=0.9)
        prob = torch.sigmoid(target)
        residual = (target - target.mean()).square().sum().clamp_min(1e-12)
        values = {
            "rmsd_prob": float((torch.sigmoid(mixture) - prob).square().mean().sqrt()),
            "rmsd_prob_assigned": float((torch.sigmoid(assigned) - prob).square().mean().sqrt()),
            "r2": float(1 - (assigned - target).square().sum() / residual),
            "coverage90": float(((target >= low) & (target <= high)).double().mean()),
            "occupied": float(self.surrogate.components.occupied.sum()),
        }
        if x_other.shape[0] >= 1:
            # the heaviest component's most positive coefficients: the features whose values raise the class's logit
            # (the authors rank by |β|; a negative-β feature's removal raises the class rate and muddles the test)
            beta = self.surrogate.components.coefficients[0]
            k = min(self.top_features, beta.numel())
            top = self.selector.indices[beta.argsort(descending=True)[:k]]
            with self.rng.active():
                generator = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
            # new cases: faint noise just above the baseline (the paper: N(0.03, 0.01) on [0, 1] pixels)
            faint = 0.05 * float(x.max() - x.min())
            tests = bootstrap_tests(self.model, self.target_class, top, x_class, x_other, baseline=0.0,
                                    noise=(0.0, faint), generator=generator)
            values.update({f"pcr_{key}": value for key, value in tests.as_dict().items()})
        return values

    def draw(self, trainer: pl.Trainer) -> None:
        """Coefficient maps of the occupied components (image inputs) and the mixture weights (a bar chart)."""
        assert self.selector is not None
        comp = self.surrogate.components
        shown = torch.nonzero(comp.occupied).flatten()[:6]
        if self.selector.input_shape is not None and len(self.selector.input_shape) == 3:
            maps = self.selector.scatter(comp.coefficients[shown].float())
            limit = maps.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
            tiles = diverging(maps / limit, 1.0)  # one tile per component, blue < 0 < red
            log_image(trainer, self.tag("components"), stack_rows(tile_row([tiles])))
        figure = new_figure(4, 2.5)
        ax = figure.subplots()
        ax.bar(range(len(comp.weights)), comp.weights.tolist(),
               color=["tab:blue" if o else "lightgray" for o in comp.occupied.tolist()])
        ax.set_xlabel("component (heaviest first; grey: unoccupied)")
        ax.set_ylabel("weight")
        ax.set_title(f"DMM-MEN mixture weights, class {self.target_class}", fontsize=9)
        figure.tight_layout()
        log_image(trainer, self.tag("weights"), figure_to_image(figure))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A last fit on the final network, logged straight to the loggers (``self.log`` is closed here)."""
        self.refit(trainer, pl_module.device)
        examples = self._gathered(trainer, self.examples.inputs, self.examples.targets)
        if self.fits and examples[0] is not None:
            values = {self.tag(f"final_{k}"): v for k, v in self.evaluate(pl_module.device, *examples).items()}
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)
            if trainer.is_global_zero:
                self.draw(trainer)

    # ------------------------------------------------------------------ explanations and state
    def explain(self, x: torch.Tensor, model: torch.nn.Module | None = None):
        """Local explanations of inputs ``x`` (of the explained class): component, coefficients, contributions.

        The network's output on ``x`` chooses each input's component (the paper's local explanation); coefficients
        and contributions are scattered back to the input's shape.
        """
        if model is not None:
            self.model = model
        if self.selector is None or self.fits == 0:
            raise RuntimeError("DMMMEN has not been fitted yet")
        features = self.selector.transform(x.cpu()).double()
        target = class_logit(self._logits(x), self.target_class).double().cpu()
        out = self.surrogate.explain(features, target)
        out.coefficients = self.selector.scatter(out.coefficients.float())
        out.contributions = self.selector.scatter(out.contributions.float())
        return out

    def _fit_state(self) -> dict[str, Any]:
        return {
            "surrogate": self.surrogate.state_dict(),
            "selector": None if self.selector is None else self.selector.state_dict(),
            "fits": self.fits,
        }

    def _load_fit(self, state: dict[str, Any]) -> None:
        self.surrogate.load_state_dict(state["surrogate"])
        if state["selector"] is not None:
            self.selector = FeatureSelector(1)
            self.selector.load_state_dict(state["selector"])
        self.fits = int(state["fits"])

    def explainer_state(self) -> dict[str, Any]:
        state = self._fit_state()
        state.update(pool=self._pool, labels=self._labels, seen=self._seen, skipped_rows=self.skipped_rows)
        return state

    def load_explainer_state(self, state: dict[str, Any]) -> None:
        self._load_fit(state)
        self._pool, self._labels, self._seen = state["pool"], state["labels"], int(state["seen"])
        self.skipped_rows = int(state.get("skipped_rows", 0))


def canonical_rows(x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distinct rows of ``x`` in lexicographic order (with the label of each one's first occurrence)."""
    if x.shape[0] == 0:
        return x, y
    _, inverse = torch.unique(x.reshape(x.shape[0], -1), dim=0, return_inverse=True)
    positions = torch.arange(x.shape[0])
    first = torch.full((int(inverse.max()) + 1,), x.shape[0]).scatter_reduce(0, inverse, positions, reduce="amin")
    return x[first], None if y is None else y[first]
